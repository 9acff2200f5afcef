//! Keyset pagination, the same for every list: newest first (`created_at DESC, id ASC`), a
//! page of `limit` rows found by fetching `limit + 1`, and an opaque `nextPageToken` that
//! encodes the last row's `(created_at, id)`.

use marina_config::Id;
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{bind_all, Arg, Db};
use crate::error::StoreError;
use crate::extract::Cursor;
use crate::model::Page;

/// Where a page starts and how long it is.
#[derive(Clone, Copy, Debug)]
pub struct PageSpec<'a> {
    pub limit: i64,
    pub after: Option<&'a Cursor>,
}

impl<'a> From<&'a crate::extract::ListParams> for PageSpec<'a> {
    fn from(p: &'a crate::extract::ListParams) -> PageSpec<'a> {
        PageSpec {
            limit: p.limit,
            after: p.after.as_ref(),
        }
    }
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
