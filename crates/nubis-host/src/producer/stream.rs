//! One monitoring specifier of a Producer and what it has collected: the samples kept per
//! monitoring period, the aligned delivery windows, processed values, predicates and the split
//! of a large delivery (the rules are in the [`producer`](super) module documentation).

use std::collections::{BTreeMap, HashMap};

use nubis_protocol::descriptor::{
    Aggregate, DataPoint, DataPointClass, DeliveryFormat, MonitoringSpecifier,
};
use nubis_protocol::message::{ClearPayload, EncryptedKpi, ProcessedValue, Sample, Value};

use super::{
    Delivery, MAX_BLOB_BYTES_PER_DELIVERY, MAX_PENDING_PER_SPECIFIER, MAX_VALUES_PER_DELIVERY,
};

/// One specifier and what it has collected.
#[derive(Debug)]
pub(super) struct Stream {
    pub(super) spec: MonitoringSpecifier,
    /// The monitoring period of the last sample kept, per data point.
    pub(super) last_period: HashMap<DataPoint, u64>,
    /// Start of the first window not yet delivered (when the delivery interval is not zero).
    pub(super) next_window: u64,
    pub(super) samples: Vec<Sample>,
    pub(super) encrypted: Vec<EncryptedKpi>,
    /// Whether a missing infrastructure value has been logged.
    pub(super) missing_logged: bool,
}

fn window_start(t: u64, d: u64) -> u64 {
    t - t % d
}

impl Stream {
    pub(super) fn new(spec: MonitoringSpecifier, now_ms: u64) -> Self {
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

    pub(super) fn is_infra(&self) -> bool {
        self.spec.data_point.class() == DataPointClass::Infra
    }

    /// Whether a sample of `dp` at `ts_ms` would be kept.
    pub(super) fn is_due(&self, dp: &DataPoint, ts_ms: u64) -> bool {
        match self.period(ts_ms) {
            None => true,
            Some(period) => self.last_period.get(dp).is_none_or(|p| *p < period),
        }
    }

    /// The monitoring period of `ts_ms`; `None` when every sample is kept.
    pub(super) fn period(&self, ts_ms: u64) -> Option<u64> {
        ts_ms.checked_div(self.spec.monitoring_interval_ms)
    }

    /// Keeps the sample if its monitoring period has none yet.
    pub(super) fn offer(&mut self, dp: &DataPoint, ts_ms: u64, value: Value) {
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
    pub(super) fn unsettled_since(&self) -> u64 {
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

    pub(super) fn poll(&mut self, now_ms: u64, flush: bool, out: &mut Vec<Delivery>) {
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
    pub(super) fn emit(
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
    pub(super) fn split(
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
pub(super) fn covers(spec: &DataPoint, dp: &DataPoint) -> bool {
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
