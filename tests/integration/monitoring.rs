//! Monitoring end to end (paper section IV): host agents measure and read the KPI filesystem,
//! their sites sign and deliver batches along the VM's chain (relay or bus), every site keeps
//! them in its accounting stream, consumers verify and open them. Real hub and leaf servers,
//! site daemons, Transfer proxies, host agents on libvirt's test driver, FUSE KPI mounts.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt as _;
use nubis_protocol::codec;
use nubis_protocol::envelope::{now_ms, sign, Addressing, SignedEnvelope};
use nubis_protocol::identity::SiteIdentity;
use nubis_protocol::message::{BatchPayload, ClearPayload, MonitoringBatch};
use nubis_protocol::SiteId;
use nubis_testkit::{require_nats_server, wait_until, Role};
use serde_json::{json, Value as Json};

use crate::stack::{ops, wait_migration, SiteSpec, Stack};

const LONG: Duration = Duration::from_secs(90);

fn site(
    id: &'static str,
    partners: Vec<(&'static str, i32)>,
    hosts: Vec<(&'static str, u64)>,
    top: &'static str,
) -> SiteSpec {
    SiteSpec {
        id,
        partners,
        hosts,
        policy: "",
        top,
    }
}

fn deploy_body(vm: &str, monitoring: Json) -> Json {
    json!({
        "vm": vm,
        "name": "monitored VM",
        "hardware": {
            "vcpus": 2,
            "memory_mib": 256,
            "disks": [{"name": "vda", "capacity_bytes": 1048576, "format": "qcow2", "image": "img.qcow2"}],
            "networks": [],
        },
        "monitoring": monitoring,
    })
}

fn raw(dp: &str, monitor_ms: u64, deliver_ms: u64) -> Json {
    json!({"data_point": dp, "monitoring_interval_ms": monitor_ms, "delivery_interval_ms": deliver_ms,
           "format": {"kind": "raw"}})
}

fn processed(dp: &str, monitor_ms: u64, deliver_ms: u64, aggregate: &str) -> Json {
    json!({"data_point": dp, "monitoring_interval_ms": monitor_ms, "delivery_interval_ms": deliver_ms,
           "format": {"kind": "processed", "aggregate": aggregate}})
}

/// Deploys `body` at `primary` and waits until the placement commits.
async fn deploy(stack: &Stack, primary: &str, body: Json) {
    std::fs::write(stack.image_store(primary).join("img.qcow2"), b"image").unwrap();
    let op = stack.operator(primary).await;
    let v = ops(&op, primary, "deploy", body).await.unwrap();
    let migration = v["migration"].as_str().unwrap().to_string();
    let end = wait_migration(&op, primary, &migration).await;
    assert_eq!(end["phase"], "committed", "{end}");
}

/// Writes one KPI report into the VM's mount, as the application in the VM would.
fn write_kpi(mount: &std::path::Path, table: &str, report: &str) {
    let path = mount.join("unencrypted").join(table);
    std::fs::write(&path, report).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// A verified, decoded batch as a consumer sees it.
#[derive(Debug, Clone)]
struct Seen {
    subject: String,
    from: String,
    batch: MonitoringBatch,
}

/// Decodes (and checks the signature of) a batch with the sender's key from the stack.
fn decode(stack: &Stack, subject: &str, raw: &[u8]) -> Seen {
    let env = SignedEnvelope::decode(raw).unwrap();
    let key = stack.identities[env.from.as_str()].public().signing;
    key.verify_strict(
        &env.signed_bytes(),
        &ed25519_dalek::Signature::from_bytes(&env.sig),
    )
    .unwrap();
    assert_eq!(env.body_type, "MonitoringBatch");
    assert_eq!(env.subject, subject);
    Seen {
        subject: subject.to_string(),
        from: env.from.clone(),
        batch: codec::from_slice(&env.body).unwrap(),
    }
}

fn clear(b: &MonitoringBatch) -> &ClearPayload {
    match &b.payload {
        BatchPayload::Clear(c) => c,
        BatchPayload::Sealed { .. } => panic!("sealed payload where a clear one was asked for"),
    }
}

/// Collects batches from `sub` until `done` says enough, or fails after `LONG`.
async fn collect(
    stack: &Stack,
    sub: &mut async_nats::Subscriber,
    what: &str,
    mut done: impl FnMut(&[Seen]) -> bool,
) -> Vec<Seen> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + LONG;
    while !done(&seen) {
        let m = tokio::time::timeout_at(deadline, sub.next())
            .await
            .unwrap_or_else(|_| panic!("{what}: gave up after {} batches: {seen:#?}", seen.len()))
            .unwrap();
        seen.push(decode(stack, &m.subject, &m.payload));
    }
    seen
}

fn kpi_values(seen: &[Seen], dp: &str) -> Vec<f64> {
    seen.iter()
        .filter_map(|s| match &s.batch.payload {
            BatchPayload::Clear(c) => Some(c.samples.clone()),
            BatchPayload::Sealed { .. } => None,
        })
        .flatten()
        .filter(|s| s.data_point.as_str() == dp)
        .filter_map(|s| s.value.as_f64())
        .collect()
}

/// How many batches of `vm` `site`'s accounting stream holds (as its `usage` endpoint counts
/// them).
async fn stored(stack: &Stack, site: &str, vm: &str) -> Result<u64, String> {
    let op = stack.operator(site).await;
    let v = ops(&op, site, "usage", json!({"vm": vm})).await?;
    Ok(v["batches"].as_u64().unwrap_or(0))
}

/// Waits until `site`'s accounting stream holds `more` batches of `vm` beyond what it holds
/// as soon as its site daemon answers.
async fn wait_more_stored(stack: &Stack, site: &str, vm: &str, more: u64) {
    let now = wait_until(LONG, format!("{site}'s site daemon answers"), || {
        stored(stack, site, vm)
    })
    .await
    .unwrap();
    wait_stored(stack, site, vm, now + more).await;
}

/// Waits until `site`'s accounting stream holds at least `batches` batches of `vm`.
async fn wait_stored(stack: &Stack, site: &str, vm: &str, batches: u64) {
    wait_until(
        LONG,
        format!("{batches} batches of {vm} stored at {site}"),
        || async {
            match stored(stack, site, vm).await? {
                n if n >= batches => Ok(()),
                n => Err(format!("{n} batches")),
            }
        },
    )
    .await
    .unwrap();
}

async fn monitoring_counters(stack: &Stack, site: &str) -> Json {
    let op = stack.operator(site).await;
    ops(&op, site, "monitoring", json!({})).await.unwrap()
}

/// Relay delivery on a 3-hop chain a → b → c: every site stores the batches, the public subject
/// carries them under the primary's signature only (c stays hidden), sealed batches open with
/// a's key alone, KPI values written into the FUSE mount at c reach a, and after c evicts the VM
/// (b moves it to d) the stream continues on the same subject.
#[tokio::test]
async fn relay_delivery_reaches_every_site_and_follows_a_migration() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let stack = Stack::start(
        &binary,
        vec![
            site("a", vec![("b", 10)], vec![], ""),
            site(
                "b",
                vec![("a", 0), ("c", 10), ("d", 5)],
                vec![("b-full", 128)],
                "",
            ),
            site("c", vec![("b", 0)], vec![("c1", 4096)], ""),
            site("d", vec![("b", 0)], vec![("d1", 4096)], ""),
        ],
    )
    .await;
    let op_a = stack.operator("a").await;
    let mut public = op_a.subscribe("nubis.mon.a.vm-r.>").await.unwrap();
    op_a.flush().await.unwrap();
    let mut sealed_spec = raw("mem.allocated_bytes", 200, 600);
    sealed_spec["sealed"] = json!(true);
    deploy(
        &stack,
        "a",
        deploy_body(
            "vm-r",
            json!([
                raw("cpu.utilisation", 200, 600),
                sealed_spec,
                raw("kpi.web.current_users", 0, 0)
            ]),
        ),
    )
    .await;

    // Infrastructure batches arrive on the public subject, signed by the primary only.
    let mount = stack.wait_kpi_mount("c", "c1", "vm-r", LONG).await.unwrap();
    write_kpi(&mount, "web", "current_users\n42\n");
    let seen = collect(&stack, &mut public, "relay batches at a", |s| {
        let cpu = s
            .iter()
            .any(|x| x.subject.ends_with(".infra.cpu.utilisation"));
        let mem = s
            .iter()
            .any(|x| x.subject.ends_with(".infra.mem.allocated_bytes"));
        cpu && mem && kpi_values(s, "kpi.web.current_users").contains(&42.0)
    })
    .await;
    assert!(
        seen.iter().all(|s| s.from == "a"),
        "relay: only the primary signs on the public subject"
    );
    for s in &seen {
        assert_eq!(s.batch.vm.as_str(), "vm-r");
        assert_eq!(s.batch.primary_site.as_str(), "a");
    }

    // Sealed batches: a's key opens them, b's and c's keys do not.
    let sealed: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.subject.ends_with(".infra.mem.allocated_bytes"))
        .collect();
    for s in &sealed {
        let BatchPayload::Sealed { ciphertext } = &s.batch.payload else {
            panic!("mem.allocated_bytes was to be sealed: {s:?}");
        };
        let opened =
            nubis_protocol::seal::open(stack.identities["a"].sealing_key(), ciphertext).unwrap();
        let payload: ClearPayload = codec::from_slice(&opened).unwrap();
        assert!(payload
            .samples
            .iter()
            .all(|x| x.data_point.as_str() == "mem.allocated_bytes"));
        assert!(payload
            .samples
            .iter()
            .any(|x| x.value.as_f64().unwrap_or(0.0) > 0.0));
        for other in ["b", "c"] {
            assert!(
                nubis_protocol::seal::open(stack.identities[other].sealing_key(), ciphertext)
                    .is_err()
            );
        }
    }
    for s in seen
        .iter()
        .filter(|s| s.subject.ends_with(".infra.cpu.utilisation"))
    {
        assert!(!clear(&s.batch).samples.is_empty());
    }

    // Every site of the chain keeps the batches in its accounting stream.
    for id in ["a", "b", "c"] {
        wait_stored(&stack, id, "vm-r", 1).await;
    }
    let usage_a = ops(&op_a, "a", "usage", json!({"vm": "vm-r"}))
        .await
        .unwrap();
    assert_eq!(
        usage_a["sealed_unreadable"], 0,
        "the primary reads its sealed batches: {usage_a}"
    );
    let usage_b = ops(
        &stack.operator("b").await,
        "b",
        "usage",
        json!({"vm": "vm-r"}),
    )
    .await
    .unwrap();
    assert!(
        usage_b["sealed_unreadable"].as_u64().unwrap_or(0) > 0,
        "b cannot: {usage_b}"
    );
    let counters_b = monitoring_counters(&stack, "b").await;
    assert!(counters_b.to_string().contains("relay"), "{counters_b}");

    // a, the primary, which publishes the VM's batches, registered its Producer under its own
    // id; c, which runs the VM, did not (its key would place the VM at c).
    let hub = stack.fed.connect("hub").await.unwrap();
    let kv = jetstream::with_domain(hub, "hub")
        .get_key_value("nubis-directory")
        .await
        .unwrap();
    let producers_by = |site: &'static str| {
        let kv = kv.clone();
        async move {
            let mut keys = kv.keys().await.map_err(|e| e.to_string())?;
            let mut names = Vec::new();
            while let Some(k) = keys.next().await {
                names.push(k.map_err(|e| e.to_string())?);
            }
            let prefix = format!("producer.{site}.vm-r.");
            Ok::<_, String>(names.into_iter().filter(|n| n.starts_with(&prefix)).count())
        }
    };
    wait_until(LONG, "a's producer registration of vm-r", || async {
        match producers_by("a").await? {
            0 => Err("none yet".to_string()),
            _ => Ok(()),
        }
    })
    .await
    .unwrap();
    assert_eq!(producers_by("b").await.unwrap(), 0);
    assert_eq!(producers_by("c").await.unwrap(), 0);

    let registered_at_a = producers_by("a").await.unwrap();
    // c evicts the VM; b (its upstream) moves it to d; batches keep coming on the same subject.
    let producers_before: BTreeSet<String> =
        seen.iter().map(|s| s.batch.producer.to_string()).collect();
    let op_c = stack.operator("c").await;
    ops(&op_c, "c", "evict", json!({"vm": "vm-r"}))
        .await
        .unwrap();
    let op_b = stack.operator("b").await;
    wait_until(LONG, "vm-r runs at d", || async {
        let v = ops(&op_b, "b", "vms", json!({"vm": "vm-r"})).await?;
        if v["vms"][0]["next_hop"] == "site:d" && v["vms"][0]["phase"] == "placed" {
            Ok(())
        } else {
            Err(v.to_string())
        }
    })
    .await
    .unwrap();
    let after = collect(&stack, &mut public, "batches after the migration", |s| {
        s.iter().any(|x| {
            x.subject.ends_with(".infra.cpu.utilisation")
                && !producers_before.contains(x.batch.producer.as_str())
        })
    })
    .await;
    assert!(after.iter().all(|s| s.from == "a"));
    // The primary registered the new Producer too; no site below it ever registered one.
    wait_until(LONG, "vm-r's new producer registered by a", || async {
        match producers_by("a").await? {
            n if n > registered_at_a => Ok(()),
            n => Err(format!("{n} registered by a")),
        }
    })
    .await
    .unwrap();
    for below in ["b", "c", "d"] {
        assert_eq!(producers_by(below).await.unwrap(), 0, "{below}");
    }
    let mount_d = stack.wait_kpi_mount("d", "d1", "vm-r", LONG).await.unwrap();
    write_kpi(&mount_d, "web", "current_users\n77\n");
    collect(&stack, &mut public, "KPI from d", |s| {
        kpi_values(s, "kpi.web.current_users").contains(&77.0)
    })
    .await;
    // The mount at c is gone with the VM.
    assert!(
        !mount.join("unencrypted").is_dir(),
        "c still has a KPI mount for vm-r"
    );
    stack.shutdown().await;
}

/// Bus delivery: the site running the VM publishes once on the public subject; the other sites
/// of the chain receive it from NATS, verify it and store it.
#[tokio::test]
async fn bus_delivery_reaches_every_site_of_the_chain() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let bus = "[monitoring]\ndelivery = \"bus\"\n";
    let stack = Stack::start(
        &binary,
        vec![
            site("a", vec![("b", 10)], vec![], bus),
            site("b", vec![("a", 0), ("c", 10)], vec![], bus),
            site("c", vec![("b", 0)], vec![("c1", 4096)], bus),
        ],
    )
    .await;
    let op_a = stack.operator("a").await;
    let mut public = op_a.subscribe("nubis.mon.a.vm-b.>").await.unwrap();
    op_a.flush().await.unwrap();
    deploy(
        &stack,
        "a",
        deploy_body("vm-b", json!([raw("cpu.utilisation", 200, 400)])),
    )
    .await;
    let seen = collect(&stack, &mut public, "bus batches", |s| s.len() >= 3).await;
    assert!(
        seen.iter().all(|s| s.from == "c"),
        "bus: published once, by the site running the VM"
    );
    // Sequence numbers of one producer epoch never repeat on the bus.
    let ids: BTreeSet<String> = seen.iter().map(|s| s.batch.message_id()).collect();
    assert_eq!(ids.len(), seen.len());
    // GMA: the Producer and the Consumers are registered in the directory by VM id.
    let hub = stack.fed.connect("hub").await.unwrap();
    let kv = jetstream::with_domain(hub, "hub")
        .get_key_value("nubis-directory")
        .await
        .unwrap();
    wait_until(LONG, "GMA registrations of vm-b", || async {
        let mut keys = kv.keys().await.map_err(|e| e.to_string())?;
        let mut names = Vec::new();
        while let Some(k) = keys.next().await {
            names.push(k.map_err(|e| e.to_string())?);
        }
        let has = |k: &str| names.iter().any(|n| n == k);
        // The Producer runs at c, which writes its registration under its own id.
        let producer = names.iter().any(|n| n.starts_with("producer.c.vm-b."));
        if has("consumer.vm-b.a") && has("consumer.vm-b.b") && producer {
            Ok(())
        } else {
            Err(format!("{names:?}"))
        }
    })
    .await
    .unwrap();
    for id in ["a", "b", "c"] {
        wait_stored(&stack, id, "vm-b", 2).await;
    }
    stack.shutdown().await;
}

/// What the specifiers promise, checked on what arrives: processed values equal the aggregate of
/// the raw samples of the same window; a predicate delivers nothing while false; a change
/// through the Control interface takes effect without a restart; an SLA rule raises its event.
#[tokio::test]
async fn specifiers_deliver_exactly_what_they_promise() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let sla = "[[sla]]\nname = \"crowded\"\ndata_point = \"kpi.web.current_users\"\nop = \"gt\"\nthreshold = 1000.0\nfor_ms = 300\naction = \"event\"\n";
    let stack = Stack::start(&binary, vec![site("a", vec![], vec![("h1", 4096)], sla)]).await;
    let op = stack.operator("a").await;
    let mut public = op.subscribe("nubis.mon.a.vm-s.>").await.unwrap();
    let mut events = op.subscribe("nubis.events.a.sla.>").await.unwrap();
    op.flush().await.unwrap();
    let dp = "kpi.web.current_users";
    deploy(
        &stack,
        "a",
        deploy_body(
            "vm-s",
            json!([
                raw(dp, 0, 1000),
                processed(dp, 0, 1000, "min"),
                processed(dp, 0, 1000, "max"),
                processed(dp, 0, 1000, "mean"),
                processed(dp, 0, 1000, "median"),
            ]),
        ),
    )
    .await;
    let mount = stack.wait_kpi_mount("a", "h1", "vm-s", LONG).await.unwrap();
    for v in [5, 9, 1, 14, 3, 8, 2, 11] {
        write_kpi(&mount, "web", &format!("current_users\n{v}\n"));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // Gather until the windows that saw the writes are delivered (raw and processed).
    let seen = collect(&stack, &mut public, "windows", |s| {
        let raw_n: usize = s.iter().map(|x| clear(&x.batch).samples.len()).sum();
        let proc_n: usize = s.iter().map(|x| clear(&x.batch).processed.len()).sum();
        raw_n >= 8 && proc_n >= 8
    })
    .await;
    let samples: Vec<(u64, f64)> = seen
        .iter()
        .flat_map(|s| clear(&s.batch).samples.clone())
        .map(|s| (s.ts_ms, s.value.as_f64().unwrap()))
        .collect();
    assert_eq!(
        samples.iter().map(|s| s.1).collect::<Vec<_>>(),
        vec![5.0, 9.0, 1.0, 14.0, 3.0, 8.0, 2.0, 11.0],
        "raw delivers every sample once, in order"
    );
    let mut checked = 0;
    for p in seen.iter().flat_map(|s| clear(&s.batch).processed.clone()) {
        let mut window: Vec<f64> = samples
            .iter()
            .filter(|(ts, _)| *ts >= p.window_start_ms && *ts < p.window_end_ms)
            .map(|(_, v)| *v)
            .collect();
        assert_eq!(p.window_end_ms - p.window_start_ms, 1000, "{p:?}");
        assert_eq!(p.count as usize, window.len(), "{p:?} vs {window:?}");
        window.sort_by(f64::total_cmp);
        let n = window.len();
        let expect = match p.aggregate {
            nubis_protocol::descriptor::Aggregate::Min => window[0],
            nubis_protocol::descriptor::Aggregate::Max => window[n - 1],
            nubis_protocol::descriptor::Aggregate::Mean => window.iter().sum::<f64>() / n as f64,
            nubis_protocol::descriptor::Aggregate::Median => {
                if n % 2 == 1 {
                    window[n / 2]
                } else {
                    (window[n / 2 - 1] + window[n / 2]) / 2.0
                }
            }
        };
        assert!(
            (p.value - expect).abs() < 1e-9,
            "{p:?}: expected {expect} from {window:?}"
        );
        checked += 1;
    }
    assert!(checked >= 8, "only {checked} processed values checked");

    // Runtime change: only values above 1000 are delivered from now on, and a probe data
    // point that only the new descriptor asks for.
    let probe = "kpi.probe.n";
    let mut probes = op
        .subscribe(format!("nubis.mon.a.vm-s.{probe}"))
        .await
        .unwrap();
    op.flush().await.unwrap();
    let control = ops(
        &op,
        "a",
        "control",
        json!({"vm": "vm-s", "change": {"kind": "set_monitoring", "monitoring": [
            {"data_point": dp, "monitoring_interval_ms": 0, "delivery_interval_ms": 0,
             "format": {"kind": "raw"}, "predicate": {"op": "gt", "threshold": 1000.0}},
            raw(probe, 0, 0)]}}),
    )
    .await
    .unwrap();
    assert!(
        control["descriptor_version"].as_u64().unwrap() > 1,
        "{control}"
    );
    // The producer applies the change at one of its next ticks: once a probe report comes
    // through, the new descriptor is in effect. Then drain what the old one had in flight.
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        write_kpi(&mount, "probe", "n\n1\n");
        match tokio::time::timeout(Duration::from_millis(500), probes.next()).await {
            Ok(Some(_)) => break,
            Ok(None) => panic!("the probe subscription ended"),
            Err(_) => assert!(
                tokio::time::Instant::now() < deadline,
                "the new descriptor never took effect"
            ),
        }
    }
    // Bounded: a stream that never pauses must not hold the test forever.
    let drained_by = tokio::time::Instant::now() + LONG;
    while tokio::time::Instant::now() < drained_by
        && matches!(
            tokio::time::timeout(Duration::from_millis(300), public.next()).await,
            Ok(Some(_))
        )
    {}
    for v in [5, 600, 999] {
        write_kpi(&mount, "web", &format!("current_users\n{v}\n"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Nothing of `dp` for a while (a late probe report may still come through).
    let quiet = tokio::time::timeout(Duration::from_millis(1500), async {
        loop {
            let m = public.next().await?;
            let seen = decode(&stack, &m.subject, &m.payload);
            if !kpi_values(std::slice::from_ref(&seen), dp).is_empty() {
                return Some(seen);
            }
        }
    })
    .await;
    assert!(
        quiet.is_err(),
        "a false predicate delivered something: {quiet:?}"
    );
    for v in [1500, 1700, 1800, 1900] {
        write_kpi(&mount, "web", &format!("current_users\n{v}\n"));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let hot = collect(&stack, &mut public, "predicate true", |s| {
        kpi_values(s, dp).contains(&1900.0)
    })
    .await;
    assert_eq!(kpi_values(&hot, dp), vec![1500.0, 1700.0, 1800.0, 1900.0]);

    // The SLA rule held for more than 300 ms: one event.
    let event = tokio::time::timeout(LONG, events.next())
        .await
        .unwrap()
        .unwrap();
    let event: Json = serde_json::from_slice(&event.payload).unwrap();
    assert_eq!(event["rule"], "crowded", "{event}");
    assert_eq!(event["vm"], "vm-s");
    assert!(event["value"].as_f64().unwrap() > 1000.0);
    stack.shutdown().await;
}

/// Forged, replayed, stale, malformed and misdirected batches sent to an Intermediary's relay
/// subject are dropped and counted; genuine ones are stored.
#[tokio::test]
async fn forged_replayed_and_stale_batches_are_dropped_and_counted() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let stack = Stack::start(
        &binary,
        vec![
            site("a", vec![("b", 10)], vec![], ""),
            site("b", vec![("a", 0), ("c", 10)], vec![], ""),
            site("c", vec![("b", 0)], vec![("c1", 4096)], ""),
        ],
    )
    .await;
    // Capture a genuine relay delivery c → b from the hub.
    let hub = stack.fed.connect("hub").await.unwrap();
    let mut relay = hub.subscribe("nubis.relay.b.>").await.unwrap();
    hub.flush().await.unwrap();
    deploy(
        &stack,
        "a",
        deploy_body("vm-f", json!([raw("cpu.utilisation", 200, 400)])),
    )
    .await;
    let genuine = tokio::time::timeout(LONG, relay.next())
        .await
        .unwrap()
        .unwrap();
    let subject = genuine.subject.to_string();
    let batch: MonitoringBatch =
        codec::from_slice(&SignedEnvelope::decode(&genuine.payload).unwrap().body).unwrap();
    let before = monitoring_counters(&stack, "b").await;

    let site_c = stack.fed.connect("c").await.unwrap();
    let b = SiteId::new("b").unwrap();
    let send = |bytes: Vec<u8>| {
        let site_c = site_c.clone();
        let subject = subject.clone();
        async move { site_c.publish(subject, bytes.into()).await.unwrap() }
    };
    // Forged: claims to be c, signed with another key.
    let impostor = SiteIdentity::generate(SiteId::new("c").unwrap());
    let mut forged = batch.clone();
    forged.seq += 1_000_000;
    send(
        sign(
            &impostor,
            Addressing::request(&b, &subject),
            &forged,
            now_ms(),
        )
        .unwrap()
        .encode()
        .unwrap(),
    )
    .await;
    // Replayed: the genuine message again.
    send(genuine.payload.to_vec()).await;
    // Stale: c's real key, ten minutes old.
    let mut stale = batch.clone();
    stale.seq += 2_000_000;
    send(
        sign(
            &stack.identities["c"],
            Addressing::request(&b, &subject),
            &stale,
            now_ms() - 600_000,
        )
        .unwrap()
        .encode()
        .unwrap(),
    )
    .await;
    // Malformed.
    send(b"\x93not an envelope".to_vec()).await;
    // Wrong sender: a is b's partner but not the VM's downstream.
    let mut wrong = batch.clone();
    wrong.seq += 3_000_000;
    send(
        sign(
            &stack.identities["a"],
            Addressing::request(&b, &subject),
            &wrong,
            now_ms(),
        )
        .unwrap()
        .encode()
        .unwrap(),
    )
    .await;
    site_c.flush().await.unwrap();

    let dropped = |v: &Json, reason: &str| v["dropped"][reason].as_u64().unwrap_or(0);
    let after = wait_until(LONG, "b counts the drops", || async {
        let v = monitoring_counters(&stack, "b").await;
        let ok = ["forged", "replayed", "stale", "malformed", "wrong_sender"]
            .iter()
            .all(|r| dropped(&v, r) > dropped(&before, r));
        if ok {
            Ok(v)
        } else {
            Err(v.to_string())
        }
    })
    .await
    .unwrap();
    for r in ["forged", "replayed", "stale", "malformed", "wrong_sender"] {
        assert_eq!(dropped(&after, r), dropped(&before, r) + 1, "{r}: {after}");
    }
    // None of them reached b's accounting stream.
    let ids = accounting_ids(&stack, "b", "vm-f").await;
    assert!(ids
        .iter()
        .all(|id| !id.ends_with(&format!(".{}", forged.seq))
            && !id.ends_with(&format!(".{}", stale.seq))
            && !id.ends_with(&format!(".{}", wrong.seq))));
    stack.shutdown().await;
}

/// The message ids in `site`'s accounting stream for `vm`, in order.
async fn accounting_ids(stack: &Stack, site: &str, vm: &str) -> Vec<String> {
    stack.accounting_ids(site, Some(vm)).await.unwrap()
}

/// Restarting the hub and the site's leaf server while the VM is monitored loses no
/// acknowledged batch and stores none twice: per producer epoch, the site running the VM holds
/// every sequence number from 0 to its last, once.
#[tokio::test]
async fn accounting_keeps_every_batch_across_server_restarts() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let mut stack = Stack::start(
        &binary,
        vec![
            site("a", vec![("c", 10)], vec![], ""),
            site("c", vec![("a", 0)], vec![("c1", 4096)], ""),
        ],
    )
    .await;
    deploy(
        &stack,
        "a",
        deploy_body("vm-acct", json!([raw("cpu.utilisation", 100, 0)])),
    )
    .await;
    // Batches flow before each restart and go on after it.
    wait_stored(&stack, "c", "vm-acct", 5).await;
    stack.fed.restart("hub").await.unwrap();
    wait_more_stored(&stack, "c", "vm-acct", 5).await;
    stack.fed.restart("c").await.unwrap();
    wait_more_stored(&stack, "c", "vm-acct", 5).await;
    let ids = wait_until(LONG, "accounting at c after the restarts", || async {
        let ids = accounting_ids(&stack, "c", "vm-acct").await;
        if ids.len() > 30 {
            Ok(ids)
        } else {
            Err(format!("{} batches", ids.len()))
        }
    })
    .await
    .unwrap();
    let mut by_epoch: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for id in &ids {
        let (epoch, seq) = id.rsplit_once('.').unwrap();
        by_epoch
            .entry(epoch.to_string())
            .or_default()
            .push(seq.parse().unwrap());
    }
    assert_eq!(by_epoch.len(), 1, "one producer epoch: {by_epoch:?}");
    for (epoch, mut seqs) in by_epoch {
        let n = seqs.len();
        seqs.sort_unstable();
        seqs.dedup();
        assert_eq!(seqs.len(), n, "{epoch}: a batch stored twice");
        let expected: Vec<u64> = (0..n as u64).collect();
        assert_eq!(
            seqs, expected,
            "{epoch}: a gap means an acknowledged batch was lost"
        );
    }
    // The primary's copy has no duplicates either.
    let at_a = accounting_ids(&stack, "a", "vm-acct").await;
    let unique: BTreeSet<&String> = at_a.iter().collect();
    assert_eq!(unique.len(), at_a.len());
    assert!(!at_a.is_empty());
    stack.shutdown().await;
}

/// `nubis usage` and `nubis watch` against a running federation: JSON that parses and says
/// what the site holds; a VM nobody knows is a clear refusal.
#[tokio::test]
async fn cli_watch_and_usage() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let stack = Stack::start(&binary, vec![site("a", vec![], vec![("h1", 4096)], "")]).await;
    let mut sealed = raw("mem.allocated_bytes", 200, 400);
    sealed["sealed"] = json!(true);
    deploy(
        &stack,
        "a",
        deploy_body("vm-c", json!([raw("cpu.cores", 200, 400), sealed])),
    )
    .await;
    let (user, password) = stack.fed.credentials("a", Role::Operator).unwrap();
    let url = stack.fed.site_url("a").unwrap();
    // The CLI binary sits next to this package's binaries (the workspace builds them together).
    let cli = std::path::Path::new(env!("CARGO_BIN_EXE_nubis-test-site")).with_file_name("nubis");
    assert!(
        cli.exists(),
        "{} is missing: build it with `cargo build -p nubis-cli`",
        cli.display()
    );
    // The site daemons run on this test's runtime: the CLI runs without blocking it.
    let nubis = |args: &[&str]| {
        let mut cmd = tokio::process::Command::new(&cli);
        cmd.args(args)
            .env("NUBIS_SITE", "a")
            .env("NUBIS_NATS_URL", &url)
            .env("NUBIS_NATS_USER", &user)
            .env("NUBIS_NATS_PASSWORD", &password);
        async move { cmd.output().await.unwrap() }
    };
    let key = stack.root().join("a.key");
    let out = nubis(&[
        "watch",
        "vm-c",
        "--count",
        "4",
        "--idle-timeout",
        "30",
        "--json",
        "--key",
        key.to_str().unwrap(),
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Json> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    assert!(
        lines
            .iter()
            .any(|l| l["sealed"] == true && l["samples"].as_array().is_some_and(|s| !s.is_empty())),
        "sealed batches opened with the primary's key: {lines:?}"
    );
    let out = nubis(&[
        "watch",
        "vm-c",
        "--count",
        "1",
        "--idle-timeout",
        "30",
        "--json",
    ])
    .await;
    let line: Json =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().next().unwrap()).unwrap();
    assert_eq!(line["vm"], "vm-c");

    let out = nubis(&["usage", "vm-c", "--json"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let usage: Json = serde_json::from_slice(&out.stdout).unwrap();
    assert!(usage["batches"].as_u64().unwrap() > 0, "{usage}");
    assert!(usage["memory_gib_hours"].as_f64().unwrap() > 0.0, "{usage}");
    assert!(usage["cpu_core_hours"].as_f64().unwrap() >= 0.0, "{usage}");

    // `nubis image put` uploads into a's image store, checked by digest; `image list` shows it.
    let image = stack.root().join("upload.raw");
    let data: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&image, &data).unwrap();
    let out = nubis(&[
        "image",
        "put",
        image.to_str().unwrap(),
        "--name",
        "web.raw",
        "--json",
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let put: Json = serde_json::from_slice(&out.stdout).unwrap();
    use sha2::Digest as _;
    assert_eq!(
        put["image"]["sha256"],
        hex::encode(sha2::Sha256::digest(&data)),
        "{put}"
    );
    assert_eq!(
        std::fs::read(stack.image_store("a").join("web.raw")).unwrap(),
        data
    );
    let out = nubis(&["image", "list", "--json"]).await;
    let list: Json = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        list["images"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["name"] == "web.raw" && i["bytes"] == data.len()),
        "{list}"
    );
    let out = nubis(&["image", "put", image.to_str().unwrap(), "--name", "web.raw"]).await;
    assert_eq!(
        out.status.code(),
        Some(3),
        "an existing image is not replaced without --force"
    );
    let out = nubis(&[
        "image",
        "put",
        image.to_str().unwrap(),
        "--name",
        "../escape",
    ])
    .await;
    assert_eq!(out.status.code(), Some(2));

    let out = nubis(&["usage", "no-such-vm"]).await;
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = nubis(&["usage", "vm-c", "--from", "10", "--to", "5"]).await;
    assert_eq!(out.status.code(), Some(2));
    let out = nubis(&["watch", "vm-c", "--key", "/nonexistent.key", "--count", "1"]).await;
    assert_eq!(out.status.code(), Some(2));
    stack.shutdown().await;
}
