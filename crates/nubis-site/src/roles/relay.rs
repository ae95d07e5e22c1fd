//! Relaying by policy (paper III-D, location unawareness): an Intermediary whose transfer
//! policy towards its upstream is `relay` never passes a downstream proxy or token upstream.
//! In their place it names its own proxy and a token of its own, keeps what the next hop gave
//! in the token's [`Route`], and its proxy carries the data: it fetches the files from the
//! source and serves them again to the destination, each hop verifying the digests.
//!
//! - An offer from a partner gets a fresh token of this site's; the relaying token is minted
//!   at the first Initiate transfer, when the source is known, and the request goes on
//!   downstream naming this proxy's relaying token as the source and the partner's own token
//!   as the destination.
//! - A source a partner prepared is relayed at once: the token passed upstream is the relaying
//!   token itself, and Transfer verification is answered by this site's proxy.
//!
//! Commit and abort go on downstream with the partner's token, and release the relaying token.

use nubis_protocol::message::{
    Endpoint, ErrorCode, ErrorReply, HandOverSide, Offer, TransferToken,
};
use nubis_protocol::{SiteId, VmId};

use crate::config::TransferMode;
use crate::journal::{NextHop, Relaying, Route, RouteRelay};
use crate::local::LocalSite;
use crate::peers::Peers;

use super::{internal, unknown_token, Roles};

impl<L: LocalSite, P: Peers> Roles<L, P> {
    /// Whether endpoints this site passes to `upstream` from its next hop `next` are relayed:
    /// the policy towards `upstream` says so, and both are other sites (a site's own requests
    /// and its own hosts' endpoints are never relayed).
    pub(crate) fn relays_for(&self, upstream: &SiteId, next: &NextHop) -> bool {
        upstream != self.site()
            && matches!(next, NextHop::Site(_))
            && self.config().policy.transfer.towards(upstream) == TransferMode::Relay
    }

    /// Puts this site's own proxy and a fresh token of its own in place of a partner's offer
    /// endpoint; returns what the route keeps of the partner's.
    pub(crate) fn relay_offer(&self, offer: &mut Offer) -> RouteRelay {
        let downstream = Endpoint {
            proxy: offer.proxy.clone(),
            token: offer.token,
        };
        offer.proxy = self.config().proxy.clone();
        offer.token = TransferToken::random();
        RouteRelay {
            downstream,
            relaying: None,
        }
    }

    /// At Initiate transfer on relayed offer `route`: the relaying token that fetches from
    /// `source` (no faster than the migration's cap `max_bytes_per_sec`), minted at this site's
    /// proxy the first time and journaled. A repeated request
    /// (a progress poll) gets the same token; one naming another source is someone else using
    /// the offer.
    pub(crate) async fn relaying_from(
        &self,
        route: &Route,
        source: &Endpoint,
        max_bytes_per_sec: Option<u64>,
    ) -> Result<(Endpoint, Endpoint), ErrorReply> {
        // The same turn as taking the offer up, so two requests never mint twice.
        let _turn = self.admission().lock(&route.upstream).await;
        let current = self
            .journal()
            .route(&route.token)
            .map_err(internal)?
            .ok_or_else(unknown_token)?;
        let Some(mut relay) = current.relay.clone() else {
            return Err(internal("the route is not relayed"));
        };
        // A source served by this site's own proxy already hides everything beyond it.
        if source.proxy == self.config().proxy {
            return Ok((source.clone(), relay.downstream));
        }
        if let Some(r) = &relay.relaying {
            return if r.source == *source {
                Ok((r.endpoint.clone(), relay.downstream))
            } else {
                Err(ErrorReply::new(
                    ErrorCode::TokenUsed,
                    "a transfer from another source uses this offer",
                ))
            };
        }
        let minted = self
            .local()
            .relay(route.migration_id, &route.vm, source, max_bytes_per_sec)
            .await?;
        relay.relaying = Some(Relaying {
            endpoint: minted.endpoint.clone(),
            source: source.clone(),
        });
        let downstream = relay.downstream.clone();
        self.journal()
            .put_route(&Route {
                relay: Some(relay),
                ..current
            })
            .map_err(internal)?;
        tracing::info!(migration.id = %route.migration_id, vm.id = %route.vm, "transfer relayed");
        Ok((minted.endpoint, downstream))
    }

    /// At the prepare: relays the source `downstream` that the next hop prepared (no faster
    /// than the migration's cap `max_bytes_per_sec`); returns what the route keeps, whose
    /// relaying token is the one to pass upstream.
    pub(crate) async fn relay_prepared(
        &self,
        migration: nubis_protocol::MigrationId,
        vm: &VmId,
        downstream: &Endpoint,
        max_bytes_per_sec: Option<u64>,
    ) -> Result<RouteRelay, ErrorReply> {
        let minted = self
            .local()
            .relay(migration, vm, downstream, max_bytes_per_sec)
            .await?;
        tracing::info!(migration.id = %migration, vm.id = %vm, "prepared source relayed");
        Ok(RouteRelay {
            downstream: downstream.clone(),
            relaying: Some(Relaying {
                endpoint: minted.endpoint,
                source: downstream.clone(),
            }),
        })
    }

    /// The endpoint to name downstream for `route`: the next hop's own when relayed, else
    /// `endpoint` as it came.
    pub(crate) fn downstream_endpoint(route: &Route, endpoint: &Endpoint) -> Endpoint {
        route
            .relay
            .as_ref()
            .map_or_else(|| endpoint.clone(), |r| r.downstream.clone())
    }

    /// After a commit or abort of relayed `route` went through downstream: releases the
    /// relaying token at this site's proxy. A failure is logged; the token's lifetime ends it.
    pub(crate) async fn release_relaying(
        &self,
        route: &Route,
        committed: bool,
        side: HandOverSide,
    ) {
        let Some(relaying) = route.relay.as_ref().and_then(|r| r.relaying.as_ref()) else {
            return;
        };
        let released = self
            .release_relaying_token(&route.vm, &relaying.endpoint.token, committed)
            .await;
        if let Err(e) = released {
            tracing::warn!(migration.id = %route.migration_id, vm.id = %route.vm, ?side, error = %e.message, "relaying token not released at the proxy");
        }
    }

    /// Releases relaying token `token` of `vm` at this site's proxy, after the commit
    /// (`committed`) or the abort of the transfer it relayed.
    pub(crate) async fn release_relaying_token(
        &self,
        vm: &VmId,
        token: &TransferToken,
        committed: bool,
    ) -> Result<(), ErrorReply> {
        if committed {
            self.local().commit_source(vm, None, token).await
        } else {
            self.local().abort_source(vm, None, token).await
        }
    }
}

#[cfg(test)]
mod tests;
