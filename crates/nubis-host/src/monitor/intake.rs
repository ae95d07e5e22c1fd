//! The monitoring intake (`nubis.site.<site>.intake.<host>`): each batch encoded as a
//! [`ProducedBatch`], sent as a request, and the site's [`BatchStored`] acknowledgement checked.

use std::time::Duration;

use bytes::Bytes;
use nubis_protocol::codec::{self, CodecError, MAX_BODY_LEN};
use nubis_protocol::descriptor::VmDescriptor;
use nubis_protocol::message::{
    BatchPayload, BatchStored, ErrorCode, ErrorReply, HostReply, MonitoringBatch, ProducedBatch,
    ProducerId, TransportError,
};
use nubis_protocol::seal::seal;

use super::MonitorError;
use crate::producer::Delivery;

/// How long the site may take to store a batch before it is sent again.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the site did not acknowledge a batch.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No reply in time.
    #[error("no reply in time")]
    Timeout,
    /// The request failed (no responder, connection lost).
    #[error("request failed")]
    Request(#[source] TransportError),
    /// The reply could not be decoded.
    #[error("undecodable reply")]
    Reply(#[source] CodecError),
    /// The site answered with an error.
    #[error("refused by the site ({})", .0.code)]
    Refused(ErrorReply),
    /// The acknowledgement names another batch.
    #[error("acknowledgement for another batch")]
    Mismatch,
}

impl SendError {
    /// Whether sending the same bytes again can never succeed: the batch is undecodable, or
    /// the site does not (or no longer) hold the VM — the last batches of a VM that has just
    /// been handed over to another site arrive after its record left this site.
    pub(super) fn is_permanent(&self) -> bool {
        matches!(self, Self::Refused(e) if matches!(
            e.code,
            ErrorCode::Malformed
                | ErrorCode::Oversize
                | ErrorCode::TooDeep
                | ErrorCode::UnknownVm
                | ErrorCode::Refused
        ))
    }
}

/// Turns one delivery into the encoded [`ProducedBatch`] with sequence number `seq`.
pub fn encode_batch(
    descriptor: &VmDescriptor,
    producer: &ProducerId,
    epoch_ms: u64,
    seq: u64,
    delivery: Delivery,
) -> Result<Vec<u8>, MonitorError> {
    let payload = if delivery.sealed {
        let clear = codec::to_vec(&delivery.payload).map_err(MonitorError::Encode)?;
        BatchPayload::Sealed {
            ciphertext: seal(&descriptor.primary_keys.sealing, &clear)
                .map_err(MonitorError::Seal)?,
        }
    } else {
        BatchPayload::Clear(delivery.payload)
    };
    let produced = ProducedBatch {
        data_point: delivery.data_point,
        batch: MonitoringBatch {
            vm: descriptor.id.clone(),
            primary_site: descriptor.primary_site.clone(),
            producer: producer.clone(),
            epoch_ms,
            seq,
            payload,
        },
    };
    let body = codec::to_vec(&produced).map_err(MonitorError::Encode)?;
    if body.len() > MAX_BODY_LEN {
        return Err(MonitorError::TooLarge(body.len()));
    }
    Ok(body)
}

/// Sends one batch and checks that the site's acknowledgement is for it.
pub(super) async fn send(
    client: &async_nats::Client,
    subject: String,
    body: Bytes,
    producer: &ProducerId,
    epoch_ms: u64,
    seq: u64,
) -> Result<BatchStored, SendError> {
    let reply = intake_request(client, subject, body).await?;
    match codec::from_slice::<HostReply<BatchStored>>(&reply).map_err(SendError::Reply)? {
        HostReply::Ok(stored)
            if &stored.producer == producer && stored.epoch_ms == epoch_ms && stored.seq == seq =>
        {
            Ok(stored)
        }
        HostReply::Ok(_) => Err(SendError::Mismatch),
        HostReply::Error(e) => Err(SendError::Refused(e)),
    }
}

/// The one request of the monitor: `body` to `subject`, the reply's payload back, within the
/// intake's timeout.
async fn intake_request(
    client: &async_nats::Client,
    subject: String,
    body: Bytes,
) -> Result<Bytes, SendError> {
    nubis_bus::host::request(client, subject, body, REQUEST_TIMEOUT)
        .await
        .map_err(|e| match e {
            TransportError::Timeout(_) => SendError::Timeout,
            other => SendError::Request(other),
        })
}
