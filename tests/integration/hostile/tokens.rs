//! A competitor at the federation endpoints of the migration roles. A transfer token authorizes
//! exactly what it was minted for — the route's migration and VM, asked by the site the offer
//! was made to — and every request about a VM a site already holds is heard only along that
//! VM's chain. The competitor here is a real pinned partner: its requests are hand-signed with
//! its own key, so they pass the envelope layer and reach the roles.

use std::time::Duration;

use nubis_bus::federation::FederationClient;
use nubis_bus::CallError;
use nubis_protocol::message::{
    AbortMigration, Aborted, Body, CommitMigration, Committed, ControlChange, ControlReply,
    ControlRequest, Endpoint, ErrorCode, EvictionAccepted, EvictionNotice, HandOverSide,
    InitiateTransfer, NoticeId, Offer, Offers, PrepareMigration, PrepareMode, Prepared,
    StateTransition, TransferStatusReply,
};
use nubis_protocol::subject::FederationOp;
use nubis_protocol::{MigrationId, SiteId, VmId};
use nubis_testkit::{require_nats_server, wait_until};
use serde_json::{json, Value};

use super::{deploy_body, descriptor, migration_request, signed_as};
use crate::stack::{ops, wait_migration, SiteSpec, Stack};

const LONG: Duration = Duration::from_secs(90);

/// Sends `body` to `op` of site `to`.
async fn call<Rep: Body>(
    client: &FederationClient,
    to: &str,
    op: FederationOp,
    body: &impl Body,
) -> Result<Rep, CallError> {
    client.call(&SiteId::new(to).unwrap(), op, body).await
}

/// The code of a refusal; panics on success or on a failure that is not a refusal.
fn code<T: std::fmt::Debug>(r: Result<T, CallError>) -> ErrorCode {
    match r {
        Err(e) => e
            .code()
            .cloned()
            .unwrap_or_else(|| panic!("not a refusal: {e}")),
        Ok(v) => panic!("accepted: {v:?}"),
    }
}

/// The bytes of the image every test VM boots from.
fn image() -> Vec<u8> {
    vec![7u8; 150_000]
}

/// Deploys `vm` at `site` (whose image store gets the test image) and waits until it is placed.
async fn deploy(stack: &Stack, site: &str, vm: &str) {
    std::fs::write(stack.image_store(site).join("tiny.qcow2"), image()).unwrap();
    let op = stack.operator(site).await;
    let r = ops(&op, site, "deploy", deploy_body(vm, "tiny.qcow2"))
        .await
        .unwrap();
    let m = wait_migration(&op, site, r["migration"].as_str().unwrap()).await;
    assert_eq!(m["phase"], "committed", "{m}");
}

/// `site`'s view of `vm`.
async fn view(stack: &Stack, site: &str, vm: &str) -> Value {
    let op = stack.operator(site).await;
    let v = ops(&op, site, "vms", json!({"vm": vm})).await.unwrap();
    v["vms"][0].clone()
}

/// The VM's DMTF state, asked through the Control interface of `site`'s operator.
async fn state(stack: &Stack, site: &str, vm: &str) -> Value {
    let op = stack.operator(site).await;
    let q = ops(
        &op,
        site,
        "control",
        json!({"vm": vm, "change": {"kind": "query"}}),
    )
    .await
    .unwrap();
    q["state"].clone()
}

/// The disk of `vm` on `host` of `site`, if its files are there.
fn disk(stack: &Stack, site: &str, host: &str, vm: &str) -> Option<Vec<u8>> {
    std::fs::read(stack.vm_root(site, host).join(vm).join("disk-vda.qcow2")).ok()
}

fn endpoint(offer: &Offer) -> Endpoint {
    Endpoint {
        proxy: offer.proxy.clone(),
        token: offer.token,
    }
}

/// A destination abort of `vm` in `migration_id` with `offer`'s token.
fn abort(migration_id: MigrationId, vm: &str, offer: &Offer) -> AbortMigration {
    AbortMigration {
        migration_id,
        vm: VmId::new(vm).unwrap(),
        side: HandOverSide::Destination,
        endpoint: endpoint(offer),
        reason: "offer not used".into(),
    }
}

/// A destination commit of `vm` in `migration_id` with `offer`'s token.
fn commit(migration_id: MigrationId, vm: &str, offer: &Offer) -> CommitMigration {
    CommitMigration {
        migration_id,
        vm: VmId::new(vm).unwrap(),
        side: HandOverSide::Destination,
        endpoint: endpoint(offer),
    }
}

/// Partner `p` obtains a real offer at `t` for a VM of its own, then aborts and commits naming
/// `victim-1`, which runs at `t` for primary `v`: both are refused as `token_mismatch` and the
/// victim keeps running with its files and record. Site `v`, using `p`'s leaked token for `p`'s
/// own VM, is refused too. `p`'s abort of its own offer succeeds, and so does a commit `p`
/// makes at the end of its own placement.
#[tokio::test]
async fn a_token_acts_only_on_its_own_vm_and_for_the_site_it_was_offered_to() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let stack = Stack::start(
        &binary,
        vec![
            SiteSpec::new("t")
                .partner("v", 0)
                .partner("p", 0)
                .host("t1", 4096),
            SiteSpec::new("v").partner("t", 10),
            SiteSpec::new("p").partner("t", 10),
        ],
    )
    .await;
    deploy(&stack, "v", "victim-1").await;
    let before = view(&stack, "t", "victim-1").await;
    assert_eq!(before["upstream"], "v", "{before}");
    assert_eq!(before["next_hop"], "host:t1", "{before}");
    assert_eq!(disk(&stack, "t", "t1", "victim-1"), Some(image()));
    assert_eq!(state(&stack, "v", "victim-1").await, "enabled");

    // p asks t for a place for its own VM: a real offer, journaled as opened for p.
    let p = signed_as(&stack, "p", Duration::from_secs(10)).await;
    let m = MigrationId::random();
    let offers: Offers = call(
        &p,
        "t",
        FederationOp::MigrationRequest,
        &migration_request(m, descriptor(&stack, "p-vm-1", "p")),
    )
    .await
    .unwrap();
    let offer = offers.offers.first().expect("t offers a place").clone();

    // p names the victim next to its token: refused before any host is touched.
    let r: Result<Aborted, _> = call(
        &p,
        "t",
        FederationOp::MigrationAbort,
        &abort(m, "victim-1", &offer),
    )
    .await;
    assert_eq!(code(r), ErrorCode::TokenMismatch);
    let r: Result<Committed, _> = call(
        &p,
        "t",
        FederationOp::MigrationCommit,
        &commit(m, "victim-1", &offer),
    )
    .await;
    assert_eq!(code(r), ErrorCode::TokenMismatch);

    // v holds p's token (leaked) and uses it for p's VM: not the site the offer was made to.
    let v = signed_as(&stack, "v", Duration::from_secs(10)).await;
    let r: Result<Aborted, _> = call(
        &v,
        "t",
        FederationOp::MigrationAbort,
        &abort(m, "p-vm-1", &offer),
    )
    .await;
    assert_eq!(code(r), ErrorCode::Refused);
    let r: Result<Committed, _> = call(
        &v,
        "t",
        FederationOp::MigrationCommit,
        &commit(m, "p-vm-1", &offer),
    )
    .await;
    assert_eq!(code(r), ErrorCode::Refused);
    let initiate = InitiateTransfer {
        migration_id: m,
        vm: VmId::new("p-vm-1").unwrap(),
        source: endpoint(&offer),
        destination: endpoint(&offer),
        max_bytes_per_sec: None,
    };
    let r: Result<TransferStatusReply, _> =
        call(&v, "t", FederationOp::TransferInitiate, &initiate).await;
    assert_eq!(code(r), ErrorCode::Refused);

    // The victim is untouched: running, its files and t's record as before.
    assert_eq!(state(&stack, "v", "victim-1").await, "enabled");
    assert_eq!(disk(&stack, "t", "t1", "victim-1"), Some(image()));
    assert_eq!(view(&stack, "t", "victim-1").await, before);

    // p's abort of its own offer succeeds (and again: idempotent).
    for _ in 0..2 {
        let _: Aborted = call(
            &p,
            "t",
            FederationOp::MigrationAbort,
            &abort(m, "p-vm-1", &offer),
        )
        .await
        .unwrap();
    }
    // p's own placement at t commits: its daemon's commit names its own offer.
    deploy(&stack, "p", "p-vm-2").await;
    let placed = view(&stack, "t", "p-vm-2").await;
    assert_eq!(placed["upstream"], "p", "{placed}");
    assert_eq!(placed["phase"], "placed", "{placed}");
    assert_eq!(disk(&stack, "t", "t1", "p-vm-2"), Some(image()));
    assert_eq!(state(&stack, "v", "victim-1").await, "enabled");
    assert_eq!(disk(&stack, "t", "t1", "victim-1"), Some(image()));
    assert_eq!(view(&stack, "t", "victim-1").await, before);
    stack.shutdown().await;
}

/// Site `u` accepts no foreign VMs. Partner `p` claims `u` as the primary of a VM it invents,
/// and asks for a place for `u`'s own VM: both refused, and `u`'s VM runs on with its record.
/// `u` itself, the rightful primary, places and moves its VM.
#[tokio::test]
async fn a_claim_of_this_site_as_primary_does_not_bypass_its_policy() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let stack = Stack::start(
        &binary,
        vec![
            SiteSpec::new("u")
                .partner("p", 0)
                .host("u1", 4096)
                .host("u2", 4096)
                .policy("accept_foreign = false"),
            SiteSpec::new("p").partner("u", 10),
        ],
    )
    .await;
    deploy(&stack, "u", "home-1").await;
    let before = view(&stack, "u", "home-1").await;
    let host = before["next_hop"].as_str().unwrap().to_string();

    let p = signed_as(&stack, "p", Duration::from_secs(10)).await;
    let ask = |vm: &'static str, primary: &'static str| {
        let p = &p;
        let d = descriptor(&stack, vm, primary);
        async move {
            let r: Result<Offers, _> = call(
                p,
                "u",
                FederationOp::MigrationRequest,
                &migration_request(MigrationId::random(), d),
            )
            .await;
            code(r)
        }
    };
    // A foreign VM: the policy. The same VM claimed to be u's: the claim is checked first.
    assert_eq!(ask("p-vm-1", "p").await, ErrorCode::Refused);
    assert_eq!(ask("forged-1", "u").await, ErrorCode::Refused);
    // u's own VM, asked for by a site that is not on its chain.
    assert_eq!(ask("home-1", "u").await, ErrorCode::Conflict);
    assert_eq!(view(&stack, "u", "home-1").await, before);
    assert_eq!(state(&stack, "u", "home-1").await, "enabled");

    // u moves its own VM to its other host.
    let op = stack.operator("u").await;
    let r = ops(&op, "u", "migrate", json!({"vm": "home-1", "to_site": "u"}))
        .await
        .unwrap();
    let m = wait_migration(&op, "u", r["migration"].as_str().unwrap()).await;
    assert_eq!(m["phase"], "committed", "{m}");
    let after = view(&stack, "u", "home-1").await;
    assert_ne!(after["next_hop"], host.as_str(), "{after}");
    assert_eq!(state(&stack, "u", "home-1").await, "enabled");
    stack.shutdown().await;
}

/// `victim-1` of primary `v` runs at `t`. Partner `p` asks `t` for a place for it, prepares it,
/// powers it off and tells `v` to take it back: all refused, and it runs on. Its upstream `v`
/// moves it to `t`'s other host (Migration request, prepare and commit from `v`), and `t`'s
/// eviction notice makes `v` take it home.
#[tokio::test]
async fn requests_about_a_held_vm_are_heard_only_along_its_chain() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let stack = Stack::start(
        &binary,
        vec![
            SiteSpec::new("t")
                .partner("v", 0)
                .partner("p", 0)
                .host("t1", 4096)
                .host("t2", 4096),
            // Its own host below t's preference: v places its VM at t. It pins p, so p's
            // requests reach its roles (p pins only t and never offers v anything).
            SiteSpec::new("v")
                .partner("t", 10)
                .partner("p", 0)
                .host("v1", 4096),
            SiteSpec::new("p").partner("t", 10),
        ],
    )
    .await;
    deploy(&stack, "v", "victim-1").await;
    let before = view(&stack, "t", "victim-1").await;
    assert_eq!(before["upstream"], "v", "{before}");
    let host = before["next_hop"].as_str().unwrap().to_string();
    let vm = VmId::new("victim-1").unwrap();

    let p = signed_as(&stack, "p", Duration::from_secs(10)).await;
    for primary in ["v", "p"] {
        let r: Result<Offers, _> = call(
            &p,
            "t",
            FederationOp::MigrationRequest,
            &migration_request(
                MigrationId::random(),
                descriptor(&stack, "victim-1", primary),
            ),
        )
        .await;
        assert_eq!(code(r), ErrorCode::Conflict, "claiming primary {primary}");
    }
    let prepare = PrepareMigration {
        migration_id: MigrationId::random(),
        vm: vm.clone(),
        mode: PrepareMode::Shutdown,
        max_bytes_per_sec: None,
    };
    let r: Result<Prepared, _> = call(&p, "t", FederationOp::MigrationPrepare, &prepare).await;
    assert_eq!(code(r), ErrorCode::Refused);
    let power_off = ControlRequest {
        vm: vm.clone(),
        change: ControlChange::SetState {
            transition: StateTransition::PowerOff,
        },
    };
    let r: Result<ControlReply, _> = call(&p, "t", FederationOp::VmControl, &power_off).await;
    assert_eq!(code(r), ErrorCode::Refused);
    let notice = EvictionNotice {
        notice_id: NoticeId::random(),
        vm: vm.clone(),
        reason: "maintenance".into(),
        deadline_ms: u64::MAX,
    };
    let r: Result<EvictionAccepted, _> = call(&p, "v", FederationOp::MigrationEvict, &notice).await;
    assert_eq!(code(r), ErrorCode::Refused);
    assert_eq!(state(&stack, "v", "victim-1").await, "enabled");
    assert_eq!(view(&stack, "t", "victim-1").await, before);
    let at_v = view(&stack, "v", "victim-1").await;
    assert_eq!(at_v["next_hop"], "site:t", "{at_v}");
    assert_eq!(at_v["migrations"].as_array().unwrap().len(), 1, "{at_v}");

    // The upstream moves it to t's other host: its Migration request, prepare and commit.
    let op_v = stack.operator("v").await;
    let r = ops(
        &op_v,
        "v",
        "migrate",
        json!({"vm": "victim-1", "to_site": "t"}),
    )
    .await
    .unwrap();
    let m = wait_migration(&op_v, "v", r["migration"].as_str().unwrap()).await;
    assert_eq!(m["phase"], "committed", "{m}");
    let moved = view(&stack, "t", "victim-1").await;
    assert_ne!(moved["next_hop"], host.as_str(), "{moved}");
    assert_eq!(moved["upstream"], "v", "{moved}");
    assert_eq!(state(&stack, "v", "victim-1").await, "enabled");

    // The downstream's eviction notice is heard: v takes the VM home.
    let op_t = stack.operator("t").await;
    let sent = ops(&op_t, "t", "evict", json!({"vm": "victim-1"}))
        .await
        .unwrap();
    assert_eq!(sent["sent_to"], "v", "{sent}");
    wait_until(LONG, "v takes the VM home", || async {
        let at_v = ops(&op_v, "v", "vms", json!({"vm": "victim-1"})).await?;
        let at_v = &at_v["vms"][0];
        if at_v["next_hop"] == "host:v1" && at_v["phase"] == "placed" {
            Ok(())
        } else {
            Err(at_v.to_string())
        }
    })
    .await
    .unwrap();
    assert_eq!(disk(&stack, "v", "v1", "victim-1"), Some(image()));
    stack.shutdown().await;
}
