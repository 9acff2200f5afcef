//! The local runtime against real Sail and Marimo processes from the pinned environment.
//!
//! The environment is the shared test virtualenv: `NOTEBOOK_VENV`, else `<workspace>/.venv`
//! (made by `scripts/setup-python.sh`). Each test uses its own data directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use marina_config::workload::{EnvValue, SailConfig};
use marina_config::{Id, Settings};
use marina_runtime::local::LocalRuntime;
use marina_runtime::{Expected, Health, Runtime, RuntimeError, StartSpec};
use marina_testkit::marimo::Marimo;
use marina_testkit::venv;

fn settings(data_dir: &Path) -> Settings {
    let mut s = Settings {
        data_dir: data_dir.to_owned(),
        ..Settings::default()
    };
    s.runtime.local.venv_dir = Some(venv::dir());
    s.control.start_timeout_seconds = 90;
    s
}

fn sail_config(json: &str) -> SailConfig {
    serde_json::from_str(json).expect("sail config")
}

fn spec(id: Id, base_url: Option<String>) -> StartSpec {
    StartSpec {
        notebook_id: id,
        session_id: Id::random(),
        sail: sail_config("{}"),
        base_url,
        attempt: 1,
    }
}

/// Non-zombie processes of a notebook: those whose command line mentions `dir` or whose
/// working directory is in it (unsandboxed: Marimo's kernels are `python -c ...` children
/// running from the notebook directory), and every process in the PID namespaces of its
/// sandboxes (sandboxed processes see the notebook at `/notebook`, so only their namespace
/// names them). The namespaces are read from the notebook's `run.json` while it runs and
/// remembered, so a check after the stop still looks in them.
fn processes_under(dir: &Path) -> Vec<(i32, String)> {
    let namespaces = sandbox_namespaces(dir);
    let needle = dir.to_string_lossy().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .unwrap_or("Z");
        if state == "Z" || state == "X" {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd"))
            .map(|p| p.to_string_lossy().to_string())
            .unwrap_or_default();
        let pid_ns = std::fs::read_link(format!("/proc/{pid}/ns/pid"))
            .map(|p| p.to_string_lossy().to_string())
            .unwrap_or_default();
        if cmdline.contains(&needle) || cwd.starts_with(&needle) || namespaces.contains(&pid_ns) {
            found.push((pid, cmdline));
        }
    }
    found
}

/// The PID namespaces of a notebook's sandboxes (the namespaces of the children of the
/// recorded outer `bwrap` processes), remembered per directory across calls.
fn sandbox_namespaces(dir: &Path) -> Vec<String> {
    use std::collections::HashMap;
    use std::sync::Mutex;
    static SEEN: Mutex<Option<HashMap<PathBuf, Vec<String>>>> = Mutex::new(None);
    let mut seen = SEEN.lock().unwrap();
    let known = seen
        .get_or_insert_with(HashMap::new)
        .entry(dir.to_owned())
        .or_default();
    let run: serde_json::Value = std::fs::read_to_string(dir.join("run.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let own = std::fs::read_link("/proc/self/ns/pid").unwrap_or_default();
    for server in ["sail", "marimo"] {
        let Some(pid) = run[server]["pid"].as_i64() else {
            continue;
        };
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        for child in children.split_whitespace() {
            if let Ok(ns) = std::fs::read_link(format!("/proc/{child}/ns/pid")) {
                let ns = ns.to_string_lossy().to_string();
                if ns != own.to_string_lossy() && !known.contains(&ns) {
                    known.push(ns);
                }
            }
        }
    }
    known.clone()
}

/// Kills a test's notebooks when the test panics before stopping them: they run in their own
/// process groups, so a failed test would otherwise leave them running.
struct KillOnPanic(PathBuf);

impl Drop for KillOnPanic {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let Ok(dirs) = std::fs::read_dir(self.0.join("notebooks")) else {
            return;
        };
        for dir in dirs.flatten() {
            let Ok(text) = std::fs::read_to_string(dir.path().join("run.json")) else {
                continue;
            };
            let run: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            for server in ["sail", "marimo"] {
                if let Some(pid) = run[server]["pid"].as_i64() {
                    let _ = std::process::Command::new("kill")
                        .args(["-KILL", "--", &format!("-{pid}")])
                        .status();
                }
            }
        }
    }
}

async fn wait_until_gone(dir: &Path) -> Vec<(i32, String)> {
    // `stop` returns once the groups are gone; this only absorbs /proc update lag.
    for _ in 0..20 {
        let left = processes_under(dir);
        if left.is_empty() {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    processes_under(dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notebook_runs_spark_through_marimo_and_stops_cleanly() {
    // A settings variable, as `marina serve` may have; it must not reach notebook code.
    std::env::set_var("MARINA_INTERNAL__TOKEN", "not-for-notebooks");
    let data = tempfile::tempdir().unwrap();
    let _kill_on_panic = KillOnPanic(data.path().to_owned());
    let rt = LocalRuntime::new(&settings(data.path())).unwrap();
    rt.prepare()
        .await
        .expect("the test venv is ready, so prepare is instant");
    let id = Id::random();
    let base = format!("/notebooks/{id}");
    let nb_dir = rt.notebook_dir(id);

    let mut timings = Vec::new();
    let mut stop_timings = Vec::new();
    for round in 0..3 {
        let mut spec = spec(id, Some(base.clone()));
        spec.sail.extra_env = BTreeMap::from([(
            "NOTEBOOK_GREETING".to_owned(),
            EnvValue {
                kind: "string".into(),
                value: "hello from extraEnv".into(),
            },
        )]);
        let t = Instant::now();
        let endpoint = rt.start(&spec).await.expect("start");
        timings.push(t.elapsed());
        assert_eq!(rt.health(id).await.unwrap(), Health::Healthy);
        assert_eq!(endpoint.token.len(), 64, "32 random bytes, hex");
        let marimo = Marimo::new(&endpoint.upstream, Some(&base), &endpoint.token);

        // The token protects everything but /health.
        assert_eq!(marimo.get("/api/version", true).await.status(), 200);
        assert_eq!(marimo.get("/api/version", false).await.status(), 401);
        assert_eq!(marimo.get("/health", false).await.status(), 200);

        if round == 0 {
            // A cell runs Spark SQL on the notebook's own Sail server.
            let mut session = marimo.connect("s_abc123").await.expect("session");
            let codes = session.kernel_ready["codes"].to_string();
            assert!(
                codes.contains("SparkSession.builder.getOrCreate()"),
                "{codes}"
            );
            session.instantiate().await.expect("instantiate");
            let run = session
                .run_cell(
                    "probe1",
                    "print('RESULT', spark.sql('select 41 + 1 as answer').collect()[0]['answer'])",
                )
                .await
                .expect("run cell");
            assert!(run.stdout.contains("RESULT 42"), "{run:?}");

            // The kernel sees extraEnv and SPARK_REMOTE, and none of Marina's settings
            // variables (the test process has one, as a Marina process would).
            let run = session
                .run_cell(
                    "probe2",
                    "import os\nprint(os.environ.get('NOTEBOOK_GREETING'), os.environ.get('SPARK_REMOTE', '').startswith('sc://127.0.0.1:'), sorted(k for k in os.environ if k.startswith('MARINA_')))",
                )
                .await
                .expect("run cell");
            assert_eq!(run.stdout.trim(), "hello from extraEnv True []", "{run:?}");

            // A kernel process now exists, so the check below is meaningful.
            let before = processes_under(&nb_dir);
            assert!(before.len() >= 3, "sail, marimo and a kernel: {before:?}");
            assert!(
                !sandbox_namespaces(&nb_dir).is_empty(),
                "the notebook runs in PID namespaces of its own"
            );

            // Secrets: run.json is private; no log holds the token.
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(nb_dir.join("run.json"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
            for log in ["sail.log", "marimo.log"] {
                let text = std::fs::read_to_string(nb_dir.join("logs").join(log)).unwrap();
                assert!(!text.contains(&endpoint.token), "{log} leaks the token");
            }
            // The notebook is edited, and must survive the stop.
            let mut nb = std::fs::read_to_string(nb_dir.join("work/notebook.py")).unwrap();
            nb.push_str("\n# kept across restarts\n");
            std::fs::write(nb_dir.join("work/notebook.py"), nb).unwrap();
        }

        let t = Instant::now();
        rt.stop(id).await.unwrap();
        let stop_time = t.elapsed();
        stop_timings.push(stop_time);
        let left = wait_until_gone(&nb_dir).await;
        assert!(left.is_empty(), "processes left after stop: {left:?}");
        assert!(
            stop_time < Duration::from_secs(5),
            "stop took {stop_time:?}"
        );
        assert_eq!(rt.health(id).await.unwrap(), Health::Missing);
        assert!(!nb_dir.join("run.json").exists());
        assert!(std::fs::read_to_string(nb_dir.join("work/notebook.py"))
            .unwrap()
            .contains("# kept across restarts"));
        // Stopping again is not an error.
        rt.stop(id).await.unwrap();
    }
    eprintln!("local notebook start→healthy: {timings:?}");
    eprintln!("local notebook stop (processes gone): {stop_timings:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_start_reports_the_log_tail_and_leaves_nothing() {
    let data = tempfile::tempdir().unwrap();
    let _kill_on_panic = KillOnPanic(data.path().to_owned());
    let rt = LocalRuntime::new(&settings(data.path())).unwrap();
    let id = Id::random();
    let mut spec = spec(id, None);
    // A real Sail failure: it rejects an unknown mode at start-up.
    spec.sail.extra_env = BTreeMap::from([(
        "SAIL_MODE".to_owned(),
        EnvValue {
            kind: "string".into(),
            value: "bogus".into(),
        },
    )]);
    // A log left large by earlier runs is rotated, not appended to forever.
    let logs = rt.notebook_dir(id).join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    std::fs::write(logs.join("sail.log"), vec![b'x'; 11 * 1024 * 1024]).unwrap();
    let err = rt
        .start(&spec)
        .await
        .expect_err("Sail must refuse to start");
    assert!(std::fs::metadata(logs.join("sail.log.1")).unwrap().len() > 10 * 1024 * 1024);
    assert!(std::fs::metadata(logs.join("sail.log")).unwrap().len() < 64 * 1024);
    let RuntimeError::StartFailed(msg) = err else {
        panic!("expected StartFailed, got {err:?}");
    };
    assert!(msg.contains("Sail server exited"), "{msg}");
    assert!(
        msg.contains("bogus"),
        "the log tail names the bad value: {msg}"
    );
    let nb_dir = rt.notebook_dir(id);
    assert!(wait_until_gone(&nb_dir).await.is_empty());
    assert!(!nb_dir.join("run.json").exists());
    assert_eq!(rt.health(id).await.unwrap(), Health::Missing);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_adopts_expected_and_kills_the_rest() {
    let data = tempfile::tempdir().unwrap();
    let _kill_on_panic = KillOnPanic(data.path().to_owned());
    let s = settings(data.path());
    let (a, b) = (Id::random(), Id::random());
    let (spec_a, spec_b) = (spec(a, None), spec(b, None));
    let first = LocalRuntime::new(&s).unwrap();
    let endpoint_a = first.start(&spec_a).await.unwrap();
    first.start(&spec_b).await.unwrap();

    // A second runtime over the same data directory plays a restarted Marina: the processes
    // are not its children, it only has the run records.
    let second = LocalRuntime::new(&s).unwrap();
    let expected = [Expected {
        notebook_id: a,
        session_id: spec_a.session_id,
        endpoint: Some(endpoint_a.clone()),
    }];
    let adopted = second.reconcile(&expected).await.unwrap();
    assert_eq!(adopted, vec![a]);
    assert!(
        wait_until_gone(&second.notebook_dir(b)).await.is_empty(),
        "b was not expected"
    );
    assert_eq!(second.health(b).await.unwrap(), Health::Missing);
    assert_eq!(second.health(a).await.unwrap(), Health::Healthy);
    let marimo = Marimo::new(&endpoint_a.upstream, None, &endpoint_a.token);
    assert_eq!(marimo.get("/api/version", true).await.status(), 200);

    // The store now expects another session of `a`: this one is stale and goes.
    let stale = [Expected {
        notebook_id: a,
        session_id: Id::random(),
        endpoint: None,
    }];
    assert!(second.reconcile(&stale).await.unwrap().is_empty());
    assert!(wait_until_gone(&second.notebook_dir(a)).await.is_empty());
    // The first runtime's view: its child exited, so health says so.
    first.stop(a).await.unwrap();
    first.stop(b).await.unwrap();
}

#[tokio::test]
async fn bad_input_is_refused_before_anything_runs() {
    let data = tempfile::tempdir().unwrap();
    let _kill_on_panic = KillOnPanic(data.path().to_owned());
    let rt = LocalRuntime::new(&settings(data.path())).unwrap();
    let id = Id::random();
    let mut k8s = spec(id, None);
    k8s.sail.execution_mode = "kubernetes-cluster".into();
    let err = rt.start(&k8s).await.unwrap_err().to_string();
    assert!(err.contains("Kubernetes runtime"), "{err}");
    let err = rt
        .start(&spec(id, Some("no-slash".into())))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("base URL"), "{err}");
    assert!(!rt.notebook_dir(id).join("run.json").exists());

    let mut s = settings(data.path());
    s.runtime.local.bind_host = "localhost name".into();
    assert!(matches!(
        LocalRuntime::new(&s),
        Err(RuntimeError::Environment(_))
    ));
}

#[tokio::test]
async fn prepare_without_python_is_a_clear_error() {
    let data = tempfile::tempdir().unwrap();
    let _kill_on_panic = KillOnPanic(data.path().to_owned());
    let mut s = settings(data.path());
    s.runtime.local.venv_dir = Some(data.path().join("venv"));
    s.runtime.local.python = data.path().join("no-such-python").display().to_string();
    let rt = LocalRuntime::new(&s).unwrap();
    let t = Instant::now();
    let err = rt.prepare().await.unwrap_err();
    assert!(matches!(err, RuntimeError::Environment(_)), "{err:?}");
    assert!(err.to_string().contains("install Python 3.10+"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_server_makes_health_failed_with_its_exit() {
    let data = tempfile::tempdir().unwrap();
    let _kill_on_panic = KillOnPanic(data.path().to_owned());
    let rt = LocalRuntime::new(&settings(data.path())).unwrap();
    let id = Id::random();
    let spec = spec(id, None);
    rt.start(&spec).await.unwrap();
    let run: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(rt.notebook_dir(id).join("run.json")).unwrap(),
    )
    .unwrap();
    let pid = run["marimo"]["pid"].as_i64().unwrap();
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let mut health = rt.health(id).await.unwrap();
    for _ in 0..40 {
        if matches!(health, Health::Failed(_)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        health = rt.health(id).await.unwrap();
    }
    let Health::Failed(why) = health else {
        panic!("expected Failed, got {health:?}");
    };
    assert!(why.contains("Marimo server exited"), "{why}");
    assert!(why.contains("signal: 9"), "{why}");
    // Expected by the store, but dead: reconciliation cleans it up instead of adopting it.
    let expected = [Expected {
        notebook_id: id,
        session_id: spec.session_id,
        endpoint: None,
    }];
    assert!(rt.reconcile(&expected).await.unwrap().is_empty());
    assert!(
        wait_until_gone(&rt.notebook_dir(id)).await.is_empty(),
        "Sail was stopped too"
    );
    assert!(!rt.notebook_dir(id).join("run.json").exists());
    assert_eq!(rt.health(id).await.unwrap(), Health::Missing);
}

/// Builds a tiny pure-Python wheel with the environment's own Python (no network needed).
fn probe_wheel(dir: &Path) -> PathBuf {
    let wheel = dir.join("marina_probe-0.1-py3-none-any.whl");
    let script = r#"
import sys, zipfile
with zipfile.ZipFile(sys.argv[1], "w") as z:
    z.writestr("marina_probe/__init__.py", "VALUE = 'overlay works'\n")
    z.writestr("marina_probe-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: marina-probe\nVersion: 0.1\n")
    z.writestr("marina_probe-0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: marina-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    z.writestr("marina_probe-0.1.dist-info/RECORD", "")
"#;
    let ok = std::process::Command::new(venv::dir().join("bin/python"))
        .args(["-c", script])
        .arg(&wheel)
        .status()
        .unwrap();
    assert!(ok.success());
    wheel
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libraries_are_installed_into_the_notebook_overlay() {
    let data = tempfile::tempdir().unwrap();
    let _kill_on_panic = KillOnPanic(data.path().to_owned());
    let rt = LocalRuntime::new(&settings(data.path())).unwrap();
    let id = Id::random();
    // Outside the data directory: files in it are refused as library sources.
    let wheels = tempfile::tempdir().unwrap();
    let wheel = probe_wheel(wheels.path());
    let mut spec = spec(id, None);
    spec.sail = sail_config(&format!(
        r#"{{"libraries": [{{"whl": "{}"}}]}}"#,
        wheel.display()
    ));
    let endpoint = rt.start(&spec).await.expect("start with a library");
    let marimo = Marimo::new(&endpoint.upstream, None, &endpoint.token);
    let mut session = marimo.connect("s_lib001").await.unwrap();
    let run = session
        .run_cell("probe1", "import marina_probe\nprint(marina_probe.VALUE)")
        .await
        .unwrap();
    assert_eq!(run.stdout.trim(), "overlay works", "{run:?}");
    drop(session);
    rt.stop(id).await.unwrap();
    // The shared environment is untouched: the library is only in this notebook's overlay.
    let in_venv = std::process::Command::new(venv::dir().join("bin/python"))
        .args(["-c", "import marina_probe"])
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!in_venv.success());

    // A library that cannot be installed fails the start with pip's reason.
    let mut bad = self::spec(id, None);
    bad.sail =
        sail_config(r#"{"libraries": [{"whl": "/nonexistent/nothing-1.0-py3-none-any.whl"}]}"#);
    let err = rt.start(&bad).await.unwrap_err();
    let RuntimeError::StartFailed(msg) = &err else {
        panic!("expected StartFailed, got {err:?}");
    };
    assert!(msg.contains("libraries[0]"), "{msg}");
    assert!(msg.contains("nothing-1.0"), "{msg}");

    // Nothing reaches pip as an option.
    let mut bad = self::spec(id, None);
    bad.sail =
        sail_config(r#"{"libraries": [{"pypi": {"package": "six"}}, {"whl": "--target=/tmp/x"}]}"#);
    let err = rt.start(&bad).await.unwrap_err().to_string();
    assert!(
        err.contains("libraries[1]") && err.contains("must not start with -"),
        "{err}"
    );
    bad.sail = sail_config(r#"{"libraries": [{}]}"#);
    let err = rt.start(&bad).await.unwrap_err().to_string();
    assert!(err.contains("exactly one of"), "{err}");
    // Validation comes before any install: the valid entry before the bad one was not fetched.
    assert!(!rt.notebook_dir(id).join("site/six.py").exists());

    // A "wheel" or requirements file inside Marina's data directory is refused: pip would
    // quote a key file's lines in its error.
    std::fs::write(data.path().join("admin-api-key"), "mk_SECRET").unwrap();
    let mut bad = self::spec(id, None);
    bad.sail = sail_config(&format!(
        r#"{{"libraries": [{{"requirements": {{"source": "file", "uri": "{}"}}}}]}}"#,
        data.path().join("admin-api-key").display()
    ));
    let err = rt.start(&bad).await.unwrap_err().to_string();
    assert!(
        err.contains("libraries[0]")
            && err.contains("data directory")
            && !err.contains("mk_SECRET"),
        "{err}"
    );
}

/// Creates the notebook environment from nothing, as a first `marina serve` does: downloads
/// about 300 MB from PyPI and takes a minute or more, so it only runs on request:
/// `cargo test -p marina-runtime --test local -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "downloads the notebook packages from PyPI (about 800 MB installed)"]
async fn prepare_creates_the_environment_from_scratch() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_max_level(tracing::Level::INFO)
        .try_init();
    let data = tempfile::tempdir().unwrap();
    let _kill_on_panic = KillOnPanic(data.path().to_owned());
    let mut s = settings(data.path());
    s.runtime.local.venv_dir = None; // DATA_DIR/venv
    let rt = LocalRuntime::new(&s).unwrap();
    let t = Instant::now();
    // Two concurrent callers share one install.
    let (a, b) = tokio::join!(rt.prepare(), rt.prepare());
    a.expect("prepare");
    b.expect("concurrent prepare");
    eprintln!("environment created in {:?}", t.elapsed());
    let venv = data.path().join("venv");
    assert_eq!(
        std::fs::read_to_string(venv.join(".marina-requirements")).unwrap(),
        include_str!("../python-requirements.txt")
    );
    let t = Instant::now();
    rt.prepare().await.unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(100),
        "later calls are instant"
    );
    // And a notebook runs from it.
    let id = Id::random();
    rt.start(&spec(id, None))
        .await
        .expect("start from the new environment");
    rt.stop(id).await.unwrap();
}
