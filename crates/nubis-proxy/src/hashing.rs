//! SHA-256 of a file's logical content (holes read as zeros) computed from its extents in file
//! order, so both ends agree with `sha256sum` of the file however sparse it is.

use sha2::{Digest as _, Sha256};

/// Zeros fed to the hash for a hole, a buffer at a time.
const ZERO_BLOCK: usize = 1 << 16;

/// Hashes a file from its extents, which must arrive in increasing offset order.
#[derive(Debug, Clone)]
pub struct LogicalHasher {
    hasher: Sha256,
    pos: u64,
}

/// An extent arrived before the end of the previous one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("extent at offset {offset} overlaps data already hashed up to {pos}")]
pub struct OutOfOrder {
    /// Offset of the refused extent.
    pub offset: u64,
    /// Bytes hashed so far.
    pub pos: u64,
}

impl Default for LogicalHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl LogicalHasher {
    /// A hasher at offset 0.
    pub fn new() -> Self {
        Self {
            hasher: Sha256::new(),
            pos: 0,
        }
    }

    /// Bytes hashed so far, holes included.
    pub fn position(&self) -> u64 {
        self.pos
    }

    fn zeros(&mut self, mut n: u64) {
        static ZEROS: [u8; ZERO_BLOCK] = [0; ZERO_BLOCK];
        while n > 0 {
            let k = n.min(ZERO_BLOCK as u64) as usize;
            self.hasher.update(&ZEROS[..k]);
            n -= k as u64;
        }
    }

    /// Adds the data at `offset`, hashing the hole before it as zeros.
    pub fn update(&mut self, offset: u64, data: &[u8]) -> Result<(), OutOfOrder> {
        if offset < self.pos {
            return Err(OutOfOrder {
                offset,
                pos: self.pos,
            });
        }
        self.zeros(offset - self.pos);
        self.hasher.update(data);
        self.pos = offset + data.len() as u64;
        Ok(())
    }

    /// The digest of a file of length `size` (the tail after the last extent is a hole).
    pub fn finish(mut self, size: u64) -> Result<[u8; 32], OutOfOrder> {
        if size < self.pos {
            return Err(OutOfOrder {
                offset: size,
                pos: self.pos,
            });
        }
        self.zeros(size - self.pos);
        Ok(self.hasher.finalize().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_hash_as_zeros() {
        let mut whole = vec![0u8; 300_000];
        whole[100_000..100_010].copy_from_slice(b"0123456789");
        let want: [u8; 32] = Sha256::digest(&whole).into();
        let mut h = LogicalHasher::new();
        h.update(100_000, b"0123456789").unwrap();
        assert_eq!(h.finish(300_000).unwrap(), want);
        let mut h = LogicalHasher::new();
        h.update(10, b"ab").unwrap();
        assert!(h.update(5, b"x").is_err());
    }
}
