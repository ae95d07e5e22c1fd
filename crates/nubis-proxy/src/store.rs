//! The proxy's persistent store (sled): what each transfer token stands for.
//!
//! This is the only place where a token meets a host and its paths; nothing in here is ever
//! sent to another site. Records survive a restart so an interrupted transfer resumes and a
//! released or expired token stays refused.

use std::path::Path;

use nubis_protocol::codec::{self, CodecError};
use nubis_protocol::message::{
    Endpoint, FileDigest, HostId, TokenPurpose, TransferStatus, TransferToken,
};
use nubis_protocol::{MigrationId, VmId};
use serde::{Deserialize, Serialize};

use crate::objects::ReadPosition;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed.
    #[error("sled failed")]
    Sled(#[from] sled::Error),
    /// A record could not be encoded or decoded.
    #[error("record codec failed")]
    Codec(#[from] CodecError),
}

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
}

impl TokenStore {
    /// Opens (or creates) the store in directory `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .flush_every_ms(Some(200))
            .open()?;
        let tokens = db.open_tree("tokens")?;
        Ok(Self { db, tokens })
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
        self.tokens.insert(record.token.0, codec::to_vec(record)?)?;
        self.db.flush()?;
        Ok(())
    }

    /// Changes the record of `token` with `f` and writes it; `None` when there is none.
    pub fn update(
        &self,
        token: &TransferToken,
        f: impl FnOnce(&mut TokenRecord),
    ) -> Result<Option<TokenRecord>, StoreError> {
        let Some(mut rec) = self.get(token)? else {
            return Ok(None);
        };
        f(&mut rec);
        self.put(&rec)?;
        Ok(Some(rec))
    }

    /// Forgets `token`.
    pub fn remove(&self, token: &TransferToken) -> Result<(), StoreError> {
        self.tokens.remove(token.0)?;
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
