//! What the operator endpoints read from the monitoring service (accounting role): the usage
//! of a VM from the accounting stream, and the service's counters.

use std::sync::atomic::{AtomicU64, Ordering};

use nubis_protocol::codec;
use nubis_protocol::envelope::SignedEnvelope;
use nubis_protocol::message::{Body, ErrorCode, ErrorReply, MonitoringBatch};
use nubis_protocol::VmId;

use super::{internal_error, DropReason, Monitoring};
use crate::usage::{self, StoredBatch};

/// How far before the start of a usage range the stream is read, so that the first sample in
/// the range finds the sample before it.
pub const USAGE_LOOKBACK_MS: u64 = 15 * 60 * 1000;

pub use nubis_protocol::ops::UsageReport;

impl Monitoring {
    /// The usage of `vm` over `[from_ms, to_ms)` from this site's accounting stream.
    pub async fn usage(
        &self,
        vm: &VmId,
        from_ms: u64,
        to_ms: u64,
    ) -> Result<UsageReport, ErrorReply> {
        let known = self.record(vm)?.is_some();
        let raw = self
            .deps
            .accounting
            .read(vm, from_ms.saturating_sub(USAGE_LOOKBACK_MS))
            .await
            .map_err(internal_error)?;
        if raw.is_empty() && !known {
            return Err(ErrorReply::new(
                ErrorCode::UnknownVm,
                format!("VM {vm} is not known at this site and has no accounting data"),
            ));
        }
        let batches: Vec<StoredBatch> = raw
            .iter()
            .filter_map(|bytes| {
                let env = SignedEnvelope::decode(bytes).ok()?;
                if env.body_type != MonitoringBatch::TYPE {
                    return None;
                }
                let batch: MonitoringBatch = codec::from_slice(&env.body).ok()?;
                (batch.vm == *vm).then_some(StoredBatch {
                    stored_ms: env.ts,
                    batch,
                })
            })
            .collect();
        let usage = usage::compute(&batches, from_ms, to_ms, |b, ct| self.open_sealed(b, ct));
        Ok(UsageReport {
            vm: vm.clone(),
            from_ms,
            to_ms,
            usage,
        })
    }

    /// The answer of the `monitoring` operator endpoint, for every VM or only `vm`.
    pub fn report(&self, vm: Option<&VmId>) -> serde_json::Value {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let c = &self.counters;
        let acct = self.deps.accounting.counters();
        let dropped: serde_json::Map<String, serde_json::Value> = DropReason::ALL
            .iter()
            .map(|r| (r.as_str().to_string(), c.dropped(*r).into()))
            .collect();
        let vms: Vec<serde_json::Value> = self
            .vms
            .lock()
            .map(|vms| {
                vms.iter()
                    .filter(|(id, _)| vm.is_none_or(|v| v == *id))
                    .map(|(id, s)| {
                        serde_json::json!({
                            "vm": id.as_str(),
                            "received": s.received,
                            "last_batch_ms": s.last_batch_ms,
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        serde_json::json!({
            "site": self.site.as_str(),
            "delivery": self.deps.config.monitoring.delivery.as_str(),
            "received": {
                "intake": load(&c.received.intake),
                "relay": load(&c.received.relay),
                "bus": load(&c.received.bus),
            },
            "delivered": {
                "bus": load(&c.delivered.bus),
                "relay": load(&c.delivered.relay),
                "failed": load(&c.delivery_failed),
            },
            "stored": load(&acct.stored),
            "duplicates": load(&acct.duplicates),
            "store_retries": load(&acct.retries),
            "dropped": dropped,
            "sla_events": load(&c.sla_events),
            "vms": vms,
        })
    }
}
