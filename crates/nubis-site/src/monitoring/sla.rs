//! The SLA rules over newly stored batches: opening what this site may read, and acting on the
//! rules that fire.

use std::sync::atomic::Ordering;

use nubis_protocol::codec;
use nubis_protocol::message::{BatchPayload, ClearPayload, MonitoringBatch};
use nubis_protocol::subject::Subject;

use super::Monitoring;
use crate::config::SlaAction;
use crate::journal::VmRecord;
use crate::sla::SlaEvent;

impl Monitoring {
    /// The readable payload of `batch`: clear, or sealed to this site when it is the primary.
    pub(super) fn readable(&self, batch: &MonitoringBatch) -> Option<ClearPayload> {
        match &batch.payload {
            BatchPayload::Clear(p) => Some(p.clone()),
            BatchPayload::Sealed { ciphertext } => self.open_sealed(batch, ciphertext),
        }
    }

    pub(super) fn open_sealed(
        &self,
        batch: &MonitoringBatch,
        ciphertext: &[u8],
    ) -> Option<ClearPayload> {
        if batch.primary_site != self.site {
            return None;
        }
        let plain = nubis_protocol::seal::open(self.identity.sealing_key(), ciphertext).ok()?;
        codec::from_slice(&plain).ok()
    }

    /// Runs the SLA rules over a newly stored batch and acts on what fires.
    pub(super) async fn evaluate_sla(&self, record: &VmRecord, batch: &MonitoringBatch) {
        let events = {
            let Ok(mut sla) = self.sla.lock() else { return };
            if sla.is_empty() {
                return;
            }
            let Some(payload) = self.readable(batch) else {
                return;
            };
            sla.observe_payload(&record.vm, &payload)
        };
        for event in events {
            self.raise(event).await;
        }
    }

    pub(super) async fn raise(&self, event: SlaEvent) {
        self.counters.sla_events.fetch_add(1, Ordering::Relaxed);
        tracing::info!(rule = %event.rule, vm.id = %event.vm, value = event.value, "SLA rule fired");
        let subject = Subject::sla_event(&self.site, &event.vm);
        match serde_json::to_vec(&event) {
            Ok(json) => {
                if let Err(e) = self
                    .deps
                    .internal
                    .publish(String::from(subject), json.into())
                    .await
                {
                    tracing::warn!(error = %e, "cannot publish SLA event");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot encode SLA event"),
        }
        if event.action == SlaAction::Migrate {
            match (self.deps.migrate)(event.vm.clone()) {
                Ok(migration) => {
                    tracing::info!(rule = %event.rule, vm.id = %event.vm, migration.id = %migration, "migration started by SLA rule")
                }
                Err(e) => {
                    tracing::warn!(rule = %event.rule, vm.id = %event.vm, code = e.code.as_str(), error = %e.message, "migration asked by SLA rule refused")
                }
            }
        }
    }
}
