//! Passing batches on (relay role): where a batch goes next under the delivery policy, signing
//! it and handing it to the outbox or the public subject, and batches relayed to this site by a
//! VM's downstream partner, acknowledged once stored and passed on.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use nubis_bus::serve::{sign_refusal, sign_reply};
use nubis_protocol::descriptor::DataPoint;
use nubis_protocol::envelope::{self, now_ms, Addressing, EnvelopeError, Opened};
use nubis_protocol::message::{BatchStored, ErrorCode, ErrorReply, MonitoringBatch};
use nubis_protocol::subject::Subject;
use nubis_protocol::{SiteId, VmId};

use super::{internal_error, DropReason, Monitoring};
use crate::accounting;
use crate::config::Delivery;
use crate::journal::VmRecord;

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
    /// Signs `batch` for `target` and sends it on: to the upstream through the outbox (durably;
    /// it returns once the outbox holds the batch), or on the public subject (best effort: the
    /// primary publishes for whoever listens). Returns the encoded envelope, which the caller
    /// stores in the accounting stream.
    pub(super) async fn deliver(
        &self,
        target: Option<&Target>,
        data_point: &DataPoint,
        batch: &MonitoringBatch,
    ) -> Result<Bytes, ErrorReply> {
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
        let bytes: Bytes = envelope::sign(&self.identity, addressing, batch, now_ms())
            .and_then(|e| e.encode())
            .map_err(|e: EnvelopeError| {
                ErrorReply::new(ErrorCode::from_wire(e.code()), e.to_string())
            })?
            .into();
        match target {
            None => {
                self.counters
                    .delivery_failed
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(vm.id = %batch.vm, "VM record has no upstream; batch kept here only");
            }
            // Counted as delivered once the upstream acknowledges it (outbox.rs).
            Some(Target::Relay(upstream)) => {
                self.deps.outbox.put(upstream, data_point, batch).await?;
            }
            Some(Target::Public) => {
                match self
                    .deps
                    .public
                    .publish(subject.as_str().to_string(), bytes.clone())
                    .await
                {
                    Ok(()) => {
                        self.counters.delivered.bus.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        self.counters
                            .delivery_failed
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(error = %e, subject = %subject, "cannot publish batch");
                    }
                }
            }
        }
        Ok(bytes)
    }

    /// A batch relayed to this site by the VM's downstream partner: a signed request, answered
    /// with a signed [`BatchStored`] once the batch is stored here and passed on (into the
    /// outbox, or published by the primary), or with the reason it was refused.
    pub(super) async fn relay(&self, msg: &async_nats::Message) {
        let subject = msg.subject.as_str();
        let payload = &msg.payload;
        let answer = |bytes: Option<Vec<u8>>| async move {
            if let (Some(reply), Some(bytes)) = (&msg.reply, bytes) {
                if let Err(e) = self.deps.public.publish(reply.clone(), bytes.into()).await {
                    tracing::debug!(error = %e, "cannot answer a relayed batch");
                }
            }
        };
        let Some((primary, vm, data_point)) = Subject::parse_monitoring_relay(&self.site, subject)
        else {
            return self.drop_batch(DropReason::WrongSubject, subject, "not a relay subject");
        };
        let opened = match self.deps.verifier.open_request(payload, subject, now_ms()) {
            Ok(o) => o,
            Err(e) => {
                self.drop_batch(DropReason::of(&e), subject, &e.to_string());
                let refusal = ErrorReply::new(ErrorCode::from_wire(e.code()), e.to_string());
                return answer(sign_refusal(&self.identity, payload, subject, &refusal)).await;
            }
        };
        let outcome = self
            .relayed(&opened, subject, payload, (&primary, &vm, &data_point))
            .await;
        let signed = match &outcome {
            Ok(stored) => sign_reply(&self.identity, &opened, stored),
            Err(e) => sign_reply(&self.identity, &opened, e),
        };
        match signed {
            Ok(bytes) => answer(Some(bytes)).await,
            Err(e) => tracing::warn!(error = %e, "cannot sign the answer to a relayed batch"),
        }
    }

    async fn relayed(
        &self,
        opened: &Opened,
        subject: &str,
        payload: &[u8],
        (primary, vm, data_point): (&SiteId, &VmId, &DataPoint),
    ) -> Result<BatchStored, ErrorReply> {
        let Some((batch, record)) = self.batch_on_record(opened, subject, primary, vm) else {
            return Err(ErrorReply::new(
                ErrorCode::UnknownVm,
                format!("no record here of VM {vm} with primary {primary}"),
            ));
        };
        // The VM's next hop, or the one it had until a moment ago: what that site stored before
        // the hand-over is still on its way up (its outbox).
        if !record.hears_from(&opened.from, now_ms()) {
            let why = format!("site {} is not the VM's downstream partner", opened.from);
            self.drop_batch(DropReason::WrongSender, subject, &why);
            return Err(ErrorReply::new(ErrorCode::Refused, why));
        }
        self.note_received(vm, &self.counters.received.relay);
        let stored = self
            .deps
            .accounting
            .store(
                vm,
                data_point,
                accounting::message_id(&opened.from, &batch),
                Bytes::copy_from_slice(payload),
            )
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, vm.id = %vm, "relayed batch not stored");
                internal_error(e)
            })?;
        // Passed on even when already stored: the sender resends only what it was not told is
        // stored, and the next hop de-duplicates.
        let target = target(self.deps.config.monitoring.delivery, &self.site, &record);
        self.deliver(target.as_ref(), data_point, &batch).await?;
        // The site that publishes the batch (the primary) registers its Producer: the site
        // that produced it stays unnamed.
        self.register_producer(target.as_ref(), &batch, data_point);
        if !stored.duplicate {
            self.evaluate_sla(&record, &batch).await;
        }
        Ok(BatchStored {
            producer: batch.producer,
            epoch_ms: batch.epoch_ms,
            seq: batch.seq,
            duplicate: stored.duplicate,
        })
    }
}
