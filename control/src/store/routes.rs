//! The routes feed the edges follow: a snapshot, then only what changed.
//!
//! Every write that changes what an edge must know (a notebook up or down, a team shared or
//! unshared, a member joining or leaving a team, an admin appointed or demoted, a team deleted)
//! runs in a transaction that first bumps the single `route_version` row ([`bump_routes`]) and
//! then records *which keys* changed at that version in `route_changes` ([`record`]). Two
//! properties follow:
//!
//! - **Versions commit in order.** The bump takes the row's lock until commit (PostgreSQL) or
//!   the database's write lock (SQLite), so the transaction holding version 7 commits after the
//!   one holding 6. A reader that sees 7 committed sees 6 too; an edge that asks "after 6" can
//!   never miss 6's change by reading too early. A sequence (`BIGSERIAL`) would not give this:
//!   its values are handed out at insert time, not at commit.
//! - **Changes are keys, resolved when read.** The log says "notebook N changed", not what it
//!   became; [`feed_after`] reads each key's state as it is now and sends that
//!   ([`RouteChange`] is a state). The answer may be newer than its version, never older, and
//!   the next answer repeats the keys that changed since, so edges converge. Several control
//!   replicas on one database serve the same feed from the same log.
//!
//! The log is pruned as it grows (changes older than [`RETENTION_MS`]), and `pruned_through`
//! remembers how far: an edge asking after a version below it gets a fresh snapshot.

use std::collections::{HashMap, HashSet};

use marina_config::wire::{
    OrgAdmins, Route, RouteChange, RouteChanges, RoutesSnapshot, TeamMembers,
};
use marina_config::Id;
use sqlx::Row;

use super::notebooks::UP_STATES;
use super::{get_id, now_ms, placeholders, Db};
use crate::error::StoreError;

/// How long changes are kept for edges that reconnect. An edge away for longer gets a snapshot.
pub const RETENTION_MS: i64 = 15 * 60 * 1000;
/// A change list longer than this is answered as a snapshot instead: cheaper for both sides.
pub const MAX_CHANGES: usize = 5_000;
/// Every this many versions, the bump also prunes the log (amortized; no task needed).
const PRUNE_EVERY: i64 = 256;
/// The PostgreSQL channel a bump notifies, so every control replica's long polls wake.
pub const NOTIFY_CHANNEL: &str = "marina_routes";
/// Longest `IN (…)` list a query binds at once.
const CHUNK: usize = 500;

/// What a write changed, for the log. Resolved to a [`RouteChange`] when read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Changed {
    /// A notebook's route: up, down, its teams.
    Notebook(Id),
    /// Whether a member is in a team.
    TeamMember { team: Id, member: Id },
    /// Whether a member is an admin of an organization.
    OrgAdmin { org: Id, member: Id },
    /// A team was deleted.
    Team(Id),
}

impl Changed {
    fn columns(&self) -> (&'static str, Id, Option<Id>) {
        match *self {
            Changed::Notebook(n) => ("notebook", n, None),
            Changed::TeamMember { team, member } => ("team_member", team, Some(member)),
            Changed::OrgAdmin { org, member } => ("org_admin", org, Some(member)),
            Changed::Team(t) => ("team", t, None),
        }
    }

    fn from_columns(kind: &str, a: Id, b: Option<Id>) -> Option<Changed> {
        Some(match (kind, b) {
            ("notebook", _) => Changed::Notebook(a),
            ("team_member", Some(member)) => Changed::TeamMember { team: a, member },
            ("org_admin", Some(member)) => Changed::OrgAdmin { org: a, member },
            ("team", _) => Changed::Team(a),
            _ => return None,
        })
    }
}

/// Bumps the routes version inside a write transaction and returns the new version. Put it
/// first: on SQLite the transaction then holds the write lock from its first statement (it
/// cannot fail later upgrading a read snapshot), on PostgreSQL the row lock orders every
/// route-changing transaction (see the module docs). Follow it with [`record`]. On PostgreSQL
/// the commit also notifies [`NOTIFY_CHANNEL`]; a rollback notifies nobody.
pub async fn bump_routes(conn: &mut sqlx::AnyConnection) -> Result<i64, sqlx::Error> {
    let version: i64 = sqlx::query_scalar(
        "UPDATE route_version SET version = version + 1 WHERE id = 1 RETURNING version",
    )
    .fetch_one(&mut *conn)
    .await?;
    if conn.backend_name() == "PostgreSQL" {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(NOTIFY_CHANNEL)
            .bind(version.to_string())
            .execute(&mut *conn)
            .await?;
    }
    if version % PRUNE_EVERY == 0 {
        prune(&mut *conn, now_ms() - RETENTION_MS).await?;
    }
    Ok(version)
}

/// Records what changed at `version` (from [`bump_routes`], same transaction). Duplicates are
/// recorded once.
pub async fn record(
    conn: &mut sqlx::AnyConnection,
    version: i64,
    changes: &[Changed],
) -> Result<(), sqlx::Error> {
    let mut seen = HashSet::new();
    let unique: Vec<&Changed> = changes.iter().filter(|c| seen.insert(**c)).collect();
    let now = now_ms();
    for (chunk_no, chunk) in unique.chunks(CHUNK / 2).enumerate() {
        let values = (0..chunk.len())
            .map(|i| {
                let p = i * 4 + 1;
                format!("($1, $2, ${}, ${}, ${}, ${})", p + 2, p + 3, p + 4, p + 5)
            })
            .collect::<Vec<_>>()
            .join(", ");
        let sql =
            format!("INSERT INTO route_changes (version, at, seq, kind, a, b) VALUES {values}");
        let mut q = sqlx::query(&sql).bind(version).bind(now);
        for (i, c) in chunk.iter().enumerate() {
            let (kind, a, b) = c.columns();
            q = q
                .bind((chunk_no * (CHUNK / 2) + i) as i64)
                .bind(kind)
                .bind(a.to_string())
                .bind(b.map(|b| b.to_string()));
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

/// Forgets changes recorded before `cutoff_ms` and moves `pruned_through` up to the newest
/// version forgotten. Edges asking after an older version get a snapshot from then on.
pub async fn prune(conn: &mut sqlx::AnyConnection, cutoff_ms: i64) -> Result<(), sqlx::Error> {
    let newest: Option<i64> =
        sqlx::query_scalar("SELECT MAX(version) FROM route_changes WHERE at < $1")
            .bind(cutoff_ms)
            .fetch_one(&mut *conn)
            .await?;
    let Some(newest) = newest else {
        return Ok(());
    };
    // The floor first: a reader that sees fewer rows sees the higher floor too (the reader
    // re-reads the floor after the rows).
    sqlx::query(
        "UPDATE route_version SET pruned_through = $1 WHERE id = 1 AND pruned_through < $1",
    )
    .bind(newest)
    .execute(&mut *conn)
    .await?;
    sqlx::query("DELETE FROM route_changes WHERE version <= $1")
        .bind(newest)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Prunes everything recorded up to now, in its own transaction (tests and operators: the
/// next edge that asks after an older version gets a snapshot).
pub async fn prune_all(db: &Db) -> Result<(), StoreError> {
    let mut tx = db.pool.begin().await?;
    bump_routes(&mut tx).await?;
    prune(&mut tx, i64::MAX).await?;
    tx.commit().await?;
    Ok(())
}

/// The current version and the newest version whose changes were pruned.
pub async fn versions(db: &Db) -> Result<(u64, u64), StoreError> {
    let (v, floor): (i64, i64) =
        sqlx::query_as("SELECT version, pruned_through FROM route_version WHERE id = 1")
            .fetch_one(&db.pool)
            .await?;
    Ok((v as u64, floor as u64))
}

/// What an edge at version `after` should get.
#[derive(Debug)]
pub enum Feed {
    /// Nothing changed since `after`.
    Unchanged,
    Changes(RouteChanges),
    /// `after` cannot be resumed from (pruned, too far behind, or not this database's).
    Snapshot(RoutesSnapshot),
}

/// The answer for an edge at version `after` (see the module docs).
pub async fn feed_after(db: &Db, after: u64) -> Result<Feed, StoreError> {
    let (version, floor) = versions(db).await?;
    if after == version {
        return Ok(Feed::Unchanged);
    }
    if after > version || after < floor {
        return Ok(Feed::Snapshot(snapshot(db).await?));
    }
    let rows = sqlx::query(
        "SELECT kind, a, b FROM route_changes WHERE version > $1 AND version <= $2
         ORDER BY version, seq LIMIT $3",
    )
    .bind(after as i64)
    .bind(version as i64)
    .bind(MAX_CHANGES as i64 + 1)
    .fetch_all(&db.pool)
    .await?;
    if rows.len() > MAX_CHANGES {
        return Ok(Feed::Snapshot(snapshot(db).await?));
    }
    // Pruned while we read? Then the rows may be missing some: start over from a snapshot.
    let (_, floor_now) = versions(db).await?;
    if after < floor_now {
        return Ok(Feed::Snapshot(snapshot(db).await?));
    }
    // Each key once, at its last position: its state is read once, as it is now.
    let mut keys: Vec<Changed> = Vec::with_capacity(rows.len());
    for row in &rows {
        let kind: String = row.try_get("kind")?;
        let a = get_id(row, "a")?;
        let b = super::get_opt_id(row, "b")?;
        if let Some(c) = Changed::from_columns(&kind, a, b) {
            keys.push(c);
        }
    }
    let mut last: HashMap<Changed, usize> = HashMap::new();
    for (i, k) in keys.iter().enumerate() {
        last.insert(*k, i);
    }
    let keys: Vec<Changed> = keys
        .iter()
        .enumerate()
        .filter(|(i, k)| last.get(k) == Some(i))
        .map(|(_, k)| *k)
        .collect();
    let changes = resolve(db, &keys).await?;
    Ok(Feed::Changes(RouteChanges {
        from: after,
        version,
        changes,
    }))
}

/// The state of each key now.
async fn resolve(db: &Db, keys: &[Changed]) -> Result<Vec<RouteChange>, StoreError> {
    let mut notebooks = Vec::new();
    let mut members = Vec::new();
    let mut teams = Vec::new();
    for k in keys {
        match *k {
            Changed::Notebook(n) => notebooks.push(n),
            Changed::TeamMember { member, .. } | Changed::OrgAdmin { member, .. } => {
                members.push(member)
            }
            Changed::Team(t) => teams.push(t),
        }
    }
    let routes: HashMap<Id, Route> = routes_of(db, Some(&notebooks))
        .await?
        .into_iter()
        .map(|r| (r.notebook_id, r))
        .collect();
    let mut in_team: HashSet<(Id, Id)> = HashSet::new();
    let mut admin_of: HashSet<(Id, Id)> = HashSet::new();
    for chunk in dedup(&members).chunks(CHUNK) {
        let list = placeholders(1, chunk.len());
        let sql =
            format!("SELECT team_id, member_id FROM team_members WHERE member_id IN ({list})");
        let mut q = sqlx::query(&sql);
        for m in chunk {
            q = q.bind(m.to_string());
        }
        for row in q.fetch_all(&db.pool).await? {
            in_team.insert((get_id(&row, "team_id")?, get_id(&row, "member_id")?));
        }
        let sql = format!("SELECT org_id, id FROM members WHERE role = 'admin' AND id IN ({list})");
        let mut q = sqlx::query(&sql);
        for m in chunk {
            q = q.bind(m.to_string());
        }
        for row in q.fetch_all(&db.pool).await? {
            admin_of.insert((get_id(&row, "org_id")?, get_id(&row, "id")?));
        }
    }
    let mut teams_alive: HashSet<Id> = HashSet::new();
    for chunk in dedup(&teams).chunks(CHUNK) {
        let sql = format!(
            "SELECT id FROM teams WHERE id IN ({})",
            placeholders(1, chunk.len())
        );
        let mut q = sqlx::query(&sql);
        for t in chunk {
            q = q.bind(t.to_string());
        }
        for row in q.fetch_all(&db.pool).await? {
            teams_alive.insert(get_id(&row, "id")?);
        }
    }
    let mut out = Vec::with_capacity(keys.len());
    for k in keys {
        out.push(match *k {
            Changed::Notebook(n) => match routes.get(&n) {
                Some(r) => RouteChange::Up(r.clone()),
                None => RouteChange::Down { notebook_id: n },
            },
            Changed::TeamMember { team, member } => RouteChange::TeamMember {
                team_id: team,
                member_id: member,
                present: in_team.contains(&(team, member)),
            },
            Changed::OrgAdmin { org, member } => RouteChange::OrgAdmin {
                org_id: org,
                member_id: member,
                present: admin_of.contains(&(org, member)),
            },
            // A team that still exists was not deleted: nothing to say about it.
            Changed::Team(t) if teams_alive.contains(&t) => continue,
            Changed::Team(t) => RouteChange::TeamGone { team_id: t },
        });
    }
    Ok(out)
}

fn dedup(ids: &[Id]) -> Vec<Id> {
    let mut seen = HashSet::new();
    ids.iter().copied().filter(|i| seen.insert(*i)).collect()
}

/// Everything an edge needs: every up notebook, every team's members, every organization's
/// admins, at the version read first.
pub async fn snapshot(db: &Db) -> Result<RoutesSnapshot, StoreError> {
    // Read the version first: if something changes while the table is built, the table may
    // be newer than its version, never older, and the edge's next poll picks the change up.
    let version = db.route_version().await?;
    let routes = routes_of(db, None).await?;
    let mut teams: HashMap<Id, Vec<Id>> = HashMap::new();
    for row in sqlx::query("SELECT team_id, member_id FROM team_members")
        .fetch_all(&db.pool)
        .await?
    {
        teams
            .entry(get_id(&row, "team_id")?)
            .or_default()
            .push(get_id(&row, "member_id")?);
    }
    let mut admins: HashMap<Id, Vec<Id>> = HashMap::new();
    for row in sqlx::query("SELECT org_id, id FROM members WHERE role = 'admin'")
        .fetch_all(&db.pool)
        .await?
    {
        admins
            .entry(get_id(&row, "org_id")?)
            .or_default()
            .push(get_id(&row, "id")?);
    }
    let mut teams: Vec<TeamMembers> = teams
        .into_iter()
        .map(|(team_id, mut members)| {
            members.sort();
            TeamMembers { team_id, members }
        })
        .collect();
    teams.sort_by_key(|t| t.team_id);
    let mut admins: Vec<OrgAdmins> = admins
        .into_iter()
        .map(|(org_id, mut members)| {
            members.sort();
            OrgAdmins { org_id, members }
        })
        .collect();
    admins.sort_by_key(|a| a.org_id);
    Ok(RoutesSnapshot {
        version,
        routes,
        teams,
        admins,
    })
}

/// The routes of the up notebooks among `ids` (all up notebooks when `None`), with their teams.
async fn routes_of(db: &Db, ids: Option<&[Id]>) -> Result<Vec<Route>, StoreError> {
    let base = format!(
        "SELECT id, org_id, member_id, session_id, upstream, upstream_token
         FROM notebooks WHERE status IN {UP_STATES} AND upstream IS NOT NULL AND session_id IS NOT NULL"
    );
    let links_base = format!(
        "SELECT nt.notebook_id, nt.team_id FROM notebook_teams nt
         JOIN notebooks n ON n.id = nt.notebook_id WHERE n.status IN {UP_STATES}"
    );
    let mut rows = Vec::new();
    let mut links = Vec::new();
    match ids {
        None => {
            rows = sqlx::query(&format!("{base} ORDER BY id"))
                .fetch_all(&db.pool)
                .await?;
            links = sqlx::query(&links_base).fetch_all(&db.pool).await?;
        }
        Some(ids) => {
            for chunk in dedup(ids).chunks(CHUNK) {
                let list = placeholders(1, chunk.len());
                let sql = format!("{base} AND id IN ({list}) ORDER BY id");
                let mut q = sqlx::query(&sql);
                for id in chunk {
                    q = q.bind(id.to_string());
                }
                rows.extend(q.fetch_all(&db.pool).await?);
                let sql = format!("{links_base} AND nt.notebook_id IN ({list})");
                let mut q = sqlx::query(&sql);
                for id in chunk {
                    q = q.bind(id.to_string());
                }
                links.extend(q.fetch_all(&db.pool).await?);
            }
        }
    }
    let mut teams_of: HashMap<Id, Vec<Id>> = HashMap::new();
    for row in &links {
        teams_of
            .entry(get_id(row, "notebook_id")?)
            .or_default()
            .push(get_id(row, "team_id")?);
    }
    let mut routes = Vec::with_capacity(rows.len());
    for row in &rows {
        let id = get_id(row, "id")?;
        let mut teams = teams_of.remove(&id).unwrap_or_default();
        teams.sort();
        routes.push(Route {
            notebook_id: id,
            session_id: get_id(row, "session_id")?,
            upstream: row.try_get("upstream")?,
            upstream_token: row
                .try_get::<Option<String>, _>("upstream_token")?
                .unwrap_or_default(),
            owner_id: get_id(row, "member_id")?,
            viewers: Vec::new(),
            org_id: Some(get_id(row, "org_id")?),
            teams,
        });
    }
    Ok(routes)
}

/// Wakes `notify` whenever any control replica commits a routes change (PostgreSQL's
/// `LISTEN` on [`NOTIFY_CHANNEL`]), so long polls held here answer within milliseconds of a
/// change made by another replica instead of at their next re-read. Runs until the process
/// ends; reconnects with a pause when the connection drops (the long polls' periodic re-read
/// covers the gap).
pub async fn listen(url: String, notify: std::sync::Arc<tokio::sync::Notify>) {
    loop {
        match sqlx::postgres::PgListener::connect(&url).await {
            Ok(mut listener) => {
                if let Err(e) = listener.listen(NOTIFY_CHANNEL).await {
                    tracing::warn!(error = %e, "routes LISTEN failed; retrying");
                } else {
                    // A reconnect may have missed notifications: wake everyone once.
                    notify.notify_waiters();
                    loop {
                        match listener.recv().await {
                            Ok(_) => notify.notify_waiters(),
                            Err(e) => {
                                tracing::warn!(error = %e, "routes LISTEN connection lost; reconnecting");
                                break;
                            }
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "routes LISTEN could not connect; retrying"),
        }
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
}
