//! Typed message bodies of every operation (paper section III-B and IV).
//!
//! Each body is a MessagePack map with named fields (see [`crate::codec`]); its [`Body::TYPE`] is
//! written in the envelope. Enums with data are maps tagged by a `kind` or `state` field; plain
//! enums are snake_case strings. No field that crosses a site boundary holds a host name, a path
//! or a hypervisor URI: proxies are named by [`ProxyUri`], files by logical names, images by
//! their image-store names.

use serde::de::DeserializeOwned;
use serde::Serialize;

mod control;
mod directory;
mod error;
pub mod host;
mod migration;
mod monitoring;
mod names;
pub mod proxy;

pub use control::{ControlChange, ControlReply, ControlRequest, DmtfState, StateTransition};
pub use directory::{ConsumerRegistration, ProducerRegistration, ProxyEntry, SiteEntry};
pub use error::{ErrorCode, ErrorReply};
pub use host::{
    ActivateVm, CapacityQuery, ControlVm, HostCallError, HostCapacity, HostClient, HostFile,
    HostOp, HostReply, HostRequest, HostResources, HostTransport, HostVmEntry, HostVmStatus,
    HostVms, ListVms, PrepareVm, ReleaseVm, ReserveVm, ResumeVm, TransportError, UpdateVm,
    VmPrepared, VmReleased, VmReserved, VmStateQuery, VmUpdated,
};
pub use migration::{
    AbortMigration, Aborted, CapacityHint, CommitMigration, Committed, Endpoint, EvictionAccepted,
    EvictionNotice, FileDigest, HandOverSide, InitiateTransfer, MigrationRequest, Offer,
    OfferTerms, Offers, PrepareMigration, PrepareMode, Prepared, TransferStatus,
    TransferStatusReply, TransferVerification,
};
pub use monitoring::{
    BatchPayload, BatchStored, ClearPayload, EncryptedKpi, MonitoringBatch, ProcessedValue,
    ProducedBatch, Sample, Value,
};
pub use names::{HostId, NoticeId, ProducerId, ProxyId, ProxyUri, ProxyUriError, TransferToken};
pub use proxy::{
    FetchKey, FetchTransfer, LocalFile, ManifestFile, MintToken, Minted, ReleaseOutcome,
    ReleaseToken, Released, SealedContentKey, TokenPurpose, TransferAck, TransferManifest,
    TransferProgress, TransferRole, TransferStatusQuery,
};

/// A message body that can travel inside a signed envelope.
///
/// `TYPE` is written into the envelope's `type` field (and covered by the signature), so a
/// receiver in any language knows how to decode the body before looking at it.
pub trait Body: Serialize + DeserializeOwned {
    /// Stable name of the body type on the wire, e.g. `"MigrationRequest"`.
    const TYPE: &'static str;
}

/// The `TYPE` of every body this build knows, for receivers that dispatch on the envelope's
/// `type` field and for documentation checks.
pub const BODY_TYPES: &[&str] = &[
    MigrationRequest::TYPE,
    Offers::TYPE,
    PrepareMigration::TYPE,
    Prepared::TYPE,
    EvictionNotice::TYPE,
    EvictionAccepted::TYPE,
    InitiateTransfer::TYPE,
    TransferVerification::TYPE,
    TransferStatusReply::TYPE,
    CommitMigration::TYPE,
    Committed::TYPE,
    AbortMigration::TYPE,
    Aborted::TYPE,
    ControlRequest::TYPE,
    ControlReply::TYPE,
    MonitoringBatch::TYPE,
    BatchStored::TYPE,
    SiteEntry::TYPE,
    ProxyEntry::TYPE,
    ProducerRegistration::TYPE,
    ConsumerRegistration::TYPE,
    ErrorReply::TYPE,
    MintToken::TYPE,
    Minted::TYPE,
    FetchTransfer::TYPE,
    TransferStatusQuery::TYPE,
    TransferAck::TYPE,
    FetchKey::TYPE,
    SealedContentKey::TYPE,
    ReleaseToken::TYPE,
    Released::TYPE,
    TransferProgress::TYPE,
    TransferManifest::TYPE,
    CapacityQuery::TYPE,
    HostCapacity::TYPE,
    ReserveVm::TYPE,
    VmReserved::TYPE,
    ActivateVm::TYPE,
    HostVmStatus::TYPE,
    PrepareVm::TYPE,
    VmPrepared::TYPE,
    ResumeVm::TYPE,
    ReleaseVm::TYPE,
    VmReleased::TYPE,
    ControlVm::TYPE,
    UpdateVm::TYPE,
    VmUpdated::TYPE,
    VmStateQuery::TYPE,
    ListVms::TYPE,
    HostVms::TYPE,
];
