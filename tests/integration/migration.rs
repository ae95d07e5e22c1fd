//! The migration protocol end to end (paper section III): real site daemons, Transfer proxies
//! and host agents (libvirt test driver) on a real hub + leaf federation.

use std::time::Duration;

use futures::StreamExt as _;
use nubis_testkit::{require_nats_server, wait_until, Role};
use serde_json::{json, Value};

use crate::stack::{ops, wait_migration, SiteSpec, Stack};

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
    // Everything that crossed before the marker (heartbeats and monitoring never stop, so no
    // quiet gap would end the reading).
    let root = stack.root().to_string_lossy().into_owned();
    let marker = "nubis.test.observer-marker";
    observer.publish(marker, "end".into()).await.unwrap();
    observer.flush().await.unwrap();
    let mut count = 0;
    loop {
        let msg = tokio::time::timeout(LONG, seen.next())
            .await
            .expect("the observer's marker never came back")
            .expect("the observer's subscription ended");
        if msg.subject.as_str() == marker {
            break;
        }
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
    let stack = Stack::start(&binary, one_site_two_hosts()).await;
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

/// A bandwidth cap given with the migration reaches the Transfer proxies, which pace the file
/// transfer to it: the migration cannot end sooner than its bytes allow at that rate (less the
/// one chunk of credit the pacing starts with). Asking for a cap of zero is refused.
#[tokio::test]
async fn a_migration_bandwidth_cap_paces_the_transfer() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let stack = Stack::start(&binary, one_site_two_hosts()).await;
    std::fs::write(
        stack.image_store("a").join("tiny.qcow2"),
        image_bytes(6 << 20),
    )
    .unwrap();
    let op_a = stack.operator("a").await;
    let r = ops(
        &op_a,
        "a",
        "deploy",
        deploy_body("capped-1", Some("tiny.qcow2")),
    )
    .await
    .unwrap();
    let m = wait_migration(&op_a, "a", r["migration"].as_str().unwrap()).await;
    assert_eq!(m["phase"], "committed", "{m}");

    let refused = ops(
        &op_a,
        "a",
        "migrate",
        json!({"vm": "capped-1", "to_site": "a", "max_bytes_per_sec": 0}),
    )
    .await
    .unwrap_err();
    assert!(refused.contains("max_bytes_per_sec"), "{refused}");

    let cap: u64 = 2 << 20;
    let r = ops(
        &op_a,
        "a",
        "migrate",
        json!({"vm": "capped-1", "to_site": "a", "max_bytes_per_sec": cap}),
    )
    .await
    .unwrap();
    let m = wait_migration(&op_a, "a", r["migration"].as_str().unwrap()).await;
    assert_eq!(m["phase"], "committed", "{m}");
    let bytes = m["bytes_total"].as_u64().unwrap();
    assert!(bytes >= 6 << 20, "{m}");
    // The pacing starts with one chunk (1 MiB) of credit.
    let floor = (bytes - (1 << 20)) as f64 / cap as f64;
    let elapsed = m["elapsed_s"].as_f64().unwrap();
    assert!(
        elapsed >= floor,
        "{bytes} bytes moved in {elapsed} s, faster than {cap} B/s allows ({floor} s)"
    );
    stack.shutdown().await;
}

/// A migration of `vm` (16 MiB disk) between the two hosts of site a, held with the
/// Controller stopped right after it journaled the prepared source and before it sends
/// Initiate transfer: the source proxy publishes on its own, no fetch has begun.
struct HeldMigration {
    stack: Stack,
    op: async_nats::Client,
    image: Vec<u8>,
    /// The host the VM runs on, and the other one.
    home: &'static str,
    other: &'static str,
    /// The site daemon of a, stopped (SIGSTOP) until [`HeldMigration::go_on`].
    controller: std::process::Child,
    migration: String,
    /// The last sequence of the source bucket's stream before the migration started.
    bucket_seq_before: u64,
}

impl HeldMigration {
    async fn start(binary: &nubis_testkit::NatsServerBinary, vm: &str) -> Self {
        let mut stack = Stack::start(binary, one_site_two_hosts()).await;
        // 16 chunks of 1 MiB: more than a fetch asks for at a time (8).
        let image = image_bytes(16 << 20);
        std::fs::write(stack.image_store("a").join("tiny.qcow2"), &image).unwrap();
        let op = stack.operator("a").await;
        let r = ops(&op, "a", "deploy", deploy_body(vm, Some("tiny.qcow2")))
            .await
            .unwrap();
        let m = wait_migration(&op, "a", r["migration"].as_str().unwrap()).await;
        assert_eq!(m["phase"], "committed", "{m}");
        let (home, other) = if next_hop(&op, "a", vm).await.unwrap() == "host:n1" {
            ("n1", "n2")
        } else {
            ("n2", "n1")
        };
        let js = async_nats::jetstream::new(stack.fed.connect("a").await.unwrap());
        let mut stream = js.get_stream(nubis_proxy::naming::STREAM).await.unwrap();
        let bucket_seq_before = stream.info().await.unwrap().state.last_sequence;
        let controller = site_signalled_at(
            &mut stack,
            "a",
            Signal::Stop,
            "source journaled; starting the transfer",
        )
        .await;
        let r = ops(&op, "a", "migrate", json!({"vm": vm, "to_site": "a"}))
            .await
            .unwrap();
        let migration = r["migration"].as_str().unwrap().to_string();
        wait_stopped(&controller, "the Controller before Initiate transfer").await;
        Self {
            stack,
            op,
            image,
            home,
            other,
            controller,
            migration,
            bucket_seq_before,
        }
    }

    /// Lets the Controller go on; returns the migration as it ends.
    async fn go_on(&self) -> Value {
        send_signal(&self.controller, "CONT");
        wait_migration(&self.op, "a", &self.migration).await
    }

    /// The disk of `vm` at `host`, if it is there.
    fn disk(&self, vm: &str, host: &str) -> Option<Vec<u8>> {
        let path = self
            .stack
            .vm_root("a", host)
            .join(vm)
            .join("disk-vda.qcow2");
        std::fs::read(path).ok()
    }

    async fn shutdown(mut self) {
        self.controller.kill().unwrap();
        self.controller.wait().unwrap();
        self.stack.shutdown().await;
    }
}

/// Transfer verification disagrees: a chunk of the disk is corrupted in the Source proxy's
/// bucket before the destination reads it. Every fetch fails its end-to-end digest; the
/// Controller repeats Initiate transfer a bounded number of times, has no other offer, and
/// aborts: the VM runs again at its old host, exactly once, its disk unchanged, and nothing of
/// it is left at the other host.
///
/// No race: the Controller is held before Initiate transfer (see [`HeldMigration`]) while the
/// test replaces the chunk, and goes on once the corrupted chunk is in place.
#[tokio::test]
async fn a_verification_mismatch_is_retried_a_bounded_number_of_times_then_aborted() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let held = HeldMigration::start(&binary, "mismatch-1").await;
    let js = async_nats::jetstream::new(held.stack.fed.connect("a").await.unwrap());
    let stream = js.get_stream(nubis_proxy::naming::STREAM).await.unwrap();

    // The source proxy publishes on its own; wait for the disk's info message (written after
    // every chunk is acknowledged).
    let before = held.bucket_seq_before;
    let (meta_subject, info) = wait_until(LONG, "the source to publish the disk", || {
        let stream = stream.clone();
        async move {
            let mut subjects = stream
                .info_with_subjects("$O.nubis-xfer.M.>")
                .await
                .map_err(|e| e.to_string())?;
            let mut seen = Vec::new();
            while let Some(entry) = subjects.next().await {
                let (subject, _) = entry.map_err(|e| e.to_string())?;
                let last = stream
                    .direct_get_last_for_subject(subject.as_str())
                    .await
                    .map_err(|e| e.to_string())?;
                let info: Value =
                    serde_json::from_slice(&last.payload).map_err(|e| e.to_string())?;
                let name = info["name"].as_str().unwrap_or_default().to_string();
                if last.sequence > before && name.ends_with("/disk-vda.qcow2") {
                    return Ok((subject, last));
                }
                seen.push(name);
            }
            Err(format!("info messages: {seen:?}"))
        }
    })
    .await
    .unwrap();
    let info_json: Value = serde_json::from_slice(&info.payload).unwrap();
    assert_eq!(info_json["chunks"], 16, "{info_json}");
    let chunk_subject = format!("$O.nubis-xfer.C.{}", info_json["nuid"].as_str().unwrap());

    // Replace the last chunk by a copy with one byte flipped (same index and offset headers),
    // then write the info message again so it follows its chunks in the stream, as readers
    // expect of a complete object.
    let last = stream
        .direct_get_last_for_subject(chunk_subject.as_str())
        .await
        .unwrap();
    stream.delete_message(last.sequence).await.unwrap();
    let mut payload = last.payload.to_vec();
    payload[100] ^= 0x40;
    js.publish_with_headers(chunk_subject.clone(), last.headers.clone(), payload.into())
        .await
        .unwrap()
        .await
        .unwrap();
    let mut headers = info.headers.clone();
    headers.insert("Nats-Rollup", "sub");
    js.publish_with_headers(meta_subject, headers, info.payload.clone())
        .await
        .unwrap()
        .await
        .unwrap();
    let stored = stream
        .direct_get_last_for_subject(chunk_subject.as_str())
        .await
        .unwrap();
    assert_ne!(stored.payload, last.payload, "the chunk was not replaced");

    let m = held.go_on().await;
    assert_eq!(m["phase"], "aborted", "{m}");
    // The corrupted bytes were read and caught, on every round the Controller allows.
    assert_eq!(m["failed_rounds"], 3, "{m}");
    let why = m["last_failure"].as_str().unwrap_or_default();
    assert!(
        why.contains("disk-vda.qcow2: chunk 15 failed authentication"),
        "{m}"
    );
    let op = &held.op;
    assert_eq!(
        next_hop(op, "a", "mismatch-1").await.unwrap(),
        format!("host:{}", held.home)
    );
    let q = ops(
        op,
        "a",
        "control",
        json!({"vm": "mismatch-1", "change": {"kind": "query"}}),
    )
    .await
    .unwrap();
    assert_eq!(q["state"], "enabled", "{q}");
    assert!(
        held.disk("mismatch-1", held.home) == Some(held.image.clone()),
        "the disk changed"
    );
    assert!(
        !held
            .stack
            .vm_root("a", held.other)
            .join("mismatch-1")
            .exists(),
        "the other host kept a copy"
    );
    held.shutdown().await;
}

/// The same migration without the corruption, through the same held Controller: it commits
/// on the first round, so the aborts above come from the corrupted chunk alone.
#[tokio::test]
async fn a_migration_held_before_initiate_transfer_commits_once_continued() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let held = HeldMigration::start(&binary, "held-1").await;
    let m = held.go_on().await;
    assert_eq!(m["phase"], "committed", "{m}");
    assert_eq!(m["failed_rounds"], 0, "{m}");
    assert_eq!(
        next_hop(&held.op, "a", "held-1").await.unwrap(),
        format!("host:{}", held.other)
    );
    assert!(
        held.disk("held-1", held.other) == Some(held.image.clone()),
        "the disk changed"
    );
    held.shutdown().await;
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

    // SIGKILL at the first answer of Initiate transfer that reports the fetch under way.
    let mut site_a = site_killed_at(&mut stack, "a", "transfer in progress").await;
    let r = ops(&op_a, "a", "migrate", json!({"vm": "db-9", "to_site": "c"}))
        .await
        .unwrap();
    let id = r["migration"].as_str().unwrap().to_string();
    wait_killed(&mut site_a, "the Controller mid-transfer").await;

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

// ----- failure paths with real crashes -------------------------------------------------------

/// A site daemon that kills itself with SIGKILL the first time it logs `kill_at` (see
/// `nubis-test-site`). It replaces the site's in-process daemon; the site's Transfer proxy and
/// host agents keep running, as they would on their own machines.
async fn site_killed_at(stack: &mut Stack, site: &str, kill_at: &str) -> std::process::Child {
    site_signalled_at(stack, site, Signal::Kill, kill_at).await
}

/// What the site daemon process does to itself at its hook (see `nubis-test-site`).
#[derive(Debug, Clone, Copy)]
enum Signal {
    /// SIGKILL: a crash.
    Kill,
    /// SIGSTOP: held until the test sends SIGCONT.
    Stop,
}

/// Replaces `site`'s daemon by a process that sends itself `signal` the first time it logs
/// `message`.
async fn site_signalled_at(
    stack: &mut Stack,
    site: &str,
    signal: Signal,
    message: &str,
) -> std::process::Child {
    let mut plain = stack.site_daemon_as_process(site).await;
    plain.kill().unwrap();
    plain.wait().unwrap();
    let (var, label) = match signal {
        Signal::Kill => ("NUBIS_TEST_KILL_AT", "killed"),
        Signal::Stop => ("NUBIS_TEST_STOP_AT", "stopped"),
    };
    let child =
        stack.spawn_site_process_with(site, &format!("{site}-site-{label}.log"), &[(var, message)]);
    stack.wait_ready(site).await;
    child
}

/// Waits until `child` is stopped (by a SIGSTOP it sent itself at its hook).
pub(crate) async fn wait_stopped(child: &std::process::Child, what: &str) {
    let stat = format!("/proc/{}/stat", child.id());
    wait_until(LONG, format!("{what} stopped"), || {
        let state = std::fs::read_to_string(&stat).map_err(|e| e.to_string());
        async move {
            // `pid (comm) S ...`: the state follows the last parenthesis.
            let state = state?;
            let s = state
                .rsplit_once(") ")
                .map(|(_, rest)| rest.chars().next())
                .unwrap_or_default();
            if s == Some('T') {
                Ok(())
            } else {
                Err(format!("state {s:?}"))
            }
        }
    })
    .await
    .unwrap();
}

/// Sends `signal` (a name as `kill` takes it) to `child`.
pub(crate) fn send_signal(child: &std::process::Child, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {}", child.id());
}

/// Waits until `child` died of SIGKILL (it reached its kill point).
async fn wait_killed(child: &mut std::process::Child, what: &str) {
    use std::os::unix::process::ExitStatusExt as _;
    let status = wait_until(LONG, format!("{what} killed itself"), || {
        let r = child.try_wait();
        async move {
            match r {
                Ok(Some(status)) => Ok(status),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(
        status.signal(),
        Some(9),
        "{what} ended otherwise: {status:?}"
    );
}

/// The hosts on which `vm` is active (running or paused) right now, as `site/host`.
async fn active_copies(
    stack: &Stack,
    hosts: &[(&str, &str)],
    vm: &str,
) -> Result<Vec<String>, String> {
    use nubis_protocol::message::host::HostClient;
    use nubis_protocol::message::{DmtfState, HostId};
    use nubis_protocol::SiteId;
    let mut out = Vec::new();
    for (site, host) in hosts {
        let client = stack
            .fed
            .connect_site_internal(site)
            .await
            .map_err(|e| e.to_string())?;
        let agent = HostClient::new(
            nubis_site::infrastructure::NatsTransport(client),
            SiteId::new(*site).unwrap(),
            HostId::new(*host).unwrap(),
        );
        let list = agent
            .list()
            .await
            .map_err(|e| format!("{site}/{host}: {e}"))?;
        if list.vms.iter().any(|e| {
            e.vm.as_str() == vm
                && matches!(
                    e.state,
                    DmtfState::Enabled | DmtfState::Paused | DmtfState::Starting
                )
        }) {
            out.push(format!("{site}/{host}"));
        }
    }
    Ok(out)
}

fn digest(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Waits until `vm` is active on exactly one of `hosts` — failing at once if it is ever seen
/// active on two — and checks that its disk there has the digest `want`. Returns `site/host`.
async fn assert_active_once(stack: &Stack, hosts: &[(&str, &str)], vm: &str, want: &str) -> String {
    let at = wait_until(LONG, format!("{vm} active exactly once"), || async {
        let copies = active_copies(stack, hosts, vm).await?;
        assert!(copies.len() <= 1, "{vm} active twice: {copies:?}");
        copies
            .into_iter()
            .next()
            .ok_or_else(|| "active nowhere".to_string())
    })
    .await
    .unwrap();
    let (site, host) = at.split_once('/').unwrap();
    let disk = std::fs::read(stack.vm_root(site, host).join(vm).join("disk-vda.qcow2")).unwrap();
    assert_eq!(digest(&disk), want, "the disk of {vm} changed (at {at})");
    at
}

fn image_bytes(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// Site a alone, with hosts n1 and n2 (host-to-host migrations inside one site).
fn one_site_two_hosts() -> Vec<SiteSpec> {
    vec![site("a", vec![], vec![("n1", 4096), ("n2", 4096)])]
}

fn site(
    id: &'static str,
    partners: Vec<(&'static str, i32)>,
    hosts: Vec<(&'static str, u64)>,
) -> SiteSpec {
    SiteSpec {
        id,
        partners,
        hosts,
        policy: "",
        top: "",
    }
}

/// Four sites around a, whose partner preferences make b the first placement and d the best
/// destination of a later migration, c the next best.
async fn star(binary: &nubis_testkit::NatsServerBinary, vm: &str, image: &[u8]) -> Stack {
    let stack = Stack::start(
        binary,
        vec![
            site("a", vec![("b", 10), ("d", 8), ("c", 5)], vec![]),
            site("b", vec![("a", 0)], vec![("b1", 4096)]),
            site("c", vec![("a", 0)], vec![("c1", 4096)]),
            site("d", vec![("a", 0)], vec![("d1", 4096)]),
        ],
    )
    .await;
    std::fs::write(stack.image_store("a").join("img.qcow2"), image).unwrap();
    let op_a = stack.operator("a").await;
    let r = ops(&op_a, "a", "deploy", deploy_body(vm, Some("img.qcow2")))
        .await
        .unwrap();
    let m = wait_migration(&op_a, "a", r["migration"].as_str().unwrap()).await;
    assert_eq!(m["phase"], "committed", "{m}");
    assert_eq!(next_hop(&op_a, "a", vm).await.unwrap(), "site:b");
    stack
}

const STAR_HOSTS: [(&str, &str); 3] = [("b", "b1"), ("c", "c1"), ("d", "d1")];

/// The best destination dies (SIGKILL) after it offered and was asked to transfer: the
/// Controller gives up on it after its bounded retries and moves the VM to the next-best offer.
#[tokio::test]
async fn a_destination_killed_after_offering_falls_back_to_the_next_offer() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let image = image_bytes(1 << 20);
    let mut stack = star(&binary, "fb-1", &image).await;
    let op_a = stack.operator("a").await;
    let mut d = site_killed_at(&mut stack, "d", "initiate transfer answered").await;
    let r = ops(&op_a, "a", "migrate", json!({"vm": "fb-1"}))
        .await
        .unwrap();
    wait_killed(&mut d, "d").await;
    let m = wait_migration(&op_a, "a", r["migration"].as_str().unwrap()).await;
    assert_eq!(m["phase"], "committed", "{m}");
    assert_eq!(m["offers"], 2, "{m}");
    assert_eq!(next_hop(&op_a, "a", "fb-1").await.unwrap(), "site:c");
    let at = assert_active_once(&stack, &STAR_HOSTS, "fb-1", &digest(&image)).await;
    assert_eq!(at, "c/c1");
    stack.shutdown().await;
}

/// The Source dies (SIGKILL) after it answered the Forced migration, while the Controller
/// verifies the transfer, and starts again: the migration ends — committed or rolled back —
/// with the VM active exactly once and its disk unchanged.
#[tokio::test]
async fn a_source_killed_after_prepare_resumes_or_rolls_back() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let image = image_bytes(1 << 20);
    let mut stack = star(&binary, "sk-1", &image).await;
    let op_a = stack.operator("a").await;
    let mut b = site_killed_at(&mut stack, "b", "transfer verification answered").await;
    let r = ops(&op_a, "a", "migrate", json!({"vm": "sk-1", "to_site": "c"}))
        .await
        .unwrap();
    wait_killed(&mut b, "b").await;
    let mut b = stack.spawn_site_process("b");
    let m = wait_migration(&op_a, "a", r["migration"].as_str().unwrap()).await;
    let at = assert_active_once(&stack, &STAR_HOSTS, "sk-1", &digest(&image)).await;
    let expected = if m["phase"] == "committed" {
        "c/c1"
    } else {
        "b/b1"
    };
    assert_eq!(at, expected, "{m}");
    b.kill().unwrap();
    b.wait().unwrap();
    stack.shutdown().await;
}

/// The Controller is killed while the Source is preparing — after the Source stopped the VM,
/// before the Controller journaled its answer. Restarted, the Controller prepares again
/// (idempotent at the host), aborts, and the Source runs the VM again.
#[tokio::test]
async fn a_migration_interrupted_while_preparing_is_rolled_back() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let image = image_bytes(1 << 20);
    let mut stack = star(&binary, "pp-1", &image).await;
    let op_a = stack.operator("a").await;
    // b stops the VM and dies before it answers; a is killed while it waits for that answer.
    let mut b = site_killed_at(&mut stack, "b", "forced migration answered").await;
    let mut a = stack.site_daemon_as_process("a").await;
    stack.wait_ready("a").await;
    let r = ops(&op_a, "a", "migrate", json!({"vm": "pp-1", "to_site": "c"}))
        .await
        .unwrap();
    let id = r["migration"].as_str().unwrap().to_string();
    wait_killed(&mut b, "b").await;
    let phase = ops(&op_a, "a", "vms", json!({"migration": id}))
        .await
        .unwrap();
    assert_eq!(phase["phase"], "preparing", "{phase}");
    assert!(active_copies(&stack, &STAR_HOSTS, "pp-1")
        .await
        .unwrap()
        .is_empty());
    a.kill().unwrap();
    a.wait().unwrap();

    let mut b = stack.spawn_site_process("b");
    stack.wait_ready("b").await;
    let mut a = stack.spawn_site_process("a");
    let m = wait_migration(&op_a, "a", &id).await;
    assert_eq!(m["phase"], "aborted", "{m}");
    let at = assert_active_once(&stack, &STAR_HOSTS, "pp-1", &digest(&image)).await;
    assert_eq!(at, "b/b1");
    assert_eq!(next_hop(&op_a, "a", "pp-1").await.unwrap(), "site:b");
    let view = vm_view(&op_a, "a", "pp-1").await.unwrap();
    assert_eq!(view["phase"], "placed", "{view}");
    for child in [&mut a, &mut b] {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    stack.shutdown().await;
}

/// The four roles of a migration from a to d, each at a site of its own: the Controller a, the
/// Intermediary i on both chains (a → i → source, a → i → destination), the Source and the
/// Destination (s and d, in the order the first placement chose).
#[derive(Debug, Clone, Copy)]
enum Killed {
    Controller,
    Intermediary,
    Source,
    Destination,
}

/// Kills the site that plays `role` with SIGKILL when it logs `step` during a migration, and
/// starts it again: afterwards the VM is active exactly once and its disk digest is unchanged.
async fn kill_between_steps(role: Killed, step: &str) {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let mut stack = Stack::start(
        &binary,
        vec![
            site("a", vec![("i", 0)], vec![]),
            site("i", vec![("a", 0), ("s", 0), ("d", 0)], vec![]),
            site("s", vec![("i", 0)], vec![("s1", 4096)]),
            site("d", vec![("i", 0)], vec![("d1", 4096)]),
        ],
    )
    .await;
    let image = image_bytes(1 << 20);
    std::fs::write(stack.image_store("a").join("img.qcow2"), &image).unwrap();
    let op_a = stack.operator("a").await;
    let r = ops(&op_a, "a", "deploy", deploy_body("kv-1", Some("img.qcow2")))
        .await
        .unwrap();
    let m = wait_migration(&op_a, "a", r["migration"].as_str().unwrap()).await;
    assert_eq!(m["phase"], "committed", "{m}");
    let op_i = stack.operator("i").await;
    let (source, destination) = match next_hop(&op_i, "i", "kv-1").await.unwrap().as_str() {
        "site:s" => ("s", "d"),
        _ => ("d", "s"),
    };
    let victim = match role {
        Killed::Controller => "a",
        Killed::Intermediary => "i",
        Killed::Source => source,
        Killed::Destination => destination,
    };
    let hosts = [("s", "s1"), ("d", "d1")];
    let want = digest(&image);

    let mut child = site_killed_at(&mut stack, victim, step).await;
    let r = ops(&op_a, "a", "migrate", json!({"vm": "kv-1", "to_site": "i"}))
        .await
        .unwrap();
    let id = r["migration"].as_str().unwrap().to_string();
    wait_killed(&mut child, &format!("{victim} ({role:?}) at {step:?}")).await;
    // Never twice, not even while the victim is down.
    assert!(active_copies(&stack, &hosts, "kv-1").await.unwrap().len() <= 1);
    let mut again = stack.spawn_site_process(victim);

    let m = wait_migration(&op_a, "a", &id).await;
    let at = assert_active_once(&stack, &hosts, "kv-1", &want).await;
    let (expected, hop) = if m["phase"] == "committed" {
        (destination, format!("site:{destination}"))
    } else {
        (source, format!("site:{source}"))
    };
    assert_eq!(at, format!("{expected}/{expected}1"), "{m}");
    // The chain ends consistent with where the VM runs.
    assert_eq!(next_hop(&op_a, "a", "kv-1").await.unwrap(), "site:i");
    wait_until(LONG, "i points at the VM", || async {
        let h = next_hop(&op_i, "i", "kv-1").await?;
        if h == hop {
            Ok(())
        } else {
            Err(h)
        }
    })
    .await
    .unwrap();
    again.kill().unwrap();
    again.wait().unwrap();
    stack.shutdown().await;
}

/// SIGKILL of each role between each pair of protocol steps it takes part in, then restart.
/// The steps are named by the message each role logs once it has done (and journaled) a step
/// and before it answers or moves on.
mod killed {
    use super::{kill_between_steps, Killed};

    macro_rules! kill_cases {
        ($($name:ident: $role:ident at $step:literal;)*) => {$(
            #[tokio::test]
            async fn $name() {
                kill_between_steps(Killed::$role, $step).await;
            }
        )*};
    }

    kill_cases! {
        controller_after_offers: Controller at "offers journaled; preparing the source";
        controller_after_prepare: Controller at "source journaled; starting the transfer";
        controller_after_verification: Controller at "transfer verified; committing";
        controller_after_destination_commit: Controller at "destination committed; releasing the source";
        intermediary_after_request: Intermediary at "migration request answered";
        intermediary_after_prepare: Intermediary at "forced migration answered";
        intermediary_after_initiate: Intermediary at "initiate transfer answered";
        intermediary_after_verification: Intermediary at "transfer verification answered";
        intermediary_after_destination_commit: Intermediary at "destination commit applied";
        intermediary_after_source_commit: Intermediary at "source commit applied";
        source_after_prepare: Source at "forced migration answered";
        source_after_verification: Source at "transfer verification answered";
        source_after_commit: Source at "source commit applied";
        destination_after_request: Destination at "migration request answered";
        destination_after_initiate: Destination at "initiate transfer answered";
        destination_after_commit: Destination at "destination commit applied";
    }
}

/// "Pass the eviction further up": on the chain a → b → c, c evicts the VM; b's policy passes
/// the notice on to a, which becomes Controller and re-places the VM at e. The files move from
/// c to e; afterwards the VM is active exactly once and neither b nor c holds it.
#[tokio::test]
async fn an_eviction_passed_up_two_hops_is_acted_upon_by_the_primary() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let mut b = site("b", vec![("a", 0), ("c", 0)], vec![]);
    b.policy = "eviction = \"pass_up\"";
    let stack = Stack::start(
        &binary,
        vec![
            site("a", vec![("b", 10), ("e", 5)], vec![]),
            b,
            site("c", vec![("b", 0)], vec![("c1", 4096)]),
            site("e", vec![("a", 0)], vec![("e1", 4096)]),
        ],
    )
    .await;
    let image = image_bytes(1 << 20);
    std::fs::write(stack.image_store("a").join("img.qcow2"), &image).unwrap();
    let (op_a, op_b, op_c) = (
        stack.operator("a").await,
        stack.operator("b").await,
        stack.operator("c").await,
    );
    let r = ops(&op_a, "a", "deploy", deploy_body("ev-1", Some("img.qcow2")))
        .await
        .unwrap();
    let m = wait_migration(&op_a, "a", r["migration"].as_str().unwrap()).await;
    assert_eq!(m["phase"], "committed", "{m}");
    assert_eq!(next_hop(&op_a, "a", "ev-1").await.unwrap(), "site:b");
    assert_eq!(next_hop(&op_b, "b", "ev-1").await.unwrap(), "site:c");

    let notice = ops(&op_c, "c", "evict", json!({"vm": "ev-1"}))
        .await
        .unwrap();
    assert_eq!(notice["sent_to"], "b", "{notice}");
    wait_until(LONG, "a re-places the VM at e", || async {
        let view = vm_view(&op_a, "a", "ev-1").await?;
        if view["next_hop"] == "site:e" && view["phase"] == "placed" {
            Ok(())
        } else {
            Err(view.to_string())
        }
    })
    .await
    .unwrap();
    let hosts = [("c", "c1"), ("e", "e1")];
    assert_eq!(
        assert_active_once(&stack, &hosts, "ev-1", &digest(&image)).await,
        "e/e1"
    );
    // The migration was a's: b only passed the notice on.
    let at_a = vm_view(&op_a, "a", "ev-1").await.unwrap();
    assert_eq!(at_a["migrations"].as_array().unwrap().len(), 2, "{at_a}");
    for (op, s) in [(&op_b, "b"), (&op_c, "c")] {
        wait_until(LONG, format!("{s} left the chain"), || async {
            let v = ops(op, s, "vms", json!({})).await?;
            if v["vms"].as_array().is_some_and(|a| a.is_empty()) {
                Ok(())
            } else {
                Err(v.to_string())
            }
        })
        .await
        .unwrap();
    }
    assert!(!stack.vm_root("c", "c1").join("ev-1").exists());
    stack.shutdown().await;
}
