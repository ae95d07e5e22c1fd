//! The SLA hook: rules from `[[sla]]` evaluated on the monitoring values a site can read.
//!
//! A rule such as `kpi.web.current_users gt 1000 for 60 s` fires once when its condition has held
//! on every observation of one VM for at least `for_ms`, and re-arms when an observation breaks
//! it. Raw samples are observed at their own time, processed values at the end of their window.
//! The evaluator is pure: it is fed observations with their timestamps and returns the events to
//! raise, so its timing is exact under test; the caller publishes the events (on a subject that
//! never leaves the site) and carries out their action.

use std::collections::HashMap;

use nubis_protocol::descriptor::DataPoint;
use nubis_protocol::message::ClearPayload;
use nubis_protocol::VmId;
use serde::Serialize;

use crate::config::{SlaAction, SlaRule};

/// A rule that fired: the JSON body of an SLA event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SlaEvent {
    /// The rule's name.
    pub rule: String,
    /// The VM.
    pub vm: VmId,
    /// The data point observed.
    pub data_point: DataPoint,
    /// The value of the observation that completed the period.
    pub value: f64,
    /// Time of the first observation of the uninterrupted run (ms since the Unix epoch).
    pub since_ms: u64,
    /// Time of the observation that completed it (ms since the Unix epoch).
    pub at_ms: u64,
    /// What the site does about it.
    pub action: SlaAction,
}

/// Where one rule stands for one VM.
#[derive(Debug, Clone, Copy, Default)]
struct RuleState {
    /// Start of the current run of observations that satisfy the condition.
    since_ms: Option<u64>,
    /// Whether the rule fired during the current run.
    raised: bool,
    /// Latest observation time taken into account.
    last_ms: Option<u64>,
}

/// Evaluates the configured rules over a stream of observations.
#[derive(Debug, Default)]
pub struct SlaEvaluator {
    rules: Vec<SlaRule>,
    state: HashMap<(usize, VmId), RuleState>,
}

impl SlaEvaluator {
    /// An evaluator of `rules`.
    pub fn new(rules: Vec<SlaRule>) -> Self {
        Self {
            rules,
            state: HashMap::new(),
        }
    }

    /// Whether no rule is configured (then nothing needs to be observed).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Takes in one observation of `data_point` of `vm` at `ts_ms`; returns the rules it fires.
    ///
    /// An observation no later than the one before it for the same rule and VM is ignored: the
    /// same batch can reach a site twice (relay and bus), and producers' clocks interleave.
    pub fn observe(
        &mut self,
        vm: &VmId,
        data_point: &DataPoint,
        ts_ms: u64,
        value: f64,
    ) -> Vec<SlaEvent> {
        let mut events = Vec::new();
        for (i, rule) in self.rules.iter().enumerate() {
            if rule.data_point != *data_point || rule.vm.as_ref().is_some_and(|v| v != vm) {
                continue;
            }
            let state = self.state.entry((i, vm.clone())).or_default();
            if state.last_ms.is_some_and(|last| ts_ms <= last) {
                continue;
            }
            state.last_ms = Some(ts_ms);
            if !rule.predicate().holds(value) {
                state.since_ms = None;
                state.raised = false;
                continue;
            }
            let since = *state.since_ms.get_or_insert(ts_ms);
            if !state.raised && ts_ms - since >= rule.for_ms {
                state.raised = true;
                events.push(SlaEvent {
                    rule: rule.name.clone(),
                    vm: vm.clone(),
                    data_point: data_point.clone(),
                    value,
                    since_ms: since,
                    at_ms: ts_ms,
                    action: rule.action,
                });
            }
        }
        events
    }

    /// Observes every numeric sample and processed value of a batch's readable payload, in
    /// time order.
    pub fn observe_payload(&mut self, vm: &VmId, payload: &ClearPayload) -> Vec<SlaEvent> {
        if self.rules.is_empty() {
            return Vec::new();
        }
        let mut observations: Vec<(u64, &DataPoint, f64)> = payload
            .samples
            .iter()
            .filter_map(|s| Some((s.ts_ms, &s.data_point, s.value.as_f64()?)))
            .chain(
                payload
                    .processed
                    .iter()
                    .map(|p| (p.window_end_ms, &p.data_point, p.value)),
            )
            .collect();
        observations.sort_by_key(|(ts, _, _)| *ts);
        observations
            .into_iter()
            .flat_map(|(ts, dp, value)| self.observe(vm, dp, ts, value))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nubis_protocol::descriptor::{Aggregate, PredicateOp};
    use nubis_protocol::message::{ProcessedValue, Sample, Value};

    fn dp(s: &str) -> DataPoint {
        DataPoint::new(s).unwrap()
    }

    fn vm(s: &str) -> VmId {
        VmId::new(s).unwrap()
    }

    fn users_rule(for_ms: u64, only: Option<&str>) -> SlaRule {
        SlaRule {
            name: "busy".into(),
            data_point: dp("kpi.web.current_users"),
            op: PredicateOp::Gt,
            threshold: 1000.0,
            for_ms,
            vm: only.map(vm),
            action: SlaAction::Migrate,
        }
    }

    #[test]
    fn fires_once_after_holding_for_the_period_and_rearms() {
        let mut e = SlaEvaluator::new(vec![users_rule(60_000, None)]);
        let (w, users) = (vm("web-1"), dp("kpi.web.current_users"));
        assert!(e.observe(&w, &users, 1_000, 1500.0).is_empty());
        assert!(e.observe(&w, &users, 31_000, 1200.0).is_empty());
        // 60 s after the first observation of the run, still above: fires.
        let fired = e.observe(&w, &users, 61_000, 1100.0);
        assert_eq!(
            fired,
            vec![SlaEvent {
                rule: "busy".into(),
                vm: w.clone(),
                data_point: users.clone(),
                value: 1100.0,
                since_ms: 1_000,
                at_ms: 61_000,
                action: SlaAction::Migrate,
            }]
        );
        // Still holding: no second event.
        assert!(e.observe(&w, &users, 121_000, 5000.0).is_empty());
        // Broken (1000 is not > 1000), then a new run that lasts long enough: fires again.
        assert!(e.observe(&w, &users, 122_000, 1000.0).is_empty());
        assert!(e.observe(&w, &users, 130_000, 1001.0).is_empty());
        let fired = e.observe(&w, &users, 190_000, 1001.0);
        assert_eq!(fired.len(), 1);
        assert_eq!((fired[0].since_ms, fired[0].at_ms), (130_000, 190_000));
    }

    #[test]
    fn an_interruption_restarts_the_period() {
        let mut e = SlaEvaluator::new(vec![users_rule(60_000, None)]);
        let (w, users) = (vm("web-1"), dp("kpi.web.current_users"));
        assert!(e.observe(&w, &users, 0, 2000.0).is_empty());
        assert!(e.observe(&w, &users, 59_000, 10.0).is_empty());
        assert!(e.observe(&w, &users, 60_000, 2000.0).is_empty());
        assert!(e.observe(&w, &users, 119_999, 2000.0).is_empty());
        assert_eq!(e.observe(&w, &users, 120_000, 2000.0).len(), 1);
    }

    #[test]
    fn zero_period_fires_on_the_first_observation_and_vms_are_separate() {
        let mut e = SlaEvaluator::new(vec![users_rule(0, None)]);
        let users = dp("kpi.web.current_users");
        assert_eq!(e.observe(&vm("a"), &users, 5, 1001.0).len(), 1);
        assert_eq!(e.observe(&vm("b"), &users, 5, 1001.0).len(), 1);
        assert!(e.observe(&vm("a"), &users, 6, 1001.0).is_empty());
    }

    #[test]
    fn other_data_points_vms_and_stale_observations_are_ignored() {
        let mut e = SlaEvaluator::new(vec![users_rule(0, Some("web-1"))]);
        let users = dp("kpi.web.current_users");
        assert!(e.observe(&vm("web-2"), &users, 10, 5000.0).is_empty());
        assert!(e
            .observe(&vm("web-1"), &dp("cpu.cores"), 10, 5000.0)
            .is_empty());
        assert!(e.observe(&vm("web-1"), &users, 10, 10.0).is_empty());
        // The same or an older time again (a duplicate batch) changes nothing.
        assert!(e.observe(&vm("web-1"), &users, 10, 5000.0).is_empty());
        assert!(e.observe(&vm("web-1"), &users, 9, 5000.0).is_empty());
        assert_eq!(e.observe(&vm("web-1"), &users, 11, 5000.0).len(), 1);
        // NaN never satisfies a condition.
        let mut e = SlaEvaluator::new(vec![users_rule(0, None)]);
        assert!(e.observe(&vm("x"), &users, 1, f64::NAN).is_empty());
    }

    #[test]
    fn payloads_are_observed_in_time_order_with_processed_values_at_window_end() {
        let mut e = SlaEvaluator::new(vec![users_rule(30_000, None)]);
        let users = dp("kpi.web.current_users");
        let payload = ClearPayload {
            samples: vec![
                Sample {
                    data_point: users.clone(),
                    ts_ms: 40_000,
                    value: Value::Int(1500),
                },
                Sample {
                    data_point: users.clone(),
                    ts_ms: 10_000,
                    value: Value::Float(1500.0),
                },
                Sample {
                    data_point: users.clone(),
                    ts_ms: 20_000,
                    value: Value::Text("many".into()),
                },
            ],
            processed: vec![ProcessedValue {
                data_point: users.clone(),
                aggregate: Aggregate::Mean,
                window_start_ms: 0,
                window_end_ms: 5_000,
                value: 1200.0,
                count: 3,
            }],
            encrypted_kpi: Vec::new(),
        };
        let fired = e.observe_payload(&vm("w"), &payload);
        assert_eq!(fired.len(), 1);
        assert_eq!((fired[0].since_ms, fired[0].at_ms), (5_000, 40_000));
    }
}
