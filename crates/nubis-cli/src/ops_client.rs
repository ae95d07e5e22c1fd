//! How the CLI reaches a site's operator API: the connection arguments every command shares,
//! and the failure classes its exit codes are made of. The calls themselves are
//! `nubis_bus::ops`.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use clap::Args;
use nubis_bus::ops::{OpsClient, OpsError};
use nubis_bus::{ConnectSpec, Credentials, Inbox};
use nubis_protocol::SiteId;

/// How the CLI reaches a site. The password comes from `--password-file` (a file only its owner
/// may read), `NUBIS_NATS_PASSWORD`, or `--password` (visible to other users in the process
/// list: prefer the other two); `Debug` never shows it.
#[derive(Clone, Args)]
pub struct Connection {
    /// The site to talk to.
    #[arg(long, env = "NUBIS_SITE")]
    pub site: String,
    /// The NATS server to connect through (any server of the federation that routes to the site).
    #[arg(long, env = "NUBIS_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// NATS user (the site's operator account).
    #[arg(long, env = "NUBIS_NATS_USER")]
    pub user: Option<String>,
    /// NATS password (prefer --password-file or NUBIS_NATS_PASSWORD: a command line is
    /// visible to other users).
    #[arg(long, env = "NUBIS_NATS_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// A file holding the NATS password, readable by its owner only (mode 600).
    #[arg(long, conflicts_with = "password")]
    pub password_file: Option<PathBuf>,
    /// How long to wait for the site's answer, in seconds.
    #[arg(long, default_value_t = 5)]
    pub timeout: u64,
    /// The CA certificate that verifies a TLS server's certificate (a server off loopback);
    /// with it the connection requires TLS.
    #[arg(long, env = "NUBIS_NATS_TLS_CA")]
    pub nats_tls_ca: Option<PathBuf>,
    /// A client certificate, for a server that verifies its clients (with --nats-tls-key).
    #[arg(long, env = "NUBIS_NATS_TLS_CERT", requires = "nats_tls_key")]
    pub nats_tls_cert: Option<PathBuf>,
    /// The client certificate's private key, readable by its owner only (mode 600).
    #[arg(long, env = "NUBIS_NATS_TLS_KEY", requires = "nats_tls_cert")]
    pub nats_tls_key: Option<PathBuf>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("site", &self.site)
            .field("nats_url", &self.nats_url)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("password_file", &self.password_file)
            .field("timeout", &self.timeout)
            .field("nats_tls_ca", &self.nats_tls_ca)
            .field("nats_tls_cert", &self.nats_tls_cert)
            .field("nats_tls_key", &self.nats_tls_key)
            .finish()
    }
}

impl Connection {
    /// The password, from `--password-file`, else `--password` or `NUBIS_NATS_PASSWORD`.
    pub fn password(&self) -> Result<Option<String>, OpsFailure> {
        match &self.password_file {
            Some(file) => nubis_bus::config::read_password_file(file)
                .map(|s| Some(s.expose().to_string()))
                .map_err(|e| OpsFailure::User(format!("--password-file: {}", chain(&e)))),
            None => Ok(self.password.clone()),
        }
    }

    /// The site named by `--site`.
    pub fn site_id(&self) -> Result<SiteId, OpsFailure> {
        SiteId::new(&self.site).map_err(|e| {
            OpsFailure::User(format!(
                "--site {:?} is not a valid site id: {e}",
                self.site
            ))
        })
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout.max(1))
    }
}

/// How an operator request failed.
#[derive(Debug)]
pub enum OpsFailure {
    /// The arguments were wrong.
    User(String),
    /// The site could not be reached.
    Unreachable(String),
    /// The site answered with an error.
    Refused {
        /// The service error code.
        code: String,
        /// The site's message.
        message: String,
    },
    /// The server refused to carry the request: the user's role does not allow it.
    Forbidden {
        /// The subject of the request.
        subject: String,
        /// The server's report.
        server: String,
    },
    /// Something failed on this side.
    Internal(String),
}

/// The error and its causes, `: `-separated.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

impl From<OpsError> for OpsFailure {
    fn from(e: OpsError) -> Self {
        match e {
            OpsError::Refused { status, message } => OpsFailure::Refused {
                code: if status == 0 {
                    "?".into()
                } else {
                    status.to_string()
                },
                message,
            },
            OpsError::NoResponders { ref subject } | OpsError::Timeout { ref subject, .. } => {
                match violation_for(subject) {
                    Some(violation) => OpsFailure::Forbidden {
                        subject: subject.clone(),
                        server: violation,
                    },
                    None => OpsFailure::Unreachable(chain(&e)),
                }
            }
            OpsError::Request { .. } => OpsFailure::Unreachable(chain(&e)),
            OpsError::Encode { .. } | OpsError::Decode { .. } => OpsFailure::Internal(chain(&e)),
        }
    }
}

/// The permissions violations the server reported on this process's connection. The server
/// drops a message its user may not publish and tells the client only through an `-ERR`, so a
/// refused request just goes unanswered: its failure is explained from what is noted here.
static VIOLATIONS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// The violation the server reported for `subject`, if any.
fn violation_for(subject: &str) -> Option<String> {
    let seen = VIOLATIONS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    seen.iter()
        .find(|m| m.contains(&format!("\"{subject}\"")) || m.ends_with(subject))
        .cloned()
}

/// Connects to the NATS server named by `conn`, with its credentials.
pub async fn connect(conn: &Connection) -> Result<async_nats::Client, OpsFailure> {
    let credentials = match (&conn.user, conn.password()?) {
        (Some(user), Some(password)) => Credentials::with_login(&conn.nats_url, user, password),
        _ => Credentials::anonymous(&conn.nats_url),
    };
    // The paths as given, relative to the working directory; errors name the command line.
    let credentials = credentials
        .with_tls(
            std::path::Path::new("command line"),
            nubis_bus::config::TlsKeys {
                nats_tls_ca: conn.nats_tls_ca.clone(),
                nats_tls_cert: conn.nats_tls_cert.clone(),
                nats_tls_key: conn.nats_tls_key.clone(),
            },
        )
        .map_err(|e| OpsFailure::User(chain(&e)))?;
    let mut spec = ConnectSpec::tool("nubis-cli", conn.timeout());
    // An operator hears replies only on its own inbox (`_INBOX.<its user>`).
    if let Some(user) = &conn.user {
        spec = spec.inbox(Inbox::Operator(user.clone()));
    }
    let options =
        nubis_bus::connect::options(&credentials, &spec).event_callback(|event| async move {
            if let async_nats::Event::ServerError(async_nats::ServerError::Other(message)) = event {
                if message
                    .to_ascii_lowercase()
                    .contains("permissions violation")
                {
                    VIOLATIONS
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push(message);
                }
            }
        });
    tokio::time::timeout(spec.timeout, options.connect(&credentials.url))
        .await
        .map_err(|_| {
            OpsFailure::Unreachable(format!("cannot connect to {}: timed out", credentials.url))
        })?
        .map_err(|e| {
            OpsFailure::Unreachable(format!(
                "cannot connect to {}: {}",
                credentials.url,
                chain(&e)
            ))
        })
}

/// A client of the operator API of the site named by `conn`: as the operator named by `--user`
/// (on `nubis.ops.<site>.<user>.<endpoint>`, the subjects the server lets only that user
/// publish to), or on the shared subjects without a user.
pub async fn client(conn: &Connection) -> Result<OpsClient, OpsFailure> {
    let site = conn.site_id()?;
    let nats = connect(conn).await?;
    let client = OpsClient::new(nats, site, conn.timeout());
    Ok(match &conn.user {
        Some(user) => client.as_operator(user),
        None => client,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::os::unix::fs::PermissionsExt as _;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        conn: Connection,
    }

    fn parse(args: &[&str]) -> Result<Connection, clap::Error> {
        let mut all = vec!["nubis", "--site", "a"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).map(|c| c.conn)
    }

    #[test]
    fn the_password_never_shows_in_debug() {
        let conn = parse(&["--user", "operator", "--password", "s3cret"]).unwrap();
        assert_eq!(conn.password().unwrap().as_deref(), Some("s3cret"));
        assert!(!format!("{conn:?}").contains("s3cret"));
        assert!(!format!("{conn:#?}").contains("s3cret"));
    }

    #[test]
    fn the_password_can_come_from_a_private_file_but_not_with_password() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("nats.pw");
        std::fs::write(&file, "s3cret\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let path = file.to_str().unwrap();
        let conn = parse(&["--user", "operator", "--password-file", path]).unwrap();
        assert_eq!(conn.password().unwrap().as_deref(), Some("s3cret"));
        assert!(!format!("{conn:?}").contains("s3cret"));
        let both = parse(&["--password", "x", "--password-file", path]).unwrap_err();
        assert_eq!(both.kind(), clap::error::ErrorKind::ArgumentConflict);
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let loose = parse(&["--password-file", path]).unwrap();
        assert!(matches!(loose.password(), Err(OpsFailure::User(_))));
    }
}
