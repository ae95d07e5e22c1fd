//! The host agent's hypervisor layer: the paper's Implementation layer, the only part of nubis
//! that touches the hypervisor.
//!
//! - [`hypervisor`]: the [`Hypervisor`] trait that everything above uses, with its value types
//!   and errors; nothing in it names libvirt.
//! - [`libvirt`]: [`LibvirtHypervisor`], the implementation over libvirt (`qemu:///system` for
//!   real guests, `test:///default` for fast tests), reconnecting when libvirtd restarts.
//! - [`spec`]: [`DomainSpec`], the host-internal description of a domain, and
//!   [`domain_xml`] turning it into libvirt domain XML.
//! - [`dmtf`]: VM states as DMTF/CIM `EnabledState` values.
//! - [`sampling`]: infrastructure measurements, snapshots of counters turned into rates.
//! - [`capacity`]: what the host has, what its VMs hold, and whether one more fits.
//! - [`test_guest`]: the tiny real guest used by tests.

pub mod capacity;
pub mod dmtf;
pub mod domain_xml;
pub mod hypervisor;
pub mod libvirt;
pub mod sampling;
pub mod spec;
pub mod test_guest;

pub use capacity::{Capacity, CapacityError, Reservation, Resources};
pub use dmtf::DmtfState;
pub use domain_xml::Accelerator;
pub use hypervisor::{
    DomainHandle, DomainStats, DomainSummary, HostInfo, Hypervisor, HypervisorError,
    ShutdownOutcome,
};
pub use libvirt::{LibvirtConfig, LibvirtHypervisor};
pub use sampling::{Rates, SampleError, Sampler};
pub use spec::{DomainSpec, SpecError};
