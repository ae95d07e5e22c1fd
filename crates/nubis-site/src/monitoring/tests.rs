//! Tests of the delivery policy, the intake checks, the choice of verifying key and the drop
//! reasons.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use nubis_protocol::envelope::EnvelopeError;
use nubis_protocol::identity::SiteIdentity;
use nubis_protocol::message::{BatchPayload, ClearPayload, MonitoringBatch, ProducerId};
use nubis_protocol::{SiteId, VmId};

use crate::config::{Delivery, SiteConfig};
use crate::directory::SiteRecord;
use crate::journal::{NextHop, VmRecord};

use super::*;
use crate::config::{Credentials, DirectoryTiming, MonitoringConfig, Partner, Policy};
use crate::journal::VmPhase;
use nubis_protocol::message::{HostId, ProxyUri, SiteEntry};

fn site(s: &str) -> SiteId {
    SiteId::new(s).unwrap()
}

fn vm(s: &str) -> VmId {
    VmId::new(s).unwrap()
}

fn record(primary: &str, upstream: Option<&str>, downstream: Option<NextHop>) -> VmRecord {
    let descriptor = serde_json::from_value(serde_json::json!({
        "id": "vm-1", "name": "vm one", "version": 1, "primary_site": primary,
        "primary_keys": {"signing": vec![7u8; 32], "sealing": vec![9u8; 32]},
        "hardware": {"vcpus": 1, "memory_mib": 512},
    }))
    .unwrap();
    VmRecord {
        vm: vm("vm-1"),
        primary: site(primary),
        upstream: upstream.map(site),
        downstream,
        former_downstream: None,
        descriptor,
        phase: VmPhase::Placed,
    }
}

fn batch(primary: &str) -> MonitoringBatch {
    MonitoringBatch {
        vm: vm("vm-1"),
        primary_site: site(primary),
        producer: ProducerId::new("p1").unwrap(),
        epoch_ms: 1,
        seq: 0,
        payload: BatchPayload::Clear(ClearPayload::default()),
    }
}

fn host() -> Option<NextHop> {
    Some(NextHop::Host(HostId::new("h1").unwrap()))
}

#[test]
fn relay_goes_up_one_hop_and_the_primary_or_bus_publishes() {
    let c = site("c");
    let at_c = record("a", Some("b"), host());
    assert_eq!(
        target(Delivery::Relay, &c, &at_c),
        Some(Target::Relay(site("b")))
    );
    assert_eq!(target(Delivery::Bus, &c, &at_c), Some(Target::Public));
    let at_a = record("a", None, Some(NextHop::Site(site("b"))));
    assert_eq!(
        target(Delivery::Relay, &site("a"), &at_a),
        Some(Target::Public)
    );
    // A non-primary record without upstream cannot be relayed, and is not made public.
    let broken = record("a", None, host());
    assert_eq!(target(Delivery::Relay, &c, &broken), None);
}

#[test]
fn intake_needs_the_host_holding_the_vm_and_the_records_primary() {
    let h1 = HostId::new("h1").unwrap();
    let h2 = HostId::new("h2").unwrap();
    assert_eq!(
        check_intake(None, &h1, &batch("a")),
        Err(DropReason::UnknownVm)
    );
    let delegated = record("a", None, Some(NextHop::Site(site("b"))));
    assert_eq!(
        check_intake(Some(&delegated), &h1, &batch("a")),
        Err(DropReason::UnknownVm)
    );
    let unplaced = record("a", None, None);
    assert_eq!(
        check_intake(Some(&unplaced), &h1, &batch("a")),
        Err(DropReason::UnknownVm)
    );
    let local = record("a", Some("a"), host());
    assert_eq!(
        check_intake(Some(&local), &h1, &batch("z")),
        Err(DropReason::Refused)
    );
    // Another host of the same site cannot speak for the VM.
    assert_eq!(
        check_intake(Some(&local), &h2, &batch("a")),
        Err(DropReason::WrongSender)
    );
    assert_eq!(check_intake(Some(&local), &h1, &batch("a")), Ok(&local));
}

fn config_with_partner(own: &str, partner: &SiteIdentity) -> SiteConfig {
    SiteConfig {
        site: site(own),
        identity: Arc::new(SiteIdentity::generate(site(own))),
        nats: Credentials::anonymous("nats://127.0.0.1:4222"),
        hub_domain: "hub".into(),
        data_dir: "/nonexistent".into(),
        policy: Policy::default(),
        directory: DirectoryTiming::default(),
        partners: vec![Partner {
            site: partner.site().clone(),
            signing_key: partner.public().signing,
            sealing_key: partner.public().sealing,
            preference: 0,
            price_milli: 0,
            preferred: false,
        }],
        hosts: Vec::new(),
        vm_roots: Default::default(),
        proxy: "nats://a/proxy/p1".parse::<ProxyUri>().unwrap(),
        image_store: "/nonexistent".into(),
        max_concurrent_migrations: 1,
        monitoring: MonitoringConfig::default(),
        sla: Vec::new(),
        limits: Default::default(),
        retention: Default::default(),
    }
}

fn directory_record(id: &SiteIdentity, claimed_site: &str) -> SiteRecord {
    SiteRecord {
        entry: SiteEntry {
            site: site(claimed_site),
            signing_key: id.public().signing.to_bytes(),
            sealing_key: id.public().sealing,
            proxies: Vec::new(),
            subjects: Vec::new(),
            heartbeat_ms: 1,
            started_ms: 1,
        },
        trusted: false,
        revision: 1,
    }
}

#[test]
fn pinned_keys_win_over_the_directory_which_covers_other_sites() {
    let b = SiteIdentity::generate(site("b"));
    let c = SiteIdentity::generate(site("c"));
    let impostor = SiteIdentity::generate(site("b"));
    let config = config_with_partner("a", &b);
    let mut view = BTreeMap::new();
    view.insert(site("b"), directory_record(&impostor, "b"));
    view.insert(site("c"), directory_record(&c, "c"));
    view.insert(site("d"), directory_record(&c, "x"));
    assert_eq!(
        sender_key(&config, &view, &site("b")),
        Some(b.public().signing)
    );
    assert_eq!(
        sender_key(&config, &view, &site("c")),
        Some(c.public().signing)
    );
    assert_eq!(sender_key(&config, &view, &site("d")), None);
    assert_eq!(sender_key(&config, &view, &site("e")), None);
}

#[test]
fn envelope_refusals_map_to_drop_reasons_and_are_counted() {
    assert_eq!(
        DropReason::of(&EnvelopeError::BadSignature),
        DropReason::Forged
    );
    assert_eq!(
        DropReason::of(&EnvelopeError::UnknownSender("x".into())),
        DropReason::Forged
    );
    assert_eq!(
        DropReason::of(&EnvelopeError::Replayed),
        DropReason::Replayed
    );
    assert_eq!(
        DropReason::of(&EnvelopeError::Stale { skew_ms: 1 }),
        DropReason::Stale
    );
    assert_eq!(
        DropReason::of(&EnvelopeError::WrongRecipient("x".into())),
        DropReason::WrongSubject
    );
    assert_eq!(
        DropReason::of(&EnvelopeError::TooDeep),
        DropReason::Malformed
    );
    let counters = MonitoringCounters::default();
    counters.drop_for(DropReason::Stale);
    counters.drop_for(DropReason::Stale);
    counters.drop_for(DropReason::Refused);
    assert_eq!(counters.dropped(DropReason::Stale), 2);
    assert_eq!(counters.dropped(DropReason::Refused), 1);
    assert_eq!(counters.dropped(DropReason::Forged), 0);
    let names: HashSet<&str> = DropReason::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(names.len(), DropReason::ALL.len());
}

#[test]
fn the_downstream_partner_is_always_on_the_chain_and_others_only_once_read() {
    let chains = chain::Chains::default();
    let (vm1, b, c, x) = (vm("vm-1"), site("b"), site("c"), site("x"));
    let t0 = std::time::Instant::now();
    assert_eq!(chains.lookup(&vm1, &b, &b, t0), chain::Lookup::OnChain);
    // c is unknown: the chain is to be read, and only once per RESOLVE_EVERY.
    assert_eq!(chains.lookup(&vm1, &b, &c, t0), chain::Lookup::Resolve);
    assert_eq!(chains.lookup(&vm1, &b, &x, t0), chain::Lookup::Off);
    chains.store(&vm1, vec![b.clone(), c.clone()], t0);
    assert_eq!(chains.lookup(&vm1, &b, &c, t0), chain::Lookup::OnChain);
    assert_eq!(chains.lookup(&vm1, &b, &x, t0), chain::Lookup::Off);
    let later = t0 + RESOLVE_EVERY;
    assert_eq!(chains.lookup(&vm1, &b, &x, later), chain::Lookup::Resolve);
    assert_eq!(chains.lookup(&vm1, &b, &x, later), chain::Lookup::Off);
    // The VM moved to another downstream: the chain read below the old one no longer counts.
    let d = site("d");
    assert_eq!(chains.lookup(&vm1, &d, &c, later), chain::Lookup::Resolve);
    chains.store(&vm1, vec![d.clone()], later);
    assert_eq!(chains.lookup(&vm1, &d, &c, later), chain::Lookup::Off);
    assert_eq!(chains.lookup(&vm1, &d, &d, later), chain::Lookup::OnChain);
    // Forgotten when the VM is no longer delegated from here.
    chains.retain(|_| false);
    assert_eq!(chains.lookup(&vm1, &d, &c, later), chain::Lookup::Resolve);
}

#[test]
fn a_vouch_never_loops_back_nor_grows_the_chain_without_bound() {
    let own = site("a");
    let chain = vec![site("b"), site("c")];
    assert!(extends(&chain, &own, &site("d")));
    assert!(!extends(&chain, &own, &own), "back to this site");
    assert!(!extends(&chain, &own, &site("b")), "a loop");
    let long: Vec<SiteId> = (0..MAX_CHAIN).map(|i| site(&format!("s{i}"))).collect();
    assert!(!extends(&long, &own, &site("z")));
    assert!(extends(&long[..MAX_CHAIN - 1], &own, &site("z")));
}

#[test]
fn a_former_downstream_is_heard_for_a_while_after_the_vm_moved_away_from_it() {
    use crate::journal::FORMER_DOWNSTREAM_GRACE_MS;
    let now = 1_000_000;
    let at_b = record("a", None, Some(NextHop::Site(site("b"))));
    assert!(at_b.hears_from(&site("b"), now));
    assert!(!at_b.hears_from(&site("c"), now));
    let at_c = at_b.repointed(NextHop::Site(site("c")), now);
    assert_eq!(at_c.downstream, Some(NextHop::Site(site("c"))));
    assert!(at_c.hears_from(&site("c"), now));
    // What b stored before the hand-over still comes up, for the grace period only.
    assert!(at_c.hears_from(&site("b"), now + FORMER_DOWNSTREAM_GRACE_MS - 1));
    assert!(!at_c.hears_from(&site("b"), now + FORMER_DOWNSTREAM_GRACE_MS));
    assert!(!at_c.hears_from(&site("d"), now));
    // Re-pointing to the same next hop keeps what was former; to a host, b stays former too.
    let again = at_c.clone().repointed(NextHop::Site(site("c")), now + 5);
    assert_eq!(again.former_downstream, at_c.former_downstream);
    let local = at_c.repointed(NextHop::Host(HostId::new("h1").unwrap()), now);
    assert!(local.hears_from(&site("c"), now));
    assert!(!local.hears_from(&site("b"), now));
}
