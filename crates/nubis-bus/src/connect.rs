//! Connecting to a nats-server: every daemon and the CLI connect through [`connect`], from one
//! [`Credentials`] value and a few named choices.

use std::time::Duration;

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
    match &spec.inbox {
        Inbox::Default => {}
        Inbox::Federation(site) => {
            options = options.custom_inbox_prefix(Subject::reply_inbox_prefix(site));
        }
        Inbox::SiteInternal(site) => {
            options = options.custom_inbox_prefix(Subject::site_inbox_prefix(site));
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
