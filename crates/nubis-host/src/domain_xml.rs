//! libvirt domain XML: generated from a [`DomainSpec`], and read back for the few facts the host
//! agent needs from a running definition (device names for statistics, name and UUID).
//!
//! Every string from the spec goes through XML escaping; the spec is validated first, so what is
//! written is exactly what was asked for.

use std::fmt::Write as _;
use std::path::Path;

use quick_xml::escape::escape;
use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

use crate::spec::{DomainSpec, InterfaceSpec, SpecError};

/// How the guest's CPU is provided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accelerator {
    /// QEMU's software emulation (TCG), `type='qemu'`: works everywhere.
    #[default]
    Tcg,
    /// Hardware virtualisation, `type='kvm'`: only where `/dev/kvm` really works.
    Kvm,
}

impl Accelerator {
    /// The libvirt domain type.
    pub fn domain_type(self) -> &'static str {
        match self {
            Accelerator::Tcg => "qemu",
            Accelerator::Kvm => "kvm",
        }
    }
}

/// How often (seconds) the guest's balloon driver refreshes its memory statistics.
const BALLOON_STATS_PERIOD_S: u32 = 2;

fn path_str(p: &Path) -> Result<&str, SpecError> {
    p.to_str().ok_or_else(|| SpecError::Path(p.to_path_buf()))
}

/// Generates the domain XML for `spec`, after validating it.
pub fn domain_xml(spec: &DomainSpec, accel: Accelerator) -> Result<String, SpecError> {
    spec.validate()?;
    let mut x = String::with_capacity(2048);
    // `write!` into a String cannot fail; the results are ignored on purpose.
    let _ = writeln!(x, "<domain type='{}'>", accel.domain_type());
    let _ = writeln!(x, "  <name>{}</name>", escape(spec.name.as_str()));
    if let Some(uuid) = &spec.uuid {
        let _ = writeln!(x, "  <uuid>{}</uuid>", escape(uuid.as_str()));
    }
    let _ = writeln!(x, "  <memory unit='MiB'>{}</memory>", spec.memory_mib);
    let _ = writeln!(
        x,
        "  <currentMemory unit='MiB'>{}</currentMemory>",
        spec.memory_mib
    );
    let _ = writeln!(x, "  <vcpu>{}</vcpu>", spec.vcpus);
    x.push_str("  <os>\n");
    let _ = writeln!(
        x,
        "    <type arch='{}'>hvm</type>",
        escape(std::env::consts::ARCH)
    );
    match &spec.kernel_boot {
        Some(boot) => {
            let _ = writeln!(
                x,
                "    <kernel>{}</kernel>",
                escape(path_str(&boot.kernel)?)
            );
            if let Some(initrd) = &boot.initrd {
                let _ = writeln!(x, "    <initrd>{}</initrd>", escape(path_str(initrd)?));
            }
            let _ = writeln!(
                x,
                "    <cmdline>{}</cmdline>",
                escape(boot.cmdline.as_str())
            );
        }
        None => x.push_str("    <boot dev='hd'/>\n"),
    }
    x.push_str("  </os>\n");
    // ACPI lets a graceful shutdown reach the guest as a power-button press.
    x.push_str("  <features>\n    <acpi/>\n  </features>\n");
    x.push_str("  <on_poweroff>destroy</on_poweroff>\n");
    x.push_str("  <on_reboot>restart</on_reboot>\n");
    x.push_str("  <on_crash>destroy</on_crash>\n");
    x.push_str("  <devices>\n");
    for disk in &spec.disks {
        x.push_str("    <disk type='file' device='disk'>\n");
        let _ = writeln!(
            x,
            "      <driver name='qemu' type='{}'/>",
            disk.format.as_str()
        );
        let _ = writeln!(
            x,
            "      <source file='{}'/>",
            escape(path_str(&disk.path)?)
        );
        // An empty backing store: the image has no backing chain, whatever its header says,
        // so the hypervisor never opens another file of the host for this disk.
        x.push_str("      <backingStore/>\n");
        let _ = writeln!(
            x,
            "      <target dev='{}' bus='virtio'/>",
            escape(disk.target.as_str())
        );
        if disk.read_only {
            x.push_str("      <readonly/>\n");
        }
        x.push_str("    </disk>\n");
    }
    for fs in &spec.filesystems {
        x.push_str("    <filesystem type='mount' accessmode='passthrough'>\n");
        let _ = writeln!(x, "      <source dir='{}'/>", escape(path_str(&fs.source)?));
        let _ = writeln!(x, "      <target dir='{}'/>", escape(fs.tag.as_str()));
        if fs.read_only {
            x.push_str("      <readonly/>\n");
        }
        x.push_str("    </filesystem>\n");
    }
    for iface in &spec.interfaces {
        match iface {
            InterfaceSpec::User { mac } => {
                x.push_str("    <interface type='user'>\n");
                if let Some(mac) = mac {
                    let _ = writeln!(x, "      <mac address='{}'/>", escape(mac.as_str()));
                }
                x.push_str("      <model type='virtio'/>\n");
                x.push_str("    </interface>\n");
            }
        }
    }
    if let Some(log) = &spec.serial_log {
        // Appending keeps the guest's earlier output when it is restored from a saved state.
        x.push_str("    <serial type='file'>\n");
        let _ = writeln!(
            x,
            "      <source path='{}' append='on'/>",
            escape(path_str(log)?)
        );
        x.push_str("      <target port='0'/>\n");
        x.push_str("    </serial>\n");
    }
    let _ = writeln!(
        x,
        "    <memballoon model='virtio'>\n      <stats period='{BALLOON_STATS_PERIOD_S}'/>\n    </memballoon>"
    );
    x.push_str("  </devices>\n</domain>\n");
    Ok(x)
}

/// A network interface as libvirt reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InterfaceInfo {
    /// The host-side device (`vnet0`, …); user-mode interfaces may have none.
    pub target: Option<String>,
    /// The MAC address.
    pub mac: Option<String>,
}

impl InterfaceInfo {
    /// What libvirt's interface statistics call accepts for this interface.
    pub fn stats_key(&self) -> Option<&str> {
        self.target.as_deref().or(self.mac.as_deref())
    }
}

/// The facts read back from a libvirt domain definition.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DomainXmlInfo {
    /// The domain name.
    pub name: String,
    /// The domain UUID.
    pub uuid: Option<String>,
    /// Disk target device names, in definition order.
    pub disks: Vec<String>,
    /// Network interfaces, in definition order.
    pub interfaces: Vec<InterfaceInfo>,
}

/// The XML from libvirt could not be read.
#[derive(Debug, thiserror::Error)]
#[error("malformed domain xml")]
pub struct DomainXmlError(#[source] quick_xml::Error);

fn attr(e: &BytesStart<'_>, key: &[u8]) -> Result<Option<String>, quick_xml::Error> {
    for a in e.attributes() {
        let a = a.map_err(quick_xml::Error::from)?;
        if a.key.as_ref() == key {
            return Ok(Some(a.unescape_value()?.into_owned()));
        }
    }
    Ok(None)
}

/// Reads name, UUID and device names from a libvirt domain XML.
pub fn parse_domain_xml(xml: &str) -> Result<DomainXmlInfo, DomainXmlError> {
    parse(xml).map_err(DomainXmlError)
}

fn parse(xml: &str) -> Result<DomainXmlInfo, quick_xml::Error> {
    let mut reader = Reader::from_str(xml);
    let mut info = DomainXmlInfo::default();
    let mut stack: Vec<Vec<u8>> = Vec::new();
    let mut iface: Option<InterfaceInfo> = None;
    loop {
        let ev = reader.read_event()?;
        match &ev {
            Event::Start(e) | Event::Empty(e) => {
                let name = e.local_name().as_ref().to_vec();
                let parent = stack.last().map(Vec::as_slice);
                let depth = stack.len();
                match (name.as_slice(), parent) {
                    (b"interface", Some(b"devices")) if depth == 2 => {
                        iface = Some(InterfaceInfo::default());
                    }
                    (b"target", Some(b"disk")) if depth == 3 => {
                        if let Some(dev) = attr(e, b"dev")? {
                            info.disks.push(dev);
                        }
                    }
                    (b"target", Some(b"interface")) if depth == 3 => {
                        if let Some(i) = iface.as_mut() {
                            i.target = attr(e, b"dev")?;
                        }
                    }
                    (b"mac", Some(b"interface")) if depth == 3 => {
                        if let Some(i) = iface.as_mut() {
                            i.mac = attr(e, b"address")?;
                        }
                    }
                    _ => {}
                }
                if matches!(ev, Event::Start(_)) {
                    stack.push(name);
                } else if name == b"interface" {
                    if let Some(i) = iface.take() {
                        info.interfaces.push(i);
                    }
                }
            }
            Event::End(_) => {
                if let Some(name) = stack.pop() {
                    if name == b"interface" && stack.len() == 2 {
                        if let Some(i) = iface.take() {
                            info.interfaces.push(i);
                        }
                    }
                }
            }
            Event::Text(t) if stack.len() == 2 => {
                let text = t.unescape()?.trim().to_string();
                match stack.last().map(Vec::as_slice) {
                    Some(b"name") => info.name = text,
                    Some(b"uuid") => info.uuid = Some(text),
                    _ => {}
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::spec::{DiskFormat, DiskSpec, FilesystemShare, KernelBoot};

    fn full_spec() -> DomainSpec {
        let mut spec = DomainSpec::new("vm-1", 2, 256);
        spec.uuid = Some("0b3c1e0e-5f0a-4c57-9a43-6a3c1c7d2e10".into());
        spec.disks.push(DiskSpec {
            path: PathBuf::from("/var/lib/nubis/vm-1/a&b'<c>\".qcow2"),
            format: DiskFormat::Qcow2,
            target: "vda".into(),
            capacity_bytes: 1 << 30,
            read_only: false,
        });
        spec.disks.push(DiskSpec {
            path: PathBuf::from("/var/lib/nubis/vm-1/seed.img"),
            format: DiskFormat::Raw,
            target: "vdb".into(),
            capacity_bytes: 1 << 20,
            read_only: true,
        });
        spec.interfaces.push(InterfaceSpec::User {
            mac: Some("52:54:00:12:34:56".into()),
        });
        spec.kernel_boot = Some(KernelBoot {
            kernel: "/boot/vmlinuz".into(),
            initrd: Some("/boot/initrd".into()),
            cmdline: "console=ttyS0 x=\"<&>\"".into(),
        });
        spec.filesystems.push(FilesystemShare {
            source: "/var/lib/nubis/vm-1/kpi".into(),
            tag: "kpi".into(),
            read_only: false,
        });
        spec.serial_log = Some("/var/lib/nubis/vm-1/serial.log".into());
        spec
    }

    #[test]
    fn generated_xml_is_well_formed_and_escaped() {
        let xml = domain_xml(&full_spec(), Accelerator::Tcg).unwrap();
        assert!(xml.starts_with("<domain type='qemu'>"));
        assert!(xml.contains("a&amp;b&apos;&lt;c&gt;&quot;.qcow2"));
        assert!(xml.contains("x=&quot;&lt;&amp;&gt;&quot;"));
        assert!(xml.contains("<filesystem type='mount' accessmode='passthrough'>"));
        assert!(xml.contains("<readonly/>"));
        // Every disk pins an empty backing chain.
        assert_eq!(
            xml.matches("<backingStore/>").count(),
            xml.matches("<disk ").count()
        );
        let info = parse_domain_xml(&xml).unwrap();
        assert_eq!(info.name, "vm-1");
        assert_eq!(
            info.uuid.as_deref(),
            Some("0b3c1e0e-5f0a-4c57-9a43-6a3c1c7d2e10")
        );
        assert_eq!(info.disks, vec!["vda".to_string(), "vdb".to_string()]);
        assert_eq!(info.interfaces.len(), 1);
        assert_eq!(info.interfaces[0].stats_key(), Some("52:54:00:12:34:56"));
    }

    #[test]
    fn kvm_is_opt_in() {
        let xml = domain_xml(&DomainSpec::new("k", 1, 64), Accelerator::Kvm).unwrap();
        assert!(xml.starts_with("<domain type='kvm'>"));
        assert_eq!(Accelerator::default(), Accelerator::Tcg);
    }

    #[test]
    fn invalid_spec_produces_no_xml() {
        let spec = DomainSpec::new("a/b", 1, 64);
        assert!(domain_xml(&spec, Accelerator::Tcg).is_err());
    }

    #[test]
    fn reads_libvirt_output() {
        let xml = r#"<domain type='qemu' id='3'>
  <name>vm-2</name>
  <uuid>d6844bf2-1bc4-4f5d-80a4-80cb0482a15b</uuid>
  <devices>
    <disk type='file' device='disk'>
      <source file='/x.qcow2'/>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
    </disk>
    <interface type='user'>
      <mac address='52:54:00:aa:bb:cc'/>
      <target dev='testnet0'/>
    </interface>
    <interface type='user'>
      <mac address='52:54:00:aa:bb:cd'/>
    </interface>
  </devices>
</domain>"#;
        let info = parse_domain_xml(xml).unwrap();
        assert_eq!(info.name, "vm-2");
        assert_eq!(info.disks, vec!["vda".to_string()]);
        assert_eq!(info.interfaces[0].stats_key(), Some("testnet0"));
        assert_eq!(info.interfaces[1].stats_key(), Some("52:54:00:aa:bb:cd"));
        assert!(parse_domain_xml("<domain><name>x</nam></domain>").is_err());
    }
}
