//! The serve loop of every signed service (a site daemon's federation subjects, a Transfer
//! proxy's subjects): verify first, then dispatch, then sign.
//!
//! - A request is verified (signature, pinned sender, recipient, subject, freshness, replay)
//!   before any handler sees it; one that fails is answered with a signed `ErrorReply` carrying
//!   the envelope layer's code, signed over the subject the request *arrived on*, never over a
//!   subject the unverified sender wrote into its envelope.
//! - At most [`Limits::concurrency`] handlers run at once, and at most
//!   [`Limits::per_sender`] of them for one verified sender: requests wait in a bounded queue
//!   per sender and free slots go round-robin across the senders with work waiting, so one
//!   partner flooding a site cannot take every slot. A request finding its sender's queue full
//!   is refused as `busy`.
//! - A handler's error reply is signed as the reply to its request.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;

use futures::StreamExt as _;
use nubis_protocol::envelope::{self, now_ms, Addressing, EnvelopeError, Opened, Verifier};
use nubis_protocol::identity::SiteIdentity;
use nubis_protocol::message::{Body, ErrorCode, ErrorReply};
use nubis_protocol::SiteId;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

/// What a handler answers: the encoded, signed reply, or an error reply to sign.
pub type HandlerResult = Result<Vec<u8>, ErrorReply>;

/// How many requests a service handles at once, in all and per sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Handlers running at once, in all.
    pub concurrency: usize,
    /// Handlers running at once for one sender.
    pub per_sender: usize,
    /// Verified requests of one sender waiting for a slot; more are refused as `busy`.
    pub queue_per_sender: usize,
}

impl Limits {
    /// `concurrency` slots in all, at most half of them (at least one) for one sender, and a
    /// queue per sender of four times the slots.
    pub fn new(concurrency: usize) -> Self {
        let concurrency = concurrency.max(1);
        Self {
            concurrency,
            per_sender: concurrency.div_ceil(2),
            queue_per_sender: concurrency.saturating_mul(4),
        }
    }
}

/// The signing side of a service: who signs its answers.
#[derive(Debug, Clone)]
pub struct Service {
    /// The service's name in logs (e.g. `fed`, `proxy`).
    pub name: &'static str,
    /// Signs every answer.
    pub identity: Arc<SiteIdentity>,
    /// Verifies every request.
    pub verifier: Arc<Verifier>,
    /// Concurrency limits.
    pub limits: Limits,
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
/// from (or to no one in particular when it does not decode), bound to its nonce when it
/// decodes, and over the subject it arrived on.
pub fn sign_refusal(
    identity: &SiteIdentity,
    raw: &[u8],
    arrived_on: &str,
    reply: &ErrorReply,
) -> Option<Vec<u8>> {
    let decoded = envelope::SignedEnvelope::decode(raw).ok();
    let to = decoded
        .as_ref()
        .map(|e| e.from.clone())
        .unwrap_or_else(|| envelope::BROADCAST.to_string());
    let addressing = Addressing {
        to: &to,
        subject: arrived_on,
        re: decoded.as_ref().map(|e| e.nonce),
    };
    match envelope::sign(identity, addressing, reply, now_ms()).and_then(|e| e.encode()) {
        Ok(bytes) => Some(bytes),
        Err(e) => {
            tracing::warn!(error = %e, "cannot sign a refusal");
            None
        }
    }
}

/// A verified request waiting for a slot.
struct Job<Op> {
    op: Op,
    opened: Opened,
    subject: String,
    reply_to: async_nats::Subject,
}

/// The per-sender queues and the round-robin order of senders with work waiting.
struct Scheduler<Op> {
    limits: Limits,
    running: usize,
    senders: HashMap<SiteId, SenderState<Op>>,
    turn: VecDeque<SiteId>,
}

struct SenderState<Op> {
    waiting: VecDeque<Job<Op>>,
    running: usize,
}

impl<Op> Scheduler<Op> {
    fn new(limits: Limits) -> Self {
        Self {
            limits,
            running: 0,
            senders: HashMap::new(),
            turn: VecDeque::new(),
        }
    }

    /// Queues `job`; gives it back when its sender's queue is full.
    fn push(&mut self, from: SiteId, job: Job<Op>) -> Result<(), Box<Job<Op>>> {
        let state = self
            .senders
            .entry(from.clone())
            .or_insert_with(|| SenderState {
                waiting: VecDeque::new(),
                running: 0,
            });
        if state.waiting.len() >= self.limits.queue_per_sender {
            return Err(Box::new(job));
        }
        state.waiting.push_back(job);
        if !self.turn.contains(&from) {
            self.turn.push_back(from);
        }
        Ok(())
    }

    /// The next job to start, if a slot is free: the first sender in turn that has work waiting
    /// and a slot of its own left goes to the back of the turn.
    fn next(&mut self) -> Option<(SiteId, Job<Op>)> {
        if self.running >= self.limits.concurrency {
            return None;
        }
        for _ in 0..self.turn.len() {
            let from = self.turn.pop_front()?;
            let Some(state) = self.senders.get_mut(&from) else {
                continue;
            };
            if state.running >= self.limits.per_sender {
                self.turn.push_back(from);
                continue;
            }
            let Some(job) = state.waiting.pop_front() else {
                continue;
            };
            state.running += 1;
            self.running += 1;
            if !state.waiting.is_empty() {
                self.turn.push_back(from.clone());
            }
            return Some((from, job));
        }
        None
    }

    /// A handler of `from` has finished.
    fn done(&mut self, from: &SiteId) {
        self.running = self.running.saturating_sub(1);
        if let Some(state) = self.senders.get_mut(from) {
            state.running = state.running.saturating_sub(1);
            if state.running == 0 && state.waiting.is_empty() {
                self.senders.remove(from);
            } else if !state.waiting.is_empty() && !self.turn.contains(from) {
                self.turn.push_back(from.clone());
            }
        }
    }
}

/// Serves the requests arriving on `subscription`: `parse` names the operation of a subject
/// (`None`: not a request of this service, ignored), each verified request goes to `handler`,
/// and its answer is signed and sent to the request's reply subject. Returns once the loop
/// runs; it stops when `cancel` fires or the subscription ends.
pub fn serve<Op, P, H, Fut>(
    service: Service,
    client: async_nats::Client,
    mut subscription: async_nats::Subscriber,
    tracker: &TaskTracker,
    cancel: CancellationToken,
    parse: P,
    handler: H,
) where
    Op: Copy + Send + 'static,
    P: Fn(&str) -> Option<Op> + Send + Sync + 'static,
    H: Fn(Op, Opened) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    let handler = Arc::new(handler);
    let inner = tracker.clone();
    tracker.spawn(async move {
        let mut scheduler = Scheduler::new(service.limits);
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<SiteId>();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                Some(from) = done_rx.recv() => scheduler.done(&from),
                m = subscription.next() => {
                    let Some(msg) = m else { break };
                    admit(&service, &client, &mut scheduler, &parse, msg).await;
                }
            }
            while let Some((from, job)) = scheduler.next() {
                let (service, client, handler, done) = (
                    service.clone(),
                    client.clone(),
                    handler.clone(),
                    done_tx.clone(),
                );
                inner.spawn(async move {
                    run(&service, &client, job, &*handler).await;
                    // The loop may have stopped; nothing waits for the slot then.
                    if done.send(from).is_err() {
                        tracing::trace!("serve loop gone before a handler finished");
                    }
                });
            }
        }
        if let Err(e) = subscription.unsubscribe().await {
            tracing::debug!(error = %e, service = service.name, "unsubscribe failed");
        }
    });
}

/// Verifies one message and queues it, or answers its refusal.
async fn admit<Op, P>(
    service: &Service,
    client: &async_nats::Client,
    scheduler: &mut Scheduler<Op>,
    parse: &P,
    msg: async_nats::Message,
) where
    P: Fn(&str) -> Option<Op>,
{
    let Some(reply_to) = msg.reply.clone() else {
        tracing::debug!(subject = %msg.subject, service = service.name, "message without reply subject ignored");
        return;
    };
    let subject = msg.subject.to_string();
    let Some(op) = parse(&subject) else {
        return;
    };
    let opened = match service
        .verifier
        .open_request(&msg.payload, &subject, now_ms())
    {
        Ok(opened) => opened,
        Err(e) => {
            tracing::warn!(error = %e, subject = %subject, service = service.name, "request refused by the envelope layer");
            let reply = ErrorReply::new(ErrorCode::from_wire(e.code()), e.to_string());
            answer(
                client,
                reply_to,
                sign_refusal(&service.identity, &msg.payload, &subject, &reply),
            )
            .await;
            return;
        }
    };
    let from = opened.from.clone();
    let job = Job {
        op,
        opened,
        subject,
        reply_to,
    };
    if let Err(job) = scheduler.push(from.clone(), job) {
        tracing::warn!(from = %from, service = service.name, "sender's queue is full; request refused as busy");
        let reply = ErrorReply::new(
            ErrorCode::Busy,
            format!("too many requests of {from} waiting; try again later"),
        );
        answer(
            client,
            job.reply_to,
            sign_reply(&service.identity, &job.opened, &reply).ok(),
        )
        .await;
    }
}

/// Runs the handler of one verified request and sends its signed answer.
async fn run<Op, H, Fut>(service: &Service, client: &async_nats::Client, job: Job<Op>, handler: &H)
where
    H: Fn(Op, Opened) -> Fut,
    Fut: Future<Output = HandlerResult>,
{
    let Job {
        op,
        opened,
        subject,
        reply_to,
    } = job;
    let from = opened.from.clone();
    let span =
        tracing::info_span!("request", service = service.name, subject = %subject, from = %from);
    async {
        let bytes = match handler(op, opened.clone()).await {
            Ok(bytes) => Some(bytes),
            Err(reply) => {
                tracing::info!(code = reply.code.as_str(), message = %reply.message, "request refused");
                match sign_reply(&service.identity, &opened, &reply) {
                    Ok(bytes) => Some(bytes),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot sign an error reply");
                        None
                    }
                }
            }
        };
        answer(client, reply_to, bytes).await;
    }
    .instrument(span)
    .await;
}

async fn answer(
    client: &async_nats::Client,
    reply_to: async_nats::Subject,
    bytes: Option<Vec<u8>>,
) {
    if let Some(bytes) = bytes {
        if let Err(e) = client.publish(reply_to, bytes.into()).await {
            tracing::warn!(error = %e, "cannot send reply");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(n: u32) -> Job<u32> {
        let identity = SiteIdentity::generate(SiteId::new("x").unwrap_or_else(|_| unreachable!()));
        let (bytes, _) = envelope::seal_message(
            &identity,
            Addressing::request(identity.site(), "s"),
            &ErrorReply::new(ErrorCode::Internal, "x"),
        )
        .unwrap_or_else(|_| unreachable!());
        let env = envelope::SignedEnvelope::decode(&bytes).unwrap_or_else(|_| unreachable!());
        Job {
            op: n,
            opened: Opened {
                from: identity.site().clone(),
                envelope: env,
            },
            subject: "s".into(),
            reply_to: "r".into(),
        }
    }

    fn site(s: &str) -> SiteId {
        SiteId::new(s).unwrap_or_else(|_| unreachable!())
    }

    #[test]
    fn a_flooding_sender_cannot_take_every_slot() {
        let mut s = Scheduler::new(Limits {
            concurrency: 4,
            per_sender: 2,
            queue_per_sender: 100,
        });
        for n in 0..50 {
            assert!(s.push(site("flood"), job(n)).is_ok());
        }
        // The flooder gets its two slots and no more.
        let started: Vec<_> = std::iter::from_fn(|| s.next()).collect();
        assert_eq!(started.len(), 2);
        // A request of another sender arriving now starts at once.
        assert!(s.push(site("quiet"), job(1000)).is_ok());
        let (from, j) = s.next().expect("a free slot for the other sender");
        assert_eq!((from.as_str(), j.op), ("quiet", 1000));
        // And when the flooder's handler finishes, its next request takes the slot back.
        s.done(&site("flood"));
        let (from, j) = s.next().expect("the flooder's next request");
        assert_eq!((from.as_str(), j.op), ("flood", 2));
    }

    #[test]
    fn free_slots_go_round_robin_and_queues_are_bounded() {
        let mut s = Scheduler::new(Limits {
            concurrency: 1,
            per_sender: 1,
            queue_per_sender: 2,
        });
        for n in 0..2 {
            assert!(s.push(site("a"), job(n)).is_ok());
            assert!(s.push(site("b"), job(10 + n)).is_ok());
        }
        // Full queue: refused, the legitimate sender's queue is untouched.
        assert!(s.push(site("a"), job(99)).is_err());
        let mut order = Vec::new();
        while let Some((from, j)) = s.next() {
            order.push((from.to_string(), j.op));
            s.done(&from);
        }
        assert_eq!(
            order,
            vec![
                ("a".to_string(), 0),
                ("b".to_string(), 10),
                ("a".to_string(), 1),
                ("b".to_string(), 11)
            ]
        );
        assert!(s.senders.is_empty(), "no state kept for idle senders");
    }
}
