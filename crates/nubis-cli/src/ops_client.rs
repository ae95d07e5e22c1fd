//! Talking to a site's operator API (`nubis.ops.<site>.<endpoint>`, JSON) from the CLI.

use std::time::Duration;

use async_nats::service::{NATS_SERVICE_ERROR, NATS_SERVICE_ERROR_CODE};
use clap::Args;
use nubis_protocol::subject::{OpsEndpoint, Subject};
use nubis_protocol::SiteId;

/// How the CLI reaches a site.
#[derive(Debug, Clone, Args)]
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
    /// NATS password.
    #[arg(long, env = "NUBIS_NATS_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// How long to wait for the site's answer, in seconds.
    #[arg(long, default_value_t = 5)]
    pub timeout: u64,
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
    /// Something failed on this side.
    Internal(String),
}

/// Connects to the NATS server named by `conn`, with its credentials.
pub async fn connect(conn: &Connection) -> Result<async_nats::Client, OpsFailure> {
    let mut options = async_nats::ConnectOptions::new()
        .name("nubis-cli")
        .connection_timeout(Duration::from_secs(conn.timeout.max(1)));
    if let (Some(user), Some(password)) = (&conn.user, &conn.password) {
        options = options.user_and_password(user.clone(), password.clone());
    }
    options
        .connect(&conn.nats_url)
        .await
        .map_err(|e| OpsFailure::Unreachable(format!("cannot connect to {}: {e}", conn.nats_url)))
}

/// Sends `request` (JSON) to `endpoint` of the site and returns the JSON answer.
pub async fn call(
    conn: &Connection,
    endpoint: OpsEndpoint,
    request: serde_json::Value,
) -> Result<serde_json::Value, OpsFailure> {
    let site = SiteId::new(&conn.site).map_err(|e| {
        OpsFailure::User(format!(
            "--site {:?} is not a valid site id: {e}",
            conn.site
        ))
    })?;
    let client = connect(conn).await?;
    let subject = Subject::ops(&site, endpoint);
    let payload = serde_json::to_vec(&request).map_err(|e| OpsFailure::Internal(e.to_string()))?;
    let answer = tokio::time::timeout(
        Duration::from_secs(conn.timeout.max(1)),
        client.request(subject.as_str().to_string(), payload.into()),
    )
    .await
    .map_err(|_| {
        OpsFailure::Unreachable(format!(
            "site {site} did not answer on {subject} within {}s",
            conn.timeout
        ))
    })?
    .map_err(|e| match e.kind() {
        async_nats::RequestErrorKind::NoResponders => {
            OpsFailure::Unreachable(format!("no site daemon answers on {subject}"))
        }
        _ => OpsFailure::Unreachable(format!("request on {subject} failed: {e}")),
    })?;
    if let Some(headers) = &answer.headers {
        if let Some(message) = headers.get(NATS_SERVICE_ERROR) {
            return Err(OpsFailure::Refused {
                code: headers
                    .get(NATS_SERVICE_ERROR_CODE)
                    .map(|c| c.to_string())
                    .unwrap_or_default(),
                message: message.to_string(),
            });
        }
    }
    serde_json::from_slice(&answer.payload)
        .map_err(|e| OpsFailure::Internal(format!("site answered with invalid JSON: {e}")))
}
