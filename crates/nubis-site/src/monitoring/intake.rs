//! Batches from the site's own host agents (producer role): checked against the VM's record,
//! signed, delivered, stored and acknowledged; their Producers registered in the directory by
//! the site that publishes their batches.

use nubis_protocol::codec;
use nubis_protocol::descriptor::DataPoint;
use nubis_protocol::envelope::now_ms;
use nubis_protocol::message::{
    BatchStored, ErrorCode, ErrorReply, HostId, HostReply, MonitoringBatch, ProducedBatch,
    ProducerRegistration,
};
use nubis_protocol::subject::Subject;

use super::{internal_error, target, DropReason, Monitoring, Target, MAX_PRODUCERS_PER_VM};
use crate::accounting::{self, AccountingError};
use crate::journal::{NextHop, VmRecord};

/// Checks a produced batch that host `host` sent against this site's record of its VM;
/// returns that record. Only the host that holds the VM may speak for it.
pub fn check_intake<'r>(
    record: Option<&'r VmRecord>,
    host: &HostId,
    batch: &MonitoringBatch,
) -> Result<&'r VmRecord, DropReason> {
    let Some(record) = record else {
        return Err(DropReason::UnknownVm);
    };
    match &record.downstream {
        Some(NextHop::Host(holder)) if holder == host => {}
        Some(NextHop::Host(_)) => return Err(DropReason::WrongSender),
        _ => return Err(DropReason::UnknownVm),
    }
    if record.primary != batch.primary_site {
        return Err(DropReason::Refused);
    }
    Ok(record)
}

impl Monitoring {
    /// A batch from one of this site's host agents; answers once it is stored.
    pub(super) async fn intake(&self, msg: async_nats::Message) {
        // Each host's NATS user may publish only on its own intake subject, so the subject
        // names the sender.
        let Some(host) = Subject::intake_host(&self.site, &msg.subject) else {
            self.counters.drop_for(DropReason::WrongSubject);
            return;
        };
        let answer = match self.intake_batch(&host, &msg.payload).await {
            Ok(stored) => HostReply::Ok(stored),
            Err(e) => {
                tracing::info!(code = e.code.as_str(), error = %e.message, "batch refused");
                HostReply::Error(e)
            }
        };
        let Some(reply) = msg.reply else {
            return;
        };
        match codec::to_vec(&answer) {
            Ok(bytes) => {
                if let Err(e) = self.deps.internal.publish(reply, bytes.into()).await {
                    tracing::warn!(error = %e, "cannot answer host agent");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot encode answer to host agent"),
        }
    }

    pub(super) async fn intake_batch(
        &self,
        host: &HostId,
        payload: &[u8],
    ) -> Result<BatchStored, ErrorReply> {
        let produced: ProducedBatch = codec::from_slice(payload).map_err(|e| {
            self.counters.drop_for(DropReason::Malformed);
            ErrorReply::new(ErrorCode::Malformed, format!("not a produced batch: {e}"))
        })?;
        let ProducedBatch { data_point, batch } = produced;
        let record = self.record(&batch.vm)?;
        let record = match check_intake(record.as_ref(), host, &batch)
            .and_then(|r| self.check_producer(host, &batch).map(|()| r))
        {
            Ok(r) => r,
            Err(reason) => {
                self.counters.drop_for(reason);
                return Err(match reason {
                    DropReason::WrongSender => ErrorReply::new(
                        ErrorCode::Refused,
                        format!(
                            "VM {} (producer {}) is not held by host {host}",
                            batch.vm, batch.producer
                        ),
                    ),
                    DropReason::Refused => ErrorReply::new(
                        ErrorCode::Refused,
                        format!(
                            "VM {} has primary site {}, not {}",
                            batch.vm,
                            record
                                .as_ref()
                                .map(|r| r.primary.to_string())
                                .unwrap_or_default(),
                            batch.primary_site
                        ),
                    ),
                    _ => ErrorReply::new(
                        ErrorCode::UnknownVm,
                        format!("VM {} does not run on a host of this site", batch.vm),
                    ),
                });
            }
        };
        self.note_received(&batch.vm, &self.counters.received.intake);
        // In the outbox before it is stored: if the site stops in between, the host agent
        // resends and the outbox and the next hop de-duplicate, where storing first could lose
        // the delivery. A full outbox refuses it, and the host agent keeps it.
        let target = target(self.deps.config.monitoring.delivery, &self.site, record);
        let envelope = self.deliver(target.as_ref(), &data_point, &batch).await?;
        let stored = self
            .deps
            .accounting
            .store(
                &batch.vm,
                &data_point,
                accounting::message_id(&self.site, &batch),
                envelope,
            )
            .await
            .map_err(|e: AccountingError| internal_error(e))?;
        self.note_producer(host, &batch);
        self.register_producer(target.as_ref(), &batch, &data_point);
        if !stored.duplicate {
            self.evaluate_sla(record, &batch).await;
        }
        Ok(BatchStored {
            producer: batch.producer,
            epoch_ms: batch.epoch_ms,
            seq: batch.seq,
            duplicate: stored.duplicate,
        })
    }

    /// Refuses a batch under a Producer that another host of this site registered for the VM,
    /// and a new Producer for a VM that has [`MAX_PRODUCERS_PER_VM`] already.
    fn check_producer(&self, host: &HostId, batch: &MonitoringBatch) -> Result<(), DropReason> {
        let Ok(table) = self.producers.lock() else {
            return Ok(());
        };
        let Some(of_vm) = table.get(&batch.vm) else {
            return Ok(());
        };
        match of_vm.get(&batch.producer) {
            Some(registered_by) if registered_by != host => Err(DropReason::WrongSender),
            Some(_) => Ok(()),
            None if of_vm.len() >= MAX_PRODUCERS_PER_VM => Err(DropReason::WrongSender),
            None => Ok(()),
        }
    }

    /// Notes the host that sends under a Producer the first time it does, so that no other
    /// host of this site may send under it.
    fn note_producer(&self, host: &HostId, batch: &MonitoringBatch) {
        if let Ok(mut table) = self.producers.lock() {
            table
                .entry(batch.vm.clone())
                .or_default()
                .entry(batch.producer.clone())
                .or_insert_with(|| host.clone());
        }
    }

    /// Registers a batch's Producer in the directory the first time this site publishes one
    /// of its batches on the public subject (`target`), under this site's own key (best
    /// effort; retried with its next batch if the directory cannot be written). A site that
    /// passes batches up the chain registers nothing: its key would name it as the site where
    /// the VM runs. A VM keeps at most [`MAX_PRODUCERS_PER_VM`] registrations; a new one
    /// withdraws the oldest (a VM that moved below the primary leaves its old Producers).
    pub(super) fn register_producer(
        &self,
        target: Option<&Target>,
        batch: &MonitoringBatch,
        data_point: &DataPoint,
    ) {
        if target != Some(&Target::Public) {
            return;
        }
        let added = self.published.lock().ok().and_then(|mut table| {
            let of_vm = table.entry(batch.vm.clone()).or_default();
            if of_vm.contains(&batch.producer) {
                return None;
            }
            let evicted = (of_vm.len() >= MAX_PRODUCERS_PER_VM).then(|| of_vm.remove(0));
            of_vm.push(batch.producer.clone());
            Some(evicted)
        });
        let Some(evicted) = added else {
            return;
        };
        let registration = ProducerRegistration {
            vm: batch.vm.clone(),
            primary_site: batch.primary_site.clone(),
            producer: batch.producer.clone(),
            data_points: vec![data_point.clone()],
            subject: Subject::monitoring_vm(&batch.primary_site, &batch.vm)
                .as_str()
                .to_string(),
            heartbeat_ms: now_ms(),
        };
        let directory = self.deps.directory.clone();
        let published = self.published.clone();
        self.tracker.spawn(async move {
            if let Some(old) = evicted {
                if let Err(e) = directory.withdraw_producer(&registration.vm, &old).await {
                    tracing::warn!(error = %e, vm.id = %registration.vm, "cannot withdraw an old producer");
                }
            }
            match directory.register_producer(&registration).await {
                Ok(_) => {
                    tracing::debug!(vm.id = %registration.vm, producer = %registration.producer, "producer registered")
                }
                Err(e) => {
                    tracing::warn!(error = %e, vm.id = %registration.vm, "cannot register producer; will retry");
                    if let Ok(mut table) = published.lock() {
                        if let Some(of_vm) = table.get_mut(&registration.vm) {
                            of_vm.retain(|p| *p != registration.producer);
                        }
                    }
                }
            }
        });
    }
}
