//! Relaying by policy against fakes: a relaying site passes only its own proxy and tokens
//! upstream, mints one relaying token per transfer, answers Transfer verification for a
//! relayed source itself, and goes on downstream under the partner's own token. Each case has
//! the direct site's behaviour beside it.

use std::sync::Arc;

use nubis_protocol::descriptor::VmDescriptor;
use nubis_protocol::message::{
    CommitMigration, ErrorCode, HandOverSide, InitiateTransfer, MigrationRequest, Offer,
    PrepareMigration, PrepareMode, TransferVerification,
};
use nubis_protocol::{MigrationId, RequestId, SiteId, VmId};

use crate::config::SiteConfig;
use crate::fakes::{endpoint, proxy, site, test_identity, Answer, FakeLocal, FakePeers, TestSite};
use crate::journal::{VmPhase, VmRecord};
use crate::roles::Roles;

fn id(s: &str) -> SiteId {
    SiteId::new(s).unwrap()
}

/// A small descriptor of `vm` whose primary is `primary`, with its pinned keys.
fn descriptor(vm: &str, primary: &str) -> VmDescriptor {
    crate::fakes::test_descriptor(vm, primary)
}

/// Roles of `t`'s site `a` whose transfers towards `b` follow `mode` (and towards the others
/// the default, direct), on `t`'s journal and fakes.
fn with_mode(t: &TestSite, mode: &str) -> Arc<Roles<FakeLocal, FakePeers>> {
    let mut text = String::from(
        "site = \"a\"\nkey_file = \"a.key\"\nnats_url = \"nats://127.0.0.1:4222\"\ndata_dir = \"data\"\n",
    );
    for s in ["b", "c", "d"] {
        text.push_str(&test_identity(s).public().partner_snippet());
        if s == "b" {
            text.push_str(&format!("transfer = \"{mode}\"\n"));
        }
    }
    let config = SiteConfig::parse(&text, &t._dir.path().join("site.toml")).unwrap();
    Arc::new(Roles::new(
        Arc::new(config),
        t.journal.clone(),
        t.peers.clone(),
        t.local.clone(),
    ))
}

/// `b`'s Migration request for its VM `vm`; `c` offers.
async fn offer_from_c(roles: &Roles<FakeLocal, FakePeers>, vm: &str) -> (MigrationId, Offer) {
    let req = MigrationRequest {
        request_id: RequestId::random(),
        migration_id: MigrationId::random(),
        vm: VmId::new(vm).unwrap(),
        descriptor: descriptor(vm, "b"),
        depth: 0,
        max_depth: 3,
    };
    let offers = roles
        .migration_request(&id("b"), req.clone())
        .await
        .unwrap();
    assert_eq!(offers.offers.len(), 1, "{offers:?}");
    (req.migration_id, offers.offers[0].clone())
}

#[tokio::test(start_paused = true)]
async fn a_relayed_offer_names_only_this_site_and_is_initiated_downstream_under_the_partners_token()
{
    // Direct: the partner's offer goes up as it is.
    let t = TestSite::new(&["c"], &[]);
    let (_, offer) = offer_from_c(&with_mode(&t, "direct"), "vm-1").await;
    assert_eq!(offer.proxy, proxy("c"));
    assert!(t
        .journal
        .route(&offer.token)
        .unwrap()
        .unwrap()
        .relay
        .is_none());

    // Relay: this site's proxy and a token of its own; the partner's stays in the route.
    let t = TestSite::new(&["c"], &[]);
    let roles = with_mode(&t, "relay");
    let (migration, offer) = offer_from_c(&roles, "vm-1").await;
    assert_eq!(offer.proxy, proxy("a"));
    let route = t.journal.route(&offer.token).unwrap().unwrap();
    let relay = route.relay.clone().unwrap();
    assert_eq!(relay.downstream.proxy, proxy("c"));
    assert_ne!(relay.downstream.token, offer.token);
    assert!(relay.relaying.is_none());

    // Initiate transfer mints one relaying token, however often it is repeated.
    let source = endpoint("b");
    let initiate = |source: nubis_protocol::message::Endpoint| InitiateTransfer {
        migration_id: migration,
        vm: VmId::new("vm-1").unwrap(),
        source,
        destination: nubis_protocol::message::Endpoint {
            proxy: offer.proxy.clone(),
            token: offer.token,
        },
        max_bytes_per_sec: None,
    };
    t.peers.fake.clear_calls();
    for _ in 0..2 {
        roles
            .initiate(&id("b"), initiate(source.clone()))
            .await
            .unwrap();
    }
    assert_eq!(t.local.fake.count("relay -"), 1);
    assert_eq!(t.peers.fake.count("transfer.initiate c"), 2);
    let relaying = t
        .journal
        .route(&offer.token)
        .unwrap()
        .unwrap()
        .relay
        .unwrap();
    let relaying = relaying.relaying.unwrap();
    assert_eq!(relaying.source, source);
    // Another source on the same offer is someone else using it.
    let e = roles
        .initiate(&id("b"), initiate(endpoint("d")))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::TokenUsed);

    // The commit goes on downstream and releases the relaying token here.
    t.local.fake.clear_calls();
    let commit = CommitMigration {
        migration_id: migration,
        vm: VmId::new("vm-1").unwrap(),
        side: HandOverSide::Destination,
        endpoint: nubis_protocol::message::Endpoint {
            proxy: offer.proxy.clone(),
            token: offer.token,
        },
    };
    roles.commit(&id("b"), commit).await.unwrap();
    assert_eq!(t.peers.fake.count("migration.commit c"), 1);
    assert_eq!(t.local.fake.calls(), vec!["commit_source -"]);
    assert!(t.journal.route(&offer.token).unwrap().is_none());
    let record = t.journal.vm(&VmId::new("vm-1").unwrap()).unwrap().unwrap();
    assert_eq!(record.downstream, Some(site("c")));
}

/// Journals `vm` of primary `b`, delegated here by `b` and running at partner `c`.
fn held_for_b_at_c(t: &TestSite, vm: &str) {
    t.journal
        .put_vm(&VmRecord {
            vm: VmId::new(vm).unwrap(),
            primary: id("b"),
            upstream: Some(id("b")),
            downstream: Some(site("c")),
            former_downstream: None,
            descriptor: descriptor(vm, "b"),
            phase: VmPhase::Placed,
        })
        .unwrap();
}

fn prepare(vm: &str) -> PrepareMigration {
    PrepareMigration {
        migration_id: MigrationId::random(),
        vm: VmId::new(vm).unwrap(),
        mode: PrepareMode::SaveState,
        max_bytes_per_sec: None,
    }
}

#[tokio::test(start_paused = true)]
async fn a_relayed_source_is_served_and_verified_here() {
    // Direct: the partner's source goes up as it is, and verification is forwarded.
    let t = TestSite::new(&[], &[]);
    held_for_b_at_c(&t, "vm-1");
    let roles = with_mode(&t, "direct");
    let p = roles.prepare(&id("b"), prepare("vm-1")).await.unwrap();
    assert_eq!(p.source.proxy, proxy("c"));

    // Relay: this site's relaying token goes up; verification is answered by its proxy.
    let t = TestSite::new(&[], &[]);
    held_for_b_at_c(&t, "vm-1");
    let roles = with_mode(&t, "relay");
    let req = prepare("vm-1");
    let p = roles.prepare(&id("b"), req.clone()).await.unwrap();
    assert_eq!(p.source.proxy, proxy("a"));
    assert_eq!(t.local.fake.count("relay -"), 1);
    let route = t.journal.route(&p.source.token).unwrap().unwrap();
    assert_eq!(route.relay.unwrap().downstream.proxy, proxy("c"));
    let verify = TransferVerification {
        migration_id: req.migration_id,
        vm: req.vm.clone(),
        source: p.source.clone(),
    };
    roles.verify(&id("b"), verify).await.unwrap();
    assert_eq!(t.local.fake.count("verify -"), 1);
    assert_eq!(t.peers.fake.count("transfer.verify c"), 0);
}

#[tokio::test(start_paused = true)]
async fn a_source_that_cannot_be_relayed_is_resumed_not_passed_up() {
    let t = TestSite::new(&[], &[]);
    held_for_b_at_c(&t, "vm-1");
    t.local
        .fake
        .on(None, "relay", Answer::Refused(ErrorCode::Refused));
    let e = with_mode(&t, "relay")
        .prepare(&id("b"), prepare("vm-1"))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Refused);
    assert_eq!(t.peers.fake.count("migration.abort c"), 1);
    assert!(t.journal.routes().unwrap().is_empty());
}

/// A move between two places beyond this site (both chains pass through the same partner):
/// the source commit keeps the record the destination commit re-pointed. Without that
/// destination commit here, the source commit lets go of the VM.
#[tokio::test(start_paused = true)]
async fn a_move_beyond_the_same_partner_keeps_the_record_here() {
    for (mode, moved_here) in [("relay", true), ("direct", true), ("direct", false)] {
        let t = TestSite::new(&[], &[]);
        held_for_b_at_c(&t, "vm-1");
        let roles = with_mode(&t, mode);
        let req = prepare("vm-1");
        let p = roles.prepare(&id("b"), req.clone()).await.unwrap();
        if moved_here {
            let offer = endpoint("c");
            t.journal
                .put_route(&crate::journal::Route {
                    token: offer.token,
                    migration_id: req.migration_id,
                    vm: req.vm.clone(),
                    side: crate::journal::RouteSide::Destination,
                    next: site("c"),
                    upstream: id("b"),
                    descriptor: Some(descriptor("vm-1", "b")),
                    expires_ms: u64::MAX,
                    relay: None,
                    destination_committed: false,
                })
                .unwrap();
            let commit = CommitMigration {
                migration_id: req.migration_id,
                vm: req.vm.clone(),
                side: HandOverSide::Destination,
                endpoint: offer,
            };
            roles.commit(&id("b"), commit).await.unwrap();
        }
        let commit = CommitMigration {
            migration_id: req.migration_id,
            vm: req.vm.clone(),
            side: HandOverSide::Source,
            endpoint: p.source,
        };
        roles.commit(&id("b"), commit).await.unwrap();
        let record = t.journal.vm(&req.vm).unwrap();
        assert_eq!(record.is_some(), moved_here, "{mode}");
        if let Some(r) = record {
            assert_eq!(r.downstream, Some(site("c")));
        }
        assert!(t.journal.routes().unwrap().is_empty(), "{mode}");
    }
}
