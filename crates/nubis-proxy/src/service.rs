//! The proxy's bus service: requests arrive as signed envelopes on
//! `nubis.proxy.<site>.<proxy>.>`, are verified (signature, freshness, replay, addressing),
//! dispatched to the token operations, and answered with a signed reply or a signed refusal
//! (`subjects.md` lists the operations and error codes). The serve loop is the bus layer's, the
//! same as a site daemon's.

use nubis_bus::serve::{sign_reply, Limits, Service};
use nubis_protocol::envelope::{EnvelopeError, Opened};
use nubis_protocol::identity::SiteIdentity;
use nubis_protocol::message::{
    Body, ErrorCode, ErrorReply, FetchKey, FetchTransfer, MintToken, ReleaseToken, TransferAck,
    TransferStatusQuery, TransferStatusReply,
};
use nubis_protocol::subject::{ParsedSubject, ProxyOp, Subject};

use crate::error::ProxyError;
use crate::proxy::TransferProxy;

impl TransferProxy {
    /// Answers the requests of `sub` until the proxy shuts down, through the bus layer's serve
    /// loop: verified first, at most `max_concurrent_requests` at a time (at most half of them
    /// for one site), refusals signed over the subject the request arrived on.
    pub(crate) fn spawn_service(&self, sub: async_nats::Subscriber) {
        let service = Service {
            name: "proxy",
            identity: self.inner.identity.clone(),
            verifier: self.inner.verifier.clone(),
            limits: Limits::new(self.inner.settings.max_concurrent_requests),
        };
        let uri = self.inner.uri.clone();
        // Progress events (our own among them) and foreign subjects are not requests.
        let parse = move |subject: &str| match Subject::parse(subject) {
            Ok(ParsedSubject::Proxy { proxy, op }) if proxy == uri => Some(op),
            _ => None,
        };
        let this = self.clone();
        nubis_bus::serve::serve(
            service,
            self.inner.client.clone(),
            sub,
            &self.inner.tracker,
            self.inner.cancel.clone(),
            parse,
            move |op, opened| {
                let this = this.clone();
                async move { this.dispatch(op, &opened).await }
            },
        );
    }

    /// Performs the operation `op` of a verified request; the error is the signed refusal.
    async fn dispatch(&self, op: ProxyOp, opened: &Opened) -> Result<Vec<u8>, ErrorReply> {
        let own = &opened.from == self.inner.uri.site();
        let refuse = |e: ProxyError| ErrorReply::new(e.code(), e.to_string());
        let bad = |e: EnvelopeError| ErrorReply::new(ErrorCode::Malformed, e.to_string());
        let reply = |body: &dyn ErasedReply| body.seal(&self.inner.identity, opened);
        match (op, opened.body_type()) {
            (ProxyOp::Mint, _) => {
                if !own {
                    return Err(refuse(ProxyError::NotOwnSite("mint")));
                }
                let req: MintToken = opened.body().map_err(bad)?;
                let m = self.mint(req).await.map_err(refuse)?;
                reply(&m)
            }
            (ProxyOp::Fetch, _) => {
                if !own {
                    return Err(refuse(ProxyError::NotOwnSite("fetch")));
                }
                let req: FetchTransfer = opened.body().map_err(bad)?;
                let migration_id = req.migration_id;
                let status = self.fetch(req).await.map_err(refuse)?;
                reply(&TransferStatusReply {
                    migration_id,
                    status,
                })
            }
            (ProxyOp::Status, t) if t == TransferAck::TYPE => {
                let ack: TransferAck = opened.body().map_err(bad)?;
                let migration_id = ack.migration_id;
                let status = self.acknowledge(ack).await.map_err(refuse)?;
                reply(&TransferStatusReply {
                    migration_id,
                    status,
                })
            }
            (ProxyOp::Status, t) if t == FetchKey::TYPE => {
                let req: FetchKey = opened.body().map_err(bad)?;
                let sealed = self.grant_key(&opened.from, req).map_err(refuse)?;
                reply(&sealed)
            }
            (ProxyOp::Status, _) => {
                let q: TransferStatusQuery = opened.body().map_err(bad)?;
                let status = self.status(&q.token).map_err(refuse)?;
                reply(&TransferStatusReply {
                    migration_id: q.migration_id,
                    status,
                })
            }
            (ProxyOp::Release, _) => {
                if !own {
                    return Err(refuse(ProxyError::NotOwnSite("release")));
                }
                let req: ReleaseToken = opened.body().map_err(bad)?;
                let r = self.release(req).await.map_err(refuse)?;
                reply(&r)
            }
        }
    }
}

/// Signs any reply body (lets `dispatch` treat the reply types alike).
trait ErasedReply {
    fn seal(&self, identity: &SiteIdentity, req: &Opened) -> Result<Vec<u8>, ErrorReply>;
}

impl<B: Body> ErasedReply for B {
    fn seal(&self, identity: &SiteIdentity, req: &Opened) -> Result<Vec<u8>, ErrorReply> {
        sign_reply(identity, req, self)
            .map_err(|e| ErrorReply::new(ErrorCode::Internal, e.to_string()))
    }
}
