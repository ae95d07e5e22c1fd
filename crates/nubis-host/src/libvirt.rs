//! [`Hypervisor`] over libvirt, through the `virt` crate.
//!
//! One connection is shared by all calls (libvirt connections are thread-safe) and reopened when
//! it breaks, for instance when libvirtd restarts: the call that meets the broken connection
//! fails with [`HypervisorError::ConnectionLost`] (read-only calls are retried once on a fresh
//! connection), and the next call reconnects. Domains keep running across a libvirtd restart,
//! and are found again by name.

use std::ffi::CString;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::{Error as VirtError, ErrorDomain, ErrorNumber};
use virt::sys;

use crate::dmtf::{self, DmtfState};
use crate::domain_xml::{domain_xml, parse_domain_xml, Accelerator};
use crate::hypervisor::{
    BackendError, DiskCounters, DomainHandle, DomainStats, DomainSummary, HostInfo, Hypervisor,
    HypervisorError, InterfaceCounters, MemoryStats, ShutdownOutcome,
};
use crate::spec::{DomainSpec, SpecError};

/// How often a graceful shutdown checks whether the guest has powered off.
const SHUTDOWN_POLL: Duration = Duration::from_millis(100);

/// Where and how to reach libvirt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibvirtConfig {
    /// Connection URI: `qemu:///system`, or `test:///default` for libvirt's test driver.
    pub uri: String,
    /// Software emulation or KVM.
    pub accelerator: Accelerator,
}

impl LibvirtConfig {
    /// A configuration for `uri` with software emulation.
    pub fn new(uri: impl Into<String>) -> Self {
        Self {
            uri: uri.into(),
            accelerator: Accelerator::Tcg,
        }
    }
}

/// The libvirt implementation of [`Hypervisor`].
#[derive(Debug)]
pub struct LibvirtHypervisor {
    config: LibvirtConfig,
    conn: Mutex<Option<Connect>>,
}

fn backend(e: &VirtError) -> BackendError {
    BackendError {
        message: e.message().to_string(),
    }
}

fn code_is(e: &VirtError, n: ErrorNumber) -> bool {
    e.code().is(n)
}

/// Errors that mean the connection itself is gone, whatever the domain.
fn is_connection_error(e: &VirtError) -> bool {
    code_is(e, ErrorNumber::NoConnect)
        || code_is(e, ErrorNumber::InvalidConn)
        || (e.domain().is(ErrorDomain::Rpc)
            && (code_is(e, ErrorNumber::SystemError)
                || code_is(e, ErrorNumber::InternalError)
                || code_is(e, ErrorNumber::Rpc)))
}

fn non_negative(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Saves the domain's memory state to `path` and stops it; `virt` 0.5 has no safe wrapper for
/// `virDomainSave`.
#[allow(unsafe_code)]
fn save_domain(dom: &Domain, path: &str) -> Result<(), VirtError> {
    let c_path = CString::new(path)?;
    // SAFETY: `dom` owns a counted reference to a live virDomain for the whole call, so the
    // pointer from `as_ptr` is valid until `dom` is dropped, after this call; `c_path` is a
    // NUL-terminated string that outlives the call, and libvirt keeps neither pointer.
    let ret = unsafe { sys::virDomainSave(dom.as_ptr(), c_path.as_ptr()) };
    if ret < 0 {
        return Err(VirtError::last_error());
    }
    Ok(())
}

impl LibvirtHypervisor {
    /// Opens the connection. Fails if libvirt cannot be reached now; later losses are repaired
    /// by reconnecting.
    pub fn connect(config: LibvirtConfig) -> Result<Self, HypervisorError> {
        // libvirt prints every error to stderr by default; errors are returned instead.
        virt::error::clear_error_callback();
        let hv = Self {
            config,
            conn: Mutex::new(None),
        };
        hv.conn()?;
        Ok(hv)
    }

    /// The connection URI.
    pub fn uri(&self) -> &str {
        &self.config.uri
    }

    fn slot(&self) -> MutexGuard<'_, Option<Connect>> {
        // A panic while holding the lock cannot leave the Option inconsistent.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The live connection, reopened if it was lost.
    fn conn(&self) -> Result<Connect, HypervisorError> {
        let mut slot = self.slot();
        if let Some(c) = slot.as_ref() {
            if c.is_alive().unwrap_or(false) {
                return Ok(c.clone());
            }
            tracing::warn!(uri = %self.config.uri, "libvirt connection lost, reconnecting");
            *slot = None;
        }
        let c = Connect::open(Some(&self.config.uri)).map_err(|e| HypervisorError::Connect {
            uri: self.config.uri.clone(),
            source: backend(&e),
        })?;
        tracing::info!(uri = %self.config.uri, "connected to libvirt");
        *slot = Some(c.clone());
        Ok(c)
    }

    fn forget_conn(&self) {
        *self.slot() = None;
    }

    /// Whether `e` (met on `conn`) means the connection is gone; if so, it is dropped.
    fn lost(&self, conn: &Connect, e: &VirtError) -> bool {
        if is_connection_error(e) || !conn.is_alive().unwrap_or(false) {
            self.forget_conn();
            true
        } else {
            false
        }
    }

    /// Turns a libvirt error of `operation` on domain `name` into a [`HypervisorError`].
    fn classify(
        &self,
        conn: &Connect,
        e: VirtError,
        operation: &'static str,
        name: &str,
    ) -> HypervisorError {
        if self.lost(conn, &e) {
            return HypervisorError::ConnectionLost {
                uri: self.config.uri.clone(),
                source: backend(&e),
            };
        }
        if code_is(&e, ErrorNumber::NoDomain) {
            return HypervisorError::UnknownDomain { name: name.into() };
        }
        if code_is(&e, ErrorNumber::OperationInvalid) {
            let state = conn
                .lookup_domain_by_name(name)
                .ok()
                .and_then(|d| d.state().ok())
                .map(|(s, r)| dmtf::from_libvirt(s, r))
                .unwrap_or(DmtfState::Unknown);
            return HypervisorError::InvalidState {
                name: name.into(),
                operation,
                state,
            };
        }
        if code_is(&e, ErrorNumber::NoSupport) {
            return HypervisorError::Unsupported { operation };
        }
        HypervisorError::Operation {
            operation,
            name: name.into(),
            source: backend(&e),
        }
    }

    fn lookup(
        &self,
        conn: &Connect,
        name: &str,
        operation: &'static str,
    ) -> Result<Domain, HypervisorError> {
        conn.lookup_domain_by_name(name)
            .map_err(|e| self.classify(conn, e, operation, name))
    }

    /// Runs a read-only call, once more on a fresh connection if the first one was lost.
    fn read<T>(
        &self,
        f: impl Fn(&Connect) -> Result<T, HypervisorError>,
    ) -> Result<T, HypervisorError> {
        let conn = self.conn()?;
        match f(&conn) {
            Err(HypervisorError::ConnectionLost { .. }) => {
                let conn = self.conn()?;
                f(&conn)
            }
            other => other,
        }
    }

    /// Runs `op` on the domain `name`. `applies` says in which states the operation makes
    /// sense: when `op` fails in any other state, the failure is reported as
    /// [`HypervisorError::InvalidState`], whatever code the driver used for it.
    fn on_domain<T>(
        &self,
        name: &str,
        operation: &'static str,
        applies: fn(DmtfState) -> bool,
        op: impl FnOnce(&Domain) -> Result<T, VirtError>,
    ) -> Result<T, HypervisorError> {
        let conn = self.conn()?;
        let dom = self.lookup(&conn, name, operation)?;
        match op(&dom) {
            Ok(out) => {
                tracing::debug!(vm.id = %name, operation, "done");
                Ok(out)
            }
            Err(e) => {
                if !self.lost(&conn, &e) {
                    if let Ok((s, r)) = dom.state() {
                        let state = dmtf::from_libvirt(s, r);
                        if !applies(state) {
                            return Err(HypervisorError::InvalidState {
                                name: name.into(),
                                operation,
                                state,
                            });
                        }
                        // The state was right, so the refusal has another reason (for
                        // instance QEMU refuses to save while a 9p share is mounted).
                        if code_is(&e, ErrorNumber::OperationInvalid) {
                            return Err(HypervisorError::Operation {
                                operation,
                                name: name.into(),
                                source: backend(&e),
                            });
                        }
                    }
                }
                Err(self.classify(&conn, e, operation, name))
            }
        }
    }

    fn handle(
        &self,
        conn: &Connect,
        dom: &Domain,
        name: &str,
    ) -> Result<DomainHandle, HypervisorError> {
        let uuid = dom
            .uuid_string()
            .map_err(|e| self.classify(conn, e, "read uuid", name))?;
        Ok(DomainHandle {
            name: name.to_string(),
            uuid,
        })
    }

    fn is_active(dom: &Domain) -> bool {
        // A transient domain disappears when it stops; that counts as not active.
        dom.is_active().unwrap_or(false)
    }
}

impl Hypervisor for LibvirtHypervisor {
    fn define(&self, spec: &DomainSpec) -> Result<DomainHandle, HypervisorError> {
        let xml = domain_xml(spec, self.config.accelerator)?;
        let conn = self.conn()?;
        match conn.lookup_domain_by_name(&spec.name) {
            Ok(_) => {
                return Err(HypervisorError::AlreadyDefined {
                    name: spec.name.clone(),
                })
            }
            Err(e) if code_is(&e, ErrorNumber::NoDomain) => {}
            Err(e) => return Err(self.classify(&conn, e, "define", &spec.name)),
        }
        let dom = match conn.define_domain_xml(&xml) {
            Ok(dom) => dom,
            Err(e) => {
                // Someone else defined the same name in between.
                if conn.lookup_domain_by_name(&spec.name).is_ok() {
                    return Err(HypervisorError::AlreadyDefined {
                        name: spec.name.clone(),
                    });
                }
                return Err(self.classify(&conn, e, "define", &spec.name));
            }
        };
        tracing::info!(vm.id = %spec.name, "domain defined");
        self.handle(&conn, &dom, &spec.name)
    }

    fn start(&self, name: &str) -> Result<(), HypervisorError> {
        self.on_domain(
            name,
            "start",
            |s| matches!(s, DmtfState::Disabled | DmtfState::Suspended),
            |d| d.create().map(|_| ()),
        )
    }

    fn shutdown(&self, name: &str, timeout: Duration) -> Result<ShutdownOutcome, HypervisorError> {
        let conn = self.conn()?;
        let dom = self.lookup(&conn, name, "shut down")?;
        if !Self::is_active(&dom) {
            return Ok(ShutdownOutcome::AlreadyOff);
        }
        if let Err(e) = dom.shutdown() {
            if self.lost(&conn, &e) {
                return Err(self.classify(&conn, e, "shut down", name));
            }
            if !Self::is_active(&dom) {
                return Ok(ShutdownOutcome::Graceful);
            }
            tracing::info!(vm.id = %name, error = %e.message(), "guest refused graceful shutdown");
        } else {
            let deadline = Instant::now() + timeout;
            loop {
                if !Self::is_active(&dom) {
                    tracing::info!(vm.id = %name, "domain shut down");
                    return Ok(ShutdownOutcome::Graceful);
                }
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                std::thread::sleep(SHUTDOWN_POLL.min(deadline - now));
            }
            tracing::warn!(vm.id = %name, ?timeout, "guest did not power off in time, destroying");
        }
        match dom.destroy() {
            Ok(()) => Ok(ShutdownOutcome::Forced),
            // It powered off between the last check and the destroy.
            Err(_) if !Self::is_active(&dom) => Ok(ShutdownOutcome::Graceful),
            Err(e) => Err(self.classify(&conn, e, "destroy", name)),
        }
    }

    fn destroy(&self, name: &str) -> Result<(), HypervisorError> {
        self.on_domain(name, "destroy", DmtfState::is_active, Domain::destroy)
    }

    fn suspend(&self, name: &str) -> Result<(), HypervisorError> {
        self.on_domain(
            name,
            "suspend",
            |s| s == DmtfState::Enabled,
            |d| d.suspend().map(|_| ()),
        )
    }

    fn resume(&self, name: &str) -> Result<(), HypervisorError> {
        self.on_domain(
            name,
            "resume",
            |s| s == DmtfState::Paused,
            |d| d.resume().map(|_| ()),
        )
    }

    fn reset(&self, name: &str) -> Result<(), HypervisorError> {
        self.on_domain(name, "reset", DmtfState::is_active, Domain::reset)
    }

    fn reboot(&self, name: &str) -> Result<(), HypervisorError> {
        self.on_domain(
            name,
            "reboot",
            |s| s == DmtfState::Enabled,
            |d| d.reboot(sys::VIR_DOMAIN_REBOOT_DEFAULT),
        )
    }

    fn set_memory(&self, name: &str, memory_mib: u64) -> Result<(), HypervisorError> {
        // `Domain::set_memory` of virt 0.5 drops libvirt's error, so the flags variant is used.
        self.on_domain(name, "set memory", DmtfState::is_active, |d| {
            d.set_memory_flags(memory_mib.saturating_mul(1024), sys::VIR_DOMAIN_MEM_LIVE)
        })
    }

    fn save(&self, name: &str, state_file: &Path) -> Result<(), HypervisorError> {
        let path = state_file
            .to_str()
            .ok_or_else(|| SpecError::Path(state_file.to_path_buf()))?;
        self.on_domain(
            name,
            "save",
            |s| matches!(s, DmtfState::Enabled | DmtfState::Paused),
            |d| save_domain(d, path),
        )?;
        tracing::info!(vm.id = %name, state_file = %path, "domain saved");
        Ok(())
    }

    fn restore(
        &self,
        state_file: &Path,
        spec: Option<&DomainSpec>,
    ) -> Result<DomainHandle, HypervisorError> {
        let path = state_file
            .to_str()
            .ok_or_else(|| SpecError::Path(state_file.to_path_buf()))?;
        if !state_file.is_file() {
            return Err(HypervisorError::StateFileMissing {
                path: state_file.to_path_buf(),
            });
        }
        let dxml = spec
            .map(|s| domain_xml(s, self.config.accelerator))
            .transpose()?;
        let conn = self.conn()?;
        // Reading the definition embedded in the file checks its header before anything runs.
        let image_xml = match conn.save_image_xml_desc(path, 0) {
            Ok(xml) => xml,
            Err(e) if self.lost(&conn, &e) => {
                return Err(HypervisorError::ConnectionLost {
                    uri: self.config.uri.clone(),
                    source: backend(&e),
                })
            }
            Err(e) => {
                return Err(HypervisorError::CorruptStateFile {
                    path: state_file.to_path_buf(),
                    source: backend(&e),
                })
            }
        };
        let name = match spec {
            Some(s) => s.name.clone(),
            None => parse_domain_xml(&image_xml)?.name,
        };
        let restored = match dxml.as_deref() {
            None => conn.restore_domain(path),
            Some(x) => conn.restore_domain_flags(path, Some(x), 0),
        };
        if let Err(e) = restored {
            if self.lost(&conn, &e) {
                return Err(HypervisorError::ConnectionLost {
                    uri: self.config.uri.clone(),
                    source: backend(&e),
                });
            }
            if code_is(&e, ErrorNumber::OperationInvalid) {
                return Err(self.classify(&conn, e, "restore", &name));
            }
            return Err(HypervisorError::RestoreFailed {
                path: state_file.to_path_buf(),
                source: backend(&e),
            });
        }
        let dom = self.lookup(&conn, &name, "restore")?;
        if !dom.is_persistent().unwrap_or(true) {
            // Restored on a host where it was not defined: keep its definition here too, so it
            // behaves like every other domain of this host.
            let inactive = dom
                .xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)
                .map_err(|e| self.classify(&conn, e, "restore", &name))?;
            conn.define_domain_xml(&inactive)
                .map_err(|e| self.classify(&conn, e, "restore", &name))?;
        }
        tracing::info!(vm.id = %name, state_file = %path, "domain restored");
        self.handle(&conn, &dom, &name)
    }

    fn undefine(&self, name: &str) -> Result<(), HypervisorError> {
        self.on_domain(name, "undefine", |_| true, Domain::undefine)
    }

    fn state(&self, name: &str) -> Result<DmtfState, HypervisorError> {
        self.read(|conn| {
            let dom = self.lookup(conn, name, "read state")?;
            let (s, r) = dom
                .state()
                .map_err(|e| self.classify(conn, e, "read state", name))?;
            Ok(dmtf::from_libvirt(s, r))
        })
    }

    fn list(&self) -> Result<Vec<DomainSummary>, HypervisorError> {
        self.read(|conn| {
            let doms = conn
                .list_all_domains(0)
                .map_err(|e| self.classify(conn, e, "list", ""))?;
            let mut out = Vec::with_capacity(doms.len());
            for dom in doms {
                // A domain that vanishes while being listed is simply not listed.
                let (Ok(name), Ok(uuid), Ok((s, r))) = (dom.name(), dom.uuid_string(), dom.state())
                else {
                    continue;
                };
                out.push(DomainSummary {
                    handle: DomainHandle { name, uuid },
                    state: dmtf::from_libvirt(s, r),
                    persistent: dom.is_persistent().unwrap_or(false),
                });
            }
            Ok(out)
        })
    }

    fn stats(&self, name: &str) -> Result<DomainStats, HypervisorError> {
        self.read(|conn| {
            let op = "read statistics";
            let dom = self.lookup(conn, name, op)?;
            let taken_at = Instant::now();
            let wall_time = SystemTime::now();
            let info = dom.info().map_err(|e| self.classify(conn, e, op, name))?;
            let (s, r) = dom.state().map_err(|e| self.classify(conn, e, op, name))?;
            let state = dmtf::from_libvirt(s, r);
            let mut memory = MemoryStats {
                current_kib: info.memory,
                maximum_kib: info.max_mem,
                ..MemoryStats::default()
            };
            let mut disks = Vec::new();
            let mut interfaces = Vec::new();
            if state.is_active() {
                match dom.memory_stats(0) {
                    Ok(list) => {
                        for m in list {
                            match m.tag {
                                sys::VIR_DOMAIN_MEMORY_STAT_ACTUAL_BALLOON => {
                                    memory.balloon_kib = Some(m.val)
                                }
                                sys::VIR_DOMAIN_MEMORY_STAT_RSS => memory.rss_kib = Some(m.val),
                                sys::VIR_DOMAIN_MEMORY_STAT_UNUSED => {
                                    memory.unused_kib = Some(m.val)
                                }
                                sys::VIR_DOMAIN_MEMORY_STAT_USABLE => {
                                    memory.usable_kib = Some(m.val)
                                }
                                _ => {}
                            }
                        }
                    }
                    Err(e) if self.lost(conn, &e) => {
                        return Err(self.classify(conn, e, op, name));
                    }
                    Err(e) => {
                        tracing::debug!(vm.id = %name, error = %e.message(), "no memory statistics")
                    }
                }
                let xml = dom
                    .xml_desc(0)
                    .map_err(|e| self.classify(conn, e, op, name))?;
                let devices = parse_domain_xml(&xml)?;
                for dev in devices.disks {
                    match dom.block_stats(&dev) {
                        Ok(b) => disks.push(DiskCounters {
                            device: dev,
                            rd_bytes: non_negative(b.rd_bytes),
                            wr_bytes: non_negative(b.wr_bytes),
                            rd_req: non_negative(b.rd_req),
                            wr_req: non_negative(b.wr_req),
                        }),
                        Err(e) if self.lost(conn, &e) => {
                            return Err(self.classify(conn, e, op, name));
                        }
                        Err(e) => {
                            tracing::debug!(vm.id = %name, disk = %dev, error = %e.message(), "no disk statistics")
                        }
                    }
                }
                for iface in devices.interfaces {
                    let Some(key) = iface.stats_key() else {
                        continue;
                    };
                    match dom.interface_stats(key) {
                        Ok(i) => interfaces.push(InterfaceCounters {
                            device: key.to_string(),
                            rx_bytes: non_negative(i.rx_bytes),
                            tx_bytes: non_negative(i.tx_bytes),
                            rx_packets: non_negative(i.rx_packets),
                            tx_packets: non_negative(i.tx_packets),
                        }),
                        Err(e) if self.lost(conn, &e) => {
                            return Err(self.classify(conn, e, op, name));
                        }
                        Err(e) => {
                            tracing::debug!(vm.id = %name, interface = %key, error = %e.message(), "no interface statistics")
                        }
                    }
                }
            }
            Ok(DomainStats {
                name: name.to_string(),
                run_id: dom.id(),
                taken_at,
                wall_time,
                state,
                vcpus: info.nr_virt_cpu,
                cpu_time_ns: info.cpu_time,
                memory,
                disks,
                interfaces,
            })
        })
    }

    fn host_info(&self) -> Result<HostInfo, HypervisorError> {
        self.read(|conn| {
            let n = conn
                .node_info()
                .map_err(|e| self.classify(conn, e, "read host information", ""))?;
            Ok(HostInfo {
                cpus: n.cpus,
                memory_kib: n.memory,
                cpu_model: n.model,
                cpu_mhz: n.mhz,
            })
        })
    }
}
