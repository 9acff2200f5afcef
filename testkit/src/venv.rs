//! The notebook Python environment the tests share, and free loopback ports.
//!
//! The environment is `NOTEBOOK_VENV`, else `<workspace>/.venv`, made by
//! `scripts/setup-python.sh` (`scripts/test.sh` does it).

use std::path::{Path, PathBuf};

/// The notebook environment's directory. Panics, naming `scripts/setup-python.sh`, when it has
/// no `bin/marimo` or `bin/sail`.
pub fn dir() -> PathBuf {
    let dir = std::env::var_os("NOTEBOOK_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv"));
    assert!(
        dir.join("bin/marimo").exists() && dir.join("bin/sail").exists(),
        "no notebook environment at {}: run scripts/setup-python.sh (or set NOTEBOOK_VENV; \
         scripts/test.sh does both)",
        dir.display()
    );
    dir
}

/// A free loopback port (bound then released; the tiny race is acceptable in tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
