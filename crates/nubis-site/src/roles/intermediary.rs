//! The Intermediary's rule, in one place: an operation whose next hop is one of this site's
//! own hosts is carried out here; one whose next hop is a partner site is sent on to it, and
//! its failure becomes the error reply passed upstream.
//!
//! Every operation that follows a token's route or a VM's chain goes through
//! [`Roles::forward`], the Controller's included, so a site never reaches further than its
//! next hop. (A Migration request fanned out to partners is not forwarding: it goes to every
//! candidate at once.)

use std::future::Future;

use nubis_protocol::message::{Body, ErrorReply, HostId};
use nubis_protocol::subject::FederationOp;

use crate::federation::CallError;
use crate::journal::NextHop;
use crate::local::LocalSite;
use crate::peers::Peers;

use super::Roles;

/// The error reply a failed call to the next site becomes upstream: the next site's own
/// refusal as it gave it, else the code [`CallError::to_reply`] gives with a message that names
/// no site. The caller knows this site, not the one after it, and learns no more from a
/// failure than from a success.
pub(crate) fn passed_upstream(e: &CallError) -> ErrorReply {
    let reply = e.to_reply();
    let message = match e {
        CallError::Refused { .. } => return reply,
        CallError::Timeout { op, .. } => format!("the next site did not answer {op} in time"),
        CallError::Unreachable { op, .. } => {
            format!("the next site is unreachable (no responders for {op})")
        }
        CallError::BadReply { op, .. } => format!("the next site's reply to {op} was refused"),
        CallError::Send { op, .. } => format!("cannot send {op} to the next site"),
    };
    ErrorReply::new(reply.code, message)
}

impl<L: LocalSite, P: Peers> Roles<L, P> {
    /// Carries out `op` with `req` at `next`: `here(host)` for a host of this site, a
    /// federation call to the next site otherwise, whose failure becomes the error reply
    /// passed upstream.
    pub(crate) async fn forward<Req, Rep, F, Fut>(
        &self,
        next: &NextHop,
        op: FederationOp,
        req: &Req,
        here: F,
    ) -> Result<Rep, ErrorReply>
    where
        Req: Body + Sync,
        Rep: Body + Send,
        F: FnOnce(HostId) -> Fut,
        Fut: Future<Output = Result<Rep, ErrorReply>>,
    {
        self.forward_with(next, op, req, here, |e| passed_upstream(&e))
            .await
    }

    /// [`Roles::forward`] for a caller that must tell the ways a call can fail apart: a failed
    /// call to the next site is mapped with `failed`.
    pub(crate) async fn forward_with<Req, Rep, E, F, Fut>(
        &self,
        next: &NextHop,
        op: FederationOp,
        req: &Req,
        here: F,
        failed: impl FnOnce(CallError) -> E,
    ) -> Result<Rep, E>
    where
        Req: Body + Sync,
        Rep: Body + Send,
        F: FnOnce(HostId) -> Fut,
        Fut: Future<Output = Result<Rep, E>>,
    {
        match next {
            NextHop::Host(h) => here(h.clone()).await,
            NextHop::Site(s) => self.peers.call(s, op, req).await.map_err(failed),
        }
    }
}

#[cfg(test)]
mod tests {
    use nubis_protocol::message::{ErrorCode, InitiateTransfer, TransferStatus};
    use nubis_protocol::{MigrationId, SiteId, VmId};

    use crate::fakes::{endpoint, host, site, Answer, TestSite};
    use crate::journal::{NextHop, Route, RouteSide};

    /// An Initiate transfer from `b` for a token this site routes to `next`.
    fn routed(t: &TestSite, next: NextHop) -> InitiateTransfer {
        let req = InitiateTransfer {
            migration_id: MigrationId::random(),
            vm: VmId::new("vm-1").unwrap(),
            source: endpoint("b"),
            destination: endpoint("a"),
            max_bytes_per_sec: None,
        };
        t.journal
            .put_route(&Route {
                token: req.destination.token,
                migration_id: req.migration_id,
                vm: req.vm.clone(),
                side: RouteSide::Destination,
                next,
                upstream: SiteId::new("b").unwrap(),
                descriptor: None,
                expires_ms: u64::MAX,
                relay: None,
                destination_committed: false,
            })
            .unwrap();
        req
    }

    #[tokio::test(start_paused = true)]
    async fn a_host_hop_is_served_here_and_a_site_hop_is_forwarded() {
        let t = TestSite::new(&[], &["h1"]);
        let b = SiteId::new("b").unwrap();
        let roles = t.roles();
        let reply = roles.initiate(&b, routed(&t, host("h1"))).await.unwrap();
        assert!(matches!(reply.status, TransferStatus::Succeeded { .. }));
        assert_eq!(t.local.fake.calls(), vec!["initiate -"]);
        assert!(t.peers.fake.calls().is_empty());

        t.local.fake.clear_calls();
        let reply = roles.initiate(&b, routed(&t, site("c"))).await.unwrap();
        assert!(matches!(reply.status, TransferStatus::Succeeded { .. }));
        assert_eq!(t.peers.fake.calls(), vec!["transfer.initiate c"]);
        assert!(t.local.fake.calls().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_forward_becomes_the_error_reply_passed_upstream() {
        let cases = [
            (
                Answer::Refused(ErrorCode::NoCapacity),
                ErrorCode::NoCapacity,
            ),
            (Answer::Timeout, ErrorCode::Timeout),
            (Answer::Unreachable, ErrorCode::Unreachable),
        ];
        for (answer, code) in cases {
            let t = TestSite::new(&[], &[]);
            t.peers
                .fake
                .on(Some("c"), "transfer.initiate", answer.clone());
            let e = t
                .roles()
                .initiate(&SiteId::new("b").unwrap(), routed(&t, site("c")))
                .await
                .unwrap_err();
            assert_eq!(e.code, code, "{answer:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_passed_upstream_names_no_site_beyond_this_one() {
        for answer in [Answer::Timeout, Answer::Unreachable] {
            let t = TestSite::new(&[], &[]);
            t.peers
                .fake
                .on(Some("far-away"), "transfer.initiate", answer.clone());
            let e = t
                .roles()
                .initiate(&SiteId::new("b").unwrap(), routed(&t, site("far-away")))
                .await
                .unwrap_err();
            assert!(!e.message.contains("far-away"), "{answer:?}: {}", e.message);
            assert!(e.message.contains("the next site"), "{}", e.message);
        }
        // The next site's own refusal passes as it gave it.
        let t = TestSite::new(&[], &[]);
        t.peers.fake.on(
            Some("far-away"),
            "transfer.initiate",
            Answer::Refused(ErrorCode::NoCapacity),
        );
        let e = t
            .roles()
            .initiate(&SiteId::new("b").unwrap(), routed(&t, site("far-away")))
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::NoCapacity);
    }
}
