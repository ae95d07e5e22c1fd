//! The Transfer proxy (paper section III): mints transfer tokens, serves a VM's files on the
//! site's transfer bucket, fetches another proxy's files (Initiate transfer), relays by policy,
//! answers status (Transfer verification), and cleans up.
//!
//! One [`TransferProxy`] owns its token store, its NATS connection and one task per running
//! transfer. Requests arrive as signed envelopes on `nubis.proxy.<site>.<proxy>.>`; the same
//! operations are methods for a site daemon that runs the proxy in its own process.
//!
//! State of a token at each end (persisted in the store; bytes live in memory):
//!
//! ```text
//! serve:   Pending ─publish─▶ Transferring ─all published─▶ (complete) ─ack ok─▶ Succeeded
//! receive: Pending ─fetch──▶ Transferring ─verified + ack ok─▶ Succeeded
//! relay:   Pending ─relay──▶ Transferring ─relayed─▶ (complete) ─ack ok, forwarded─▶ Succeeded
//! any:     ─error─▶ Failed (receive: nothing received stays)   ─expiry─▶ expired tombstone
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::jetstream::stream::Stream;
use base64::engine::general_purpose::URL_SAFE;
use base64::Engine as _;
use ed25519_dalek::VerifyingKey;
use futures::StreamExt as _;
use nubis_protocol::envelope::{self, Addressing, EnvelopeError, Opened, Verifier};
use nubis_protocol::identity::SiteIdentity;
use nubis_protocol::message::{
    Body, Endpoint, ErrorCode, ErrorReply, FetchTransfer, FileDigest, LocalFile, ManifestFile,
    MintToken, Minted, ProxyUri, ReleaseOutcome, ReleaseToken, Released, TokenPurpose, TransferAck,
    TransferManifest, TransferProgress, TransferRole, TransferStatus, TransferStatusQuery,
    TransferStatusReply, TransferToken,
};
use nubis_protocol::replay::{Durability, ReplayCache};
use nubis_protocol::subject::{ParsedSubject, ProxyOp, Subject};
use nubis_protocol::SiteId;
use sha2::{Digest as _, Sha256};
use tokio::sync::oneshot::{self, error::TryRecvError};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument as _};

use crate::client::{ClientError, ProxyClient};
use crate::config::TransferSettings;
use crate::error::ProxyError;
use crate::hashing::LogicalHasher;
use crate::io::{shape, spawn_reader, sync_dir, FileSink, ReadItem};
use crate::naming::TokenObjects;
use crate::objects::{
    ensure_bucket, open_bucket, purge_object, Incoming, ObjectError, ObjectFollower, ObjectWriter,
    META_ALLOCATED, META_SHA256, META_SIZE,
};
use crate::pace::{effective_cap, Pacer};
use crate::store::{PartialFile, TokenRecord, TokenStore};

/// How long a fetch request waits for its transfer to end before it answers with progress.
const FIRST_ANSWER_WAIT: Duration = Duration::from_millis(100);

/// Everything a proxy needs besides its NATS connection.
#[derive(Debug)]
pub struct ProxyParams {
    /// The proxy's URI (its site and id).
    pub uri: ProxyUri,
    /// The site's identity: signs everything the proxy sends.
    pub identity: Arc<SiteIdentity>,
    /// Pinned partner keys; the own site's key is added.
    pub partners: Vec<(SiteId, VerifyingKey)>,
    /// Directory of the token store and replay cache.
    pub store_dir: PathBuf,
    /// Tuning and policy.
    pub settings: TransferSettings,
}

/// Counters of a running transfer, shared with status and progress.
#[derive(Debug, Default)]
struct Live {
    done: AtomicU64,
    total: AtomicU64,
    sent: AtomicU64,
    finished: AtomicBool,
    cancel: CancellationToken,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The bandwidth cap of a fetch or relay, shared by its files and their retries.
    pace: tokio::sync::Mutex<Option<Pacer>>,
}

/// Figures of one token, for operators and the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferStats {
    /// Data bytes handled at this end.
    pub bytes_done: u64,
    /// Data bytes to handle.
    pub bytes_total: u64,
    /// Chunk bytes this end published to a bucket (serve and relay).
    pub bytes_published: u64,
    /// Chunk bytes this end read from the source's bucket since it started (receive); a
    /// fetch resumed after a restart reads only what it had not made durable.
    pub bytes_fetched: u64,
}

#[derive(Debug)]
struct Inner {
    uri: ProxyUri,
    identity: Arc<SiteIdentity>,
    verifier: Arc<Verifier>,
    client: async_nats::Client,
    js: jetstream::Context,
    stream: Stream,
    store: TokenStore,
    settings: TransferSettings,
    peers: ProxyClient,
    live: Mutex<HashMap<TransferToken, Arc<Live>>>,
    /// Bytes published per token, kept after the task ends (for [`TransferProxy::stats`]).
    published: Mutex<HashMap<TransferToken, u64>>,
    /// Chunk bytes read from a source bucket per token since this proxy started.
    fetched: Mutex<HashMap<TransferToken, u64>>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

/// A running Transfer proxy. Cloning gives another handle to the same proxy.
#[derive(Debug, Clone)]
pub struct TransferProxy {
    inner: Arc<Inner>,
}

/// Why a transfer task failed; becomes the `reason` of a failed status.
#[derive(Debug, thiserror::Error)]
enum TaskError {
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
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("cancelled")]
    Cancelled,
}

impl TaskError {
    fn io(name: &str, source: std::io::Error) -> Self {
        Self::Io {
            name: name.to_string(),
            source,
        }
    }

    /// Whether retrying the same step may help (bus trouble rather than bad data or a full
    /// bucket).
    fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Object(ObjectError::Publish(_) | ObjectError::Read(_) | ObjectError::Bucket(_))
                | Self::Gap { .. }
        )
    }
}

fn now_ms() -> u64 {
    envelope::now_ms()
}

fn sorted(mut d: Vec<FileDigest>) -> Vec<FileDigest> {
    d.sort_by(|a, b| a.name.cmp(&b.name));
    d
}

impl TransferProxy {
    /// Opens the store, ensures the site's transfer bucket, starts answering on the proxy's
    /// subjects, and resumes transfers that were running when the proxy stopped. A process
    /// that runs proxies should call [`crate::memory::bound_chunk_retention`] before its
    /// runtime starts (`nubis proxy` does).
    pub async fn start(
        params: ProxyParams,
        client: async_nats::Client,
    ) -> Result<Self, StartError> {
        params.settings.validate().map_err(StartError::Config)?;
        std::fs::create_dir_all(&params.store_dir).map_err(StartError::StoreDir)?;
        let store = TokenStore::open(&params.store_dir.join("tokens"))?;
        let replay = ReplayCache::open(
            &params.store_dir.join("replay"),
            2 * envelope::DEFAULT_FRESHNESS_MS,
            Durability::Background,
        )
        .map_err(|e| StartError::Replay(e.to_string()))?;
        let own = params.uri.site().clone();
        let mut partners = params.partners;
        partners.push((own.clone(), params.identity.public().signing));
        let verifier = Arc::new(Verifier::new(own, partners, replay));
        let js = jetstream::new(client.clone());
        let stream = ensure_bucket(&js, params.settings.bucket_max_bytes).await?;
        let peers = ProxyClient::new(client.clone(), params.identity.clone(), verifier.clone());
        let inner = Arc::new(Inner {
            uri: params.uri,
            identity: params.identity,
            verifier,
            client: client.clone(),
            js,
            stream,
            store,
            settings: params.settings,
            peers,
            live: Mutex::new(HashMap::new()),
            published: Mutex::new(HashMap::new()),
            fetched: Mutex::new(HashMap::new()),
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
        });
        let sub = client
            .subscribe(Subject::proxy_all(&inner.uri).to_string())
            .await
            .map_err(|e| StartError::Subscribe(e.to_string()))?;
        // Make sure the subscription reached the server before anyone is told we are up.
        client
            .flush()
            .await
            .map_err(|e| StartError::Subscribe(e.to_string()))?;
        let proxy = Self { inner };
        proxy.spawn_service(sub);
        proxy.spawn_gc();
        proxy.resume().map_err(StartError::Resume)?;
        info!(proxy = %proxy.inner.uri, "transfer proxy started");
        Ok(proxy)
    }

    /// This proxy's URI.
    pub fn uri(&self) -> &ProxyUri {
        &self.inner.uri
    }

    /// Stops answering and stops every transfer where it stands (as a crash would, but
    /// orderly): records are left as they are, so a new proxy on the same store resumes them.
    pub async fn shutdown(self) {
        self.inner.cancel.cancel();
        self.inner.tracker.close();
        self.inner.tracker.wait().await;
        let tasks: Vec<_> = {
            let mut live = lock(&self.inner.live);
            live.drain()
                .filter_map(|(_, l)| lock(&l.task).take())
                .collect()
        };
        for t in tasks {
            let _ = t.await;
        }
        if let Err(e) = self.inner.store.flush() {
            warn!(error = %e, "token store flush failed at shutdown");
        }
        let _ = self.inner.verifier.replay_cache().flush();
    }

    // ----- operations -------------------------------------------------------------------

    /// Mints a token (site-internal). Serving and relaying start at once.
    pub async fn mint(&self, req: MintToken) -> Result<Minted, ProxyError> {
        let s = &self.inner.settings;
        let mut total = 0;
        let mut file_names = Vec::new();
        match &req.purpose {
            TokenPurpose::Serve { files } => {
                if files.is_empty() {
                    return Err(ProxyError::Invalid("no files to serve"));
                }
                for f in files {
                    if file_names.contains(&f.name) {
                        return Err(ProxyError::Invalid("duplicate logical file name"));
                    }
                    if !Path::new(&f.path).is_absolute() {
                        return Err(ProxyError::Invalid("file paths must be absolute"));
                    }
                    let sh = shape(Path::new(&f.path)).map_err(|source| ProxyError::File {
                        name: f.name.clone(),
                        source,
                    })?;
                    total += sh.allocated();
                    file_names.push(f.name.clone());
                }
            }
            TokenPurpose::Receive { dir } => {
                let p = Path::new(dir);
                if !p.is_absolute() {
                    return Err(ProxyError::Invalid("receive directory must be absolute"));
                }
                let meta = std::fs::metadata(p).map_err(|source| ProxyError::File {
                    name: "receive directory".to_string(),
                    source,
                })?;
                if !meta.is_dir() {
                    return Err(ProxyError::Invalid("receive directory is not a directory"));
                }
            }
            TokenPurpose::Relay { source } => {
                if !s.relay_allowed {
                    return Err(ProxyError::RelayNotAllowed);
                }
                if source.proxy == self.inner.uri {
                    return Err(ProxyError::Invalid("cannot relay from this proxy itself"));
                }
            }
        }
        let ttl = req.ttl_ms.unwrap_or(s.default_ttl_ms).min(s.max_ttl_ms);
        let now = now_ms();
        let token = TransferToken::random();
        let rec = TokenRecord {
            token,
            migration_id: req.migration_id,
            vm: req.vm,
            host: req.host,
            purpose: req.purpose,
            created_ms: now,
            expires_ms: now.saturating_add(ttl),
            status: TransferStatus::Pending,
            expired: false,
            digests: Vec::new(),
            source: None,
            total_bytes: total,
            used: false,
            complete: false,
            file_names,
            max_bytes_per_sec: None,
            partial: None,
        };
        self.inner.store.put(&rec)?;
        info!(migration.id = %rec.migration_id, vm.id = %rec.vm, "token minted");
        if matches!(
            rec.purpose,
            TokenPurpose::Serve { .. } | TokenPurpose::Relay { .. }
        ) {
            self.spawn_transfer(rec.clone());
        }
        Ok(Minted {
            token,
            proxy: self.inner.uri.clone(),
            expires_ms: rec.expires_ms,
            total_bytes: total,
        })
    }

    /// Initiate transfer at this (destination) proxy: checks both tokens and starts fetching,
    /// paced to at most the request's `max_bytes_per_sec` (the migration's bandwidth cap; the
    /// proxy's own `transfer.max_bytes_per_sec` applies when smaller). Returns the status right
    /// away; the transfer continues in the background. A repeated request for a transfer under
    /// way keeps the cap it started with.
    pub async fn fetch(&self, req: FetchTransfer) -> Result<TransferStatus, ProxyError> {
        let max_bytes_per_sec = req.max_bytes_per_sec;
        let rec = self.live_record(&req.destination)?;
        if !matches!(rec.purpose, TokenPurpose::Receive { .. }) {
            return Err(ProxyError::WrongPurpose {
                expected: "receive",
            });
        }
        match &rec.status {
            TransferStatus::Succeeded { .. } => return Err(ProxyError::TokenUsed),
            TransferStatus::Transferring { .. } if self.is_running(&rec.token) => {
                // A repeated Initiate transfer (e.g. after a lost reply) is answered, not
                // started twice; a different source is someone else using the token.
                return if rec.source.as_ref() == Some(&req.source) {
                    self.status(&req.destination)
                } else {
                    Err(ProxyError::TokenUsed)
                };
            }
            _ => {}
        }
        // Ask the source proxy first, so a bad source token is refused now with its reason
        // rather than after a stall.
        match self
            .inner
            .peers
            .status(&req.source.proxy, req.migration_id, req.source.token)
            .await
        {
            Ok(TransferStatus::Succeeded { .. }) => return Err(ProxyError::TokenUsed),
            Ok(TransferStatus::Failed { reason }) => {
                return Err(ProxyError::SourceRefused {
                    code: ErrorCode::TransferFailed,
                    message: reason,
                })
            }
            Ok(_) => {}
            Err(ClientError::Refused { code, message }) => {
                return Err(ProxyError::SourceRefused { code, message })
            }
            Err(e) => return Err(ProxyError::SourceUnreachable(e)),
        }
        let source = req.source.clone();
        let rec = self
            .inner
            .store
            .update(&rec.token, |r| {
                r.used = true;
                r.source = Some(source);
                r.max_bytes_per_sec = max_bytes_per_sec;
                r.status = TransferStatus::Transferring {
                    bytes_done: 0,
                    bytes_total: r.total_bytes,
                };
            })?
            .ok_or(ProxyError::UnknownToken)?;
        self.spawn_transfer(rec.clone());
        // A small transfer is over within a few milliseconds: answering with its outcome
        // saves the Controller a round of Initiate transfer across the whole chain. A large
        // one is answered with its progress after this short wait.
        // (The status is read from memory: polling it often costs nothing on the bus.)
        let deadline = tokio::time::Instant::now() + FIRST_ANSWER_WAIT;
        loop {
            let status = self.status(&rec.token)?;
            if !matches!(status, TransferStatus::Transferring { .. })
                || tokio::time::Instant::now() >= deadline
            {
                return Ok(status);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Status of a token minted here.
    pub fn status(&self, token: &TransferToken) -> Result<TransferStatus, ProxyError> {
        let rec = self.live_record(token)?;
        if let TransferStatus::Transferring { .. } = rec.status {
            if let Some(l) = lock(&self.inner.live).get(token) {
                return Ok(TransferStatus::Transferring {
                    bytes_done: l.done.load(Ordering::Relaxed),
                    bytes_total: l.total.load(Ordering::Relaxed),
                });
            }
        }
        Ok(rec.status)
    }

    /// Figures of a token (bytes handled and published).
    pub fn stats(&self, token: &TransferToken) -> Option<TransferStats> {
        let rec = self.inner.store.get(token).ok()??;
        let live = lock(&self.inner.live).get(token).cloned();
        let published = lock(&self.inner.published).get(token).copied().unwrap_or(0);
        let fetched = lock(&self.inner.fetched).get(token).copied().unwrap_or(0);
        Some(TransferStats {
            bytes_done: live
                .as_ref()
                .map(|l| l.done.load(Ordering::Relaxed))
                .unwrap_or(if rec.complete { rec.total_bytes } else { 0 }),
            bytes_total: rec.total_bytes,
            bytes_published: published,
            bytes_fetched: fetched,
        })
    }

    /// The receiving end acknowledges the digests it verified; the serving (or relaying) end
    /// turns succeeded only if they equal its own.
    pub async fn acknowledge(&self, ack: TransferAck) -> Result<TransferStatus, ProxyError> {
        let rec = self.live_record(&ack.token)?;
        let relay_source = match &rec.purpose {
            TokenPurpose::Serve { .. } => None,
            TokenPurpose::Relay { source } => Some(source.clone()),
            TokenPurpose::Receive { .. } => {
                return Err(ProxyError::WrongPurpose {
                    expected: "serve or relay",
                })
            }
        };
        match &rec.status {
            TransferStatus::Succeeded { digests } => {
                return if *digests == sorted(ack.digests) {
                    Ok(rec.status)
                } else {
                    Err(ProxyError::TokenUsed)
                };
            }
            TransferStatus::Failed { .. } => return Ok(rec.status),
            _ => {}
        }
        if !rec.complete {
            return Err(ProxyError::NotReady);
        }
        let acked = sorted(ack.digests);
        let status = if acked != sorted(rec.digests.clone()) {
            warn!(migration.id = %rec.migration_id, vm.id = %rec.vm, "acknowledged digests differ");
            TransferStatus::Failed {
                reason: "digests acknowledged by the receiving end differ from the served files"
                    .to_string(),
            }
        } else if let Some(source) = relay_source {
            // The source turns succeeded only when the far end verified, so the relay passes
            // the acknowledgement on and reports what the source says.
            let fwd = TransferAck {
                migration_id: ack.migration_id,
                token: source.token,
                digests: acked.clone(),
            };
            match self.inner.peers.ack(&source.proxy, &fwd).await {
                Ok(TransferStatus::Succeeded { digests }) if digests == acked => {
                    TransferStatus::Succeeded { digests: acked }
                }
                Ok(other) => TransferStatus::Failed {
                    reason: format!("source did not confirm the digests: {other:?}"),
                },
                Err(e) => return Err(ProxyError::SourceUnreachable(e)),
            }
        } else {
            TransferStatus::Succeeded { digests: acked }
        };
        self.inner
            .store
            .update(&rec.token, |r| r.status = status.clone())?;
        info!(migration.id = %rec.migration_id, vm.id = %rec.vm, ?status, "transfer acknowledged");
        Ok(status)
    }

    /// Releases a token after commit or abort (site-internal): stops its transfer, deletes its
    /// objects, and on abort also the files it received.
    pub async fn release(&self, req: ReleaseToken) -> Result<Released, ProxyError> {
        let rec = self
            .inner
            .store
            .get(&req.token)?
            .ok_or(ProxyError::UnknownToken)?;
        self.stop_transfer(&rec.token).await;
        let deleted = self
            .discard(&rec, req.outcome == ReleaseOutcome::Abort)
            .await?;
        self.inner.store.remove(&rec.token)?;
        lock(&self.inner.published).remove(&rec.token);
        info!(migration.id = %rec.migration_id, vm.id = %rec.vm, outcome = ?req.outcome, "token released");
        Ok(Released {
            token: rec.token,
            objects_deleted: deleted,
        })
    }

    /// Collects expired tokens now: stops their transfers, deletes their objects and partial
    /// files, and keeps a tombstone (refused as expired) until it is old enough to forget.
    /// Returns how many tokens expired in this pass.
    pub async fn collect_garbage(&self) -> Result<usize, ProxyError> {
        let now = now_ms();
        let mut expired = 0;
        for rec in self.inner.store.all()? {
            if rec.expired {
                if now
                    > rec
                        .expires_ms
                        .saturating_add(self.inner.settings.tombstone_ms)
                {
                    self.inner.store.remove(&rec.token)?;
                }
                continue;
            }
            if now <= rec.expires_ms {
                continue;
            }
            self.stop_transfer(&rec.token).await;
            // Received files that were verified may be a committed VM's: only partial files go.
            if let Err(e) = self.discard(&rec, false).await {
                warn!(error = %e, "clean-up of an expired token failed; retried next pass");
                continue;
            }
            self.inner.store.update(&rec.token, |r| {
                r.expired = true;
                if !matches!(r.status, TransferStatus::Succeeded { .. }) {
                    r.status = TransferStatus::Failed {
                        reason: "token expired".to_string(),
                    };
                }
            })?;
            lock(&self.inner.published).remove(&rec.token);
            expired += 1;
            info!(migration.id = %rec.migration_id, vm.id = %rec.vm, "token expired");
        }
        Ok(expired)
    }

    // ----- internals --------------------------------------------------------------------

    fn live_record(&self, token: &TransferToken) -> Result<TokenRecord, ProxyError> {
        let rec = self
            .inner
            .store
            .get(token)?
            .ok_or(ProxyError::UnknownToken)?;
        if rec.expired || now_ms() > rec.expires_ms {
            return Err(ProxyError::ExpiredToken);
        }
        Ok(rec)
    }

    fn is_running(&self, token: &TransferToken) -> bool {
        lock(&self.inner.live).contains_key(token)
    }

    async fn stop_transfer(&self, token: &TransferToken) {
        let live = lock(&self.inner.live).remove(token);
        if let Some(l) = live {
            l.cancel.cancel();
            let task = lock(&l.task).take();
            if let Some(t) = task {
                let _ = t.await;
            }
        }
    }

    /// Deletes a token's objects (serve, relay) or partial files (receive; all received files
    /// too when `received_too`). Returns the number of objects deleted.
    async fn discard(&self, rec: &TokenRecord, received_too: bool) -> Result<u64, ProxyError> {
        match &rec.purpose {
            TokenPurpose::Serve { .. } | TokenPurpose::Relay { .. } => {
                let objs = TokenObjects::new(&rec.token);
                let mut n = 0;
                if purge_object(
                    &self.inner.stream,
                    &objs.chunk_subject(None),
                    &objs.manifest_name(),
                )
                .await?
                    > 0
                {
                    n += 1;
                }
                for name in &rec.file_names {
                    if purge_object(
                        &self.inner.stream,
                        &objs.chunk_subject(Some(name)),
                        &objs.file_name(name),
                    )
                    .await?
                        > 0
                    {
                        n += 1;
                    }
                }
                Ok(n)
            }
            TokenPurpose::Receive { dir } => {
                let dir = Path::new(dir);
                for name in &rec.file_names {
                    let _ = std::fs::remove_file(partial_path(dir, name));
                    if received_too {
                        let _ = std::fs::remove_file(dir.join(name));
                    }
                }
                Ok(0)
            }
        }
    }

    fn resume(&self) -> Result<(), ProxyError> {
        for rec in self.inner.store.all()? {
            if rec.expired || now_ms() > rec.expires_ms || rec.status.is_final() {
                continue;
            }
            let run = match rec.purpose {
                TokenPurpose::Serve { .. } | TokenPurpose::Relay { .. } => !rec.complete,
                TokenPurpose::Receive { .. } => {
                    rec.used && matches!(rec.status, TransferStatus::Transferring { .. })
                }
            };
            if run {
                info!(migration.id = %rec.migration_id, vm.id = %rec.vm, "resuming transfer");
                self.spawn_transfer(rec);
            }
        }
        Ok(())
    }

    fn spawn_transfer(&self, rec: TokenRecord) {
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
                l2.finished.store(true, Ordering::Relaxed);
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
            TokenPurpose::Relay { source } => self.relay(rec, source, live).await,
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
                _ = tokio::time::sleep(interval) => {}
                _ = live.cancel.cancelled() => return,
            }
        }
    }

    // ----- serving --------------------------------------------------------------------

    async fn serve(
        &self,
        rec: TokenRecord,
        mut files: Vec<LocalFile>,
        live: Arc<Live>,
    ) -> Result<(), TaskError> {
        files.sort_by(|a, b| a.name.cmp(&b.name));
        self.store_update(&rec.token, |r| {
            r.status = TransferStatus::Transferring {
                bytes_done: 0,
                bytes_total: r.total_bytes,
            }
        })?;
        let objs = TokenObjects::new(&rec.token);
        let mut manifest = TransferManifest {
            vm: rec.vm.clone(),
            files: Vec::new(),
        };
        let mut total = 0;
        for f in &files {
            let sh = shape(Path::new(&f.path)).map_err(|e| TaskError::io(&f.name, e))?;
            total += sh.allocated();
            manifest.files.push(ManifestFile {
                name: f.name.clone(),
                size: sh.size,
                allocated: sh.allocated(),
            });
        }
        live.total.store(total, Ordering::Relaxed);
        self.retrying(|| self.publish_manifest(&objs, &manifest))
            .await?;
        let mut current = self.inner.store.get(&rec.token)?.unwrap_or(rec);
        for f in &files {
            let allocated = manifest
                .files
                .iter()
                .find(|m| m.name == f.name)
                .map(|m| m.allocated)
                .unwrap_or(0);
            if current.digest_of(&f.name).is_some() {
                live.done.fetch_add(allocated, Ordering::Relaxed);
                continue;
            }
            let base = live.done.load(Ordering::Relaxed);
            let digest = self
                .retrying(|| {
                    live.done.store(base, Ordering::Relaxed);
                    self.publish_file(&objs, f, &live, current.token)
                })
                .await?;
            current = self.store_update(&current.token, |r| r.digests.push(digest.clone()))?;
        }
        self.mark_all_published(&current.token, total)?;
        info!(bytes = total, "all files published");
        Ok(())
    }

    /// Records that every file of a serving (or relaying) token is in the bucket; the status
    /// turns `Succeeded` only when the destination acknowledges the digests.
    fn mark_all_published(&self, token: &TransferToken, total: u64) -> Result<(), TaskError> {
        self.store_update(token, |r| {
            r.complete = true;
            r.digests = sorted(std::mem::take(&mut r.digests));
            r.status = TransferStatus::Transferring {
                bytes_done: total,
                bytes_total: total,
            };
        })?;
        Ok(())
    }

    async fn publish_manifest(
        &self,
        objs: &TokenObjects,
        manifest: &TransferManifest,
    ) -> Result<(), TaskError> {
        let name = objs.manifest_name();
        let subject = TokenObjects::meta_subject(&name);
        let (raw, _) = envelope::seal_message(
            &self.inner.identity,
            Addressing::broadcast(&subject),
            manifest,
        )
        .map_err(|e| TaskError::Manifest(e.to_string()))?;
        let digest: [u8; 32] = Sha256::digest(&raw).into();
        let mut w = ObjectWriter::begin(
            &self.inner.js,
            &self.inner.stream,
            &name,
            &objs.nuid(None),
            1,
        )
        .await?;
        w.chunk(0, raw.into()).await?;
        w.finish(digest, HashMap::new()).await?;
        Ok(())
    }

    async fn publish_file(
        &self,
        objs: &TokenObjects,
        f: &LocalFile,
        live: &Live,
        token: TransferToken,
    ) -> Result<FileDigest, TaskError> {
        let s = &self.inner.settings;
        let mut rx = spawn_reader(PathBuf::from(&f.path), s.chunk_size);
        let mut w = ObjectWriter::begin(
            &self.inner.js,
            &self.inner.stream,
            &objs.file_name(&f.name),
            &objs.nuid(Some(&f.name)),
            s.publish_window,
        )
        .await?;
        while let Some(item) = rx.recv().await {
            match item {
                ReadItem::Chunk { offset, data } => {
                    let n = data.len() as u64;
                    w.chunk(offset, data).await?;
                    live.done.fetch_add(n, Ordering::Relaxed);
                    live.sent.fetch_add(n, Ordering::Relaxed);
                    *lock(&self.inner.published).entry(token).or_default() += n;
                }
                ReadItem::Done {
                    sha256,
                    packed_sha256,
                    size,
                    allocated,
                } => {
                    let meta = file_metadata(size, allocated, &sha256);
                    w.finish(packed_sha256, meta).await?;
                    debug!(file = %f.name, size, allocated, "file published");
                    return Ok(FileDigest {
                        name: f.name.clone(),
                        sha256,
                        len: size,
                    });
                }
                ReadItem::Failed(e) => return Err(TaskError::io(&f.name, e)),
            }
        }
        Err(TaskError::io(
            &f.name,
            std::io::Error::other("reader stopped early"),
        ))
    }

    /// Runs `step` again after transient bus trouble (a restarting server, a lost
    /// connection), until it succeeds, fails for good, or failures have gone on for the stall
    /// timeout without an attempt that ran for a while (one that did is taken as progress).
    async fn retrying<T, F, Fut>(&self, mut step: F) -> Result<T, TaskError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, TaskError>>,
    {
        const LONGEST_PAUSE: Duration = Duration::from_secs(3);
        let stall = self.inner.settings.stall();
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

    fn store_update(
        &self,
        token: &TransferToken,
        f: impl FnOnce(&mut TokenRecord),
    ) -> Result<TokenRecord, TaskError> {
        self.inner
            .store
            .update(token, f)?
            .ok_or(TaskError::Cancelled)
    }

    // ----- fetching -------------------------------------------------------------------

    async fn source_bucket(&self, source: &Endpoint) -> Result<Stream, TaskError> {
        let ctx = jetstream::with_domain(self.inner.client.clone(), source.proxy.site().as_str());
        self.retrying(|| async { Ok(open_bucket(&ctx).await?) })
            .await
    }

    async fn read_manifest(
        &self,
        stream: &Stream,
        source: &Endpoint,
    ) -> Result<TransferManifest, TaskError> {
        let objs = TokenObjects::new(&source.token);
        let name = objs.manifest_name();
        let mut follower = ObjectFollower::open(
            stream,
            objs.chunk_subject(None),
            &name,
            None,
            self.inner.settings.fetch_window,
            None,
            self.inner.settings.stall(),
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
            .open_record(&raw, &TokenObjects::meta_subject(&name))
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
        Ok(m)
    }

    async fn receive(
        &self,
        rec: TokenRecord,
        dir: PathBuf,
        live: Arc<Live>,
    ) -> Result<(), TaskError> {
        let source = rec
            .source
            .clone()
            .ok_or_else(|| TaskError::Source("no source recorded".to_string()))?;
        let stream = self.source_bucket(&source).await?;
        let manifest = self.read_manifest(&stream, &source).await?;
        let total: u64 = manifest.files.iter().map(|f| f.allocated).sum();
        live.total.store(total, Ordering::Relaxed);
        let names: Vec<String> = manifest.files.iter().map(|f| f.name.clone()).collect();
        let mut current = self.store_update(&rec.token, |r| {
            r.total_bytes = total;
            r.file_names = names;
        })?;
        let objs = TokenObjects::new(&source.token);
        for f in &manifest.files {
            if let Some(d) = current.digest_of(&f.name) {
                // Verified and renamed before a restart: keep it if it is still there intact.
                let ok = std::fs::metadata(dir.join(&f.name)).is_ok_and(|m| m.len() == d.len);
                if ok {
                    live.done.fetch_add(f.allocated, Ordering::Relaxed);
                    continue;
                }
            }
            let base = live.done.load(Ordering::Relaxed);
            let digest = self
                .retrying(|| {
                    live.done.store(base, Ordering::Relaxed);
                    self.receive_file(&stream, &objs, f, &dir, &live, rec.token)
                })
                .await?;
            current = self.store_update(&current.token, |r| {
                r.digests.retain(|d| d.name != digest.name);
                r.digests.push(digest.clone());
            })?;
        }
        let digests = sorted(current.digests.clone());
        self.store_update(&current.token, |r| r.complete = true)?;
        // The source's status turns succeeded only on this acknowledgement; ours only when the
        // source confirms our digests equal what it served.
        let ack = TransferAck {
            migration_id: rec.migration_id,
            token: source.token,
            digests: digests.clone(),
        };
        let confirmed = self
            .retrying(|| async {
                self.inner
                    .peers
                    .ack(&source.proxy, &ack)
                    .await
                    .map_err(|e| match e {
                        ClientError::Refused { code, message } => {
                            TaskError::Source(format!("{code}: {message}"))
                        }
                        other => TaskError::Object(ObjectError::Read(other.to_string())),
                    })
            })
            .await?;
        match confirmed {
            TransferStatus::Succeeded { digests: d } if d == digests => {
                self.store_update(&current.token, |r| {
                    r.status = TransferStatus::Succeeded {
                        digests: digests.clone(),
                    }
                })?;
                info!("transfer verified and acknowledged");
                Ok(())
            }
            other => Err(TaskError::Source(format!(
                "source did not confirm the digests: {other:?}"
            ))),
        }
    }

    async fn receive_file(
        &self,
        stream: &Stream,
        objs: &TokenObjects,
        f: &ManifestFile,
        dir: &Path,
        live: &Live,
        token: TransferToken,
    ) -> Result<FileDigest, TaskError> {
        let s = &self.inner.settings;
        let partial = partial_path(dir, &f.name);
        // Resume from the last checkpoint of this file if its partial file is still there as
        // it was recorded; otherwise start the file afresh.
        let checkpoint = self
            .inner
            .store
            .get(&token)?
            .and_then(|r| r.partial)
            .filter(|p| p.name == f.name);
        let resumed = match checkpoint {
            Some(p) => match FileSink::resume(partial.clone(), f.size, p.resume_at).await {
                Ok(sink) => Some((sink, p)),
                Err(e) => {
                    warn!(file = %f.name, error = %e, "cannot resume the partial file; starting it over");
                    None
                }
            },
            None => None,
        };
        let (mut sink, from) = match resumed {
            Some((sink, p)) => {
                info!(file = %f.name, bytes = p.position.bytes, "resuming the file");
                (sink, Some(p))
            }
            None => (
                FileSink::create(partial.clone(), f.size).map_err(|e| TaskError::io(&f.name, e))?,
                None,
            ),
        };
        let mut follower = ObjectFollower::open(
            stream,
            objs.chunk_subject(Some(&f.name)),
            &objs.file_name(&f.name),
            Some(f.allocated),
            s.fetch_window,
            from.as_ref().map(|p| p.position),
            s.stall(),
        )
        .await?;
        let start = from.as_ref().map(|p| p.position).unwrap_or_default();
        let mut expected = start.chunks;
        let mut got = start.bytes;
        let mut checkpoints = Checkpoints::new(s.checkpoint_bytes);
        live.done.fetch_add(got, Ordering::Relaxed);
        let result = loop {
            match follower.next().await? {
                Incoming::Chunk {
                    index,
                    offset,
                    data,
                } => {
                    if index == 0 && expected != 0 {
                        // The source started the file over (it restarted): so do we. A
                        // checkpoint of the earlier attempt no longer applies.
                        sink.reset().await.map_err(|e| TaskError::io(&f.name, e))?;
                        live.done.fetch_sub(got, Ordering::Relaxed);
                        expected = 0;
                        got = 0;
                        checkpoints.reset();
                        self.store_update(&token, |r| r.partial = None)?;
                    } else if index != expected {
                        break Err(TaskError::Gap {
                            name: f.name.clone(),
                            index,
                            expected,
                        });
                    }
                    let n = data.len() as u64;
                    *lock(&self.inner.fetched).entry(token).or_default() += n;
                    pace(live, n).await;
                    if let Err(e) = sink.write(offset, data).await {
                        break Err(TaskError::Corrupt(format!("{} ({e})", f.name)));
                    }
                    expected += 1;
                    got += n;
                    live.done.fetch_add(n, Ordering::Relaxed);
                    let position = follower.position();
                    let at = || PartialFile {
                        name: f.name.clone(),
                        position,
                        resume_at: offset + n,
                    };
                    match checkpoints
                        .after_write(&mut sink, n, got < f.allocated, at)
                        .await
                    {
                        Ok(Some(durable)) => {
                            self.store_update(&token, |r| r.partial = Some(durable))?;
                        }
                        Ok(None) => {}
                        Err(e) => break Err(TaskError::io(&f.name, e)),
                    }
                }
                Incoming::Done(info) => {
                    if info.chunks as u64 != expected || info.size as u64 != got {
                        break Err(TaskError::Corrupt(format!(
                            "{} ({expected} chunks of {}, {got} bytes of {})",
                            f.name, info.chunks, info.size
                        )));
                    }
                    let digest = sink.finish().await.map_err(|e| TaskError::io(&f.name, e))?;
                    let want = info.metadata.get(META_SHA256).cloned().unwrap_or_default();
                    let size_ok = info
                        .metadata
                        .get(META_SIZE)
                        .is_some_and(|v| v.parse::<u64>().ok() == Some(f.size));
                    let adr_ok = f.allocated != f.size
                        || info.digest.as_deref()
                            == Some(format!("SHA-256={}", URL_SAFE.encode(digest)).as_str());
                    if hex::encode(digest) != want || !size_ok || !adr_ok {
                        break Err(TaskError::DigestMismatch(f.name.clone()));
                    }
                    break Ok(FileDigest {
                        name: f.name.clone(),
                        sha256: digest,
                        len: f.size,
                    });
                }
            }
        };
        match result {
            Ok(d) => {
                let target = dir.join(&f.name);
                std::fs::rename(&partial, &target).map_err(|e| TaskError::io(&f.name, e))?;
                sync_dir(dir).map_err(|e| TaskError::io(&f.name, e))?;
                self.store_update(&token, |r| r.partial = None)?;
                debug!(file = %f.name, "file verified");
                Ok(d)
            }
            // Bus trouble: keep the partial file and its checkpoint for the retry to resume.
            Err(e) if e.is_transient() => Err(e),
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                let _ = self.inner.store.update(&token, |r| r.partial = None);
                Err(e)
            }
        }
    }

    // ----- relaying -------------------------------------------------------------------

    async fn relay(
        &self,
        rec: TokenRecord,
        source: Endpoint,
        live: Arc<Live>,
    ) -> Result<(), TaskError> {
        match self
            .inner
            .peers
            .status(&source.proxy, rec.migration_id, source.token)
            .await
        {
            Ok(TransferStatus::Failed { reason }) => return Err(TaskError::Source(reason)),
            Ok(TransferStatus::Succeeded { .. }) => {
                return Err(TaskError::Source("source token already used".to_string()))
            }
            Ok(_) => {}
            Err(ClientError::Refused { code, message }) => {
                return Err(TaskError::Source(format!("{code}: {message}")))
            }
            Err(e) => return Err(TaskError::Source(e.to_string())),
        }
        let src_stream = self.source_bucket(&source).await?;
        let manifest = self.read_manifest(&src_stream, &source).await?;
        let total: u64 = manifest.files.iter().map(|f| f.allocated).sum();
        live.total.store(total, Ordering::Relaxed);
        let names: Vec<String> = manifest.files.iter().map(|f| f.name.clone()).collect();
        let mut current = self.store_update(&rec.token, |r| {
            r.total_bytes = total;
            r.file_names = names;
            r.source = Some(source.clone());
            r.used = true;
            r.status = TransferStatus::Transferring {
                bytes_done: 0,
                bytes_total: total,
            };
        })?;
        let own = TokenObjects::new(&rec.token);
        let from = TokenObjects::new(&source.token);
        // The far end verifies the manifest against this site's key: it never learns the source.
        let own_manifest = TransferManifest {
            vm: rec.vm.clone(),
            files: manifest.files.clone(),
        };
        self.retrying(|| self.publish_manifest(&own, &own_manifest))
            .await?;
        for f in &manifest.files {
            if current.digest_of(&f.name).is_some() {
                live.done.fetch_add(f.allocated, Ordering::Relaxed);
                continue;
            }
            let base = live.done.load(Ordering::Relaxed);
            let digest = self
                .retrying(|| {
                    live.done.store(base, Ordering::Relaxed);
                    self.relay_file(&src_stream, &from, &own, f, &live, rec.token)
                })
                .await?;
            current = self.store_update(&current.token, |r| r.digests.push(digest.clone()))?;
        }
        self.mark_all_published(&current.token, total)?;
        info!(bytes = total, "all files relayed");
        Ok(())
    }

    async fn relay_file(
        &self,
        src: &Stream,
        from: &TokenObjects,
        own: &TokenObjects,
        f: &ManifestFile,
        live: &Live,
        token: TransferToken,
    ) -> Result<FileDigest, TaskError> {
        let s = &self.inner.settings;
        let mut follower = ObjectFollower::open(
            src,
            from.chunk_subject(Some(&f.name)),
            &from.file_name(&f.name),
            Some(f.allocated),
            s.fetch_window,
            None,
            s.stall(),
        )
        .await?;
        let (own_name, own_nuid) = (own.file_name(&f.name), own.nuid(Some(&f.name)));
        let begin = || {
            ObjectWriter::begin(
                &self.inner.js,
                &self.inner.stream,
                &own_name,
                &own_nuid,
                s.publish_window,
            )
        };
        let mut w = begin().await?;
        let mut whole = LogicalHasher::new();
        let mut packed = Sha256::new();
        let mut expected = 0u64;
        loop {
            match follower.next().await? {
                Incoming::Chunk {
                    index,
                    offset,
                    data,
                } => {
                    if index == 0 && expected != 0 {
                        live.done.fetch_sub(w.bytes_sent(), Ordering::Relaxed);
                        w = begin().await?;
                        whole = LogicalHasher::new();
                        packed = Sha256::new();
                        expected = 0;
                    } else if index != expected {
                        return Err(TaskError::Gap {
                            name: f.name.clone(),
                            index,
                            expected,
                        });
                    }
                    whole
                        .update(offset, &data)
                        .map_err(|_| TaskError::Corrupt(f.name.clone()))?;
                    packed.update(&data);
                    let n = data.len() as u64;
                    pace(live, n).await;
                    w.chunk(offset, data).await?;
                    expected += 1;
                    live.done.fetch_add(n, Ordering::Relaxed);
                    *lock(&self.inner.published).entry(token).or_default() += n;
                }
                Incoming::Done(info) => {
                    if info.chunks as u64 != expected {
                        return Err(TaskError::Corrupt(f.name.clone()));
                    }
                    let digest = whole
                        .finish(f.size)
                        .map_err(|_| TaskError::Corrupt(f.name.clone()))?;
                    let want = info.metadata.get(META_SHA256).cloned().unwrap_or_default();
                    if hex::encode(digest) != want {
                        return Err(TaskError::DigestMismatch(f.name.clone()));
                    }
                    let packed: [u8; 32] = packed.finalize().into();
                    w.finish(packed, file_metadata(f.size, f.allocated, &digest))
                        .await?;
                    return Ok(FileDigest {
                        name: f.name.clone(),
                        sha256: digest,
                        len: f.size,
                    });
                }
            }
        }
    }

    // ----- the bus --------------------------------------------------------------------

    fn spawn_service(&self, mut sub: async_nats::Subscriber) {
        let this = self.clone();
        let sem = Arc::new(Semaphore::new(
            self.inner.settings.max_concurrent_requests.max(1),
        ));
        self.inner.tracker.spawn(async move {
            loop {
                let msg = tokio::select! {
                    _ = this.inner.cancel.cancelled() => break,
                    m = sub.next() => match m { Some(m) => m, None => break },
                };
                let Ok(permit) = sem.clone().acquire_owned().await else {
                    break;
                };
                let h = this.clone();
                this.inner.tracker.spawn(async move {
                    h.handle(msg).await;
                    drop(permit);
                });
            }
            let _ = sub.unsubscribe().await;
        });
    }

    fn spawn_gc(&self) {
        let this = self.clone();
        let every = Duration::from_millis(self.inner.settings.gc_interval_ms.max(100));
        self.inner.tracker.spawn(async move {
            loop {
                tokio::select! {
                    _ = this.inner.cancel.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                if let Err(e) = this.collect_garbage().await {
                    warn!(error = %e, "garbage collection failed");
                }
            }
        });
    }

    async fn handle(&self, msg: async_nats::Message) {
        let Some(reply_to) = msg.reply.clone() else {
            return;
        };
        let subject = msg.subject.as_str();
        let op = match Subject::parse(subject) {
            Ok(ParsedSubject::Proxy { proxy, op }) if proxy == self.inner.uri => op,
            // Progress events (our own among them) and foreign subjects are not requests.
            _ => return,
        };
        let opened = match self
            .inner
            .verifier
            .open_request(&msg.payload, subject, now_ms())
        {
            Ok(o) => o,
            Err(e) => {
                debug!(error = %e, "request refused");
                self.reply_unverified(&msg.payload, subject, reply_to, &e)
                    .await;
                return;
            }
        };
        let span = tracing::info_span!("proxy_request", op = op.as_str(), from = %opened.from);
        let answer = self.dispatch(op, &opened).instrument(span).await;
        let sealed = match answer {
            Ok(bytes) => Ok(bytes),
            Err(reply) => {
                envelope::seal_message(&self.inner.identity, Addressing::reply_to(&opened), &reply)
                    .map(|(b, _)| b)
            }
        };
        match sealed {
            Ok(bytes) => {
                let _ = self.inner.client.publish(reply_to, bytes.into()).await;
            }
            Err(e) => warn!(error = %e, "cannot sign a reply"),
        }
    }

    async fn dispatch(&self, op: ProxyOp, opened: &Opened) -> Result<Vec<u8>, ErrorReply> {
        let own = &opened.from == self.inner.uri.site();
        let refuse = |e: ProxyError| ErrorReply::new(e.code(), e.to_string());
        let bad = |e: EnvelopeError| ErrorReply::new(ErrorCode::Malformed, e.to_string());
        let reply = |body: &dyn ErasedReply| body.seal(&self.inner.identity, opened);
        match (op, opened.body_type()) {
            (ProxyOp::Mint, _) => {
                if !own {
                    return Err(refuse(ProxyError::NotOwnSite("mint")));
                }
                let req: MintToken = opened.body().map_err(bad)?;
                let m = self.mint(req).await.map_err(refuse)?;
                reply(&m)
            }
            (ProxyOp::Fetch, _) => {
                if !own {
                    return Err(refuse(ProxyError::NotOwnSite("fetch")));
                }
                let req: FetchTransfer = opened.body().map_err(bad)?;
                let migration_id = req.migration_id;
                let status = self.fetch(req).await.map_err(refuse)?;
                reply(&TransferStatusReply {
                    migration_id,
                    status,
                })
            }
            (ProxyOp::Status, t) if t == TransferAck::TYPE => {
                let ack: TransferAck = opened.body().map_err(bad)?;
                let migration_id = ack.migration_id;
                let status = self.acknowledge(ack).await.map_err(refuse)?;
                reply(&TransferStatusReply {
                    migration_id,
                    status,
                })
            }
            (ProxyOp::Status, _) => {
                let q: TransferStatusQuery = opened.body().map_err(bad)?;
                let status = self.status(&q.token).map_err(refuse)?;
                reply(&TransferStatusReply {
                    migration_id: q.migration_id,
                    status,
                })
            }
            (ProxyOp::Release, _) => {
                if !own {
                    return Err(refuse(ProxyError::NotOwnSite("release")));
                }
                let req: ReleaseToken = opened.body().map_err(bad)?;
                let r = self.release(req).await.map_err(refuse)?;
                reply(&r)
            }
        }
    }

    async fn reply_unverified(
        &self,
        raw: &[u8],
        arrived_on: &str,
        reply_to: async_nats::Subject,
        e: &EnvelopeError,
    ) {
        // Answer only what can be addressed: the sender learns why, nobody else. The refusal
        // is signed over the subject the request arrived on, never over one the unverified
        // sender wrote into its envelope: this proxy signs no statement about another subject.
        let Ok(env) = envelope::SignedEnvelope::decode(raw) else {
            return;
        };
        let addressing = Addressing {
            to: &env.from,
            subject: arrived_on,
            re: Some(env.nonce),
        };
        let body = ErrorReply::new(ErrorCode::from_wire(e.code()), e.to_string());
        if let Ok((bytes, _)) = envelope::seal_message(&self.inner.identity, addressing, &body) {
            let _ = self.inner.client.publish(reply_to, bytes.into()).await;
        }
    }
}

/// Signs any reply body (lets `dispatch` treat the reply types alike).
trait ErasedReply {
    fn seal(&self, identity: &SiteIdentity, req: &Opened) -> Result<Vec<u8>, ErrorReply>;
}

impl<B: Body> ErasedReply for B {
    fn seal(&self, identity: &SiteIdentity, req: &Opened) -> Result<Vec<u8>, ErrorReply> {
        envelope::seal_message(identity, Addressing::reply_to(req), self)
            .map(|(b, _)| b)
            .map_err(|e| ErrorReply::new(ErrorCode::Internal, e.to_string()))
    }
}

/// Checkpoints of a file being received: every `every` bytes an fsync of what was written is
/// started, and the position it covers becomes durable (to be recorded) once it has finished.
struct Checkpoints {
    every: u64,
    since: u64,
    syncing: Option<(oneshot::Receiver<std::io::Result<()>>, PartialFile)>,
}

impl Checkpoints {
    fn new(every: u64) -> Self {
        Self {
            every,
            since: 0,
            syncing: None,
        }
    }

    /// Forgets the progress of an attempt that started over.
    fn reset(&mut self) {
        self.since = 0;
        self.syncing = None;
    }

    /// Counts `n` more bytes written to `sink`. Returns the checkpoint whose bytes reached the
    /// disk since the last call, if any; starts the next fsync when one is due, no other is
    /// running, and `more` bytes are still to come (`at` says where the file stands then).
    async fn after_write(
        &mut self,
        sink: &mut FileSink,
        n: u64,
        more: bool,
        at: impl FnOnce() -> PartialFile,
    ) -> std::io::Result<Option<PartialFile>> {
        self.since += n;
        let mut durable = None;
        if let Some((rx, _)) = self.syncing.as_mut() {
            match rx.try_recv() {
                Err(TryRecvError::Empty) => {}
                Ok(synced) => {
                    synced?;
                    durable = self.syncing.take().map(|(_, checkpoint)| checkpoint);
                }
                Err(TryRecvError::Closed) => return Err(std::io::Error::other("sync lost")),
            }
        }
        if self.since >= self.every && more && self.syncing.is_none() {
            self.since = 0;
            let rx = sink.start_sync().await?;
            self.syncing = Some((rx, at()));
        }
        Ok(durable)
    }
}

fn file_metadata(size: u64, allocated: u64, sha256: &[u8; 32]) -> HashMap<String, String> {
    HashMap::from([
        (META_SIZE.to_string(), size.to_string()),
        (META_ALLOCATED.to_string(), allocated.to_string()),
        (META_SHA256.to_string(), hex::encode(sha256)),
    ])
}

/// The temporary name a file is received under; hidden, and never the final name.
pub fn partial_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(".{name}.nubis-partial"))
}

/// Waits until the transfer's bandwidth cap lets `bytes` more through.
async fn pace(live: &Live, bytes: u64) {
    if let Some(p) = live.pace.lock().await.as_mut() {
        p.take(bytes).await;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these short locks leaves plain data behind; keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why a proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The settings are invalid.
    #[error("invalid settings")]
    Config(#[source] crate::config::ConfigError),
    /// The store directory could not be created.
    #[error("cannot create the store directory")]
    StoreDir(#[source] std::io::Error),
    /// The token store could not be opened.
    #[error("cannot open the token store")]
    Store(#[from] crate::store::StoreError),
    /// The replay cache could not be opened.
    #[error("cannot open the replay cache: {0}")]
    Replay(String),
    /// The transfer bucket could not be created or found.
    #[error("transfer bucket unavailable")]
    Bucket(#[from] ObjectError),
    /// Interrupted transfers could not be resumed.
    #[error("cannot resume transfers")]
    Resume(#[source] ProxyError),
    /// The proxy's subjects could not be subscribed.
    #[error("cannot subscribe: {0}")]
    Subscribe(String),
}
