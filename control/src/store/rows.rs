//! Row mapping: every model type the store returns is built from its row here, and only
//! here, so a column's name, type and decoding (ids, unix-millisecond timestamps rendered
//! RFC 3339, JSON text, enums) are written once. A row that does not decode is
//! [`StoreError::Corrupt`].

use sqlx::any::AnyRow;
use sqlx::Row;

use super::{get_id, get_opt_id, rfc3339};
use crate::error::StoreError;
use crate::model::{ApiKey, Member, Notebook, NotebookTeam, Role, Status, Team, WorkloadConfig};

impl Notebook {
    pub(crate) fn from_row(
        row: &AnyRow,
        detached_timeout_seconds: i64,
    ) -> Result<Notebook, StoreError> {
        let status: String = row.try_get("status")?;
        let created_at: i64 = row.try_get("created_at")?;
        Ok(Notebook {
            id: get_id(row, "id")?,
            org_id: get_id(row, "org_id")?,
            member_id: get_id(row, "member_id")?,
            workload_config_id: get_id(row, "workload_config_id")?,
            name: row.try_get("name")?,
            description: row.try_get("description")?,
            status: Status::parse(&status).ok_or(StoreError::Corrupt {
                column: "status",
                value: status,
            })?,
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
        let config: String = row.try_get("config")?;
        let limits: String = row.try_get("endpoint_limits")?;
        let created_at: i64 = row.try_get("created_at")?;
        Ok(WorkloadConfig {
            id: get_id(row, "id")?,
            name: row.try_get("name")?,
            workload_type: row.try_get("workload_type")?,
            cluster_id: get_opt_id(row, "cluster_id")?,
            config: serde_json::from_str(&config).map_err(|_| StoreError::Corrupt {
                column: "workload_configs.config",
                value: config.clone(),
            })?,
            endpoint_limits: serde_json::from_str(&limits).map_err(|_| StoreError::Corrupt {
                column: "workload_configs.endpoint_limits",
                value: limits.clone(),
            })?,
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
        let role: String = row.try_get("role")?;
        let created_at: i64 = row.try_get("created_at")?;
        Ok(Member {
            id: get_id(row, "id")?,
            organization_id: get_id(row, "org_id")?,
            name: row.try_get("name")?,
            email: row.try_get("email")?,
            role: Role::parse(&role).ok_or(StoreError::Corrupt {
                column: "members.role",
                value: role,
            })?,
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
