//! The KPI filesystem of each VM as the monitor uses it: mounted (and bound on the guest's
//! export) while the VM runs here, read when the filesystem reports committed rows, its
//! `published` mark advanced once the site has acknowledged the batches that carried them.

use std::collections::{BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nubis_kpifs::{KpiError, KpiFs, KpiMount, KpiOptions, KpiRow, KpiRowKind, KpiValue};
use nubis_protocol::descriptor::DataPoint;
use nubis_protocol::message::Value;
use nubis_protocol::VmId;
use tokio::sync::mpsc;

use super::MonitorError;
use crate::agent::ErrorChain;
use crate::producer::Producer;
use crate::spec::FilesystemShare;

/// Most KPI rows read from one VM's database per tick.
const KPI_ROWS_PER_TICK: usize = 1024;
/// How long after a failed KPI mount it is tried again.
pub(super) const KPI_MOUNT_RETRY: Duration = Duration::from_secs(30);
/// Most acknowledgement checkpoints kept per VM (later ones are merged).
const MAX_CHECKPOINTS: usize = 1024;

/// The KPI filesystem of one VM and what of it has been read and acknowledged.
#[derive(Debug)]
pub(super) struct Kpi {
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
    pub(super) scan: bool,
    /// Rows fed to the Producer and not yet published: (row id, timestamp).
    fed: VecDeque<(i64, u64)>,
    /// (next seq, settled-before timestamp) after a poll: once every batch below that seq is
    /// acknowledged, the rows older than the timestamp are published.
    checkpoints: VecDeque<(u64, u64)>,
}

/// Feeds one KPI row to a Producer.
pub(super) fn feed_row(producer: &mut Producer, row: &KpiRow) {
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

/// The directory that shares VM `vm`'s KPI filesystem with its guest.
pub(super) fn kpi_export(root: &Path, vm: &VmId) -> PathBuf {
    FilesystemShare::kpi(root, vm.as_str()).source
}

/// Forwards the commit events of one KPI filesystem as wake-ups of the monitor, so a committed row
/// is read and sent at once rather than at the next tick. Ends with the mount.
pub(super) fn forward_kpi_events(
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

pub(super) async fn mount_kpi(
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

pub(super) async fn unmount_kpi(kpi: Kpi) {
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
pub(super) fn remove_kpi_files(root: &Path, vm: &VmId) {
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
pub(super) fn read_kpi_rows(kpi: &mut Kpi, producer: &mut Producer) {
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
pub(super) fn settle_kpi(
    kpi: &mut Kpi,
    unacked: &BTreeSet<u64>,
    next_seq: u64,
    settled_before: u64,
) {
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
