//! The proxy's persistent store (sled): what each transfer token stands for.
//!
//! This is the only place where a token meets a host and its paths; nothing in here is ever
//! sent to another site. Records survive a restart so an interrupted transfer resumes and a
//! released or expired token stays refused.
//!
//! The table is bounded: released tokens are removed, expired ones become tombstones that
//! garbage collection removes after a while, and a new token is refused ([`StoreError::Full`],
//! answered `busy`) while the store holds as many records as it may, so no flood of mint
//! requests grows it without limit and no record already written is dropped to make room.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use nubis_protocol::codec::{self, CodecError};
use nubis_protocol::message::{
    Endpoint, FileDigest, HostId, TokenPurpose, TransferStatus, TransferToken,
};
use nubis_protocol::{MigrationId, SiteId, VmId};
use serde::{Deserialize, Serialize};

use crate::objects::ReadPosition;
use crate::seal::ContentKey;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed.
    #[error("sled failed")]
    Sled(#[from] sled::Error),
    /// A record could not be encoded or decoded.
    #[error("record codec failed")]
    Codec(#[from] CodecError),
    /// The store holds as many records (live tokens and tombstones) as it may.
    #[error("token store full ({max} records)")]
    Full {
        /// The bound.
        max: usize,
    },
}

/// How many records (live tokens and tombstones) the store holds at most unless told otherwise:
/// far more than the transfers a site runs at once, far less than would strain the proxy.
pub const DEFAULT_MAX_RECORDS: usize = 100_000;

/// Everything the proxy knows about one token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The token.
    pub token: TransferToken,
    /// The migration it was minted for.
    pub migration_id: MigrationId,
    /// The VM.
    pub vm: VmId,
    /// The host holding or receiving the files.
    pub host: HostId,
    /// What the token stands for (host paths live only here).
    pub purpose: TokenPurpose,
    /// Mint time, ms since the epoch.
    pub created_ms: u64,
    /// Expiry, ms since the epoch.
    pub expires_ms: u64,
    /// Status at this end. While bytes move, the live counters in memory are more recent.
    pub status: TransferStatus,
    /// Set by garbage collection once the token expired; the record stays a while as a
    /// tombstone so the token is refused as expired rather than unknown.
    #[serde(default)]
    pub expired: bool,
    /// Serve and relay: digests of the files as published. Receive: digests verified so far.
    #[serde(default)]
    pub digests: Vec<FileDigest>,
    /// Receive and relay: the endpoint the files came from.
    #[serde(default)]
    pub source: Option<Endpoint>,
    /// Data bytes to move (allocated extents).
    #[serde(default)]
    pub total_bytes: u64,
    /// Whether a transfer was started with this token (it cannot be started twice).
    #[serde(default)]
    pub used: bool,
    /// Whether this end finished its part: published (serve), relayed into the own bucket
    /// (relay), or received and verified every file (receive).
    #[serde(default)]
    pub complete: bool,
    /// Logical names of the token's files, once known (for clean-up).
    #[serde(default)]
    pub file_names: Vec<String>,
    /// Receive: the migration's bandwidth cap for the fetch, bytes per second.
    #[serde(default)]
    pub max_bytes_per_sec: Option<u64>,
    /// Receive: the file being received and how far it got at its last checkpoint (its bytes
    /// up to there are durable in the partial file), so a restart resumes there.
    #[serde(default)]
    pub partial: Option<PartialFile>,
    /// Serve and relay: the content key the token's chunks are sealed under (see
    /// [`crate::seal`]); it leaves this store only sealed to a fetcher's ephemeral key.
    #[serde(default)]
    pub content_key: Option<ContentKey>,
    /// Serve and relay: how many times an object of the token was (re)written; each attempt
    /// seals under nonces of its own.
    #[serde(default)]
    pub seal_attempts: u32,
    /// Serve and relay: the site the content key was granted to; no other site is granted it.
    #[serde(default)]
    pub fetcher: Option<SiteId>,
}

/// A file partly received: its logical name, where the reader of its object stood, and the
/// file offset up to which the partial file holds those chunks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartialFile {
    /// The file's logical name.
    pub name: String,
    /// Chunks and bytes received, and the stream sequence of the last one.
    pub position: ReadPosition,
    /// End offset of the last chunk received.
    pub resume_at: u64,
}

impl TokenRecord {
    /// The digest recorded for logical file `name`, if that file is complete.
    pub fn digest_of(&self, name: &str) -> Option<&FileDigest> {
        self.digests.iter().find(|d| d.name == name)
    }
}

/// The token table.
#[derive(Debug, Clone)]
pub struct TokenStore {
    db: sled::Db,
    tokens: sled::Tree,
    /// Records held (counted once on open, then kept up to date).
    records: Arc<AtomicUsize>,
    max_records: usize,
    /// Held across the read and the write of an [`TokenStore::update`], so two tasks changing
    /// one record never lose either change (a lost write-attempt count would repeat nonces,
    /// see [`crate::seal`]).
    writes: Arc<Mutex<()>>,
}

impl TokenStore {
    /// Opens (or creates) the store in directory `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .flush_every_ms(Some(200))
            .open()?;
        let tokens = db.open_tree("tokens")?;
        let records = Arc::new(AtomicUsize::new(tokens.len()));
        Ok(Self {
            db,
            tokens,
            records,
            max_records: DEFAULT_MAX_RECORDS,
            writes: Arc::new(Mutex::new(())),
        })
    }

    /// Changes how many records the store may hold.
    pub fn with_max_records(mut self, max: usize) -> Self {
        self.max_records = max;
        self
    }

    /// Records held (live tokens and tombstones).
    pub fn len(&self) -> usize {
        self.records.load(Ordering::Relaxed)
    }

    /// Whether the store holds no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes the record of a newly minted token, refusing it with [`StoreError::Full`] when the
    /// store holds as many records as it may.
    pub fn put_new(&self, record: &TokenRecord) -> Result<(), StoreError> {
        if self.len() >= self.max_records {
            return Err(StoreError::Full {
                max: self.max_records,
            });
        }
        self.put(record)
    }

    /// The record of `token`.
    pub fn get(&self, token: &TransferToken) -> Result<Option<TokenRecord>, StoreError> {
        match self.tokens.get(token.0)? {
            Some(raw) => Ok(Some(codec::from_slice(&raw)?)),
            None => Ok(None),
        }
    }

    /// Writes `record` durably: a state change that is lost could make a finished transfer run
    /// again or a failed one look fine.
    pub fn put(&self, record: &TokenRecord) -> Result<(), StoreError> {
        if self
            .tokens
            .insert(record.token.0, codec::to_vec(record)?)?
            .is_none()
        {
            self.records.fetch_add(1, Ordering::Relaxed);
        }
        self.db.flush()?;
        Ok(())
    }

    /// Changes the record of `token` with `f` and writes it; `None` when there is none.
    pub fn update(
        &self,
        token: &TransferToken,
        f: impl FnOnce(&mut TokenRecord),
    ) -> Result<Option<TokenRecord>, StoreError> {
        let _one = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        let Some(mut rec) = self.get(token)? else {
            return Ok(None);
        };
        f(&mut rec);
        self.put(&rec)?;
        Ok(Some(rec))
    }

    /// Forgets `token`.
    pub fn remove(&self, token: &TransferToken) -> Result<(), StoreError> {
        if self.tokens.remove(token.0)?.is_some() {
            self.records.fetch_sub(1, Ordering::Relaxed);
        }
        self.db.flush()?;
        Ok(())
    }

    /// Every record (for resumption and garbage collection).
    pub fn all(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.tokens.iter() {
            let (_, raw) = item?;
            out.push(codec::from_slice(&raw)?);
        }
        Ok(out)
    }

    /// Flushes pending writes.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> TokenRecord {
        TokenRecord {
            token: TransferToken::random(),
            migration_id: MigrationId::random(),
            vm: VmId::new("v").unwrap(),
            host: HostId::new("h").unwrap(),
            purpose: TokenPurpose::Receive { dir: "/r".into() },
            created_ms: 1,
            expires_ms: 2,
            status: TransferStatus::Pending,
            expired: false,
            digests: Vec::new(),
            source: None,
            total_bytes: 0,
            used: false,
            complete: false,
            file_names: Vec::new(),
            max_bytes_per_sec: None,
            partial: None,
            content_key: None,
            seal_attempts: 0,
            fetcher: None,
        }
    }

    #[test]
    fn concurrent_updates_of_one_record_are_never_lost() {
        // Write attempts count nonces of the content key: none may be counted twice.
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::open(dir.path()).unwrap();
        let rec = record();
        store.put_new(&rec).unwrap();
        let attempts: Vec<Vec<u32>> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        (0..25)
                            .map(|_| {
                                store
                                    .update(&rec.token, |r| r.seal_attempts += 1)
                                    .unwrap()
                                    .unwrap()
                                    .seal_attempts
                            })
                            .collect()
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        let mut seen: Vec<u32> = attempts.into_iter().flatten().collect();
        seen.sort_unstable();
        assert_eq!(seen, (1..=100).collect::<Vec<u32>>());
        assert_eq!(store.get(&rec.token).unwrap().unwrap().seal_attempts, 100);
    }

    #[test]
    fn minting_is_bounded_and_a_removal_makes_room() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::open(dir.path()).unwrap().with_max_records(2);
        let (a, b) = (record(), record());
        store.put_new(&a).unwrap();
        store.put_new(&b).unwrap();
        assert!(matches!(
            store.put_new(&record()),
            Err(StoreError::Full { max: 2 })
        ));
        // Records already written are kept and still change.
        store.update(&a.token, |r| r.used = true).unwrap();
        assert!(store.get(&a.token).unwrap().unwrap().used);
        assert_eq!(store.len(), 2);
        store.remove(&b.token).unwrap();
        store.put_new(&record()).unwrap();
        drop(store);
        // The count survives a reopen (repeated while sled's background flusher still holds
        // the lock of the handle just dropped).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let store = loop {
            match TokenStore::open(dir.path()) {
                Err(StoreError::Sled(sled::Error::Io(e)))
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => break other.unwrap().with_max_records(2),
            }
        };
        assert_eq!(store.len(), 2);
        assert!(store.put_new(&record()).is_err());
    }
}
