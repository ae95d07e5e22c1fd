//! The durable way up the chain: every batch this site hands to a VM's upstream site waits in
//! the outbox, a JetStream work-queue stream in the site's own domain, until the upstream has
//! acknowledged it with a signed [`BatchStored`] — which it sends only once the batch is in its
//! own accounting stream and, unless it is the primary, in its own outbox. So a batch that a
//! host agent was told is stored reaches the primary's accounting even when a hub node, a link
//! or a daemon fails on the way: it is sent again until it is acknowledged, and every hop's
//! accounting keeps it once (the message id is scoped by the hop that signed it).
//!
//! The outbox is bounded ([`MAX_BYTES`]); a full one refuses new batches, so that the host
//! agent keeps them (and its KPI rows stay unpublished) rather than anything being dropped.
//! Each send is signed afresh, so a batch that waited through a partition is not refused as
//! stale. A batch the upstream refuses for good (its VM is not on record there) is given up
//! after [`REFUSED_ATTEMPTS`] sends and counted as `delivery_failed`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream, AckKind};
use async_nats::HeaderMap;
use futures::StreamExt as _;
use nubis_bus::call::{backoff_cap, full_jitter};
use nubis_bus::{CallError, SignedClient, Target as CallTarget};
use nubis_protocol::codec;
use nubis_protocol::descriptor::DataPoint;
use nubis_protocol::message::{BatchStored, ErrorCode, ErrorReply, MonitoringBatch};
use nubis_protocol::subject::Subject;
use nubis_protocol::SiteId;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::Monitoring;
use crate::accounting::{self, DATA_POINT_HEADER, DUPLICATE_WINDOW};

/// The outbox stream's name, in the site's own JetStream domain.
pub const OUTBOX_STREAM: &str = "NUBIS_OUTBOX";

/// The durable consumer that sends the outbox's batches.
const CONSUMER: &str = "nubis-deliver";

/// Header naming the upstream site a batch goes to.
const UPSTREAM_HEADER: &str = "Nubis-Upstream";

/// Most bytes the outbox holds; beyond, new batches are refused (the sender keeps them).
pub const MAX_BYTES: i64 = 1 << 30;

/// How long a batch may wait for its upstream before it is given up.
const MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// How long a sent batch may go unacknowledged before it is sent again.
const ACK_WAIT: Duration = Duration::from_secs(30);

/// Batches in flight to upstream sites at once.
const IN_FLIGHT: usize = 64;

/// Sends of a batch that the upstream refused before it is given up.
const REFUSED_ATTEMPTS: i64 = 10;

/// First and longest pause before a batch that was not acknowledged is sent again.
const RETRY: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(15));

/// How long one publish into the outbox waits for the server's acknowledgement.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// The outbox of one site.
#[derive(Clone, Debug)]
pub struct Outbox {
    site: SiteId,
    js: jetstream::Context,
}

/// The outbox stream's configuration for `site`.
pub fn stream_config(site: &SiteId) -> stream::Config {
    stream::Config {
        name: OUTBOX_STREAM.to_string(),
        description: Some(format!(
            "nubis outbox: monitoring batches site {site} passes up the chain, until acknowledged"
        )),
        subjects: vec![Subject::outbox_all(site).as_str().to_string()],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        max_bytes: MAX_BYTES,
        discard: stream::DiscardPolicy::New,
        max_age: MAX_AGE,
        duplicate_window: DUPLICATE_WINDOW,
        ..Default::default()
    }
}

fn consumer_config() -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(CONSUMER.to_string()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: ACK_WAIT,
        max_ack_pending: IN_FLIGHT as i64,
        ..Default::default()
    }
}

fn outbox_error(e: impl std::fmt::Display) -> ErrorReply {
    ErrorReply::new(
        ErrorCode::Busy,
        format!("monitoring outbox cannot take the batch now: {e}"),
    )
}

impl Outbox {
    /// The outbox of `site` on `client` (a connection to the site's own server).
    pub fn new(client: async_nats::Client, site: SiteId) -> Self {
        let mut js = jetstream::new(client);
        js.set_timeout(PUBLISH_TIMEOUT);
        Self { site, js }
    }

    async fn ensure(&self) -> Result<stream::Stream, async_nats::Error> {
        let config = stream_config(&self.site);
        self.js.get_or_create_stream(config.clone()).await?;
        self.js.update_stream(&config).await?;
        Ok(self.js.get_stream(OUTBOX_STREAM).await?)
    }

    /// Puts `batch` (of `data_point`) in the outbox for `upstream`; returns once the server
    /// has stored it. The same batch put twice within the de-duplication window is kept once.
    pub async fn put(
        &self,
        upstream: &SiteId,
        data_point: &DataPoint,
        batch: &MonitoringBatch,
    ) -> Result<(), ErrorReply> {
        let payload = codec::to_vec(batch).map_err(outbox_error)?;
        let mut headers = HeaderMap::new();
        headers.insert(UPSTREAM_HEADER, upstream.as_str());
        headers.insert(DATA_POINT_HEADER, data_point.as_str());
        headers.insert(
            "Nats-Msg-Id",
            accounting::message_id(upstream, batch).as_str(),
        );
        let subject = Subject::outbox(&self.site, upstream).as_str().to_string();
        let mut tried_create = false;
        loop {
            let sent = self
                .js
                .publish_with_headers(subject.clone(), headers.clone(), payload.clone().into())
                .await;
            let acked = match sent {
                Ok(ack) => ack.await.map(drop).map_err(async_nats::Error::from),
                Err(e) => Err(e.into()),
            };
            match acked {
                Ok(()) => return Ok(()),
                // The stream may not exist yet (first use, or the server lost it): make it once.
                Err(e) if !tried_create => {
                    tracing::debug!(error = %e, "outbox publish failed; ensuring the stream");
                    tried_create = true;
                    self.ensure().await.map_err(outbox_error)?;
                }
                Err(e) => return Err(outbox_error(e)),
            }
        }
    }
}

/// What became of one send of a batch.
enum Sent {
    /// The upstream stored it.
    Acknowledged,
    /// The upstream refused it: it may know the VM later (a hand-over in progress), so the
    /// batch is sent again a few times.
    Refused(ErrorReply),
    /// No answer (no responder, a timeout, a link down): sent again until acknowledged.
    Unanswered(String),
}

impl Monitoring {
    /// Sends the outbox's batches to their upstream sites until `cancel`, re-creating the
    /// stream and its consumer whenever the site's server lost them.
    pub(super) async fn run_outbox(
        self: Arc<Self>,
        calls: SignedClient,
        cancel: CancellationToken,
    ) {
        let slots = Arc::new(Semaphore::new(IN_FLIGHT));
        let mut pause = RETRY.0;
        loop {
            let run = self.drain_outbox(&calls, &slots, &cancel);
            let outcome = tokio::select! {
                () = cancel.cancelled() => return,
                r = run => r,
            };
            if let Err(e) = outcome {
                tracing::warn!(error = %e, "monitoring outbox not readable; trying again");
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(full_jitter(pause)) => {}
            }
            pause = (pause * 2).min(RETRY.1);
        }
    }

    async fn drain_outbox(
        self: &Arc<Self>,
        calls: &SignedClient,
        slots: &Arc<Semaphore>,
        cancel: &CancellationToken,
    ) -> Result<(), async_nats::Error> {
        let stream = self.deps.outbox.ensure().await?;
        let consumer = stream
            .get_or_create_consumer(CONSUMER, consumer_config())
            .await?;
        let mut messages = consumer.messages().await?;
        while let Some(message) = messages.next().await {
            let message = message?;
            let permit = tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                p = slots.clone().acquire_owned() => p?,
            };
            let this = self.clone();
            let calls = calls.clone();
            self.tracker.spawn(async move {
                let _permit = permit;
                this.send_from_outbox(&calls, message).await;
            });
        }
        Ok(())
    }

    /// Sends one batch of the outbox and acknowledges, retries or gives it up.
    async fn send_from_outbox(&self, calls: &SignedClient, message: jetstream::Message) {
        let delivered = message.info().map(|i| i.delivered).unwrap_or(1);
        let outcome = match self.parse_outboxed(&message) {
            Some((upstream, data_point, batch)) => {
                self.send_up(calls, &upstream, &data_point, &batch).await
            }
            None => {
                tracing::warn!(subject = %message.subject, "malformed batch in the outbox; given up");
                self.counters
                    .delivery_failed
                    .fetch_add(1, Ordering::Relaxed);
                Sent::Refused(ErrorReply::new(ErrorCode::Malformed, "malformed"))
            }
        };
        let ack = match outcome {
            Sent::Acknowledged => {
                self.counters
                    .delivered
                    .relay
                    .fetch_add(1, Ordering::Relaxed);
                AckKind::Ack
            }
            Sent::Refused(e) if delivered >= REFUSED_ATTEMPTS || e.code == ErrorCode::Malformed => {
                self.counters
                    .delivery_failed
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e.message, sends = delivered, "upstream keeps refusing a batch; given up");
                AckKind::Term
            }
            Sent::Refused(e) => {
                tracing::info!(error = %e.message, sends = delivered, "upstream refused a batch; sending it again later");
                AckKind::Nak(Some(retry_after(delivered)))
            }
            Sent::Unanswered(why) => {
                tracing::debug!(error = %why, sends = delivered, "batch not acknowledged; sending it again later");
                AckKind::Nak(Some(retry_after(delivered)))
            }
        };
        if let Err(e) = message.ack_with(ack).await {
            // Unacknowledged, it comes back after the ack wait: nothing is lost.
            tracing::debug!(error = %e, "cannot acknowledge an outbox message");
        }
    }

    fn parse_outboxed(
        &self,
        message: &jetstream::Message,
    ) -> Option<(SiteId, DataPoint, MonitoringBatch)> {
        let headers = message.headers.as_ref()?;
        let upstream = SiteId::new(headers.get(UPSTREAM_HEADER)?.as_str()).ok()?;
        let data_point = DataPoint::new(headers.get(DATA_POINT_HEADER)?.as_str()).ok()?;
        let batch = codec::from_slice(&message.payload).ok()?;
        Some((upstream, data_point, batch))
    }

    /// One signed send of `batch` to `upstream`, on its relay subject.
    async fn send_up(
        &self,
        calls: &SignedClient,
        upstream: &SiteId,
        data_point: &DataPoint,
        batch: &MonitoringBatch,
    ) -> Sent {
        let subject =
            Subject::monitoring_relay(upstream, &batch.primary_site, &batch.vm, data_point);
        let target = CallTarget {
            subject: &subject,
            signer: upstream,
            op: "monitoring relay",
        };
        match calls.call::<_, BatchStored>(target, batch).await {
            Ok(stored) if stored.seq == batch.seq && stored.producer == batch.producer => {
                Sent::Acknowledged
            }
            Ok(_) => Sent::Unanswered("the upstream acknowledged another batch".into()),
            Err(CallError::Refused { reply, .. }) => Sent::Refused(reply),
            Err(e) => Sent::Unanswered(e.to_string()),
        }
    }
}

/// The pause before send number `delivered + 1`.
fn retry_after(delivered: i64) -> Duration {
    let attempt = u32::try_from(delivered.max(1)).unwrap_or(u32::MAX);
    full_jitter(backoff_cap(RETRY.0, RETRY.1, attempt)).max(RETRY.0)
}
