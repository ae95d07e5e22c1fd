//! Signing and verification cost of the envelopes that carry every operation: a typical control
//! message (a Migration request with a full descriptor) and a monitoring batch of 100 samples.
//!
//! Run: `cargo bench -p nubis-protocol --bench envelope`.
// A benchmark is a test harness: a failed setup step should stop it loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use nubis_protocol::descriptor::{
    Aggregate, DataPoint, DeliveryFormat, DiskFormat, DiskSpec, MonitoringSpecifier, NetworkSpec,
    PrimaryKeys, VirtualHardware, VmDescriptor,
};
use nubis_protocol::envelope::{sign, Addressing, Verifier};
use nubis_protocol::identity::SiteIdentity;
use nubis_protocol::message::MigrationRequest;
use nubis_protocol::message::ProducerId;
use nubis_protocol::message::{BatchPayload, ClearPayload, MonitoringBatch, Sample, Value};
use nubis_protocol::replay::ReplayCache;
use nubis_protocol::{MigrationId, RequestId, SiteId, VmId};

const NOW: u64 = 1_800_000_000_000;

fn descriptor(a: &SiteIdentity) -> VmDescriptor {
    let spec = |dp: &str, format| MonitoringSpecifier {
        data_point: DataPoint::new(dp).unwrap(),
        monitoring_interval_ms: 1_000,
        delivery_interval_ms: 10_000,
        format,
        predicate: None,
        sealed: false,
    };
    VmDescriptor {
        id: VmId::new("web-1").unwrap(),
        name: "web front end".into(),
        version: 1,
        primary_site: a.site().clone(),
        primary_keys: PrimaryKeys {
            signing: a.public().signing.to_bytes(),
            sealing: a.public().sealing,
        },
        hardware: VirtualHardware {
            vcpus: 2,
            memory_mib: 2048,
            disks: vec![DiskSpec {
                name: "vda".into(),
                capacity_bytes: 20 << 30,
                format: DiskFormat::Qcow2,
                image: Some("debian-12".into()),
            }],
            networks: vec![NetworkSpec {
                name: "default".into(),
                model: "virtio".into(),
            }],
            boot: None,
        },
        monitoring: vec![
            spec(
                "cpu.utilisation",
                DeliveryFormat::Processed {
                    aggregate: Aggregate::Mean,
                },
            ),
            spec("mem.used", DeliveryFormat::Raw),
            spec(
                "kpi.current_users.column1",
                DeliveryFormat::Processed {
                    aggregate: Aggregate::Max,
                },
            ),
        ],
        properties: BTreeMap::from([("service".to_string(), "shop".to_string())]),
    }
}

fn batch(a: &SiteIdentity) -> MonitoringBatch {
    let dp = DataPoint::new("cpu.utilisation").unwrap();
    MonitoringBatch {
        vm: VmId::new("web-1").unwrap(),
        primary_site: a.site().clone(),
        producer: ProducerId::new("p-7f3a").unwrap(),
        epoch_ms: NOW,
        seq: 42,
        payload: BatchPayload::Clear(ClearPayload {
            samples: (0..100)
                .map(|i| Sample {
                    data_point: dp.clone(),
                    ts_ms: NOW + i * 10,
                    value: Value::Float(0.25 + i as f64 / 1000.0),
                })
                .collect(),
            processed: Vec::new(),
            encrypted_kpi: Vec::new(),
        }),
    }
}

fn bench(c: &mut Criterion) {
    let a = SiteIdentity::generate(SiteId::new("a").unwrap());
    let b = SiteId::new("b").unwrap();
    let request = MigrationRequest {
        request_id: RequestId::random(),
        migration_id: MigrationId::random(),
        vm: VmId::new("web-1").unwrap(),
        descriptor: descriptor(&a),
        depth: 0,
        max_depth: 3,
    };
    let batch = batch(&a);
    let req_subject = "nubis.fed.b.migration.request";
    let mon_subject = "nubis.mon.a.web-1.infra.cpu.utilisation";

    let mut group = c.benchmark_group("envelope");
    group.throughput(Throughput::Elements(1));
    group.bench_function("sign+encode/migration_request", |bench| {
        bench.iter(|| {
            let env = sign(
                &a,
                Addressing::request(&b, req_subject),
                black_box(&request),
                NOW,
            )
            .unwrap();
            black_box(env.encode().unwrap())
        })
    });
    group.bench_function("sign+encode/batch_100_samples", |bench| {
        bench.iter(|| {
            let env = sign(
                &a,
                Addressing::broadcast(mon_subject),
                black_box(&batch),
                NOW,
            )
            .unwrap();
            black_box(env.encode().unwrap())
        })
    });

    // Verification with the replay cache in memory: the cost of the cryptography and decoding.
    // (A site's control-plane verifier also flushes its on-disk cache per message; that is an
    // fsync, measured by the storage, not by this code.)
    let verifier = Verifier::new(
        b.clone(),
        [(a.site().clone(), a.public().signing)],
        ReplayCache::temporary(600_000).unwrap(),
    );
    let raw_req = sign(&a, Addressing::request(&b, req_subject), &request, NOW)
        .unwrap()
        .encode()
        .unwrap();
    println!("migration request envelope: {} bytes", raw_req.len());
    group.bench_function("decode+verify/migration_request", |bench| {
        bench.iter_batched(
            // A fresh nonce for every iteration, so the replay cache accepts each one.
            || {
                sign(&a, Addressing::request(&b, req_subject), &request, NOW)
                    .unwrap()
                    .encode()
                    .unwrap()
            },
            |raw| {
                let opened = verifier.open_request(&raw, req_subject, NOW).unwrap();
                black_box(opened.body::<MigrationRequest>().unwrap())
            },
            criterion::BatchSize::SmallInput,
        )
    });
    let raw_batch = sign(&a, Addressing::broadcast(mon_subject), &batch, NOW)
        .unwrap()
        .encode()
        .unwrap();
    println!("100-sample batch envelope: {} bytes", raw_batch.len());
    group.bench_function("decode+verify/batch_100_samples", |bench| {
        bench.iter_batched(
            || {
                sign(&a, Addressing::broadcast(mon_subject), &batch, NOW)
                    .unwrap()
                    .encode()
                    .unwrap()
            },
            |raw| {
                let opened = verifier.open_event(&raw, mon_subject, NOW).unwrap();
                black_box(opened.body::<MonitoringBatch>().unwrap())
            },
            criterion::BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
