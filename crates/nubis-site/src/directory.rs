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
use nubis_protocol::message::{ConsumerRegistration, ProducerId, ProducerRegistration, SiteEntry};
use nubis_protocol::subject::{DirectoryKey, DIRECTORY_BUCKET};
use nubis_protocol::{SiteId, VmId};
use tokio_util::sync::CancellationToken;

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
    /// This site's own registrations, rewritten with every heartbeat until withdrawn. Bounded by
    /// the VMs of this site's own hosts and the VMs it consumes: nothing remote adds to it.
    held: Mutex<BTreeMap<DirectoryKey, Held>>,
    view: RwLock<BTreeMap<SiteId, SiteRecord>>,
    counters: DirectoryCounters,
}

/// Opens the directory bucket in `js` (a context bound to the hub's domain).
///
/// The bucket belongs to the hub operator, who creates it with its final configuration when the
/// hub starts (`nats-config/directory-bucket.json`); a site can neither create nor reconfigure
/// it, so a missing bucket is an error here, retried by the caller.
pub async fn open_bucket(js: &jetstream::Context) -> Result<kv::Store, DirectoryError> {
    js.get_key_value(DIRECTORY_BUCKET)
        .await
        .map_err(|e| DirectoryError::Bucket(e.into()))
}

/// A registration this site wrote and keeps fresh until it is withdrawn.
#[derive(Debug, Clone)]
enum Held {
    Producer(ProducerRegistration),
    Consumer(ConsumerRegistration),
}

impl Held {
    fn vm(&self) -> &VmId {
        match self {
            Self::Producer(r) => &r.vm,
            Self::Consumer(r) => &r.vm,
        }
    }

    fn kind(&self) -> Withdraw {
        match self {
            Self::Producer(_) => Withdraw::Producers,
            Self::Consumer(_) => Withdraw::Consumer,
        }
    }
}

/// A kind of registration a site writes for a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Withdraw {
    /// The Producers of the VM that run on this site's hosts.
    Producers,
    /// This site's Consumer registration (it is on the VM's chain and delegated it further).
    Consumer,
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
            held: Mutex::new(BTreeMap::new()),
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
        self.refresh_registrations().await;
        Ok(revision)
    }

    /// Rewrites every registration this site holds with a fresh heartbeat (best effort: a
    /// failed write is retried with the next heartbeat), so a reader can tell a live
    /// registration from one left by a site that stopped.
    async fn refresh_registrations(&self) {
        let held: Vec<(DirectoryKey, Held)> = self
            .held
            .lock()
            .map(|h| h.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        let now = envelope::now_ms();
        for (key, reg) in held {
            let written = match reg {
                Held::Producer(mut r) => {
                    r.heartbeat_ms = now;
                    self.put_registration(&key, &r).await
                }
                Held::Consumer(mut r) => {
                    r.heartbeat_ms = now;
                    self.put_registration(&key, &r).await
                }
            };
            if let Err(e) = written {
                tracing::warn!(error = %e, key = key.as_str(), "cannot refresh registration; will retry");
            }
        }
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

    /// Registers this site as a GMA Consumer of `vm`'s monitoring, and keeps the registration
    /// fresh with every heartbeat until [`Directory::withdraw`]. The key is always this
    /// site's own, whatever `reg` names as the consumer.
    pub async fn register_consumer(
        &self,
        reg: &ConsumerRegistration,
    ) -> Result<u64, DirectoryError> {
        let key = DirectoryKey::consumer(&reg.vm, self.identity.site());
        self.hold(&key, Held::Consumer(reg.clone()));
        self.put_registration(&key, reg).await
    }

    /// Registers a GMA Producer of `vm`'s monitoring under this site's own key, and keeps it
    /// fresh with every heartbeat until [`Directory::withdraw`]. The site that registers a
    /// Producer is the one that publishes its batches on the public subject (under relay
    /// delivery the VM's primary), never a site that would be named only by registering.
    pub async fn register_producer(
        &self,
        reg: &ProducerRegistration,
    ) -> Result<u64, DirectoryError> {
        let key = DirectoryKey::producer(self.identity.site(), &reg.vm, &reg.producer);
        self.hold(&key, Held::Producer(reg.clone()));
        self.put_registration(&key, reg).await
    }

    /// Withdraws one Producer registration of `vm` this site wrote (the oldest of a VM that
    /// has as many as it may keep), and stops refreshing it.
    pub async fn withdraw_producer(
        &self,
        vm: &VmId,
        producer: &ProducerId,
    ) -> Result<(), DirectoryError> {
        let key = DirectoryKey::producer(self.identity.site(), vm, producer);
        if let Ok(mut held) = self.held.lock() {
            held.remove(&key);
        }
        self.delete_key(&key).await
    }

    fn hold(&self, key: &DirectoryKey, reg: Held) {
        if let Ok(mut held) = self.held.lock() {
            held.insert(key.clone(), reg);
        }
    }

    /// Removes the registrations of `which` kind this site wrote for `vm` (its Producers when
    /// the VM left this site's hosts, its Consumer registration when the site left the VM's
    /// chain), and stops refreshing them. Returns how many keys were deleted.
    pub async fn withdraw(&self, vm: &VmId, which: Withdraw) -> Result<usize, DirectoryError> {
        let keys: Vec<DirectoryKey> = self
            .held
            .lock()
            .map(|mut held| {
                let keys: Vec<DirectoryKey> = held
                    .iter()
                    .filter(|(_, r)| r.vm() == vm && r.kind() == which)
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in &keys {
                    held.remove(k);
                }
                keys
            })
            .unwrap_or_default();
        for key in &keys {
            self.delete_key(key).await?;
        }
        Ok(keys.len())
    }

    /// Deletes the registrations this site wrote in an earlier run that `keep` no longer wants
    /// (`keep(vm, kind)`): a site that stopped while holding a VM, and restarted without it,
    /// leaves no stale Producer or Consumer behind. Returns how many keys were deleted.
    pub async fn sweep_own(
        &self,
        keep: impl Fn(&VmId, Withdraw) -> bool,
    ) -> Result<usize, DirectoryError> {
        let mut keys = self
            .kv
            .keys()
            .await
            .map_err(|e| DirectoryError::Watch(e.into()))?;
        let me = self.identity.site().as_str();
        let mut stale = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| DirectoryError::Watch(e.into()))?;
            let parts: Vec<&str> = key.split('.').collect();
            let own = match parts.as_slice() {
                ["producer", site, vm, _] if *site == me => Some((*vm, Withdraw::Producers)),
                ["consumer", vm, site] if *site == me => Some((*vm, Withdraw::Consumer)),
                _ => None,
            };
            let Some((vm, which)) = own else { continue };
            let Ok(vm) = VmId::new(vm) else { continue };
            if !keep(&vm, which) {
                stale.push(DirectoryKey::from_stored(key));
            }
        }
        for key in &stale {
            if let Ok(mut held) = self.held.lock() {
                held.remove(key);
            }
            self.delete_key(key).await?;
        }
        Ok(stale.len())
    }

    async fn delete_key(&self, key: &DirectoryKey) -> Result<(), DirectoryError> {
        self.kv
            .delete(key.as_str())
            .await
            .map_err(|e| DirectoryError::Write {
                key: key.as_str().to_string(),
                source: e.into(),
            })
    }

    /// Every registration whose key matches `filter` (NATS tokens, `*` for any one), with the
    /// site that signed it and whether that signature verified against a pinned key (a
    /// non-partner's entry is shown, never trusted; one that fails verification against a pinned
    /// key, or is signed by another site than the one its key names, is dropped and counted as
    /// forged).
    async fn registrations<B: nubis_protocol::message::Body>(
        &self,
        filter: &str,
    ) -> Result<Vec<Registration<B>>, DirectoryError> {
        let mut keys = self
            .kv
            .keys()
            .await
            .map_err(|e| DirectoryError::Watch(e.into()))?;
        let mut out = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| DirectoryError::Watch(e.into()))?;
            if !key_matches(&key, filter) {
                continue;
            }
            let writer = DirectoryKey::from_stored(key.as_str())
                .writer()
                .map(str::to_owned);
            let Some(entry) = self
                .kv
                .entry(key.clone())
                .await
                .map_err(|e| DirectoryError::Watch(e.into()))?
            else {
                continue;
            };
            if entry.operation != kv::Operation::Put {
                continue;
            }
            let subject = format!("$KV.{DIRECTORY_BUCKET}.{key}");
            let signed_by_writer = |signer: &SiteId| writer.as_deref() == Some(signer.as_str());
            match self.verifier.open_record(&entry.value, &subject) {
                Ok(opened) if !signed_by_writer(&opened.from) => {
                    self.counters.forged.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(key, signer = %opened.from, "registration signed by another site than its key names; ignored");
                }
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
                        let signer = SiteId::new(env.from).ok().filter(signed_by_writer)?;
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
        self.registrations(&DirectoryKey::producers_filter(vm))
            .await
    }

    /// The GMA Consumers of `vm`'s monitoring.
    pub async fn consumers_of(
        &self,
        vm: &VmId,
    ) -> Result<Vec<Registration<ConsumerRegistration>>, DirectoryError> {
        self.registrations(&DirectoryKey::consumers_filter(vm))
            .await
    }

    /// The downstream site that `site`'s Consumer registration of `vm` names, verified
    /// against `key` (`site`'s pinned or directory key): `site`'s word that the VM's chain goes
    /// on there. `None` when it has no such registration, names none, or does not verify (the
    /// latter counted as forged). Only `site` can write its registration's key.
    pub async fn vouched_downstream(
        &self,
        vm: &VmId,
        site: &SiteId,
        key: &ed25519_dalek::VerifyingKey,
    ) -> Result<Option<SiteId>, DirectoryError> {
        let dk = DirectoryKey::consumer(vm, site);
        let Some(entry) = self
            .kv
            .entry(dk.as_str())
            .await
            .map_err(|e| DirectoryError::Watch(e.into()))?
        else {
            return Ok(None);
        };
        if entry.operation != kv::Operation::Put {
            return Ok(None);
        }
        let subject = dk.subject();
        let opened = match self.verifier.open_record_with_key(
            &entry.value,
            subject.as_str(),
            site,
            key,
        ) {
            Ok(o) => o,
            Err(e) => {
                self.counters.forged.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(key = dk.as_str(), error = %e, "consumer registration does not verify; ignored");
                return Ok(None);
            }
        };
        Ok(opened
            .body::<ConsumerRegistration>()
            .ok()
            .filter(|r| r.consumer_site == *site && r.vm == *vm)
            .and_then(|r| r.downstream))
    }

    /// A copy of the current view.
    pub fn snapshot(&self) -> BTreeMap<SiteId, SiteRecord> {
        self.view.read().map(|v| v.clone()).unwrap_or_default()
    }

    /// The current record of `site`, if the view has one (without copying the whole view).
    pub fn record(&self, site: &SiteId) -> Option<SiteRecord> {
        self.view.read().ok()?.get(site).cloned()
    }

    /// What the watcher refused so far.
    pub fn counters(&self) -> &DirectoryCounters {
        &self.counters
    }
}

/// Whether `key` matches `filter` token by token, `*` matching any one token.
fn key_matches(key: &str, filter: &str) -> bool {
    let (mut k, mut f) = (key.split('.'), filter.split('.'));
    loop {
        match (k.next(), f.next()) {
            (None, None) => return true,
            (Some(kt), Some(ft)) if ft == "*" || ft == kt => {}
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::key_matches;

    #[test]
    fn filters_match_whole_tokens() {
        assert!(key_matches("producer.b.vm-1.p1", "producer.*.vm-1.*"));
        assert!(!key_matches("producer.b.vm-10.p1", "producer.*.vm-1.*"));
        assert!(!key_matches("producer.b.vm-1.p1.x", "producer.*.vm-1.*"));
        assert!(!key_matches("producer.vm-1.p1", "producer.*.vm-1.*"));
        assert!(key_matches("consumer.vm-1.a", "consumer.vm-1.*"));
    }
}
