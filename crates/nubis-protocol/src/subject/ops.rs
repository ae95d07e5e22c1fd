//! The operation tokens of nubis subjects: federation operations, Transfer proxy operations and
//! operator API endpoints.

use crate::message::{
    AbortMigration, Aborted, Body, CommitMigration, Committed, ControlReply, ControlRequest,
    EvictionAccepted, EvictionNotice, InitiateTransfer, MigrationRequest, Offers, PrepareMigration,
    Prepared, TransferStatusReply, TransferVerification,
};

/// The federation operations, each answered on `nubis.fed.<site>.<suffix>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FederationOp {
    /// Migration request → offers.
    MigrationRequest,
    /// Forced migration down the chain (prepare at the Source).
    MigrationPrepare,
    /// Forced migration up the chain (eviction notice).
    MigrationEvict,
    /// Commit of a verified migration.
    MigrationCommit,
    /// Abort of a migration.
    MigrationAbort,
    /// Initiate transfer.
    TransferInitiate,
    /// Transfer verification.
    TransferVerify,
    /// The Control interface.
    VmControl,
}

impl FederationOp {
    /// Every federation operation.
    pub const ALL: [FederationOp; 8] = [
        Self::MigrationRequest,
        Self::MigrationPrepare,
        Self::MigrationEvict,
        Self::MigrationCommit,
        Self::MigrationAbort,
        Self::TransferInitiate,
        Self::TransferVerify,
        Self::VmControl,
    ];

    /// The two subject tokens after `nubis.fed.<site>.`.
    pub fn suffix(self) -> &'static str {
        match self {
            Self::MigrationRequest => "migration.request",
            Self::MigrationPrepare => "migration.prepare",
            Self::MigrationEvict => "migration.evict",
            Self::MigrationCommit => "migration.commit",
            Self::MigrationAbort => "migration.abort",
            Self::TransferInitiate => "transfer.initiate",
            Self::TransferVerify => "transfer.verify",
            Self::VmControl => "vm.control",
        }
    }

    /// The body type a request on this subject must carry.
    pub fn request_type(self) -> &'static str {
        match self {
            Self::MigrationRequest => MigrationRequest::TYPE,
            Self::MigrationPrepare => PrepareMigration::TYPE,
            Self::MigrationEvict => EvictionNotice::TYPE,
            Self::MigrationCommit => CommitMigration::TYPE,
            Self::MigrationAbort => AbortMigration::TYPE,
            Self::TransferInitiate => InitiateTransfer::TYPE,
            Self::TransferVerify => TransferVerification::TYPE,
            Self::VmControl => ControlRequest::TYPE,
        }
    }

    /// The body type of a successful reply (any request may also be answered by `ErrorReply`).
    pub fn reply_type(self) -> &'static str {
        match self {
            Self::MigrationRequest => Offers::TYPE,
            Self::MigrationPrepare => Prepared::TYPE,
            Self::MigrationEvict => EvictionAccepted::TYPE,
            Self::MigrationCommit => Committed::TYPE,
            Self::MigrationAbort => Aborted::TYPE,
            Self::TransferInitiate | Self::TransferVerify => TransferStatusReply::TYPE,
            Self::VmControl => ControlReply::TYPE,
        }
    }

    pub(super) fn from_suffix(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|op| op.suffix() == s)
    }
}

/// Operations of a Transfer proxy, on `nubis.proxy.<site>.<proxy>.<op>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProxyOp {
    /// Site-internal: mint a transfer token for a VM on a host.
    Mint,
    /// Destination side: fetch the files of a source token (sent by the Destination site).
    Fetch,
    /// Status of a token (Transfer verification and Initiate transfer answer from it).
    Status,
    /// Site-internal: release a token and delete its objects after commit or abort.
    Release,
}

impl ProxyOp {
    /// Every proxy operation.
    pub const ALL: [ProxyOp; 4] = [Self::Mint, Self::Fetch, Self::Status, Self::Release];

    /// The subject token.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mint => "mint",
            Self::Fetch => "fetch",
            Self::Status => "status",
            Self::Release => "release",
        }
    }
}

/// Whether `name` may name an operator (a NATS user of a site's server and a subject token):
/// 1 to 32 of `a-z`, `0-9`, `-`, `_`.
pub fn is_operator_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// Endpoints of the operator API, on `nubis.ops.<site>.<endpoint>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpsEndpoint {
    /// The site's own status.
    Status,
    /// Known partner sites and their liveness.
    Sites,
    /// VMs the site is responsible for.
    Vms,
    /// Deploy a new VM (primary placement). (planned)
    Deploy,
    /// Migrate a VM. (planned)
    Migrate,
    /// Evict a VM (Forced migration up the chain). (planned)
    Evict,
    /// Control-interface change of a VM. (planned)
    Control,
    /// Cancel a migration. (planned)
    Cancel,
    /// Resource usage of a VM over a time range, computed from the site's accounting stream.
    Usage,
    /// List the images of the site's image store.
    Images,
    /// Import an uploaded image into the site's image store.
    ImagePut,
    /// Counters of the site's monitoring delivery (received, delivered, stored, dropped).
    Monitoring,
}

impl OpsEndpoint {
    /// Every endpoint.
    pub const ALL: [OpsEndpoint; 12] = [
        Self::Status,
        Self::Sites,
        Self::Vms,
        Self::Deploy,
        Self::Migrate,
        Self::Evict,
        Self::Control,
        Self::Cancel,
        Self::Usage,
        Self::Monitoring,
        Self::Images,
        Self::ImagePut,
    ];

    /// Whether the endpoint changes something (and is recorded in the site's audit stream);
    /// the others only read.
    pub fn is_mutating(self) -> bool {
        matches!(
            self,
            Self::Deploy
                | Self::Migrate
                | Self::Evict
                | Self::Control
                | Self::Cancel
                | Self::ImagePut
        )
    }

    /// The endpoint whose subject token is `token`.
    pub fn from_token(token: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.as_str() == token)
    }

    /// The subject token.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Status => "status",
            Self::Sites => "sites",
            Self::Vms => "vms",
            Self::Deploy => "deploy",
            Self::Migrate => "migrate",
            Self::Evict => "evict",
            Self::Control => "control",
            Self::Cancel => "cancel",
            Self::Usage => "usage",
            Self::Images => "images",
            Self::ImagePut => "image_put",
            Self::Monitoring => "monitoring",
        }
    }
}
