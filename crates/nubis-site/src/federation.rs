//! Signed requests between sites: the client side (send, verify the reply) and the server side
//! (verify a request, dispatch it to a role, sign the reply or an error reply).
//!
//! Every request and reply is a signed envelope. A request that fails verification is answered
//! with a signed `ErrorReply` carrying the envelope layer's code, and reaches no role handler.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::Client;
use futures::StreamExt as _;
use nubis_protocol::envelope::{self, now_ms, Addressing, EnvelopeError, Opened, Verifier};
use nubis_protocol::identity::SiteIdentity;
use nubis_protocol::message::{Body, ErrorCode, ErrorReply};
use nubis_protocol::subject::{FederationOp, ParsedSubject, Subject};
use nubis_protocol::SiteId;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

/// Why a request to another site did not produce the expected reply.
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
    /// No site daemon listens on the subject.
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
    /// The reply did not verify or decode.
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
            Self::Timeout { .. } => ErrorReply::new(ErrorCode::Timeout, self.to_string()),
            Self::Unreachable { .. } => ErrorReply::new(ErrorCode::Timeout, self.to_string()),
            Self::BadReply { .. } | Self::Send { .. } => {
                ErrorReply::new(ErrorCode::Internal, self.to_string())
            }
        }
    }
}

/// Sends signed requests to partner sites and verifies their replies.
#[derive(Debug, Clone)]
pub struct FederationClient {
    client: Client,
    identity: Arc<SiteIdentity>,
    verifier: Arc<Verifier>,
    timeout: Duration,
}

impl FederationClient {
    /// A client signing as `identity` and verifying replies with `verifier`.
    pub fn new(
        client: Client,
        identity: Arc<SiteIdentity>,
        verifier: Arc<Verifier>,
        timeout: Duration,
    ) -> Self {
        Self {
            client,
            identity,
            verifier,
            timeout,
        }
    }

    /// This site.
    pub fn site(&self) -> &SiteId {
        self.identity.site()
    }

    /// Sends `body` to operation `op` of site `to` and returns its verified reply.
    pub async fn call<Req: Body, Rep: Body>(
        &self,
        to: &SiteId,
        op: FederationOp,
        body: &Req,
    ) -> Result<Rep, CallError> {
        self.call_with_timeout(to, op, body, self.timeout).await
    }

    /// Like [`FederationClient::call`] with an explicit timeout.
    pub async fn call_with_timeout<Req: Body, Rep: Body>(
        &self,
        to: &SiteId,
        op: FederationOp,
        body: &Req,
        timeout: Duration,
    ) -> Result<Rep, CallError> {
        let op_name = op.suffix();
        let subject = Subject::federation(to, op);
        let env = envelope::sign(
            &self.identity,
            Addressing::request(to, subject.as_str()),
            body,
            now_ms(),
        )
        .map_err(|e| CallError::Send {
            site: to.clone(),
            op: op_name,
            source: e.into(),
        })?;
        let nonce = env.nonce;
        let bytes = env.encode().map_err(|e| CallError::Send {
            site: to.clone(),
            op: op_name,
            source: e.into(),
        })?;
        let answer = tokio::time::timeout(
            timeout,
            self.client
                .request(subject.as_str().to_string(), bytes.into()),
        )
        .await
        .map_err(|_| CallError::Timeout {
            site: to.clone(),
            op: op_name,
        })?
        .map_err(|e| match e.kind() {
            async_nats::RequestErrorKind::NoResponders => CallError::Unreachable {
                site: to.clone(),
                op: op_name,
            },
            async_nats::RequestErrorKind::TimedOut => CallError::Timeout {
                site: to.clone(),
                op: op_name,
            },
            _ => CallError::Send {
                site: to.clone(),
                op: op_name,
                source: e.into(),
            },
        })?;
        let bad = |source| CallError::BadReply {
            site: to.clone(),
            op: op_name,
            source,
        };
        let opened = self
            .verifier
            .open_reply(&answer.payload, subject.as_str(), &nonce, now_ms())
            .map_err(bad)?;
        if opened.from != *to {
            return Err(bad(EnvelopeError::UnknownSender(opened.from.to_string())));
        }
        if opened.body_type() == ErrorReply::TYPE {
            let reply = opened.body::<ErrorReply>().map_err(bad)?;
            return Err(CallError::Refused {
                site: to.clone(),
                op: op_name,
                reply,
            });
        }
        opened.body::<Rep>().map_err(bad)
    }
}

/// Signs `reply` (or an error) as the answer to `request`.
pub fn sign_reply<B: Body>(
    identity: &SiteIdentity,
    request: &Opened,
    reply: &B,
) -> Result<Vec<u8>, EnvelopeError> {
    envelope::sign(identity, Addressing::reply_to(request), reply, now_ms())?.encode()
}

/// Signs an error reply to a request that did not verify: addressed to whoever it claims to be
/// from, bound to its nonce when the envelope could be decoded at all.
fn sign_refusal(
    identity: &SiteIdentity,
    raw: &[u8],
    subject: &str,
    error: &EnvelopeError,
) -> Option<Vec<u8>> {
    let reply = ErrorReply::new(ErrorCode::from_wire(error.code()), error.to_string());
    let decoded = envelope::SignedEnvelope::decode(raw).ok();
    let to = decoded
        .as_ref()
        .map(|e| e.from.clone())
        .unwrap_or_else(|| envelope::BROADCAST.to_string());
    let addressing = Addressing {
        to: &to,
        subject,
        re: decoded.as_ref().map(|e| e.nonce),
    };
    envelope::sign(identity, addressing, &reply, now_ms())
        .ok()?
        .encode()
        .ok()
}

/// What a role handler answers: the encoded, signed reply, or an error reply to sign.
pub type HandlerResult = Result<Vec<u8>, ErrorReply>;

/// Serves `nubis.fed.<site>.>`: verifies every request, hands it to `handler`, and signs the
/// answer. At most `concurrency` requests are handled at once; more wait for a slot.
#[allow(clippy::too_many_arguments)]
pub async fn serve<H, Fut>(
    client: Client,
    identity: Arc<SiteIdentity>,
    verifier: Arc<Verifier>,
    concurrency: usize,
    tracker: &TaskTracker,
    cancel: CancellationToken,
    handler: H,
) -> Result<(), async_nats::Error>
where
    H: Fn(FederationOp, Opened) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    let site = identity.site().clone();
    let mut sub = client
        .subscribe(Subject::federation_all(&site).as_str().to_string())
        .await?;
    let handler = Arc::new(handler);
    let slots = Arc::new(Semaphore::new(concurrency.max(1)));
    let inner = tracker.clone();
    tracker.spawn(async move {
        loop {
            let msg = tokio::select! {
                _ = cancel.cancelled() => break,
                m = sub.next() => match m { Some(m) => m, None => break },
            };
            let Some(reply_to) = msg.reply.clone() else {
                tracing::debug!(subject = %msg.subject, "federation message without reply subject ignored");
                continue;
            };
            let Ok(permit) = slots.clone().acquire_owned().await else { break };
            let (client, identity, verifier, handler, site) = (
                client.clone(),
                identity.clone(),
                verifier.clone(),
                handler.clone(),
                site.clone(),
            );
            inner.spawn(async move {
                let _permit = permit;
                let subject = msg.subject.to_string();
                let op = match Subject::parse(&subject) {
                    Ok(ParsedSubject::Federation { site: s, op }) if s == site => op,
                    _ => return,
                };
                let span = tracing::info_span!("fed", site.id = %site, op = op.suffix());
                async move {
                    let answer = match verifier.open_request(&msg.payload, &subject, now_ms()) {
                        Err(e) => {
                            tracing::warn!(error = %e, "request refused by the envelope layer");
                            sign_refusal(&identity, &msg.payload, &subject, &e)
                        }
                        Ok(opened) => {
                            let from = opened.from.clone();
                            match (*handler)(op, opened.clone()).await {
                                Ok(bytes) => Some(bytes),
                                Err(reply) => {
                                    tracing::info!(from = %from, code = reply.code.as_str(), message = %reply.message, "request refused");
                                    sign_reply(&identity, &opened, &reply).ok()
                                }
                            }
                        }
                    };
                    if let Some(bytes) = answer {
                        if let Err(e) = client.publish(reply_to, bytes.into()).await {
                            tracing::warn!(error = %e, "cannot send reply");
                        }
                    }
                }
                .instrument(span)
                .await;
            });
        }
    });
    Ok(())
}
