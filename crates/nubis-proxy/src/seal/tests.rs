//! Sealing and opening of chunks: what opens, and everything that must not.

use super::*;

const OBJECT: &str = "0123456789abcdef0123456789abcdef/disk-vda.qcow2";

fn plain(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

#[test]
fn a_sealed_chunk_opens_to_its_plaintext_and_hides_it() {
    let key = ContentKey::random();
    let data = plain(100_000);
    let sealed = key.sealer(OBJECT, 1).seal(7, &data).unwrap();
    assert_eq!(sealed.len(), data.len() + SEAL_OVERHEAD);
    assert!(!sealed.windows(64).any(|w| w == &data[..64]));
    assert_eq!(key.opener(OBJECT).open(7, &sealed).unwrap(), data);
    // An empty chunk seals too.
    let empty = key.sealer(OBJECT, 1).seal(0, &[]).unwrap();
    assert!(key.opener(OBJECT).open(0, &empty).unwrap().is_empty());
}

#[test]
fn tampered_chunks_are_refused() {
    let key = ContentKey::random();
    let sealed = key.sealer(OBJECT, 1).seal(3, &plain(4096)).unwrap();
    let opener = key.opener(OBJECT);
    for at in [0, NONCE_LEN + 10, sealed.len() - 1] {
        let mut bad = sealed.to_vec();
        bad[at] ^= 0x01;
        assert_eq!(
            opener.open(3, &bad),
            Err(SealError::Unauthentic { index: 3 }),
            "flip at {at}"
        );
    }
    assert!(opener.open(3, &sealed[..sealed.len() - 1]).is_err());
    assert!(opener.open(3, &sealed[..SEAL_OVERHEAD - 1]).is_err());
    assert_eq!(opener.open(3, &sealed).unwrap(), plain(4096));
}

#[test]
fn a_chunk_opens_only_at_its_own_position_object_and_key() {
    let key = ContentKey::random();
    let sealer = key.sealer(OBJECT, 2);
    let c0 = sealer.seal(0, b"first chunk").unwrap();
    let c1 = sealer.seal(1, b"second chunk").unwrap();
    let opener = key.opener(OBJECT);
    // Swapped chunk indexes.
    assert!(opener.open(1, &c0).is_err());
    assert!(opener.open(0, &c1).is_err());
    // Another file of the same transfer, or the same file of another transfer.
    assert!(key.opener(&format!("{OBJECT}.2")).open(0, &c0).is_err());
    assert!(key
        .opener("ffffffffffffffffffffffffffffffff/disk-vda.qcow2")
        .open(0, &c0)
        .is_err());
    // Another key.
    assert!(ContentKey::random().opener(OBJECT).open(0, &c0).is_err());
    // The legitimate positions.
    assert_eq!(&opener.open(0, &c0).unwrap()[..], b"first chunk");
    assert_eq!(&opener.open(1, &c1).unwrap()[..], b"second chunk");
}

#[test]
fn nonces_differ_between_attempts_and_chunks() {
    let key = ContentKey::random();
    let a = key.sealer(OBJECT, 1).seal(5, b"same bytes").unwrap();
    let b = key.sealer(OBJECT, 2).seal(5, b"same bytes").unwrap();
    let c = key.sealer(OBJECT, 1).seal(6, b"same bytes").unwrap();
    assert_ne!(a[..NONCE_LEN], b[..NONCE_LEN]);
    assert_ne!(a[..NONCE_LEN], c[..NONCE_LEN]);
    assert_ne!(a[NONCE_LEN..], b[NONCE_LEN..]);
}

#[test]
fn the_sealed_digest_opens_only_as_the_digest() {
    let key = ContentKey::random();
    let sealer = key.sealer(OBJECT, 1);
    let digest = [9u8; 32];
    let sealed = sealer.seal_digest(&digest).unwrap();
    assert!(!sealed.contains(&hex::encode(digest)));
    let opener = key.opener(OBJECT);
    assert_eq!(opener.open_digest(&sealed).unwrap(), digest);
    // A chunk holding 32 bytes is not a digest, nor the other way round.
    let chunk = hex::encode(sealer.seal(0, &digest).unwrap());
    assert!(opener.open_digest(&chunk).is_err());
    assert!(opener.open_digest("not hex").is_err());
}

#[test]
fn the_content_key_reaches_only_the_ephemeral_secret_and_never_prints() {
    let key = ContentKey::random();
    let fetcher = FetcherSecret::generate();
    let sealed = key.seal_to(&fetcher.public()).unwrap();
    assert_eq!(ContentKey::unseal(&fetcher, &sealed).unwrap(), key);
    let other = FetcherSecret::generate();
    assert_eq!(
        ContentKey::unseal(&other, &sealed),
        Err(SealError::KeyUnseal)
    );
    assert_eq!(format!("{key:?}"), "ContentKey(<redacted>)");
    assert_eq!(format!("{fetcher:?}"), "FetcherSecret(<redacted>)");
    // Kept in the store as hex, read back equal.
    let raw = nubis_protocol::codec::to_vec(&key).unwrap();
    let back: ContentKey = nubis_protocol::codec::from_slice(&raw).unwrap();
    assert_eq!(back, key);
}
