//! Sampling overhead: one round of infrastructure measurements (statistics snapshot turned into
//! rates) for 100 running domains on libvirt's test driver, as the host agent does once per
//! monitoring interval. The baseline is the bare snapshot round without the rate computation.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use nubis_host::spec::{DiskFormat, DiskSpec, InterfaceSpec};
use nubis_host::{DomainSpec, Hypervisor, LibvirtConfig, LibvirtHypervisor, Sampler};

const DOMAINS: usize = 100;

fn spec(i: usize) -> DomainSpec {
    let name = format!("bench-{i}");
    let mut spec = DomainSpec::new(&name, 1, 128);
    spec.disks.push(DiskSpec {
        path: format!("/var/lib/nubis/{name}/disk.qcow2").into(),
        format: DiskFormat::Qcow2,
        target: "vda".into(),
        capacity_bytes: 1 << 30,
        read_only: false,
    });
    spec.interfaces.push(InterfaceSpec::User { mac: None });
    spec
}

fn sampling(c: &mut Criterion) {
    let Ok(hv) = LibvirtHypervisor::connect(LibvirtConfig::new("test:///default")) else {
        eprintln!("skipped: libvirt's test driver is not available");
        return;
    };
    let names: Vec<String> = (0..DOMAINS)
        .filter_map(|i| {
            let s = spec(i);
            hv.define(&s).ok()?;
            hv.start(&s.name).ok()?;
            Some(s.name)
        })
        .collect();
    assert_eq!(names.len(), DOMAINS, "all bench domains defined");

    let mut group = c.benchmark_group("sampling_100_domains_test_driver");
    group.bench_function("snapshots_only", |b| {
        b.iter(|| {
            for n in &names {
                black_box(hv.stats(n).ok());
            }
        })
    });
    let mut sampler = Sampler::new();
    group.bench_function("snapshots_and_rates", |b| {
        b.iter(|| {
            for n in &names {
                if let Ok(s) = hv.stats(n) {
                    black_box(sampler.observe(s).ok());
                }
            }
        })
    });
    group.finish();
}

criterion_group!(benches, sampling);
criterion_main!(benches);
