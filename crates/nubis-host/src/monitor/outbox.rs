//! The monitor's ordered outbox: every batch stays until the site has acknowledged it, is sent
//! again unchanged after a back-off that grows while the site does not answer, with at most one
//! batch per Producer in flight; when the outbox is full the oldest batch is dropped.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::FuturesUnordered;
use nubis_protocol::message::{BatchStored, ProducerId};
use nubis_protocol::VmId;
use tokio::time::Instant;

use super::intake::{encode_batch, send, SendError};
use super::Monitor;
use crate::agent::ErrorChain;
use crate::producer::Delivery;

/// Batches in flight to the site at once.
const MAX_IN_FLIGHT: usize = 64;
/// First and longest wait before sending again after a failure.
pub(super) const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A batch waiting for the site's acknowledgement.
#[derive(Debug)]
pub(super) struct Outgoing {
    pub(super) vm: VmId,
    pub(super) producer: ProducerId,
    pub(super) epoch_ms: u64,
    pub(super) seq: u64,
    pub(super) body: Bytes,
    pub(super) attempts: u32,
}

/// The intake requests under way: each ends with its outbox key, Producer and outcome.
pub(super) type InFlight = FuturesUnordered<
    Pin<Box<dyn Future<Output = (u64, ProducerId, Result<BatchStored, SendError>)> + Send>>,
>;

impl Monitor {
    /// Encodes deliveries of one VM and puts them in the outbox.
    pub(super) fn enqueue(&mut self, vm: &VmId, deliveries: Vec<Delivery>) {
        for delivery in deliveries {
            let Some(state) = self.vms.get_mut(vm) else {
                return;
            };
            let seq = state.next_seq;
            let body = match encode_batch(
                &state.descriptor,
                &state.producer_id,
                state.epoch_ms,
                seq,
                delivery,
            ) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(vm.id = %vm, error = %e, "monitoring batch not sent");
                    self.counters.dropped += 1;
                    continue;
                }
            };
            state.next_seq += 1;
            state.unacked.insert(seq);
            let outgoing = Outgoing {
                vm: vm.clone(),
                producer: state.producer_id.clone(),
                epoch_ms: state.epoch_ms,
                seq,
                body: body.into(),
                attempts: 0,
            };
            if self.outbox.len() >= self.settings.outbox {
                if let Some((_, oldest)) = self.outbox.pop_first() {
                    self.counters.dropped += 1;
                    tracing::warn!(
                        vm.id = %oldest.vm,
                        seq = oldest.seq,
                        dropped = self.counters.dropped,
                        "monitoring outbox full; oldest batch dropped"
                    );
                    self.forget_batch(&oldest);
                }
            }
            self.outbox.insert(self.next_key, outgoing);
            self.next_key += 1;
        }
    }

    /// The batch is acknowledged or given up: its VM no longer waits for it.
    pub(super) fn forget_batch(&mut self, batch: &Outgoing) {
        if let Some(state) = self.vms.get_mut(&batch.vm) {
            if state.producer_id == batch.producer {
                state.unacked.remove(&batch.seq);
            }
        }
    }

    /// Starts sending the batches that may go now, oldest first.
    pub(super) fn start_sends(&mut self, client: &async_nats::Client, in_flight: &mut InFlight) {
        if self.retry_at.is_some_and(|t| t > Instant::now()) {
            return;
        }
        self.retry_at = None;
        for (key, out) in &self.outbox {
            if in_flight.len() >= MAX_IN_FLIGHT {
                break;
            }
            if self.busy.contains(&out.producer) {
                continue;
            }
            self.busy.insert(out.producer.clone());
            if out.attempts == 0 {
                self.counters.sent += 1;
            } else {
                self.counters.retried += 1;
            }
            let client = client.clone();
            let subject = self.intake.clone();
            let body = out.body.clone();
            let (key, producer, epoch_ms, seq) =
                (*key, out.producer.clone(), out.epoch_ms, out.seq);
            in_flight.push(Box::pin(async move {
                let result = send(&client, subject, body, &producer, epoch_ms, seq).await;
                (key, producer, result)
            }));
        }
    }

    /// Handles the end of one request.
    pub(super) fn on_sent(
        &mut self,
        key: u64,
        producer: &ProducerId,
        result: Result<BatchStored, SendError>,
    ) {
        self.busy.remove(producer);
        match result {
            Ok(_) => {
                self.counters.acknowledged += 1;
                if self.failing {
                    tracing::info!("the site stores monitoring batches again");
                }
                self.failing = false;
                self.backoff = BACKOFF_MIN;
                if let Some(out) = self.outbox.remove(&key) {
                    self.forget_batch(&out);
                }
            }
            Err(e) if e.is_permanent() => {
                self.counters.dropped += 1;
                tracing::info!(error = %e, "monitoring batch refused for good; dropped");
                if let Some(out) = self.outbox.remove(&key) {
                    self.forget_batch(&out);
                }
            }
            Err(e) => {
                if !self.failing {
                    tracing::warn!(error = %ErrorChain(&e), "the site does not store monitoring batches; retrying");
                } else {
                    tracing::debug!(error = %ErrorChain(&e), "monitoring batch not stored");
                }
                self.failing = true;
                if let Some(out) = self.outbox.get_mut(&key) {
                    out.attempts = out.attempts.saturating_add(1);
                }
                self.retry_at = Some(Instant::now() + self.backoff);
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}
