//! The host agent's hypervisor layer: the paper's Implementation layer, the only part of nubis
//! that touches the hypervisor.
//!
//! - [`hypervisor`]: the [`Hypervisor`] trait that everything above uses, with its value types
//!   and errors; nothing in it names libvirt.
//! - [`libvirt`]: [`LibvirtHypervisor`], the implementation over libvirt (`qemu:///system` for
//!   real guests, `test:///default` for fast tests), reconnecting when libvirtd restarts.
//! - [`spec`]: [`DomainSpec`], the host-internal description of a domain, and
//!   [`domain_xml`] turning it into libvirt domain XML.
//! - [`dmtf`]: libvirt's domain states mapped to the protocol's DMTF/CIM [`DmtfState`].
//! - [`sampling`]: infrastructure measurements, snapshots of counters turned into rates.
//! - [`capacity`]: what the host has, what its VMs hold, and whether one more fits.
//! - [`test_guest`]: the tiny real guest used by tests.
//!
//! The daemon on top of them (`nubis host --config host.toml`):
//!
//! - [`config`]: [`HostConfig`], the validated `host.toml` (its keys are documented there).
//! - [`agent`]: [`agent::run`], the daemon answering the site on
//!   `nubis.site.<site>.host.<host>.<op>` and publishing its capacity.
//! - [`engine`]: the operations themselves (reserve, activate, prepare, resume after abort,
//!   release, control, update, state, list), idempotent and run one at a time per VM; a save or
//!   a graceful shutdown waits on a thread of its own, so other VMs are served meanwhile.
//! - [`vm_files`]: the per-VM directories under the VM root.
//! - [`qcow2`]: the header of a received qcow2 image, refused when it names another file.
//! - [`producer`]: the monitoring [`Producer`] of one VM (paper section IV): monitoring and
//!   delivery intervals, raw and processed formats, predicates; pure and synchronous.
//! - [`monitor`]: the task that feeds the Producers with measurements and KPI rows, mounts the
//!   VMs' KPI filesystems and hands every batch to the site until it is stored.
//! - [`client`]: the NATS transport for the protocol crate's typed
//!   [`HostClient`](nubis_protocol::message::HostClient).

pub mod agent;
pub mod capacity;
pub mod client;
pub mod config;
pub mod dmtf;
pub mod domain_xml;
pub mod engine;
pub mod hypervisor;
pub mod libvirt;
pub mod monitor;
pub mod producer;
pub mod qcow2;
pub mod sampling;
pub mod spec;
pub mod test_guest;
#[cfg(test)]
mod test_support;
pub mod vm_files;

pub use agent::{run, AgentError};
pub use capacity::{Capacity, CapacityError, Reservation, Resources};
pub use config::{ConfigError, HostConfig};
pub use dmtf::DmtfState;
pub use domain_xml::Accelerator;
pub use hypervisor::{
    DomainHandle, DomainStats, DomainSummary, HostInfo, Hypervisor, HypervisorError,
    ShutdownOutcome,
};
pub use libvirt::{LibvirtConfig, LibvirtHypervisor};
pub use producer::{Delivery, Producer};
pub use sampling::{Rates, SampleError, Sampler};
pub use spec::{DomainSpec, SpecError};
