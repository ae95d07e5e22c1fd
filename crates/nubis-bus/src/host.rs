//! The site-internal transport: the host-agent client of `nubis_protocol::message::host` over a
//! NATS connection. The typed client and its messages live in the protocol crate; this is the
//! one request/reply adapter beneath it.

use std::time::Duration;

use nubis_protocol::message::{HostClient, HostId, HostTransport, TransportError};
use nubis_protocol::subject::Subject;
use nubis_protocol::SiteId;

/// [`HostTransport`] over a NATS connection (the site's internal connection, whose replies
/// never cross the leaf link).
#[derive(Debug, Clone)]
pub struct NatsTransport(pub async_nats::Client);

impl HostTransport for NatsTransport {
    async fn request(
        &self,
        subject: Subject,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, TransportError> {
        request(&self.0, String::from(subject), payload.into(), timeout)
            .await
            .map(|b| b.to_vec())
    }
}

/// One site-internal request: `payload` to `subject`, the reply's payload back within
/// `timeout` (a host agent's calls to its site, such as the monitoring intake, use it too).
pub async fn request(
    client: &async_nats::Client,
    subject: String,
    payload: bytes::Bytes,
    timeout: Duration,
) -> Result<bytes::Bytes, TransportError> {
    let request = async_nats::Request::new()
        .payload(payload)
        .timeout(Some(timeout));
    match client.send_request(subject, request).await {
        Ok(m) => Ok(m.payload),
        Err(e) => Err(match e.kind() {
            async_nats::RequestErrorKind::NoResponders => TransportError::NoResponders,
            async_nats::RequestErrorKind::TimedOut => TransportError::Timeout(timeout),
            _ => TransportError::Other(e.to_string()),
        }),
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
