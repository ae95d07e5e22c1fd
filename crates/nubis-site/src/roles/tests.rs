//! The roles' authorization against a fake site infrastructure and federation: a token acts
//! only for the site its route was opened for, on the route's migration and VM; a request about
//! a VM this site holds is heard only from the VM's upstream (or, for eviction notices, its
//! downstream); a Migration request's claims are checked against the journal. Every refusal
//! has the rightful party's success beside it.
//!
//! Site `a` is the site under test; partner `b` plays the competitor, partner `c` the site a
//! victim VM was delegated by.

use nubis_protocol::descriptor::VmDescriptor;
use nubis_protocol::message::{
    AbortMigration, CommitMigration, ControlChange, ControlRequest, Endpoint, ErrorCode,
    EvictionNotice, HandOverSide, InitiateTransfer, MigrationRequest, NoticeId, PrepareMigration,
    PrepareMode, TransferVerification,
};
use nubis_protocol::{MigrationId, RequestId, SiteId, VmId};

use crate::fakes::{endpoint, host, site, TestSite};
use crate::journal::{NextHop, Route, RouteSide, VmPhase, VmRecord};

fn id(s: &str) -> SiteId {
    SiteId::new(s).unwrap()
}

fn vm(s: &str) -> VmId {
    VmId::new(s).unwrap()
}

/// A small descriptor of `vm` whose primary is `primary`, with its pinned keys.
fn descriptor(vm: &str, primary: &str) -> VmDescriptor {
    crate::fakes::test_descriptor(vm, primary)
}

/// Journals `vm` of primary `primary`, delegated here by `upstream` and running at `downstream`.
fn hold(t: &TestSite, vm_id: &str, primary: &str, upstream: &str, downstream: NextHop) -> VmRecord {
    let record = VmRecord {
        vm: vm(vm_id),
        primary: id(primary),
        upstream: Some(id(upstream)),
        downstream: Some(downstream),
        former_downstream: None,
        descriptor: descriptor(vm_id, primary),
        phase: VmPhase::Placed,
    };
    t.journal.put_vm(&record).unwrap();
    record
}

/// Journals a route of `side` for `vm` in a fresh migration, opened for `upstream`, leading to
/// `next`; returns it.
fn route(t: &TestSite, side: RouteSide, vm_id: &str, upstream: &str, next: NextHop) -> Route {
    let r = Route {
        token: endpoint("a").token,
        migration_id: MigrationId::random(),
        vm: vm(vm_id),
        side,
        next,
        upstream: id(upstream),
        descriptor: Some(descriptor(vm_id, upstream)),
        expires_ms: u64::MAX,
        relay: None,
        destination_committed: false,
    };
    t.journal.put_route(&r).unwrap();
    r
}

fn at(r: &Route) -> Endpoint {
    Endpoint {
        proxy: endpoint("a").proxy,
        token: r.token,
    }
}

fn abort(r: &Route, vm_id: &str, side: HandOverSide) -> AbortMigration {
    AbortMigration {
        migration_id: r.migration_id,
        vm: vm(vm_id),
        side,
        endpoint: at(r),
        reason: "test".into(),
    }
}

fn commit(r: &Route, vm_id: &str, side: HandOverSide) -> CommitMigration {
    CommitMigration {
        migration_id: r.migration_id,
        vm: vm(vm_id),
        side,
        endpoint: at(r),
    }
}

fn request(vm_id: &str, d: VmDescriptor) -> MigrationRequest {
    MigrationRequest {
        request_id: RequestId::random(),
        migration_id: MigrationId::random(),
        vm: vm(vm_id),
        descriptor: d,
        depth: 0,
        max_depth: 2,
    }
}

#[tokio::test(start_paused = true)]
async fn a_token_aborts_and_commits_only_its_own_vm_for_the_site_it_was_offered_to() {
    let t = TestSite::new(&[], &["h1"]);
    let roles = t.roles();
    let victim = hold(&t, "victim", "c", "c", host("h1"));
    let offer = route(&t, RouteSide::Destination, "mine", "b", host("h1"));
    let b = id("b");

    // The offer's holder naming another VM: refused before any host is touched.
    let e = roles
        .abort(&b, abort(&offer, "victim", HandOverSide::Destination))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::TokenMismatch);
    let e = roles
        .commit(&b, commit(&offer, "victim", HandOverSide::Destination))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::TokenMismatch);
    // Or another migration.
    let mut other = abort(&offer, "mine", HandOverSide::Destination);
    other.migration_id = MigrationId::random();
    let e = roles.abort(&b, other).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::TokenMismatch);
    // A site the offer was not made to, with the leaked token.
    let e = roles
        .abort(&id("c"), abort(&offer, "mine", HandOverSide::Destination))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Refused);
    let e = roles
        .commit(&id("c"), commit(&offer, "mine", HandOverSide::Destination))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Refused);
    assert!(
        t.local.fake.calls().is_empty(),
        "{:?}",
        t.local.fake.calls()
    );
    assert_eq!(t.journal.vm(&vm("victim")).unwrap(), Some(victim.clone()));
    assert!(t.journal.route(&offer.token).unwrap().is_some());

    // The rightful party's abort of its own offer.
    roles
        .abort(&b, abort(&offer, "mine", HandOverSide::Destination))
        .await
        .unwrap();
    assert_eq!(t.local.fake.calls(), vec!["abort_destination h1"]);
    assert!(t.journal.route(&offer.token).unwrap().is_none());

    // And its commit of another offer, which makes it the VM's upstream here.
    t.local.fake.clear_calls();
    let offer = route(&t, RouteSide::Destination, "mine", "b", host("h1"));
    roles
        .commit(&b, commit(&offer, "mine", HandOverSide::Destination))
        .await
        .unwrap();
    assert_eq!(t.local.fake.calls(), vec!["commit_destination h1"]);
    let mine = t.journal.vm(&vm("mine")).unwrap().unwrap();
    assert_eq!(mine.upstream, Some(b));
    assert_eq!(t.journal.vm(&vm("victim")).unwrap(), Some(victim));
}

#[tokio::test(start_paused = true)]
async fn a_source_token_is_used_only_by_the_site_that_asked_for_the_prepare() {
    let t = TestSite::new(&[], &["h1"]);
    let roles = t.roles();
    hold(&t, "vm-1", "c", "c", host("h1"));
    let source = route(&t, RouteSide::Source, "vm-1", "c", host("h1"));
    let verify = |vm_id: &str| TransferVerification {
        migration_id: source.migration_id,
        vm: vm(vm_id),
        source: at(&source),
    };
    let e = roles.verify(&id("b"), verify("vm-1")).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::Refused);
    let e = roles.verify(&id("c"), verify("vm-2")).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::TokenMismatch);
    let e = roles
        .abort(&id("b"), abort(&source, "vm-1", HandOverSide::Source))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Refused);
    let e = roles
        .commit(&id("b"), commit(&source, "vm-1", HandOverSide::Source))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Refused);
    assert!(
        t.local.fake.calls().is_empty(),
        "{:?}",
        t.local.fake.calls()
    );
    roles.verify(&id("c"), verify("vm-1")).await.unwrap();
    assert_eq!(t.local.fake.calls(), vec!["verify -"]);
}

#[tokio::test(start_paused = true)]
async fn an_initiate_transfer_acts_only_for_the_offer_it_names() {
    let t = TestSite::new(&[], &["h1"]);
    let roles = t.roles();
    let offer = route(&t, RouteSide::Destination, "mine", "b", host("h1"));
    let initiate = |vm_id: &str| InitiateTransfer {
        migration_id: offer.migration_id,
        vm: vm(vm_id),
        source: endpoint("b"),
        destination: at(&offer),
        max_bytes_per_sec: None,
    };
    let e = roles
        .initiate(&id("c"), initiate("mine"))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Refused);
    let e = roles
        .initiate(&id("b"), initiate("other"))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::TokenMismatch);
    assert!(t.local.fake.calls().is_empty());
    roles.initiate(&id("b"), initiate("mine")).await.unwrap();
    assert_eq!(t.local.fake.calls(), vec!["initiate -"]);
}

#[tokio::test(start_paused = true)]
async fn an_offer_for_a_vm_id_held_here_since_never_takes_it_over() {
    let t = TestSite::new(&[], &["h1", "h2"]);
    let roles = t.roles();
    // `b` got an offer for `x` before `c` placed its own `x` here.
    let offer = route(&t, RouteSide::Destination, "x", "b", host("h2"));
    let held = hold(&t, "x", "c", "c", host("h1"));
    let e = roles
        .commit(&id("b"), commit(&offer, "x", HandOverSide::Destination))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Conflict);
    assert!(t.local.fake.calls().is_empty());
    assert_eq!(t.journal.vm(&vm("x")).unwrap(), Some(held.clone()));

    // An offer made on the host the VM runs on is never discarded there.
    let on_h1 = route(&t, RouteSide::Destination, "x", "b", host("h1"));
    let e = roles
        .abort(&id("b"), abort(&on_h1, "x", HandOverSide::Destination))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Conflict);
    assert!(t.local.fake.calls().is_empty());

    // The VM's upstream moving it to another host of this site commits.
    let mut moving = route(&t, RouteSide::Destination, "x", "c", host("h2"));
    moving.descriptor = Some(held.descriptor.clone());
    t.journal.put_route(&moving).unwrap();
    roles
        .commit(&id("c"), commit(&moving, "x", HandOverSide::Destination))
        .await
        .unwrap();
    let now = t.journal.vm(&vm("x")).unwrap().unwrap();
    assert_eq!(now.downstream, Some(host("h2")));
    assert_eq!(now.upstream, Some(id("c")));
}

#[tokio::test(start_paused = true)]
async fn a_migration_request_is_checked_against_what_the_site_knows() {
    let t = TestSite::new(&[], &["h1", "h2"]);
    let roles = t.roles();
    let (b, c) = (id("b"), id("c"));
    // A partner naming this site as the primary of a VM it never deployed.
    let e = roles
        .migration_request(&b, request("forged", descriptor("forged", "a")))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Refused);
    // Nor of one it did: only this site migrates its own VMs.
    let own = t.place("own", Some(host("h1")));
    let d = t.journal.vm(&own).unwrap().unwrap().descriptor;
    let e = roles
        .migration_request(&b, request("own", d.clone()))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Conflict);
    let me = id("a");
    let offers = roles
        .migration_request(&me, request("own", d))
        .await
        .unwrap();
    assert_eq!(offers.offers.len(), 1, "the other host");

    // A VM held here for `c`: a competitor's request for its id, in its own name or in `c`'s.
    let held = hold(&t, "victim", "c", "c", host("h1"));
    for d in [descriptor("victim", "b"), descriptor("victim", "c")] {
        let e = roles
            .migration_request(&b, request("victim", d))
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Conflict);
    }
    // Its upstream, naming another primary.
    let e = roles
        .migration_request(&c, request("victim", descriptor("victim", "b")))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Conflict);
    assert_eq!(t.journal.vm(&vm("victim")).unwrap(), Some(held.clone()));
    // Its upstream moving it: an offer on the other host.
    let offers = roles
        .migration_request(&c, request("victim", held.descriptor.clone()))
        .await
        .unwrap();
    assert_eq!(offers.offers.len(), 1);
    let r = t.journal.route(&offers.offers[0].token).unwrap().unwrap();
    assert_eq!(r.next, host("h2"));
    // A new VM of a partner.
    let offers = roles
        .migration_request(&b, request("new", descriptor("new", "b")))
        .await
        .unwrap();
    assert_eq!(offers.offers.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn prepare_control_and_eviction_are_heard_only_along_the_chain() {
    let t = TestSite::new(&[], &["h1"]);
    let roles = t.roles();
    let (b, c) = (id("b"), id("c"));
    hold(&t, "victim", "c", "c", host("h1"));
    let prepare = || PrepareMigration {
        migration_id: MigrationId::random(),
        vm: vm("victim"),
        mode: PrepareMode::SaveState,
        max_bytes_per_sec: None,
    };
    let e = roles.prepare(&b, prepare()).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::Refused);
    assert!(t.local.fake.calls().is_empty());
    roles.prepare(&c, prepare()).await.unwrap();
    assert_eq!(t.local.fake.calls(), vec!["prepare_source h1"]);
    t.local.fake.clear_calls();

    let control = |change| ControlRequest {
        vm: vm("victim"),
        change,
    };
    let e = roles
        .control(&b, control(ControlChange::Query))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Refused);
    // The upstream may change the VM, not what identifies it.
    for (d, code) in [
        (descriptor("victim", "b"), ErrorCode::Conflict),
        (descriptor("other", "c"), ErrorCode::Malformed),
    ] {
        let change = ControlChange::UpdateDescriptor {
            descriptor: Box::new(d),
        };
        let e = roles.control(&c, control(change)).await.unwrap_err();
        assert_eq!(e.code, code);
    }
    assert!(
        t.local.fake.calls().is_empty(),
        "{:?}",
        t.local.fake.calls()
    );
    // The upstream's query reaches the host (whose fake has no Control interface to answer).
    roles
        .control(&c, control(ControlChange::Query))
        .await
        .unwrap_err();
    assert_eq!(t.local.fake.calls(), vec!["control h1"]);

    // Eviction notices come from the downstream only: here `a` delegated `far` to `b`.
    hold(&t, "far", "c", "c", site("b"));
    let notice = |vm_id: &str| EvictionNotice {
        notice_id: NoticeId::random(),
        vm: vm(vm_id),
        reason: "maintenance".into(),
        deadline_ms: u64::MAX,
    };
    let e = roles.eviction(&c, notice("far")).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::Refused);
    let e = roles.eviction(&b, notice("victim")).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::Refused);
    assert!(t.journal.evictions().unwrap().is_empty());
    roles.eviction(&b, notice("far")).await.unwrap();
    assert_eq!(t.journal.evictions().unwrap().len(), 1);
}

/// A directory that knows one site's published keys.
#[derive(Debug)]
struct OneEntry(SiteId, nubis_protocol::descriptor::PrimaryKeys);

impl super::KeyBook for OneEntry {
    fn published_keys(&self, site: &SiteId) -> Option<nubis_protocol::descriptor::PrimaryKeys> {
        (*site == self.0).then_some(self.1)
    }
}

#[tokio::test]
async fn a_new_vm_is_taken_in_only_under_its_primarys_own_keys() {
    let t = TestSite::new(&[], &["h1"]);
    let roles = t.roles();
    let b = id("b");
    // A partner puts its own sealing key in the descriptor of a VM whose primary is `c`: it
    // would read what is sealed for `c`. Refused, as is a substituted signing key.
    let mut sealed_for_b = descriptor("v1", "c");
    sealed_for_b.primary_keys.sealing = crate::fakes::test_keys("b").sealing;
    let mut signed_by_b = descriptor("v1", "c");
    signed_by_b.primary_keys.signing = crate::fakes::test_keys("b").signing;
    for d in [sealed_for_b, signed_by_b] {
        let e = roles
            .migration_request(&b, request("v1", d))
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Refused, "{e:?}");
    }
    // Under `c`'s pinned keys, the VM is offered a place.
    let offers = roles
        .migration_request(&b, request("v1", descriptor("v1", "c")))
        .await
        .unwrap();
    assert_eq!(offers.offers.len(), 1);

    // A primary that is no partner: unknown keys cannot be checked; the directory's can.
    let stranger = descriptor("v2", "x");
    let e = roles
        .migration_request(&b, request("v2", stranger.clone()))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Refused);
    let with_directory = std::sync::Arc::new(
        super::Roles::new(
            t.config.clone(),
            t.journal.clone(),
            t.peers.clone(),
            t.local.clone(),
        )
        .with_key_book(std::sync::Arc::new(OneEntry(
            id("x"),
            stranger.primary_keys,
        ))),
    );
    let mut wrong = stranger.clone();
    wrong.primary_keys.sealing = [9; 32];
    let e = with_directory
        .migration_request(&b, request("v2", wrong))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Refused);
    let offers = with_directory
        .migration_request(&b, request("v2", stranger))
        .await
        .unwrap();
    assert_eq!(offers.offers.len(), 1);
}

#[tokio::test]
async fn an_operator_eviction_beyond_the_upstreams_bound_is_busy() {
    let t = TestSite::new(&[], &["h1"]);
    let limits = crate::journal::JournalLimits {
        evictions_per_partner: 1,
        ..t.journal.limits()
    };
    let roles = std::sync::Arc::new(super::Roles::new(
        t.config.clone(),
        t.journal.clone().with_limits(limits),
        t.peers.clone(),
        t.local.clone(),
    ));
    hold(&t, "v1", "c", "c", host("h1"));
    hold(&t, "v2", "c", "c", host("h1"));
    let first = roles.evict(&vm("v1")).unwrap();
    assert_eq!(first.sent_to, Some(id("c")));
    // The second notice to `c` would go beyond its bound: try again later, nothing journaled.
    let e = roles.evict(&vm("v2")).unwrap_err();
    assert_eq!(e.code, ErrorCode::Busy, "{e:?}");
    assert_eq!(t.journal.outgoing().unwrap().len(), 1);
}
