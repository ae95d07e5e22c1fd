//! The reader of an envelope: its state while it walks the envelope, and the envelope-level
//! sections it resolves before the virtual system (`References`, `DiskSection`,
//! `NetworkSection`, `DeploymentOptionSection`) and the virtual system itself.

use std::collections::{BTreeMap, BTreeSet};

use super::names::network_token;
use super::{DiskFile, Ignored, ParseOptions, NUBIS_MONITORING_NS};
use crate::error::{clip, OvfError};
use crate::template::VmTemplate;
use crate::units::byte_multiplier;
use crate::xml::Element;

pub(super) struct FileDecl {
    pub(super) href: String,
    pub(super) size: Option<u64>,
    pub(super) compression: Option<String>,
}

pub(super) struct DiskDecl {
    pub(super) capacity_bytes: u64,
    pub(super) file: Option<String>,
    pub(super) format: Option<String>,
}

pub(super) struct Reader {
    pub(super) ns: String,
    pub(super) ignored: Vec<Ignored>,
    pub(super) files: BTreeMap<String, FileDecl>,
    pub(super) disks: BTreeMap<String, DiskDecl>,
    /// OVF network name → descriptor network name.
    pub(super) networks: BTreeMap<String, String>,
    pub(super) configurations: Vec<String>,
    pub(super) selected: Option<String>,
}

impl Reader {
    pub(super) fn is_ovf(&self, el: &Element) -> bool {
        el.ns.as_deref() == Some(self.ns.as_str())
    }

    /// An `ovf:` attribute; an unprefixed one is accepted too, as hand-written files use it.
    pub(super) fn attr<'a>(&self, el: &'a Element, local: &str) -> Option<&'a str> {
        el.attr_ns(&self.ns, local).or_else(|| el.attr_plain(local))
    }

    pub(super) fn required(&self, el: &Element) -> bool {
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

    pub(super) fn skip(&mut self, element: String, reason: &'static str) {
        self.ignored.push(Ignored { element, reason });
    }

    /// An element this reader does not map: an error if required, else noted and skipped.
    pub(super) fn not_understood(&mut self, el: &Element, parent: &str) -> Result<(), OvfError> {
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

    pub(super) fn envelope(
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
}
