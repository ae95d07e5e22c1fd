//! The expiry sweep and the per-partner limits against the fake infrastructure: an offer never
//! taken up is released once at its expiry and its route forgotten, while live and taken offers
//! stay; a partner beyond its limits is refused while this site and other partners are served.

use std::sync::Arc;

use nubis_protocol::descriptor::VmDescriptor;
use nubis_protocol::envelope::now_ms;
use nubis_protocol::message::{Endpoint, ErrorCode, InitiateTransfer, MigrationRequest, Offer};
use nubis_protocol::{MigrationId, RequestId, SiteId, VmId};

use crate::config::SiteConfig;
use crate::fakes::{endpoint, host, Answer, FakeLocal, FakePeers, TestSite};
use crate::journal::{Journal, NextHop, Route, RouteSide};
use crate::roles::Roles;

fn id(s: &str) -> SiteId {
    SiteId::new(s).unwrap()
}

/// A small descriptor of `vm` whose primary is `primary`, with its pinned keys.
fn descriptor(vm: &str, primary: &str) -> VmDescriptor {
    crate::fakes::test_descriptor(vm, primary)
}

fn request(vm: &str, primary: &str) -> MigrationRequest {
    MigrationRequest {
        request_id: RequestId::random(),
        migration_id: MigrationId::random(),
        vm: VmId::new(vm).unwrap(),
        descriptor: descriptor(vm, primary),
        depth: 0,
        max_depth: 2,
    }
}

/// Journals an offer of `vm` for `upstream` on `next`, expiring at `expires_ms`.
fn offer(j: &Journal, vm: &str, upstream: &str, next: NextHop, expires_ms: u64) -> Route {
    let r = Route {
        token: endpoint("a").token,
        migration_id: MigrationId::random(),
        vm: VmId::new(vm).unwrap(),
        side: RouteSide::Destination,
        next,
        upstream: id(upstream),
        descriptor: Some(descriptor(vm, upstream)),
        expires_ms,
        relay: None,
        destination_committed: false,
    };
    j.put_route(&r).unwrap();
    r
}

/// Roles of site `a` (partners `b`, `c`, `d`; hosts `h1`, `h2` offering) under the extra
/// `[limits]` keys `limits`, on `t`'s journal and fakes.
fn limited(t: &TestSite, limits: &str) -> Arc<Roles<FakeLocal, FakePeers>> {
    let dir = t._dir.path();
    let mut text = String::from(
        "site = \"a\"\nkey_file = \"a.key\"\nnats_url = \"nats://127.0.0.1:4222\"\ndata_dir = \"data\"\n",
    );
    for h in ["h1", "h2"] {
        text.push_str(&format!(
            "[[hosts]]\nid = \"{h}\"\nvm_root = \"/var/lib/nubis/{h}/vms\"\n"
        ));
    }
    for site in ["b", "c", "d"] {
        text.push_str(&crate::fakes::test_identity(site).public().partner_snippet());
    }
    text.push_str(&format!("[limits]\n{limits}\n"));
    let config = SiteConfig::parse(&text, &dir.join("site.toml")).unwrap();
    Arc::new(Roles::new(
        Arc::new(config),
        t.journal.clone(),
        t.peers.clone(),
        t.local.clone(),
    ))
}

fn initiate(o: &Offer, migration: MigrationId, vm: &str) -> InitiateTransfer {
    InitiateTransfer {
        migration_id: migration,
        vm: VmId::new(vm).unwrap(),
        source: endpoint("b"),
        destination: Endpoint {
            proxy: o.proxy.clone(),
            token: o.token,
        },
        max_bytes_per_sec: None,
    }
}

#[tokio::test]
async fn an_expired_untaken_offer_is_released_once_and_forgotten() {
    let t = TestSite::new(&[], &["h1"]);
    let roles = t.roles();
    let now = 1_000_000;
    let old = offer(&t.journal, "v1", "b", host("h1"), now - 1);
    let live = offer(&t.journal, "v2", "b", host("h1"), now + 1);
    let taken = offer(&t.journal, "v3", "b", host("h1"), now - 1);
    t.journal.mark_taken(&taken.token, now - 2).unwrap();

    assert_eq!(roles.sweep_expired(now).await, 1);
    assert_eq!(t.local.fake.count("abort_destination h1"), 1);
    assert_eq!(t.journal.route(&old.token).unwrap(), None);
    assert!(t.journal.route(&live.token).unwrap().is_some());
    assert!(t.journal.route(&taken.token).unwrap().is_some());

    // Idempotent: a second sweep finds nothing more to release.
    assert_eq!(roles.sweep_expired(now).await, 0);
    assert_eq!(t.local.fake.count("abort_destination h1"), 1);
    // The live offer goes at its own expiry.
    assert_eq!(roles.sweep_expired(now + 1).await, 1);
    assert_eq!(t.journal.route(&live.token).unwrap(), None);
}

#[tokio::test]
async fn a_failed_release_is_retried_by_the_next_sweep() {
    let t = TestSite::new(&[], &["h1"]);
    let roles = t.roles();
    let r = offer(&t.journal, "v1", "b", host("h1"), 5);
    t.local.fake.on_times(
        Some("h1"),
        "abort_destination",
        Answer::Refused(ErrorCode::Internal),
        1,
    );
    assert_eq!(roles.sweep_expired(10).await, 0);
    assert!(
        t.journal.route(&r.token).unwrap().is_some(),
        "kept to retry"
    );
    assert_eq!(roles.sweep_expired(10).await, 1);
    assert_eq!(t.journal.route(&r.token).unwrap(), None);
    assert_eq!(t.local.fake.count("abort_destination h1"), 2);
}

#[tokio::test]
async fn an_offer_passed_on_is_forgotten_and_a_shared_or_running_reservation_kept() {
    let t = TestSite::new(&[], &["h1"]);
    let roles = t.roles();
    // Passed on from partner c: c releases its own reservation.
    let onward = offer(&t.journal, "v1", "b", NextHop::Site(id("c")), 5);
    // Two offers of v2 on h1 share one reservation: the live one keeps it.
    let first = offer(&t.journal, "v2", "b", host("h1"), 5);
    let second = offer(&t.journal, "v2", "b", host("h1"), 50);
    // v3 runs on h1 now: its stale offer there must not destroy it.
    t.place("v3", Some(host("h1")));
    let stale = offer(&t.journal, "v3", "b", host("h1"), 5);

    assert_eq!(roles.sweep_expired(10).await, 2);
    assert_eq!(t.journal.route(&onward.token).unwrap(), None);
    assert_eq!(t.journal.route(&stale.token).unwrap(), None);
    assert!(t.journal.route(&first.token).unwrap().is_some());
    assert_eq!(t.local.fake.count("abort_destination h1"), 0);
    // Both go at the later expiry, each offer's token with it.
    assert_eq!(roles.sweep_expired(50).await, 2);
    assert_eq!(t.local.fake.count("abort_destination h1"), 2);
    assert_eq!(t.journal.route(&second.token).unwrap(), None);
}

#[tokio::test]
async fn offers_beyond_a_partners_limit_are_refused_with_quota_while_others_are_served() {
    let t = TestSite::new(&[], &["h1", "h2"]);
    let roles = limited(&t, "offers_outstanding = 3");
    // Two hosts offer: b's first request fills two of its three, the second one more (the
    // other host's reservation is given back), the third nothing.
    let first = roles.migration_request(&id("b"), request("v1", "b")).await;
    assert_eq!(first.unwrap().offers.len(), 2);
    let second = roles.migration_request(&id("b"), request("v2", "b")).await;
    assert_eq!(second.unwrap().offers.len(), 1);
    assert_eq!(t.local.fake.count("abort_destination h2"), 1);
    let third = roles.migration_request(&id("b"), request("v3", "b")).await;
    assert_eq!(third.unwrap_err().code, ErrorCode::Quota);
    // Partner c and this site itself are not limited by b's holdings.
    let c = roles.migration_request(&id("c"), request("v4", "c")).await;
    assert_eq!(c.unwrap().offers.len(), 2);
    let own = roles.migration_request(&id("a"), request("v5", "a")).await;
    assert_eq!(own.unwrap().offers.len(), 2);
}

#[tokio::test]
async fn reserved_memory_is_bounded_per_partner() {
    let t = TestSite::new(&[], &["h1"]);
    let roles = limited(&t, "reserved_memory_mib = 100");
    let first = roles.migration_request(&id("b"), request("v1", "b")).await;
    assert_eq!(first.unwrap().offers.len(), 1);
    let second = roles.migration_request(&id("b"), request("v2", "b")).await;
    assert_eq!(second.unwrap_err().code, ErrorCode::Quota);
    // Once b's offer expired and was released, b has room again.
    assert_eq!(roles.sweep_expired(u64::MAX).await, 1);
    let third = roles.migration_request(&id("b"), request("v3", "b")).await;
    assert_eq!(third.unwrap().offers.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_flood_of_migration_requests_gets_busy_beyond_the_partners_rate() {
    let t = TestSite::new(&[], &["h1"]);
    let roles = limited(&t, "requests_per_sec = 1.0\nrequest_burst = 2");
    for vm in ["v1", "v2"] {
        let r = roles.migration_request(&id("b"), request(vm, "b")).await;
        assert!(r.is_ok(), "{r:?}");
    }
    let over = roles.migration_request(&id("b"), request("v3", "b")).await;
    let e = over.unwrap_err();
    assert_eq!(e.code, ErrorCode::Busy);
    assert!(e.retryable);
    let c = roles.migration_request(&id("c"), request("v4", "c")).await;
    assert!(c.is_ok(), "{c:?}");
    let own = roles.migration_request(&id("a"), request("v5", "a")).await;
    assert!(own.is_ok(), "{own:?}");
    tokio::time::advance(std::time::Duration::from_secs(1)).await;
    let later = roles.migration_request(&id("b"), request("v6", "b")).await;
    assert!(later.is_ok(), "{later:?}");
}

#[tokio::test]
async fn transfers_are_bounded_per_partner_and_an_expired_offer_cannot_be_taken() {
    let t = TestSite::new(&[], &["h1"]);
    let roles = limited(&t, "concurrent_transfers = 1");
    let mut taken = Vec::new();
    for vm in ["v1", "v2"] {
        let req = request(vm, "b");
        let m = req.migration_id;
        let offers = roles.migration_request(&id("b"), req).await.unwrap();
        taken.push((offers.offers[0].clone(), m, vm));
    }
    let (o, m, vm) = &taken[0];
    assert!(roles.initiate(&id("b"), initiate(o, *m, vm)).await.is_ok());
    // Repeating it polls the same transfer.
    assert!(roles.initiate(&id("b"), initiate(o, *m, vm)).await.is_ok());
    let (o2, m2, vm2) = &taken[1];
    let e = roles.initiate(&id("b"), initiate(o2, *m2, vm2)).await;
    assert_eq!(e.unwrap_err().code, ErrorCode::Quota);
    // A taken offer outlives its expiry; an untaken one is released.
    assert_eq!(roles.sweep_expired(u64::MAX).await, 1);
    assert!(t.journal.route(&o.token).unwrap().is_some());
    assert_eq!(t.journal.route(&o2.token).unwrap(), None);

    // An offer past its expiry but not swept yet is refused at Initiate transfer.
    let req = request("v3", "c");
    let m3 = req.migration_id;
    let o3 = roles.migration_request(&id("c"), req).await.unwrap().offers[0].clone();
    let mut route = t.journal.route(&o3.token).unwrap().unwrap();
    route.expires_ms = now_ms() - 1;
    t.journal.put_route(&route).unwrap();
    let e = roles.initiate(&id("c"), initiate(&o3, m3, "v3")).await;
    assert_eq!(e.unwrap_err().code, ErrorCode::ExpiredToken);
}

#[tokio::test]
async fn offers_expire_at_the_configured_ttl() {
    let t = TestSite::new(&[], &["h1"]);
    let roles = limited(&t, "offer_ttl_ms = 1000");
    let before = now_ms();
    let o = roles
        .migration_request(&id("b"), request("v1", "b"))
        .await
        .unwrap()
        .offers[0]
        .clone();
    assert!(o.expires_ms <= now_ms() + 1000 && o.expires_ms >= before + 1000);
    let route = t.journal.route(&o.token).unwrap().unwrap();
    assert_eq!(route.expires_ms, o.expires_ms);
}
