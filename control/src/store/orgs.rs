//! The `organizations` table (and the `meta` marker of the empty-database bootstrap).

use marina_config::Id;

use super::keys::StoredSecret;
use super::{now_ms, Db};
use crate::error::StoreError;

/// Number of organizations (zero: an empty database to bootstrap).
pub async fn count(db: &Db) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar("SELECT COUNT(*) FROM organizations")
        .fetch_one(&db.pool)
        .await?)
}

/// A new organization's ids.
pub struct NewOrganization {
    pub organization_id: Id,
    pub admin_member_id: Id,
}

/// Creates an organization, its first admin and his key (`secret`, named `bootstrap`). When
/// `once` is given, does so only if that marker was never set (the empty-database bootstrap:
/// two replicas starting at once create one organization, not two); returns `None` then.
pub async fn create(
    db: &Db,
    name: &str,
    admin_name: &str,
    secret: StoredSecret<'_>,
    once: Option<&str>,
) -> Result<Option<NewOrganization>, StoreError> {
    let org = Id::random();
    let admin = Id::random();
    let now = now_ms();
    let mut tx = db.pool.begin().await?;
    if let Some(marker) = once {
        let res = sqlx::query(
            "INSERT INTO meta (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(marker)
        .bind(org.to_string())
        .execute(&mut *tx)
        .await?;
        if res.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(None);
        }
    }
    sqlx::query("INSERT INTO organizations (id, name, created_at) VALUES ($1, $2, $3)")
        .bind(org.to_string())
        .bind(name)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO members (id, org_id, name, email, role, created_at, created_by, updated_at, updated_by)
         VALUES ($1, $2, $3, NULL, 'admin', $4, NULL, $4, NULL)",
    )
    .bind(admin.to_string())
    .bind(org.to_string())
    .bind(admin_name)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO api_keys (id, member_id, name, hash, prefix, created_at, created_by)
         VALUES ($1, $2, 'bootstrap', $3, $4, $5, NULL)",
    )
    .bind(Id::random().to_string())
    .bind(admin.to_string())
    .bind(secret.hash)
    .bind(secret.prefix)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(NewOrganization {
        organization_id: org,
        admin_member_id: admin,
    }))
}
