//! What the three daemons (site, proxy, host agent) share in their configuration files: the
//! error type, which always names the file and the key, the TOML reading, and the credentials
//! that reach the site's nats-server.
//!
//! A password is never shown: [`Secret`] and [`Login`] print `<redacted>` in `Debug`, and it can
//! stay out of the configuration file altogether with `nats_password_file`, a file only its
//! owner may read (the same rule as key files), which the CLI's `--password-file` shares.
//!
//! A connection to a server that is not on loopback should be TLS: [`TlsKeys`] are the keys
//! `nats_tls_ca` (the CA that verifies the server's certificate), `nats_tls_cert` and
//! `nats_tls_key` (a client certificate, for a server that verifies its clients), which
//! [`Credentials::with_tls`] checks into [`ClientTls`]. A site's own processes on the site's
//! machine connect over loopback without them.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use nubis_protocol::identity::KeyError;
use serde::de::DeserializeOwned;
use serde::Deserialize;

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Io {
        /// The configuration file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape (the message names the key and line).
    #[error("{path}: {message}")]
    Parse {
        /// The configuration file.
        path: PathBuf,
        /// What the TOML parser said, including the key and line.
        message: String,
    },
    /// A key has a value that cannot be used.
    #[error("{path}: `{key}` {reason}")]
    Invalid {
        /// The configuration file.
        path: PathBuf,
        /// The offending key, e.g. `partners[1].signing_key`.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A key file named by the configuration cannot be used.
    #[error("{path}: `{key}`")]
    Key {
        /// The configuration file.
        path: PathBuf,
        /// The key naming the key file, e.g. `key_file`.
        key: String,
        /// The cause.
        #[source]
        source: KeyError,
    },
    /// A password file named by the configuration cannot be used.
    #[error("{path}: `{key}`")]
    PasswordFile {
        /// The configuration file.
        path: PathBuf,
        /// The key naming the password file, `nats_password_file`.
        key: String,
        /// The cause.
        #[source]
        source: PasswordFileError,
    },
}

/// Why a password file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PasswordFileError {
    /// The file could not be read.
    #[error("cannot read {file}")]
    Io {
        /// The password file.
        file: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Users other than its owner may read the file.
    #[error("{file} is readable by group or others (mode {mode:o}); chmod 600 it")]
    Loose {
        /// The password file.
        file: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file holds no password.
    #[error("{file} is empty")]
    Empty {
        /// The password file.
        file: PathBuf,
    },
}

/// Reads the password in `file`: its content without the trailing line break. Refused when the
/// file's group or others may read or write it, as key files are.
pub fn read_password_file(file: &Path) -> Result<Secret, PasswordFileError> {
    let io = |source| PasswordFileError::Io {
        file: file.to_path_buf(),
        source,
    };
    let mode = std::fs::metadata(file).map_err(io)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(PasswordFileError::Loose {
            file: file.to_path_buf(),
            mode,
        });
    }
    let text = std::fs::read_to_string(file).map_err(io)?;
    let password = text.strip_suffix('\n').unwrap_or(&text);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        return Err(PasswordFileError::Empty {
            file: file.to_path_buf(),
        });
    }
    Ok(Secret(password.to_string()))
}

/// A password as a configuration file gives it: deserialized from a string, never shown in
/// `Debug`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// `text`, to be kept secret.
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl ConfigError {
    /// `key` of the file at `path` has an unusable value.
    pub fn invalid(path: &Path, key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            path: path.to_path_buf(),
            key: key.into(),
            reason: reason.into(),
        }
    }

    /// The offending key, when the error names one.
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::Invalid { key, .. } | Self::Key { key, .. } | Self::PasswordFile { key, .. } => {
                Some(key)
            }
            Self::Io { .. } | Self::Parse { .. } => None,
        }
    }
}

/// Reads the file at `path`.
pub fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Parses TOML `text` read from `path` into `T`; the error names the key and line.
pub fn parse_toml<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string().trim().replace('\n', " "),
    })
}

/// A user name and password for a nats-server.
#[derive(Clone, PartialEq, Eq)]
pub struct Login {
    /// User name.
    pub user: String,
    /// Password.
    pub password: String,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// How a daemon reaches its site's nats-server: the keys `nats_url`, `nats_user` and
/// `nats_password` (or `nats_password_file`) of every daemon's configuration file, and the TLS
/// keys of [`TlsKeys`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The server, `nats://` or `tls://`.
    pub url: String,
    /// The login, when the server asks for one.
    pub login: Option<Login>,
    /// TLS to the server, required when set.
    pub tls: Option<ClientTls>,
}

/// The TLS files of a connection to a server off loopback. With any of them the connection
/// requires TLS, whatever the URL's scheme.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTls {
    /// The CA certificate (PEM) the server's certificate is verified against; the system's
    /// roots when absent.
    pub ca: Option<PathBuf>,
    /// A client certificate and its private key (PEM), for a server that verifies clients.
    pub client: Option<(PathBuf, PathBuf)>,
}

/// The keys `nats_tls_ca`, `nats_tls_cert` and `nats_tls_key` as a configuration file gives
/// them; relative paths are relative to the file's folder.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct TlsKeys {
    /// `nats_tls_ca`: the CA certificate that verifies the server.
    pub nats_tls_ca: Option<PathBuf>,
    /// `nats_tls_cert`: a client certificate; needs `nats_tls_key`.
    pub nats_tls_cert: Option<PathBuf>,
    /// `nats_tls_key`: the client certificate's private key, readable by its owner only.
    pub nats_tls_key: Option<PathBuf>,
}

impl Credentials {
    /// Credentials for `url` without a login.
    pub fn anonymous(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            login: None,
            tls: None,
        }
    }

    /// Credentials for `url` with `user` and `password`.
    pub fn with_login(
        url: impl Into<String>,
        user: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        Self {
            url: url.into(),
            login: Some(Login {
                user: user.into(),
                password: password.into(),
            }),
            tls: None,
        }
    }

    /// The same credentials with the TLS keys `keys` read from `path`: the files must exist,
    /// a client certificate needs its key and the other way round, and the key must be readable
    /// by its owner only (as password files). No key at all leaves the credentials as they are.
    pub fn with_tls(mut self, path: &Path, keys: TlsKeys) -> Result<Self, ConfigError> {
        let resolve = |key: &str, file: Option<PathBuf>| -> Result<Option<PathBuf>, ConfigError> {
            let Some(file) = file else { return Ok(None) };
            let file = match path.parent() {
                Some(dir) if file.is_relative() => dir.join(file),
                _ => file,
            };
            let metadata = std::fs::metadata(&file).map_err(|e| {
                ConfigError::invalid(
                    path,
                    key,
                    format!("cannot be read: {}: {e}", file.display()),
                )
            })?;
            let mode = metadata.permissions().mode() & 0o777;
            if key == "nats_tls_key" && mode & 0o077 != 0 {
                return Err(ConfigError::invalid(
                    path,
                    key,
                    format!(
                        "{} is readable by group or others (mode {mode:o}); chmod 600 it",
                        file.display()
                    ),
                ));
            }
            Ok(Some(file))
        };
        let ca = resolve("nats_tls_ca", keys.nats_tls_ca)?;
        let cert = resolve("nats_tls_cert", keys.nats_tls_cert)?;
        let key = resolve("nats_tls_key", keys.nats_tls_key)?;
        let client = match (cert, key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::invalid(
                    path,
                    "nats_tls_key",
                    "is required with nats_tls_cert",
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::invalid(
                    path,
                    "nats_tls_cert",
                    "is required with nats_tls_key",
                ))
            }
        };
        if ca.is_some() || client.is_some() {
            self.tls = Some(ClientTls { ca, client });
        }
        Ok(self)
    }

    /// Whether the server is on this machine: its host is `localhost` or a loopback address.
    /// Connections to any other server should use TLS.
    pub fn is_loopback(&self) -> bool {
        let authority = self
            .url
            .split_once("://")
            .map_or(self.url.as_str(), |(_, rest)| rest);
        let authority = authority
            .split(['/', '?', '#', ','])
            .next()
            .unwrap_or_default();
        let host = match authority.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or_default(),
            None => authority
                .rsplit_once(':')
                .map_or(authority, |(host, _)| host),
        };
        host.eq_ignore_ascii_case("localhost")
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }

    /// Validates the values of `nats_url`, `nats_user` and `nats_password` or
    /// `nats_password_file` read from `path`; a relative password file resolves against the
    /// folder of `path`.
    pub fn from_keys(
        path: &Path,
        url: String,
        user: Option<String>,
        password: Option<Secret>,
        password_file: Option<PathBuf>,
    ) -> Result<Self, ConfigError> {
        if !(url.starts_with("nats://") || url.starts_with("tls://")) {
            return Err(ConfigError::invalid(
                path,
                "nats_url",
                "must start with nats:// or tls://",
            ));
        }
        let authority = url.split_once("://").map_or("", |(_, rest)| {
            rest.split(['/', '?', '#']).next().unwrap_or_default()
        });
        if authority.contains('@') {
            // A URL is shown in errors and logs: a login in it would be too.
            return Err(ConfigError::invalid(
                path,
                "nats_url",
                "must not carry a user or password; use nats_user and nats_password_file",
            ));
        }
        let password = match (password, password_file) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::invalid(
                    path,
                    "nats_password_file",
                    "cannot be given with nats_password",
                ))
            }
            (Some(p), None) => Some(p.0),
            (None, Some(file)) => {
                let file = match path.parent() {
                    Some(dir) if file.is_relative() => dir.join(file),
                    _ => file,
                };
                let secret =
                    read_password_file(&file).map_err(|source| ConfigError::PasswordFile {
                        path: path.to_path_buf(),
                        key: "nats_password_file".into(),
                        source,
                    })?;
                Some(secret.0)
            }
            (None, None) => None,
        };
        let login = match (user, password) {
            (None, None) => None,
            (Some(user), Some(_)) if user.is_empty() => {
                return Err(ConfigError::invalid(path, "nats_user", "must not be empty"))
            }
            (Some(user), Some(password)) => Some(Login { user, password }),
            (Some(_), None) => {
                return Err(ConfigError::invalid(
                    path,
                    "nats_password",
                    "is required with nats_user",
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::invalid(
                    path,
                    "nats_user",
                    "is required with nats_password",
                ))
            }
        };
        Ok(Self {
            url,
            login,
            tls: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(
        url: &str,
        user: Option<&str>,
        password: Option<&str>,
    ) -> Result<Credentials, ConfigError> {
        Credentials::from_keys(
            Path::new("/etc/nubis/x.toml"),
            url.into(),
            user.map(String::from),
            password.map(Secret::new),
            None,
        )
    }

    /// A configuration file beside a password file holding `content` with `mode`.
    fn password_file(content: &str, mode: u32) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("nats.pw");
        std::fs::write(&file, content).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
        let config = dir.path().join("site.toml");
        (dir, config)
    }

    fn from_file(config: &Path, file: &str) -> Result<Credentials, ConfigError> {
        Credentials::from_keys(
            config,
            "nats://x".into(),
            Some("site".into()),
            None,
            Some(PathBuf::from(file)),
        )
    }

    #[test]
    fn a_password_file_beside_the_configuration_gives_the_password() {
        let (dir, config) = password_file("s3cret\n", 0o600);
        let c = from_file(&config, "nats.pw").unwrap();
        assert_eq!(c, Credentials::with_login("nats://x", "site", "s3cret"));
        // An absolute path works from anywhere.
        let abs = dir.path().join("nats.pw");
        let c = from_file(Path::new("/etc/nubis/x.toml"), abs.to_str().unwrap()).unwrap();
        assert_eq!(c.login.map(|l| l.password).as_deref(), Some("s3cret"));
        assert_eq!(
            read_password_file(&abs).unwrap().expose(),
            "s3cret",
            "the one reader the CLI shares"
        );
    }

    #[test]
    fn a_loose_empty_or_missing_password_file_is_refused_naming_the_key() {
        for mode in [0o640, 0o604, 0o660] {
            let (_dir, config) = password_file("s3cret", mode);
            let err = from_file(&config, "nats.pw").unwrap_err();
            assert!(
                matches!(&err, ConfigError::PasswordFile { key, source: PasswordFileError::Loose { .. }, .. } if key == "nats_password_file"),
                "{mode:o}: {err:?}"
            );
        }
        let (_dir, config) = password_file("\n", 0o600);
        let err = from_file(&config, "nats.pw").unwrap_err();
        assert!(matches!(
            err,
            ConfigError::PasswordFile {
                source: PasswordFileError::Empty { .. },
                ..
            }
        ));
        let err = from_file(&config, "absent.pw").unwrap_err();
        assert!(matches!(
            err,
            ConfigError::PasswordFile {
                source: PasswordFileError::Io { .. },
                ..
            }
        ));
        assert_eq!(err.key(), Some("nats_password_file"));
    }

    #[test]
    fn a_password_and_a_password_file_together_are_refused() {
        let (_dir, config) = password_file("s3cret", 0o600);
        let err = Credentials::from_keys(
            &config,
            "nats://x".into(),
            Some("site".into()),
            Some(Secret::new("other")),
            Some(PathBuf::from("nats.pw")),
        )
        .unwrap_err();
        assert_eq!(err.key(), Some("nats_password_file"));
    }

    #[test]
    fn secrets_and_logins_are_redacted_in_debug() {
        let secret = Secret::new("s3cret");
        assert_eq!(format!("{secret:?}"), "<redacted>");
        let login = Login {
            user: "site".into(),
            password: "s3cret".into(),
        };
        assert!(!format!("{login:?}").contains("s3cret"));
        assert!(!format!("{login:#?}").contains("s3cret"));
        let raw: Secret = toml::from_str::<std::collections::BTreeMap<String, Secret>>(
            "nats_password = \"s3cret\"",
        )
        .unwrap()
        .remove("nats_password")
        .unwrap();
        assert_eq!(raw.expose(), "s3cret");
    }

    #[test]
    fn credentials_name_the_key_that_is_wrong() {
        let key =
            |r: Result<Credentials, ConfigError>| r.err().and_then(|e| e.key().map(String::from));
        assert_eq!(
            key(keys("http://x", None, None)).as_deref(),
            Some("nats_url")
        );
        assert_eq!(
            key(keys("nats://u:s3cret@x:4222", None, None)).as_deref(),
            Some("nats_url")
        );
        assert_eq!(
            key(keys("nats://x", Some("u"), None)).as_deref(),
            Some("nats_password")
        );
        assert_eq!(
            key(keys("nats://x", None, Some("p"))).as_deref(),
            Some("nats_user")
        );
        assert_eq!(
            key(keys("nats://x", Some(""), Some("p"))).as_deref(),
            Some("nats_user")
        );
        let err = keys("http://x", None, None).err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("/etc/nubis/x.toml: `nats_url` must start with nats:// or tls://")
        );
    }

    #[test]
    fn valid_credentials_keep_the_login_and_hide_the_password() {
        let c = keys("tls://hub:4222", Some("site"), Some("s3cret")).ok();
        assert_eq!(
            c,
            Some(Credentials::with_login("tls://hub:4222", "site", "s3cret"))
        );
        assert!(!format!("{c:?}").contains("s3cret"));
        assert_eq!(
            keys("nats://x", None, None).ok(),
            Some(Credentials::anonymous("nats://x"))
        );
    }

    /// A configuration file beside a CA, a certificate and a key file of `key_mode`.
    fn tls_files(key_mode: u32) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        for (name, mode) in [
            ("ca.pem", 0o644),
            ("cert.pem", 0o644),
            ("key.pem", key_mode),
        ] {
            let file = dir.path().join(name);
            std::fs::write(&file, "pem").unwrap();
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let config = dir.path().join("site.toml");
        (dir, config)
    }

    fn tls_keys(ca: Option<&str>, cert: Option<&str>, key: Option<&str>) -> TlsKeys {
        TlsKeys {
            nats_tls_ca: ca.map(PathBuf::from),
            nats_tls_cert: cert.map(PathBuf::from),
            nats_tls_key: key.map(PathBuf::from),
        }
    }

    #[test]
    fn tls_keys_resolve_beside_the_configuration_and_require_tls() {
        let (dir, config) = tls_files(0o600);
        let base = Credentials::with_login("nats://site.example.org:4222", "site", "pw");
        let c = base
            .clone()
            .with_tls(
                &config,
                tls_keys(Some("ca.pem"), Some("cert.pem"), Some("key.pem")),
            )
            .unwrap();
        assert_eq!(
            c.tls,
            Some(ClientTls {
                ca: Some(dir.path().join("ca.pem")),
                client: Some((dir.path().join("cert.pem"), dir.path().join("key.pem"))),
            })
        );
        let c = base
            .clone()
            .with_tls(&config, tls_keys(Some("ca.pem"), None, None))
            .unwrap();
        assert_eq!(c.tls.and_then(|t| t.ca), Some(dir.path().join("ca.pem")));
        // No key at all: plain, as before.
        assert_eq!(
            base.clone().with_tls(&config, TlsKeys::default()).unwrap(),
            base
        );
        let keys: TlsKeys = toml::from_str("nats_tls_ca = \"ca.pem\"").unwrap();
        assert_eq!(keys, tls_keys(Some("ca.pem"), None, None));
    }

    #[test]
    fn tls_keys_that_cannot_be_used_are_refused_naming_the_key() {
        let (_dir, config) = tls_files(0o640);
        let base = Credentials::anonymous("tls://hub:4222");
        let key = |keys| {
            base.clone()
                .with_tls(&config, keys)
                .unwrap_err()
                .key()
                .map(String::from)
        };
        assert_eq!(
            key(tls_keys(None, Some("cert.pem"), Some("key.pem"))).as_deref(),
            Some("nats_tls_key"),
            "a key others may read"
        );
        let (_dir, config) = tls_files(0o600);
        let key = |keys| {
            base.clone()
                .with_tls(&config, keys)
                .unwrap_err()
                .key()
                .map(String::from)
        };
        assert_eq!(
            key(tls_keys(None, Some("cert.pem"), None)).as_deref(),
            Some("nats_tls_key")
        );
        assert_eq!(
            key(tls_keys(None, None, Some("key.pem"))).as_deref(),
            Some("nats_tls_cert")
        );
        assert_eq!(
            key(tls_keys(Some("absent.pem"), None, None)).as_deref(),
            Some("nats_tls_ca")
        );
    }

    #[test]
    fn loopback_servers_are_told_apart() {
        for url in [
            "nats://127.0.0.1:4222",
            "nats://localhost:4222",
            "tls://[::1]:4222",
            "nats://127.0.0.2",
        ] {
            assert!(Credentials::anonymous(url).is_loopback(), "{url}");
        }
        for url in [
            "nats://10.0.0.1:4222",
            "tls://hub.example.org:4222",
            "nats://[2001:db8::1]:4222",
            "nats://localhost.example.org",
        ] {
            assert!(!Credentials::anonymous(url).is_loopback(), "{url}");
        }
    }
}
