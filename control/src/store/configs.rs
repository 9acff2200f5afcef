//! The `workload_configs` table: what a notebook's servers are provisioned from. The config
//! and the endpoint limits are stored as JSON text.

use marina_config::Id;

use super::page::{self, PageSpec};
use super::{now_ms, placeholders, Db};
use crate::error::StoreError;
use crate::model::{Page, WorkloadConfig};

/// A workload config of organization `org`.
pub async fn fetch(db: &Db, org: Id, id: Id) -> Result<Option<WorkloadConfig>, StoreError> {
    super::fetch_in_org(db, "workload_configs", org, id, WorkloadConfig::from_row).await
}

/// Does organization `org` have workload config `id`?
pub async fn exists(db: &Db, org: Id, id: Id) -> Result<bool, StoreError> {
    super::exists_in_org(db, "workload_configs", org, id).await
}

/// Workload configs by id (text), newest first.
pub async fn by_ids(db: &Db, ids: &[String]) -> Result<Vec<WorkloadConfig>, StoreError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let sql = format!(
        "SELECT * FROM workload_configs WHERE id IN ({}) ORDER BY created_at DESC, id",
        placeholders(1, ids.len())
    );
    let mut q = sqlx::query(&sql);
    for id in ids {
        q = q.bind(id.as_str());
    }
    q.fetch_all(&db.pool)
        .await?
        .iter()
        .map(WorkloadConfig::from_row)
        .collect()
}

/// The stored `config` JSON of a workload config (for the lifecycle, whoever's it is).
pub async fn config_json(db: &Db, id: Id) -> Result<String, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT config FROM workload_configs WHERE id = $1")
            .bind(id.to_string())
            .fetch_one(&db.pool)
            .await?,
    )
}

/// A page of the organization's workload configs.
pub async fn page(
    db: &Db,
    org: Id,
    spec: PageSpec<'_>,
) -> Result<Page<WorkloadConfig>, StoreError> {
    let rows = page::org_rows(db, "workload_configs", org, spec).await?;
    page::page_of(rows, WorkloadConfig::from_row, |c| (c.created_at_ms, c.id))
}

/// A workload config's fields, JSON already encoded (validated by the caller).
pub struct ConfigFields {
    pub name: String,
    pub workload_type: String,
    pub cluster_id: Option<Id>,
    pub config_json: String,
    pub endpoint_limits_json: String,
}

/// A new workload config of `org`; returns its id.
pub async fn insert(db: &Db, org: Id, f: ConfigFields, by: Id) -> Result<Id, StoreError> {
    let id = Id::random();
    let now = now_ms();
    sqlx::query(
        "INSERT INTO workload_configs (id, org_id, name, workload_type, cluster_id, config, endpoint_limits,
            created_at, created_by, updated_at, updated_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $8, $9)",
    )
    .bind(id.to_string())
    .bind(org.to_string())
    .bind(f.name)
    .bind(f.workload_type)
    .bind(f.cluster_id.map(|c| c.to_string()))
    .bind(f.config_json)
    .bind(f.endpoint_limits_json)
    .bind(now)
    .bind(by.to_string())
    .execute(&db.pool)
    .await?;
    Ok(id)
}

/// Replaces a workload config's fields.
pub async fn update(db: &Db, org: Id, id: Id, f: ConfigFields, by: Id) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE workload_configs SET name = $1, workload_type = $2, cluster_id = $3, config = $4,
            endpoint_limits = $5, updated_at = $6, updated_by = $7
         WHERE id = $8 AND org_id = $9",
    )
    .bind(f.name)
    .bind(f.workload_type)
    .bind(f.cluster_id.map(|c| c.to_string()))
    .bind(f.config_json)
    .bind(f.endpoint_limits_json)
    .bind(now_ms())
    .bind(by.to_string())
    .bind(id.to_string())
    .bind(org.to_string())
    .execute(&db.pool)
    .await?;
    Ok(())
}

/// Deletes a workload config no notebook uses; false when notebooks use it (or it is gone).
/// One statement: a notebook created concurrently either lands before (and blocks the
/// delete) or fails its foreign key after.
pub async fn delete_unused(db: &Db, org: Id, id: Id) -> Result<bool, StoreError> {
    let res = sqlx::query(
        "DELETE FROM workload_configs WHERE id = $1 AND org_id = $2
           AND NOT EXISTS (SELECT 1 FROM notebooks WHERE workload_config_id = $1)",
    )
    .bind(id.to_string())
    .bind(org.to_string())
    .execute(&db.pool)
    .await?;
    Ok(res.rows_affected() > 0)
}
