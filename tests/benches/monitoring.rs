//! Monitoring throughput and latency (paper section IV).
//!
//! 1. Publishing: signed `MonitoringBatch` envelopes (sign + encode + publish, one core) against
//!    raw NATS publishes of payloads of the same size, and of the same batch encoded but
//!    unsigned, on the same server in the same run; batches/s and samples/s.
//! 2. End to end: a batch handed to the site running the VM (as its host agent does, on
//!    `nubis.site.<site>.intake.<host>`) until a consumer at the primary receives it on the public
//!    subject, relayed across two hops (c → b → a) by real site daemons; p50/p99.
//!
//! Run: `cargo bench -p nubis-tests --bench monitoring`. Under `cargo test` it runs a few rounds.
// A benchmark is a test harness: a failed setup step should stop it loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod shared;

use nubis_tests::stack;

use std::time::{Duration, Instant};

use futures::StreamExt as _;
use nubis_protocol::codec;
use nubis_protocol::descriptor::DataPoint;
use nubis_protocol::envelope::{now_ms, sign, Addressing};
use nubis_protocol::identity::SiteIdentity;
use nubis_protocol::message::{
    BatchPayload, BatchStored, ClearPayload, HostId, HostReply, MonitoringBatch, ProducedBatch,
    ProducerId, Sample, Value,
};
use nubis_protocol::subject::Subject;
use nubis_protocol::{SiteId, VmId};
use nubis_testkit::{require_nats_server, wait_until, Federation};
use serde_json::json;
use stack::{ops, SiteSpec, Stack};

fn batch(primary: &SiteId, vm: &VmId, seq: u64, samples: usize) -> MonitoringBatch {
    let dp = DataPoint::new("cpu.utilisation").unwrap();
    let t0 = now_ms();
    MonitoringBatch {
        vm: vm.clone(),
        primary_site: primary.clone(),
        producer: ProducerId::new("p-bench").unwrap(),
        epoch_ms: t0,
        seq,
        payload: BatchPayload::Clear(ClearPayload {
            samples: (0..samples)
                .map(|i| Sample {
                    data_point: dp.clone(),
                    ts_ms: t0 + i as u64,
                    value: Value::Float(0.25 + i as f64 * 1e-3),
                })
                .collect(),
            ..ClearPayload::default()
        }),
    }
}

/// Signed publishing against raw publishing of the same number of bytes.
async fn publishing(fed: &Federation) {
    let client = fed.connect("a").await.unwrap();
    let a = SiteIdentity::generate(SiteId::new("a").unwrap());
    let vm = VmId::new("vm-bench").unwrap();
    let subject = Subject::monitoring(a.site(), &vm, &DataPoint::new("cpu.utilisation").unwrap());
    let n: u64 = if shared::bench_mode() { 20_000 } else { 200 };
    println!("## publishing (one task, server on loopback)");
    println!("samples/batch | signed batches/s | signed samples/s | raw msgs/s (same bytes) | ratio | raw msgs/s (same samples encoded, unsigned) | ratio | envelope bytes");
    for samples in [1usize, 10, 100] {
        let template = batch(a.site(), &vm, 0, samples);
        let size = sign(
            &a,
            Addressing::broadcast(subject.as_str()),
            &template,
            now_ms(),
        )
        .unwrap()
        .encode()
        .unwrap()
        .len();
        // Signed: build, sign, encode and publish every batch.
        let start = Instant::now();
        for seq in 0..n {
            let mut b = template.clone();
            b.seq = seq;
            let env = sign(&a, Addressing::broadcast(subject.as_str()), &b, now_ms()).unwrap();
            client
                .publish(subject.as_str().to_string(), env.encode().unwrap().into())
                .await
                .unwrap();
        }
        client.flush().await.unwrap();
        let signed = n as f64 / start.elapsed().as_secs_f64();
        // Raw: the same number of bytes, prepared once.
        let payload = bytes_of(size);
        let start = Instant::now();
        for _ in 0..n {
            client
                .publish(subject.as_str().to_string(), payload.clone())
                .await
                .unwrap();
        }
        client.flush().await.unwrap();
        let raw = n as f64 / start.elapsed().as_secs_f64();
        // Raw, as a producer without signatures would publish: the same batch built and
        // encoded (MessagePack) for every message, unsigned.
        let start = Instant::now();
        for seq in 0..n {
            let mut b = template.clone();
            b.seq = seq;
            client
                .publish(
                    subject.as_str().to_string(),
                    codec::to_vec(&b).unwrap().into(),
                )
                .await
                .unwrap();
        }
        client.flush().await.unwrap();
        let encoded = n as f64 / start.elapsed().as_secs_f64();
        println!(
            "{samples} | {signed:.0} | {:.0} | {raw:.0} | {:.2} | {encoded:.0} | {:.2} | {size}",
            signed * samples as f64,
            signed / raw,
            signed / encoded
        );
    }
}

fn bytes_of(n: usize) -> bytes::Bytes {
    bytes::Bytes::from(vec![0x5a; n])
}

/// Two hops: c runs the VM, b delegated it, a is the primary.
async fn end_to_end() {
    let binary = require_nats_server().unwrap();
    let mut stack = Stack::start(
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
                hosts: vec![],
                policy: "",
                top: "",
            },
            SiteSpec {
                id: "c",
                partners: vec![("b", 0)],
                hosts: vec![("h1", 4096)],
                policy: "",
                top: "",
            },
        ],
    )
    .await;
    let op_a = stack.operator("a").await;
    std::fs::write(stack.image_store("a").join("img.qcow2"), b"disk").unwrap();
    let v = ops(
        &op_a,
        "a",
        "deploy",
        json!({"vm": "vm-lat", "name": "latency", "hardware": {"vcpus": 1, "memory_mib": 256,
              "disks": [{"name": "vda", "capacity_bytes": 1048576, "format": "qcow2", "image": "img.qcow2"}],
              "networks": []}}),
    )
    .await
    .unwrap();
    let migration = v["migration"].as_str().unwrap().to_string();
    wait_until(Duration::from_secs(60), "placement", || async {
        let v = ops(&op_a, "a", "vms", json!({"migration": migration})).await?;
        match v["phase"].as_str() {
            Some("committed") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
    .unwrap();

    let host_c = stack.fed.connect_as_host("c", "h1").await.unwrap();
    let mut consumer = op_a.subscribe("nubis.mon.a.vm-lat.>").await.unwrap();
    op_a.flush().await.unwrap();
    let a = SiteId::new("a").unwrap();
    let vm = VmId::new("vm-lat").unwrap();
    let rounds = if shared::bench_mode() { 2_000 } else { 20 };
    let mut lat = Vec::with_capacity(rounds);
    let intake =
        Subject::monitoring_intake(&SiteId::new("c").unwrap(), &HostId::new("h1").unwrap());
    for seq in 0..rounds as u64 {
        let produced = ProducedBatch {
            data_point: DataPoint::new("cpu.utilisation").unwrap(),
            batch: batch(&a, &vm, seq, 10),
        };
        let start = Instant::now();
        let payload = codec::to_vec(&produced).unwrap();
        let (reply, arrived) = tokio::join!(
            host_c.request(intake.as_str().to_string(), payload.into()),
            async {
                tokio::time::timeout(Duration::from_secs(10), consumer.next())
                    .await
                    .unwrap()
                    .unwrap();
                start.elapsed()
            }
        );
        let stored: HostReply<BatchStored> = codec::from_slice(&reply.unwrap().payload).unwrap();
        assert!(matches!(stored, HostReply::Ok(_)), "{stored:?}");
        lat.push(arrived.as_micros());
    }
    let (p50, p90, p99) = (
        shared::percentile(&mut lat, 0.5),
        shared::percentile(&mut lat, 0.9),
        shared::percentile(&mut lat, 0.99),
    );
    println!("## end to end, intake at c → relayed by b → public subject of primary a");
    println!("rounds {rounds}: p50 {p50} µs, p90 {p90} µs, p99 {p99} µs");
    stack.shutdown().await;
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    {
        let fed = Federation::start_with(&binary, &["a"]).await.unwrap();
        publishing(&fed).await;
    }
    end_to_end().await;
}
