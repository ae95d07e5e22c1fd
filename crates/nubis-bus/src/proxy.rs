//! The typed client of Transfer proxies (`nubis.proxy.<site>.<proxy>.<op>`): what a site daemon
//! (or another proxy) calls. Every reply must be signed by the site of the proxy asked.

use nubis_protocol::message::{
    Body, FetchKey, FetchTransfer, MintToken, Minted, ProxyUri, ReleaseToken, Released,
    SealedContentKey, TransferAck, TransferStatus, TransferStatusQuery, TransferStatusReply,
    TransferToken,
};
use nubis_protocol::subject::{ProxyOp, Subject};
use nubis_protocol::MigrationId;

use std::sync::Arc;
use std::time::Duration;

use nubis_protocol::envelope::Verifier;
use nubis_protocol::identity::SiteIdentity;

use crate::call::{CallError, CallPolicy, SignedClient, Target};

/// Sends signed requests to proxies as one site.
#[derive(Debug, Clone)]
pub struct ProxyClient {
    client: SignedClient,
}

impl ProxyClient {
    /// A client signing as `identity` and verifying replies with `verifier`, under the default
    /// [`CallPolicy`].
    pub fn new(
        client: async_nats::Client,
        identity: Arc<SiteIdentity>,
        verifier: Arc<Verifier>,
    ) -> Self {
        Self::from_signed(SignedClient::new(
            client,
            identity,
            verifier,
            // Proxies fail at once on no responders; their callers decide what comes next.
            CallPolicy::default().with_no_responder_wait(Duration::ZERO),
        ))
    }

    /// A proxy client over `client`, with its policy.
    pub fn from_signed(client: SignedClient) -> Self {
        Self { client }
    }

    /// The same client with reply timeout `timeout`.
    pub fn with_timeout(self, timeout: Duration) -> Self {
        let policy = CallPolicy {
            timeout,
            ..self.client.policy()
        };
        Self::from_signed(self.client.with_policy(policy))
    }

    /// Sends `body` to `op` of the proxy at `uri` and decodes the reply as `R`.
    pub async fn call<B: Body, R: Body>(
        &self,
        uri: &ProxyUri,
        op: ProxyOp,
        body: &B,
    ) -> Result<R, CallError> {
        let subject = Subject::proxy(uri, op);
        let target = Target {
            subject: &subject,
            signer: uri.site(),
            op: op.as_str(),
        };
        self.client.call(target, body).await
    }

    /// Site-internal: mint a token at the own site's proxy.
    pub async fn mint(&self, uri: &ProxyUri, req: &MintToken) -> Result<Minted, CallError> {
        self.call(uri, ProxyOp::Mint, req).await
    }

    /// Initiate transfer at the own site's proxy.
    pub async fn fetch(
        &self,
        uri: &ProxyUri,
        req: &FetchTransfer,
    ) -> Result<TransferStatus, CallError> {
        let r: TransferStatusReply = self.call(uri, ProxyOp::Fetch, req).await?;
        Ok(r.status)
    }

    /// Status of `token` at the proxy that minted it.
    pub async fn status(
        &self,
        uri: &ProxyUri,
        migration_id: MigrationId,
        token: TransferToken,
    ) -> Result<TransferStatus, CallError> {
        let query = TransferStatusQuery {
            migration_id,
            token,
        };
        let r: TransferStatusReply = self.call(uri, ProxyOp::Status, &query).await?;
        Ok(r.status)
    }

    /// Asks the serving proxy for the transfer's content key, sealed to the ephemeral public
    /// key in `req` (before reading the token's objects).
    pub async fn fetch_key(
        &self,
        uri: &ProxyUri,
        req: &FetchKey,
    ) -> Result<SealedContentKey, CallError> {
        self.call(uri, ProxyOp::Status, req).await
    }

    /// Acknowledges verified digests to the serving proxy; answers its status after comparing.
    pub async fn ack(
        &self,
        uri: &ProxyUri,
        ack: &TransferAck,
    ) -> Result<TransferStatus, CallError> {
        let r: TransferStatusReply = self.call(uri, ProxyOp::Status, ack).await?;
        Ok(r.status)
    }

    /// Site-internal: release a token after commit or abort.
    pub async fn release(&self, uri: &ProxyUri, req: &ReleaseToken) -> Result<Released, CallError> {
        self.call(uri, ProxyOp::Release, req).await
    }
}
