//! What the roles need from the federation: one signed request to a partner site and its
//! verified reply.
//!
//! [`FederationClient`] is the production implementation. The roles and the Controller are
//! generic over [`Peers`], so their logic can be driven without a bus.

use std::future::Future;
use std::time::Duration;

use nubis_protocol::message::Body;
use nubis_protocol::subject::FederationOp;
use nubis_protocol::SiteId;

use crate::federation::{CallError, FederationClient};

/// Calls a partner site.
pub trait Peers: Send + Sync + 'static {
    /// Sends `body` to operation `op` of site `to` and returns its verified reply, waiting the
    /// client's default time.
    fn call<Req: Body + Sync, Rep: Body + Send>(
        &self,
        to: &SiteId,
        op: FederationOp,
        body: &Req,
    ) -> impl Future<Output = Result<Rep, CallError>> + Send;

    /// Like [`Peers::call`], waiting at most `timeout`.
    fn call_with_timeout<Req: Body + Sync, Rep: Body + Send>(
        &self,
        to: &SiteId,
        op: FederationOp,
        body: &Req,
        timeout: Duration,
    ) -> impl Future<Output = Result<Rep, CallError>> + Send;
}

impl Peers for FederationClient {
    fn call<Req: Body + Sync, Rep: Body + Send>(
        &self,
        to: &SiteId,
        op: FederationOp,
        body: &Req,
    ) -> impl Future<Output = Result<Rep, CallError>> + Send {
        FederationClient::call(self, to, op, body)
    }

    fn call_with_timeout<Req: Body + Sync, Rep: Body + Send>(
        &self,
        to: &SiteId,
        op: FederationOp,
        body: &Req,
        timeout: Duration,
    ) -> impl Future<Output = Result<Rep, CallError>> + Send {
        FederationClient::call_with_timeout(self, to, op, body, timeout)
    }
}
