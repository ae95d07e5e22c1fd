//! The host-agent client over NATS: [`NatsTransport`] carries the protocol crate's
//! [`HostClient`](nubis_protocol::message::HostClient) requests on an `async_nats::Client`.
//!
//! The typed client and the messages live in `nubis_protocol::message::host`, so a site needs
//! neither this crate nor libvirt to talk to its host agents; this adapter is the few lines a
//! caller writes for its own bus client.

use std::time::Duration;

use nubis_protocol::message::{HostClient, HostId, HostTransport, TransportError};
use nubis_protocol::subject::Subject;
use nubis_protocol::SiteId;

/// [`HostTransport`] over an `async_nats::Client`.
#[derive(Debug, Clone)]
pub struct NatsTransport(pub async_nats::Client);

impl HostTransport for NatsTransport {
    async fn request(
        &self,
        subject: Subject,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, TransportError> {
        let request = async_nats::Request::new()
            .payload(payload.into())
            .timeout(Some(timeout));
        match self.0.send_request(String::from(subject), request).await {
            Ok(m) => Ok(m.payload.to_vec()),
            Err(e) => Err(match e.kind() {
                async_nats::RequestErrorKind::NoResponders => TransportError::NoResponders,
                async_nats::RequestErrorKind::TimedOut => TransportError::Timeout(timeout),
                _ => TransportError::Other(e.to_string()),
            }),
        }
    }
}

/// A client for host `host` of `site` over `client`.
pub fn host_client(
    client: async_nats::Client,
    site: SiteId,
    host: HostId,
) -> HostClient<NatsTransport> {
    HostClient::new(NatsTransport(client), site, host)
}
