//! The `VirtualHardwareSection`: its items read, filtered by the chosen deployment option, and
//! mapped to the descriptor's vCPUs, memory, disks and network interfaces.

use std::collections::BTreeSet;

use nubis_protocol::descriptor::{DiskFormat, DiskSpec, NetworkSpec, MAX_DESCRIPTOR_ITEMS};

use super::names::{device_name, disk_format, image_name, nic_model};
use super::reader::Reader;
use super::{DiskFile, CIM_PREFIX};
use crate::error::{clip, OvfError};
use crate::units::byte_multiplier;
use crate::xml::Element;

/// Memory units assumed when a memory item names none (the unit every exporter writes).
const DEFAULT_MEMORY_UNITS: &str = "byte * 2^20";
const MIB: u64 = 1 << 20;

/// Resource types that are controllers or peripherals: the destination host chooses its own.
const HOST_CHOSEN_TYPES: &[u32] = &[5, 6, 14, 20, 21, 22, 23, 24, 35];
const CPU: u32 = 3;
const MEMORY: u32 = 4;
const ETHERNET: u32 = 10;
const CD_DRIVE: u32 = 15;
const DVD_DRIVE: u32 = 16;
const DISK_DRIVE: u32 = 17;

/// An item of the VirtualHardwareSection, read but not yet mapped.
struct RawItem<'a> {
    el: &'a Element,
    label: String,
    instance_id: Option<String>,
    resource_type: u32,
    configurations: Option<Vec<String>>,
    required: bool,
    bound_normal: bool,
}

impl RawItem<'_> {
    /// Text of the CIM property `name` (`rasd:`, `sasd:` or `epasd:` child).
    fn field(&self, name: &str) -> Option<&str> {
        field(self.el, name)
    }
}

fn field<'a>(el: &'a Element, name: &str) -> Option<&'a str> {
    el.children
        .iter()
        .find(|c| {
            c.ns.as_deref().is_some_and(|n| n.starts_with(CIM_PREFIX))
                && (c.local == name
                    // OVF 0.9 spells it `InstanceId`.
                    || (name == "InstanceID" && c.local == "InstanceId"))
        })
        .map(|c| c.text.trim())
}

enum HostResource {
    Disk(String),
    File(String),
    Other,
}

fn host_resource(text: &str) -> HostResource {
    let text = text.trim();
    let path = text.strip_prefix("ovf:").unwrap_or(text);
    if let Some(id) = path.strip_prefix("/disk/") {
        HostResource::Disk(id.to_owned())
    } else if let Some(id) = path.strip_prefix("/file/") {
        HostResource::File(id.to_owned())
    } else {
        HostResource::Other
    }
}

impl Reader {
    pub(super) fn hardware(&mut self, section: &Element) -> Result<MappedHardware, OvfError> {
        if let Some(transport) = self.attr(section, "transport") {
            self.skip(
                format!("VirtualHardwareSection ovf:transport={:?}", clip(transport)),
                "the OVF environment is not delivered to the guest; properties stay in the descriptor",
            );
        }
        let mut items = Vec::new();
        for el in &section.children {
            if !self.is_ovf(el) {
                self.not_understood(el, "VirtualHardwareSection")?;
                continue;
            }
            match el.local.as_str() {
                "Info" | "System" => {}
                "Item" | "StorageItem" | "EthernetPortItem" => items.push(self.raw_item(el)?),
                _ => self.not_understood(el, "VirtualHardwareSection")?,
            }
        }
        self.check_item_references(&items)?;

        // Items of the chosen deployment option; one with the same InstanceID as an earlier
        // item replaces it (that is how exporters write "2 vCPUs in this configuration").
        let mut applied: Vec<&RawItem<'_>> = Vec::new();
        for item in &items {
            let applies = match &item.configurations {
                None => true,
                Some(list) => self.selected.as_ref().is_some_and(|s| list.contains(s)),
            };
            if !applies {
                continue;
            }
            if !item.bound_normal {
                self.skip(item.label.clone(), "a min/max bound, not a requirement");
                continue;
            }
            let earlier = item.instance_id.as_ref().and_then(|id| {
                applied
                    .iter()
                    .position(|a| a.instance_id.as_ref() == Some(id))
            });
            match earlier {
                Some(i) => applied[i] = item,
                None => applied.push(item),
            }
        }

        let mut out = MappedHardware::default();
        for item in applied {
            self.map_item(item, &mut out)?;
        }
        Ok(out)
    }

    fn raw_item<'a>(&mut self, el: &'a Element) -> Result<RawItem<'a>, OvfError> {
        let instance_id = field(el, "InstanceID").map(str::to_owned);
        let resource_type = field(el, "ResourceType");
        let id_label = instance_id.as_deref().unwrap_or("?");
        let resource_type = match resource_type {
            None => {
                return Err(OvfError::Missing {
                    element: format!("{} (InstanceID {id_label})", el.local),
                    what: "ResourceType",
                })
            }
            Some(t) => t.parse::<u32>().map_err(|_| OvfError::InvalidValue {
                element: format!("{} (InstanceID {id_label})", el.local),
                attribute: "ResourceType",
                value: clip(t),
                reason: "not a CIM resource type number",
            })?,
        };
        let label = format!(
            "{} (InstanceID {id_label}, ResourceType {resource_type})",
            el.local
        );
        for child in &el.children {
            let cim = child
                .ns
                .as_deref()
                .is_some_and(|n| n.starts_with(CIM_PREFIX));
            if !cim {
                self.not_understood(child, &label)?;
            }
        }
        let configurations = self
            .attr(el, "configuration")
            .map(|c| c.split_whitespace().map(str::to_owned).collect());
        let bound_normal = matches!(self.attr(el, "bound").map(str::trim), None | Some("normal"));
        Ok(RawItem {
            el,
            label,
            instance_id,
            resource_type,
            configurations,
            required: self.required(el),
            bound_normal,
        })
    }

    /// Checks every item's references, in every configuration: a dangling reference is a
    /// broken envelope even if the chosen configuration does not use the item.
    fn check_item_references(&self, items: &[RawItem<'_>]) -> Result<(), OvfError> {
        let instance_ids: BTreeSet<&str> = items
            .iter()
            .filter_map(|i| i.instance_id.as_deref())
            .collect();
        for item in items {
            let dangling = |attribute, value: &str| OvfError::DanglingReference {
                element: item.label.clone(),
                attribute,
                value: clip(value),
            };
            for c in item.configurations.iter().flatten() {
                if !self.configurations.contains(c) {
                    return Err(dangling("ovf:configuration", c));
                }
            }
            if let Some(parent) = item.field("Parent") {
                if !instance_ids.contains(parent) {
                    return Err(dangling("Parent", parent));
                }
            }
            if let Some(hr) = item.field("HostResource").filter(|h| !h.is_empty()) {
                match host_resource(hr) {
                    HostResource::Disk(id) if !self.disks.contains_key(&id) => {
                        return Err(dangling("HostResource", hr))
                    }
                    HostResource::File(id) if !self.files.contains_key(&id) => {
                        return Err(dangling("HostResource", hr))
                    }
                    HostResource::Other if item.resource_type == DISK_DRIVE => {
                        return Err(dangling("HostResource", hr))
                    }
                    _ => {}
                }
            }
            if let Some(conn) = item.field("Connection").filter(|c| !c.is_empty()) {
                if !self.networks.contains_key(conn) {
                    return Err(dangling("Connection", conn));
                }
            }
        }
        Ok(())
    }

    fn map_item(&mut self, item: &RawItem<'_>, out: &mut MappedHardware) -> Result<(), OvfError> {
        let invalid = |attribute, value: &str, reason| OvfError::InvalidValue {
            element: item.label.clone(),
            attribute,
            value: clip(value),
            reason,
        };
        let quantity = || {
            item.field("VirtualQuantity")
                .ok_or_else(|| OvfError::Missing {
                    element: item.label.clone(),
                    what: "VirtualQuantity",
                })
        };
        match item.resource_type {
            CPU => {
                let q = quantity()?;
                let n: u32 = q
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| invalid("VirtualQuantity", q, "not a positive count"))?;
                if out.vcpus.replace(n).is_some() {
                    return Err(OvfError::Unsupported {
                        element: item.label.clone(),
                        reason: "a second vCPU item; declare the vCPU count in one item",
                    });
                }
            }
            MEMORY => {
                let q = quantity()?;
                let units = item.field("AllocationUnits").unwrap_or(DEFAULT_MEMORY_UNITS);
                let count: u64 = q
                    .parse()
                    .map_err(|_| invalid("VirtualQuantity", q, "not a whole number"))?;
                let multiplier = byte_multiplier(units)
                    .ok_or_else(|| invalid("AllocationUnits", units, "not a byte unit"))?;
                let bytes = count
                    .checked_mul(multiplier)
                    .ok_or_else(|| invalid("VirtualQuantity", q, "too large"))?;
                let mib = bytes.div_ceil(MIB);
                if mib == 0 {
                    return Err(invalid("VirtualQuantity", q, "no memory"));
                }
                if out.memory_mib.replace(mib).is_some() {
                    return Err(OvfError::Unsupported {
                        element: item.label.clone(),
                        reason: "a second memory item; declare the memory in one item",
                    });
                }
            }
            DISK_DRIVE => self.map_disk(item, out)?,
            ETHERNET => self.map_nic(item, out),
            CD_DRIVE | DVD_DRIVE => self.skip(
                item.label.clone(),
                "removable media are not carried by the descriptor",
            ),
            t if HOST_CHOSEN_TYPES.contains(&t) => self.skip(
                item.label.clone(),
                "controllers and peripherals are chosen by the destination host",
            ),
            _ if item.required => {
                return Err(OvfError::Unsupported {
                    element: item.label.clone(),
                    reason: "resource type not supported by nubis (an item that may be skipped says ovf:required=\"false\")",
                })
            }
            _ => self.skip(
                item.label.clone(),
                "marked ovf:required=\"false\" and not used by nubis",
            ),
        }
        if out.disks.len() > MAX_DESCRIPTOR_ITEMS || out.networks.len() > MAX_DESCRIPTOR_ITEMS {
            return Err(OvfError::Unsupported {
                element: item.label.clone(),
                reason: "too many disks or network interfaces",
            });
        }
        Ok(())
    }

    fn map_disk(&mut self, item: &RawItem<'_>, out: &mut MappedHardware) -> Result<(), OvfError> {
        let hr = item
            .field("HostResource")
            .ok_or_else(|| OvfError::Missing {
                element: item.label.clone(),
                what: "HostResource",
            })?;
        let HostResource::Disk(disk_id) = host_resource(hr) else {
            return Err(OvfError::InvalidValue {
                element: item.label.clone(),
                attribute: "HostResource",
                value: clip(hr),
                reason: "a disk drive must name a Disk of the DiskSection (ovf:/disk/<diskId>)",
            });
        };
        // Checked in `check_item_references`.
        let Some(decl) = self.disks.get(&disk_id) else {
            return Err(OvfError::DanglingReference {
                element: item.label.clone(),
                attribute: "HostResource",
                value: clip(hr),
            });
        };
        let disk_label = format!("Disk {disk_id:?}");
        let name = device_name(out.disks.len());
        if decl.capacity_bytes == 0 {
            return Err(OvfError::InvalidValue {
                element: disk_label,
                attribute: "ovf:capacity",
                value: "0".into(),
                reason: "a disk needs a capacity",
            });
        }
        let (format, image) = match &decl.file {
            None => (DiskFormat::Qcow2, None),
            Some(file_id) => {
                let Some(file) = self.files.get(file_id) else {
                    return Err(OvfError::DanglingReference {
                        element: disk_label,
                        attribute: "ovf:fileRef",
                        value: clip(file_id),
                    });
                };
                let image = image_name(&file.href).ok_or_else(|| OvfError::InvalidValue {
                    element: format!("File {file_id:?}"),
                    attribute: "ovf:href",
                    value: clip(&file.href),
                    reason: "not a file of the package whose name can be an image-store name ([A-Za-z0-9._-], a relative href)",
                })?;
                let format = match &decl.format {
                    Some(uri) => disk_format(uri).ok_or_else(|| OvfError::InvalidValue {
                        element: disk_label.clone(),
                        attribute: "ovf:format",
                        value: clip(uri),
                        reason: "unknown disk format",
                    })?,
                    None => disk_format(&image).ok_or_else(|| OvfError::Missing {
                        element: disk_label.clone(),
                        what: "ovf:format",
                    })?,
                };
                out.disk_files.push(DiskFile {
                    disk: name.clone(),
                    href: file.href.clone(),
                    image: image.clone(),
                    size: file.size,
                    compression: file.compression.clone(),
                });
                (format, Some(image))
            }
        };
        out.disks.push(DiskSpec {
            name,
            capacity_bytes: decl.capacity_bytes,
            format,
            image,
        });
        Ok(())
    }

    fn map_nic(&mut self, item: &RawItem<'_>, out: &mut MappedHardware) {
        let Some(network) = item
            .field("Connection")
            .filter(|c| !c.is_empty())
            .and_then(|c| self.networks.get(c))
            .cloned()
        else {
            self.skip(item.label.clone(), "not connected to any network");
            return;
        };
        if out.networks.iter().any(|n| n.name == network) {
            self.skip(
                item.label.clone(),
                "a second interface on the same network cannot be expressed in the descriptor",
            );
            return;
        }
        out.networks.push(NetworkSpec {
            name: network,
            model: nic_model(item.field("ResourceSubType")),
        });
    }
}

#[derive(Default)]
pub(super) struct MappedHardware {
    pub(super) vcpus: Option<u32>,
    pub(super) memory_mib: Option<u64>,
    pub(super) disks: Vec<DiskSpec>,
    pub(super) networks: Vec<NetworkSpec>,
    pub(super) disk_files: Vec<DiskFile>,
}
