//! MessagePack encoding of every message body: named fields (maps), bounded size and nesting.
//!
//! Only this module calls `rmp-serde`. Encoding always writes structs as maps keyed by field name
//! so a client in any language decodes by name; decoding ignores unknown fields, refuses input
//! larger than [`MAX_BODY_LEN`] and nesting deeper than [`MAX_DEPTH`] before building any value.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Largest accepted message body, in bytes (1 MiB).
pub const MAX_BODY_LEN: usize = 1 << 20;

/// Deepest accepted nesting of maps and arrays in one message.
pub const MAX_DEPTH: usize = 32;

/// Why a message could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The input is larger than the size limit.
    #[error("message of {len} bytes exceeds the limit of {limit} bytes")]
    Oversize {
        /// Length of the input.
        len: usize,
        /// The limit that applied.
        limit: usize,
    },
    /// The input nests maps or arrays deeper than [`MAX_DEPTH`].
    #[error("message nests deeper than {MAX_DEPTH} levels")]
    TooDeep,
    /// The input is not MessagePack of the expected shape.
    #[error("malformed message")]
    Malformed(#[source] rmp_serde::decode::Error),
    /// The value could not be encoded.
    #[error("cannot encode message")]
    Encode(#[source] rmp_serde::encode::Error),
}

/// Encodes `value` as MessagePack with named fields.
pub fn to_vec<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    rmp_serde::to_vec_named(value).map_err(CodecError::Encode)
}

/// Decodes a body of at most [`MAX_BODY_LEN`] bytes.
pub fn from_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    from_slice_limited(bytes, MAX_BODY_LEN)
}

/// Decodes `bytes`, refusing more than `limit` bytes or more than [`MAX_DEPTH`] levels of nesting.
pub fn from_slice_limited<T: DeserializeOwned>(
    bytes: &[u8],
    limit: usize,
) -> Result<T, CodecError> {
    if bytes.len() > limit {
        return Err(CodecError::Oversize {
            len: bytes.len(),
            limit,
        });
    }
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    de.set_max_depth(MAX_DEPTH);
    match T::deserialize(&mut de) {
        Ok(v) => Ok(v),
        Err(rmp_serde::decode::Error::DepthLimitExceeded) => Err(CodecError::TooDeep),
        Err(e) => Err(CodecError::Malformed(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct V2 {
        a: u32,
        b: String,
        extra: Vec<u8>,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct V1 {
        a: u32,
        b: String,
    }

    #[test]
    fn fields_are_named_and_unknown_fields_ignored() {
        let bytes = to_vec(&V2 {
            a: 7,
            b: "x".into(),
            extra: vec![1, 2],
        })
        .unwrap();
        // A map with three string keys, not an array.
        assert_eq!(bytes[0], 0x83);
        let old: V1 = from_slice(&bytes).unwrap();
        assert_eq!(
            old,
            V1 {
                a: 7,
                b: "x".into()
            }
        );
    }

    #[test]
    fn oversize_input_is_refused_before_decoding() {
        let big = vec![0xc0u8; 100];
        assert!(matches!(
            from_slice_limited::<()>(&big, 10),
            Err(CodecError::Oversize {
                len: 100,
                limit: 10
            })
        ));
    }

    #[test]
    fn deep_nesting_is_refused() {
        // 100 nested one-element arrays inside an ignored field.
        let mut bytes = vec![0x83, 0xa1, b'a', 0x07, 0xa1, b'b', 0xa1, b'x', 0xa5];
        bytes.extend_from_slice(b"extra");
        bytes.extend(std::iter::repeat_n(0x91u8, 100));
        bytes.push(0xc0);
        assert!(matches!(from_slice::<V1>(&bytes), Err(CodecError::TooDeep)));
    }

    #[test]
    fn garbage_is_malformed() {
        assert!(matches!(
            from_slice::<V1>(&[0xc1, 0x00]),
            Err(CodecError::Malformed(_))
        ));
    }
}
