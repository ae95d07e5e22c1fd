//! The replay cache: every nonce accepted inside the freshness window, kept on disk.
//!
//! A signed envelope is accepted at most once. The cache remembers `(sender, nonce)` for twice the
//! freshness window (older envelopes are refused as stale anyway), in a sled tree so that a
//! restarted process still refuses a message it accepted before it stopped.
//!
//! The cache is keyed by what remote senders choose, so it is bounded twice over: entries expire
//! through a second tree ordered by expiry time, swept a few at a time on every insertion (work
//! proportional to what expired, never to the cache's size), and each sender may hold at most a
//! fixed number of entries; beyond it the sender's new nonces are refused as
//! [`ReplayError::Full`] until its old ones expire, while other senders are unaffected.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::ids::SiteId;

/// Expired entries removed per insertion: more than one, so the sweep outpaces any sender.
const SWEEP_BATCH: usize = 8;

/// How many unexpired nonces one sender may hold unless the owner says otherwise: far above what
/// a partner sends inside the retention period, far below what would strain the site.
pub const DEFAULT_MAX_PER_SENDER: usize = 250_000;

/// Length of a nonce in a key.
const NONCE_LEN: usize = 16;

/// Why a nonce was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The nonce was already accepted from this sender.
    #[error("nonce already seen")]
    Replayed,
    /// The sender holds as many unexpired nonces as it may; it must wait for some to expire.
    #[error("sender {sender} holds too many unexpired nonces")]
    Full {
        /// The sender.
        sender: String,
    },
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
    /// `nonce ‖ sender` → the envelope's timestamp (big-endian).
    seen: sled::Tree,
    /// `expiry ‖ nonce ‖ sender` → the envelope's timestamp: the sweep's index.
    expiry: sled::Tree,
    durability: Durability,
    retain_ms: u64,
    max_per_sender: usize,
    /// Unexpired entries per sender, rebuilt from the store on open.
    counts: Mutex<HashMap<String, usize>>,
}

fn expiry_key(expires_ms: u64, seen_key: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + seen_key.len());
    key.extend_from_slice(&expires_ms.to_be_bytes());
    key.extend_from_slice(seen_key);
    key
}

fn be_u64(bytes: &[u8]) -> u64 {
    bytes.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

fn sender_of(seen_key: &[u8]) -> String {
    String::from_utf8_lossy(seen_key.get(NONCE_LEN..).unwrap_or_default()).into_owned()
}

impl ReplayCache {
    /// Opens (or creates) the cache in directory `path`, remembering nonces for `retain_ms`.
    pub fn open(path: &Path, retain_ms: u64, durability: Durability) -> Result<Self, ReplayError> {
        let db = sled::Config::new()
            .path(path)
            .flush_every_ms(Some(200))
            .open()
            .map_err(ReplayError::Store)?;
        Self::from_db(db, retain_ms, durability)
    }

    /// A cache that lives only in memory (benchmarks, short-lived tools).
    pub fn temporary(retain_ms: u64) -> Result<Self, ReplayError> {
        let db = sled::Config::new()
            .temporary(true)
            .open()
            .map_err(ReplayError::Store)?;
        Self::from_db(db, retain_ms, Durability::Background)
    }

    fn from_db(db: sled::Db, retain_ms: u64, durability: Durability) -> Result<Self, ReplayError> {
        // Entries live in the default tree, as they always have; the expiry index is rebuilt
        // from them on open (cheap: the cache is bounded), so an index entry lost in a crash
        // between the two writes, or a store written before the index existed, is swept too.
        let seen: sled::Tree = (*db).clone();
        let expiry = db.open_tree("expiry").map_err(ReplayError::Store)?;
        let mut counts: HashMap<String, usize> = HashMap::new();
        for entry in seen.iter() {
            let (k, v) = entry.map_err(ReplayError::Store)?;
            let ts = be_u64(&v);
            expiry
                .insert(expiry_key(ts.saturating_add(retain_ms), &k), v)
                .map_err(ReplayError::Store)?;
            *counts.entry(sender_of(&k)).or_default() += 1;
        }
        Ok(Self {
            db,
            seen,
            expiry,
            durability,
            retain_ms,
            max_per_sender: DEFAULT_MAX_PER_SENDER,
            counts: Mutex::new(counts),
        })
    }

    /// Changes how many unexpired nonces one sender may hold.
    pub fn with_max_per_sender(mut self, max: usize) -> Self {
        self.max_per_sender = max;
        self
    }

    /// How many unexpired nonces one sender may hold.
    pub fn max_per_sender(&self) -> usize {
        self.max_per_sender
    }

    fn counts(&self) -> MutexGuard<'_, HashMap<String, usize>> {
        // The map holds plain counters: a panic elsewhere cannot leave it inconsistent.
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records `nonce` from `sender`, sent at `ts_ms`; refuses it if it was recorded before, or
    /// if `sender` already holds as many unexpired nonces as it may.
    pub fn check_and_insert(
        &self,
        sender: &SiteId,
        nonce: &[u8; 16],
        ts_ms: u64,
        now_ms: u64,
    ) -> Result<(), ReplayError> {
        let mut key = Vec::with_capacity(NONCE_LEN + sender.as_str().len());
        key.extend_from_slice(nonce);
        key.extend_from_slice(sender.as_str().as_bytes());
        {
            let mut counts = self.counts();
            self.sweep_locked(&mut counts, now_ms, SWEEP_BATCH)?;
            let held = counts.get(sender.as_str()).copied().unwrap_or(0);
            if held >= self.max_per_sender {
                // Everything expired goes before a sender is refused.
                self.sweep_locked(&mut counts, now_ms, usize::MAX)?;
                if counts.get(sender.as_str()).copied().unwrap_or(0) >= self.max_per_sender {
                    return Err(ReplayError::Full {
                        sender: sender.to_string(),
                    });
                }
            }
            let ts = ts_ms.to_be_bytes();
            let inserted = self
                .seen
                .compare_and_swap(&key, None as Option<&[u8]>, Some(&ts[..]))
                .map_err(ReplayError::Store)?;
            if inserted.is_err() {
                return Err(ReplayError::Replayed);
            }
            self.expiry
                .insert(
                    expiry_key(ts_ms.saturating_add(self.retain_ms), &key),
                    &ts[..],
                )
                .map_err(ReplayError::Store)?;
            *counts.entry(sender.to_string()).or_default() += 1;
        }
        if self.durability == Durability::Sync {
            self.db.flush().map_err(ReplayError::Store)?;
        }
        Ok(())
    }

    /// Removes up to `limit` entries that expired before `now_ms`, oldest first.
    fn sweep_locked(
        &self,
        counts: &mut HashMap<String, usize>,
        now_ms: u64,
        limit: usize,
    ) -> Result<usize, ReplayError> {
        let mut removed = 0;
        while removed < limit {
            let Some((k, ts)) = self
                .expiry
                .range(..now_ms.to_be_bytes())
                .next()
                .transpose()
                .map_err(ReplayError::Store)?
            else {
                break;
            };
            self.expiry.remove(&k).map_err(ReplayError::Store)?;
            let seen_key = &k[8..];
            // Only the entry this index line was written for: a stale line (from a run with
            // another retention) must not cut a newer entry's life short.
            let gone = self
                .seen
                .compare_and_swap(seen_key, Some(&ts[..]), None as Option<&[u8]>)
                .map_err(ReplayError::Store)?
                .is_ok();
            if gone {
                let sender = sender_of(seen_key);
                if let Some(n) = counts.get_mut(&sender) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        counts.remove(&sender);
                    }
                }
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Forgets every nonce older than the retention period; returns how many were removed.
    /// The work is proportional to what expired, not to the cache's size.
    pub fn prune(&self, now_ms: u64) -> Result<usize, ReplayError> {
        let mut counts = self.counts();
        self.sweep_locked(&mut counts, now_ms, usize::MAX)
    }

    /// Number of remembered nonces.
    pub fn len(&self) -> usize {
        self.counts().values().sum()
    }

    /// Number of nonces remembered from `sender`.
    pub fn len_of(&self, sender: &SiteId) -> usize {
        self.counts().get(sender.as_str()).copied().unwrap_or(0)
    }

    /// Whether no nonce is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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

    /// Opens the cache at `dir` again once the handle dropped just before has let go of the
    /// store: sled's background flusher releases the store's file lock shortly after the last
    /// handle is dropped, so the open is repeated while the lock is still held.
    fn reopen(dir: &Path, retain_ms: u64) -> ReplayCache {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            match ReplayCache::open(dir, retain_ms, Durability::Sync) {
                Err(ReplayError::Store(sled::Error::Io(e)))
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => return other.unwrap(),
            }
        }
    }

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let a = SiteId::new("a").unwrap();
        {
            let cache = ReplayCache::open(dir.path(), 600_000, Durability::Sync).unwrap();
            cache.check_and_insert(&a, &[7; 16], 5, 5).unwrap();
        }
        let cache = reopen(dir.path(), 600_000);
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
        // Inserted before the first entry expired, so no insertion swept it yet.
        cache.check_and_insert(&a, &[2; 16], 5_000, 1_000).unwrap();
        assert_eq!(cache.prune(5_500).unwrap(), 1);
        assert_eq!(cache.len(), 1);
        assert!(cache.check_and_insert(&a, &[2; 16], 5_000, 5_600).is_err());
    }

    #[test]
    fn insertions_sweep_expired_entries_a_few_at_a_time() {
        let cache = ReplayCache::temporary(1_000).unwrap();
        let a = SiteId::new("a").unwrap();
        for n in 0..20u8 {
            cache.check_and_insert(&a, &[n; 16], 100, 100).unwrap();
        }
        assert_eq!(cache.len(), 20);
        // Each insertion after the expiry removes a bounded batch of the expired entries.
        cache
            .check_and_insert(&a, &[100; 16], 5_000, 5_000)
            .unwrap();
        assert_eq!(cache.len(), 20 - SWEEP_BATCH + 1);
        cache
            .check_and_insert(&a, &[101; 16], 5_000, 5_000)
            .unwrap();
        cache
            .check_and_insert(&a, &[102; 16], 5_000, 5_000)
            .unwrap();
        assert_eq!(cache.len(), 3, "only the unexpired entries remain");
        assert_eq!(cache.prune(5_000).unwrap(), 0);
        assert_eq!(cache.prune(6_001).unwrap(), 3);
        assert!(cache.is_empty());
    }

    #[test]
    fn one_sender_is_bounded_and_others_are_not_affected() {
        let cache = ReplayCache::temporary(1_000)
            .unwrap()
            .with_max_per_sender(3);
        let a = SiteId::new("a").unwrap();
        let b = SiteId::new("b").unwrap();
        for n in 0..3u8 {
            cache.check_and_insert(&a, &[n; 16], 100, 100).unwrap();
        }
        assert!(matches!(
            cache.check_and_insert(&a, &[9; 16], 100, 100),
            Err(ReplayError::Full { .. })
        ));
        // A refusal for being full records nothing.
        assert_eq!(cache.len_of(&a), 3);
        cache.check_and_insert(&b, &[9; 16], 100, 100).unwrap();
        assert_eq!(cache.len_of(&b), 1);
        // Once its old nonces expired, the same sender is accepted again.
        cache.check_and_insert(&a, &[9; 16], 2_000, 2_000).unwrap();
        assert_eq!(cache.len_of(&a), 1);
    }

    #[test]
    fn reopening_rebuilds_the_counts_and_the_expiry_index() {
        let dir = tempfile::tempdir().unwrap();
        let a = SiteId::new("a").unwrap();
        {
            let cache = ReplayCache::open(dir.path(), 1_000, Durability::Sync).unwrap();
            cache.check_and_insert(&a, &[1; 16], 100, 100).unwrap();
            cache.check_and_insert(&a, &[2; 16], 900, 900).unwrap();
        }
        let cache = reopen(dir.path(), 1_000).with_max_per_sender(2);
        assert_eq!(cache.len_of(&a), 2);
        assert!(matches!(
            cache.check_and_insert(&a, &[3; 16], 950, 950),
            Err(ReplayError::Full { .. })
        ));
        assert_eq!(cache.prune(1_500).unwrap(), 1);
        assert_eq!(cache.prune(2_000).unwrap(), 1);
        assert!(cache.is_empty());
    }

    #[test]
    fn an_index_line_of_another_retention_spares_a_newer_entry() {
        let dir = tempfile::tempdir().unwrap();
        let a = SiteId::new("a").unwrap();
        {
            // Written with a short retention: the index says the entry expires at 1_100.
            let cache = ReplayCache::open(dir.path(), 1_000, Durability::Sync).unwrap();
            cache.check_and_insert(&a, &[1; 16], 100, 100).unwrap();
        }
        let cache = reopen(dir.path(), 10_000);
        assert_eq!(
            cache.prune(1_200).unwrap(),
            1,
            "the old line still expires it"
        );
        cache.check_and_insert(&a, &[1; 16], 1_300, 1_300).unwrap();
        // The line written at open (expiry 10_100) names the old timestamp, not the new entry.
        assert_eq!(cache.prune(10_200).unwrap(), 0);
        assert_eq!(cache.len_of(&a), 1);
    }
}
