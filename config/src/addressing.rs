//! Where a notebook lives on the edge.
//!
//! - Subdomain mode: notebook `A1B2C3D4E5` is `https://a1b2c3d4e5.<domain>/`, its own browser
//!   origin, so one notebook's HTML cannot read another's pages or cookies.
//! - Path mode: `https://<host>/notebooks/A1B2C3D4E5/`. Every notebook shares one origin: a
//!   notebook's own JavaScript could fetch another notebook's pages *if* the browser holds a cookie
//!   for it (cookies are path-scoped, but same-origin scripts are not). Use it for local use and
//!   single-tenant deployments only.
//!
//! The control plane uses this to mint `open` URLs and Marimo's `--base-url`; the edge uses it to
//! route. Both read the same settings, so they cannot disagree.

use crate::ids::Id;
use serde::{Deserialize, Serialize};

/// Path prefix of notebooks in path mode.
pub const PATH_PREFIX: &str = "/notebooks/";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AddressingMode {
    Path,
    Subdomain,
}

/// A resolved addressing scheme (see [`crate::settings::ProxySettings`]).
#[derive(Clone, Debug)]
pub struct Addressing {
    pub mode: AddressingMode,
    /// `http` or `https`.
    pub scheme: String,
    /// Path mode: the edge's `host[:port]`. Subdomain mode: the notebook domain `domain[:port]`,
    /// under which each notebook gets a label.
    pub authority: String,
    /// The handshake path, relative to the notebook root (`/_auth`).
    pub handshake_path: String,
}

impl Addressing {
    /// The browser origin of a notebook (`scheme://host[:port]`).
    pub fn notebook_origin(&self, id: Id) -> String {
        match self.mode {
            AddressingMode::Path => format!("{}://{}", self.scheme, self.authority),
            AddressingMode::Subdomain => {
                format!("{}://{}.{}", self.scheme, id.to_lowercase(), self.authority)
            }
        }
    }

    /// The path under which the notebook is served, without a trailing slash (`""` at the root).
    pub fn base_path(&self, id: Id) -> String {
        match self.mode {
            AddressingMode::Path => format!("{PATH_PREFIX}{id}"),
            AddressingMode::Subdomain => String::new(),
        }
    }

    /// Marimo's `--base-url` for this notebook (path mode only: Marimo keeps the prefix).
    pub fn marimo_base_url(&self, id: Id) -> Option<String> {
        match self.mode {
            AddressingMode::Path => Some(self.base_path(id)),
            AddressingMode::Subdomain => None,
        }
    }

    /// The notebook's root URL, where the handshake redirects to.
    pub fn notebook_url(&self, id: Id) -> String {
        format!("{}{}/", self.notebook_origin(id), self.base_path(id))
    }

    /// The one-time URL `open` returns.
    pub fn handshake_url(&self, id: Id, token: &str) -> String {
        format!(
            "{}{}{}?token={}",
            self.notebook_origin(id),
            self.base_path(id),
            self.handshake_path,
            token
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> Id {
        Id::parse("A1B2C3D4E5").unwrap()
    }

    #[test]
    fn path_mode() {
        let a = Addressing {
            mode: AddressingMode::Path,
            scheme: "http".into(),
            authority: "127.0.0.1:8000".into(),
            handshake_path: "/_auth".into(),
        };
        assert_eq!(
            a.notebook_url(id()),
            "http://127.0.0.1:8000/notebooks/A1B2C3D4E5/"
        );
        assert_eq!(
            a.handshake_url(id(), "t"),
            "http://127.0.0.1:8000/notebooks/A1B2C3D4E5/_auth?token=t"
        );
        assert_eq!(
            a.marimo_base_url(id()).as_deref(),
            Some("/notebooks/A1B2C3D4E5")
        );
    }

    #[test]
    fn subdomain_mode() {
        let a = Addressing {
            mode: AddressingMode::Subdomain,
            scheme: "https".into(),
            authority: "nb.example.com".into(),
            handshake_path: "/_auth".into(),
        };
        assert_eq!(a.notebook_url(id()), "https://a1b2c3d4e5.nb.example.com/");
        assert_eq!(
            a.handshake_url(id(), "t"),
            "https://a1b2c3d4e5.nb.example.com/_auth?token=t"
        );
        assert_eq!(a.marimo_base_url(id()), None);
    }
}
