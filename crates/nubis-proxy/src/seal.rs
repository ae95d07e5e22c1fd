//! Confidentiality of a transfer: every chunk a proxy stores in its site's transfer bucket is
//! encrypted, so a federation member that reads the bucket by stream sequence sees object
//! names, sizes and timing, never the VM's bytes.
//!
//! Each serving (or relaying) token has a random 256-bit [`ContentKey`], kept only in the
//! proxy's own store. A chunk is sealed with AES-256-GCM as `nonce ‖ ciphertext ‖ tag`:
//!
//! - the 96-bit nonce is `attempt (u32, big-endian) ‖ chunk index (u64, big-endian)`, where the
//!   attempt is a counter of the token's record, raised (and written to disk) before every object
//!   is written or written again, so no nonce repeats under one key even when the file changed
//!   between two attempts;
//! - the associated data is `"nubis-xfer-chunk/1" ‖ len(object) (u32) ‖ object name ‖ chunk
//!   index (u64)`: the object name is derived from the token and names the file, so a chunk
//!   moved to another position, another file or another transfer fails authentication.
//!
//! The whole-file SHA-256 in the object's info message is sealed the same way under chunk index
//! [`DIGEST_INDEX`], which no chunk has. The key reaches the fetching proxy only sealed to the
//! ephemeral X25519 key of its signed request ([`ContentKey::seal_to`]).

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use rand_core::{OsRng, RngCore};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use zeroize::Zeroizing;

/// Bytes of a sealed chunk's nonce.
pub const NONCE_LEN: usize = 12;
/// Bytes of a sealed chunk's authentication tag.
pub const TAG_LEN: usize = 16;
/// What sealing adds to a chunk.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + TAG_LEN;
/// The position the whole-file digest is sealed at; no chunk index reaches it.
pub const DIGEST_INDEX: u64 = u64::MAX;
/// Domain of the associated data (the format's version).
const AD_DOMAIN: &[u8] = b"nubis-xfer-chunk/1";

/// Why sealing or opening failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// A chunk (or the sealed digest) is not what the key, object and position authenticate.
    #[error("chunk {index} failed authentication")]
    Unauthentic {
        /// Its index ([`DIGEST_INDEX`] for the digest).
        index: u64,
    },
    /// A chunk too large for the cipher.
    #[error("chunk {index} cannot be sealed")]
    TooLong {
        /// Its index.
        index: u64,
    },
    /// The content key could not be sealed to the fetcher's key.
    #[error("content key cannot be sealed to the fetcher")]
    KeySeal,
    /// The sealed content key does not open with the ephemeral secret, or is not a key.
    #[error("sealed content key does not open")]
    KeyUnseal,
    /// The token's objects were written so often that no fresh nonce is left under its key.
    #[error("no fresh nonce left under the content key")]
    Exhausted,
}

/// A transfer's content key. Never printed: its `Debug` is redacted and its bytes are wiped
/// when it is dropped.
#[derive(Clone)]
pub struct ContentKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for ContentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ContentKey(<redacted>)")
    }
}

impl PartialEq for ContentKey {
    fn eq(&self, other: &Self) -> bool {
        *self.0 == *other.0
    }
}

impl serde::Serialize for ContentKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&Zeroizing::new(hex::encode(*self.0)))
    }
}

impl<'de> serde::Deserialize<'de> for ContentKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Zeroizing::new(String::deserialize(d)?);
        let mut key = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(s.as_bytes(), &mut key[..]).map_err(serde::de::Error::custom)?;
        Ok(Self(key))
    }
}

impl ContentKey {
    /// A fresh random key.
    pub fn random() -> Self {
        let mut key = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(&mut key[..]);
        Self(key)
    }

    /// The key of these bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    fn cipher(&self) -> Cipher {
        // A 32-byte key is what AES-256-GCM takes: `new` cannot refuse it.
        let key = UnboundKey::new(&AES_256_GCM, &self.0[..])
            .unwrap_or_else(|_| unreachable!("AES-256-GCM takes 32-byte keys"));
        Arc::new(LessSafeKey::new(key))
    }

    /// Seals chunks of object `object` in write attempt `attempt`.
    pub fn sealer(&self, object: &str, attempt: u32) -> ChunkSealer {
        ChunkSealer {
            cipher: self.cipher(),
            object: object.to_string(),
            attempt,
        }
    }

    /// Opens chunks of object `object`.
    pub fn opener(&self, object: &str) -> ChunkOpener {
        ChunkOpener {
            cipher: self.cipher(),
            object: object.to_string(),
        }
    }

    /// The key sealed to the fetcher's ephemeral X25519 public key (libsodium
    /// `crypto_box_seal`), for it alone to open.
    pub fn seal_to(&self, fetcher_key: &[u8; 32]) -> Result<Vec<u8>, SealError> {
        crypto_box::PublicKey::from(*fetcher_key)
            .seal(&mut OsRng, &self.0[..])
            .map_err(|_| SealError::KeySeal)
    }

    /// Opens a key sealed to the public half of `secret`.
    pub fn unseal(secret: &FetcherSecret, sealed: &[u8]) -> Result<Self, SealError> {
        let bytes = Zeroizing::new(secret.0.unseal(sealed).map_err(|_| SealError::KeyUnseal)?);
        let key: [u8; 32] = bytes[..].try_into().map_err(|_| SealError::KeyUnseal)?;
        Ok(Self::from_bytes(key))
    }
}

/// The ephemeral X25519 secret of one request for a content key; wiped when dropped.
pub struct FetcherSecret(crypto_box::SecretKey);

impl std::fmt::Debug for FetcherSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FetcherSecret(<redacted>)")
    }
}

impl FetcherSecret {
    /// A fresh random secret.
    pub fn generate() -> Self {
        Self(crypto_box::SecretKey::generate(&mut OsRng))
    }

    /// Its public key, sent in the request.
    pub fn public(&self) -> [u8; 32] {
        *self.0.public_key().as_bytes()
    }
}

/// The associated data of chunk `index` of `object`.
fn associated_data(object: &str, index: u64) -> Vec<u8> {
    let mut ad = Vec::with_capacity(AD_DOMAIN.len() + 4 + object.len() + 8);
    ad.extend_from_slice(AD_DOMAIN);
    // Object names are bounded well below 4 GiB by the bucket's subject rules.
    ad.extend_from_slice(&(object.len() as u32).to_be_bytes());
    ad.extend_from_slice(object.as_bytes());
    ad.extend_from_slice(&index.to_be_bytes());
    ad
}

/// AES-256-GCM under one content key (an implementation with AES-NI, CLMUL and AVX code paths,
/// picked at run time).
type Cipher = Arc<LessSafeKey>;

/// The nonce of chunk `index` in write attempt `attempt`.
fn chunk_nonce(attempt: u32, index: u64) -> [u8; NONCE_LEN] {
    let mut nonce = [0u8; NONCE_LEN];
    nonce[..4].copy_from_slice(&attempt.to_be_bytes());
    nonce[4..].copy_from_slice(&index.to_be_bytes());
    nonce
}

/// Seals the chunks of one object in one write attempt.
#[derive(Clone)]
pub struct ChunkSealer {
    cipher: Cipher,
    object: String,
    attempt: u32,
}

impl std::fmt::Debug for ChunkSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkSealer")
            .field("object", &self.object)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

impl ChunkSealer {
    /// Chunk `index` holding `plain`, sealed: `nonce ‖ ciphertext ‖ tag`.
    pub fn seal(&self, index: u64, plain: &[u8]) -> Result<Bytes, SealError> {
        let mut buf = Self::buffer(plain.len());
        buf.extend_from_slice(plain);
        self.seal_buffer(index, buf)
    }

    /// An empty buffer for a chunk of up to `len` plaintext bytes: room for the nonce in front
    /// (already there, zeros) and the tag behind. Append the plaintext and hand it to
    /// [`Self::seal_buffer`], which seals it without copying it.
    pub fn buffer(len: usize) -> BytesMut {
        let mut buf = BytesMut::with_capacity(len + SEAL_OVERHEAD);
        buf.resize(NONCE_LEN, 0);
        buf
    }

    /// Seals, as chunk `index`, the plaintext that follows the nonce's room in `buf` (made by
    /// [`Self::buffer`]), in place: `nonce ‖ ciphertext ‖ tag`.
    pub fn seal_buffer(&self, index: u64, mut buf: BytesMut) -> Result<Bytes, SealError> {
        if buf.len() < NONCE_LEN {
            return Err(SealError::TooLong { index });
        }
        let nonce = chunk_nonce(self.attempt, index);
        buf[..NONCE_LEN].copy_from_slice(&nonce);
        let tag = self
            .cipher
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(associated_data(&self.object, index)),
                &mut buf[NONCE_LEN..],
            )
            .map_err(|_| SealError::TooLong { index })?;
        buf.extend_from_slice(tag.as_ref());
        Ok(buf.freeze())
    }

    /// The whole-file digest, sealed at [`DIGEST_INDEX`] and hex-encoded for the info message.
    pub fn seal_digest(&self, sha256: &[u8; 32]) -> Result<String, SealError> {
        Ok(hex::encode(self.seal(DIGEST_INDEX, sha256)?))
    }
}

/// Opens the chunks of one object.
#[derive(Clone)]
pub struct ChunkOpener {
    cipher: Cipher,
    object: String,
}

impl std::fmt::Debug for ChunkOpener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkOpener")
            .field("object", &self.object)
            .finish_non_exhaustive()
    }
}

impl ChunkOpener {
    /// The plaintext of `sealed`, if it is chunk `index` of this object under this key.
    pub fn open(&self, index: u64, sealed: &[u8]) -> Result<Bytes, SealError> {
        let refused = SealError::Unauthentic { index };
        if sealed.len() < SEAL_OVERHEAD {
            return Err(refused);
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| refused.clone())?;
        // One copy out of the received message (whose buffer is shared), then opened in place.
        let mut buf = BytesMut::from(rest);
        let plain_len = self
            .cipher
            .open_in_place(
                nonce,
                Aad::from(associated_data(&self.object, index)),
                &mut buf[..],
            )
            .map_err(|_| refused)?
            .len();
        buf.truncate(plain_len);
        Ok(buf.freeze())
    }

    /// The whole-file digest sealed by [`ChunkSealer::seal_digest`].
    pub fn open_digest(&self, sealed_hex: &str) -> Result<[u8; 32], SealError> {
        let refused = SealError::Unauthentic {
            index: DIGEST_INDEX,
        };
        let sealed = hex::decode(sealed_hex).map_err(|_| refused.clone())?;
        let plain = self.open(DIGEST_INDEX, &sealed)?;
        plain[..].try_into().map_err(|_| refused)
    }
}

#[cfg(test)]
mod tests;
