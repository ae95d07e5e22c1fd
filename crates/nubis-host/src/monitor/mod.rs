//! The host agent's monitoring task (paper section IV): one [`Producer`] per VM held by the host,
//! fed at every tick with infrastructure measurements and the rows of the VM's KPI filesystem,
//! and an outbox that hands every batch to the site until the site has stored it.
//!
//! At every `monitor_tick` the task asks the engine thread for the VMs it holds (descriptors only
//! when their version changed, statistics only for the VMs whose specifiers are due), turns the
//! statistics into rates with a [`Sampler`], feeds and polls the Producers, and turns each
//! [`Delivery`] into a [`MonitoringBatch`]: producer id `p-<16 hex>` random per VM and agent
//! process, `epoch_ms` when that Producer started, `seq` from 0 without gaps. A specifier that
//! asks for sealing gets the batch's
//! [`ClearPayload`](nubis_protocol::message::ClearPayload) sealed to the primary site's X25519 key.
//!
//! Each batch is sent as a [`ProducedBatch`] request on `nubis.site.<site>.intake.<host>`; the site
//! answers [`BatchStored`] once the batch is in its accounting stream. Until then the batch stays
//! in an ordered outbox and is sent again, unchanged, after a back-off that grows while the site
//! does not answer (a nats-server restart loses nothing). At most one batch per Producer is in
//! flight, so each Producer's batches reach the site in order. The outbox is bounded: while it is
//! full no new batch is made (KPI rows stay unread and unpublished in the VM's database, the
//! Producer keeps its samples within its own bound), so nothing the application wrote is lost
//! while the site cannot store; only the last batches of a VM leaving the host may overflow
//! it, and then the oldest batch is dropped, with a warning and a counter.
//!
//! # KPI filesystems
//!
//! A VM that is active here and has a `kpi.` specifier, or whose guest is given its KPI share
//! (`kpi_share` in the host configuration), gets a KPI filesystem mounted at `<kpi_root>/<vm>`,
//! backed by `<kpi_root>/<vm>.sqlite`. With the share, the mount is also bound on the VM's
//! export `<kpi_root>/<vm>.share` (prepared by the engine before the domain starts), stays for as
//! long as the VM is on the host whatever its specifiers, and rows that no specifier asks for wait
//! in the database. Rows of `unencrypted/<table>` give the
//! samples `kpi.<table>.<column>` (timestamped with the row); rows of `encrypted/<table>` are
//! forwarded untouched. The database's `published` mark advances only past rows whose batches
//! the site has acknowledged, so a restarted agent sends again exactly what was not stored. The
//! mount goes when the VM leaves the host (its database too, once everything collected has been
//! handed to the outbox) and when the agent stops (the database stays for the next start, and so
//! does the export of a VM whose guest runs: its hypervisor holds it open, and the next agent
//! binds its new mount there).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt as _;
use nubis_kpifs::KpiError;
use nubis_protocol::codec::CodecError;
use nubis_protocol::descriptor::VmDescriptor;
use nubis_protocol::envelope::now_ms;
use nubis_protocol::message::{HostId, ProducerId};
use nubis_protocol::seal::SealError;
use nubis_protocol::subject::Subject;
use nubis_protocol::{SiteId, VmId};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::agent::ErrorChain;
use crate::config::HostConfig;
use crate::engine::{MonitorQuery, MonitoredVm};
use crate::hypervisor::HypervisorError;
use crate::producer::Producer;
use crate::sampling::Sampler;

mod intake;
mod kpi;
mod outbox;

pub use intake::{encode_batch, SendError};
use kpi::{
    kpi_export, mount_kpi, read_kpi_rows, remove_kpi_files, settle_kpi, unmount_kpi, Kpi,
    KPI_MOUNT_RETRY,
};
use outbox::{InFlight, Outgoing, BACKOFF_MIN};

/// How often the counters are logged.
const REPORT_EVERY: Duration = Duration::from_secs(60);
/// Wake-ups from KPI filesystems waiting for the monitor (one per VM with fresh rows at most).
const KPI_WAKE_QUEUE: usize = 1024;

/// Why a batch or a KPI filesystem could not be handled.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    /// A batch could not be encoded.
    #[error("cannot encode a batch")]
    Encode(#[source] CodecError),
    /// A payload could not be sealed.
    #[error("cannot seal a batch")]
    Seal(#[source] SealError),
    /// An encoded batch exceeds what the site accepts.
    #[error("batch of {0} bytes is too large")]
    TooLarge(usize),
    /// The KPI filesystem failed.
    #[error("kpi filesystem")]
    Kpi(#[from] KpiError),
    /// A blocking task could not finish.
    #[error("blocking task")]
    Join(#[source] tokio::task::JoinError),
}

/// The monitor's settings, from the host configuration.
#[derive(Debug, Clone)]
pub struct MonitorSettings {
    /// The site, which names the intake subject.
    pub site: SiteId,
    /// This host, which names the intake subject too.
    pub host: HostId,
    /// How often to measure, poll and send.
    pub tick: Duration,
    /// Most batches kept until acknowledged.
    pub outbox: usize,
    /// Where the KPI filesystems are mounted.
    pub kpi_root: PathBuf,
    /// Whether guests are given their KPI filesystem (see [`HostConfig::kpi_share`]).
    pub kpi_share: bool,
}

impl MonitorSettings {
    /// The settings of `config`.
    pub fn from_config(config: &HostConfig) -> Self {
        Self {
            site: config.site.clone(),
            host: config.host.clone(),
            tick: config.monitor_tick,
            outbox: config.monitor_outbox,
            kpi_root: config.kpi_root.clone(),
            kpi_share: config.kpi_share,
        }
    }
}

/// What the monitor has done since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MonitorCounters {
    /// Batches sent for the first time.
    pub sent: u64,
    /// Batches the site acknowledged.
    pub acknowledged: u64,
    /// Batches sent again.
    pub retried: u64,
    /// Batches given up: outbox full, or refused for good.
    pub dropped: u64,
}

/// The engine's answer to one [`MonitorQuery`].
pub type Snapshot = oneshot::Receiver<Result<Vec<MonitoredVm>, HypervisorError>>;

/// Asks the engine thread for a snapshot; `None` when it cannot take the question now.
pub type AskEngine = Box<dyn Fn(MonitorQuery) -> Option<Snapshot> + Send>;

/// One VM held by the host and its Producer.
#[derive(Debug)]
struct VmState {
    descriptor: VmDescriptor,
    producer: Producer,
    producer_id: ProducerId,
    epoch_ms: u64,
    next_seq: u64,
    unacked: BTreeSet<u64>,
    kpi: Option<Kpi>,
    kpi_retry_at: Option<Instant>,
    /// Whether the VM's domain ran at the last snapshot.
    active: bool,
}

/// The monitoring task's state.
struct Monitor {
    settings: MonitorSettings,
    intake: String,
    vms: HashMap<VmId, VmState>,
    sampler: Sampler,
    outbox: BTreeMap<u64, Outgoing>,
    next_key: u64,
    busy: HashSet<ProducerId>,
    retry_at: Option<Instant>,
    backoff: Duration,
    failing: bool,
    counters: MonitorCounters,
    /// Given to each KPI filesystem's event forwarder.
    kpi_wake: mpsc::Sender<VmId>,
    kpi_woken: Option<mpsc::Receiver<VmId>>,
}

fn random_producer_id() -> Option<ProducerId> {
    ProducerId::new(format!("p-{:016x}", rand::random::<u64>())).ok()
}

fn system_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Monitor {
    fn new(settings: MonitorSettings) -> Self {
        let (kpi_wake, kpi_woken) = mpsc::channel(KPI_WAKE_QUEUE);
        Self {
            kpi_wake,
            kpi_woken: Some(kpi_woken),
            intake: String::from(Subject::monitoring_intake(&settings.site, &settings.host)),
            settings,
            vms: HashMap::new(),
            sampler: Sampler::new(),
            outbox: BTreeMap::new(),
            next_key: 0,
            busy: HashSet::new(),
            retry_at: None,
            backoff: BACKOFF_MIN,
            failing: false,
            counters: MonitorCounters::default(),
        }
    }

    fn query(&self, now: u64) -> MonitorQuery {
        MonitorQuery {
            known: self
                .vms
                .iter()
                .map(|(vm, s)| (vm.clone(), s.descriptor.version))
                .collect(),
            skip_stats: self
                .vms
                .iter()
                .filter(|(_, s)| !s.producer.is_due(now))
                .map(|(vm, _)| vm.clone())
                .collect(),
        }
    }

    /// Handles one engine snapshot: new, changed and departed VMs, measurements, KPI rows,
    /// deliveries.
    async fn on_snapshot(&mut self, snapshot: Vec<MonitoredVm>) {
        let now = now_ms();
        let mut present = HashSet::with_capacity(snapshot.len());
        for m in snapshot {
            present.insert(m.vm.clone());
            self.update_vm(&m, now).await;
            let Some(state) = self.vms.get_mut(&m.vm) else {
                continue;
            };
            if let Some(stats) = m.stats {
                let vcpus = stats.vcpus;
                let ts = system_ms(stats.wall_time);
                match self.sampler.observe(stats) {
                    Ok(Some(rates)) => state.producer.measure_infra(ts, &rates, vcpus),
                    Ok(None) => {}
                    Err(e) => tracing::debug!(vm.id = %m.vm, error = %e, "snapshot gives no rates"),
                }
            }
            // A full outbox takes nothing new: the KPI rows stay unread in the VM's database
            // (its `published` mark stays put) and the Producer keeps its samples, until the
            // site has stored what waits.
            if self.outbox.len() >= self.settings.outbox {
                continue;
            }
            if let Some(kpi) = &mut state.kpi {
                read_kpi_rows(kpi, &mut state.producer);
            }
            let deliveries = state.producer.poll(now);
            self.enqueue(&m.vm, deliveries);
            if let Some(state) = self.vms.get_mut(&m.vm) {
                let settled = state.producer.kpi_settled_before();
                if let Some(kpi) = &mut state.kpi {
                    settle_kpi(kpi, &state.unacked, state.next_seq, settled);
                }
            }
        }
        let gone: Vec<VmId> = self
            .vms
            .keys()
            .filter(|vm| !present.contains(*vm))
            .cloned()
            .collect();
        for vm in gone {
            self.leave(&vm, now).await;
        }
    }

    /// Creates, updates, mounts or unmounts for one VM of a snapshot.
    async fn update_vm(&mut self, m: &MonitoredVm, now: u64) {
        if !self.vms.contains_key(&m.vm) {
            let Some(descriptor) = m.descriptor.clone() else {
                return;
            };
            let Some(producer_id) = random_producer_id() else {
                tracing::error!(vm.id = %m.vm, "cannot make a producer id");
                return;
            };
            tracing::info!(vm.id = %m.vm, producer = %producer_id, "monitoring the vm");
            self.vms.insert(
                m.vm.clone(),
                VmState {
                    producer: Producer::new(&descriptor.monitoring, now),
                    descriptor,
                    producer_id,
                    epoch_ms: now,
                    next_seq: 0,
                    unacked: BTreeSet::new(),
                    kpi: None,
                    kpi_retry_at: None,
                    active: false,
                },
            );
        }
        let Some(state) = self.vms.get_mut(&m.vm) else {
            return;
        };
        state.active = m.active;
        if let Some(d) = &m.descriptor {
            if d.version != state.descriptor.version {
                tracing::info!(vm.id = %m.vm, version = d.version, "monitoring specifiers updated");
                state.producer.update(&d.monitoring, now);
                state.descriptor = d.clone();
            }
        }
        // A shared filesystem stays for the guest even when no specifier asks for its rows.
        let wants_kpi = state.producer.wants_kpi() || self.settings.kpi_share;
        if !wants_kpi {
            if let Some(kpi) = state.kpi.take() {
                unmount_kpi(kpi).await;
            }
        } else if m.active
            && state.kpi.is_none()
            && state.kpi_retry_at.is_none_or(|t| t <= Instant::now())
        {
            let mounted = mount_kpi(
                &self.settings.kpi_root,
                &m.vm,
                self.settings.kpi_share,
                &self.kpi_wake,
            )
            .await;
            match mounted {
                Ok(kpi) => {
                    state.kpi = Some(kpi);
                    state.kpi_retry_at = None;
                }
                Err(e) => {
                    if state.kpi_retry_at.is_none() {
                        tracing::warn!(vm.id = %m.vm, error = %ErrorChain(&e), "cannot mount the kpi filesystem");
                    }
                    state.kpi_retry_at = Some(Instant::now() + KPI_MOUNT_RETRY);
                }
            }
        }
    }

    /// Rows were committed in `vm`'s KPI filesystem: they are read, fed and delivered now, so a
    /// report reaches the site without waiting for the next tick.
    fn on_kpi_rows(&mut self, vm: &VmId) {
        if self.outbox.len() >= self.settings.outbox {
            // Read once the outbox has room (see `on_snapshot`).
            return;
        }
        let now = now_ms();
        let Some(state) = self.vms.get_mut(vm) else {
            return;
        };
        let Some(kpi) = &mut state.kpi else {
            return;
        };
        read_kpi_rows(kpi, &mut state.producer);
        let deliveries = state.producer.poll(now);
        self.enqueue(vm, deliveries);
        if let Some(state) = self.vms.get_mut(vm) {
            let settled = state.producer.kpi_settled_before();
            if let Some(kpi) = &mut state.kpi {
                settle_kpi(kpi, &state.unacked, state.next_seq, settled);
            }
        }
    }

    /// The VM left the host: what it collected goes to the outbox, its KPI filesystem goes.
    async fn leave(&mut self, vm: &VmId, now: u64) {
        let Some(state) = self.vms.get_mut(vm) else {
            return;
        };
        if let Some(kpi) = &mut state.kpi {
            kpi.scan = true;
            read_kpi_rows(kpi, &mut state.producer);
        }
        let deliveries = state.producer.flush(now);
        self.enqueue(vm, deliveries);
        self.sampler.forget(vm.as_str());
        if let Some(mut state) = self.vms.remove(vm) {
            if let Some(kpi) = state.kpi.take() {
                unmount_kpi(kpi).await;
            }
            remove_kpi_files(&self.settings.kpi_root, vm);
        }
        tracing::info!(vm.id = %vm, "monitoring of the vm stopped");
    }

    fn report(&self, last: &mut MonitorCounters) {
        if *last != self.counters {
            let c = self.counters;
            tracing::info!(
                sent = c.sent,
                acknowledged = c.acknowledged,
                retried = c.retried,
                dropped = c.dropped,
                outbox = self.outbox.len(),
                vms = self.vms.len(),
                "monitoring"
            );
            *last = c;
        }
    }

    async fn stop(&mut self) {
        for (vm, state) in &mut self.vms {
            if let Some(kpi) = state.kpi.take() {
                tracing::debug!(vm.id = %vm, "unmounting the kpi filesystem");
                unmount_kpi(kpi).await;
            }
            // The export of a running guest stays: its hypervisor holds it open.
            let export = kpi_export(&self.settings.kpi_root, vm);
            if !state.active && export.exists() {
                nubis_kpifs::remove_export(&export);
            }
        }
        if !self.outbox.is_empty() {
            tracing::warn!(
                batches = self.outbox.len(),
                "monitoring batches not acknowledged at stop"
            );
        }
        let mut last = MonitorCounters::default();
        self.report(&mut last);
    }
}

/// The first tick: half a tick past a multiple of the tick on the wall clock, so measurements
/// fall in the middle of aligned monitoring periods rather than on their edges.
fn first_tick(tick: Duration) -> Instant {
    let tick_ms = u64::try_from(tick.as_millis()).unwrap_or(u64::MAX).max(1);
    let wait = (tick_ms + tick_ms / 2 - now_ms() % tick_ms) % tick_ms;
    Instant::now() + Duration::from_millis(wait)
}

/// Runs the monitoring task until `shutdown` is cancelled; then unmounts every KPI filesystem.
pub async fn run(
    client: async_nats::Client,
    settings: MonitorSettings,
    ask: AskEngine,
    shutdown: CancellationToken,
) {
    if let Err(e) = std::fs::create_dir_all(&settings.kpi_root) {
        tracing::warn!(path = %settings.kpi_root.display(), error = %e, "cannot create the kpi root");
    }
    let mut ticker = tokio::time::interval_at(first_tick(settings.tick), settings.tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reports = tokio::time::interval_at(Instant::now() + REPORT_EVERY, REPORT_EVERY);
    let mut monitor = Monitor::new(settings);
    let mut in_flight = InFlight::new();
    let mut pending: Option<Snapshot> = None;
    let mut last_report = MonitorCounters::default();
    let mut engine_failing = false;
    let mut kpi_woken = monitor.kpi_woken.take();
    loop {
        monitor.start_sends(&client, &mut in_flight);
        let retry_at = monitor.retry_at;
        let retry = async move {
            match retry_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        let snapshot = async {
            match pending.as_mut() {
                Some(rx) => rx.await,
                None => std::future::pending().await,
            }
        };
        let woken = async {
            match kpi_woken.as_mut() {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            Some(vm) = woken => monitor.on_kpi_rows(&vm),
            Some((key, producer, result)) = in_flight.next(), if !in_flight.is_empty() => {
                monitor.on_sent(key, &producer, result);
            }
            answer = snapshot => {
                pending = None;
                match answer {
                    Ok(Ok(vms)) => {
                        engine_failing = false;
                        monitor.on_snapshot(vms).await;
                    }
                    Ok(Err(e)) => {
                        if !engine_failing {
                            tracing::warn!(error = %ErrorChain(&e), "no monitoring snapshot from the hypervisor");
                        }
                        engine_failing = true;
                    }
                    // The engine is gone: the agent is stopping.
                    Err(_) => break,
                }
            }
            _ = ticker.tick() => {
                if pending.is_none() {
                    pending = ask(monitor.query(now_ms()));
                    if pending.is_none() {
                        tracing::debug!("engine busy; monitoring tick skipped");
                    }
                }
            }
            () = retry => monitor.retry_at = None,
            _ = reports.tick() => monitor.report(&mut last_report),
        }
    }
    monitor.stop().await;
}

#[cfg(test)]
mod outbox_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_support;
