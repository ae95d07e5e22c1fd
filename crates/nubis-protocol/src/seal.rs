//! Sealed boxes in libsodium's `crypto_box_seal` format (X25519 + XSalsa20-Poly1305).
//!
//! A sealed box is `ephemeral public key (32 bytes) ‖ crypto_box(plaintext)`, with the nonce
//! derived as BLAKE2b-192(ephemeral pk ‖ recipient pk). Anyone holding the recipient's public key
//! can seal; only the holder of the secret key can open. The bytes are exactly what libsodium's
//! `crypto_box_seal` produces, so KPI writers in Python (PyNaCl `SealedBox`), Go or C interoperate.

use crypto_box::{PublicKey, SecretKey};

/// Bytes a sealed box adds to its plaintext (ephemeral key and authentication tag).
pub const SEAL_OVERHEAD: usize = 32 + 16;

/// Why a sealed box could not be made or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// Encryption failed (only possible for absurdly large inputs).
    #[error("cannot seal payload")]
    Seal,
    /// The box is not for this key, was altered, or is truncated.
    #[error("sealed box does not open with this key")]
    Open,
}

/// Seals `plaintext` for the holder of the X25519 secret key matching `recipient`.
pub fn seal(recipient: &[u8; 32], plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
    PublicKey::from(*recipient)
        .seal(&mut rand_core::OsRng, plaintext)
        .map_err(|_| SealError::Seal)
}

/// Opens a sealed box with the recipient's X25519 secret key.
pub fn open(secret: &SecretKey, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
    secret.unseal(sealed).map_err(|_| SealError::Open)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Produced by libsodium 1.0.18 through PyNaCl 1.6.2:
    /// `SealedBox(PrivateKey(bytes(range(1, 33))).public_key).encrypt(b"nubis known-answer vector")`.
    const KAT_SECRET: [u8; 32] = {
        let mut k = [0u8; 32];
        let mut i = 0;
        while i < 32 {
            k[i] = (i + 1) as u8;
            i += 1;
        }
        k
    };
    const KAT_PUBLIC: &str = "07a37cbc142093c8b755dc1b10e86cb426374ad16aa853ed0bdfc0b2b86d1c7c";
    const KAT_SEALED: &str = "679c9d398b830c62e88adcb6e61e68c755dc8c901d3542c554e9c74921b79d33\
                              006e22e779ffd789a5b0d0f990db57184f9863c9956a6c91d83a9e92065cda6f\
                              257a3d8b8482eb3c68";

    #[test]
    fn opens_a_box_sealed_by_libsodium() {
        let sk = SecretKey::from(KAT_SECRET);
        assert_eq!(hex::encode(sk.public_key().as_bytes()), KAT_PUBLIC);
        let sealed = hex::decode(KAT_SEALED).unwrap();
        assert_eq!(open(&sk, &sealed).unwrap(), b"nubis known-answer vector");
    }

    #[test]
    fn round_trip_and_wrong_key_fails() {
        let sk = SecretKey::generate(&mut rand_core::OsRng);
        let other = SecretKey::generate(&mut rand_core::OsRng);
        let sealed = seal(sk.public_key().as_bytes(), b"current_users\n42\n").unwrap();
        assert_eq!(sealed.len(), 17 + SEAL_OVERHEAD);
        assert_eq!(open(&sk, &sealed).unwrap(), b"current_users\n42\n");
        assert_eq!(open(&other, &sealed), Err(SealError::Open));
    }

    #[test]
    fn tampered_or_truncated_boxes_fail() {
        let sk = SecretKey::generate(&mut rand_core::OsRng);
        let sealed = seal(sk.public_key().as_bytes(), b"x").unwrap();
        for i in 0..sealed.len() {
            let mut t = sealed.clone();
            t[i] ^= 0x01;
            assert_eq!(open(&sk, &t), Err(SealError::Open), "byte {i}");
        }
        assert_eq!(open(&sk, &sealed[..40]), Err(SealError::Open));
        assert_eq!(open(&sk, &[]), Err(SealError::Open));
    }
}
