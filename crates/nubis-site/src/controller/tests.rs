//! The Controller's state machine driven against a fake site infrastructure and a fake
//! federation, under paused time: every phase against every answer of the peer it talks to
//! in that phase, and a crash in every phase followed by recovery on the same journal.
//!
//! Site `a` controls; the VM runs at partner `b` (the Source); partners `c` and `d` offer to
//! take it, `c` ranked first.

use std::sync::Arc;

use tokio::time::Instant;

use nubis_protocol::message::ErrorCode;
use nubis_protocol::{MigrationId, SiteId, VmId};

use super::Trigger;
use crate::fakes::{host, site, Answer, FakeLocal, FakePeers, TestSite};
use crate::journal::{MigrationPhase, MigrationRecord, NextHop, VmPhase};
use crate::roles::Roles;

const REQUEST: &str = "migration.request";
const PREPARE: &str = "migration.prepare";
const INITIATE: &str = "transfer.initiate";
const COMMIT: &str = "migration.commit";
const ABORT: &str = "migration.abort";
const VERIFY: &str = "transfer.verify";

/// What a peer can answer besides success.
fn failures() -> [Answer; 3] {
    [
        Answer::Refused(ErrorCode::Refused),
        Answer::Timeout,
        Answer::Unreachable,
    ]
}

fn anywhere() -> Trigger {
    Trigger::Operator { to_site: None }
}

fn vm_1() -> VmId {
    VmId::new("vm-1").unwrap()
}

/// A site whose VM `vm-1` runs at `b`, with offers from `c` and `d`.
fn star() -> TestSite {
    let t = TestSite::new(&["c", "d"], &[]);
    t.place("vm-1", Some(site("b")));
    t
}

/// Runs a migration of `vm-1` to its end at a fresh Controller; returns its journal and
/// whether the Controller reported it committed.
async fn migrate(t: &TestSite, trigger: Trigger) -> (MigrationRecord, bool) {
    let roles = t.roles();
    let id = roles.queue_migration(&vm_1(), &trigger, None).unwrap();
    let committed = roles.run_migration(id, trigger).await.is_ok();
    (t.journal.migration(&id).unwrap().unwrap(), committed)
}

/// Starts a migration and drops its Controller (as a crash would) once a fake hangs.
async fn crash(t: &TestSite) -> MigrationId {
    let roles = t.roles();
    let id = roles.queue_migration(&vm_1(), &anywhere(), None).unwrap();
    tokio::select! {
        r = roles.run_migration(id, anywhere()) => panic!("the migration ended before the crash: {r:?}"),
        () = t.peers.fake.hung() => {}
        () = t.local.fake.hung() => {}
    }
    id
}

/// After a crash: healthy peers, a new Controller on the same journal, recovery of `id` to
/// its end. Only the calls of this second life are logged afterwards.
async fn recover(t: &TestSite, id: MigrationId) -> MigrationRecord {
    for fake in [&t.peers.fake, &t.local.fake] {
        fake.heal();
        fake.clear_calls();
    }
    let roles: Arc<Roles<FakeLocal, FakePeers>> = t.roles();
    // The outcome is asserted on the journal.
    roles.resume(id).await.ok();
    t.journal.migration(&id).unwrap().unwrap()
}

fn aborted(m: &MigrationRecord) -> &str {
    match &m.phase {
        MigrationPhase::Aborted { reason } => reason,
        other => panic!("expected an aborted migration, found {other:?}"),
    }
}

/// Asserts where `vm-1` is, as this site's journal says.
fn assert_vm(t: &TestSite, next: NextHop, phase: VmPhase) {
    let r = t.journal.vm(&vm_1()).unwrap().unwrap();
    assert_eq!(r.downstream, Some(next));
    assert_eq!(r.phase, phase);
}

fn assert_committed_at(t: &TestSite, m: &MigrationRecord, at: &str, offer: usize) {
    assert_eq!(m.phase, MigrationPhase::Committed, "{m:?}");
    assert_eq!(m.offers[offer].via, site(at));
    assert_vm(t, site(at), VmPhase::Placed);
    assert_eq!(
        t.peers.fake.count("migration.commit b"),
        1,
        "the source is released once"
    );
}

#[tokio::test(start_paused = true)]
async fn a_migration_commits_at_the_best_offer_and_releases_the_others() {
    let t = star();
    let (m, committed) = migrate(&t, anywhere()).await;
    assert!(committed);
    assert_committed_at(&t, &m, "c", 0);
    assert_eq!(m.offers.len(), 2);
    assert_eq!(m.source_via, Some(site("b")));
    assert_eq!(m.released, vec![1]);
    assert_eq!(m.failed_rounds, 0);
    let calls = t.peers.fake.calls();
    for call in [
        "migration.request b",
        "migration.request c",
        "migration.request d",
        "migration.prepare b",
        "transfer.initiate c",
        "transfer.verify b",
        "migration.commit c",
        "migration.abort d",
    ] {
        assert!(calls.iter().any(|c| c == call), "no {call} in {calls:?}");
    }
    assert_eq!(
        t.peers.fake.count("migration.abort b"),
        0,
        "the source is never resumed"
    );
}

#[tokio::test(start_paused = true)]
async fn queued_and_cancelled_it_ends_aborted_without_a_request() {
    let t = star();
    let roles = t.roles();
    let id = roles.queue_migration(&vm_1(), &anywhere(), None).unwrap();
    assert_eq!(roles.cancel_migration(&id).unwrap(), MigrationPhase::Queued);
    assert!(roles.run_migration(id, anywhere()).await.is_err());
    let m = t.journal.migration(&id).unwrap().unwrap();
    assert!(aborted(&m).contains("cancelled"), "{m:?}");
    assert!(t.peers.fake.calls().is_empty());
    assert_vm(&t, site("b"), VmPhase::Placed);
}

#[tokio::test(start_paused = true)]
async fn requesting_without_any_offer_ends_aborted_before_the_source_is_touched() {
    for answer in failures() {
        let t = star();
        t.peers.fake.on(None, REQUEST, answer.clone());
        let (m, committed) = migrate(&t, anywhere()).await;
        assert!(!committed);
        assert!(aborted(&m).contains("no_capacity"), "{answer:?}: {m:?}");
        assert!(m.offers.is_empty());
        assert_eq!(t.peers.fake.count("migration.prepare b"), 0, "{answer:?}");
        assert_vm(&t, site("b"), VmPhase::Placed);
    }
}

#[tokio::test(start_paused = true)]
async fn preparing_that_fails_for_sure_releases_the_offers_and_ends_aborted() {
    for answer in [Answer::Refused(ErrorCode::Refused), Answer::Unreachable] {
        let t = star();
        t.peers.fake.on(Some("b"), PREPARE, answer.clone());
        let started = tokio::time::Instant::now();
        let (m, committed) = migrate(&t, anywhere()).await;
        assert!(!committed);
        aborted(&m);
        assert_eq!(m.source, None);
        assert_eq!(m.released, vec![0, 1], "{answer:?}");
        // Nobody stopped the VM: nothing to resume, no abort.
        assert_eq!(t.peers.fake.count("migration.abort b"), 0, "{answer:?}");
        assert_vm(&t, site("b"), VmPhase::Placed);
        let prepares = t.peers.fake.count("migration.prepare b");
        if answer == Answer::Unreachable {
            // A source with no responder is waited for, up to the bound, then given up.
            assert!(prepares > 1, "{prepares}");
            assert!(started.elapsed() >= super::UNREACHABLE_LIMIT);
        } else {
            assert_eq!(prepares, 1, "{answer:?}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_source_with_no_responder_for_a_while_is_waited_for_and_the_migration_commits() {
    let t = star();
    t.peers
        .fake
        .on_times(Some("b"), PREPARE, Answer::Unreachable, 3);
    let (m, committed) = migrate(&t, anywhere()).await;
    assert!(committed, "{m:?}");
    assert_eq!(t.peers.fake.count("migration.prepare b"), 4);
    assert_eq!(m.failed_rounds, 0);
}

#[tokio::test(start_paused = true)]
async fn partners_that_did_not_answer_are_asked_again_before_no_offer_ends_it() {
    let requests = |t: &TestSite| {
        let calls = t.peers.fake.calls();
        calls
            .iter()
            .filter(|c| c.starts_with("migration.request "))
            .count()
    };
    // The partners asked: b, c and d.
    let partners = 3;
    for answer in [Answer::Unreachable, Answer::Timeout] {
        let t = star();
        // Every partner silent for two rounds; the third round gets their offers.
        t.peers
            .fake
            .on_times(None, REQUEST, answer.clone(), 2 * partners);
        let (m, committed) = migrate(&t, anywhere()).await;
        assert!(committed, "{answer:?}: {m:?}");
        assert_eq!(requests(&t), 3 * partners, "{answer:?}");
    }
    // A partner that refuses is not asked again: the answer is definite.
    let t = star();
    t.peers
        .fake
        .on(None, REQUEST, Answer::Refused(ErrorCode::NoCapacity));
    let (m, committed) = migrate(&t, anywhere()).await;
    assert!(!committed);
    assert!(aborted(&m).contains("no_capacity"), "{m:?}");
    assert_eq!(requests(&t), partners);
}

#[tokio::test(start_paused = true)]
async fn preparing_that_timed_out_is_undone_by_preparing_again_and_aborting() {
    let t = star();
    t.peers
        .fake
        .on_times(Some("b"), PREPARE, Answer::Timeout, 1);
    let (m, committed) = migrate(&t, anywhere()).await;
    assert!(!committed);
    assert!(aborted(&m).contains("did not answer"), "{m:?}");
    assert!(
        m.source.is_some(),
        "the token learnt by preparing again is journaled"
    );
    assert_eq!(t.peers.fake.count("migration.prepare b"), 2);
    assert_eq!(
        t.peers.fake.count("migration.abort b"),
        1,
        "the source runs the VM again"
    );
    assert_eq!(m.released, vec![0, 1]);
    assert_vm(&t, site("b"), VmPhase::Placed);
}

#[tokio::test(start_paused = true)]
async fn preparing_that_never_answers_gives_up_after_the_settle_limit() {
    let t = star();
    t.peers.fake.on(Some("b"), PREPARE, Answer::Timeout);
    let (m, committed) = migrate(&t, anywhere()).await;
    assert!(!committed);
    assert!(aborted(&m).contains("did not answer"), "{m:?}");
    assert!(t.peers.fake.count("migration.prepare b") > 2);
    assert_eq!(t.peers.fake.count("migration.abort b"), 0);
}

#[tokio::test(start_paused = true)]
async fn a_transfer_failing_on_the_first_offer_falls_back_to_the_next_with_a_fresh_source() {
    let failing = [
        Answer::Refused(ErrorCode::Refused),
        Answer::Timeout,
        Answer::TransferFailed,
    ];
    for answer in failing {
        let t = star();
        t.peers.fake.on(Some("c"), INITIATE, answer.clone());
        let (m, committed) = migrate(&t, anywhere()).await;
        assert!(committed, "{answer:?}: {m:?}");
        assert_committed_at(&t, &m, "d", 1);
        assert_eq!(m.failed_rounds, super::MAX_FAILED_ROUNDS, "{answer:?}");
        assert!(m.last_failure.is_some());
        assert!(!m.source_spent);
        assert_eq!(m.released, vec![0]);
        assert_eq!(t.peers.fake.count("migration.prepare b"), 2, "{answer:?}");
        assert_eq!(t.peers.fake.count("migration.abort c"), 1, "{answer:?}");
        assert_eq!(t.peers.fake.count("migration.abort b"), 0, "{answer:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn every_offer_failing_rolls_the_source_back() {
    let t = star();
    t.peers.fake.on(None, INITIATE, Answer::TransferFailed);
    let (m, committed) = migrate(&t, anywhere()).await;
    assert!(!committed);
    assert!(aborted(&m).contains("every offer failed"), "{m:?}");
    assert_eq!(m.failed_rounds, 2 * super::MAX_FAILED_ROUNDS);
    assert_eq!(m.released, vec![0, 1]);
    assert_eq!(t.peers.fake.count("migration.abort b"), 1);
    assert_eq!(t.peers.fake.count("migration.commit c"), 0);
    assert_vm(&t, site("b"), VmPhase::Placed);
}

#[tokio::test(start_paused = true)]
async fn a_destination_refusing_to_commit_falls_back_and_one_not_answering_is_left_open() {
    let t = star();
    t.peers
        .fake
        .on(Some("c"), COMMIT, Answer::Refused(ErrorCode::Refused));
    let (m, committed) = migrate(&t, anywhere()).await;
    assert!(committed, "{m:?}");
    assert_committed_at(&t, &m, "d", 1);
    assert_eq!(t.peers.fake.count("migration.prepare b"), 2);

    for answer in [Answer::Timeout, Answer::Unreachable] {
        let t = star();
        t.peers.fake.on(Some("c"), COMMIT, answer.clone());
        let (m, committed) = migrate(&t, anywhere()).await;
        assert!(!committed);
        // The destination may run the VM: the source is neither resumed nor released.
        assert_eq!(
            m.phase,
            MigrationPhase::Committing { offer: 0 },
            "{answer:?}"
        );
        assert_eq!(t.peers.fake.count("migration.abort b"), 0, "{answer:?}");
        assert_eq!(t.peers.fake.count("migration.commit b"), 0, "{answer:?}");
        assert!(t.peers.fake.count("migration.commit c") > 1, "repeated");
        assert_vm(&t, site("b"), VmPhase::Migrating);
    }
}

#[tokio::test(start_paused = true)]
async fn a_source_not_released_leaves_the_migration_open_in_committing() {
    for answer in failures() {
        let t = star();
        t.peers.fake.on(Some("b"), COMMIT, answer.clone());
        let (m, committed) = migrate(&t, anywhere()).await;
        assert!(!committed);
        assert_eq!(
            m.phase,
            MigrationPhase::Committing { offer: 0 },
            "{answer:?}"
        );
        // The VM runs at c already; this site points there.
        assert_vm(&t, site("c"), VmPhase::Placed);
        assert_eq!(t.peers.fake.count("migration.abort b"), 0, "{answer:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_source_not_resumed_leaves_the_migration_open_in_aborting() {
    for answer in failures() {
        let t = star();
        t.peers.fake.on(None, INITIATE, Answer::TransferFailed);
        t.peers.fake.on(Some("b"), ABORT, answer.clone());
        let (m, committed) = migrate(&t, anywhere()).await;
        assert!(!committed);
        assert_eq!(m.phase, MigrationPhase::Aborting, "{answer:?}");
        assert!(m
            .abort_reason
            .as_deref()
            .unwrap()
            .contains("every offer failed"));
        assert_vm(&t, site("b"), VmPhase::Migrating);
    }
}

#[tokio::test(start_paused = true)]
async fn a_migration_cancelled_during_the_transfer_rolls_the_source_back() {
    let t = star();
    t.peers.fake.on(Some("c"), INITIATE, Answer::InProgress);
    let roles = t.roles();
    let id = roles.queue_migration(&vm_1(), &anywhere(), None).unwrap();
    let run = {
        let roles = roles.clone();
        tokio::spawn(async move { roles.run_migration(id, anywhere()).await })
    };
    while t.peers.fake.count("transfer.initiate c") == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    assert_eq!(
        roles.cancel_migration(&id).unwrap(),
        MigrationPhase::Transferring { offer: 0 }
    );
    assert!(run.await.unwrap().is_err());
    let m = t.journal.migration(&id).unwrap().unwrap();
    assert!(aborted(&m).contains("cancelled"), "{m:?}");
    assert_eq!(m.released, vec![0, 1]);
    assert_eq!(
        t.peers.fake.count("migration.abort b"),
        1,
        "the source runs the VM again"
    );
    assert_eq!(t.peers.fake.count("transfer.initiate d"), 0);
    assert_vm(&t, site("b"), VmPhase::Placed);
}

#[tokio::test(start_paused = true)]
async fn a_transfer_without_progress_moves_on_after_the_stall_limit() {
    let t = star();
    t.peers.fake.on(Some("c"), INITIATE, Answer::InProgress);
    let (m, committed) = migrate(&t, anywhere()).await;
    assert!(committed, "{m:?}");
    assert_committed_at(&t, &m, "d", 1);
    assert_eq!(m.failed_rounds, 0);
    assert!(t.peers.fake.count("transfer.initiate c") > 1);
}

#[tokio::test(start_paused = true)]
async fn peers_without_responder_for_a_while_are_waited_for_without_failed_rounds() {
    let t = star();
    // The destination's daemon restarts, and the source's too, for a few rounds each.
    t.peers
        .fake
        .on_times(Some("c"), INITIATE, Answer::Unreachable, 5);
    t.peers
        .fake
        .on_times(Some("b"), VERIFY, Answer::Unreachable, 3);
    let (m, committed) = migrate(&t, anywhere()).await;
    assert!(committed, "{m:?}");
    assert_committed_at(&t, &m, "c", 0);
    assert_eq!(m.failed_rounds, 0);
    assert_eq!(m.last_failure, None);
    assert_eq!(t.peers.fake.count("transfer.initiate c"), 6);
    assert_eq!(t.peers.fake.count("transfer.initiate d"), 0);
    assert_eq!(t.peers.fake.count("migration.prepare b"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_peer_without_responder_past_the_limit_fails_its_offer_and_the_migration_aborts() {
    let t = TestSite::new(&["c"], &[]);
    t.place("vm-1", Some(site("b")));
    t.peers.fake.on(Some("c"), INITIATE, Answer::Unreachable);
    let started = Instant::now();
    let (m, committed) = migrate(&t, anywhere()).await;
    assert!(!committed);
    assert!(started.elapsed() >= super::UNREACHABLE_LIMIT, "waited");
    let reason = aborted(&m);
    assert!(reason.contains("every offer failed"), "{reason}");
    assert!(reason.contains("no responder"), "{reason}");
    assert!(reason.contains("(unreachable)"), "{reason}");
    assert_eq!(m.failed_rounds, 0);
    assert!(t.peers.fake.count("transfer.initiate c") > super::MAX_FAILED_ROUNDS as usize);
    assert_eq!(
        t.peers.fake.count("migration.abort b"),
        1,
        "the source runs the VM again"
    );
    assert_vm(&t, site("b"), VmPhase::Placed);
}

#[tokio::test(start_paused = true)]
async fn a_timeout_is_a_failed_round_and_is_not_waited_for() {
    // Every timeout counts: the offer fails after exactly the allowed rounds.
    let t = star();
    t.peers.fake.on(Some("c"), INITIATE, Answer::Timeout);
    let (m, committed) = migrate(&t, anywhere()).await;
    assert!(committed, "{m:?}");
    assert_committed_at(&t, &m, "d", 1);
    assert_eq!(m.failed_rounds, super::MAX_FAILED_ROUNDS);
    assert_eq!(
        t.peers.fake.count("transfer.initiate c"),
        super::MAX_FAILED_ROUNDS as usize
    );

    // A round with a timeout at one end counts even when the other end had no responder.
    let t = star();
    t.peers
        .fake
        .on_times(Some("c"), INITIATE, Answer::Timeout, 1);
    t.peers
        .fake
        .on_times(Some("b"), VERIFY, Answer::Unreachable, 1);
    let (m, committed) = migrate(&t, anywhere()).await;
    assert!(committed, "{m:?}");
    assert_committed_at(&t, &m, "c", 0);
    assert_eq!(m.failed_rounds, 1);
    assert_eq!(t.peers.fake.count("transfer.initiate c"), 2);
}

/// Crashes the Controller while a fake hangs on `op` at `at`, recovers, returns the journal.
async fn crash_and_recover(t: &TestSite, at: &str, op: &str) -> MigrationRecord {
    t.peers.fake.on(Some(at), op, Answer::Hang);
    let id = crash(t).await;
    recover(t, id).await
}

#[tokio::test(start_paused = true)]
async fn a_crash_while_queued_or_requesting_is_rolled_back_with_nothing_moved() {
    // Queued: journaled, never run.
    let t = star();
    let id = t
        .roles()
        .queue_migration(&vm_1(), &anywhere(), None)
        .unwrap();
    let m = recover(&t, id).await;
    assert!(aborted(&m).contains("interrupted"), "{m:?}");
    assert!(t.peers.fake.calls().is_empty());
    assert_vm(&t, site("b"), VmPhase::Placed);

    let t = star();
    let m = crash_and_recover(&t, "c", REQUEST).await;
    assert!(aborted(&m).contains("interrupted"), "{m:?}");
    assert!(
        t.peers.fake.calls().is_empty(),
        "{:?}",
        t.peers.fake.calls()
    );
    assert_vm(&t, site("b"), VmPhase::Placed);
}

#[tokio::test(start_paused = true)]
async fn a_crash_while_preparing_prepares_again_to_resume_the_source() {
    let t = star();
    let m = crash_and_recover(&t, "b", PREPARE).await;
    assert!(aborted(&m).contains("interrupted"), "{m:?}");
    assert_eq!(
        t.peers.fake.calls(),
        vec![
            "migration.abort c",
            "migration.abort d",
            "migration.prepare b",
            "migration.abort b",
        ]
    );
    assert_vm(&t, site("b"), VmPhase::Placed);
}

#[tokio::test(start_paused = true)]
async fn a_crash_during_the_transfer_resumes_it_with_the_journaled_source() {
    let t = star();
    let m = crash_and_recover(&t, "c", INITIATE).await;
    assert_committed_at(&t, &m, "c", 0);
    assert_eq!(t.peers.fake.count("migration.prepare b"), 0);
    assert_eq!(t.peers.fake.count("transfer.initiate c"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_crash_during_the_transfer_to_a_later_offer_prepares_a_fresh_source_first() {
    let t = star();
    t.peers.fake.on(Some("c"), INITIATE, Answer::TransferFailed);
    t.peers.fake.on(Some("d"), INITIATE, Answer::Hang);
    let id = crash(&t).await;
    let before = t.journal.migration(&id).unwrap().unwrap();
    assert_eq!(before.phase, MigrationPhase::Transferring { offer: 1 });
    let m = recover(&t, id).await;
    assert_committed_at(&t, &m, "d", 1);
    assert_eq!(
        t.peers.fake.count("migration.prepare b"),
        0,
        "the fresh source was journaled"
    );
    assert_eq!(t.peers.fake.count("transfer.initiate c"), 0);
}

#[tokio::test(start_paused = true)]
async fn a_crash_during_the_hand_over_completes_it() {
    for at in ["c", "b"] {
        let t = star();
        let m = crash_and_recover(&t, at, COMMIT).await;
        assert_committed_at(&t, &m, "c", 0);
        assert_eq!(t.peers.fake.count("migration.commit c"), 1, "{at}");
        assert_eq!(t.peers.fake.count("migration.prepare b"), 0, "{at}");
        assert_eq!(t.peers.fake.count("transfer.initiate c"), 0, "{at}");
        assert_eq!(t.peers.fake.count("migration.abort b"), 0, "{at}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_crash_during_the_roll_back_completes_it_with_its_reason() {
    let t = star();
    t.peers.fake.on(None, INITIATE, Answer::TransferFailed);
    let m = crash_and_recover(&t, "b", ABORT).await;
    assert!(aborted(&m).contains("every offer failed"), "{m:?}");
    assert_eq!(t.peers.fake.calls(), vec!["migration.abort b"]);
    assert_vm(&t, site("b"), VmPhase::Placed);
}

#[tokio::test(start_paused = true)]
async fn recover_takes_up_every_open_migration() {
    let t = star();
    t.peers.fake.on(Some("c"), INITIATE, Answer::Hang);
    let id = crash(&t).await;
    t.peers.fake.heal();
    let roles = t.roles();
    assert_eq!(roles.recover().unwrap(), 1);
    let mut done = None;
    for _ in 0..1000 {
        let m = t.journal.migration(&id).unwrap().unwrap();
        if m.phase.is_final() {
            done = Some(m);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(done.map(|m| m.phase), Some(MigrationPhase::Committed));
    assert_eq!(roles.recover().unwrap(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_local_migration_talks_to_the_hosts_only() {
    let t = TestSite::new(&[], &["h1", "h2"]);
    t.place("vm-1", Some(host("h1")));
    let to_here = Trigger::Operator {
        to_site: Some(SiteId::new("a").unwrap()),
    };
    let (m, committed) = migrate(&t, to_here).await;
    assert!(committed, "{m:?}");
    assert_eq!(m.offers.len(), 1);
    assert!(
        t.peers.fake.calls().is_empty(),
        "{:?}",
        t.peers.fake.calls()
    );
    assert_eq!(
        t.local.fake.calls(),
        vec![
            "local_offers -",
            "prepare_source h1",
            "initiate -",
            "verify -",
            "commit_destination h2",
            "commit_source h1",
        ]
    );
    assert_vm(&t, host("h2"), VmPhase::Placed);
}

#[tokio::test(start_paused = true)]
async fn a_placement_serves_the_image_store_and_delegates_the_vm() {
    let t = TestSite::new(&["c"], &[]);
    t.place("vm-1", None);
    let (m, committed) = migrate(&t, Trigger::Placement).await;
    assert!(committed, "{m:?}");
    assert_eq!(m.source_via, None);
    assert_eq!(t.local.fake.count("image_source -"), 1);
    assert_eq!(t.local.fake.count("commit_source -"), 1);
    assert_vm(&t, site("c"), VmPhase::Placed);
}
