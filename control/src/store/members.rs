//! The `members` table. A member's role decides what he sees (admins see every notebook of
//! the organization), so role changes and deletions bump the routes version; an organization
//! always keeps one admin, checked in the writing transaction.

use marina_config::Id;

use super::page::{self, PageSpec};
use super::{bump_routes, now_ms, record_route_changes, Changed, Db};
use crate::error::StoreError;
use crate::model::{Member, Page, Role};

/// A member of organization `org`.
pub async fn fetch(db: &Db, org: Id, id: Id) -> Result<Option<Member>, StoreError> {
    super::fetch_in_org(db, "members", org, id, Member::from_row).await
}

/// Does organization `org` have member `id`?
pub async fn exists(db: &Db, org: Id, id: Id) -> Result<bool, StoreError> {
    super::exists_in_org(db, "members", org, id).await
}

/// Does member `id` exist in any organization? (The admin CLI.)
pub async fn exists_anywhere(db: &Db, id: Id) -> Result<bool, StoreError> {
    let found: Option<String> = sqlx::query_scalar("SELECT id FROM members WHERE id = $1")
        .bind(id.to_string())
        .fetch_optional(&db.pool)
        .await?;
    Ok(found.is_some())
}

/// The oldest admin of any organization (the admin CLI's default).
pub async fn first_admin(db: &Db) -> Result<Option<String>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM members WHERE role = 'admin' ORDER BY created_at, id LIMIT 1",
    )
    .fetch_optional(&db.pool)
    .await?)
}

/// A page of the organization's members.
pub async fn page(db: &Db, org: Id, spec: PageSpec<'_>) -> Result<Page<Member>, StoreError> {
    let rows = page::org_rows(db, "members", org, spec).await?;
    page::page_of(rows, Member::from_row, |m| (m.created_at_ms, m.id))
}

/// A member's fields (validated by the caller).
pub struct MemberFields {
    pub name: String,
    pub email: Option<String>,
    pub role: Role,
}

/// A new member of `org`; returns his id. A new admin is a new viewer of every running
/// notebook of the organization, hence the routes bump.
pub async fn insert(db: &Db, org: Id, f: MemberFields, by: Id) -> Result<Id, StoreError> {
    let id = Id::random();
    let now = now_ms();
    let mut tx = db.pool.begin().await?;
    let v = bump_routes(&mut tx).await?;
    record_route_changes(&mut tx, v, &[Changed::OrgAdmin { org, member: id }]).await?;
    sqlx::query(
        "INSERT INTO members (id, org_id, name, email, role, created_at, created_by, updated_at, updated_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $6, $7)",
    )
    .bind(id.to_string())
    .bind(org.to_string())
    .bind(f.name)
    .bind(f.email)
    .bind(f.role.as_str())
    .bind(now)
    .bind(by.to_string())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(id)
}

/// How a change to a member came out.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// Refused: the organization would have no admin left.
    LastAdmin,
    /// Refused (deletion): he owns this many notebooks.
    OwnsNotebooks(i64),
}

/// Count of admins of an organization, inside a transaction.
async fn admin_count(conn: &mut sqlx::AnyConnection, org: Id) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT COUNT(*) FROM members WHERE org_id = $1 AND role = 'admin'")
        .bind(org.to_string())
        .fetch_one(conn)
        .await
}

/// Ends a role change or deletion: committed when `org` still has an admin, rolled back
/// ([`Outcome::LastAdmin`]) when it would have none.
async fn commit_keeping_an_admin(
    mut tx: sqlx::Transaction<'_, sqlx::Any>,
    org: Id,
) -> Result<Outcome, StoreError> {
    if admin_count(&mut tx, org).await? == 0 {
        tx.rollback().await?;
        return Ok(Outcome::LastAdmin);
    }
    tx.commit().await?;
    Ok(Outcome::Done)
}

/// Replaces a member's fields, unless that leaves the organization without an admin.
pub async fn update(
    db: &Db,
    org: Id,
    id: Id,
    f: MemberFields,
    by: Id,
) -> Result<Outcome, StoreError> {
    let mut tx = db.pool.begin().await?;
    let v = bump_routes(&mut tx).await?;
    record_route_changes(&mut tx, v, &[Changed::OrgAdmin { org, member: id }]).await?;
    sqlx::query(
        "UPDATE members SET name = $1, email = $2, role = $3, updated_at = $4, updated_by = $5
         WHERE id = $6 AND org_id = $7",
    )
    .bind(f.name)
    .bind(f.email)
    .bind(f.role.as_str())
    .bind(now_ms())
    .bind(by.to_string())
    .bind(id.to_string())
    .bind(org.to_string())
    .execute(&mut *tx)
    .await?;
    // Checked after the write, in the same transaction. The routes-version bump that opened
    // the transaction holds that row's lock until commit, so role changes and member
    // deletions run one after the other (also under PostgreSQL's read committed), and two
    // admins demoting each other at once cannot both pass the check.
    commit_keeping_an_admin(tx, org).await
}

/// Deletes a member (his API keys and team memberships cascade), unless he owns notebooks
/// or is the last admin.
pub async fn delete(db: &Db, org: Id, id: Id) -> Result<Outcome, StoreError> {
    let mut tx = db.pool.begin().await?;
    let v = bump_routes(&mut tx).await?;
    let owned = super::notebooks::owned_by(&mut tx, id).await?;
    if owned > 0 {
        tx.rollback().await?;
        return Ok(Outcome::OwnsNotebooks(owned));
    }
    // His admin role and memberships go with him (the memberships by cascade): tell the edges.
    let teams: Vec<String> =
        sqlx::query_scalar("SELECT team_id FROM team_members WHERE member_id = $1")
            .bind(id.to_string())
            .fetch_all(&mut *tx)
            .await?;
    let mut changes = vec![Changed::OrgAdmin { org, member: id }];
    for t in teams {
        let team = Id::parse(&t).map_err(|_| StoreError::Corrupt {
            column: "team_id",
            value: t.clone(),
        })?;
        changes.push(Changed::TeamMember { team, member: id });
    }
    record_route_changes(&mut tx, v, &changes).await?;
    sqlx::query("DELETE FROM members WHERE id = $1 AND org_id = $2")
        .bind(id.to_string())
        .bind(org.to_string())
        .execute(&mut *tx)
        .await?;
    commit_keeping_an_admin(tx, org).await
}
