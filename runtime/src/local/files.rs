//! The files of a local notebook, all under `DATA_DIR/notebooks/<ID>/`:
//!
//! - `work/`: the notebook's own directory, the only one its code sees (at `/notebook` inside
//!   its sandbox) and may write: `work/notebook.py`, the notebook itself, created once with a
//!   default and kept across stops, restarts and Marina upgrades (Marimo saves edits into it),
//!   and whatever the notebook's code writes beside it.
//!
//! Everything else is Marina's and out of the notebook's reach (a notebook that could write
//! `run.json` could make Marina signal any process):
//! - `run.json` (0600): what runs now (pids, ports, session id, Marimo token). Written when a
//!   start spawns processes, removed when they are stopped. It is how a restarted Marina finds,
//!   adopts or kills processes a crashed one left behind.
//! - `marimo-token` (0600): the per-start token, passed to Marimo as a file so it never
//!   appears on a command line.
//! - `logs/sail.log`, `logs/marimo.log`: the servers' output, appended across starts.
//! - `site/`: libraries from the workload config, installed with `pip --target`.
//! - `sandbox-passwd`, `sandbox-group`: the sandbox's `/etc/passwd` and `/etc/group`.
//!
//! A notebook directory from before `work/` existed is moved into it at the next start.

use std::path::{Path, PathBuf};

use marina_config::Id;
use serde::{Deserialize, Serialize};

use super::process::ProcId;

/// The notebook a first start creates: Marimo's file format (a Python module with
/// `@app.cell` functions), with a Spark session that reaches the notebook's own Sail server
/// through `SPARK_REMOTE`.
pub const DEFAULT_NOTEBOOK: &str = r#"import marimo

__generated_with = "0.25.2"
app = marimo.App(width="medium")


@app.cell
def _():
    import marimo as mo
    return (mo,)


@app.cell
def _():
    # SPARK_REMOTE (set by Marina) points at this notebook's own Sail server.
    from pyspark.sql import SparkSession

    spark = SparkSession.builder.getOrCreate()
    return (spark,)


if __name__ == "__main__":
    app.run()
"#;

/// Paths of one notebook.
#[derive(Clone, Debug)]
pub struct NotebookDir {
    pub root: PathBuf,
}

impl NotebookDir {
    pub fn new(notebooks_dir: &Path, id: Id) -> NotebookDir {
        NotebookDir {
            root: notebooks_dir.join(id.as_str()),
        }
    }
    /// The notebook's own directory (see the module documentation).
    pub fn work(&self) -> PathBuf {
        self.root.join("work")
    }
    pub fn notebook(&self) -> PathBuf {
        self.work().join("notebook.py")
    }
    pub fn run_file(&self) -> PathBuf {
        self.root.join("run.json")
    }
    pub fn token_file(&self) -> PathBuf {
        self.root.join("marimo-token")
    }
    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }
    pub fn sail_log(&self) -> PathBuf {
        self.logs().join("sail.log")
    }
    pub fn marimo_log(&self) -> PathBuf {
        self.logs().join("marimo.log")
    }
    /// The pinned requirements, as pip constraints for libraries and `pip install` in cells.
    pub fn constraints(&self) -> PathBuf {
        self.root.join("constraints.txt")
    }
    pub fn site(&self) -> PathBuf {
        self.root.join("site")
    }

    /// Creates the directories and, on first use, the default notebook.
    pub fn create(&self) -> std::io::Result<()> {
        std::fs::create_dir_all(self.logs())?;
        self.move_into_work()?;
        let nb = self.notebook();
        if !nb.exists() {
            std::fs::write(&nb, DEFAULT_NOTEBOOK)?;
        }
        Ok(())
    }
}

impl NotebookDir {
    /// Names at the top of a notebook directory that are Marina's, not the notebook's.
    const MARINA_FILES: &'static [&'static str] = &[
        "work",
        "logs",
        "site",
        "run.json",
        "marimo-token",
        "constraints.txt",
        "sandbox-passwd",
        "sandbox-group",
    ];

    /// Before `work/`, the notebook and its files sat at the top: they move into `work/`
    /// once, so an upgraded Marina keeps every notebook.
    fn move_into_work(&self) -> std::io::Result<()> {
        let work = self.work();
        if work.exists() {
            return Ok(());
        }
        std::fs::create_dir_all(&work)?;
        for entry in std::fs::read_dir(&self.root)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if Self::MARINA_FILES.contains(&name.as_ref()) || name.starts_with("requirements-") {
                continue;
            }
            std::fs::rename(entry.path(), work.join(entry.file_name()))?;
        }
        Ok(())
    }
}

/// One server process of a notebook.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerRecord {
    /// The server, or the outer `bwrap` of its sandbox.
    #[serde(flatten)]
    pub proc: ProcId,
    /// The port on the host.
    pub port: u16,
    /// The sandbox's network helper (`pasta`), a process group of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<ProcId>,
}

/// `run.json`: a started notebook, as a later Marina process needs to find it again.
/// (`Debug` masks the token.)
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunRecord {
    pub notebook_id: Id,
    pub session_id: Id,
    pub host: String,
    pub base_url: Option<String>,
    pub sail: ServerRecord,
    /// `None` while only Sail has been spawned.
    pub marimo: Option<ServerRecord>,
    /// Marimo's token. The file is 0600, like every other secret Marina keeps.
    pub token: String,
}

impl std::fmt::Debug for RunRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunRecord")
            .field("notebook_id", &self.notebook_id)
            .field("session_id", &self.session_id)
            .field("host", &self.host)
            .field("base_url", &self.base_url)
            .field("sail", &self.sail)
            .field("marimo", &self.marimo)
            .field("token", &"***")
            .finish()
    }
}

impl RunRecord {
    pub fn read(path: &Path) -> std::io::Result<RunRecord> {
        let text = std::fs::read_to_string(path)?;
        serde_json::from_str(&text)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        marina_config::secrets::write_private(path, &json)
    }

    /// The process groups to tear down.
    pub fn groups(&self) -> Vec<ProcId> {
        let mut g = Vec::with_capacity(4);
        for s in std::iter::once(&self.sail).chain(self.marimo.as_ref()) {
            g.push(s.proc.clone());
            g.extend(s.net.clone());
        }
        g
    }

    /// Marimo's health URL (under the base URL in path mode).
    pub fn health_url(&self) -> Option<String> {
        let m = self.marimo.as_ref()?;
        Some(format!(
            "http://{}{}/health",
            host_port(&self.host, m.port),
            self.base_url.as_deref().unwrap_or("")
        ))
    }
}

/// `host:port`, with brackets around an IPv6 host.
pub fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_notebook_image_ships_the_same_default_notebook() {
        let image_copy = include_str!("../../../deploy/notebook-image/notebook.py");
        assert_eq!(image_copy, DEFAULT_NOTEBOOK);
    }

    #[test]
    fn run_record_round_trips_privately() {
        let dir = tempfile::tempdir().unwrap();
        let id = Id::random();
        let proc = ProcId {
            pid: 42,
            start_ticks: Some(7),
            boot_id: None,
        };
        let record = RunRecord {
            notebook_id: id,
            session_id: Id::random(),
            host: "127.0.0.1".into(),
            base_url: Some(format!("/notebooks/{id}")),
            sail: ServerRecord {
                proc: proc.clone(),
                port: 1,
                net: None,
            },
            marimo: Some(ServerRecord {
                proc: proc.clone(),
                port: 2,
                net: Some(proc),
            }),
            token: "t".into(),
        };
        let path = dir.path().join("run.json");
        record.write(&path).unwrap();
        assert_eq!(RunRecord::read(&path).unwrap(), record);
        assert_eq!(
            record.health_url().unwrap(),
            format!("http://127.0.0.1:2/notebooks/{id}/health")
        );
        assert_eq!(host_port("::1", 5), "[::1]:5");
        assert_eq!(
            record.groups().len(),
            3,
            "both servers and one network helper"
        );
    }

    #[test]
    fn an_old_notebook_directory_moves_into_work() {
        let dir = tempfile::tempdir().unwrap();
        let id = Id::random();
        let nb = NotebookDir::new(dir.path(), id);
        std::fs::create_dir_all(nb.logs()).unwrap();
        std::fs::write(nb.root.join("notebook.py"), "# mine\n").unwrap();
        std::fs::create_dir_all(nb.root.join("public")).unwrap();
        std::fs::write(nb.root.join("public/a.png"), "png").unwrap();
        std::fs::write(nb.run_file(), "{}").unwrap();
        nb.create().unwrap();
        assert_eq!(std::fs::read_to_string(nb.notebook()).unwrap(), "# mine\n");
        assert!(nb.work().join("public/a.png").exists());
        assert!(
            nb.run_file().exists(),
            "Marina's files stay where they were"
        );
        assert!(!nb.work().join("run.json").exists());
        // A second create changes nothing, and a new notebook gets the default.
        nb.create().unwrap();
        assert_eq!(std::fs::read_to_string(nb.notebook()).unwrap(), "# mine\n");
        let fresh = NotebookDir::new(dir.path(), Id::random());
        fresh.create().unwrap();
        assert_eq!(
            std::fs::read_to_string(fresh.notebook()).unwrap(),
            DEFAULT_NOTEBOOK
        );
    }
}
