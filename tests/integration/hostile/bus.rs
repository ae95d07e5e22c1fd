//! The shared NATS infrastructure against a hostile member: the directory belongs to its
//! writers and its bucket to the hub's operator, a partner creates on another site's transfer
//! bucket only what a fetch needs, and the reply to a signed call comes only from the site
//! asked. The attacker is a site's `admin` user, unrestricted inside its own site, so what holds
//! the line is the hub (and the streams' own configuration), not the attacker's server.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt as _;
use nubis_protocol::envelope::{now_ms, Verifier};
use nubis_protocol::identity::SiteIdentity;
use nubis_protocol::message::{ConsumerRegistration, ProducerId, ProducerRegistration, SiteEntry};
use nubis_protocol::replay::ReplayCache;
use nubis_protocol::subject::{DirectoryKey, Subject, DIRECTORY_BUCKET};
use nubis_protocol::{SiteId, VmId};
use nubis_proxy::naming::STREAM as TRANSFER_STREAM;
use nubis_proxy::objects::{ensure_bucket, CONSUMER_INACTIVE_LIMIT, MAX_CONSUMERS};
use nubis_site::directory::{open_bucket, Directory, Withdraw};
use nubis_testkit::{require_nats_server, Federation, Role, DEFAULT_TIMEOUT, HUB, HUB_DOMAIN};

use crate::permissions::{
    await_interest, pending, refused, round_trip, until_marker, DENIED_REQUEST,
};

const DIRECTORY_STREAM: &str = "KV_nubis-directory";

/// A JetStream context in `domain` whose denied requests fail quickly.
fn js_in(client: &async_nats::Client, domain: &str) -> jetstream::Context {
    let mut js = jetstream::with_domain(client.clone(), domain);
    js.set_timeout(DENIED_REQUEST);
    js
}

fn sid(s: &str) -> SiteId {
    SiteId::new(s).unwrap()
}

#[tokio::test]
async fn a_site_writes_and_deletes_only_the_directory_keys_that_carry_its_id() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let fed = Federation::start_with(&binary, &["a", "b", "c"])
        .await
        .unwrap();
    let js_a = js_in(&fed.connect("a").await.unwrap(), HUB_DOMAIN);
    let kv_a = js_a.get_key_value(DIRECTORY_BUCKET).await.unwrap();
    let a_keys = [
        "site.a",
        "proxy.a.p1",
        "producer.a.web-1.p1",
        "consumer.web-1.a",
    ];
    for key in a_keys {
        kv_a.put(key, Bytes::from(format!("{key} of a")))
            .await
            .unwrap();
    }

    // Allowed: b, as its administrator, puts, creates, updates and deletes every kind of key
    // that carries its own id.
    let admin_b = fed.connect_as("b", Role::Admin).await.unwrap();
    let js_b = js_in(&admin_b, HUB_DOMAIN);
    let kv_b = js_b.get_key_value(DIRECTORY_BUCKET).await.unwrap();
    for key in [
        "site.b",
        "proxy.b.p1",
        "producer.b.web-1.p1",
        "consumer.web-1.b",
    ] {
        let rev = kv_b.put(key, Bytes::from_static(b"b's")).await.unwrap();
        kv_b.update(key, Bytes::from_static(b"b's, 2"), rev)
            .await
            .unwrap();
    }
    kv_b.create("producer.b.web-2.p9", Bytes::from_static(b"b's"))
        .await
        .unwrap();
    kv_b.delete("producer.b.web-2.p9").await.unwrap();

    // Denied: a's keys of every kind, put, created or deleted; the old producer layout without
    // a site id; keys of no known form.
    for key in a_keys {
        assert!(
            kv_b.put(key, Bytes::from_static(b"forged by b"))
                .await
                .is_err(),
            "b put {key}"
        );
        assert!(kv_b.delete(key).await.is_err(), "b deleted {key}");
    }
    for key in [
        "producer.a.web-1.p2",
        "producer.web-1.p1",
        "consumer.web-1.c",
        "other.b",
    ] {
        assert!(
            kv_b.create(key, Bytes::from_static(b"forged by b"))
                .await
                .is_err(),
            "b created {key}"
        );
    }

    // A rollup header on b's own key would purge the whole bucket; the bucket refuses rollups,
    // so b's put with one is refused while the same put without it is stored.
    let own = format!("$JS.{HUB_DOMAIN}.API.$KV.{DIRECTORY_BUCKET}.site.b");
    for rollup in ["all", "sub"] {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Rollup", rollup);
        let ack = async {
            js_b.publish_with_headers(own.clone(), headers, Bytes::from_static(b"rollup"))
                .await?
                .await
                .map(drop)
                .map_err(async_nats::Error::from)
        };
        refused::<(), _>(&format!("a rollup {rollup} on b's own key"), ack.await);
    }
    assert!(kv_b.purge("site.b").await.is_err(), "b purged its key");
    js_b.publish(own.clone(), Bytes::from_static(b"b's, 3"))
        .await
        .unwrap()
        .await
        .unwrap();

    // What c reads: a's keys as a wrote them, each at its first revision, and b's own.
    let kv_c = js_in(&fed.connect("c").await.unwrap(), HUB_DOMAIN)
        .get_key_value(DIRECTORY_BUCKET)
        .await
        .unwrap();
    for key in a_keys {
        let entry = kv_c.entry(key).await.unwrap().unwrap();
        assert_eq!(entry.value, format!("{key} of a"), "{key}");
        assert_eq!(entry.operation, kv::Operation::Put, "{key}");
    }
    assert_eq!(kv_c.get("site.b").await.unwrap().unwrap(), "b's, 3");
    assert_eq!(
        kv_c.get("consumer.web-1.b").await.unwrap().unwrap(),
        "b's, 2"
    );
    assert!(kv_c.get("producer.b.web-2.p9").await.unwrap().is_none());
    let mut keys: Vec<String> = kv_c
        .keys()
        .await
        .unwrap()
        .map(Result::unwrap)
        .collect()
        .await;
    keys.sort();
    assert_eq!(
        keys,
        [
            "consumer.web-1.a",
            "consumer.web-1.b",
            "producer.a.web-1.p1",
            "producer.b.web-1.p1",
            "proxy.a.p1",
            "proxy.b.p1",
            "site.a",
            "site.b"
        ]
    );
}

#[tokio::test]
async fn the_directory_bucket_is_the_hub_operators_and_no_site_creates_or_changes_it() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let fed = Federation::start_with(&binary, &["a", "b"]).await.unwrap();

    // The hub's operator created the bucket at start with its final configuration.
    let js_hub = jetstream::new(fed.connect(HUB).await.unwrap());
    let mut directory = js_hub.get_stream(DIRECTORY_STREAM).await.unwrap();
    let config = directory.info().await.unwrap().config.clone();
    assert!(!config.allow_rollup, "{config:?}");
    assert!(config.deny_delete && config.deny_purge, "{config:?}");
    assert_eq!(config.max_messages_per_subject, 1);

    // A site opens it and writes its entry.
    let js_a = js_in(&fed.connect("a").await.unwrap(), HUB_DOMAIN);
    let kv_a = open_bucket(&js_a).await.unwrap();
    kv_a.put("site.a", Bytes::from_static(b"entry of a"))
        .await
        .unwrap();

    // Denied to b's site daemon user and to its administrator: creating the bucket again with
    // another configuration, reconfiguring it, purging it, deleting it, creating another
    // stream at the hub.
    for role in [Role::Site, Role::Admin] {
        let js_b = js_in(&fed.connect_as("b", role).await.unwrap(), HUB_DOMAIN);
        refused(
            &format!("{role} of b creating the bucket"),
            js_b.create_key_value(kv::Config {
                bucket: DIRECTORY_BUCKET.to_owned(),
                history: 5,
                ..Default::default()
            })
            .await
            .map(drop),
        );
        let mut rollups = config.clone();
        rollups.allow_rollup = true;
        rollups.deny_purge = false;
        refused(
            &format!("{role} of b creating the stream"),
            js_b.create_stream(rollups.clone()).await.map(drop),
        );
        refused(
            &format!("{role} of b updating the stream"),
            js_b.update_stream(rollups).await.map(drop),
        );
        let stream = js_b.get_stream_no_info(DIRECTORY_STREAM).await.unwrap();
        refused(
            &format!("{role} of b purging"),
            stream.purge().await.map(drop),
        );
        refused(
            &format!("{role} of b deleting a message"),
            stream.delete_message(1).await,
        );
        refused(
            &format!("{role} of b deleting the bucket"),
            js_b.delete_key_value(DIRECTORY_BUCKET).await.map(drop),
        );
        refused(
            &format!("{role} of b creating a hub stream"),
            js_b.create_stream(stream::Config {
                name: "KV_nubis-forged".to_owned(),
                subjects: vec!["$KV.nubis-forged.>".to_owned()],
                ..Default::default()
            })
            .await
            .map(drop),
        );
    }

    // Allowed: the hub's operator reconfigures its bucket (here, to the same configuration).
    js_hub.update_stream(config.clone()).await.unwrap();
    let after = directory.info().await.unwrap();
    assert_eq!(after.config, config);
    assert_eq!(after.state.messages, 1);
    assert_eq!(kv_a.get("site.a").await.unwrap().unwrap(), "entry of a");
    let names: Vec<String> = js_hub.stream_names().map(Result::unwrap).collect().await;
    assert_eq!(names, [DIRECTORY_STREAM]);
}

#[tokio::test]
async fn registrations_are_kept_under_the_writers_id_refreshed_and_withdrawn() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let fed = Federation::start_with(&binary, &["a", "b"]).await.unwrap();
    let ids: Vec<Arc<SiteIdentity>> = ["a", "b"]
        .iter()
        .map(|s| Arc::new(SiteIdentity::generate(sid(s))))
        .collect();
    let directory = |me: usize| {
        let ids = ids.clone();
        let fed = &fed;
        async move {
            let site = ids[me].site().as_str().to_owned();
            let js = jetstream::with_domain(fed.connect(&site).await.unwrap(), HUB_DOMAIN);
            let kv = open_bucket(&js).await.unwrap();
            let pinned = ids.iter().map(|i| (i.site().clone(), i.public().signing));
            let verifier = Verifier::new(
                ids[me].site().clone(),
                pinned,
                ReplayCache::temporary(0).unwrap(),
            );
            (Directory::new(kv.clone(), ids[me].clone(), verifier), kv)
        }
    };
    let (dir_a, _) = directory(0).await;
    let (dir_b, kv) = directory(1).await;
    let vm = VmId::new("web-1").unwrap();
    let producer = ProducerRegistration {
        vm: vm.clone(),
        primary_site: sid("a"),
        producer: ProducerId::new("p-7f3a").unwrap(),
        data_points: Vec::new(),
        subject: "nubis.mon.a.web-1.>".into(),
        heartbeat_ms: now_ms(),
    };
    // b runs a Producer of a's VM and consumes its monitoring. Its consumer registration
    // claims to be a's: the key is b's all the same (the only one the hub lets it write).
    dir_b.register_producer(&producer).await.unwrap();
    dir_b
        .register_consumer(&ConsumerRegistration {
            consumer_site: sid("a"),
            vm: vm.clone(),
            data_points: Vec::new(),
            downstream: None,
            heartbeat_ms: now_ms(),
        })
        .await
        .unwrap();
    let producer_key = DirectoryKey::producer(&sid("b"), &vm, &producer.producer);
    assert_eq!(producer_key.as_str(), "producer.b.web-1.p-7f3a");
    let consumer_key = DirectoryKey::consumer(&vm, &sid("b"));
    let first = kv.entry(producer_key.as_str()).await.unwrap().unwrap();
    assert!(kv
        .get(DirectoryKey::consumer(&vm, &sid("a")).as_str())
        .await
        .unwrap()
        .is_none());
    let found = dir_a.producers_of(&vm).await.unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].trusted);
    assert_eq!(found[0].signer, sid("b"));
    assert_eq!(dir_a.consumers_of(&vm).await.unwrap().len(), 1);

    // Each heartbeat rewrites the registrations b holds.
    let entry = |heartbeat_ms| SiteEntry {
        site: sid("b"),
        signing_key: ids[1].public().signing.to_bytes(),
        sealing_key: ids[1].public().sealing,
        proxies: Vec::new(),
        subjects: Vec::new(),
        heartbeat_ms,
        started_ms: 1,
    };
    dir_b.publish_self(&entry(now_ms())).await.unwrap();
    let refreshed = kv.entry(producer_key.as_str()).await.unwrap().unwrap();
    assert!(refreshed.revision > first.revision);
    assert_eq!(refreshed.operation, kv::Operation::Put);

    // When the VM leaves b, b withdraws both, and the next heartbeat does not bring them back.
    assert_eq!(dir_b.withdraw(&vm, Withdraw::Producers).await.unwrap(), 1);
    assert_eq!(dir_b.withdraw(&vm, Withdraw::Consumer).await.unwrap(), 1);
    dir_b.publish_self(&entry(now_ms())).await.unwrap();
    for key in [&producer_key, &consumer_key] {
        assert!(kv.get(key.as_str()).await.unwrap().is_none(), "{key}");
    }
    assert!(dir_a.producers_of(&vm).await.unwrap().is_empty());
    assert!(dir_a.consumers_of(&vm).await.unwrap().is_empty());
}

/// Sends a raw JetStream API request in another domain and returns the server's JSON answer, or
/// `None` when no answer came (the hub did not let the request through).
async fn api(
    client: &async_nats::Client,
    subject: String,
    body: serde_json::Value,
) -> Option<serde_json::Value> {
    let answer = tokio::time::timeout(
        DENIED_REQUEST,
        client.request(subject, body.to_string().into()),
    )
    .await
    .ok()?
    .ok()?;
    serde_json::from_slice(&answer.payload).ok()
}

#[tokio::test]
async fn a_partner_creates_only_bounded_fetch_consumers_on_a_transfer_bucket() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let fed = Federation::start_with(&binary, &["a", "b"]).await.unwrap();
    let js_a = jetstream::new(fed.connect("a").await.unwrap());
    let xfer = ensure_bucket(&js_a, 64 * 1024 * 1024).await.unwrap();
    assert_eq!(xfer.cached_info().config.max_consumers, MAX_CONSUMERS);

    let admin_b = fed.connect_as("b", Role::Admin).await.unwrap();
    let via_a = js_in(&admin_b, "a");
    let stream = via_a.get_stream_no_info(TRANSFER_STREAM).await.unwrap();
    let chunks = "$O.nubis-xfer.C.some-object";

    // Allowed: what a fetch needs, a named pull consumer whose filter (in the subject) is a
    // chunk subject.
    stream
        .create_consumer(consumer::pull::Config {
            name: Some("fetch-1".to_owned()),
            filter_subject: chunks.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap();

    // Denied: a push consumer delivering to a subject of b's choosing (here, a third site's
    // federation requests), created without a name; a named consumer without a filter or with
    // one outside the chunks; the legacy durable form.
    refused(
        "a push consumer",
        stream
            .create_consumer(consumer::push::OrderedConfig {
                deliver_subject: "nubis.fed.c.migration.request".to_owned(),
                filter_subject: chunks.to_owned(),
                ..Default::default()
            })
            .await
            .map(drop),
    );
    refused(
        "a named consumer without a filter",
        stream
            .create_consumer(consumer::pull::Config {
                name: Some("all".to_owned()),
                ..Default::default()
            })
            .await
            .map(drop),
    );
    refused(
        "a consumer of the info messages",
        stream
            .create_consumer(consumer::pull::Config {
                name: Some("meta".to_owned()),
                filter_subject: "$O.nubis-xfer.M.>".to_owned(),
                ..Default::default()
            })
            .await
            .map(drop),
    );
    let durable = api(
        &admin_b,
        format!("$JS.a.API.CONSUMER.DURABLE.CREATE.{TRANSFER_STREAM}.kept"),
        serde_json::json!({
            "stream_name": TRANSFER_STREAM,
            "config": { "durable_name": "kept", "filter_subject": chunks }
        }),
    )
    .await;
    assert!(
        durable.is_none(),
        "legacy durable form answered {durable:?}"
    );

    // A durable consumer through the allowed form is not kept: the stream caps how long any
    // consumer may stay idle, so asking for longer is refused, and asking for nothing gets the
    // cap.
    let durable = |name: &str, threshold: Option<Duration>| {
        let mut config = serde_json::json!({
            "durable_name": name, "name": name, "filter_subject": chunks, "ack_policy": "explicit"
        });
        if let Some(t) = threshold {
            config["inactive_threshold"] = (t.as_nanos() as u64).into();
        }
        api(
            &admin_b,
            format!("$JS.a.API.CONSUMER.CREATE.{TRANSFER_STREAM}.{name}.{chunks}"),
            serde_json::json!({ "stream_name": TRANSFER_STREAM, "config": config }),
        )
    };
    let long = durable("long", Some(Duration::from_secs(3600)))
        .await
        .unwrap();
    assert!(long.get("error").is_some(), "{long}");
    let capped = durable("capped", None).await.unwrap();
    assert_eq!(
        capped["config"]["inactive_threshold"].as_u64(),
        Some(CONSUMER_INACTIVE_LIMIT.as_nanos() as u64),
        "{capped}"
    );

    // The number of consumers is bounded: b fills the bucket up to its limit, and one more is
    // refused.
    let existing = 2;
    for n in existing..MAX_CONSUMERS {
        stream
            .create_consumer(consumer::pull::Config {
                name: Some(format!("fill-{n}")),
                filter_subject: chunks.to_owned(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("consumer {n} of {MAX_CONSUMERS}: {e}"));
    }
    refused(
        "a consumer beyond the limit",
        stream
            .create_consumer(consumer::pull::Config {
                name: Some("one-too-many".to_owned()),
                filter_subject: chunks.to_owned(),
                ..Default::default()
            })
            .await
            .map(drop),
    );
}

#[tokio::test]
async fn only_the_site_asked_can_answer_a_signed_call() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let fed = Federation::start_with(&binary, &["a", "b", "c"])
        .await
        .unwrap();
    let site_a = fed.connect("a").await.unwrap();
    let site_b = fed.connect("b").await.unwrap();
    let site_c = fed.connect("c").await.unwrap();
    let admin_c = fed.connect_as("c", Role::Admin).await.unwrap();

    // a answers requests only when told to, so that c's attempt comes first.
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let (go_tx, mut go) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut requests = site_a.subscribe("nubis.fed.a.>").await.unwrap();
    round_trip(&site_a).await;
    let answering = site_a.clone();
    tokio::spawn(async move {
        while let Some(msg) = requests.next().await {
            let Some(reply) = msg.reply else { continue };
            let _ = seen_tx.send(reply.to_string());
            if go.recv().await.is_none() {
                return;
            }
            let _ = answering.publish(reply, "signed by a".into()).await;
            let _ = answering.flush().await;
        }
    });

    // b's call to a takes its reply on b's inbox for a; c's monitoring reaches b and serves as
    // the marker for c's publications before it.
    let inbox = format!(
        "{}.call-1",
        Subject::call_inbox_prefix(&sid("b"), &sid("a"))
    );
    let mut replies = site_b.subscribe(inbox.clone()).await.unwrap();
    let mut mon_b = site_b.subscribe("nubis.mon.c.>").await.unwrap();
    round_trip(&site_b).await;
    await_interest(&admin_c, "nubis.mon.c.vm-1.infra.probe", &mut mon_b).await;
    site_b
        .publish_with_reply(
            "nubis.fed.a.migration.request",
            inbox.clone(),
            "call".into(),
        )
        .await
        .unwrap();
    let asked = tokio::time::timeout(DEFAULT_TIMEOUT, seen.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(asked, inbox);

    // Denied: c, as its site daemon and as its administrator, answers first with garbage.
    for client in [&site_c, &admin_c] {
        client
            .publish(inbox.clone(), "garbage from c".into())
            .await
            .unwrap();
        round_trip(client).await;
    }
    admin_c
        .publish("nubis.mon.c.vm-1.infra.cpu", "marker".into())
        .await
        .unwrap();
    assert!(until_marker(&mut mon_b, "marker").await.is_empty());
    round_trip(&site_b).await;
    let early = pending(&mut replies).await;
    assert!(early.is_none(), "b's inbox for a received {early:?}");

    // Allowed: a's reply arrives, and it is the first.
    go_tx.send(()).unwrap();
    let reply = tokio::time::timeout(DEFAULT_TIMEOUT, replies.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply.payload, "signed by a");

    // And c answers b's calls to c on b's inbox for c.
    let mut calls_c = site_c.subscribe("nubis.fed.c.>").await.unwrap();
    round_trip(&site_c).await;
    let inbox_c = format!(
        "{}.call-2",
        Subject::call_inbox_prefix(&sid("b"), &sid("c"))
    );
    let mut replies_c = site_b.subscribe(inbox_c.clone()).await.unwrap();
    round_trip(&site_b).await;
    site_b
        .publish_with_reply("nubis.fed.c.migration.request", inbox_c, "call".into())
        .await
        .unwrap();
    let call = tokio::time::timeout(DEFAULT_TIMEOUT, calls_c.next())
        .await
        .unwrap()
        .unwrap();
    site_c
        .publish(call.reply.unwrap(), "signed by c".into())
        .await
        .unwrap();
    let reply = tokio::time::timeout(DEFAULT_TIMEOUT, replies_c.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply.payload, "signed by c");
}
