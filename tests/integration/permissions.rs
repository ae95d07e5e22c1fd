//! The federation's NATS permission matrix (`nats-config/README.md`) against real servers: what
//! crosses a site's leaf connection, in which direction, and what each role inside a site may
//! do. Every denial is checked by its absence of effect, next to the allowed case beside it.
//!
//! A denied publish leaves no trace at the publisher but an asynchronous `-ERR`, so the tests
//! follow it with a marker on the same connection: messages of one publisher arrive in order,
//! so once the marker has arrived, the denied message would have arrived before it.
//! A site's `admin` user is unrestricted inside its site; it plays the site that tries
//! everything, to show that the hub, not the site's own configuration, holds the line.

use std::time::Duration;

use async_nats::jetstream;
use async_nats::{Client, Message, Subscriber};
use bytes::Bytes;
use futures::StreamExt;
use nubis_protocol::subject::DIRECTORY_BUCKET;
use nubis_testkit::{require_nats_server, Federation, Role, DEFAULT_TIMEOUT, HUB_DOMAIN};

/// How long one probe waits for its echo before publishing the next; a poll interval only.
const PROBE_POLL: Duration = Duration::from_millis(200);
/// How long a request that must fail may take to fail: denied requests are dropped without an
/// answer, so they end in a timeout unless the server knows nobody can answer.
pub(crate) const DENIED_REQUEST: Duration = Duration::from_secs(2);

/// Publishes probes on `subject` until `sub` receives one, so that the subscription's interest
/// has reached every server between `publisher` and it.
pub(crate) async fn await_interest(publisher: &Client, subject: &str, sub: &mut Subscriber) {
    let deadline = tokio::time::Instant::now() + DEFAULT_TIMEOUT;
    loop {
        publisher
            .publish(subject.to_owned(), "probe".into())
            .await
            .unwrap();
        publisher.flush().await.unwrap();
        if let Ok(Some(_)) = tokio::time::timeout(PROBE_POLL, sub.next()).await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no interest in {subject} after {DEFAULT_TIMEOUT:?}"
        );
    }
}

/// Everything `sub` receives until a message with `marker` as payload (which is not included),
/// skipping left-over probes.
pub(crate) async fn until_marker(sub: &mut Subscriber, marker: &str) -> Vec<Message> {
    let mut seen = Vec::new();
    tokio::time::timeout(DEFAULT_TIMEOUT, async {
        while let Some(msg) = sub.next().await {
            if msg.payload == marker.as_bytes() {
                return;
            }
            if msg.payload != "probe".as_bytes() {
                seen.push(msg);
            }
        }
        panic!("subscription ended before the marker {marker:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("marker {marker:?} never arrived"));
    seen
}

/// A round trip to the server: once a message sent to the client's own inbox has come back,
/// the server has processed everything the client sent before it, and the client has received
/// everything the server sent it before. (`Client::flush` only empties the socket buffer.)
pub(crate) async fn round_trip(client: &Client) {
    let inbox = client.new_inbox();
    let mut echo = client.subscribe(inbox.clone()).await.unwrap();
    client.publish(inbox, "echo".into()).await.unwrap();
    tokio::time::timeout(DEFAULT_TIMEOUT, echo.next())
        .await
        .expect("no echo from the server")
        .expect("echo subscription ended");
}

/// A message `sub` has received already, if any. A subscription the server refused has ended,
/// and counts as having received nothing.
pub(crate) async fn pending(sub: &mut Subscriber) -> Option<Message> {
    tokio::time::timeout(Duration::ZERO, sub.next())
        .await
        .ok()
        .flatten()
}

/// Sends a request that must not be answered; returns whether it failed (it must).
pub(crate) async fn request_fails(client: &Client, subject: &str) -> bool {
    match tokio::time::timeout(
        DENIED_REQUEST,
        client.request(subject.to_owned(), "{}".into()),
    )
    .await
    {
        Err(_) | Ok(Err(_)) => true,
        Ok(Ok(answer)) => {
            eprintln!("unexpected answer on {subject}: {:?}", answer.payload);
            false
        }
    }
}

/// Answers every request on `subject` with `answer`, counting them.
async fn responder(
    client: &Client,
    subject: &str,
    answer: &'static str,
) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let mut sub = client.subscribe(subject.to_owned()).await.unwrap();
    round_trip(client).await;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let client = client.clone();
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let _ = tx.send(msg.subject.to_string());
            if let Some(reply) = msg.reply {
                let _ = client.publish(reply, answer.into()).await;
            }
        }
    });
    rx
}

#[tokio::test]
async fn a_request_reaches_the_site_it_is_addressed_to_and_no_other() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let fed = Federation::start_with(&binary, &["a", "b", "c"])
        .await
        .unwrap();
    let site_a = fed.connect_as("a", Role::Site).await.unwrap();
    let site_c = fed.connect_as("c", Role::Site).await.unwrap();
    let admin_b = fed.connect_as("b", Role::Admin).await.unwrap();
    let mut answered = responder(&site_a, "nubis.fed.a.>", "offer from a").await;

    // B's administrator, unrestricted inside B, asks for A's requests, and for every request;
    // the hub must deliver neither. B's own requests arrive, and serve as markers.
    let mut eavesdrop = admin_b.subscribe("nubis.fed.a.>").await.unwrap();
    let mut everything = admin_b.subscribe("nubis.fed.>").await.unwrap();
    let mut own = admin_b.subscribe("nubis.fed.b.>").await.unwrap();
    round_trip(&admin_b).await;
    await_interest(&site_c, "nubis.fed.b.probe", &mut own).await;

    // Allowed: C's request addressed to A is answered by A.
    let answer = tokio::time::timeout(
        DEFAULT_TIMEOUT,
        site_c.request("nubis.fed.a.migration.request", "signed request".into()),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(answer.payload, "offer from a");
    assert_eq!(
        answered.recv().await.unwrap(),
        "nubis.fed.a.migration.request"
    );

    // Denied: B saw none of it, although it saw the marker C sent to B right after.
    site_c
        .publish("nubis.fed.b.marker", "marker".into())
        .await
        .unwrap();
    assert!(until_marker(&mut own, "marker").await.is_empty());
    let leaked = pending(&mut eavesdrop).await;
    assert!(leaked.is_none(), "nubis.fed.a.> at b received {leaked:?}");
    while let Some(msg) = pending(&mut everything).await {
        assert!(
            msg.subject.starts_with("nubis.fed.b."),
            "nubis.fed.> at b received {}",
            msg.subject
        );
    }

    // B's own site daemon user may not even ask for A's requests.
    let site_b = fed.connect_as("b", Role::Site).await.unwrap();
    let mut events = site_b.subscribe("nubis.fed.a.>").await.unwrap();
    let mut own = site_b.subscribe("nubis.fed.b.>").await.unwrap();
    round_trip(&site_b).await;
    await_interest(&site_c, "nubis.fed.b.probe", &mut own).await;
    site_c
        .publish("nubis.fed.a.migration.request", "second".into())
        .await
        .unwrap();
    site_c
        .publish("nubis.fed.b.marker", "marker".into())
        .await
        .unwrap();
    assert_eq!(
        answered.recv().await.unwrap(),
        "nubis.fed.a.migration.request"
    );
    assert!(until_marker(&mut own, "marker").await.is_empty());
    let leaked = pending(&mut events).await;
    assert!(leaked.is_none(), "b's site daemon received {leaked:?}");
}

#[tokio::test]
async fn a_site_writes_only_its_own_directory_entry_and_reads_every_entry() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let fed = Federation::start_with(&binary, &["a", "b", "c"])
        .await
        .unwrap();
    let mut js_a = jetstream::with_domain(fed.connect("a").await.unwrap(), HUB_DOMAIN);
    let mut js_b = jetstream::with_domain(fed.connect("b").await.unwrap(), HUB_DOMAIN);
    let mut js_b_admin =
        jetstream::with_domain(fed.connect_as("b", Role::Admin).await.unwrap(), HUB_DOMAIN);
    for js in [&mut js_a, &mut js_b, &mut js_b_admin] {
        js.set_timeout(DENIED_REQUEST);
    }

    // The hub's operator created the bucket when the hub started; sites only open it.
    let kv_a = nubis_site::directory::open_bucket(&js_a).await.unwrap();
    kv_a.put("site.a", Bytes::from_static(b"entry of a"))
        .await
        .unwrap();
    let kv_b = nubis_site::directory::open_bucket(&js_b).await.unwrap();
    let mut watch_b = kv_b.watch_with_history("site.*").await.unwrap();

    // Allowed: b writes, creates and updates its own entry; a reads it.
    let rev = kv_b
        .put("site.b", Bytes::from_static(b"entry of b"))
        .await
        .unwrap();
    kv_b.update("site.b", Bytes::from_static(b"entry of b, 2"), rev)
        .await
        .unwrap();
    assert_eq!(kv_a.get("site.b").await.unwrap().unwrap(), "entry of b, 2");

    // Denied: b cannot put, create or delete a's entry, or anyone else's, not even as its
    // administrator, nor by publishing on the stream's own subject.
    assert!(kv_b
        .put("site.a", Bytes::from_static(b"forged by b"))
        .await
        .is_err());
    assert!(kv_b
        .create("site.c", Bytes::from_static(b"forged by b"))
        .await
        .is_err());
    assert!(kv_b.delete("site.a").await.is_err());
    let kv_b_admin = js_b_admin.get_key_value(DIRECTORY_BUCKET).await.unwrap();
    assert!(kv_b_admin
        .put("site.a", Bytes::from_static(b"forged by b's admin"))
        .await
        .is_err());
    let admin_b = fed.connect_as("b", Role::Admin).await.unwrap();
    admin_b
        .publish(
            format!("$KV.{DIRECTORY_BUCKET}.site.a"),
            "raw forgery".into(),
        )
        .await
        .unwrap();
    admin_b
        .publish(
            format!("$JS.{HUB_DOMAIN}.API.$KV.{DIRECTORY_BUCKET}.site.a"),
            "forgery".into(),
        )
        .await
        .unwrap();
    // Nor purge or delete the bucket, nor list what the hub holds.
    let stream = js_b_admin
        .get_stream_no_info(format!("KV_{DIRECTORY_BUCKET}"))
        .await
        .unwrap();
    assert!(stream.purge().await.is_err());
    assert!(js_b_admin
        .delete_stream(format!("KV_{DIRECTORY_BUCKET}"))
        .await
        .is_err());
    assert!(js_b_admin.delete_key_value(DIRECTORY_BUCKET).await.is_err());
    assert!(js_b_admin
        .stream_names()
        .next()
        .await
        .unwrap_or(Ok(String::new()))
        .is_err());
    // The admin's last write comes after its forgeries on the same connection, so once it is
    // stored they would have been too.
    kv_b_admin
        .put("site.b", Bytes::from_static(b"entry of b, 3"))
        .await
        .unwrap();

    let js_c = jetstream::with_domain(fed.connect("c").await.unwrap(), HUB_DOMAIN);
    let kv_c = js_c.get_key_value(DIRECTORY_BUCKET).await.unwrap();
    let entry_a = kv_c.entry("site.a").await.unwrap().unwrap();
    assert_eq!(entry_a.value, "entry of a");
    assert_eq!(entry_a.revision, 1, "a's entry was rewritten");
    assert!(kv_c.get("site.c").await.unwrap().is_none());
    assert_eq!(kv_c.get("site.b").await.unwrap().unwrap(), "entry of b, 3");

    // b's watch sees every site's entry, its own and a's, and nothing forged.
    let mut watched: Vec<(String, Bytes)> = Vec::new();
    let last = Bytes::from_static(b"entry of b, 3");
    let complete = tokio::time::timeout(DEFAULT_TIMEOUT, async {
        while watched.last().map(|(_, v)| v) != Some(&last) {
            let entry = watch_b.next().await.unwrap().unwrap();
            watched.push((entry.key, entry.value));
        }
    })
    .await;
    assert!(complete.is_ok(), "b's watch stopped at {watched:?}");
    assert_eq!(
        watched[0],
        ("site.a".to_owned(), Bytes::from_static(b"entry of a"))
    );
    assert!(watched
        .iter()
        .all(|(_, v)| !v.starts_with(b"forged") && !v.ends_with(b"forgery")));
    let mut keys: Vec<String> = kv_c
        .keys()
        .await
        .unwrap()
        .map(Result::unwrap)
        .collect()
        .await;
    keys.sort();
    assert_eq!(keys, ["site.a", "site.b"]);
}

#[tokio::test]
async fn only_a_site_own_operators_call_its_operator_api() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let mut fed = Federation::start_with(&binary, &["a", "b"]).await.unwrap();
    let site_a = fed.connect_as("a", Role::Site).await.unwrap();
    let mut calls = responder(&site_a, "nubis.ops.a.>", r#"{"site":"a"}"#).await;
    let mut pings = responder(&site_a, "$SRV.PING", r#"{"name":"nubis-site"}"#).await;

    // Allowed: A's operator calls A's operator API and discovers A's micro service.
    let operator_a = fed.connect_as("a", Role::Operator).await.unwrap();
    let answer = operator_a
        .request("nubis.ops.a.status", "{}".into())
        .await
        .unwrap();
    assert_eq!(answer.payload, r#"{"site":"a"}"#);
    assert_eq!(calls.recv().await.unwrap(), "nubis.ops.a.status");
    let answer = operator_a.request("$SRV.PING", "".into()).await.unwrap();
    assert_eq!(answer.payload, r#"{"name":"nubis-site"}"#);
    assert_eq!(pings.recv().await.unwrap(), "$SRV.PING");

    // Denied: B's operator, site daemon and administrator, and A's own host agents and site
    // daemon, get no answer from A's operator API and do not reach A's micro service.
    for (site, role) in [
        ("b", Role::Operator),
        ("b", Role::Site),
        ("b", Role::Admin),
        ("a", Role::Site),
    ] {
        let client = fed.connect_as(site, role).await.unwrap();
        assert!(
            request_fails(&client, "nubis.ops.a.status").await,
            "{role} of {site} called a's ops"
        );
        if site == "b" {
            assert!(
                request_fails(&client, "$SRV.PING").await,
                "{role} of b pinged a's service"
            );
        }
    }
    let host_a = fed.connect_as_host("a", "h1").await.unwrap();
    assert!(
        request_fails(&host_a, "nubis.ops.a.status").await,
        "a host agent of a called a's ops"
    );
    // A's responder saw only the allowed call (its first request arrived and was counted
    // above; a denied one would have queued behind it).
    operator_a
        .request("nubis.ops.a.status", "{}".into())
        .await
        .unwrap();
    assert_eq!(calls.recv().await.unwrap(), "nubis.ops.a.status");
    assert!(
        calls.try_recv().is_err(),
        "a's operator API was called by someone else"
    );
    assert!(
        pings.try_recv().is_err(),
        "a's micro service was pinged by someone else"
    );
}

#[tokio::test]
async fn host_agents_and_site_internal_traffic_stay_inside_their_site() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let mut fed = Federation::start_with(&binary, &["a", "b"]).await.unwrap();
    let host_a = fed.connect_as_host("a", "h1").await.unwrap();
    let site_a = fed.connect_as("a", Role::Site).await.unwrap();
    let admin_a = fed.connect_as("a", Role::Admin).await.unwrap();
    let admin_b = fed.connect_as("b", Role::Admin).await.unwrap();

    // B's administrator listens to everything: site-internal traffic of any site, A's
    // requests, and monitoring (which does cross, and so serves as the marker).
    let mut internal_b = admin_b.subscribe("nubis.site.>").await.unwrap();
    let mut fed_b = admin_b.subscribe("nubis.fed.>").await.unwrap();
    let mut mon_b = admin_b.subscribe("nubis.mon.>").await.unwrap();
    round_trip(&admin_b).await;
    await_interest(&site_a, "nubis.mon.a.vm-1.infra.probe", &mut mon_b).await;
    let mut internal_a = site_a.subscribe("nubis.site.a.>").await.unwrap();
    round_trip(&site_a).await;

    // Allowed: A's host reports to its site; A's site hears it.
    host_a
        .publish("nubis.site.a.host.h1.capacity.report", "capacity".into())
        .await
        .unwrap();
    // Denied: the host sends federation requests to B, or publishes another site's internals.
    host_a
        .publish("nubis.fed.b.migration.request", "from a host".into())
        .await
        .unwrap();
    host_a
        .publish("nubis.site.b.host.h1.capacity.report", "into b".into())
        .await
        .unwrap();
    // Denied: monitoring events straight from a host (hosts hand batches to their site, which
    // signs them).
    host_a
        .publish("nubis.mon.a.vm-1.infra.cpu", "from a host".into())
        .await
        .unwrap();
    round_trip(&host_a).await;
    // The site's monitoring event crosses to B; it is the marker for the above.
    site_a
        .publish("nubis.mon.a.vm-1.infra.cpu", "marker".into())
        .await
        .unwrap();
    round_trip(&site_a).await;

    let capacity = tokio::time::timeout(DEFAULT_TIMEOUT, internal_a.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        capacity.subject.as_str(),
        "nubis.site.a.host.h1.capacity.report"
    );
    assert!(until_marker(&mut mon_b, "marker").await.is_empty());
    round_trip(&admin_b).await;
    for sub in [&mut internal_b, &mut fed_b] {
        let leaked = pending(sub).await;
        assert!(leaked.is_none(), "b received {leaked:?}");
    }

    // The other way: B's administrator commands A's hosts; A's server never hears of it.
    let mut internal_a_admin = admin_a.subscribe("nubis.site.>").await.unwrap();
    let mut mon_a = admin_a.subscribe("nubis.mon.>").await.unwrap();
    round_trip(&admin_a).await;
    await_interest(&admin_b, "nubis.mon.b.vm-2.infra.probe", &mut mon_a).await;
    admin_b
        .publish("nubis.site.a.host.h1.start", "from b".into())
        .await
        .unwrap();
    admin_b
        .publish("nubis.mon.b.vm-2.infra.cpu", "marker".into())
        .await
        .unwrap();
    round_trip(&admin_b).await;
    assert!(until_marker(&mut mon_a, "marker").await.is_empty());
    round_trip(&admin_a).await;
    let leaked = pending(&mut internal_a_admin).await;
    assert!(leaked.is_none(), "a received {leaked:?}");
    round_trip(&site_a).await;
    // (The host's round trips to its own inbox are site-internal too; they are not leaks.)
    while let Some(leaked) = pending(&mut internal_a).await {
        assert!(
            leaked.subject.starts_with("nubis.site.a.host.h1.inbox."),
            "a's site daemon received {leaked:?}"
        );
    }

    // A host agent cannot call its own site's operator API, nor use JetStream.
    assert!(request_fails(&host_a, "nubis.ops.a.status").await);
    let mut js = jetstream::new(host_a.clone());
    js.set_timeout(DENIED_REQUEST);
    assert!(js.query_account().await.is_err());
}

#[tokio::test]
async fn every_server_wants_credentials_of_its_own() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let mut fed = Federation::start_with(&binary, &["a", "b"]).await.unwrap();
    let host_a = fed.host_credentials("a", "h1").await.unwrap();
    let host_b = fed.host_credentials("b", "h1").await.unwrap();
    let url_a = fed.site_url("a").unwrap();
    let connect = |user: Option<(String, String)>| {
        let url = url_a.clone();
        async move {
            let options = match user {
                Some((user, password)) => {
                    async_nats::ConnectOptions::with_user_and_password(user, password)
                }
                None => async_nats::ConnectOptions::new(),
            };
            options.connect(url).await.map(|_| ())
        }
    };
    // Allowed: every role of a with a's passwords.
    for role in Role::ALL {
        connect(Some(fed.credentials("a", role).unwrap()))
            .await
            .unwrap();
    }
    connect(Some(host_a)).await.unwrap();
    // Denied: no credentials, and b's passwords at a (a host of the same name included).
    assert!(connect(None).await.is_err());
    assert!(connect(Some(host_b)).await.is_err(), "host h1 of b at a");
    for role in Role::ALL {
        assert!(
            connect(Some(fed.credentials("b", role).unwrap()))
                .await
                .is_err(),
            "{role} of b at a"
        );
    }
    assert!(fed.credentials("hub", Role::Site).is_err());
    let hub = async_nats::connect(fed.hub_url()).await;
    assert!(
        hub.is_err(),
        "the hub accepted a client without credentials"
    );
    fed.connect("hub").await.unwrap();
}

#[tokio::test]
async fn each_host_agent_reaches_only_its_own_subjects() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let mut fed = Federation::start_with(&binary, &["a"]).await.unwrap();
    let h1 = fed.connect_as_host("a", "h1").await.unwrap();
    let h2 = fed.connect_as_host("a", "h2").await.unwrap();
    let site = fed.connect_site_internal("a").await.unwrap();
    let admin = fed.connect_as("a", Role::Admin).await.unwrap();

    // h1 listens wherever it may try: another host's requests, the site daemon's inbox, the
    // default inbox, all site-internal traffic, the intake. Denied subscriptions hear nothing.
    let mut eavesdrops = Vec::new();
    for subject in [
        "nubis.site.a.host.h2.>",
        "nubis.site.a.inbox.>",
        "_INBOX.>",
        "nubis.site.a.>",
        "nubis.site.a.intake.*",
    ] {
        eavesdrops.push((subject, h1.subscribe(subject).await.unwrap()));
    }
    round_trip(&h1).await;

    // Allowed: the site daemon asks each host on its own subject and gets that host's answer
    // (a host may answer the request it received, on the requester's inbox).
    let mut h1_calls = responder(&h1, "nubis.site.a.host.h1.capacity", "h1 here").await;
    let mut h2_calls = responder(&h2, "nubis.site.a.host.h2.capacity", "h2 here").await;
    for (host, answer) in [("h1", "h1 here"), ("h2", "h2 here")] {
        let reply = site
            .request(format!("nubis.site.a.host.{host}.capacity"), "?".into())
            .await
            .unwrap();
        assert_eq!(reply.payload, answer);
    }
    assert_eq!(
        h1_calls.recv().await.unwrap(),
        "nubis.site.a.host.h1.capacity"
    );
    assert_eq!(
        h2_calls.recv().await.unwrap(),
        "nubis.site.a.host.h2.capacity"
    );

    // h1 sends on its own intake (allowed) and on h2's, into the site daemon's inbox and to h2's
    // request subject (denied): the site hears only h1's own.
    let mut heard = admin.subscribe("nubis.site.a.>").await.unwrap();
    round_trip(&admin).await;
    for subject in [
        "nubis.site.a.intake.h2",
        "nubis.site.a.inbox.forged",
        "nubis.site.a.host.h2.capacity",
        "nubis.site.a.intake.h1",
    ] {
        h1.publish(subject, subject.into()).await.unwrap();
    }
    round_trip(&h1).await;
    round_trip(&admin).await;
    let mut subjects = Vec::new();
    while let Some(msg) = pending(&mut heard).await {
        // h1's round trips to its own inbox are its own business.
        if !msg.subject.starts_with("nubis.site.a.host.h1.inbox.") {
            subjects.push(msg.subject.to_string());
        }
    }
    assert_eq!(subjects, ["nubis.site.a.intake.h1"]);
    assert!(h2_calls.try_recv().is_err(), "h1 called h2");

    round_trip(&h1).await;
    for (subject, sub) in &mut eavesdrops {
        let leaked = pending(sub).await;
        assert!(leaked.is_none(), "h1 heard {leaked:?} on {subject}");
    }
}

/// Whether a JetStream call through another site's domain failed (it must).
pub(crate) fn refused<T: std::fmt::Debug, E>(what: &str, result: Result<T, E>) {
    if let Ok(answer) = result {
        panic!("{what} was allowed: {answer:?}");
    }
}

#[tokio::test]
async fn a_partner_reads_only_the_transfer_bucket_of_another_site_and_administers_nothing() {
    use async_nats::jetstream::consumer::push::OrderedConfig;
    use async_nats::jetstream::{object_store, stream};
    use nubis_protocol::message::{Endpoint, TransferStatus};
    use nubis_protocol::subject::ACCOUNTING_STREAM;
    use nubis_protocol::MigrationId;
    use nubis_proxy::naming::{BUCKET as TRANSFER_BUCKET, STREAM as TRANSFER_STREAM};
    use nubis_site::images::UPLOAD_BUCKET;

    use crate::proxy::{
        fetch_req, final_status, mint_receive, mint_serve, settings, sha256_file, start_proxy,
        write_dense, Keys,
    };

    let Some(binary) = require_nats_server() else {
        return;
    };
    let fed = Federation::start_with(&binary, &["a", "b"]).await.unwrap();
    let keys = Keys::new(&["a", "b"]);
    let tmp = tempfile::tempdir().unwrap();
    let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&dst).unwrap();

    // What site a keeps in its own domain besides its transfer bucket (which its proxy
    // creates): the accounting stream, the image-upload bucket and a key-value bucket.
    let pa = start_proxy(&fed, &keys, "a", "p1", &tmp.path().join("pa"), settings()).await;
    let pb = start_proxy(&fed, &keys, "b", "p1", &tmp.path().join("pb"), settings()).await;
    let site_a = fed.connect("a").await.unwrap();
    let js_a = jetstream::new(site_a.clone());
    let accounting = js_a
        .create_stream(stream::Config {
            name: ACCOUNTING_STREAM.to_owned(),
            subjects: vec!["nubis.acct.a.>".to_owned()],
            ..Default::default()
        })
        .await
        .unwrap();
    js_a.publish("nubis.acct.a.vm-1.usage", "record".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let uploads = js_a
        .create_object_store(object_store::Config {
            bucket: UPLOAD_BUCKET.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap();
    uploads
        .put("base.qcow2", &mut &b"an uploaded image"[..])
        .await
        .unwrap();
    let journal = js_a
        .create_key_value(async_nats::jetstream::kv::Config {
            bucket: "nubis-journal".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap();
    journal.put("vm-1", "committed".into()).await.unwrap();
    // And at the hub, a stream other than the directory.
    let js_hub = jetstream::new(fed.connect(nubis_testkit::HUB).await.unwrap());
    js_hub
        .create_stream(stream::Config {
            name: "HUB_PRIVATE".to_owned(),
            subjects: vec!["hub.private.>".to_owned()],
            ..Default::default()
        })
        .await
        .unwrap();
    js_hub
        .publish("hub.private.x", "hub only".into())
        .await
        .unwrap()
        .await
        .unwrap();

    // Allowed: b's proxy fetches a VM's file from a's transfer bucket, verified.
    let file = src.join("disk.raw");
    write_dense(&file, 3 * 1024 * 1024 + 17, 9);
    let mig = MigrationId::random();
    let served = pa
        .mint(mint_serve(&[("disk-vda.raw", &file)], mig))
        .await
        .unwrap();
    let received = pb.mint(mint_receive(&dst, mig)).await.unwrap();
    let source = Endpoint {
        proxy: served.proxy.clone(),
        token: served.token,
    };
    let cb = keys.client("b", fed.connect("b").await.unwrap());
    cb.fetch(pb.uri(), &fetch_req(mig, source, received.token))
        .await
        .unwrap();
    let status = final_status(&cb, pb.uri(), mig, received.token).await;
    assert!(
        matches!(status, TransferStatus::Succeeded { .. }),
        "{status:?}"
    );
    assert_eq!(sha256_file(&dst.join("disk-vda.raw")), sha256_file(&file));
    let xfer_a = js_a.get_stream(TRANSFER_STREAM).await.unwrap();
    let xfer_messages = xfer_a.cached_info().state.messages;
    assert!(xfer_messages > 0);

    // Denied, to b's administrator (unrestricted inside b, so the hub holds the line).
    let admin_b = fed.connect_as("b", Role::Admin).await.unwrap();
    let mut via_a = jetstream::with_domain(admin_b.clone(), "a");
    via_a.set_timeout(DENIED_REQUEST);

    // Listing streams or buckets, and account information.
    refused(
        "listing streams",
        via_a
            .stream_names()
            .next()
            .await
            .unwrap_or(Ok(String::new())),
    );
    refused(
        "listing stream infos",
        via_a
            .streams()
            .next()
            .await
            .map(|r| r.map(|i| i.config.name))
            .unwrap_or(Ok(String::new())),
    );
    // Listing buckets is listing the streams behind them: a `STREAM.NAMES` request with a
    // subject filter, refused like the unfiltered one.
    refused(
        "listing object stores",
        via_a
            .request::<_, _, serde_json::Value>(
                "STREAM.NAMES",
                &serde_json::json!({ "subject": "$O.>" }),
            )
            .await,
    );
    refused(
        "account information",
        via_a.query_account().await.map(|_| ()),
    );

    // Creating, updating, purging or deleting streams, the transfer bucket's included.
    refused(
        "creating a stream",
        via_a
            .create_stream(stream::Config {
                name: "FORGED".to_owned(),
                subjects: vec!["forged.>".to_owned()],
                ..Default::default()
            })
            .await
            .map(|_| ()),
    );
    let xfer_via_a = via_a.get_stream(TRANSFER_STREAM).await.unwrap();
    let mut bigger = xfer_via_a.cached_info().config.clone();
    bigger.max_bytes *= 2;
    refused(
        "updating the transfer stream",
        via_a.update_stream(bigger).await.map(|_| ()),
    );
    refused(
        "purging the transfer stream",
        xfer_via_a.purge().await.map(|_| ()),
    );
    refused(
        "deleting a transfer chunk",
        xfer_via_a.delete_message(1).await,
    );
    refused(
        "deleting the transfer stream",
        via_a.delete_stream(TRANSFER_STREAM).await.map(|_| ()),
    );
    refused(
        "deleting the accounting stream",
        via_a.delete_stream(ACCOUNTING_STREAM).await.map(|_| ()),
    );

    // Reading any other stream or bucket: info, stored and direct gets, consumers.
    for name in [
        ACCOUNTING_STREAM.to_owned(),
        format!("OBJ_{UPLOAD_BUCKET}"),
        "KV_nubis-journal".to_owned(),
    ] {
        refused(
            &format!("info of {name}"),
            via_a.get_stream(&name).await.map(|_| ()),
        );
        let other = via_a.get_stream_no_info(&name).await.unwrap();
        refused(
            &format!("stored get from {name}"),
            other.get_raw_message(1).await.map(|_| ()),
        );
        refused(
            &format!("direct get from {name}"),
            other.direct_get(1).await.map(|_| ()),
        );
        refused(
            &format!("a consumer on {name}"),
            other
                .create_consumer(OrderedConfig {
                    deliver_subject: admin_b.new_inbox(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
        );
    }
    refused(
        "the image-upload bucket",
        via_a.get_object_store(UPLOAD_BUCKET).await.map(|_| ()),
    );
    refused(
        "the journal bucket",
        via_a.get_key_value("nubis-journal").await.map(|_| ()),
    );
    let mut via_hub = jetstream::with_domain(admin_b.clone(), HUB_DOMAIN);
    via_hub.set_timeout(DENIED_REQUEST);
    refused(
        "info of a hub stream",
        via_hub.get_stream("HUB_PRIVATE").await.map(|_| ()),
    );
    refused(
        "stored get from a hub stream",
        via_hub
            .get_stream_no_info("HUB_PRIVATE")
            .await
            .unwrap()
            .get_raw_message(1)
            .await
            .map(|_| ()),
    );

    // Writing into a's buckets and streams on their own subjects. Monitoring crosses, and its
    // event from the same publisher serves as the marker for everything before it.
    let mut mon_a = site_a.subscribe("nubis.mon.b.>").await.unwrap();
    round_trip(&site_a).await;
    await_interest(&admin_b, "nubis.mon.b.vm-2.infra.probe", &mut mon_a).await;
    for subject in [
        format!("$O.{TRANSFER_BUCKET}.C.forged"),
        format!("$O.{UPLOAD_BUCKET}.C.forged"),
        "$KV.nubis-journal.vm-1".to_owned(),
        "nubis.acct.a.vm-1.usage".to_owned(),
        "$JS.a.API.$KV.nubis-journal.vm-1".to_owned(),
    ] {
        admin_b
            .publish(subject, "forged by b".into())
            .await
            .unwrap();
    }
    admin_b
        .publish("nubis.mon.b.vm-2.infra.cpu", "marker".into())
        .await
        .unwrap();
    assert!(until_marker(&mut mon_a, "marker").await.is_empty());
    let count = |name: &'static str| {
        let js = js_a.clone();
        async move {
            js.get_stream(name)
                .await
                .unwrap()
                .cached_info()
                .state
                .messages
        }
    };
    assert_eq!(count(TRANSFER_STREAM).await, xfer_messages);
    assert_eq!(count(ACCOUNTING_STREAM).await, 1);
    assert_eq!(journal.get("vm-1").await.unwrap().unwrap(), "committed");
    let mut stored = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(
        &mut uploads.get("base.qcow2").await.unwrap(),
        &mut stored,
    )
    .await
    .unwrap();
    assert_eq!(stored, b"an uploaded image");
    assert_eq!(accounting.cached_info().config.name, ACCOUNTING_STREAM);
}
