//! The TOML form of a VM, for people who do not have an OVF package.
//!
//! Two shapes share one vocabulary: a *template* (what an OVF package also yields; the site
//! assigns id and keys at deployment) and a full *descriptor* (adds `id`, `primary_site`,
//! optionally `version`, and `[primary_keys]` in the `ed25519:`/`x25519:` text form that
//! `nubis keys show` prints). Monitoring specifiers use the same compact text as the OVF
//! extension: `format = "median"`, `predicate = "gt:0.9"`. Unknown keys are refused, so a typo
//! cannot silently drop a disk or a specifier.
//!
//! ```toml
//! name = "web front end"
//!
//! [hardware]
//! vcpus = 2
//! memory_mib = 2048
//!
//! [[hardware.disks]]
//! name = "vda"
//! capacity_bytes = 10737418240
//! format = "qcow2"
//! image = "debian-12.qcow2"
//!
//! [[hardware.networks]]
//! name = "service-net"
//! model = "virtio"
//!
//! [[monitoring]]
//! data_point = "cpu.utilisation"
//! monitoring_interval_ms = 1000
//! delivery_interval_ms = 10000
//! format = "median"
//!
//! [properties]
//! service = "shop"
//! ```

use std::collections::BTreeMap;

use nubis_protocol::descriptor::{
    DataPoint, DescriptorError, DiskFormat, DiskSpec, KernelBoot, MonitoringSpecifier, NetworkSpec,
    PrimaryKeys,
};
use nubis_protocol::identity::{parse_sealing_key, parse_signing_key, KeyError};
use nubis_protocol::{SiteId, VmId};
use serde::Deserialize;

use crate::error::OvfError;
use crate::spec::{parse_format, parse_predicate};
use crate::template::VmTemplate;

/// Why a TOML descriptor or template was refused.
#[derive(Debug, thiserror::Error)]
pub enum TomlError {
    /// Not TOML of the expected shape; the message names the key and line.
    #[error("invalid descriptor TOML")]
    Parse(#[from] Box<toml::de::Error>),
    /// A value has the right type but cannot be used.
    #[error("`{key}` = {value:?}: {reason}")]
    Invalid {
        /// The key, e.g. `monitoring[1].predicate`.
        key: String,
        /// The value.
        value: String,
        /// What is expected instead.
        reason: &'static str,
    },
    /// A primary key is not in the `ed25519:`/`x25519:` form.
    #[error("`primary_keys`")]
    Key(#[from] KeyError),
    /// The result breaks a rule of the descriptor.
    #[error("the descriptor is invalid")]
    Descriptor(#[from] DescriptorError),
    /// The template lacks hardware a VM needs.
    #[error("the template cannot become a descriptor")]
    Template(#[from] OvfError),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHardware {
    vcpus: u32,
    memory_mib: u64,
    #[serde(default)]
    disks: Vec<RawDisk>,
    #[serde(default)]
    networks: Vec<RawNetwork>,
    #[serde(default)]
    boot: Option<RawBoot>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDisk {
    name: String,
    capacity_bytes: u64,
    format: String,
    #[serde(default)]
    image: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    name: String,
    #[serde(default = "virtio")]
    model: String,
}

fn virtio() -> String {
    "virtio".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBoot {
    kernel: String,
    #[serde(default)]
    initrd: Option<String>,
    #[serde(default)]
    cmdline: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpecifier {
    data_point: String,
    monitoring_interval_ms: u64,
    #[serde(default)]
    delivery_interval_ms: u64,
    #[serde(default)]
    format: Option<String>,
    #[serde(default)]
    predicate: Option<String>,
    #[serde(default)]
    sealed: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTemplate {
    name: String,
    hardware: RawHardware,
    #[serde(default)]
    monitoring: Vec<RawSpecifier>,
    #[serde(default)]
    properties: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeys {
    signing: String,
    sealing: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDescriptor {
    id: VmId,
    primary_site: SiteId,
    #[serde(default)]
    version: Option<u64>,
    primary_keys: RawKeys,
    name: String,
    hardware: RawHardware,
    #[serde(default)]
    monitoring: Vec<RawSpecifier>,
    #[serde(default)]
    properties: BTreeMap<String, String>,
}

fn specifiers(raw: Vec<RawSpecifier>) -> Result<Vec<MonitoringSpecifier>, TomlError> {
    raw.into_iter()
        .enumerate()
        .map(|(i, s)| {
            let invalid = |field: &str, value: &str, reason| TomlError::Invalid {
                key: format!("monitoring[{i}].{field}"),
                value: value.to_owned(),
                reason,
            };
            let data_point = DataPoint::new(s.data_point.as_str()).map_err(|_| {
                invalid(
                    "data_point",
                    &s.data_point,
                    "not a data point name (dot-separated [A-Za-z0-9_-] tokens)",
                )
            })?;
            let format = match &s.format {
                None => nubis_protocol::descriptor::DeliveryFormat::Raw,
                Some(f) => parse_format(f).ok_or_else(|| {
                    invalid("format", f, "expected raw, min, max, mean or median")
                })?,
            };
            let predicate = match &s.predicate {
                None => None,
                Some(p) => Some(parse_predicate(p).ok_or_else(|| {
                    invalid(
                        "predicate",
                        p,
                        "expected <lt|le|gt|ge|eq|ne>:<finite number>, e.g. lt:0.5",
                    )
                })?),
            };
            Ok(MonitoringSpecifier {
                data_point,
                monitoring_interval_ms: s.monitoring_interval_ms,
                delivery_interval_ms: s.delivery_interval_ms,
                format,
                predicate,
                sealed: s.sealed,
            })
        })
        .collect()
}

fn template(
    name: String,
    hardware: RawHardware,
    monitoring: Vec<RawSpecifier>,
    properties: BTreeMap<String, String>,
) -> Result<VmTemplate, TomlError> {
    Ok(VmTemplate {
        system_id: name.clone(),
        name,
        vcpus: Some(hardware.vcpus),
        memory_mib: Some(hardware.memory_mib),
        disks: hardware
            .disks
            .into_iter()
            .map(|d| DiskSpec {
                name: d.name,
                capacity_bytes: d.capacity_bytes,
                format: DiskFormat::from_wire(&d.format),
                image: d.image,
            })
            .collect(),
        networks: hardware
            .networks
            .into_iter()
            .map(|n| NetworkSpec {
                name: n.name,
                model: n.model,
            })
            .collect(),
        boot: hardware.boot.map(|b| KernelBoot {
            kernel: b.kernel,
            initrd: b.initrd,
            cmdline: b.cmdline,
        }),
        monitoring: specifiers(monitoring)?,
        properties,
    })
}

impl VmTemplate {
    /// Reads the template form (no id, primary site or keys).
    pub fn from_toml(text: &str) -> Result<Self, TomlError> {
        let raw: RawTemplate = toml::from_str(text).map_err(Box::new)?;
        template(raw.name, raw.hardware, raw.monitoring, raw.properties)
    }
}

/// Reads the full descriptor form and validates the result.
pub fn descriptor_from_toml(
    text: &str,
) -> Result<nubis_protocol::descriptor::VmDescriptor, TomlError> {
    let raw: RawDescriptor = toml::from_str(text).map_err(Box::new)?;
    let keys = PrimaryKeys {
        signing: parse_signing_key(&raw.primary_keys.signing, "primary_keys.signing")?.to_bytes(),
        sealing: parse_sealing_key(&raw.primary_keys.sealing, "primary_keys.sealing")?,
    };
    let t = template(raw.name, raw.hardware, raw.monitoring, raw.properties)?;
    let mut descriptor =
        t.into_descriptor(raw.id, raw.primary_site, keys)
            .map_err(|e| match e {
                OvfError::Descriptor(d) => TomlError::Descriptor(d),
                other => TomlError::Template(other),
            })?;
    if let Some(v) = raw.version {
        descriptor.version = v;
    }
    descriptor.validate()?;
    Ok(descriptor)
}
