//! A site far away: its leaf connection to the hub goes through the test kit's userspace WAN
//! link (delay, cut, restore), with TLS passing through it end to end.

use std::sync::Arc;
use std::time::Duration;

use nubis_bus::serve::{sign_reply, Limits, Service};
use nubis_bus::{CallPolicy, SignedClient, Target};
use nubis_protocol::envelope::Verifier;
use nubis_protocol::identity::SiteIdentity;
use nubis_protocol::message::{HostId, HostVms, ListVms};
use nubis_protocol::replay::ReplayCache;
use nubis_protocol::subject::{FederationOp, ParsedSubject, Subject};
use nubis_protocol::SiteId;
use nubis_testkit::{require_nats_server, wait_until, Federation, LinkSpec, DEFAULT_TIMEOUT};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

fn site(s: &str) -> SiteId {
    SiteId::new(s).unwrap()
}

/// What `own` verifies with: `other` pinned.
fn verifier(own: &SiteIdentity, other: &SiteIdentity) -> Arc<Verifier> {
    Arc::new(Verifier::new(
        own.site().clone(),
        [(other.site().clone(), other.signing_key().verifying_key())],
        ReplayCache::temporary(600_000).unwrap(),
    ))
}

/// A signed request of `a` to `b` over the federation.
async fn ask(client: &SignedClient) -> Result<HostVms, nubis_bus::CallError> {
    let b = site("b");
    let subject = Subject::federation(&b, FederationOp::MigrationRequest);
    let target = Target {
        subject: &subject,
        signer: &b,
        op: "test",
    };
    client.call(target, &ListVms {}).await
}

/// `Ok` once the hub lists exactly `sites` as leaf connections.
async fn leaves(fed: &Federation, sites: &[&str]) -> Result<(), String> {
    match fed.leaf_connections().await {
        Ok(now) if now == sites => Ok(()),
        Ok(now) => Err(format!("the hub lists {now:?}")),
        Err(e) => Err(e.to_string()),
    }
}

#[tokio::test]
async fn a_site_behind_a_slow_link_answers_and_a_cut_link_drops_it_until_restored() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let delay = Duration::from_millis(25);
    let fed = Federation::start_with_links(&binary, &["a", "b"], |s| {
        (s == "b").then(|| LinkSpec::delay(delay))
    })
    .await
    .unwrap();
    let link = fed.link("b").expect("b's leaf connection has a link");
    assert!(fed.link("a").is_none());
    assert_eq!(fed.leaf_connections().await.unwrap(), ["a", "b"]);

    // Site b serves signed requests on its own server, a asks on its own.
    let (a, b) = (
        Arc::new(SiteIdentity::generate(site("a"))),
        Arc::new(SiteIdentity::generate(site("b"))),
    );
    let nats_b = fed.connect("b").await.unwrap();
    let subscription = nats_b.subscribe("nubis.fed.b.>").await.unwrap();
    nats_b.flush().await.unwrap();
    let (tracker, cancel) = (TaskTracker::new(), CancellationToken::new());
    let service = Service {
        name: "wan-test",
        identity: b.clone(),
        verifier: verifier(&b, &a),
        limits: Limits::new(4),
    };
    let parse = |subject: &str| match Subject::parse(subject) {
        Ok(ParsedSubject::Federation { op, .. }) => Some(op),
        _ => None,
    };
    let signer = b.clone();
    nubis_bus::serve::serve(
        service,
        nats_b.clone(),
        subscription,
        &tracker,
        cancel.clone(),
        parse,
        move |_op, opened| {
            let signer = signer.clone();
            async move {
                let reply = HostVms {
                    host: HostId::new(opened.from.as_str()).unwrap(),
                    vms: Vec::new(),
                };
                Ok(sign_reply(&signer, &opened, &reply).unwrap())
            }
        },
    );
    let client = SignedClient::new(
        fed.connect("a").await.unwrap(),
        a.clone(),
        verifier(&a, &b),
        CallPolicy::with_timeout(Duration::from_secs(10))
            .with_no_responder_wait(Duration::from_millis(500)),
    );
    // The subscription of b reaches the hub over the slow link: wait until a's request finds
    // it, then every request crosses the link twice.
    wait_until(DEFAULT_TIMEOUT, "b answering over the link", || {
        ask(&client)
    })
    .await
    .unwrap();
    let reply = ask(&client).await.unwrap();
    assert_eq!(reply.host.as_str(), "a");

    // Cut: the hub loses b.
    link.cut();
    wait_until(DEFAULT_TIMEOUT, "the hub losing b", || leaves(&fed, &["a"]))
        .await
        .unwrap();
    assert!(ask(&client).await.is_err(), "b is out of reach");

    // Restored: b reconnects by itself and answers again.
    link.restore();
    wait_until(DEFAULT_TIMEOUT, "b back at the hub", || {
        leaves(&fed, &["a", "b"])
    })
    .await
    .unwrap();
    wait_until(DEFAULT_TIMEOUT, "b answering again", || ask(&client))
        .await
        .unwrap();
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
}
