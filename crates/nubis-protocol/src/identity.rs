//! Site identities: the ed25519 signing key and the X25519 sealing key of one site.
//!
//! A site's secret keys live in a TOML key file that only its owner may read (mode 0600); a looser
//! file is refused at load time, the way ssh refuses a world-readable private key. Public keys are
//! written as `ed25519:<base64>` and `x25519:<base64>`, the form a partner pastes into its
//! configuration (the bilateral contract pins them there).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::Deserialize;

use crate::ids::SiteId;

const SIGNING_PREFIX: &str = "ed25519:";
const SEALING_PREFIX: &str = "x25519:";

/// Why a key or key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file could not be read or written.
    #[error("key file {path}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The key file may be read by others than its owner.
    #[error(
        "key file {path} has mode {mode:04o}; it must be readable only by its owner (chmod 600)"
    )]
    TooOpen {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file is not valid TOML of the expected shape.
    #[error("key file {path} is not a nubis key file")]
    Parse {
        /// The key file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A key is not in the `ed25519:<base64>` / `x25519:<base64>` form or has the wrong length.
    #[error("{what} is not a valid {expected} key (expected \"{expected}:<base64 of 32 bytes>\")")]
    Format {
        /// Which key (field name).
        what: String,
        /// The expected algorithm prefix.
        expected: &'static str,
    },
    /// The ed25519 public key is weak (small order) and cannot be trusted.
    #[error("{what} is a weak ed25519 key")]
    WeakKey {
        /// Which key (field name).
        what: String,
    },
    /// The key file already exists and overwriting was not asked for.
    #[error("key file {path} already exists")]
    Exists {
        /// The key file.
        path: PathBuf,
    },
}

/// The secret keys of one site.
pub struct SiteIdentity {
    site: SiteId,
    signing: SigningKey,
    sealing: crypto_box::SecretKey,
}

impl std::fmt::Debug for SiteIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiteIdentity")
            .field("site", &self.site)
            .field("public", &self.public())
            .finish_non_exhaustive()
    }
}

/// The public half of a site identity: what partners pin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicIdentity {
    /// The site.
    pub site: SiteId,
    /// Verifies the site's signatures.
    pub signing: VerifyingKey,
    /// Seals data that only this site can open.
    pub sealing: [u8; 32],
}

#[derive(Deserialize)]
struct KeyFile {
    site: SiteId,
    signing_secret: String,
    sealing_secret: String,
}

impl SiteIdentity {
    /// Generates fresh keys for `site` from the operating system's generator.
    pub fn generate(site: SiteId) -> Self {
        Self {
            site,
            signing: SigningKey::generate(&mut rand_core::OsRng),
            sealing: crypto_box::SecretKey::generate(&mut rand_core::OsRng),
        }
    }

    /// Builds an identity from raw secret key bytes (for tests and key import).
    pub fn from_secrets(site: SiteId, signing: [u8; 32], sealing: [u8; 32]) -> Self {
        Self {
            site,
            signing: SigningKey::from_bytes(&signing),
            sealing: crypto_box::SecretKey::from(sealing),
        }
    }

    /// The site these keys belong to.
    pub fn site(&self) -> &SiteId {
        &self.site
    }

    /// The signing key.
    pub fn signing_key(&self) -> &SigningKey {
        &self.signing
    }

    /// The sealing secret key, which opens boxes sealed to this site.
    pub fn sealing_key(&self) -> &crypto_box::SecretKey {
        &self.sealing
    }

    /// The public keys partners pin.
    pub fn public(&self) -> PublicIdentity {
        PublicIdentity {
            site: self.site.clone(),
            signing: self.signing.verifying_key(),
            sealing: *self.sealing.public_key().as_bytes(),
        }
    }

    /// Writes the key file with mode 0600; refuses to overwrite unless `overwrite`.
    pub fn save(&self, path: &Path, overwrite: bool) -> Result<(), KeyError> {
        let io = |source| KeyError::Io {
            path: path.to_path_buf(),
            source,
        };
        if !overwrite && path.exists() {
            return Err(KeyError::Exists {
                path: path.to_path_buf(),
            });
        }
        // Identifiers and base64 need no TOML escaping, so the file is written by hand.
        let text = format!(
            "# nubis site identity: secret keys of site \"{site}\". Keep this file private (mode 0600).\n\
             site = \"{site}\"\nsigning_secret = \"{SIGNING_PREFIX}{signing}\"\nsealing_secret = \"{SEALING_PREFIX}{sealing}\"\n",
            site = self.site,
            signing = B64.encode(self.signing.to_bytes()),
            sealing = B64.encode(self.sealing.to_bytes()),
        );
        // Write to a private temporary file first so the key is never visible with a loose mode
        // and a crash never leaves a half-written key file behind.
        let tmp = path.with_extension("tmp");
        let _ = fs::remove_file(&tmp);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(text.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        fs::rename(&tmp, path).map_err(io)?;
        Ok(())
    }

    /// Loads a key file, refusing one that others than its owner can read or write.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let io = |source| KeyError::Io {
            path: path.to_path_buf(),
            source,
        };
        let meta = fs::metadata(path).map_err(io)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::TooOpen {
                path: path.to_path_buf(),
                mode,
            });
        }
        let text = fs::read_to_string(path).map_err(io)?;
        let file: KeyFile = toml::from_str(&text).map_err(|source| KeyError::Parse {
            path: path.to_path_buf(),
            source: Box::new(source),
        })?;
        let signing = decode_key(&file.signing_secret, SIGNING_PREFIX, "signing_secret")?;
        let sealing = decode_key(&file.sealing_secret, SEALING_PREFIX, "sealing_secret")?;
        Ok(Self::from_secrets(file.site, signing, sealing))
    }
}

impl PublicIdentity {
    /// The signing key as `ed25519:<base64>`.
    pub fn signing_text(&self) -> String {
        format!("{SIGNING_PREFIX}{}", B64.encode(self.signing.as_bytes()))
    }

    /// The sealing key as `x25519:<base64>`.
    pub fn sealing_text(&self) -> String {
        format!("{SEALING_PREFIX}{}", B64.encode(self.sealing))
    }

    /// The `[[partners]]` block a partner pastes into its site configuration.
    pub fn partner_snippet(&self) -> String {
        format!(
            "[[partners]]\nsite = \"{}\"\nsigning_key = \"{}\"\nsealing_key = \"{}\"\n",
            self.site,
            self.signing_text(),
            self.sealing_text()
        )
    }
}

fn decode_key(text: &str, prefix: &'static str, what: &str) -> Result<[u8; 32], KeyError> {
    let bad = || KeyError::Format {
        what: what.to_string(),
        expected: prefix.trim_end_matches(':'),
    };
    let b64 = text.trim().strip_prefix(prefix).ok_or_else(bad)?;
    let bytes = B64.decode(b64).map_err(|_| bad())?;
    bytes.try_into().map_err(|_| bad())
}

/// Parses a pinned partner signing key written as `ed25519:<base64>`; `what` names the setting.
pub fn parse_signing_key(text: &str, what: &str) -> Result<VerifyingKey, KeyError> {
    let bytes = decode_key(text, SIGNING_PREFIX, what)?;
    let key = VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::Format {
        what: what.to_string(),
        expected: "ed25519",
    })?;
    if key.is_weak() {
        return Err(KeyError::WeakKey {
            what: what.to_string(),
        });
    }
    Ok(key)
}

/// Parses a pinned partner sealing key written as `x25519:<base64>`; `what` names the setting.
pub fn parse_sealing_key(text: &str, what: &str) -> Result<[u8; 32], KeyError> {
    decode_key(text, SEALING_PREFIX, what)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(s: &str) -> SiteId {
        SiteId::new(s).unwrap()
    }

    #[test]
    fn key_file_round_trips_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.key");
        let id = SiteIdentity::generate(site("a"));
        id.save(&path, false).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = SiteIdentity::load(&path).unwrap();
        assert_eq!(back.public(), id.public());
        assert_eq!(back.site(), &site("a"));
    }

    #[test]
    fn existing_key_file_is_not_overwritten_by_default() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.key");
        let first = SiteIdentity::generate(site("a"));
        first.save(&path, false).unwrap();
        let err = SiteIdentity::generate(site("a"))
            .save(&path, false)
            .unwrap_err();
        assert!(matches!(err, KeyError::Exists { .. }));
        assert_eq!(SiteIdentity::load(&path).unwrap().public(), first.public());
    }

    #[test]
    fn loose_key_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.key");
        SiteIdentity::generate(site("a"))
            .save(&path, false)
            .unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660, 0o666] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            match SiteIdentity::load(&path) {
                Err(KeyError::TooOpen { mode: m, .. }) => assert_eq!(m, mode),
                other => panic!("mode {mode:o} accepted: {other:?}"),
            }
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
        assert!(SiteIdentity::load(&path).is_ok());
    }

    #[test]
    fn missing_and_garbled_key_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope.key");
        assert!(matches!(
            SiteIdentity::load(&path),
            Err(KeyError::Io { .. })
        ));
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .unwrap();
        f.write_all(b"site = \"a\"\nsigning_secret = \"rsa:AAAA\"\nsealing_secret = \"x\"\n")
            .unwrap();
        assert!(matches!(
            SiteIdentity::load(&path),
            Err(KeyError::Format { ref what, .. }) if what == "signing_secret"
        ));
        fs::write(&path, "not toml [").unwrap();
        assert!(matches!(
            SiteIdentity::load(&path),
            Err(KeyError::Parse { .. })
        ));
    }

    #[test]
    fn public_keys_parse_back_from_the_partner_snippet() {
        let id = SiteIdentity::generate(site("b"));
        let public = id.public();
        let snippet = public.partner_snippet();
        assert!(snippet.contains("site = \"b\""));
        assert_eq!(
            parse_signing_key(&public.signing_text(), "k").unwrap(),
            public.signing
        );
        assert_eq!(
            parse_sealing_key(&public.sealing_text(), "k").unwrap(),
            public.sealing
        );
        assert!(matches!(
            parse_signing_key(&public.sealing_text(), "partners[0].signing_key"),
            Err(KeyError::Format { .. })
        ));
        assert!(matches!(
            parse_signing_key("ed25519:AAAA", "k"),
            Err(KeyError::Format { .. })
        ));
        // The identity point is a small-order key: never trusted.
        let mut weak = [0u8; 32];
        weak[0] = 1;
        let text = format!("ed25519:{}", B64.encode(weak));
        assert!(matches!(
            parse_signing_key(&text, "k"),
            Err(KeyError::WeakKey { .. })
        ));
    }
}
