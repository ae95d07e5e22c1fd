//! KPI write → bus latency (paper section IV-A, issue "KPI filesystem", benchmark second half):
//! an application's report written to the VM's KPI filesystem (open, write, close: the row is
//! committed when `close` returns) until a subscriber on the primary site's public monitoring
//! subject receives the batch carrying it. Real parts: a nats-server, a site daemon, a Transfer
//! proxy, a host agent on libvirt's test driver with its FUSE mount and SQLite database, and a
//! raw specifier with a delivery interval of zero. p50 and p99 of both the write alone and the
//! whole path.
//!
//! Run: `cargo bench -p nubis-tests --bench kpi_latency`. Under `cargo test` it runs a few rounds.
// A benchmark is a test harness: a failed setup step should stop it loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use nubis_tests::stack;

use std::time::{Duration, Instant};

use futures::StreamExt as _;
use nubis_protocol::codec;
use nubis_protocol::envelope::SignedEnvelope;
use nubis_protocol::message::{BatchPayload, MonitoringBatch, Value};
use nubis_testkit::{require_nats_server, wait_until};
use serde_json::json;
use stack::{ops, SiteSpec, Stack};

fn bench_mode() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn percentiles(mut v: Vec<u128>) -> (u128, u128) {
    v.sort_unstable();
    let at = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    (at(0.50), at(0.99))
}

/// The KPI values carried by one batch from the public subject.
fn values(payload: &[u8]) -> Vec<i64> {
    let env = SignedEnvelope::decode(payload).unwrap();
    let batch: MonitoringBatch = codec::from_slice(&env.body).unwrap();
    let BatchPayload::Clear(clear) = batch.payload else {
        panic!("sealed payload where a clear one was asked for");
    };
    clear
        .samples
        .into_iter()
        .filter_map(|s| match s.value {
            Value::Int(i) => Some(i),
            _ => None,
        })
        .collect()
}

#[tokio::main]
async fn main() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    if !std::path::Path::new("/dev/fuse").exists() {
        return nubis_testkit::skip_or_fail("no /dev/fuse").unwrap_or(());
    }
    let stack = Stack::start(
        &binary,
        vec![SiteSpec {
            id: "a",
            partners: vec![],
            hosts: vec![("h1", 4096)],
            policy: "",
            top: "",
        }],
    )
    .await;
    let op = stack.operator("a").await;
    std::fs::write(stack.image_store("a").join("img.qcow2"), b"disk").unwrap();
    let v = ops(
        &op,
        "a",
        "deploy",
        json!({"vm": "vm-kpi", "name": "kpi latency", "hardware": {"vcpus": 1, "memory_mib": 256,
              "disks": [{"name": "vda", "capacity_bytes": 1048576, "format": "qcow2", "image": "img.qcow2"}],
              "networks": []},
              "monitoring": [{"data_point": "kpi.bench.value", "monitoring_interval_ms": 0,
                              "delivery_interval_ms": 0, "format": {"kind": "raw"}}]}),
    )
    .await
    .unwrap();
    let migration = v["migration"].as_str().unwrap().to_string();
    wait_until(Duration::from_secs(60), "placement", || async {
        let v = ops(&op, "a", "vms", json!({"migration": migration})).await?;
        match v["phase"].as_str() {
            Some("committed") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
    .unwrap();
    let mount = stack
        .wait_kpi_mount("a", "h1", "vm-kpi", Duration::from_secs(30))
        .await
        .unwrap();
    let report = mount.join("unencrypted").join("bench");
    let mut sub = op
        .subscribe("nubis.mon.a.vm-kpi.kpi.bench.value")
        .await
        .unwrap();
    op.flush().await.unwrap();

    let rounds = if bench_mode() { 2_000 } else { 20 };
    let warmup = rounds / 10;
    let (mut write_us, mut seen_us) = (Vec::new(), Vec::new());
    for i in 0..(warmup + rounds) as i64 {
        let path = report.clone();
        let start = Instant::now();
        let written = tokio::task::spawn_blocking(move || {
            std::fs::write(&path, format!("value\n{i}\n")).unwrap();
            start.elapsed()
        });
        let seen = async {
            loop {
                let m = tokio::time::timeout(Duration::from_secs(10), sub.next())
                    .await
                    .unwrap_or_else(|_| panic!("report {i} never reached the subscriber"))
                    .unwrap();
                if values(&m.payload).contains(&i) {
                    return start.elapsed();
                }
            }
        };
        let (written, seen) = tokio::join!(written, seen);
        if i >= warmup as i64 {
            write_us.push(written.unwrap().as_micros());
            seen_us.push(seen.as_micros());
        }
    }
    let (w50, w99) = percentiles(write_us);
    let (s50, s99) = percentiles(seen_us);
    println!("## KPI write → bus subscriber, {rounds} reports (after {warmup} warm-up)");
    println!("| step | p50 | p99 |");
    println!("|---|---|---|");
    println!("| open + write + close (row committed, synchronous=FULL) | {w50} µs | {w99} µs |");
    println!("| write → batch on the public subject | {s50} µs | {s99} µs |");
    stack.shutdown().await;
}
