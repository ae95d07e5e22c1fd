//! Identifiers that appear in subjects and messages: sites, VMs, migrations, requests.
//!
//! Site and VM identifiers become NATS subject tokens and JetStream domain names, so they are
//! restricted to a small safe alphabet; a malformed identifier can never be turned into a subject.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest accepted site or VM identifier, in bytes.
pub const MAX_ID_LEN: usize = 64;

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The identifier is empty.
    #[error("identifier is empty")]
    Empty,
    /// The identifier is longer than [`MAX_ID_LEN`].
    #[error("identifier is longer than {MAX_ID_LEN} bytes")]
    TooLong,
    /// The identifier contains a character outside `[a-z0-9_-]`.
    #[error("identifier contains {0:?}; only a-z, 0-9, '-' and '_' are allowed")]
    BadChar(char),
    /// The identifier does not start with a letter or digit.
    #[error("identifier must start with a letter or digit")]
    BadStart,
}

pub(crate) fn validate(s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty);
    }
    if s.len() > MAX_ID_LEN {
        return Err(IdError::TooLong);
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '_'))
    {
        return Err(IdError::BadChar(c));
    }
    if !s.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(IdError::BadStart);
    }
    Ok(())
}

macro_rules! subject_safe_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps `s`.
            pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                $crate::ids::validate(&s)?;
                Ok(Self(s))
            }

            /// The identifier as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        // Derived `Hash`/`Eq` hash the inner `String` exactly as `str`, as `Borrow` requires.
        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

// Shared with the other subject-token names (proxy, producer and host ids).
pub(crate) use subject_safe_id;

subject_safe_id!(
    /// A site of the federation; also its JetStream domain and its subject token.
    SiteId
);
subject_safe_id!(
    /// A virtual machine, unique in the federation (chosen by its primary site).
    VmId
);

/// A 128-bit random identifier, written as 32 lower-case hex digits.
macro_rules! random_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; 16]);

        impl $name {
            /// A fresh random identifier from the operating system's generator.
            pub fn random() -> Self {
                let mut b = [0u8; 16];
                rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
                Self(b)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex::encode(self.0))
            }
        }

        impl FromStr for $name {
            type Err = hex::FromHexError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let mut b = [0u8; 16];
                hex::decode_to_slice(s, &mut b)?;
                Ok(Self(b))
            }
        }

        /// 16 raw bytes in binary formats (MessagePack `bin 8`, 18 bytes on the wire), 32 hex
        /// digits in human-readable ones (JSON).
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                if s.is_human_readable() {
                    s.serialize_str(&hex::encode(self.0))
                } else {
                    s.serialize_bytes(&self.0)
                }
            }
        }

        /// Either form: 16 bytes, or 32 hex digits (records written before ids were binary).
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> serde::de::Visitor<'de> for V {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str("16 bytes or 32 hex digits")
                    }
                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<$name, E> {
                        v.parse().map_err(E::custom)
                    }
                    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<$name, E> {
                        <[u8; 16]>::try_from(v)
                            .map($name)
                            .map_err(|_| E::invalid_length(v.len(), &self))
                    }
                }
                d.deserialize_any(V)
            }
        }
    };
}

// Shared with the other 128-bit random names (transfer tokens, notice ids).
pub(crate) use random_id;

random_id!(
    /// One migration (or placement), the key of every journal record about it.
    MigrationId
);
random_id!(
    /// One Migration request as it travels down a delegation chain; seen twice means a loop.
    RequestId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_ids_are_subject_safe() {
        assert!(SiteId::new("site-a_1").is_ok());
        assert_eq!(SiteId::new(""), Err(IdError::Empty));
        assert_eq!(SiteId::new("a.b"), Err(IdError::BadChar('.')));
        assert_eq!(SiteId::new("a*"), Err(IdError::BadChar('*')));
        assert_eq!(SiteId::new("A"), Err(IdError::BadChar('A')));
        assert_eq!(SiteId::new("-a"), Err(IdError::BadStart));
        assert_eq!(SiteId::new("a".repeat(65)), Err(IdError::TooLong));
    }

    #[test]
    fn random_ids_round_trip_as_hex() {
        let id = MigrationId::random();
        let s = id.to_string();
        assert_eq!(s.len(), 32);
        assert_eq!(s.parse::<MigrationId>(), Ok(id));
        assert_ne!(MigrationId::random(), id);
    }
}
