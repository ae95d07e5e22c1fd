//! The federation directory (the paper's GMA Directory Service, and the list of sites): a
//! JetStream KV bucket in the hub's domain where every site keeps a self-description signed by
//! itself, refreshed as a liveness heartbeat.
//!
//! Each site watches the bucket and keeps a local view. An entry that claims to be a partner but
//! does not verify against that partner's *pinned* key is ignored and counted as forged; an entry
//! of a site that is not a partner is shown but never trusted. Writes use the KV revision
//! (compare-and-set), so two writers of one key cannot silently overwrite each other.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use async_nats::jetstream::{self, kv};
use futures::StreamExt as _;
use nubis_protocol::envelope::{self, Addressing, SignedEnvelope, Verifier};
use nubis_protocol::identity::SiteIdentity;
use nubis_protocol::message::{ConsumerRegistration, ProducerRegistration, SiteEntry};
use nubis_protocol::subject::{DirectoryKey, DIRECTORY_BUCKET};
use nubis_protocol::{SiteId, VmId};
use tokio_util::sync::CancellationToken;

/// Largest directory value accepted by the bucket.
const MAX_VALUE_BYTES: i32 = 64 * 1024;

/// Why a directory operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    /// The bucket could not be opened or created.
    #[error("cannot open directory bucket {DIRECTORY_BUCKET}")]
    Bucket(#[source] async_nats::Error),
    /// The entry could not be signed or encoded.
    #[error("cannot sign directory entry")]
    Sign(#[source] envelope::EnvelopeError),
    /// Writing the entry failed.
    #[error("cannot write directory entry {key}")]
    Write {
        /// The key.
        key: String,
        /// The cause.
        #[source]
        source: async_nats::Error,
    },
    /// Watching the bucket failed.
    #[error("cannot watch the directory")]
    Watch(#[source] async_nats::Error),
}

/// What this site knows about one site of the federation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteRecord {
    /// The latest entry accepted.
    pub entry: SiteEntry,
    /// Whether it verified against the site's pinned key (only partners can be trusted).
    pub trusted: bool,
    /// KV revision of the entry.
    pub revision: u64,
}

impl SiteRecord {
    /// Whether the site's heartbeat is recent at `now_ms`.
    pub fn reachable(&self, now_ms: u64, liveness_timeout_ms: u64) -> bool {
        now_ms.saturating_sub(self.entry.heartbeat_ms) <= liveness_timeout_ms
    }
}

/// A GMA registration read from the directory.
#[derive(Debug, Clone, PartialEq)]
pub struct Registration<B> {
    /// The site that signed it.
    pub signer: SiteId,
    /// Whether the signature verified against a key pinned here.
    pub trusted: bool,
    /// The registration.
    pub body: B,
}

/// Counters of what the watcher refused.
#[derive(Debug, Default)]
pub struct DirectoryCounters {
    /// Entries that claimed a partner's key but did not verify.
    pub forged: AtomicU64,
    /// Entries that could not be decoded at all.
    pub malformed: AtomicU64,
    /// Verified entries older than the one already held (a rollback).
    pub rolled_back: AtomicU64,
}

/// This site's handle on the directory: publishes its own entry and watches everyone's.
#[derive(Debug)]
pub struct Directory {
    kv: kv::Store,
    identity: Arc<SiteIdentity>,
    /// Verifies records against pinned partner keys and this site's own key.
    verifier: Verifier,
    own_key: DirectoryKey,
    own_revision: Mutex<Option<u64>>,
    view: RwLock<BTreeMap<SiteId, SiteRecord>>,
    counters: DirectoryCounters,
}

/// Opens the directory bucket in `js` (a context bound to the hub's domain), creating it if absent.
pub async fn open_bucket(js: &jetstream::Context) -> Result<kv::Store, DirectoryError> {
    match js.get_key_value(DIRECTORY_BUCKET).await {
        Ok(store) => Ok(store),
        Err(get_err) => {
            tracing::debug!(error = %get_err, "directory bucket not found; creating it");
            js.create_key_value(kv::Config {
                bucket: DIRECTORY_BUCKET.to_string(),
                description: "nubis federation directory (signed site entries, GMA registrations)"
                    .to_string(),
                history: 1,
                max_value_size: MAX_VALUE_BYTES,
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| DirectoryError::Bucket(e.into()))
        }
    }
}

impl Directory {
    /// A directory handle for `identity`, trusting `verifier`'s pinned keys (which must include
    /// this site's own key so that it sees itself).
    pub fn new(kv: kv::Store, identity: Arc<SiteIdentity>, verifier: Verifier) -> Self {
        let own_key = DirectoryKey::site(identity.site());
        Self {
            kv,
            identity,
            verifier,
            own_key,
            own_revision: Mutex::new(None),
            view: RwLock::new(BTreeMap::new()),
            counters: DirectoryCounters::default(),
        }
    }

    /// Signs and writes this site's entry with compare-and-set on the last revision it wrote.
    ///
    /// If someone else wrote the key in between (a forgery, or a second process with the same
    /// identity), the write is refused by the server; the conflict is logged and the entry is
    /// rewritten over the revision actually found, so the site's own word stands.
    pub async fn publish_self(&self, entry: &SiteEntry) -> Result<u64, DirectoryError> {
        let subject = self.own_key.subject();
        let env = envelope::sign(
            &self.identity,
            Addressing::broadcast(subject.as_str()),
            entry,
            envelope::now_ms(),
        )
        .map_err(DirectoryError::Sign)?;
        let value: bytes::Bytes = env.encode().map_err(DirectoryError::Sign)?.into();
        let key = self.own_key.as_str();
        let expected = self.own_revision.lock().map(|g| *g).unwrap_or(None);
        let first: Result<u64, async_nats::Error> = match expected {
            Some(rev) => self
                .kv
                .update(key, value.clone(), rev)
                .await
                .map_err(|e| e.into()),
            None => self
                .kv
                .create(key, value.clone())
                .await
                .map_err(|e| e.into()),
        };
        let revision = match first {
            Ok(rev) => rev,
            Err(conflict) => {
                let found = self
                    .kv
                    .entry(key)
                    .await
                    .map_err(|e| DirectoryError::Write {
                        key: key.to_string(),
                        source: e.into(),
                    })?;
                let found_rev = found.as_ref().map(|e| e.revision).unwrap_or(0);
                if expected.is_some() {
                    tracing::warn!(
                        key,
                        expected = ?expected,
                        found = found_rev,
                        error = %conflict,
                        "own directory entry was changed by another writer; rewriting it"
                    );
                }
                let retry: Result<u64, async_nats::Error> = if found.is_some() {
                    self.kv
                        .update(key, value, found_rev)
                        .await
                        .map_err(|e| e.into())
                } else {
                    self.kv.create(key, value).await.map_err(|e| e.into())
                };
                retry.map_err(|source| DirectoryError::Write {
                    key: key.to_string(),
                    source,
                })?
            }
        };
        if let Ok(mut g) = self.own_revision.lock() {
            *g = Some(revision);
        }
        Ok(revision)
    }

    /// Watches every site entry until `cancel`, keeping the local view current.
    pub async fn watch(&self, cancel: CancellationToken) -> Result<(), DirectoryError> {
        let mut watch = self
            .kv
            .watch_with_history(DirectoryKey::sites_filter())
            .await
            .map_err(|e| DirectoryError::Watch(e.into()))?;
        loop {
            let next = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                next = watch.next() => next,
            };
            match next {
                Some(Ok(entry)) => self.apply(entry),
                Some(Err(e)) => return Err(DirectoryError::Watch(e.into())),
                None => return Err(DirectoryError::Watch("directory watch ended".into())),
            }
        }
    }

    /// Applies one KV change to the view.
    fn apply(&self, entry: kv::Entry) {
        let Some(site) = entry
            .key
            .strip_prefix("site.")
            .and_then(|s| SiteId::new(s).ok())
        else {
            return;
        };
        if matches!(
            entry.operation,
            kv::Operation::Delete | kv::Operation::Purge
        ) {
            if let Ok(mut view) = self.view.write() {
                view.remove(&site);
            }
            return;
        }
        let subject = DirectoryKey::site(&site).subject();
        let record = match self.verifier.open_record(&entry.value, subject.as_str()) {
            Ok(opened) => match opened.body::<SiteEntry>() {
                Ok(body) if opened.from == site && body.site == site => SiteRecord {
                    entry: body,
                    trusted: true,
                    revision: entry.revision,
                },
                _ => return self.refuse(&site, entry.revision, true),
            },
            Err(envelope::EnvelopeError::UnknownSender(_)) => {
                // Not a partner: visible with its claims as written, never trusted.
                let body = SignedEnvelope::decode(&entry.value)
                    .ok()
                    .filter(|env| env.from == site.as_str())
                    .and_then(|env| nubis_protocol::codec::from_slice::<SiteEntry>(&env.body).ok())
                    .filter(|body| body.site == site);
                match body {
                    Some(body) => SiteRecord {
                        entry: body,
                        trusted: false,
                        revision: entry.revision,
                    },
                    None => return self.refuse(&site, entry.revision, false),
                }
            }
            Err(envelope::EnvelopeError::Malformed(_) | envelope::EnvelopeError::TooDeep) => {
                return self.refuse(&site, entry.revision, false)
            }
            Err(_) => return self.refuse(&site, entry.revision, true),
        };
        if let Ok(mut view) = self.view.write() {
            if let Some(held) = view.get(&site) {
                if held.trusted
                    && record.trusted
                    && record.entry.heartbeat_ms < held.entry.heartbeat_ms
                {
                    self.counters.rolled_back.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(site = %site, "older directory entry ignored");
                    return;
                }
                if held.trusted && !record.trusted {
                    return;
                }
            }
            view.insert(site, record);
        }
    }

    /// Counts and logs an entry that was not accepted.
    fn refuse(&self, site: &SiteId, revision: u64, forged: bool) {
        if forged {
            self.counters.forged.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                site = %site,
                revision,
                "directory entry does not verify against the site's pinned key; ignored"
            );
        } else {
            self.counters.malformed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(site = %site, revision, "malformed directory entry ignored");
        }
    }

    /// Writes a signed GMA registration under `key` (this site's own producer or consumer key;
    /// the hub's permissions let a site write no other).
    async fn put_registration<B: nubis_protocol::message::Body>(
        &self,
        key: &DirectoryKey,
        body: &B,
    ) -> Result<u64, DirectoryError> {
        let env = envelope::sign(
            &self.identity,
            Addressing::broadcast(key.subject().as_str()),
            body,
            envelope::now_ms(),
        )
        .map_err(DirectoryError::Sign)?;
        let value: bytes::Bytes = env.encode().map_err(DirectoryError::Sign)?.into();
        self.kv
            .put(key.as_str(), value)
            .await
            .map_err(|e| DirectoryError::Write {
                key: key.as_str().to_string(),
                source: e.into(),
            })
    }

    /// Registers this site as a GMA Consumer of `vm`'s monitoring.
    pub async fn register_consumer(
        &self,
        reg: &ConsumerRegistration,
    ) -> Result<u64, DirectoryError> {
        self.put_registration(&DirectoryKey::consumer(&reg.vm, &reg.consumer_site), reg)
            .await
    }

    /// Registers a GMA Producer (run by this site's hosts) of `vm`'s monitoring.
    pub async fn register_producer(
        &self,
        reg: &ProducerRegistration,
    ) -> Result<u64, DirectoryError> {
        self.put_registration(&DirectoryKey::producer(&reg.vm, &reg.producer), reg)
            .await
    }

    /// Every registration under `prefix`, with the site that signed it and whether that
    /// signature verified against a pinned key (a non-partner's entry is shown, never trusted;
    /// one that fails verification against a pinned key is dropped and counted as forged).
    async fn registrations<B: nubis_protocol::message::Body>(
        &self,
        prefix: &str,
    ) -> Result<Vec<Registration<B>>, DirectoryError> {
        let mut keys = self
            .kv
            .keys()
            .await
            .map_err(|e| DirectoryError::Watch(e.into()))?;
        let mut out = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| DirectoryError::Watch(e.into()))?;
            if !key.starts_with(prefix) {
                continue;
            }
            let Some(entry) = self
                .kv
                .entry(key.clone())
                .await
                .map_err(|e| DirectoryError::Watch(e.into()))?
            else {
                continue;
            };
            let subject = format!("$KV.{DIRECTORY_BUCKET}.{key}");
            match self.verifier.open_record(&entry.value, &subject) {
                Ok(opened) => {
                    if let Ok(body) = opened.body::<B>() {
                        out.push(Registration {
                            signer: opened.from,
                            trusted: true,
                            body,
                        });
                    }
                }
                Err(envelope::EnvelopeError::UnknownSender(_)) => {
                    let decoded = SignedEnvelope::decode(&entry.value).ok().and_then(|env| {
                        let signer = SiteId::new(env.from).ok()?;
                        let body = nubis_protocol::codec::from_slice::<B>(&env.body).ok()?;
                        Some(Registration {
                            signer,
                            trusted: false,
                            body,
                        })
                    });
                    out.extend(decoded);
                }
                Err(_) => {
                    self.counters.forged.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(key, "directory registration does not verify; ignored");
                }
            }
        }
        Ok(out)
    }

    /// The GMA Producers of `vm`'s monitoring: found by VM id; they name an opaque producer
    /// and a subject, never a host.
    pub async fn producers_of(
        &self,
        vm: &VmId,
    ) -> Result<Vec<Registration<ProducerRegistration>>, DirectoryError> {
        self.registrations(&format!("producer.{vm}.")).await
    }

    /// The GMA Consumers of `vm`'s monitoring.
    pub async fn consumers_of(
        &self,
        vm: &VmId,
    ) -> Result<Vec<Registration<ConsumerRegistration>>, DirectoryError> {
        self.registrations(&format!("consumer.{vm}.")).await
    }

    /// A copy of the current view.
    pub fn snapshot(&self) -> BTreeMap<SiteId, SiteRecord> {
        self.view.read().map(|v| v.clone()).unwrap_or_default()
    }

    /// What the watcher refused so far.
    pub fn counters(&self) -> &DirectoryCounters {
        &self.counters
    }
}
