//! The Source's handlers (section III-C.2): the Forced migration handler (prepare), forwarded
//! down the VM's chain, and the Transfer verification handler, forwarded by token.

use nubis_protocol::envelope::now_ms;
use nubis_protocol::message::{
    AbortMigration, Aborted, Endpoint, ErrorCode, ErrorReply, HandOverSide, PrepareMigration,
    Prepared, TransferStatusReply, TransferVerification,
};
use nubis_protocol::subject::FederationOp;
use nubis_protocol::SiteId;

use crate::journal::{NextHop, Route, RouteSide};
use crate::local::LocalSite;
use crate::peers::Peers;

use super::{internal, Roles, OFFER_TTL_MS};

impl<L: LocalSite, P: Peers> Roles<L, P> {
    /// The Forced migration handler (Source), forwarded down the chain by Intermediaries.
    pub async fn prepare(
        &self,
        from: &SiteId,
        req: PrepareMigration,
    ) -> Result<Prepared, ErrorReply> {
        let record = self.vm_record(&req.vm)?;
        self.check_upstream(from, &record)?;
        let Some(next) = record.downstream else {
            return Err(ErrorReply::new(ErrorCode::UnknownVm, "VM is not placed"));
        };
        let r = &req;
        let mut prepared: Prepared = self
            .forward(
                &next,
                FederationOp::MigrationPrepare,
                r,
                move |h| async move {
                    let p = self
                        .local
                        .prepare_source(r.migration_id, &r.vm, &h, r.mode)
                        .await?;
                    Ok(Prepared {
                        migration_id: r.migration_id,
                        source: p.endpoint,
                        total_bytes: p.total_bytes,
                    })
                },
            )
            .await?;
        // A relaying site passes its own relaying token upstream, never the partner's.
        let relay = if self.relays_for(from, &next) {
            let downstream = prepared.source.clone();
            match self
                .relay_prepared(
                    req.migration_id,
                    &req.vm,
                    &downstream,
                    req.max_bytes_per_sec,
                )
                .await
            {
                Ok(relay) => {
                    if let Some(r) = &relay.relaying {
                        prepared.source = r.endpoint.clone();
                    }
                    Some(relay)
                }
                Err(e) => {
                    self.unprepare(&next, &req, downstream).await;
                    return Err(e);
                }
            }
        } else {
            None
        };
        self.journal
            .put_route(&Route {
                token: prepared.source.token,
                migration_id: req.migration_id,
                vm: req.vm.clone(),
                side: RouteSide::Source,
                next,
                upstream: from.clone(),
                descriptor: None,
                expires_ms: now_ms() + OFFER_TTL_MS,
                relay,
                destination_committed: false,
            })
            .map_err(internal)?;
        tracing::info!(migration.id = %req.migration_id, vm.id = %req.vm, "forced migration answered");
        Ok(prepared)
    }

    /// The Transfer verification handler (Source), forwarded by Intermediaries by token. Only
    /// the site that asked for the prepare may use its token, and only for its migration and VM.
    pub async fn verify(
        &self,
        from: &SiteId,
        req: TransferVerification,
    ) -> Result<TransferStatusReply, ErrorReply> {
        let route = self.route(
            from,
            &req.source.token,
            RouteSide::Source,
            &req.migration_id,
            &req.vm,
        )?;
        // A relayed source: this site's proxy serves it, and its relaying token turns succeeded
        // only once both the far end and the source confirmed the digests.
        if let Some(relaying) = route.relay.as_ref().and_then(|r| r.relaying.as_ref()) {
            return Ok(TransferStatusReply {
                migration_id: route.migration_id,
                status: self
                    .local
                    .verify(route.migration_id, &relaying.endpoint.token)
                    .await?,
            });
        }
        let (r, route_ref) = (&req, &route);
        let reply = self
            .forward(
                &route.next,
                FederationOp::TransferVerify,
                r,
                move |_| async move {
                    Ok(TransferStatusReply {
                        migration_id: route_ref.migration_id,
                        status: self
                            .local
                            .verify(route_ref.migration_id, &route_ref.token)
                            .await?,
                    })
                },
            )
            .await?;
        tracing::debug!(migration.id = %req.migration_id, vm.id = %req.vm, "transfer verification answered");
        Ok(reply)
    }

    /// A prepared source that cannot be relayed is not passed upstream in the clear: the next
    /// hop is asked to resume the VM.
    async fn unprepare(&self, next: &NextHop, req: &PrepareMigration, endpoint: Endpoint) {
        let abort = AbortMigration {
            migration_id: req.migration_id,
            vm: req.vm.clone(),
            side: HandOverSide::Source,
            endpoint,
            reason: "the source could not be relayed".into(),
        };
        let aborted: Result<Aborted, ErrorReply> = self
            .forward(next, FederationOp::MigrationAbort, &abort, |_| async {
                Err(internal("a relayed source has no local host"))
            })
            .await;
        if let Err(e) = aborted {
            tracing::warn!(migration.id = %req.migration_id, vm.id = %req.vm, error = %e.message, "a prepared source that could not be relayed was not resumed");
        }
    }
}
