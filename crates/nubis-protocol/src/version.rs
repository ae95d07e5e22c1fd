//! Protocol versioning: every envelope carries the version it was written in.
//!
//! Rule: fields may be added to any message within a version (decoders ignore unknown fields);
//! removing or re-typing a field, or changing the signed bytes, needs a new version. A receiver
//! refuses an envelope whose version it does not support, with the `unsupported_version` error.

/// The protocol version this build writes.
pub const PROTOCOL_VERSION: u16 = 1;

/// Whether an envelope written in `version` can be read by this build.
pub fn is_supported(version: u16) -> bool {
    version == PROTOCOL_VERSION
}
