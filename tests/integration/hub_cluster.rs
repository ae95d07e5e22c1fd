//! The hub as a cluster of three nats-server nodes: any one node may die (SIGKILL) or be
//! restarted at any moment of a migration, and the federation carries on through the other two.
//! Faults land at chosen points: the Controller is held at a step of its own (see
//! `nubis-test-site`) while a node is killed, or the transfer is paced so that a node dies while
//! bytes are moving.

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::jetstream;
use nubis_testkit::{wait_until, Federation, HUB_DOMAIN};
use serde_json::json;

use crate::migration::{send_signal, wait_stopped};
use crate::stack::{deploy_body, ops, ops_client, wait_migration, Layout, SiteSpec, Stack};

const LONG: Duration = Duration::from_secs(90);
const DIRECTORY: &str = "nubis-directory";

/// a delegates to b (preferred) or c; b and c each have one host.
fn sites() -> Vec<SiteSpec> {
    vec![
        SiteSpec::new("a").partner("b", 10).partner("c", 5),
        SiteSpec::new("b").partner("a", 0).host("b1", 4096),
        SiteSpec::new("c").partner("a", 0).host("c1", 4096),
    ]
}

/// Deploys `vm` from a's image store; it lands at b. Returns nothing but asserts the commit.
async fn deploy_at_b(stack: &Stack, vm: &str, image: &str) {
    let op = stack.operator("a").await;
    let r = ops(&op, "a", "deploy", deploy_body(vm, image))
        .await
        .unwrap();
    let m = wait_migration(&op, "a", r["migration"].as_str().unwrap()).await;
    assert_eq!(m["phase"], "committed", "{m}");
    assert_eq!(where_is(stack, vm).await, ["b"]);
}

/// The sites among b and c whose own list holds `vm`: exactly one once it is placed.
async fn where_is(stack: &Stack, vm: &str) -> Vec<&'static str> {
    let mut at = Vec::new();
    for site in ["b", "c"] {
        let op = stack.operator(site).await;
        let v = ops(&op, site, "vms", json!({})).await.unwrap();
        let listed = v["vms"]
            .as_array()
            .is_some_and(|vms| vms.iter().any(|r| r["vm"] == vm));
        if listed {
            at.push(site);
        }
    }
    at
}

/// Waits until `vm` is listed at `site` alone among b and c (the source releases it shortly
/// after the commit).
async fn wait_only_at(stack: &Stack, vm: &str, site: &'static str) {
    wait_until(LONG, format!("{vm} only at {site}"), || async {
        let at = where_is(stack, vm).await;
        if at == [site] {
            Ok(())
        } else {
            Err(format!("listed at {at:?}"))
        }
    })
    .await
    .unwrap();
}

/// The hub node site `site`'s leaf connection is on.
async fn node_of(fed: &Federation, site: &str) -> String {
    wait_until(LONG, format!("{site} connected to a hub node"), || async {
        fed.hub_node_of(site)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "not connected".to_owned())
    })
    .await
    .unwrap()
}

/// The hub node a clustered stream's leader runs on, asked through `client`.
async fn stream_leader(client: &async_nats::Client, stream: &str) -> String {
    let js = jetstream::with_domain(client.clone(), HUB_DOMAIN);
    wait_until(LONG, format!("{stream} has a leader"), || async {
        let mut s = js.get_stream(stream).await.map_err(|e| e.to_string())?;
        let info = s.info().await.map_err(|e| e.to_string())?;
        info.cluster
            .as_ref()
            .and_then(|c| c.leader.clone())
            .ok_or_else(|| "no leader".to_owned())
    })
    .await
    .unwrap()
}

/// The directory bucket, through `client`'s site; a site whose hub node just died reconnects to
/// another within seconds.
async fn bucket(client: &async_nats::Client) -> jetstream::kv::Store {
    let js = jetstream::with_domain(client.clone(), HUB_DOMAIN);
    wait_until(LONG, "the directory reachable", || async {
        js.get_key_value(DIRECTORY).await.map_err(|e| e.to_string())
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn the_directory_is_replicated_and_stays_writable_with_two_of_three_nodes() {
    let Some(binary) = nubis_testkit::require_nats_server() else {
        return;
    };
    let mut fed = Federation::start_cluster(&binary, &["a", "b"], 3, |_| None)
        .await
        .unwrap();
    assert_eq!(fed.hub_nodes(), ["hub", "hub-2", "hub-3"]);
    let hub = fed.connect("hub").await.unwrap();
    let js = jetstream::with_domain(hub.clone(), HUB_DOMAIN);
    let mut stream = js.get_stream(format!("KV_{DIRECTORY}")).await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.config.num_replicas, 3);
    let peers = info.cluster.as_ref().map_or(0, |c| c.replicas.len());
    assert_eq!(peers, 2, "{:?}", info.cluster);

    // Kill the node that leads the directory's stream: the two others elect a new leader, and
    // a site writes its own key and the other site reads it.
    let leader = stream_leader(&hub, &format!("KV_{DIRECTORY}")).await;
    fed.kill(&leader).await.unwrap();
    let b = fed.connect("b").await.unwrap();
    let directory_b = bucket(&b).await;
    let revision = wait_until(LONG, "b writes its directory key", || async {
        directory_b
            .put("site.b", "written with a node down".into())
            .await
            .map_err(|e| e.to_string())
    })
    .await
    .unwrap();
    let a = fed.connect("a").await.unwrap();
    let directory_a = bucket(&a).await;
    let entry = directory_a.entry("site.b").await.unwrap().unwrap();
    assert_eq!(entry.revision, revision);
    assert_eq!(&entry.value[..], b"written with a node down");
    // A site still writes no other site's key, whichever node it is on.
    assert!(directory_b.put("site.a", "squat".into()).await.is_err());

    // The node comes back on its store and catches up: all three replicas current again.
    fed.restart(&leader).await.unwrap();
    let hub = fed.connect("hub").await.unwrap();
    let js = jetstream::with_domain(hub, HUB_DOMAIN);
    wait_until(LONG, "three current replicas", || async {
        let mut s = js
            .get_stream(format!("KV_{DIRECTORY}"))
            .await
            .map_err(|e| e.to_string())?;
        let info = s.info().await.map_err(|e| e.to_string())?;
        let cluster = info.cluster.clone().ok_or("no cluster info")?;
        let current = cluster.replicas.iter().filter(|p| p.current).count();
        if cluster.leader.is_some() && current == 2 {
            Ok(())
        } else {
            Err(format!("{cluster:?}"))
        }
    })
    .await
    .unwrap();
    fed.shutdown().await.unwrap();
}

/// The Controller (a) is held once it has journaled its offers, before it prepares the source;
/// the hub node a's leaf connection is on is killed; the Controller goes on through another
/// node and the migration commits, with the VM at c alone.
#[tokio::test]
async fn a_hub_node_killed_in_the_control_phase_does_not_stop_the_migration() {
    let Some(binary) = nubis_testkit::require_nats_server() else {
        return;
    };
    let mut stack = Stack::start_clustered(&binary, sites(), 3).await;
    std::fs::write(stack.image_store("a").join("img.qcow2"), vec![3u8; 1 << 20]).unwrap();
    deploy_at_b(&stack, "hc-1", "img.qcow2").await;

    let mut plain = stack.site_daemon_as_process("a").await;
    plain.kill().unwrap();
    plain.wait().unwrap();
    let mut controller = stack.spawn_site_process_with(
        "a",
        "a-site-held.log",
        &[(
            "NUBIS_TEST_STOP_AT",
            "offers journaled; preparing the source",
        )],
    );
    stack.wait_ready("a").await;
    let op = stack.operator("a").await;
    let r = ops(&op, "a", "migrate", json!({"vm": "hc-1", "to_site": "c"}))
        .await
        .unwrap();
    let migration = r["migration"].as_str().unwrap().to_string();
    wait_stopped(&controller, "the Controller").await;

    let node = node_of(&stack.fed, "a").await;
    stack.fed.kill(&node).await.unwrap();
    send_signal(&controller, "CONT");

    let m = wait_migration(&op, "a", &migration).await;
    assert_eq!(m["phase"], "committed", "{m}");
    wait_only_at(&stack, "hc-1", "c").await;
    let vms = ops(&op, "a", "vms", json!({"vm": "hc-1"})).await.unwrap();
    assert_eq!(vms["vms"][0]["next_hop"], "site:c", "{vms}");

    controller.kill().unwrap();
    controller.wait().unwrap();
    stack.shutdown().await;
}

/// A paced transfer from b to c is under way when the hub node carrying c's leaf connection
/// (through which c's proxy fetches) is killed: the proxy resumes through another node, the
/// files verify, and the disk at c is the one that left b.
#[tokio::test]
async fn a_hub_node_killed_mid_transfer_leaves_a_verified_transfer() {
    let Some(binary) = nubis_testkit::require_nats_server() else {
        return;
    };
    let mut stack = Stack::start_clustered(&binary, sites(), 3).await;
    let image: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(stack.image_store("a").join("big.qcow2"), &image).unwrap();
    deploy_at_b(&stack, "hc-2", "big.qcow2").await;

    let op = stack.operator("a").await;
    let r = ops(
        &op,
        "a",
        "migrate",
        json!({"vm": "hc-2", "to_site": "c", "max_bytes_per_sec": 512 * 1024}),
    )
    .await
    .unwrap();
    let migration: nubis_protocol::MigrationId = r["migration"].as_str().unwrap().parse().unwrap();
    let client = ops_client(&op, "a");
    wait_until(LONG, "bytes moving", || async {
        let view = client
            .migration(&migration)
            .await
            .map_err(|e| e.to_string())?;
        if view.bytes_done > 0 && view.bytes_done < view.bytes_total {
            Ok(())
        } else {
            Err(format!("{view:?}"))
        }
    })
    .await
    .unwrap();
    let node = node_of(&stack.fed, "c").await;
    stack.fed.kill(&node).await.unwrap();

    let m = wait_migration(&op, "a", &migration.to_string()).await;
    assert_eq!(m["phase"], "committed", "{m}");
    assert_eq!(m["bytes_done"], m["bytes_total"], "{m}");
    wait_only_at(&stack, "hc-2", "c").await;
    let disk = std::fs::read(stack.vm_root("c", "c1").join("hc-2").join("disk-vda.qcow2")).unwrap();
    assert!(disk == image, "the disk changed on the way");
    stack.shutdown().await;
}

/// Every node of the hub is restarted in turn, each while two migrations are under way; every
/// migration commits and each VM ends at exactly one site.
#[tokio::test]
async fn a_rolling_restart_of_the_hub_during_migrations_places_every_vm_once() {
    let Some(binary) = nubis_testkit::require_nats_server() else {
        return;
    };
    let mut stack = Stack::start_clustered(&binary, sites(), 3).await;
    std::fs::write(stack.image_store("a").join("img.qcow2"), vec![5u8; 2 << 20]).unwrap();
    let vms = ["rr-1", "rr-2"];
    for vm in vms {
        deploy_at_b(&stack, vm, "img.qcow2").await;
    }
    let op = stack.operator("a").await;
    let mut at = "b";
    let nodes: Vec<String> = stack
        .fed
        .hub_nodes()
        .into_iter()
        .map(str::to_owned)
        .collect();
    for node in nodes {
        let to = if at == "b" { "c" } else { "b" };
        let mut migrations = Vec::new();
        for vm in vms {
            let r = ops(&op, "a", "migrate", json!({"vm": vm, "to_site": to}))
                .await
                .unwrap();
            migrations.push(r["migration"].as_str().unwrap().to_string());
        }
        stack.fed.restart(&node).await.unwrap();
        for migration in &migrations {
            let m = wait_migration(&op, "a", migration).await;
            assert_eq!(m["phase"], "committed", "restarting {node}: {m}");
        }
        for vm in vms {
            wait_only_at(&stack, vm, to).await;
        }
        at = to;
    }
    stack.shutdown().await;
}

/// The message ids (`<signer>.<producer>.<epoch>.<seq>`) of `vm`'s batches in `site`'s
/// accounting stream.
async fn accounting_ids(stack: &Stack, site: &str, vm: &str) -> BTreeSet<String> {
    stack
        .accounting_ids(site, Some(vm))
        .await
        .unwrap()
        .into_iter()
        .collect()
}

/// Waits until `site`'s accounting holds at least `n` batches of `vm` more than `before`.
async fn wait_more(stack: &Stack, site: &str, vm: &str, before: usize, n: usize) -> usize {
    wait_until(
        LONG,
        format!("{n} more batches of {vm} at {site}"),
        || async {
            let now = accounting_ids(stack, site, vm).await.len();
            if now >= before + n {
                Ok(now)
            } else {
                Err(format!("{now} batches"))
            }
        },
    )
    .await
    .unwrap()
}

/// a → b → c, the VM measured at c every 100 ms. While batches flow, the hub node carrying b's
/// leaf connection is killed, and then c's link is cut for 15 s. Every batch c's host agent was
/// told is stored (c's accounting, which it is told only after) reaches a's accounting, each
/// once: it waited in c's (and b's) outbox until acknowledged.
#[tokio::test]
async fn every_batch_a_host_was_told_is_stored_reaches_the_primary_through_faults() {
    let Some(binary) = nubis_testkit::require_nats_server() else {
        return;
    };
    let layout = Layout {
        hub_nodes: 3,
        linked: vec!["c"],
    };
    let mut stack = Stack::start_full(
        &binary,
        vec![
            SiteSpec::new("a").partner("b", 10),
            SiteSpec::new("b").partner("a", 0).partner("c", 10),
            SiteSpec::new("c").partner("b", 0).host("c1", 4096),
        ],
        &[],
        &layout,
    )
    .await;
    std::fs::write(stack.image_store("a").join("img.qcow2"), vec![1u8; 4096]).unwrap();
    let mut body = deploy_body("mon-1", "img.qcow2");
    body["monitoring"] = json!([{"data_point": "cpu.utilisation", "monitoring_interval_ms": 100,
        "delivery_interval_ms": 0, "format": {"kind": "raw"}}]);
    let op = stack.operator("a").await;
    let r = ops(&op, "a", "deploy", body).await.unwrap();
    let m = wait_migration(&op, "a", r["migration"].as_str().unwrap()).await;
    assert_eq!(m["phase"], "committed", "{m}");

    let seen = wait_more(&stack, "c", "mon-1", 0, 5).await;
    let node = node_of(&stack.fed, "b").await;
    stack.fed.kill(&node).await.unwrap();
    let seen = wait_more(&stack, "c", "mon-1", seen, 10).await;
    let link = stack.fed.link("c").expect("c's link");
    link.cut();
    // c's host agent goes on being told its batches are stored: c keeps them in its outbox.
    let seen = wait_more(&stack, "c", "mon-1", seen, 20).await;
    tokio::time::sleep(Duration::from_secs(15)).await;
    link.restore();
    wait_more(&stack, "c", "mon-1", seen, 10).await;
    stack.fed.restart(&node).await.unwrap();

    // Everything c stored as of now reaches a, each batch once. Ids are scoped by the hop that
    // signed the batch (c at c, b at a): compared by `<producer>.<epoch>.<seq>`.
    let batch_ids = |ids: BTreeSet<String>| -> BTreeSet<String> {
        ids.iter()
            .map(|id| id.split_once('.').map_or(id.clone(), |(_, b)| b.to_owned()))
            .collect()
    };
    let at_c = batch_ids(accounting_ids(&stack, "c", "mon-1").await);
    assert!(at_c.len() > 45, "{}", at_c.len());
    wait_until(LONG, "every batch stored at c reaches a", || async {
        let at_a = accounting_ids(&stack, "a", "mon-1").await;
        assert!(at_a.iter().all(|id| id.starts_with("b.")), "{at_a:?}");
        let at_a = batch_ids(at_a);
        let missing: Vec<&String> = at_c.difference(&at_a).collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("{} of {} missing at a", missing.len(), at_c.len()))
        }
    })
    .await
    .unwrap();
    let counters = ops(&stack.operator("c").await, "c", "monitoring", json!({}))
        .await
        .unwrap();
    assert_eq!(counters["delivered"]["failed"], 0, "{counters}");
    stack.shutdown().await;
}
