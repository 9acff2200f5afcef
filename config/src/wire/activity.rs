//! Activity: what each edge replica reports every `proxy.activity_interval_ms`.

use serde::{Deserialize, Serialize};

use crate::ids::Id;

/// Activity of one notebook seen by one edge replica since its last report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NotebookActivity {
    pub notebook_id: Id,
    pub session_id: Id,
    /// Unix milliseconds of the latest browser request or message; `None` if none since the
    /// last report.
    pub last_active_ms: Option<i64>,
    /// WebSockets (and event streams) open to this notebook through this replica now.
    pub open_websockets: u32,
}

/// What an edge replica reports every `proxy.activity_interval_ms`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ActivityBatch {
    pub edge_id: String,
    /// Unix milliseconds when the batch was cut.
    pub sent_at_ms: i64,
    /// Every notebook with activity or open connections on this replica. A notebook absent from
    /// a replica's latest batch has no connection through it.
    pub notebooks: Vec<NotebookActivity>,
}
