//! The hypervisor as the host agent sees it: a small synchronous trait, its value types and its
//! errors. Nothing here names libvirt, so everything above the host agent's hypervisor layer can
//! be written and tested against any implementation.
//!
//! The calls block; an async caller runs them on a blocking thread (`spawn_blocking`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use crate::dmtf::DmtfState;
use crate::spec::{DomainSpec, SpecError};

/// A domain known to the hypervisor, named by the VM identifier.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DomainHandle {
    /// The domain name (the VM identifier).
    pub name: String,
    /// The hypervisor's UUID of the domain.
    pub uuid: String,
}

/// One entry of [`Hypervisor::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainSummary {
    /// Name and UUID.
    pub handle: DomainHandle,
    /// Current state.
    pub state: DmtfState,
    /// Whether the definition survives the domain being shut off.
    pub persistent: bool,
}

/// How [`Hypervisor::shutdown`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownOutcome {
    /// The guest powered itself off in time.
    Graceful,
    /// The guest did not power off in time and was destroyed.
    Forced,
    /// The domain was not running.
    AlreadyOff,
}

/// Memory figures of a domain, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryStats {
    /// Memory currently assigned to the domain.
    pub current_kib: u64,
    /// Maximum memory of the domain.
    pub maximum_kib: u64,
    /// The balloon's current size as the guest reports it, when the guest has a balloon driver.
    pub balloon_kib: Option<u64>,
    /// Resident set size of the emulator process on the host.
    pub rss_kib: Option<u64>,
    /// Memory the guest considers unused.
    pub unused_kib: Option<u64>,
    /// Memory the guest could use without swapping.
    pub usable_kib: Option<u64>,
}

/// Cumulative counters of one disk.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DiskCounters {
    /// Guest device name (`vda`).
    pub device: String,
    /// Bytes read.
    pub rd_bytes: u64,
    /// Bytes written.
    pub wr_bytes: u64,
    /// Read requests.
    pub rd_req: u64,
    /// Write requests.
    pub wr_req: u64,
}

/// Cumulative counters of one network interface, from the guest's point of view.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InterfaceCounters {
    /// Interface name (host device or MAC address).
    pub device: String,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Packets received.
    pub rx_packets: u64,
    /// Packets sent.
    pub tx_packets: u64,
}

/// One statistics snapshot of a domain: cumulative counters at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct DomainStats {
    /// The domain.
    pub name: String,
    /// The hypervisor's run-time id; it changes when the domain is started again, which tells
    /// [`crate::sampling`] that the counters restarted from zero.
    pub run_id: Option<u32>,
    /// When the snapshot was taken (monotonic, for rates).
    pub taken_at: Instant,
    /// When the snapshot was taken (wall clock, for reports).
    pub wall_time: SystemTime,
    /// State at that moment.
    pub state: DmtfState,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// CPU time consumed by the domain, in nanoseconds.
    pub cpu_time_ns: u64,
    /// Memory.
    pub memory: MemoryStats,
    /// Disks.
    pub disks: Vec<DiskCounters>,
    /// Network interfaces.
    pub interfaces: Vec<InterfaceCounters>,
}

/// What the host offers, as the hypervisor sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInfo {
    /// Active physical CPUs.
    pub cpus: u32,
    /// Physical memory in KiB.
    pub memory_kib: u64,
    /// CPU model.
    pub cpu_model: String,
    /// Nominal CPU frequency in MHz (0 if unknown).
    pub cpu_mhz: u32,
}

/// A failure reported by the hypervisor's own API, kept as text so that callers above the host
/// agent never depend on the hypervisor library.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct BackendError {
    /// The hypervisor's message.
    pub message: String,
}

/// Why a hypervisor call failed.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// No domain has this name.
    #[error("no domain named {name:?}")]
    UnknownDomain {
        /// The name asked for.
        name: String,
    },
    /// A domain with this name is already defined.
    #[error("a domain named {name:?} is already defined")]
    AlreadyDefined {
        /// The name.
        name: String,
    },
    /// The spec cannot be turned into a domain.
    #[error("invalid domain spec")]
    InvalidSpec(#[from] SpecError),
    /// The operation does not apply in the domain's current state (start a running domain,
    /// resume one that is not paused, save one that is shut off, …).
    #[error("cannot {operation} domain {name:?} while it is {state:?}")]
    InvalidState {
        /// The domain.
        name: String,
        /// What was asked.
        operation: &'static str,
        /// The state it was in.
        state: DmtfState,
    },
    /// The saved-state file does not exist.
    #[error("no saved state at {path}")]
    StateFileMissing {
        /// The file.
        path: PathBuf,
    },
    /// The saved-state file is not a saved state this hypervisor can read.
    #[error("{path} is not a usable saved state")]
    CorruptStateFile {
        /// The file.
        path: PathBuf,
        /// What the hypervisor said.
        #[source]
        source: BackendError,
    },
    /// The saved state was readable but the domain could not be brought back from it.
    #[error("cannot restore from {path}")]
    RestoreFailed {
        /// The file.
        path: PathBuf,
        /// What the hypervisor said.
        #[source]
        source: BackendError,
    },
    /// The hypervisor could not be reached.
    #[error("cannot connect to {uri}")]
    Connect {
        /// The connection URI.
        uri: String,
        /// What the hypervisor library said.
        #[source]
        source: BackendError,
    },
    /// The connection broke during the call; the next call reconnects.
    #[error("connection to {uri} lost")]
    ConnectionLost {
        /// The connection URI.
        uri: String,
        /// What the hypervisor library said.
        #[source]
        source: BackendError,
    },
    /// The hypervisor cannot do this at all.
    #[error("{operation} is not supported by this hypervisor")]
    Unsupported {
        /// What was asked.
        operation: &'static str,
    },
    /// The hypervisor's definition of a domain could not be read.
    #[error("unreadable domain definition")]
    DomainXml(#[from] crate::domain_xml::DomainXmlError),
    /// Any other failure of an operation.
    #[error("{operation} of domain {name:?} failed")]
    Operation {
        /// What was asked.
        operation: &'static str,
        /// The domain (empty for host-wide operations).
        name: String,
        /// What the hypervisor said.
        #[source]
        source: BackendError,
    },
}

/// Control of the domains of one host.
///
/// Names are VM identifiers. Every method either does what it says or returns an error; none
/// panics, and a failed call leaves the implementation ready for the next one.
pub trait Hypervisor: Send + Sync {
    /// Defines a persistent domain (not started).
    fn define(&self, spec: &DomainSpec) -> Result<DomainHandle, HypervisorError>;
    /// Starts a defined domain.
    fn start(&self, name: &str) -> Result<(), HypervisorError>;
    /// Asks the guest to power off, waits up to `timeout`, then destroys it if it is still
    /// running.
    fn shutdown(&self, name: &str, timeout: Duration) -> Result<ShutdownOutcome, HypervisorError>;
    /// Stops the domain at once, like pulling the plug.
    fn destroy(&self, name: &str) -> Result<(), HypervisorError>;
    /// Pauses the domain in memory.
    fn suspend(&self, name: &str) -> Result<(), HypervisorError>;
    /// Continues a paused domain.
    fn resume(&self, name: &str) -> Result<(), HypervisorError>;
    /// Resets a running domain at once, like pressing the reset button.
    fn reset(&self, name: &str) -> Result<(), HypervisorError>;
    /// Asks the guest of a running domain to reboot.
    fn reboot(&self, name: &str) -> Result<(), HypervisorError>;
    /// Changes the memory of a running domain (through its balloon), at most up to the memory it
    /// was started with; the persistent definition is not changed.
    fn set_memory(&self, name: &str, memory_mib: u64) -> Result<(), HypervisorError>;
    /// Saves the domain's memory state to `state_file` and stops it. The definition stays.
    fn save(&self, name: &str, state_file: &Path) -> Result<(), HypervisorError>;
    /// Brings a domain back from a saved state, running. With `spec`, the domain is restored
    /// with that definition (for instance with disk paths of another host); it must describe
    /// the same virtual hardware and UUID as the saved domain. The restored domain is left
    /// defined (persistent) on this host.
    fn restore(
        &self,
        state_file: &Path,
        spec: Option<&DomainSpec>,
    ) -> Result<DomainHandle, HypervisorError>;
    /// Removes the definition. A running domain keeps running until it stops.
    fn undefine(&self, name: &str) -> Result<(), HypervisorError>;
    /// The domain's state.
    fn state(&self, name: &str) -> Result<DmtfState, HypervisorError>;
    /// All domains of this host, defined or running.
    fn list(&self) -> Result<Vec<DomainSummary>, HypervisorError>;
    /// A statistics snapshot of the domain.
    fn stats(&self, name: &str) -> Result<DomainStats, HypervisorError>;
    /// The host's physical resources.
    fn host_info(&self) -> Result<HostInfo, HypervisorError>;
}
