//! The sandbox of a local notebook: what notebook code can see, signal and reach.
//!
//! Notebook code is untrusted: a cell can run anything Python can. Each server of a notebook
//! (Sail, Marimo with its kernels, a `pip install` of its libraries) therefore runs inside
//! its own sandbox, made from two well-kept tools rather than a home-made container runtime:
//!
//! - **`bwrap`** (bubblewrap) makes new mount, PID, IPC, UTS and cgroup namespaces. The
//!   sandbox's filesystem is built from nothing: the system's `/usr` and a few files of
//!   `/etc`, the Python environment (read-only), the notebook's own directory at the neutral
//!   path `/notebook` (the only writable place that persists), a private `/tmp` and
//!   `/dev/shm`, and a synthetic `/etc/passwd`. Marina's data directory, database, keys and
//!   the other notebooks do not exist in it. In a new PID namespace the sandbox sees only its
//!   own processes, so it can neither signal nor trace anything outside, and `/proc` shows
//!   only them. The PID namespace makes teardown total: a stop signals the sandbox's process
//!   group, which holds the sandbox's first process, and when that one dies the kernel kills
//!   every process inside, also those that left the group (a terminal's shell).
//! - **`pasta`** (from passt) gives the sandbox's new network namespace its connectivity, the
//!   way rootless containers get theirs: the host's loopback is *not* mapped into the
//!   namespace (`--no-map-gw`, `-T none`), so the control API, the edge and every other
//!   notebook's servers are out of reach; the one server port is forwarded in from the host's
//!   loopback (`-t`), and a Marimo sandbox gets exactly one port forwarded out, to its own
//!   Sail (`-T 50051:<host port>`). Outbound internet access is `--config-net` (a tap device
//!   with the host's addresses and routes), left out when `runtime.local.notebook_internet`
//!   is false.
//!
//! Who runs inside, and in which order the two are started:
//! - An unprivileged Marina runs `setsid pasta … -- bwrap … -- server`: pasta makes a user
//!   and network namespace (as podman does) and bwrap, inside it, maps Marina's user to the
//!   unprivileged uid 1000 in a user namespace of its own (`--unshare-user --disable-userns`).
//! - A Marina running as root runs `setsid bwrap --unshare-net … -- setpriv … server`, then
//!   `pasta --netns /proc/<sandbox>/ns/net`: bwrap builds the sandbox as root and the servers
//!   run as `runtime.local.sandbox_user` (`setpriv`: all capabilities gone, `no_new_privs`);
//!   pasta runs as root too, since an unprivileged one may not open a root-owned sandbox's
//!   namespaces, and it isolates itself.
//!
//! Either way the sandbox has no controlling terminal (`setsid`), so it cannot push keystrokes
//! into the terminal Marina was started from.
//!
//! [`Sandbox::detect`] checks at start-up that all of this can be made on this machine, and
//! says why not when it cannot.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::Command;

/// Where a sandbox sees things. The notebook's directory is the only persistent writable one.
pub const NOTEBOOK_DIR: &str = "/notebook";
/// Read-only files Marina hands to the servers (Marimo's token, pip constraints).
pub const RUN_DIR: &str = "/run/marina";
/// The notebook's libraries (`config.sail.libraries`), read-only except while installing.
pub const LIBRARIES_DIR: &str = "/opt/marina/libraries";
/// The port Sail listens on inside its sandbox, and that a Marimo sandbox's kernels reach it
/// at (`SPARK_REMOTE=sc://127.0.0.1:50051`), forwarded to the Sail sandbox's host port.
pub const SAIL_PORT: u16 = 50051;
/// The port Marimo listens on inside its sandbox.
pub const MARIMO_PORT: u16 = 2718;
/// The uid and gid notebook code has inside a sandbox built by an unprivileged Marina.
const INNER_ID: u32 = 1000;

/// Files of `/etc` a Python program needs (name resolution, TLS roots, time zone, the dynamic
/// linker's cache, pip's own configuration); nothing else of `/etc` is visible. Missing ones
/// are skipped.
const ETC_FILES: &[&str] = &[
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/host.conf",
    "/etc/nsswitch.conf",
    "/etc/gai.conf",
    "/etc/services",
    "/etc/protocols",
    "/etc/localtime",
    "/etc/timezone",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/pki",
    "/etc/alternatives",
    "/etc/mime.types",
    "/etc/pip.conf",
    "/etc/os-release",
    "/etc/debian_version",
];

/// Variables of Marina's own environment that notebook processes inherit; every other one
/// (Marina's settings, which may hold secrets, and whatever the operator's shell had) stays
/// out.
const INHERITED_ENV: &[&str] = &[
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "PIP_INDEX_URL",
    "PIP_EXTRA_INDEX_URL",
    "PIP_TRUSTED_HOST",
    "PIP_CERT",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
];

/// Why a sandbox cannot be made here.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

/// How sandboxes are made on this machine. See the module documentation.
#[derive(Clone, Debug)]
pub struct Sandbox {
    bwrap: PathBuf,
    pasta: PathBuf,
    setsid: PathBuf,
    /// `Some` when Marina runs as root: whom the servers run as.
    setpriv: Option<(PathBuf, u32, u32)>,
    internet: bool,
    /// Read-only mounts every sandbox gets: the Python environment and the interpreter it was
    /// made from.
    python: Vec<PathBuf>,
}

/// A mount: `(host path, sandbox path, writable)`.
pub type Mount = (PathBuf, PathBuf, bool);

/// One sandboxed program.
#[derive(Debug)]
pub struct Spec<'a> {
    /// The notebook's directory on the host, mounted at [`NOTEBOOK_DIR`].
    pub notebook: &'a Path,
    pub mounts: Vec<Mount>,
    /// The synthetic `/etc/passwd` and `/etc/group` are written next to this directory's
    /// other Marina files (outside the notebook's view).
    pub private_dir: &'a Path,
    pub env: &'a [(String, String)],
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// What the network helper connects.
    pub ports: Ports,
}

/// Ports that the network helper connects.
#[derive(Clone, Debug, Default)]
pub struct Ports {
    /// `(host address, host port, sandbox port)`: accepted on the host, delivered inside.
    pub inbound: Option<(String, u16, u16)>,
    /// `(sandbox port, host port)`: accepted inside on loopback, delivered to the host's
    /// loopback.
    pub outbound: Option<(u16, u16)>,
}

impl Sandbox {
    /// Finds the tools and checks that a sandbox can be made here, by making one.
    pub async fn detect(
        venv: &Path,
        internet: bool,
        sandbox_user: (u32, u32),
    ) -> Result<Sandbox, Unavailable> {
        install_tools_if_root().await;
        let find = |name: &str, package: &str| {
            which(name).ok_or_else(|| {
                Unavailable(format!(
                    "`{name}` is not installed (Debian package `{package}`)"
                ))
            })
        };
        let bwrap = find("bwrap", "bubblewrap")?;
        let pasta = find("pasta", "passt")?;
        let setsid = find("setsid", "util-linux")?;
        let root = nix::unistd::geteuid().is_root();
        let setpriv = if root {
            let (uid, gid) = sandbox_user;
            Some((find("setpriv", "util-linux")?, uid, gid))
        } else {
            None
        };
        if !root {
            // pasta opens /dev/net/tun as Marina's user (inside the sandbox's user
            // namespace the device's owner check is the same).
            if let Err(e) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")
            {
                return Err(Unavailable(format!(
                    "pasta cannot open /dev/net/tun as this user ({e}); most distributions \
                     make it mode 0666"
                )));
            }
        }
        let sandbox = Sandbox {
            bwrap,
            pasta,
            setsid,
            setpriv,
            internet,
            python: python_mounts(venv),
        };
        sandbox.probe().await?;
        Ok(sandbox)
    }

    /// Makes a sandbox with every namespace and the network a notebook gets, running `sleep`,
    /// and checks that it (and its network helper) are still up a moment later.
    async fn probe(&self) -> Result<(), Unavailable> {
        use std::process::Stdio;
        let dir = std::env::temp_dir().join(format!("marina-sandbox-probe-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let spec = Spec {
            notebook: &dir,
            mounts: Vec::new(),
            private_dir: &dir,
            env: &[],
            program: PathBuf::from("/bin/sleep"),
            args: vec!["10".into()],
            ports: Ports::default(),
        };
        let result = async {
            let mut cmd = self
                .command(&spec)
                .map_err(|e| Unavailable(format!("preparing the probe sandbox: {e}")))?;
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .kill_on_drop(true);
            let mut child = cmd
                .spawn()
                .map_err(|e| Unavailable(format!("cannot run bwrap: {e}")))?;
            let pid = child.id().unwrap_or(0);
            let mut net = match self.network(pid, &spec.ports).await {
                Ok(Some(mut net)) => Some(
                    net.stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::piped())
                        .kill_on_drop(true)
                        .spawn()
                        .map_err(|e| Unavailable(format!("cannot run pasta: {e}")))?,
                ),
                Ok(None) => None,
                Err(e) => return Err(Unavailable(format!("the probe sandbox: {e}"))),
            };
            // Long enough for either tool to fail on its own (both do in milliseconds).
            tokio::time::sleep(Duration::from_millis(300)).await;
            for (what, c) in
                std::iter::once(("bwrap", &mut child)).chain(net.as_mut().map(|n| ("pasta", n)))
            {
                if let Ok(Some(status)) = c.try_wait() {
                    let mut err = String::new();
                    if let Some(mut e) = c.stderr.take() {
                        use tokio::io::AsyncReadExt;
                        let _ = e.read_to_string(&mut err).await;
                    }
                    let err: String = err
                        .lines()
                        .filter(|l| !l.contains("syslog"))
                        .collect::<Vec<_>>()
                        .join("; ");
                    return Err(Unavailable(format!(
                        "{what} cannot make a sandbox here ({status}): {}",
                        err.trim()
                    )));
                }
            }
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            Ok(())
        }
        .await;
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    /// Whether sandboxed servers run as a dedicated user (Marina runs as root).
    pub fn run_as(&self) -> Option<(u32, u32)> {
        self.setpriv.as_ref().map(|(_, u, g)| (*u, *g))
    }

    /// The uid notebook code has inside the sandbox.
    fn inner_ids(&self) -> (u32, u32) {
        self.run_as().unwrap_or((INNER_ID, INNER_ID))
    }

    /// The `bwrap` command for `spec` (run through `setsid`). Writes the synthetic passwd
    /// and group files into `spec.private_dir`.
    pub fn command(&self, spec: &Spec<'_>) -> std::io::Result<Command> {
        let (uid, gid) = self.inner_ids();
        let passwd = spec.private_dir.join("sandbox-passwd");
        let group = spec.private_dir.join("sandbox-group");
        std::fs::write(
            &passwd,
            format!(
                "root:x:0:0:root:/root:/usr/sbin/nologin\n\
                 notebook:x:{uid}:{gid}:Notebook:/tmp:/bin/bash\n\
                 nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
            ),
        )?;
        std::fs::write(
            &group,
            format!("root:x:0:\nnotebook:x:{gid}:\nnogroup:x:65534:\n"),
        )?;

        let mut a: Vec<OsString> = Vec::with_capacity(96);
        let mut push = |items: &[&OsStr]| a.extend(items.iter().map(|s| s.to_os_string()));
        push(&[
            // Not --die-with-parent: a notebook outlives a crashed Marina, to be adopted.
            "--unshare-pid".as_ref(),
            "--unshare-ipc".as_ref(),
            "--unshare-uts".as_ref(),
            "--unshare-cgroup-try".as_ref(),
            "--hostname".as_ref(),
            "notebook".as_ref(),
        ]);
        if self.setpriv.is_some() {
            // Root: bwrap makes the network namespace and pasta joins it afterwards
            // (`network`). Unprivileged: pasta makes it, with a user namespace, and runs
            // bwrap inside (bwrap would make its network namespace in an intermediate user
            // namespace that pasta could not join).
            push(&["--unshare-net".as_ref()]);
        }
        if self.setpriv.is_none() {
            push(&[
                "--unshare-user".as_ref(),
                "--disable-userns".as_ref(),
                "--uid".as_ref(),
                uid.to_string().as_ref(),
                "--gid".as_ref(),
                gid.to_string().as_ref(),
            ]);
        } else {
            // setpriv needs these two to become the sandbox user; it gives them up with
            // every other capability when it changes uid.
            push(&[
                "--cap-add".as_ref(),
                "CAP_SETUID".as_ref(),
                "--cap-add".as_ref(),
                "CAP_SETGID".as_ref(),
            ]);
        }
        // The private file systems come first: a later one would hide what is mounted under
        // it (a virtualenv or a wheel under /tmp).
        push(&[
            "--proc".as_ref(),
            "/proc".as_ref(),
            "--dev".as_ref(),
            "/dev".as_ref(),
            "--perms".as_ref(),
            "1777".as_ref(),
            "--tmpfs".as_ref(),
            "/dev/shm".as_ref(),
            "--perms".as_ref(),
            "1777".as_ref(),
            "--tmpfs".as_ref(),
            "/tmp".as_ref(),
        ]);
        // bwrap makes the missing parents of a mount point 0700, which the sandbox user could
        // not enter: they are made first, 0755.
        let targets = ETC_FILES
            .iter()
            .map(Path::new)
            .chain(self.python.iter().map(PathBuf::as_path));
        for dir in parents(targets) {
            push(&[
                "--perms".as_ref(),
                "0755".as_ref(),
                "--dir".as_ref(),
                dir.as_os_str(),
            ]);
        }
        // The system, read-only. Merged-/usr systems have /bin, /lib… as symlinks into /usr.
        push(&["--ro-bind".as_ref(), "/usr".as_ref(), "/usr".as_ref()]);
        for top in ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"] {
            match std::fs::read_link(top) {
                Ok(target) => push(&["--symlink".as_ref(), target.as_os_str(), top.as_ref()]),
                Err(_) if Path::new(top).is_dir() => {
                    push(&["--ro-bind".as_ref(), top.as_ref(), top.as_ref()])
                }
                Err(_) => {}
            }
        }
        for f in ETC_FILES {
            push(&["--ro-bind-try".as_ref(), f.as_ref(), f.as_ref()]);
        }
        push(&[
            "--ro-bind".as_ref(),
            passwd.as_os_str(),
            "/etc/passwd".as_ref(),
            "--ro-bind".as_ref(),
            group.as_os_str(),
            "/etc/group".as_ref(),
        ]);
        for p in &self.python {
            push(&["--ro-bind".as_ref(), p.as_os_str(), p.as_os_str()]);
        }
        push(&[
            "--bind".as_ref(),
            spec.notebook.as_os_str(),
            NOTEBOOK_DIR.as_ref(),
        ]);
        for dir in parents(spec.mounts.iter().map(|(_, inside, _)| inside.as_path())) {
            push(&[
                "--perms".as_ref(),
                "0755".as_ref(),
                "--dir".as_ref(),
                dir.as_os_str(),
            ]);
        }
        for (host, inside, writable) in &spec.mounts {
            let how: &OsStr = if *writable {
                "--bind".as_ref()
            } else {
                "--ro-bind".as_ref()
            };
            push(&[how, host.as_os_str(), inside.as_os_str()]);
        }
        push(&["--chdir".as_ref(), NOTEBOOK_DIR.as_ref()]);
        let mut cmd = Command::new(&self.setsid);
        if self.setpriv.is_none() {
            cmd.arg(&self.pasta)
                .args(self.pasta_args(&spec.ports))
                .arg("--");
        }
        cmd.arg(&self.bwrap).args(&a).arg("--");
        if let Some((setpriv, uid, gid)) = &self.setpriv {
            cmd.arg(setpriv)
                .arg(format!("--reuid={uid}"))
                .arg(format!("--regid={gid}"))
                .args(["--clear-groups", "--inh-caps=-all", "--no-new-privs", "--"]);
        }
        cmd.arg(&spec.program).args(&spec.args);
        cmd.env_clear().envs(base_env(spec.env));
        Ok(cmd)
    }

    /// pasta's options for `ports`: only those ports, no mapping of the host's loopback, and
    /// outbound connectivity only when notebooks may reach the internet.
    fn pasta_args(&self, ports: &Ports) -> Vec<OsString> {
        let mut a: Vec<OsString> = ["-f", "-q", "-u", "none", "-U", "none", "--no-map-gw"]
            .map(OsString::from)
            .to_vec();
        if self.internet {
            a.push("--config-net".into());
        }
        a.push("-t".into());
        a.push(match &ports.inbound {
            Some((host, host_port, inside)) => format!("{host}/{host_port}:{inside}").into(),
            None => "none".into(),
        });
        a.push("-T".into());
        a.push(match ports.outbound {
            Some((inside, host_port)) => format!("{inside}:{host_port}").into(),
            None => "none".into(),
        });
        a
    }

    /// The network helper a started sandbox still needs: when root built it, the `pasta`
    /// command that joins its network namespace once it exists (foreground; it exits by itself
    /// when that namespace goes). `None` when pasta is already the sandbox's outer process.
    pub async fn network(&self, pid: u32, ports: &Ports) -> std::io::Result<Option<Command>> {
        if self.setpriv.is_none() {
            return Ok(None);
        }
        let child = sandbox_init(pid).await?;
        let mut cmd = Command::new(&self.pasta);
        cmd.args(self.pasta_args(ports));
        // Root built the sandbox: its namespaces are root's, so pasta stays root to open them
        // (it isolates itself and drops what it does not need).
        cmd.args(["--runas", "0:0", "--netns"])
            .arg(format!("/proc/{child}/ns/net"));
        cmd.env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        Ok(Some(cmd))
    }

    /// Makes `dir` (and what is under it) belong to the sandbox user when Marina runs as root,
    /// so notebook code can write its own directory and nothing else.
    pub fn hand_over(&self, dir: &Path) -> std::io::Result<()> {
        let Some((uid, gid)) = self.run_as() else {
            return Ok(());
        };
        chown_tree(dir, uid, gid)
    }

    /// Makes one Marina file readable by the sandbox user (it stays 0600).
    pub fn hand_over_file(&self, file: &Path) -> std::io::Result<()> {
        match self.run_as() {
            Some((uid, gid)) => std::os::unix::fs::lchown(file, Some(uid), Some(gid)),
            None => Ok(()),
        }
    }
}

/// A first `marina serve` on a Debian machine, as root, installs the two tools itself (with
/// apt's progress in the log), as it installs the Python environment; anyone else is told
/// which packages are missing.
async fn install_tools_if_root() {
    if which("bwrap").is_some() && which("pasta").is_some() {
        return;
    }
    let Some(apt) = which("apt-get") else { return };
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    tracing::info!("installing the notebook sandbox's tools: apt-get install bubblewrap passt");
    for args in [
        &["update", "-q"][..],
        &[
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "bubblewrap",
            "passt",
        ][..],
    ] {
        let mut cmd = Command::new(&apt);
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        if let Err(e) =
            super::env::run_logged(&mut cmd, "apt-get", Duration::from_secs(600), None).await
        {
            tracing::warn!("installing bubblewrap and passt: {e}");
            return;
        }
    }
}

/// The environment of every notebook process: a fixed base, what [`INHERITED_ENV`] lets
/// through, then `extra` (the workload's `extraEnv` and what Marina sets), later entries
/// winning.
pub fn base_env(extra: &[(String, String)]) -> Vec<(String, String)> {
    let mut env = vec![
        (
            "PATH".to_owned(),
            "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin".to_owned(),
        ),
        ("HOME".to_owned(), "/tmp".to_owned()),
        ("USER".to_owned(), "notebook".to_owned()),
        ("LOGNAME".to_owned(), "notebook".to_owned()),
    ];
    for k in INHERITED_ENV {
        if let Some(v) = std::env::var_os(k) {
            env.push(((*k).to_owned(), v.to_string_lossy().into_owned()));
        }
    }
    env.extend(extra.iter().cloned());
    env
}

/// The interpreter a virtualenv was made from lives outside it (`home` in `pyvenv.cfg`), and
/// its `bin/python` is a symlink there: both must be visible.
fn python_mounts(venv: &Path) -> Vec<PathBuf> {
    let mut mounts = vec![venv.to_owned()];
    let cfg = std::fs::read_to_string(venv.join("pyvenv.cfg")).unwrap_or_default();
    let home = cfg.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == "home").then(|| PathBuf::from(v.trim()))
    });
    if let Some(prefix) = home.as_deref().and_then(Path::parent) {
        if !prefix.starts_with("/usr") && prefix.is_absolute() && prefix != Path::new("/") {
            mounts.push(prefix.to_owned());
        }
    }
    mounts
}

/// The directories above `paths` (not `/`), each once, parents first.
fn parents<'a>(paths: impl Iterator<Item = &'a Path>) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for p in paths {
        let mut above: Vec<&Path> = p
            .ancestors()
            .skip(1)
            .filter(|a| a.parent().is_some())
            .collect();
        above.reverse();
        for a in above {
            if !dirs.iter().any(|d| d == a) {
                dirs.push(a.to_owned());
            }
        }
    }
    dirs.sort_by_key(|d| d.components().count());
    dirs
}

/// The sandbox's first process (PID 1 inside): the child of the outer `bwrap` that lives in
/// the new namespaces. It appears within milliseconds of the start. Root built the sandbox, so
/// pasta may open its namespaces only once that process has dropped its capabilities (the
/// kernel's ptrace-access rule): that is waited for too.
async fn sandbox_init(bwrap_pid: u32) -> std::io::Result<u32> {
    let own_net = std::fs::read_link("/proc/self/ns/net")?;
    let children = format!("/proc/{bwrap_pid}/task/{bwrap_pid}/children");
    let stat = format!("/proc/{bwrap_pid}/stat");
    for _ in 0..200 {
        let exited = std::fs::read_to_string(&stat)
            .map(|t| {
                t.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(true);
        if exited {
            return Err(std::io::Error::other("the sandbox exited at once"));
        }
        let text = std::fs::read_to_string(&children).map_err(|e| {
            std::io::Error::new(e.kind(), format!("the sandbox exited at once ({e})"))
        })?;
        if let Some(pid) = text.split_whitespace().next().and_then(|p| p.parse().ok()) {
            // Until bwrap's clone has unshared, the child may still be in our namespace.
            let unshared =
                std::fs::read_link(format!("/proc/{pid}/ns/net")).is_ok_and(|n| n != own_net);
            if unshared && capabilities_dropped(pid) {
                return Ok(pid);
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(std::io::Error::other(
        "the sandbox's namespaces did not appear within 2 s",
    ))
}

fn capabilities_dropped(pid: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().any(|l| {
        l.strip_prefix("CapPrm:")
            .is_some_and(|v| v.trim().bytes().all(|b| b == b'0'))
    })
}

fn chown_tree(dir: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(dir, Some(uid), Some(gid))?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        // Symlinks are changed themselves, never followed: a notebook could point one at
        // any file on the host.
        if entry.file_type()?.is_dir() {
            chown_tree(&entry.path(), uid, gid)?;
        } else {
            std::os::unix::fs::lchown(entry.path(), Some(uid), Some(gid))?;
        }
    }
    Ok(())
}

/// A program on Marina's `PATH`.
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_is_an_allow_list() {
        std::env::set_var("MARINA_INTERNAL__TOKEN", "secret");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "secret");
        let env = base_env(&[("HOME".into(), "/elsewhere".into())]);
        assert!(env.iter().all(|(k, _)| !k.starts_with("MARINA_")));
        assert!(env.iter().all(|(k, _)| k != "AWS_SECRET_ACCESS_KEY"));
        // Later entries win when the environment is applied.
        assert_eq!(
            env.iter().rev().find(|(k, _)| k == "HOME").unwrap().1,
            "/elsewhere"
        );
        // Positive control: an allowed variable passes.
        std::env::set_var("TZ", "UTC");
        assert!(base_env(&[]).iter().any(|(k, v)| k == "TZ" && v == "UTC"));
    }

    /// A virtualenv or a wheel under /tmp (a fresh clone in /tmp, a test's temporary directory)
    /// is mounted after /tmp's private tmpfs, or the tmpfs would hide it.
    #[test]
    fn private_file_systems_come_before_what_is_mounted_under_them() {
        let dir = tempfile::tempdir().unwrap();
        for setpriv in [
            None,
            Some((PathBuf::from("/usr/bin/setpriv"), 65534, 65534)),
        ] {
            let sandbox = Sandbox {
                bwrap: "/usr/bin/bwrap".into(),
                pasta: "/usr/bin/pasta".into(),
                setsid: "/usr/bin/setsid".into(),
                setpriv,
                internet: true,
                python: vec![PathBuf::from("/tmp/clone/.venv")],
            };
            let spec = Spec {
                notebook: dir.path(),
                mounts: vec![(
                    dir.path().join("w.whl"),
                    PathBuf::from("/tmp/w/w.whl"),
                    false,
                )],
                private_dir: dir.path(),
                env: &[],
                program: "/bin/true".into(),
                args: Vec::new(),
                ports: Ports::default(),
            };
            let cmd = sandbox.command(&spec).unwrap();
            let args: Vec<String> = cmd
                .as_std()
                .get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            let at = |x: &str| {
                args.iter()
                    .position(|a| a == x)
                    .unwrap_or_else(|| panic!("{x}: {args:?}"))
            };
            let tmpfs = args
                .windows(2)
                .position(|w| w == ["--tmpfs", "/tmp"])
                .unwrap();
            assert!(tmpfs < at("/tmp/clone/.venv"), "{args:?}");
            assert!(tmpfs < at("/tmp/w/w.whl"), "{args:?}");
            assert!(
                tmpfs < at("/tmp/clone"),
                "the 0755 parent is made inside the tmpfs"
            );
            // pasta is outside bwrap exactly when Marina is not root.
            assert_eq!(
                args.iter().any(|a| a == "/usr/bin/pasta"),
                sandbox.setpriv.is_none()
            );
            assert_eq!(
                args.iter().any(|a| a == "--unshare-net"),
                sandbox.setpriv.is_some()
            );
        }
    }

    #[test]
    fn mount_point_parents_are_listed_once_parents_first() {
        let paths = [
            Path::new("/etc/resolv.conf"),
            Path::new("/root/.pyenv/versions/3.11"),
            Path::new("/etc/ssl"),
            Path::new("/run/marina/token"),
        ];
        let got = parents(paths.into_iter());
        assert_eq!(
            got,
            [
                "/etc",
                "/root",
                "/run",
                "/root/.pyenv",
                "/run/marina",
                "/root/.pyenv/versions"
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn the_interpreter_outside_the_venv_is_mounted() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("pyvenv.cfg"),
            "home = /opt/python/3.11/bin\nversion = 3.11\n",
        )
        .unwrap();
        assert_eq!(
            python_mounts(dir.path()),
            vec![dir.path().to_owned(), PathBuf::from("/opt/python/3.11")]
        );
        // One under /usr is visible already.
        std::fs::write(dir.path().join("pyvenv.cfg"), "home = /usr/bin\n").unwrap();
        assert_eq!(python_mounts(dir.path()), vec![dir.path().to_owned()]);
    }

    #[test]
    fn chown_never_follows_symlinks() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::NamedTempFile::new().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/f"), "x").unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).unwrap();
        chown_tree(dir.path(), 4242, 4242).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            std::fs::metadata(dir.path().join("sub/f")).unwrap().uid(),
            4242
        );
        assert_eq!(std::fs::metadata(outside.path()).unwrap().uid(), 0);
    }
}
