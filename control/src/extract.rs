//! Request extractors that fail with [`ApiError`] instead of axum's plain-text rejections.
//!
//! - [`Json`]: content type checked (415), size bounded by the router's body limit (413), and
//!   deserialization errors that name the field (`config.sail.maxRetries`), thanks to
//!   `serde_path_to_error`.
//! - [`ListParams`]: `limit` (0..=100, default 100) and the opaque `pageToken`; any other query
//!   parameter is a 400, like an unknown JSON field.
//! - [`path_id`]: path parameters must be ids (`[0-9A-Z]{10}`), else 400 naming the parameter.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use axum::http::StatusCode;
use marina_config::Id;
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::store::page::PageSpec;

/// A JSON body of type `T`.
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let is_json = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|mime| {
                let mime = mime.trim().to_ascii_lowercase();
                mime == "application/json"
                    || (mime.starts_with("application/") && mime.ends_with("+json"))
            })
            .unwrap_or(false);
        if !is_json {
            return Err(ApiError::UnsupportedMediaType);
        }
        let limit = req
            .extensions()
            .get::<BodyLimit>()
            .map(|l| l.0)
            .unwrap_or(usize::MAX);
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e: BytesRejection| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge { limit }
                } else {
                    ApiError::MalformedJson(e.body_text())
                }
            })?;
        parse_json(&bytes).map(Json)
    }
}

/// The configured body limit, put in request extensions by the router so the 413 message can
/// say what it is.
#[derive(Clone, Copy, Debug)]
pub struct BodyLimit(pub usize);

/// Deserializes `bytes`, naming the offending field in the error.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, T>(&mut de) {
        Ok(v) => {
            // Trailing garbage after the value is malformed JSON too.
            de.end()
                .map_err(|e| ApiError::MalformedJson(strip_position(&e.to_string())))?;
            Ok(v)
        }
        Err(err) => {
            let path = err.path().to_string();
            let inner = err.into_inner();
            let msg = inner.to_string();
            if inner.is_syntax() || inner.is_eof() {
                return Err(ApiError::MalformedJson(strip_position(&msg)));
            }
            // serde reports a missing field at its parent's path; name the field itself.
            let field = match backticked(&msg, "missing field `") {
                Some(name) => join_path(&path, name),
                None => match backticked(&msg, "unknown field `") {
                    Some(name) if !path.ends_with(name) => join_path(&path, name),
                    _ => path,
                },
            };
            let field = if field == "." {
                "body".to_owned()
            } else {
                field
            };
            Err(ApiError::invalid(field, strip_position(&msg)))
        }
    }
}

fn backticked<'a>(msg: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = msg.strip_prefix(prefix)?;
    rest.split('`').next()
}

fn join_path(parent: &str, name: &str) -> String {
    if parent == "." || parent.is_empty() {
        name.to_owned()
    } else {
        format!("{parent}.{name}")
    }
}

/// serde_json appends " at line 1 column 17": useful for syntax errors, noise otherwise.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_owned(),
        None => msg.to_owned(),
    }
}

/// Parses a path parameter as an id (400 naming `field` otherwise).
pub fn path_id(field: &'static str, value: &str) -> Result<Id, ApiError> {
    Id::parse(value).map_err(|e| ApiError::invalid(field, e.to_string()))
}

/// Largest page.
pub const MAX_LIMIT: i64 = 100;

/// `?limit=&pageToken=` of list endpoints.
#[derive(Clone, Debug, Default)]
pub struct ListParams {
    pub limit: i64,
    /// Decoded keyset position: list items strictly after `(created_at desc, id asc)`.
    pub after: Option<Cursor>,
}

pub use crate::store::page::Cursor;

impl<'a> From<&'a ListParams> for PageSpec<'a> {
    fn from(p: &'a ListParams) -> PageSpec<'a> {
        PageSpec {
            limit: p.limit,
            after: p.after.as_ref(),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for ListParams {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Query(q) = Query::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::invalid("query", e.body_text()))?;
        let mut out = ListParams {
            limit: MAX_LIMIT,
            after: None,
        };
        for (k, v) in &q {
            match k.as_str() {
                "limit" => {
                    out.limit = v
                        .parse::<i64>()
                        .ok()
                        .filter(|n| (0..=MAX_LIMIT).contains(n))
                        .ok_or_else(|| {
                            ApiError::invalid("limit", "must be an integer from 0 to 100")
                        })?;
                }
                "pageToken" => {
                    if !v.is_empty() {
                        out.after = Some(Cursor::decode(v).ok_or_else(|| {
                            ApiError::invalid("pageToken", "not a token this API returned")
                        })?);
                    }
                }
                other => {
                    return Err(ApiError::invalid(
                        other.to_owned(),
                        "unknown query parameter (expected limit, pageToken)",
                    ))
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CreateNotebookBody, CreateWorkloadConfigBody};

    fn field_of(r: Result<impl Sized, ApiError>) -> String {
        match r {
            Err(ApiError::Invalid { field, .. }) => field,
            Err(e) => panic!("unexpected {e:?}"),
            Ok(_) => panic!("accepted"),
        }
    }

    #[test]
    fn names_fields() {
        let r = parse_json::<CreateNotebookBody>(br#"{"name":"x"}"#);
        assert_eq!(field_of(r), "workloadConfigId");
        let r = parse_json::<CreateNotebookBody>(
            br#"{"name":"x","workloadConfigId":"A1B2C3D4E5","bogus":1}"#,
        );
        assert_eq!(field_of(r), "bogus");
        let r = parse_json::<CreateNotebookBody>(
            br#"{"name":"x","workloadConfigId":"A1B2C3D4E5","idleTimeoutSeconds":"x"}"#,
        );
        assert_eq!(field_of(r), "idleTimeoutSeconds");
        let r = parse_json::<CreateNotebookBody>(
            br#"{"name":"x","workloadConfigId":"A1B2C3D4E5","teamIds":["A1B2C3D4E5","nope"]}"#,
        );
        assert_eq!(field_of(r), "teamIds[1]");
        let r = parse_json::<CreateWorkloadConfigBody>(
            br#"{"name":"x","config":{"sail":{"maxRetries":"x"}}}"#,
        );
        assert_eq!(field_of(r), "config.sail.maxRetries");
        let r =
            parse_json::<CreateWorkloadConfigBody>(br#"{"name":"x","config":{"sail":{"zz":1}}}"#);
        assert_eq!(field_of(r), "config.sail.zz");
        assert!(matches!(
            parse_json::<CreateNotebookBody>(b"{\"name\":"),
            Err(ApiError::MalformedJson(_))
        ));
    }

    #[test]
    fn cursor_round_trip() {
        let c = Cursor {
            created_at: 1234,
            id: Id::random(),
        };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        assert_eq!(Cursor::decode("!!"), None);
    }
}
