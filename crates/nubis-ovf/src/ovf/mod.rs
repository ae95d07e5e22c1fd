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

use std::collections::BTreeMap;

use nubis_protocol::descriptor::{PrimaryKeys, VmDescriptor};
use nubis_protocol::{SiteId, VmId};

use crate::error::{clip, OvfError};
use crate::template::VmTemplate;
use crate::xml::{self, Element};

mod hardware;
mod names;
mod reader;
mod sections;

pub use names::network_token;
use reader::Reader;

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
