//! The paper's monitoring specifier and its parts: delivery scheme, delivery format, aggregate
//! functions and predicates.

use serde::{Deserialize, Serialize};

use super::DataPoint;

/// The paper's monitoring specifier: what to measure, how often, how to deliver it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MonitoringSpecifier {
    /// What is measured.
    pub data_point: DataPoint,
    /// Milliseconds between measurements; 0 = as often as possible.
    pub monitoring_interval_ms: u64,
    /// Milliseconds between deliveries; 0 = as soon as a value is available.
    pub delivery_interval_ms: u64,
    /// Raw samples, or one processed value per delivery interval.
    pub format: DeliveryFormat,
    /// Deliver only the values for which this holds (the paper's predicate scheme).
    #[serde(default)]
    pub predicate: Option<Predicate>,
    /// Seal the delivered values to the primary site's sealing key.
    #[serde(default)]
    pub sealed: bool,
}

/// The paper's three delivery schemes, derived from a [`MonitoringSpecifier`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DeliveryScheme {
    /// (a) As soon as a value is available.
    AsSoonAsAvailable,
    /// (b) At regular intervals.
    AtIntervals {
        /// Milliseconds between deliveries.
        every_ms: u64,
    },
    /// (c) When a predicate holds for the value; checked at the specifier's delivery interval.
    WhenPredicateHolds(Predicate),
}

impl MonitoringSpecifier {
    /// The delivery scheme this specifier asks for. With a predicate, values for which it does
    /// not hold are never delivered; without one, the delivery interval decides.
    pub fn delivery_scheme(&self) -> DeliveryScheme {
        match (self.predicate, self.delivery_interval_ms) {
            (Some(p), _) => DeliveryScheme::WhenPredicateHolds(p),
            (None, 0) => DeliveryScheme::AsSoonAsAvailable,
            (None, every_ms) => DeliveryScheme::AtIntervals { every_ms },
        }
    }
}

/// Raw or processed delivery. On the wire a map tagged by `kind`:
/// `{"kind":"raw"}` or `{"kind":"processed","aggregate":"median"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DeliveryFormat {
    /// Every sample measured during the delivery interval.
    Raw,
    /// One value per delivery interval, computed with `aggregate`.
    Processed {
        /// The function applied to the samples of the interval.
        aggregate: Aggregate,
    },
}

/// The mathematical functions of the processed delivery format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregate {
    /// Smallest sample.
    Min,
    /// Largest sample.
    Max,
    /// Arithmetic mean.
    Mean,
    /// Median; the mean of the two middle samples for an even count.
    Median,
}

impl Aggregate {
    /// Applies the function to `values`; `None` when there are none. NaN samples are ignored.
    pub fn apply(self, values: &[f64]) -> Option<f64> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return None;
        }
        Some(match self {
            Aggregate::Min => v.iter().copied().fold(f64::INFINITY, f64::min),
            Aggregate::Max => v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            Aggregate::Mean => v.iter().sum::<f64>() / v.len() as f64,
            Aggregate::Median => {
                v.sort_by(f64::total_cmp);
                let mid = v.len() / 2;
                if v.len() % 2 == 1 {
                    v[mid]
                } else {
                    (v[mid - 1] + v[mid]) / 2.0
                }
            }
        })
    }
}

/// "Deliver when it holds": `value <op> threshold`, e.g. `{"op":"lt","threshold":0.2}`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Predicate {
    /// The comparison.
    pub op: PredicateOp,
    /// The right-hand side.
    pub threshold: f64,
}

/// A comparison operator of a [`Predicate`]; `lt`, `le`, `gt`, `ge`, `eq`, `ne` on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredicateOp {
    /// value < threshold
    Lt,
    /// value ≤ threshold
    Le,
    /// value > threshold
    Gt,
    /// value ≥ threshold
    Ge,
    /// value = threshold (exact floating-point equality)
    Eq,
    /// value ≠ threshold
    Ne,
}

impl Predicate {
    /// Whether the predicate holds for `v`. A NaN value never satisfies any predicate.
    pub fn holds(&self, v: f64) -> bool {
        if v.is_nan() {
            return false;
        }
        let t = self.threshold;
        match self.op {
            PredicateOp::Lt => v < t,
            PredicateOp::Le => v <= t,
            PredicateOp::Gt => v > t,
            PredicateOp::Ge => v >= t,
            PredicateOp::Eq => v == t,
            PredicateOp::Ne => v != t,
        }
    }
}
