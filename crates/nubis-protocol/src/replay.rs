//! The replay cache: every nonce accepted inside the freshness window, kept on disk.
//!
//! A signed envelope is accepted at most once. The cache remembers `(sender, nonce)` for twice the
//! freshness window (older envelopes are refused as stale anyway), in a sled tree so that a
//! restarted process still refuses a message it accepted before it stopped.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::ids::SiteId;

/// Entries are pruned once per this many insertions.
const PRUNE_EVERY: u64 = 1024;

/// Why a nonce was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The nonce was already accepted from this sender.
    #[error("nonce already seen")]
    Replayed,
    /// The on-disk cache failed.
    #[error("replay cache store")]
    Store(#[source] sled::Error),
}

/// How hard the cache works to survive a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Flush to disk before accepting each nonce: survives `kill -9` and power loss.
    Sync,
    /// Let sled flush in the background (every few hundred ms): survives orderly restarts.
    Background,
}

/// A persistent set of accepted nonces.
#[derive(Debug)]
pub struct ReplayCache {
    db: sled::Db,
    durability: Durability,
    retain_ms: u64,
    inserts: AtomicU64,
}

impl ReplayCache {
    /// Opens (or creates) the cache in directory `path`, remembering nonces for `retain_ms`.
    pub fn open(path: &Path, retain_ms: u64, durability: Durability) -> Result<Self, ReplayError> {
        let db = sled::Config::new()
            .path(path)
            .flush_every_ms(Some(200))
            .open()
            .map_err(ReplayError::Store)?;
        Ok(Self::from_db(db, retain_ms, durability))
    }

    /// A cache that lives only in memory (benchmarks, short-lived tools).
    pub fn temporary(retain_ms: u64) -> Result<Self, ReplayError> {
        let db = sled::Config::new()
            .temporary(true)
            .open()
            .map_err(ReplayError::Store)?;
        Ok(Self::from_db(db, retain_ms, Durability::Background))
    }

    fn from_db(db: sled::Db, retain_ms: u64, durability: Durability) -> Self {
        Self {
            db,
            durability,
            retain_ms,
            inserts: AtomicU64::new(0),
        }
    }

    /// Records `nonce` from `sender`, sent at `ts_ms`; refuses it if it was recorded before.
    pub fn check_and_insert(
        &self,
        sender: &SiteId,
        nonce: &[u8; 16],
        ts_ms: u64,
        now_ms: u64,
    ) -> Result<(), ReplayError> {
        let mut key = Vec::with_capacity(16 + sender.as_str().len());
        key.extend_from_slice(nonce);
        key.extend_from_slice(sender.as_str().as_bytes());
        let inserted = self
            .db
            .compare_and_swap(&key, None as Option<&[u8]>, Some(&ts_ms.to_be_bytes()[..]))
            .map_err(ReplayError::Store)?;
        if inserted.is_err() {
            return Err(ReplayError::Replayed);
        }
        if self.durability == Durability::Sync {
            self.db.flush().map_err(ReplayError::Store)?;
        }
        if self.inserts.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY == PRUNE_EVERY - 1 {
            self.prune(now_ms)?;
        }
        Ok(())
    }

    /// Forgets nonces older than the retention period; returns how many were removed.
    pub fn prune(&self, now_ms: u64) -> Result<usize, ReplayError> {
        let cutoff = now_ms.saturating_sub(self.retain_ms);
        let mut removed = 0;
        for entry in self.db.iter() {
            let (k, v) = entry.map_err(ReplayError::Store)?;
            let ts = v.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0);
            if ts < cutoff {
                self.db.remove(k).map_err(ReplayError::Store)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Number of remembered nonces.
    pub fn len(&self) -> usize {
        self.db.len()
    }

    /// Whether no nonce is remembered.
    pub fn is_empty(&self) -> bool {
        self.db.is_empty()
    }

    /// Flushes everything to disk (called on graceful shutdown).
    pub fn flush(&self) -> Result<(), ReplayError> {
        self.db.flush().map(|_| ()).map_err(ReplayError::Store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nonce_is_accepted_once_per_sender() {
        let cache = ReplayCache::temporary(600_000).unwrap();
        let a = SiteId::new("a").unwrap();
        let b = SiteId::new("b").unwrap();
        cache.check_and_insert(&a, &[1; 16], 10, 10).unwrap();
        assert!(matches!(
            cache.check_and_insert(&a, &[1; 16], 10, 11),
            Err(ReplayError::Replayed)
        ));
        cache.check_and_insert(&b, &[1; 16], 10, 11).unwrap();
        cache.check_and_insert(&a, &[2; 16], 10, 11).unwrap();
    }

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let a = SiteId::new("a").unwrap();
        {
            let cache = ReplayCache::open(dir.path(), 600_000, Durability::Sync).unwrap();
            cache.check_and_insert(&a, &[7; 16], 5, 5).unwrap();
        }
        let cache = ReplayCache::open(dir.path(), 600_000, Durability::Sync).unwrap();
        assert!(matches!(
            cache.check_and_insert(&a, &[7; 16], 5, 6),
            Err(ReplayError::Replayed)
        ));
    }

    #[test]
    fn prune_forgets_only_old_entries() {
        let cache = ReplayCache::temporary(1_000).unwrap();
        let a = SiteId::new("a").unwrap();
        cache.check_and_insert(&a, &[1; 16], 100, 100).unwrap();
        cache.check_and_insert(&a, &[2; 16], 5_000, 5_000).unwrap();
        assert_eq!(cache.prune(5_500).unwrap(), 1);
        assert_eq!(cache.len(), 1);
        assert!(cache.check_and_insert(&a, &[2; 16], 5_000, 5_600).is_err());
    }
}
