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
//!
//! The proxy is split by concern: this module holds its lifecycle (start, shutdown, the
//! garbage-collection timer); `tokens.rs` the token operations; `transfer.rs` the task of each
//! running transfer; `serve.rs`, `receive.rs` and `relay.rs` what those tasks do; `chunks.rs`
//! the chunk loop that receiving and relaying share; `service.rs` the bus service.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::stream::Stream;
use ed25519_dalek::VerifyingKey;
use nubis_protocol::envelope::{self, Verifier};
use nubis_protocol::identity::SiteIdentity;
use nubis_protocol::message::{FileDigest, ProxyUri, TransferToken};
use nubis_protocol::replay::{Durability, ReplayCache};
use nubis_protocol::subject::Subject;
use nubis_protocol::SiteId;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::client::ProxyClient;
use crate::config::TransferSettings;
use crate::error::ProxyError;
use crate::objects::{ensure_bucket, ObjectError};
use crate::store::TokenStore;
use crate::transfer::Live;

pub use crate::receive::partial_path;

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

/// What every handle of one proxy shares.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) uri: ProxyUri,
    pub(crate) identity: Arc<SiteIdentity>,
    pub(crate) verifier: Arc<Verifier>,
    pub(crate) client: async_nats::Client,
    pub(crate) js: jetstream::Context,
    pub(crate) stream: Stream,
    pub(crate) store: TokenStore,
    pub(crate) settings: TransferSettings,
    pub(crate) peers: ProxyClient,
    pub(crate) live: Mutex<HashMap<TransferToken, Arc<Live>>>,
    /// Bytes published per token, kept after the task ends (for [`TransferProxy::stats`]).
    pub(crate) published: Mutex<HashMap<TransferToken, u64>>,
    /// Chunk bytes read from a source bucket per token since this proxy started.
    pub(crate) fetched: Mutex<HashMap<TransferToken, u64>>,
    pub(crate) cancel: CancellationToken,
    pub(crate) tracker: TaskTracker,
}

/// A running Transfer proxy. Cloning gives another handle to the same proxy.
#[derive(Debug, Clone)]
pub struct TransferProxy {
    pub(crate) inner: Arc<Inner>,
}

/// The current time, ms since the epoch.
pub(crate) fn now_ms() -> u64 {
    envelope::now_ms()
}

/// Digests in the order of their file names (how they are recorded and compared).
pub(crate) fn sorted(mut d: Vec<FileDigest>) -> Vec<FileDigest> {
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

    /// Collects expired tokens every `gc_interval_ms` until the proxy shuts down.
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
}

/// Locks one of the proxy's short-held maps.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these short locks leaves plain data behind; keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why a proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The settings are invalid.
    #[error("invalid settings")]
    Config(#[source] crate::config::InvalidSetting),
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
