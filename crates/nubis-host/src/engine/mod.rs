//! The host agent's operations, run one at a time by the owner of the hypervisor connection:
//! capacity accounting, the VMs the host holds, their directories and their domains.
//!
//! Every operation is idempotent, because the site retries after its own crashes: reserving a
//! reserved VM returns the same slots, activating a running VM reports its state, releasing an
//! unknown VM succeeds. The [`Engine`] is synchronous; the agent runs it on a thread of its own,
//! and the steps that take seconds (a save, a graceful shutdown) run off that thread (the `waits`
//! module). An operation that may take such a step ([`Engine::prepare`], [`Engine::control`])
//! reports its result to a callback instead of returning it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nubis_protocol::descriptor::VmDescriptor;
use nubis_protocol::envelope::now_ms;
use nubis_protocol::message::{
    HostCapacity, HostId, HostResources, HostVmEntry, HostVmStatus, HostVms, PrepareMode,
    StateTransition, VmPrepared, VmReleased, VmReserved, VmUpdated,
};
use nubis_protocol::VmId;

use crate::capacity::{Capacity, Resources};
use crate::dmtf::DmtfState;
use crate::hypervisor::{Hypervisor, HypervisorError};
use crate::vm_files::{self, Found, VmFiles, VmFilesError};

mod domain;
mod error;
mod identity;
mod monitored;
mod waits;

pub use error::OpError;
pub use identity::{vm_mac, vm_uuid};
pub use monitored::{MonitorQuery, MonitoredVm};
use waits::{LongWait, Waited, Waits};
pub use waits::{WaitOver, KPI_SHARE_SAVE_WAIT};

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

/// Where a state change stands after its first step.
enum ControlStep {
    /// Done, in this state.
    Done(HostVmStatus),
    /// It needs this long wait first.
    Wait(LongWait),
}

/// The host agent's operations over a hypervisor.
#[derive(Debug)]
pub struct Engine<H> {
    /// Shared with the threads of long waits (the `waits` module).
    hv: Arc<H>,
    host: HostId,
    files: VmFiles,
    capacity: Capacity,
    vms: BTreeMap<VmId, VmDescriptor>,
    shutdown_timeout: Duration,
    restore_as_saved_fallback: bool,
    /// The KPI root, when every domain shares its VM's KPI filesystem with the guest.
    kpi_share: Option<PathBuf>,
    waits: Waits<H>,
}

impl<H: Hypervisor + 'static> Engine<H> {
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
            hv: Arc::new(hv),
            host,
            files,
            capacity: Capacity::new(total),
            vms: BTreeMap::new(),
            shutdown_timeout,
            restore_as_saved_fallback: false,
            kpi_share: None,
            waits: Waits::default(),
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

    /// Runs again every held VM that should run here ([`RUN_MARKER`](crate::vm_files::RUN_MARKER))
    /// and does not: the host (or, with libvirt's test driver, the agent, which holds the
    /// driver's state) went down under it. A VM prepared for a transfer never has the marker,
    /// so it is never started behind its migration's back.
    pub fn restart_interrupted(&mut self) {
        let vms: Vec<VmId> = self
            .vms
            .keys()
            .filter(|vm| self.files.should_run(vm))
            .cloned()
            .collect();
        for vm in vms {
            let span = tracing::info_span!("rediscover", vm.id = %vm);
            let _enter = span.enter();
            match self.domain_state(&vm) {
                Ok(Some(s)) if s.is_active() => continue,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the state of a vm that should run");
                    continue;
                }
            }
            match self.run(&vm) {
                Ok(_) => tracing::warn!("vm was down though it should run here; started again"),
                Err(e) => tracing::error!(error = %e, "vm that should run here cannot be started"),
            }
        }
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
            state: self.status_state(vm)?,
            descriptor_version: held.version,
        })
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
        self.files.mark_running(vm)?;
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

    /// `vm.prepare`: saves or shuts down the VM ([`PrepareMode`]), then leaves only its files.
    /// The save or shutdown is a long wait (the `waits` module), so the result goes to `done`.
    pub fn prepare(
        &mut self,
        vm: &VmId,
        mode: PrepareMode,
        done: impl FnOnce(Result<VmPrepared, OpError>) + Send + 'static,
    ) {
        let active = match self.held(vm).and_then(|_| self.domain_state(vm)) {
            Ok(state) => state.is_some_and(DmtfState::is_active),
            Err(e) => return done(Err(e)),
        };
        // From here on the VM is the migration's: an agent restarted in between must not start
        // it again (only `vm.resume` after an abort does).
        if let Err(e) = self.files.clear_running(vm) {
            return done(Err(e.into()));
        }
        if !active {
            return done(self.finish_prepare(vm));
        }
        let wait = match mode {
            PrepareMode::SaveState => self.save_wait(vm),
            PrepareMode::Shutdown => LongWait::Shutdown {
                timeout: self.shutdown_timeout,
            },
        };
        let owned = vm.clone();
        self.wait_then(vm, wait, move |engine, waited| {
            done(waited.and_then(|waited| {
                match waited {
                    Waited::Saved => tracing::info!("vm saved for transfer"),
                    Waited::ShutDown(outcome) => {
                        tracing::info!(?outcome, "vm shut down for transfer");
                    }
                }
                engine.finish_prepare(&owned)
            }));
        });
    }

    /// The end of `vm.prepare`, once the VM does not run.
    fn finish_prepare(&mut self, vm: &VmId) -> Result<VmPrepared, OpError> {
        // A prepared VM is only its files: the saved state carries its definition, and wherever
        // it runs next (here after an abort, or at the destination) the definition is made
        // again with that host's paths. Undefining frees its name and UUID, which the
        // destination takes over even when it shares this hypervisor.
        self.undefine_domain(vm)?;
        let held = self.held(vm)?;
        Ok(VmPrepared {
            vm: vm.clone(),
            state: self.status_state(vm)?,
            files: self.files.existing(held)?,
        })
    }

    /// Saving the domain of `vm` to its state file. QEMU refuses while the guest holds a 9p share
    /// mounted; a KPI writer holds it only for a moment, so with a KPI share the save is tried
    /// again for [`KPI_SHARE_SAVE_WAIT`] before the refusal is reported as
    /// [`OpError::KpiShareMounted`].
    fn save_wait(&self, vm: &VmId) -> LongWait {
        LongWait::Save {
            state_file: self.files.state_file(vm),
            retry_on_share: self.kpi_share.is_some(),
        }
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

    /// `vm.control`. A graceful shutdown or a suspend (a save) is a long wait (the `waits`
    /// module), so the result goes to `done`.
    pub fn control(
        &mut self,
        vm: &VmId,
        transition: StateTransition,
        done: impl FnOnce(Result<HostVmStatus, OpError>) + Send + 'static,
    ) {
        let wait = match self.start_control(vm, transition) {
            Ok(ControlStep::Done(status)) => return done(Ok(status)),
            Ok(ControlStep::Wait(wait)) => wait,
            Err(e) => return done(Err(e)),
        };
        let owned = vm.clone();
        self.wait_then(vm, wait, move |engine, waited| {
            done(waited.and_then(|waited| {
                if let Waited::ShutDown(outcome) = waited {
                    tracing::info!(?outcome, "vm shut down");
                }
                tracing::info!(?transition, "state changed");
                engine.status(&owned)
            }));
        });
    }

    /// Makes a state change, or says which long wait it takes.
    fn start_control(
        &mut self,
        vm: &VmId,
        transition: StateTransition,
    ) -> Result<ControlStep, OpError> {
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
        if matches!(
            transition,
            StateTransition::Shutdown | StateTransition::PowerOff | StateTransition::Suspend
        ) {
            // Stopped on purpose: not to be started again by a restarted agent.
            self.files.clear_running(vm)?;
        }
        match transition {
            StateTransition::Start => return self.run(vm).map(ControlStep::Done),
            StateTransition::Shutdown => {
                if state.is_active() {
                    return Ok(ControlStep::Wait(LongWait::Shutdown {
                        timeout: self.shutdown_timeout,
                    }));
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
                    return Ok(ControlStep::Wait(self.save_wait(vm)));
                }
            }
            StateTransition::Reboot => self.hv.reboot(name)?,
            StateTransition::Reset => self.hv.reset(name)?,
        }
        tracing::info!(?transition, "state changed");
        self.status(vm).map(ControlStep::Done)
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

    /// `vm.list`
    pub fn list(&self) -> Result<HostVms, OpError> {
        let mut vms = Vec::with_capacity(self.vms.len());
        for (vm, d) in &self.vms {
            vms.push(HostVmEntry {
                vm: vm.clone(),
                state: self.status_state(vm)?,
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
mod tests;
