//! The `teams` and `team_members` tables. Team membership decides who sees shared notebooks,
//! so every change to it bumps the routes version.

use marina_config::Id;
use sqlx::Row;

use super::page::{self, PageSpec};
use super::{get_id, get_opt_id, now_ms, placeholders, rfc3339, Db};
use crate::error::StoreError;
use crate::model::{Page, Team, TeamMember, TeamWithCount};

/// A team of organization `org`.
pub async fn fetch(db: &Db, org: Id, id: Id) -> Result<Option<Team>, StoreError> {
    super::fetch_in_org(db, "teams", org, id, Team::from_row).await
}

/// Does organization `org` have team `id`?
pub async fn exists(db: &Db, org: Id, id: Id) -> Result<bool, StoreError> {
    super::exists_in_org(db, "teams", org, id).await
}

/// Teams by id with their member counts, newest first.
pub async fn with_counts(db: &Db, ids: &[Id]) -> Result<Vec<TeamWithCount>, StoreError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let sql = format!(
        "SELECT t.*, (SELECT COUNT(*) FROM team_members tm WHERE tm.team_id = t.id) AS member_count
         FROM teams t WHERE t.id IN ({}) ORDER BY t.created_at DESC, t.id",
        placeholders(1, ids.len())
    );
    let mut q = sqlx::query(&sql);
    let strs: Vec<String> = ids.iter().map(Id::to_string).collect();
    for id in &strs {
        q = q.bind(id.as_str());
    }
    q.fetch_all(&db.pool)
        .await?
        .iter()
        .map(|row| {
            Ok(TeamWithCount {
                team: Team::from_row(row)?,
                member_count: row.try_get("member_count")?,
            })
        })
        .collect()
}

/// A page of the organization's teams with member counts.
pub async fn page(db: &Db, org: Id, spec: PageSpec<'_>) -> Result<Page<TeamWithCount>, StoreError> {
    let rows = page::org_rows(db, "teams", org, spec).await?;
    let ids = rows
        .rows
        .iter()
        .map(|r| get_id(r, "id"))
        .collect::<Result<Vec<_>, _>>()?;
    let mut items = with_counts(db, &ids).await?;
    // with_counts orders like the page (created_at desc, id), but be explicit.
    items.sort_by_key(|t| ids.iter().position(|i| *i == t.team.id));
    let next_page_token = page::next_token(
        rows.more,
        items.last().map(|t| (t.team.created_at_ms, t.team.id)),
    );
    Ok(Page {
        total: rows.total,
        items,
        next_page_token,
    })
}

/// A new team of `org`; returns its id.
pub async fn insert(db: &Db, org: Id, name: &str, by: Id) -> Result<Id, StoreError> {
    let id = Id::random();
    let now = now_ms();
    sqlx::query(
        "INSERT INTO teams (id, org_id, name, created_at, created_by, updated_at, updated_by)
         VALUES ($1, $2, $3, $4, $5, $4, $5)",
    )
    .bind(id.to_string())
    .bind(org.to_string())
    .bind(name)
    .bind(now)
    .bind(by.to_string())
    .execute(&db.pool)
    .await?;
    Ok(id)
}

pub async fn rename(db: &Db, org: Id, id: Id, name: &str, by: Id) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE teams SET name = $1, updated_at = $2, updated_by = $3 WHERE id = $4 AND org_id = $5",
    )
    .bind(name)
    .bind(now_ms())
    .bind(by.to_string())
    .bind(id.to_string())
    .bind(org.to_string())
    .execute(&db.pool)
    .await?;
    Ok(())
}

/// Deletes a team, its memberships and its notebook links, in one transaction.
/// The edges hear of the team as gone and of every notebook it was shared with (their routes
/// lose it), read inside the transaction so a share racing the delete is not missed.
pub async fn delete(db: &Db, id: Id) -> Result<(), StoreError> {
    let mut tx = db.pool.begin().await?;
    let v = super::bump_routes(&mut tx).await?;
    let linked: Vec<String> =
        sqlx::query_scalar("SELECT notebook_id FROM notebook_teams WHERE team_id = $1")
            .bind(id.to_string())
            .fetch_all(&mut *tx)
            .await?;
    let mut changes = vec![super::Changed::Team(id)];
    for nb in linked {
        let nb = Id::parse(&nb).map_err(|_| StoreError::Corrupt {
            column: "notebook_id",
            value: nb.clone(),
        })?;
        changes.push(super::Changed::Notebook(nb));
    }
    super::record_route_changes(&mut tx, v, &changes).await?;
    for sql in [
        "DELETE FROM notebook_teams WHERE team_id = $1",
        "DELETE FROM team_members WHERE team_id = $1",
        "DELETE FROM teams WHERE id = $1",
    ] {
        sqlx::query(sql)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// A team's members, oldest first.
pub async fn members(db: &Db, team: Id) -> Result<Vec<TeamMember>, StoreError> {
    let rows =
        sqlx::query("SELECT * FROM team_members WHERE team_id = $1 ORDER BY created_at, member_id")
            .bind(team.to_string())
            .fetch_all(&db.pool)
            .await?;
    rows.iter()
        .map(|r| {
            Ok(TeamMember {
                team_id: get_id(r, "team_id")?,
                member_id: get_id(r, "member_id")?,
                created_at: rfc3339(r.try_get("created_at")?),
                created_by: get_opt_id(r, "created_by")?,
            })
        })
        .collect()
}

/// Adds members to a team (already there is fine).
pub async fn add_members(db: &Db, team: Id, members: &[Id], by: Id) -> Result<(), StoreError> {
    super::add_links(
        db,
        "INSERT INTO team_members (team_id, member_id, created_at, created_by) VALUES ($1, $2, $3, $4)
         ON CONFLICT (team_id, member_id) DO NOTHING",
        team,
        members,
        by,
        |team, member| super::Changed::TeamMember { team, member },
    )
    .await
}

/// Removes a member from a team; false when he was not in it.
pub async fn remove_member(db: &Db, team: Id, member: Id) -> Result<bool, StoreError> {
    super::delete_link(
        db,
        "DELETE FROM team_members WHERE team_id = $1 AND member_id = $2",
        team,
        member,
        super::Changed::TeamMember { team, member },
    )
    .await
}
