//! Error replies: a stable code, a human message and whether retrying may help.
//!
//! The codes are part of the public API (listed in `subjects.md`). An unknown code decodes to
//! [`ErrorCode::Other`], so a newer peer's error is still reported rather than lost.

use serde::{Deserialize, Serialize};

use super::Body;
use crate::descriptor::open_string_enum;

open_string_enum!(
    /// Stable error codes, snake_case strings on the wire.
    ErrorCode {
        /// The sender is not a pinned partner.
        UnknownSender => "unknown_sender",
        /// The envelope's signature does not verify.
        BadSignature => "bad_signature",
        /// The envelope is addressed to another site.
        WrongRecipient => "wrong_recipient",
        /// The envelope was signed for another subject.
        WrongSubject => "wrong_subject",
        /// The timestamp is outside the freshness window.
        Stale => "stale",
        /// The nonce was seen before within the window.
        Replayed => "replayed",
        /// The body is larger than the limit.
        Oversize => "oversize",
        /// The envelope or body is not MessagePack of the expected shape.
        Malformed => "malformed",
        /// The message nests deeper than the limit.
        TooDeep => "too_deep",
        /// The protocol version is not supported.
        UnsupportedVersion => "unsupported_version",
        /// The site is not responsible for the VM.
        UnknownVm => "unknown_vm",
        /// The proxy did not mint this token.
        UnknownToken => "unknown_token",
        /// The token expired.
        ExpiredToken => "expired_token",
        /// The token was already used for a transfer.
        TokenUsed => "token_used",
        /// No capacity for the VM.
        NoCapacity => "no_capacity",
        /// Refused by site policy.
        Refused => "refused",
        /// The sender is known but has no contract for this operation.
        NotPartner => "not_partner",
        /// This Migration request was seen before (delegation loop).
        LoopDetected => "loop_detected",
        /// The delegation depth limit is reached.
        DepthExceeded => "depth_exceeded",
        /// Too many concurrent operations; retry later.
        Busy => "busy",
        /// The next hop did not answer in time.
        Timeout => "timeout",
        /// The file transfer failed.
        TransferFailed => "transfer_failed",
        /// The request conflicts with the VM's current state (e.g. an older descriptor version).
        Conflict => "conflict",
        /// An unexpected failure at the answering site.
        Internal => "internal",
        /// The transfer token was minted for another migration or VM than the request names.
        TokenMismatch => "token_mismatch",
        /// The sender holds as much at this site as its per-partner limits allow (offers
        /// outstanding, reserved resources, concurrent transfers); retrying helps only once
        /// some of it is taken up, released or expired. Peers that predate this code decode
        /// it as [`ErrorCode::Other`].
        Quota => "quota",
        /// Nothing listens at the next hop (its daemon is down or restarting), so the request
        /// was not acted on there; it may succeed once the next hop is back. Peers that
        /// predate this code decode it as [`ErrorCode::Other`].
        Unreachable => "unreachable",
    }
);

impl ErrorCode {
    /// Whether the same request may succeed later without change.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Stale
                | Self::Busy
                | Self::Timeout
                | Self::Unreachable
                | Self::NoCapacity
                | Self::Internal
        )
    }
}

/// The reply to any request that failed, signed like every other reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// The stable code.
    pub code: ErrorCode,
    /// A human-readable explanation; never a host name or path. At most
    /// [`crate::clip::REASON_LIMIT`] bytes are kept when decoded.
    #[serde(deserialize_with = "crate::clip::capped_reason")]
    pub message: String,
    /// Whether retrying the same request may succeed.
    pub retryable: bool,
}

impl ErrorReply {
    /// An error reply with the code's default retryability.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let retryable = code.is_retryable();
        Self {
            code,
            message: message.into(),
            retryable,
        }
    }
}

impl Body for ErrorReply {
    const TYPE: &'static str = "ErrorReply";
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;

    #[test]
    fn unknown_code_decodes_to_other() {
        let bytes = codec::to_vec(&serde_json::json!({
            "code": "quota_exhausted", "message": "m", "retryable": false
        }))
        .unwrap();
        let e: ErrorReply = codec::from_slice(&bytes).unwrap();
        assert_eq!(e.code, ErrorCode::Other("quota_exhausted".into()));
        assert_eq!(codec::to_vec(&e).unwrap(), bytes);
    }

    #[test]
    fn codes_are_snake_case_strings() {
        for code in ErrorCode::KNOWN {
            let b = codec::to_vec(code).unwrap();
            assert_eq!(&codec::from_slice::<ErrorCode>(&b).unwrap(), code);
            assert!(code
                .as_str()
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c == b'_'));
        }
        assert_eq!(ErrorCode::KNOWN.len(), 27);
        assert!(ErrorReply::new(ErrorCode::Unreachable, "down").retryable);
        assert!(ErrorReply::new(ErrorCode::Busy, "later").retryable);
        assert!(!ErrorReply::new(ErrorCode::BadSignature, "no").retryable);
    }
}
