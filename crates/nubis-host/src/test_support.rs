//! What the unit tests of several modules share: a minimal valid VM Descriptor.

use std::collections::BTreeMap;

use nubis_protocol::descriptor::{MonitoringSpecifier, PrimaryKeys, VirtualHardware, VmDescriptor};
use nubis_protocol::{SiteId, VmId};

/// VM `vm` of primary `site-a`, one vCPU and 64 MiB, no disks, sealing to `sealing`, with
/// `monitoring`.
pub(crate) fn descriptor(
    vm: &VmId,
    sealing: [u8; 32],
    monitoring: Vec<MonitoringSpecifier>,
) -> VmDescriptor {
    VmDescriptor {
        id: vm.clone(),
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
        monitoring,
        properties: BTreeMap::new(),
    }
}
