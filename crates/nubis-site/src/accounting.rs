//! The site's accounting stream: every monitoring batch the site handles, kept in JetStream in
//! the site's own domain (its leaf server), never in the hub's.
//!
//! One writer task owns the stream. Each batch is stored as the signed envelope bytes the site
//! sent or received, on `nubis.acct.<site>.<vm>`, with the batch's message id scoped by the
//! site that signed the envelope as `Nats-Msg-Id` ([`message_id`]), so that a batch stored twice
//! by the same sender (a host agent's retry, a relay hop's resend) is kept once, while a batch
//! that another site sent first under the same producer, epoch and sequence number can never
//! make the genuine one a duplicate. A store completes only when the server has acknowledged it; until then the
//! writer retries with backoff, re-creating the stream if it has to, because the site's
//! nats-server may be restarting. A host agent is answered only after that acknowledgement, so
//! an acknowledged batch is on disk in a file-backed stream and survives restarts of either
//! nats-server.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt as _;
use nubis_protocol::descriptor::DataPoint;
use nubis_protocol::message::MonitoringBatch;
use nubis_protocol::subject::{Subject, ACCOUNTING_STREAM};
use nubis_protocol::{SiteId, VmId};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Header naming the data point of a stored batch.
pub const DATA_POINT_HEADER: &str = "Nubis-Data-Point";

/// The stream's de-duplication window: longer than any host agent keeps retrying one batch.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(10 * 60);

/// Batches waiting for the writer; a full queue makes storers wait.
const QUEUE: usize = 1024;

/// First and longest pause between attempts to store one batch.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

/// How long one publish waits for the server's acknowledgement.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a read waits for the next message before giving up.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the accounting stream could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AccountingError {
    /// The writer has stopped (the daemon is shutting down).
    #[error("accounting writer stopped")]
    Closed,
    /// Reading the stream failed.
    #[error("cannot read the accounting stream")]
    Read(#[source] async_nats::Error),
}

/// A batch's place in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// Stream sequence.
    pub sequence: u64,
    /// True when the stream already held the batch.
    pub duplicate: bool,
}

/// What the writer did so far.
#[derive(Debug, Default)]
pub struct AccountingCounters {
    /// Batches acknowledged as newly stored.
    pub stored: AtomicU64,
    /// Batches acknowledged as already stored.
    pub duplicates: AtomicU64,
    /// Failed attempts that were retried.
    pub retries: AtomicU64,
}

struct Job {
    subject: Subject,
    message_id: String,
    data_point: DataPoint,
    envelope: Bytes,
    done: oneshot::Sender<Stored>,
}

/// Handle on the accounting stream of one site.
#[derive(Debug, Clone)]
pub struct Accounting {
    site: SiteId,
    js: jetstream::Context,
    jobs: mpsc::Sender<Job>,
    counters: Arc<AccountingCounters>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("subject", &self.subject)
            .field("message_id", &self.message_id)
            .finish_non_exhaustive()
    }
}

/// The `Nats-Msg-Id` of `batch` signed by `sender` (this site for its own hosts' batches):
/// `<sender>.<producer>.<epoch_ms>.<seq>`.
pub fn message_id(sender: &SiteId, batch: &MonitoringBatch) -> String {
    format!("{sender}.{}", batch.message_id())
}

/// The stream's configuration for `site`.
pub fn stream_config(site: &SiteId, max_age: Duration) -> stream::Config {
    stream::Config {
        name: ACCOUNTING_STREAM.to_string(),
        description: Some(format!(
            "nubis accounting: monitoring batches handled by site {site}"
        )),
        subjects: vec![Subject::accounting_all(site).as_str().to_string()],
        storage: stream::StorageType::File,
        max_age,
        duplicate_window: DUPLICATE_WINDOW,
        allow_direct: true,
        ..Default::default()
    }
}

/// Creates the stream, or brings an existing one to `config`.
async fn ensure_stream(
    js: &jetstream::Context,
    config: &stream::Config,
) -> Result<(), async_nats::Error> {
    js.get_or_create_stream(config.clone()).await?;
    js.update_stream(config).await?;
    Ok(())
}

impl Accounting {
    /// Starts the writer on `client` (a connection to the site's own server), keeping batches
    /// for `max_age`. The stream is created at once if the server answers, else on first use.
    pub async fn start(
        client: async_nats::Client,
        site: SiteId,
        max_age: Duration,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> Self {
        let mut js = jetstream::new(client);
        js.set_timeout(ACK_TIMEOUT);
        let config = stream_config(&site, max_age);
        let ready = match ensure_stream(&js, &config).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, stream = ACCOUNTING_STREAM, "cannot set up the accounting stream yet; will retry");
                false
            }
        };
        let (jobs, rx) = mpsc::channel(QUEUE);
        let counters = Arc::new(AccountingCounters::default());
        tracker.spawn(writer(
            js.clone(),
            config,
            ready,
            rx,
            counters.clone(),
            cancel,
        ));
        Self {
            site,
            js,
            jobs,
            counters,
        }
    }

    /// Stores one signed batch envelope of `vm`; returns once the server has acknowledged it.
    pub async fn store(
        &self,
        vm: &VmId,
        data_point: &DataPoint,
        message_id: String,
        envelope: Bytes,
    ) -> Result<Stored, AccountingError> {
        let (done, wait) = oneshot::channel();
        self.jobs
            .send(Job {
                subject: Subject::accounting(&self.site, vm),
                message_id,
                data_point: data_point.clone(),
                envelope,
                done,
            })
            .await
            .map_err(|_| AccountingError::Closed)?;
        wait.await.map_err(|_| AccountingError::Closed)
    }

    /// What the writer did so far.
    pub fn counters(&self) -> &AccountingCounters {
        &self.counters
    }

    /// The stored envelopes of `vm` from `from_ms` (by the server's time of storing) up to the
    /// stream's last message at the time of the call, oldest first.
    pub async fn read(&self, vm: &VmId, from_ms: u64) -> Result<Vec<Bytes>, AccountingError> {
        let read = |e: async_nats::Error| AccountingError::Read(e);
        let mut stream = match self.js.get_stream(ACCOUNTING_STREAM).await {
            Ok(s) => s,
            Err(e)
                if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
            {
                // Nothing was ever stored here.
                tracing::debug!(error = %e, "no accounting stream");
                return Ok(Vec::new());
            }
            Err(e) => return Err(read(e.into())),
        };
        let last = stream
            .info()
            .await
            .map_err(|e| read(e.into()))?
            .state
            .last_sequence;
        let deliver_policy = if from_ms == 0 {
            consumer::DeliverPolicy::All
        } else {
            let start_time =
                async_nats::datetime::from_nanos(i128::from(from_ms) * 1_000_000).map_err(read)?;
            consumer::DeliverPolicy::ByStartTime { start_time }
        };
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: Subject::accounting(&self.site, vm).as_str().to_string(),
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(|e| read(e.into()))?;
        if consumer.cached_info().num_pending == 0 {
            return Ok(Vec::new());
        }
        let mut messages = consumer.messages().await.map_err(|e| read(e.into()))?;
        let mut out = Vec::new();
        loop {
            let next = tokio::time::timeout(READ_TIMEOUT, messages.next())
                .await
                .map_err(|_| read("timed out reading the accounting stream".into()))?;
            let Some(message) = next else { break };
            let message = message.map_err(|e| read(e.into()))?;
            let (sequence, pending) = match message.info() {
                Ok(info) => (info.stream_sequence, info.pending),
                Err(e) => return Err(read(e)),
            };
            out.push(message.message.payload.clone());
            if pending == 0 || sequence >= last {
                break;
            }
        }
        Ok(out)
    }
}

/// The writer task: stores jobs one at a time, each until acknowledged.
async fn writer(
    js: jetstream::Context,
    config: stream::Config,
    mut ready: bool,
    mut jobs: mpsc::Receiver<Job>,
    counters: Arc<AccountingCounters>,
    cancel: CancellationToken,
) {
    loop {
        let job = tokio::select! {
            _ = cancel.cancelled() => break,
            job = jobs.recv() => match job { Some(j) => j, None => break },
        };
        let mut backoff = BACKOFF.0;
        loop {
            let attempt = async {
                if !ready {
                    ensure_stream(&js, &config).await?;
                    ready = true;
                }
                let mut headers = HeaderMap::new();
                headers.insert(async_nats::header::NATS_MESSAGE_ID, job.message_id.as_str());
                headers.insert(DATA_POINT_HEADER, job.data_point.as_str());
                let ack = js
                    .publish_with_headers(
                        job.subject.as_str().to_string(),
                        headers,
                        job.envelope.clone(),
                    )
                    .await?
                    .await?;
                Ok::<_, async_nats::Error>(ack)
            };
            match attempt.await {
                Ok(ack) => {
                    let counter = if ack.duplicate {
                        &counters.duplicates
                    } else {
                        &counters.stored
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    // The storer may have given up waiting; the batch is stored all the same.
                    let _ = job.done.send(Stored {
                        sequence: ack.sequence,
                        duplicate: ack.duplicate,
                    });
                    break;
                }
                Err(e) => {
                    counters.retries.fetch_add(1, Ordering::Relaxed);
                    ready = false;
                    tracing::warn!(error = %e, batch = %job.message_id, retry_in_ms = backoff.as_millis() as u64, "cannot store batch in the accounting stream; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF.1);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_keeps_only_this_sites_subjects_on_disk() {
        let site = SiteId::new("a").unwrap();
        let c = stream_config(&site, Duration::from_secs(3600));
        assert_eq!(c.name, ACCOUNTING_STREAM);
        assert_eq!(c.subjects, vec!["nubis.acct.a.>".to_string()]);
        assert_eq!(c.storage, stream::StorageType::File);
        assert_eq!(c.max_age, Duration::from_secs(3600));
        assert_eq!(c.duplicate_window, DUPLICATE_WINDOW);
    }

    #[test]
    fn message_ids_are_scoped_by_the_sender() {
        let batch = MonitoringBatch {
            vm: VmId::new("vm-1").unwrap(),
            primary_site: SiteId::new("a").unwrap(),
            producer: nubis_protocol::message::ProducerId::new("p1").unwrap(),
            epoch_ms: 7,
            seq: 3,
            payload: nubis_protocol::message::BatchPayload::Clear(Default::default()),
        };
        let c = message_id(&SiteId::new("c").unwrap(), &batch);
        let x = message_id(&SiteId::new("x").unwrap(), &batch);
        assert_eq!(c, "c.p1.7.3");
        assert_ne!(c, x);
    }
}
