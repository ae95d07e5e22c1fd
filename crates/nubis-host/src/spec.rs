//! The host-internal description of a domain: what the host agent asks the hypervisor to run.
//!
//! A [`DomainSpec`] is derived by the host agent from the VM descriptor (which crosses sites) plus
//! host-local facts (file paths under the VM's directory, the serial log, shares). It never leaves
//! the host. [`DomainSpec::validate`] refuses anything that the domain XML could not carry
//! faithfully, so the hypervisor never sees a half-understood request.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Longest domain name accepted; VM identifiers are far shorter.
pub const MAX_NAME_LEN: usize = 128;

/// A domain to be defined on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainSpec {
    /// The domain name, which is the VM identifier.
    pub name: String,
    /// A fixed UUID (`8-4-4-4-12` hex). Derived from the VM identifier by the host agent, so the
    /// same VM has the same UUID on every host, which libvirt requires when a saved state is
    /// restored with a rewritten definition. `None` lets the hypervisor choose.
    pub uuid: Option<String>,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Disks in the order the guest sees them.
    pub disks: Vec<DiskSpec>,
    /// Network interfaces; empty means no network at all.
    pub interfaces: Vec<InterfaceSpec>,
    /// Direct kernel boot; `None` boots from the first disk.
    pub kernel_boot: Option<KernelBoot>,
    /// Host directories exported to the guest over virtio-9p.
    pub filesystems: Vec<FilesystemShare>,
    /// File that receives the guest's first serial port (its console).
    pub serial_log: Option<PathBuf>,
}

/// The on-disk format of a disk image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// A raw image.
    Raw,
    /// A QEMU copy-on-write v2 image.
    Qcow2,
}

impl DiskFormat {
    /// The name libvirt uses for the format.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// One disk of a domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// The image file on this host.
    pub path: PathBuf,
    /// Its format.
    pub format: DiskFormat,
    /// The guest device name (`vda`, `vdb`, …); virtio bus.
    pub target: String,
    /// Virtual size in bytes, for capacity accounting.
    pub capacity_bytes: u64,
    /// Whether the guest may only read it.
    pub read_only: bool,
}

/// One network interface of a domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum InterfaceSpec {
    /// User-mode networking inside the emulator: needs no bridge and no privileges on the host.
    User {
        /// A fixed MAC address (`52:54:00:xx:xx:xx`), or `None` to let the hypervisor choose.
        mac: Option<String>,
    },
}

/// Booting a kernel and initrd directly, without a boot loader on a disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelBoot {
    /// The kernel image on this host.
    pub kernel: PathBuf,
    /// The initial RAM disk on this host.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
}

/// A host directory exported to the guest (virtio-9p, passthrough access mode).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilesystemShare {
    /// The directory on this host.
    pub source: PathBuf,
    /// The mount tag the guest uses.
    pub tag: String,
    /// Whether the guest may only read it.
    pub read_only: bool,
}

/// The tag of the share that carries a VM's KPI filesystem. Deliberately not `kpi`: a guest that
/// mounts every share it finds at boot must be able to tell this one apart and leave it alone,
/// because a guest holding a 9p share mounted cannot be saved (see `ARCHITECTURE.md`).
pub const KPI_SHARE_TAG: &str = "nubis-kpi";

impl FilesystemShare {
    /// The share of VM `vm`'s KPI filesystem: its export directory `<kpi_root>/<vm>.share`, which
    /// outlives the host agent's FUSE mounts (see [`nubis_kpifs::prepare_export`]).
    pub fn kpi(kpi_root: &Path, vm: &str) -> Self {
        Self {
            source: kpi_root.join(format!("{vm}.share")),
            tag: KPI_SHARE_TAG.to_owned(),
            read_only: false,
        }
    }
}

/// Why a [`DomainSpec`] was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The name is empty, too long or has characters outside `A-Za-z0-9_.-`.
    #[error("invalid domain name {0:?}")]
    Name(String),
    /// The UUID is not in `8-4-4-4-12` hexadecimal form.
    #[error("invalid uuid {0:?}")]
    Uuid(String),
    /// Zero virtual CPUs.
    #[error("a domain needs at least one vcpu")]
    NoVcpus,
    /// Zero memory.
    #[error("a domain needs memory")]
    NoMemory,
    /// A path is relative, not UTF-8 or contains control characters.
    #[error("invalid path {0:?}")]
    Path(PathBuf),
    /// A disk target is not a lower-case device name like `vda`.
    #[error("invalid disk target {0:?}")]
    Target(String),
    /// Two disks use the same target.
    #[error("disk target {0:?} used twice")]
    DuplicateTarget(String),
    /// A MAC address is not six colon-separated hex octets.
    #[error("invalid mac address {0:?}")]
    Mac(String),
    /// A share tag is empty or has characters outside `A-Za-z0-9_.-`.
    #[error("invalid filesystem tag {0:?}")]
    Tag(String),
    /// Two shares use the same tag.
    #[error("filesystem tag {0:?} used twice")]
    DuplicateTag(String),
    /// The kernel command line contains control characters.
    #[error("invalid kernel command line")]
    Cmdline,
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'
}

fn check_path(p: &Path) -> Result<(), SpecError> {
    match p.to_str() {
        Some(s) if p.is_absolute() && !s.chars().any(char::is_control) => Ok(()),
        _ => Err(SpecError::Path(p.to_path_buf())),
    }
}

/// Whether `s` is a UUID in its canonical textual form.
pub fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    let lens = [8, 4, 4, 4, 12];
    groups.len() == lens.len()
        && groups
            .iter()
            .zip(lens)
            .all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()))
}

fn is_mac(s: &str) -> bool {
    let octets: Vec<&str> = s.split(':').collect();
    octets.len() == 6
        && octets
            .iter()
            .all(|o| o.len() == 2 && o.chars().all(|c| c.is_ascii_hexdigit()))
}

impl DomainSpec {
    /// A spec with the given name and size and nothing attached.
    pub fn new(name: impl Into<String>, vcpus: u32, memory_mib: u64) -> Self {
        Self {
            name: name.into(),
            uuid: None,
            vcpus,
            memory_mib,
            disks: Vec::new(),
            interfaces: Vec::new(),
            kernel_boot: None,
            filesystems: Vec::new(),
            serial_log: None,
        }
    }

    /// Checks everything the domain XML relies on.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.name.is_empty()
            || self.name.len() > MAX_NAME_LEN
            || !self.name.chars().all(is_name_char)
            || self.name.starts_with(['-', '.'])
        {
            return Err(SpecError::Name(self.name.clone()));
        }
        if let Some(uuid) = &self.uuid {
            if !is_uuid(uuid) {
                return Err(SpecError::Uuid(uuid.clone()));
            }
        }
        if self.vcpus == 0 {
            return Err(SpecError::NoVcpus);
        }
        if self.memory_mib == 0 {
            return Err(SpecError::NoMemory);
        }
        let mut targets = HashSet::new();
        for disk in &self.disks {
            check_path(&disk.path)?;
            let t = &disk.target;
            let valid = t.len() >= 2
                && t.len() <= 16
                && t.starts_with(|c: char| c.is_ascii_lowercase())
                && t.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
            if !valid {
                return Err(SpecError::Target(t.clone()));
            }
            if !targets.insert(t.as_str()) {
                return Err(SpecError::DuplicateTarget(t.clone()));
            }
        }
        for iface in &self.interfaces {
            match iface {
                InterfaceSpec::User { mac: Some(mac) } if !is_mac(mac) => {
                    return Err(SpecError::Mac(mac.clone()))
                }
                InterfaceSpec::User { .. } => {}
            }
        }
        if let Some(boot) = &self.kernel_boot {
            check_path(&boot.kernel)?;
            if let Some(initrd) = &boot.initrd {
                check_path(initrd)?;
            }
            if boot.cmdline.chars().any(char::is_control) {
                return Err(SpecError::Cmdline);
            }
        }
        let mut tags = HashSet::new();
        for fs in &self.filesystems {
            check_path(&fs.source)?;
            if fs.tag.is_empty() || fs.tag.len() > 31 || !fs.tag.chars().all(is_name_char) {
                return Err(SpecError::Tag(fs.tag.clone()));
            }
            if !tags.insert(fs.tag.as_str()) {
                return Err(SpecError::DuplicateTag(fs.tag.clone()));
            }
        }
        if let Some(log) = &self.serial_log {
            check_path(log)?;
        }
        Ok(())
    }

    /// The sum of the virtual sizes of the disks.
    pub fn disk_bytes(&self) -> u64 {
        self.disks
            .iter()
            .fold(0u64, |sum, d| sum.saturating_add(d.capacity_bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(target: &str) -> DiskSpec {
        DiskSpec {
            path: PathBuf::from(format!("/var/lib/nubis/vm/{target}.qcow2")),
            format: DiskFormat::Qcow2,
            target: target.into(),
            capacity_bytes: 1 << 20,
            read_only: false,
        }
    }

    #[test]
    fn a_plain_spec_is_valid() {
        let mut spec = DomainSpec::new("vm-1", 1, 64);
        spec.disks.push(disk("vda"));
        spec.disks.push(disk("vdb"));
        assert_eq!(spec.validate(), Ok(()));
        assert_eq!(spec.disk_bytes(), 2 << 20);
    }

    #[test]
    fn refuses_what_xml_cannot_carry() {
        for name in ["", "a/b", "vm 1", "-x", "é", &"x".repeat(MAX_NAME_LEN + 1)] {
            let spec = DomainSpec::new(name, 1, 64);
            assert!(
                matches!(spec.validate(), Err(SpecError::Name(_))),
                "{name:?}"
            );
        }
        let mut spec = DomainSpec::new("vm", 0, 64);
        assert_eq!(spec.validate(), Err(SpecError::NoVcpus));
        spec.vcpus = 1;
        spec.memory_mib = 0;
        assert_eq!(spec.validate(), Err(SpecError::NoMemory));
        spec.memory_mib = 64;
        spec.uuid = Some("not-a-uuid".into());
        assert!(matches!(spec.validate(), Err(SpecError::Uuid(_))));
        spec.uuid = Some("0b3c1e0e-5f0a-4c57-9a43-6a3c1c7d2e10".into());
        assert_eq!(spec.validate(), Ok(()));
        spec.disks = vec![disk("vda"), disk("vda")];
        assert!(matches!(
            spec.validate(),
            Err(SpecError::DuplicateTarget(_))
        ));
        spec.disks = vec![disk("VDA")];
        assert!(matches!(spec.validate(), Err(SpecError::Target(_))));
        spec.disks = vec![DiskSpec {
            path: PathBuf::from("relative.qcow2"),
            ..disk("vda")
        }];
        assert!(matches!(spec.validate(), Err(SpecError::Path(_))));
        spec.disks.clear();
        spec.interfaces = vec![InterfaceSpec::User {
            mac: Some("52:54:00:zz:00:01".into()),
        }];
        assert!(matches!(spec.validate(), Err(SpecError::Mac(_))));
        spec.interfaces.clear();
        spec.kernel_boot = Some(KernelBoot {
            kernel: "/k".into(),
            initrd: None,
            cmdline: "console=ttyS0\nx".into(),
        });
        assert_eq!(spec.validate(), Err(SpecError::Cmdline));
        spec.kernel_boot = None;
        spec.filesystems = vec![FilesystemShare {
            source: "/srv".into(),
            tag: "a b".into(),
            read_only: false,
        }];
        assert!(matches!(spec.validate(), Err(SpecError::Tag(_))));
    }
}
