//! The migration protocol end to end (paper section III): real site daemons, Transfer proxies
//! and host agents (libvirt test driver) on a real hub + leaf federation.

use std::time::Duration;

use nubis_testkit::{require_nats_server, wait_until};
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
    wait_until(LONG, format!("migration {migration} at {site} ends"), || async {
        let v = ops(client, site, "vms", json!({"migration": migration})).await?;
        match v["phase"].as_str() {
            Some("committed") | Some("aborted") => Ok(v),
            other => Err(format!("phase {other:?}: {v}")),
        }
    })
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
    let Some(binary) = require_nats_server() else { return };
    let stack = Stack::start(
        &binary,
        vec![
            SiteSpec { id: "a", partners: vec![("b", 10)], hosts: vec![], policy: "" },
            SiteSpec { id: "b", partners: vec![("a", 0), ("c", 10)], hosts: vec![("h1", 0)], policy: "" },
            SiteSpec { id: "c", partners: vec![("b", 0)], hosts: vec![("h1", 4096)], policy: "" },
        ],
    )
    .await;
    let image = stack.image_store("a").join("tiny.qcow2");
    std::fs::write(&image, vec![7u8; 300_000]).unwrap();
    let op_a = stack.operator("a").await;
    let op_b = stack.operator("b").await;
    let op_c = stack.operator("c").await;
    wait_until(LONG, "sites see each other", || async {
        let v = ops(&op_a, "a", "status", json!({})).await?;
        if v["partners_reachable"] == 1 { Ok(()) } else { Err(v.to_string()) }
    })
    .await
    .unwrap();

    let r = ops(&op_a, "a", "deploy", deploy_body("web-1", Some("tiny.qcow2"))).await.unwrap();
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
    assert_eq!(at_c["next_hop"], "host:h1", "{at_c}");

    // The image arrived byte for byte on c's host.
    let received = std::fs::read(stack.vm_root("c", "h1").join("web-1").join("disk-vda.qcow2")).unwrap();
    assert_eq!(received, std::fs::read(&image).unwrap());

    // The Control interface from the primary, two hops away, in DMTF terms.
    let q = ops(&op_a, "a", "control", json!({"vm": "web-1", "change": {"kind": "query"}})).await.unwrap();
    assert_eq!(q["state"], "enabled", "{q}");
    let p = ops(&op_a, "a", "control", json!({"vm": "web-1", "change": {"kind": "set_state", "transition": "pause"}}))
        .await
        .unwrap();
    assert_eq!(p["state"], "paused", "{p}");
    assert_eq!(p["cim_enabled_state"], 9);
    let p = ops(&op_a, "a", "control", json!({"vm": "web-1", "change": {"kind": "set_state", "transition": "resume"}}))
        .await
        .unwrap();
    assert_eq!(p["state"], "enabled", "{p}");

    // An unknown VM is a clear refusal.
    let e = ops(&op_a, "a", "control", json!({"vm": "nope", "change": {"kind": "query"}})).await.unwrap_err();
    assert!(e.contains("unknown_vm"), "{e}");
    stack.shutdown().await;
}
