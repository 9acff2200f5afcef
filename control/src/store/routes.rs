//! The routes feed the edges follow: the snapshot of every up notebook.

use std::collections::{HashMap, HashSet};

use marina_config::wire::{Route, RoutesSnapshot};
use marina_config::Id;
use sqlx::Row;

use super::notebooks::UP_STATES;
use super::{get_id, Db};
use crate::error::StoreError;

/// Builds the routing table: every up notebook, its upstream, owner and viewers.
pub async fn routes(db: &Db) -> Result<RoutesSnapshot, StoreError> {
    // Read the version first: if something changes while the table is built, the table may
    // be newer than its version, never older, and the edge's next poll picks the change up.
    let version = db.route_version().await?;
    let rows = sqlx::query(&format!(
        "SELECT id, org_id, member_id, session_id, upstream, upstream_token
         FROM notebooks WHERE status IN {UP_STATES} AND upstream IS NOT NULL AND session_id IS NOT NULL
         ORDER BY id"
    ))
    .fetch_all(&db.pool)
    .await?;
    let team_viewers = sqlx::query(&format!(
        "SELECT nt.notebook_id, tm.member_id FROM notebook_teams nt
         JOIN team_members tm ON tm.team_id = nt.team_id
         JOIN notebooks n ON n.id = nt.notebook_id
         WHERE n.status IN {UP_STATES}"
    ))
    .fetch_all(&db.pool)
    .await?;
    let admins = sqlx::query("SELECT id, org_id FROM members WHERE role = 'admin'")
        .fetch_all(&db.pool)
        .await?;
    let mut admins_by_org: HashMap<Id, Vec<Id>> = HashMap::new();
    for row in &admins {
        admins_by_org
            .entry(get_id(row, "org_id")?)
            .or_default()
            .push(get_id(row, "id")?);
    }
    let mut viewers_by_nb: HashMap<Id, HashSet<Id>> = HashMap::new();
    for row in &team_viewers {
        viewers_by_nb
            .entry(get_id(row, "notebook_id")?)
            .or_default()
            .insert(get_id(row, "member_id")?);
    }
    let mut routes = Vec::with_capacity(rows.len());
    for row in &rows {
        let id = get_id(row, "id")?;
        let owner = get_id(row, "member_id")?;
        let org = get_id(row, "org_id")?;
        let mut viewers: Vec<Id> = viewers_by_nb
            .remove(&id)
            .unwrap_or_default()
            .into_iter()
            .collect();
        if let Some(a) = admins_by_org.get(&org) {
            viewers.extend(a.iter().copied());
        }
        viewers.retain(|v| *v != owner);
        viewers.sort();
        viewers.dedup();
        routes.push(Route {
            notebook_id: id,
            session_id: get_id(row, "session_id")?,
            upstream: row.try_get("upstream")?,
            upstream_token: row
                .try_get::<Option<String>, _>("upstream_token")?
                .unwrap_or_default(),
            owner_id: owner,
            viewers,
        });
    }
    Ok(RoutesSnapshot { version, routes })
}
