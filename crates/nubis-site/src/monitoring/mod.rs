//! Monitoring at a site (paper section IV): batches from the site's own host agents, delivered
//! along each VM's responsibility chain, kept in the site's accounting stream, and watched by
//! the SLA rules.
//!
//! Three ways a batch reaches the site daemon:
//!
//! - **Intake.** A host agent sends an unsigned
//!   [`ProducedBatch`](nubis_protocol::message::ProducedBatch) on the site-internal
//!   `nubis.site.<site>.intake.<host>`. The VM must run on that host (whose NATS user alone may
//!   publish there) and the batch
//!   must name the VM's primary site. The site signs the batch, delivers it by its policy, stores
//!   it, and only then acknowledges it with a
//!   [`BatchStored`](nubis_protocol::message::BatchStored); the host agent resends until then.
//! - **Relay.** A batch on `nubis.relay.<this site>.…`, signed by the VM's downstream partner
//!   (verified with its pinned key). It is stored and passed on, under this site's signature.
//! - **Bus.** For every VM this site is responsible for but does not run itself, it subscribes
//!   to `nubis.mon.<primary>.<vm>.>` and verifies what arrives with the sender's pinned partner
//!   key, or else with the signing key of the sender's entry in the federation directory. The
//!   hub lets each site write only its own `site.<id>` directory key, so that key speaks for the
//!   site even without a bilateral contract. A verified batch is accepted only from a site of
//!   the VM's chain below this one (`chain.rs`): its downstream partner, or a site that the
//!   chain from there vouches for. Publications from above (the primary, the upstream) are
//!   ignored; anything else is dropped as `wrong_sender`.
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
//! usage).
//!
//! A GMA Producer is registered in the directory by the site that publishes its batches on the
//! public subject, under that site's own key: under relay delivery the VM's primary (which
//! learns of a Producer from the first batch relayed to it), under bus delivery the producing
//! site, whose signature every public batch carries anyway. So the directory names no site
//! that the public subject does not: under relay delivery, where a VM runs stays known to its
//! upstream alone.
//!
//! Everything refused is dropped and counted by reason (the `monitoring` operator endpoint).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_nats::Client;
use futures::StreamExt as _;
use nubis_protocol::envelope::{now_ms, Opened, Verifier};
use nubis_protocol::identity::SiteIdentity;
use nubis_protocol::message::{ErrorCode, ErrorReply, HostId, MonitoringBatch, ProducerId};
use nubis_protocol::subject::Subject;
use nubis_protocol::{SiteId, VmId};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::accounting::Accounting;
use crate::config::SiteConfig;
use crate::directory::Directory;
use crate::journal::{Journal, VmRecord};
use crate::sla::SlaEvaluator;

mod chain;
mod consumer;
mod counters;
mod intake;
mod outbox;
mod relay;
mod report;
mod sla;
#[cfg(test)]
mod tests;

pub use chain::{extends, MAX_CHAIN, RESOLVE_EVERY};
pub use consumer::sender_key;
use counters::VmStats;
pub use counters::{DropReason, MonitoringCounters, PathCounters};
pub use intake::check_intake;
pub use outbox::{Outbox, OUTBOX_STREAM};
pub use relay::{target, Target};
pub use report::{UsageReport, USAGE_LOOKBACK_MS};

/// The Producers registered for each VM, with the host that registered each.
type ProducerTable = BTreeMap<VmId, BTreeMap<ProducerId, HostId>>;

/// The Producers this site registered in the directory for each VM, oldest first.
type PublishedTable = BTreeMap<VmId, Vec<ProducerId>>;

/// Most Producers one VM may have at a time (a host agent makes one per VM each time it starts;
/// only a broken-into host would reach this).
pub const MAX_PRODUCERS_PER_VM: usize = 16;

/// Queue group of the intake subscription, so that several daemons of a site could share it.
pub const INTAKE_QUEUE_GROUP: &str = "nubis-site";

/// Batches handled at the same time; more wait in their subscription's buffer.
const CONCURRENCY: usize = 64;

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
    /// Signed calls to other sites (batches sent up the chain from the outbox).
    pub calls: nubis_bus::SignedClient,
    /// The batches on their way up the chain, until acknowledged.
    pub outbox: Outbox,
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

/// The site's monitoring service.
pub struct Monitoring {
    site: SiteId,
    identity: Arc<SiteIdentity>,
    deps: MonitoringDeps,
    counters: MonitoringCounters,
    vms: Mutex<BTreeMap<VmId, VmStats>>,
    sla: Mutex<SlaEvaluator>,
    /// The Producers registered for each VM, with the host that registered each.
    producers: Arc<Mutex<ProducerTable>>,
    /// The Producers this site registered in the directory (it publishes their batches).
    published: Arc<Mutex<PublishedTable>>,
    chains: chain::Chains,
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
            producers: Arc::new(Mutex::new(BTreeMap::new())),
            published: Arc::new(Mutex::new(BTreeMap::new())),
            chains: chain::Chains::default(),
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
        let intake_subject = Subject::monitoring_intake_all(&self.site);
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
        let calls = self.deps.calls.clone();
        let outbox_cancel = cancel.clone();
        self.tracker
            .spawn(async move { this.run_outbox(calls, outbox_cancel).await });
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
                            Path::Relay => this.relay(&msg).await,
                            Path::Bus => this.bus(&msg.subject, &msg.payload).await,
                        }
                    }
                    .instrument(span),
                );
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
