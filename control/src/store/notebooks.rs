//! The `notebooks` table and its team links (`notebook_teams`): what a caller may see, lists,
//! writes, and the lifecycle's transitions.
//!
//! Visibility is decided here, in SQL, and only here ([`visible_clause`]): a notebook is seen
//! by its owner, by members of a team it is shared with, and by the organization's admins;
//! never across organizations.
//!
//! Every lifecycle transition is one named conditional `UPDATE … WHERE status IN (…)` that
//! says whether it won: of two concurrent callers exactly one changes the row. Transitions
//! that change what the edge routes bump the routes version in the same transaction.

use std::collections::HashMap;

use marina_config::Id;
use marina_runtime::{Endpoint, Expected};
use sqlx::Row;

use super::page::{self, PageSpec};
use super::rows::get_parsed;
use super::{
    bind_all, bump_routes, commit_if_changed, delete_with_dependents, get_id, get_opt_id,
    id_strings, now_ms, placeholders, record_route_changes, Arg, Changed, Db,
};
use crate::error::StoreError;
use crate::model::{Included, Notebook, NotebookItem, NotebookTeam, Status, WorkloadConfig};

/// SQL list of the states in which a notebook is up (routed).
pub(crate) const UP_STATES: &str = "('running', 'idle', 'detached')";

/// Columns [`Notebook::from_row`] reads, prefixed with `n.`.
const NOTEBOOK_COLUMNS: &str = "n.id, n.org_id, n.member_id, n.workload_config_id, n.name, n.description, n.status, n.status_message, n.idle_timeout_seconds, n.last_active_at, n.session_id, n.created_at, n.created_by, n.updated_at, n.updated_by";

/// The same columns, unqualified (for `RETURNING`).
const NOTEBOOK_RETURNING: &str = "id, org_id, member_id, workload_config_id, name, description, status, status_message, idle_timeout_seconds, last_active_at, session_id, created_at, created_by, updated_at, updated_by";

/// Who is looking: what [`visible_clause`] needs of a caller.
#[derive(Clone, Copy, Debug)]
pub struct Viewer {
    pub org_id: Id,
    pub member_id: Id,
    pub admin: bool,
}

/// The `WHERE` condition (over alias `n`) selecting what `v` may see; pushes its binds.
fn visible_clause(v: &Viewer, args: &mut Vec<Arg>) -> String {
    args.push(Arg::S(v.org_id.to_string()));
    let org = args.len();
    if v.admin {
        return format!("n.org_id = ${org}");
    }
    args.push(Arg::S(v.member_id.to_string()));
    let me = args.len();
    format!(
        "n.org_id = ${org} AND (n.member_id = ${me} OR n.id IN (SELECT nt.notebook_id FROM notebook_teams nt JOIN team_members tm ON tm.team_id = nt.team_id WHERE tm.member_id = ${me}))"
    )
}

/// The notebook if `v` may see it.
pub async fn fetch_visible(
    db: &Db,
    v: &Viewer,
    id: Id,
    detached_timeout: i64,
) -> Result<Option<Notebook>, StoreError> {
    let mut args = vec![Arg::S(id.to_string())];
    let vis = visible_clause(v, &mut args);
    let sql = format!("SELECT {NOTEBOOK_COLUMNS} FROM notebooks n WHERE n.id = $1 AND {vis}");
    bind_all(sqlx::query(&sql), &args)
        .fetch_optional(&db.pool)
        .await?
        .map(|row| Notebook::from_row(&row, detached_timeout))
        .transpose()
}

/// A notebook by id, whoever asks (after a write, and for the lifecycle).
pub async fn fetch(db: &Db, id: Id, detached_timeout: i64) -> Result<Option<Notebook>, StoreError> {
    let sql = format!("SELECT {NOTEBOOK_COLUMNS} FROM notebooks n WHERE n.id = $1");
    sqlx::query(&sql)
        .bind(id.to_string())
        .fetch_optional(&db.pool)
        .await?
        .map(|row| Notebook::from_row(&row, detached_timeout))
        .transpose()
}

/// A page of the notebooks `v` may see (those shared with `team`, when given).
pub struct NotebookPage {
    pub total: i64,
    pub notebooks: Vec<Notebook>,
    pub next_page_token: Option<String>,
}

pub async fn list(
    db: &Db,
    v: &Viewer,
    team: Option<Id>,
    spec: PageSpec<'_>,
    detached_timeout: i64,
) -> Result<NotebookPage, StoreError> {
    let mut args = Vec::new();
    let mut cond = visible_clause(v, &mut args);
    if let Some(team) = team {
        args.push(Arg::S(team.to_string()));
        cond = format!(
            "{cond} AND n.id IN (SELECT notebook_id FROM notebook_teams WHERE team_id = ${})",
            args.len()
        );
    }
    let rows = page::rows(db, "notebooks n", NOTEBOOK_COLUMNS, "n.", &cond, args, spec).await?;
    let notebooks = rows
        .rows
        .iter()
        .map(|r| Notebook::from_row(r, detached_timeout))
        .collect::<Result<Vec<_>, _>>()?;
    let next_page_token =
        page::next_token(rows.more, notebooks.last().map(|n| (n.created_at_ms, n.id)));
    Ok(NotebookPage {
        total: rows.total,
        notebooks,
        next_page_token,
    })
}

/// Items and `included` for a set of notebooks (each object once).
pub async fn included(
    db: &Db,
    notebooks: Vec<Notebook>,
) -> Result<(Vec<NotebookItem>, Included), StoreError> {
    let mut items: Vec<NotebookItem> = notebooks
        .iter()
        .map(|n| NotebookItem {
            notebook_id: n.id,
            team_ids: Vec::new(),
            workload_config_id: n.workload_config_id,
        })
        .collect();
    if notebooks.is_empty() {
        return Ok((items, Included::default()));
    }
    let ids: Vec<String> = notebooks.iter().map(|n| n.id.to_string()).collect();
    let sql = format!(
        "SELECT notebook_id, team_id FROM notebook_teams WHERE notebook_id IN ({}) ORDER BY created_at, team_id",
        placeholders(1, ids.len())
    );
    let mut q = sqlx::query(&sql);
    for id in &ids {
        q = q.bind(id.as_str());
    }
    let mut team_ids: Vec<Id> = Vec::new();
    for row in q.fetch_all(&db.pool).await? {
        let nb = get_id(&row, "notebook_id")?;
        let team = get_id(&row, "team_id")?;
        if let Some(item) = items.iter_mut().find(|i| i.notebook_id == nb) {
            item.team_ids.push(team);
        }
        if !team_ids.contains(&team) {
            team_ids.push(team);
        }
    }
    let teams = super::teams::with_counts(db, &team_ids).await?;
    let workload_configs: Vec<WorkloadConfig> = super::configs::by_ids(
        db,
        &id_strings(notebooks.iter().map(|n| n.workload_config_id)),
    )
    .await?;
    Ok((
        items,
        Included {
            notebooks,
            teams,
            workload_configs,
        },
    ))
}

/// What a new notebook is made of (validated by the caller).
pub struct NewNotebook {
    pub org_id: Id,
    pub owner: Id,
    pub workload_config_id: Id,
    pub name: String,
    pub description: Option<String>,
    pub idle_timeout_seconds: i64,
    pub team_ids: Vec<Id>,
}

/// Inserts a `stopped` notebook and its team links; returns its id.
pub async fn insert(db: &Db, new: NewNotebook) -> Result<Id, StoreError> {
    let id = Id::random();
    let now = now_ms();
    let me = new.owner.to_string();
    let mut tx = db.pool.begin().await?;
    sqlx::query(
        "INSERT INTO notebooks (id, org_id, member_id, workload_config_id, name, description, status,
            idle_timeout_seconds, created_at, created_by, updated_at, updated_by)
         VALUES ($1, $2, $3, $4, $5, $6, 'stopped', $7, $8, $3, $8, $3)",
    )
    .bind(id.to_string())
    .bind(new.org_id.to_string())
    .bind(me.as_str())
    .bind(new.workload_config_id.to_string())
    .bind(new.name)
    .bind(new.description)
    .bind(new.idle_timeout_seconds)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    for t in &new.team_ids {
        sqlx::query(
            "INSERT INTO notebook_teams (notebook_id, team_id, created_at, created_by, updated_at, updated_by)
             VALUES ($1, $2, $3, $4, $3, $4)",
        )
        .bind(id.to_string())
        .bind(t.to_string())
        .bind(now)
        .bind(me.as_str())
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(id)
}

/// The fields a PATCH changes (validated by the caller); `None` leaves a field alone.
#[derive(Default)]
pub struct Changes {
    pub name: Option<String>,
    /// `Some(None)` clears the description.
    pub description: Option<Option<String>>,
    pub idle_timeout_seconds: Option<i64>,
    /// Only applied while the notebook is stopped, in the same statement.
    pub workload_config_id: Option<Id>,
}

/// Applies `changes`; false when a workload config change found the notebook not stopped
/// (then nothing changed).
pub async fn update(db: &Db, id: Id, changes: Changes, by: Id) -> Result<bool, StoreError> {
    let mut sets = Vec::new();
    let mut args = Vec::new();
    if let Some(name) = changes.name {
        args.push(Arg::S(name));
        sets.push(format!("name = ${}", args.len()));
    }
    match changes.description {
        Some(Some(d)) => {
            args.push(Arg::S(d));
            sets.push(format!("description = ${}", args.len()));
        }
        Some(None) => sets.push("description = NULL".into()),
        None => {}
    }
    if let Some(v) = changes.idle_timeout_seconds {
        args.push(Arg::I(v));
        sets.push(format!("idle_timeout_seconds = ${}", args.len()));
    }
    let only_when_stopped = changes.workload_config_id.is_some();
    if let Some(cfg) = changes.workload_config_id {
        args.push(Arg::S(cfg.to_string()));
        sets.push(format!("workload_config_id = ${}", args.len()));
    }
    args.push(Arg::I(now_ms()));
    sets.push(format!("updated_at = ${}", args.len()));
    args.push(Arg::S(by.to_string()));
    sets.push(format!("updated_by = ${}", args.len()));
    args.push(Arg::S(id.to_string()));
    let mut sql = format!(
        "UPDATE notebooks SET {} WHERE id = ${}",
        sets.join(", "),
        args.len()
    );
    if only_when_stopped {
        // Conditional on the state in the same statement: a concurrent start cannot slip in
        // between a check and the write.
        sql.push_str(" AND status = 'stopped'");
    }
    let res = bind_all(sqlx::query(&sql), &args).execute(&db.pool).await?;
    Ok(res.rows_affected() > 0)
}

// === Team links ===

/// The teams a notebook is shared with, oldest link first.
pub async fn team_links(db: &Db, id: Id, limit: i64) -> Result<Vec<NotebookTeam>, StoreError> {
    let rows = sqlx::query(&format!(
        "SELECT * FROM notebook_teams WHERE notebook_id = $1 ORDER BY created_at, team_id LIMIT {limit}"
    ))
    .bind(id.to_string())
    .fetch_all(&db.pool)
    .await?;
    rows.iter().map(NotebookTeam::from_row).collect()
}

/// Shares a notebook with `teams` (already shared is fine); new viewers for the edge.
pub async fn share(db: &Db, id: Id, teams: &[Id], by: Id) -> Result<(), StoreError> {
    super::add_links(
        db,
        "INSERT INTO notebook_teams (notebook_id, team_id, created_at, created_by, updated_at, updated_by)
         VALUES ($1, $2, $3, $4, $3, $4) ON CONFLICT (notebook_id, team_id) DO NOTHING",
        id,
        teams,
        by,
        |nb, _team| Changed::Notebook(nb),
    )
    .await
}

/// Unshares a notebook from a team; false when it was not shared with it.
pub async fn unshare(db: &Db, id: Id, team: Id) -> Result<bool, StoreError> {
    super::delete_link(
        db,
        "DELETE FROM notebook_teams WHERE notebook_id = $1 AND team_id = $2",
        id,
        team,
        Changed::Notebook(id),
    )
    .await
}

// === Lifecycle transitions ===

/// The notebook's current status (None: gone).
pub async fn status(db: &Db, id: Id) -> Result<Option<Status>, StoreError> {
    let s: Option<String> = sqlx::query_scalar("SELECT status FROM notebooks WHERE id = $1")
        .bind(id.to_string())
        .fetch_optional(&db.pool)
        .await?;
    Ok(s.and_then(|s| Status::parse(&s)))
}

/// Is the notebook still in `status` for `session`? (Another call may have moved it.)
pub async fn is_in(db: &Db, id: Id, session: Id, status: Status) -> Result<bool, StoreError> {
    let row: Option<(String, Option<String>)> =
        sqlx::query_as("SELECT status, session_id FROM notebooks WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&db.pool)
            .await?;
    Ok(matches!(row, Some((s, Some(sid))) if s == status.as_str() && sid == session.as_str()))
}

/// `stopped`/`failed` → `starting` in a new `session`; the notebook as it left it, or None
/// when it was in another state (the caller lost).
pub async fn begin_start(
    db: &Db,
    id: Id,
    session: Id,
    by: Id,
    detached_timeout: i64,
) -> Result<Option<Notebook>, StoreError> {
    let now = now_ms();
    let row = sqlx::query(&format!(
        "UPDATE notebooks SET status = 'starting', session_id = $1, status_message = NULL,
            upstream = NULL, upstream_token = NULL, running_since = NULL, detached_since = NULL,
            last_ping_at = NULL, updated_at = $2, updated_by = $3, transition_at = $2
         WHERE id = $4 AND status IN ('stopped', 'failed')
         RETURNING {NOTEBOOK_RETURNING}"
    ))
    .bind(session.to_string())
    .bind(now)
    .bind(by.to_string())
    .bind(id.to_string())
    .fetch_optional(&db.pool)
    .await?;
    row.map(|r| Notebook::from_row(&r, detached_timeout))
        .transpose()
}

/// `starting` → `running` at `ep`, if still starting in `session`.
pub async fn mark_running(db: &Db, id: Id, session: Id, ep: &Endpoint) -> Result<bool, StoreError> {
    let mut tx = db.pool.begin().await?;
    let v = bump_routes(&mut tx).await?;
    record_route_changes(&mut tx, v, &[Changed::Notebook(id)]).await?;
    let res = sqlx::query(
        "UPDATE notebooks SET status = 'running', upstream = $1, upstream_token = $2,
            running_since = $3, detached_since = NULL, status_message = NULL
         WHERE id = $4 AND session_id = $5 AND status = 'starting'",
    )
    .bind(ep.upstream.as_str())
    .bind(ep.token.as_str())
    .bind(now_ms())
    .bind(id.to_string())
    .bind(session.to_string())
    .execute(&mut *tx)
    .await?;
    commit_if_changed(tx, res).await
}

/// `from` (any up state when `from` is up) → `failed` with `message`, if the notebook is
/// still there in that session.
pub async fn mark_failed(
    db: &Db,
    id: Id,
    session: Id,
    from: Status,
    message: &str,
) -> Result<bool, StoreError> {
    let from_sql = if from.is_up() {
        UP_STATES.to_owned()
    } else {
        format!("('{}')", from.as_str())
    };
    let mut tx = db.pool.begin().await?;
    let v = bump_routes(&mut tx).await?;
    record_route_changes(&mut tx, v, &[Changed::Notebook(id)]).await?;
    let res = sqlx::query(&format!(
        "UPDATE notebooks SET status = 'failed', status_message = $1, upstream = NULL,
            upstream_token = NULL, running_since = NULL, detached_since = NULL
         WHERE id = $2 AND session_id = $3 AND status IN {from_sql}"
    ))
    .bind(message)
    .bind(id.to_string())
    .bind(session.to_string())
    .execute(&mut *tx)
    .await?;
    commit_if_changed(tx, res).await
}

/// `starting`/`running`/`idle`/`detached` → `stopping` with `message`; `by` is recorded as
/// the updater when given. The notebook as it left it, or None when the caller lost.
pub async fn begin_stop(
    db: &Db,
    id: Id,
    by: Option<Id>,
    message: Option<String>,
    detached_timeout: i64,
) -> Result<Option<Notebook>, StoreError> {
    let mut tx = db.pool.begin().await?;
    let v = bump_routes(&mut tx).await?;
    record_route_changes(&mut tx, v, &[Changed::Notebook(id)]).await?;
    let (who_sql, who) = match by {
        Some(m) => (", updated_at = $3, updated_by = $4", Some(m.to_string())),
        None => ("", None),
    };
    let sql = format!(
        "UPDATE notebooks SET status = 'stopping', status_message = $1, transition_at = $3{who_sql}
         WHERE id = $2 AND status IN ('starting', 'running', 'idle', 'detached')
         RETURNING {NOTEBOOK_RETURNING}"
    );
    let mut q = sqlx::query(&sql)
        .bind(message)
        .bind(id.to_string())
        .bind(now_ms());
    if let Some(who) = who {
        q = q.bind(who);
    }
    let Some(row) = q.fetch_optional(&mut *tx).await? else {
        tx.rollback().await?;
        return Ok(None);
    };
    let stopping = Notebook::from_row(&row, detached_timeout)?;
    tx.commit().await?;
    Ok(Some(stopping))
}

/// `stopping` → `stopped`.
pub async fn mark_stopped(db: &Db, id: Id) -> Result<bool, StoreError> {
    let res = sqlx::query(
        "UPDATE notebooks SET status = 'stopped', upstream = NULL, upstream_token = NULL,
            running_since = NULL, detached_since = NULL
         WHERE id = $1 AND status = 'stopping'",
    )
    .bind(id.to_string())
    .execute(&db.pool)
    .await?;
    Ok(res.rows_affected() > 0)
}

/// `stopping` → `failed` with `message`.
pub async fn mark_stop_failed(db: &Db, id: Id, message: &str) -> Result<bool, StoreError> {
    let res = sqlx::query(
        "UPDATE notebooks SET status = 'failed', status_message = $1 WHERE id = $2 AND status = 'stopping'",
    )
    .bind(message)
    .bind(id.to_string())
    .execute(&db.pool)
    .await?;
    Ok(res.rows_affected() > 0)
}

/// Before a delete: an up or starting notebook → `stopping` (unrouted at once).
pub async fn begin_delete(db: &Db, id: Id) -> Result<(), StoreError> {
    let mut tx = db.pool.begin().await?;
    let v = bump_routes(&mut tx).await?;
    record_route_changes(&mut tx, v, &[Changed::Notebook(id)]).await?;
    sqlx::query(
        "UPDATE notebooks SET status = 'stopping'
         WHERE id = $1 AND status IN ('starting', 'running', 'idle', 'detached')",
    )
    .bind(id.to_string())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Deletes a notebook's rows (its edge connections, team links, the notebook) in one
/// transaction.
pub async fn delete(db: &Db, id: Id) -> Result<(), StoreError> {
    let statements = [
        "DELETE FROM edge_connections WHERE notebook_id = $1",
        "DELETE FROM notebook_teams WHERE notebook_id = $1",
        "DELETE FROM notebooks WHERE id = $1",
    ];
    delete_with_dependents(db, &statements, id, Changed::Notebook(id)).await
}

/// A ping: activity and presence; idle/detached go straight back to running. False when the
/// notebook is not up any more.
pub async fn record_ping(db: &Db, id: Id) -> Result<bool, StoreError> {
    let now = now_ms();
    let res = sqlx::query(&format!(
        "UPDATE notebooks SET last_active_at = $1, last_ping_at = $1, status = 'running',
            detached_since = NULL
         WHERE id = $2 AND status IN {UP_STATES}"
    ))
    .bind(now)
    .bind(id.to_string())
    .execute(&db.pool)
    .await?;
    Ok(res.rows_affected() == 1)
}

// === The monitor's reads and writes ===

/// An up notebook as the monitor sees it.
pub struct UpNotebook {
    pub id: Id,
    pub status: Status,
    pub session: Id,
    pub idle_timeout_ms: i64,
    pub last_active_at: Option<i64>,
    pub last_ping_at: Option<i64>,
    pub running_since: Option<i64>,
    pub detached_since: Option<i64>,
    /// Open WebSockets reported by edges seen since the cut-off.
    pub websockets: i64,
}

/// Every up notebook (with a session), counting WebSockets of edges seen at `edges_seen_since`
/// or later.
pub async fn up_for_monitor(db: &Db, edges_seen_since: i64) -> Result<Vec<UpNotebook>, StoreError> {
    let rows = sqlx::query(&format!(
        "SELECT n.id, n.status, n.session_id, n.idle_timeout_seconds, n.last_active_at,
            n.last_ping_at, n.running_since, n.detached_since,
            (SELECT CAST(COALESCE(SUM(c.open_sockets), 0) AS BIGINT)
               FROM edge_connections c JOIN edges e ON e.edge_id = c.edge_id
              WHERE c.notebook_id = n.id AND c.session_id = n.session_id
                AND e.last_seen_at >= $1) AS websockets
         FROM notebooks n WHERE n.status IN {UP_STATES}"
    ))
    .bind(edges_seen_since)
    .fetch_all(&db.pool)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let status: String = row.try_get("status")?;
        let Some(status) = Status::parse(&status) else {
            continue;
        };
        let Some(session) = get_opt_id(&row, "session_id")? else {
            continue;
        };
        out.push(UpNotebook {
            id: get_id(&row, "id")?,
            status,
            session,
            idle_timeout_ms: row.try_get::<i64, _>("idle_timeout_seconds")? * 1000,
            last_active_at: row.try_get("last_active_at")?,
            last_ping_at: row.try_get("last_ping_at")?,
            running_since: row.try_get("running_since")?,
            detached_since: row.try_get("detached_since")?,
            websockets: row.try_get("websockets")?,
        });
    }
    Ok(out)
}

/// `from` → `to` among the up states (running/idle/detached), if still `from` in `session`;
/// `detached_since` is set with it.
pub async fn set_presence(
    db: &Db,
    id: Id,
    session: Id,
    from: Status,
    to: Status,
    detached_since: Option<i64>,
) -> Result<bool, StoreError> {
    let res = sqlx::query(
        "UPDATE notebooks SET status = $1, detached_since = $4
         WHERE id = $2 AND session_id = $3 AND status = $5",
    )
    .bind(to.as_str())
    .bind(id.to_string())
    .bind(session.to_string())
    .bind(detached_since)
    .bind(from.as_str())
    .execute(&db.pool)
    .await?;
    Ok(res.rows_affected() > 0)
}

/// Notebooks by status.
pub async fn count_by_status(db: &Db) -> Result<HashMap<String, i64>, StoreError> {
    let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM notebooks GROUP BY status")
        .fetch_all(&db.pool)
        .await?;
    let mut counts = HashMap::new();
    for row in rows {
        counts.insert(row.try_get("status")?, row.try_get("n")?);
    }
    Ok(counts)
}

/// A notebook in `starting` or `stopping`.
pub struct InTransition {
    pub id: Id,
    pub status: Status,
    pub session: Option<Id>,
    pub workload_config_id: Id,
    /// When the start or stop began (0 when unknown).
    pub since: i64,
}

/// Every notebook in `starting` or `stopping`.
pub async fn in_transition(db: &Db) -> Result<Vec<InTransition>, StoreError> {
    let rows = sqlx::query(
        "SELECT n.id, n.status, n.session_id, n.workload_config_id, n.transition_at
         FROM notebooks n WHERE n.status IN ('starting', 'stopping')",
    )
    .fetch_all(&db.pool)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        out.push(InTransition {
            id: get_id(&row, "id")?,
            status: get_parsed(&row, "status", "status", Status::parse)?,
            session: get_opt_id(&row, "session_id")?,
            workload_config_id: get_id(&row, "workload_config_id")?,
            since: row.try_get::<Option<i64>, _>("transition_at")?.unwrap_or(0),
        });
    }
    Ok(out)
}

/// Every up notebook's (id, session).
pub async fn up_sessions(db: &Db) -> Result<Vec<(Id, Id)>, StoreError> {
    let rows = sqlx::query(&format!(
        "SELECT id, session_id FROM notebooks WHERE status IN {UP_STATES}"
    ))
    .fetch_all(&db.pool)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        if let Some(session) = get_opt_id(&row, "session_id")? {
            out.push((get_id(&row, "id")?, session));
        }
    }
    Ok(out)
}

/// What the runtime should be running: the up notebooks, and the starting ones too when
/// `with_starting` (no endpoint yet).
pub async fn expected(db: &Db, with_starting: bool) -> Result<Vec<Expected>, StoreError> {
    let states = if with_starting {
        "('running', 'idle', 'detached', 'starting')"
    } else {
        UP_STATES
    };
    let rows = sqlx::query(&format!(
        "SELECT id, session_id, upstream, upstream_token FROM notebooks WHERE status IN {states}"
    ))
    .fetch_all(&db.pool)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let Some(session_id) = get_opt_id(&row, "session_id")? else {
            continue;
        };
        let upstream: Option<String> = row.try_get("upstream")?;
        let token: Option<String> = row.try_get("upstream_token")?;
        out.push(Expected {
            notebook_id: get_id(&row, "id")?,
            session_id,
            endpoint: match (upstream, token) {
                (Some(upstream), Some(token)) => Some(Endpoint { upstream, token }),
                _ => None,
            },
        });
    }
    Ok(out)
}

/// An up notebook whose servers were gone after a restart → `stopped`.
pub async fn mark_gone_after_restart(db: &Db, id: Id, session: Id) -> Result<bool, StoreError> {
    let mut tx = db.pool.begin().await?;
    let v = bump_routes(&mut tx).await?;
    record_route_changes(&mut tx, v, &[Changed::Notebook(id)]).await?;
    let res = sqlx::query(&format!(
        "UPDATE notebooks SET status = 'stopped', upstream = NULL, upstream_token = NULL,
            running_since = NULL, detached_since = NULL,
            status_message = 'its servers were gone after a control-plane restart'
         WHERE id = $1 AND session_id = $2 AND status IN {UP_STATES}"
    ))
    .bind(id.to_string())
    .bind(session.to_string())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(res.rows_affected() > 0)
}

/// How many notebooks `member` owns.
pub async fn owned_by(conn: &mut sqlx::AnyConnection, member: Id) -> Result<i64, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT COUNT(*) FROM notebooks WHERE member_id = $1")
            .bind(member.to_string())
            .fetch_one(conn)
            .await?,
    )
}

/// A busy kernel counts as activity: an up notebook of `session` was last active at `now`, and
/// a detached one was detached since `now`, so its idle and detached timers restart from the
/// end of the run. False when it moved on (another session, no longer up).
pub async fn kernel_busy_at(db: &Db, id: Id, session: Id, now: i64) -> Result<bool, StoreError> {
    let res = sqlx::query(
        "UPDATE notebooks SET last_active_at = $1,
             detached_since = CASE WHEN status = 'detached' THEN $1 ELSE detached_since END
         WHERE id = $2 AND session_id = $3 AND status IN ('running', 'idle', 'detached')",
    )
    .bind(now)
    .bind(id.to_string())
    .bind(session.to_string())
    .execute(&db.pool)
    .await?;
    Ok(res.rows_affected() > 0)
}

#[cfg(test)]
mod tests {
    //! The visibility clause on a scratch SQLite database: owner, team member, admin, a
    //! member outside the team, and another organization's admin.

    use super::*;
    use crate::model::Role;
    use crate::store::configs::ConfigFields;
    use crate::store::keys::StoredSecret;
    use crate::store::members::MemberFields;
    use crate::store::{configs, members, orgs, teams};

    async fn org(db: &Db, name: &str) -> (Id, Id) {
        let secret = StoredSecret {
            hash: name,
            prefix: "mk_",
        };
        let o = orgs::create(db, name, "admin", secret, None)
            .await
            .expect("org")
            .expect("created");
        (o.organization_id, o.admin_member_id)
    }

    async fn member(db: &Db, org: Id, by: Id) -> Id {
        let f = MemberFields {
            name: "m".into(),
            email: None,
            role: Role::Member,
        };
        members::insert(db, org, f, by).await.expect("member")
    }

    #[tokio::test]
    async fn who_sees_a_notebook() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite:{}", dir.path().join("v.db").display());
        let db = Db::connect(&url, 4).await.expect("connect");
        let (a, admin) = org(&db, "a").await;
        let (b, other_admin) = org(&db, "b").await;
        let (owner, mate, outsider) = (
            member(&db, a, admin).await,
            member(&db, a, admin).await,
            member(&db, a, admin).await,
        );
        let team = teams::insert(&db, a, "t", admin).await.expect("team");
        teams::add_members(&db, team, &[owner, mate], admin)
            .await
            .expect("add");
        let fields = ConfigFields {
            name: "c".into(),
            workload_type: "notebook".into(),
            cluster_id: None,
            config_json: "{}".into(),
            endpoint_limits_json: "{}".into(),
        };
        let cfg = configs::insert(&db, a, fields, admin)
            .await
            .expect("config");
        let new = |team_ids: Vec<Id>| NewNotebook {
            org_id: a,
            owner,
            workload_config_id: cfg,
            name: "n".into(),
            description: None,
            idle_timeout_seconds: 0,
            team_ids,
        };
        let shared = insert(&db, new(vec![team])).await.expect("shared");
        let private = insert(&db, new(Vec::new())).await.expect("private");

        let viewer = |org_id, member_id, admin| Viewer {
            org_id,
            member_id,
            admin,
        };
        let cases = [
            ("owner", viewer(a, owner, false), true, true),
            ("team member", viewer(a, mate, false), true, false),
            ("admin", viewer(a, admin, true), true, true),
            ("outsider", viewer(a, outsider, false), false, false),
            (
                "other org's admin",
                viewer(b, other_admin, true),
                false,
                false,
            ),
        ];
        for (who, v, sees_shared, sees_private) in cases {
            let got = (
                fetch_visible(&db, &v, shared, 60)
                    .await
                    .expect("shared")
                    .is_some(),
                fetch_visible(&db, &v, private, 60)
                    .await
                    .expect("private")
                    .is_some(),
            );
            assert_eq!(got, (sees_shared, sees_private), "{who}");
            let spec = PageSpec {
                limit: 100,
                after: None,
            };
            let page = list(&db, &v, None, spec, 60).await.expect("list");
            let expected = sees_shared as i64 + sees_private as i64;
            assert_eq!(page.total, expected, "{who}");
            assert_eq!(page.notebooks.len() as i64, expected, "{who}");
        }
    }
}
