//! What the monitoring task asks the engine thread at each tick, and the answer: the VMs held,
//! whether they run, their descriptors when they changed and the statistics that are due.

use std::collections::{HashMap, HashSet};

use nubis_protocol::descriptor::VmDescriptor;
use nubis_protocol::VmId;

use super::Engine;
use crate::dmtf::DmtfState;
use crate::hypervisor::{DomainStats, Hypervisor, HypervisorError};

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

impl<H: Hypervisor + 'static> Engine<H> {
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
}
