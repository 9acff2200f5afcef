//! The store: one sqlx `Any` pool over SQLite (a file, WAL) or PostgreSQL, its schema, and
//! every query the control plane runs, by table or aggregate. Nothing outside this module
//! writes SQL: handlers and the lifecycle call the functions here, which return model types
//! (mapped from rows in one place, `rows`), and state transitions are named
//! conditional updates that say whether they won.
//!
//! - [`notebooks`]: notebooks, their team links, the visibility clause, the lifecycle
//!   transitions and the monitor's reads.
//! - [`teams`], [`members`], [`keys`], [`configs`], [`orgs`]: identity and workload configs.
//! - [`edges`]: the edge's bookkeeping (activity, connections, redeemed tokens) and the routes
//!   snapshot.
//! - [`page`]: keyset pagination (one page of rows, the next page token).
//! - `rows`: row mapping, the model types built from their rows.
//!
//! Why `Any` and not two pools behind a trait: every query the control plane runs is portable
//! SQL (`$1` placeholders work on both drivers, `ON CONFLICT`, `RETURNING`), so one code path
//! serves both and both are tested by the same suite. The price is the `Any` type set: only
//! `BIGINT` and `TEXT` columns are used (timestamps are unix milliseconds, JSON is text, and
//! there are no booleans), and aggregates are `CAST` to `BIGINT` because PostgreSQL's `SUM`
//! of a bigint is a numeric.
//!
//! Migrations are embedded, numbered and applied at start-up inside one transaction each,
//! recorded in `schema_migrations`. On PostgreSQL a transaction-scoped advisory lock keeps two
//! replicas starting at once from applying the same migration twice.
//!
//! Architecture invariant: every query that reads a tenant's rows takes the caller's
//! organization (or a [`notebooks::Viewer`]) and filters by it in SQL.

pub mod configs;
pub mod edges;
pub mod keys;
pub mod members;
pub mod notebooks;
pub mod orgs;
pub mod page;
pub mod routes;
pub use routes::{bump_routes, record as record_route_changes, Changed};
mod rows;
pub mod teams;

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Executor, Row};

use marina_config::Id;

use crate::error::{ControlError, StoreError};

/// Which database is behind the pool (a few statements differ).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DbKind {
    Sqlite,
    Postgres,
}

/// The pool and what it points at.
#[derive(Clone, Debug)]
pub struct Db {
    pub pool: AnyPool,
    pub kind: DbKind,
}

/// Current time, unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Renders unix milliseconds as RFC 3339 UTC to the second (`2026-11-28T12:00:00Z`).
pub fn rfc3339(ms: i64) -> String {
    let fmt = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .ok()
        .and_then(|t| t.format(&fmt).ok())
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".into())
}

/// The schema, one entry per version. Never edit an applied entry: add a new one.
const MIGRATIONS: &[&str] = &[
    // 1: identity, workloads, notebooks, edge bookkeeping.
    r#"
CREATE TABLE organizations (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE members (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES organizations(id),
    name TEXT NOT NULL,
    email TEXT,
    role TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    created_by TEXT,
    updated_at BIGINT NOT NULL,
    updated_by TEXT
);
CREATE INDEX members_org ON members (org_id, created_at, id);
CREATE TABLE teams (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES organizations(id),
    name TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    created_by TEXT,
    updated_at BIGINT NOT NULL,
    updated_by TEXT
);
CREATE INDEX teams_org ON teams (org_id, created_at, id);
CREATE TABLE team_members (
    team_id TEXT NOT NULL REFERENCES teams(id) ON DELETE CASCADE,
    member_id TEXT NOT NULL REFERENCES members(id) ON DELETE CASCADE,
    created_at BIGINT NOT NULL,
    created_by TEXT,
    PRIMARY KEY (team_id, member_id)
);
CREATE INDEX team_members_member ON team_members (member_id, team_id);
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    member_id TEXT NOT NULL REFERENCES members(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    created_by TEXT
);
CREATE INDEX api_keys_member ON api_keys (member_id, created_at);
CREATE TABLE workload_configs (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES organizations(id),
    name TEXT NOT NULL,
    workload_type TEXT NOT NULL,
    cluster_id TEXT,
    config TEXT NOT NULL,
    endpoint_limits TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    created_by TEXT,
    updated_at BIGINT NOT NULL,
    updated_by TEXT
);
CREATE INDEX workload_configs_org ON workload_configs (org_id, created_at, id);
CREATE TABLE notebooks (
    id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL REFERENCES organizations(id),
    member_id TEXT NOT NULL REFERENCES members(id),
    workload_config_id TEXT NOT NULL REFERENCES workload_configs(id),
    name TEXT NOT NULL,
    description TEXT,
    status TEXT NOT NULL,
    status_message TEXT,
    idle_timeout_seconds BIGINT NOT NULL,
    last_active_at BIGINT,
    last_ping_at BIGINT,
    session_id TEXT,
    upstream TEXT,
    upstream_token TEXT,
    running_since BIGINT,
    detached_since BIGINT,
    created_at BIGINT NOT NULL,
    created_by TEXT,
    updated_at BIGINT NOT NULL,
    updated_by TEXT
);
CREATE INDEX notebooks_org_order ON notebooks (org_id, created_at DESC, id);
CREATE INDEX notebooks_member_order ON notebooks (member_id, created_at DESC, id);
CREATE INDEX notebooks_status ON notebooks (status);
CREATE INDEX notebooks_config ON notebooks (workload_config_id);
CREATE TABLE notebook_teams (
    notebook_id TEXT NOT NULL REFERENCES notebooks(id) ON DELETE CASCADE,
    team_id TEXT NOT NULL REFERENCES teams(id) ON DELETE CASCADE,
    created_at BIGINT NOT NULL,
    created_by TEXT,
    updated_at BIGINT NOT NULL,
    updated_by TEXT,
    PRIMARY KEY (notebook_id, team_id)
);
CREATE INDEX notebook_teams_team ON notebook_teams (team_id, notebook_id);
CREATE TABLE edges (
    edge_id TEXT PRIMARY KEY,
    last_seen_at BIGINT NOT NULL
);
CREATE TABLE edge_connections (
    edge_id TEXT NOT NULL,
    notebook_id TEXT NOT NULL,
    open_websockets BIGINT NOT NULL,
    PRIMARY KEY (edge_id, notebook_id)
);
CREATE INDEX edge_connections_notebook ON edge_connections (notebook_id);
CREATE TABLE redeemed_tokens (
    jti TEXT PRIMARY KEY,
    exp BIGINT NOT NULL
);
CREATE INDEX redeemed_tokens_exp ON redeemed_tokens (exp);
CREATE TABLE leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE TABLE route_version (
    id BIGINT PRIMARY KEY,
    version BIGINT NOT NULL
);
INSERT INTO route_version (id, version) VALUES (1, 1);
CREATE TABLE meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
)
"#,
    // 2: when the last start or stop began, so a transition whose driver died with its
    // control replica can be found and driven again.
    "ALTER TABLE notebooks ADD COLUMN transition_at BIGINT",
    // 3: the routes feed's change log (store/routes.rs): which keys changed at which version,
    // and how far it was pruned. Edges that ask after an older version get a snapshot.
    r#"
CREATE TABLE route_changes (
    version BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    at BIGINT NOT NULL,
    kind TEXT NOT NULL,
    a TEXT NOT NULL,
    b TEXT,
    PRIMARY KEY (version, seq)
);
CREATE INDEX route_changes_at ON route_changes (at);
ALTER TABLE route_version ADD COLUMN pruned_through BIGINT NOT NULL DEFAULT 0;
UPDATE route_version SET pruned_through = version
"#,
    // 4: activity per member (store/edges.rs): each edge's open sockets and latest activity per
    // notebook run and member, for the monitor (summed) and presence (per member). What was
    // there is per notebook and refreshed by every edge within seconds, so it is not carried.
    r#"
DROP TABLE edge_connections;
CREATE TABLE edge_connections (
    edge_id TEXT NOT NULL,
    notebook_id TEXT NOT NULL,
    member_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    mode TEXT NOT NULL,
    open_sockets BIGINT NOT NULL,
    open_since BIGINT,
    last_active_at BIGINT,
    seen_at BIGINT NOT NULL,
    PRIMARY KEY (edge_id, notebook_id, member_id)
);
CREATE INDEX edge_connections_notebook ON edge_connections (notebook_id)
"#,
];

// === impl Db ===

impl Db {
    /// Connects to `url` (`sqlite:PATH`, `sqlite://PATH`, `postgres://…`) and migrates.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Db, ControlError> {
        sqlx::any::install_default_drivers();
        let (kind, url) = if url.starts_with("sqlite:") {
            (DbKind::Sqlite, sqlite_url(url)?)
        } else {
            (DbKind::Postgres, url.to_owned())
        };
        let kind_name = match kind {
            DbKind::Sqlite => "sqlite",
            DbKind::Postgres => "postgres",
        };
        let connect_err = |source| ControlError::Connect {
            url_kind: kind_name,
            source,
        };
        // sqlx logs statements at debug and slow ones (> 1 s) at warn: nothing per request at
        // info.
        let opts = AnyConnectOptions::from_str(&url).map_err(connect_err)?;
        let max = if max_connections == 0 {
            8
        } else {
            max_connections
        };
        let mut pool_opts = AnyPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(Duration::from_secs(10));
        if kind == DbKind::Sqlite {
            // Per connection: enforce foreign keys (off by default in SQLite), wait for a
            // writer instead of failing at once, and relax fsync to WAL checkpoints (still
            // crash-safe for committed transactions in WAL mode, minus the last ones on power
            // loss).
            pool_opts = pool_opts.after_connect(|conn, _meta| {
                Box::pin(async move {
                    conn.execute("PRAGMA foreign_keys = ON").await?;
                    conn.execute("PRAGMA busy_timeout = 10000").await?;
                    conn.execute("PRAGMA synchronous = NORMAL").await?;
                    Ok(())
                })
            });
        }
        let pool = pool_opts.connect_with(opts).await.map_err(connect_err)?;
        if kind == DbKind::Sqlite {
            // Persistent for the file: readers no longer block the writer.
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&pool)
                .await
                .map_err(connect_err)?;
        }
        let db = Db { pool, kind };
        db.migrate().await?;
        Ok(db)
    }

    /// Applies every migration not yet recorded.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .execute(&self.pool)
        .await?;
        for (i, sql) in MIGRATIONS.iter().enumerate() {
            let version = i as i64 + 1;
            let mut tx = self.pool.begin().await?;
            if self.kind == DbKind::Postgres {
                // Serialises concurrent start-ups; released with the transaction.
                sqlx::query("SELECT pg_advisory_xact_lock(7262746)")
                    .execute(&mut *tx)
                    .await?;
            }
            let done: Option<i64> =
                sqlx::query_scalar("SELECT version FROM schema_migrations WHERE version = $1")
                    .bind(version)
                    .fetch_optional(&mut *tx)
                    .await?;
            if done.is_some() {
                continue;
            }
            for stmt in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                sqlx::query(stmt)
                    .execute(&mut *tx)
                    .await
                    .map_err(|source| StoreError::Migration { version, source })?;
            }
            sqlx::query("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)")
                .bind(version)
                .bind(now_ms())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        }
        Ok(())
    }

    /// Tries to take or renew the named lease for `ttl_ms`. True while `holder` holds it.
    /// One conditional upsert: it succeeds when the row is absent, ours, or expired, so two
    /// control replicas can never both believe they hold it (their clocks permitting).
    pub async fn try_lease(
        &self,
        name: &str,
        holder: &str,
        ttl_ms: i64,
    ) -> Result<bool, StoreError> {
        let now = now_ms();
        let res = sqlx::query(
            "INSERT INTO leases (name, holder, expires_at) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO UPDATE SET holder = $2, expires_at = $3
             WHERE leases.holder = $2 OR leases.expires_at < $4",
        )
        .bind(name)
        .bind(holder)
        .bind(now + ttl_ms)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(res.rows_affected() == 1)
    }

    /// Gives the named lease up if `holder` holds it, so another replica (or this one's
    /// successor after a restart) takes it at once instead of after it expires.
    pub async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM leases WHERE name = $1 AND holder = $2")
            .bind(name)
            .bind(holder)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The current routes version.
    pub async fn route_version(&self) -> Result<u64, StoreError> {
        let v: i64 = sqlx::query_scalar("SELECT version FROM route_version WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        Ok(v as u64)
    }

    /// Is the database answering?
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }
}

/// `sqlite:PATH` / `sqlite://PATH` → `sqlite://PATH?mode=rwc` (create the file if needed),
/// creating the parent directory.
fn sqlite_url(url: &str) -> Result<String, ControlError> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path != ":memory:" {
        if let Some(parent) = std::path::Path::new(path).parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent).map_err(|source| ControlError::File {
                    what: "database directory",
                    path: parent.to_owned(),
                    source,
                })?;
            }
        }
    }
    let query = if query.is_empty() {
        "mode=rwc".to_owned()
    } else if query.contains("mode=") {
        query.to_owned()
    } else {
        format!("{query}&mode=rwc")
    };
    Ok(format!("sqlite://{path}?{query}"))
}

/// Reads a required text column as an [`marina_config::Id`].
pub fn get_id(
    row: &sqlx::any::AnyRow,
    column: &'static str,
) -> Result<marina_config::Id, StoreError> {
    let s: String = row.try_get(column)?;
    marina_config::Id::parse(&s).map_err(|_| StoreError::Corrupt { column, value: s })
}

/// Reads a nullable text column as an optional [`marina_config::Id`].
pub fn get_opt_id(
    row: &sqlx::any::AnyRow,
    column: &'static str,
) -> Result<Option<marina_config::Id>, StoreError> {
    let s: Option<String> = row.try_get(column)?;
    s.map(|s| marina_config::Id::parse(&s).map_err(|_| StoreError::Corrupt { column, value: s }))
        .transpose()
}

/// A bind value of a dynamically built query.
#[derive(Clone, Debug)]
pub(crate) enum Arg {
    S(String),
    I(i64),
}

/// Binds `args` in order.
pub(crate) fn bind_all<'q>(
    mut q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    args: &'q [Arg],
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    for a in args {
        q = match a {
            Arg::S(s) => q.bind(s.as_str()),
            Arg::I(i) => q.bind(*i),
        };
    }
    q
}

/// The row `id` of organization `org` in `table` (one with `id` and `org_id` columns), mapped
/// by `from_row`.
async fn fetch_in_org<T>(
    db: &Db,
    table: &'static str,
    org: Id,
    id: Id,
    from_row: fn(&sqlx::any::AnyRow) -> Result<T, StoreError>,
) -> Result<Option<T>, StoreError> {
    sqlx::query(&format!(
        "SELECT * FROM {table} WHERE id = $1 AND org_id = $2"
    ))
    .bind(id.to_string())
    .bind(org.to_string())
    .fetch_optional(&db.pool)
    .await?
    .map(|r| from_row(&r))
    .transpose()
}

/// Does organization `org` have row `id` in `table`?
async fn exists_in_org(db: &Db, table: &'static str, org: Id, id: Id) -> Result<bool, StoreError> {
    let found: Option<String> = sqlx::query_scalar(&format!(
        "SELECT id FROM {table} WHERE id = $1 AND org_id = $2"
    ))
    .bind(id.to_string())
    .bind(org.to_string())
    .fetch_optional(&db.pool)
    .await?;
    Ok(found.is_some())
}

/// Ends a write transaction after its one conditional statement: committed when `res` changed
/// a row, rolled back (with the routes-version bump that opened it) when it changed none.
/// Whether it changed one.
async fn commit_if_changed(
    tx: sqlx::Transaction<'_, sqlx::Any>,
    res: sqlx::any::AnyQueryResult,
) -> Result<bool, StoreError> {
    if res.rows_affected() == 0 {
        tx.rollback().await?;
        return Ok(false);
    }
    tx.commit().await?;
    Ok(true)
}

/// Runs each of `statements` (`DELETE … WHERE x = $1`) with `id`, in one transaction that
/// bumps the routes version: a row and everything that refers to it go together.
async fn delete_with_dependents(
    db: &Db,
    statements: &[&'static str],
    id: Id,
    changed: Changed,
) -> Result<(), StoreError> {
    let mut tx = db.pool.begin().await?;
    let v = bump_routes(&mut tx).await?;
    record_route_changes(&mut tx, v, &[changed]).await?;
    for sql in statements {
        sqlx::query(sql)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Inserts link rows (`sql`, an `INSERT … VALUES ($1, $2, $3 created at, $4 created by) ON
/// CONFLICT … DO NOTHING`), one per `b`, and bumps the routes version in the same transaction,
/// so the edges learn of the access the links give. A link already there is fine.
async fn add_links(
    db: &Db,
    sql: &'static str,
    a: Id,
    bs: &[Id],
    by: Id,
    changed: fn(Id, Id) -> Changed,
) -> Result<(), StoreError> {
    let now = now_ms();
    let mut tx = db.pool.begin().await?;
    let v = bump_routes(&mut tx).await?;
    let changes: Vec<Changed> = bs.iter().map(|b| changed(a, *b)).collect();
    record_route_changes(&mut tx, v, &changes).await?;
    for b in bs {
        sqlx::query(sql)
            .bind(a.to_string())
            .bind(b.to_string())
            .bind(now)
            .bind(by.to_string())
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Deletes one link row (`sql`, a `DELETE … WHERE x = $1 AND y = $2`) and bumps the routes
/// version in the same transaction, so the edges drop the access the link gave (and close the
/// connections it allowed). False, with nothing changed, when there was no such row.
async fn delete_link(
    db: &Db,
    sql: &'static str,
    a: Id,
    b: Id,
    changed: Changed,
) -> Result<bool, StoreError> {
    let mut tx = db.pool.begin().await?;
    let v = bump_routes(&mut tx).await?;
    record_route_changes(&mut tx, v, &[changed]).await?;
    let res = sqlx::query(sql)
        .bind(a.to_string())
        .bind(b.to_string())
        .execute(&mut *tx)
        .await?;
    // Nothing changed: the version bump is rolled back too.
    commit_if_changed(tx, res).await
}

/// The distinct ids, as text, in first-seen order.
fn id_strings(ids: impl IntoIterator<Item = Id>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for id in ids {
        let s = id.to_string();
        if !out.contains(&s) {
            out.push(s);
        }
    }
    out
}

/// `$first, $first+1, …` placeholders for an `IN (…)` list of `n` values.
pub fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_to_the_second() {
        assert_eq!(rfc3339(1_795_867_200_123), "2026-11-28T12:00:00Z");
    }

    #[test]
    fn sqlite_urls() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a/b.db");
        let u = sqlite_url(&format!("sqlite:{}", p.display())).unwrap();
        assert_eq!(u, format!("sqlite://{}?mode=rwc", p.display()));
        assert!(dir.path().join("a").is_dir());
        assert_eq!(placeholders(2, 3), "$2, $3, $4");
    }
}
