//! The typed client of other sites' federation subjects (`nubis.fed.<site>.<op>`).

use std::time::Duration;

use nubis_protocol::message::Body;
use nubis_protocol::subject::{FederationOp, Subject};
use nubis_protocol::SiteId;

use crate::call::{CallError, SignedClient, Target};

/// Sends signed requests to partner sites and verifies their replies.
#[derive(Debug, Clone)]
pub struct FederationClient {
    client: SignedClient,
}

impl FederationClient {
    /// A federation client over `client`, with its policy.
    pub fn new(client: SignedClient) -> Self {
        Self { client }
    }

    /// This site.
    pub fn site(&self) -> &SiteId {
        self.client.site()
    }

    /// Sends `body` to operation `op` of site `to` and returns its verified reply.
    pub async fn call<Req: Body, Rep: Body>(
        &self,
        to: &SiteId,
        op: FederationOp,
        body: &Req,
    ) -> Result<Rep, CallError> {
        self.call_with_timeout(to, op, body, self.client.policy().timeout)
            .await
    }

    /// Like [`FederationClient::call`] with an explicit timeout.
    pub async fn call_with_timeout<Req: Body, Rep: Body>(
        &self,
        to: &SiteId,
        op: FederationOp,
        body: &Req,
        timeout: Duration,
    ) -> Result<Rep, CallError> {
        let subject = Subject::federation(to, op);
        let target = Target {
            subject: &subject,
            signer: to,
            op: op.suffix(),
        };
        self.client.call_with_timeout(target, body, timeout).await
    }
}
