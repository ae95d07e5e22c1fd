//! Passing batches on (relay role): where a batch goes next under the delivery policy, signing
//! and publishing it there, and batches relayed to this site by a VM's downstream partner.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use nubis_protocol::descriptor::DataPoint;
use nubis_protocol::envelope::{self, now_ms, Addressing, EnvelopeError};
use nubis_protocol::message::MonitoringBatch;
use nubis_protocol::subject::Subject;
use nubis_protocol::SiteId;

use super::{DropReason, Monitoring};
use crate::accounting;
use crate::config::Delivery;
use crate::journal::{NextHop, VmRecord};

/// Where a batch goes next from this site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The public subject `nubis.mon.<primary>.<vm>.…`, addressed to every site.
    Public,
    /// The relay subject of the upstream site, addressed to it only.
    Relay(SiteId),
}

/// Where `site` sends a batch of `record`'s VM under `policy`; `None` when the record of a VM
/// this site is not primary for has no upstream (it cannot be passed on without revealing it).
pub fn target(policy: Delivery, site: &SiteId, record: &VmRecord) -> Option<Target> {
    if record.primary == *site || policy == Delivery::Bus {
        return Some(Target::Public);
    }
    record.upstream.clone().map(Target::Relay)
}

impl Monitoring {
    /// Signs `batch` for `target` and publishes it; returns the encoded envelope (stored in the
    /// accounting stream whether or not publishing worked).
    pub(super) async fn deliver(
        &self,
        target: Option<&Target>,
        data_point: &DataPoint,
        batch: &MonitoringBatch,
    ) -> Result<Bytes, EnvelopeError> {
        let public = Subject::monitoring(&batch.primary_site, &batch.vm, data_point);
        let (subject, addressing) = match target {
            Some(Target::Relay(upstream)) => {
                let s =
                    Subject::monitoring_relay(upstream, &batch.primary_site, &batch.vm, data_point);
                (s, Some(upstream))
            }
            _ => (public, None),
        };
        let addressing = match addressing {
            Some(upstream) => Addressing::request(upstream, subject.as_str()),
            None => Addressing::broadcast(subject.as_str()),
        };
        let bytes: Bytes = envelope::sign(&self.identity, addressing, batch, now_ms())?
            .encode()?
            .into();
        let Some(target) = target else {
            self.counters
                .delivery_failed
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(vm.id = %batch.vm, "VM record has no upstream; batch kept here only");
            return Ok(bytes);
        };
        match self
            .deps
            .public
            .publish(subject.as_str().to_string(), bytes.clone())
            .await
        {
            Ok(()) => {
                let counter = match target {
                    Target::Public => &self.counters.delivered.bus,
                    Target::Relay(_) => &self.counters.delivered.relay,
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.counters
                    .delivery_failed
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, subject = %subject, "cannot publish batch");
            }
        }
        Ok(bytes)
    }

    /// A batch relayed to this site by the VM's downstream partner.
    pub(super) async fn relay(&self, subject: &str, payload: &[u8]) {
        let Some((primary, vm, data_point)) = Subject::parse_monitoring_relay(&self.site, subject)
        else {
            return self.drop_batch(DropReason::WrongSubject, subject, "not a relay subject");
        };
        let opened = match self.deps.verifier.open_request(payload, subject, now_ms()) {
            Ok(o) => o,
            Err(e) => return self.drop_batch(DropReason::of(&e), subject, &e.to_string()),
        };
        let Some((batch, record)) = self.batch_on_record(&opened, subject, &primary, &vm) else {
            return;
        };
        if record.downstream != Some(NextHop::Site(opened.from.clone())) {
            return self.drop_batch(
                DropReason::WrongSender,
                subject,
                &format!("site {} is not the VM's downstream partner", opened.from),
            );
        }
        self.note_received(&vm, &self.counters.received.relay);
        let stored = self
            .deps
            .accounting
            .store(
                &vm,
                &data_point,
                accounting::message_id(&opened.from, &batch),
                Bytes::copy_from_slice(payload),
            )
            .await;
        // Passed on even when already stored: the next hop de-duplicates.
        let target = target(self.deps.config.monitoring.delivery, &self.site, &record);
        if let Err(e) = self.deliver(target.as_ref(), &data_point, &batch).await {
            tracing::warn!(error = %e, vm.id = %vm, "cannot sign batch to pass it on");
        }
        // The site that publishes the batch (the primary) registers its Producer: the site
        // that produced it stays unnamed.
        self.register_producer(target.as_ref(), &batch, &data_point);
        match stored {
            Ok(s) if !s.duplicate => self.evaluate_sla(&record, &batch).await,
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, vm.id = %vm, "relayed batch not stored"),
        }
    }
}
