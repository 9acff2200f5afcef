//! Keyset pagination, the same for every list: newest first (`created_at DESC, id ASC`), a
//! page of `limit` rows found by fetching `limit + 1`, and an opaque `nextPageToken` that
//! encodes the last row's `(created_at, id)`.

use base64::Engine;
use marina_config::Id;
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{bind_all, Arg, Db};
use crate::error::StoreError;
use crate::model::Page;

/// A keyset position: the last item of the previous page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    pub created_at: i64,
    pub id: Id,
}

impl Cursor {
    /// The opaque `nextPageToken`.
    pub fn encode(&self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!("{}.{}", self.created_at, self.id))
    }

    pub fn decode(token: &str) -> Option<Cursor> {
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token)
            .ok()?;
        let s = String::from_utf8(raw).ok()?;
        let (ts, id) = s.split_once('.')?;
        Some(Cursor {
            created_at: ts.parse().ok()?,
            id: Id::parse(id).ok()?,
        })
    }
}

/// Where a page starts and how long it is.
#[derive(Clone, Copy, Debug)]
pub struct PageSpec<'a> {
    pub limit: i64,
    pub after: Option<&'a Cursor>,
}

/// One page of rows and what surrounds it.
pub struct Rows {
    /// All rows matching, across pages.
    pub total: i64,
    pub rows: Vec<AnyRow>,
    /// More rows follow this page.
    pub more: bool,
}

/// One keyset page of rows of `from` (a table, maybe aliased) matching `cond`. `columns` are
/// selected; `key` prefixes the key columns (`"n."` for an aliased table, else `""`).
/// One page of organization `org`'s rows of `table` (one with an `org_id` column), all columns.
pub(crate) async fn org_rows(
    db: &Db,
    table: &str,
    org: Id,
    page: PageSpec<'_>,
) -> Result<Rows, StoreError> {
    rows(
        db,
        table,
        "*",
        "",
        "org_id = $1",
        vec![Arg::S(org.to_string())],
        page,
    )
    .await
}

pub(crate) async fn rows(
    db: &Db,
    from: &str,
    columns: &str,
    key: &str,
    cond: &str,
    mut args: Vec<Arg>,
    page: PageSpec<'_>,
) -> Result<Rows, StoreError> {
    let total: i64 = bind_all(
        sqlx::query(&format!("SELECT COUNT(*) AS n FROM {from} WHERE {cond}")),
        &args,
    )
    .fetch_one(&db.pool)
    .await?
    .try_get("n")?;
    if page.limit <= 0 {
        return Ok(Rows {
            total,
            rows: Vec::new(),
            more: false,
        });
    }
    let mut page_cond = cond.to_owned();
    if let Some(c) = page.after {
        args.push(Arg::I(c.created_at));
        let t = args.len();
        args.push(Arg::S(c.id.to_string()));
        let i = args.len();
        page_cond = format!(
            "{page_cond} AND ({key}created_at < ${t} OR ({key}created_at = ${t} AND {key}id > ${i}))"
        );
    }
    let sql = format!(
        "SELECT {columns} FROM {from} WHERE {page_cond} ORDER BY {key}created_at DESC, {key}id ASC LIMIT {}",
        page.limit + 1
    );
    let mut rows = bind_all(sqlx::query(&sql), &args)
        .fetch_all(&db.pool)
        .await?;
    let more = rows.len() as i64 > page.limit;
    rows.truncate(page.limit as usize);
    Ok(Rows { total, rows, more })
}

/// The `nextPageToken` after `last` when more follow.
pub fn next_token(more: bool, last: Option<(i64, Id)>) -> Option<String> {
    if !more {
        return None;
    }
    last.map(|(created_at, id)| Cursor { created_at, id }.encode())
}

/// Maps a page's rows with `f` into the list shape, the next page token taken from the last
/// item's key.
pub(crate) fn page_of<T: utoipa::ToSchema>(
    rows: Rows,
    f: impl Fn(&AnyRow) -> Result<T, StoreError>,
    key: impl Fn(&T) -> (i64, Id),
) -> Result<Page<T>, StoreError> {
    let items = rows.rows.iter().map(f).collect::<Result<Vec<_>, _>>()?;
    let next_page_token = next_token(rows.more, items.last().map(&key));
    Ok(Page {
        total: rows.total,
        items,
        next_page_token,
    })
}
