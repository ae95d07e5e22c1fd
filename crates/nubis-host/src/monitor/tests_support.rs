use nubis_protocol::descriptor::{DataPoint, DeliveryFormat, MonitoringSpecifier};
use nubis_protocol::message::{ClearPayload, Sample, Value};

use super::*;
use crate::producer::Delivery;

/// VM `vm-1` of primary `site-a`, sealing to `sealing`, with one specifier.
pub(super) fn descriptor(sealing: [u8; 32], specifier: MonitoringSpecifier) -> VmDescriptor {
    crate::test_support::descriptor(&VmId::new("vm-1").unwrap(), sealing, vec![specifier])
}

pub(super) fn monitor_with_vm(outbox: usize) -> (Monitor, VmId) {
    let mut m = Monitor::new(MonitorSettings {
        site: SiteId::new("site-a").unwrap(),
        host: HostId::new("h1").unwrap(),
        tick: Duration::from_millis(250),
        outbox,
        kpi_root: PathBuf::from("/nonexistent"),
        kpi_share: false,
    });
    let vm = VmId::new("vm-1").unwrap();
    let descriptor = descriptor(
        [2; 32],
        MonitoringSpecifier {
            data_point: DataPoint::new("cpu.utilisation").unwrap(),
            monitoring_interval_ms: 1000,
            delivery_interval_ms: 0,
            format: DeliveryFormat::Raw,
            predicate: None,
            sealed: false,
        },
    );
    m.vms.insert(
        vm.clone(),
        VmState {
            producer: Producer::new(&descriptor.monitoring, 0),
            descriptor,
            producer_id: random_producer_id().unwrap(),
            epoch_ms: 0,
            next_seq: 0,
            unacked: BTreeSet::new(),
            kpi: None,
            kpi_retry_at: None,
            active: false,
        },
    );
    (m, vm)
}

pub(super) fn deliveries(n: u64) -> Vec<Delivery> {
    let dp = DataPoint::new("cpu.utilisation").unwrap();
    (0..n)
        .map(|i| Delivery {
            data_point: dp.clone(),
            payload: ClearPayload {
                samples: vec![Sample {
                    data_point: dp.clone(),
                    ts_ms: i,
                    value: Value::Float(0.1),
                }],
                ..ClearPayload::default()
            },
            sealed: false,
        })
        .collect()
}
