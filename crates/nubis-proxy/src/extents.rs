//! Allocated extents of a file (SEEK_DATA / SEEK_HOLE), so sparse images travel without their
//! holes.
//!
//! On a file system without hole reporting the whole file comes back as one extent, which is
//! correct, only not as small.

use std::fs::File;
use std::io;

use rustix::fs::{seek, SeekFrom};
use rustix::io::Errno;

/// A run of allocated bytes: `[offset, offset + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Start, in bytes from the start of the file.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// The allocated extents of `file`, whose length is `size`, in file order.
pub fn data_extents(file: &File, size: u64) -> io::Result<Vec<Extent>> {
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let start = match seek(file, SeekFrom::Data(pos)) {
            Ok(p) => p,
            // ENXIO: no data at or after `pos`; the rest of the file is a hole.
            Err(Errno::NXIO) => break,
            Err(Errno::INVAL | Errno::OPNOTSUPP) if out.is_empty() && pos == 0 => {
                // Hole reporting unsupported here: treat the file as dense.
                return Ok(vec![Extent {
                    offset: 0,
                    len: size,
                }]);
            }
            Err(e) => return Err(e.into()),
        };
        if start >= size {
            break;
        }
        let end = match seek(file, SeekFrom::Hole(start)) {
            Ok(p) => p.min(size),
            Err(e) => return Err(e.into()),
        };
        if end <= start {
            break;
        }
        out.push(Extent {
            offset: start,
            len: end - start,
        });
        pos = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, Write};

    #[test]
    fn dense_file_is_one_extent() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[1u8; 10_000]).unwrap();
        let ex = data_extents(&f, 10_000).unwrap();
        assert_eq!(
            ex,
            vec![Extent {
                offset: 0,
                len: 10_000
            }]
        );
    }

    #[test]
    fn holes_are_skipped() {
        let mut f = tempfile::tempfile().unwrap();
        let mib = 1u64 << 20;
        f.set_len(16 * mib).unwrap();
        f.seek(io::SeekFrom::Start(4 * mib)).unwrap();
        f.write_all(&vec![9u8; mib as usize]).unwrap();
        f.sync_all().unwrap();
        let ex = data_extents(&f, 16 * mib).unwrap();
        let total: u64 = ex.iter().map(|e| e.len).sum();
        // File systems allocate in blocks; the data must be covered, the holes mostly not.
        assert!(ex
            .iter()
            .any(|e| e.offset <= 4 * mib && e.offset + e.len >= 5 * mib));
        assert!(total < 4 * mib, "{ex:?}");
        // An empty file has no extents.
        let g = tempfile::tempfile().unwrap();
        assert!(data_extents(&g, 0).unwrap().is_empty());
    }
}
