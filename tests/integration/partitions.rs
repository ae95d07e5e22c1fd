//! Partitions: one site's link to the hub is cut for 60 s at each phase of a migration
//! (request, prepare, transfer, commit) and of an eviction. After the link is restored the
//! migration ends (committed, or aborted with the VM where it was), the VM is active on exactly
//! one host, every site's record of the chain agrees with it, and no migration stays open. The
//! Controller is held at the step before the phase (see `nubis-test-site`) while the link is
//! cut, so the cut lands in that phase whatever the machine's speed.

use std::time::Duration;

use nubis_protocol::message::DmtfState;
use nubis_testkit::wait_until;
use serde_json::json;

use crate::migration::{send_signal, wait_stopped};
use crate::stack::{deploy_body, ops, wait_migration, Layout, SiteSpec, Stack};

const LONG: Duration = Duration::from_secs(240);

/// How long a link stays cut.
const CUT: Duration = Duration::from_secs(60);

/// Sites b and c run VMs, each on one host.
const RUNNERS: [(&str, &str); 2] = [("b", "b1"), ("c", "c1")];

/// a delegates to b (preferred) or c; every site behind a link the test can cut.
async fn start() -> Option<Stack> {
    let binary = nubis_testkit::require_nats_server()?;
    let layout = Layout {
        hub_nodes: 1,
        linked: vec!["a", "b", "c"],
    };
    let stack = Stack::start_full(
        &binary,
        vec![
            SiteSpec::new("a").partner("b", 10).partner("c", 5),
            SiteSpec::new("b").partner("a", 0).host("b1", 4096),
            SiteSpec::new("c").partner("a", 0).host("c1", 4096),
        ],
        &[],
        &layout,
    )
    .await;
    std::fs::write(stack.image_store("a").join("img.qcow2"), vec![9u8; 1 << 20]).unwrap();
    let op = stack.operator("a").await;
    let r = ops(&op, "a", "deploy", deploy_body("pt-1", "img.qcow2"))
        .await
        .unwrap();
    let m = wait_migration(&op, "a", r["migration"].as_str().unwrap()).await;
    assert_eq!(m["phase"], "committed", "{m}");
    Some(stack)
}

/// Where the hosts' own lists put `vm`: the sites whose host agent lists it, with its state.
async fn host_lists(stack: &Stack, vm: &str) -> Result<Vec<(&'static str, DmtfState)>, String> {
    let mut at = Vec::new();
    for (site, host) in RUNNERS {
        if let Some((_, state)) = stack
            .host_vms(site, host)
            .await?
            .into_iter()
            .find(|(v, _)| v == vm)
        {
            at.push((site, state));
        }
    }
    Ok(at)
}

/// Waits until `vm` runs on exactly one host, a's record names that host's site, that site's
/// record names its host, and a has no migration of it open; returns the site.
async fn settled(stack: &Stack, vm: &str) -> &'static str {
    wait_until(LONG, format!("{vm} settled"), || async {
        let at = host_lists(stack, vm).await?;
        let [(site, DmtfState::Enabled)] = at[..] else {
            return Err(format!("host lists: {at:?}"));
        };
        let op = stack.operator("a").await;
        let v = ops(&op, "a", "vms", json!({"vm": vm})).await?;
        let view = &v["vms"][0];
        if view["next_hop"] != format!("site:{site}") {
            return Err(format!("a's record: {view}"));
        }
        let open = view["migrations"].as_array().map_or(0, |ms| {
            ms.iter()
                .filter(|m| !matches!(m["phase"].as_str(), Some("committed" | "aborted")))
                .count()
        });
        if open > 0 {
            return Err(format!("open migrations at a: {view}"));
        }
        let op_site = stack.operator(site).await;
        let there = ops(&op_site, site, "vms", json!({"vm": vm})).await?;
        let host = RUNNERS.iter().find(|(s, _)| *s == site).map(|(_, h)| *h);
        if there["vms"][0]["next_hop"] != format!("host:{}", host.unwrap_or_default()) {
            return Err(format!("{site}'s record: {there}"));
        }
        Ok(site)
    })
    .await
    .unwrap()
}

/// Waits for `migration` (of pt-1 from b to c) to end and the federation to settle: at c if it
/// committed, at b if it aborted.
async fn settled_as_it_ended(stack: &Stack, op: &async_nats::Client, migration: &str) {
    let m = wait_migration(op, "a", migration).await;
    let at = settled(stack, "pt-1").await;
    match m["phase"].as_str() {
        Some("committed") => assert_eq!(at, "c", "{m}"),
        Some("aborted") => assert_eq!(at, "b", "{m}"),
        other => panic!("{other:?}: {m}"),
    }
}

/// The Controller (a) as a process held at `step`; the migration of pt-1 to c started. Returns
/// the process and the migration id once the Controller is held.
async fn held_at(stack: &mut Stack, step: &str) -> (std::process::Child, String) {
    let mut plain = stack.site_daemon_as_process("a").await;
    plain.kill().unwrap();
    plain.wait().unwrap();
    let controller =
        stack.spawn_site_process_with("a", "a-held.log", &[("NUBIS_TEST_STOP_AT", step)]);
    stack.wait_ready("a").await;
    let op = stack.operator("a").await;
    let r = ops(&op, "a", "migrate", json!({"vm": "pt-1", "to_site": "c"}))
        .await
        .unwrap();
    wait_stopped(&controller, "the Controller").await;
    (controller, r["migration"].as_str().unwrap().to_owned())
}

/// Holds the Controller at `step`, cuts `site`'s link, lets the Controller go on, restores the
/// link after [`CUT`], and checks the outcome.
async fn cut_at(step: &str, site: &str) {
    let Some(mut stack) = start().await else {
        return;
    };
    let (mut controller, migration) = held_at(&mut stack, step).await;
    let link = stack.fed.link(site).expect("a link");
    link.cut();
    send_signal(&controller, "CONT");
    tokio::time::sleep(CUT).await;
    link.restore();
    let op = stack.operator("a").await;
    settled_as_it_ended(&stack, &op, &migration).await;
    controller.kill().unwrap();
    controller.wait().unwrap();
    stack.shutdown().await;
}

/// The five cuts, each on a federation of its own, at the same time: each waits out its minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_cut_off_for_a_minute_at_each_phase_of_a_migration_and_of_an_eviction() {
    tokio::join!(
        a_destination_cut_off_while_it_is_asked_for_offers(),
        cut_at("offers journaled; preparing the source", "b"),
        cut_at("initiating the transfer", "c"),
        cut_at("transfer verified; committing", "c"),
        a_controller_cut_off_when_an_eviction_is_noticed(),
    );
}

/// Request: the destination is cut off when it is asked for offers.
async fn a_destination_cut_off_while_it_is_asked_for_offers() {
    let Some(stack) = start().await else {
        return;
    };
    let link = stack.fed.link("c").expect("a link");
    link.cut();
    let op = stack.operator("a").await;
    let r = ops(&op, "a", "migrate", json!({"vm": "pt-1", "to_site": "c"}))
        .await
        .unwrap();
    let migration = r["migration"].as_str().unwrap().to_owned();
    tokio::time::sleep(CUT).await;
    link.restore();
    settled_as_it_ended(&stack, &op, &migration).await;
    stack.shutdown().await;
}

/// b evicts the VM while a, its upstream and the Controller of the move that follows, is cut
/// off; b keeps the notice, and once a is back, a moves the VM to c: active once, and the
/// chain agrees.
async fn a_controller_cut_off_when_an_eviction_is_noticed() {
    let Some(stack) = start().await else {
        return;
    };
    let link = stack.fed.link("a").expect("a link");
    link.cut();
    let op_b = stack.operator("b").await;
    // The notice waits at b for a to be reachable.
    let _ = ops(&op_b, "b", "evict", json!({"vm": "pt-1"})).await;
    tokio::time::sleep(CUT).await;
    link.restore();
    wait_until(LONG, "the VM moved off b", || async {
        let at = host_lists(&stack, "pt-1").await?;
        if at.iter().any(|(s, _)| *s == "c") {
            Ok(())
        } else {
            Err(format!("{at:?}"))
        }
    })
    .await
    .unwrap();
    assert_eq!(settled(&stack, "pt-1").await, "c");
    stack.shutdown().await;
}
