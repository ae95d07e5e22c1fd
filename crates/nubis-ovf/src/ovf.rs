//! Reading an OVF envelope (DMTF DSP0243, versions 1.x and 2.x, and the pre-standard 0.9) and
//! mapping its one virtual system to a [`VmTemplate`].
//!
//! The mapping, element by element, is the table in this crate's `README.md`. In short: the
//! default (or chosen) deployment option selects the hardware items; vCPUs, memory, disks and
//! network interfaces become the descriptor's virtual hardware; `ProductSection` properties
//! become descriptor properties; nubis's own `MonitoringSection` extension carries the paper's
//! monitoring specifiers. Controllers, removable media and other peripherals are left to the
//! destination host and listed in [`OvfPackage::ignored`].
//!
//! Refusals follow the OVF rule that a consumer must understand every element not marked
//! `ovf:required="false"`: an unknown required section, an unknown OVF version, or a reference
//! to a file, disk, network, configuration or parent item that is not declared is an error that
//! names the element.

use std::collections::{BTreeMap, BTreeSet};

use nubis_protocol::descriptor::{
    is_image_name, DataPoint, DiskFormat, DiskSpec, MonitoringSpecifier, NetworkSpec, PrimaryKeys,
    VmDescriptor, MAX_DESCRIPTOR_ITEMS,
};
use nubis_protocol::ids::MAX_ID_LEN;
use nubis_protocol::{SiteId, VmId};

use crate::error::{clip, OvfError};
use crate::spec::{parse_format, parse_predicate};
use crate::template::VmTemplate;
use crate::units::byte_multiplier;
use crate::xml::{self, Element};

/// Envelope namespace of OVF 1.0 and 1.1.
pub const OVF_1_NS: &str = "http://schemas.dmtf.org/ovf/envelope/1";
/// Envelope namespace of OVF 2.0 and 2.1.
pub const OVF_2_NS: &str = "http://schemas.dmtf.org/ovf/envelope/2";
/// Envelope namespace of the pre-standard OVF 0.9 (VMware, 2007–2008).
pub const OVF_0_9_NS: &str = "http://www.vmware.com/schema/ovf/1/envelope";
/// Namespace of nubis's monitoring extension section.
pub const NUBIS_MONITORING_NS: &str = "urn:nubis:ovf:monitoring:1";

const DMTF_ENVELOPE_PREFIX: &str = "http://schemas.dmtf.org/ovf/envelope/";
const CIM_PREFIX: &str = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/";
const XSI_NS: &str = "http://www.w3.org/2001/XMLSchema-instance";

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

/// The OVF version of an envelope, from its namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OvfVersion {
    /// The pre-standard 0.9 namespace; sections are `Section xsi:type="…_Type"` elements.
    V0_9,
    /// OVF 1.0 / 1.1.
    V1,
    /// OVF 2.0 / 2.1.
    V2,
}

/// Choices made while reading an envelope.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParseOptions {
    /// The deployment option (`DeploymentOptionSection/Configuration ovf:id`) to use; `None`
    /// picks the one marked `ovf:default="true"`, else the first.
    pub configuration: Option<String>,
}

/// A disk image the package carries, to be put in the primary site's image store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskFile {
    /// The device name of the disk it backs, e.g. `vda`.
    pub disk: String,
    /// The `File ovf:href`, relative to the descriptor.
    pub href: String,
    /// Its image-store name (the last segment of the href), as written into the descriptor.
    pub image: String,
    /// `File ovf:size`, if given.
    pub size: Option<u64>,
    /// `File ovf:compression` (e.g. `gzip`), if given.
    pub compression: Option<String>,
}

/// Something in the envelope that was understood and deliberately not mapped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ignored {
    /// The element, e.g. `Item (InstanceID 7, ResourceType 15)`.
    pub element: String,
    /// Why it is not in the descriptor.
    pub reason: &'static str,
}

/// A parsed OVF envelope.
#[derive(Debug, Clone, PartialEq)]
pub struct OvfPackage {
    /// The OVF version.
    pub version: OvfVersion,
    /// Every declared deployment option, in document order.
    pub configurations: Vec<String>,
    /// The deployment option used, if the envelope declares any.
    pub configuration: Option<String>,
    /// The mapped VM.
    pub template: VmTemplate,
    /// The disk images to upload before deploying.
    pub disk_files: Vec<DiskFile>,
    /// What was skipped, with the reason.
    pub ignored: Vec<Ignored>,
}

/// Reads `xml` with `options`; see [`OvfPackage::parse_with`].
pub fn parse_ovf(xml: &str, options: &ParseOptions) -> Result<OvfPackage, OvfError> {
    OvfPackage::parse_with(xml, options)
}

impl OvfPackage {
    /// Reads an envelope with the default deployment option.
    pub fn parse(xml: &str) -> Result<Self, OvfError> {
        Self::parse_with(xml, &ParseOptions::default())
    }

    /// Reads an envelope.
    pub fn parse_with(xml: &str, options: &ParseOptions) -> Result<Self, OvfError> {
        let mut root = xml::parse(xml)?;
        let version = envelope_version(&root)?;
        let ns = root.ns.clone().unwrap_or_default();
        if version == OvfVersion::V0_9 {
            normalise_0_9(&mut root, &ns);
        }
        let mut reader = Reader {
            ns,
            ignored: Vec::new(),
            files: BTreeMap::new(),
            disks: BTreeMap::new(),
            networks: BTreeMap::new(),
            configurations: Vec::new(),
            selected: None,
        };
        let template = reader.envelope(&root, options)?;
        let (template, disk_files) = template;
        Ok(Self {
            version,
            configurations: reader.configurations,
            configuration: reader.selected,
            template,
            disk_files,
            ignored: reader.ignored,
        })
    }

    /// The descriptor of a new VM `id` whose primary site is `primary`, validated.
    pub fn into_descriptor(
        self,
        id: VmId,
        primary: SiteId,
        keys: PrimaryKeys,
    ) -> Result<VmDescriptor, OvfError> {
        self.template.into_descriptor(id, primary, keys)
    }
}

fn envelope_version(root: &Element) -> Result<OvfVersion, OvfError> {
    let ns = root.ns.as_deref().unwrap_or("");
    let version = match ns {
        OVF_1_NS => OvfVersion::V1,
        OVF_2_NS => OvfVersion::V2,
        OVF_0_9_NS => OvfVersion::V0_9,
        _ if root.local == "Envelope"
            && (ns.starts_with(DMTF_ENVELOPE_PREFIX) || ns.contains("ovf")) =>
        {
            return Err(OvfError::UnknownVersion {
                namespace: ns.to_owned(),
                version: None,
            })
        }
        _ => {
            return Err(OvfError::NotAnEnvelope {
                found: if ns.is_empty() {
                    root.qname.clone()
                } else {
                    format!("{} (namespace {ns})", root.qname)
                },
            })
        }
    };
    if root.local != "Envelope" {
        return Err(OvfError::NotAnEnvelope {
            found: root.qname.clone(),
        });
    }
    if let Some(v) = root.attr_ns(ns, "version") {
        let v = v.trim();
        let fits = match version {
            OvfVersion::V0_9 => v == "0.9",
            OvfVersion::V1 => v == "1" || v.starts_with("1."),
            OvfVersion::V2 => v == "2" || v.starts_with("2."),
        };
        if !fits {
            return Err(OvfError::UnknownVersion {
                namespace: ns.to_owned(),
                version: Some(clip(v)),
            });
        }
    }
    Ok(version)
}

/// OVF 0.9 writes `<Section xsi:type="ovf:DiskSection_Type">` and
/// `<Content xsi:type="ovf:VirtualSystem_Type">`; renaming them to the 1.x element names lets
/// one reader serve both.
fn normalise_0_9(el: &mut Element, ns: &str) {
    if el.ns.as_deref() == Some(ns) && (el.local == "Section" || el.local == "Content") {
        if let Some(ty) = el.attr_ns(XSI_NS, "type") {
            let ty = ty.rsplit(':').next().unwrap_or(ty);
            let ty = ty.strip_suffix("_Type").unwrap_or(ty).to_owned();
            el.qname = format!("{} (xsi:type {ty}_Type)", el.qname);
            el.local = ty;
        }
    }
    for child in &mut el.children {
        normalise_0_9(child, ns);
    }
}

struct FileDecl {
    href: String,
    size: Option<u64>,
    compression: Option<String>,
}

struct DiskDecl {
    capacity_bytes: u64,
    file: Option<String>,
    format: Option<String>,
}

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

struct Reader {
    ns: String,
    ignored: Vec<Ignored>,
    files: BTreeMap<String, FileDecl>,
    disks: BTreeMap<String, DiskDecl>,
    /// OVF network name → descriptor network name.
    networks: BTreeMap<String, String>,
    configurations: Vec<String>,
    selected: Option<String>,
}

impl Reader {
    fn is_ovf(&self, el: &Element) -> bool {
        el.ns.as_deref() == Some(self.ns.as_str())
    }

    /// An `ovf:` attribute; an unprefixed one is accepted too, as hand-written files use it.
    fn attr<'a>(&self, el: &'a Element, local: &str) -> Option<&'a str> {
        el.attr_ns(&self.ns, local).or_else(|| el.attr_plain(local))
    }

    fn required(&self, el: &Element) -> bool {
        !matches!(
            self.attr(el, "required").map(str::trim),
            Some("false" | "0")
        )
    }

    fn describe(&self, el: &Element) -> String {
        match el.ns.as_deref() {
            Some(ns) if ns != self.ns => format!("{} (namespace {ns})", el.qname),
            _ => el.qname.clone(),
        }
    }

    fn skip(&mut self, element: String, reason: &'static str) {
        self.ignored.push(Ignored { element, reason });
    }

    /// An element this reader does not map: an error if required, else noted and skipped.
    fn not_understood(&mut self, el: &Element, parent: &str) -> Result<(), OvfError> {
        if self.required(el) {
            return Err(OvfError::RequiredSection {
                element: self.describe(el),
                parent: parent.to_owned(),
            });
        }
        let element = format!("{} in {parent}", self.describe(el));
        self.skip(
            element,
            "marked ovf:required=\"false\" and not used by nubis",
        );
        Ok(())
    }

    fn envelope(
        &mut self,
        root: &Element,
        options: &ParseOptions,
    ) -> Result<(VmTemplate, Vec<DiskFile>), OvfError> {
        let mut disk_section = None;
        let mut network_section = None;
        let mut systems = Vec::new();
        for child in &root.children {
            if !self.is_ovf(child) {
                self.not_understood(child, "Envelope")?;
                continue;
            }
            match child.local.as_str() {
                "References" => self.references(child)?,
                "DiskSection" => {
                    if disk_section.replace(child).is_some() {
                        return Err(OvfError::Unsupported {
                            element: child.qname.clone(),
                            reason: "more than one DiskSection; merge them into one",
                        });
                    }
                }
                "NetworkSection" => {
                    if network_section.replace(child).is_some() {
                        return Err(OvfError::Unsupported {
                            element: child.qname.clone(),
                            reason: "more than one NetworkSection; merge them into one",
                        });
                    }
                }
                "DeploymentOptionSection" => self.deployment_options(child)?,
                "VirtualSystem" => systems.push(child),
                "VirtualSystemCollection" => {
                    return Err(OvfError::Unsupported {
                        element: child.qname.clone(),
                        reason: "a nubis descriptor describes one VM; export each virtual system as its own OVF",
                    })
                }
                "Info" | "Strings" => {}
                "AnnotationSection" | "EulaSection" => {
                    self.skip(child.qname.clone(), "informational");
                }
                _ => self.not_understood(child, "Envelope")?,
            }
        }
        // Files first, so that disks can be checked against them, then disks and networks.
        if let Some(section) = disk_section {
            self.disk_section(section)?;
        }
        if let Some(section) = network_section {
            self.network_section(section)?;
        }
        self.select_configuration(options)?;
        let system = match systems.as_slice() {
            [one] => *one,
            [] => {
                return Err(OvfError::Missing {
                    element: "Envelope".into(),
                    what: "VirtualSystem",
                })
            }
            [_, second, ..] => return Err(OvfError::Unsupported {
                element: second.qname.clone(),
                reason:
                    "a nubis descriptor describes one VM; the envelope has several VirtualSystems",
            }),
        };
        self.virtual_system(system)
    }

    fn references(&mut self, section: &Element) -> Result<(), OvfError> {
        for el in &section.children {
            if !(self.is_ovf(el) && el.local == "File") {
                self.not_understood(el, "References")?;
                continue;
            }
            let id = self.attr(el, "id").ok_or(OvfError::Missing {
                element: el.qname.clone(),
                what: "ovf:id",
            })?;
            let label = format!("File {id:?}");
            let href = self.attr(el, "href").ok_or_else(|| OvfError::Missing {
                element: label.clone(),
                what: "ovf:href",
            })?;
            let size = match self.attr(el, "size") {
                None => None,
                Some(s) => Some(s.trim().parse().map_err(|_| OvfError::InvalidValue {
                    element: label.clone(),
                    attribute: "ovf:size",
                    value: clip(s),
                    reason: "not a number of bytes",
                })?),
            };
            let decl = FileDecl {
                href: href.to_owned(),
                size,
                compression: self.attr(el, "compression").map(str::to_owned),
            };
            if self.files.insert(id.to_owned(), decl).is_some() {
                return Err(OvfError::Duplicate {
                    element: "File".into(),
                    attribute: "ovf:id",
                    value: clip(id),
                });
            }
        }
        Ok(())
    }

    fn disk_section(&mut self, section: &Element) -> Result<(), OvfError> {
        for el in &section.children {
            if self.is_ovf(el) && el.local == "Info" {
                continue;
            }
            if !(self.is_ovf(el) && el.local == "Disk") {
                self.not_understood(el, "DiskSection")?;
                continue;
            }
            let id = self.attr(el, "diskId").ok_or(OvfError::Missing {
                element: el.qname.clone(),
                what: "ovf:diskId",
            })?;
            let label = format!("Disk {id:?}");
            if self.attr(el, "parentRef").is_some() {
                return Err(OvfError::Unsupported {
                    element: label,
                    reason: "delta disks (ovf:parentRef) are not supported; flatten the disk chain",
                });
            }
            let capacity = self.attr(el, "capacity").ok_or_else(|| OvfError::Missing {
                element: label.clone(),
                what: "ovf:capacity",
            })?;
            let units = self.attr(el, "capacityAllocationUnits").unwrap_or("byte");
            let invalid = |attribute, value: &str, reason| OvfError::InvalidValue {
                element: label.clone(),
                attribute,
                value: clip(value),
                reason,
            };
            let count: u64 = capacity.trim().parse().map_err(|_| {
                invalid(
                    "ovf:capacity",
                    capacity,
                    "not a whole number (capacities taken from properties are not supported)",
                )
            })?;
            let multiplier = byte_multiplier(units)
                .ok_or_else(|| invalid("ovf:capacityAllocationUnits", units, "not a byte unit"))?;
            let capacity_bytes = count
                .checked_mul(multiplier)
                .ok_or_else(|| invalid("ovf:capacity", capacity, "too large"))?;
            let file = self.attr(el, "fileRef").map(str::to_owned);
            if let Some(f) = &file {
                if !self.files.contains_key(f) {
                    return Err(OvfError::DanglingReference {
                        element: label,
                        attribute: "ovf:fileRef",
                        value: clip(f),
                    });
                }
            }
            let decl = DiskDecl {
                capacity_bytes,
                file,
                format: self.attr(el, "format").map(str::to_owned),
            };
            if self.disks.insert(id.to_owned(), decl).is_some() {
                return Err(OvfError::Duplicate {
                    element: "Disk".into(),
                    attribute: "ovf:diskId",
                    value: clip(id),
                });
            }
        }
        Ok(())
    }

    fn network_section(&mut self, section: &Element) -> Result<(), OvfError> {
        let mut tokens = BTreeSet::new();
        for el in &section.children {
            if self.is_ovf(el) && el.local == "Info" {
                continue;
            }
            if !(self.is_ovf(el) && el.local == "Network") {
                self.not_understood(el, "NetworkSection")?;
                continue;
            }
            let name = self.attr(el, "name").ok_or(OvfError::Missing {
                element: el.qname.clone(),
                what: "ovf:name",
            })?;
            let token = network_token(name).ok_or_else(|| OvfError::InvalidValue {
                element: format!("Network {name:?}"),
                attribute: "ovf:name",
                value: clip(name),
                reason: "has no letter or digit to name a network with",
            })?;
            if self.networks.contains_key(name) || !tokens.insert(token.clone()) {
                return Err(OvfError::Duplicate {
                    element: "Network".into(),
                    attribute: "ovf:name",
                    value: clip(name),
                });
            }
            self.networks.insert(name.to_owned(), token);
        }
        Ok(())
    }

    fn deployment_options(&mut self, section: &Element) -> Result<(), OvfError> {
        let mut default = None;
        for el in &section.children {
            if self.is_ovf(el) && el.local == "Info" {
                continue;
            }
            if !(self.is_ovf(el) && el.local == "Configuration") {
                self.not_understood(el, "DeploymentOptionSection")?;
                continue;
            }
            let id = self.attr(el, "id").ok_or(OvfError::Missing {
                element: el.qname.clone(),
                what: "ovf:id",
            })?;
            if self.configurations.iter().any(|c| c == id) {
                return Err(OvfError::Duplicate {
                    element: "Configuration".into(),
                    attribute: "ovf:id",
                    value: clip(id),
                });
            }
            if self.attr(el, "default").map(str::trim) == Some("true") && default.is_none() {
                default = Some(id.to_owned());
            }
            self.configurations.push(id.to_owned());
        }
        self.selected = default.or_else(|| self.configurations.first().cloned());
        Ok(())
    }

    fn select_configuration(&mut self, options: &ParseOptions) -> Result<(), OvfError> {
        if let Some(wanted) = &options.configuration {
            if !self.configurations.contains(wanted) {
                return Err(OvfError::UnknownConfiguration(clip(wanted)));
            }
            self.selected = Some(wanted.clone());
        }
        Ok(())
    }

    fn virtual_system(
        &mut self,
        system: &Element,
    ) -> Result<(VmTemplate, Vec<DiskFile>), OvfError> {
        let id = self.attr(system, "id").ok_or(OvfError::Missing {
            element: system.qname.clone(),
            what: "ovf:id",
        })?;
        let label = format!("VirtualSystem {id:?}");
        let mut name = None;
        let mut hardware = None;
        let mut properties = BTreeMap::new();
        let mut monitoring = Vec::new();
        for child in &system.children {
            if child.is(NUBIS_MONITORING_NS, "MonitoringSection") {
                self.monitoring_section(child, &mut monitoring)?;
                continue;
            }
            if !self.is_ovf(child) {
                self.not_understood(child, &label)?;
                continue;
            }
            match child.local.as_str() {
                "Info" => {}
                "Name" => name = Some(child.text.trim().to_owned()),
                "VirtualHardwareSection" => {
                    if hardware.is_none() {
                        hardware = Some(child);
                    } else {
                        self.skip(
                            format!("{} in {label}", child.qname),
                            "only the first VirtualHardwareSection is used",
                        );
                    }
                }
                "ProductSection" => self.product_section(child, &mut properties)?,
                "OperatingSystemSection" | "AnnotationSection" | "EulaSection" => {
                    self.skip(format!("{} in {label}", child.qname), "informational");
                }
                _ => self.not_understood(child, &label)?,
            }
        }
        let hardware = hardware.ok_or_else(|| OvfError::Missing {
            element: label.clone(),
            what: "VirtualHardwareSection",
        })?;
        let mapped = self.hardware(hardware)?;
        let name = name
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| id.to_owned());
        let template = VmTemplate {
            system_id: id.to_owned(),
            name,
            vcpus: mapped.vcpus,
            memory_mib: mapped.memory_mib,
            disks: mapped.disks,
            networks: mapped.networks,
            boot: None,
            monitoring,
            properties,
        };
        Ok((template, mapped.disk_files))
    }

    fn hardware(&mut self, section: &Element) -> Result<MappedHardware, OvfError> {
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

    fn product_section(
        &mut self,
        section: &Element,
        properties: &mut BTreeMap<String, String>,
    ) -> Result<(), OvfError> {
        let class = self
            .attr(section, "class")
            .map(|c| format!("{}.", c.trim()))
            .unwrap_or_default();
        let instance = self
            .attr(section, "instance")
            .map(|i| format!(".{}", i.trim()))
            .unwrap_or_default();
        let mut insert = |key: String, value: String| {
            if properties.insert(key.clone(), value).is_some() {
                return Err(OvfError::Duplicate {
                    element: "Property".into(),
                    attribute: "ovf:key",
                    value: clip(&key),
                });
            }
            Ok(())
        };
        for el in &section.children {
            if !self.is_ovf(el) {
                self.not_understood(el, "ProductSection")?;
                continue;
            }
            let meta = match el.local.as_str() {
                "Product" => "product",
                "Vendor" => "vendor",
                "Version" => "version",
                "FullVersion" => "full_version",
                "Property" => {
                    let key = self.attr(el, "key").ok_or(OvfError::Missing {
                        element: el.qname.clone(),
                        what: "ovf:key",
                    })?;
                    let mut value = self.attr(el, "value").unwrap_or("").to_owned();
                    // A `Value` child overrides the default in its configuration.
                    for v in el.children_named(&self.ns, "Value") {
                        let applies = self.attr(v, "configuration").is_some_and(|c| {
                            self.selected
                                .as_ref()
                                .is_some_and(|s| c.split_whitespace().any(|x| x == s))
                        });
                        if applies {
                            value = self.attr(v, "value").unwrap_or("").to_owned();
                        }
                    }
                    let full_key = format!("{class}{key}{instance}");
                    if self.attr(el, "password").map(str::trim) == Some("true") && !value.is_empty()
                    {
                        return Err(OvfError::SecretProperty { key: full_key });
                    }
                    insert(full_key, value)?;
                    continue;
                }
                _ => continue,
            };
            let text = el.text.trim();
            if !text.is_empty() {
                insert(format!("ovf.{class}{meta}{instance}"), text.to_owned())?;
            }
        }
        Ok(())
    }

    fn monitoring_section(
        &mut self,
        section: &Element,
        out: &mut Vec<MonitoringSpecifier>,
    ) -> Result<(), OvfError> {
        for el in &section.children {
            if el.local == "Info" {
                continue;
            }
            if !el.is(NUBIS_MONITORING_NS, "Specifier") {
                self.not_understood(el, "MonitoringSection")?;
                continue;
            }
            out.push(specifier(el)?);
        }
        Ok(())
    }
}

const SPECIFIER_ATTRIBUTES: &[&str] = &[
    "dataPoint",
    "monitoringIntervalMs",
    "deliveryIntervalMs",
    "format",
    "predicate",
    "sealed",
];

fn specifier(el: &Element) -> Result<MonitoringSpecifier, OvfError> {
    let dp = el.attr_plain("dataPoint").ok_or(OvfError::Missing {
        element: "Specifier".into(),
        what: "dataPoint",
    })?;
    let label = format!("Specifier {dp:?}");
    if let Some(unknown) = el
        .attrs
        .iter()
        .find(|a| a.ns.is_none() && !SPECIFIER_ATTRIBUTES.contains(&a.local.as_str()))
    {
        return Err(OvfError::UnknownAttribute {
            element: label,
            attribute: unknown.local.clone(),
        });
    }
    let invalid = |attribute, value: &str, reason| OvfError::InvalidValue {
        element: label.clone(),
        attribute,
        value: clip(value),
        reason,
    };
    let data_point = DataPoint::new(dp).map_err(|_| {
        invalid(
            "dataPoint",
            dp,
            "not a data point name (dot-separated [A-Za-z0-9_-] tokens)",
        )
    })?;
    let ms = |attribute: &'static str, default: Option<u64>| -> Result<u64, OvfError> {
        match (el.attr_plain(attribute), default) {
            (Some(v), _) => v
                .trim()
                .parse()
                .map_err(|_| invalid(attribute, v, "not a number of milliseconds")),
            (None, Some(d)) => Ok(d),
            (None, None) => Err(OvfError::Missing {
                element: label.clone(),
                what: attribute,
            }),
        }
    };
    let monitoring_interval_ms = ms("monitoringIntervalMs", None)?;
    let delivery_interval_ms = ms("deliveryIntervalMs", Some(0))?;
    let format = match el.attr_plain("format") {
        None => nubis_protocol::descriptor::DeliveryFormat::Raw,
        Some(f) => parse_format(f)
            .ok_or_else(|| invalid("format", f, "expected raw, min, max, mean or median"))?,
    };
    let predicate = match el.attr_plain("predicate") {
        None => None,
        Some(p) => Some(parse_predicate(p).ok_or_else(|| {
            invalid(
                "predicate",
                p,
                "expected <lt|le|gt|ge|eq|ne>:<finite number>, e.g. lt:0.5",
            )
        })?),
    };
    let sealed = match el.attr_plain("sealed").map(str::trim) {
        None | Some("false" | "0") => false,
        Some("true" | "1") => true,
        Some(other) => return Err(invalid("sealed", other, "expected true or false")),
    };
    Ok(MonitoringSpecifier {
        data_point,
        monitoring_interval_ms,
        delivery_interval_ms,
        format,
        predicate,
        sealed,
    })
}

#[derive(Default)]
struct MappedHardware {
    vcpus: Option<u32>,
    memory_mib: Option<u64>,
    disks: Vec<DiskSpec>,
    networks: Vec<NetworkSpec>,
    disk_files: Vec<DiskFile>,
}

/// `vda`, `vdb`, …, `vdz`, `vdaa`, … for the `index`-th disk.
fn device_name(index: usize) -> String {
    let mut letters = Vec::new();
    let mut n = index;
    loop {
        letters.push(b'a' + (n % 26) as u8);
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    letters.reverse();
    format!("vd{}", String::from_utf8_lossy(&letters))
}

/// An OVF network name as a descriptor network name: lower-case letters and digits, other runs
/// of characters turned into one `-`, at most the length of an identifier.
pub fn network_token(name: &str) -> Option<String> {
    let mut out = String::new();
    let mut dash = false;
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            if dash && !out.is_empty() {
                out.push('-');
            }
            dash = false;
            out.push(c.to_ascii_lowercase());
        } else {
            dash = true;
        }
    }
    out.truncate(MAX_ID_LEN);
    let out = out.trim_end_matches('-').to_owned();
    (!out.is_empty()).then_some(out)
}

/// A `ResourceSubType` as a libvirt NIC model; `virtio` when none is given.
fn nic_model(subtype: Option<&str>) -> String {
    let Some(subtype) = subtype.map(str::trim).filter(|s| !s.is_empty()) else {
        return "virtio".into();
    };
    let lower = subtype.to_ascii_lowercase();
    match lower.as_str() {
        "pcnet32" | "pcnet" | "am79c970a" | "am79c973" => "pcnet".into(),
        "virtio" | "virtio-net" | "virtio_net" => "virtio".into(),
        _ => network_token(&lower).unwrap_or_else(|| "virtio".into()),
    }
}

/// The format named by an `ovf:format` URI (or a file name's extension).
fn disk_format(uri: &str) -> Option<DiskFormat> {
    let lower = uri.to_ascii_lowercase();
    if lower.contains("vmdk") {
        Some(DiskFormat::Vmdk)
    } else if lower.contains("qcow") {
        Some(DiskFormat::Qcow2)
    } else if lower.contains("vhdx") {
        Some(DiskFormat::Vhdx)
    } else if lower.contains("vdi") || lower.contains("virtualbox") {
        Some(DiskFormat::Vdi)
    } else if lower.contains("raw")
        || lower.contains("dd_%28unix%29")
        || lower.ends_with(".img")
        || lower.ends_with(".iso")
    {
        Some(DiskFormat::Raw)
    } else {
        None
    }
}

/// The image-store name of a package file: the last segment of a relative href.
fn image_name(href: &str) -> Option<String> {
    if href.contains("://") || href.starts_with('/') {
        return None;
    }
    let name = href.rsplit('/').next().unwrap_or(href);
    is_image_name(name).then(|| name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names() {
        assert_eq!(device_name(0), "vda");
        assert_eq!(device_name(25), "vdz");
        assert_eq!(device_name(26), "vdaa");
        assert_eq!(device_name(27), "vdab");
    }

    #[test]
    fn network_tokens() {
        assert_eq!(network_token("VM Network").as_deref(), Some("vm-network"));
        assert_eq!(network_token("NAT").as_deref(), Some("nat"));
        assert_eq!(network_token("  --x__y  ").as_deref(), Some("x-y"));
        assert_eq!(network_token("§$%"), None);
        assert_eq!(
            network_token(&"a ".repeat(100)).map(|t| t.len() <= 64),
            Some(true)
        );
    }

    #[test]
    fn nic_models() {
        assert_eq!(nic_model(Some("VMXNET3")), "vmxnet3");
        assert_eq!(nic_model(Some("E1000")), "e1000");
        assert_eq!(nic_model(Some("PCNet32")), "pcnet");
        assert_eq!(nic_model(None), "virtio");
    }

    #[test]
    fn disk_formats() {
        let vmdk = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized";
        assert_eq!(disk_format(vmdk), Some(DiskFormat::Vmdk));
        assert_eq!(
            disk_format("http://www.gnome.org/~markmc/qcow-image-format.html"),
            Some(DiskFormat::Qcow2)
        );
        assert_eq!(disk_format("disk.img"), Some(DiskFormat::Raw));
        assert_eq!(disk_format("urn:acme:mystery"), None);
    }

    #[test]
    fn image_names() {
        assert_eq!(image_name("disks/a.vmdk").as_deref(), Some("a.vmdk"));
        assert_eq!(image_name("http://example.org/a.vmdk"), None);
        assert_eq!(image_name("/etc/passwd"), None);
        assert_eq!(image_name("a b.vmdk"), None);
    }
}
