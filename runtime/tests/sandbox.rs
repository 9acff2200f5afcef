//! The local sandbox, attacked from a notebook's own cells, with real Marimo and Sail.
//!
//! Two notebooks run side by side in one data directory that holds what a real Marina's holds
//! (an admin key, the URL-signing key, a database file). Notebook A's code tries every way out
//! it can think of; each attempt is shown refused, and for the right reason, next to a
//! positive control that does the same to what A may touch. Needs bubblewrap and passt
//! (`scripts/test.sh` installs them).

use std::path::Path;
use std::time::Duration;

use marina_config::workload::SailConfig;
use marina_config::{Id, Settings};
use marina_runtime::local::LocalRuntime;
use marina_runtime::{Runtime, StartSpec};
use marina_testkit::marimo::{Marimo, Session};
use marina_testkit::venv;
use serde_json::Value;

fn settings(data_dir: &Path, internet: bool) -> Settings {
    let mut s = Settings {
        data_dir: data_dir.to_owned(),
        ..Settings::default()
    };
    s.runtime.local.venv_dir = Some(venv::dir());
    s.runtime.local.notebook_internet = internet;
    s.control.start_timeout_seconds = 90;
    s
}

fn spec(id: Id) -> StartSpec {
    StartSpec {
        notebook_id: id,
        session_id: Id::random(),
        sail: serde_json::from_str::<SailConfig>("{}").unwrap(),
        base_url: None,
        attempt: 1,
    }
}

/// The tests of this file run one at a time: one of them changes `PATH`.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Stops every notebook of a runtime when the test ends, however it ends.
struct StopAll<'a>(&'a LocalRuntime);

impl Drop for StopAll<'_> {
    fn drop(&mut self) {
        let rt = self.0;
        let _ = std::thread::scope(|s| {
            s.spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(rt.reconcile(&[]))
            })
            .join()
        });
    }
}

/// Runs `code` (which must print one line `RESULT <json>`) in a fresh cell and returns the
/// JSON.
async fn probe(session: &mut Session, cell: &str, code: &str) -> Value {
    let run = session.run_cell(cell, code).await.expect("cell runs");
    let line = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("no RESULT line: {run:?}"));
    serde_json::from_str(line).expect("RESULT is JSON")
}

/// Python that tries each named action and records `["ok", value]` or `["refused", error]`.
const ATTEMPT: &str = r#"
import json, os, socket, signal
r = {}
def attempt(name, f):
    try:
        r[name] = ["ok", str(f())[:300]]
    except BaseException as e:
        r[name] = ["refused", type(e).__name__ + ": " + str(e)[:300]]
def connect(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=3)
    s.close()
    return "connected"
"#;

fn outcome<'a>(r: &'a Value, name: &str) -> (&'a str, &'a str) {
    let v = &r[name];
    (
        v[0].as_str()
            .unwrap_or_else(|| panic!("{name} missing: {r}")),
        v[1].as_str().unwrap_or_default(),
    )
}

#[track_caller]
fn refused(r: &Value, name: &str, why: &str) {
    let (how, what) = outcome(r, name);
    assert!(
        how == "refused" && what.contains(why),
        "{name} must be refused with {why}: {how} {what}"
    );
}

#[track_caller]
fn allowed(r: &Value, name: &str, expect: &str) {
    let (how, what) = outcome(r, name);
    assert!(
        how == "ok" && what.contains(expect),
        "{name} must work and give {expect}: {how} {what}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notebook_code_cannot_leave_its_sandbox() {
    let _serial = SERIAL.lock().await;
    // Marina's secrets, where a real data directory has them.
    let data = tempfile::tempdir().unwrap();
    let d = data.path();
    std::fs::write(d.join("admin-api-key"), "mk_ADMINSECRET").unwrap();
    std::fs::create_dir_all(d.join("keys")).unwrap();
    std::fs::write(
        d.join("keys/url-signing.pem"),
        "-----BEGIN PRIVATE KEY-----",
    )
    .unwrap();
    std::fs::write(d.join("marina.db"), "SQLite format 3").unwrap();
    // A "control plane" listening on the host's loopback, as Marina's does, and a service
    // listening on all of the host's addresses.
    let control = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let control_port = control.local_addr().unwrap().port();
    let public = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let public_port = public.local_addr().unwrap().port();
    // The host's own address (first of `hostname -I`), when it has one besides loopback.
    let host_ip = std::process::Command::new("hostname")
        .arg("-I")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .find(|a| a.parse::<std::net::Ipv4Addr>().is_ok())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "127.0.0.2".to_owned());

    let rt = LocalRuntime::new(&settings(d, true)).unwrap();
    let _stop = StopAll(&rt);
    rt.prepare()
        .await
        .expect("this machine can sandbox notebooks");
    assert_eq!(rt.isolation(), "bubblewrap");
    let (a, b) = (Id::random(), Id::random());
    let ep_a = rt.start(&spec(a)).await.expect("start A");
    let ep_b = rt.start(&spec(b)).await.expect("start B");
    let run_b: Value = serde_json::from_str(
        &std::fs::read_to_string(d.join(format!("notebooks/{b}/run.json"))).unwrap(),
    )
    .unwrap();
    let b_sail_port = run_b["sail"]["port"].as_u64().unwrap();
    let b_marimo_pid = run_b["marimo"]["pid"].as_i64().unwrap();
    let b_marimo_port = ep_b.upstream.rsplit(':').next().unwrap().to_owned();
    std::fs::write(
        d.join(format!("notebooks/{b}/work/secret.txt")),
        "B's own data",
    )
    .unwrap();

    let marimo_a = Marimo::new(&ep_a.upstream, None, &ep_a.token);
    let mut session = marimo_a.connect("s_attack").await.expect("A's session");
    let d = d.display();
    let code = format!(
        r#"{ATTEMPT}
attempt("admin_key_relative", lambda: open("../../admin-api-key").read())
attempt("admin_key_relative_3", lambda: open("../../../admin-api-key").read())
attempt("admin_key", lambda: open("{d}/admin-api-key").read())
attempt("signing_key", lambda: open("{d}/keys/url-signing.pem").read())
attempt("database", lambda: open("{d}/marina.db").read())
attempt("other_notebook", lambda: open("{d}/notebooks/{b}/work/notebook.py").read())
attempt("other_notebook_data", lambda: open("{d}/notebooks/{b}/work/secret.txt").read())
attempt("own_run_record", lambda: open("{d}/notebooks/{a}/run.json").read())
attempt("marina_environ", lambda: open("/proc/{marina}/environ").read())
attempt("kill_other_marimo", lambda: os.kill({b_marimo_pid}, signal.SIGKILL))
attempt("other_sail", lambda: connect({b_sail_port}))
attempt("other_marimo", lambda: connect({b_marimo_port}))
attempt("control_api", lambda: connect({control_port}))
attempt("host_ip_service", lambda: socket.create_connection(("{host_ip}", {public_port}), timeout=3) and "connected")
# Positive controls: the notebook's own things.
attempt("own_notebook", lambda: open("notebook.py").read())
attempt("own_write", lambda: open("/notebook/mine.txt", "w").write("written"))
attempt("cwd", lambda: os.getcwd())
attempt("uid", lambda: os.getuid())
attempt("own_pid_signal", lambda: os.kill(os.getpid(), 0) or "signalled")
attempt("processes", lambda: sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
attempt("own_sail", lambda: spark.sql("select 40 + 2 as v").collect()[0]["v"])
attempt("data_dir_listing", lambda: os.listdir("{d}"))
attempt("root_listing", lambda: sorted(os.listdir("/")))
print("RESULT " + json.dumps(r))
"#,
        marina = std::process::id(),
    );
    session.instantiate().await.expect("instantiate");
    let r = probe(&mut session, "attack1", &code).await;
    eprintln!("sandbox probe: {r:#}");

    for name in [
        "admin_key_relative",
        "admin_key_relative_3",
        "admin_key",
        "signing_key",
        "database",
        "other_notebook",
        "other_notebook_data",
        "own_run_record",
        "marina_environ",
    ] {
        refused(&r, name, "FileNotFoundError");
    }
    // Not "permission denied": the other notebook's processes do not exist in A's world.
    refused(&r, "kill_other_marimo", "ProcessLookupError");
    // Nothing listens at B's Sail port in A's network namespace, so no Spark Connect session
    // (gRPC over that TCP connection) can reach B's Sail. Its positive control is own_sail.
    refused(&r, "other_sail", "ConnectionRefusedError");
    refused(&r, "other_marimo", "ConnectionRefusedError");
    refused(&r, "control_api", "ConnectionRefusedError");
    refused(&r, "host_ip_service", "rror");

    allowed(&r, "own_notebook", "marimo.App");
    allowed(&r, "own_write", "7");
    allowed(&r, "cwd", "/notebook");
    allowed(&r, "own_pid_signal", "signalled");
    allowed(&r, "own_sail", "42");
    let uid = outcome(&r, "uid").1;
    assert_ne!(uid, "0", "notebook code never runs as root");
    refused(&r, "data_dir_listing", "FileNotFoundError");
    allowed(&r, "root_listing", "'notebook'");
    // A sees only its own sandbox's processes: a handful, none of them B's or Marina's.
    let procs: Vec<i64> = serde_json::from_str(outcome(&r, "processes").1).unwrap();
    assert!(procs.len() < 12, "{procs:?}");
    assert!(!procs.contains(&(std::process::id() as i64)));
    // The write landed in A's directory on the host, and nowhere else.
    assert_eq!(
        std::fs::read_to_string(data.path().join(format!("notebooks/{a}/work/mine.txt"))).unwrap(),
        "written"
    );
    // Marimo's file browser (its own API) sees the notebook's directory, and nothing of the
    // host: Marina's data directory does not exist for it.
    let (status, listing) = session
        .post_json(
            "/api/files/list_files",
            serde_json::json!({"path": "/notebook"}),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{listing}");
    assert!(listing.to_string().contains("notebook.py"), "{listing}");
    let (_, host) = session
        .post_json(
            "/api/files/list_files",
            serde_json::json!({"path": data.path().join(format!("notebooks/{b}/work"))}),
        )
        .await
        .unwrap();
    assert!(!host.to_string().contains("secret.txt"), "{host}");

    // B is untouched by all of this.
    let marimo_b = Marimo::new(&ep_b.upstream, None, &ep_b.token);
    assert_eq!(marimo_b.get("/api/version", true).await.status(), 200);
    // Positive control for the two listeners: reachable from outside a sandbox.
    assert!(std::net::TcpStream::connect(("127.0.0.1", control_port)).is_ok());
    assert!(std::net::TcpStream::connect(("127.0.0.1", public_port)).is_ok());
    drop((control, public));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pip_works_from_a_cell_and_internet_is_a_setting() {
    let _serial = SERIAL.lock().await;
    for internet in [true, false] {
        let data = tempfile::tempdir().unwrap();
        let rt = LocalRuntime::new(&settings(data.path(), internet)).unwrap();
        let _stop = StopAll(&rt);
        let id = Id::random();
        let ep = rt.start(&spec(id)).await.expect("start");
        let marimo = Marimo::new(&ep.upstream, None, &ep.token);
        let mut session = marimo.connect("s_pip001").await.expect("session");
        let code = format!(
            r#"{ATTEMPT}
import subprocess, sys, importlib
def pip():
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", "iniconfig"], capture_output=True, text=True, timeout=240)
    if p.returncode != 0:
        raise RuntimeError("pip: " + p.stderr[-200:])
    importlib.invalidate_caches()
    import iniconfig
    return iniconfig.__file__
attempt("pypi", lambda: socket.create_connection(("pypi.org", 443), timeout=10) and "reached")
attempt("pip", pip)
attempt("venv_write", lambda: open(sys.prefix + "/marina-was-here", "w"))
print("RESULT " + json.dumps(r))
"#
        );
        let r = probe(&mut session, "pip1", &code).await;
        eprintln!("internet={internet}: {r:#}");
        // The shared environment is read-only either way.
        refused(&r, "venv_write", "OSError");
        if internet {
            allowed(&r, "pypi", "reached");
            allowed(&r, "pip", "/notebook/.packages/iniconfig");
            assert!(data
                .path()
                .join(format!("notebooks/{id}/work/.packages/iniconfig"))
                .is_dir());
        } else {
            refused(&r, "pypi", "rror");
            refused(&r, "pip", "pip");
        }
        drop(session);
        rt.stop(id).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_tools_notebooks_refuse_to_start() {
    let _serial = SERIAL.lock().await;
    let data = tempfile::tempdir().unwrap();
    let rt = LocalRuntime::new(&settings(data.path(), true)).unwrap();
    let saved = std::env::var_os("PATH");
    // A machine without bubblewrap and passt on the PATH (and no apt-get to install them).
    std::env::set_var("PATH", data.path());
    let err = rt.prepare().await;
    let started = rt.start(&spec(Id::random())).await;
    std::env::set_var("PATH", saved.unwrap_or_default());
    let err = err
        .expect_err("prepare says the sandbox cannot be made")
        .to_string();
    assert!(
        err.contains("`bwrap` is not installed")
            && err.contains("runtime.local.sandbox = \"none\""),
        "{err}"
    );
    let started = started
        .expect_err("no notebook starts unsandboxed by accident")
        .to_string();
    assert!(started.contains("cannot be sandboxed"), "{started}");
    assert!(!data.path().join("notebooks").exists(), "nothing was made");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_opt_out_runs_unsandboxed_and_says_so() {
    let _serial = SERIAL.lock().await;
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("admin-api-key"), "mk_ADMINSECRET").unwrap();
    let mut s = settings(data.path(), true);
    s.runtime.local.sandbox = marina_config::settings::SandboxKind::None;
    let rt = LocalRuntime::new(&s).unwrap();
    let _stop = StopAll(&rt);
    rt.prepare().await.unwrap();
    assert_eq!(rt.isolation(), "none");
    let id = Id::random();
    let ep = rt.start(&spec(id)).await.expect("start unsandboxed");
    let marimo = Marimo::new(&ep.upstream, None, &ep.token);
    let mut session = marimo.connect("s_nosbx1").await.expect("session");
    session.instantiate().await.expect("instantiate");
    let code = format!(
        r#"{ATTEMPT}
attempt("admin_key_relative", lambda: open("../../../admin-api-key").read())
attempt("own_sail", lambda: spark.sql("select 40 + 2 as v").collect()[0]["v"])
print("RESULT " + json.dumps(r))
"#
    );
    let r = probe(&mut session, "nosbx1", &code).await;
    // What the opt-out gives up, shown: Marina's files are in reach (`work/` is one level
    // deeper than the notebook directory).
    allowed(&r, "admin_key_relative", "mk_ADMINSECRET");
    allowed(&r, "own_sail", "42");
    drop(session);
    rt.stop(id).await.unwrap();
}
