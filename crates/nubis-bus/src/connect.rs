//! Connecting to a nats-server: every daemon and the CLI connect through [`connect`], from one
//! [`Credentials`] value and a few named choices.
//!
//! A connection whose credentials carry TLS files ([`crate::config::ClientTls`]) requires TLS
//! and verifies the server against the given CA; one to a server off loopback without TLS is
//! made, as before, but logged as a warning, since what it carries would cross the network in
//! clear.

use std::time::Duration;

use nubis_protocol::message::HostId;
use nubis_protocol::subject::Subject;
use nubis_protocol::SiteId;

use crate::config::Credentials;

/// Where the replies to this connection's requests arrive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbox {
    /// NATS's default `_INBOX.>`.
    Default,
    /// The site's federation inbox: replies from other sites cross the hub to it.
    Federation(SiteId),
    /// The site-internal inbox, which the leaf connection never carries (replies of host agents
    /// name host paths).
    SiteInternal(SiteId),
    /// A host agent's own inbox, under the site-internal subjects only that host may subscribe
    /// to.
    Host(SiteId, HostId),
    /// An operator's own inbox, `_INBOX.<operator>`, the only inbox its user may hear.
    Operator(String),
}

/// How to connect, besides the credentials.
#[derive(Debug, Clone)]
pub struct ConnectSpec {
    /// The connection's name, as the server's monitoring shows it.
    pub name: String,
    /// Where replies arrive.
    pub inbox: Inbox,
    /// How long the first connection may take.
    pub timeout: Duration,
    /// Whether to reconnect forever after losing the server (daemons) or give up after the
    /// client library's default number of attempts (one-shot tools).
    pub reconnect_forever: bool,
}

impl ConnectSpec {
    /// A daemon's connection named `name`: default inbox, 30 s to connect, reconnects forever.
    pub fn daemon(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            inbox: Inbox::Default,
            timeout: Duration::from_secs(30),
            reconnect_forever: true,
        }
    }

    /// A one-shot tool's connection named `name`, giving up after `timeout`.
    pub fn tool(name: impl Into<String>, timeout: Duration) -> Self {
        Self {
            name: name.into(),
            inbox: Inbox::Default,
            timeout,
            reconnect_forever: false,
        }
    }

    /// The same with replies on `inbox`.
    pub fn inbox(mut self, inbox: Inbox) -> Self {
        self.inbox = inbox;
        self
    }
}

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to {url}")]
pub struct ConnectError {
    /// The server.
    pub url: String,
    /// The cause.
    #[source]
    pub source: async_nats::ConnectError,
}

/// The connect options `spec` and `credentials` describe (for callers that add their own, such as
/// event callbacks).
pub fn options(credentials: &Credentials, spec: &ConnectSpec) -> async_nats::ConnectOptions {
    let mut options = match &credentials.login {
        Some(login) => async_nats::ConnectOptions::with_user_and_password(
            login.user.clone(),
            login.password.clone(),
        ),
        None => async_nats::ConnectOptions::new(),
    }
    .name(spec.name.clone());
    if let Some(tls) = &credentials.tls {
        options = options.require_tls(true);
        if let Some(ca) = &tls.ca {
            options = options.add_root_certificates(ca.clone());
        }
        if let Some((cert, key)) = &tls.client {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
    }
    match &spec.inbox {
        Inbox::Default => {}
        Inbox::Federation(site) => {
            options = options.custom_inbox_prefix(Subject::reply_inbox_prefix(site));
        }
        Inbox::SiteInternal(site) => {
            options = options.custom_inbox_prefix(Subject::site_inbox_prefix(site));
        }
        Inbox::Host(site, host) => {
            options = options.custom_inbox_prefix(Subject::host_inbox_prefix(site, host));
        }
        Inbox::Operator(name) => {
            options = options.custom_inbox_prefix(Subject::operator_inbox_prefix(name));
        }
    }
    if spec.reconnect_forever {
        options = options.max_reconnects(None);
    } else {
        options = options.connection_timeout(spec.timeout);
    }
    options
}

/// Connects to the server of `credentials` as `spec` says.
pub async fn connect(
    credentials: &Credentials,
    spec: &ConnectSpec,
) -> Result<async_nats::Client, ConnectError> {
    let error = |source| ConnectError {
        url: credentials.url.clone(),
        source,
    };
    if credentials.tls.is_none()
        && !credentials.url.starts_with("tls://")
        && !credentials.is_loopback()
    {
        tracing::warn!(
            url = %credentials.url,
            "connecting without TLS to a server off loopback; set nats_tls_ca"
        );
    }
    tokio::time::timeout(
        spec.timeout,
        options(credentials, spec).connect(&credentials.url),
    )
    .await
    .map_err(|_| {
        error(async_nats::ConnectError::from(
            async_nats::ConnectErrorKind::TimedOut,
        ))
    })?
    .map_err(error)
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::process::{Child, Command, Stdio};

    use super::*;
    use crate::config::ClientTls;
    use crate::tls::{CertificateAuthority, Validity, CA_CERT_FILE, CERT_FILE, KEY_FILE};

    /// A nats-server whose client port requires TLS and verifies client certificates against
    /// `ca`; killed on drop.
    struct TlsServer(Child);

    impl Drop for TlsServer {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Starts the server and returns it with its client URL, once it has written its ports.
    async fn tls_server(
        binary: &Path,
        dir: &Path,
        ca: &CertificateAuthority,
    ) -> (TlsServer, String) {
        let server_dir = dir.join("server");
        ca.issue_server(&["127.0.0.1".into()], Validity::days_from_now(1))
            .unwrap()
            .write(&server_dir, ca)
            .unwrap();
        let ports = dir.join("ports");
        std::fs::create_dir_all(&ports).unwrap();
        let config = dir.join("server.conf");
        let file = |name: &str| server_dir.join(name).display().to_string();
        std::fs::write(
            &config,
            format!(
                "listen: \"127.0.0.1:-1\"\nports_file_dir: \"{}\"\ntls {{\n  ca_file: \"{}\"\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  verify: true\n}}\n",
                ports.display(),
                file(CA_CERT_FILE),
                file(CERT_FILE),
                file(KEY_FILE)
            ),
        )
        .unwrap();
        let child = Command::new(binary)
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let server = TlsServer(child);
        let url = nubis_testkit::wait_until(nubis_testkit::DEFAULT_TIMEOUT, "ports file", || {
            let ports = ports.clone();
            async move {
                let entry = std::fs::read_dir(&ports)?.flatten().next();
                let text = match entry {
                    Some(entry) => std::fs::read_to_string(entry.path())?,
                    None => String::new(),
                };
                let json: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                json["nats"][0]
                    .as_str()
                    .map(|url| url.replace("nats://", "tls://"))
                    .ok_or_else(|| std::io::Error::other("no client URL yet"))
            }
        })
        .await
        .unwrap();
        (server, url)
    }

    #[tokio::test]
    async fn tls_credentials_connect_to_a_tls_server_and_plain_ones_do_not() {
        let Some(binary) = nubis_testkit::require_nats_server() else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate(Validity::days_from_now(1)).unwrap();
        let (_server, url) = tls_server(binary.path(), dir.path(), &ca).await;
        let client_dir = dir.path().join("client");
        ca.issue_site("client", Validity::days_from_now(1))
            .unwrap()
            .write(&client_dir, &ca)
            .unwrap();
        let spec = ConnectSpec::tool("tls-test", Duration::from_secs(10));

        let mut credentials = Credentials::anonymous(url.clone());
        credentials.tls = Some(ClientTls {
            ca: Some(client_dir.join(CA_CERT_FILE)),
            client: Some((client_dir.join(CERT_FILE), client_dir.join(KEY_FILE))),
        });
        let client = connect(&credentials, &spec).await.unwrap();
        client.flush().await.unwrap();

        // Without a client certificate the server refuses; without the CA the client refuses
        // the server's certificate.
        let mut no_cert = credentials.clone();
        no_cert.tls = Some(ClientTls {
            ca: Some(client_dir.join(CA_CERT_FILE)),
            client: None,
        });
        let mut no_ca = credentials.clone();
        no_ca.tls = Some(ClientTls {
            ca: None,
            client: Some((client_dir.join(CERT_FILE), client_dir.join(KEY_FILE))),
        });
        for refused in [no_cert, no_ca] {
            let result = async {
                let client = connect(&refused, &spec).await?;
                client.flush().await.map_err(|e| ConnectError {
                    url: url.clone(),
                    source: async_nats::ConnectError::with_source(
                        async_nats::ConnectErrorKind::Io,
                        e,
                    ),
                })
            }
            .await;
            assert!(result.is_err(), "{:?}", refused.tls);
        }
    }
}
