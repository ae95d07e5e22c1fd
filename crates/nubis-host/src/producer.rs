//! The monitoring Producer of one VM (paper section IV): the part of the Implementation layer
//! that turns measurements into deliveries as the VM Descriptor's monitoring specifiers ask.
//!
//! Everything here is synchronous and pure: time is passed in explicitly (milliseconds since the
//! Unix epoch), nothing is sent. The agent's monitor feeds a [`Producer`] with samples, polls it,
//! and sends what it returns; the tests feed it synthetic samples and check the deliveries
//! exactly.
//!
//! # Specifiers
//!
//! Each [`MonitoringSpecifier`] is handled on its own, so several specifiers on the same data
//! point deliver independently.
//!
//! - **Monitoring interval** `I`: time is cut into periods `[kI, (k+1)I)` and the specifier keeps
//!   the first sample of each data point in each period; the others are not measurements it asked
//!   for. `I = 0` keeps every sample. Aligned periods keep the long-run rate exactly one sample
//!   per `I` even though the agent's tick does not divide it.
//! - **Delivery interval** `D`: `D = 0` delivers, at every poll, whatever arrived since the last
//!   one. Otherwise time is cut into windows `[kD, (k+1)D)` (start inclusive, end exclusive) and
//!   a window is delivered at the first poll at or after its end. A window without samples
//!   delivers nothing.
//! - **Format** `raw` delivers every sample of the window; `processed` delivers one
//!   [`ProcessedValue`] per data point, [`Aggregate::apply`] over exactly the numeric samples
//!   whose timestamps fall in the window (text values are ignored). A sample that arrives after
//!   its window was delivered is still delivered raw (it carries its own timestamp) but is left
//!   out of processed values, which must describe their window exactly.
//! - **Predicate**: only raw samples and processed values for which it holds are delivered; while
//!   it is false nothing is. Text values never satisfy a predicate, and encrypted KPI rows, which
//!   the host cannot read, are never delivered by a specifier that has one.
//! - **KPI tables**: a specifier on `kpi.<table>` (no column) covers every column of the table,
//!   `kpi.<table>.<column>`, and forwards the table's encrypted rows ([`EncryptedKpi`]).
//!
//! A delivery is split so that no batch grows near the bus's message size limit.
//!
//! # Infrastructure data points
//!
//! Computed by [`infra_value`] from the [`Rates`] of one sampling interval. The site computes
//! usage from them (CPU-hours are the integral of `cpu.cores` over time).
//!
//! | data point | value | meaning |
//! |---|---|---|
//! | `cpu.utilisation` | float | CPU time used over the time all vCPUs could have used, 0..1 |
//! | `cpu.cores` | float | `cpu.utilisation` × vCPUs: how many cores were busy |
//! | `mem.allocated_bytes` | int | memory currently given to the VM |
//! | `mem.used_bytes` | int | allocated minus what the guest reports unused (only with a balloon driver) |
//! | `disk.read_bytes_rate`, `disk.write_bytes_rate` | float | bytes/s, summed over all disks |
//! | `disk.read_requests_rate`, `disk.write_requests_rate` | float | requests/s, summed over all disks |
//! | `net.rx_bytes_rate`, `net.tx_bytes_rate` | float | bytes/s, summed over all interfaces |
//! | `net.rx_packets_rate`, `net.tx_packets_rate` | float | packets/s, summed over all interfaces |
//! | `disk.<dev>.<rate>` | float | one of the four disk rates of one disk, e.g. `disk.vda.read_bytes_rate` |
//! | `net.<dev>.<rate>` | float | one of the four network rates of one interface, e.g. `net.vnet0.rx_bytes_rate` |
//! | `state` | int | the DMTF/CIM `EnabledState` value (2 running, 9 paused, …) |
//!
//! In `<dev>` every character outside `[A-Za-z0-9_-]` of the device name becomes `_`. A
//! specifier on any other infrastructure name yields nothing (logged once, at debug).

use std::collections::{BTreeMap, HashMap};

use nubis_protocol::descriptor::{
    Aggregate, DataPoint, DataPointClass, DeliveryFormat, MonitoringSpecifier,
};
use nubis_protocol::message::{ClearPayload, EncryptedKpi, ProcessedValue, Sample, Value};

use crate::sampling::Rates;

/// Most samples (raw or processed) in one delivery.
pub const MAX_VALUES_PER_DELIVERY: usize = 4096;

/// Most encrypted KPI bytes in one delivery (a single larger row still goes alone).
pub const MAX_BLOB_BYTES_PER_DELIVERY: usize = 512 * 1024;

/// Most samples one specifier holds while waiting for its window; beyond, the oldest go.
pub const MAX_PENDING_PER_SPECIFIER: usize = 65_536;

/// The fixed infrastructure data points (the per-device ones are formed from device names).
pub const INFRA_DATA_POINTS: &[&str] = &[
    "cpu.utilisation",
    "cpu.cores",
    "mem.allocated_bytes",
    "mem.used_bytes",
    "disk.read_bytes_rate",
    "disk.write_bytes_rate",
    "disk.read_requests_rate",
    "disk.write_requests_rate",
    "net.rx_bytes_rate",
    "net.tx_bytes_rate",
    "net.rx_packets_rate",
    "net.tx_packets_rate",
    "state",
];

/// One delivery due: the values of one specifier, to be sent as one monitoring batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// The specifier's data point, which names the monitoring subject.
    pub data_point: DataPoint,
    /// The values.
    pub payload: ClearPayload,
    /// Whether the payload must be sealed to the primary site's key before it is sent.
    pub sealed: bool,
}

/// One specifier and what it has collected.
#[derive(Debug)]
struct Stream {
    spec: MonitoringSpecifier,
    /// The monitoring period of the last sample kept, per data point.
    last_period: HashMap<DataPoint, u64>,
    /// Start of the first window not yet delivered (when the delivery interval is not zero).
    next_window: u64,
    samples: Vec<Sample>,
    encrypted: Vec<EncryptedKpi>,
    /// Whether a missing infrastructure value has been logged.
    missing_logged: bool,
}

fn window_start(t: u64, d: u64) -> u64 {
    t - t % d
}

impl Stream {
    fn new(spec: MonitoringSpecifier, now_ms: u64) -> Self {
        let d = spec.delivery_interval_ms;
        Self {
            next_window: if d == 0 { 0 } else { window_start(now_ms, d) },
            spec,
            last_period: HashMap::new(),
            samples: Vec::new(),
            encrypted: Vec::new(),
            missing_logged: false,
        }
    }

    fn is_infra(&self) -> bool {
        self.spec.data_point.class() == DataPointClass::Infra
    }

    /// Whether a sample of `dp` at `ts_ms` would be kept.
    fn is_due(&self, dp: &DataPoint, ts_ms: u64) -> bool {
        match self.period(ts_ms) {
            None => true,
            Some(period) => self.last_period.get(dp).is_none_or(|p| *p < period),
        }
    }

    /// The monitoring period of `ts_ms`; `None` when every sample is kept.
    fn period(&self, ts_ms: u64) -> Option<u64> {
        ts_ms.checked_div(self.spec.monitoring_interval_ms)
    }

    /// Keeps the sample if its monitoring period has none yet.
    fn offer(&mut self, dp: &DataPoint, ts_ms: u64, value: Value) {
        if let Some(period) = self.period(ts_ms) {
            match self.last_period.get_mut(dp) {
                Some(p) if *p >= period => return,
                Some(p) => *p = period,
                None => {
                    self.last_period.insert(dp.clone(), period);
                }
            }
        }
        if self.samples.len() >= MAX_PENDING_PER_SPECIFIER {
            // Drop a slice at once, so a flood costs one move per slice, not one per sample.
            self.samples.drain(..MAX_PENDING_PER_SPECIFIER / 8);
            tracing::debug!(data_point = %self.spec.data_point, "pending samples full; oldest dropped");
        }
        self.samples.push(Sample {
            data_point: dp.clone(),
            ts_ms,
            value,
        });
    }

    /// The oldest timestamp this specifier has not delivered yet.
    fn unsettled_since(&self) -> u64 {
        let oldest = self
            .samples
            .iter()
            .map(|s| s.ts_ms)
            .chain(self.encrypted.iter().map(|e| e.ts_ms))
            .min()
            .unwrap_or(u64::MAX);
        if self.spec.delivery_interval_ms == 0 {
            oldest
        } else {
            oldest.min(self.next_window)
        }
    }

    fn poll(&mut self, now_ms: u64, flush: bool, out: &mut Vec<Delivery>) {
        let d = self.spec.delivery_interval_ms;
        if d == 0 {
            let samples = std::mem::take(&mut self.samples);
            let encrypted = std::mem::take(&mut self.encrypted);
            self.emit(samples, encrypted, None, out);
            return;
        }
        loop {
            let start = self.next_window;
            let end = start.saturating_add(d);
            let empty = self.samples.is_empty() && self.encrypted.is_empty();
            if (end > now_ms && !flush) || (flush && empty) || end == start {
                break;
            }
            let (samples, rest): (Vec<Sample>, Vec<Sample>) = std::mem::take(&mut self.samples)
                .into_iter()
                .partition(|s| s.ts_ms < end);
            self.samples = rest;
            let (encrypted, rest): (Vec<EncryptedKpi>, Vec<EncryptedKpi>) =
                std::mem::take(&mut self.encrypted)
                    .into_iter()
                    .partition(|e| e.ts_ms < end);
            self.encrypted = rest;
            self.emit(samples, encrypted, Some((start, end)), out);
            self.next_window = end;
            // Skip the empty windows up to the next sample (or up to now).
            let next = self
                .samples
                .iter()
                .map(|s| s.ts_ms)
                .chain(self.encrypted.iter().map(|e| e.ts_ms))
                .min()
                .unwrap_or(now_ms);
            self.next_window = self.next_window.max(window_start(next, d));
        }
    }

    /// Turns the samples of one window (or, without a window, of one poll) into deliveries.
    fn emit(
        &self,
        samples: Vec<Sample>,
        encrypted: Vec<EncryptedKpi>,
        window: Option<(u64, u64)>,
        out: &mut Vec<Delivery>,
    ) {
        let predicate = self.spec.predicate;
        let holds = |v: &Value| predicate.is_none_or(|p| v.as_f64().is_some_and(|x| p.holds(x)));
        let encrypted = if predicate.is_some() {
            Vec::new()
        } else {
            encrypted
        };
        let (samples, processed) = match self.spec.format {
            DeliveryFormat::Raw => (
                samples.into_iter().filter(|s| holds(&s.value)).collect(),
                Vec::new(),
            ),
            DeliveryFormat::Processed { aggregate } => {
                let values = processed(samples, aggregate, window)
                    .into_iter()
                    .filter(|p| predicate.is_none_or(|pr| pr.holds(p.value)))
                    .collect();
                (Vec::new(), values)
            }
        };
        self.split(samples, processed, encrypted, out);
    }

    /// Packs values into deliveries of bounded size.
    fn split(
        &self,
        samples: Vec<Sample>,
        processed: Vec<ProcessedValue>,
        encrypted: Vec<EncryptedKpi>,
        out: &mut Vec<Delivery>,
    ) {
        let mut current = ClearPayload::default();
        let mut values = 0usize;
        let mut blob_bytes = 0usize;
        let push = |current: &mut ClearPayload, out: &mut Vec<Delivery>| {
            out.push(Delivery {
                data_point: self.spec.data_point.clone(),
                payload: std::mem::take(current),
                sealed: self.spec.sealed,
            });
        };
        for s in samples {
            if values == MAX_VALUES_PER_DELIVERY {
                push(&mut current, out);
                values = 0;
            }
            current.samples.push(s);
            values += 1;
        }
        for p in processed {
            if values == MAX_VALUES_PER_DELIVERY {
                push(&mut current, out);
                values = 0;
            }
            current.processed.push(p);
            values += 1;
        }
        for e in encrypted {
            let more = values > 0 || !current.encrypted_kpi.is_empty();
            if more && blob_bytes + e.blob.len() > MAX_BLOB_BYTES_PER_DELIVERY {
                push(&mut current, out);
                values = 0;
                blob_bytes = 0;
            }
            blob_bytes += e.blob.len();
            current.encrypted_kpi.push(e);
        }
        if values > 0 || !current.encrypted_kpi.is_empty() {
            push(&mut current, out);
        }
    }
}

/// One processed value per data point over the numeric samples of `window` (without a window:
/// over all of them, the window being the span of their timestamps).
fn processed(
    samples: Vec<Sample>,
    aggregate: Aggregate,
    window: Option<(u64, u64)>,
) -> Vec<ProcessedValue> {
    let mut by_point: BTreeMap<DataPoint, (Vec<f64>, u64, u64)> = BTreeMap::new();
    for s in samples {
        if let Some((start, end)) = window {
            if s.ts_ms < start || s.ts_ms >= end {
                tracing::debug!(data_point = %s.data_point, ts_ms = s.ts_ms, "late sample left out of a processed value");
                continue;
            }
        }
        let Some(v) = s.value.as_f64() else { continue };
        if v.is_nan() {
            continue;
        }
        let e = by_point
            .entry(s.data_point)
            .or_insert_with(|| (Vec::new(), u64::MAX, 0));
        e.0.push(v);
        e.1 = e.1.min(s.ts_ms);
        e.2 = e.2.max(s.ts_ms);
    }
    by_point
        .into_iter()
        .filter_map(|(data_point, (values, first, last))| {
            let value = aggregate.apply(&values)?;
            let (window_start_ms, window_end_ms) =
                window.unwrap_or((first, last.saturating_add(1)));
            Some(ProcessedValue {
                data_point,
                aggregate,
                window_start_ms,
                window_end_ms,
                value,
                count: u32::try_from(values.len()).unwrap_or(u32::MAX),
            })
        })
        .collect()
}

/// Whether a specifier on `spec` takes samples of `dp`: the same name, or a KPI table
/// (`kpi.<table>`) and one of its columns (`kpi.<table>.<column>`).
fn covers(spec: &DataPoint, dp: &DataPoint) -> bool {
    let (s, d) = (spec.as_str(), dp.as_str());
    if s == d {
        return true;
    }
    spec.class() == DataPointClass::Kpi
        && s.split('.').count() == 2
        && d.strip_prefix(s)
            .and_then(|rest| rest.strip_prefix('.'))
            .is_some_and(|column| !column.contains('.'))
}

/// The Producer of one VM: its specifiers and what each has collected.
#[derive(Debug)]
pub struct Producer {
    streams: Vec<Stream>,
}

impl Producer {
    /// A Producer for `specifiers`, started at `now_ms`.
    pub fn new(specifiers: &[MonitoringSpecifier], now_ms: u64) -> Self {
        Self {
            streams: specifiers
                .iter()
                .map(|s| Stream::new(s.clone(), now_ms))
                .collect(),
        }
    }

    /// The specifiers in force.
    pub fn specifiers(&self) -> impl Iterator<Item = &MonitoringSpecifier> {
        self.streams.iter().map(|s| &s.spec)
    }

    /// Applies a new set of specifiers (a descriptor change through the Control interface). A
    /// specifier equal to one in force keeps what it has collected and its windows; the others
    /// start now; those no longer listed are dropped with their samples.
    pub fn update(&mut self, specifiers: &[MonitoringSpecifier], now_ms: u64) {
        let mut old: Vec<Option<Stream>> = std::mem::take(&mut self.streams)
            .into_iter()
            .map(Some)
            .collect();
        for spec in specifiers {
            let kept = old
                .iter_mut()
                .find(|o| o.as_ref().is_some_and(|o| &o.spec == spec))
                .and_then(Option::take);
            self.streams
                .push(kept.unwrap_or_else(|| Stream::new(spec.clone(), now_ms)));
        }
    }

    /// Whether any specifier reads the VM's KPI filesystem.
    pub fn wants_kpi(&self) -> bool {
        self.streams.iter().any(|s| !s.is_infra())
    }

    /// Whether any infrastructure data point must be measured at `now_ms`.
    pub fn is_due(&self, now_ms: u64) -> bool {
        self.streams
            .iter()
            .any(|s| s.is_infra() && s.is_due(&s.spec.data_point, now_ms))
    }

    /// The infrastructure data points that must be measured at `now_ms`, each once.
    pub fn due_data_points(&self, now_ms: u64) -> Vec<&DataPoint> {
        let mut due: Vec<&DataPoint> = Vec::new();
        for s in &self.streams {
            if s.is_infra()
                && s.is_due(&s.spec.data_point, now_ms)
                && !due.contains(&&s.spec.data_point)
            {
                due.push(&s.spec.data_point);
            }
        }
        due
    }

    /// Feeds one sample to every specifier that covers `data_point` and whose monitoring period
    /// has no sample yet.
    pub fn observe(&mut self, data_point: &DataPoint, ts_ms: u64, value: Value) {
        for s in &mut self.streams {
            if covers(&s.spec.data_point, data_point) {
                s.offer(data_point, ts_ms, value.clone());
            }
        }
    }

    /// Feeds one encrypted KPI row of `table` to the specifiers on `kpi.<table>`.
    pub fn observe_encrypted(&mut self, table: &str, ts_ms: u64, blob: &[u8]) {
        for s in &mut self.streams {
            let p = s.spec.data_point.as_str();
            if p.strip_prefix("kpi.") == Some(table) {
                let row = EncryptedKpi {
                    table: table.to_owned(),
                    ts_ms,
                    blob: blob.to_vec(),
                };
                if s.is_due(&s.spec.data_point, ts_ms) {
                    if let Some(period) = s.period(ts_ms) {
                        s.last_period.insert(s.spec.data_point.clone(), period);
                    }
                    s.encrypted.push(row);
                }
            }
        }
    }

    /// Measures the infrastructure data points due at `ts_ms` from one interval's rates of a
    /// VM with `vcpus` virtual CPUs.
    pub fn measure_infra(&mut self, ts_ms: u64, rates: &Rates, vcpus: u32) {
        for s in &mut self.streams {
            if !s.is_infra() || !s.is_due(&s.spec.data_point, ts_ms) {
                continue;
            }
            let dp = s.spec.data_point.clone();
            match infra_value(rates, vcpus, dp.as_str()) {
                Some(v) => s.offer(&dp, ts_ms, v),
                None if !s.missing_logged => {
                    s.missing_logged = true;
                    tracing::debug!(data_point = %dp, "no such infrastructure measurement for this vm");
                }
                None => {}
            }
        }
    }

    /// The deliveries due at `now_ms`, in specifier order.
    pub fn poll(&mut self, now_ms: u64) -> Vec<Delivery> {
        let mut out = Vec::new();
        for s in &mut self.streams {
            s.poll(now_ms, false, &mut out);
        }
        out
    }

    /// Delivers everything collected, windows finished or not (the VM is leaving the host).
    pub fn flush(&mut self, now_ms: u64) -> Vec<Delivery> {
        let mut out = Vec::new();
        for s in &mut self.streams {
            s.poll(now_ms, true, &mut out);
        }
        out
    }

    /// Every KPI sample with a timestamp before this has been delivered or discarded by the
    /// specifiers that read the KPI filesystem (`u64::MAX` when nothing waits).
    pub fn kpi_settled_before(&self) -> u64 {
        self.streams
            .iter()
            .filter(|s| !s.is_infra())
            .map(Stream::unsettled_since)
            .min()
            .unwrap_or(u64::MAX)
    }
}

/// Replaces what a data point token may not contain.
pub fn device_token(device: &str) -> String {
    let t: String = device
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if t.is_empty() {
        "_".into()
    } else {
        t
    }
}

fn kib_bytes(kib: u64) -> Value {
    Value::Int(i64::try_from(kib.saturating_mul(1024)).unwrap_or(i64::MAX))
}

/// The value of infrastructure data point `name` for one interval's `rates` of a VM with
/// `vcpus` virtual CPUs; `None` for a name that is not measured (see the module table).
pub fn infra_value(rates: &Rates, vcpus: u32, name: &str) -> Option<Value> {
    let disk = |f: fn(&crate::sampling::DiskRates) -> f64| {
        Some(Value::Float(rates.disks.iter().map(f).sum()))
    };
    let net = |f: fn(&crate::sampling::InterfaceRates) -> f64| {
        Some(Value::Float(rates.interfaces.iter().map(f).sum()))
    };
    match name {
        "cpu.utilisation" => return Some(Value::Float(rates.cpu_utilisation)),
        "cpu.cores" => {
            return Some(Value::Float(rates.cpu_utilisation * f64::from(vcpus)));
        }
        "mem.allocated_bytes" => return Some(kib_bytes(rates.memory.current_kib)),
        "mem.used_bytes" => {
            return rates
                .memory
                .unused_kib
                .map(|u| kib_bytes(rates.memory.current_kib.saturating_sub(u)));
        }
        "state" => return Some(Value::Int(i64::from(rates.state.cim_value()))),
        "disk.read_bytes_rate" => return disk(|d| d.rd_bytes_per_s),
        "disk.write_bytes_rate" => return disk(|d| d.wr_bytes_per_s),
        "disk.read_requests_rate" => return disk(|d| d.rd_req_per_s),
        "disk.write_requests_rate" => return disk(|d| d.wr_req_per_s),
        "net.rx_bytes_rate" => return net(|i| i.rx_bytes_per_s),
        "net.tx_bytes_rate" => return net(|i| i.tx_bytes_per_s),
        "net.rx_packets_rate" => return net(|i| i.rx_packets_per_s),
        "net.tx_packets_rate" => return net(|i| i.tx_packets_per_s),
        _ => {}
    }
    let mut tokens = name.split('.');
    let (Some(kind), Some(dev), Some(rate), None) =
        (tokens.next(), tokens.next(), tokens.next(), tokens.next())
    else {
        return None;
    };
    match kind {
        "disk" => {
            let d = rates
                .disks
                .iter()
                .find(|d| device_token(&d.device) == dev)?;
            Some(Value::Float(match rate {
                "read_bytes_rate" => d.rd_bytes_per_s,
                "write_bytes_rate" => d.wr_bytes_per_s,
                "read_requests_rate" => d.rd_req_per_s,
                "write_requests_rate" => d.wr_req_per_s,
                _ => return None,
            }))
        }
        "net" => {
            let i = rates
                .interfaces
                .iter()
                .find(|i| device_token(&i.device) == dev)?;
            Some(Value::Float(match rate {
                "rx_bytes_rate" => i.rx_bytes_per_s,
                "tx_bytes_rate" => i.tx_bytes_per_s,
                "rx_packets_rate" => i.rx_packets_per_s,
                "tx_packets_rate" => i.tx_packets_per_s,
                _ => return None,
            }))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use nubis_protocol::descriptor::{Predicate, PredicateOp};

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
}
