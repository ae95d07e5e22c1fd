//! Bodies of the Transfer proxy subjects `nubis.proxy.<site>.<proxy>.{mint,fetch,status,release}`
//! and `…progress.<migration>` (paper section III: Transfer proxies and Transfer tokens), and the
//! manifest a serving proxy stores beside a token's objects.
//!
//! Two kinds of body exist here. Bodies that cross sites ([`FetchTransfer`] is sent by a site to
//! its own proxy, [`TransferStatusQuery`], [`FetchKey`], [`SealedContentKey`], [`TransferAck`],
//! [`TransferProgress`] and [`TransferManifest`] are read by partners) carry only tokens, logical
//! file names, sizes, digests and sealed keys. [`MintToken`] and [`ReleaseToken`] are site-internal: they name host files, so they
//! travel only between a site and its own proxy and must never be exported over a leaf connection.

use serde::{Deserialize, Deserializer, Serialize};

use super::migration::{Endpoint, FileDigest};
use super::names::{HostId, ProxyUri, TransferToken};
use super::Body;
use crate::descriptor::is_image_name;
use crate::ids::{MigrationId, VmId};

fn logical_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    if is_image_name(&s) {
        Ok(s)
    } else {
        Err(serde::de::Error::custom("file name is not a logical name"))
    }
}

/// Site-internal: ask the proxy for a transfer token (the paper's "obtain Transfer token t_tok by
/// supplying h and the VM identifier").
///
/// Reply: [`Minted`], or an `ErrorReply` (`refused`, `malformed`, `internal`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MintToken {
    /// The migration the token belongs to; progress events are published under it.
    pub migration_id: MigrationId,
    /// The VM whose files the token stands for.
    pub vm: VmId,
    /// The host holding (or receiving) the files; kept only in the proxy's store.
    pub host: HostId,
    /// Requested lifetime; the proxy caps it by its own limit. Absent: the proxy's default.
    #[serde(default)]
    pub ttl_ms: Option<u64>,
    /// What the token is for.
    pub purpose: TokenPurpose,
}

impl Body for MintToken {
    const TYPE: &'static str = "MintToken";
}

/// What a token stands for. On the wire a map tagged by `kind`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TokenPurpose {
    /// Source side: serve these host files; the proxy starts publishing them at once.
    Serve {
        /// The VM's files: disk images, saved state, definition.
        files: Vec<LocalFile>,
    },
    /// Destination side: receive a VM's files into this host directory, each under its logical
    /// name.
    Receive {
        /// Absolute directory on the host's file system.
        dir: String,
    },
    /// Relay (paper III-D): fetch the files of `source` into this proxy's own bucket and serve
    /// them under the new token, so the far end sees only this proxy.
    Relay {
        /// The proxy and token the data comes from.
        source: Endpoint,
        /// The migration's bandwidth cap for fetching from `source`, in bytes per second (the
        /// proxy's own `transfer.max_bytes_per_sec` applies when smaller).
        #[serde(default)]
        max_bytes_per_sec: Option<u64>,
    },
}

/// One host file of a VM, under its logical name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalFile {
    /// Logical name (`disk-vda.qcow2`, `state.sav`, `domain.xml`): image-name alphabet, no `/`.
    #[serde(deserialize_with = "logical_name")]
    pub name: String,
    /// Absolute path on the host's file system.
    pub path: String,
}

/// Reply to [`MintToken`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Minted {
    /// The new token, meaningful only to `proxy`.
    pub token: TransferToken,
    /// The proxy that minted it (the paper's t_uri).
    pub proxy: ProxyUri,
    /// When the token expires, in milliseconds since the Unix epoch.
    pub expires_ms: u64,
    /// Bytes of data to move for a serving token (allocated extents only); 0 otherwise.
    pub total_bytes: u64,
}

impl Body for Minted {
    const TYPE: &'static str = "Minted";
}

/// Initiate transfer, the proxy's part (paper: "At the Transfer proxy: connect to s_uri, and
/// supply s_tok"): the Destination site asks its own proxy to fetch the files of `source` into
/// what `destination` maps to. The reply comes at once; the transfer continues in the background
/// and is followed with [`TransferStatusQuery`] or the progress events.
///
/// Reply: [`super::TransferStatusReply`], or an `ErrorReply` (`unknown_token`, `expired_token`,
/// `token_used`, `refused`, `transfer_failed`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchTransfer {
    /// The migration.
    pub migration_id: MigrationId,
    /// The VM.
    pub vm: VmId,
    /// The paper's ⟨s_uri, s_tok⟩.
    pub source: Endpoint,
    /// The paper's d_tok, minted by the proxy this request is sent to.
    pub destination: TransferToken,
    /// The migration's bandwidth cap in bytes per second, if any; the proxy's own cap applies
    /// when it is smaller.
    #[serde(default)]
    pub max_bytes_per_sec: Option<u64>,
}

impl Body for FetchTransfer {
    const TYPE: &'static str = "FetchTransfer";
}

/// Status of a token at the proxy that minted it (Transfer verification answers from it at the
/// Source; a Destination proxy asks it before fetching).
///
/// Reply: [`super::TransferStatusReply`], or an `ErrorReply` (`unknown_token`, `expired_token`,
/// `token_used`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferStatusQuery {
    /// The migration.
    pub migration_id: MigrationId,
    /// The token asked about.
    pub token: TransferToken,
}

impl Body for TransferStatusQuery {
    const TYPE: &'static str = "TransferStatusQuery";
}

/// Sent on the serving (or relaying) proxy's `status` subject by the proxy about to read the
/// token's objects: a fresh ephemeral X25519 public key, to which the serving proxy seals the
/// transfer's content key. Chunks in the serving site's bucket are encrypted under that key, so
/// only the proxy holding the ephemeral secret can read them. The first site granted the key
/// is the only one that is granted it again.
///
/// Reply: [`SealedContentKey`], or an `ErrorReply` (`unknown_token`, `expired_token`,
/// `token_used`, `refused`, `transfer_failed`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchKey {
    /// The migration.
    pub migration_id: MigrationId,
    /// The serving proxy's token.
    pub token: TransferToken,
    /// The fetcher's ephemeral X25519 public key, used for this one answer.
    #[serde(with = "serde_bytes")]
    pub fetcher_key: [u8; 32],
}

impl Body for FetchKey {
    const TYPE: &'static str = "FetchKey";
}

/// The answer to [`FetchKey`]: the transfer's 32-byte content key, sealed (libsodium
/// `crypto_box_seal`: X25519, XSalsa20-Poly1305) to the fetcher's ephemeral key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedContentKey {
    /// The migration.
    pub migration_id: MigrationId,
    /// The serving proxy's token.
    pub token: TransferToken,
    /// `crypto_box_seal(fetcher_key, content_key)`.
    #[serde(with = "serde_bytes")]
    pub sealed: Vec<u8>,
}

impl std::fmt::Debug for SealedContentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedContentKey")
            .field("migration_id", &self.migration_id)
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

impl Body for SealedContentKey {
    const TYPE: &'static str = "SealedContentKey";
}

/// Sent on the serving proxy's `status` subject by the proxy that fetched the files: the digests
/// it verified. The serving proxy compares them with its own and only then turns `succeeded`.
///
/// Reply: [`super::TransferStatusReply`] with the serving end's status (`failed` on a mismatch),
/// or an `ErrorReply`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferAck {
    /// The migration.
    pub migration_id: MigrationId,
    /// The serving proxy's token.
    pub token: TransferToken,
    /// The digests computed at the receiving end, sorted by name.
    pub digests: Vec<FileDigest>,
}

impl Body for TransferAck {
    const TYPE: &'static str = "TransferAck";
}

/// Site-internal: the migration was committed or aborted; forget the token and delete its
/// objects.
///
/// Reply: [`Released`], or an `ErrorReply` (`unknown_token`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseToken {
    /// The migration.
    pub migration_id: MigrationId,
    /// The token to release.
    pub token: TransferToken,
    /// Whether the migration committed or aborted.
    pub outcome: ReleaseOutcome,
}

impl Body for ReleaseToken {
    const TYPE: &'static str = "ReleaseToken";
}

/// How a migration ended, for [`ReleaseToken`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseOutcome {
    /// Committed: received files stay (they are the VM's now).
    Commit,
    /// Aborted: received files are deleted as well.
    Abort,
}

/// Reply to [`ReleaseToken`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Released {
    /// The token released.
    pub token: TransferToken,
    /// Objects deleted from the proxy's bucket.
    pub objects_deleted: u64,
}

impl Body for Released {
    const TYPE: &'static str = "Released";
}

/// Which end of a transfer a proxy plays for a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferRole {
    /// Publishing a VM's files.
    Serve,
    /// Fetching them into a host directory.
    Receive,
    /// Fetching them into its own bucket for another proxy.
    Relay,
}

/// Progress event on `nubis.proxy.<site>.<proxy>.progress.<migration>` (signed, `to` = `*`).
/// `bytes_done` never decreases between events of one token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransferProgress {
    /// The migration.
    pub migration_id: MigrationId,
    /// The VM.
    pub vm: VmId,
    /// What the publishing proxy does.
    pub role: TransferRole,
    /// Data bytes handled so far (allocated extents only).
    pub bytes_done: u64,
    /// Data bytes in all files.
    pub bytes_total: u64,
    /// Recent rate in bytes per second.
    pub bytes_per_sec: f64,
    /// Whether this is the last event of the transfer.
    pub finished: bool,
}

impl Body for TransferProgress {
    const TYPE: &'static str = "TransferProgress";
}

/// The list of files behind a serving token, stored signed (`to` = `*`, subject =
/// `$O.nubis-xfer.M.<base64url(object name)>`) as the first object of the token, so a fetching
/// proxy can size the transfer and start before the files are complete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferManifest {
    /// The VM.
    pub vm: VmId,
    /// The files, sorted by name.
    pub files: Vec<ManifestFile>,
}

impl Body for TransferManifest {
    const TYPE: &'static str = "TransferManifest";
}

/// One file of a [`TransferManifest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// Logical name.
    #[serde(deserialize_with = "logical_name")]
    pub name: String,
    /// Length of the file in bytes, holes included.
    pub size: u64,
    /// Bytes in its allocated extents: what travels.
    pub allocated: u64,
}
