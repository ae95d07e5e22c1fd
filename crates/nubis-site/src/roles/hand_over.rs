//! The hand-over at either end of a transfer (the step the paper leaves implicit): commit, by
//! which the destination chain takes over responsibility for the VM and the source chain lets
//! go of it, and abort, by which the destination discards and the source resumes. Both are
//! forwarded by token and idempotent.

use nubis_protocol::descriptor::VmDescriptor;
use nubis_protocol::message::{
    AbortMigration, Aborted, CommitMigration, Committed, ErrorCode, ErrorReply, HandOverSide,
};
use nubis_protocol::subject::FederationOp;
use nubis_protocol::SiteId;

use crate::journal::{NextHop, Route, RouteSide, VmPhase, VmRecord};
use crate::local::LocalSite;
use crate::peers::Peers;

use super::{check_route, internal, unknown_token, Roles};

fn route_side(side: HandOverSide) -> RouteSide {
    match side {
        HandOverSide::Destination => RouteSide::Destination,
        HandOverSide::Source => RouteSide::Source,
    }
}

impl<L: LocalSite, P: Peers> Roles<L, P> {
    /// Commit at one end: the destination chain takes over responsibility for the VM, the
    /// source chain lets go of it. Only the site the route was opened for may commit, and only
    /// the route's migration of the route's VM. Idempotent: a repeated commit finds no route and
    /// succeeds if the record already reflects it.
    pub async fn commit(
        &self,
        from: &SiteId,
        req: CommitMigration,
    ) -> Result<Committed, ErrorReply> {
        let done = Committed {
            migration_id: req.migration_id,
            side: req.side,
        };
        let route = match self.journal.route(&req.endpoint.token).map_err(internal)? {
            Some(r) if r.side == route_side(req.side) => r,
            _ => {
                // Already committed (a retry after a lost reply) when the record says so. Only
                // the VM's upstream learns anything from the answer.
                let record = self
                    .journal
                    .vm(&req.vm)
                    .map_err(internal)?
                    .filter(|r| from == self.site() || r.upstream.as_ref() == Some(from));
                let already = match req.side {
                    HandOverSide::Destination => record.is_some_and(|r| r.phase == VmPhase::Placed),
                    // The route goes only after the release is done; an Intermediary on both
                    // chains keeps its (re-pointed) record.
                    HandOverSide::Source => record.is_none_or(|r| r.phase == VmPhase::Placed),
                };
                return if already {
                    Ok(done)
                } else {
                    Err(unknown_token())
                };
            }
        };
        check_route(&route, from, &req.migration_id, &req.vm)?;
        // A relayed route goes on downstream under the next hop's own token.
        let req = CommitMigration {
            endpoint: Self::downstream_endpoint(&route, &req.endpoint),
            ..req
        };
        match req.side {
            HandOverSide::Destination => {
                let descriptor = route
                    .descriptor
                    .clone()
                    .ok_or_else(|| internal("destination route without descriptor"))?;
                let previous = self.journal.vm(&route.vm).map_err(internal)?;
                if let Some(p) = &previous {
                    self.check_take_over(&route, p, &descriptor)?;
                }
                let (r, d, descriptor_ref, route_ref) = (&req, &done, &descriptor, &route);
                let _: Committed = self
                    .forward(
                        &route.next,
                        FederationOp::MigrationCommit,
                        r,
                        move |h| async move {
                            self.local
                                .commit_destination(descriptor_ref, &h, &route_ref.token)
                                .await?;
                            Ok(d.clone())
                        },
                    )
                    .await?;
                tracing::info!(migration.id = %route.migration_id, vm.id = %route.vm, "destination commit applied");
                let upstream = if route.upstream == *self.site() {
                    previous.as_ref().and_then(|r| r.upstream.clone())
                } else {
                    Some(route.upstream.clone())
                };
                // A partner that held the VM before keeps passing up what it stored then.
                let record = VmRecord {
                    vm: route.vm.clone(),
                    primary: descriptor.primary_site.clone(),
                    upstream,
                    downstream: previous.as_ref().and_then(|r| r.downstream.clone()),
                    former_downstream: previous.as_ref().and_then(|r| r.former_downstream.clone()),
                    descriptor,
                    phase: VmPhase::Placed,
                }
                .repointed(route.next.clone(), nubis_protocol::envelope::now_ms());
                self.journal.put_vm(&record).map_err(internal)?;
                self.keep_for_source_commit(&route)?;
            }
            HandOverSide::Source => {
                let (r, d, route_ref) = (&req, &done, &route);
                let _: Committed = self
                    .forward(
                        &route.next,
                        FederationOp::MigrationCommit,
                        r,
                        move |h| async move {
                            self.local
                                .commit_source(&route_ref.vm, Some(&h), &route_ref.token)
                                .await?;
                            Ok(d.clone())
                        },
                    )
                    .await?;
                tracing::info!(migration.id = %route.migration_id, vm.id = %route.vm, "source commit applied");
                // Leave the chain unless the destination commit already re-pointed this site
                // (possibly to the same next hop: a move between two places beyond it).
                if let Some(record) = self.journal.vm(&route.vm).map_err(internal)? {
                    if !route.destination_committed
                        && record.downstream.as_ref() == Some(&route.next)
                    {
                        self.journal.remove_vm(&route.vm).map_err(internal)?;
                    }
                }
            }
        }
        self.release_relaying(&route, true, req.side).await;
        self.journal.remove_route(&route.token).map_err(internal)?;
        Ok(done)
    }

    /// After the destination commit of `route`: the source routes of the same migration here
    /// are marked, so that their commit keeps the record this commit re-pointed.
    fn keep_for_source_commit(&self, route: &Route) -> Result<(), ErrorReply> {
        let routes = self.journal.routes().map_err(internal)?;
        for mut r in routes {
            if r.side == RouteSide::Source
                && r.migration_id == route.migration_id
                && r.vm == route.vm
                && !r.destination_committed
            {
                r.destination_committed = true;
                self.journal.put_route(&r).map_err(internal)?;
            }
        }
        Ok(())
    }

    /// Checks that committing `route` may replace `previous`, this site's record of the same
    /// VM: only a migration asked for by the VM's own upstream (or by this site) moves a VM the
    /// site already holds, and never under another primary. A VM id is chosen by its primary,
    /// so a partner's offer for an id that meanwhile came to be held here for someone else must
    /// not take it over.
    fn check_take_over(
        &self,
        route: &Route,
        previous: &VmRecord,
        descriptor: &VmDescriptor,
    ) -> Result<(), ErrorReply> {
        let upstream_ok =
            route.upstream == *self.site() || previous.upstream.as_ref() == Some(&route.upstream);
        if upstream_ok && previous.primary == descriptor.primary_site {
            Ok(())
        } else {
            Err(ErrorReply::new(
                ErrorCode::Conflict,
                format!("VM {} is held here for another site", route.vm),
            ))
        }
    }

    /// Abort at one end: the destination discards, the source resumes. Idempotent.
    pub async fn abort(&self, from: &SiteId, req: AbortMigration) -> Result<Aborted, ErrorReply> {
        let done = Aborted {
            migration_id: req.migration_id,
            side: req.side,
        };
        let Some(route) = self.journal.route(&req.endpoint.token).map_err(internal)? else {
            return Ok(done);
        };
        if route.side != route_side(req.side) {
            return Err(ErrorReply::new(
                ErrorCode::UnknownToken,
                "token belongs to the other end",
            ));
        }
        check_route(&route, from, &req.migration_id, &req.vm)?;
        let record = self.journal.vm(&route.vm).map_err(internal)?;
        if req.side == HandOverSide::Destination
            && matches!(route.next, NextHop::Host(_))
            && record.as_ref().and_then(|r| r.downstream.as_ref()) == Some(&route.next)
        {
            // An offer is never made on the host the VM runs on, so the VM there is the
            // committed one: discarding it would destroy a running VM.
            return Err(ErrorReply::new(
                ErrorCode::Conflict,
                format!("VM {} already runs where this offer was made", route.vm),
            ));
        }
        let req = AbortMigration {
            endpoint: Self::downstream_endpoint(&route, &req.endpoint),
            ..req
        };
        let (r, d, route_ref) = (&req, &done, &route);
        let _: Aborted = self
            .forward(
                &route.next,
                FederationOp::MigrationAbort,
                r,
                move |h| async move {
                    match route_ref.side {
                        RouteSide::Destination => {
                            self.local
                                .abort_destination(&route_ref.vm, &h, &route_ref.token)
                                .await?
                        }
                        RouteSide::Source => {
                            self.local
                                .abort_source(&route_ref.vm, Some(&h), &route_ref.token)
                                .await?
                        }
                    }
                    Ok(d.clone())
                },
            )
            .await?;
        tracing::info!(migration.id = %route.migration_id, vm.id = %route.vm, side = ?req.side, "abort applied");
        self.release_relaying(&route, false, req.side).await;
        if route.side == RouteSide::Source {
            if let Some(mut record) = self.journal.vm(&route.vm).map_err(internal)? {
                record.phase = VmPhase::Placed;
                self.journal.put_vm(&record).map_err(internal)?;
            }
        }
        self.journal.remove_route(&route.token).map_err(internal)?;
        Ok(done)
    }
}
