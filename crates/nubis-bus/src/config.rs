//! What the three daemons (site, proxy, host agent) share in their configuration files: the
//! error type, which always names the file and the key, the TOML reading, and the credentials
//! that reach the site's nats-server.

use std::path::{Path, PathBuf};

use nubis_protocol::identity::KeyError;
use serde::de::DeserializeOwned;

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
            Self::Invalid { key, .. } | Self::Key { key, .. } => Some(key),
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
/// `nats_password` of every daemon's configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The server, `nats://` or `tls://`.
    pub url: String,
    /// The login, when the server asks for one.
    pub login: Option<Login>,
}

impl Credentials {
    /// Credentials for `url` without a login.
    pub fn anonymous(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            login: None,
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
        }
    }

    /// Validates the values of `nats_url`, `nats_user` and `nats_password` read from `path`.
    pub fn from_keys(
        path: &Path,
        url: String,
        user: Option<String>,
        password: Option<String>,
    ) -> Result<Self, ConfigError> {
        if !(url.starts_with("nats://") || url.starts_with("tls://")) {
            return Err(ConfigError::invalid(
                path,
                "nats_url",
                "must start with nats:// or tls://",
            ));
        }
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
        Ok(Self { url, login })
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
            password.map(String::from),
        )
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
}
