//! Child processes as process groups: identity, liveness and teardown.
//!
//! Each server (Sail, Marimo) is started as the leader of its own process group, so everything
//! it starts (Marimo's kernel processes, multiprocessing's resource tracker) stays in that
//! group and one `killpg` reaches the whole tree, even after the leader has exited.
//!
//! Pids are recorded in `run.json` and may be read back by a later Marina process, possibly
//! after a reboot, when the pid can belong to something else. A [`ProcId`] therefore carries
//! the boot id and the process start time (from `/proc`), and nothing is signalled unless they
//! match. Linux cannot reuse a pid while it is still a process group id, so while any member of
//! our group lives, the group id stays ours.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

/// A process we started, identified robustly enough to signal it later.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcId {
    /// Pid of the group leader, which is also the process group id.
    pub pid: i32,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat` field 22), when known.
    pub start_ticks: Option<u64>,
    /// `/proc/sys/kernel/random/boot_id` when it was started, when known.
    pub boot_id: Option<String>,
}

/// What `/proc/<pid>/stat` says about a process.
#[derive(Debug)]
struct Stat {
    state: char,
    pgrp: i32,
    start_ticks: u64,
}

fn read_stat(pid: i32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may itself contain spaces and
    // parentheses, so fields are counted from the last `)`.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); pgrp is field 5, starttime field 22.
    Some(Stat {
        state: fields.first()?.chars().next()?,
        pgrp: fields.get(2)?.parse().ok()?,
        start_ticks: fields.get(19)?.parse().ok()?,
    })
}

fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_owned())
}

fn has_proc() -> bool {
    std::path::Path::new("/proc/self/stat").exists()
}

impl ProcId {
    /// Identifies a process just started by us.
    pub fn of(pid: u32) -> ProcId {
        let pid = pid as i32;
        ProcId {
            pid,
            start_ticks: read_stat(pid).map(|s| s.start_ticks),
            boot_id: boot_id(),
        }
    }

    /// False when the record is from another boot, or its pid now names another process.
    fn could_be_ours(&self) -> bool {
        if let (Some(then), Some(now)) = (&self.boot_id, boot_id()) {
            if *then != now {
                return false;
            }
        }
        match (read_stat(self.pid), self.start_ticks) {
            (Some(stat), Some(ticks)) => stat.start_ticks == ticks,
            // The leader is gone: its pid is not reused while group members remain, so any
            // process still in the group is one of ours.
            (None, _) => true,
            (Some(_), None) => true,
        }
    }

    /// Whether the leader itself still runs (a zombie does not count).
    pub fn is_alive(&self) -> bool {
        if !self.could_be_ours() {
            return false;
        }
        if has_proc() {
            matches!(read_stat(self.pid), Some(s) if s.state != 'Z' && s.state != 'X')
        } else {
            kill(Pid::from_raw(self.pid), None).is_ok()
        }
    }

    /// Live (non-zombie) members of the leader's process group, leader included.
    pub fn group_members(&self) -> Vec<i32> {
        if !self.could_be_ours() {
            return Vec::new();
        }
        if !has_proc() {
            return match killpg(Pid::from_raw(self.pid), None) {
                Ok(()) => vec![self.pid],
                Err(_) => Vec::new(),
            };
        }
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&pid| {
                matches!(read_stat(pid), Some(s) if s.pgrp == self.pid && s.state != 'Z' && s.state != 'X')
            })
            .collect()
    }

    fn signal_group(&self, sig: Signal) {
        if !self.could_be_ours() {
            return;
        }
        // ESRCH (no such group) is the normal case for a stopped notebook.
        let _ = killpg(Pid::from_raw(self.pid), sig);
    }
}

/// Terminates several process groups: SIGTERM to all, up to `grace` for them to exit (Marimo
/// exits in about 0.25 s and takes its kernels with it), then SIGKILL for stragglers. Returns
/// once no member of any group remains, or after a further second (then the pids are logged).
pub async fn terminate_groups(groups: &[ProcId], grace: Duration) {
    for g in groups {
        g.signal_group(Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if groups.iter().all(|g| g.group_members().is_empty()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    for g in groups {
        let left = g.group_members();
        if !left.is_empty() {
            tracing::warn!(pgid = g.pid, pids = ?left, "did not exit on SIGTERM; killing");
            g.signal_group(Signal::SIGKILL);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        if groups.iter().all(|g| g.group_members().is_empty()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    for g in groups {
        let left = g.group_members();
        if !left.is_empty() {
            tracing::error!(pgid = g.pid, pids = ?left, "processes survived SIGKILL");
        }
    }
}

/// A port that was free a moment ago. Another process may take it before ours binds; the
/// server then exits with "address in use", which fails this attempt and the control plane
/// retries with new ports.
/// Two distinct free ports, one on each host. The first listener is held while the second is
/// picked, so the two cannot coincide even when the hosts overlap (`0.0.0.0`).
pub fn free_port_pair(first: &str, second: &str) -> std::io::Result<(u16, u16)> {
    let a = TcpListener::bind((first, 0))?;
    let b = TcpListener::bind((second, 0))?;
    Ok((a.local_addr()?.port(), b.local_addr()?.port()))
}

/// Whether something accepts TCP connections at `addr` (`host:port`).
pub async fn accepts_tcp(addr: &str) -> bool {
    matches!(
        tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(addr)
        )
        .await,
        Ok(Ok(_))
    )
}

/// Whether an HTTP/2 server (Sail's gRPC) answers at `addr`: it must reply to the client
/// preface with a SETTINGS frame. Accepting the connection is not enough, since a sandbox's
/// port on the host belongs to its network helper, which accepts before the server inside
/// listens and then closes.
pub async fn speaks_http2(addr: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(PREFACE).await.ok()?;
        let mut head = [0u8; 9];
        s.read_exact(&mut head).await.ok()?;
        // Frame header: 24-bit length, type, flags, stream id. Type 4 is SETTINGS.
        Some(head[3] == 4)
    };
    matches!(
        tokio::time::timeout(Duration::from_millis(500), attempt).await,
        Ok(Some(true))
    )
}

/// The last `n` lines of a log file (reads at most its last 64 KiB), with `secret` masked in
/// case a server ever prints it.
pub fn log_tail(path: &std::path::Path, n: usize, secret: &str) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(n)..].join("\n");
    if secret.is_empty() {
        tail
    } else {
        tail.replace(secret, "***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifies_this_process() {
        let me = ProcId::of(std::process::id());
        assert!(me.is_alive());
        if has_proc() {
            assert!(me.start_ticks.is_some());
            // Same pid, other start time: a reused pid, not ours.
            let other = ProcId {
                start_ticks: me.start_ticks.map(|t| t + 1),
                ..me.clone()
            };
            assert!(!other.is_alive());
            let other_boot = ProcId {
                boot_id: Some("another-boot".into()),
                ..me
            };
            assert!(!other_boot.is_alive());
            assert!(other_boot.group_members().is_empty());
        }
    }

    #[tokio::test]
    async fn an_http2_answer_is_needed_not_just_a_listener() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // A listener that accepts and closes, as pasta does when nothing listens inside.
        let closer = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closer_addr = closer.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((s, _)) = closer.accept().await {
                drop(s);
            }
        });
        assert!(!speaks_http2(&closer_addr).await);
        // Positive control: a server that answers the preface with SETTINGS.
        let h2 = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let h2_addr = h2.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut s, _) = h2.accept().await.unwrap();
            let mut preface = [0u8; 33];
            s.read_exact(&mut preface).await.unwrap();
            s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
            tokio::time::sleep(Duration::from_secs(1)).await;
        });
        assert!(speaks_http2(&h2_addr).await);
    }

    #[test]
    fn tail_masks_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.log");
        let text: String = (0..30).map(|i| format!("line {i} s3cret\n")).collect();
        std::fs::write(&p, text).unwrap();
        let t = log_tail(&p, 3, "s3cret");
        assert_eq!(t, "line 27 ***\nline 28 ***\nline 29 ***");
    }
}
