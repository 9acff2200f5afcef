//! The `api_keys` table. Only a key's SHA-256 is stored; [`lookup`] finds the key's member and
//! teams by that hash in one round trip (so comparing secrets never happens in Rust).

use marina_config::Id;
use sqlx::Row;

use super::rows::get_parsed;
use super::{get_id, now_ms, Db};
use crate::error::StoreError;
use crate::model::{ApiKey, Role};

/// Who a key belongs to.
pub struct KeyOwner {
    pub key_id: Id,
    pub member_id: Id,
    pub org_id: Id,
    pub role: Role,
    /// Sorted.
    pub team_ids: Vec<Id>,
}

/// The key with this hash, its member and the member's teams.
pub async fn lookup(db: &Db, hash: &str) -> Result<Option<KeyOwner>, StoreError> {
    let rows = sqlx::query(
        "SELECT k.id AS key_id, m.id AS member_id, m.org_id, m.role, tm.team_id
         FROM api_keys k
         JOIN members m ON m.id = k.member_id
         LEFT JOIN team_members tm ON tm.member_id = m.id
         WHERE k.hash = $1",
    )
    .bind(hash)
    .fetch_all(&db.pool)
    .await?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let mut team_ids = Vec::with_capacity(rows.len());
    for row in &rows {
        if let Some(t) = row.try_get::<Option<String>, _>("team_id")? {
            team_ids.push(Id::parse(&t).map_err(|_| StoreError::Corrupt {
                column: "team_members.team_id",
                value: t,
            })?);
        }
    }
    team_ids.sort();
    Ok(Some(KeyOwner {
        key_id: get_id(first, "key_id")?,
        member_id: get_id(first, "member_id")?,
        org_id: get_id(first, "org_id")?,
        role: get_parsed(first, "role", "members.role", Role::parse)?,
        team_ids,
    }))
}

/// A member's keys, newest first.
pub async fn list(db: &Db, member: Id) -> Result<Vec<ApiKey>, StoreError> {
    let rows =
        sqlx::query("SELECT * FROM api_keys WHERE member_id = $1 ORDER BY created_at DESC, id")
            .bind(member.to_string())
            .fetch_all(&db.pool)
            .await?;
    rows.iter().map(ApiKey::from_row).collect()
}

/// What is stored of a new secret.
pub struct StoredSecret<'a> {
    pub hash: &'a str,
    pub prefix: &'a str,
}

/// Stores a new key for `member`; returns its metadata.
pub async fn insert(
    db: &Db,
    member: Id,
    name: &str,
    secret: StoredSecret<'_>,
    created_by: Option<Id>,
) -> Result<ApiKey, StoreError> {
    let id = Id::random();
    sqlx::query(
        "INSERT INTO api_keys (id, member_id, name, hash, prefix, created_at, created_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(id.to_string())
    .bind(member.to_string())
    .bind(name)
    .bind(secret.hash)
    .bind(secret.prefix)
    .bind(now_ms())
    .bind(created_by.map(|c| c.to_string()))
    .execute(&db.pool)
    .await?;
    let row = sqlx::query("SELECT * FROM api_keys WHERE id = $1")
        .bind(id.to_string())
        .fetch_one(&db.pool)
        .await?;
    ApiKey::from_row(&row)
}

/// Revokes a key of `member`; false when he has no such key.
pub async fn delete(db: &Db, key: Id, member: Id) -> Result<bool, StoreError> {
    let res = sqlx::query("DELETE FROM api_keys WHERE id = $1 AND member_id = $2")
        .bind(key.to_string())
        .bind(member.to_string())
        .execute(&db.pool)
        .await?;
    Ok(res.rows_affected() > 0)
}
