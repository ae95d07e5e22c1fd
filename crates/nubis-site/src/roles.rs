//! The paper's roles at one site (section III-C): the Migration request handler and the
//! Initiate transfer handler of a Destination, the Forced migration and Transfer verification
//! handlers of a Source, the hand-over (commit/abort), eviction notices, the Control interface —
//! and, for every one of them, the Intermediary's forwarding to the next hop.
//!
//! Operations that name a transfer token are routed by the token's [`Route`]; operations that
//! name a VM are routed by the VM's [`VmRecord`]. A site never learns more than the next hop.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use nubis_protocol::envelope::{now_ms, Opened};
use nubis_protocol::message::{
    AbortMigration, Aborted, CommitMigration, Committed, ControlReply, ControlRequest, ErrorCode,
    ErrorReply, EvictionAccepted, EvictionNotice, HandOverSide, InitiateTransfer, MigrationRequest,
    Offer, Offers, PrepareMigration, Prepared, TransferStatusReply, TransferVerification,
};
use nubis_protocol::subject::FederationOp;
use nubis_protocol::SiteId;

use crate::config::{Exposure, SiteConfig};
use crate::federation::{sign_reply, FederationClient, HandlerResult};
use crate::journal::{Journal, NextHop, Route, RouteSide, VmPhase, VmRecord};
use crate::local::LocalSite;

/// How long a destination offer stays reserved if nobody initiates a transfer on it.
pub const OFFER_TTL_MS: u64 = 10 * 60 * 1000;

/// How long a delegated Migration request may take at the next site.
const DELEGATION_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything a role handler needs.
#[derive(Debug)]
pub struct Roles<L> {
    /// The site's configuration (policies, partners).
    pub config: Arc<SiteConfig>,
    /// The crash-safe journal.
    pub journal: Journal,
    /// Signed requests to partners.
    pub fed: FederationClient,
    /// The site's own hosts and proxy.
    pub local: L,
    /// Migrations an operator asked to cancel.
    pub cancelled: std::sync::Mutex<std::collections::HashSet<nubis_protocol::MigrationId>>,
    /// Slots for migrations this site runs as Controller at the same time; the rest queue.
    pub slots: Arc<tokio::sync::Semaphore>,
}

pub(crate) fn internal(e: impl std::fmt::Display) -> ErrorReply {
    ErrorReply::new(ErrorCode::Internal, e.to_string())
}

fn malformed(e: impl std::fmt::Display) -> ErrorReply {
    ErrorReply::new(ErrorCode::Malformed, e.to_string())
}

impl<L: LocalSite> Roles<L> {
    /// Roles over `journal`, `fed` and `local` with `config`'s policies.
    pub fn new(config: Arc<SiteConfig>, journal: Journal, fed: FederationClient, local: L) -> Self {
        let slots = Arc::new(tokio::sync::Semaphore::new(
            config.max_concurrent_migrations,
        ));
        Self {
            slots,
            config,
            journal,
            fed,
            local,
            cancelled: Default::default(),
        }
    }

    /// This site.
    pub fn site(&self) -> &SiteId {
        &self.config.site
    }

    /// Dispatches a verified federation request to its role and signs the answer.
    pub async fn handle(self: Arc<Self>, op: FederationOp, request: Opened) -> HandlerResult {
        let from = request.from.clone();
        macro_rules! run {
            ($body:ty, $method:ident) => {{
                let body: $body = request.body().map_err(malformed)?;
                let reply = self.$method(&from, body).await?;
                sign_reply(&self.config.identity, &request, &reply).map_err(internal)
            }};
        }
        match op {
            FederationOp::MigrationRequest => run!(MigrationRequest, migration_request),
            FederationOp::MigrationPrepare => run!(PrepareMigration, prepare),
            FederationOp::MigrationEvict => run!(EvictionNotice, eviction),
            FederationOp::MigrationCommit => run!(CommitMigration, commit),
            FederationOp::MigrationAbort => run!(AbortMigration, abort),
            FederationOp::TransferInitiate => run!(InitiateTransfer, initiate),
            FederationOp::TransferVerify => run!(TransferVerification, verify),
            FederationOp::VmControl => run!(ControlRequest, control),
        }
    }

    fn vm_record(&self, vm: &nubis_protocol::VmId) -> Result<VmRecord, ErrorReply> {
        self.journal.vm(vm).map_err(internal)?.ok_or_else(|| {
            ErrorReply::new(
                ErrorCode::UnknownVm,
                format!("VM {vm} is not known at this site"),
            )
        })
    }

    fn route(
        &self,
        token: &nubis_protocol::message::TransferToken,
        side: RouteSide,
    ) -> Result<Route, ErrorReply> {
        match self.journal.route(token).map_err(internal)? {
            Some(r) if r.side == side => Ok(r),
            _ => Err(ErrorReply::new(
                ErrorCode::UnknownToken,
                "no transfer with this token passes through this site",
            )),
        }
    }

    /// Checks that `from` may act on `vm` here: its upstream, or this site itself.
    fn check_upstream(&self, from: &SiteId, record: &VmRecord) -> Result<(), ErrorReply> {
        if from == self.site() || record.upstream.as_ref() == Some(from) {
            Ok(())
        } else {
            Err(ErrorReply::new(
                ErrorCode::Refused,
                format!("site {from} did not delegate VM {} to this site", record.vm),
            ))
        }
    }

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
        if !self
            .journal
            .first_sight(&req.request_id, now_ms())
            .map_err(internal)?
        {
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
        if req.descriptor.primary_site != *self.site() && !policy.accept_foreign {
            return Err(ErrorReply::new(
                ErrorCode::Refused,
                "this site does not accept foreign VMs",
            ));
        }
        req.descriptor.validate().map_err(malformed)?;

        // Step 2: local hosts, except the one the VM already runs on (a local migration).
        let current_host = match self.journal.vm(&req.vm).map_err(internal)? {
            Some(VmRecord {
                downstream: Some(NextHop::Host(h)),
                ..
            }) => Some(h),
            _ => None,
        };
        let mut offers: Vec<(Offer, bool)> = Vec::new();
        if from == self.site()
            || policy.accept_foreign
            || req.descriptor.primary_site == *self.site()
        {
            match self
                .local
                .local_offers(req.migration_id, &req.descriptor, current_host.as_ref())
                .await
            {
                Ok(local) => {
                    for (host, mut offer) in local {
                        offer.terms.depth = req.depth;
                        self.journal
                            .put_route(&Route {
                                token: offer.token,
                                migration_id: req.migration_id,
                                vm: req.vm.clone(),
                                side: RouteSide::Destination,
                                next: NextHop::Host(host),
                                upstream: from.clone(),
                                descriptor: Some(req.descriptor.clone()),
                                expires_ms: offer.expires_ms,
                            })
                            .map_err(internal)?;
                        offers.push((offer, true));
                    }
                }
                Err(e) => tracing::info!(code = e.code.as_str(), "no local offer: {}", e.message),
            }
        }

        // Step 3: delegation to partners, acting as Controller for step 2.
        let depth_left = req.depth < req.max_depth.min(policy.delegation.max_depth);
        if policy.delegation.allowed && depth_left && from != self.site() {
            let delegated = self.delegate(from, &req).await;
            for (partner, partner_offers) in delegated {
                let preferred = self.config.partner(&partner).is_some_and(|p| p.preferred);
                for offer in partner_offers {
                    self.journal
                        .put_route(&Route {
                            token: offer.token,
                            migration_id: req.migration_id,
                            vm: req.vm.clone(),
                            side: RouteSide::Destination,
                            next: NextHop::Site(partner.clone()),
                            upstream: from.clone(),
                            descriptor: Some(req.descriptor.clone()),
                            expires_ms: offer.expires_ms,
                        })
                        .map_err(internal)?;
                    let keep = match policy.expose {
                        Exposure::All => true,
                        Exposure::OnlyPreferred => preferred,
                        Exposure::OnlyLocal => false,
                    };
                    if keep {
                        offers.push((offer, false));
                    }
                }
            }
        }
        tracing::info!(migration.id = %req.migration_id, vm.id = %req.vm, offers = offers.len(), "migration request answered");
        Ok(Offers {
            request_id: req.request_id,
            offers: offers.into_iter().map(|(o, _)| o).collect(),
        })
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
                    .fed
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

    /// The Forced migration handler (Source), forwarded down the chain by Intermediaries.
    pub async fn prepare(
        &self,
        from: &SiteId,
        req: PrepareMigration,
    ) -> Result<Prepared, ErrorReply> {
        let record = self.vm_record(&req.vm)?;
        self.check_upstream(from, &record)?;
        let (prepared, next) = match &record.downstream {
            Some(NextHop::Host(h)) => {
                let p = self
                    .local
                    .prepare_source(req.migration_id, &req.vm, h, req.mode)
                    .await?;
                (
                    Prepared {
                        migration_id: req.migration_id,
                        source: p.endpoint,
                        total_bytes: p.total_bytes,
                    },
                    NextHop::Host(h.clone()),
                )
            }
            Some(NextHop::Site(s)) => {
                let p: Prepared = self
                    .fed
                    .call(s, FederationOp::MigrationPrepare, &req)
                    .await
                    .map_err(|e| e.to_reply())?;
                (p, NextHop::Site(s.clone()))
            }
            None => return Err(ErrorReply::new(ErrorCode::UnknownVm, "VM is not placed")),
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
            })
            .map_err(internal)?;
        tracing::info!(migration.id = %req.migration_id, vm.id = %req.vm, "forced migration answered");
        Ok(prepared)
    }

    /// The Initiate transfer handler (Destination), forwarded by Intermediaries by token.
    pub async fn initiate(
        &self,
        _from: &SiteId,
        req: InitiateTransfer,
    ) -> Result<TransferStatusReply, ErrorReply> {
        let route = self.route(&req.destination.token, RouteSide::Destination)?;
        let reply = match &route.next {
            NextHop::Host(_) => {
                let status = self
                    .local
                    .initiate(
                        req.migration_id,
                        &req.vm,
                        &req.source,
                        &req.destination.token,
                        req.max_bytes_per_sec,
                    )
                    .await?;
                TransferStatusReply {
                    migration_id: req.migration_id,
                    status,
                }
            }
            NextHop::Site(s) => self
                .fed
                .call(s, FederationOp::TransferInitiate, &req)
                .await
                .map_err(|e| e.to_reply())?,
        };
        tracing::debug!(migration.id = %req.migration_id, vm.id = %req.vm, "initiate transfer answered");
        Ok(reply)
    }

    /// The Transfer verification handler (Source), forwarded by Intermediaries by token.
    pub async fn verify(
        &self,
        _from: &SiteId,
        req: TransferVerification,
    ) -> Result<TransferStatusReply, ErrorReply> {
        let route = self.route(&req.source.token, RouteSide::Source)?;
        let reply = match &route.next {
            NextHop::Host(_) => TransferStatusReply {
                migration_id: req.migration_id,
                status: self
                    .local
                    .verify(req.migration_id, &req.source.token)
                    .await?,
            },
            NextHop::Site(s) => self
                .fed
                .call(s, FederationOp::TransferVerify, &req)
                .await
                .map_err(|e| e.to_reply())?,
        };
        tracing::debug!(migration.id = %req.migration_id, vm.id = %req.vm, "transfer verification answered");
        Ok(reply)
    }

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
        let side = match req.side {
            HandOverSide::Destination => RouteSide::Destination,
            HandOverSide::Source => RouteSide::Source,
        };
        let route = match self.journal.route(&req.endpoint.token).map_err(internal)? {
            Some(r) if r.side == side => r,
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
                match &route.next {
                    NextHop::Host(h) => {
                        self.local
                            .commit_destination(&descriptor, h, &req.endpoint.token)
                            .await?;
                    }
                    NextHop::Site(s) => {
                        let _: Committed = self
                            .fed
                            .call(s, FederationOp::MigrationCommit, &req)
                            .await
                            .map_err(|e| e.to_reply())?;
                    }
                }
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
                match &route.next {
                    NextHop::Host(h) => {
                        self.local
                            .commit_source(&req.vm, Some(h), &req.endpoint.token)
                            .await?
                    }
                    NextHop::Site(s) => {
                        let _: Committed = self
                            .fed
                            .call(s, FederationOp::MigrationCommit, &req)
                            .await
                            .map_err(|e| e.to_reply())?;
                    }
                }
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
        let side = match req.side {
            HandOverSide::Destination => RouteSide::Destination,
            HandOverSide::Source => RouteSide::Source,
        };
        let Some(route) = self.journal.route(&req.endpoint.token).map_err(internal)? else {
            return Ok(done);
        };
        if route.side != side {
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
        match (&route.next, req.side) {
            (NextHop::Host(h), HandOverSide::Destination) => {
                self.local
                    .abort_destination(&req.vm, h, &req.endpoint.token)
                    .await?
            }
            (NextHop::Host(h), HandOverSide::Source) => {
                self.local
                    .abort_source(&req.vm, Some(h), &req.endpoint.token)
                    .await?
            }
            (NextHop::Site(s), _) => {
                let _: Aborted = self
                    .fed
                    .call(s, FederationOp::MigrationAbort, &req)
                    .await
                    .map_err(|e| e.to_reply())?;
            }
        }
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

    /// Eviction notice from the downstream site (Forced migration up the chain): accepted and
    /// acted upon by starting a migration with this site as Controller.
    pub async fn eviction(
        &self,
        from: &SiteId,
        notice: EvictionNotice,
    ) -> Result<EvictionAccepted, ErrorReply> {
        let record = self.vm_record(&notice.vm)?;
        if record.downstream != Some(NextHop::Site(from.clone())) {
            return Err(ErrorReply::new(
                ErrorCode::Refused,
                format!("VM {} is not delegated to site {from}", notice.vm),
            ));
        }
        self.journal.put_eviction(&notice, from).map_err(internal)?;
        Ok(EvictionAccepted {
            notice_id: notice.notice_id,
            vm: notice.vm,
        })
    }

    /// The Control interface, forwarded down the chain to the host that runs the VM.
    pub async fn control(
        &self,
        from: &SiteId,
        req: ControlRequest,
    ) -> Result<ControlReply, ErrorReply> {
        let mut record = self.vm_record(&req.vm)?;
        self.check_upstream(from, &record)?;
        let reply = match &record.downstream {
            Some(NextHop::Host(h)) => {
                self.local
                    .control(&record.descriptor, h, &req.change)
                    .await?
            }
            Some(NextHop::Site(s)) => self
                .fed
                .call(s, FederationOp::VmControl, &req)
                .await
                .map_err(|e| e.to_reply())?,
            None => return Err(ErrorReply::new(ErrorCode::UnknownVm, "VM is not placed")),
        };
        // Every site on the chain keeps the current descriptor.
        match &req.change {
            nubis_protocol::message::ControlChange::UpdateDescriptor { descriptor } => {
                record.descriptor = (**descriptor).clone();
                self.journal.put_vm(&record).map_err(internal)?;
            }
            nubis_protocol::message::ControlChange::SetMonitoring { monitoring } => {
                record.descriptor.monitoring = monitoring.clone();
                record.descriptor.version =
                    reply.descriptor_version.max(record.descriptor.version + 1);
                self.journal.put_vm(&record).map_err(internal)?;
            }
            _ => {}
        }
        Ok(reply)
    }
}
