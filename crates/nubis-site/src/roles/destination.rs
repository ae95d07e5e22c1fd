//! The Destination's handlers (section III-C.2): the Migration request handler, with delegation
//! to partners (the Intermediary acting as Controller for step 2) and the exposure policy, and
//! the Initiate transfer handler.

use std::time::Duration;

use futures::future::join_all;
use nubis_protocol::descriptor::VmDescriptor;
use nubis_protocol::envelope::now_ms;
use nubis_protocol::message::{
    ErrorCode, ErrorReply, HostId, InitiateTransfer, MigrationRequest, Offer, Offers,
    TransferStatusReply,
};
use nubis_protocol::subject::FederationOp;
use nubis_protocol::SiteId;
use tokio::time::Instant;

use crate::config::Exposure;
use crate::journal::{NextHop, Route, RouteRelay, RouteSide, VmRecord};
use crate::local::LocalSite;
use crate::peers::Peers;
use crate::quota::{quota, too_fast, Holdings};

use super::{check_primary_keys, internal, malformed, Roles};

/// How long a destination offer stays reserved if nobody initiates a transfer on it, unless
/// `[limits] offer_ttl_ms` says otherwise.
pub const OFFER_TTL_MS: u64 = 10 * 60 * 1000;

/// How long a delegated Migration request may take at the next site.
const DELEGATION_TIMEOUT: Duration = Duration::from_secs(5);

/// Checks a partner's Migration request against what site `me` knows (`held`: its record of
/// the VM, if any). Only `me` itself may name `me` as a VM's primary; a VM `me` already holds
/// may be offered a new place only at the request of its upstream, under the primary and keys
/// on record. Anything else would let a partner bypass the exposure policy or, on commit, take
/// over a VM it has no part in.
pub(crate) fn check_claims(
    me: &SiteId,
    from: &SiteId,
    descriptor: &VmDescriptor,
    held: Option<&VmRecord>,
) -> Result<(), ErrorReply> {
    match held {
        None if descriptor.primary_site == *me => Err(ErrorReply::new(
            ErrorCode::Refused,
            format!("site {me} is not the primary of VM {}", descriptor.id),
        )),
        None => Ok(()),
        Some(r) if r.upstream.as_ref() != Some(from) => Err(ErrorReply::new(
            ErrorCode::Conflict,
            format!("VM {} is held here for another site", r.vm),
        )),
        Some(r)
            if r.primary != descriptor.primary_site
                || r.descriptor.primary_keys != descriptor.primary_keys =>
        {
            Err(ErrorReply::new(
                ErrorCode::Conflict,
                format!("VM {} has another primary on record", r.vm),
            ))
        }
        Some(_) => Ok(()),
    }
}

impl<L: LocalSite, P: Peers> Roles<L, P> {
    /// The Migration request handler (Destination), with delegation (Intermediary).
    pub async fn migration_request(
        &self,
        from: &SiteId,
        req: MigrationRequest,
    ) -> Result<Offers, ErrorReply> {
        let policy = &self.config.policy;
        if req.descriptor.id != req.vm {
            return Err(malformed("descriptor id differs from the VM id"));
        }
        // The rate comes first: a flood costs the site no journal write.
        if from != self.site() && !self.admission().try_request(from, Instant::now()) {
            return Err(too_fast());
        }
        // Seen request ids are bounded per partner; the site's own requests are not.
        let sender = (from != self.site()).then_some(from);
        let sight = self
            .journal
            .sight(&req.request_id, sender, now_ms())
            .map_err(crate::journal::refusal)?;
        if sight == crate::journal::Sight::Again {
            return Err(ErrorReply::new(
                ErrorCode::LoopDetected,
                "this Migration request was seen here before",
            ));
        }
        if req.depth > req.max_depth || req.depth > policy.delegation.max_depth {
            return Err(ErrorReply::new(
                ErrorCode::DepthExceeded,
                "delegation chain too long for this site",
            ));
        }
        // Claims are checked before the policy trusts them: only this site's own requests may
        // name it as the primary.
        let held = self.journal.vm(&req.vm).map_err(internal)?;
        if from != self.site() {
            check_claims(self.site(), from, &req.descriptor, held.as_ref())?;
            if held.is_none() {
                check_primary_keys(&self.config, self.key_book(), &req.descriptor)?;
            }
        }
        if req.descriptor.primary_site != *self.site() && !policy.accept_foreign {
            return Err(ErrorReply::new(
                ErrorCode::Refused,
                "this site does not accept foreign VMs",
            ));
        }
        req.descriptor.validate().map_err(malformed)?;

        // Step 2: local hosts, except the one the VM already runs on (a local migration).
        let current_host = match held {
            Some(VmRecord {
                downstream: Some(NextHop::Host(h)),
                former_downstream: None,
                ..
            }) => Some(h),
            _ => None,
        };
        let mut offers: Vec<Offer> = Vec::new();
        // Whether a per-partner limit kept an offer back: with no offer at all, the answer
        // says so rather than "no capacity".
        let mut over_quota = None;
        if from == self.site()
            || policy.accept_foreign
            || req.descriptor.primary_site == *self.site()
        {
            let _turn = self.quota_turn(from).await;
            let mut holding = self.holdings(from)?;
            let limits = self.admission().limits();
            over_quota = holding.local_shortfall(&req.descriptor, limits);
            if over_quota.is_none() {
                match self
                    .local
                    .local_offers(req.migration_id, &req.descriptor, current_host.as_ref())
                    .await
                {
                    Ok(local) => {
                        for (host, mut offer) in local {
                            if let Some(what) = holding.local_shortfall(&req.descriptor, limits) {
                                self.give_back(&req, &host, &offer).await;
                                over_quota = Some(what);
                                continue;
                            }
                            offer.terms.depth = req.depth;
                            offer.expires_ms = offer.expires_ms.min(self.offer_deadline());
                            self.put_destination_route(
                                from,
                                &req,
                                &offer,
                                NextHop::Host(host),
                                None,
                            )?;
                            holding.offers += 1;
                            holding.add(&req.descriptor);
                            offers.push(offer);
                        }
                    }
                    Err(e) => {
                        tracing::info!(code = e.code.as_str(), "no local offer: {}", e.message)
                    }
                }
            }
        }

        // Step 3: delegation to partners, acting as Controller for step 2.
        let depth_left = req.depth < req.max_depth.min(policy.delegation.max_depth);
        if policy.delegation.allowed && depth_left && from != self.site() {
            let delegated = self.delegate(from, &req).await;
            let _turn = self.quota_turn(from).await;
            let mut holding = self.holdings(from)?;
            for (partner, partner_offers) in delegated {
                let preferred = self.config.partner(&partner).is_some_and(|p| p.preferred);
                for mut offer in partner_offers {
                    let keep = match policy.expose {
                        Exposure::All => true,
                        Exposure::OnlyPreferred => preferred,
                        Exposure::OnlyLocal => false,
                    };
                    // A hidden offer's token is never named to anyone: no route is kept for
                    // it, and the partner that made it releases it at its expiry.
                    if !keep {
                        continue;
                    }
                    if !holding.room_for_delegated(self.admission().limits()) {
                        over_quota = Some("offers outstanding");
                        continue;
                    }
                    offer.expires_ms = offer.expires_ms.min(self.offer_deadline());
                    let next = NextHop::Site(partner.clone());
                    // A relaying site names its own proxy and token upstream, never the
                    // partner's.
                    let relay = self
                        .relays_for(from, &next)
                        .then(|| self.relay_offer(&mut offer));
                    self.put_destination_route(from, &req, &offer, next, relay)?;
                    holding.offers += 1;
                    offers.push(offer);
                }
            }
        }
        if let (true, Some(what)) = (offers.is_empty(), over_quota) {
            tracing::info!(migration.id = %req.migration_id, vm.id = %req.vm, partner = %from, "migration request refused by quota");
            return Err(quota(what));
        }
        tracing::info!(migration.id = %req.migration_id, vm.id = %req.vm, offers = offers.len(), "migration request answered");
        Ok(Offers {
            request_id: req.request_id,
            offers,
        })
    }

    /// What `partner` holds here now; nothing for this site itself, whose own requests are
    /// never limited.
    fn holdings(&self, partner: &SiteId) -> Result<Holdings, ErrorReply> {
        if partner == self.site() {
            return Ok(Holdings::default());
        }
        let routes = self.journal.routes_taken().map_err(internal)?;
        Ok(Holdings::of(partner, &routes))
    }

    /// `partner`'s quota turn (none for this site itself, which has no quota).
    async fn quota_turn(&self, partner: &SiteId) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        if partner == self.site() {
            None
        } else {
            Some(self.admission().lock(partner).await)
        }
    }

    /// The latest expiry of an offer made now.
    fn offer_deadline(&self) -> u64 {
        now_ms().saturating_add(self.admission().limits().offer_ttl_ms)
    }

    /// Releases a local offer kept back by a limit, unless another offer of the same VM on the
    /// same host shares its reservation (a host reserves once per VM).
    async fn give_back(&self, req: &MigrationRequest, host: &HostId, offer: &Offer) {
        let next = NextHop::Host(host.clone());
        let shared = self
            .journal
            .routes()
            .map(|rs| rs.iter().any(|r| r.vm == req.vm && r.next == next))
            .unwrap_or(true);
        if shared {
            return;
        }
        if let Err(e) = self
            .local
            .abort_destination(&req.vm, host, &offer.token)
            .await
        {
            tracing::warn!(vm.id = %req.vm, error = %e.message, "an offer kept back by a limit was not released");
        }
    }

    /// Journals where an offer's token leads, so that later operations naming it are forwarded
    /// (with `relay`, under the partner's own token).
    fn put_destination_route(
        &self,
        from: &SiteId,
        req: &MigrationRequest,
        offer: &Offer,
        next: NextHop,
        relay: Option<RouteRelay>,
    ) -> Result<(), ErrorReply> {
        self.journal
            .put_route(&Route {
                token: offer.token,
                migration_id: req.migration_id,
                vm: req.vm.clone(),
                side: RouteSide::Destination,
                next,
                upstream: from.clone(),
                descriptor: Some(req.descriptor.clone()),
                expires_ms: offer.expires_ms,
                relay,
                destination_committed: false,
            })
            .map_err(internal)
    }

    /// Sends the Migration request on to every delegation partner except `from`, in parallel.
    pub(crate) async fn delegate(
        &self,
        from: &SiteId,
        req: &MigrationRequest,
    ) -> Vec<(SiteId, Vec<Offer>)> {
        let targets: Vec<SiteId> = self
            .delegation_targets()
            .into_iter()
            .filter(|p| p != from && *p != req.descriptor.primary_site)
            .collect();
        let onward = MigrationRequest {
            depth: req.depth + 1,
            ..req.clone()
        };
        let calls = targets.iter().map(|p| {
            let onward = &onward;
            async move {
                let r: Result<Offers, _> = self
                    .peers
                    .call_with_timeout(
                        p,
                        FederationOp::MigrationRequest,
                        onward,
                        DELEGATION_TIMEOUT,
                    )
                    .await;
                (p.clone(), r)
            }
        });
        let mut out = Vec::new();
        for (p, r) in join_all(calls).await {
            match r {
                Ok(o) => out.push((p, o.offers)),
                Err(e) => tracing::info!(partner = %p, error = %e, "no offers from partner"),
            }
        }
        out
    }

    /// The partners this site may delegate to.
    pub(crate) fn delegation_targets(&self) -> Vec<SiteId> {
        let d = &self.config.policy.delegation;
        if d.partners.is_empty() {
            self.config
                .partners
                .iter()
                .map(|p| p.site.clone())
                .collect()
        } else {
            d.partners.clone()
        }
    }

    /// Takes up the offer of `route` for a transfer, once: it must not have expired, and
    /// `from` must have room for one more concurrent transfer. A taken offer no longer expires;
    /// repeating Initiate transfer on it (a progress poll) passes.
    async fn take_up(&self, from: &SiteId, route: &Route) -> Result<(), ErrorReply> {
        // The same turn as the expiry sweep's, so an offer is never taken and released at once.
        let _turn = self.admission().lock(&route.upstream).await;
        if self.journal.is_taken(&route.token).map_err(internal)? {
            return Ok(());
        }
        let now = now_ms();
        if route.expires_ms <= now {
            return Err(ErrorReply::new(
                ErrorCode::ExpiredToken,
                "the offer expired before a transfer was initiated",
            ));
        }
        if self.holdings(from)?.transfers >= self.admission().limits().concurrent_transfers {
            return Err(quota("concurrent transfers"));
        }
        self.journal.mark_taken(&route.token, now).map_err(internal)
    }

    /// The Initiate transfer handler (Destination), forwarded by Intermediaries by token. Only
    /// the site the offer was made to may use its token, and only for the offer's migration and
    /// VM.
    pub async fn initiate(
        &self,
        from: &SiteId,
        req: InitiateTransfer,
    ) -> Result<TransferStatusReply, ErrorReply> {
        let route = self.route(
            from,
            &req.destination.token,
            RouteSide::Destination,
            &req.migration_id,
            &req.vm,
        )?;
        self.take_up(from, &route).await?;
        // A relayed offer: this site's proxy fetches from the source and serves the next hop.
        let relayed;
        let r = if route.relay.is_some() {
            let (source, destination) = self
                .relaying_from(&route, &req.source, req.max_bytes_per_sec)
                .await?;
            relayed = InitiateTransfer {
                source,
                destination,
                ..req.clone()
            };
            &relayed
        } else {
            &req
        };
        let route_ref = &route;
        let reply = self
            .forward(
                &route.next,
                FederationOp::TransferInitiate,
                r,
                move |_| async move {
                    let status = self
                        .local
                        .initiate(
                            route_ref.migration_id,
                            &route_ref.vm,
                            &r.source,
                            &route_ref.token,
                            r.max_bytes_per_sec,
                        )
                        .await?;
                    Ok(TransferStatusReply {
                        migration_id: route_ref.migration_id,
                        status,
                    })
                },
            )
            .await?;
        tracing::debug!(migration.id = %req.migration_id, vm.id = %req.vm, "initiate transfer answered");
        Ok(reply)
    }
}
