//! Names of a token's objects in the transfer bucket, derived from the token so that only a
//! holder of the token can compute them (the token itself never appears on the bus as a name).
//!
//! For token `t`: the prefix is `hex(SHA-256("nubis-xfer" ‖ t))[..32]`; the manifest is the object
//! named by the bare prefix and file `f` is `<prefix>/<f>`. Chunks of `f` go to
//! `$O.nubis-xfer.C.<nuid>` with `nuid = hex(SHA-256("nubis-xfer-chunks" ‖ t ‖ f))[..32]`:
//! deterministic, so a fetching proxy can follow the chunks before the source has written the
//! object's info message (which ADR-20 writes last).

use base64::engine::general_purpose::URL_SAFE;
use base64::Engine as _;
use nubis_protocol::message::TransferToken;
use sha2::{Digest as _, Sha256};

/// The one object-store bucket of every site's transfer proxies, in the site's own domain.
pub const BUCKET: &str = "nubis-xfer";

/// The stream behind [`BUCKET`] (ADR-20: `OBJ_<bucket>`).
pub const STREAM: &str = "OBJ_nubis-xfer";

/// The object names and subjects of one token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenObjects {
    token: TransferToken,
    prefix: String,
}

impl TokenObjects {
    /// Names for `token`.
    pub fn new(token: &TransferToken) -> Self {
        let mut h = Sha256::new();
        h.update(b"nubis-xfer");
        h.update(token.0);
        let prefix = hex::encode(h.finalize())[..32].to_string();
        Self {
            token: *token,
            prefix,
        }
    }

    /// The prefix shared by every object of the token.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Object name of the manifest.
    pub fn manifest_name(&self) -> String {
        self.prefix.clone()
    }

    /// Object name of logical file `file`.
    pub fn file_name(&self, file: &str) -> String {
        format!("{}/{file}", self.prefix)
    }

    /// The ADR-20 nuid of an object of this token (`file` = `None` for the manifest).
    pub fn nuid(&self, file: Option<&str>) -> String {
        let mut h = Sha256::new();
        h.update(b"nubis-xfer-chunks");
        h.update(self.token.0);
        if let Some(f) = file {
            h.update([1u8]);
            h.update(f.as_bytes());
        }
        hex::encode(h.finalize())[..32].to_string()
    }

    /// `$O.nubis-xfer.C.<nuid>`
    pub fn chunk_subject(&self, file: Option<&str>) -> String {
        format!("$O.{BUCKET}.C.{}", self.nuid(file))
    }

    /// `$O.nubis-xfer.M.<base64url(name)>` for an object name.
    pub fn meta_subject(object_name: &str) -> String {
        format!("$O.{BUCKET}.M.{}", URL_SAFE.encode(object_name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_depend_on_the_token_only() {
        let t = TransferToken([7; 16]);
        let a = TokenObjects::new(&t);
        let b = TokenObjects::new(&t);
        assert_eq!(a, b);
        assert_eq!(a.prefix().len(), 32);
        assert!(!a.prefix().contains(&t.to_string()));
        assert_ne!(a.nuid(Some("x")), a.nuid(Some("y")));
        assert_ne!(a.nuid(None), a.nuid(Some("x")));
        let other = TokenObjects::new(&TransferToken([8; 16]));
        assert_ne!(a.prefix(), other.prefix());
        assert_eq!(
            TokenObjects::meta_subject("ab/c"),
            format!("$O.nubis-xfer.M.{}", URL_SAFE.encode("ab/c"))
        );
    }
}
