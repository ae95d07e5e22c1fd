//! Typed, signed requests to a Transfer proxy over its subjects: what a site daemon (or another
//! proxy) calls, and what the tests use.

use std::sync::Arc;
use std::time::Duration;

use nubis_protocol::envelope::{self, Addressing, EnvelopeError, Verifier};
use nubis_protocol::identity::SiteIdentity;
use nubis_protocol::message::{
    Body, ErrorCode, ErrorReply, FetchTransfer, MintToken, Minted, ProxyUri, ReleaseToken,
    Released, TransferAck, TransferStatus, TransferStatusQuery, TransferStatusReply, TransferToken,
};
use nubis_protocol::subject::{ProxyOp, Subject};
use nubis_protocol::MigrationId;

/// Why a request to a proxy failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Signing the request or verifying the reply failed.
    #[error("envelope refused")]
    Envelope(#[from] EnvelopeError),
    /// The request could not be sent or got no responder.
    #[error("request failed")]
    Request(#[from] async_nats::RequestError),
    /// No reply in time.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The proxy answered with an error reply.
    #[error("proxy refused: {code}: {message}")]
    Refused {
        /// The stable code.
        code: ErrorCode,
        /// Its explanation.
        message: String,
    },
}

impl ClientError {
    /// The code of a refusal, if the proxy answered with one.
    pub fn code(&self) -> Option<&ErrorCode> {
        match self {
            Self::Refused { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// Sends signed requests to proxies as one site.
#[derive(Debug, Clone)]
pub struct ProxyClient {
    client: async_nats::Client,
    identity: Arc<SiteIdentity>,
    verifier: Arc<Verifier>,
    timeout: Duration,
}

impl ProxyClient {
    /// A client signing as `identity` and verifying replies with `verifier` (the site's own).
    pub fn new(
        client: async_nats::Client,
        identity: Arc<SiteIdentity>,
        verifier: Arc<Verifier>,
    ) -> Self {
        Self {
            client,
            identity,
            verifier,
            timeout: Duration::from_secs(10),
        }
    }

    /// Changes the reply timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sends `body` to `op` of the proxy at `uri` and decodes the reply as `R`.
    pub async fn call<B: Body, R: Body>(
        &self,
        uri: &ProxyUri,
        op: ProxyOp,
        body: &B,
    ) -> Result<R, ClientError> {
        let subject = Subject::proxy(uri, op);
        let (raw, nonce) = envelope::seal_message(
            &self.identity,
            Addressing::request(uri.site(), subject.as_str()),
            body,
        )?;
        let reply = tokio::time::timeout(
            self.timeout,
            self.client.request(subject.to_string(), raw.into()),
        )
        .await
        .map_err(|_| ClientError::Timeout(self.timeout))??;
        let opened = self.verifier.open_reply(
            &reply.payload,
            subject.as_str(),
            &nonce,
            envelope::now_ms(),
        )?;
        // Another pinned site may sign a well-formed reply too: only the site of the proxy
        // asked speaks for its tokens.
        if &opened.from != uri.site() {
            return Err(ClientError::Envelope(EnvelopeError::UnknownSender(
                opened.from.to_string(),
            )));
        }
        if opened.body_type() == ErrorReply::TYPE {
            let e: ErrorReply = opened.body()?;
            return Err(ClientError::Refused {
                code: e.code,
                message: e.message,
            });
        }
        Ok(opened.body()?)
    }

    /// Site-internal: mint a token at the own site's proxy.
    pub async fn mint(&self, uri: &ProxyUri, req: &MintToken) -> Result<Minted, ClientError> {
        self.call(uri, ProxyOp::Mint, req).await
    }

    /// Initiate transfer at the own site's proxy.
    pub async fn fetch(
        &self,
        uri: &ProxyUri,
        req: &FetchTransfer,
    ) -> Result<TransferStatus, ClientError> {
        let r: TransferStatusReply = self.call(uri, ProxyOp::Fetch, req).await?;
        Ok(r.status)
    }

    /// Status of `token` at the proxy that minted it.
    pub async fn status(
        &self,
        uri: &ProxyUri,
        migration_id: MigrationId,
        token: TransferToken,
    ) -> Result<TransferStatus, ClientError> {
        let r: TransferStatusReply = self
            .call(
                uri,
                ProxyOp::Status,
                &TransferStatusQuery {
                    migration_id,
                    token,
                },
            )
            .await?;
        Ok(r.status)
    }

    /// Acknowledges verified digests to the serving proxy; answers its status after comparing.
    pub async fn ack(
        &self,
        uri: &ProxyUri,
        ack: &TransferAck,
    ) -> Result<TransferStatus, ClientError> {
        let r: TransferStatusReply = self.call(uri, ProxyOp::Status, ack).await?;
        Ok(r.status)
    }

    /// Site-internal: release a token after commit or abort.
    pub async fn release(
        &self,
        uri: &ProxyUri,
        req: &ReleaseToken,
    ) -> Result<Released, ClientError> {
        self.call(uri, ProxyOp::Release, req).await
    }
}
