//! The protocol steps the Controller's state machine takes: Migration requests and ranking
//! (steps 1–3), Forced migration at the Source (step 4), Initiate transfer and Transfer
//! verification until both ends agree (steps 5–7), commit and abort at either end. Every
//! request goes to the next hop only, through [`Roles::forward`].

use std::time::Duration;

use futures::future::join_all;
use nubis_bus::call::{backoff_cap, full_jitter};
use nubis_protocol::message::{
    AbortMigration, Aborted, CommitMigration, Committed, Endpoint, ErrorCode, ErrorReply,
    HandOverSide, InitiateTransfer, MigrationRequest, Offers, PrepareMigration, PrepareMode,
    Prepared, TransferStatus, TransferStatusReply, TransferVerification,
};
use nubis_protocol::subject::FederationOp;
use nubis_protocol::{MigrationId, RequestId, SiteId, VmId};
use tokio::time::Instant;

use crate::federation::CallError;
use crate::journal::{MigrationRecord, NextHop, RankedOffer, VmPhase, VmRecord};
use crate::local::LocalSite;
use crate::peers::Peers;
use crate::roles::{internal, Roles};

use super::{
    uncertain, Trigger, MAX_FAILED_ROUNDS, SETTLE_LIMIT, STALL_LIMIT, UNREACHABLE_BACKOFF,
    UNREACHABLE_BACKOFF_MAX, UNREACHABLE_LIMIT,
};

/// The pause before try number `tries + 1` of a step that found a peer silent, `waited` into
/// the wait: full jitter under a cap that doubles per try, never past [`UNREACHABLE_LIMIT`].
fn pause_for_peers(tries: u32, waited: Duration) -> Duration {
    full_jitter(backoff_cap(
        UNREACHABLE_BACKOFF,
        UNREACHABLE_BACKOFF_MAX,
        tries,
    ))
    .min(UNREACHABLE_LIMIT.saturating_sub(waited))
}

/// Why a Forced migration (prepare) failed.
pub(super) struct PrepareFailure {
    pub(super) reply: ErrorReply,
    /// The request reached a handler (or may have): the source may have stopped the VM.
    pub(super) maybe_prepared: bool,
}

impl From<ErrorReply> for PrepareFailure {
    fn from(reply: ErrorReply) -> Self {
        let maybe_prepared = uncertain(&reply);
        Self {
            reply,
            maybe_prepared,
        }
    }
}

impl From<CallError> for PrepareFailure {
    fn from(e: CallError) -> Self {
        let reply = e.to_reply();
        Self {
            // Nobody listened: the request reached no handler, nothing stopped.
            maybe_prepared: !matches!(e, CallError::Unreachable { .. }) && uncertain(&reply),
            reply,
        }
    }
}

/// The error of a transfer round in which a peer had no responder and nothing else went
/// wrong: no other error, no failed status.
fn unreachable_only(round: [&Result<TransferStatus, ErrorReply>; 2]) -> Option<&ErrorReply> {
    let mut found = None;
    for r in round {
        match r {
            Err(e) if e.code == ErrorCode::Unreachable => found = found.or(Some(e)),
            Err(_) | Ok(TransferStatus::Failed { .. }) => return None,
            Ok(_) => {}
        }
    }
    found
}

/// The destination endpoint of an offer.
fn destination(ranked: &RankedOffer) -> Endpoint {
    Endpoint {
        proxy: ranked.offer.proxy.clone(),
        token: ranked.offer.token,
    }
}

impl<L: LocalSite, P: Peers> Roles<L, P> {
    /// Steps 1–3: a Migration request to every candidate, the local site included, in
    /// parallel; the offers ranked best first.
    pub(super) async fn collect_offers(
        &self,
        id: MigrationId,
        record: &VmRecord,
        trigger: &Trigger,
    ) -> Result<Vec<RankedOffer>, ErrorReply> {
        let mut request = MigrationRequest {
            request_id: RequestId::random(),
            migration_id: id,
            vm: record.vm.clone(),
            descriptor: record.descriptor.clone(),
            depth: 0,
            max_depth: self.config().policy.delegation.max_depth,
        };
        let mut candidates: Vec<SiteId> = match trigger {
            Trigger::Operator { to_site: Some(s) } => vec![s.clone()],
            _ => self.delegation_targets(),
        };
        if let Trigger::Eviction { from } = trigger {
            candidates.retain(|c| c != from);
        }
        let local_wanted =
            !matches!(trigger, Trigger::Operator { to_site: Some(s) } if s != self.site());
        candidates.retain(|c| c != self.site());

        // No offer at all while a candidate had no responder or did not answer in time (its
        // daemon, or the hub node its site is connected through, restarting): ask again, with
        // the same patience as a transfer round. An offer whose answer was lost expires at the
        // partner by itself.
        let started = Instant::now();
        let mut tries = 0;
        loop {
            // A new request each round: a partner that saw the last one keeps its answer.
            request.request_id = RequestId::random();
            let (ranked, silent) = self
                .ask_for_offers(&request, &candidates, local_wanted)
                .await?;
            let waited = started.elapsed();
            let Some(silent) = silent else {
                return Ok(ranked);
            };
            if !ranked.is_empty() || waited >= UNREACHABLE_LIMIT || self.cancellation(id).is_some()
            {
                return Ok(ranked);
            }
            tries += 1;
            let wait = pause_for_peers(tries, waited);
            tracing::info!(migration.id = %id, tries, partner = %silent, "no offer, and a partner did not answer; asking again");
            tokio::time::sleep(wait).await;
        }
    }

    /// One round of steps 1–2: this site's own offers (when `local_wanted`) and every
    /// candidate's, ranked; with the first candidate that had no responder or did not answer in
    /// time, if any.
    async fn ask_for_offers(
        &self,
        request: &MigrationRequest,
        candidates: &[SiteId],
        local_wanted: bool,
    ) -> Result<(Vec<RankedOffer>, Option<SiteId>), ErrorReply> {
        let me = self.site().clone();
        let local = async {
            if !local_wanted {
                return Vec::new();
            }
            match self.migration_request(&me, request.clone()).await {
                Ok(o) => o.offers,
                Err(e) => {
                    tracing::info!(error = %e.message, "no local offer");
                    Vec::new()
                }
            }
        };
        let remote = join_all(candidates.iter().map(|p| async move {
            let r: Result<Offers, _> = self
                .peers()
                .call(p, FederationOp::MigrationRequest, request)
                .await;
            (p.clone(), r)
        }));
        let (local, remote) = tokio::join!(local, remote);

        let mut ranked = Vec::new();
        for offer in local {
            // Local offers were routed by the local handler: the route says which host.
            let via = match self.journal().route(&offer.token).map_err(internal)? {
                Some(r) => r.next,
                None => continue,
            };
            ranked.push(RankedOffer { offer, via });
        }
        let mut silent = None;
        for (p, r) in remote {
            match r {
                Ok(o) => ranked.extend(o.offers.into_iter().map(|offer| RankedOffer {
                    offer,
                    via: NextHop::Site(p.clone()),
                })),
                Err(e) => {
                    let code = e.to_reply().code;
                    if matches!(code, ErrorCode::Unreachable | ErrorCode::Timeout) {
                        silent.get_or_insert(p.clone());
                    }
                    tracing::info!(partner = %p, error = %e, "no offers from partner");
                }
            }
        }
        self.rank(&mut ranked);
        Ok((ranked, silent))
    }

    /// Step 3: sort by greatest benefit for this site — partner preference first, then price,
    /// then shorter chains, then more free capacity; local offers count as preference 0.
    fn rank(&self, offers: &mut [RankedOffer]) {
        let preference = |o: &RankedOffer| match &o.via {
            NextHop::Host(_) => 0,
            NextHop::Site(s) => self
                .config()
                .partner(s)
                .map(|p| p.preference)
                .unwrap_or(i32::MIN),
        };
        offers.sort_by(|a, b| {
            preference(b)
                .cmp(&preference(a))
                .then(a.offer.terms.price_milli.cmp(&b.offer.terms.price_milli))
                .then(a.offer.terms.depth.cmp(&b.offer.terms.depth))
                .then(
                    b.offer
                        .terms
                        .capacity
                        .map(|c| c as u8)
                        .cmp(&a.offer.terms.capacity.map(|c| c as u8)),
                )
        });
    }

    /// Step 4: the Forced migration at the Source — the VM's next hop, or this site's image
    /// store for a VM not placed yet. Idempotent: preparing again answers a fresh token and
    /// leaves the VM stopped.
    pub(super) async fn prepare_source(
        &self,
        id: MigrationId,
        record: &VmRecord,
    ) -> Result<(Endpoint, Option<NextHop>, u64), PrepareFailure> {
        let Some(next) = &record.downstream else {
            let p = self.local().image_source(id, &record.descriptor).await?;
            return Ok((p.endpoint, None, p.total_bytes));
        };
        // A site that relays the prepared source fetches it no faster than the migration's cap.
        let max_bytes_per_sec = self
            .journal()
            .migration(&id)
            .map_err(|e| PrepareFailure::from(internal(e)))?
            .and_then(|m| m.max_bytes_per_sec);
        let req = PrepareMigration {
            migration_id: id,
            vm: record.vm.clone(),
            mode: PrepareMode::SaveState,
            max_bytes_per_sec,
        };
        let p: Prepared = self
            .forward_with(
                next,
                FederationOp::MigrationPrepare,
                &req,
                move |h| async move {
                    let p = self
                        .local()
                        .prepare_source(id, &record.vm, &h, PrepareMode::SaveState)
                        .await?;
                    Ok(Prepared {
                        migration_id: id,
                        source: p.endpoint,
                        total_bytes: p.total_bytes,
                    })
                },
                PrepareFailure::from,
            )
            .await?;
        Ok((p.source, Some(next.clone()), p.total_bytes))
    }

    /// Steps 5–7: Initiate transfer on the destination and Transfer verification on the source
    /// until both report the same final status.
    pub(super) async fn transfer(
        &self,
        id: MigrationId,
        vm: &VmId,
        source: &Endpoint,
        source_via: Option<&NextHop>,
        ranked: &RankedOffer,
    ) -> Result<(), ErrorReply> {
        let max_bytes_per_sec = self
            .journal()
            .migration(&id)
            .map_err(internal)?
            .and_then(|m| m.max_bytes_per_sec);
        let handed = self
            .source_for_destination(id, vm, source, source_via, ranked)
            .await?;
        let initiate = InitiateTransfer {
            migration_id: id,
            vm: vm.clone(),
            source: handed,
            destination: destination(ranked),
            max_bytes_per_sec,
        };
        let mut failures = 0;
        // Short at first: a small transfer is over after a round trip or two.
        let mut pause = Duration::from_millis(5);
        let mut last_progress = (0u64, Instant::now());
        // Since when, and in how many rounds in a row, a peer had no responder.
        let mut unreachable: Option<(Instant, u32)> = None;
        loop {
            let d_stat = self.initiate_via(&ranked.via, &initiate).await;
            let s_stat = self.verify_via(id, vm, source, source_via).await;
            if let Some(e) = unreachable_only([&d_stat, &s_stat]) {
                // A daemon restarting: nothing acted on this round, so it is not a failed
                // round; the Controller waits for the peer, up to a bound.
                let (since, rounds) = unreachable.get_or_insert((Instant::now(), 0));
                *rounds += 1;
                let waited = since.elapsed();
                if waited >= UNREACHABLE_LIMIT {
                    return Err(ErrorReply::new(
                        ErrorCode::Unreachable,
                        format!(
                            "{}; still no responder after {} s of waiting",
                            e.message,
                            waited.as_secs()
                        ),
                    ));
                }
                let wait = pause_for_peers(*rounds, waited);
                tracing::info!(migration.id = %id, rounds = *rounds, error = %e.message, "a peer has no responder; waiting for it");
                if let Some(cancel) = self.cancellation(id) {
                    return Err(cancel);
                }
                tokio::time::sleep(wait).await;
                continue;
            }
            unreachable = None;
            match (&d_stat, &s_stat) {
                (Ok(d), Ok(s)) if d == s && matches!(d, TransferStatus::Succeeded { .. }) => {
                    self.update_migration(id, |m| m.bytes_done = m.bytes_total.max(m.bytes_done))?;
                    return Ok(());
                }
                (Ok(TransferStatus::Failed { reason }), _)
                | (_, Ok(TransferStatus::Failed { reason })) => {
                    failures += 1;
                    tracing::info!(migration.id = %id, failures, reason = %reason, "transfer failed");
                    self.record_failed_round(id, reason)?;
                }
                (Err(e), _) | (_, Err(e)) => {
                    failures += 1;
                    tracing::info!(migration.id = %id, failures, error = %e.message, "transfer round failed");
                    self.record_failed_round(id, &e.message)?;
                }
                (Ok(d), Ok(_)) => {
                    if let TransferStatus::Transferring {
                        bytes_done,
                        bytes_total,
                    } = d
                    {
                        let (done, total) = (*bytes_done, *bytes_total);
                        tracing::debug!(migration.id = %id, bytes_done = done, bytes_total = total, "transfer in progress");
                        if done > last_progress.0 {
                            last_progress = (done, Instant::now());
                        }
                        self.update_migration(id, |m| {
                            // Progress never runs backwards, even across retried transfers.
                            m.bytes_done = m.bytes_done.max(done);
                            m.bytes_total = m.bytes_total.max(total);
                        })?;
                    }
                    if last_progress.1.elapsed() > STALL_LIMIT {
                        return Err(ErrorReply::new(
                            ErrorCode::Timeout,
                            "transfer made no progress",
                        ));
                    }
                }
            }
            if let Some(cancel) = self.cancellation(id) {
                return Err(cancel);
            }
            if failures >= MAX_FAILED_ROUNDS {
                return Err(ErrorReply::new(
                    ErrorCode::TransferFailed,
                    "transfer failed repeatedly on this offer",
                ));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    /// Journals a failed transfer round, so the operator sees how often and why.
    fn record_failed_round(&self, id: MigrationId, why: &str) -> Result<(), ErrorReply> {
        self.update_migration(id, |m| {
            m.failed_rounds = m.failed_rounds.saturating_add(1);
            m.last_failure = Some(why.to_string());
        })?;
        Ok(())
    }

    /// Initiate transfer at the destination: through this site's own Destination handler for
    /// a local offer (it routes the token to the host), at the next site otherwise.
    async fn initiate_via(
        &self,
        via: &NextHop,
        req: &InitiateTransfer,
    ) -> Result<TransferStatus, ErrorReply> {
        let me = self.site();
        let reply: TransferStatusReply = self
            .forward(via, FederationOp::TransferInitiate, req, move |_| {
                self.initiate(me, req.clone())
            })
            .await?;
        Ok(reply.status)
    }

    /// Transfer verification at the source.
    async fn verify_via(
        &self,
        id: MigrationId,
        vm: &VmId,
        source: &Endpoint,
        via: Option<&NextHop>,
    ) -> Result<TransferStatus, ErrorReply> {
        let Some(via) = via else {
            return self.local().verify(id, &source.token).await;
        };
        let req = TransferVerification {
            migration_id: id,
            vm: vm.clone(),
            source: source.clone(),
        };
        let reply: TransferStatusReply = self
            .forward(
                via,
                FederationOp::TransferVerify,
                &req,
                move |_| async move {
                    Ok(TransferStatusReply {
                        migration_id: id,
                        status: self.local().verify(id, &source.token).await?,
                    })
                },
            )
            .await?;
        Ok(reply.status)
    }

    /// The hand-over, first half: commit the destination chain (which activates the VM) and
    /// re-point this site's record. The VM is activated only after the source stopped it
    /// (prepare), so it is never active twice.
    pub(super) async fn commit_destination_side(
        &self,
        id: MigrationId,
        record: &VmRecord,
        ranked: &RankedOffer,
    ) -> Result<(), ErrorReply> {
        let me = self.site();
        let req = CommitMigration {
            migration_id: id,
            vm: record.vm.clone(),
            side: HandOverSide::Destination,
            endpoint: destination(ranked),
        };
        let r = &req;
        let _: Committed = self
            .forward(&ranked.via, FederationOp::MigrationCommit, r, move |_| {
                self.commit(me, r.clone())
            })
            .await?;
        // A local commit re-pointed the record itself; a remote one is re-pointed here.
        if let NextHop::Site(s) = &ranked.via {
            let mut r = self
                .journal()
                .vm(&record.vm)
                .map_err(internal)?
                .unwrap_or_else(|| record.clone())
                .repointed(NextHop::Site(s.clone()), nubis_protocol::envelope::now_ms());
            r.phase = VmPhase::Placed;
            self.journal().put_vm(&r).map_err(internal)?;
        }
        Ok(())
    }

    /// The hand-over, second half: commit the source chain, which releases the old copy.
    pub(super) async fn commit_source_side(
        &self,
        id: MigrationId,
        record: &VmRecord,
        source: &Endpoint,
        source_via: Option<&NextHop>,
    ) -> Result<(), ErrorReply> {
        let vm = &record.vm;
        let released = match source_via {
            None => self.local().commit_source(vm, None, &source.token).await,
            Some(via) => {
                let req = CommitMigration {
                    migration_id: id,
                    vm: vm.clone(),
                    side: HandOverSide::Source,
                    endpoint: source.clone(),
                };
                self.forward(
                    via,
                    FederationOp::MigrationCommit,
                    &req,
                    move |h| async move {
                        self.local()
                            .commit_source(vm, Some(&h), &source.token)
                            .await?;
                        Ok(Committed {
                            migration_id: id,
                            side: HandOverSide::Source,
                        })
                    },
                )
                .await
                .map(|_| ())
            }
        };
        if let Err(e) = &released {
            // The VM already runs at its new place; the old copy is stopped. Releasing it is
            // repeated, never by re-activating anything.
            tracing::warn!(migration.id = %id, error = %e.message, "source not released yet; will retry");
        }
        released
    }

    /// Releases every offer of `m` not released yet, except `keep`. Best effort: a
    /// reservation that cannot be released now is logged and expires on its own.
    pub(super) async fn release_offers(
        &self,
        m: &MigrationRecord,
        keep: Option<usize>,
    ) -> Result<(), ErrorReply> {
        for (j, ranked) in m.offers.iter().enumerate() {
            if Some(j) != keep && !m.released.contains(&j) {
                self.release_offer(m.id, &m.vm, j, ranked).await?;
            }
        }
        Ok(())
    }

    /// Releases offer `j` (the migration does not use it) and journals that it did. Best
    /// effort: a reservation that cannot be released now (its site unreachable, say) is
    /// logged and expires on its own at the destination. Only a journal failure is an error.
    pub(super) async fn release_offer(
        &self,
        id: MigrationId,
        vm: &VmId,
        j: usize,
        ranked: &RankedOffer,
    ) -> Result<(), ErrorReply> {
        match self.abort_destination(id, vm, ranked).await {
            Ok(()) => {
                self.update_migration(id, |m| {
                    if !m.released.contains(&j) {
                        m.released.push(j);
                    }
                })?;
            }
            Err(e) => tracing::warn!(
                migration.id = %id,
                via = ?ranked.via,
                code = e.code.as_str(),
                error = %e.message,
                "an unused offer could not be released; its reservation expires on its own"
            ),
        }
        Ok(())
    }

    /// Abort at a destination: it discards what it received and frees the reservation.
    async fn abort_destination(
        &self,
        id: MigrationId,
        vm: &VmId,
        ranked: &RankedOffer,
    ) -> Result<(), ErrorReply> {
        let req = AbortMigration {
            migration_id: id,
            vm: vm.clone(),
            side: HandOverSide::Destination,
            endpoint: destination(ranked),
            reason: "offer not used".into(),
        };
        let me = self.site();
        let r = &req;
        let _: Aborted = self
            .forward(&ranked.via, FederationOp::MigrationAbort, r, move |_| {
                self.abort(me, r.clone())
            })
            .await?;
        Ok(())
    }

    /// Abort at the source: it runs the VM again where it was.
    pub(super) async fn abort_source(
        &self,
        id: MigrationId,
        vm: &VmId,
        source: &Endpoint,
        via: Option<&NextHop>,
    ) -> Result<(), ErrorReply> {
        let Some(via) = via else {
            return self.local().abort_source(vm, None, &source.token).await;
        };
        let req = AbortMigration {
            migration_id: id,
            vm: vm.clone(),
            side: HandOverSide::Source,
            endpoint: source.clone(),
            reason: "migration aborted".into(),
        };
        let _: Aborted = self
            .forward(
                via,
                FederationOp::MigrationAbort,
                &req,
                move |h| async move {
                    self.local()
                        .abort_source(vm, Some(&h), &source.token)
                        .await?;
                    Ok(Aborted {
                        migration_id: id,
                        side: HandOverSide::Source,
                    })
                },
            )
            .await?;
        Ok(())
    }

    /// Repeats `step` while it finds a peer with no responder (a daemon, or the hub node its
    /// site is connected through, restarting): such a request reached no handler, so sending it
    /// again is safe. Waits with full jitter between tries, up to [`UNREACHABLE_LIMIT`] in all,
    /// and gives up at once when the migration is cancelled. `reply` reads a failure's code.
    pub(super) async fn waiting_for_peers<T, E, F, Fut>(
        &self,
        id: MigrationId,
        what: &str,
        reply: impl Fn(&E) -> &ErrorReply,
        mut step: F,
    ) -> Result<T, E>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let started = Instant::now();
        let mut tries = 0;
        loop {
            let e = match step().await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let waited = started.elapsed();
            if reply(&e).code != ErrorCode::Unreachable
                || waited >= UNREACHABLE_LIMIT
                || self.cancellation(id).is_some()
            {
                return Err(e);
            }
            tries += 1;
            let wait = pause_for_peers(tries, waited);
            tracing::info!(migration.id = %id, step = what, tries, error = %reply(&e).message, "a peer has no responder; waiting for it");
            tokio::time::sleep(wait).await;
        }
    }

    /// Repeats `step` while its outcome is uncertain (see [`uncertain`]), for at most
    /// [`SETTLE_LIMIT`]; the steps given to it are idempotent by migration id and token.
    pub(super) async fn settle<T, F, Fut>(&self, what: &str, mut step: F) -> Result<T, ErrorReply>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, ErrorReply>>,
    {
        let started = Instant::now();
        let mut pause = Duration::from_millis(50);
        loop {
            match step().await {
                Ok(v) => return Ok(v),
                Err(e) if uncertain(&e) && started.elapsed() < SETTLE_LIMIT => {
                    tracing::warn!(step = what, error = %e.message, "no definite answer; repeating");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(e),
            }
        }
    }
}
