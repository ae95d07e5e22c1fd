//! The VM Descriptor (paper section II-A.1 and IV): virtual hardware, the primary site's public
//! keys and the monitoring specifiers that configure Producers and Consumers.
//!
//! The descriptor travels with every Migration request and every descriptor change of the
//! Control interface, so it must never contain anything that locates the VM: disk images and
//! kernels are named by their image-store name at the primary site, not by a path.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ids::{SiteId, VmId};

/// Longest accepted data point name, in bytes.
pub const MAX_DATA_POINT_LEN: usize = 128;

/// Longest accepted image-store name, in bytes.
pub const MAX_IMAGE_NAME_LEN: usize = 128;

/// Most disks, networks, monitoring specifiers or properties one descriptor may list.
pub const MAX_DESCRIPTOR_ITEMS: usize = 256;

/// Longest accepted descriptor name, property key or property value, in bytes.
pub const MAX_TEXT_LEN: usize = 1024;

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
    let mut value = value.to_owned();
    if value.len() > 80 {
        let mut cut = 80;
        while !value.is_char_boundary(cut) {
            cut -= 1;
        }
        value.truncate(cut);
    }
    DescriptorError::Invalid { field, value }
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

/// The name of something that can be monitored, e.g. `cpu.utilisation`, `mem.used`,
/// `disk.vda.read_bytes_rate`, or `kpi.<table>.<column>` for an application KPI.
///
/// One to [`MAX_DATA_POINT_LEN`] bytes of dot-separated tokens, each token non-empty and made of
/// `[A-Za-z0-9_-]`. The tokens become NATS subject tokens (see
/// [`crate::subject::Subject::monitoring`]), so no wildcard or whitespace can slip in. A name
/// whose first token is `kpi` is an application KPI, any other name an infrastructure
/// measurement.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DataPoint(String);

/// What a data point measures, derived from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPointClass {
    /// A measurement taken by the hypervisor (Implementation layer).
    Infra,
    /// An application KPI from the VM's KPI filesystem.
    Kpi,
}

impl DataPoint {
    /// Validates and wraps `s`.
    pub fn new(s: impl Into<String>) -> Result<Self, DescriptorError> {
        let s = s.into();
        if Self::is_valid(&s) {
            Ok(Self(s))
        } else {
            Err(DescriptorError::DataPoint(s))
        }
    }

    fn is_valid(s: &str) -> bool {
        !s.is_empty()
            && s.len() <= MAX_DATA_POINT_LEN
            && s.split('.').all(|t| {
                !t.is_empty()
                    && t.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            })
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is an infrastructure measurement or an application KPI.
    pub fn class(&self) -> DataPointClass {
        if self.0 == "kpi" || self.0.starts_with("kpi.") {
            DataPointClass::Kpi
        } else {
            DataPointClass::Infra
        }
    }
}

impl fmt::Display for DataPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for DataPoint {
    type Err = DescriptorError;
    fn from_str(s: &str) -> Result<Self, DescriptorError> {
        Self::new(s)
    }
}

impl Serialize for DataPoint {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for DataPoint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(s).map_err(serde::de::Error::custom)
    }
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

/// The paper's monitoring specifier: what to measure, how often, how to deliver it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MonitoringSpecifier {
    /// What is measured.
    pub data_point: DataPoint,
    /// Milliseconds between measurements; 0 = as often as possible.
    pub monitoring_interval_ms: u64,
    /// Milliseconds between deliveries; 0 = as soon as a value is available.
    pub delivery_interval_ms: u64,
    /// Raw samples, or one processed value per delivery interval.
    pub format: DeliveryFormat,
    /// Deliver only the values for which this holds (the paper's predicate scheme).
    #[serde(default)]
    pub predicate: Option<Predicate>,
    /// Seal the delivered values to the primary site's sealing key.
    #[serde(default)]
    pub sealed: bool,
}

/// The paper's three delivery schemes, derived from a [`MonitoringSpecifier`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DeliveryScheme {
    /// (a) As soon as a value is available.
    AsSoonAsAvailable,
    /// (b) At regular intervals.
    AtIntervals {
        /// Milliseconds between deliveries.
        every_ms: u64,
    },
    /// (c) When a predicate holds for the value; checked at the specifier's delivery interval.
    WhenPredicateHolds(Predicate),
}

impl MonitoringSpecifier {
    /// The delivery scheme this specifier asks for. With a predicate, values for which it does
    /// not hold are never delivered; without one, the delivery interval decides.
    pub fn delivery_scheme(&self) -> DeliveryScheme {
        match (self.predicate, self.delivery_interval_ms) {
            (Some(p), _) => DeliveryScheme::WhenPredicateHolds(p),
            (None, 0) => DeliveryScheme::AsSoonAsAvailable,
            (None, every_ms) => DeliveryScheme::AtIntervals { every_ms },
        }
    }
}

/// Raw or processed delivery. On the wire a map tagged by `kind`:
/// `{"kind":"raw"}` or `{"kind":"processed","aggregate":"median"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DeliveryFormat {
    /// Every sample measured during the delivery interval.
    Raw,
    /// One value per delivery interval, computed with `aggregate`.
    Processed {
        /// The function applied to the samples of the interval.
        aggregate: Aggregate,
    },
}

/// The mathematical functions of the processed delivery format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregate {
    /// Smallest sample.
    Min,
    /// Largest sample.
    Max,
    /// Arithmetic mean.
    Mean,
    /// Median; the mean of the two middle samples for an even count.
    Median,
}

impl Aggregate {
    /// Applies the function to `values`; `None` when there are none. NaN samples are ignored.
    pub fn apply(self, values: &[f64]) -> Option<f64> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return None;
        }
        Some(match self {
            Aggregate::Min => v.iter().copied().fold(f64::INFINITY, f64::min),
            Aggregate::Max => v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            Aggregate::Mean => v.iter().sum::<f64>() / v.len() as f64,
            Aggregate::Median => {
                v.sort_by(f64::total_cmp);
                let mid = v.len() / 2;
                if v.len() % 2 == 1 {
                    v[mid]
                } else {
                    (v[mid - 1] + v[mid]) / 2.0
                }
            }
        })
    }
}

/// "Deliver when it holds": `value <op> threshold`, e.g. `{"op":"lt","threshold":0.2}`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Predicate {
    /// The comparison.
    pub op: PredicateOp,
    /// The right-hand side.
    pub threshold: f64,
}

/// A comparison operator of a [`Predicate`]; `lt`, `le`, `gt`, `ge`, `eq`, `ne` on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredicateOp {
    /// value < threshold
    Lt,
    /// value ≤ threshold
    Le,
    /// value > threshold
    Gt,
    /// value ≥ threshold
    Ge,
    /// value = threshold (exact floating-point equality)
    Eq,
    /// value ≠ threshold
    Ne,
}

impl Predicate {
    /// Whether the predicate holds for `v`. A NaN value never satisfies any predicate.
    pub fn holds(&self, v: f64) -> bool {
        if v.is_nan() {
            return false;
        }
        let t = self.threshold;
        match self.op {
            PredicateOp::Lt => v < t,
            PredicateOp::Le => v <= t,
            PredicateOp::Gt => v > t,
            PredicateOp::Ge => v >= t,
            PredicateOp::Eq => v == t,
            PredicateOp::Ne => v != t,
        }
    }
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::codec;

    pub(crate) fn sample_descriptor() -> VmDescriptor {
        VmDescriptor {
            id: VmId::new("vm-1").unwrap(),
            name: "web front end".into(),
            version: 3,
            primary_site: SiteId::new("site-a").unwrap(),
            primary_keys: PrimaryKeys {
                signing: [7; 32],
                sealing: [9; 32],
            },
            hardware: VirtualHardware {
                vcpus: 2,
                memory_mib: 2048,
                disks: vec![
                    DiskSpec {
                        name: "vda".into(),
                        capacity_bytes: 10 << 30,
                        format: DiskFormat::Qcow2,
                        image: Some("debian-12.qcow2".into()),
                    },
                    DiskSpec {
                        name: "vdb".into(),
                        capacity_bytes: 1 << 30,
                        format: DiskFormat::Raw,
                        image: None,
                    },
                ],
                networks: vec![NetworkSpec {
                    name: "service-net".into(),
                    model: "virtio".into(),
                }],
                boot: None,
            },
            monitoring: vec![
                MonitoringSpecifier {
                    data_point: DataPoint::new("cpu.utilisation").unwrap(),
                    monitoring_interval_ms: 1000,
                    delivery_interval_ms: 10_000,
                    format: DeliveryFormat::Processed {
                        aggregate: Aggregate::Median,
                    },
                    predicate: None,
                    sealed: false,
                },
                MonitoringSpecifier {
                    data_point: DataPoint::new("kpi.web.current_users").unwrap(),
                    monitoring_interval_ms: 0,
                    delivery_interval_ms: 0,
                    format: DeliveryFormat::Raw,
                    predicate: Some(Predicate {
                        op: PredicateOp::Gt,
                        threshold: 1000.0,
                    }),
                    sealed: true,
                },
            ],
            properties: BTreeMap::from([("service".into(), "shop".into())]),
        }
    }

    #[test]
    fn descriptor_round_trips_and_validates() {
        let d = sample_descriptor();
        d.validate().unwrap();
        let bytes = codec::to_vec(&d).unwrap();
        assert_eq!(codec::from_slice::<VmDescriptor>(&bytes).unwrap(), d);
    }

    #[test]
    fn keys_are_msgpack_bin() {
        let bytes = codec::to_vec(&sample_descriptor().primary_keys).unwrap();
        // map of 2, "signing", bin8 of 32 bytes.
        assert_eq!(&bytes[..10], b"\x82\xa7signing\xc4");
        assert_eq!(bytes[10], 32);
    }

    #[test]
    fn delivery_format_is_tagged_by_kind() {
        let v = serde_json::to_value(DeliveryFormat::Processed {
            aggregate: Aggregate::Median,
        })
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"kind": "processed", "aggregate": "median"})
        );
        let raw = codec::to_vec(&DeliveryFormat::Raw).unwrap();
        assert_eq!(raw, b"\x81\xa4kind\xa3raw");
    }

    #[test]
    fn validation_catches_each_problem() {
        let mut d = sample_descriptor();
        d.hardware.vcpus = 0;
        assert_eq!(d.validate(), Err(DescriptorError::NoVcpus));

        let mut d = sample_descriptor();
        d.hardware.memory_mib = 0;
        assert_eq!(d.validate(), Err(DescriptorError::NoMemory));

        let mut d = sample_descriptor();
        d.hardware.disks[1].name = "vda".into();
        assert!(matches!(
            d.validate(),
            Err(DescriptorError::Duplicate { field: "disk", .. })
        ));

        let mut d = sample_descriptor();
        d.hardware.disks[0].image = Some("/var/lib/images/x.qcow2".into());
        assert!(matches!(
            d.validate(),
            Err(DescriptorError::Invalid {
                field: "disk image",
                ..
            })
        ));

        let mut d = sample_descriptor();
        d.hardware.disks[0].capacity_bytes = 0;
        assert!(matches!(d.validate(), Err(DescriptorError::EmptyDisk(_))));

        let mut d = sample_descriptor();
        d.monitoring[1].predicate = Some(Predicate {
            op: PredicateOp::Lt,
            threshold: f64::NAN,
        });
        assert!(matches!(
            d.validate(),
            Err(DescriptorError::NonFiniteThreshold(_))
        ));

        let mut d = sample_descriptor();
        d.primary_keys.sealing = [0; 32];
        assert_eq!(d.validate(), Err(DescriptorError::MissingKey("sealing")));

        let mut d = sample_descriptor();
        d.hardware.boot = Some(KernelBoot {
            kernel: "../vmlinuz".into(),
            initrd: None,
            cmdline: String::new(),
        });
        assert!(matches!(d.validate(), Err(DescriptorError::Invalid { .. })));
    }

    #[test]
    fn data_points_are_subject_safe() {
        for ok in [
            "cpu.utilisation",
            "disk.vda.read_bytes_rate",
            "kpi.web.current_users",
        ] {
            assert!(DataPoint::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "cpu..x", ".cpu", "cpu.", "cpu.*", "cpu.>", "a b", "ü"] {
            assert!(DataPoint::new(bad).is_err(), "{bad:?}");
        }
        assert!(DataPoint::new("x".repeat(MAX_DATA_POINT_LEN + 1)).is_err());
        assert_eq!(
            DataPoint::new("kpi.web.users").unwrap().class(),
            DataPointClass::Kpi
        );
        assert_eq!(
            DataPoint::new("kpis.x").unwrap().class(),
            DataPointClass::Infra
        );
        // A bad name inside a message is refused while decoding.
        let bytes = codec::to_vec("cpu.*").unwrap();
        assert!(codec::from_slice::<DataPoint>(&bytes).is_err());
    }

    #[test]
    fn predicate_semantics() {
        let p = |op, threshold| Predicate { op, threshold };
        assert!(p(PredicateOp::Lt, 1.0).holds(0.5));
        assert!(!p(PredicateOp::Lt, 1.0).holds(1.0));
        assert!(p(PredicateOp::Le, 1.0).holds(1.0));
        assert!(p(PredicateOp::Gt, 1.0).holds(1.5));
        assert!(!p(PredicateOp::Gt, 1.0).holds(1.0));
        assert!(p(PredicateOp::Ge, 1.0).holds(1.0));
        assert!(p(PredicateOp::Eq, 2.0).holds(2.0));
        assert!(!p(PredicateOp::Eq, 2.0).holds(2.5));
        assert!(p(PredicateOp::Ne, 2.0).holds(2.5));
        for op in [PredicateOp::Lt, PredicateOp::Ne, PredicateOp::Ge] {
            assert!(!p(op, 1.0).holds(f64::NAN));
        }
    }

    #[test]
    fn aggregates() {
        let v = [3.0, 1.0, 4.0, 1.0, 5.0];
        assert_eq!(Aggregate::Min.apply(&v), Some(1.0));
        assert_eq!(Aggregate::Max.apply(&v), Some(5.0));
        assert_eq!(Aggregate::Mean.apply(&v), Some(2.8));
        assert_eq!(Aggregate::Median.apply(&v), Some(3.0));
        assert_eq!(Aggregate::Median.apply(&[1.0, 2.0, 3.0, 10.0]), Some(2.5));
        assert_eq!(Aggregate::Mean.apply(&[]), None);
    }

    #[test]
    fn delivery_schemes() {
        let mut s = sample_descriptor().monitoring[0].clone();
        assert_eq!(
            s.delivery_scheme(),
            DeliveryScheme::AtIntervals { every_ms: 10_000 }
        );
        s.delivery_interval_ms = 0;
        assert_eq!(s.delivery_scheme(), DeliveryScheme::AsSoonAsAvailable);
        let p = Predicate {
            op: PredicateOp::Lt,
            threshold: 0.1,
        };
        s.predicate = Some(p);
        assert_eq!(s.delivery_scheme(), DeliveryScheme::WhenPredicateHolds(p));
    }

    #[test]
    fn unknown_disk_format_is_kept() {
        let bytes = codec::to_vec("qed").unwrap();
        let f: DiskFormat = codec::from_slice(&bytes).unwrap();
        assert_eq!(f, DiskFormat::Other("qed".into()));
        assert_eq!(codec::to_vec(&f).unwrap(), bytes);
        assert_eq!(DiskFormat::from_wire("qcow2"), DiskFormat::Qcow2);
    }
}
