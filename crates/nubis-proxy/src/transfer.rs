//! The task of one running transfer: started for a token, it serves, receives or relays the
//! token's files, reports progress on the bus, retries through transient bus trouble, and
//! records a failure as the token's status.
//!
//! Also what a receiving and a relaying proxy share before their files' chunks flow: finding
//! the source's bucket, obtaining the transfer's content key from the source proxy (sealed to
//! an ephemeral key of this proxy), and reading the source's signed manifest; and what a
//! serving and a relaying proxy share: a fresh sealer for each object they write.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::jetstream::stream::Stream;
use nubis_bus::CallError;
use nubis_protocol::envelope::{self, Addressing};
use nubis_protocol::message::{
    Endpoint, ErrorReply, FetchKey, TokenPurpose, TransferManifest, TransferProgress, TransferRole,
    TransferStatus, TransferToken,
};
use nubis_protocol::subject::Subject;
use nubis_protocol::MigrationId;
use tokio_util::sync::CancellationToken;
use tracing::{warn, Instrument as _};

use crate::naming::TokenObjects;
use crate::objects::{open_bucket, Incoming, ObjectError, ObjectFollower};
use crate::pace::{effective_cap, Pacer};
use crate::proxy::{lock, TransferProxy};
use crate::seal::{ChunkSealer, ContentKey, FetcherSecret, SealError};
use crate::store::{StoreError, TokenRecord, TokenStore};

/// Counters of a running transfer, shared with status and progress.
#[derive(Debug, Default)]
pub(crate) struct Live {
    /// Data bytes handled so far at this end.
    pub(crate) done: AtomicU64,
    /// Data bytes to handle.
    pub(crate) total: AtomicU64,
    /// Chunk bytes published (serve).
    pub(crate) sent: AtomicU64,
    /// Set when the task has ended, so the progress loop sends its last event.
    pub(crate) finished: AtomicBool,
    /// Wakes the progress loop once `finished` is set, so the last event goes out at once,
    /// before a release that follows the end of the transfer can stop the loop.
    pub(crate) ended: tokio::sync::Notify,
    /// Stops this transfer alone (a child of the proxy's token).
    pub(crate) cancel: CancellationToken,
    /// The task, awaited by whoever stops it.
    pub(crate) task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The bandwidth cap of a fetch or relay, shared by its files and their retries.
    pub(crate) pace: tokio::sync::Mutex<Option<Pacer>>,
}

/// Waits until the transfer's bandwidth cap lets `bytes` more through.
pub(crate) async fn pace(live: &Live, bytes: u64) {
    if let Some(p) = live.pace.lock().await.as_mut() {
        p.take(bytes).await;
    }
}

/// Why a transfer task failed; becomes the `reason` of a failed status.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TaskError {
    #[error("file {name}: {source}")]
    Io {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Object(#[from] ObjectError),
    #[error("file {0}: digest does not match the source")]
    DigestMismatch(String),
    #[error("file {0}: chunks out of order or missing")]
    Corrupt(String),
    /// Chunks went missing in the source bucket (its server restarted before storing them);
    /// the source publishes the file again from its first chunk, so reading again helps.
    #[error("file {name}: chunk {index} arrived where {expected} was due")]
    Gap {
        name: String,
        index: u64,
        expected: u64,
    },
    #[error("manifest: {0}")]
    Manifest(String),
    #[error("source proxy: {0}")]
    Source(String),
    /// A chunk of the file kept failing authentication however often it was read again: it
    /// was altered in the source's bucket.
    #[error("file {name}: {source}, still after {reads} reads; giving up")]
    Unauthentic {
        name: String,
        reads: u32,
        #[source]
        source: SealError,
    },
    #[error("sealing: {0}")]
    Seal(#[from] SealError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("cancelled")]
    Cancelled,
}

impl TaskError {
    /// A call to the source proxy that failed: its refusal as the source's reason, anything
    /// else (no answer, a bad reply) as a read failure, which is tried again.
    pub(crate) fn from_source_call(e: CallError) -> Self {
        match e {
            CallError::Refused {
                reply: ErrorReply { code, message, .. },
                ..
            } => Self::Source(format!("{code}: {message}")),
            other => Self::Object(ObjectError::Read(other.to_string())),
        }
    }
}

impl TaskError {
    /// A failure of file `name`'s I/O.
    pub(crate) fn io(name: &str, source: std::io::Error) -> Self {
        Self::Io {
            name: name.to_string(),
            source,
        }
    }

    /// Whether retrying the same step may help (bus trouble rather than bad data or a full
    /// bucket).
    pub(crate) fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Object(ObjectError::Publish(_) | ObjectError::Read(_) | ObjectError::Bucket(_))
                | Self::Gap { .. }
        )
    }
}

/// How many times in all a file (or manifest) whose chunk fails authentication is read before
/// the transfer fails: a chunk damaged on its way is read intact the next time, one altered in
/// the bucket is not.
pub(crate) const AUTHENTIC_READS: u32 = 3;

/// Changes a token's record; a record that is gone means the token was released meanwhile.
pub(crate) fn update_record(
    store: &TokenStore,
    token: &TransferToken,
    f: impl FnOnce(&mut TokenRecord),
) -> Result<TokenRecord, TaskError> {
    store.update(token, f)?.ok_or(TaskError::Cancelled)
}

/// Runs `step` again after transient bus trouble (a restarting server, a lost connection),
/// until it succeeds, fails for good, or failures have gone on for `stall` without an attempt
/// that ran for a while (one that did is taken as progress).
pub(crate) async fn retry_transient<T, F, Fut>(stall: Duration, mut step: F) -> Result<T, TaskError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, TaskError>>,
{
    const LONGEST_PAUSE: Duration = Duration::from_secs(3);
    let mut deadline = Instant::now() + stall;
    let mut pause = Duration::from_millis(200);
    loop {
        let attempt = Instant::now();
        match step().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_transient() => {
                let now = Instant::now();
                if now - attempt > LONGEST_PAUSE {
                    deadline = now + stall;
                    pause = Duration::from_millis(200);
                }
                if now >= deadline {
                    return Err(e);
                }
                warn!(error = %e, "transient failure, retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(LONGEST_PAUSE);
            }
            Err(e) => return Err(e),
        }
    }
}

impl TransferProxy {
    /// Starts the task of `rec`'s transfer and its progress events.
    pub(crate) fn spawn_transfer(&self, rec: TokenRecord) {
        // Only fetching and relaying read across sites; serving writes to the own bucket.
        let cap = match rec.purpose {
            TokenPurpose::Serve { .. } => None,
            TokenPurpose::Receive { .. } | TokenPurpose::Relay { .. } => {
                effective_cap(rec.max_bytes_per_sec, self.inner.settings.max_bytes_per_sec)
            }
        };
        let live = Arc::new(Live {
            cancel: self.inner.cancel.child_token(),
            pace: tokio::sync::Mutex::new(Pacer::new(cap, self.inner.settings.chunk_size as u64)),
            ..Live::default()
        });
        live.total.store(rec.total_bytes, Ordering::Relaxed);
        lock(&self.inner.live).insert(rec.token, live.clone());
        let role = match rec.purpose {
            TokenPurpose::Serve { .. } => TransferRole::Serve,
            TokenPurpose::Receive { .. } => TransferRole::Receive,
            TokenPurpose::Relay { .. } => TransferRole::Relay,
        };
        let span = tracing::info_span!("transfer", migration.id = %rec.migration_id, vm.id = %rec.vm, ?role);
        let this = self.clone();
        let progress = tokio::spawn(this.clone().progress_loop(rec.clone(), role, live.clone()));
        let l2 = live.clone();
        let task = tokio::spawn(
            async move {
                let token = rec.token;
                let result = tokio::select! {
                    _ = l2.cancel.cancelled() => Err(TaskError::Cancelled),
                    r = this.run_transfer(rec.clone(), l2.clone()) => r,
                };
                // A stopped transfer (its cancel token, which also ends the progress loop)
                // may resume later: it has no last event.
                if !matches!(result, Err(TaskError::Cancelled)) {
                    l2.finished.store(true, Ordering::Relaxed);
                    l2.ended.notify_one();
                }
                let _ = progress.await;
                match result {
                    Ok(()) => {}
                    // Stopped by shutdown or release: leave the record for resumption or
                    // for the release in progress.
                    Err(TaskError::Cancelled) => return,
                    Err(e) => {
                        warn!(error = %e, "transfer failed");
                        if let TokenPurpose::Receive { .. } = rec.purpose {
                            // Nothing partial (nor half a VM) stays visible after a failure: the
                            // stored record names the files, learnt from the manifest after
                            // the task started (a partial file kept for a retry included).
                            let current = match this.inner.store.get(&token) {
                                Ok(Some(r)) => r,
                                _ => rec.clone(),
                            };
                            if let Err(e) = this.discard(&current, true).await {
                                warn!(error = %e, "clean-up after failure failed");
                            }
                        }
                        let reason = e.to_string();
                        let _ = this.inner.store.update(&token, |r| {
                            r.status = TransferStatus::Failed { reason };
                            r.complete = false;
                            if let TokenPurpose::Receive { .. } = r.purpose {
                                r.digests.clear();
                                r.partial = None;
                            }
                        });
                    }
                }
                let mut live = lock(&this.inner.live);
                if live.get(&token).is_some_and(|l| Arc::ptr_eq(l, &l2)) {
                    live.remove(&token);
                }
            }
            .instrument(span),
        );
        *lock(&live.task) = Some(task);
    }

    async fn run_transfer(&self, rec: TokenRecord, live: Arc<Live>) -> Result<(), TaskError> {
        match rec.purpose.clone() {
            TokenPurpose::Serve { files } => self.serve(rec, files, live).await,
            TokenPurpose::Receive { dir } => self.receive(rec, PathBuf::from(dir), live).await,
            TokenPurpose::Relay { source, .. } => self.relay(rec, source, live).await,
        }
    }

    /// Publishes progress events while a transfer runs; `bytes_done` never goes down even when
    /// a file starts over.
    async fn progress_loop(self, rec: TokenRecord, role: TransferRole, live: Arc<Live>) {
        let subject = Subject::proxy_progress(&self.inner.uri, &rec.migration_id).to_string();
        let interval = Duration::from_millis(self.inner.settings.progress_interval_ms.max(10));
        let mut high = 0u64;
        let mut last = (Instant::now(), 0u64);
        let mut rate = 0.0f64;
        loop {
            let finished = live.finished.load(Ordering::Relaxed);
            high = high.max(live.done.load(Ordering::Relaxed));
            let (t0, b0) = last;
            let dt = t0.elapsed().as_secs_f64();
            if dt > 0.0 {
                let inst = high.saturating_sub(b0) as f64 / dt;
                rate = if rate == 0.0 {
                    inst
                } else {
                    0.7 * rate + 0.3 * inst
                };
            }
            last = (Instant::now(), high);
            let ev = TransferProgress {
                migration_id: rec.migration_id,
                vm: rec.vm.clone(),
                role,
                bytes_done: high,
                bytes_total: live.total.load(Ordering::Relaxed),
                bytes_per_sec: rate,
                finished,
            };
            if let Ok((raw, _)) =
                envelope::seal_message(&self.inner.identity, Addressing::broadcast(&subject), &ev)
            {
                let _ = self.inner.client.publish(subject.clone(), raw.into()).await;
            }
            if finished {
                return;
            }
            tokio::select! {
                biased;
                _ = live.ended.notified() => {}
                // A release or shutdown stops a running transfer without a last event; one
                // that has ended still sends it.
                _ = live.cancel.cancelled() => {
                    if !live.finished.load(Ordering::Relaxed) {
                        return;
                    }
                }
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }

    /// [`retry_transient`] with this proxy's stall timeout.
    pub(crate) async fn retrying<T, F, Fut>(&self, step: F) -> Result<T, TaskError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, TaskError>>,
    {
        retry_transient(self.inner.settings.stall(), step).await
    }

    /// [`Self::retrying`], reading object `name` again (from its last durable position) when
    /// a chunk fails authentication, [`AUTHENTIC_READS`] times in all.
    pub(crate) async fn retrying_authentic<T, F, Fut>(
        &self,
        name: &str,
        mut step: F,
    ) -> Result<T, TaskError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, TaskError>>,
    {
        let mut reads = 0;
        loop {
            reads += 1;
            match self.retrying(&mut step).await {
                Err(TaskError::Object(ObjectError::Unauthentic(source))) => {
                    if reads >= AUTHENTIC_READS {
                        return Err(TaskError::Unauthentic {
                            name: name.to_string(),
                            reads,
                            source,
                        });
                    }
                    warn!(file = name, error = %source, reads, "chunk failed authentication; reading again");
                }
                other => return other,
            }
        }
    }

    /// A sealer for writing (again) object `object` of serving or relaying `token`: a new write
    /// attempt, recorded on disk before anything is sealed under it, so its nonces are new.
    pub(crate) fn object_sealer(
        &self,
        token: &TransferToken,
        object: &str,
    ) -> Result<ChunkSealer, TaskError> {
        let mut exhausted = false;
        let rec = self.store_update(token, |r| {
            if r.content_key.is_none() {
                r.content_key = Some(ContentKey::random());
            }
            match r.seal_attempts.checked_add(1) {
                Some(n) => r.seal_attempts = n,
                None => exhausted = true,
            }
        })?;
        match rec.content_key {
            Some(key) if !exhausted => Ok(key.sealer(object, rec.seal_attempts)),
            _ => Err(TaskError::Seal(SealError::Exhausted)),
        }
    }

    /// The content key of `source`'s token, asked of the source proxy in a signed request
    /// carrying a fresh ephemeral X25519 key, to which the answer seals it.
    pub(crate) async fn fetch_content_key(
        &self,
        source: &Endpoint,
        migration_id: MigrationId,
    ) -> Result<ContentKey, TaskError> {
        self.retrying(|| async {
            let secret = FetcherSecret::generate();
            let req = FetchKey {
                migration_id,
                token: source.token,
                fetcher_key: secret.public(),
            };
            let reply = self
                .inner
                .peers
                .fetch_key(&source.proxy, &req)
                .await
                .map_err(TaskError::from_source_call)?;
            if reply.token != source.token {
                return Err(TaskError::Source(
                    "content key of another token".to_string(),
                ));
            }
            Ok(ContentKey::unseal(&secret, &reply.sealed)?)
        })
        .await
    }

    /// [`update_record`] in this proxy's store.
    pub(crate) fn store_update(
        &self,
        token: &TransferToken,
        f: impl FnOnce(&mut TokenRecord),
    ) -> Result<TokenRecord, TaskError> {
        update_record(&self.inner.store, token, f)
    }

    // ----- reading a source's bucket ----------------------------------------------------

    /// The transfer bucket of the source's site, reached in its JetStream domain.
    pub(crate) async fn source_bucket(&self, source: &Endpoint) -> Result<Stream, TaskError> {
        let ctx = jetstream::with_domain(self.inner.client.clone(), source.proxy.site().as_str());
        self.retrying(|| async { Ok(open_bucket(&ctx).await?) })
            .await
    }

    /// The source's manifest of `source`'s token, opened with its content key `key` and
    /// verified as signed by the source's site, its files sorted by name.
    pub(crate) async fn read_manifest(
        &self,
        stream: &Stream,
        source: &Endpoint,
        key: &ContentKey,
    ) -> Result<TransferManifest, TaskError> {
        let objs = TokenObjects::new(&source.token);
        let name = objs.manifest_name();
        self.retrying_authentic("manifest", || {
            self.read_manifest_once(stream, source, key, &objs, &name)
        })
        .await
    }

    async fn read_manifest_once(
        &self,
        stream: &Stream,
        source: &Endpoint,
        key: &ContentKey,
        objs: &TokenObjects,
        name: &str,
    ) -> Result<TransferManifest, TaskError> {
        let mut follower = ObjectFollower::open(
            stream,
            objs.chunk_subject(None),
            name,
            None,
            self.inner.settings.fetch_window,
            None,
            self.inner.settings.stall(),
            key.opener(name),
        )
        .await?;
        let mut raw = Vec::new();
        loop {
            match follower.next().await? {
                Incoming::Chunk { index: 0, data, .. } => {
                    raw.clear();
                    raw.extend_from_slice(&data);
                }
                Incoming::Chunk { data, .. } => raw.extend_from_slice(&data),
                Incoming::Done(_) => break,
            }
            if raw.len() > nubis_protocol::codec::MAX_BODY_LEN * 2 {
                return Err(TaskError::Manifest("oversize".to_string()));
            }
        }
        let opened = self
            .inner
            .verifier
            .open_record(&raw, &TokenObjects::meta_subject(name))
            .map_err(|e| TaskError::Manifest(e.to_string()))?;
        if &opened.from != source.proxy.site() {
            return Err(TaskError::Manifest(
                "signed by another site than the source".to_string(),
            ));
        }
        let mut m: TransferManifest = opened
            .body()
            .map_err(|e| TaskError::Manifest(e.to_string()))?;
        m.files.sort_by(|a, b| a.name.cmp(&b.name));
        if m.files.windows(2).any(|w| w[0].name == w[1].name) {
            return Err(TaskError::Manifest("duplicate file name".to_string()));
        }
        crate::confine::check_manifest_names(&m.files).map_err(TaskError::Manifest)?;
        Ok(m)
    }
}
