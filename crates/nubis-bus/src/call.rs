//! The signed client: sends a signed request to a site (or to one of its proxies) and accepts
//! only a reply that the site asked has signed, bound to the request's nonce and subject.
//!
//! One timeout and retry policy ([`CallPolicy`]) applies to every signed call of a daemon:
//! federation calls between sites and calls to Transfer proxies alike.

use std::sync::Arc;
use std::time::Duration;

use nubis_protocol::envelope::{self, now_ms, Addressing, EnvelopeError, Verifier};
use nubis_protocol::identity::SiteIdentity;
use nubis_protocol::message::{Body, ErrorCode, ErrorReply};
use nubis_protocol::subject::Subject;
use nubis_protocol::SiteId;

use crate::replies::Replies;

/// Why a signed request did not produce the expected reply.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Nobody answered in time.
    #[error("site {site} did not answer {op} in time")]
    Timeout {
        /// The site asked.
        site: SiteId,
        /// The operation.
        op: &'static str,
    },
    /// Nothing listens on the subject (the daemon is down or restarting).
    #[error("site {site} is unreachable (no responders for {op})")]
    Unreachable {
        /// The site asked.
        site: SiteId,
        /// The operation.
        op: &'static str,
    },
    /// The site answered with an error reply.
    #[error("site {site} refused {op}: {} ({})", reply.message, reply.code.as_str())]
    Refused {
        /// The site asked.
        site: SiteId,
        /// The operation.
        op: &'static str,
        /// Its error reply.
        reply: ErrorReply,
    },
    /// The reply did not verify or decode, or another site signed it.
    #[error("reply of site {site} to {op} refused")]
    BadReply {
        /// The site asked.
        site: SiteId,
        /// The operation.
        op: &'static str,
        /// Why.
        #[source]
        source: EnvelopeError,
    },
    /// The request could not be signed or sent.
    #[error("cannot send {op} to site {site}")]
    Send {
        /// The site.
        site: SiteId,
        /// The operation.
        op: &'static str,
        /// Why.
        #[source]
        source: async_nats::Error,
    },
}

impl CallError {
    /// The error reply to pass upstream when this failure ends a forwarded request.
    pub fn to_reply(&self) -> ErrorReply {
        match self {
            Self::Refused { reply, .. } => reply.clone(),
            Self::Timeout { .. } | Self::Unreachable { .. } => {
                ErrorReply::new(ErrorCode::Timeout, self.to_string())
            }
            Self::BadReply { .. } | Self::Send { .. } => {
                ErrorReply::new(ErrorCode::Internal, self.to_string())
            }
        }
    }

    /// The stable code of a refusal, if the peer answered with one.
    pub fn code(&self) -> Option<&ErrorCode> {
        match self {
            Self::Refused { reply, .. } => Some(&reply.code),
            _ => None,
        }
    }
}

/// How long a signed call waits, and how often a call that found no responder is repeated.
///
/// Only "no responders" is repeated: the request never reached a handler, so sending it again
/// (signed anew, with a fresh nonce) cannot act twice. A timeout is never repeated here: the
/// peer may be acting on the request, and the caller's protocol decides what comes next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallPolicy {
    /// How long to wait for a reply.
    pub timeout: Duration,
    /// How many times a call answered "no responders" is sent again.
    pub no_responder_retries: u32,
    /// The pause before the first repetition; it doubles for each further one.
    pub retry_backoff: Duration,
}

impl Default for CallPolicy {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            no_responder_retries: 0,
            retry_backoff: Duration::from_millis(200),
        }
    }
}

impl CallPolicy {
    /// The default policy with timeout `timeout`.
    pub fn with_timeout(timeout: Duration) -> Self {
        Self {
            timeout,
            ..Self::default()
        }
    }
}

/// Where a signed request goes and who must sign its reply.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// The subject of the request.
    pub subject: &'a Subject,
    /// The site that must sign the reply (the request's recipient).
    pub signer: &'a SiteId,
    /// The operation, for errors and logs.
    pub op: &'static str,
}

/// Sends signed requests as one site and verifies the replies.
#[derive(Debug, Clone)]
pub struct SignedClient {
    client: async_nats::Client,
    identity: Arc<SiteIdentity>,
    verifier: Arc<Verifier>,
    policy: CallPolicy,
    /// Whether `client` takes its replies on the site's federation inbox (then every call's
    /// reply comes on an inbox only the site asked may publish to).
    federation: bool,
    replies: Arc<Replies>,
}

impl SignedClient {
    /// A client signing as `identity` and verifying replies with `verifier`.
    pub fn new(
        client: async_nats::Client,
        identity: Arc<SiteIdentity>,
        verifier: Arc<Verifier>,
        policy: CallPolicy,
    ) -> Self {
        let federation = client
            .new_inbox()
            .starts_with(&Subject::reply_inbox_prefix(identity.site()));
        Self {
            client,
            identity,
            verifier,
            policy,
            federation,
            replies: Arc::default(),
        }
    }

    /// The same client with another policy.
    pub fn with_policy(mut self, policy: CallPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The policy in force.
    pub fn policy(&self) -> CallPolicy {
        self.policy
    }

    /// The site this client signs as.
    pub fn site(&self) -> &SiteId {
        self.identity.site()
    }

    /// The NATS connection underneath.
    pub fn nats(&self) -> &async_nats::Client {
        &self.client
    }

    /// Sends `body` to `target` under this client's policy and returns the verified reply.
    pub async fn call<Req: Body, Rep: Body>(
        &self,
        target: Target<'_>,
        body: &Req,
    ) -> Result<Rep, CallError> {
        self.call_with_timeout(target, body, self.policy.timeout)
            .await
    }

    /// Like [`SignedClient::call`] with an explicit timeout.
    pub async fn call_with_timeout<Req: Body, Rep: Body>(
        &self,
        target: Target<'_>,
        body: &Req,
        timeout: Duration,
    ) -> Result<Rep, CallError> {
        let mut backoff = self.policy.retry_backoff;
        let mut attempt = 0;
        loop {
            match self.call_once(target, body, timeout).await {
                Err(CallError::Unreachable { .. })
                    if attempt < self.policy.no_responder_retries =>
                {
                    attempt += 1;
                    tracing::debug!(
                        site.id = %target.signer,
                        op = target.op,
                        attempt,
                        "no responders; sending again"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = backoff.saturating_mul(2);
                }
                other => return other,
            }
        }
    }

    async fn call_once<Req: Body, Rep: Body>(
        &self,
        target: Target<'_>,
        body: &Req,
        timeout: Duration,
    ) -> Result<Rep, CallError> {
        let Target {
            subject,
            signer,
            op,
        } = target;
        let send_error = |source: async_nats::Error| CallError::Send {
            site: signer.clone(),
            op,
            source,
        };
        let (bytes, nonce) = envelope::seal_message(
            &self.identity,
            Addressing::request(signer, subject.as_str()),
            body,
        )
        .map_err(|e| send_error(e.into()))?;
        let timed_out = || CallError::Timeout {
            site: signer.clone(),
            op,
        };
        let answer = if self.federation {
            // The reply comes on an inbox that only the site asked may publish to (the hub's
            // permissions), so no third site can answer first; one subscription per site asked.
            let waiting = self
                .replies
                .wait(&self.client, self.identity.site(), signer)
                .await
                .map_err(|e| send_error(e.into()))?;
            self.client
                .publish_with_reply(
                    subject.as_str().to_string(),
                    waiting.reply_to.clone(),
                    bytes.into(),
                )
                .await
                .map_err(|e| send_error(e.into()))?;
            match tokio::time::timeout(timeout, &mut { waiting }.reply).await {
                Err(_) => return Err(timed_out()),
                Ok(Err(_)) => return Err(send_error("the connection closed".into())),
                Ok(Ok(m)) if m.status == Some(async_nats::StatusCode::NO_RESPONDERS) => {
                    return Err(CallError::Unreachable {
                        site: signer.clone(),
                        op,
                    })
                }
                Ok(Ok(m)) => m,
            }
        } else {
            // Site-internal and default connections keep their own inbox.
            let request = async_nats::Request::new()
                .payload(bytes.into())
                .timeout(Some(timeout));
            self.client
                .send_request(subject.as_str().to_string(), request)
                .await
                .map_err(|e| match e.kind() {
                    async_nats::RequestErrorKind::NoResponders => CallError::Unreachable {
                        site: signer.clone(),
                        op,
                    },
                    async_nats::RequestErrorKind::TimedOut => timed_out(),
                    _ => send_error(e.into()),
                })?
        };
        let bad = |source| CallError::BadReply {
            site: signer.clone(),
            op,
            source,
        };
        let opened = self
            .verifier
            .open_reply(&answer.payload, subject.as_str(), &nonce, now_ms())
            .map_err(bad)?;
        // Another pinned site may sign a well-formed reply too: only the site asked speaks
        // for its own answer.
        if &opened.from != signer {
            return Err(bad(EnvelopeError::UnknownSender(opened.from.to_string())));
        }
        if opened.body_type() == ErrorReply::TYPE {
            let reply = opened.body::<ErrorReply>().map_err(bad)?;
            return Err(CallError::Refused {
                site: signer.clone(),
                op,
                reply,
            });
        }
        opened.body::<Rep>().map_err(bad)
    }
}
