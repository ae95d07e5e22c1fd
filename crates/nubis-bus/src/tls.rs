//! The federation's certificates: one certificate authority per federation, a server
//! certificate for the hub's leaf-node port, and one client certificate per member site.
//!
//! Every leaf connection between a site's server and the hub is TLS with mutual verification
//! (`nats-config/README.md`, "TLS"): the hub verifies the site's certificate against the
//! federation's CA and maps the certificate's name to the leaf user the site logs in as, and the
//! site verifies the hub's certificate against the same CA. This module makes those
//! certificates, for `nubis tls` and for the test kit, so the tests run the certificates an
//! operator deploys.
//!
//! A site's certificate names the site id as its only DNS subject alternative name, which is
//! what nats-server's `verify_and_map` matches against the hub's leaf users; it is good for
//! client authentication only, so it cannot serve as a hub. The hub's certificate names the
//! addresses the sites dial and is good for server authentication only, so it cannot log in as
//! a site. Private keys are ECDSA P-256, written with mode 0600 and never shown in `Debug`.

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyIdMethod, KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

/// File name of the federation CA's certificate, in the CA's folder and beside every issued
/// certificate.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the federation CA's private key, in the CA's folder only.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// File name of an issued certificate.
pub const CERT_FILE: &str = "cert.pem";
/// File name of an issued certificate's private key.
pub const KEY_FILE: &str = "key.pem";

/// The common name of every federation CA this module makes.
const CA_COMMON_NAME: &str = "nubis federation CA";

/// Names a site certificate may not carry: the hub's own and the hub's client users'. With
/// `verify_and_map` a certificate logs in as the user its name matches, so a site certificate
/// naming one of these would try the hub operator's or the system account's user.
pub const RESERVED_NAMES: [&str; 3] = ["hub", "operator", "sys"];

/// Why a certificate could not be made, read or written.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate library refused the parameters or failed to sign.
    #[error("cannot generate the certificate")]
    Generate(#[source] rcgen::Error),
    /// A file does not hold what it should.
    #[error("{file} is not a usable {what}")]
    Parse {
        /// The file.
        file: PathBuf,
        /// What it should hold, e.g. `CA certificate`.
        what: &'static str,
        /// The cause.
        #[source]
        source: rcgen::Error,
    },
    /// The CA's key is not the key of the CA's certificate.
    #[error("{key} is not the key of {cert}")]
    KeyMismatch {
        /// The certificate.
        cert: PathBuf,
        /// The key.
        key: PathBuf,
    },
    /// A name cannot go into a certificate.
    #[error("`{name}` cannot name a certificate: {reason}")]
    InvalidName {
        /// The name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// A server certificate needs at least one name.
    #[error("a server certificate needs at least one host name or address")]
    NoServerName,
    /// The validity period ends before it starts.
    #[error("a certificate must end after it starts")]
    EmptyValidity,
    /// A file could not be read, written or created.
    #[error("cannot {action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file to be written exists already; certificates and keys are never overwritten.
    #[error("{path} exists; remove it first to replace it")]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// A private key file may be read by users other than its owner.
    #[error("{path} is readable by group or others (mode {mode:o}); chmod 600 it")]
    LooseKey {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TlsError {
    let path = path.to_path_buf();
    move |source| TlsError::Io {
        action,
        path,
        source,
    }
}

/// When a certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// The first instant it is valid.
    pub not_before: OffsetDateTime,
    /// The last instant it is valid.
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From an hour ago (a little clock skew between providers) until `days` from now.
    pub fn days_from_now(days: u32) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(i64::from(days)),
        }
    }

    /// From `not_before` to `not_after`, for certificates that are not valid yet or no longer.
    pub fn between(not_before: std::time::SystemTime, not_after: std::time::SystemTime) -> Self {
        Self {
            not_before: not_before.into(),
            not_after: not_after.into(),
        }
    }

    fn apply(self, params: &mut CertificateParams) -> Result<(), TlsError> {
        if self.not_after <= self.not_before {
            return Err(TlsError::EmptyValidity);
        }
        params.not_before = self.not_before;
        params.not_after = self.not_after;
        Ok(())
    }
}

/// A certificate and its private key, in PEM. `Debug` shows the certificate only.
#[derive(Clone)]
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl Issued {
    /// The private key, to be written to a file only its owner may read.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Writes [`CA_CERT_FILE`] (the CA that verifies the peer), [`CERT_FILE`] and
    /// [`KEY_FILE`] (mode 0600) into `dir`, creating it; refuses to replace any of them.
    pub fn write(&self, dir: &Path, ca: &CertificateAuthority) -> Result<(), TlsError> {
        create_dir(dir)?;
        let files = [CA_CERT_FILE, CERT_FILE, KEY_FILE].map(|name| dir.join(name));
        refuse_existing(&files)?;
        write_new(&files[0], ca.cert_pem(), 0o644)?;
        write_new(&files[1], &self.cert_pem, 0o644)?;
        write_new(&files[2], &self.key_pem, 0o600)
    }
}

/// A federation's certificate authority: its certificate and the key that signs. `Debug` never
/// shows the key.
pub struct CertificateAuthority {
    /// The CA's certificate as issued, which peers verify against.
    cert_pem: String,
    /// A certificate with the CA's name and key, to sign with.
    signer: rcgen::Certificate,
    key: KeyPair,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("cert_pem", &self.cert_pem)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl CertificateAuthority {
    /// A new CA with a fresh key, valid for `validity`.
    pub fn generate(validity: Validity) -> Result<Self, TlsError> {
        let key = KeyPair::generate().map_err(TlsError::Generate)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, CA_COMMON_NAME);
        // Only end-entity certificates below it: no intermediate CA can be issued.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity.apply(&mut params)?;
        let signer = params.self_signed(&key).map_err(TlsError::Generate)?;
        Ok(Self {
            cert_pem: signer.pem(),
            signer,
            key,
        })
    }

    /// The CA in the folder `dir`, as [`CertificateAuthority::write`] left it. The key file
    /// must be readable by its owner only.
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert_pem = fs::read_to_string(&cert_path).map_err(io("read", &cert_path))?;
        let key_pem = read_key(&key_path)?;
        let parse = |file: &Path, what| {
            let file = file.to_path_buf();
            move |source| TlsError::Parse { file, what, source }
        };
        let key = KeyPair::from_pem(&key_pem).map_err(parse(&key_path, "private key"))?;
        let params = CertificateParams::from_ca_cert_pem(&cert_pem)
            .map_err(parse(&cert_path, "CA certificate"))?;
        // The certificate's key identifier is the digest of its public key (how `generate`
        // made it); the same digest of `key` tells whether the two belong together.
        if let KeyIdMethod::PreSpecified(id) = &params.key_identifier_method {
            let mut check = params.clone();
            check.key_identifier_method = KeyIdMethod::Sha256;
            let derived = check.self_signed(&key).map_err(TlsError::Generate)?;
            if derived.key_identifier() != *id {
                return Err(TlsError::KeyMismatch {
                    cert: cert_path,
                    key: key_path,
                });
            }
        }
        let signer = params.self_signed(&key).map_err(TlsError::Generate)?;
        Ok(Self {
            cert_pem,
            signer,
            key,
        })
    }

    /// Writes [`CA_CERT_FILE`] and [`CA_KEY_FILE`] (mode 0600) into `dir`, creating it;
    /// refuses to replace either.
    pub fn write(&self, dir: &Path) -> Result<(), TlsError> {
        create_dir(dir)?;
        let files = [CA_CERT_FILE, CA_KEY_FILE].map(|name| dir.join(name));
        refuse_existing(&files)?;
        write_new(&files[0], &self.cert_pem, 0o644)?;
        write_new(&files[1], &self.key.serialize_pem(), 0o600)
    }

    /// The CA's certificate, which every server of the federation verifies its peers against.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The client certificate of site `site` for its leaf connection to the hub: its one name
    /// is the site id, which the hub maps to the site's leaf user.
    pub fn issue_site(&self, site: &str, validity: Validity) -> Result<Issued, TlsError> {
        check_site_name(site)?;
        let mut params =
            CertificateParams::new(vec![site.to_owned()]).map_err(|_| TlsError::InvalidName {
                name: site.to_owned(),
                reason: "not an ASCII name",
            })?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, site);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, validity)
    }

    /// The certificate of a hub node for its leaf-node port and its cluster routes, naming
    /// every host name or IP address the sites (and the other nodes) dial. It serves the leaf
    /// port and a route's accepting end, and is presented by a route's dialling end, so it is
    /// issued for server and client authentication. It cannot log a site in: the hub maps a
    /// leaf certificate's name to a site's leaf user, and no site is named after an address.
    pub fn issue_server(&self, names: &[String], validity: Validity) -> Result<Issued, TlsError> {
        let Some(first) = names.first() else {
            return Err(TlsError::NoServerName);
        };
        let mut params =
            CertificateParams::new(names.to_vec()).map_err(|_| TlsError::InvalidName {
                name: names.join(","),
                reason: "not a host name or IP address",
            })?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, first);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.sign(params, validity)
    }

    fn sign(&self, mut params: CertificateParams, validity: Validity) -> Result<Issued, TlsError> {
        validity.apply(&mut params)?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().map_err(TlsError::Generate)?;
        let cert = params
            .signed_by(&key, &self.signer, &self.key)
            .map_err(TlsError::Generate)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Checks that `site` can name a site's certificate: a site id (ASCII letters, digits, `-` and
/// `_`), and none of [`RESERVED_NAMES`].
pub fn check_site_name(site: &str) -> Result<(), TlsError> {
    let invalid = |reason| TlsError::InvalidName {
        name: site.to_owned(),
        reason,
    };
    if site.is_empty()
        || !site
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(invalid("a site id has only ASCII letters, digits, - and _"));
    }
    if RESERVED_NAMES.contains(&site) {
        return Err(invalid("it is the hub's or one of the hub's users"));
    }
    Ok(())
}

/// Reads a private key file, refusing it when group or others may read or write it.
pub fn read_key(path: &Path) -> Result<String, TlsError> {
    let mode = fs::metadata(path)
        .map_err(io("read", path))?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        return Err(TlsError::LooseKey {
            path: path.to_path_buf(),
            mode,
        });
    }
    fs::read_to_string(path).map_err(io("read", path))
}

fn create_dir(dir: &Path) -> Result<(), TlsError> {
    fs::create_dir_all(dir).map_err(io("create", dir))
}

fn refuse_existing(files: &[PathBuf]) -> Result<(), TlsError> {
    match files.iter().find(|f| f.exists()) {
        Some(path) => Err(TlsError::Exists { path: path.clone() }),
        None => Ok(()),
    }
}

/// Creates `path` with `mode` from the start (a key is never readable by others, not even for
/// an instant) and writes `text`.
fn write_new(path: &Path, text: &str, mode: u32) -> Result<(), TlsError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => TlsError::Exists {
                path: path.to_path_buf(),
            },
            _ => TlsError::Io {
                action: "create",
                path: path.to_path_buf(),
                source,
            },
        })?;
    file.write_all(text.as_bytes()).map_err(io("write", path))?;
    // The process's umask may have taken bits away from `mode`; set it exactly.
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io("write", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> CertificateAuthority {
        CertificateAuthority::generate(Validity::days_from_now(1)).unwrap()
    }

    #[test]
    fn a_written_ca_loads_back_and_keys_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca();
        ca.write(dir.path()).unwrap();
        let mode = |name: &str| {
            fs::metadata(dir.path().join(name))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(CA_KEY_FILE), 0o600);
        assert_eq!(mode(CA_CERT_FILE), 0o644);
        let loaded = CertificateAuthority::load(dir.path()).unwrap();
        assert_eq!(loaded.cert_pem(), ca.cert_pem());
        // Issuing with the loaded CA works, and writing twice is refused.
        let site = loaded.issue_site("a", Validity::days_from_now(1)).unwrap();
        let out = dir.path().join("a");
        site.write(&out, &loaded).unwrap();
        assert_eq!(
            fs::metadata(out.join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        assert!(matches!(
            site.write(&out, &loaded),
            Err(TlsError::Exists { .. })
        ));
        assert!(matches!(ca.write(dir.path()), Err(TlsError::Exists { .. })));
    }

    #[test]
    fn a_ca_with_another_key_or_a_loose_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        ca().write(dir.path()).unwrap();
        let other = tempfile::tempdir().unwrap();
        ca().write(other.path()).unwrap();
        fs::remove_file(dir.path().join(CA_KEY_FILE)).unwrap();
        fs::copy(other.path().join(CA_KEY_FILE), dir.path().join(CA_KEY_FILE)).unwrap();
        assert!(matches!(
            CertificateAuthority::load(dir.path()),
            Err(TlsError::KeyMismatch { .. })
        ));
        fs::set_permissions(
            other.path().join(CA_KEY_FILE),
            fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        assert!(matches!(
            CertificateAuthority::load(other.path()),
            Err(TlsError::LooseKey { mode: 0o640, .. })
        ));
    }

    #[test]
    fn site_names_are_site_ids_and_not_the_hubs_users() {
        let ca = ca();
        let validity = Validity::days_from_now(1);
        assert!(ca.issue_site("site-1_b", validity).is_ok());
        for name in ["", "a.b", "a b", "*", "hub", "operator", "sys", "é"] {
            assert!(
                matches!(
                    ca.issue_site(name, validity),
                    Err(TlsError::InvalidName { .. })
                ),
                "{name:?}"
            );
        }
        assert!(matches!(
            ca.issue_server(&[], validity),
            Err(TlsError::NoServerName)
        ));
        let now = OffsetDateTime::now_utc();
        let backwards = Validity {
            not_before: now,
            not_after: now - Duration::days(1),
        };
        assert!(matches!(
            ca.issue_site("a", backwards),
            Err(TlsError::EmptyValidity)
        ));
    }

    #[test]
    fn keys_never_show_in_debug() {
        let ca = ca();
        let issued = ca
            .issue_server(&["127.0.0.1".into()], Validity::days_from_now(1))
            .unwrap();
        assert!(issued.key_pem().contains("PRIVATE KEY"));
        assert!(!format!("{issued:?}").contains("PRIVATE KEY"));
        assert!(!format!("{ca:?}").contains("PRIVATE KEY"));
    }
}
