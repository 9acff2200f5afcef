//! Generated secrets kept in files readable only by their owner.

use std::io::Write;
use std::path::Path;

/// Writes `contents` to `path` with mode 0600 (creating parent directories), replacing any
/// file there. The file is created with restrictive permissions from the start, so the secret
/// is never readable by others, not even briefly.
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Reads the secret at `path`, or generates `len` random bytes, stores them hex-encoded and
/// returns them. Used for the cookie key and the internal control↔edge token.
pub fn load_or_create_hex(path: &Path, len: usize) -> std::io::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(s.trim().to_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use rand::RngCore;
            let mut bytes = vec![0u8; len];
            rand::rngs::OsRng.fill_bytes(&mut bytes);
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            write_private(path, hex.as_bytes())?;
            Ok(hex)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_once_with_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/secret");
        let a = load_or_create_hex(&p, 32).unwrap();
        assert_eq!(a.len(), 64);
        assert_eq!(load_or_create_hex(&p, 32).unwrap(), a);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }
}
