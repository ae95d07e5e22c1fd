//! Signed envelopes: every request, reply and monitoring batch that crosses a site boundary.
//!
//! The signature covers a domain-separation tag, the protocol version, the body type, sender,
//! recipient, subject, timestamp, nonce, the nonce of the request being answered (for replies),
//! and the exact body bytes. The signed bytes are a fixed binary layout (documented in
//! `subjects.md`), never the MessagePack of the envelope, so a receiver never re-encodes anything
//! before verifying and a verifier in another language needs no canonical MessagePack.
//!
//! The [`Verifier`] refuses, each with its own [`EnvelopeError`]: oversize input, malformed or
//! too deeply nested MessagePack, an unsupported version, an unknown sender, a bad signature, a
//! wrong recipient, a wrong subject, a stale timestamp and a replayed nonce. Checks run from the
//! cheapest to the most expensive, and a nonce is remembered only after its signature verified,
//! so forged traffic cannot fill the replay cache.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::codec::{self, CodecError, MAX_BODY_LEN};
use crate::replay::ReplayError;

mod sign;
#[cfg(test)]
mod tests;
mod verify;

pub use sign::{seal_message, sign, Addressing};
pub use verify::{Opened, Verifier};

/// Domain-separation tag at the start of the signed bytes.
pub const SIGNATURE_CONTEXT: &[u8] = b"nubis-envelope-v1\0";

/// Default freshness window: envelopes more than this far from the receiver's clock are stale.
pub const DEFAULT_FRESHNESS_MS: u64 = 300_000;

/// Room for the envelope's header fields around a maximal body.
const ENVELOPE_OVERHEAD: usize = 4096;

/// Recipient written in monitoring batches, which go to every site on a responsibility chain.
pub const BROADCAST: &str = "*";

/// A 128-bit random nonce.
pub type Nonce = [u8; 16];

/// Why an envelope was refused.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    /// The input or its body is larger than the limit.
    #[error("envelope of {len} bytes exceeds the limit of {limit} bytes")]
    Oversize {
        /// Length of the input.
        len: usize,
        /// The limit that applied.
        limit: usize,
    },
    /// The envelope or its body is not MessagePack of the expected shape.
    #[error("malformed envelope")]
    Malformed(#[source] CodecError),
    /// The envelope or its body nests deeper than allowed.
    #[error("envelope nests too deeply")]
    TooDeep,
    /// The envelope was written in a protocol version this build does not read.
    #[error("protocol version {0} is not supported")]
    UnsupportedVersion(u16),
    /// The sender is not a partner whose key is pinned in this site's configuration.
    #[error("sender {0:?} is not a pinned partner")]
    UnknownSender(String),
    /// The signature does not verify against the sender's pinned key.
    #[error("signature does not verify")]
    BadSignature,
    /// The envelope is addressed to another site.
    #[error("envelope is addressed to {0:?}")]
    WrongRecipient(String),
    /// The envelope was signed for another subject than the one it arrived on.
    #[error("envelope was signed for subject {signed:?}, not {arrived:?}")]
    WrongSubject {
        /// Subject in the signed header.
        signed: String,
        /// Subject it was received on (or expected, for replies).
        arrived: String,
    },
    /// The timestamp is outside the freshness window.
    #[error("timestamp is {skew_ms} ms away from this site's clock")]
    Stale {
        /// Distance between the timestamp and the receiver's clock.
        skew_ms: u64,
    },
    /// The nonce was accepted before.
    #[error("nonce was already used")]
    Replayed,
    /// A reply does not answer the request it was expected to answer.
    #[error("reply does not answer this request")]
    NotAReplyToThis,
    /// The body has another type than expected.
    #[error("body type {found:?} where {expected:?} was expected")]
    UnexpectedType {
        /// The expected body type.
        expected: &'static str,
        /// The body type in the envelope.
        found: String,
    },
    /// The replay cache could not be consulted.
    #[error("replay cache unavailable")]
    ReplayStore(#[source] ReplayError),
    /// The body could not be encoded.
    #[error("cannot encode body")]
    Encode(#[source] CodecError),
}

impl EnvelopeError {
    /// The stable error code sent in an error reply (see `subjects.md`).
    pub fn code(&self) -> &'static str {
        match self {
            Self::Oversize { .. } => "oversize",
            Self::Malformed(_) => "malformed",
            Self::TooDeep => "too_deep",
            Self::UnsupportedVersion(_) => "unsupported_version",
            Self::UnknownSender(_) => "unknown_sender",
            Self::BadSignature => "bad_signature",
            Self::WrongRecipient(_) => "wrong_recipient",
            Self::WrongSubject { .. } => "wrong_subject",
            Self::Stale { .. } => "stale",
            Self::Replayed => "replayed",
            Self::NotAReplyToThis => "not_a_reply",
            Self::UnexpectedType { .. } => "malformed",
            // A sender at its bound in the replay cache waits for its old nonces to expire.
            Self::ReplayStore(ReplayError::Full { .. }) => "busy",
            Self::ReplayStore(_) | Self::Encode(_) => "internal",
        }
    }

    fn from_codec(e: CodecError) -> Self {
        match e {
            CodecError::Oversize { len, limit } => Self::Oversize { len, limit },
            CodecError::TooDeep => Self::TooDeep,
            other => Self::Malformed(other),
        }
    }
}

/// An envelope as it travels on the bus (a MessagePack map with these field names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedEnvelope {
    /// Protocol version.
    pub v: u16,
    /// Body type name (`Body::TYPE`).
    #[serde(rename = "type")]
    pub body_type: String,
    /// Sender site.
    pub from: String,
    /// Recipient site, or [`BROADCAST`].
    pub to: String,
    /// Subject of the request or event (for a reply: of the request it answers).
    pub subject: String,
    /// Milliseconds since the Unix epoch at signing.
    pub ts: u64,
    /// Random nonce.
    #[serde(with = "serde_bytes")]
    pub nonce: Nonce,
    /// For a reply, the nonce of the request it answers (present as nil otherwise: the field is
    /// required so that no byte of an envelope can change without changing what it means).
    #[serde(with = "opt_nonce")]
    pub re: Option<Nonce>,
    /// Exact MessagePack bytes of the body.
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// Ed25519 signature over [`SignedEnvelope::signed_bytes`].
    #[serde(with = "serde_bytes")]
    pub sig: [u8; 64],
}

mod opt_nonce {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<[u8; 16]>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(n) => s.serialize_bytes(n),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<[u8; 16]>, D::Error> {
        let v: Option<serde_bytes::ByteBuf> = Option::deserialize(d)?;
        match v {
            None => Ok(None),
            Some(b) => b
                .as_ref()
                .try_into()
                .map(Some)
                .map_err(|_| serde::de::Error::invalid_length(b.len(), &"16 bytes")),
        }
    }
}

/// Milliseconds since the Unix epoch by this machine's clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn push_lp(out: &mut Vec<u8>, s: &str) {
    // Header strings are bounded far below 64 KiB by the envelope size limit and identifier rules;
    // a longer one is truncated in the length prefix and can then never verify.
    out.extend_from_slice(&(s.len().min(u16::MAX as usize) as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

impl SignedEnvelope {
    /// The exact bytes the signature covers (layout in `subjects.md`).
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(SIGNATURE_CONTEXT.len() + 64 + self.subject.len() + self.body.len());
        out.extend_from_slice(SIGNATURE_CONTEXT);
        out.extend_from_slice(&self.v.to_be_bytes());
        push_lp(&mut out, &self.body_type);
        push_lp(&mut out, &self.from);
        push_lp(&mut out, &self.to);
        push_lp(&mut out, &self.subject);
        out.extend_from_slice(&self.ts.to_be_bytes());
        out.extend_from_slice(&self.nonce);
        match &self.re {
            Some(re) => {
                out.push(1);
                out.extend_from_slice(re);
            }
            None => out.push(0),
        }
        out.extend_from_slice(&(self.body.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.body);
        out
    }

    /// Decodes an envelope without verifying it (size and nesting still bounded).
    pub fn decode(raw: &[u8]) -> Result<Self, EnvelopeError> {
        codec::from_slice_limited(raw, MAX_BODY_LEN + ENVELOPE_OVERHEAD)
            .map_err(EnvelopeError::from_codec)
    }

    /// Encodes the envelope for publishing.
    pub fn encode(&self) -> Result<Vec<u8>, EnvelopeError> {
        codec::to_vec(self).map_err(EnvelopeError::Encode)
    }
}
