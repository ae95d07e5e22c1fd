//! The host agent's operations, run one at a time by the owner of the hypervisor connection:
//! capacity accounting, the VMs the host holds, their directories and their domains.
//!
//! Every operation is idempotent, because the site retries after its own crashes: reserving a
//! reserved VM returns the same slots, activating a running VM reports its state, releasing an
//! unknown VM succeeds. The [`Engine`] is synchronous; the agent runs it on a thread of its own.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use nubis_protocol::descriptor::{DescriptorError, VmDescriptor};
use nubis_protocol::envelope::now_ms;
use nubis_protocol::message::{
    self as wire, ErrorCode, ErrorReply, HostCapacity, HostId, HostResources, HostVmEntry,
    HostVmStatus, HostVms, PrepareMode, StateTransition, VmPrepared, VmReleased, VmReserved,
    VmUpdated,
};
use nubis_protocol::VmId;
use sha2::{Digest, Sha256};

use crate::capacity::{Capacity, CapacityError, Resources};
use crate::dmtf::DmtfState;
use crate::hypervisor::{DomainStats, Hypervisor, HypervisorError};
use crate::spec::{DiskFormat, DiskSpec, DomainSpec, FilesystemShare, InterfaceSpec, KernelBoot};
use crate::vm_files::{self, Found, VmFiles, VmFilesError};

/// Why an operation failed; each maps to a stable error code on the bus.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// The host holds no such VM.
    #[error("vm {0} is not on this host")]
    UnknownVm(VmId),
    /// The VM does not fit.
    #[error("the vm does not fit on this host")]
    NoCapacity(#[source] CapacityError),
    /// The descriptor names another VM than the request.
    #[error("descriptor is for vm {found}, not {expected}")]
    WrongVm {
        /// The VM of the request.
        expected: VmId,
        /// The VM of the descriptor.
        found: VmId,
    },
    /// The descriptor is invalid.
    #[error("invalid descriptor")]
    InvalidDescriptor(#[source] DescriptorError),
    /// The descriptor is older than the one the host holds.
    #[error("descriptor version {offered} is older than version {held} held here")]
    StaleDescriptor {
        /// The version offered.
        offered: u64,
        /// The version held.
        held: u64,
    },
    /// A disk format this host cannot run.
    #[error("disk format {0:?} is not supported by this host")]
    UnsupportedFormat(String),
    /// A file the VM needs is not in its directory.
    #[error("file {0} of the vm has not been received")]
    MissingFile(String),
    /// The hypervisor refused or failed.
    #[error("hypervisor")]
    Hypervisor(#[from] HypervisorError),
    /// The VM's directory could not be used.
    #[error("vm files")]
    Files(#[from] VmFilesError),
    /// The directory that shares the VM's KPI filesystem with its guest could not be made.
    #[error("cannot prepare the kpi share")]
    KpiShare(#[source] nubis_kpifs::KpiError),
    /// QEMU refuses to save a guest that holds a virtio-9p share mounted, and the guest kept its
    /// KPI share mounted for longer than [`KPI_SHARE_SAVE_WAIT`].
    #[error("the guest has its KPI share mounted; it cannot be saved until it unmounts it")]
    KpiShareMounted(#[source] HypervisorError),
    /// The VM has no domain on this host (its files are arriving, or it is prepared for a
    /// transfer): only starting it or releasing it makes sense.
    #[error("the vm has no domain on this host; start it here first")]
    NoDomain,
}

impl OpError {
    /// The error reply for the bus. Its message never contains a path or a hypervisor URI,
    /// because a site may pass it on to other sites.
    pub fn to_reply(&self) -> ErrorReply {
        let (code, message) = match self {
            Self::UnknownVm(_) => (ErrorCode::UnknownVm, self.to_string()),
            Self::NoCapacity(CapacityError::DoesNotFit { needed, free, .. }) => (
                ErrorCode::NoCapacity,
                format!(
                    "the vm needs {} vcpus, {} MiB, {} disk bytes; free are {} vcpus, {} MiB, {} disk bytes",
                    needed.vcpus,
                    needed.memory_mib,
                    needed.disk_bytes,
                    free.vcpus,
                    free.memory_mib,
                    free.disk_bytes
                ),
            ),
            Self::NoCapacity(CapacityError::AlreadyCommitted(_)) => {
                (ErrorCode::Conflict, "the vm already holds a reservation".into())
            }
            Self::WrongVm { .. } => (ErrorCode::Malformed, self.to_string()),
            Self::InvalidDescriptor(e) => (ErrorCode::Malformed, format!("invalid descriptor: {e}")),
            Self::StaleDescriptor { .. }
            | Self::MissingFile(_)
            | Self::NoDomain
            | Self::KpiShareMounted(_) => (ErrorCode::Conflict, self.to_string()),
            Self::KpiShare(_) => (
                ErrorCode::Internal,
                "cannot prepare the vm's kpi share".into(),
            ),
            Self::UnsupportedFormat(_) => (ErrorCode::Refused, self.to_string()),
            Self::Hypervisor(e) => hypervisor_reply(e),
            Self::Files(_) => (ErrorCode::Internal, "cannot use the vm's files".into()),
        };
        ErrorReply::new(code, message)
    }
}

fn hypervisor_reply(e: &HypervisorError) -> (ErrorCode, String) {
    match e {
        HypervisorError::InvalidState {
            operation, state, ..
        } => (
            ErrorCode::Conflict,
            format!(
                "cannot {operation} the vm while it is {}",
                state_name(*state)
            ),
        ),
        HypervisorError::AlreadyDefined { .. } => {
            (ErrorCode::Conflict, "the vm is already defined".into())
        }
        HypervisorError::StateFileMissing { .. } => {
            (ErrorCode::Conflict, "the vm has no saved state".into())
        }
        HypervisorError::CorruptStateFile { .. } => {
            (ErrorCode::Conflict, "the saved state is not usable".into())
        }
        HypervisorError::RestoreFailed { .. } => (
            ErrorCode::Internal,
            "the vm could not be restored from its saved state".into(),
        ),
        HypervisorError::InvalidSpec(e) => (
            ErrorCode::Malformed,
            format!("the descriptor cannot be run: {e}"),
        ),
        HypervisorError::Unsupported { operation } => (
            ErrorCode::Refused,
            format!("{operation} is not supported by this host"),
        ),
        HypervisorError::Connect { .. } | HypervisorError::ConnectionLost { .. } => (
            ErrorCode::Internal,
            "the hypervisor is not reachable".into(),
        ),
        HypervisorError::UnknownDomain { .. } => {
            (ErrorCode::Internal, "the vm's domain disappeared".into())
        }
        HypervisorError::DomainXml(_) | HypervisorError::Operation { .. } => {
            (ErrorCode::Internal, "the hypervisor failed".into())
        }
    }
}

fn state_name(s: DmtfState) -> &'static str {
    match s {
        DmtfState::Unknown => "in an unknown state",
        DmtfState::Enabled => "running",
        DmtfState::Disabled => "stopped",
        DmtfState::ShuttingDown => "shutting down",
        DmtfState::Suspended => "suspended",
        DmtfState::Paused => "paused",
        DmtfState::Starting => "starting",
    }
}

/// The wire state for a host state, one to one by CIM value.
pub fn wire_state(s: DmtfState) -> wire::DmtfState {
    wire::DmtfState::from_cim_enabled_state(s.cim_value())
}

/// A UUID derived from the VM id alone, so the same VM has the same UUID on every host (libvirt
/// requires it when a saved state is restored with a rewritten definition). Name-based, with
/// the version nibble of RFC 9562's vendor-specific version 8.
pub fn vm_uuid(vm: &VmId) -> String {
    let digest = Sha256::new()
        .chain_update(b"nubis vm uuid\0")
        .chain_update(vm.as_str().as_bytes())
        .finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A locally administered MAC address derived from the VM id and interface index, stable across
/// hosts so the guest's network configuration survives a migration.
pub fn vm_mac(vm: &VmId, index: usize) -> String {
    let digest = Sha256::new()
        .chain_update(b"nubis vm mac\0")
        .chain_update(vm.as_str().as_bytes())
        .chain_update((index as u64).to_be_bytes())
        .finalize();
    format!(
        "52:54:00:{:02x}:{:02x}:{:02x}",
        digest[0], digest[1], digest[2]
    )
}

fn resources(d: &VmDescriptor) -> Resources {
    let r = HostResources::of(d);
    Resources {
        vcpus: r.vcpus,
        memory_mib: r.memory_mib,
        disk_bytes: r.disk_bytes,
    }
}

fn wire_resources(r: Resources) -> HostResources {
    HostResources {
        vcpus: r.vcpus,
        memory_mib: r.memory_mib,
        disk_bytes: r.disk_bytes,
    }
}

/// How long a save waits for a guest to unmount its KPI share. A guest's KPI writer holds the
/// share mounted only while it writes a report (see `ARCHITECTURE.md`), so a save that meets it
/// mounted is tried again for this long before it is refused.
pub const KPI_SHARE_SAVE_WAIT: Duration = Duration::from_secs(5);
/// Pause between two save attempts while the KPI share is mounted.
const KPI_SHARE_SAVE_RETRY: Duration = Duration::from_millis(100);

/// Whether a save was refused because the guest holds a virtio-9p share mounted: QEMU names the
/// export ("VirtFS") in its refusal.
fn blocked_by_share(e: &HypervisorError) -> bool {
    matches!(e, HypervisorError::Operation { source, .. } if source.message.contains("VirtFS"))
}

/// What the monitor asks the engine at each tick.
#[derive(Debug, Clone, Default)]
pub struct MonitorQuery {
    /// The descriptor version the monitor holds for each VM; a VM whose held version differs
    /// (or that is missing here) is answered with its descriptor.
    pub known: HashMap<VmId, u64>,
    /// Active VMs whose statistics are not needed at this tick.
    pub skip_stats: HashSet<VmId>,
}

/// One VM held by this host, as the monitor sees it.
#[derive(Debug, Clone)]
pub struct MonitoredVm {
    /// The VM.
    pub vm: VmId,
    /// Its descriptor version.
    pub version: u64,
    /// Its descriptor, when the monitor's version is not this one.
    pub descriptor: Option<VmDescriptor>,
    /// Whether its domain runs (or is paused) on this host.
    pub active: bool,
    /// A statistics snapshot, for an active VM not in [`MonitorQuery::skip_stats`].
    pub stats: Option<DomainStats>,
}

/// The host agent's operations over a hypervisor.
#[derive(Debug)]
pub struct Engine<H> {
    hv: H,
    host: HostId,
    files: VmFiles,
    capacity: Capacity,
    vms: BTreeMap<VmId, VmDescriptor>,
    shutdown_timeout: Duration,
    restore_as_saved_fallback: bool,
    /// The KPI root, when every domain shares its VM's KPI filesystem with the guest.
    kpi_share: Option<PathBuf>,
}

impl<H: Hypervisor> Engine<H> {
    /// Takes over the VMs found under the VM root: each directory with a descriptor is a VM of
    /// this host and commits its resources again; a directory without one is a reservation
    /// that never completed and is deleted.
    pub fn open(
        hv: H,
        host: HostId,
        files: VmFiles,
        total: Resources,
        shutdown_timeout: Duration,
    ) -> Result<Self, VmFilesError> {
        let mut engine = Self {
            hv,
            host,
            files,
            capacity: Capacity::new(total),
            vms: BTreeMap::new(),
            shutdown_timeout,
            restore_as_saved_fallback: false,
            kpi_share: None,
        };
        for found in engine.files.scan()? {
            match found {
                Found::Vm(vm, descriptor) => {
                    let span = tracing::info_span!("rediscover", vm.id = %vm);
                    let _enter = span.enter();
                    if let Err(e) = engine
                        .capacity
                        .try_commit(vm.as_str(), resources(&descriptor))
                    {
                        // The operator lowered the capacity below what the VMs already hold;
                        // they stay, and the host is simply full.
                        tracing::error!(error = %e, "vm found on disk exceeds the configured capacity");
                    }
                    let state = engine.status_state(&vm);
                    tracing::info!(state = ?state, version = descriptor.version, "vm rediscovered");
                    engine.vms.insert(vm, *descriptor);
                }
                Found::Incomplete(vm) => {
                    tracing::warn!(vm.id = %vm, "deleting an incomplete reservation");
                    engine.files.remove(&vm)?;
                }
                Found::Unreadable(vm, e) => {
                    tracing::error!(vm.id = %vm, error = %e, "vm directory left alone: descriptor unreadable");
                }
            }
        }
        Ok(engine)
    }

    /// The hypervisor.
    pub fn hypervisor(&self) -> &H {
        &self.hv
    }

    /// `capacity`
    pub fn capacity(&self) -> HostCapacity {
        HostCapacity {
            host: self.host.clone(),
            total: wire_resources(self.capacity.total()),
            committed: wire_resources(self.capacity.committed()),
            free: wire_resources(self.capacity.free()),
            vms: u32::try_from(self.vms.len()).unwrap_or(u32::MAX),
            at_ms: now_ms(),
        }
    }

    fn check_descriptor(vm: &VmId, d: &VmDescriptor) -> Result<(), OpError> {
        if &d.id != vm {
            return Err(OpError::WrongVm {
                expected: vm.clone(),
                found: d.id.clone(),
            });
        }
        d.validate().map_err(OpError::InvalidDescriptor)?;
        for disk in &d.hardware.disks {
            if vm_files::disk_file_name(disk).is_none() {
                return Err(OpError::UnsupportedFormat(disk.format.as_str().to_owned()));
            }
        }
        Ok(())
    }

    /// Adopts `new` for a VM held with an older descriptor: commits the new resources (or keeps
    /// the old ones and refuses) and stores it. Returns whether anything changed.
    fn adopt(&mut self, new: &VmDescriptor) -> Result<bool, OpError> {
        let Some(held) = self.vms.get(&new.id) else {
            return Err(OpError::UnknownVm(new.id.clone()));
        };
        if new.version < held.version {
            return Err(OpError::StaleDescriptor {
                offered: new.version,
                held: held.version,
            });
        }
        if new.version == held.version {
            return Ok(false);
        }
        let old = self.capacity.release(new.id.as_str());
        if let Err(e) = self.capacity.try_commit(new.id.as_str(), resources(new)) {
            if let Some(old) = old {
                // Put back what was released a moment ago; it fitted then, so it fits now.
                let _ = self.capacity.try_commit(new.id.as_str(), old.resources);
            }
            return Err(OpError::NoCapacity(e));
        }
        self.files.store_descriptor(new)?;
        self.vms.insert(new.id.clone(), new.clone());
        Ok(true)
    }

    /// `vm.reserve`
    pub fn reserve(&mut self, vm: &VmId, descriptor: &VmDescriptor) -> Result<VmReserved, OpError> {
        Self::check_descriptor(vm, descriptor)?;
        if self.vms.contains_key(vm) {
            self.adopt(descriptor)?;
        } else {
            self.capacity
                .try_commit(vm.as_str(), resources(descriptor))
                .map_err(OpError::NoCapacity)?;
            if let Err(e) = self.files.create(descriptor) {
                self.capacity.release(vm.as_str());
                let _ = self.files.remove(vm);
                return Err(e.into());
            }
            self.vms.insert(vm.clone(), descriptor.clone());
            tracing::info!("capacity reserved");
        }
        let held = self.held(vm)?;
        Ok(VmReserved {
            vm: vm.clone(),
            resources: HostResources::of(held),
            slots: self.files.slots(held),
        })
    }

    fn held(&self, vm: &VmId) -> Result<&VmDescriptor, OpError> {
        self.vms
            .get(vm)
            .ok_or_else(|| OpError::UnknownVm(vm.clone()))
    }

    /// The domain's state, `None` when no domain is defined, or when this host has not defined
    /// it: a domain with the VM's name then belongs to another host sharing the hypervisor
    /// (see [`vm_files::DOMAIN_MARKER`]).
    fn domain_state(&self, vm: &VmId) -> Result<Option<DmtfState>, OpError> {
        if !self.files.has_domain(vm) {
            return Ok(None);
        }
        match self.hv.state(vm.as_str()) {
            Ok(s) => Ok(Some(s)),
            Err(HypervisorError::UnknownDomain { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The state to report: a stopped domain with a saved state is suspended, whatever the
    /// hypervisor remembers about how it stopped.
    fn status_state(&self, vm: &VmId) -> Result<DmtfState, OpError> {
        let saved = self.files.state_file(vm).is_file();
        Ok(match self.domain_state(vm)? {
            Some(s) if s.is_active() => s,
            Some(_) | None if saved => DmtfState::Suspended,
            Some(s) => s,
            None => DmtfState::Disabled,
        })
    }

    fn status(&self, vm: &VmId) -> Result<HostVmStatus, OpError> {
        let held = self.held(vm)?;
        Ok(HostVmStatus {
            vm: vm.clone(),
            state: wire_state(self.status_state(vm)?),
            descriptor_version: held.version,
        })
    }

    /// The domain spec of a held VM, from its descriptor and the files in its directory. A
    /// blank raw disk is created when missing; every other file must have been received.
    fn spec(&self, vm: &VmId) -> Result<DomainSpec, OpError> {
        let d = self.held(vm)?;
        let hw = &d.hardware;
        let mut spec = DomainSpec::new(vm.as_str(), hw.vcpus, hw.memory_mib);
        spec.uuid = Some(vm_uuid(vm));
        for disk in &hw.disks {
            let name = vm_files::disk_file_name(disk)
                .ok_or_else(|| OpError::UnsupportedFormat(disk.format.as_str().to_owned()))?;
            let path = self.files.path(vm, &name);
            let format = match disk.format {
                nubis_protocol::descriptor::DiskFormat::Qcow2 => DiskFormat::Qcow2,
                _ => DiskFormat::Raw,
            };
            if !path.is_file() {
                if disk.image.is_none() && format == DiskFormat::Raw {
                    VmFiles::create_blank_raw(&path, disk.capacity_bytes)?;
                } else {
                    return Err(OpError::MissingFile(name));
                }
            }
            spec.disks.push(DiskSpec {
                path,
                format,
                target: disk.name.clone(),
                capacity_bytes: disk.capacity_bytes,
                read_only: false,
            });
        }
        for (i, _) in hw.networks.iter().enumerate() {
            spec.interfaces.push(InterfaceSpec::User {
                mac: Some(vm_mac(vm, i)),
            });
        }
        if let Some(boot) = &hw.boot {
            let kernel = self.required(vm, vm_files::KERNEL_FILE)?;
            let initrd = match boot.initrd {
                Some(_) => Some(self.required(vm, vm_files::INITRD_FILE)?),
                None => None,
            };
            spec.kernel_boot = Some(KernelBoot {
                kernel,
                initrd,
                cmdline: boot.cmdline.clone(),
            });
        }
        spec.serial_log = Some(self.files.path(vm, vm_files::CONSOLE_FILE));
        // Every domain gets the share whatever its monitoring specifiers say, so the device set
        // never changes with a descriptor update: a saved state restores only into a domain
        // with the same devices.
        if let Some(root) = &self.kpi_share {
            spec.filesystems
                .push(FilesystemShare::kpi(root, vm.as_str()));
        }
        Ok(spec)
    }

    fn required(&self, vm: &VmId, name: &str) -> Result<PathBuf, OpError> {
        let p = self.files.path(vm, name);
        if p.is_file() {
            Ok(p)
        } else {
            Err(OpError::MissingFile(name.to_owned()))
        }
    }

    /// Undefines this host's (stopped) domain of `vm`, if it has one, and drops the marker.
    fn undefine_domain(&mut self, vm: &VmId) -> Result<(), OpError> {
        if self.domain_state(vm)?.is_some() {
            match self.hv.undefine(vm.as_str()) {
                Ok(()) | Err(HypervisorError::UnknownDomain { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.files.clear_domain(vm)?;
        Ok(())
    }

    /// Runs a held VM: nothing if it runs; restored from its saved state if there is one (the
    /// state file is consumed, so it can never be restored twice); otherwise (re)defined from
    /// its descriptor and started.
    fn run(&mut self, vm: &VmId) -> Result<HostVmStatus, OpError> {
        let current = self.domain_state(vm)?;
        if current.is_some_and(DmtfState::is_active) {
            return self.status(vm);
        }
        let spec = self.spec(vm)?;
        // The hypervisor opens a shared directory when the guest starts or is restored, so the
        // KPI export must exist first; the monitor binds the KPI filesystem on it once mounted.
        for fs in &spec.filesystems {
            if fs.tag == crate::spec::KPI_SHARE_TAG {
                nubis_kpifs::prepare_export(&fs.source).map_err(OpError::KpiShare)?;
            }
        }
        let state_file = self.files.state_file(vm);
        if state_file.is_file() {
            // Saved on this host, the domain is still defined with the definition the state
            // holds, so it is restored as saved. Saved elsewhere (received from another host),
            // it is restored with this host's definition: same UUID and hardware, local paths.
            let definition = if current.is_some() { None } else { Some(&spec) };
            self.files.mark_domain(vm)?;
            match self.hv.restore(&state_file, definition) {
                Err(e) if definition.is_some() && self.restore_as_saved_fallback => {
                    tracing::info!(error = %e, "rewritten definition refused; restoring as saved");
                    self.hv.restore(&state_file, None)?;
                }
                other => {
                    other?;
                }
            }
            VmFiles::remove_file(&state_file)?;
            tracing::info!("vm restored from its saved state");
        } else {
            if current.is_some() {
                // Redefine, so the domain always matches the newest descriptor.
                self.hv.undefine(vm.as_str())?;
            }
            self.files.mark_domain(vm)?;
            self.hv.define(&spec)?;
            self.hv.start(vm.as_str())?;
            tracing::info!("vm started");
        }
        self.status(vm)
    }

    /// Lets a state received from another host be restored with the definition it was saved
    /// with when the hypervisor refuses a rewritten one. Only for libvirt's test driver, which
    /// refuses rewritten definitions and touches no files: on a real hypervisor the saved
    /// definition names the source host's disk paths, which must never be used here.
    pub fn with_restore_as_saved_fallback(mut self, enabled: bool) -> Self {
        self.restore_as_saved_fallback = enabled;
        self
    }

    /// Shares each VM's KPI filesystem with its guest through a virtio-9p share tagged
    /// [`KPI_SHARE_TAG`](crate::spec::KPI_SHARE_TAG) of `<kpi_root>/<vm>.share`; `None` shares
    /// nothing.
    pub fn with_kpi_share(mut self, kpi_root: Option<PathBuf>) -> Self {
        self.kpi_share = kpi_root;
        self
    }

    /// Saves the domain of `vm` to its state file. QEMU refuses while the guest holds a 9p share
    /// mounted; a KPI writer holds it only for a moment, so the save is tried again for
    /// [`KPI_SHARE_SAVE_WAIT`] before the refusal is reported as [`OpError::KpiShareMounted`].
    fn save(&self, vm: &VmId) -> Result<(), OpError> {
        let state_file = self.files.state_file(vm);
        let deadline = std::time::Instant::now() + KPI_SHARE_SAVE_WAIT;
        loop {
            match self.hv.save(vm.as_str(), &state_file) {
                Err(e) if self.kpi_share.is_some() && blocked_by_share(&e) => {
                    if std::time::Instant::now() >= deadline {
                        return Err(OpError::KpiShareMounted(e));
                    }
                    tracing::debug!(error = %e, "save refused; the guest may hold its kpi share");
                    std::thread::sleep(KPI_SHARE_SAVE_RETRY);
                }
                other => return other.map_err(OpError::from),
            }
        }
    }

    /// `vm.activate`
    pub fn activate(
        &mut self,
        vm: &VmId,
        descriptor: &VmDescriptor,
    ) -> Result<HostVmStatus, OpError> {
        Self::check_descriptor(vm, descriptor)?;
        self.adopt(descriptor)?;
        self.run(vm)
    }

    /// `vm.resume`
    pub fn resume_after_abort(&mut self, vm: &VmId) -> Result<HostVmStatus, OpError> {
        self.held(vm)?;
        self.run(vm)
    }

    /// `vm.prepare`
    pub fn prepare(&mut self, vm: &VmId, mode: PrepareMode) -> Result<VmPrepared, OpError> {
        self.held(vm)?;
        if self.domain_state(vm)?.is_some_and(DmtfState::is_active) {
            match mode {
                PrepareMode::SaveState => {
                    self.save(vm)?;
                    tracing::info!("vm saved for transfer");
                }
                PrepareMode::Shutdown => {
                    let outcome = self.hv.shutdown(vm.as_str(), self.shutdown_timeout)?;
                    tracing::info!(?outcome, "vm shut down for transfer");
                }
            }
        }
        // A prepared VM is only its files: the saved state carries its definition, and wherever
        // it runs next (here after an abort, or at the destination) the definition is made
        // again with that host's paths. Undefining frees its name and UUID, which the
        // destination takes over even when it shares this hypervisor.
        self.undefine_domain(vm)?;
        let held = self.held(vm)?;
        Ok(VmPrepared {
            vm: vm.clone(),
            state: wire_state(self.status_state(vm)?),
            files: self.files.existing(held)?,
        })
    }

    /// `vm.release`
    pub fn release(&mut self, vm: &VmId) -> Result<VmReleased, OpError> {
        if !self.vms.contains_key(vm) {
            return Ok(VmReleased {
                vm: vm.clone(),
                was_present: false,
                freed: HostResources::default(),
            });
        }
        if self.domain_state(vm)?.is_some_and(DmtfState::is_active) {
            match self.hv.destroy(vm.as_str()) {
                Ok(()) | Err(HypervisorError::UnknownDomain { .. }) => {}
                // It stopped on its own in between.
                Err(HypervisorError::InvalidState { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.undefine_domain(vm)?;
        self.files.remove(vm)?;
        let freed = self
            .capacity
            .release(vm.as_str())
            .map(|r| wire_resources(r.resources))
            .unwrap_or_default();
        self.vms.remove(vm);
        tracing::info!("vm released");
        Ok(VmReleased {
            vm: vm.clone(),
            was_present: true,
            freed,
        })
    }

    /// `vm.control`
    pub fn control(
        &mut self,
        vm: &VmId,
        transition: StateTransition,
    ) -> Result<HostVmStatus, OpError> {
        self.held(vm)?;
        if !self.files.has_domain(vm)
            && !matches!(
                transition,
                StateTransition::Start | StateTransition::Shutdown | StateTransition::PowerOff
            )
        {
            return Err(OpError::NoDomain);
        }
        let state = self.status_state(vm)?;
        let name = vm.as_str();
        match transition {
            StateTransition::Start => return self.run(vm),
            StateTransition::Shutdown => {
                if state.is_active() {
                    let outcome = self.hv.shutdown(name, self.shutdown_timeout)?;
                    tracing::info!(?outcome, "vm shut down");
                }
            }
            StateTransition::PowerOff => {
                if state.is_active() {
                    self.hv.destroy(name)?;
                }
            }
            StateTransition::Pause => {
                if state != DmtfState::Paused {
                    self.hv.suspend(name)?;
                }
            }
            StateTransition::Resume => {
                if state != DmtfState::Enabled {
                    self.hv.resume(name)?;
                }
            }
            StateTransition::Suspend => {
                if state != DmtfState::Suspended {
                    self.save(vm)?;
                }
            }
            StateTransition::Reboot => self.hv.reboot(name)?,
            StateTransition::Reset => self.hv.reset(name)?,
        }
        tracing::info!(?transition, "state changed");
        self.status(vm)
    }

    /// `vm.update`
    pub fn update(&mut self, vm: &VmId, descriptor: &VmDescriptor) -> Result<VmUpdated, OpError> {
        Self::check_descriptor(vm, descriptor)?;
        let old = self.held(vm)?.clone();
        let changed = self.adopt(descriptor)?;
        let mut restart_needed = false;
        if changed {
            let state = self.domain_state(vm)?;
            let mut others_old = old.hardware.clone();
            let mut others_new = descriptor.hardware.clone();
            others_old.memory_mib = 0;
            others_new.memory_mib = 0;
            match state {
                Some(s) if s.is_active() => {
                    restart_needed = others_old != others_new;
                    let memory = descriptor.hardware.memory_mib;
                    if memory != old.hardware.memory_mib {
                        let max_kib = self.hv.stats(vm.as_str())?.memory.maximum_kib;
                        if memory.saturating_mul(1024) <= max_kib {
                            self.hv.set_memory(vm.as_str(), memory)?;
                            tracing::info!(memory_mib = memory, "memory changed on the running vm");
                        } else {
                            restart_needed = true;
                        }
                    }
                }
                Some(_) => {
                    // Stopped: redefine now, unless a saved state waits to be restored with the
                    // definition it was saved with (then the change applies at its next boot).
                    if self.files.state_file(vm).is_file() {
                        restart_needed = true;
                    } else {
                        let spec = self.spec(vm)?;
                        self.hv.undefine(vm.as_str())?;
                        self.hv.define(&spec)?;
                    }
                }
                None => {}
            }
            tracing::info!(
                version = descriptor.version,
                restart_needed,
                "descriptor updated"
            );
        }
        let status = self.status(vm)?;
        Ok(VmUpdated {
            vm: vm.clone(),
            state: status.state,
            descriptor_version: status.descriptor_version,
            restart_needed,
        })
    }

    /// `vm.state`
    pub fn state(&self, vm: &VmId) -> Result<HostVmStatus, OpError> {
        self.status(vm)
    }

    /// The VMs held by this host for the monitor: every held VM, whether its domain is active,
    /// and the statistics the query asks for. One hypervisor listing for all states; a VM whose
    /// statistics cannot be read is reported without them.
    pub fn monitored(&self, query: &MonitorQuery) -> Result<Vec<MonitoredVm>, HypervisorError> {
        let states: HashMap<String, DmtfState> = self
            .hv
            .list()?
            .into_iter()
            .map(|d| (d.handle.name, d.state))
            .collect();
        let mut out = Vec::with_capacity(self.vms.len());
        for (vm, d) in &self.vms {
            let active =
                self.files.has_domain(vm) && states.get(vm.as_str()).is_some_and(|s| s.is_active());
            let stats = if active && !query.skip_stats.contains(vm) {
                match self.hv.stats(vm.as_str()) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        tracing::debug!(vm.id = %vm, error = %e, "no statistics for the monitor");
                        None
                    }
                }
            } else {
                None
            };
            let descriptor = match query.known.get(vm) {
                Some(v) if *v == d.version => None,
                _ => Some(d.clone()),
            };
            out.push(MonitoredVm {
                vm: vm.clone(),
                version: d.version,
                descriptor,
                active,
                stats,
            });
        }
        Ok(out)
    }

    /// `vm.list`
    pub fn list(&self) -> Result<HostVms, OpError> {
        let mut vms = Vec::with_capacity(self.vms.len());
        for (vm, d) in &self.vms {
            vms.push(HostVmEntry {
                vm: vm.clone(),
                state: wire_state(self.status_state(vm)?),
                descriptor_version: d.version,
                resources: HostResources::of(d),
            });
        }
        Ok(HostVms {
            host: self.host.clone(),
            vms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_and_macs_are_stable_and_well_formed() {
        let vm = VmId::new("vm-1").unwrap();
        let u = vm_uuid(&vm);
        assert!(crate::spec::is_uuid(&u), "{u}");
        assert_eq!(u, vm_uuid(&vm));
        assert_ne!(u, vm_uuid(&VmId::new("vm-2").unwrap()));
        assert_eq!(&u[14..15], "8");
        let m = vm_mac(&vm, 0);
        assert!(m.starts_with("52:54:00:") && m.len() == 17, "{m}");
        assert_ne!(m, vm_mac(&vm, 1));
    }

    #[test]
    fn wire_states_map_by_cim_value() {
        for s in [
            DmtfState::Unknown,
            DmtfState::Enabled,
            DmtfState::Disabled,
            DmtfState::ShuttingDown,
            DmtfState::Suspended,
            DmtfState::Paused,
            DmtfState::Starting,
        ] {
            assert_eq!(wire_state(s).cim_enabled_state(), Some(s.cim_value()));
        }
    }
}
