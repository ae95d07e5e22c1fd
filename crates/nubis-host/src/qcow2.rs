//! What a received qcow2 image may refer to outside itself, read from its header before any
//! domain uses it.
//!
//! A qcow2 image can name other files: a backing file (read for every cluster the image does
//! not hold) and an external data file (holding all of its data). QEMU opens whatever they
//! name with the hypervisor's rights, so an image from another site could read any file of
//! this host into the guest (`qemu-img create -f qcow2 -b /etc/shadow -F raw`). The host agent
//! therefore accepts only self-contained images: [`inspect`] reads the header (magic, version,
//! backing file fields, the incompatible-feature bit of an external data file and the header
//! extensions, as documented in QEMU's `docs/interop/qcow2.txt`) and refuses any image that
//! refers to another file; the domain XML pins `<backingStore/>` as well.

use std::fs::File;
use std::io::Read as _;
use std::path::Path;

/// `QFI\xfb`, the first four bytes of every qcow2 image.
const MAGIC: [u8; 4] = *b"QFI\xfb";
/// The header of a version 2 image; version 3 adds fields and names its own length.
const V2_HEADER_LEN: usize = 72;
/// The fixed part of a version 3 header.
const V3_MIN_HEADER_LEN: usize = 104;
/// Incompatible feature bit 2: the image's data lives in an external data file.
const EXTERNAL_DATA_FILE_BIT: u64 = 1 << 2;
/// The header extension naming the external data file ("DATA").
const EXT_EXTERNAL_DATA_FILE: u32 = 0x4441_5441;
/// Header extensions lie in the image's first cluster, and a cluster is at most 2 MiB.
pub const MAX_HEADER_BYTES: usize = 2 << 20;

/// Why an image is not a self-contained qcow2 image.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    /// The image could not be read.
    #[error("cannot read the image")]
    Io(#[source] std::io::Error),
    /// Fewer bytes than the header needs.
    #[error("the image is shorter than its header")]
    Truncated,
    /// The magic bytes are not qcow2's.
    #[error("not a qcow2 image")]
    NotQcow2,
    /// A version other than 2 or 3.
    #[error("qcow2 version {0} is not supported")]
    UnsupportedVersion(u32),
    /// The header names a backing file.
    #[error("the image names a backing file")]
    BackingFile,
    /// The header names an external data file.
    #[error("the image names an external data file")]
    ExternalDataFile,
    /// The header extensions run past the bytes read (or past the first cluster).
    #[error("the image's header extensions are malformed")]
    BadExtensions,
}

/// What the host needs to know of a self-contained qcow2 image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Qcow2Image {
    /// The header's version (2 or 3).
    pub version: u32,
    /// The disk size the guest sees, in bytes.
    pub virtual_size: u64,
}

fn be_u32(b: &[u8], at: usize) -> Result<u32, Qcow2Error> {
    b.get(at..at + 4)
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
        .map(u32::from_be_bytes)
        .ok_or(Qcow2Error::Truncated)
}

fn be_u64(b: &[u8], at: usize) -> Result<u64, Qcow2Error> {
    b.get(at..at + 8)
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map(u64::from_be_bytes)
        .ok_or(Qcow2Error::Truncated)
}

/// Reads the start of an image (`header`: its first bytes, up to [`MAX_HEADER_BYTES`]) and
/// returns it if it refers to no other file.
pub fn inspect(header: &[u8]) -> Result<Qcow2Image, Qcow2Error> {
    if header.len() < 4 {
        return Err(Qcow2Error::Truncated);
    }
    if header[..4] != MAGIC {
        return Err(Qcow2Error::NotQcow2);
    }
    let version = be_u32(header, 4)?;
    if version != 2 && version != 3 {
        return Err(Qcow2Error::UnsupportedVersion(version));
    }
    if header.len() < V2_HEADER_LEN {
        return Err(Qcow2Error::Truncated);
    }
    let backing_offset = be_u64(header, 8)?;
    let backing_size = be_u32(header, 16)?;
    if backing_offset != 0 || backing_size != 0 {
        return Err(Qcow2Error::BackingFile);
    }
    let cluster_bits = be_u32(header, 20)?;
    let virtual_size = be_u64(header, 24)?;
    let header_len = if version == 3 {
        let incompatible = be_u64(header, 72)?;
        if incompatible & EXTERNAL_DATA_FILE_BIT != 0 {
            return Err(Qcow2Error::ExternalDataFile);
        }
        let len = be_u32(header, 100)? as usize;
        if len < V3_MIN_HEADER_LEN {
            return Err(Qcow2Error::Truncated);
        }
        len
    } else {
        V2_HEADER_LEN
    };
    // QEMU reads extensions up to the end of the first cluster; so does this, within the
    // bytes given.
    let cluster_end = 1usize.checked_shl(cluster_bits).unwrap_or(usize::MAX);
    let end = header.len().min(cluster_end);
    let mut at = header_len;
    loop {
        if at.checked_add(8).is_none_or(|e| e > end) {
            return Err(Qcow2Error::BadExtensions);
        }
        let kind = be_u32(header, at)?;
        if kind == 0 {
            break;
        }
        if kind == EXT_EXTERNAL_DATA_FILE {
            return Err(Qcow2Error::ExternalDataFile);
        }
        let len = be_u32(header, at + 4)? as usize;
        let padded = len.div_ceil(8).saturating_mul(8);
        at = at
            .checked_add(8)
            .and_then(|a| a.checked_add(padded))
            .ok_or(Qcow2Error::BadExtensions)?;
    }
    Ok(Qcow2Image {
        version,
        virtual_size,
    })
}

/// [`inspect`] on the first bytes of the file at `path`.
pub fn inspect_file(path: &Path) -> Result<Qcow2Image, Qcow2Error> {
    let f = File::open(path).map_err(Qcow2Error::Io)?;
    let mut buf = Vec::new();
    f.take(MAX_HEADER_BYTES as u64)
        .read_to_end(&mut buf)
        .map_err(Qcow2Error::Io)?;
    inspect(&buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version 3 header as `qemu-img create -f qcow2` writes it (64 KiB clusters), with
    /// `extensions` after it and the end marker.
    fn v3(size: u64, incompatible: u64, extensions: &[(u32, &[u8])]) -> Vec<u8> {
        let mut h = vec![0u8; V3_MIN_HEADER_LEN];
        h[..4].copy_from_slice(&MAGIC);
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[24..32].copy_from_slice(&size.to_be_bytes());
        h[72..80].copy_from_slice(&incompatible.to_be_bytes());
        h[96..100].copy_from_slice(&4u32.to_be_bytes());
        h[100..104].copy_from_slice(&(V3_MIN_HEADER_LEN as u32).to_be_bytes());
        for (kind, data) in extensions {
            h.extend_from_slice(&kind.to_be_bytes());
            h.extend_from_slice(&(data.len() as u32).to_be_bytes());
            h.extend_from_slice(data);
            h.resize(h.len().div_ceil(8) * 8, 0);
        }
        h.extend_from_slice(&[0; 8]);
        h.resize(4096, 0);
        h
    }

    #[test]
    fn a_plain_image_is_accepted_with_its_size() {
        let img = inspect(&v3(16 << 20, 0, &[(0x6803_f857, &[0; 48])])).unwrap();
        assert_eq!(
            img,
            Qcow2Image {
                version: 3,
                virtual_size: 16 << 20
            }
        );
        let mut v2 = v3(1 << 30, 0, &[]);
        v2[4..8].copy_from_slice(&2u32.to_be_bytes());
        // A version 2 header ends at 72: its extensions (none here) start there.
        v2[72..].fill(0);
        assert_eq!(inspect(&v2).unwrap().virtual_size, 1 << 30);
    }

    #[test]
    fn a_backing_file_is_refused() {
        let mut h = v3(16 << 20, 0, &[]);
        h[8..16].copy_from_slice(&512u64.to_be_bytes());
        h[16..20].copy_from_slice(&11u32.to_be_bytes());
        assert!(matches!(inspect(&h), Err(Qcow2Error::BackingFile)));
        // Either field alone is enough.
        h[8..16].fill(0);
        assert!(matches!(inspect(&h), Err(Qcow2Error::BackingFile)));
    }

    #[test]
    fn an_external_data_file_is_refused_by_bit_or_extension() {
        let h = v3(16 << 20, EXTERNAL_DATA_FILE_BIT, &[]);
        assert!(matches!(inspect(&h), Err(Qcow2Error::ExternalDataFile)));
        let h = v3(16 << 20, 0, &[(EXT_EXTERNAL_DATA_FILE, b"/etc/hostname")]);
        assert!(matches!(inspect(&h), Err(Qcow2Error::ExternalDataFile)));
        let h = v3(
            16 << 20,
            0,
            &[(0xe279_2aca, b"raw"), (EXT_EXTERNAL_DATA_FILE, b"/x")],
        );
        assert!(matches!(inspect(&h), Err(Qcow2Error::ExternalDataFile)));
    }

    #[test]
    fn malformed_headers_are_refused() {
        assert!(matches!(inspect(b""), Err(Qcow2Error::Truncated)));
        assert!(matches!(inspect(&[0u8; 512]), Err(Qcow2Error::NotQcow2)));
        let mut h = v3(1, 0, &[]);
        h[4..8].copy_from_slice(&4u32.to_be_bytes());
        assert!(matches!(
            inspect(&h),
            Err(Qcow2Error::UnsupportedVersion(4))
        ));
        let h = v3(1, 0, &[]);
        assert!(matches!(inspect(&h[..80]), Err(Qcow2Error::Truncated)));
        // An extension without its end marker within the bytes read.
        let mut h = v3(1, 0, &[]);
        h.truncate(V3_MIN_HEADER_LEN);
        h.extend_from_slice(&1u32.to_be_bytes());
        h.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(inspect(&h), Err(Qcow2Error::BadExtensions)));
        // A header length that points past the first cluster.
        let mut h = v3(1, 0, &[]);
        h[20..24].copy_from_slice(&9u32.to_be_bytes());
        h[100..104].copy_from_slice(&1000u32.to_be_bytes());
        assert!(matches!(inspect(&h), Err(Qcow2Error::BadExtensions)));
        // Absurd cluster bits do not overflow.
        let mut h = v3(1, 0, &[]);
        h[20..24].copy_from_slice(&200u32.to_be_bytes());
        assert!(inspect(&h).is_ok());
    }

    /// Every prefix of a header, and every single-byte change of it, is answered without a
    /// panic; any answer that accepts it reports no backing or external data file.
    #[test]
    fn truncated_and_mutated_headers_never_panic() {
        let base = v3(16 << 20, 0, &[(0xe279_2aca, b"raw")]);
        for len in 0..=256 {
            let _ = inspect(&base[..len]);
        }
        for at in 0..160 {
            for value in [0x00, 0x01, 0x04, 0x80, 0xff] {
                let mut h = base.clone();
                h[at] = value;
                if let Ok(img) = inspect(&h) {
                    assert!(img.version == 2 || img.version == 3);
                    assert_eq!(be_u64(&h, 8).unwrap(), 0);
                }
            }
        }
    }

    /// Images made by the real tool, when it is installed.
    #[test]
    fn images_made_by_qemu_img() {
        let dir = tempfile::tempdir().unwrap();
        let run = |args: &[&str]| {
            std::process::Command::new("qemu-img")
                .args(args)
                .current_dir(dir.path())
                .output()
        };
        match run(&["create", "-q", "-f", "qcow2", "plain.qcow2", "16M"]) {
            Ok(o) if o.status.success() => {}
            other => {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "qemu-img is needed under CI: {other:?}"
                );
                eprintln!("skipped: qemu-img is not usable here ({other:?})");
                return;
            }
        }
        let plain = inspect_file(&dir.path().join("plain.qcow2")).unwrap();
        assert_eq!(plain.virtual_size, 16 << 20);
        let backed = run(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "/etc/hostname",
            "-F",
            "raw",
            "backed.qcow2",
            "16M",
        ])
        .unwrap();
        assert!(backed.status.success(), "{backed:?}");
        assert!(matches!(
            inspect_file(&dir.path().join("backed.qcow2")),
            Err(Qcow2Error::BackingFile)
        ));
        let data = run(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=data.raw",
            "external.qcow2",
            "16M",
        ])
        .unwrap();
        assert!(data.status.success(), "{data:?}");
        assert!(matches!(
            inspect_file(&dir.path().join("external.qcow2")),
            Err(Qcow2Error::ExternalDataFile)
        ));
    }
}
