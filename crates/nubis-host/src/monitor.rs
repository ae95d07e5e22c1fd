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
//! Each batch is sent as a [`ProducedBatch`] request on `nubis.site.<site>.mon.intake`; the site
//! answers [`BatchStored`] once the batch is in its accounting stream. Until then the batch stays
//! in an ordered outbox and is sent again, unchanged, after a back-off that grows while the site
//! does not answer (a nats-server restart loses nothing). At most one batch per Producer is in
//! flight, so each Producer's batches reach the site in order. The outbox is bounded: when it is
//! full the oldest batch is dropped, with a warning and a counter.
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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::StreamExt as _;
use nubis_kpifs::{KpiError, KpiFs, KpiMount, KpiOptions, KpiRow, KpiRowKind, KpiValue};
use nubis_protocol::codec::{self, CodecError, MAX_BODY_LEN};
use nubis_protocol::descriptor::{DataPoint, VmDescriptor};
use nubis_protocol::envelope::now_ms;
use nubis_protocol::message::{
    BatchPayload, BatchStored, ErrorCode, ErrorReply, HostReply, MonitoringBatch, ProducedBatch,
    ProducerId, Value,
};
use nubis_protocol::seal::{seal, SealError};
use nubis_protocol::subject::Subject;
use nubis_protocol::{SiteId, VmId};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::agent::ErrorChain;
use crate::config::HostConfig;
use crate::engine::{MonitorQuery, MonitoredVm};
use crate::hypervisor::HypervisorError;
use crate::producer::{Delivery, Producer};
use crate::sampling::Sampler;
use crate::spec::FilesystemShare;

/// Batches in flight to the site at once.
const MAX_IN_FLIGHT: usize = 64;
/// How long the site may take to store a batch before it is sent again.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// First and longest wait before sending again after a failure.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often the counters are logged.
const REPORT_EVERY: Duration = Duration::from_secs(60);
/// Most KPI rows read from one VM's database per tick.
const KPI_ROWS_PER_TICK: usize = 1024;
/// How long after a failed KPI mount it is tried again.
const KPI_MOUNT_RETRY: Duration = Duration::from_secs(30);
/// Wake-ups from KPI filesystems waiting for the monitor (one per VM with fresh rows at most).
const KPI_WAKE_QUEUE: usize = 1024;
/// Most acknowledgement checkpoints kept per VM (later ones are merged).
const MAX_CHECKPOINTS: usize = 1024;

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

/// Why the site did not acknowledge a batch.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No reply in time.
    #[error("no reply in time")]
    Timeout,
    /// The request failed (no responder, connection lost).
    #[error("request failed")]
    Request(#[source] async_nats::RequestError),
    /// The reply could not be decoded.
    #[error("undecodable reply")]
    Reply(#[source] CodecError),
    /// The site answered with an error.
    #[error("refused by the site ({})", .0.code)]
    Refused(ErrorReply),
    /// The acknowledgement names another batch.
    #[error("acknowledgement for another batch")]
    Mismatch,
}

impl SendError {
    /// Whether sending the same bytes again can never succeed: the batch is undecodable, or
    /// the site does not (or no longer) hold the VM — the last batches of a VM that has just
    /// been handed over to another site arrive after its record left this site.
    fn is_permanent(&self) -> bool {
        matches!(self, Self::Refused(e) if matches!(
            e.code,
            ErrorCode::Malformed
                | ErrorCode::Oversize
                | ErrorCode::TooDeep
                | ErrorCode::UnknownVm
                | ErrorCode::Refused
        ))
    }
}

/// The monitor's settings, from the host configuration.
#[derive(Debug, Clone)]
pub struct MonitorSettings {
    /// The site, which names the intake subject.
    pub site: SiteId,
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

/// A batch waiting for the site's acknowledgement.
#[derive(Debug)]
struct Outgoing {
    vm: VmId,
    producer: ProducerId,
    epoch_ms: u64,
    seq: u64,
    body: Bytes,
    attempts: u32,
}

/// The KPI filesystem of one VM and what of it has been read and acknowledged.
#[derive(Debug)]
struct Kpi {
    mount: KpiMount,
    /// Set by the forwarder of the filesystem's events when rows were committed since the last
    /// read.
    fresh: Arc<AtomicBool>,
    /// The last row read.
    cursor: i64,
    /// The `published` mark.
    published: i64,
    dropped_seen: u64,
    /// Read the database at the next tick even without an event.
    scan: bool,
    /// Rows fed to the Producer and not yet published: (row id, timestamp).
    fed: VecDeque<(i64, u64)>,
    /// (next seq, settled-before timestamp) after a poll: once every batch below that seq is
    /// acknowledged, the rows older than the timestamp are published.
    checkpoints: VecDeque<(u64, u64)>,
}

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

type InFlight = FuturesUnordered<
    Pin<Box<dyn Future<Output = (u64, ProducerId, Result<BatchStored, SendError>)> + Send>>,
>;

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

/// Feeds one KPI row to a Producer.
fn feed_row(producer: &mut Producer, row: &KpiRow) {
    let ts = u64::try_from(row.ts_ms).unwrap_or(0);
    match &row.kind {
        KpiRowKind::Unencrypted { columns } => {
            for (column, value) in columns {
                let value = match value {
                    KpiValue::Null => continue,
                    KpiValue::Integer(i) => Value::Int(*i),
                    KpiValue::Real(f) => Value::Float(*f),
                    KpiValue::Text(t) => Value::Text(t.clone()),
                };
                match DataPoint::new(format!("kpi.{}.{column}", row.table)) {
                    Ok(dp) => producer.observe(&dp, ts, value),
                    Err(e) => tracing::debug!(error = %e, "kpi column cannot be a data point"),
                }
            }
        }
        KpiRowKind::Encrypted { blob } => producer.observe_encrypted(&row.table, ts, blob),
    }
}

/// Turns one delivery into the encoded [`ProducedBatch`] with sequence number `seq`.
pub fn encode_batch(
    descriptor: &VmDescriptor,
    producer: &ProducerId,
    epoch_ms: u64,
    seq: u64,
    delivery: Delivery,
) -> Result<Vec<u8>, MonitorError> {
    let payload = if delivery.sealed {
        let clear = codec::to_vec(&delivery.payload).map_err(MonitorError::Encode)?;
        BatchPayload::Sealed {
            ciphertext: seal(&descriptor.primary_keys.sealing, &clear)
                .map_err(MonitorError::Seal)?,
        }
    } else {
        BatchPayload::Clear(delivery.payload)
    };
    let produced = ProducedBatch {
        data_point: delivery.data_point,
        batch: MonitoringBatch {
            vm: descriptor.id.clone(),
            primary_site: descriptor.primary_site.clone(),
            producer: producer.clone(),
            epoch_ms,
            seq,
            payload,
        },
    };
    let body = codec::to_vec(&produced).map_err(MonitorError::Encode)?;
    if body.len() > MAX_BODY_LEN {
        return Err(MonitorError::TooLarge(body.len()));
    }
    Ok(body)
}

/// The directory that shares VM `vm`'s KPI filesystem with its guest.
fn kpi_export(root: &Path, vm: &VmId) -> PathBuf {
    FilesystemShare::kpi(root, vm.as_str()).source
}

/// Forwards the commit events of one KPI filesystem as wake-ups of the monitor, so a committed row
/// is read and sent at once rather than at the next tick. Ends with the mount.
fn forward_kpi_events(
    vm: VmId,
    mut events: mpsc::Receiver<KpiRow>,
    fresh: Arc<AtomicBool>,
    wake: mpsc::Sender<VmId>,
) {
    tokio::spawn(async move {
        while events.recv().await.is_some() {
            // One wake-up stands for every row committed until the monitor reads them.
            if !fresh.swap(true, Ordering::AcqRel) && wake.try_send(vm.clone()).is_err() {
                // The monitor is full of wake-ups or stopping; the next tick reads the rows.
            }
        }
    });
}

async fn mount_kpi(
    root: &Path,
    vm: &VmId,
    share: bool,
    wake: &mpsc::Sender<VmId>,
) -> Result<Kpi, MonitorError> {
    let mountpoint = root.join(vm.as_str());
    let db = root.join(format!("{vm}.sqlite"));
    let export = kpi_export(root, vm);
    let vm_id = vm.clone();
    let mut mount = tokio::task::spawn_blocking(move || {
        let mut mount = KpiFs::mount(&mountpoint, &db, KpiOptions::default())?;
        if share {
            // The guest reaches the filesystem only through its export; without one (a domain
            // defined before the host shared KPI filesystems) the mount still serves the host.
            if let Err(e) = mount.bind_into(&export) {
                tracing::warn!(vm.id = %vm_id, error = %ErrorChain(&e), "kpi filesystem not shared with the guest");
            }
        }
        Ok::<_, KpiError>(mount)
    })
    .await
    .map_err(MonitorError::Join)??;
    let published = mount.published()?;
    let fresh = Arc::new(AtomicBool::new(false));
    if let Some(events) = mount.take_events() {
        forward_kpi_events(vm.clone(), events, fresh.clone(), wake.clone());
    }
    Ok(Kpi {
        fresh,
        mount,
        cursor: published,
        published,
        dropped_seen: 0,
        scan: true,
        fed: VecDeque::new(),
        checkpoints: VecDeque::new(),
    })
}

/// How long an unmount may wait for the filesystem's session to end.
const UNMOUNT_WAIT: Duration = Duration::from_secs(5);

async fn unmount_kpi(kpi: Kpi) {
    let joined = tokio::time::timeout(
        UNMOUNT_WAIT,
        tokio::task::spawn_blocking(move || kpi.mount.unmount()),
    )
    .await;
    match joined {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "kpi filesystem unmount"),
        Ok(Err(e)) => tracing::warn!(error = %e, "kpi filesystem unmount task"),
        // The mount is gone from this namespace, but another one still holds it (e.g. a guest
        // started in a private mount namespace while it existed): its session ends when that
        // one lets go. The monitor does not wait for it.
        Err(_) => tracing::warn!(
            "kpi filesystem unmounted, but its session is still referenced elsewhere; not waiting"
        ),
    }
}

/// Removes what a VM's KPI filesystem left behind: its export, its empty mountpoint and its
/// database.
fn remove_kpi_files(root: &Path, vm: &VmId) {
    let export = kpi_export(root, vm);
    if export.exists() {
        nubis_kpifs::remove_export(&export);
    }
    let _ = std::fs::remove_dir(root.join(vm.as_str()));
    for suffix in ["sqlite", "sqlite-wal", "sqlite-shm"] {
        let path = root.join(format!("{vm}.{suffix}"));
        if let Err(e) = std::fs::remove_file(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove a kpi database file");
            }
        }
    }
}

/// Reads the rows written since the last read (woken by the filesystem's events).
fn read_kpi_rows(kpi: &mut Kpi, producer: &mut Producer) {
    let mut wake = kpi.scan;
    if kpi.fresh.swap(false, Ordering::AcqRel) {
        wake = true;
    }
    let dropped = kpi.mount.dropped_events();
    if dropped != kpi.dropped_seen {
        kpi.dropped_seen = dropped;
        wake = true;
    }
    if !wake {
        return;
    }
    match kpi.mount.rows_after(kpi.cursor, KPI_ROWS_PER_TICK) {
        Ok(rows) => {
            kpi.scan = rows.len() == KPI_ROWS_PER_TICK;
            for row in rows {
                feed_row(producer, &row);
                kpi.cursor = row.rowid;
                kpi.fed
                    .push_back((row.rowid, u64::try_from(row.ts_ms).unwrap_or(0)));
            }
        }
        Err(e) => {
            kpi.scan = true;
            tracing::warn!(error = %e, "cannot read kpi rows");
        }
    }
}

/// Advances the `published` mark past the rows whose batches have all been acknowledged.
fn settle_kpi(kpi: &mut Kpi, unacked: &BTreeSet<u64>, next_seq: u64, settled_before: u64) {
    let checkpoint = (next_seq, settled_before);
    if kpi.checkpoints.back() != Some(&checkpoint) {
        if kpi.checkpoints.len() >= MAX_CHECKPOINTS {
            kpi.checkpoints.pop_back();
        }
        kpi.checkpoints.push_back(checkpoint);
    }
    let oldest_unacked = unacked.first().copied().unwrap_or(u64::MAX);
    let mut mark = None;
    while let Some(&(seq_end, settled)) = kpi.checkpoints.front() {
        if oldest_unacked < seq_end {
            break;
        }
        kpi.checkpoints.pop_front();
        while let Some(&(rowid, ts)) = kpi.fed.front() {
            if ts >= settled {
                break;
            }
            mark = Some(rowid);
            kpi.fed.pop_front();
        }
    }
    if let Some(rowid) = mark.filter(|r| *r > kpi.published) {
        match kpi.mount.mark_published(rowid) {
            Ok(p) => kpi.published = p,
            Err(e) => tracing::warn!(error = %e, "cannot record published kpi rows"),
        }
    }
}

impl Monitor {
    fn new(settings: MonitorSettings) -> Self {
        let (kpi_wake, kpi_woken) = mpsc::channel(KPI_WAKE_QUEUE);
        Self {
            kpi_wake,
            kpi_woken: Some(kpi_woken),
            intake: String::from(Subject::monitoring_intake(&settings.site)),
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

    /// Encodes deliveries of one VM and puts them in the outbox.
    fn enqueue(&mut self, vm: &VmId, deliveries: Vec<Delivery>) {
        for delivery in deliveries {
            let Some(state) = self.vms.get_mut(vm) else {
                return;
            };
            let seq = state.next_seq;
            let body = match encode_batch(
                &state.descriptor,
                &state.producer_id,
                state.epoch_ms,
                seq,
                delivery,
            ) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(vm.id = %vm, error = %e, "monitoring batch not sent");
                    self.counters.dropped += 1;
                    continue;
                }
            };
            state.next_seq += 1;
            state.unacked.insert(seq);
            let outgoing = Outgoing {
                vm: vm.clone(),
                producer: state.producer_id.clone(),
                epoch_ms: state.epoch_ms,
                seq,
                body: body.into(),
                attempts: 0,
            };
            if self.outbox.len() >= self.settings.outbox {
                if let Some((_, oldest)) = self.outbox.pop_first() {
                    self.counters.dropped += 1;
                    tracing::warn!(
                        vm.id = %oldest.vm,
                        seq = oldest.seq,
                        dropped = self.counters.dropped,
                        "monitoring outbox full; oldest batch dropped"
                    );
                    self.forget_batch(&oldest);
                }
            }
            self.outbox.insert(self.next_key, outgoing);
            self.next_key += 1;
        }
    }

    /// The batch is acknowledged or given up: its VM no longer waits for it.
    fn forget_batch(&mut self, batch: &Outgoing) {
        if let Some(state) = self.vms.get_mut(&batch.vm) {
            if state.producer_id == batch.producer {
                state.unacked.remove(&batch.seq);
            }
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

    /// Starts sending the batches that may go now, oldest first.
    fn start_sends(&mut self, client: &async_nats::Client, in_flight: &mut InFlight) {
        if self.retry_at.is_some_and(|t| t > Instant::now()) {
            return;
        }
        self.retry_at = None;
        for (key, out) in &self.outbox {
            if in_flight.len() >= MAX_IN_FLIGHT {
                break;
            }
            if self.busy.contains(&out.producer) {
                continue;
            }
            self.busy.insert(out.producer.clone());
            if out.attempts == 0 {
                self.counters.sent += 1;
            } else {
                self.counters.retried += 1;
            }
            let client = client.clone();
            let subject = self.intake.clone();
            let body = out.body.clone();
            let (key, producer, epoch_ms, seq) =
                (*key, out.producer.clone(), out.epoch_ms, out.seq);
            in_flight.push(Box::pin(async move {
                let result = send(&client, subject, body, &producer, epoch_ms, seq).await;
                (key, producer, result)
            }));
        }
    }

    /// Handles the end of one request.
    fn on_sent(&mut self, key: u64, producer: &ProducerId, result: Result<BatchStored, SendError>) {
        self.busy.remove(producer);
        match result {
            Ok(_) => {
                self.counters.acknowledged += 1;
                if self.failing {
                    tracing::info!("the site stores monitoring batches again");
                }
                self.failing = false;
                self.backoff = BACKOFF_MIN;
                if let Some(out) = self.outbox.remove(&key) {
                    self.forget_batch(&out);
                }
            }
            Err(e) if e.is_permanent() => {
                self.counters.dropped += 1;
                tracing::info!(error = %e, "monitoring batch refused for good; dropped");
                if let Some(out) = self.outbox.remove(&key) {
                    self.forget_batch(&out);
                }
            }
            Err(e) => {
                if !self.failing {
                    tracing::warn!(error = %ErrorChain(&e), "the site does not store monitoring batches; retrying");
                } else {
                    tracing::debug!(error = %ErrorChain(&e), "monitoring batch not stored");
                }
                self.failing = true;
                if let Some(out) = self.outbox.get_mut(&key) {
                    out.attempts = out.attempts.saturating_add(1);
                }
                self.retry_at = Some(Instant::now() + self.backoff);
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
            }
        }
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

/// One intake request.
async fn send(
    client: &async_nats::Client,
    subject: String,
    body: Bytes,
    producer: &ProducerId,
    epoch_ms: u64,
    seq: u64,
) -> Result<BatchStored, SendError> {
    let reply = tokio::time::timeout(REQUEST_TIMEOUT, client.request(subject, body))
        .await
        .map_err(|_| SendError::Timeout)?
        .map_err(SendError::Request)?;
    match codec::from_slice::<HostReply<BatchStored>>(&reply.payload).map_err(SendError::Reply)? {
        HostReply::Ok(stored)
            if &stored.producer == producer && stored.epoch_ms == epoch_ms && stored.seq == seq =>
        {
            Ok(stored)
        }
        HostReply::Ok(_) => Err(SendError::Mismatch),
        HostReply::Error(e) => Err(SendError::Refused(e)),
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
mod tests {
    use nubis_protocol::descriptor::{Aggregate, DeliveryFormat, MonitoringSpecifier};
    use nubis_protocol::message::{ClearPayload, ProcessedValue, Sample};

    use super::*;

    fn descriptor(sealing: [u8; 32]) -> VmDescriptor {
        super::tests_support::descriptor(
            sealing,
            MonitoringSpecifier {
                data_point: DataPoint::new("cpu.utilisation").unwrap(),
                monitoring_interval_ms: 0,
                delivery_interval_ms: 0,
                format: DeliveryFormat::Processed {
                    aggregate: Aggregate::Max,
                },
                predicate: None,
                sealed: false,
            },
        )
    }

    fn delivery(sealed: bool) -> Delivery {
        let dp = DataPoint::new("cpu.utilisation").unwrap();
        Delivery {
            data_point: dp.clone(),
            payload: ClearPayload {
                samples: vec![Sample {
                    data_point: dp.clone(),
                    ts_ms: 5,
                    value: Value::Float(0.5),
                }],
                processed: vec![ProcessedValue {
                    data_point: dp,
                    aggregate: Aggregate::Max,
                    window_start_ms: 0,
                    window_end_ms: 10,
                    value: 0.5,
                    count: 1,
                }],
                encrypted_kpi: vec![],
            },
            sealed,
        }
    }

    #[test]
    fn batches_carry_producer_epoch_and_seq() {
        let id = random_producer_id().unwrap();
        assert!(
            id.as_str().starts_with("p-") && id.as_str().len() == 18,
            "{id}"
        );
        assert_ne!(id, random_producer_id().unwrap());
        let d = descriptor([9; 32]);
        let body = encode_batch(&d, &id, 1_000, 7, delivery(false)).unwrap();
        let produced: ProducedBatch = codec::from_slice(&body).unwrap();
        assert_eq!(produced.data_point.as_str(), "cpu.utilisation");
        let b = produced.batch;
        assert_eq!((b.producer, b.epoch_ms, b.seq), (id.clone(), 1_000, 7));
        assert_eq!(b.vm, d.id);
        assert_eq!(b.primary_site, d.primary_site);
        assert_eq!(b.payload, BatchPayload::Clear(delivery(false).payload));
    }

    #[test]
    fn sealed_batches_open_only_with_the_primary_key() {
        let secret = crypto_box_secret();
        let public = secret.public_key();
        let d = descriptor(*public.as_bytes());
        let id = random_producer_id().unwrap();
        let body = encode_batch(&d, &id, 1, 0, delivery(true)).unwrap();
        let produced: ProducedBatch = codec::from_slice(&body).unwrap();
        let BatchPayload::Sealed { ciphertext } = produced.batch.payload else {
            panic!("not sealed");
        };
        let clear = nubis_protocol::seal::open(&secret, &ciphertext).unwrap();
        let payload: ClearPayload = codec::from_slice(&clear).unwrap();
        assert_eq!(payload, delivery(true).payload);
        let other = crypto_box_secret();
        assert!(nubis_protocol::seal::open(&other, &ciphertext).is_err());
    }

    fn crypto_box_secret() -> crypto_box::SecretKey {
        crypto_box::SecretKey::from(rand::random::<[u8; 32]>())
    }

    #[test]
    fn oversized_batches_are_refused_before_sending() {
        let d = descriptor([9; 32]);
        let id = random_producer_id().unwrap();
        let mut big = delivery(false);
        big.payload
            .encrypted_kpi
            .push(nubis_protocol::message::EncryptedKpi {
                table: "t".into(),
                ts_ms: 0,
                blob: vec![0; MAX_BODY_LEN],
            });
        assert!(matches!(
            encode_batch(&d, &id, 1, 0, big),
            Err(MonitorError::TooLarge(_))
        ));
    }

    #[test]
    fn kpi_rows_become_samples_and_blobs() {
        let mut p = Producer::new(
            &[
                MonitoringSpecifier {
                    data_point: DataPoint::new("kpi.web").unwrap(),
                    monitoring_interval_ms: 0,
                    delivery_interval_ms: 0,
                    format: DeliveryFormat::Raw,
                    predicate: None,
                    sealed: false,
                },
                MonitoringSpecifier {
                    data_point: DataPoint::new("kpi.vault").unwrap(),
                    monitoring_interval_ms: 0,
                    delivery_interval_ms: 0,
                    format: DeliveryFormat::Raw,
                    predicate: None,
                    sealed: true,
                },
            ],
            0,
        );
        feed_row(
            &mut p,
            &KpiRow {
                rowid: 1,
                table: "web".into(),
                kind: KpiRowKind::Unencrypted {
                    columns: vec![
                        ("users".into(), KpiValue::Integer(42)),
                        ("load".into(), KpiValue::Real(0.5)),
                        ("note".into(), KpiValue::Text("ok".into())),
                        ("gap".into(), KpiValue::Null),
                    ],
                },
                ts_ms: 100,
            },
        );
        feed_row(
            &mut p,
            &KpiRow {
                rowid: 2,
                table: "vault".into(),
                kind: KpiRowKind::Encrypted {
                    blob: b"opaque".to_vec(),
                },
                ts_ms: 110,
            },
        );
        let out = p.poll(200);
        assert_eq!(out.len(), 2);
        let got: Vec<(String, u64, Value)> = out[0]
            .payload
            .samples
            .iter()
            .map(|s| (s.data_point.to_string(), s.ts_ms, s.value.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("kpi.web.users".into(), 100, Value::Int(42)),
                ("kpi.web.load".into(), 100, Value::Float(0.5)),
                ("kpi.web.note".into(), 100, Value::Text("ok".into())),
            ]
        );
        assert!(out[1].sealed);
        assert_eq!(out[1].payload.encrypted_kpi[0].blob, b"opaque");
        assert_eq!(out[1].payload.encrypted_kpi[0].ts_ms, 110);
    }

    #[test]
    fn only_undecodable_or_unheld_batches_are_given_up() {
        for (code, permanent) in [
            (ErrorCode::Malformed, true),
            (ErrorCode::Oversize, true),
            (ErrorCode::Busy, false),
            (ErrorCode::Internal, false),
            (ErrorCode::UnknownVm, true),
            (ErrorCode::Refused, true),
            (ErrorCode::Timeout, false),
        ] {
            let e = SendError::Refused(ErrorReply::new(code.clone(), "x"));
            assert_eq!(e.is_permanent(), permanent, "{code}");
        }
        assert!(!SendError::Timeout.is_permanent());
    }
}

#[cfg(test)]
mod outbox_tests {
    use super::tests_support::*;
    use super::*;

    fn stored(m: &Monitor, key: u64) -> BatchStored {
        let out = &m.outbox[&key];
        BatchStored {
            producer: out.producer.clone(),
            epoch_ms: out.epoch_ms,
            seq: out.seq,
            duplicate: false,
        }
    }

    #[test]
    fn outbox_keeps_order_drops_oldest_when_full_and_counts() {
        let (mut m, vm) = monitor_with_vm(3);
        m.enqueue(&vm, deliveries(5));
        assert_eq!(m.counters.dropped, 2);
        let seqs: Vec<u64> = m.outbox.values().map(|o| o.seq).collect();
        assert_eq!(
            seqs,
            vec![2, 3, 4],
            "the oldest went, sequence numbers have no gaps"
        );
        let unacked: Vec<u64> = m.vms[&vm].unacked.iter().copied().collect();
        assert_eq!(unacked, vec![2, 3, 4]);
        let first = *m.outbox.keys().next().unwrap();
        let producer = m.outbox[&first].producer.clone();
        m.busy.insert(producer.clone());
        m.on_sent(first, &producer, Ok(stored(&m, first)));
        assert_eq!(m.counters.acknowledged, 1);
        assert!(!m.busy.contains(&producer));
        assert_eq!(m.outbox.len(), 2);
        assert_eq!(m.vms[&vm].unacked.first(), Some(&3));
    }

    #[test]
    fn failures_keep_the_batch_and_back_off_refusals_drop_it() {
        let (mut m, vm) = monitor_with_vm(10);
        m.enqueue(&vm, deliveries(2));
        let keys: Vec<u64> = m.outbox.keys().copied().collect();
        let producer = m.outbox[&keys[0]].producer.clone();
        m.on_sent(keys[0], &producer, Err(SendError::Timeout));
        assert_eq!(m.outbox[&keys[0]].attempts, 1);
        assert!(m.retry_at.is_some());
        assert_eq!(m.backoff, BACKOFF_MIN * 2);
        m.on_sent(keys[0], &producer, Err(SendError::Timeout));
        assert_eq!(m.backoff, BACKOFF_MIN * 4);
        assert_eq!(
            m.outbox.len(),
            2,
            "nothing is lost while the site does not answer"
        );
        let refused = SendError::Refused(ErrorReply::new(ErrorCode::Malformed, "bad"));
        m.on_sent(keys[1], &producer, Err(refused));
        assert_eq!(m.counters.dropped, 1);
        assert_eq!(m.outbox.len(), 1);
        m.on_sent(keys[0], &producer, Ok(stored(&m, keys[0])));
        assert!(m.outbox.is_empty());
        assert_eq!(m.backoff, BACKOFF_MIN, "success resets the back-off");
        assert!(m.vms[&vm].unacked.is_empty());
        // An acknowledgement for a batch already dropped changes nothing.
        m.on_sent(
            keys[1],
            &producer,
            Ok(BatchStored {
                producer: producer.clone(),
                epoch_ms: 0,
                seq: 1,
                duplicate: true,
            }),
        );
        assert_eq!(m.counters.acknowledged, 2);
    }

    #[test]
    fn queries_skip_statistics_of_vms_not_due() {
        let (m, vm) = monitor_with_vm(10);
        // The specifier measures every 1000 ms and has measured nothing yet.
        assert!(!m.query(0).skip_stats.contains(&vm));
        assert_eq!(m.query(0).known.get(&vm), Some(&1));
    }
}

#[cfg(test)]
mod tests_support {
    use std::collections::BTreeMap;

    use nubis_protocol::descriptor::{
        DeliveryFormat, MonitoringSpecifier, PrimaryKeys, VirtualHardware,
    };
    use nubis_protocol::message::{ClearPayload, Sample};

    use super::*;

    /// VM `vm-1` of primary `site-a`, sealing to `sealing`, with one specifier.
    pub(super) fn descriptor(sealing: [u8; 32], specifier: MonitoringSpecifier) -> VmDescriptor {
        VmDescriptor {
            id: VmId::new("vm-1").unwrap(),
            name: "vm".into(),
            version: 1,
            primary_site: SiteId::new("site-a").unwrap(),
            primary_keys: PrimaryKeys {
                signing: [1; 32],
                sealing,
            },
            hardware: VirtualHardware {
                vcpus: 1,
                memory_mib: 64,
                disks: vec![],
                networks: vec![],
                boot: None,
            },
            monitoring: vec![specifier],
            properties: BTreeMap::new(),
        }
    }

    pub(super) fn monitor_with_vm(outbox: usize) -> (Monitor, VmId) {
        let mut m = Monitor::new(MonitorSettings {
            site: SiteId::new("site-a").unwrap(),
            tick: Duration::from_millis(250),
            outbox,
            kpi_root: PathBuf::from("/nonexistent"),
            kpi_share: false,
        });
        let vm = VmId::new("vm-1").unwrap();
        let descriptor = descriptor(
            [2; 32],
            MonitoringSpecifier {
                data_point: DataPoint::new("cpu.utilisation").unwrap(),
                monitoring_interval_ms: 1000,
                delivery_interval_ms: 0,
                format: DeliveryFormat::Raw,
                predicate: None,
                sealed: false,
            },
        );
        m.vms.insert(
            vm.clone(),
            VmState {
                producer: Producer::new(&descriptor.monitoring, 0),
                descriptor,
                producer_id: random_producer_id().unwrap(),
                epoch_ms: 0,
                next_seq: 0,
                unacked: BTreeSet::new(),
                kpi: None,
                kpi_retry_at: None,
                active: false,
            },
        );
        (m, vm)
    }

    pub(super) fn deliveries(n: u64) -> Vec<Delivery> {
        let dp = DataPoint::new("cpu.utilisation").unwrap();
        (0..n)
            .map(|i| Delivery {
                data_point: dp.clone(),
                payload: ClearPayload {
                    samples: vec![Sample {
                        data_point: dp.clone(),
                        ts_ms: i,
                        value: Value::Float(0.1),
                    }],
                    ..ClearPayload::default()
                },
                sealed: false,
            })
            .collect()
    }
}
