//! The VM Descriptor (paper section II-A.1 and IV): virtual hardware, the primary site's public
//! keys and the monitoring specifiers that configure Producers and Consumers.
//!
//! The descriptor travels with every Migration request and every descriptor change of the
//! Control interface, so it must never contain anything that locates the VM: disk images and
//! kernels are named by their image-store name at the primary site, not by a path.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::clip::clip;
use crate::ids::{SiteId, VmId};

mod data_point;
mod monitoring;
#[cfg(test)]
pub(crate) mod tests;

pub use data_point::{DataPoint, DataPointClass};
pub use monitoring::{
    Aggregate, DeliveryFormat, DeliveryScheme, MonitoringSpecifier, Predicate, PredicateOp,
};

/// Longest accepted data point name, in bytes.
pub const MAX_DATA_POINT_LEN: usize = 128;

/// Longest accepted image-store name, in bytes.
pub const MAX_IMAGE_NAME_LEN: usize = 128;

/// Most disks, networks, monitoring specifiers or properties one descriptor may list.
pub const MAX_DESCRIPTOR_ITEMS: usize = 256;

/// Longest accepted descriptor name, property key or property value, in bytes.
pub const MAX_TEXT_LEN: usize = 1024;

/// Longest part of an offending value that a [`DescriptorError::Invalid`] quotes, in bytes.
const SHOWN_VALUE_LEN: usize = 80;

/// Declares a string enum whose wire form is a snake_case string and whose unknown strings
/// decode to an `Other` variant instead of failing, so that a newer peer's value still decodes.
macro_rules! open_string_enum {
    (
        $(#[$doc:meta])*
        $name:ident { $( $(#[$vdoc:meta])* $variant:ident => $text:literal, )+ }
    ) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vdoc])* $variant, )+
            /// A value this build does not know; kept verbatim.
            Other(String),
        }

        impl $name {
            /// Every value this build knows, in declaration order.
            pub const KNOWN: &'static [$name] = &[ $( $name::$variant, )+ ];

            /// The wire string.
            pub fn as_str(&self) -> &str {
                match self {
                    $( $name::$variant => $text, )+
                    $name::Other(s) => s.as_str(),
                }
            }

            /// The value for a wire string; unknown strings become `Other`.
            pub fn from_wire(s: &str) -> Self {
                match s {
                    $( $text => $name::$variant, )+
                    other => $name::Other(other.to_owned()),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <String as serde::Deserialize>::deserialize(d)?;
                Ok(Self::from_wire(&s))
            }
        }
    };
}
pub(crate) use open_string_enum;

/// Why a descriptor or one of its names is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DescriptorError {
    /// The descriptor asks for no virtual CPU.
    #[error("vcpus must be at least 1")]
    NoVcpus,
    /// The descriptor asks for no memory.
    #[error("memory must be at least 1 MiB")]
    NoMemory,
    /// A disk, network, boot file or text field has an invalid name or value.
    #[error("invalid {field}: {value:?}")]
    Invalid {
        /// Which field, e.g. `disk name`.
        field: &'static str,
        /// The offending value (truncated).
        value: String,
    },
    /// Two disks or two networks share a name.
    #[error("duplicate {field} {name:?}")]
    Duplicate {
        /// `disk` or `network`.
        field: &'static str,
        /// The repeated name.
        name: String,
    },
    /// A list or map has more than [`MAX_DESCRIPTOR_ITEMS`] entries.
    #[error("too many {0}")]
    TooMany(&'static str),
    /// A disk has zero capacity.
    #[error("disk {0:?} has zero capacity")]
    EmptyDisk(String),
    /// A predicate threshold is NaN or infinite.
    #[error("predicate threshold of {0:?} is not finite")]
    NonFiniteThreshold(String),
    /// A primary key is all zeros (not a key).
    #[error("primary {0} key is missing")]
    MissingKey(&'static str),
    /// A string is not a valid data point name.
    #[error("invalid data point name {0:?}")]
    DataPoint(String),
}

fn invalid(field: &'static str, value: &str) -> DescriptorError {
    DescriptorError::Invalid {
        field,
        value: clip(value, SHOWN_VALUE_LEN).to_owned(),
    }
}

/// A name from the site id alphabet: `[a-z0-9_-]`, starting with a letter or digit.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= crate::ids::MAX_ID_LEN
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// Whether `s` is a valid image-store name: `[A-Za-z0-9._-]`, at most [`MAX_IMAGE_NAME_LEN`]
/// bytes, not starting with `.`. No `/`, so an image name can never be a path.
pub fn is_image_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_IMAGE_NAME_LEN
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
}

/// The description of one VM, as the primary site wrote it and the Control interface changed it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmDescriptor {
    /// The VM's federation-wide identifier.
    pub id: VmId,
    /// A human-readable name (free text, not an identifier).
    pub name: String,
    /// Descriptor version, bumped by every descriptor change through the Control interface.
    pub version: u64,
    /// The site contractually responsible for the VM.
    pub primary_site: SiteId,
    /// The primary site's public keys.
    pub primary_keys: PrimaryKeys,
    /// The virtual hardware.
    pub hardware: VirtualHardware,
    /// The paper's monitoring specifiers, one or more per data point.
    #[serde(default)]
    pub monitoring: Vec<MonitoringSpecifier>,
    /// Free key/value properties (e.g. the service the VM belongs to).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

/// The primary site's public keys, carried in the descriptor (paper section IV).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrimaryKeys {
    /// Ed25519 verifying key: monitoring and control messages from the primary are signed with it.
    #[serde(with = "serde_bytes")]
    pub signing: [u8; 32],
    /// X25519 public key: sealed monitoring batches and encrypted KPI files are sealed to it.
    #[serde(with = "serde_bytes")]
    pub sealing: [u8; 32],
}

/// The virtual hardware of a VM (the part of OVF the federation needs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtualHardware {
    /// Number of virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Disks, in the order they are attached.
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    /// Network interfaces, in the order they are attached.
    #[serde(default)]
    pub networks: Vec<NetworkSpec>,
    /// Direct kernel boot, when the VM does not boot from a disk.
    #[serde(default)]
    pub boot: Option<KernelBoot>,
}

/// One virtual disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// Device name inside the VM, e.g. `vda`; a subject-safe token.
    pub name: String,
    /// Virtual capacity in bytes.
    pub capacity_bytes: u64,
    /// Image format.
    pub format: DiskFormat,
    /// Name of the initial image in the primary site's image store; `None` for a blank disk.
    #[serde(default)]
    pub image: Option<String>,
}

open_string_enum!(
    /// Disk image format. Unknown formats decode to `Other` so a newer peer's value survives.
    DiskFormat {
        /// Raw image (`raw`).
        Raw => "raw",
        /// QEMU copy-on-write v2 (`qcow2`).
        Qcow2 => "qcow2",
        /// VMware disk (`vmdk`).
        Vmdk => "vmdk",
        /// Hyper-V disk (`vhdx`).
        Vhdx => "vhdx",
        /// VirtualBox disk (`vdi`).
        Vdi => "vdi",
    }
);

/// One virtual network interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSpec {
    /// Name of the virtual network the interface joins; a subject-safe token.
    pub name: String,
    /// Device model, e.g. `virtio`, `e1000`; a subject-safe token.
    pub model: String,
}

/// Direct kernel boot; files are image-store names, never paths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelBoot {
    /// Kernel image name in the primary site's image store.
    pub kernel: String,
    /// Initial ramdisk image name, if any.
    #[serde(default)]
    pub initrd: Option<String>,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: String,
}

fn check_text(field: &'static str, s: &str) -> Result<(), DescriptorError> {
    if s.len() > MAX_TEXT_LEN || s.chars().any(char::is_control) {
        return Err(invalid(field, s));
    }
    Ok(())
}

fn check_count(what: &'static str, n: usize) -> Result<(), DescriptorError> {
    if n > MAX_DESCRIPTOR_ITEMS {
        return Err(DescriptorError::TooMany(what));
    }
    Ok(())
}

impl VmDescriptor {
    /// Checks what serde cannot: non-zero hardware, unique and well-formed device names,
    /// image-store names that cannot be paths, finite thresholds, present keys, bounded sizes.
    pub fn validate(&self) -> Result<(), DescriptorError> {
        if self.name.is_empty() {
            return Err(invalid("name", &self.name));
        }
        check_text("name", &self.name)?;
        if self.primary_keys.signing == [0; 32] {
            return Err(DescriptorError::MissingKey("signing"));
        }
        if self.primary_keys.sealing == [0; 32] {
            return Err(DescriptorError::MissingKey("sealing"));
        }
        self.hardware.validate()?;
        check_count("monitoring specifiers", self.monitoring.len())?;
        for spec in &self.monitoring {
            if let Some(p) = &spec.predicate {
                if !p.threshold.is_finite() {
                    return Err(DescriptorError::NonFiniteThreshold(
                        spec.data_point.to_string(),
                    ));
                }
            }
        }
        check_count("properties", self.properties.len())?;
        for (k, v) in &self.properties {
            if k.is_empty() {
                return Err(invalid("property key", k));
            }
            check_text("property key", k)?;
            check_text("property value", v)?;
        }
        Ok(())
    }
}

impl VirtualHardware {
    fn validate(&self) -> Result<(), DescriptorError> {
        if self.vcpus == 0 {
            return Err(DescriptorError::NoVcpus);
        }
        if self.memory_mib == 0 {
            return Err(DescriptorError::NoMemory);
        }
        check_count("disks", self.disks.len())?;
        let mut seen = BTreeSet::new();
        for d in &self.disks {
            if !is_token(&d.name) {
                return Err(invalid("disk name", &d.name));
            }
            if !seen.insert(d.name.as_str()) {
                return Err(DescriptorError::Duplicate {
                    field: "disk",
                    name: d.name.clone(),
                });
            }
            if d.capacity_bytes == 0 {
                return Err(DescriptorError::EmptyDisk(d.name.clone()));
            }
            if let DiskFormat::Other(f) = &d.format {
                if !is_token(f) {
                    return Err(invalid("disk format", f));
                }
            }
            if let Some(img) = &d.image {
                if !is_image_name(img) {
                    return Err(invalid("disk image", img));
                }
            }
        }
        check_count("networks", self.networks.len())?;
        let mut seen = BTreeSet::new();
        for n in &self.networks {
            if !is_token(&n.name) {
                return Err(invalid("network name", &n.name));
            }
            if !is_token(&n.model) {
                return Err(invalid("network model", &n.model));
            }
            if !seen.insert(n.name.as_str()) {
                return Err(DescriptorError::Duplicate {
                    field: "network",
                    name: n.name.clone(),
                });
            }
        }
        if let Some(boot) = &self.boot {
            if !is_image_name(&boot.kernel) {
                return Err(invalid("kernel image", &boot.kernel));
            }
            if let Some(initrd) = &boot.initrd {
                if !is_image_name(initrd) {
                    return Err(invalid("initrd image", initrd));
                }
            }
            check_text("kernel command line", &boot.cmdline)?;
        }
        Ok(())
    }
}
