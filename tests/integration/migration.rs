//! The migration protocol end to end (paper section III): real site daemons, Transfer proxies
//! and host agents (libvirt test driver) on a real hub + leaf federation.

use std::time::Duration;

use futures::StreamExt as _;
use nubis_testkit::{require_nats_server, wait_until, Role};
use serde_json::{json, Value};

use crate::stack::{ops, SiteSpec, Stack};

const LONG: Duration = Duration::from_secs(90);

fn deploy_body(vm: &str, image: Option<&str>) -> Value {
    json!({
        "vm": vm,
        "name": "test VM",
        "hardware": {
            "vcpus": 1,
            "memory_mib": 256,
            "disks": [{"name": "vda", "capacity_bytes": 1048576, "format": "qcow2", "image": image}],
            "networks": [],
        },
    })
}

async fn wait_migration(client: &async_nats::Client, site: &str, migration: &str) -> Value {
    wait_until(
        LONG,
        format!("migration {migration} at {site} ends"),
        || async {
            let v = ops(client, site, "vms", json!({"migration": migration})).await?;
            match v["phase"].as_str() {
                Some("committed") | Some("aborted") => Ok(v),
                other => Err(format!("phase {other:?}: {v}")),
            }
        },
    )
    .await
    .unwrap()
}

async fn vm_view(client: &async_nats::Client, site: &str, vm: &str) -> Result<Value, String> {
    let v = ops(client, site, "vms", json!({"vm": vm})).await?;
    Ok(v["vms"][0].clone())
}

/// Usage scenario 1: A has no room, B delegates to C; the VM runs at C; A knows only B.
#[tokio::test]
async fn scenario_1_placement_is_delegated_a_b_c() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let stack = Stack::start(
        &binary,
        vec![
            SiteSpec {
                id: "a",
                partners: vec![("b", 10)],
                hosts: vec![],
                policy: "",
                top: "",
            },
            SiteSpec {
                id: "b",
                partners: vec![("a", 0), ("c", 10)],
                hosts: vec![("rack9-full", 128)],
                policy: "",
                top: "",
            },
            SiteSpec {
                id: "c",
                partners: vec![("b", 0)],
                hosts: vec![("rack7-node3", 4096)],
                policy: "",
                top: "",
            },
        ],
    )
    .await;
    // An observer on the hub sees everything that crosses a site boundary.
    let observer = stack.fed.connect_as("hub", Role::Operator).await.unwrap();
    let mut seen = observer.subscribe(">").await.unwrap();
    observer.flush().await.unwrap();
    let image = stack.image_store("a").join("tiny.qcow2");
    std::fs::write(&image, vec![7u8; 300_000]).unwrap();
    let op_a = stack.operator("a").await;
    let op_b = stack.operator("b").await;
    let op_c = stack.operator("c").await;
    let r = ops(
        &op_a,
        "a",
        "deploy",
        deploy_body("web-1", Some("tiny.qcow2")),
    )
    .await
    .unwrap();
    let m = wait_migration(&op_a, "a", r["migration"].as_str().unwrap()).await;
    assert_eq!(m["phase"], "committed", "{m}");
    assert_eq!(m["bytes_done"], m["bytes_total"], "{m}");

    // The chain: a → b → c → host h1 of c.
    let at_a = vm_view(&op_a, "a", "web-1").await.unwrap();
    assert_eq!(at_a["next_hop"], "site:b", "{at_a}");
    assert_eq!(at_a["upstream"], Value::Null);
    let at_b = vm_view(&op_b, "b", "web-1").await.unwrap();
    assert_eq!(at_b["upstream"], "a", "{at_b}");
    assert_eq!(at_b["next_hop"], "site:c", "{at_b}");
    let at_c = vm_view(&op_c, "c", "web-1").await.unwrap();
    assert_eq!(at_c["upstream"], "b", "{at_c}");
    assert_eq!(at_c["next_hop"], "host:rack7-node3", "{at_c}");

    // The image arrived byte for byte on c's host.
    let received = std::fs::read(
        stack
            .vm_root("c", "rack7-node3")
            .join("web-1")
            .join("disk-vda.qcow2"),
    )
    .unwrap();
    assert_eq!(received, std::fs::read(&image).unwrap());

    // The Control interface from the primary, two hops away, in DMTF terms.
    let q = ops(
        &op_a,
        "a",
        "control",
        json!({"vm": "web-1", "change": {"kind": "query"}}),
    )
    .await
    .unwrap();
    assert_eq!(q["state"], "enabled", "{q}");
    let p = ops(
        &op_a,
        "a",
        "control",
        json!({"vm": "web-1", "change": {"kind": "set_state", "transition": "pause"}}),
    )
    .await
    .unwrap();
    assert_eq!(p["state"], "paused", "{p}");
    assert_eq!(p["cim_enabled_state"], 9);
    let p = ops(
        &op_a,
        "a",
        "control",
        json!({"vm": "web-1", "change": {"kind": "set_state", "transition": "resume"}}),
    )
    .await
    .unwrap();
    assert_eq!(p["state"], "enabled", "{p}");

    // A monitoring specifier changed at the primary reaches the host; every site on the chain
    // keeps the new descriptor version.
    let spec = json!([{"data_point": "cpu.utilisation", "monitoring_interval_ms": 500,
        "delivery_interval_ms": 5000, "format": {"kind": "processed", "aggregate": "max"}}]);
    let change = json!({"vm": "web-1", "change": {"kind": "set_monitoring", "monitoring": spec}});
    let c1 = ops(&op_a, "a", "control", change).await.unwrap();
    assert_eq!(c1["descriptor_version"], 2, "{c1}");
    for (op, site) in [(&op_a, "a"), (&op_b, "b"), (&op_c, "c")] {
        let v = vm_view(op, site, "web-1").await.unwrap();
        assert_eq!(v["descriptor_version"], 2, "at {site}: {v}");
    }
    // Shut down and start again through the chain, in DMTF terms.
    let state = |t: &str| json!({"vm": "web-1", "change": {"kind": "set_state", "transition": t}});
    let off = ops(&op_a, "a", "control", state("shutdown")).await.unwrap();
    assert_eq!(off["state"], "disabled", "{off}");
    assert_eq!(off["cim_enabled_state"], 3);
    let on = ops(&op_a, "a", "control", state("start")).await.unwrap();
    assert_eq!(on["state"], "enabled", "{on}");

    // An unknown VM is a clear refusal.
    let e = ops(
        &op_a,
        "a",
        "control",
        json!({"vm": "nope", "change": {"kind": "query"}}),
    )
    .await
    .unwrap_err();
    assert!(e.contains("unknown_vm"), "{e}");

    // Location unawareness: nothing that crossed the hub names a host, a path or a libvirt URI.
    let root = stack.root().to_string_lossy().into_owned();
    let mut count = 0;
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(200), seen.next()).await {
        count += 1;
        let text = String::from_utf8_lossy(&msg.payload);
        for secret in [
            "rack7-node3",
            "rack9-full",
            root.as_str(),
            "test:///",
            "qemu:///",
        ] {
            assert!(
                !text.contains(secret),
                "{secret:?} crossed the hub on {}: {text}",
                msg.subject
            );
        }
        assert!(
            !msg.subject.starts_with("nubis.site."),
            "site-internal subject crossed the hub: {}",
            msg.subject
        );
    }
    assert!(count > 10, "the observer saw only {count} messages");
    stack.shutdown().await;
}

async fn next_hop(client: &async_nats::Client, site: &str, vm: &str) -> Result<String, String> {
    let v = vm_view(client, site, vm).await?;
    v["next_hop"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("no next hop: {v}"))
}

/// Usage scenario 2: the site running the VM evicts it; the site that delegated it becomes
/// Controller and re-places it at another partner; files move site to site directly.
#[tokio::test]
async fn scenario_2_eviction_replaces_the_vm_elsewhere() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let stack = Stack::start(
        &binary,
        vec![
            SiteSpec {
                id: "a",
                partners: vec![("b", 10)],
                hosts: vec![],
                policy: "",
                top: "",
            },
            SiteSpec {
                id: "b",
                partners: vec![("a", 0), ("c", 10), ("d", 5)],
                hosts: vec![],
                policy: "",
                top: "",
            },
            SiteSpec {
                id: "c",
                partners: vec![("b", 0)],
                hosts: vec![("c1", 4096)],
                policy: "",
                top: "",
            },
            SiteSpec {
                id: "d",
                partners: vec![("b", 0)],
                hosts: vec![("d1", 4096)],
                policy: "",
                top: "",
            },
        ],
    )
    .await;
    std::fs::write(
        stack.image_store("a").join("tiny.qcow2"),
        vec![3u8; 200_000],
    )
    .unwrap();
    let ops_of = |s: &'static str| stack.operator(s);
    let (op_a, op_b) = (ops_of("a").await, ops_of("b").await);
    let r = ops(
        &op_a,
        "a",
        "deploy",
        deploy_body("db-1", Some("tiny.qcow2")),
    )
    .await
    .unwrap();
    let m = wait_migration(&op_a, "a", r["migration"].as_str().unwrap()).await;
    assert_eq!(m["phase"], "committed", "{m}");
    let first = next_hop(&op_b, "b", "db-1").await.unwrap();
    let (x, y) = if first == "site:c" {
        ("c", "d")
    } else {
        ("d", "c")
    };
    assert_eq!(first, format!("site:{x}"));
    let op_x = ops_of(x).await;
    let op_y = ops_of(y).await;

    // x must get rid of the VM (host maintenance): an eviction notice goes to b.
    let notice = ops(&op_x, x, "evict", json!({"vm": "db-1"})).await.unwrap();
    assert_eq!(notice["sent_to"], "b", "{notice}");
    wait_until(LONG, "b re-places the VM at y", || async {
        let hop = next_hop(&op_b, "b", "db-1").await?;
        let view = vm_view(&op_b, "b", "db-1").await?;
        if hop == format!("site:{y}") && view["phase"] == "placed" {
            Ok(())
        } else {
            Err(view.to_string())
        }
    })
    .await
    .unwrap();
    // The chain ends correct: a → b → y → y's host; x forgot the VM and freed its files.
    assert_eq!(next_hop(&op_a, "a", "db-1").await.unwrap(), "site:b");
    let at_y = vm_view(&op_y, y, "db-1").await.unwrap();
    assert_eq!(at_y["upstream"], "b", "{at_y}");
    assert_eq!(at_y["next_hop"], format!("host:{y}1"), "{at_y}");
    wait_until(LONG, "x released the VM", || async {
        let v = ops(&op_x, x, "vms", json!({})).await?;
        if v["vms"].as_array().is_some_and(|a| a.is_empty()) {
            Ok(())
        } else {
            Err(v.to_string())
        }
    })
    .await
    .unwrap();
    assert!(
        !stack.vm_root(x, &format!("{x}1")).join("db-1").exists(),
        "x still holds the VM's files"
    );
    let disk = stack
        .vm_root(y, &format!("{y}1"))
        .join("db-1")
        .join("disk-vda.qcow2");
    assert_eq!(std::fs::read(disk).unwrap(), vec![3u8; 200_000]);
    stack.shutdown().await;
}

/// Usage scenario 3: host to host inside one site, with the same protocol.
#[tokio::test]
async fn scenario_3_local_migration_between_hosts() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let stack = Stack::start(
        &binary,
        vec![SiteSpec {
            id: "a",
            partners: vec![],
            hosts: vec![("n1", 4096), ("n2", 4096)],
            policy: "",
            top: "",
        }],
    )
    .await;
    std::fs::write(
        stack.image_store("a").join("tiny.qcow2"),
        vec![9u8; 100_000],
    )
    .unwrap();
    let op_a = stack.operator("a").await;
    let r = ops(
        &op_a,
        "a",
        "deploy",
        deploy_body("app-1", Some("tiny.qcow2")),
    )
    .await
    .unwrap();
    let m = wait_migration(&op_a, "a", r["migration"].as_str().unwrap()).await;
    assert_eq!(m["phase"], "committed", "{m}");
    let before = next_hop(&op_a, "a", "app-1").await.unwrap();
    let other = if before == "host:n1" { "n2" } else { "n1" };

    let r = ops(
        &op_a,
        "a",
        "migrate",
        json!({"vm": "app-1", "to_site": "a"}),
    )
    .await
    .unwrap();
    let m = wait_migration(&op_a, "a", r["migration"].as_str().unwrap()).await;
    assert_eq!(m["phase"], "committed", "{m}");
    // A running VM moves with its saved memory state, not only its disk.
    assert!(m["bytes_total"].as_u64().unwrap() > 100_000, "{m}");
    assert_eq!(
        next_hop(&op_a, "a", "app-1").await.unwrap(),
        format!("host:{other}")
    );
    let old = before.trim_start_matches("host:");
    assert!(
        !stack.vm_root("a", old).join("app-1").exists(),
        "the old host still holds the VM"
    );
    let disk = stack
        .vm_root("a", other)
        .join("app-1")
        .join("disk-vda.qcow2");
    assert_eq!(std::fs::read(disk).unwrap(), vec![9u8; 100_000]);
    let q = ops(
        &op_a,
        "a",
        "control",
        json!({"vm": "app-1", "change": {"kind": "query"}}),
    )
    .await
    .unwrap();
    let view = vm_view(&op_a, "a", "app-1").await.unwrap();
    assert_eq!(q["state"], "enabled", "{q} {view}");
    stack.shutdown().await;
}

/// Failure paths: a destination with no room refuses, and a source site that is down makes
/// the migration abort cleanly; in both cases the VM stays where it was, running.
#[tokio::test]
async fn refused_and_unreachable_migrations_leave_the_vm_in_place() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let mut stack = Stack::start(
        &binary,
        vec![
            SiteSpec {
                id: "a",
                partners: vec![("b", 10), ("c", 5)],
                hosts: vec![],
                policy: "",
                top: "",
            },
            SiteSpec {
                id: "b",
                partners: vec![("a", 0)],
                hosts: vec![("b1", 4096)],
                policy: "",
                top: "",
            },
            SiteSpec {
                id: "c",
                partners: vec![("a", 0)],
                hosts: vec![("c1", 128)],
                policy: "",
                top: "",
            },
        ],
    )
    .await;
    std::fs::write(stack.image_store("a").join("tiny.qcow2"), vec![5u8; 50_000]).unwrap();
    let op_a = stack.operator("a").await;
    let r = ops(
        &op_a,
        "a",
        "deploy",
        deploy_body("svc-1", Some("tiny.qcow2")),
    )
    .await
    .unwrap();
    let m = wait_migration(&op_a, "a", r["migration"].as_str().unwrap()).await;
    assert_eq!(m["phase"], "committed", "{m}");
    assert_eq!(next_hop(&op_a, "a", "svc-1").await.unwrap(), "site:b");

    // c has no room: the migration towards it finds no offer and aborts.
    let r = ops(
        &op_a,
        "a",
        "migrate",
        json!({"vm": "svc-1", "to_site": "c"}),
    )
    .await
    .unwrap();
    let m = wait_migration(&op_a, "a", r["migration"].as_str().unwrap()).await;
    assert_eq!(m["phase"], "aborted", "{m}");
    assert!(m["reason"].as_str().unwrap().contains("no_capacity"), "{m}");
    assert_eq!(next_hop(&op_a, "a", "svc-1").await.unwrap(), "site:b");
    let q = ops(
        &op_a,
        "a",
        "control",
        json!({"vm": "svc-1", "change": {"kind": "query"}}),
    )
    .await
    .unwrap();
    assert_eq!(q["state"], "enabled", "{q}");

    // A deploy of an image the primary does not have is refused before anything moves.
    let r = ops(
        &op_a,
        "a",
        "deploy",
        deploy_body("svc-2", Some("missing.qcow2")),
    )
    .await
    .unwrap();
    let m = wait_migration(&op_a, "a", r["migration"].as_str().unwrap()).await;
    assert_eq!(m["phase"], "aborted", "{m}");
    assert!(m["reason"].as_str().unwrap().contains("image store"), "{m}");
    let view = vm_view(&op_a, "a", "svc-2").await.unwrap();
    assert_eq!(view["phase"], "unplaced", "{view}");

    // b goes down: a migration of its VM cannot prepare the source and aborts cleanly.
    stack.stop_site("b").await;
    let r = ops(&op_a, "a", "migrate", json!({"vm": "svc-1"}))
        .await
        .unwrap();
    let m = wait_migration(&op_a, "a", r["migration"].as_str().unwrap()).await;
    assert_eq!(m["phase"], "aborted", "{m}");
    assert_eq!(next_hop(&op_a, "a", "svc-1").await.unwrap(), "site:b");
    // A second migration may be asked for at once: the first left the VM settled.
    let view = vm_view(&op_a, "a", "svc-1").await.unwrap();
    assert_eq!(view["phase"], "placed", "{view}");
    stack.shutdown().await;
}

/// Every federation handler refuses forged, stale, replayed, misdirected and malformed requests
/// with a signed error reply carrying the envelope layer's code, before any role acts.
#[tokio::test]
async fn every_handler_refuses_what_the_envelope_layer_refuses() {
    use nubis_protocol::envelope::{self, now_ms, Addressing, SignedEnvelope};
    use nubis_protocol::identity::SiteIdentity;
    use nubis_protocol::message::{ErrorReply, TransferToken, TransferVerification};
    use nubis_protocol::subject::{FederationOp, Subject};
    use nubis_protocol::{codec, MigrationId, SiteId, VmId};

    let Some(binary) = require_nats_server() else {
        return;
    };
    let stack = Stack::start(
        &binary,
        vec![
            SiteSpec {
                id: "a",
                partners: vec![("b", 0)],
                hosts: vec![],
                policy: "",
                top: "",
            },
            SiteSpec {
                id: "b",
                partners: vec![("a", 0)],
                hosts: vec![],
                policy: "",
                top: "",
            },
        ],
    )
    .await;
    let a = stack.identities["a"].clone();
    let b = SiteId::new("b").unwrap();
    let client = stack.fed.connect("a").await.unwrap();
    let body = TransferVerification {
        migration_id: MigrationId::random(),
        vm: VmId::new("x").unwrap(),
        source: nubis_protocol::message::Endpoint {
            proxy: "nats://b/proxy/p1".parse().unwrap(),
            token: TransferToken::random(),
        },
    };
    let code_of = |payload: &[u8]| -> String {
        let env = SignedEnvelope::decode(payload).unwrap();
        assert_eq!(env.from, "b", "the refusal is signed by the refusing site");
        assert_eq!(env.body_type, "ErrorReply");
        codec::from_slice::<ErrorReply>(&env.body)
            .unwrap()
            .code
            .as_str()
            .to_string()
    };
    let send = |subject: String, bytes: Vec<u8>| {
        let client = client.clone();
        async move {
            client
                .request(subject, bytes.into())
                .await
                .unwrap()
                .payload
                .to_vec()
        }
    };
    let impostor = SiteIdentity::generate(SiteId::new("a").unwrap());
    for op in FederationOp::ALL {
        let subject = Subject::federation(&b, op).as_str().to_string();
        let sign = |who: &SiteIdentity, subj: &str, ts: u64| {
            envelope::sign(who, Addressing::request(&b, subj), &body, ts)
                .unwrap()
                .encode()
                .unwrap()
        };
        let forged = send(subject.clone(), sign(&impostor, &subject, now_ms())).await;
        assert_eq!(code_of(&forged), "bad_signature", "{subject}");
        let stale = send(subject.clone(), sign(&a, &subject, now_ms() - 600_000)).await;
        assert_eq!(code_of(&stale), "stale", "{subject}");
        let elsewhere = "nubis.fed.b.somewhere.else";
        let misdirected = send(subject.clone(), sign(&a, elsewhere, now_ms())).await;
        assert_eq!(code_of(&misdirected), "wrong_subject", "{subject}");
        let garbage = send(subject.clone(), b"\xc1not msgpack".to_vec()).await;
        assert_eq!(code_of(&garbage), "malformed", "{subject}");
        // A valid request reaches the role (which answers in its own terms) once, not twice.
        let valid = sign(&a, &subject, now_ms());
        let first = send(subject.clone(), valid.clone()).await;
        assert_ne!(code_of_or_ok(&first), "replayed", "{subject}");
        let again = send(subject.clone(), valid).await;
        assert_eq!(code_of(&again), "replayed", "{subject}");
    }
    stack.shutdown().await;

    fn code_of_or_ok(payload: &[u8]) -> String {
        let env = SignedEnvelope::decode(payload).unwrap();
        if env.body_type == "ErrorReply" {
            codec::from_slice::<ErrorReply>(&env.body)
                .unwrap()
                .code
                .as_str()
                .to_string()
        } else {
            "ok".into()
        }
    }
}

/// Beyond the site's limit of concurrent migrations, placements wait in a queue whose position
/// the status shows, and every one of them completes.
#[tokio::test]
async fn migrations_beyond_the_limit_queue_and_complete() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let stack = Stack::start(
        &binary,
        vec![SiteSpec {
            id: "a",
            partners: vec![],
            hosts: vec![("n1", 8192)],
            policy: "",
            top: "max_concurrent_migrations = 1",
        }],
    )
    .await;
    // Large enough that the first placement is still moving when the others are asked for.
    std::fs::write(
        stack.image_store("a").join("big.qcow2"),
        vec![6u8; 24 << 20],
    )
    .unwrap();
    let op_a = stack.operator("a").await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let r = ops(
            &op_a,
            "a",
            "deploy",
            deploy_body(&format!("q-{i}"), Some("big.qcow2")),
        )
        .await
        .unwrap();
        ids.push(r["migration"].as_str().unwrap().to_string());
    }
    let last = ops(&op_a, "a", "vms", json!({"migration": ids[2]}))
        .await
        .unwrap();
    assert_eq!(last["phase"], "queued", "{last}");
    assert!(last["queue_position"].as_u64().unwrap() >= 1, "{last}");
    for id in &ids {
        let m = wait_migration(&op_a, "a", id).await;
        assert_eq!(m["phase"], "committed", "{m}");
        assert_eq!(m["queue_position"], 0, "{m}");
    }
    stack.shutdown().await;
}

/// The Controller is killed with SIGKILL in the middle of a transfer and started again: it
/// resumes the migration from its journal, and afterwards the VM is active exactly once, at the
/// destination, with its disk intact; the source released it.
#[tokio::test]
async fn a_controller_killed_mid_transfer_resumes_from_its_journal() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let mut stack = Stack::start(
        &binary,
        vec![
            SiteSpec {
                id: "a",
                partners: vec![("b", 10), ("c", 5)],
                hosts: vec![],
                policy: "",
                top: "",
            },
            SiteSpec {
                id: "b",
                partners: vec![("a", 0)],
                hosts: vec![("b1", 4096)],
                policy: "",
                top: "",
            },
            SiteSpec {
                id: "c",
                partners: vec![("a", 0)],
                hosts: vec![("c1", 4096)],
                policy: "",
                top: "",
            },
        ],
    )
    .await;
    let image: Vec<u8> = (0..96u32 << 20).map(|i| (i % 253) as u8).collect();
    std::fs::write(stack.image_store("a").join("big.qcow2"), &image).unwrap();
    let op_a = stack.operator("a").await;
    let r = ops(&op_a, "a", "deploy", deploy_body("db-9", Some("big.qcow2")))
        .await
        .unwrap();
    let m = wait_migration(&op_a, "a", r["migration"].as_str().unwrap()).await;
    assert_eq!(m["phase"], "committed", "{m}");
    assert_eq!(next_hop(&op_a, "a", "db-9").await.unwrap(), "site:b");

    let mut site_a = stack.site_daemon_as_process("a").await;
    stack.wait_ready("a").await;
    let r = ops(&op_a, "a", "migrate", json!({"vm": "db-9", "to_site": "c"}))
        .await
        .unwrap();
    let id = r["migration"].as_str().unwrap().to_string();
    wait_until(LONG, "the transfer under way", || async {
        let v = ops(&op_a, "a", "vms", json!({"migration": id})).await?;
        if v["phase"] == "transferring" {
            Ok(())
        } else {
            Err(v.to_string())
        }
    })
    .await
    .unwrap();
    site_a.kill().unwrap(); // SIGKILL
    site_a.wait().unwrap();

    let mut site_a = stack.spawn_site_process("a");
    let m = wait_migration(&op_a, "a", &id).await;
    assert_eq!(m["phase"], "committed", "{m}");
    let log = std::fs::read_to_string(stack.root().join("a-site.log")).unwrap();
    assert!(log.contains("resuming migration from the journal"), "{log}");

    // Active exactly once: at c, running, disk intact; b forgot it and freed its files.
    assert_eq!(next_hop(&op_a, "a", "db-9").await.unwrap(), "site:c");
    let q = ops(
        &op_a,
        "a",
        "control",
        json!({"vm": "db-9", "change": {"kind": "query"}}),
    )
    .await
    .unwrap();
    assert_eq!(q["state"], "enabled", "{q}");
    let op_b = stack.operator("b").await;
    wait_until(LONG, "b released the VM", || async {
        let v = ops(&op_b, "b", "vms", json!({})).await?;
        if v["vms"].as_array().is_some_and(|a| a.is_empty()) {
            Ok(())
        } else {
            Err(v.to_string())
        }
    })
    .await
    .unwrap();
    assert!(!stack.vm_root("b", "b1").join("db-9").exists());
    let disk = std::fs::read(stack.vm_root("c", "c1").join("db-9").join("disk-vda.qcow2")).unwrap();
    assert!(disk == image, "the disk changed on the way");
    site_a.kill().unwrap();
    site_a.wait().unwrap();
    stack.shutdown().await;
}
