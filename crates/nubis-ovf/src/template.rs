//! A VM template: everything a VM descriptor holds except what the deploying site assigns
//! (the VM id, the primary site and its keys).
//!
//! OVF packages and the TOML template form both produce a [`VmTemplate`]; the site (or the
//! `nubis` CLI on its behalf) turns it into a [`VmDescriptor`] at deployment time.

use std::collections::BTreeMap;

use nubis_protocol::descriptor::{
    DiskSpec, KernelBoot, MonitoringSpecifier, NetworkSpec, PrimaryKeys, VirtualHardware,
    VmDescriptor,
};
use nubis_protocol::{SiteId, VmId};

use crate::error::OvfError;

/// Descriptor version given to a freshly deployed VM; each descriptor change bumps it.
pub const FIRST_DESCRIPTOR_VERSION: u64 = 1;

/// A VM as described by its author, before a site deploys it.
#[derive(Debug, Clone, PartialEq)]
pub struct VmTemplate {
    /// Identifier of the source's virtual system (the OVF `VirtualSystem ovf:id`), used in
    /// error messages.
    pub system_id: String,
    /// Human-readable name.
    pub name: String,
    /// Virtual CPUs, if the source declares them.
    pub vcpus: Option<u32>,
    /// Memory in MiB, if the source declares it.
    pub memory_mib: Option<u64>,
    /// Disks in attachment order.
    pub disks: Vec<DiskSpec>,
    /// Network interfaces in attachment order.
    pub networks: Vec<NetworkSpec>,
    /// Direct kernel boot, if any.
    pub boot: Option<KernelBoot>,
    /// The paper's monitoring specifiers.
    pub monitoring: Vec<MonitoringSpecifier>,
    /// Free key/value properties.
    pub properties: BTreeMap<String, String>,
}

impl VmTemplate {
    /// The descriptor of a new VM `id` whose primary site is `primary`, validated.
    pub fn into_descriptor(
        self,
        id: VmId,
        primary: SiteId,
        keys: PrimaryKeys,
    ) -> Result<VmDescriptor, OvfError> {
        let vcpus = self.vcpus.ok_or_else(|| OvfError::MissingHardware {
            system: self.system_id.clone(),
            what: "vCPU item (ResourceType 3)",
        })?;
        let memory_mib = self.memory_mib.ok_or_else(|| OvfError::MissingHardware {
            system: self.system_id.clone(),
            what: "memory item (ResourceType 4)",
        })?;
        let descriptor = VmDescriptor {
            id,
            name: self.name,
            version: FIRST_DESCRIPTOR_VERSION,
            primary_site: primary,
            primary_keys: keys,
            hardware: VirtualHardware {
                vcpus,
                memory_mib,
                disks: self.disks,
                networks: self.networks,
                boot: self.boot,
            },
            monitoring: self.monitoring,
            properties: self.properties,
        };
        descriptor.validate()?;
        Ok(descriptor)
    }
}
