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
//! Computed by [`infra_value`] from the [`Rates`](crate::sampling::Rates) of one sampling
//! interval; the table of names is in [`infra`].

use nubis_protocol::descriptor::{DataPoint, MonitoringSpecifier};
use nubis_protocol::message::{ClearPayload, EncryptedKpi, Value};

use crate::sampling::Rates;

pub mod infra;
mod stream;

pub use infra::{device_token, infra_value, INFRA_DATA_POINTS};
use stream::{covers, Stream};

/// Most samples (raw or processed) in one delivery.
pub const MAX_VALUES_PER_DELIVERY: usize = 4096;

/// Most encrypted KPI bytes in one delivery (a single larger row still goes alone).
pub const MAX_BLOB_BYTES_PER_DELIVERY: usize = 512 * 1024;

/// Most samples one specifier holds while waiting for its window; beyond, the oldest go.
pub const MAX_PENDING_PER_SPECIFIER: usize = 65_536;

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

#[cfg(test)]
mod tests;
