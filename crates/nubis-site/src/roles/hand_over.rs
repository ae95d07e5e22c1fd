//! The hand-over at either end of a transfer (the step the paper leaves implicit): commit, by
//! which the destination chain takes over responsibility for the VM and the source chain lets
//! go of it, and abort, by which the destination discards and the source resumes. Both are
//! forwarded by token and idempotent.

use nubis_protocol::message::{
    AbortMigration, Aborted, CommitMigration, Committed, ErrorCode, ErrorReply, HandOverSide,
};
use nubis_protocol::subject::FederationOp;
use nubis_protocol::SiteId;

use crate::journal::{RouteSide, VmPhase, VmRecord};
use crate::local::LocalSite;
use crate::peers::Peers;

use super::{internal, Roles};

fn route_side(side: HandOverSide) -> RouteSide {
    match side {
        HandOverSide::Destination => RouteSide::Destination,
        HandOverSide::Source => RouteSide::Source,
    }
}

impl<L: LocalSite, P: Peers> Roles<L, P> {
    /// Commit at one end: the destination chain takes over responsibility for the VM, the
    /// source chain lets go of it. Idempotent: a repeated commit finds no route and succeeds if
    /// the record already reflects it.
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
                // Already committed (a retry after a lost reply) when the record says so.
                let record = self.journal.vm(&req.vm).map_err(internal)?;
                let already = match req.side {
                    HandOverSide::Destination => record.is_some_and(|r| r.phase == VmPhase::Placed),
                    // The route goes only after the release is done; an Intermediary on both
                    // chains keeps its (re-pointed) record.
                    HandOverSide::Source => record.is_none_or(|r| r.phase == VmPhase::Placed),
                };
                return if already {
                    Ok(done)
                } else {
                    Err(ErrorReply::new(
                        ErrorCode::UnknownToken,
                        "no transfer with this token passes through this site",
                    ))
                };
            }
        };
        if &route.upstream != from && from != self.site() {
            return Err(ErrorReply::new(
                ErrorCode::Refused,
                "commit from a site that is not on this transfer's path",
            ));
        }
        match req.side {
            HandOverSide::Destination => {
                let descriptor = route
                    .descriptor
                    .clone()
                    .ok_or_else(|| internal("destination route without descriptor"))?;
                let (r, d, descriptor_ref) = (&req, &done, &descriptor);
                let _: Committed = self
                    .forward(
                        &route.next,
                        FederationOp::MigrationCommit,
                        r,
                        move |h| async move {
                            self.local
                                .commit_destination(descriptor_ref, &h, &r.endpoint.token)
                                .await?;
                            Ok(d.clone())
                        },
                    )
                    .await?;
                tracing::info!(migration.id = %req.migration_id, vm.id = %req.vm, "destination commit applied");
                let previous = self.journal.vm(&req.vm).map_err(internal)?;
                let upstream = if route.upstream == *self.site() {
                    previous.as_ref().and_then(|r| r.upstream.clone())
                } else {
                    Some(route.upstream.clone())
                };
                self.journal
                    .put_vm(&VmRecord {
                        vm: req.vm.clone(),
                        primary: descriptor.primary_site.clone(),
                        upstream,
                        downstream: Some(route.next.clone()),
                        descriptor,
                        phase: VmPhase::Placed,
                    })
                    .map_err(internal)?;
            }
            HandOverSide::Source => {
                let (r, d) = (&req, &done);
                let _: Committed = self
                    .forward(
                        &route.next,
                        FederationOp::MigrationCommit,
                        r,
                        move |h| async move {
                            self.local
                                .commit_source(&r.vm, Some(&h), &r.endpoint.token)
                                .await?;
                            Ok(d.clone())
                        },
                    )
                    .await?;
                tracing::info!(migration.id = %req.migration_id, vm.id = %req.vm, "source commit applied");
                // Leave the chain unless the destination commit already re-pointed this site.
                if let Some(record) = self.journal.vm(&req.vm).map_err(internal)? {
                    if record.downstream.as_ref() == Some(&route.next) {
                        self.journal.remove_vm(&req.vm).map_err(internal)?;
                    }
                }
            }
        }
        self.journal
            .remove_route(&req.endpoint.token)
            .map_err(internal)?;
        Ok(done)
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
        if &route.upstream != from && from != self.site() {
            return Err(ErrorReply::new(
                ErrorCode::Refused,
                "abort from a site that is not on this transfer's path",
            ));
        }
        let (r, d) = (&req, &done);
        let _: Aborted = self
            .forward(
                &route.next,
                FederationOp::MigrationAbort,
                r,
                move |h| async move {
                    match r.side {
                        HandOverSide::Destination => {
                            self.local
                                .abort_destination(&r.vm, &h, &r.endpoint.token)
                                .await?
                        }
                        HandOverSide::Source => {
                            self.local
                                .abort_source(&r.vm, Some(&h), &r.endpoint.token)
                                .await?
                        }
                    }
                    Ok(d.clone())
                },
            )
            .await?;
        tracing::info!(migration.id = %req.migration_id, vm.id = %req.vm, side = ?req.side, "abort applied");
        if req.side == HandOverSide::Source {
            if let Some(mut record) = self.journal.vm(&req.vm).map_err(internal)? {
                record.phase = VmPhase::Placed;
                self.journal.put_vm(&record).map_err(internal)?;
            }
        }
        self.journal
            .remove_route(&req.endpoint.token)
            .map_err(internal)?;
        Ok(done)
    }
}
