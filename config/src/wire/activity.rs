//! Activity: what each edge replica reports every `proxy.activity_interval_ms`.

use serde::{Deserialize, Serialize};

use super::AccessMode;
use crate::ids::Id;

/// One member's use of one notebook run through one edge replica since its last report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MemberActivity {
    pub notebook_id: Id,
    pub session_id: Id,
    pub member_id: Id,
    /// What the member's cookie lets them do: `edit` (the owner) or `view`.
    pub mode: AccessMode,
    /// Unix milliseconds of the member's latest request or message; `None` if none since the
    /// last report.
    pub last_active_ms: Option<i64>,
    /// WebSockets (and event streams) the member has open to this notebook through this
    /// replica now.
    pub open_sockets: u32,
    /// Unix milliseconds since when the member has had a socket open through this replica
    /// without a break; `None` when `open_sockets` is 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_since_ms: Option<i64>,
}

/// What an edge replica reports every `proxy.activity_interval_ms`: the whole of its present
/// state, not a delta. A (notebook, member) absent from a replica's latest batch has no socket
/// open through it; activity (`lastActiveMs`) is what happened since the previous batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ActivityBatch {
    pub edge_id: String,
    /// Unix milliseconds when the batch was cut.
    pub sent_at_ms: i64,
    /// Every (notebook, member) with activity or open sockets on this replica.
    pub activity: Vec<MemberActivity>,
}
