//! Monitoring at a site (paper section IV): batches from the site's own host agents, delivered
//! along each VM's responsibility chain, kept in the site's accounting stream, and watched by
//! the SLA rules.
//!
//! Three ways a batch reaches the site daemon:
//!
//! - **Intake.** A host agent sends an unsigned [`ProducedBatch`] on the site-internal
//!   `nubis.site.<site>.mon.intake`. The VM must run on one of this site's hosts and the batch
//!   must name the VM's primary site. The site signs the batch, delivers it by its policy, stores
//!   it, and only then acknowledges it with a [`BatchStored`]; the host agent resends until then.
//! - **Relay.** A batch on `nubis.relay.<this site>.…`, signed by the VM's downstream partner
//!   (verified with its pinned key). It is stored and passed on, under this site's signature.
//! - **Bus.** For every VM this site is responsible for but does not run itself, it subscribes
//!   to `nubis.mon.<primary>.<vm>.>` and verifies what arrives with the sender's pinned partner
//!   key, or else with the signing key of the sender's entry in the federation directory. The
//!   hub lets each site write only its own `site.<id>` directory key, so that key speaks for the
//!   site even without a bilateral contract.
//!
//! Delivery policy (`[monitoring] delivery`), at the site that produces a batch and at every
//! site that a batch is relayed to:
//!
//! - `relay`: the primary site publishes on the public monitoring subject; any other site hands
//!   the batch to its upstream only. The producing site stays hidden from everyone but its
//!   upstream: each hop re-signs, so the public subject shows the last site before the primary.
//! - `bus`: publish once on the public subject, addressed to every site. Each site on the chain
//!   receives it directly, and learns which site produced it (never which host: a producer id
//!   is opaque).
//!
//! The body of a batch passes every hop unchanged: a sealed payload stays sealed, so sites in
//! between see only that data arrives, and only the primary site opens it (for SLA rules and
//! usage). A producer registration in the directory is signed by the producing site, so the
//! directory does name it even under relay delivery.
//!
//! Everything refused is dropped and counted by reason (the `monitoring` operator endpoint).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::Client;
use bytes::Bytes;
use ed25519_dalek::VerifyingKey;
use futures::StreamExt as _;
use nubis_protocol::codec;
use nubis_protocol::descriptor::DataPoint;
use nubis_protocol::envelope::{
    self, now_ms, Addressing, EnvelopeError, Opened, SignedEnvelope, Verifier,
};
use nubis_protocol::identity::SiteIdentity;
use nubis_protocol::message::{
    BatchPayload, BatchStored, Body, ClearPayload, ConsumerRegistration, ErrorCode, ErrorReply,
    HostReply, MonitoringBatch, ProducedBatch, ProducerId, ProducerRegistration,
};
use nubis_protocol::subject::{ParsedSubject, Subject};
use nubis_protocol::{SiteId, VmId};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::accounting::{Accounting, AccountingError};
use crate::config::{Delivery, SiteConfig, SlaAction};
use crate::directory::{Directory, SiteRecord};
use crate::journal::{Journal, NextHop, VmRecord};
use crate::sla::{SlaEvaluator, SlaEvent};
use crate::usage::{self, StoredBatch, Usage};

/// Queue group of the intake subscription, so that several daemons of a site could share it.
pub const INTAKE_QUEUE_GROUP: &str = "nubis-site";

/// How often the bus subscriptions are brought in line with the VM records.
const RESUBSCRIBE_EVERY: Duration = Duration::from_millis(500);

/// Batches handled at the same time; more wait in their subscription's buffer.
const CONCURRENCY: usize = 64;

/// How far before the start of a usage range the stream is read, so that the first sample in
/// the range finds the sample before it.
pub const USAGE_LOOKBACK_MS: u64 = 15 * 60 * 1000;

/// Why the monitoring service could not start.
#[derive(Debug, thiserror::Error)]
pub enum MonitoringError {
    /// A subscription could not be made.
    #[error("cannot subscribe to {subject}")]
    Subscribe {
        /// The subject.
        subject: String,
        /// The cause.
        #[source]
        source: async_nats::Error,
    },
}

/// Why a batch was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Unknown sender or a signature that does not verify.
    Forged,
    /// A nonce seen before.
    Replayed,
    /// A timestamp outside the freshness window.
    Stale,
    /// Not an envelope, or not a batch, or oversize.
    Malformed,
    /// Signed for another subject or recipient, or a body that names another VM or primary site
    /// than its subject.
    WrongSubject,
    /// Relayed by a site that is not the VM's downstream partner here.
    WrongSender,
    /// A VM this site is not responsible for (or, at intake, that no local host runs).
    UnknownVm,
    /// A produced batch naming another primary site than the VM's record.
    Refused,
}

impl DropReason {
    /// Every reason.
    pub const ALL: [DropReason; 8] = [
        Self::Forged,
        Self::Replayed,
        Self::Stale,
        Self::Malformed,
        Self::WrongSubject,
        Self::WrongSender,
        Self::UnknownVm,
        Self::Refused,
    ];

    /// The reason's name in the `monitoring` endpoint's answer.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Forged => "forged",
            Self::Replayed => "replayed",
            Self::Stale => "stale",
            Self::Malformed => "malformed",
            Self::WrongSubject => "wrong_subject",
            Self::WrongSender => "wrong_sender",
            Self::UnknownVm => "unknown_vm",
            Self::Refused => "refused",
        }
    }

    /// The reason an envelope refused by the verifier is dropped for.
    pub fn of(e: &EnvelopeError) -> Self {
        match e {
            EnvelopeError::UnknownSender(_) | EnvelopeError::BadSignature => Self::Forged,
            EnvelopeError::Replayed => Self::Replayed,
            EnvelopeError::Stale { .. } => Self::Stale,
            EnvelopeError::WrongRecipient(_)
            | EnvelopeError::WrongSubject { .. }
            | EnvelopeError::NotAReplyToThis => Self::WrongSubject,
            _ => Self::Malformed,
        }
    }
}

/// Where a batch goes next from this site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The public subject `nubis.mon.<primary>.<vm>.…`, addressed to every site.
    Public,
    /// The relay subject of the upstream site, addressed to it only.
    Relay(SiteId),
}

/// Where `site` sends a batch of `record`'s VM under `policy`; `None` when the record of a VM
/// this site is not primary for has no upstream (it cannot be passed on without revealing it).
pub fn target(policy: Delivery, site: &SiteId, record: &VmRecord) -> Option<Target> {
    if record.primary == *site || policy == Delivery::Bus {
        return Some(Target::Public);
    }
    record.upstream.clone().map(Target::Relay)
}

/// Checks a produced batch against this site's record of its VM; returns that record.
pub fn check_intake<'r>(
    record: Option<&'r VmRecord>,
    batch: &MonitoringBatch,
) -> Result<&'r VmRecord, DropReason> {
    let Some(record) = record else {
        return Err(DropReason::UnknownVm);
    };
    if !matches!(record.downstream, Some(NextHop::Host(_))) {
        return Err(DropReason::UnknownVm);
    }
    if record.primary != batch.primary_site {
        return Err(DropReason::Refused);
    }
    Ok(record)
}

/// The key that verifies `from`'s batches: its pinned partner key, else its directory entry's.
pub fn sender_key(
    config: &SiteConfig,
    directory: &BTreeMap<SiteId, SiteRecord>,
    from: &SiteId,
) -> Option<VerifyingKey> {
    if let Some(p) = config.partner(from) {
        return Some(p.signing_key);
    }
    let record = directory.get(from)?;
    if record.entry.site != *from {
        return None;
    }
    VerifyingKey::from_bytes(&record.entry.signing_key).ok()
}

/// Counters of one path a batch comes in by, or goes out by.
#[derive(Debug, Default)]
pub struct PathCounters {
    /// From (or to) the site's host agents; for delivery, unused.
    pub intake: AtomicU64,
    /// By relay.
    pub relay: AtomicU64,
    /// By the public monitoring subject.
    pub bus: AtomicU64,
}

/// What the monitoring service did so far.
#[derive(Debug, Default)]
pub struct MonitoringCounters {
    /// Batches accepted, by the way they came in.
    pub received: PathCounters,
    /// Batches sent on, by the way they went out.
    pub delivered: PathCounters,
    /// Batches that could not be published.
    pub delivery_failed: AtomicU64,
    /// Batches dropped, indexed like [`DropReason::ALL`].
    pub dropped: [AtomicU64; DropReason::ALL.len()],
    /// SLA events raised.
    pub sla_events: AtomicU64,
}

impl MonitoringCounters {
    /// Counts a dropped batch.
    pub fn drop_for(&self, reason: DropReason) {
        if let Some(i) = DropReason::ALL.iter().position(|r| *r == reason) {
            self.dropped[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Batches dropped for `reason` so far.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        DropReason::ALL
            .iter()
            .position(|r| *r == reason)
            .map(|i| self.dropped[i].load(Ordering::Relaxed))
            .unwrap_or(0)
    }
}

/// Per-VM figures.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct VmStats {
    received: u64,
    last_batch_ms: u64,
}

/// Asks the Controller to migrate a VM (the `migrate` action of an SLA rule); returns the
/// migration id.
pub type MigrateFn = Arc<dyn Fn(VmId) -> Result<String, ErrorReply> + Send + Sync>;

/// What the monitoring service works with.
pub struct MonitoringDeps {
    /// The site's configuration (delivery policy, partners, SLA rules).
    pub config: Arc<SiteConfig>,
    /// The VM records.
    pub journal: Journal,
    /// The directory view (keys of non-partner sites).
    pub directory: Arc<Directory>,
    /// The accounting stream.
    pub accounting: Accounting,
    /// The connection that talks across sites (relay and public subjects).
    pub public: Client,
    /// The site-internal connection (intake, SLA events).
    pub internal: Client,
    /// Verifies relayed and bus batches; its pinned keys are the partners'.
    pub verifier: Verifier,
    /// Carries out the `migrate` action of SLA rules.
    pub migrate: MigrateFn,
}

impl std::fmt::Debug for MonitoringDeps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MonitoringDeps")
            .field("site", &self.config.site)
            .finish_non_exhaustive()
    }
}

/// The JSON answer of the `usage` operator endpoint.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageReport {
    /// The VM.
    pub vm: VmId,
    /// Start of the range (inclusive, ms since the Unix epoch).
    pub from_ms: u64,
    /// End of the range (exclusive, ms since the Unix epoch).
    pub to_ms: u64,
    /// The integrated usage.
    #[serde(flatten)]
    pub usage: Usage,
}

/// The site's monitoring service.
pub struct Monitoring {
    site: SiteId,
    identity: Arc<SiteIdentity>,
    deps: MonitoringDeps,
    counters: MonitoringCounters,
    vms: Mutex<BTreeMap<VmId, VmStats>>,
    sla: Mutex<SlaEvaluator>,
    producers: Arc<Mutex<HashSet<(VmId, ProducerId)>>>,
    slots: Arc<Semaphore>,
    tracker: TaskTracker,
}

impl std::fmt::Debug for Monitoring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitoring")
            .field("site", &self.site)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

fn internal_error(e: impl std::fmt::Display) -> ErrorReply {
    ErrorReply::new(ErrorCode::Internal, e.to_string())
}

impl Monitoring {
    /// A monitoring service over `deps`; its background work runs on `tracker`.
    pub fn new(deps: MonitoringDeps, tracker: TaskTracker) -> Arc<Self> {
        Arc::new(Self {
            site: deps.config.site.clone(),
            identity: deps.config.identity.clone(),
            sla: Mutex::new(SlaEvaluator::new(deps.config.sla.clone())),
            deps,
            counters: MonitoringCounters::default(),
            vms: Mutex::new(BTreeMap::new()),
            producers: Arc::new(Mutex::new(HashSet::new())),
            slots: Arc::new(Semaphore::new(CONCURRENCY)),
            tracker,
        })
    }

    /// What the service did so far.
    pub fn counters(&self) -> &MonitoringCounters {
        &self.counters
    }

    /// Serves intake and relay deliveries and keeps the bus subscriptions, until `cancel`.
    pub async fn serve(self: &Arc<Self>, cancel: CancellationToken) -> Result<(), MonitoringError> {
        let intake_subject = Subject::monitoring_intake(&self.site);
        let intake = self
            .deps
            .internal
            .queue_subscribe(
                intake_subject.as_str().to_string(),
                INTAKE_QUEUE_GROUP.to_string(),
            )
            .await
            .map_err(|e| MonitoringError::Subscribe {
                subject: intake_subject.as_str().to_string(),
                source: e.into(),
            })?;
        let relay_subject = Subject::monitoring_relay_all(&self.site);
        let relay = self
            .deps
            .public
            .subscribe(relay_subject.as_str().to_string())
            .await
            .map_err(|e| MonitoringError::Subscribe {
                subject: relay_subject.as_str().to_string(),
                source: e.into(),
            })?;
        self.spawn_loop(cancel.clone(), intake, Path::Intake);
        self.spawn_loop(cancel.clone(), relay, Path::Relay);
        let this = self.clone();
        self.tracker
            .spawn(async move { this.keep_bus_subscriptions(cancel).await });
        Ok(())
    }

    /// Handles every message of `sub` on `path`, a bounded number at a time.
    fn spawn_loop(
        self: &Arc<Self>,
        cancel: CancellationToken,
        mut sub: async_nats::Subscriber,
        path: Path,
    ) {
        let this = self.clone();
        let inner = self.tracker.clone();
        self.tracker.spawn(async move {
            loop {
                let msg = tokio::select! {
                    _ = cancel.cancelled() => break,
                    m = sub.next() => match m { Some(m) => m, None => break },
                };
                let permit = tokio::select! {
                    _ = cancel.cancelled() => break,
                    p = this.slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                };
                let this = this.clone();
                let span = tracing::debug_span!("monitoring", site.id = %this.site, path = path.as_str());
                inner.spawn(
                    async move {
                        let _permit = permit;
                        match path {
                            Path::Intake => this.intake(msg).await,
                            Path::Relay => this.relay(&msg.subject, &msg.payload).await,
                            Path::Bus => this.bus(&msg.subject, &msg.payload).await,
                        }
                    }
                    .instrument(span),
                );
            }
        });
    }

    /// Subscribes to the public monitoring subjects of the VMs this site is responsible for but
    /// does not run, and drops the subscriptions of VMs it no longer is.
    async fn keep_bus_subscriptions(self: Arc<Self>, cancel: CancellationToken) {
        let mut held: HashMap<(SiteId, VmId), CancellationToken> = HashMap::new();
        let mut tick = tokio::time::interval(RESUBSCRIBE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            let records = match self.deps.journal.vms() {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the VM records");
                    continue;
                }
            };
            let wanted: HashSet<(SiteId, VmId)> = records
                .into_iter()
                .filter(|r| matches!(r.downstream, Some(NextHop::Site(_))))
                .map(|r| (r.primary, r.vm))
                .collect();
            held.retain(|key, token| {
                let keep = wanted.contains(key);
                if !keep {
                    tracing::debug!(vm.id = %key.1, "monitoring subscription dropped");
                    token.cancel();
                }
                keep
            });
            for key in wanted {
                if held.contains_key(&key) {
                    continue;
                }
                let subject = Subject::monitoring_vm(&key.0, &key.1);
                match self
                    .deps
                    .public
                    .subscribe(subject.as_str().to_string())
                    .await
                {
                    Ok(sub) => {
                        tracing::debug!(vm.id = %key.1, subject = %subject, "monitoring subscription added");
                        let token = cancel.child_token();
                        self.spawn_loop(token.clone(), sub, Path::Bus);
                        self.register_consumer(&key.1);
                        held.insert(key, token);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, subject = %subject, "cannot subscribe; will retry")
                    }
                }
            }
        }
    }

    /// Registers this site as a GMA Consumer of `vm`'s monitoring in the directory (best
    /// effort, in the background: the subscription does not wait for the hub).
    fn register_consumer(&self, vm: &VmId) {
        let registration = ConsumerRegistration {
            consumer_site: self.site.clone(),
            vm: vm.clone(),
            data_points: Vec::new(),
            heartbeat_ms: now_ms(),
        };
        let directory = self.deps.directory.clone();
        self.tracker.spawn(async move {
            if let Err(e) = directory.register_consumer(&registration).await {
                tracing::warn!(error = %e, vm.id = %registration.vm, "cannot register as consumer");
            }
        });
    }

    /// Counts an accepted batch of `vm` on `path`.
    fn note_received(&self, vm: &VmId, path: &AtomicU64) {
        path.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut vms) = self.vms.lock() {
            let stats = vms.entry(vm.clone()).or_default();
            stats.received += 1;
            stats.last_batch_ms = now_ms();
        }
    }

    fn record(&self, vm: &VmId) -> Result<Option<VmRecord>, ErrorReply> {
        self.deps.journal.vm(vm).map_err(internal_error)
    }

    /// Signs `batch` for `target` and publishes it; returns the encoded envelope (stored in the
    /// accounting stream whether or not publishing worked).
    async fn deliver(
        &self,
        target: Option<&Target>,
        data_point: &DataPoint,
        batch: &MonitoringBatch,
    ) -> Result<Bytes, EnvelopeError> {
        let public = Subject::monitoring(&batch.primary_site, &batch.vm, data_point);
        let (subject, addressing) = match target {
            Some(Target::Relay(upstream)) => {
                let s =
                    Subject::monitoring_relay(upstream, &batch.primary_site, &batch.vm, data_point);
                (s, Some(upstream))
            }
            _ => (public, None),
        };
        let addressing = match addressing {
            Some(upstream) => Addressing::request(upstream, subject.as_str()),
            None => Addressing::broadcast(subject.as_str()),
        };
        let bytes: Bytes = envelope::sign(&self.identity, addressing, batch, now_ms())?
            .encode()?
            .into();
        let Some(target) = target else {
            self.counters
                .delivery_failed
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(vm.id = %batch.vm, "VM record has no upstream; batch kept here only");
            return Ok(bytes);
        };
        match self
            .deps
            .public
            .publish(subject.as_str().to_string(), bytes.clone())
            .await
        {
            Ok(()) => {
                let counter = match target {
                    Target::Public => &self.counters.delivered.bus,
                    Target::Relay(_) => &self.counters.delivered.relay,
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.counters
                    .delivery_failed
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, subject = %subject, "cannot publish batch");
            }
        }
        Ok(bytes)
    }

    /// A batch from one of this site's host agents; answers once it is stored.
    async fn intake(&self, msg: async_nats::Message) {
        let answer = match self.intake_batch(&msg.payload).await {
            Ok(stored) => HostReply::Ok(stored),
            Err(e) => {
                tracing::info!(code = e.code.as_str(), error = %e.message, "batch refused");
                HostReply::Error(e)
            }
        };
        let Some(reply) = msg.reply else {
            return;
        };
        match codec::to_vec(&answer) {
            Ok(bytes) => {
                if let Err(e) = self.deps.internal.publish(reply, bytes.into()).await {
                    tracing::warn!(error = %e, "cannot answer host agent");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot encode answer to host agent"),
        }
    }

    async fn intake_batch(&self, payload: &[u8]) -> Result<BatchStored, ErrorReply> {
        let produced: ProducedBatch = codec::from_slice(payload).map_err(|e| {
            self.counters.drop_for(DropReason::Malformed);
            ErrorReply::new(ErrorCode::Malformed, format!("not a produced batch: {e}"))
        })?;
        let ProducedBatch { data_point, batch } = produced;
        let record = self.record(&batch.vm)?;
        let record = match check_intake(record.as_ref(), &batch) {
            Ok(r) => r,
            Err(reason) => {
                self.counters.drop_for(reason);
                return Err(match reason {
                    DropReason::Refused => ErrorReply::new(
                        ErrorCode::Refused,
                        format!(
                            "VM {} has primary site {}, not {}",
                            batch.vm,
                            record
                                .as_ref()
                                .map(|r| r.primary.to_string())
                                .unwrap_or_default(),
                            batch.primary_site
                        ),
                    ),
                    _ => ErrorReply::new(
                        ErrorCode::UnknownVm,
                        format!("VM {} does not run on a host of this site", batch.vm),
                    ),
                });
            }
        };
        self.note_received(&batch.vm, &self.counters.received.intake);
        // Delivered before it is stored: if the site stops in between, the host agent resends
        // and the next hop de-duplicates, where storing first could lose the delivery.
        let target = target(self.deps.config.monitoring.delivery, &self.site, record);
        let envelope = self
            .deliver(target.as_ref(), &data_point, &batch)
            .await
            .map_err(|e| ErrorReply::new(ErrorCode::from_wire(e.code()), e.to_string()))?;
        let stored = self
            .deps
            .accounting
            .store(&batch.vm, &data_point, batch.message_id(), envelope)
            .await
            .map_err(|e: AccountingError| internal_error(e))?;
        self.register_producer(&batch, &data_point);
        if !stored.duplicate {
            self.evaluate_sla(record, &batch).await;
        }
        Ok(BatchStored {
            producer: batch.producer,
            epoch_ms: batch.epoch_ms,
            seq: batch.seq,
            duplicate: stored.duplicate,
        })
    }

    /// Registers a Producer in the directory the first time it is seen (best effort; retried
    /// with its next batch if the directory cannot be written).
    fn register_producer(&self, batch: &MonitoringBatch, data_point: &DataPoint) {
        let key = (batch.vm.clone(), batch.producer.clone());
        let first = self
            .producers
            .lock()
            .map(|mut p| p.insert(key.clone()))
            .unwrap_or(false);
        if !first {
            return;
        }
        let registration = ProducerRegistration {
            vm: batch.vm.clone(),
            primary_site: batch.primary_site.clone(),
            producer: batch.producer.clone(),
            data_points: vec![data_point.clone()],
            subject: Subject::monitoring_vm(&batch.primary_site, &batch.vm)
                .as_str()
                .to_string(),
            heartbeat_ms: now_ms(),
        };
        let directory = self.deps.directory.clone();
        let producers = self.producers.clone();
        self.tracker.spawn(async move {
            match directory.register_producer(&registration).await {
                Ok(_) => {
                    tracing::debug!(vm.id = %registration.vm, producer = %registration.producer, "producer registered")
                }
                Err(e) => {
                    tracing::warn!(error = %e, vm.id = %registration.vm, "cannot register producer; will retry");
                    if let Ok(mut p) = producers.lock() {
                        p.remove(&key);
                    }
                }
            }
        });
    }

    /// A batch relayed to this site by the VM's downstream partner.
    async fn relay(&self, subject: &str, payload: &[u8]) {
        let Some((primary, vm, data_point)) = Subject::parse_monitoring_relay(&self.site, subject)
        else {
            return self.drop_batch(DropReason::WrongSubject, subject, "not a relay subject");
        };
        let opened = match self.deps.verifier.open_request(payload, subject, now_ms()) {
            Ok(o) => o,
            Err(e) => return self.drop_batch(DropReason::of(&e), subject, &e.to_string()),
        };
        let Some((batch, record)) = self.batch_on_record(&opened, subject, &primary, &vm) else {
            return;
        };
        if record.downstream != Some(NextHop::Site(opened.from.clone())) {
            return self.drop_batch(
                DropReason::WrongSender,
                subject,
                &format!("site {} is not the VM's downstream partner", opened.from),
            );
        }
        self.note_received(&vm, &self.counters.received.relay);
        let stored = self
            .deps
            .accounting
            .store(
                &vm,
                &data_point,
                batch.message_id(),
                Bytes::copy_from_slice(payload),
            )
            .await;
        // Passed on even when already stored: the next hop de-duplicates.
        let target = target(self.deps.config.monitoring.delivery, &self.site, &record);
        if let Err(e) = self.deliver(target.as_ref(), &data_point, &batch).await {
            tracing::warn!(error = %e, vm.id = %vm, "cannot sign batch to pass it on");
        }
        match stored {
            Ok(s) if !s.duplicate => self.evaluate_sla(&record, &batch).await,
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, vm.id = %vm, "relayed batch not stored"),
        }
    }

    /// A batch on the public monitoring subject of a VM this site is responsible for.
    async fn bus(&self, subject: &str, payload: &[u8]) {
        let Ok(ParsedSubject::Monitoring {
            primary,
            vm,
            data_point,
        }) = Subject::parse(subject)
        else {
            return self.drop_batch(
                DropReason::WrongSubject,
                subject,
                "not a monitoring subject",
            );
        };
        let env = match SignedEnvelope::decode(payload) {
            Ok(env) => env,
            Err(e) => return self.drop_batch(DropReason::of(&e), subject, &e.to_string()),
        };
        if env.from == self.site.as_str() {
            // This site's own publication, heard back.
            return;
        }
        let Ok(from) = SiteId::new(env.from.as_str()) else {
            return self.drop_batch(DropReason::Forged, subject, "sender is not a site id");
        };
        let key = sender_key(&self.deps.config, &self.deps.directory.snapshot(), &from);
        let Some(key) = key else {
            return self.drop_batch(
                DropReason::Forged,
                subject,
                &format!("no key known for site {from}"),
            );
        };
        let opened =
            match self
                .deps
                .verifier
                .open_event_with_key(payload, subject, now_ms(), &from, &key)
            {
                Ok(o) => o,
                Err(e) => return self.drop_batch(DropReason::of(&e), subject, &e.to_string()),
            };
        let Some((batch, record)) = self.batch_on_record(&opened, subject, &primary, &vm) else {
            return;
        };
        self.note_received(&vm, &self.counters.received.bus);
        match self
            .deps
            .accounting
            .store(
                &vm,
                &data_point,
                batch.message_id(),
                Bytes::copy_from_slice(payload),
            )
            .await
        {
            Ok(s) if !s.duplicate => self.evaluate_sla(&record, &batch).await,
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, vm.id = %vm, "batch not stored"),
        }
    }

    /// The batch of a verified envelope, and the record of its VM: `None` (counted as dropped)
    /// when the body is not a batch, names another VM or primary than its subject, or the VM is
    /// not on record here with that primary.
    fn batch_on_record(
        &self,
        opened: &Opened,
        subject: &str,
        primary: &SiteId,
        vm: &VmId,
    ) -> Option<(MonitoringBatch, VmRecord)> {
        let batch = match opened.body::<MonitoringBatch>() {
            Ok(b) => b,
            Err(e) => {
                self.drop_batch(DropReason::Malformed, subject, &e.to_string());
                return None;
            }
        };
        if batch.vm != *vm || batch.primary_site != *primary {
            self.drop_batch(
                DropReason::WrongSubject,
                subject,
                "batch names another VM than its subject",
            );
            return None;
        }
        match self.record(vm) {
            Ok(Some(r)) if r.primary == *primary => Some((batch, r)),
            Ok(_) => {
                self.drop_batch(DropReason::UnknownVm, subject, "VM not on record");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e.message, "cannot read the VM records");
                None
            }
        }
    }

    fn drop_batch(&self, reason: DropReason, subject: &str, why: &str) {
        self.counters.drop_for(reason);
        tracing::info!(
            reason = reason.as_str(),
            subject,
            "monitoring batch dropped: {why}"
        );
    }

    /// The readable payload of `batch`: clear, or sealed to this site when it is the primary.
    fn readable(&self, batch: &MonitoringBatch) -> Option<ClearPayload> {
        match &batch.payload {
            BatchPayload::Clear(p) => Some(p.clone()),
            BatchPayload::Sealed { ciphertext } => self.open_sealed(batch, ciphertext),
        }
    }

    fn open_sealed(&self, batch: &MonitoringBatch, ciphertext: &[u8]) -> Option<ClearPayload> {
        if batch.primary_site != self.site {
            return None;
        }
        let plain = nubis_protocol::seal::open(self.identity.sealing_key(), ciphertext).ok()?;
        codec::from_slice(&plain).ok()
    }

    /// Runs the SLA rules over a newly stored batch and acts on what fires.
    async fn evaluate_sla(&self, record: &VmRecord, batch: &MonitoringBatch) {
        let events = {
            let Ok(mut sla) = self.sla.lock() else { return };
            if sla.is_empty() {
                return;
            }
            let Some(payload) = self.readable(batch) else {
                return;
            };
            sla.observe_payload(&record.vm, &payload)
        };
        for event in events {
            self.raise(event).await;
        }
    }

    async fn raise(&self, event: SlaEvent) {
        self.counters.sla_events.fetch_add(1, Ordering::Relaxed);
        tracing::info!(rule = %event.rule, vm.id = %event.vm, value = event.value, "SLA rule fired");
        let subject = Subject::sla_event(&self.site, &event.vm);
        match serde_json::to_vec(&event) {
            Ok(json) => {
                if let Err(e) = self
                    .deps
                    .internal
                    .publish(String::from(subject), json.into())
                    .await
                {
                    tracing::warn!(error = %e, "cannot publish SLA event");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot encode SLA event"),
        }
        if event.action == SlaAction::Migrate {
            match (self.deps.migrate)(event.vm.clone()) {
                Ok(migration) => {
                    tracing::info!(rule = %event.rule, vm.id = %event.vm, migration.id = %migration, "migration started by SLA rule")
                }
                Err(e) => {
                    tracing::warn!(rule = %event.rule, vm.id = %event.vm, code = e.code.as_str(), error = %e.message, "migration asked by SLA rule refused")
                }
            }
        }
    }

    /// The usage of `vm` over `[from_ms, to_ms)` from this site's accounting stream.
    pub async fn usage(
        &self,
        vm: &VmId,
        from_ms: u64,
        to_ms: u64,
    ) -> Result<UsageReport, ErrorReply> {
        let known = self.record(vm)?.is_some();
        let raw = self
            .deps
            .accounting
            .read(vm, from_ms.saturating_sub(USAGE_LOOKBACK_MS))
            .await
            .map_err(internal_error)?;
        if raw.is_empty() && !known {
            return Err(ErrorReply::new(
                ErrorCode::UnknownVm,
                format!("VM {vm} is not known at this site and has no accounting data"),
            ));
        }
        let batches: Vec<StoredBatch> = raw
            .iter()
            .filter_map(|bytes| {
                let env = SignedEnvelope::decode(bytes).ok()?;
                if env.body_type != MonitoringBatch::TYPE {
                    return None;
                }
                let batch: MonitoringBatch = codec::from_slice(&env.body).ok()?;
                (batch.vm == *vm).then_some(StoredBatch {
                    stored_ms: env.ts,
                    batch,
                })
            })
            .collect();
        let usage = usage::compute(&batches, from_ms, to_ms, |b, ct| self.open_sealed(b, ct));
        Ok(UsageReport {
            vm: vm.clone(),
            from_ms,
            to_ms,
            usage,
        })
    }

    /// The answer of the `monitoring` operator endpoint, for every VM or only `vm`.
    pub fn report(&self, vm: Option<&VmId>) -> serde_json::Value {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let c = &self.counters;
        let acct = self.deps.accounting.counters();
        let dropped: serde_json::Map<String, serde_json::Value> = DropReason::ALL
            .iter()
            .map(|r| (r.as_str().to_string(), c.dropped(*r).into()))
            .collect();
        let vms: Vec<serde_json::Value> = self
            .vms
            .lock()
            .map(|vms| {
                vms.iter()
                    .filter(|(id, _)| vm.is_none_or(|v| v == *id))
                    .map(|(id, s)| {
                        serde_json::json!({
                            "vm": id.as_str(),
                            "received": s.received,
                            "last_batch_ms": s.last_batch_ms,
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        serde_json::json!({
            "site": self.site.as_str(),
            "delivery": self.deps.config.monitoring.delivery.as_str(),
            "received": {
                "intake": load(&c.received.intake),
                "relay": load(&c.received.relay),
                "bus": load(&c.received.bus),
            },
            "delivered": {
                "bus": load(&c.delivered.bus),
                "relay": load(&c.delivered.relay),
                "failed": load(&c.delivery_failed),
            },
            "stored": load(&acct.stored),
            "duplicates": load(&acct.duplicates),
            "store_retries": load(&acct.retries),
            "dropped": dropped,
            "sla_events": load(&c.sla_events),
            "vms": vms,
        })
    }
}

/// The way a batch came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Intake,
    Relay,
    Bus,
}

impl Path {
    fn as_str(self) -> &'static str {
        match self {
            Self::Intake => "intake",
            Self::Relay => "relay",
            Self::Bus => "bus",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DirectoryTiming, MonitoringConfig, Partner, Policy};
    use crate::journal::VmPhase;
    use nubis_protocol::message::{HostId, ProxyUri, SiteEntry};

    fn site(s: &str) -> SiteId {
        SiteId::new(s).unwrap()
    }

    fn vm(s: &str) -> VmId {
        VmId::new(s).unwrap()
    }

    fn record(primary: &str, upstream: Option<&str>, downstream: Option<NextHop>) -> VmRecord {
        let descriptor = serde_json::from_value(serde_json::json!({
            "id": "vm-1", "name": "vm one", "version": 1, "primary_site": primary,
            "primary_keys": {"signing": vec![7u8; 32], "sealing": vec![9u8; 32]},
            "hardware": {"vcpus": 1, "memory_mib": 512},
        }))
        .unwrap();
        VmRecord {
            vm: vm("vm-1"),
            primary: site(primary),
            upstream: upstream.map(site),
            downstream,
            descriptor,
            phase: VmPhase::Placed,
        }
    }

    fn batch(primary: &str) -> MonitoringBatch {
        MonitoringBatch {
            vm: vm("vm-1"),
            primary_site: site(primary),
            producer: ProducerId::new("p1").unwrap(),
            epoch_ms: 1,
            seq: 0,
            payload: BatchPayload::Clear(ClearPayload::default()),
        }
    }

    fn host() -> Option<NextHop> {
        Some(NextHop::Host(HostId::new("h1").unwrap()))
    }

    #[test]
    fn relay_goes_up_one_hop_and_the_primary_or_bus_publishes() {
        let c = site("c");
        let at_c = record("a", Some("b"), host());
        assert_eq!(
            target(Delivery::Relay, &c, &at_c),
            Some(Target::Relay(site("b")))
        );
        assert_eq!(target(Delivery::Bus, &c, &at_c), Some(Target::Public));
        let at_a = record("a", None, Some(NextHop::Site(site("b"))));
        assert_eq!(
            target(Delivery::Relay, &site("a"), &at_a),
            Some(Target::Public)
        );
        // A non-primary record without upstream cannot be relayed, and is not made public.
        let broken = record("a", None, host());
        assert_eq!(target(Delivery::Relay, &c, &broken), None);
    }

    #[test]
    fn intake_needs_a_local_host_and_the_records_primary() {
        assert_eq!(check_intake(None, &batch("a")), Err(DropReason::UnknownVm));
        let delegated = record("a", None, Some(NextHop::Site(site("b"))));
        assert_eq!(
            check_intake(Some(&delegated), &batch("a")),
            Err(DropReason::UnknownVm)
        );
        let unplaced = record("a", None, None);
        assert_eq!(
            check_intake(Some(&unplaced), &batch("a")),
            Err(DropReason::UnknownVm)
        );
        let local = record("a", Some("a"), host());
        assert_eq!(
            check_intake(Some(&local), &batch("z")),
            Err(DropReason::Refused)
        );
        assert_eq!(check_intake(Some(&local), &batch("a")), Ok(&local));
    }

    fn config_with_partner(own: &str, partner: &SiteIdentity) -> SiteConfig {
        SiteConfig {
            site: site(own),
            identity: Arc::new(SiteIdentity::generate(site(own))),
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_auth: None,
            hub_domain: "hub".into(),
            data_dir: "/nonexistent".into(),
            policy: Policy::default(),
            directory: DirectoryTiming::default(),
            partners: vec![Partner {
                site: partner.site().clone(),
                signing_key: partner.public().signing,
                sealing_key: partner.public().sealing,
                preference: 0,
                price_milli: 0,
                preferred: false,
            }],
            hosts: Vec::new(),
            proxy: "nats://a/proxy/p1".parse::<ProxyUri>().unwrap(),
            image_store: "/nonexistent".into(),
            max_concurrent_migrations: 1,
            monitoring: MonitoringConfig::default(),
            sla: Vec::new(),
        }
    }

    fn directory_record(id: &SiteIdentity, claimed_site: &str) -> SiteRecord {
        SiteRecord {
            entry: SiteEntry {
                site: site(claimed_site),
                signing_key: id.public().signing.to_bytes(),
                sealing_key: id.public().sealing,
                proxies: Vec::new(),
                subjects: Vec::new(),
                heartbeat_ms: 1,
                started_ms: 1,
            },
            trusted: false,
            revision: 1,
        }
    }

    #[test]
    fn pinned_keys_win_over_the_directory_which_covers_other_sites() {
        let b = SiteIdentity::generate(site("b"));
        let c = SiteIdentity::generate(site("c"));
        let impostor = SiteIdentity::generate(site("b"));
        let config = config_with_partner("a", &b);
        let mut view = BTreeMap::new();
        view.insert(site("b"), directory_record(&impostor, "b"));
        view.insert(site("c"), directory_record(&c, "c"));
        view.insert(site("d"), directory_record(&c, "x"));
        assert_eq!(
            sender_key(&config, &view, &site("b")),
            Some(b.public().signing)
        );
        assert_eq!(
            sender_key(&config, &view, &site("c")),
            Some(c.public().signing)
        );
        assert_eq!(sender_key(&config, &view, &site("d")), None);
        assert_eq!(sender_key(&config, &view, &site("e")), None);
    }

    #[test]
    fn envelope_refusals_map_to_drop_reasons_and_are_counted() {
        assert_eq!(
            DropReason::of(&EnvelopeError::BadSignature),
            DropReason::Forged
        );
        assert_eq!(
            DropReason::of(&EnvelopeError::UnknownSender("x".into())),
            DropReason::Forged
        );
        assert_eq!(
            DropReason::of(&EnvelopeError::Replayed),
            DropReason::Replayed
        );
        assert_eq!(
            DropReason::of(&EnvelopeError::Stale { skew_ms: 1 }),
            DropReason::Stale
        );
        assert_eq!(
            DropReason::of(&EnvelopeError::WrongRecipient("x".into())),
            DropReason::WrongSubject
        );
        assert_eq!(
            DropReason::of(&EnvelopeError::TooDeep),
            DropReason::Malformed
        );
        let counters = MonitoringCounters::default();
        counters.drop_for(DropReason::Stale);
        counters.drop_for(DropReason::Stale);
        counters.drop_for(DropReason::Refused);
        assert_eq!(counters.dropped(DropReason::Stale), 2);
        assert_eq!(counters.dropped(DropReason::Refused), 1);
        assert_eq!(counters.dropped(DropReason::Forged), 0);
        let names: HashSet<&str> = DropReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), DropReason::ALL.len());
    }
}
