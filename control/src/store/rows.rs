//! Row mapping: every model type the store returns is built from its row here, and only
//! here, so a column's name, type and decoding (ids, unix-millisecond timestamps rendered
//! RFC 3339, JSON text, enums) are written once. A row that does not decode is
//! [`StoreError::Corrupt`].

use sqlx::any::AnyRow;
use sqlx::Row;

use super::{get_id, get_opt_id, rfc3339};
use crate::error::StoreError;
use crate::model::{ApiKey, Member, Notebook, NotebookTeam, Role, Status, Team, WorkloadConfig};

/// Reads text column `column` and decodes it with `parse`; a value it rejects is
/// [`StoreError::Corrupt`] named `what`.
pub(super) fn get_parsed<T>(
    row: &AnyRow,
    column: &'static str,
    what: &'static str,
    parse: impl FnOnce(&str) -> Option<T>,
) -> Result<T, StoreError> {
    let value: String = row.try_get(column)?;
    parse(&value).ok_or(StoreError::Corrupt {
        column: what,
        value,
    })
}

/// Reads JSON text column `column`; text that does not decode is [`StoreError::Corrupt`]
/// named `what`.
fn get_json<T: serde::de::DeserializeOwned>(
    row: &AnyRow,
    column: &'static str,
    what: &'static str,
) -> Result<T, StoreError> {
    get_parsed(row, column, what, |text| serde_json::from_str(text).ok())
}

impl Notebook {
    pub(crate) fn from_row(
        row: &AnyRow,
        detached_timeout_seconds: i64,
    ) -> Result<Notebook, StoreError> {
        let created_at: i64 = row.try_get("created_at")?;
        Ok(Notebook {
            id: get_id(row, "id")?,
            org_id: get_id(row, "org_id")?,
            member_id: get_id(row, "member_id")?,
            workload_config_id: get_id(row, "workload_config_id")?,
            name: row.try_get("name")?,
            description: row.try_get("description")?,
            status: get_parsed(row, "status", "status", Status::parse)?,
            status_message: row.try_get("status_message")?,
            idle_timeout_seconds: row.try_get("idle_timeout_seconds")?,
            detached_timeout_seconds,
            last_active_at: row
                .try_get::<Option<i64>, _>("last_active_at")?
                .map(rfc3339),
            session_id: get_opt_id(row, "session_id")?,
            created_at: rfc3339(created_at),
            created_at_ms: created_at,
            created_by: get_opt_id(row, "created_by")?,
            updated_at: rfc3339(row.try_get("updated_at")?),
            updated_by: get_opt_id(row, "updated_by")?,
        })
    }
}

impl Team {
    pub(crate) fn from_row(row: &AnyRow) -> Result<Team, StoreError> {
        let created_at: i64 = row.try_get("created_at")?;
        Ok(Team {
            id: get_id(row, "id")?,
            organization_id: get_id(row, "org_id")?,
            name: row.try_get("name")?,
            created_at: rfc3339(created_at),
            created_at_ms: created_at,
            created_by: get_opt_id(row, "created_by")?,
            updated_at: rfc3339(row.try_get("updated_at")?),
            updated_by: get_opt_id(row, "updated_by")?,
            default_role_id: None,
        })
    }
}

impl WorkloadConfig {
    pub(crate) fn from_row(row: &AnyRow) -> Result<WorkloadConfig, StoreError> {
        let created_at: i64 = row.try_get("created_at")?;
        Ok(WorkloadConfig {
            id: get_id(row, "id")?,
            name: row.try_get("name")?,
            workload_type: row.try_get("workload_type")?,
            cluster_id: get_opt_id(row, "cluster_id")?,
            config: get_json(row, "config", "workload_configs.config")?,
            endpoint_limits: get_json(row, "endpoint_limits", "workload_configs.endpoint_limits")?,
            created_at: rfc3339(created_at),
            created_at_ms: created_at,
            created_by: get_opt_id(row, "created_by")?,
            updated_at: rfc3339(row.try_get("updated_at")?),
            updated_by: get_opt_id(row, "updated_by")?,
        })
    }
}

impl NotebookTeam {
    pub(crate) fn from_row(row: &AnyRow) -> Result<NotebookTeam, StoreError> {
        Ok(NotebookTeam {
            notebook_id: get_id(row, "notebook_id")?,
            team_id: get_id(row, "team_id")?,
            created_at: rfc3339(row.try_get("created_at")?),
            created_by: get_opt_id(row, "created_by")?,
            updated_at: rfc3339(row.try_get("updated_at")?),
            updated_by: get_opt_id(row, "updated_by")?,
        })
    }
}

impl Member {
    pub(crate) fn from_row(row: &AnyRow) -> Result<Member, StoreError> {
        let created_at: i64 = row.try_get("created_at")?;
        Ok(Member {
            id: get_id(row, "id")?,
            organization_id: get_id(row, "org_id")?,
            name: row.try_get("name")?,
            email: row.try_get("email")?,
            role: get_parsed(row, "role", "members.role", Role::parse)?,
            created_at: rfc3339(created_at),
            created_at_ms: created_at,
            created_by: get_opt_id(row, "created_by")?,
            updated_at: rfc3339(row.try_get("updated_at")?),
            updated_by: get_opt_id(row, "updated_by")?,
        })
    }
}

impl ApiKey {
    pub(crate) fn from_row(row: &AnyRow) -> Result<ApiKey, StoreError> {
        Ok(ApiKey {
            id: get_id(row, "id")?,
            member_id: get_id(row, "member_id")?,
            name: row.try_get("name")?,
            prefix: row.try_get("prefix")?,
            created_at: rfc3339(row.try_get("created_at")?),
            created_by: get_opt_id(row, "created_by")?,
        })
    }
}
