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
            Self::Timeout { .. } => ErrorReply::new(ErrorCode::Timeout, self.to_string()),
            // Nothing acted on the request: upstream learns that at once, and may wait and
            // send it again without fearing it acted twice.
            Self::Unreachable { .. } => ErrorReply::new(ErrorCode::Unreachable, self.to_string()),
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

/// How long a signed call waits, and how long a call that found no responder is repeated.
///
/// Only "no responders" is repeated: the request never reached a handler, so sending it again
/// (signed anew, with a fresh nonce) cannot act twice. That is what a peer whose daemon is
/// restarting answers, so the call waits for it: pauses growing exponentially from
/// `retry_backoff` up to `retry_backoff_max`, each drawn uniformly below its cap ("full
/// jitter", so that many callers waiting for one restart do not come back in step), for at
/// most `no_responder_wait` in all; past it the call fails [`CallError::Unreachable`]. A
/// timeout is never repeated here: the peer may be acting on the request, and the caller's
/// protocol decides what comes next.
///
/// A site that forwards requests for others (an Intermediary) should keep `no_responder_wait`
/// below `timeout`: its upstream, waiting `timeout` itself, then learns `unreachable` rather
/// than timing out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallPolicy {
    /// How long to wait for a reply.
    pub timeout: Duration,
    /// How long, in all, a call answered "no responders" keeps being sent again; zero sends
    /// it once.
    pub no_responder_wait: Duration,
    /// The cap of the first pause between two sends; it doubles for each further one.
    pub retry_backoff: Duration,
    /// The largest cap of one pause.
    pub retry_backoff_max: Duration,
}

impl Default for CallPolicy {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            no_responder_wait: Duration::from_secs(30),
            retry_backoff: Duration::from_millis(100),
            retry_backoff_max: Duration::from_secs(2),
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

    /// The same policy, repeating a call that found no responder for at most `wait`.
    pub fn with_no_responder_wait(self, wait: Duration) -> Self {
        Self {
            no_responder_wait: wait,
            ..self
        }
    }

    /// The pause before send number `attempt + 1` (`attempt` ≥ 1): uniform below
    /// `retry_backoff` × 2^(`attempt` − 1), capped at `retry_backoff_max`.
    pub fn pause(&self, attempt: u32) -> Duration {
        full_jitter(backoff_cap(
            self.retry_backoff,
            self.retry_backoff_max,
            attempt,
        ))
    }
}

/// The cap of pause number `attempt` (≥ 1) of an exponential backoff from `first` to `max`.
pub fn backoff_cap(first: Duration, max: Duration, attempt: u32) -> Duration {
    let doublings = attempt.saturating_sub(1).min(31);
    first.saturating_mul(1 << doublings).min(max)
}

/// A duration drawn uniformly from `[0, cap]` ("full jitter").
pub fn full_jitter(cap: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    // Each `RandomState` is seeded afresh; its hash of nothing is a random word, which is all
    // a pause needs (it protects nothing).
    let word = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(word % nanos.saturating_add(1))
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
        let started = tokio::time::Instant::now();
        let mut attempt = 0;
        loop {
            match self.call_once(target, body, timeout).await {
                Err(e @ CallError::Unreachable { .. }) => {
                    attempt += 1;
                    let waited = started.elapsed();
                    let Some(left) = self.policy.no_responder_wait.checked_sub(waited) else {
                        return Err(e);
                    };
                    if left.is_zero() {
                        return Err(e);
                    }
                    let pause = self.policy.pause(attempt).min(left);
                    tracing::debug!(
                        site.id = %target.signer,
                        op = target.op,
                        attempt,
                        pause_ms = pause.as_millis() as u64,
                        "no responders; sending again"
                    );
                    tokio::time::sleep(pause).await;
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use futures::StreamExt;
    use nubis_protocol::envelope::Verifier;
    use nubis_protocol::message::ListVms;
    use nubis_protocol::replay::ReplayCache;
    use nubis_protocol::subject::FederationOp;
    use nubis_testkit::{require_nats_server, Federation, Role};

    use super::*;

    #[test]
    fn pauses_grow_exponentially_up_to_their_cap_and_are_drawn_below_it() {
        let (first, max) = (Duration::from_millis(100), Duration::from_secs(2));
        let caps: Vec<_> = (1..=7).map(|n| backoff_cap(first, max, n)).collect();
        let ms: Vec<u128> = caps.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(backoff_cap(first, max, u32::MAX), max);
        let policy = CallPolicy::default();
        for attempt in 1..50 {
            assert!(policy.pause(attempt) <= policy.retry_backoff_max);
        }
        assert_eq!(full_jitter(Duration::ZERO), Duration::ZERO);
    }

    fn client(nats: &async_nats::Client, policy: CallPolicy) -> SignedClient {
        let me = Arc::new(SiteIdentity::generate(SiteId::new("a").unwrap()));
        let verifier = Verifier::new(
            me.site().clone(),
            std::iter::empty(),
            ReplayCache::temporary(600_000).unwrap(),
        );
        SignedClient::new(nats.clone(), me, Arc::new(verifier), policy)
    }

    async fn ask(client: &SignedClient, subject: &Subject) -> Result<ListVms, CallError> {
        let b = SiteId::new("b").unwrap();
        let target = Target {
            subject,
            signer: &b,
            op: "test",
        };
        client.call(target, &ListVms {}).await
    }

    #[tokio::test]
    async fn no_responders_are_sent_again_until_the_bound_and_a_timeout_never() {
        let Some(binary) = require_nats_server() else {
            return;
        };
        let fed = Federation::start_with(&binary, &["a"]).await.unwrap();
        let nats = fed.connect_as("a", Role::Admin).await.unwrap();
        let subject = Subject::federation(&SiteId::new("b").unwrap(), FederationOp::VmControl);

        // Nobody listens: the call keeps trying for the whole window, then says so.
        let wait = Duration::from_millis(400);
        let policy = CallPolicy::with_timeout(Duration::from_secs(5)).with_no_responder_wait(wait);
        let started = tokio::time::Instant::now();
        let e = ask(&client(&nats, policy), &subject).await.unwrap_err();
        assert!(matches!(e, CallError::Unreachable { .. }), "{e:?}");
        assert!(started.elapsed() >= wait, "{:?}", started.elapsed());
        assert_eq!(e.to_reply().code, ErrorCode::Unreachable);

        // Someone listens and never answers: one request, one timeout, however long the
        // no-responder window.
        let mut listener = nats.subscribe(subject.as_str().to_string()).await.unwrap();
        nats.flush().await.unwrap();
        let policy = CallPolicy::with_timeout(Duration::from_millis(300))
            .with_no_responder_wait(Duration::from_secs(30));
        let e = ask(&client(&nats, policy), &subject).await.unwrap_err();
        assert!(matches!(e, CallError::Timeout { .. }), "{e:?}");
        assert_eq!(e.to_reply().code, ErrorCode::Timeout);
        // Messages of one connection arrive in order: everything before the marker was sent
        // by the call.
        nats.publish(subject.as_str().to_string(), "marker".into())
            .await
            .unwrap();
        let mut requests = 0;
        while let Some(m) = listener.next().await {
            if m.payload.as_ref() == b"marker" {
                break;
            }
            requests += 1;
        }
        assert_eq!(requests, 1);
    }
}
