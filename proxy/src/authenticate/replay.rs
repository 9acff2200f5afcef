//! Single use of URL tokens: each `jti` is redeemed at most once.
//!
//! - [`ReplayStore::Memory`]: the `jti`s seen by this edge, in memory, and appended to a journal
//!   (`DATA_DIR/edge-replay.log`, one `jti exp` line each, fsynced) that is read back at start,
//!   so a restart of a single edge still refuses a replay. It does not hold across replicas.
//! - [`ReplayStore::Control`]: asks the control plane (`POST /internal/v1/redeem`), whose
//!   database makes a token single-use across every replica. 200 = first use, 409 = replay;
//!   anything else fails closed.
//!
//! Either runs only in the handshake, never per request.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

use http::StatusCode;
use marina_config::wire::{RedeemRequest, INTERNAL_PREFIX};

use crate::error::{EdgeError, ErrorKind, ProxyError};
use crate::uplink::client::ControlClient;

pub enum ReplayStore {
    Memory(MemoryReplay),
    /// Boxed: the client is large next to the in-memory store.
    Control(Box<ControlClient>),
}

// === impl ReplayStore ===

impl ReplayStore {
    /// Marks `jti` used; an error if it was used before (or cannot be checked).
    pub async fn redeem(&self, jti: &str, exp: u64, now: u64) -> Result<(), EdgeError> {
        // A `jti` is an opaque id from our own control plane; anything long or with control
        // characters is not one (and must not reach the journal's line format).
        if jti.is_empty() || jti.len() > 128 || !jti.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(EdgeError::new(ErrorKind::LinkInvalid, "jti shape"));
        }
        match self {
            ReplayStore::Memory(m) => m.redeem(jti, exp, now),
            ReplayStore::Control(c) => {
                let body = serde_json::to_vec(&RedeemRequest {
                    jti: jti.to_owned(),
                    exp,
                })
                .map_err(|e| EdgeError::new(ErrorKind::Internal, "redeem body").with_cause(e))?;
                let path = format!("{INTERNAL_PREFIX}/redeem");
                match c.post_json(&path, body).await {
                    Ok((s, _)) if s.is_success() => Ok(()),
                    Ok((StatusCode::CONFLICT, _)) => Err(EdgeError::new(
                        ErrorKind::LinkReplayed,
                        "control replay store",
                    )),
                    Ok((s, _)) => Err(EdgeError::new(
                        ErrorKind::ReplayStoreUnavailable,
                        "control replay store",
                    )
                    .with_cause(format!("status {s}"))),
                    Err(e) => Err(EdgeError::new(
                        ErrorKind::ReplayStoreUnavailable,
                        "control replay store",
                    )
                    .with_cause(e)),
                }
            }
        }
    }
}

/// In-memory replay store with an append-only journal.
pub struct MemoryReplay {
    /// `jti` → `exp`. A std mutex: held only for a map operation and one small append, never
    /// across an `.await`, and only during handshakes (rare next to requests), so it is not a
    /// hot-path lock.
    state: Mutex<State>,
}

struct State {
    seen: HashMap<String, u64>,
    journal: std::fs::File,
    path: PathBuf,
}

// === impl MemoryReplay ===

impl MemoryReplay {
    /// Opens (or creates) the journal and loads the still-unexpired entries; rewrites the journal
    /// without the expired ones so it does not grow forever.
    pub fn open(path: PathBuf, now: u64) -> Result<MemoryReplay, ProxyError> {
        let file_err = |source| ProxyError::File {
            what: "replay journal",
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(file_err)?;
        }
        let mut seen = HashMap::new();
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                for line in text.lines() {
                    if let Some((jti, exp)) = line.split_once(' ') {
                        if let Ok(exp) = exp.parse::<u64>() {
                            if exp >= now {
                                seen.insert(jti.to_owned(), exp);
                            }
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(file_err(e)),
        }
        // Compact: write the live entries to a new file and move it into place.
        let tmp = path.with_extension("log.tmp");
        {
            let mut f = std::fs::File::create(&tmp).map_err(file_err)?;
            for (jti, exp) in &seen {
                writeln!(f, "{jti} {exp}").map_err(file_err)?;
            }
            f.sync_all().map_err(file_err)?;
        }
        std::fs::rename(&tmp, &path).map_err(file_err)?;
        let journal = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(file_err)?;
        Ok(MemoryReplay {
            state: Mutex::new(State {
                seen,
                journal,
                path,
            }),
        })
    }

    fn redeem(&self, jti: &str, exp: u64, now: u64) -> Result<(), EdgeError> {
        let mut st = self
            .state
            .lock()
            .map_err(|_| EdgeError::new(ErrorKind::Internal, "replay store poisoned"))?;
        if st.seen.contains_key(jti) {
            return Err(EdgeError::new(
                ErrorKind::LinkReplayed,
                "memory replay store",
            ));
        }
        // Forget expired entries now and then: an expired token is refused by `exp` anyway.
        if st.seen.len() > 10_000 {
            st.seen.retain(|_, e| *e >= now);
        }
        // Journal first: if the write fails, the token is not accepted (fail closed), so a
        // restart can never forget a redemption it acknowledged.
        let line = format!("{jti} {exp}\n");
        let written = st
            .journal
            .write_all(line.as_bytes())
            .and_then(|_| st.journal.sync_data());
        if let Err(e) = written {
            tracing::error!(path = %st.path.display(), error = %e, "cannot write the replay journal");
            return Err(EdgeError::new(ErrorKind::Internal, "replay journal").with_cause(e));
        }
        st.seen.insert(jti.to_owned(), exp);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_store_survives_restart_and_forgets_expired() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edge-replay.log");
        let s = ReplayStore::Memory(MemoryReplay::open(path.clone(), 1000).unwrap());
        s.redeem("a", 2000, 1000).await.unwrap();
        s.redeem("old", 1500, 1000).await.unwrap();
        assert_eq!(
            s.redeem("a", 2000, 1000).await.unwrap_err().kind,
            ErrorKind::LinkReplayed
        );
        drop(s);
        // Restart at t=1600: "a" is still refused, "old" has expired and is forgotten.
        let s = ReplayStore::Memory(MemoryReplay::open(path.clone(), 1600).unwrap());
        assert_eq!(
            s.redeem("a", 2000, 1600).await.unwrap_err().kind,
            ErrorKind::LinkReplayed
        );
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("a 2000") && !text.contains("old"), "{text}");
    }

    #[tokio::test]
    async fn odd_jtis_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = ReplayStore::Memory(MemoryReplay::open(dir.path().join("j"), 0).unwrap());
        for bad in ["", "a b", "x\ny 5", &"z".repeat(200)] {
            assert_eq!(
                s.redeem(bad, 10, 0).await.unwrap_err().kind,
                ErrorKind::LinkInvalid
            );
        }
    }
}
