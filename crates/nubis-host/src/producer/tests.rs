use std::time::{Duration, SystemTime};

use nubis_protocol::descriptor::{Aggregate, DeliveryFormat, Predicate, PredicateOp};
use nubis_protocol::message::{ProcessedValue, Sample};

use super::*;
use crate::dmtf::DmtfState;
use crate::hypervisor::MemoryStats;
use crate::sampling::{DiskRates, InterfaceRates};

fn dp(s: &str) -> DataPoint {
    DataPoint::new(s).unwrap()
}

fn spec(
    name: &str,
    monitor_ms: u64,
    deliver_ms: u64,
    format: DeliveryFormat,
) -> MonitoringSpecifier {
    MonitoringSpecifier {
        data_point: dp(name),
        monitoring_interval_ms: monitor_ms,
        delivery_interval_ms: deliver_ms,
        format,
        predicate: None,
        sealed: false,
    }
}

fn processed_fmt(aggregate: Aggregate) -> DeliveryFormat {
    DeliveryFormat::Processed { aggregate }
}

fn floats(samples: &[Sample]) -> Vec<f64> {
    samples.iter().filter_map(|s| s.value.as_f64()).collect()
}

fn samples_of(deliveries: &[Delivery]) -> Vec<Sample> {
    deliveries
        .iter()
        .flat_map(|d| d.payload.samples.clone())
        .collect()
}

#[test]
fn processed_values_equal_the_aggregate_of_the_raw_window() {
    let aggregates = [
        Aggregate::Min,
        Aggregate::Max,
        Aggregate::Mean,
        Aggregate::Median,
    ];
    let mut specs = vec![spec("cpu.utilisation", 0, 1000, DeliveryFormat::Raw)];
    specs.extend(
        aggregates
            .iter()
            .map(|a| spec("cpu.utilisation", 0, 1000, processed_fmt(*a))),
    );
    let mut p = Producer::new(&specs, 0);
    let cpu = dp("cpu.utilisation");
    // Irregular timestamps and values, some windows with an even count, some odd.
    let mut ts = 0;
    let mut i = 0u64;
    while ts < 5_000 {
        p.observe(&cpu, ts, Value::Float(((i * 37) % 101) as f64 / 100.0));
        ts += 70 + (i % 5) * 30;
        i += 1;
    }
    assert!(p.poll(999).is_empty(), "no window has ended yet");
    let out = p.poll(5_000);
    let raw: Vec<&Delivery> = out
        .iter()
        .filter(|d| !d.payload.samples.is_empty())
        .collect();
    assert_eq!(raw.len(), 5, "one raw delivery per window");
    for (k, d) in raw.iter().enumerate() {
        let (start, end) = (k as u64 * 1000, (k as u64 + 1) * 1000);
        assert!(d
            .payload
            .samples
            .iter()
            .all(|s| (start..end).contains(&s.ts_ms)));
    }
    let all_raw: Vec<Sample> = raw.iter().flat_map(|d| d.payload.samples.clone()).collect();
    assert_eq!(all_raw.len() as u64, i, "every sample delivered once");
    let processed: Vec<&ProcessedValue> = out
        .iter()
        .flat_map(|d| d.payload.processed.iter())
        .collect();
    assert_eq!(processed.len(), 5 * aggregates.len());
    for pv in processed {
        assert_eq!(pv.window_end_ms - pv.window_start_ms, 1000);
        assert_eq!(pv.window_start_ms % 1000, 0);
        let window: Vec<Sample> = all_raw
            .iter()
            .filter(|s| (pv.window_start_ms..pv.window_end_ms).contains(&s.ts_ms))
            .cloned()
            .collect();
        let expected = pv.aggregate.apply(&floats(&window)).unwrap();
        assert_eq!(pv.value, expected, "{:?}", pv.aggregate);
        assert_eq!(pv.count as usize, window.len());
    }
    // The window [5000, 6000) is not over yet.
    p.observe(&cpu, 5_500, Value::Float(1.0));
    assert!(p.poll(5_999).is_empty());
    assert_eq!(p.poll(6_000).len(), 1 + aggregates.len());
}

#[test]
fn windows_are_aligned_delivered_once_and_empty_ones_skipped() {
    let mut p = Producer::new(&[spec("state", 0, 1000, DeliveryFormat::Raw)], 1_234);
    let st = dp("state");
    p.observe(&st, 1_500, Value::Int(2));
    p.observe(&st, 2_500, Value::Int(9));
    assert!(p.poll(1_999).is_empty());
    let out = p.poll(2_000);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].payload.samples.len(), 1);
    assert_eq!(out[0].payload.samples[0].ts_ms, 1_500);
    assert!(p.poll(2_000).is_empty(), "a window is delivered once");
    let out = p.poll(10_000);
    assert_eq!(samples_of(&out).len(), 1);
    assert_eq!(samples_of(&out)[0].value, Value::Int(9));
    // A sample after a long silence lands in its own aligned window.
    p.observe(&st, 10_100, Value::Int(3));
    assert!(p.poll(10_999).is_empty());
    assert_eq!(samples_of(&p.poll(11_000)).len(), 1);
}

#[test]
fn processed_windows_report_their_bounds_and_skip_empty_ones() {
    let mut p = Producer::new(
        &[spec("cpu.cores", 0, 500, processed_fmt(Aggregate::Mean))],
        0,
    );
    let c = dp("cpu.cores");
    p.observe(&c, 100, Value::Float(1.0));
    p.observe(&c, 400, Value::Float(2.0));
    p.observe(&c, 1_600, Value::Int(6));
    let out = p.poll(2_000);
    let pv: Vec<&ProcessedValue> = out.iter().flat_map(|d| &d.payload.processed).collect();
    assert_eq!(pv.len(), 2, "the empty windows in between deliver nothing");
    assert_eq!((pv[0].window_start_ms, pv[0].window_end_ms), (0, 500));
    assert_eq!((pv[0].value, pv[0].count), (1.5, 2));
    assert_eq!((pv[1].window_start_ms, pv[1].window_end_ms), (1_500, 2_000));
    assert_eq!((pv[1].value, pv[1].count), (6.0, 1));
}

#[test]
fn monitoring_interval_keeps_one_sample_per_period() {
    let mut p = Producer::new(&[spec("cpu.utilisation", 1000, 0, DeliveryFormat::Raw)], 0);
    let cpu = dp("cpu.utilisation");
    assert!(p.is_due(0));
    p.observe(&cpu, 0, Value::Float(0.0));
    assert!(!p.is_due(999));
    assert!(p.is_due(1_000));
    for ts in (100..10_000).step_by(100) {
        p.observe(&cpu, ts, Value::Float(ts as f64));
    }
    let kept: Vec<u64> = samples_of(&p.poll(10_000))
        .iter()
        .map(|s| s.ts_ms)
        .collect();
    assert_eq!(kept, (0..10_000).step_by(1000).collect::<Vec<u64>>());
    // An older sample than the last kept is never taken.
    p.observe(&cpu, 5_000, Value::Float(1.0));
    assert!(p.poll(20_000).is_empty());
    // Interval zero keeps everything.
    let mut q = Producer::new(&[spec("cpu.utilisation", 0, 0, DeliveryFormat::Raw)], 0);
    for ts in 0..10 {
        assert!(q.is_due(ts));
        q.observe(&cpu, ts, Value::Float(0.5));
    }
    assert_eq!(samples_of(&q.poll(10)).len(), 10);
}

#[test]
fn measure_infra_respects_the_interval_of_each_specifier() {
    let specs = [
        spec("cpu.utilisation", 1000, 0, DeliveryFormat::Raw),
        spec("cpu.utilisation", 250, 0, DeliveryFormat::Raw),
        spec("no.such.thing", 0, 0, DeliveryFormat::Raw),
    ];
    let mut p = Producer::new(&specs, 0);
    assert_eq!(p.due_data_points(0).len(), 2);
    let r = rates();
    for ts in (0..2_000).step_by(250) {
        p.measure_infra(ts, &r, 2);
    }
    let out = p.poll(2_000);
    let per_spec: Vec<usize> = out.iter().map(|d| d.payload.samples.len()).collect();
    assert_eq!(
        per_spec,
        vec![2, 8],
        "the unknown data point yields nothing"
    );
}

#[test]
fn predicate_false_sends_nothing() {
    let gt = |threshold| Predicate {
        op: PredicateOp::Gt,
        threshold,
    };
    let mut raw = spec("kpi.web.users", 0, 0, DeliveryFormat::Raw);
    raw.predicate = Some(gt(1000.0));
    let mut mean = spec("kpi.web.users", 0, 1000, processed_fmt(Aggregate::Mean));
    mean.predicate = Some(gt(1000.0));
    let mut p = Producer::new(&[raw, mean], 0);
    let users = dp("kpi.web.users");
    for (ts, v) in [(100, 10), (200, 900), (300, 1000)] {
        p.observe(&users, ts, Value::Int(v));
    }
    assert!(p.poll(1_000).is_empty(), "the predicate never held");
    for (ts, v) in [(1_100, 1500), (1_200, 300), (1_300, 1700)] {
        p.observe(&users, ts, Value::Int(v));
    }
    p.observe(&users, 1_400, Value::Text("many".into()));
    let out = p.poll(2_000);
    let values: Vec<Value> = samples_of(&out).into_iter().map(|s| s.value).collect();
    assert_eq!(values, vec![Value::Int(1500), Value::Int(1700)]);
    let pv: Vec<&ProcessedValue> = out.iter().flat_map(|d| &d.payload.processed).collect();
    assert_eq!(pv.len(), 1);
    assert_eq!(pv[0].value, 3500.0 / 3.0);
    assert_eq!(pv[0].count, 3, "text is not counted");
}

#[test]
fn update_takes_effect_and_keeps_unchanged_specifiers() {
    let a = spec("cpu.utilisation", 0, 1000, DeliveryFormat::Raw);
    let b = spec("mem.allocated_bytes", 0, 0, DeliveryFormat::Raw);
    let mut p = Producer::new(std::slice::from_ref(&a), 0);
    let cpu = dp("cpu.utilisation");
    let mem = dp("mem.allocated_bytes");
    p.observe(&cpu, 100, Value::Float(0.1));
    p.observe(&mem, 150, Value::Int(1));
    assert!(p.poll(300).is_empty());
    p.update(&[a.clone(), b.clone()], 300);
    p.observe(&cpu, 400, Value::Float(0.2));
    p.observe(&mem, 400, Value::Int(2));
    let out = p.poll(400);
    assert_eq!(out.len(), 1, "the new specifier delivers at once");
    assert_eq!(out[0].data_point, mem);
    assert_eq!(samples_of(&out)[0].value, Value::Int(2));
    let out = p.poll(1_000);
    assert_eq!(
        samples_of(&out).iter().map(|s| s.ts_ms).collect::<Vec<_>>(),
        vec![100, 400],
        "the unchanged specifier kept its samples"
    );
    // Changing a specifier replaces it; removing one stops it.
    let mut b2 = b.clone();
    b2.sealed = true;
    p.update(std::slice::from_ref(&b2), 1_000);
    p.observe(&cpu, 1_100, Value::Float(0.3));
    p.observe(&mem, 1_100, Value::Int(3));
    let out = p.poll(5_000);
    assert_eq!(out.len(), 1);
    assert!(out[0].sealed);
    assert_eq!(out[0].data_point, mem);
    assert!(!p.wants_kpi());
}

#[test]
fn kpi_tables_cover_their_columns_and_encrypted_rows() {
    let table = spec("kpi.web", 0, 0, DeliveryFormat::Raw);
    let column = spec("kpi.web.users", 0, 0, DeliveryFormat::Raw);
    let mut guarded = spec("kpi.web", 0, 0, DeliveryFormat::Raw);
    guarded.predicate = Some(Predicate {
        op: PredicateOp::Ge,
        threshold: 0.0,
    });
    let mut p = Producer::new(&[table, column, guarded], 0);
    assert!(p.wants_kpi());
    p.observe(&dp("kpi.web.users"), 10, Value::Int(5));
    p.observe(&dp("kpi.web.load"), 10, Value::Float(0.5));
    p.observe(&dp("kpi.webshop.users"), 10, Value::Int(7));
    p.observe_encrypted("web", 20, b"sealed");
    p.observe_encrypted("other", 20, b"x");
    let out = p.poll(30);
    assert_eq!(out.len(), 3);
    assert_eq!(out[0].payload.samples.len(), 2);
    assert_eq!(out[0].payload.encrypted_kpi.len(), 1);
    assert_eq!(out[0].payload.encrypted_kpi[0].blob, b"sealed");
    assert_eq!(out[0].payload.encrypted_kpi[0].table, "web");
    assert_eq!(out[1].payload.samples.len(), 1);
    assert_eq!(out[1].payload.samples[0].data_point, dp("kpi.web.users"));
    assert!(out[1].payload.encrypted_kpi.is_empty());
    assert_eq!(out[2].payload.samples.len(), 2);
    assert!(
        out[2].payload.encrypted_kpi.is_empty(),
        "a predicate cannot be judged on an encrypted row"
    );
}

#[test]
fn large_deliveries_are_split() {
    let mut p = Producer::new(&[spec("kpi.t.c", 0, 0, DeliveryFormat::Raw)], 0);
    let c = dp("kpi.t.c");
    let n = 2 * MAX_VALUES_PER_DELIVERY + 5;
    for ts in 0..n as u64 {
        p.observe(&c, ts, Value::Int(1));
    }
    let sizes: Vec<usize> = p
        .poll(n as u64)
        .iter()
        .map(|d| d.payload.samples.len())
        .collect();
    assert_eq!(
        sizes,
        vec![MAX_VALUES_PER_DELIVERY, MAX_VALUES_PER_DELIVERY, 5]
    );
    let mut q = Producer::new(&[spec("kpi.t", 0, 0, DeliveryFormat::Raw)], 0);
    let blob = vec![0u8; MAX_BLOB_BYTES_PER_DELIVERY / 2 + 1];
    for ts in 0..3 {
        q.observe_encrypted("t", ts, &blob);
    }
    let sizes: Vec<usize> = q
        .poll(3)
        .iter()
        .map(|d| d.payload.encrypted_kpi.len())
        .collect();
    assert_eq!(sizes, vec![1, 1, 1]);
}

#[test]
fn flush_delivers_unfinished_windows_and_settling_tracks_kpi() {
    let mut p = Producer::new(
        &[
            spec("kpi.web.users", 0, 10_000, processed_fmt(Aggregate::Max)),
            spec("cpu.utilisation", 0, 10_000, DeliveryFormat::Raw),
        ],
        0,
    );
    assert_eq!(p.kpi_settled_before(), 0);
    p.observe(&dp("kpi.web.users"), 12_000, Value::Int(4));
    p.observe(&dp("cpu.utilisation"), 12_000, Value::Float(0.5));
    assert!(p.poll(12_500).is_empty());
    assert_eq!(p.kpi_settled_before(), 10_000);
    let out = p.flush(12_500);
    assert_eq!(out.len(), 2);
    let pv = &out[0].payload.processed[0];
    assert_eq!(
        (pv.window_start_ms, pv.window_end_ms, pv.value),
        (10_000, 20_000, 4.0)
    );
    assert_eq!(p.kpi_settled_before(), 20_000);
    assert!(p.flush(12_500).is_empty());
}

fn rates() -> Rates {
    Rates {
        name: "vm".into(),
        interval: Duration::from_secs(1),
        wall_time: SystemTime::UNIX_EPOCH,
        state: DmtfState::Paused,
        cpu_utilisation: 0.25,
        memory: MemoryStats {
            current_kib: 2048,
            unused_kib: Some(512),
            ..MemoryStats::default()
        },
        disks: vec![
            DiskRates {
                device: "vda".into(),
                rd_bytes_per_s: 100.0,
                wr_bytes_per_s: 200.0,
                rd_req_per_s: 1.0,
                wr_req_per_s: 2.0,
            },
            DiskRates {
                device: "vdb".into(),
                rd_bytes_per_s: 1000.0,
                wr_bytes_per_s: 2000.0,
                rd_req_per_s: 10.0,
                wr_req_per_s: 20.0,
            },
        ],
        interfaces: vec![InterfaceRates {
            device: "52:54:00:aa:bb:cc".into(),
            rx_bytes_per_s: 5.0,
            tx_bytes_per_s: 6.0,
            rx_packets_per_s: 0.5,
            tx_packets_per_s: 0.6,
        }],
        counters_reset: false,
    }
}

#[test]
fn infrastructure_data_points() {
    let r = rates();
    let v = |name| infra_value(&r, 4, name);
    assert_eq!(v("cpu.utilisation"), Some(Value::Float(0.25)));
    assert_eq!(v("cpu.cores"), Some(Value::Float(1.0)));
    assert_eq!(v("mem.allocated_bytes"), Some(Value::Int(2048 * 1024)));
    assert_eq!(v("mem.used_bytes"), Some(Value::Int(1536 * 1024)));
    assert_eq!(v("state"), Some(Value::Int(9)));
    assert_eq!(v("disk.read_bytes_rate"), Some(Value::Float(1100.0)));
    assert_eq!(v("disk.write_bytes_rate"), Some(Value::Float(2200.0)));
    assert_eq!(v("disk.read_requests_rate"), Some(Value::Float(11.0)));
    assert_eq!(v("disk.write_requests_rate"), Some(Value::Float(22.0)));
    assert_eq!(v("net.rx_bytes_rate"), Some(Value::Float(5.0)));
    assert_eq!(v("net.tx_bytes_rate"), Some(Value::Float(6.0)));
    assert_eq!(v("net.rx_packets_rate"), Some(Value::Float(0.5)));
    assert_eq!(v("net.tx_packets_rate"), Some(Value::Float(0.6)));
    assert_eq!(v("disk.vdb.write_bytes_rate"), Some(Value::Float(2000.0)));
    assert_eq!(v("disk.vda.read_requests_rate"), Some(Value::Float(1.0)));
    assert_eq!(
        v("net.52_54_00_aa_bb_cc.tx_bytes_rate"),
        Some(Value::Float(6.0))
    );
    for name in INFRA_DATA_POINTS {
        assert!(DataPoint::new(*name).is_ok());
        assert!(v(name).is_some(), "{name}");
    }
    for unknown in [
        "cpu",
        "disk.vdc.read_bytes_rate",
        "disk.vda.nope",
        "gpu.x.y",
        "a.b.c.d",
    ] {
        assert_eq!(v(unknown), None, "{unknown}");
    }
    let mut no_balloon = r.clone();
    no_balloon.memory.unused_kib = None;
    assert_eq!(infra_value(&no_balloon, 4, "mem.used_bytes"), None);
}
