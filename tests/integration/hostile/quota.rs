//! A competitor that asks for more than it takes. Every offer a Destination makes reserves room
//! on one of its hosts: an offer never taken up is released at its expiry (also when it
//! expired while the site daemon was down), and each partner's offers, reservations,
//! transfers and request rate are bounded by the site's `[limits]`, so a partner flooding
//! Migration requests is refused with `busy` or `quota` while the site still places its own
//! VMs and serves its other partners.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::future::join_all;
use nubis_bus::federation::FederationClient;
use nubis_bus::CallError;
use nubis_protocol::envelope::now_ms;
use nubis_protocol::message::host::HostClient;
use nubis_protocol::message::{ErrorCode, HostId, MigrationRequest, Offers};
use nubis_protocol::subject::FederationOp;
use nubis_protocol::{MigrationId, SiteId};
use nubis_testkit::{require_nats_server, wait_until};
use serde_json::{json, Value};

use super::{deploy_body, descriptor, migration_request, signed_as};
use crate::stack::{ops, wait_migration, SiteSpec, Stack};

const LONG: Duration = Duration::from_secs(90);

/// A Migration request for a new VM `vm` of primary `primary` (with its real public keys).
fn request(stack: &Stack, vm: &str, primary: &str) -> MigrationRequest {
    migration_request(MigrationId::random(), descriptor(stack, vm, primary))
}

/// Sends a Migration request from `client` to site `to`.
async fn ask(
    client: &FederationClient,
    to: &str,
    req: &MigrationRequest,
) -> Result<Offers, CallError> {
    client
        .call(
            &SiteId::new(to).unwrap(),
            FederationOp::MigrationRequest,
            req,
        )
        .await
}

/// The free memory (MiB) of `host` at `site`, as its host agent answers.
async fn free_memory(stack: &Stack, site: &str, host: &str) -> Result<u64, String> {
    let client = stack
        .fed
        .connect_site_internal(site)
        .await
        .map_err(|e| e.to_string())?;
    let agent = HostClient::new(
        nubis_site::infrastructure::NatsTransport(client),
        SiteId::new(site).unwrap(),
        HostId::new(host).unwrap(),
    );
    let c = agent.capacity().await.map_err(|e| e.to_string())?;
    Ok(c.free.memory_mib)
}

/// Deploys `vm` at `site` (whose image store gets the test image) and returns the
/// migration's final view.
async fn deploy(stack: &Stack, site: &str, vm: &str) -> Value {
    std::fs::write(
        stack.image_store(site).join("tiny.qcow2"),
        vec![7u8; 150_000],
    )
    .unwrap();
    let op = stack.operator(site).await;
    let r = ops(&op, site, "deploy", deploy_body(vm, "tiny.qcow2"))
        .await
        .unwrap();
    wait_migration(&op, site, r["migration"].as_str().unwrap()).await
}

/// Partner `a` obtains an offer at `b` and never takes it up: `b`'s host holds the VM's memory
/// until the offer expires, then gets it back. A second offer, made while `b`'s daemon is about
/// to go down, expires while it is down: the host still holds it then, and gets it back once
/// the daemon is started again.
#[tokio::test]
async fn an_offer_never_taken_up_is_released_at_its_expiry_even_across_a_restart() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let mut stack = Stack::start(
        &binary,
        vec![
            SiteSpec::new("a").partner("b", 0),
            SiteSpec::new("b")
                .partner("a", 0)
                .host("h1", 4096)
                .top("[limits]\noffer_ttl_ms = 5000\nsweep_interval_ms = 200\n"),
        ],
    )
    .await;
    stack.wait_ready("b").await;
    let a = signed_as(&stack, "a", Duration::from_secs(10)).await;
    let before = free_memory(&stack, "b", "h1").await.unwrap();

    let offers = ask(&a, "b", &request(&stack, "idle-1", "a")).await.unwrap();
    assert_eq!(offers.offers.len(), 1, "{offers:?}");
    let expires = offers.offers[0].expires_ms;
    assert!(
        expires <= now_ms() + 5000,
        "the offer carries the site's ttl"
    );
    // The offer holds the VM's memory on the host: what the sweep must give back.
    assert_eq!(free_memory(&stack, "b", "h1").await.unwrap(), before - 256);
    wait_until(LONG, "the expired offer released", || async {
        match free_memory(&stack, "b", "h1").await {
            Ok(free) if free == before => Ok(()),
            other => Err(format!("free memory {other:?}, want {before}")),
        }
    })
    .await
    .unwrap();
    assert!(now_ms() >= expires, "released only at its expiry");

    // The same across a restart: the offer expires while b's daemon is down.
    let offers = ask(&a, "b", &request(&stack, "idle-2", "a")).await.unwrap();
    let expires = offers.offers[0].expires_ms;
    let mut down = stack.site_daemon_as_process("b").await;
    down.kill().unwrap();
    down.wait().unwrap();
    wait_until(LONG, "the offer's expiry passed", || async {
        if now_ms() > expires {
            Ok(())
        } else {
            Err("not yet".to_string())
        }
    })
    .await
    .unwrap();
    assert_eq!(
        free_memory(&stack, "b", "h1").await.unwrap(),
        before - 256,
        "nobody released it while the daemon was down"
    );
    let mut up = stack.spawn_site_process("b");
    stack.wait_ready("b").await;
    wait_until(LONG, "the offer expired meanwhile released", || async {
        match free_memory(&stack, "b", "h1").await {
            Ok(free) if free == before => Ok(()),
            other => Err(format!("free memory {other:?}, want {before}")),
        }
    })
    .await
    .unwrap();
    // The restarted site still makes offers.
    let offers = ask(&a, "b", &request(&stack, "idle-3", "a")).await.unwrap();
    assert_eq!(offers.offers.len(), 1, "{offers:?}");
    up.kill().unwrap();
    up.wait().unwrap();
    stack.shutdown().await;
}

/// Partner `b` floods site `a` with hand-signed Migration requests, all at once. `b` gets
/// `busy` (its rate) and `quota` (its offers outstanding) refusals, and never more offers
/// than its limit; meanwhile `a` places its own VM and partner `c` places one at `a`.
#[tokio::test]
async fn a_flooding_partner_is_refused_while_the_site_and_its_other_partners_are_served() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let stack = Stack::start(
        &binary,
        vec![
            SiteSpec::new("a")
                .partner("b", 0)
                .partner("c", 0)
                .host("h1", 8192)
                .top(
                    "[limits]\nrequests_per_sec = 1.0\nrequest_burst = 5\noffers_outstanding = 3\n",
                ),
            SiteSpec::new("b").partner("a", 0),
            SiteSpec::new("c").partner("a", 0),
        ],
    )
    .await;
    stack.wait_ready("a").await;
    stack.wait_ready("c").await;
    let b = signed_as(&stack, "b", Duration::from_secs(10)).await;
    let flood: Vec<MigrationRequest> = (0..60)
        .map(|i| request(&stack, &format!("flood-{i}"), "b"))
        .collect();
    let flooding = join_all(flood.iter().map(|req| ask(&b, "a", req)));
    let (answers, own, partner) = tokio::join!(
        flooding,
        deploy(&stack, "a", "own-1"),
        deploy(&stack, "c", "guest-1")
    );

    assert_eq!(own["phase"], "committed", "{own}");
    assert_eq!(partner["phase"], "committed", "{partner}");
    let op_a = stack.operator("a").await;
    let placed = ops(&op_a, "a", "vms", json!({"vm": "guest-1"}))
        .await
        .unwrap();
    assert_eq!(placed["vms"].as_array().map(Vec::len), Some(1), "{placed}");

    let mut offered = 0;
    let mut refused = BTreeMap::<String, usize>::new();
    for answer in answers {
        match answer {
            Ok(o) => offered += o.offers.len(),
            Err(e) => {
                let code = e
                    .code()
                    .cloned()
                    .unwrap_or_else(|| panic!("not a refusal: {e}"));
                *refused.entry(code.as_str().to_string()).or_default() += 1;
            }
        }
    }
    assert!(
        offered <= 3,
        "b holds no more offers than its limit: {offered}"
    );
    assert!(offered >= 1, "b's first requests were served");
    assert!(
        refused
            .keys()
            .all(|c| c == ErrorCode::Busy.as_str() || c == ErrorCode::Quota.as_str()),
        "{refused:?}"
    );
    assert!(refused.values().sum::<usize>() >= 55, "{refused:?}");
    // Once its rate allows again, b is still refused: by quota, for the offers it holds.
    let mut n = 0;
    wait_until(LONG, "b refused by quota", || {
        n += 1;
        let req = request(&stack, &format!("flood-more-{n}"), "b");
        let b = &b;
        async move {
            match ask(b, "a", &req).await {
                Err(e) if e.code() == Some(&ErrorCode::Quota) => Ok(()),
                Err(e) if e.code() == Some(&ErrorCode::Busy) => Err("busy".to_string()),
                other => panic!("neither quota nor busy: {other:?}"),
            }
        }
    })
    .await
    .unwrap();
    stack.shutdown().await;
}
