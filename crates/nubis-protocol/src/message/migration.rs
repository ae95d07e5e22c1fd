//! Bodies of the migration operations (paper section III-B) and of the hand-over that the paper
//! leaves implicit (commit and abort).
//!
//! Every request travels hop by hop between partner sites; an Intermediary forwards it to its next
//! hop for the VM (or, for tokens it passed on in offers, to the partner the token came from).

use serde::{Deserialize, Deserializer, Serialize};

use super::names::{NoticeId, ProxyUri, TransferToken};
use super::Body;
use crate::descriptor::{is_image_name, VmDescriptor};
use crate::ids::{MigrationId, RequestId, VmId};

/// Migration request: "can you take this VM?" (Controller or Intermediary → possible Destination).
///
/// Reply: [`Offers`] (possibly empty), or an `ErrorReply` (`refused`, `loop_detected`,
/// `depth_exceeded`, `no_capacity`, …).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationRequest {
    /// This request as it travels down a delegation chain; a site that sees it twice refuses it.
    pub request_id: RequestId,
    /// The migration (or placement) the request belongs to.
    pub migration_id: MigrationId,
    /// The VM to place.
    pub vm: VmId,
    /// Its descriptor; `descriptor.id` equals `vm`.
    pub descriptor: VmDescriptor,
    /// Delegation hops already travelled: 0 when sent by the Controller.
    pub depth: u8,
    /// Deepest delegation the sender accepts; a site at `depth == max_depth` must not delegate.
    pub max_depth: u8,
}

impl Body for MigrationRequest {
    const TYPE: &'static str = "MigrationRequest";
}

/// Reply to a [`MigrationRequest`]: the placement options the site is willing to expose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offers {
    /// The request answered.
    pub request_id: RequestId,
    /// The options; empty when the site has nothing to offer.
    #[serde(default)]
    pub offers: Vec<Offer>,
}

impl Body for Offers {
    const TYPE: &'static str = "Offers";
}

/// One placement option: the paper's ⟨proxy URI, transfer token⟩ plus the terms used to rank it.
///
/// An offer obtained by delegation is passed upstream unchanged: it names the proxy that will
/// receive the files, never the site or host behind the Intermediaries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    /// The Destination's Transfer proxy.
    pub proxy: ProxyUri,
    /// The token that proxy minted for this VM.
    pub token: TransferToken,
    /// What the offer costs and how good it is, for the Controller's ranking.
    pub terms: OfferTerms,
    /// When the token expires, in milliseconds since the Unix epoch.
    pub expires_ms: u64,
}

/// The benefit side of an [`Offer`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfferTerms {
    /// Price per VM-hour in thousandths of the bilateral contract's currency unit.
    pub price_milli: u64,
    /// Coarse free capacity at the offering place, if the offering site discloses it.
    #[serde(default)]
    pub capacity: Option<CapacityHint>,
    /// Delegation hops between the answering partner and the Destination (0 = the partner itself).
    pub depth: u8,
}

/// Coarse free capacity of an offer; deliberately too coarse to size a site's infrastructure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CapacityHint {
    /// The VM fits, with little room to spare.
    Low,
    /// Comfortable room.
    Medium,
    /// Plenty of room.
    High,
}

/// Forced migration down the chain (Controller → Source, via Intermediaries): prepare the VM to
/// leave and answer ⟨proxy URI, token⟩ for its files.
///
/// Reply: [`Prepared`], or an `ErrorReply` (`unknown_vm`, `busy`, …).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareMigration {
    /// The migration being set up.
    pub migration_id: MigrationId,
    /// The VM to prepare.
    pub vm: VmId,
    /// Whether the runtime state travels along.
    pub mode: PrepareMode,
    /// The migration's bandwidth cap, in bytes per second: a site that relays the prepared
    /// source fetches it no faster.
    #[serde(default)]
    pub max_bytes_per_sec: Option<u64>,
}

impl Body for PrepareMigration {
    const TYPE: &'static str = "PrepareMigration";
}

/// How the Source prepares a VM for migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrepareMode {
    /// Save the memory state to a file that travels with the disks; the VM resumes at the
    /// Destination where it stopped.
    SaveState,
    /// Shut the VM down; only its disks travel (cold migration without state).
    Shutdown,
}

/// Reply to [`PrepareMigration`]: where the Source's files can be fetched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prepared {
    /// The migration being set up.
    pub migration_id: MigrationId,
    /// The Source's Transfer proxy and token (the paper's ⟨s_uri, s_tok⟩).
    pub source: Endpoint,
    /// Total bytes to transfer, for progress reporting.
    pub total_bytes: u64,
}

impl Body for Prepared {
    const TYPE: &'static str = "Prepared";
}

/// Forced migration up the chain (usage scenario 2): "move this VM away from me", sent to the site
/// that delegated the VM. The receiver must act: become Controller and migrate the VM, or pass the
/// notice further up. The sender retries with the same `notice_id` until it is accepted.
///
/// Reply: [`EvictionAccepted`], or an `ErrorReply` (`unknown_vm`, …).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvictionNotice {
    /// Identifies the notice across retries.
    pub notice_id: NoticeId,
    /// The VM to move away.
    pub vm: VmId,
    /// Why, in words for operators (e.g. "host maintenance"); never a host name. At most
    /// [`crate::clip::REASON_LIMIT`] bytes are kept when decoded.
    #[serde(deserialize_with = "crate::clip::capped_reason")]
    pub reason: String,
    /// When the VM must be gone, in milliseconds since the Unix epoch.
    pub deadline_ms: u64,
}

impl Body for EvictionNotice {
    const TYPE: &'static str = "EvictionNotice";
}

/// Reply to [`EvictionNotice`]: the receiver has journaled the notice and taken responsibility.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvictionAccepted {
    /// The notice accepted.
    pub notice_id: NoticeId,
    /// The VM it concerns.
    pub vm: VmId,
}

impl Body for EvictionAccepted {
    const TYPE: &'static str = "EvictionAccepted";
}

/// One end of a transfer: a Transfer proxy and the token it minted.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Endpoint {
    /// The proxy.
    pub proxy: ProxyUri,
    /// The token, meaningful only to that proxy.
    pub token: TransferToken,
}

/// Initiate transfer (Controller → Destination, via Intermediaries): the Destination's proxy
/// fetches the files from the Source's proxy. The paper's ⟨s_uri, s_tok, d_uri, d_tok⟩.
///
/// Reply: [`TransferStatusReply`], or an `ErrorReply` (`unknown_token`, `expired_token`,
/// `token_used`, `transfer_failed`, …).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitiateTransfer {
    /// The migration.
    pub migration_id: MigrationId,
    /// The VM.
    pub vm: VmId,
    /// Where the files come from.
    pub source: Endpoint,
    /// Where the files go; Intermediaries route the request by this token.
    pub destination: Endpoint,
    /// Optional bandwidth cap for this transfer, in bytes per second.
    #[serde(default)]
    pub max_bytes_per_sec: Option<u64>,
}

impl Body for InitiateTransfer {
    const TYPE: &'static str = "InitiateTransfer";
}

/// Transfer verification (Controller → Source, via Intermediaries): did the transfer from
/// ⟨s_uri, s_tok⟩ complete? The Source answers from its proxy's status.
///
/// Reply: [`TransferStatusReply`], or an `ErrorReply`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferVerification {
    /// The migration.
    pub migration_id: MigrationId,
    /// The VM.
    pub vm: VmId,
    /// The Source's endpoint, as answered in [`Prepared`].
    pub source: Endpoint,
}

impl Body for TransferVerification {
    const TYPE: &'static str = "TransferVerification";
}

/// Reply to [`InitiateTransfer`] and [`TransferVerification`]. The Controller compares the two
/// statuses (step 7 of the Main migration algorithm) and commits when both are `succeeded` with
/// equal digests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferStatusReply {
    /// The migration.
    pub migration_id: MigrationId,
    /// The status at the answering end.
    pub status: TransferStatus,
}

impl Body for TransferStatusReply {
    const TYPE: &'static str = "TransferStatusReply";
}

/// The status of a transfer at one end. On the wire a map tagged by `state`, e.g.
/// `{"state":"transferring","bytes_done":10,"bytes_total":100}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum TransferStatus {
    /// Not started yet.
    Pending,
    /// Bytes are moving.
    Transferring {
        /// Bytes written and verified so far.
        bytes_done: u64,
        /// Bytes in all files.
        bytes_total: u64,
    },
    /// Every file arrived and its digest matched.
    Succeeded {
        /// The digests, one per file, sorted by name.
        digests: Vec<FileDigest>,
    },
    /// The transfer failed; nothing partial is kept at the Destination.
    Failed {
        /// Why, in words for operators (at most [`crate::clip::REASON_LIMIT`] bytes kept).
        #[serde(deserialize_with = "crate::clip::capped_reason")]
        reason: String,
    },
}

impl TransferStatus {
    /// Whether the status can no longer change (succeeded or failed).
    pub fn is_final(&self) -> bool {
        matches!(self, Self::Succeeded { .. } | Self::Failed { .. })
    }
}

/// The SHA-256 digest of one transferred file.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileDigest {
    /// Logical file name, e.g. `disk-vda`, `state`, `definition` (image-name alphabet, never a path).
    #[serde(deserialize_with = "file_name")]
    pub name: String,
    /// SHA-256 of the whole file.
    #[serde(with = "serde_bytes")]
    pub sha256: [u8; 32],
    /// Length in bytes.
    pub len: u64,
}

fn file_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    if is_image_name(&s) {
        Ok(s)
    } else {
        Err(serde::de::Error::custom("file name is not a logical name"))
    }
}

/// Which end of a migration a commit or abort addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HandOverSide {
    /// The new chain: activate (commit) or discard what was received (abort).
    Destination,
    /// The old chain: release the VM's files (commit) or resume the VM (abort).
    Source,
}

/// Commit a verified migration at one end. Sent by the Controller first to the Destination side,
/// then to the Source side; every site on the way updates its next-hop pointer for the VM.
/// Idempotent by `migration_id`.
///
/// Reply: [`Committed`], or an `ErrorReply`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitMigration {
    /// The migration.
    pub migration_id: MigrationId,
    /// The VM.
    pub vm: VmId,
    /// Which end this message travels to.
    pub side: HandOverSide,
    /// That end's endpoint; Intermediaries route by its token.
    pub endpoint: Endpoint,
}

impl Body for CommitMigration {
    const TYPE: &'static str = "CommitMigration";
}

/// Reply to [`CommitMigration`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committed {
    /// The migration.
    pub migration_id: MigrationId,
    /// The end that committed.
    pub side: HandOverSide,
}

impl Body for Committed {
    const TYPE: &'static str = "Committed";
}

/// Abort a migration at one end before commit. Idempotent by `migration_id`.
///
/// Reply: [`Aborted`], or an `ErrorReply`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AbortMigration {
    /// The migration.
    pub migration_id: MigrationId,
    /// The VM.
    pub vm: VmId,
    /// Which end this message travels to.
    pub side: HandOverSide,
    /// That end's endpoint; Intermediaries route by its token.
    pub endpoint: Endpoint,
    /// Why, in words for operators (at most [`crate::clip::REASON_LIMIT`] bytes kept).
    #[serde(deserialize_with = "crate::clip::capped_reason")]
    pub reason: String,
}

impl Body for AbortMigration {
    const TYPE: &'static str = "AbortMigration";
}

/// Reply to [`AbortMigration`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Aborted {
    /// The migration.
    pub migration_id: MigrationId,
    /// The end that aborted.
    pub side: HandOverSide,
}

impl Body for Aborted {
    const TYPE: &'static str = "Aborted";
}
