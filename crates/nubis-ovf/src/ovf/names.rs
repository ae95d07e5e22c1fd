//! Names the mapping makes up or translates: disk device names, network names, NIC models,
//! disk formats and image-store names.

use nubis_protocol::descriptor::{is_image_name, DiskFormat};
use nubis_protocol::ids::MAX_ID_LEN;

/// `vda`, `vdb`, …, `vdz`, `vdaa`, … for the `index`-th disk.
pub(super) fn device_name(index: usize) -> String {
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
pub(super) fn nic_model(subtype: Option<&str>) -> String {
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
pub(super) fn disk_format(uri: &str) -> Option<DiskFormat> {
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
pub(super) fn image_name(href: &str) -> Option<String> {
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
