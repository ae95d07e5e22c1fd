//! Errors of the Transfer proxy, each with the stable code it is answered with on the bus.

use nubis_protocol::message::ErrorCode;

use crate::objects::ObjectError;
use crate::store::StoreError;
use nubis_bus::CallError;

/// Why a proxy operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The token was not minted by this proxy (or was released).
    #[error("unknown transfer token")]
    UnknownToken,
    /// The token's lifetime is over.
    #[error("transfer token expired")]
    ExpiredToken,
    /// The token was already used for a transfer that completed or is running elsewhere.
    #[error("transfer token already used")]
    TokenUsed,
    /// The token stands for something else (e.g. a serving token given as a destination).
    #[error("transfer token is not a {expected} token")]
    WrongPurpose {
        /// What the operation needs.
        expected: &'static str,
    },
    /// A site-internal operation was asked by another site.
    #[error("only the proxy's own site may ask for {0}")]
    NotOwnSite(&'static str),
    /// This proxy's policy does not allow relaying.
    #[error("relaying is not allowed by this proxy's policy")]
    RelayNotAllowed,
    /// A file to serve, or the directory to receive into, is not usable.
    #[error("file {name:?} cannot be used")]
    File {
        /// Logical name (never the path: errors may travel to other sites).
        name: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file to serve, or the directory to receive into, lies outside the proxy's roots
    /// (`[transfer] roots`), once symbolic links are resolved.
    #[error("file {name:?} is outside the directories this proxy may use")]
    OutsideRoots {
        /// Logical name (never the path).
        name: String,
    },
    /// A request was malformed (e.g. a relative path or a duplicated file name).
    #[error("invalid request: {0}")]
    Invalid(&'static str),
    /// The source proxy refused the source token.
    #[error("source proxy refused the token ({code})")]
    SourceRefused {
        /// Its code.
        code: ErrorCode,
        /// Its message.
        message: String,
    },
    /// The source proxy could not be asked.
    #[error("source proxy unreachable")]
    SourceUnreachable(#[source] CallError),
    /// The acknowledged digests differ from the served ones.
    #[error("digests do not match the served files")]
    DigestMismatch,
    /// The serving side has not finished publishing yet.
    #[error("transfer not finished at this end")]
    NotReady,
    /// The token store failed.
    #[error("token store failed")]
    Store(#[from] StoreError),
    /// The transfer bucket failed.
    #[error("transfer bucket failed")]
    Bucket(#[from] ObjectError),
}

impl ProxyError {
    /// The code of the error reply.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::UnknownToken => ErrorCode::UnknownToken,
            Self::ExpiredToken => ErrorCode::ExpiredToken,
            Self::TokenUsed => ErrorCode::TokenUsed,
            Self::WrongPurpose { .. }
            | Self::NotOwnSite(_)
            | Self::RelayNotAllowed
            | Self::OutsideRoots { .. } => ErrorCode::Refused,
            Self::File { .. } | Self::Invalid(_) => ErrorCode::Malformed,
            Self::SourceRefused { code, .. } => code.clone(),
            Self::SourceUnreachable(_) => ErrorCode::Timeout,
            Self::DigestMismatch => ErrorCode::TransferFailed,
            Self::NotReady => ErrorCode::Busy,
            Self::Store(StoreError::Full { .. }) => ErrorCode::Busy,
            Self::Store(_) => ErrorCode::Internal,
            Self::Bucket(ObjectError::BucketFull) => ErrorCode::NoCapacity,
            Self::Bucket(_) => ErrorCode::Internal,
        }
    }
}
