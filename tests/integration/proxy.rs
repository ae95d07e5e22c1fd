//! Integration tests: Transfer proxies (paper section III) on a real hub and leaf sites. VM
//! files move from one site's proxy to another's through the source site's object-store bucket,
//! verified end to end; bad tokens, corruption, restarts, relaying and clean-up are checked
//! against real nats-server processes and real files.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use nubis_protocol::envelope::{SignedEnvelope, Verifier};
use nubis_protocol::identity::SiteIdentity;
use nubis_protocol::message::{
    Endpoint, ErrorCode, FetchTransfer, HostId, LocalFile, MintToken, ProxyId, ProxyUri,
    ReleaseOutcome, ReleaseToken, TokenPurpose, TransferProgress, TransferStatus, TransferToken,
};
use nubis_protocol::replay::ReplayCache;
use nubis_protocol::{MigrationId, SiteId, VmId};
use nubis_proxy::naming::{TokenObjects, STREAM};
use nubis_proxy::{ProxyClient, ProxyError, ProxyParams, TransferProxy, TransferSettings};
use nubis_testkit::{require_nats_server, wait_until, Federation};

const HOST: &str = "host-secret-7";
const LONG: Duration = Duration::from_secs(90);

fn site(s: &str) -> SiteId {
    SiteId::new(s).unwrap()
}

/// Identities of every site, and the pinned keys each site holds of the others.
pub(crate) struct Keys(HashMap<String, Arc<SiteIdentity>>);

impl Keys {
    pub(crate) fn new(sites: &[&str]) -> Self {
        Self(
            sites
                .iter()
                .map(|s| (s.to_string(), Arc::new(SiteIdentity::generate(site(s)))))
                .collect(),
        )
    }

    pub(crate) fn id(&self, s: &str) -> Arc<SiteIdentity> {
        self.0[s].clone()
    }

    pub(crate) fn partners_of(&self, s: &str) -> Vec<(SiteId, nubis_proxy::VerifyingKey)> {
        self.0
            .iter()
            .filter(|(k, _)| k.as_str() != s)
            .map(|(k, v)| (site(k), v.public().signing))
            .collect()
    }

    /// A site daemon's view: signs as the site, verifies replies with its own verifier.
    pub(crate) fn client(&self, s: &str, client: async_nats::Client) -> ProxyClient {
        let mut partners: Vec<_> = self.partners_of(s);
        partners.push((site(s), self.0[s].public().signing));
        let verifier = Verifier::new(site(s), partners, ReplayCache::temporary(600_000).unwrap());
        ProxyClient::new(client, self.id(s), Arc::new(verifier))
    }
}

pub(crate) fn settings() -> TransferSettings {
    TransferSettings {
        // Every file of these tests lies in a temporary directory.
        roots: vec![std::env::temp_dir()],
        chunk_size: 256 << 10,
        publish_window: 16,
        bucket_max_bytes: 512 << 20,
        stall_timeout_ms: 20_000,
        progress_interval_ms: 50,
        gc_interval_ms: 3_600_000,
        ..TransferSettings::default()
    }
}

pub(crate) fn uri(s: &str, p: &str) -> ProxyUri {
    ProxyUri::new(site(s), ProxyId::new(p).unwrap())
}

pub(crate) async fn start_proxy(
    fed: &Federation,
    keys: &Keys,
    s: &str,
    p: &str,
    store: &Path,
    settings: TransferSettings,
) -> TransferProxy {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NUBIS_TEST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
        )
        .with_test_writer()
        .try_init();
    let client = fed.connect(s).await.unwrap();
    TransferProxy::start(
        ProxyParams {
            uri: uri(s, p),
            identity: keys.id(s),
            partners: keys.partners_of(s),
            store_dir: store.to_path_buf(),
            settings,
        },
        client,
    )
    .await
    .unwrap()
}

/// Bytes that differ everywhere, so a misplaced or repeated chunk changes the digest.
pub(crate) fn noise(len: usize, seed: u32) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub(crate) fn write_dense(path: &Path, len: usize, seed: u32) {
    std::fs::write(path, noise(len, seed)).unwrap();
}

/// A sparse file of `size` bytes with data only at the given (offset, len) extents.
fn write_sparse(path: &Path, size: u64, extents: &[(u64, usize)]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for (i, (off, len)) in extents.iter().enumerate() {
        f.write_all_at(&noise(*len, 77 + i as u32), *off).unwrap();
    }
    f.sync_all().unwrap();
}

pub(crate) fn sha256_file(path: &Path) -> [u8; 32] {
    let data = std::fs::read(path).unwrap();
    let mut h = nubis_proxy::hashing::LogicalHasher::new();
    h.update(0, &data).unwrap();
    h.finish(data.len() as u64).unwrap()
}

pub(crate) fn mint_serve(files: &[(&str, &Path)], migration: MigrationId) -> MintToken {
    MintToken {
        migration_id: migration,
        vm: VmId::new("vm-1").unwrap(),
        host: HostId::new(HOST).unwrap(),
        ttl_ms: None,
        purpose: TokenPurpose::Serve {
            files: files
                .iter()
                .map(|(n, p)| LocalFile {
                    name: n.to_string(),
                    path: p.to_str().unwrap().to_string(),
                })
                .collect(),
        },
    }
}

pub(crate) fn mint_receive(dir: &Path, migration: MigrationId) -> MintToken {
    MintToken {
        migration_id: migration,
        vm: VmId::new("vm-1").unwrap(),
        host: HostId::new(HOST).unwrap(),
        ttl_ms: None,
        purpose: TokenPurpose::Receive {
            dir: dir.to_str().unwrap().to_string(),
        },
    }
}

pub(crate) fn fetch_req(
    migration: MigrationId,
    source: Endpoint,
    d_tok: TransferToken,
) -> FetchTransfer {
    FetchTransfer {
        migration_id: migration,
        vm: VmId::new("vm-1").unwrap(),
        source,
        destination: d_tok,
        max_bytes_per_sec: None,
    }
}

/// Polls a proxy's status over the bus until it is final.
pub(crate) async fn final_status(
    c: &ProxyClient,
    at: &ProxyUri,
    migration: MigrationId,
    token: TransferToken,
) -> TransferStatus {
    wait_until(LONG, "a final transfer status", || async {
        match c.status(at, migration, token).await {
            Ok(s) if s.is_final() => Ok(s),
            Ok(s) => Err(format!("{s:?}")),
            Err(e) => Err(e.to_string()),
        }
    })
    .await
    .unwrap()
}

async fn bytes_done(c: &ProxyClient, at: &ProxyUri, m: MigrationId, t: TransferToken) -> u64 {
    match c.status(at, m, t).await {
        Ok(TransferStatus::Transferring { bytes_done, .. }) => bytes_done,
        Ok(s) if s.is_final() => u64::MAX,
        _ => 0,
    }
}

fn visible_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

async fn bucket_messages(fed: &Federation, s: &str) -> u64 {
    let c = fed.connect(s).await.unwrap();
    let mut stream = jetstream::new(c).get_stream(STREAM).await.unwrap();
    stream.info().await.unwrap().state.messages
}

#[tokio::test]
async fn vm_files_move_between_sites_verified_sparse_and_without_locations_on_the_bus() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let fed = Federation::start_with(&binary, &["a", "b"]).await.unwrap();
    let keys = Keys::new(&["a", "b"]);
    let tmp = tempfile::tempdir().unwrap();
    let tmp_path = tmp.path().to_str().unwrap().to_string();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&dst).unwrap();

    // What the proxies publish on cross-site subjects (requests, progress, JetStream API calls
    // across domains) reaches a hub subscriber. Replies (`nubis.reply.>`) are left out: they
    // carry the file chunks themselves, and a hub-side copy of every chunk stalls the ordered
    // consumer's flow control; the control replies are checked by the migration tests.
    let hub = fed.connect(nubis_testkit::HUB).await.unwrap();
    let mut sniff = futures::stream::select_all([
        hub.subscribe("nubis.fed.>").await.unwrap(),
        hub.subscribe("nubis.proxy.>").await.unwrap(),
        hub.subscribe("nubis.mon.>").await.unwrap(),
        hub.subscribe("$JS.*.API.>").await.unwrap(),
    ]);
    hub.flush().await.unwrap();
    let seen: Arc<Mutex<Vec<(String, Bytes)>>> = Arc::default();
    let seen2 = seen.clone();
    let sniffer = tokio::spawn(async move {
        while let Some(m) = sniff.next().await {
            seen2
                .lock()
                .unwrap()
                .push((m.subject.to_string(), m.payload.clone()));
        }
    });

    let vda = src.join("vda.qcow2");
    let vdb = src.join("vdb.raw");
    let state = src.join("vm.sav");
    write_dense(&vda, 3 * 1024 * 1024 + 12_345, 1);
    let mib = 1u64 << 20;
    write_sparse(
        &vdb,
        64 * mib,
        &[(0, 300_000), (10 * mib, 1 << 20), (40 * mib + 4096, 70_000)],
    );
    write_dense(&state, 700_001, 3);

    let pa = start_proxy(
        &fed,
        &keys,
        "a",
        "p1",
        &tmp.path().join("store-a"),
        settings(),
    )
    .await;
    let pb = start_proxy(
        &fed,
        &keys,
        "b",
        "p1",
        &tmp.path().join("store-b"),
        settings(),
    )
    .await;
    let cb = keys.client("b", fed.connect("b").await.unwrap());
    let ca = keys.client("a", fed.connect("a").await.unwrap());

    // Progress events of the destination, for the never-backwards check.
    let mig = MigrationId::random();
    let progress_sub = fed.connect("b").await.unwrap();
    let mut progress = progress_sub
        .subscribe(format!("nubis.proxy.b.p1.progress.{mig}"))
        .await
        .unwrap();
    progress_sub.flush().await.unwrap();

    // Mint in process: site-internal messages carry host paths and never go on the bus here.
    let s = pa
        .mint(mint_serve(
            &[
                ("disk-vda.qcow2", &vda),
                ("disk-vdb.raw", &vdb),
                ("state.sav", &state),
            ],
            mig,
        ))
        .await
        .unwrap();
    let d = pb.mint(mint_receive(&dst, mig)).await.unwrap();
    let source = Endpoint {
        proxy: s.proxy.clone(),
        token: s.token,
    };
    let started = cb
        .fetch(pb.uri(), &fetch_req(mig, source.clone(), d.token))
        .await
        .unwrap();
    assert!(!started.is_final(), "{started:?}");

    let at_b = final_status(&cb, pb.uri(), mig, d.token).await;
    let TransferStatus::Succeeded { digests } = at_b else {
        panic!("destination: {at_b:?}");
    };
    // Transfer verification at the Source answers from its proxy: succeeded with equal digests.
    let at_a = final_status(&ca, pa.uri(), mig, s.token).await;
    assert_eq!(
        at_a,
        TransferStatus::Succeeded {
            digests: digests.clone()
        }
    );
    assert_eq!(digests.len(), 3);
    for (name, path) in [
        ("disk-vda.qcow2", &vda),
        ("disk-vdb.raw", &vdb),
        ("state.sav", &state),
    ] {
        let got = dst.join(name);
        assert_eq!(sha256_file(&got), sha256_file(path), "{name}");
        let dg = digests.iter().find(|d| d.name == name).unwrap();
        assert_eq!(dg.sha256, sha256_file(path));
        assert_eq!(std::fs::metadata(&got).unwrap().len(), dg.len);
    }
    // Sparse where the source was: the destination allocates about what the source does.
    let (sb, db) = (
        std::fs::metadata(&vdb).unwrap().blocks(),
        std::fs::metadata(dst.join("disk-vdb.raw"))
            .unwrap()
            .blocks(),
    );
    assert!(db <= sb + 64, "source {sb} blocks, destination {db}");
    assert!(db * 512 < 4 * mib, "destination not sparse: {db} blocks");
    // Only allocated bytes travelled.
    let stats = pa.stats(&s.token).unwrap();
    let allocated = 3 * 1024 * 1024 + 12_345 + 300_000 + (1 << 20) + 70_000 + 700_001;
    assert!(
        stats.bytes_published as f64 <= 1.05 * allocated as f64,
        "{stats:?}"
    );
    assert_eq!(
        visible_files(&dst),
        ["disk-vda.qcow2", "disk-vdb.raw", "state.sav"]
    );

    // An object is a plain ADR-20 object: the stock client reads it and checks its digest
    // (at the source site: a partner may create only named fetch consumers, which the stock
    // reader does not). What it reads is sealed: each chunk longer by the seal, none of it
    // the file's bytes.
    let store_from_b = jetstream::new(fed.connect("a").await.unwrap())
        .get_object_store("nubis-xfer")
        .await
        .unwrap();
    let mut obj = store_from_b
        .get(TokenObjects::new(&s.token).file_name("state.sav"))
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut obj, &mut buf)
        .await
        .unwrap();
    let plain = std::fs::read(&state).unwrap();
    let chunks = plain.len().div_ceil(settings().chunk_size);
    assert_eq!(
        buf.len(),
        plain.len() + chunks * nubis_proxy::seal::SEAL_OVERHEAD
    );
    assert!(!buf.windows(32).any(|w| w == &plain[..32]));

    // Progress never ran backwards and reached the total.
    let mut last = 0;
    let mut finished = false;
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(5), progress.next()).await {
        let env = SignedEnvelope::decode(&m.payload).unwrap();
        let p: TransferProgress = nubis_protocol::codec::from_slice(&env.body).unwrap();
        assert!(p.bytes_done >= last, "{} after {last}", p.bytes_done);
        last = p.bytes_done;
        if p.finished {
            finished = true;
            assert_eq!(p.bytes_done, p.bytes_total);
            break;
        }
    }
    assert!(finished);

    // Release after commit: objects gone at the source, files stay at the destination.
    let r = pa
        .release(ReleaseToken {
            migration_id: mig,
            token: s.token,
            outcome: ReleaseOutcome::Commit,
        })
        .await
        .unwrap();
    assert_eq!(r.objects_deleted, 4);
    pb.release(ReleaseToken {
        migration_id: mig,
        token: d.token,
        outcome: ReleaseOutcome::Commit,
    })
    .await
    .unwrap();
    assert_eq!(bucket_messages(&fed, "a").await, 0);
    assert_eq!(visible_files(&dst).len(), 3);
    assert!(matches!(pa.status(&s.token), Err(ProxyError::UnknownToken)));

    // Nothing that crossed the hub names the host or a path, not even inside envelope bodies
    // (bodies are raw bytes inside the envelope, so a substring search covers them).
    hub.flush().await.unwrap();
    sniffer.abort();
    let seen: Vec<(String, Bytes)> = seen.lock().unwrap().clone();
    assert!(seen.iter().any(|(s, _)| s.starts_with("nubis.proxy.")));
    for (subject, payload) in seen.iter() {
        for needle in [tmp_path.as_bytes(), HOST.as_bytes(), b"/tmp/"] {
            assert!(
                !payload.windows(needle.len()).any(|w| w == needle),
                "{subject} carries {:?}",
                String::from_utf8_lossy(needle)
            );
        }
    }
    pa.shutdown().await;
    pb.shutdown().await;
}

#[tokio::test]
async fn unknown_expired_used_and_foreign_tokens_are_refused() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let fed = Federation::start_with(&binary, &["a", "b"]).await.unwrap();
    let keys = Keys::new(&["a", "b"]);
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("dst");
    std::fs::create_dir_all(&dst).unwrap();
    let f = tmp.path().join("disk");
    write_dense(&f, 200_000, 9);
    let pa = start_proxy(&fed, &keys, "a", "p1", &tmp.path().join("sa"), settings()).await;
    let pa2 = start_proxy(&fed, &keys, "a", "p2", &tmp.path().join("sa2"), settings()).await;
    let pb = start_proxy(&fed, &keys, "b", "p1", &tmp.path().join("sb"), settings()).await;
    let cb = keys.client("b", fed.connect("b").await.unwrap());
    let mig = MigrationId::random();
    let s = pa.mint(mint_serve(&[("disk", &f)], mig)).await.unwrap();

    let code = |r: Result<TransferStatus, nubis_proxy::CallError>| -> ErrorCode {
        r.unwrap_err().code().cloned().expect("an error reply")
    };

    // Unknown source token.
    let d = pb.mint(mint_receive(&dst, mig)).await.unwrap();
    let bogus = Endpoint {
        proxy: pa.uri().clone(),
        token: TransferToken::random(),
    };
    assert_eq!(
        code(cb.fetch(pb.uri(), &fetch_req(mig, bogus, d.token)).await),
        ErrorCode::UnknownToken
    );
    // Unknown destination token.
    let good = Endpoint {
        proxy: pa.uri().clone(),
        token: s.token,
    };
    assert_eq!(
        code(
            cb.fetch(
                pb.uri(),
                &fetch_req(mig, good.clone(), TransferToken::random())
            )
            .await
        ),
        ErrorCode::UnknownToken
    );
    // A token minted by p1 means nothing to p2 of the same site.
    let foreign = Endpoint {
        proxy: pa2.uri().clone(),
        token: s.token,
    };
    assert_eq!(
        code(cb.fetch(pb.uri(), &fetch_req(mig, foreign, d.token)).await),
        ErrorCode::UnknownToken
    );
    // A serving token is not a destination.
    assert!(matches!(
        pa.fetch(fetch_req(mig, good.clone(), s.token)).await,
        Err(ProxyError::WrongPurpose { .. })
    ));
    // Relaying is refused where policy forbids it.
    let relay = MintToken {
        purpose: TokenPurpose::Relay {
            source: good.clone(),
            max_bytes_per_sec: None,
        },
        ..mint_receive(&dst, mig)
    };
    assert!(matches!(
        pb.mint(relay).await,
        Err(ProxyError::RelayNotAllowed)
    ));

    // Used: a completed transfer's tokens cannot start another one.
    cb.fetch(pb.uri(), &fetch_req(mig, good.clone(), d.token))
        .await
        .unwrap();
    assert!(matches!(
        final_status(&cb, pb.uri(), mig, d.token).await,
        TransferStatus::Succeeded { .. }
    ));
    assert_eq!(
        code(
            cb.fetch(pb.uri(), &fetch_req(mig, good.clone(), d.token))
                .await
        ),
        ErrorCode::TokenUsed
    );
    let d2 = pb
        .mint(mint_receive(&tmp.path().join("sa"), mig))
        .await
        .unwrap();
    assert_eq!(
        code(cb.fetch(pb.uri(), &fetch_req(mig, good, d2.token)).await),
        ErrorCode::TokenUsed
    );

    // Expired: refused as expired, then collected with its objects.
    let before = bucket_messages(&fed, "a").await;
    let short = MintToken {
        ttl_ms: Some(1),
        ..mint_serve(&[("disk", &f)], mig)
    };
    let e = pa.mint(short).await.unwrap();
    let expired = Endpoint {
        proxy: pa.uri().clone(),
        token: e.token,
    };
    wait_until(LONG, "the token to expire", || async {
        match cb.status(pa.uri(), mig, e.token).await {
            Err(err) if err.code() == Some(&ErrorCode::ExpiredToken) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
    .unwrap();
    let d3 = pb.mint(mint_receive(&dst, mig)).await.unwrap();
    assert_eq!(
        code(cb.fetch(pb.uri(), &fetch_req(mig, expired, d3.token)).await),
        ErrorCode::ExpiredToken
    );
    assert!(pa.collect_garbage().await.unwrap() >= 1);
    assert!(matches!(pa.status(&e.token), Err(ProxyError::ExpiredToken)));
    assert!(bucket_messages(&fed, "a").await <= before);
    pa.shutdown().await;
    pa2.shutdown().await;
    pb.shutdown().await;
}

#[tokio::test]
async fn a_corrupted_chunk_fails_verification_and_nothing_is_kept() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let fed = Federation::start_with(&binary, &["a", "b"]).await.unwrap();
    let keys = Keys::new(&["a", "b"]);
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("dst");
    std::fs::create_dir_all(&dst).unwrap();
    let f = tmp.path().join("disk");
    write_dense(&f, 4 << 20, 5);
    let pa = start_proxy(&fed, &keys, "a", "p1", &tmp.path().join("sa"), settings()).await;
    let pb = start_proxy(&fed, &keys, "b", "p1", &tmp.path().join("sb"), settings()).await;
    let ca = keys.client("a", fed.connect("a").await.unwrap());
    let cb = keys.client("b", fed.connect("b").await.unwrap());
    let mig = MigrationId::random();
    let s = pa.mint(mint_serve(&[("disk", &f)], mig)).await.unwrap();
    wait_until(LONG, "the source to publish", || async {
        match bytes_done(&ca, pa.uri(), mig, s.token).await {
            n if n >= s.total_bytes => Ok(()),
            n => Err(n),
        }
    })
    .await
    .unwrap();
    // The source's bytes may only be trusted once every acknowledgement is in; give the
    // info message time to land by waiting for it in the stream.
    let client_a = fed.connect("a").await.unwrap();
    let stream = jetstream::new(client_a.clone())
        .get_stream(STREAM)
        .await
        .unwrap();
    let objs = TokenObjects::new(&s.token);
    let meta_subject = TokenObjects::meta_subject(&objs.file_name("disk"));
    let meta = wait_until(LONG, "the info message", || async {
        stream
            .direct_get_last_for_subject(meta_subject.as_str())
            .await
            .map_err(|e| e.to_string())
    })
    .await
    .unwrap();

    // Tamper: read every chunk, purge them, write them back with one byte flipped in one chunk,
    // then the info message again so the object looks complete.
    let chunk_subject = objs.chunk_subject(Some("disk"));
    let mut chunks = Vec::new();
    let mut seq = 0;
    while let Ok(m) = stream
        .direct_get_next_for_subject(chunk_subject.as_str(), Some(seq + 1))
        .await
    {
        seq = m.sequence;
        chunks.push((m.headers.clone(), m.payload.clone()));
    }
    assert_eq!(chunks.len(), 16);
    stream.purge().filter(chunk_subject.as_str()).await.unwrap();
    let js = jetstream::new(client_a);
    for (i, (h, p)) in chunks.into_iter().enumerate() {
        let mut p = p.to_vec();
        if i == 5 {
            p[1000] ^= 0x40;
        }
        js.publish_with_headers(chunk_subject.clone(), h, p.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let mut mh = meta.headers.clone();
    mh.insert("Nats-Rollup", "sub");
    js.publish_with_headers(meta_subject.clone(), mh, meta.payload.clone())
        .await
        .unwrap()
        .await
        .unwrap();

    let d = pb.mint(mint_receive(&dst, mig)).await.unwrap();
    let source = Endpoint {
        proxy: pa.uri().clone(),
        token: s.token,
    };
    cb.fetch(pb.uri(), &fetch_req(mig, source, d.token))
        .await
        .unwrap();
    let st = final_status(&cb, pb.uri(), mig, d.token).await;
    assert!(matches!(st, TransferStatus::Failed { .. }), "{st:?}");
    assert!(visible_files(&dst).is_empty(), "{:?}", visible_files(&dst));
    // The Source never saw an acknowledgement, so Transfer verification cannot succeed.
    assert!(!matches!(
        ca.status(pa.uri(), mig, s.token).await.unwrap(),
        TransferStatus::Succeeded { .. }
    ));
    pa.shutdown().await;
    pb.shutdown().await;
}

/// Runs a transfer of one large file and interrupts it (`kill`) once a third of it has arrived;
/// checks that it ends verified, after a retry if the first attempt failed cleanly.
async fn interrupted_transfer(kill: &str) {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let mut fed = Federation::start_with(&binary, &["a", "b"]).await.unwrap();
    let keys = Keys::new(&["a", "b"]);
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("dst");
    std::fs::create_dir_all(&dst).unwrap();
    let f = tmp.path().join("disk");
    const SIZE: u64 = 96 << 20;
    write_dense(&f, SIZE as usize, 11);
    let (store_a, store_b) = (tmp.path().join("sa"), tmp.path().join("sb"));
    // The receiving end makes what it has durable every 8 MiB. A fetch gives up after 30 s
    // without data: a consumer lost with a restarted server must be replaced well before that
    // (it is after about 6 s; with the client's default pulls it took a minute).
    let settings = || TransferSettings {
        checkpoint_bytes: 8 << 20,
        stall_timeout_ms: 30_000,
        ..settings()
    };
    let mut pa = start_proxy(&fed, &keys, "a", "p1", &store_a, settings()).await;
    let mut pb = start_proxy(&fed, &keys, "b", "p1", &store_b, settings()).await;
    let ca = keys.client("a", fed.connect("a").await.unwrap());
    let cb = keys.client("b", fed.connect("b").await.unwrap());
    let mig = MigrationId::random();
    let s = pa.mint(mint_serve(&[("disk", &f)], mig)).await.unwrap();
    let d = pb.mint(mint_receive(&dst, mig)).await.unwrap();
    let source = Endpoint {
        proxy: pa.uri().clone(),
        token: s.token,
    };
    // Capped, so the interruption lands mid-transfer: about four seconds for the file. This
    // holds whatever the machine's load: the proxies run on this test's single-threaded
    // runtime, and once the check below sees a third of the file, the test goes on to the
    // interruption at its next poll, while the paced reader needs at least another 2.6 s of
    // wall time (its bucket never holds more than one chunk of credit) to finish.
    let fetch = FetchTransfer {
        max_bytes_per_sec: Some(24 << 20),
        ..fetch_req(mig, source.clone(), d.token)
    };
    cb.fetch(pb.uri(), &fetch).await.unwrap();
    wait_until(LONG, "a third of the file to arrive", || async {
        match bytes_done(&cb, pb.uri(), mig, d.token).await {
            n if n >= SIZE / 3 => Ok(()),
            n => Err(n),
        }
    })
    .await
    .unwrap();
    let mut resumed_by_destination = false;
    match kill {
        "destination proxy" => {
            pb.shutdown().await;
            // Whatever was received so far is not presented under the final name.
            assert!(!dst.join("disk").exists());
            assert_eq!(visible_files(&dst), [".disk.nubis-partial"]);
            pb = start_proxy(&fed, &keys, "b", "p1", &store_b, settings()).await;
            resumed_by_destination = true;
        }
        "source proxy" => {
            // Its transfer stops where it stands, as in a crash; the proxy on the same store
            // publishes the file again, and the destination starts the file over.
            pa.shutdown().await;
            assert!(!dst.join("disk").exists());
            pa = start_proxy(&fed, &keys, "a", "p1", &store_a, settings()).await;
        }
        "source server" | "destination server" => {
            let at = if kill == "source server" { "a" } else { "b" };
            fed.kill(at).await.unwrap();
            assert!(!dst.join("disk").exists());
            fed.restart(at).await.unwrap();
        }
        other => panic!("{other}"),
    }
    let mut st = final_status(&cb, pb.uri(), mig, d.token).await;
    if let TransferStatus::Failed { .. } = st {
        // A server that restarts loses nothing the transfer needs: the fetch goes on.
        assert!(
            kill.ends_with("proxy"),
            "{kill} restart failed the transfer: {st:?}"
        );
        // A clean failure: nothing visible, and a retry with the same tokens succeeds.
        assert!(visible_files(&dst).is_empty());
        cb.fetch(pb.uri(), &fetch).await.unwrap();
        st = final_status(&cb, pb.uri(), mig, d.token).await;
    }
    assert!(matches!(st, TransferStatus::Succeeded { .. }), "{st:?}");
    assert_eq!(sha256_file(&dst.join("disk")), sha256_file(&f));
    assert_eq!(visible_files(&dst), ["disk"]);
    if resumed_by_destination {
        // The restarted proxy went on from its last checkpoint (at least 24 MiB in): it read
        // less than the whole file again.
        let fetched = pb.stats(&d.token).unwrap().bytes_fetched;
        assert!(fetched > 0 && fetched <= SIZE - (16 << 20), "{fetched}");
    }
    // The source turned succeeded on the destination's acknowledgement of the same digests.
    assert_eq!(final_status(&ca, pa.uri(), mig, s.token).await, st);
    pa.shutdown().await;
    pb.shutdown().await;
}

#[tokio::test]
async fn source_proxy_restart_mid_transfer_ends_verified() {
    interrupted_transfer("source proxy").await;
}

#[tokio::test]
async fn destination_proxy_restart_mid_transfer_resumes_from_its_checkpoint_and_verifies() {
    interrupted_transfer("destination proxy").await;
}

#[tokio::test]
async fn source_server_restart_mid_transfer_ends_verified() {
    interrupted_transfer("source server").await;
}

#[tokio::test]
async fn destination_server_restart_mid_transfer_ends_verified() {
    interrupted_transfer("destination server").await;
}

#[tokio::test]
async fn a_relaying_proxy_hides_the_source_and_both_modes_verify() {
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
    write_sparse(&f, 32 << 20, &[(0, 1 << 20), (20 << 20, 500_000)]);

    // Watch who talks to whom: the far end must never address the source's site.
    let hub = fed.connect(nubis_testkit::HUB).await.unwrap();
    let mut sniff = hub.subscribe("nubis.proxy.>").await.unwrap();
    hub.flush().await.unwrap();
    let seen: Arc<Mutex<Vec<(String, Bytes)>>> = Arc::default();
    let seen2 = seen.clone();
    let sniffer = tokio::spawn(async move {
        while let Some(m) = sniff.next().await {
            seen2
                .lock()
                .unwrap()
                .push((m.subject.to_string(), m.payload.clone()));
        }
    });

    let pa = start_proxy(&fed, &keys, "a", "p1", &tmp.path().join("sa"), settings()).await;
    let relay_settings = TransferSettings {
        relay_allowed: true,
        ..settings()
    };
    let pb = start_proxy(
        &fed,
        &keys,
        "b",
        "p1",
        &tmp.path().join("sb"),
        relay_settings,
    )
    .await;
    let pc = start_proxy(&fed, &keys, "c", "p1", &tmp.path().join("sc"), settings()).await;
    let ca = keys.client("a", fed.connect("a").await.unwrap());
    let cc = keys.client("c", fed.connect("c").await.unwrap());
    let mig = MigrationId::random();
    let s = pa
        .mint(mint_serve(&[("disk-vda.raw", &f)], mig))
        .await
        .unwrap();
    // Site b's policy forbids direct transfers: it relays, and offers only its own proxy.
    let r = pb
        .mint(MintToken {
            purpose: TokenPurpose::Relay {
                source: Endpoint {
                    proxy: s.proxy.clone(),
                    token: s.token,
                },
                max_bytes_per_sec: None,
            },
            ..mint_receive(&dst, mig)
        })
        .await
        .unwrap();
    assert_eq!(&r.proxy, pb.uri());
    let d = pc.mint(mint_receive(&dst, mig)).await.unwrap();
    cc.fetch(
        pc.uri(),
        &fetch_req(
            mig,
            Endpoint {
                proxy: r.proxy.clone(),
                token: r.token,
            },
            d.token,
        ),
    )
    .await
    .unwrap();
    let st = final_status(&cc, pc.uri(), mig, d.token).await;
    let TransferStatus::Succeeded { digests } = st else {
        panic!("{st:?}");
    };
    assert_eq!(digests[0].sha256, sha256_file(&f));
    assert_eq!(sha256_file(&dst.join("disk-vda.raw")), sha256_file(&f));
    // The source succeeded only because the far end's acknowledgement was passed on.
    assert_eq!(
        final_status(&ca, pa.uri(), mig, s.token).await,
        TransferStatus::Succeeded { digests }
    );
    sniffer.abort();
    for (subject, payload) in seen.lock().unwrap().iter() {
        if let Ok(env) = SignedEnvelope::decode(payload) {
            assert!(
                !(env.from == "c" && env.to == "a"),
                "the far end addressed the source on {subject}"
            );
        }
        assert!(!subject.starts_with("nubis.proxy.a.") || !payload.is_empty());
    }
    pa.shutdown().await;
    pb.shutdown().await;
    pc.shutdown().await;
}

#[tokio::test]
async fn a_full_bucket_fails_the_transfer_clearly() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let fed = Federation::start_with(&binary, &["a"]).await.unwrap();
    let keys = Keys::new(&["a"]);
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("disk");
    write_dense(&f, 6 << 20, 2);
    let small = TransferSettings {
        bucket_max_bytes: 2 << 20,
        ..settings()
    };
    let pa = start_proxy(&fed, &keys, "a", "p1", &tmp.path().join("sa"), small).await;
    let ca = keys.client("a", fed.connect("a").await.unwrap());
    let mig = MigrationId::random();
    let s = pa.mint(mint_serve(&[("disk", &f)], mig)).await.unwrap();
    let st = final_status(&ca, pa.uri(), mig, s.token).await;
    let TransferStatus::Failed { reason } = st else {
        panic!("{st:?}");
    };
    assert!(reason.contains("full"), "{reason}");
    // Releasing frees the bucket.
    pa.release(ReleaseToken {
        migration_id: mig,
        token: s.token,
        outcome: ReleaseOutcome::Abort,
    })
    .await
    .unwrap();
    assert_eq!(bucket_messages(&fed, "a").await, 0);
    pa.shutdown().await;
}

#[tokio::test]
async fn a_bandwidth_cap_paces_the_fetch_and_its_progress() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let fed = Federation::start_with(&binary, &["a", "b"]).await.unwrap();
    let keys = Keys::new(&["a", "b"]);
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("dst");
    std::fs::create_dir_all(&dst).unwrap();
    let f = tmp.path().join("disk");
    let len = 6usize << 20;
    write_dense(&f, len, 5);
    let pa = start_proxy(&fed, &keys, "a", "p1", &tmp.path().join("sa"), settings()).await;
    // The migration's cap is below the proxy's own (a site policy); the smaller one applies.
    let cap: u64 = 2 << 20;
    let burst = settings().chunk_size as u64;
    let capped = TransferSettings {
        max_bytes_per_sec: Some(4 * cap),
        ..settings()
    };
    let pb = start_proxy(&fed, &keys, "b", "p1", &tmp.path().join("sb"), capped).await;
    let cb = keys.client("b", fed.connect("b").await.unwrap());
    let mig = MigrationId::random();
    let progress_sub = fed.connect("b").await.unwrap();
    let mut progress = progress_sub
        .subscribe(format!("nubis.proxy.b.p1.progress.{mig}"))
        .await
        .unwrap();
    progress_sub.flush().await.unwrap();

    let s = pa.mint(mint_serve(&[("disk", &f)], mig)).await.unwrap();
    let d = pb.mint(mint_receive(&dst, mig)).await.unwrap();
    let source = Endpoint {
        proxy: pa.uri().clone(),
        token: s.token,
    };
    let started = std::time::Instant::now();
    pb.fetch(FetchTransfer {
        max_bytes_per_sec: Some(cap),
        ..fetch_req(mig, source, d.token)
    })
    .await
    .unwrap();

    // Every progress event, when it arrives, reports no more bytes than the cap allowed since
    // the fetch started (plus one burst).
    let mut last = 0;
    loop {
        let m = tokio::time::timeout(LONG, progress.next())
            .await
            .unwrap()
            .unwrap();
        let elapsed = started.elapsed().as_secs_f64();
        let env = SignedEnvelope::decode(&m.payload).unwrap();
        let p: TransferProgress = nubis_protocol::codec::from_slice(&env.body).unwrap();
        let allowed = burst as f64 + cap as f64 * elapsed;
        assert!(
            p.bytes_done as f64 <= allowed,
            "{} bytes done after {elapsed:.3} s, the cap allows {allowed:.0}",
            p.bytes_done
        );
        last = last.max(p.bytes_done);
        if p.finished {
            break;
        }
    }
    assert_eq!(last, len as u64);
    let st = final_status(&cb, pb.uri(), mig, d.token).await;
    assert!(matches!(st, TransferStatus::Succeeded { .. }), "{st:?}");
    assert_eq!(sha256_file(&dst.join("disk")), sha256_file(&f));
    // So the whole file took at least what the cap implies.
    let floor = (len as u64 - burst) as f64 / cap as f64;
    assert!(
        started.elapsed().as_secs_f64() >= floor,
        "{:?} for {len} bytes at {cap} B/s",
        started.elapsed()
    );
    pa.shutdown().await;
    pb.shutdown().await;
}

/// A reply to a proxy request counts only when the site of the proxy asked signed it: a
/// well-formed reply signed by another pinned site is refused, the same reply signed by the
/// proxy's own site is taken. And a request a proxy cannot verify is refused over the subject
/// it arrived on, never over one its unverified sender wrote into the envelope.
#[tokio::test]
async fn replies_count_only_from_the_proxys_site_and_refusals_name_the_subject_asked() {
    use nubis_protocol::envelope::{self, Addressing, EnvelopeError};
    use nubis_protocol::message::{Body, ErrorReply, TransferStatusQuery, TransferStatusReply};
    use nubis_protocol::subject::{ProxyOp, Subject};
    let Some(binary) = require_nats_server() else {
        return;
    };
    let fed = Federation::start_with(&binary, &["a", "b"]).await.unwrap();
    let keys = Keys::new(&["a", "b"]);

    // Something answers on the subjects of proxy a/p9: first as b, then as a.
    let p9 = uri("a", "p9");
    let responder = fed.connect("a").await.unwrap();
    let mut requests = responder
        .subscribe(Subject::proxy(&p9, ProxyOp::Status).to_string())
        .await
        .unwrap();
    responder.flush().await.unwrap();
    let signers = [keys.id("b"), keys.id("a")];
    let answering = tokio::spawn(async move {
        for signer in signers {
            let msg = requests.next().await.unwrap();
            let req = SignedEnvelope::decode(&msg.payload).unwrap();
            let reply = TransferStatusReply {
                migration_id: nubis_protocol::codec::from_slice::<TransferStatusQuery>(&req.body)
                    .unwrap()
                    .migration_id,
                status: TransferStatus::Pending,
            };
            let addressing = Addressing {
                to: &req.from,
                subject: &req.subject,
                re: Some(req.nonce),
            };
            let (bytes, _) = envelope::seal_message(&signer, addressing, &reply).unwrap();
            responder
                .publish(msg.reply.unwrap(), bytes.into())
                .await
                .unwrap();
            responder.flush().await.unwrap();
        }
    });
    let ca = keys.client("a", fed.connect("a").await.unwrap());
    let mig = MigrationId::random();
    let forged = ca.status(&p9, mig, TransferToken::random()).await;
    assert!(
        matches!(
            &forged,
            Err(nubis_proxy::CallError::BadReply { source: EnvelopeError::UnknownSender(who), .. }) if who == "b"
        ),
        "{forged:?}"
    );
    let genuine = ca.status(&p9, mig, TransferToken::random()).await;
    assert_eq!(genuine.unwrap(), TransferStatus::Pending);
    answering.await.unwrap();

    // A real proxy refuses a request signed by an unknown key that claims another subject.
    let tmp = tempfile::tempdir().unwrap();
    let pa = start_proxy(&fed, &keys, "a", "p1", &tmp.path().join("sa"), settings()).await;
    let asked = Subject::proxy(pa.uri(), ProxyOp::Status).to_string();
    let stranger = SiteIdentity::generate(site("x"));
    let claimed = "nubis.fed.b.migration.request";
    let (bytes, _) = envelope::seal_message(
        &stranger,
        Addressing::request(&site("b"), claimed),
        &TransferStatusQuery {
            migration_id: mig,
            token: TransferToken::random(),
        },
    )
    .unwrap();
    let client = fed.connect("a").await.unwrap();
    let answer = client.request(asked.clone(), bytes.into()).await.unwrap();
    let refusal = SignedEnvelope::decode(&answer.payload).unwrap();
    assert_eq!(refusal.body_type, <ErrorReply as Body>::TYPE, "{refusal:?}");
    assert_eq!(
        refusal.subject, asked,
        "signed over the subject the request claimed"
    );
    assert_eq!(refusal.from, "a");
    // The legitimate counterpart: a verified request is answered over the same subject.
    let (bytes, _) = envelope::seal_message(
        &keys.id("a"),
        Addressing::request(&site("a"), &asked),
        &TransferStatusQuery {
            migration_id: mig,
            token: TransferToken::random(),
        },
    )
    .unwrap();
    let answer = client.request(asked.clone(), bytes.into()).await.unwrap();
    let refusal = SignedEnvelope::decode(&answer.payload).unwrap();
    assert_eq!(refusal.subject, asked);
    let e: ErrorReply = nubis_protocol::codec::from_slice(&refusal.body).unwrap();
    assert_eq!(e.code, ErrorCode::UnknownToken, "{e:?}");
    pa.shutdown().await;
}
