//! What several benchmarks of this crate measure alike: a chain of sites for a placement through
//! Intermediaries and the placement itself (`migration_control`, `wan`), and KPI reports written
//! into a VM's KPI filesystem until the primary's subscriber sees them (`kpi_latency`, `wan`),
//! percentiles and whether the binary runs as a benchmark (`monitoring` too).
//!
//! Each benchmark binary includes this module and uses only part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use nubis_protocol::codec;
use nubis_protocol::envelope::SignedEnvelope;
use nubis_protocol::message::{BatchPayload, MonitoringBatch, Value};
use nubis_testkit::wait_until;
use nubis_tests::stack::{ops, SiteSpec, Stack};
use serde_json::json;

/// Site ids of the longest chain, in order.
pub const NAMES: [&str; 5] = ["s0", "s1", "s2", "s3", "s4"];

/// Sites s0 (Controller, primary, no room) → s1 → … → s(k+1) (room) for `intermediaries` = k;
/// each delegates only onward. Each host offers 8 vCPUs, so a chain takes 8 one-vCPU
/// placements.
pub fn chain(intermediaries: usize) -> Vec<SiteSpec> {
    let last = intermediaries + 1;
    (0..=last)
        .map(|i| {
            let mut spec = SiteSpec::new(NAMES[i]);
            if i > 0 {
                spec = spec.partner(NAMES[i - 1], 0);
            }
            if i < last {
                spec = spec.partner(NAMES[i + 1], 10);
            }
            if i == last {
                spec.host("room", 1 << 20)
            } else {
                spec.host("full", 128)
            }
        })
        .collect()
}

/// Deploys the one-vCPU VM `vm` at `site` from the 1 KiB image `tiny.qcow2` of its image
/// store, waits until the placement is committed, and returns the Controller's own time from
/// start to commit, in milliseconds.
pub async fn place(op: &async_nats::Client, site: &str, vm: &str) -> f64 {
    let body = json!({
        "vm": vm,
        "hardware": {"vcpus": 1, "memory_mib": 256,
            "disks": [{"name": "vda", "capacity_bytes": 1048576, "format": "qcow2", "image": "tiny.qcow2"}],
            "networks": []},
    });
    let r = ops(op, site, "deploy", body).await.unwrap();
    let id = r["migration"].as_str().unwrap().to_string();
    let v = loop {
        let v = ops(op, site, "vms", json!({"migration": id}))
            .await
            .unwrap();
        match v["phase"].as_str() {
            Some("committed") => break v,
            Some("aborted") => panic!("placement aborted: {v}"),
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    };
    v["elapsed_s"].as_f64().unwrap() * 1000.0
}

/// Deploys the VM `vm-kpi` at the primary `site` from the image `img.qcow2` of its image store
/// (written here), reporting the raw data point `kpi.bench.value` at once; waits up to
/// `within` until the placement is committed and up to half of it until the VM's KPI
/// filesystem is mounted on host `host` of site `runs_at`. Returns the report file to write
/// into and a subscriber on the primary's public subject of that data point.
pub async fn kpi_vm(
    stack: &Stack,
    op: &async_nats::Client,
    site: &str,
    (runs_at, host): (&str, &str),
    within: Duration,
) -> (PathBuf, async_nats::Subscriber) {
    std::fs::write(stack.image_store(site).join("img.qcow2"), b"disk").unwrap();
    let v = ops(
        op,
        site,
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
    wait_until(within, "placement", || async {
        let v = ops(op, site, "vms", json!({"migration": migration})).await?;
        match v["phase"].as_str() {
            Some("committed") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
    .unwrap();
    let mount = stack
        .wait_kpi_mount(runs_at, host, "vm-kpi", within / 2)
        .await
        .unwrap();
    let sub = op
        .subscribe(format!("nubis.mon.{site}.vm-kpi.kpi.bench.value"))
        .await
        .unwrap();
    op.flush().await.unwrap();
    (mount.join("unencrypted").join("bench"), sub)
}

/// Whether the binary runs as a benchmark (`cargo bench`) rather than once, small, under
/// `cargo test`.
pub fn bench_mode() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// The value at fraction `p` (0 to 1) of `v`, sorted in place.
pub fn percentile<T: Copy + PartialOrd>(v: &mut [T], p: f64) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// The KPI values carried by one batch from a public monitoring subject.
pub fn kpi_values(payload: &[u8]) -> Vec<i64> {
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

/// Writes `warmup + rounds` reports `value\n<i>\n` into `report` (a file of a KPI filesystem),
/// one at a time, each until `sub` receives the batch carrying it. Returns, per report after the
/// warm-up, the time of the write alone (open, write, close) and of the whole path, in µs.
pub async fn kpi_reports(
    report: &Path,
    sub: &mut async_nats::Subscriber,
    warmup: usize,
    rounds: usize,
) -> (Vec<u128>, Vec<u128>) {
    let (mut write_us, mut seen_us) = (Vec::new(), Vec::new());
    for i in 0..(warmup + rounds) as i64 {
        let path = report.to_path_buf();
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
                if kpi_values(&m.payload).contains(&i) {
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
    (write_us, seen_us)
}
