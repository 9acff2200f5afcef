//! The API's JSON shapes, field for field as the seed document shows them. (The store builds
//! them from rows: `crate::store::rows`.)
//!
//! Output types serialize camelCase; nullable fields are `null`, never omitted. Input types
//! (`*Body`) reject unknown fields, so a typo is a 400 naming the field instead of a silent
//! no-op.

use marina_config::workload::SailConfig;
use marina_config::Id;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Lifecycle states of a notebook.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Stopped,
    Starting,
    Running,
    Idle,
    Detached,
    Stopping,
    Failed,
}

impl Status {
    pub const fn as_str(self) -> &'static str {
        match self {
            Status::Stopped => "stopped",
            Status::Starting => "starting",
            Status::Running => "running",
            Status::Idle => "idle",
            Status::Detached => "detached",
            Status::Stopping => "stopping",
            Status::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Some(match s {
            "stopped" => Status::Stopped,
            "starting" => Status::Starting,
            "running" => Status::Running,
            "idle" => Status::Idle,
            "detached" => Status::Detached,
            "stopping" => Status::Stopping,
            "failed" => Status::Failed,
            _ => return None,
        })
    }

    pub const ALL: [Status; 7] = [
        Status::Stopped,
        Status::Starting,
        Status::Running,
        Status::Idle,
        Status::Detached,
        Status::Stopping,
        Status::Failed,
    ];

    /// Provisioned and serving: routed by the edge, may be opened and pinged.
    pub fn is_up(self) -> bool {
        matches!(self, Status::Running | Status::Idle | Status::Detached)
    }
}

/// A member's role in their organization.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Member,
}

impl Role {
    pub const fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Member => "member",
        }
    }
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "member" => Some(Role::Member),
            _ => None,
        }
    }
}

/// A notebook, the seed's flat shape (PATCH, start and stop return it alone).
#[derive(Clone, Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Notebook {
    #[schema(value_type = String, example = "A1B2C3D4E5")]
    pub id: Id,
    #[schema(value_type = String)]
    pub member_id: Id,
    #[schema(value_type = String)]
    pub workload_config_id: Id,
    pub name: String,
    pub description: Option<String>,
    pub status: Status,
    pub status_message: Option<String>,
    pub idle_timeout_seconds: i64,
    /// Server-wide (`control.detached_timeout_seconds`).
    pub detached_timeout_seconds: i64,
    pub last_active_at: Option<String>,
    #[schema(value_type = Option<String>)]
    pub session_id: Option<Id>,
    pub created_at: String,
    #[schema(value_type = Option<String>)]
    pub created_by: Option<Id>,
    pub updated_at: String,
    #[schema(value_type = Option<String>)]
    pub updated_by: Option<Id>,
    /// Not serialized: the organization, for tenancy checks.
    #[serde(skip)]
    pub org_id: Id,
    #[serde(skip)]
    pub created_at_ms: i64,
}

/// A notebook in a list: the normalized reference (`included` holds the objects).
#[derive(Clone, Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NotebookItem {
    #[schema(value_type = String)]
    pub notebook_id: Id,
    #[schema(value_type = Vec<String>)]
    pub team_ids: Vec<Id>,
    #[schema(value_type = String)]
    pub workload_config_id: Id,
}

/// A team.
#[derive(Clone, Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Team {
    #[schema(value_type = String)]
    pub id: Id,
    #[schema(value_type = String)]
    pub organization_id: Id,
    pub name: String,
    pub created_at: String,
    #[schema(value_type = Option<String>)]
    pub created_by: Option<Id>,
    pub updated_at: String,
    #[schema(value_type = Option<String>)]
    pub updated_by: Option<Id>,
    /// Marina has no per-team roles (org roles only): always `null`.
    #[schema(value_type = Option<String>)]
    pub default_role_id: Option<Id>,
    #[serde(skip)]
    pub created_at_ms: i64,
}

/// A team with its member count (`included.teams`).
#[derive(Clone, Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TeamWithCount {
    pub team: Team,
    pub member_count: i64,
}

/// Limits on a notebook's endpoints. `spark_connect`: most concurrent Spark Connect sessions
/// on the notebook's Sail server (0: unlimited).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EndpointLimits {
    #[serde(default)]
    pub spark_connect: u32,
}

/// `config` of a workload config: `{ "sail": … }`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkloadConfigBody {
    #[schema(value_type = Object)]
    pub sail: SailConfig,
}

/// A workload config.
#[derive(Clone, Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadConfig {
    #[schema(value_type = String)]
    pub id: Id,
    pub name: String,
    pub workload_type: String,
    #[schema(value_type = Option<String>)]
    pub cluster_id: Option<Id>,
    pub config: WorkloadConfigBody,
    pub endpoint_limits: EndpointLimits,
    pub created_at: String,
    #[schema(value_type = Option<String>)]
    pub created_by: Option<Id>,
    pub updated_at: String,
    #[schema(value_type = Option<String>)]
    pub updated_by: Option<Id>,
    #[serde(skip)]
    pub created_at_ms: i64,
}

/// What list and describe responses carry besides the items, each object once.
#[derive(Clone, Debug, Default, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Included {
    pub notebooks: Vec<Notebook>,
    pub teams: Vec<TeamWithCount>,
    pub workload_configs: Vec<WorkloadConfig>,
}

/// `GET /workloads/notebooks`, `GET /workloads/teams/{team}/notebooks`.
#[derive(Clone, Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NotebookList {
    /// Every notebook the caller can see (not just this page).
    pub total: i64,
    pub items: Vec<NotebookItem>,
    pub included: Included,
    /// Pass as `pageToken` for the next page; `null` on the last page.
    pub next_page_token: Option<String>,
}

/// `POST /workloads/notebooks`, `GET /workloads/notebooks/{notebook}`.
#[derive(Clone, Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NotebookOne {
    pub item: NotebookItem,
    pub included: Included,
}

/// A team's access to a notebook.
#[derive(Clone, Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NotebookTeam {
    #[schema(value_type = String)]
    pub notebook_id: Id,
    #[schema(value_type = String)]
    pub team_id: Id,
    pub created_at: String,
    #[schema(value_type = Option<String>)]
    pub created_by: Option<Id>,
    pub updated_at: String,
    #[schema(value_type = Option<String>)]
    pub updated_by: Option<Id>,
}

#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct NotebookTeamList {
    pub items: Vec<NotebookTeam>,
}

/// How someone present has a notebook open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PresenceMode {
    /// The owner, in the editor.
    Edit,
    /// Anyone else, in the read-only mirror.
    View,
}

/// One member who has a notebook open now.
#[derive(Clone, Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PresenceEntry {
    #[schema(value_type = String)]
    pub member_id: Id,
    pub mode: PresenceMode,
    /// Since when the member has had it open without a break (the earliest over the edges).
    pub since: Option<String>,
    /// The member's latest activity (a request or message of theirs) in this run, if any.
    pub last_active_at: Option<String>,
    /// WebSockets (and event streams) the member has open to it, over every edge replica.
    pub open_sockets: i64,
}

/// `GET /workloads/notebooks/{notebook}/presence`.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct PresenceList {
    pub items: Vec<PresenceEntry>,
}

/// `POST /workloads/notebooks/{notebook}/open`.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct OpenUrl {
    /// The edge's one-time handshake URL; valid 5 minutes, usable once.
    pub url: String,
}

/// A member of an organization.
#[derive(Clone, Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Member {
    #[schema(value_type = String)]
    pub id: Id,
    #[schema(value_type = String)]
    pub organization_id: Id,
    pub name: String,
    pub email: Option<String>,
    pub role: Role,
    pub created_at: String,
    #[schema(value_type = Option<String>)]
    pub created_by: Option<Id>,
    pub updated_at: String,
    #[schema(value_type = Option<String>)]
    pub updated_by: Option<Id>,
    #[serde(skip)]
    pub created_at_ms: i64,
}

/// An API key's metadata (never its secret, which only the creation response carries).
#[derive(Clone, Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiKey {
    #[schema(value_type = String)]
    pub id: Id,
    #[schema(value_type = String)]
    pub member_id: Id,
    pub name: String,
    /// The first characters of the secret, to recognise it.
    pub prefix: String,
    pub created_at: String,
    #[schema(value_type = Option<String>)]
    pub created_by: Option<Id>,
}

/// Team membership.
#[derive(Clone, Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TeamMember {
    #[schema(value_type = String)]
    pub team_id: Id,
    #[schema(value_type = String)]
    pub member_id: Id,
    pub created_at: String,
    #[schema(value_type = Option<String>)]
    pub created_by: Option<Id>,
}

/// `GET /iam/me`.
#[derive(Clone, Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Me {
    pub member: Member,
    #[schema(value_type = Vec<String>)]
    pub team_ids: Vec<Id>,
}

/// A page of `T` (IAM lists and workload configs).
#[derive(Clone, Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Page<T: ToSchema> {
    pub total: i64,
    pub items: Vec<T>,
    pub next_page_token: Option<String>,
}

/// A list without pagination.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Items<T: ToSchema> {
    pub items: Vec<T>,
}

/// `POST …/api-keys`: the key and, this once, its secret.
#[derive(Clone, Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreatedApiKey {
    pub api_key: ApiKey,
    /// The bearer secret. Shown only here; only its hash is stored.
    pub secret: String,
}

// === Request bodies ===

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateNotebookBody {
    #[schema(value_type = String)]
    pub workload_config_id: Id,
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// Default 3600; 0 disables the idle stop.
    #[serde(default)]
    pub idle_timeout_seconds: Option<i64>,
    #[serde(default)]
    #[schema(value_type = Vec<String>)]
    pub team_ids: Vec<Id>,
}

/// Absent fields are left alone; `description: null` clears it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateNotebookBody {
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub workload_config_id: Option<Id>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub description: Option<Option<String>>,
    #[serde(default)]
    pub idle_timeout_seconds: Option<i64>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TeamIdsBody {
    #[schema(value_type = Vec<String>)]
    pub team_ids: Vec<Id>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateWorkloadConfigBody {
    pub name: String,
    /// Default `notebook`.
    #[serde(default)]
    pub workload_type: Option<String>,
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub cluster_id: Option<Id>,
    pub config: WorkloadConfigBody,
    #[serde(default)]
    pub endpoint_limits: Option<EndpointLimits>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateWorkloadConfigBody {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub workload_type: Option<String>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub cluster_id: Option<Option<Id>>,
    #[serde(default)]
    pub config: Option<WorkloadConfigBody>,
    #[serde(default)]
    pub endpoint_limits: Option<EndpointLimits>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateMemberBody {
    pub name: String,
    #[serde(default)]
    pub email: Option<String>,
    /// Default `member`.
    #[serde(default)]
    pub role: Option<Role>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateMemberBody {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>)]
    pub email: Option<Option<String>>,
    #[serde(default)]
    pub role: Option<Role>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TeamBody {
    pub name: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MemberIdsBody {
    #[schema(value_type = Vec<String>)]
    pub member_ids: Vec<Id>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateApiKeyBody {
    pub name: String,
}

/// Tells "absent" (outer `None`) from "null" (`Some(None)`).
fn double_option<'de, T, D>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    T: Deserialize<'de>,
    D: serde::Deserializer<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}
