//! The signed client and the serve loop against a real nats-server: replies count only from the
//! site asked, and one sender flooding a service neither takes every slot nor queues without
//! bound, while the others are served.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use nubis_bus::serve::{sign_reply, Limits, Service};
use nubis_bus::{CallError, CallPolicy, SignedClient, Target};
use nubis_protocol::envelope::Verifier;
use nubis_protocol::identity::SiteIdentity;
use nubis_protocol::message::{ErrorCode, HostId, HostVms, ListVms};
use nubis_protocol::replay::ReplayCache;
use nubis_protocol::subject::{FederationOp, ParsedSubject, Subject};
use nubis_protocol::SiteId;
use nubis_testkit::{require_nats_server, Federation, Role};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

fn site(s: &str) -> SiteId {
    SiteId::new(s).unwrap()
}

/// Site `a` serving, and two partners `b` (the flooder) and `c`.
struct Sites {
    a: Arc<SiteIdentity>,
    b: Arc<SiteIdentity>,
    c: Arc<SiteIdentity>,
}

impl Sites {
    fn new() -> Self {
        Self {
            a: Arc::new(SiteIdentity::generate(site("a"))),
            b: Arc::new(SiteIdentity::generate(site("b"))),
            c: Arc::new(SiteIdentity::generate(site("c"))),
        }
    }

    /// What `own` verifies with: every other site pinned.
    fn verifier(&self, own: &Arc<SiteIdentity>) -> Arc<Verifier> {
        let partners = [&self.a, &self.b, &self.c]
            .into_iter()
            .filter(|i| i.site() != own.site())
            .map(|i| (i.site().clone(), i.signing_key().verifying_key()));
        Arc::new(Verifier::new(
            own.site().clone(),
            partners,
            ReplayCache::temporary(600_000).unwrap(),
        ))
    }

    fn client(&self, nats: &async_nats::Client, own: &Arc<SiteIdentity>) -> SignedClient {
        SignedClient::new(
            nats.clone(),
            own.clone(),
            self.verifier(own),
            CallPolicy::with_timeout(Duration::from_secs(20)),
        )
    }
}

/// Serves `nubis.fed.a.>` signing as `signer`, answering `HostVms` once `gate` gives a permit
/// (for requests of `b`; others are answered at once).
async fn serve(
    sites: &Sites,
    nats: &async_nats::Client,
    signer: Arc<SiteIdentity>,
    limits: Limits,
    gate: Arc<Semaphore>,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) {
    let subscription = nats.subscribe("nubis.fed.a.>").await.unwrap();
    nats.flush().await.unwrap();
    let service = Service {
        name: "test",
        identity: signer.clone(),
        verifier: sites.verifier(&sites.a),
        limits,
    };
    let parse = |subject: &str| match Subject::parse(subject) {
        Ok(ParsedSubject::Federation { op, .. }) => Some(op),
        _ => None,
    };
    nubis_bus::serve::serve(
        service,
        nats.clone(),
        subscription,
        tracker,
        cancel,
        parse,
        move |_op, opened| {
            let (gate, signer) = (gate.clone(), signer.clone());
            async move {
                if opened.from.as_str() == "b" {
                    let _permit = gate.acquire().await;
                }
                let reply = HostVms {
                    host: HostId::new(opened.from.as_str()).unwrap(),
                    vms: Vec::new(),
                };
                Ok(sign_reply(&signer, &opened, &reply).unwrap())
            }
        },
    );
}

async fn ask(client: &SignedClient) -> Result<HostVms, CallError> {
    let a = site("a");
    let subject = Subject::federation(&a, FederationOp::MigrationRequest);
    let target = Target {
        subject: &subject,
        signer: &a,
        op: "test",
    };
    client.call(target, &ListVms {}).await
}

#[tokio::test]
async fn a_reply_counts_only_when_the_site_asked_signed_it() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let fed = Federation::start_with(&binary, &["a"]).await.unwrap();
    let nats = fed.connect_as("a", Role::Admin).await.unwrap();
    let sites = Sites::new();
    let (tracker, cancel) = (TaskTracker::new(), CancellationToken::new());
    let open = Arc::new(Semaphore::new(1000));

    // A responder that signs as c, a pinned partner, but not the site asked: refused.
    serve(
        &sites,
        &nats,
        sites.c.clone(),
        Limits::new(4),
        open.clone(),
        &tracker,
        cancel.clone(),
    )
    .await;
    let b = sites.client(&nats, &sites.b);
    match ask(&b).await {
        Err(CallError::BadReply { site, .. }) => assert_eq!(site.as_str(), "a"),
        other => panic!("a reply signed by c was accepted for a: {other:?}"),
    }
    cancel.cancel();
    tracker.close();
    tracker.wait().await;

    // The legitimate counterpart: signed by a, accepted.
    let (tracker, cancel) = (TaskTracker::new(), CancellationToken::new());
    serve(
        &sites,
        &nats,
        sites.a.clone(),
        Limits::new(4),
        open,
        &tracker,
        cancel.clone(),
    )
    .await;
    let reply = ask(&b).await.unwrap();
    assert_eq!(reply.host.as_str(), "b");
    cancel.cancel();
}

#[tokio::test]
async fn a_flooding_partner_slows_only_itself() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let fed = Federation::start_with(&binary, &["a"]).await.unwrap();
    let nats = fed.connect_as("a", Role::Admin).await.unwrap();
    let sites = Sites::new();
    let (tracker, cancel) = (TaskTracker::new(), CancellationToken::new());
    // b's handlers block until the test opens the gate.
    let gate = Arc::new(Semaphore::new(0));
    let limits = Limits {
        concurrency: 2,
        per_sender: 1,
        queue_per_sender: 2,
    };
    serve(
        &sites,
        &nats,
        sites.a.clone(),
        limits,
        gate.clone(),
        &tracker,
        cancel.clone(),
    )
    .await;

    // b sends five requests: one runs (and blocks), two wait, two are refused as busy. The two
    // refusals are the first answers, and they come only once all five were admitted.
    let b = sites.client(&nats, &sites.b);
    let mut flood = tokio::task::JoinSet::new();
    for _ in 0..5 {
        let b = b.clone();
        flood.spawn(async move { ask(&b).await });
    }
    for _ in 0..2 {
        let refused = flood.join_next().await.unwrap().unwrap();
        match refused {
            Err(e) => assert_eq!(e.code(), Some(&ErrorCode::Busy), "{e}"),
            Ok(reply) => panic!("b was answered while its handler was blocked: {reply:?}"),
        }
    }
    // c is served at once although b's handler holds a slot and b has requests waiting.
    let c = sites.client(&nats, &sites.c);
    assert_eq!(ask(&c).await.unwrap().host.as_str(), "c");
    // Once b's handlers run, its three admitted requests are all answered.
    gate.add_permits(100);
    let mut served = 0;
    while let Some(call) = flood.join_next().await {
        assert_eq!(call.unwrap().unwrap().host.as_str(), "b");
        served += 1;
    }
    assert_eq!(served, 3);
    cancel.cancel();
}
