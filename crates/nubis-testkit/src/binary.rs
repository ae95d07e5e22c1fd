//! Finding the `nats-server` binary and checking that it is new enough.
//!
//! nubis needs nats-server 2.10 or newer: the JetStream API of 2.9 answers `$JS.API.INFO` without
//! the reserved-storage fields that async-nats expects, so key-value buckets cannot even be
//! created. The check runs the binary once with `--version` and names the version it found.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Environment variable naming the `nats-server` binary to use instead of the one on `PATH`.
pub const NATS_SERVER_ENV: &str = "NUBIS_NATS_SERVER";

/// The oldest nats-server release nubis works with.
pub const MIN_VERSION: Version = Version {
    major: 2,
    minor: 10,
    patch: 0,
};

/// A nats-server release number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    /// Major release.
    pub major: u32,
    /// Minor release.
    pub minor: u32,
    /// Patch release.
    pub patch: u32,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl Version {
    /// Parses the output of `nats-server --version`, e.g. `nats-server: v2.10.27`.
    ///
    /// Pre-release suffixes (`v2.11.0-RC.1`) are ignored: they order before the release, but a
    /// release candidate of a supported line is good enough for tests.
    pub fn parse_version_output(output: &str) -> Option<Version> {
        output.split_whitespace().find_map(|word| {
            let numbers = word.strip_prefix('v').unwrap_or(word);
            let mut parts = numbers.splitn(3, '.');
            let major = parts.next()?.parse().ok()?;
            let minor = parts.next()?.parse().ok()?;
            let patch_text = parts.next()?;
            let digits: String = patch_text
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            let patch = digits.parse().ok()?;
            Some(Version {
                major,
                minor,
                patch,
            })
        })
    }
}

/// Why no usable `nats-server` binary was found.
#[derive(Debug, thiserror::Error)]
pub enum LocateError {
    /// The binary does not exist where it was looked for.
    #[error("nats-server not found ({searched}); install it with scripts/setup.sh or set {NATS_SERVER_ENV}")]
    NotFound {
        /// Where the search looked: a path, or `PATH`.
        searched: String,
    },
    /// The binary exists but could not be run.
    #[error("cannot run {}", path.display())]
    Run {
        /// The binary.
        path: PathBuf,
        /// What running it reported.
        #[source]
        source: std::io::Error,
    },
    /// `--version` printed something that is not a version.
    #[error("{} --version printed no version: {output:?}", path.display())]
    UnrecognisedVersion {
        /// The binary.
        path: PathBuf,
        /// What it printed.
        output: String,
    },
    /// The binary is older than [`MIN_VERSION`].
    #[error("nats-server {found} at {} is too old; nubis needs {required} or newer", path.display())]
    NatsServerTooOld {
        /// The binary.
        path: PathBuf,
        /// The version it reported.
        found: Version,
        /// The oldest version nubis accepts.
        required: Version,
    },
}

/// A `nats-server` binary whose version has been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsServerBinary {
    path: PathBuf,
    version: Version,
}

impl NatsServerBinary {
    /// Finds the binary named by `NUBIS_NATS_SERVER`, or else `nats-server` on `PATH`, and checks
    /// its version.
    pub fn locate() -> Result<Self, LocateError> {
        match std::env::var_os(NATS_SERVER_ENV) {
            Some(path) if !path.is_empty() => Self::at(PathBuf::from(path)),
            _ => Self::at(find_on_path(std::env::var_os("PATH"))?),
        }
    }

    /// Checks the binary at `path`.
    pub fn at(path: impl Into<PathBuf>) -> Result<Self, LocateError> {
        let path = path.into();
        if !path.is_file() {
            return Err(LocateError::NotFound {
                searched: path.display().to_string(),
            });
        }
        let output = Command::new(&path)
            .arg("--version")
            .output()
            .map_err(|source| LocateError::Run {
                path: path.clone(),
                source,
            })?;
        // nats-server prints its version on stdout; look at stderr too so a wrapper script that
        // writes there still works.
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let version = Version::parse_version_output(&text).ok_or_else(|| {
            LocateError::UnrecognisedVersion {
                path: path.clone(),
                output: text.trim().to_owned(),
            }
        })?;
        if version < MIN_VERSION {
            return Err(LocateError::NatsServerTooOld {
                path,
                found: version,
                required: MIN_VERSION,
            });
        }
        Ok(Self { path, version })
    }

    /// Where the binary is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The version it reported.
    pub fn version(&self) -> Version {
        self.version
    }
}

/// Directories searched after `PATH`. Debian's package installs the server in `/usr/sbin`,
/// which is not on an ordinary user's `PATH`.
const SBIN_DIRS: [&str; 2] = ["/usr/local/sbin", "/usr/sbin"];

fn find_on_path(path_var: Option<OsString>) -> Result<PathBuf, LocateError> {
    let dirs: Vec<PathBuf> = path_var
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.into_iter()
        .chain(SBIN_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| LocateError::NotFound {
            searched: format!("nats-server on PATH or in {}", SBIN_DIRS.join(", ")),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_release_and_prerelease_output() {
        let v = Version::parse_version_output("nats-server: v2.10.27\n").unwrap();
        assert_eq!(v.to_string(), "2.10.27");
        let rc = Version::parse_version_output("nats-server: v2.11.0-RC.1").unwrap();
        assert_eq!(
            rc,
            Version {
                major: 2,
                minor: 11,
                patch: 0
            }
        );
        assert!(Version::parse_version_output("command not found").is_none());
    }

    #[test]
    fn versions_order_numerically_not_lexically() {
        let old = Version::parse_version_output("v2.9.10").unwrap();
        let new = Version::parse_version_output("v2.10.0").unwrap();
        assert!(old < MIN_VERSION);
        assert!(new >= MIN_VERSION);
    }

    #[test]
    fn missing_path_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let err = NatsServerBinary::at(dir.path().join("nats-server")).unwrap_err();
        assert!(matches!(err, LocateError::NotFound { .. }), "{err}");
        // An empty PATH still finds a server in the sbin directories, if one is there.
        let found = find_on_path(Some(dir.path().as_os_str().to_owned()));
        match found {
            Ok(path) => assert!(SBIN_DIRS.iter().any(|d| path.starts_with(d))),
            Err(err) => assert!(matches!(err, LocateError::NotFound { .. }), "{err}"),
        }
    }
}
