//! Location unawareness: a member learns of a VM only what its part in it needs. A site that is
//! neither on a VM's chain nor the Controller of its move, subscribed to everything its own
//! server lets it hear, hears no transfer progress and nothing that places the VM at a site;
//! the directory names no site running the VM under relay delivery. Beside each refusal, the
//! legitimate counterpart: the Controller follows the transfer's progress to its end, and the
//! primary finds the VM's Producers in the directory.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt as _;
use nubis_protocol::envelope::SignedEnvelope;
use nubis_protocol::message::{ProducerRegistration, TransferProgress};
use nubis_protocol::ops::{MigrationPhase, MigrationView};
use nubis_protocol::MigrationId;
use nubis_testkit::{require_nats_server, wait_until, Role};
use serde_json::json;

use crate::stack::{deploy_body, ops, ops_client, wait_migration, SiteSpec, Stack};

const LONG: Duration = Duration::from_secs(90);
const VM: &str = "vm-loc";

/// Everything one subscriber heard: subject and payload.
type Heard = Arc<Mutex<Vec<(String, Bytes)>>>;

/// Subscribes `client` to `subject` and keeps everything it hears until the test ends.
async fn listen(client: async_nats::Client, subject: &str) -> Heard {
    let mut sub = client.subscribe(subject.to_string()).await.unwrap();
    client.flush().await.unwrap();
    let heard: Heard = Arc::default();
    let into = heard.clone();
    tokio::spawn(async move {
        let _client = client;
        while let Some(m) = sub.next().await {
            into.lock()
                .unwrap()
                .push((m.subject.to_string(), m.payload.clone()));
        }
    });
    heard
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// Every key and value of the directory whose key names `vm`, read on the hub (which holds
/// what any member may read).
async fn directory_of(stack: &Stack, vm: &str) -> Result<Vec<(String, Bytes)>, String> {
    let hub = stack.fed.connect(nubis_testkit::HUB).await.unwrap();
    let kv = jetstream::with_domain(hub, "hub")
        .get_key_value("nubis-directory")
        .await
        .map_err(|e| e.to_string())?;
    let mut keys = kv.keys().await.map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    while let Some(k) = keys.next().await {
        let k = k.map_err(|e| e.to_string())?;
        if !k.split('.').any(|t| t == vm) {
            continue;
        }
        if let Some(v) = kv.get(&k).await.map_err(|e| e.to_string())? {
            out.push((k, v));
        }
    }
    Ok(out)
}

/// The Producer registrations of `vm` written by `site`.
fn producers_by<'a>(
    entries: &'a [(String, Bytes)],
    site: &'a str,
) -> impl Iterator<Item = &'a (String, Bytes)> + 'a {
    let prefix = format!("producer.{site}.{VM}.");
    entries.iter().filter(move |(k, _)| k.starts_with(&prefix))
}

/// A VM of `alpha` placed through `bravo` at `charlie` or `delta`, moved by `bravo` (its
/// Controller) to the other one, with a bandwidth cap that makes the transfer last. `xray`
/// belongs to the federation and nothing else.
#[tokio::test]
async fn a_site_off_the_chain_learns_nothing_of_where_a_vm_runs_or_moves() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let stack = Stack::start(
        &binary,
        vec![
            SiteSpec::new("alpha").partner("bravo", 10),
            SiteSpec::new("bravo")
                .partner("alpha", 0)
                .partner("charlie", 10)
                .partner("delta", 5),
            SiteSpec::new("charlie")
                .partner("bravo", 0)
                .host("charlie1", 4096),
            SiteSpec::new("delta")
                .partner("bravo", 0)
                .host("delta1", 4096),
            SiteSpec::new("xray"),
        ],
    )
    .await;
    // Everything xray's own server lets its administrator hear, from before the VM exists.
    let xray = listen(
        stack.fed.connect_as("xray", Role::Admin).await.unwrap(),
        ">",
    )
    .await;

    std::fs::write(
        stack.image_store("alpha").join("img.qcow2"),
        vec![7u8; 8 << 20],
    )
    .unwrap();
    let op_alpha = stack.operator("alpha").await;
    let mut body = deploy_body(VM, "img.qcow2");
    body["monitoring"] = json!([{"data_point": "cpu.utilisation", "monitoring_interval_ms": 200,
                                 "delivery_interval_ms": 400, "format": {"kind": "raw"}}]);
    let r = ops(&op_alpha, "alpha", "deploy", body).await.unwrap();
    let m = wait_migration(&op_alpha, "alpha", r["migration"].as_str().unwrap()).await;
    assert_eq!(m["phase"], "committed", "{m}");
    let op_bravo = stack.operator("bravo").await;
    let hop = ops(&op_bravo, "bravo", "vms", json!({"vm": VM}))
        .await
        .unwrap()["vms"][0]["next_hop"]
        .as_str()
        .unwrap()
        .to_string();
    let (from, to) = match hop.as_str() {
        "site:charlie" => ("charlie", "delta"),
        "site:delta" => ("delta", "charlie"),
        other => panic!("vm placed at {other}"),
    };

    // The primary finds the VM's Producer in the directory, registered under its own id;
    // nothing there names the site that runs the VM.
    wait_until(LONG, "the primary's producer registration", || async {
        let entries = directory_of(&stack, VM).await?;
        if producers_by(&entries, "alpha").count() > 0 {
            Ok(())
        } else {
            Err(format!(
                "{:?}",
                entries.iter().map(|(k, _)| k).collect::<Vec<_>>()
            ))
        }
    })
    .await
    .unwrap();
    let entries = directory_of(&stack, VM).await.unwrap();
    for (key, value) in producers_by(&entries, "alpha") {
        let env = SignedEnvelope::decode(value).unwrap();
        assert_eq!(env.from, "alpha", "{key}");
        let reg: ProducerRegistration = nubis_protocol::codec::from_slice(&env.body).unwrap();
        assert_eq!(reg.vm.as_str(), VM);
        assert_eq!(reg.subject, format!("nubis.mon.alpha.{VM}.>"));
    }

    // alpha, the primary but neither the Controller nor an end of the move, listens for
    // progress from here on.
    let alpha_progress = listen(
        stack.fed.connect_as("alpha", Role::Admin).await.unwrap(),
        "nubis.proxy.*.*.progress.>",
    )
    .await;
    // The destination's own operators hear its proxy's progress (the legitimate counterpart of
    // what no other site hears).
    let own_progress = listen(
        stack.fed.connect_as(to, Role::Operator).await.unwrap(),
        &format!("nubis.proxy.{to}.*.progress.>"),
    )
    .await;
    // The Controller's view: progress read from Initiate transfer, hop by hop.
    let r = ops(
        &op_bravo,
        "bravo",
        "migrate",
        json!({"vm": VM, "to_site": to, "max_bytes_per_sec": 2u64 << 20}),
    )
    .await
    .unwrap();
    let id: MigrationId = r["migration"].as_str().unwrap().parse().unwrap();
    let mut views: Vec<MigrationView> = Vec::new();
    let end = tokio::time::timeout(
        Duration::from_secs(120),
        ops_client(&op_bravo, "bravo")
            .follow_migration(&id, Duration::from_millis(50), |v| views.push(v.clone())),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(end.phase, MigrationPhase::Committed, "{end:?}");
    assert!(end.bytes_total >= 8 << 20, "{end:?}");
    assert_eq!(end.bytes_done, end.bytes_total, "{end:?}");
    assert!(
        views
            .iter()
            .any(|v| v.bytes_done > 0 && v.bytes_done < v.bytes_total),
        "the Controller saw no progress in between: {views:?}"
    );
    wait_until(LONG, "the VM runs at the destination", || async {
        let v = ops(&op_bravo, "bravo", "vms", json!({"vm": VM})).await?;
        if v["vms"][0]["next_hop"] == format!("site:{to}") && v["vms"][0]["phase"] == "placed" {
            Ok(())
        } else {
            Err(v.to_string())
        }
    })
    .await
    .unwrap();
    // Monitoring flows from the new site up to the primary, which stores and publishes it.
    let batches = |site: &'static str| {
        let stack = &stack;
        async move {
            let op = stack.operator(site).await;
            let v = ops(&op, site, "usage", json!({"vm": VM})).await?;
            Ok::<u64, String>(v["batches"].as_u64().unwrap_or(0))
        }
    };
    let at_primary = batches("alpha").await.unwrap();
    wait_until(LONG, "batches from the new site at the primary", || async {
        match (batches(to).await?, batches("alpha").await?) {
            (t, a) if t > 0 && a >= at_primary + 2 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
    .unwrap();

    wait_until(LONG, "the destination's own progress events", || async {
        let events: Vec<TransferProgress> = own_progress
            .lock()
            .unwrap()
            .iter()
            .map(|(_, p)| {
                let env = SignedEnvelope::decode(p).unwrap();
                nubis_protocol::codec::from_slice(&env.body).unwrap()
            })
            .collect();
        if events
            .iter()
            .any(|e| e.vm.as_str() == VM && e.finished && e.bytes_done == e.bytes_total)
        {
            Ok(())
        } else {
            Err(format!("{events:?}"))
        }
    })
    .await
    .unwrap();
    // No progress of the move reached the primary, which does not take part in it.
    let heard = alpha_progress.lock().unwrap().clone();
    assert!(
        heard
            .iter()
            .all(|(s, _)| s.starts_with("nubis.proxy.alpha.")),
        "{:?}",
        heard.iter().map(|(s, _)| s).collect::<Vec<_>>()
    );
    // xray heard some of the federation (the public monitoring of the VM, published by its
    // primary), but no progress event, and nothing that names the VM with a site running it.
    let heard = xray.lock().unwrap().clone();
    assert!(
        heard
            .iter()
            .any(|(s, _)| s.starts_with(&format!("nubis.mon.alpha.{VM}."))),
        "xray heard no public monitoring"
    );
    for (subject, payload) in &heard {
        assert!(!subject.contains(".progress."), "{subject}");
        let names_vm = subject.contains(VM) || contains(payload, VM);
        for site in [from, to] {
            let names_site = subject.contains(site) || contains(payload, site);
            assert!(!(names_vm && names_site), "{subject} places {VM} at {site}");
        }
    }
    // The directory names neither site that ran the VM, in a key or a value about it.
    let entries = directory_of(&stack, VM).await.unwrap();
    assert!(producers_by(&entries, "alpha").next().is_some());
    for (key, value) in &entries {
        for site in [from, to] {
            assert!(
                !key.contains(site) && !contains(value, site),
                "{key} names {site}"
            );
        }
    }
    stack.shutdown().await;
}
