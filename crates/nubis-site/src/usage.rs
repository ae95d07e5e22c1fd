//! Resource usage of one VM over a time range, integrated from the monitoring batches a site
//! keeps in its accounting stream (the paper's billing use of monitoring data).
//!
//! Each quantity is the integral over time of one data point:
//!
//! | quantity | data point | unit of the integral |
//! |---|---|---|
//! | `cpu_core_hours` | `cpu.cores` | core × hour |
//! | `memory_gib_hours` | `mem.allocated_bytes` | GiB × hour |
//! | `disk_read_bytes` / `disk_written_bytes` | `disk.read_bytes_rate` / `disk.write_bytes_rate` | byte |
//! | `net_rx_bytes` / `net_tx_bytes` | `net.rx_bytes_rate` / `net.tx_bytes_rate` | byte |
//!
//! A raw sample stands for the interval since the previous sample of the same data point from
//! the same Producer epoch, so the first sample of an epoch contributes nothing (nothing is
//! known about the time before it). A processed `mean` stands for its whole window; other
//! aggregates say nothing about the integral and are ignored. Every interval is clipped to the
//! requested range `[from_ms, to_ms)`.

use std::collections::{BTreeMap, HashSet};

use nubis_protocol::descriptor::{Aggregate, DataPoint};
use nubis_protocol::message::{BatchPayload, ClearPayload, MonitoringBatch, ProducerId};

/// Data point integrated into `cpu_core_hours`.
pub const CPU_CORES: &str = "cpu.cores";
/// Data point integrated into `memory_gib_hours`.
pub const MEM_ALLOCATED_BYTES: &str = "mem.allocated_bytes";
/// Data point integrated into `disk_read_bytes`.
pub const DISK_READ_RATE: &str = "disk.read_bytes_rate";
/// Data point integrated into `disk_written_bytes`.
pub const DISK_WRITE_RATE: &str = "disk.write_bytes_rate";
/// Data point integrated into `net_rx_bytes`.
pub const NET_RX_RATE: &str = "net.rx_bytes_rate";
/// Data point integrated into `net_tx_bytes`.
pub const NET_TX_RATE: &str = "net.tx_bytes_rate";

const MS_PER_HOUR: f64 = 3_600_000.0;
const MS_PER_SECOND: f64 = 1_000.0;
const GIB: f64 = (1u64 << 30) as f64;

/// One batch read back from the accounting stream.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredBatch {
    /// When this site signed or received it (the stored envelope's time, ms since the epoch).
    pub stored_ms: u64,
    /// The batch.
    pub batch: MonitoringBatch,
}

pub use nubis_protocol::ops::Usage;

/// Which field a data point's integral goes to, and the divisor from value × ms to its unit.
fn quantity(data_point: &DataPoint) -> Option<(usize, f64)> {
    match data_point.as_str() {
        CPU_CORES => Some((0, MS_PER_HOUR)),
        MEM_ALLOCATED_BYTES => Some((1, MS_PER_HOUR * GIB)),
        DISK_READ_RATE => Some((2, MS_PER_SECOND)),
        DISK_WRITE_RATE => Some((3, MS_PER_SECOND)),
        NET_RX_RATE => Some((4, MS_PER_SECOND)),
        NET_TX_RATE => Some((5, MS_PER_SECOND)),
        _ => None,
    }
}

/// Length in ms of `[start, end)` ∩ `[from, to)`.
fn overlap(start: u64, end: u64, from: u64, to: u64) -> u64 {
    end.min(to).saturating_sub(start.max(from))
}

/// Adds `amount` to the integral `field` (as [`quantity`] numbers them) of `usage`.
fn add(usage: &mut Usage, field: usize, amount: f64) {
    let slot = match field {
        0 => &mut usage.cpu_core_hours,
        1 => &mut usage.memory_gib_hours,
        2 => &mut usage.disk_read_bytes,
        3 => &mut usage.disk_written_bytes,
        4 => &mut usage.net_rx_bytes,
        _ => &mut usage.net_tx_bytes,
    };
    *slot += amount;
}

/// Integrates the batches of one VM over `[from_ms, to_ms)`.
///
/// `batches` may include batches stored before `from_ms` (so that the first sample inside the
/// range has its predecessor) and the same batch more than once (it is counted once).
/// `open` turns a sealed payload into a readable one when this site holds the key; `None`
/// counts the batch as `sealed_unreadable`.
pub fn compute(
    batches: &[StoredBatch],
    from_ms: u64,
    to_ms: u64,
    open: impl Fn(&MonitoringBatch, &[u8]) -> Option<ClearPayload>,
) -> Usage {
    let mut usage = Usage::default();
    let mut seen = HashSet::new();
    // Raw samples per (producer, epoch, data point), ordered by time; one value per time.
    let mut series: BTreeMap<(ProducerId, u64, DataPoint), BTreeMap<u64, f64>> = BTreeMap::new();
    for stored in batches {
        let b = &stored.batch;
        if !seen.insert((b.producer.clone(), b.epoch_ms, b.seq)) {
            continue;
        }
        let in_range = (from_ms..to_ms).contains(&stored.stored_ms);
        if in_range {
            usage.batches += 1;
        }
        let opened;
        let payload = match &b.payload {
            BatchPayload::Clear(p) => p,
            BatchPayload::Sealed { ciphertext } => match open(b, ciphertext) {
                Some(p) => {
                    opened = p;
                    &opened
                }
                None => {
                    if in_range {
                        usage.sealed_unreadable += 1;
                    }
                    continue;
                }
            },
        };
        for s in &payload.samples {
            if (from_ms..to_ms).contains(&s.ts_ms) {
                usage.samples += 1;
            }
            if let (Some(_), Some(v)) = (quantity(&s.data_point), s.value.as_f64()) {
                series
                    .entry((b.producer.clone(), b.epoch_ms, s.data_point.clone()))
                    .or_default()
                    .insert(s.ts_ms, v);
            }
        }
        for p in &payload.processed {
            let covered = overlap(p.window_start_ms, p.window_end_ms, from_ms, to_ms);
            if covered > 0 {
                usage.samples += 1;
            }
            if p.aggregate != Aggregate::Mean || !p.value.is_finite() {
                continue;
            }
            if let Some((field, divisor)) = quantity(&p.data_point) {
                add(&mut usage, field, p.value * covered as f64 / divisor);
            }
        }
    }
    for ((_, _, data_point), points) in &series {
        let Some((field, divisor)) = quantity(data_point) else {
            continue;
        };
        let mut previous: Option<u64> = None;
        for (&ts, &value) in points {
            if let Some(prev) = previous {
                if value.is_finite() {
                    add(
                        &mut usage,
                        field,
                        value * overlap(prev, ts, from_ms, to_ms) as f64 / divisor,
                    );
                }
            }
            previous = Some(ts);
        }
    }
    usage
}

#[cfg(test)]
mod tests {
    use super::*;
    use nubis_protocol::message::{ProcessedValue, Sample, Value};
    use nubis_protocol::{SiteId, VmId};

    fn sample(dp: &str, ts_ms: u64, value: Value) -> Sample {
        Sample {
            data_point: DataPoint::new(dp).unwrap(),
            ts_ms,
            value,
        }
    }

    fn batch(producer: &str, epoch_ms: u64, seq: u64, payload: BatchPayload) -> StoredBatch {
        StoredBatch {
            stored_ms: 1_000 + seq,
            batch: MonitoringBatch {
                vm: VmId::new("vm-1").unwrap(),
                primary_site: SiteId::new("a").unwrap(),
                producer: ProducerId::new(producer).unwrap(),
                epoch_ms,
                seq,
                payload,
            },
        }
    }

    fn clear(samples: Vec<Sample>, processed: Vec<ProcessedValue>) -> BatchPayload {
        BatchPayload::Clear(ClearPayload {
            samples,
            processed,
            encrypted_kpi: Vec::new(),
        })
    }

    fn never(_: &MonitoringBatch, _: &[u8]) -> Option<ClearPayload> {
        None
    }

    const HOUR: u64 = 3_600_000;

    #[test]
    fn raw_samples_integrate_over_the_interval_since_the_previous_one() {
        // Two cores for the first hour, four for the second; the sample at 0 only starts.
        let b = batch(
            "p1",
            7,
            0,
            clear(
                vec![
                    sample(CPU_CORES, 0, Value::Int(99)),
                    sample(CPU_CORES, HOUR, Value::Int(2)),
                    sample(CPU_CORES, 2 * HOUR, Value::Float(4.0)),
                    sample(MEM_ALLOCATED_BYTES, 0, Value::Int(1 << 30)),
                    sample(MEM_ALLOCATED_BYTES, 2 * HOUR, Value::Int(3 << 30)),
                    sample(DISK_READ_RATE, 0, Value::Int(0)),
                    sample(DISK_READ_RATE, 10_000, Value::Int(100)),
                    sample(DISK_WRITE_RATE, 0, Value::Int(0)),
                    sample(DISK_WRITE_RATE, 4_000, Value::Float(2.5)),
                    sample(NET_RX_RATE, 0, Value::Int(0)),
                    sample(NET_RX_RATE, 1_000, Value::Int(7)),
                    sample(NET_TX_RATE, 0, Value::Int(0)),
                    sample(NET_TX_RATE, 2_000, Value::Int(3)),
                    sample("cpu.utilisation", HOUR, Value::Int(50)),
                    sample(CPU_CORES, 3 * HOUR, Value::Text("n/a".into())),
                ],
                vec![],
            ),
        );
        let u = compute(&[b], 0, 10 * HOUR, never);
        assert_eq!(u.cpu_core_hours, 6.0);
        assert_eq!(u.memory_gib_hours, 6.0);
        assert_eq!(u.disk_read_bytes, 1_000.0);
        assert_eq!(u.disk_written_bytes, 10.0);
        assert_eq!(u.net_rx_bytes, 7.0);
        assert_eq!(u.net_tx_bytes, 6.0);
        assert_eq!((u.batches, u.samples, u.sealed_unreadable), (1, 15, 0));
    }

    #[test]
    fn intervals_are_clipped_to_the_range() {
        let b = batch(
            "p1",
            7,
            0,
            clear(
                vec![
                    sample(CPU_CORES, 0, Value::Int(1)),
                    sample(CPU_CORES, 2 * HOUR, Value::Int(3)),
                ],
                vec![],
            ),
        );
        // Only the second half of the interval [0, 2h) lies in [1h, 5h).
        let u = compute(&[b], HOUR, 5 * HOUR, never);
        assert_eq!(u.cpu_core_hours, 3.0);
        assert_eq!(u.samples, 1);
        // The batch was stored outside the range.
        assert_eq!(u.batches, 0);
    }

    #[test]
    fn epochs_and_producers_are_separate_series_and_duplicates_count_once() {
        let first = batch(
            "p1",
            7,
            0,
            clear(vec![sample(CPU_CORES, 0, Value::Int(1))], vec![]),
        );
        let second = batch(
            "p1",
            7,
            1,
            clear(vec![sample(CPU_CORES, HOUR, Value::Int(2))], vec![]),
        );
        // A restarted producer (new epoch) and another producer: their first samples count
        // nothing, though they come later than p1's.
        let restarted = batch(
            "p1",
            8,
            0,
            clear(vec![sample(CPU_CORES, 2 * HOUR, Value::Int(50))], vec![]),
        );
        let other = batch(
            "p2",
            7,
            0,
            clear(vec![sample(CPU_CORES, 3 * HOUR, Value::Int(50))], vec![]),
        );
        let u = compute(
            &[
                first,
                second.clone(),
                second.clone(),
                restarted,
                other,
                second,
            ],
            0,
            10 * HOUR,
            never,
        );
        assert_eq!(u.cpu_core_hours, 2.0);
        assert_eq!(u.batches, 4);
    }

    #[test]
    fn processed_means_cover_their_window_and_other_aggregates_are_ignored() {
        let mean = |start: u64, end: u64, value: f64, aggregate| ProcessedValue {
            data_point: DataPoint::new(NET_TX_RATE).unwrap(),
            aggregate,
            window_start_ms: start,
            window_end_ms: end,
            value,
            count: 10,
        };
        let b = batch(
            "p1",
            7,
            0,
            clear(
                vec![],
                vec![
                    mean(0, 10_000, 100.0, Aggregate::Mean),
                    mean(10_000, 20_000, 50.0, Aggregate::Mean),
                    mean(0, 20_000, 1e9, Aggregate::Max),
                    mean(30_000, 40_000, 1e9, Aggregate::Mean),
                ],
            ),
        );
        // [5 s, 30 s): half of the first window, all of the second, none of the fourth.
        let u = compute(&[b], 5_000, 30_000, never);
        assert_eq!(u.net_tx_bytes, 500.0 + 500.0);
        assert_eq!(u.samples, 3);
    }

    #[test]
    fn sealed_batches_are_opened_when_possible_else_counted() {
        let inner = ClearPayload {
            samples: vec![
                sample(CPU_CORES, 0, Value::Int(0)),
                sample(CPU_CORES, HOUR, Value::Int(8)),
            ],
            ..ClearPayload::default()
        };
        let sealed = batch(
            "p1",
            7,
            0,
            BatchPayload::Sealed {
                ciphertext: vec![1, 2, 3],
            },
        );
        let u = compute(std::slice::from_ref(&sealed), 0, 10 * HOUR, never);
        assert_eq!(
            (u.cpu_core_hours, u.sealed_unreadable, u.batches),
            (0.0, 1, 1)
        );
        let u = compute(&[sealed], 0, 10 * HOUR, |b, ct| {
            assert_eq!(b.seq, 0);
            (ct == [1, 2, 3]).then(|| inner.clone())
        });
        assert_eq!(
            (u.cpu_core_hours, u.sealed_unreadable, u.samples),
            (8.0, 0, 2)
        );
    }
}
