//! Integration tests: federation. A hub and leaf-node sites as real nats-server processes; the
//! directory's KV bucket lives in the hub's JetStream domain and every site reaches it, and a
//! site's transfer bucket (where its transfer proxy serves VM images) is read by a partner site
//! through the owner's domain.

use std::time::Duration;

use async_nats::jetstream::{self, kv, object_store};
use bytes::Bytes;
use futures::StreamExt;
use nubis_protocol::subject::DIRECTORY_BUCKET;
use nubis_testkit::{
    kept_logs_root, require_nats_server, wait_until, Federation, LocateError, NatsServerBinary,
    DEFAULT_TIMEOUT, HUB, HUB_DOMAIN, MIN_VERSION,
};

/// The transfer proxies' bucket: the only bucket of a site's JetStream domain that partners may
/// read (`nats-config/hub-leaf-user.conf`).
const TRANSFER_BUCKET: &str = "nubis-xfer";

/// Bytes that differ from chunk to chunk, so a chunk delivered twice or out of order shows.
fn image_bytes(len: usize) -> Vec<u8> {
    let mut state: u32 = 0x9E37_79B9;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state.to_le_bytes()[0]
        })
        .collect()
}

/// Reads object `name` of site `domain`'s transfer bucket as a partner may: its info by a
/// stored-message get, its chunks through a named pull consumer filtered on its chunk subject
/// (the stock reader's unnamed consumer is refused to partners, see `nats-config/README.md`).
async fn read_via(client: async_nats::Client, domain: &str, name: &str) -> Vec<u8> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static READER: AtomicUsize = AtomicUsize::new(0);
    let js = jetstream::with_domain(client, domain);
    let store = js.get_object_store(TRANSFER_BUCKET).await.unwrap();
    let info = store.info(name).await.unwrap();
    let stream = js
        .get_stream_no_info(format!("OBJ_{TRANSFER_BUCKET}"))
        .await
        .unwrap();
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            name: Some(format!("read-{}", READER.fetch_add(1, Ordering::Relaxed))),
            filter_subject: format!("$O.{TRANSFER_BUCKET}.C.{}", info.nuid),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut chunks = consumer.messages().await.unwrap().take(info.chunks);
    let mut read = Vec::new();
    while let Some(chunk) = chunks.next().await {
        read.extend_from_slice(&chunk.unwrap().payload);
    }
    read
}

async fn kv_bucket(js: &jetstream::Context, bucket: &str) -> kv::Store {
    js.create_key_value(kv::Config {
        bucket: bucket.to_owned(),
        history: 5,
        ..Default::default()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn kv_bucket_in_hub_domain_written_from_a_is_read_and_watched_from_b() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let federation = Federation::start_with(&binary, &["a", "b"]).await.unwrap();
    let client_a = federation.connect("a").await.unwrap();
    let client_b = federation.connect("b").await.unwrap();

    // The hub's operator created the bucket when the hub started.
    let kv_a = jetstream::with_domain(client_a.clone(), HUB_DOMAIN)
        .get_key_value(DIRECTORY_BUCKET)
        .await
        .unwrap();
    let kv_b = jetstream::with_domain(client_b.clone(), HUB_DOMAIN)
        .get_key_value(DIRECTORY_BUCKET)
        .await
        .unwrap();
    let mut watch_b = kv_b.watch("site.>").await.unwrap();

    kv_a.put("site.a", Bytes::from_static(b"proxy of a"))
        .await
        .unwrap();
    assert_eq!(
        kv_b.get("site.a").await.unwrap(),
        Some(Bytes::from_static(b"proxy of a"))
    );
    let entry = tokio::time::timeout(DEFAULT_TIMEOUT, watch_b.next())
        .await
        .expect("site b's watch saw nothing")
        .unwrap()
        .unwrap();
    assert_eq!(entry.key, "site.a");
    assert_eq!(entry.value, Bytes::from_static(b"proxy of a"));
    assert_eq!(entry.operation, kv::Operation::Put);

    // An update made by a is seen by b's watch too, in order.
    kv_a.put("site.a", Bytes::from_static(b"proxy of a, moved"))
        .await
        .unwrap();
    let entry = tokio::time::timeout(DEFAULT_TIMEOUT, watch_b.next())
        .await
        .expect("site b's watch missed the update")
        .unwrap()
        .unwrap();
    assert_eq!(entry.value, Bytes::from_static(b"proxy of a, moved"));

    // The bucket lives in the hub's domain only: the hub's own clients see it without a
    // prefix, and site a's local domain has no such bucket.
    let hub = federation.connect(HUB).await.unwrap();
    let on_hub = jetstream::new(hub)
        .get_key_value(DIRECTORY_BUCKET)
        .await
        .unwrap();
    assert_eq!(
        on_hub.get("site.a").await.unwrap(),
        Some(Bytes::from_static(b"proxy of a, moved"))
    );
    assert!(jetstream::new(client_a)
        .get_key_value(DIRECTORY_BUCKET)
        .await
        .is_err());
}

#[tokio::test]
async fn object_in_site_a_store_is_read_from_site_b_through_domain_a() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let federation = Federation::start_with(&binary, &["a", "b"]).await.unwrap();
    let client_a = federation.connect("a").await.unwrap();
    let client_b = federation.connect("b").await.unwrap();
    // Transfer proxies use chunks larger than nats-server's default 1MB payload limit.
    let eight_mb = 8 * 1024 * 1024;
    assert_eq!(client_b.server_info().max_payload, eight_mb);

    // The transfer bucket: the only bucket of a site's domain that partners may read.
    let store_a = jetstream::new(client_a)
        .create_object_store(object_store::Config {
            bucket: TRANSFER_BUCKET.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap();
    let image = image_bytes(10 * 1024 * 1024 + 123);
    let info = store_a
        .put(
            object_store::ObjectMetadata {
                name: "vm-1.img".to_owned(),
                chunk_size: Some(4 * 1024 * 1024),
                ..Default::default()
            },
            &mut image.as_slice(),
        )
        .await
        .unwrap();
    assert_eq!(info.size, image.len());
    assert_eq!(info.chunks, 3);

    let read = read_via(client_b.clone(), "a", "vm-1.img").await;
    assert_eq!(read.len(), image.len());
    assert!(read == image, "object read through domain a differs");
    let mut via_a = jetstream::with_domain(client_b.clone(), "a");
    via_a.set_timeout(Duration::from_secs(2));
    let store_via_a = via_a.get_object_store(TRANSFER_BUCKET).await.unwrap();
    assert!(store_via_a.info("vm-2.img").await.is_err());
    // The stock reader's consumer (unnamed, pushed to a subject of the reader's choosing) is
    // not one a partner may create.
    let mut stock = store_via_a.get("vm-1.img").await.unwrap();
    let mut read = Vec::new();
    assert!(tokio::io::AsyncReadExt::read_to_end(&mut stock, &mut read)
        .await
        .is_err());

    // Site b's own domain has no such store, and a domain nobody serves answers with an error
    // rather than hanging.
    assert!(jetstream::new(client_b.clone())
        .get_object_store(TRANSFER_BUCKET)
        .await
        .is_err());
    assert!(jetstream::with_domain(client_b, "nowhere")
        .get_object_store(TRANSFER_BUCKET)
        .await
        .is_err());
}

#[tokio::test]
async fn site_data_survives_a_crash_and_a_restart_and_is_reachable_again() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let mut federation = Federation::start_with(&binary, &["a", "b"]).await.unwrap();
    let client_a = federation.connect("a").await.unwrap();
    let client_b = federation.connect("b").await.unwrap();
    let url_a = federation.site_url("a").unwrap();

    // The site's own data (a journal) and what it serves partners (its transfer bucket).
    let journal = kv_bucket(&jetstream::new(client_a.clone()), "journal").await;
    journal
        .put("vm-1", Bytes::from_static(b"committed"))
        .await
        .unwrap();
    jetstream::new(client_a)
        .create_object_store(object_store::Config {
            bucket: TRANSFER_BUCKET.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .put("vm-1.img", &mut &b"image of vm-1"[..])
        .await
        .unwrap();
    let read_via_a = |client: async_nats::Client| read_via(client, "a", "vm-1.img");

    // A crash: while a is down, its domain does not answer partners.
    federation.kill("a").await.unwrap();
    assert!(!federation.is_running("a").unwrap());
    assert!(federation.site_url("a").is_err());
    let mut via_a = jetstream::with_domain(client_b.clone(), "a");
    via_a.set_timeout(Duration::from_secs(2));
    assert!(via_a.get_object_store(TRANSFER_BUCKET).await.is_err());

    federation.restart("a").await.unwrap();
    assert_eq!(federation.site_url("a").unwrap(), url_a);
    assert_eq!(read_via_a(client_b.clone()).await, b"image of vm-1");

    // A graceful restart of a running server keeps the data as well.
    federation.restart("a").await.unwrap();
    assert_eq!(read_via_a(client_b).await, b"image of vm-1");
    let client_a = federation.connect("a").await.unwrap();
    let journal = jetstream::new(client_a)
        .get_key_value("journal")
        .await
        .unwrap();
    assert_eq!(
        journal.get("vm-1").await.unwrap(),
        Some(Bytes::from_static(b"committed"))
    );
}

#[tokio::test]
async fn hub_restart_keeps_the_directory_and_every_site_rejoins() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let mut federation = Federation::start_with(&binary, &["a", "b", "c"])
        .await
        .unwrap();
    let client_c = federation.connect("c").await.unwrap();
    let directory = jetstream::with_domain(client_c.clone(), HUB_DOMAIN)
        .get_key_value(DIRECTORY_BUCKET)
        .await
        .unwrap();
    directory
        .put("site.c", Bytes::from_static(b"c"))
        .await
        .unwrap();

    federation.stop(HUB).await.unwrap();
    assert_eq!(federation.hub_url(), "");
    federation.restart(HUB).await.unwrap();
    assert_eq!(
        federation.leaf_connections().await.unwrap(),
        vec!["a", "b", "c"]
    );

    // c's client was connected all along; its server rejoined the hub by itself.
    let client_a = federation.connect("a").await.unwrap();
    let directory_a = jetstream::with_domain(client_a, HUB_DOMAIN)
        .get_key_value(DIRECTORY_BUCKET)
        .await
        .unwrap();
    assert_eq!(
        directory_a.get("site.c").await.unwrap(),
        Some(Bytes::from_static(b"c"))
    );
}

#[tokio::test]
async fn failing_test_keeps_server_logs() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let thread_name = format!("keeps-logs-{}", std::process::id());
    let probe = std::thread::Builder::new()
        .name(thread_name.clone())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let _federation = Federation::start_with(&binary, &["a"]).await.unwrap();
                panic!("deliberate failure to exercise log keeping");
            });
        })
        .unwrap();
    assert!(probe.join().is_err(), "the probe was meant to panic");

    let root = kept_logs_root();
    let kept: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(&thread_name))
        .map(|e| e.path())
        .collect();
    assert_eq!(kept.len(), 1, "expected one log directory in {root:?}");
    let hub_log = std::fs::read_to_string(kept[0].join("hub.log")).unwrap();
    let site_log = std::fs::read_to_string(kept[0].join("a.log")).unwrap();
    assert!(hub_log.contains("Server is ready"), "{hub_log}");
    assert!(
        site_log.contains("Leafnode connection created"),
        "{site_log}"
    );
    assert!(kept[0].join("a.conf").exists());
    std::fs::remove_dir_all(&kept[0]).unwrap();
}

/// Writes an executable shell script that prints `output` as its version.
fn fake_server(dir: &std::path::Path, output: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("nats-server");
    std::fs::write(&path, format!("#!/bin/sh\necho '{output}'\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Checks a freshly written script. Another test thread may fork while the script's write
/// handle is still open, and the child's inherited copy makes exec fail with "text file busy"
/// until it execs; ask again until that clears.
async fn check_fresh_binary(path: &std::path::Path) -> Result<NatsServerBinary, LocateError> {
    const ETXTBSY: i32 = 26;
    wait_until(
        DEFAULT_TIMEOUT,
        "the script to become executable",
        || async {
            match NatsServerBinary::at(path) {
                Err(LocateError::Run { source, .. }) if source.raw_os_error() == Some(ETXTBSY) => {
                    Err(source)
                }
                other => Ok(other),
            }
        },
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn version_check_refuses_old_unknown_and_missing_binaries() {
    let dir = tempfile::tempdir().unwrap();

    let old = fake_server(dir.path(), "nats-server: v2.9.10");
    match check_fresh_binary(&old).await {
        Err(LocateError::NatsServerTooOld {
            found, required, ..
        }) => {
            assert_eq!(found.to_string(), "2.9.10");
            assert_eq!(required, MIN_VERSION);
        }
        other => panic!("expected NatsServerTooOld, got {other:?}"),
    }

    let garbled = fake_server(dir.path(), "hello");
    assert!(matches!(
        check_fresh_binary(&garbled).await,
        Err(LocateError::UnrecognisedVersion { .. })
    ));

    let new = fake_server(dir.path(), "nats-server: v2.10.0");
    assert_eq!(
        check_fresh_binary(&new).await.unwrap().version(),
        MIN_VERSION
    );

    let missing = NatsServerBinary::at(dir.path().join("no-such-binary"));
    assert!(matches!(missing, Err(LocateError::NotFound { .. })));
}
