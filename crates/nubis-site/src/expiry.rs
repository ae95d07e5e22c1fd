//! The expiry sweep: a destination offer that is never taken up (hidden by an Intermediary's
//! exposure policy, lost on the way, or left behind when the Controller fell back to another
//! offer) holds a reservation on a local host until its expiry, and no longer.
//!
//! The sweep reads the journal's routes, so it is idempotent and survives a restart: an offer
//! that expired while the daemon was down is released by the first sweep after start. A route
//! is forgotten only after its reservation is released; a release that fails is retried by the
//! next sweep.

use std::sync::Arc;
use std::time::Duration;

use nubis_protocol::envelope::now_ms;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::journal::{NextHop, Route, RouteSide};
use crate::local::LocalSite;
use crate::peers::Peers;
use crate::roles::Roles;

/// Whether `route` is a destination offer that expired at `now_ms` without being taken up.
fn expired(route: &Route, taken: bool, now_ms: u64) -> bool {
    route.side == RouteSide::Destination && !taken && route.expires_ms <= now_ms
}

impl<L: LocalSite, P: Peers> Roles<L, P> {
    /// Releases every destination offer that expired at `now_ms` without being taken up, and
    /// forgets its route; returns how many were released. An offer passed on from a partner is
    /// only forgotten: the partner that made it releases its own reservation at the same expiry.
    pub async fn sweep_expired(&self, now_ms: u64) -> usize {
        let routes = match self.journal().routes_taken() {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the routes to sweep");
                return 0;
            }
        };
        let mut released = 0;
        for (route, _) in routes.iter().filter(|(r, t)| expired(r, *t, now_ms)) {
            if self.release_expired(route, now_ms).await {
                released += 1;
            }
        }
        released
    }

    /// Releases one expired offer under its partner's turn (the one Initiate transfer takes, so
    /// an offer is never taken up and released at once); whether it was.
    async fn release_expired(&self, route: &Route, now_ms: u64) -> bool {
        let _turn = self.admission().lock(&route.upstream).await;
        let routes = match self.journal().routes_taken() {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the routes to sweep");
                return false;
            }
        };
        // Gone or taken up since the sweep began: nothing to release.
        if !routes
            .iter()
            .any(|(o, t)| o.token == route.token && expired(o, *t, now_ms))
        {
            return false;
        }
        // A host reserves once per VM: while another offer of the same VM on the same host is
        // alive, the reservation is still its.
        let shared = routes.iter().any(|(o, t)| {
            o.token != route.token
                && o.vm == route.vm
                && o.next == route.next
                && !expired(o, *t, now_ms)
        });
        if shared {
            return false;
        }
        if let NextHop::Host(host) = &route.next {
            // Never release the VM a host runs: an offer is not made on the VM's own host, so
            // a VM recorded there is a committed one.
            let runs_there = matches!(
                self.journal().vm(&route.vm),
                Ok(Some(r)) if r.downstream.as_ref() == Some(&route.next)
            );
            if !runs_there {
                if let Err(e) = self
                    .local()
                    .abort_destination(&route.vm, host, &route.token)
                    .await
                {
                    tracing::warn!(migration.id = %route.migration_id, vm.id = %route.vm, error = %e.message, "an expired offer was not released; retrying at the next sweep");
                    return false;
                }
            }
        }
        if let Err(e) = self.journal().remove_route(&route.token) {
            tracing::warn!(error = %e, "cannot forget an expired offer");
            return false;
        }
        tracing::info!(migration.id = %route.migration_id, vm.id = %route.vm, partner = %route.upstream, "expired offer released");
        true
    }
}

/// Starts the sweep on `tracker`: once at start (offers that expired while the site was down),
/// then every `interval` until `cancel`.
pub fn start<L: LocalSite, P: Peers>(
    roles: Arc<Roles<L, P>>,
    interval: Duration,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) {
    tracker.spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            let n = roles.sweep_expired(now_ms()).await;
            if n > 0 {
                tracing::info!(released = n, "expired offers released");
            }
        }
    });
}

#[cfg(test)]
mod tests;
