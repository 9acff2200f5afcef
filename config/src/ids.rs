//! Identifiers: 10 characters of `[0-9A-Z]`, random, as the seed API shows (`A1B2C3D4E5`).

use std::fmt;

use rand::Rng;
use serde::{Deserialize, Deserializer, Serialize};

/// Length of every Marina identifier.
pub const ID_LEN: usize = 10;
const ALPHABET: &[u8; 36] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";

/// A validated identifier. Stored inline (no allocation), `Copy`, cheap to compare and hash,
/// which matters on the edge's hot path where notebook ids are route-table keys.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Id([u8; ID_LEN]);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("must be 10 characters of 0-9 and A-Z")]
pub struct IdError;

impl Id {
    /// A new random id (about 51 bits of entropy from the OS-seeded thread RNG).
    pub fn random() -> Id {
        let mut rng = rand::thread_rng();
        let mut out = [0u8; ID_LEN];
        for b in &mut out {
            *b = ALPHABET[rng.gen_range(0..ALPHABET.len())];
        }
        Id(out)
    }

    /// Parses an id; anything but exactly 10 of `[0-9A-Z]` is an error.
    pub fn parse(s: &str) -> Result<Id, IdError> {
        Self::parse_bytes(s.as_bytes())
    }

    /// Parses an id from bytes (the edge parses them from request paths and hosts).
    pub fn parse_bytes(b: &[u8]) -> Result<Id, IdError> {
        if b.len() != ID_LEN
            || !b
                .iter()
                .all(|c| c.is_ascii_digit() || c.is_ascii_uppercase())
        {
            return Err(IdError);
        }
        let mut out = [0u8; ID_LEN];
        out.copy_from_slice(b);
        Ok(Id(out))
    }

    /// Parses the lower-case form used in subdomains (`a1b2c3d4e5`).
    pub fn parse_lowercase(b: &[u8]) -> Result<Id, IdError> {
        if b.len() != ID_LEN {
            return Err(IdError);
        }
        let mut out = [0u8; ID_LEN];
        for (o, c) in out.iter_mut().zip(b) {
            *o = c.to_ascii_uppercase();
        }
        Self::parse_bytes(&out)
    }

    pub fn as_str(&self) -> &str {
        // The constructor only admits ASCII, so this cannot fail.
        std::str::from_utf8(&self.0).unwrap_or("??????????")
    }

    /// The subdomain label form of the id.
    pub fn to_lowercase(&self) -> String {
        self.as_str().to_ascii_lowercase()
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Id({})", self.as_str())
    }
}

impl std::str::FromStr for Id {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Id, IdError> {
        Id::parse(s)
    }
}

impl Serialize for Id {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Id, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Id::parse(&s).map_err(|_| serde::de::Error::custom(format!("invalid id {s:?}: {IdError}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_ids_are_valid_and_distinct() {
        let a = Id::random();
        let b = Id::random();
        assert_eq!(Id::parse(a.as_str()), Ok(a));
        assert_ne!(a, b);
    }

    #[test]
    fn rejects_bad_ids() {
        for bad in [
            "",
            "A1B2C3D4E",
            "A1B2C3D4E5F",
            "a1b2c3d4e5",
            "A1B2C3D4E_",
            "A1B2C3D4É",
        ] {
            assert_eq!(Id::parse(bad), Err(IdError), "{bad:?}");
        }
    }

    #[test]
    fn lowercase_round_trip() {
        let id = Id::parse("A1B2C3D4E5").unwrap();
        assert_eq!(id.to_lowercase(), "a1b2c3d4e5");
        assert_eq!(Id::parse_lowercase(b"a1b2c3d4e5"), Ok(id));
        assert_eq!(Id::parse_lowercase(b"a1b2c3d4e!"), Err(IdError));
    }

    #[test]
    fn serde_validates() {
        assert!(serde_json::from_str::<Id>("\"A1B2C3D4E5\"").is_ok());
        assert!(serde_json::from_str::<Id>("\"nope\"").is_err());
    }
}
