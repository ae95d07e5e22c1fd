//! Only the receiving proxy can read a transfer. Every member of the federation may read a
//! partner's transfer bucket by stream sequence, so what is stored there must be useless to a
//! third site: chunks, manifest and digests are sealed under a per-transfer content key that
//! the source proxy hands out only sealed to the ephemeral key of the fetching proxy's signed
//! request. A chunk altered in the bucket (the source site's own user can rewrite it) fails
//! authentication: the fetch reads it again, then fails, and writes nothing.

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::stream::Stream;
use bytes::Bytes;
use nubis_protocol::message::{
    Endpoint, ErrorCode, FetchKey, Minted, TransferStatus, TransferToken,
};
use nubis_protocol::MigrationId;
use nubis_proxy::naming::{TokenObjects, STREAM};
use nubis_proxy::seal::{ContentKey, FetcherSecret};
use nubis_proxy::{CallError, ProxyClient, TransferProxy};
use nubis_testkit::{require_nats_server, wait_until, Federation, Role};
use sha2::{Digest as _, Sha256};

use crate::proxy::{
    fetch_req, final_status, mint_receive, mint_serve, settings, sha256_file, start_proxy, Keys,
};

const LONG: Duration = Duration::from_secs(90);

/// What the test file is made of: recognisable wherever a run of it appears.
const PATTERN: &[u8] = b"NUBIS-CONFIDENTIAL-VM-BYTES-0123456789/";

/// A file of `len` bytes repeating [`PATTERN`].
fn patterned(path: &Path, len: usize) -> Vec<u8> {
    let data: Vec<u8> = PATTERN.iter().copied().cycle().take(len).collect();
    std::fs::write(path, &data).unwrap();
    data
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn visible_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Waits until the source proxy has written the info message of `file` of `token` (it is
/// written after every chunk was acknowledged), and returns it.
async fn published(
    stream: &Stream,
    token: &TransferToken,
    file: &str,
) -> async_nats::jetstream::message::StreamMessage {
    let meta_subject = TokenObjects::meta_subject(&TokenObjects::new(token).file_name(file));
    wait_until(LONG, "the info message", || async {
        stream
            .direct_get_last_for_subject(meta_subject.as_str())
            .await
            .map_err(|e| e.to_string())
    })
    .await
    .unwrap()
}

/// Fetches `s`'s files into `dst` through `pb` and returns the final status at `pb`.
async fn fetch(
    pa: &TransferProxy,
    pb: &TransferProxy,
    cb: &ProxyClient,
    mig: MigrationId,
    s: &Minted,
    dst: &Path,
) -> (TransferToken, TransferStatus) {
    let d = pb.mint(mint_receive(dst, mig)).await.unwrap();
    let source = Endpoint {
        proxy: pa.uri().clone(),
        token: s.token,
    };
    cb.fetch(pb.uri(), &fetch_req(mig, source, d.token))
        .await
        .unwrap();
    (d.token, final_status(cb, pb.uri(), mig, d.token).await)
}

#[tokio::test]
async fn a_third_site_reading_the_bucket_sees_no_plaintext_and_gets_no_key() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let fed = Federation::start_with(&binary, &["a", "b", "c"])
        .await
        .unwrap();
    let keys = Keys::new(&["a", "b", "c"]);
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("dst");
    std::fs::create_dir_all(&dst).unwrap();
    let f = tmp.path().join("disk");
    let plain = patterned(&f, 3 << 20);
    let pa = start_proxy(&fed, &keys, "a", "p1", &tmp.path().join("sa"), settings()).await;
    let pb = start_proxy(&fed, &keys, "b", "p1", &tmp.path().join("sb"), settings()).await;
    let cb = keys.client("b", fed.connect("b").await.unwrap());
    let cc = keys.client("c", fed.connect("c").await.unwrap());
    let mig = MigrationId::random();
    let s = pa.mint(mint_serve(&[("disk", &f)], mig)).await.unwrap();

    // The legitimate fetch verifies, and its bytes are the file's.
    let (d_token, st) = fetch(&pa, &pb, &cb, mig, &s, &dst).await;
    let TransferStatus::Succeeded { digests } = st else {
        panic!("{st:?}");
    };
    assert_eq!(digests[0].sha256, sha256_file(&f));
    assert_eq!(std::fs::read(dst.join("disk")).unwrap(), plain);
    assert!(pb.stats(&d_token).unwrap().bytes_fetched >= plain.len() as u64);

    // Site c, not party to the transfer, reads every message of a's transfer stream by
    // sequence through a's JetStream domain, the way any member can.
    let own = jetstream::new(fed.connect("a").await.unwrap());
    let last = own
        .get_stream(STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .last_sequence;
    let admin_c = fed.connect_as("c", Role::Admin).await.unwrap();
    let via_a = jetstream::with_domain(admin_c, "a")
        .get_stream_no_info(STREAM)
        .await
        .unwrap();
    let mut read = Vec::new();
    for seq in 1..=last {
        if let Ok(m) = via_a.get_raw_message(seq).await {
            read.push((m.subject.to_string(), m.payload));
        }
    }
    let chunk_bytes: usize = read
        .iter()
        .filter(|(subject, _)| subject.starts_with("$O.nubis-xfer.C."))
        .map(|(_, p)| p.len())
        .sum();
    // Not vacuous: c did read the whole file's chunks (and the info messages).
    assert!(chunk_bytes >= plain.len(), "{chunk_bytes} chunk bytes read");
    assert!(read.iter().any(|(s, _)| s.starts_with("$O.nubis-xfer.M.")));
    let digest_hex = hex::encode(Sha256::digest(&plain));
    for (subject, payload) in &read {
        assert!(
            !contains(payload, &PATTERN[..16]),
            "{subject} holds plaintext"
        );
        assert!(
            !contains(payload, digest_hex.as_bytes()),
            "{subject} holds the file's digest"
        );
        assert!(!contains(payload, b"vm-1"), "{subject} holds the manifest");
    }

    // Nor does c get the content key, even holding the token: the transfer is over.
    let ask = |token: TransferToken, secret: &FetcherSecret| FetchKey {
        migration_id: mig,
        token,
        fetcher_key: secret.public(),
    };
    let refused = |r: Result<_, CallError>| match r {
        Err(CallError::Refused { reply, .. }) => assert_eq!(reply.code, ErrorCode::TokenUsed),
        other => panic!("third site got {other:?}"),
    };
    refused(
        cc.fetch_key(pa.uri(), &ask(s.token, &FetcherSecret::generate()))
            .await,
    );

    // Of a transfer under way, the key goes to the first site that asks (b) and to it alone:
    // again to b (a restarted fetcher, with a new ephemeral key), never to c. It opens the
    // chunks c can read, and c cannot open what b was sent.
    let s2 = pa.mint(mint_serve(&[("disk", &f)], mig)).await.unwrap();
    let b_first = FetcherSecret::generate();
    let granted = cb
        .fetch_key(pa.uri(), &ask(s2.token, &b_first))
        .await
        .unwrap();
    let key = ContentKey::unseal(&b_first, &granted.sealed).unwrap();
    let c_secret = FetcherSecret::generate();
    refused(cc.fetch_key(pa.uri(), &ask(s2.token, &c_secret)).await);
    assert!(ContentKey::unseal(&c_secret, &granted.sealed).is_err());
    let b_again = FetcherSecret::generate();
    let again = cb
        .fetch_key(pa.uri(), &ask(s2.token, &b_again))
        .await
        .unwrap();
    assert_eq!(ContentKey::unseal(&b_again, &again.sealed).unwrap(), key);
    let stream_a = own.get_stream(STREAM).await.unwrap();
    published(&stream_a, &s2.token, "disk").await;
    let objs = TokenObjects::new(&s2.token);
    let chunk0 = via_a
        .get_first_raw_message_by_subject(objs.chunk_subject(Some("disk")), 1)
        .await
        .unwrap();
    let opened = key
        .opener(&objs.file_name("disk"))
        .open(0, &chunk0.payload)
        .unwrap();
    assert_eq!(&opened[..], &plain[..opened.len()]);

    pa.shutdown().await;
    pb.shutdown().await;
}

/// Rewrites the chunks of `file` of `token` in the source's own bucket, as the source site's
/// own user can: reads them, purges them, writes them back (with `alter` applied to chunk
/// `at`), then the info message again so the object looks complete.
async fn rewrite_chunks(
    client_a: &async_nats::Client,
    token: &TransferToken,
    file: &str,
    at: usize,
    alter: impl Fn(&mut Vec<u8>),
) {
    let stream = jetstream::new(client_a.clone())
        .get_stream(STREAM)
        .await
        .unwrap();
    let meta = published(&stream, token, file).await;
    let objs = TokenObjects::new(token);
    let chunk_subject = objs.chunk_subject(Some(file));
    let mut chunks = Vec::new();
    let mut seq = 0;
    while let Ok(m) = stream
        .direct_get_next_for_subject(chunk_subject.as_str(), Some(seq + 1))
        .await
    {
        seq = m.sequence;
        chunks.push((m.headers.clone(), m.payload.clone()));
    }
    assert!(chunks.len() > at, "{} chunks", chunks.len());
    stream.purge().filter(chunk_subject.as_str()).await.unwrap();
    let js = jetstream::new(client_a.clone());
    for (i, (h, p)) in chunks.into_iter().enumerate() {
        let mut p = p.to_vec();
        if i == at {
            alter(&mut p);
        }
        js.publish_with_headers(chunk_subject.clone(), h, Bytes::from(p))
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let mut mh = meta.headers.clone();
    mh.insert("Nats-Rollup", "sub");
    js.publish_with_headers(meta.subject.to_string(), mh, meta.payload.clone())
        .await
        .unwrap()
        .await
        .unwrap();
}

#[tokio::test]
async fn a_chunk_altered_in_the_bucket_fails_authentication_and_nothing_is_written() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let fed = Federation::start_with(&binary, &["a", "b"]).await.unwrap();
    let keys = Keys::new(&["a", "b"]);
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("disk");
    let plain = patterned(&f, 4 << 20);
    let pa = start_proxy(&fed, &keys, "a", "p1", &tmp.path().join("sa"), settings()).await;
    let pb = start_proxy(&fed, &keys, "b", "p1", &tmp.path().join("sb"), settings()).await;
    let cb = keys.client("b", fed.connect("b").await.unwrap());
    let client_a = fed.connect("a").await.unwrap();
    let chunk = settings().chunk_size;

    // The counterpart: the same rewrite leaving every byte as it was, and the fetch verifies.
    let mig = MigrationId::random();
    let intact = pa.mint(mint_serve(&[("disk", &f)], mig)).await.unwrap();
    rewrite_chunks(&client_a, &intact.token, "disk", 5, |_| {}).await;
    let dst_ok = tmp.path().join("dst-ok");
    std::fs::create_dir_all(&dst_ok).unwrap();
    let (_, st) = fetch(&pa, &pb, &cb, mig, &intact, &dst_ok).await;
    assert!(matches!(st, TransferStatus::Succeeded { .. }), "{st:?}");
    assert_eq!(std::fs::read(dst_ok.join("disk")).unwrap(), plain);

    // One bit of one sealed chunk flipped: the chunk fails authentication every time it is
    // read, so the fetch reads it again, then fails and keeps nothing.
    let mig = MigrationId::random();
    let altered = pa.mint(mint_serve(&[("disk", &f)], mig)).await.unwrap();
    rewrite_chunks(&client_a, &altered.token, "disk", 5, |p| p[1000] ^= 0x40).await;
    let dst = tmp.path().join("dst");
    std::fs::create_dir_all(&dst).unwrap();
    let (d_token, st) = fetch(&pa, &pb, &cb, mig, &altered, &dst).await;
    let TransferStatus::Failed { reason } = st else {
        panic!("{st:?}");
    };
    assert!(reason.contains("failed authentication"), "{reason}");
    assert!(visible_files(&dst).is_empty(), "{:?}", visible_files(&dst));
    // It was read more than once: the chunks before the altered one came in again each time.
    let fetched = pb.stats(&d_token).unwrap().bytes_fetched;
    assert!(fetched >= 2 * 5 * chunk as u64, "{fetched} bytes fetched");

    // Chunks swapped in the bucket (each intact, at the other's place) fail the same way.
    let mig = MigrationId::random();
    let swapped = pa.mint(mint_serve(&[("disk", &f)], mig)).await.unwrap();
    let stream = jetstream::new(client_a.clone())
        .get_stream(STREAM)
        .await
        .unwrap();
    published(&stream, &swapped.token, "disk").await;
    let subject = TokenObjects::new(&swapped.token).chunk_subject(Some("disk"));
    // Chunk 0's place gets chunk 3's sealed bytes.
    let mut chunk = stream
        .direct_get_next_for_subject(subject.as_str(), None)
        .await
        .unwrap();
    for _ in 0..3 {
        chunk = stream
            .direct_get_next_for_subject(subject.as_str(), Some(chunk.sequence + 1))
            .await
            .unwrap();
    }
    let moved = chunk.payload.to_vec();
    rewrite_chunks(&client_a, &swapped.token, "disk", 0, |p| *p = moved.clone()).await;
    let dst_swapped = tmp.path().join("dst-swapped");
    std::fs::create_dir_all(&dst_swapped).unwrap();
    let (_, st) = fetch(&pa, &pb, &cb, mig, &swapped, &dst_swapped).await;
    let TransferStatus::Failed { reason } = st else {
        panic!("{st:?}");
    };
    assert!(reason.contains("failed authentication"), "{reason}");
    assert!(visible_files(&dst_swapped).is_empty());

    // The Source never saw an acknowledgement of the altered transfers.
    for token in [altered.token, swapped.token] {
        assert!(!matches!(
            pa.status(&token).unwrap(),
            TransferStatus::Succeeded { .. }
        ));
    }
    pa.shutdown().await;
    pb.shutdown().await;
}
