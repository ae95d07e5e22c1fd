//! Producer cost per monitored VM: one second of host-agent monitoring work for 1,000 and 10,000
//! VMs, each with one `cpu.utilisation` specifier measured and delivered at 1 Hz. Per VM and
//! second that is one infrastructure measurement from the interval's rates, one poll, and the
//! resulting batch encoded as the `ProducedBatch` request body sent to the site (clear, and
//! sealed to the primary site's key). Statistics collection from the hypervisor is measured by
//! the `sampling` bench; the bus round trip by the integration benches.
//!
//! The time per iteration divided by the number of VMs is the host-agent CPU time per monitored
//! VM and second.

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use nubis_host::dmtf::DmtfState;
use nubis_host::hypervisor::MemoryStats;
use nubis_host::monitor::encode_batch;
use nubis_host::producer::Producer;
use nubis_host::sampling::{DiskRates, InterfaceRates, Rates};
use nubis_protocol::descriptor::{
    DataPoint, DeliveryFormat, MonitoringSpecifier, PrimaryKeys, VirtualHardware, VmDescriptor,
};
use nubis_protocol::message::ProducerId;
use nubis_protocol::{SiteId, VmId};

struct Vm {
    descriptor: VmDescriptor,
    producer: Producer,
    id: ProducerId,
    seq: u64,
}

fn descriptor(i: usize, sealed: bool) -> VmDescriptor {
    VmDescriptor {
        id: VmId::new(format!("vm-{i}")).unwrap_or_else(|e| panic!("valid vm id: {e}")),
        name: "bench".into(),
        version: 1,
        primary_site: SiteId::new("site-a").unwrap_or_else(|e| panic!("valid site id: {e}")),
        primary_keys: PrimaryKeys {
            signing: [1; 32],
            sealing: [2; 32],
        },
        hardware: VirtualHardware {
            vcpus: 2,
            memory_mib: 1024,
            disks: vec![],
            networks: vec![],
            boot: None,
        },
        monitoring: vec![MonitoringSpecifier {
            data_point: DataPoint::new("cpu.utilisation")
                .unwrap_or_else(|e| panic!("valid data point: {e}")),
            monitoring_interval_ms: 1000,
            delivery_interval_ms: 1000,
            format: DeliveryFormat::Raw,
            predicate: None,
            sealed,
        }],
        properties: Default::default(),
    }
}

fn rates() -> Rates {
    Rates {
        name: "vm".into(),
        interval: Duration::from_secs(1),
        wall_time: SystemTime::UNIX_EPOCH,
        state: DmtfState::Enabled,
        cpu_utilisation: 0.37,
        memory: MemoryStats {
            current_kib: 1 << 20,
            ..MemoryStats::default()
        },
        disks: vec![DiskRates {
            device: "vda".into(),
            rd_bytes_per_s: 1e6,
            wr_bytes_per_s: 2e6,
            rd_req_per_s: 10.0,
            wr_req_per_s: 20.0,
        }],
        interfaces: vec![InterfaceRates {
            device: "vnet0".into(),
            rx_bytes_per_s: 1e5,
            tx_bytes_per_s: 2e5,
            rx_packets_per_s: 100.0,
            tx_packets_per_s: 200.0,
        }],
        counters_reset: false,
    }
}

fn vms(n: usize, sealed: bool) -> Vec<Vm> {
    (0..n)
        .map(|i| {
            let descriptor = descriptor(i, sealed);
            Vm {
                producer: Producer::new(&descriptor.monitoring, 0),
                descriptor,
                id: ProducerId::new(format!("p-{i:016x}"))
                    .unwrap_or_else(|e| panic!("valid producer id: {e}")),
                seq: 0,
            }
        })
        .collect()
}

/// One second of monitoring for every VM: measure at `t`, poll at the end of the window.
fn one_second(vms: &mut [Vm], t: u64, rates: &Rates) -> usize {
    let mut bytes = 0;
    for vm in vms.iter_mut() {
        vm.producer.measure_infra(t + 500, rates, 2);
        for delivery in vm.producer.poll(t + 1000) {
            let body = encode_batch(&vm.descriptor, &vm.id, 0, vm.seq, delivery)
                .unwrap_or_else(|e| panic!("batch encodes: {e}"));
            vm.seq += 1;
            bytes += body.len();
        }
    }
    bytes
}

fn producer(c: &mut Criterion) {
    let rates = rates();
    let mut group = c.benchmark_group("producer_second");
    for n in [1_000usize, 10_000] {
        group.throughput(Throughput::Elements(n as u64));
        for sealed in [false, true] {
            let label = if sealed { "sealed" } else { "clear" };
            let mut all = vms(n, sealed);
            let mut t = 0u64;
            // Every iteration must deliver one batch per VM, or the figure means nothing.
            assert!(one_second(&mut all, t, &rates) > 0);
            group.bench_with_input(BenchmarkId::new(label, n), &n, |b, _| {
                b.iter(|| {
                    t += 1000;
                    black_box(one_second(&mut all, t, &rates))
                });
            });
        }
    }
    group.finish();
}

criterion_group!(benches, producer);
criterion_main!(benches);
