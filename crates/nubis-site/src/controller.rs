//! The Main migration algorithm at the Controller (paper section III-C.1), with the hand-over
//! the paper leaves implicit: commit at the destination, then at the source; abort otherwise.
//!
//! Each step is journaled before it is taken. Any site on a VM's chain may run it: the primary
//! for a placement or an operator's migration, an Intermediary for an eviction notice.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use nubis_protocol::envelope::now_ms;
use nubis_protocol::message::{
    AbortMigration, Aborted, CommitMigration, Committed, Endpoint, ErrorCode, ErrorReply,
    HandOverSide, InitiateTransfer, MigrationRequest, Offers, PrepareMigration, PrepareMode,
    Prepared, TransferStatus, TransferStatusReply, TransferVerification,
};
use nubis_protocol::subject::FederationOp;
use nubis_protocol::{MigrationId, RequestId, SiteId, VmId};

use tracing::Instrument as _;

use crate::federation::CallError;
use crate::journal::{MigrationPhase, MigrationRecord, NextHop, RankedOffer, VmPhase, VmRecord};
use crate::local::LocalSite;
use crate::roles::{internal, Roles};

/// How often Initiate transfer / Transfer verification may both fail on one offer before the
/// Controller moves on to the next offer.
pub const MAX_FAILED_ROUNDS: u32 = 3;

/// How long one migration may keep polling a transfer that makes no progress.
const STALL_LIMIT: Duration = Duration::from_secs(120);

/// How long the Controller keeps repeating a step whose outcome it must learn (a hand-over, a
/// roll-back, undoing a prepare) while the peer does not answer. Past it the migration stays
/// open in the journal and is taken up again when this site restarts.
const SETTLE_LIMIT: Duration = Duration::from_secs(300);

/// Whether a failed request may have taken effect at the peer (it may have acted and then
/// crashed, or its answer was lost): the Controller must then learn the outcome by repeating
/// the idempotent request, never assume it did not happen.
fn uncertain(e: &ErrorReply) -> bool {
    matches!(
        e.code,
        ErrorCode::Timeout | ErrorCode::Busy | ErrorCode::Internal
    )
}

/// Why a Forced migration (prepare) failed.
struct PrepareFailure {
    reply: ErrorReply,
    /// The request reached a handler (or may have): the source may have stopped the VM.
    maybe_prepared: bool,
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

/// Who asked for the migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// Primary placement of a new VM.
    Placement,
    /// An operator or policy at this site; optionally towards one partner only.
    Operator {
        /// Only offers from (or through) this site; `None` = local site and all partners.
        to_site: Option<SiteId>,
    },
    /// An eviction notice from the downstream site.
    Eviction {
        /// The evicting site, which must not be offered the VM back.
        from: SiteId,
    },
}

impl<L: LocalSite> Roles<L> {
    /// Starts a migration of `vm` and returns its id at once; the work continues in the
    /// background (see [`Roles::migration_status`]).
    pub fn start_migration(
        self: &Arc<Self>,
        vm: VmId,
        trigger: Trigger,
    ) -> Result<MigrationId, ErrorReply> {
        self.start_migration_capped(vm, trigger, None)
    }

    /// [`Roles::start_migration`] with a bandwidth cap (bytes per second) that the transfer
    /// proxies honour for this migration's files.
    pub fn start_migration_capped(
        self: &Arc<Self>,
        vm: VmId,
        trigger: Trigger,
        max_bytes_per_sec: Option<u64>,
    ) -> Result<MigrationId, ErrorReply> {
        if max_bytes_per_sec == Some(0) {
            return Err(ErrorReply::new(
                ErrorCode::Malformed,
                "max_bytes_per_sec must be greater than zero (leave it out for no cap)",
            ));
        }
        let record = self.journal.vm(&vm).map_err(internal)?.ok_or_else(|| {
            ErrorReply::new(
                ErrorCode::UnknownVm,
                format!("VM {vm} is not known at this site"),
            )
        })?;
        if record.phase == VmPhase::Migrating {
            return Err(ErrorReply::new(
                ErrorCode::Conflict,
                format!("VM {vm} is already being migrated"),
            ));
        }
        let id = MigrationId::random();
        let now = now_ms();
        self.journal
            .put_migration(&MigrationRecord {
                id,
                vm: vm.clone(),
                reason: format!("{trigger:?}"),
                phase: MigrationPhase::Queued,
                offers: Vec::new(),
                source: None,
                source_via: None,
                bytes_done: 0,
                bytes_total: 0,
                started_ms: now,
                updated_ms: now,
                max_bytes_per_sec,
                failed_rounds: 0,
                last_failure: None,
            })
            .map_err(internal)?;
        let mut record = record;
        record.phase = VmPhase::Migrating;
        self.journal.put_vm(&record).map_err(internal)?;
        let me = self.clone();
        let span =
            tracing::info_span!("migration", migration.id = %id, vm.id = %vm, site.id = %me.site());
        tokio::spawn(
            async move {
                if let Err(e) = me.run_migration(id, trigger).await {
                    tracing::warn!(error = %e.message, "migration ended without moving the VM");
                }
            }
            .instrument(span),
        );
        Ok(id)
    }

    fn update_migration(
        &self,
        id: MigrationId,
        f: impl FnOnce(&mut MigrationRecord),
    ) -> Result<MigrationRecord, ErrorReply> {
        let mut m = self
            .journal
            .migration(&id)
            .map_err(internal)?
            .ok_or_else(|| internal("migration journal lost"))?;
        f(&mut m);
        m.updated_ms = now_ms();
        self.journal.put_migration(&m).map_err(internal)?;
        Ok(m)
    }

    /// Asks a running migration to stop: it aborts at its next step unless it is already
    /// committing (a hand-over is never left half done).
    pub fn cancel_migration(&self, id: &MigrationId) -> Result<MigrationPhase, ErrorReply> {
        let m = self
            .journal
            .migration(id)
            .map_err(internal)?
            .ok_or_else(|| {
                ErrorReply::new(
                    ErrorCode::UnknownVm,
                    format!("no migration {id} at this site"),
                )
            })?;
        match m.phase {
            MigrationPhase::Committing { .. }
            | MigrationPhase::Committed
            | MigrationPhase::Aborted { .. } => Err(ErrorReply::new(
                ErrorCode::Conflict,
                "the migration is past the point where it can be cancelled",
            )),
            phase => {
                if let Ok(mut set) = self.cancelled.lock() {
                    set.insert(*id);
                }
                Ok(phase)
            }
        }
    }

    fn check_cancelled(&self, id: MigrationId) -> Result<(), ErrorReply> {
        let cancelled = self
            .cancelled
            .lock()
            .map(|s| s.contains(&id))
            .unwrap_or(false);
        if cancelled {
            Err(ErrorReply::new(
                ErrorCode::Refused,
                "cancelled by the operator",
            ))
        } else {
            Ok(())
        }
    }

    /// The journal of a migration.
    pub fn migration_status(
        &self,
        id: &MigrationId,
    ) -> Result<Option<MigrationRecord>, ErrorReply> {
        self.journal.migration(id).map_err(internal)
    }

    /// After a restart: every migration this site controlled that had not ended is rolled
    /// forward (transfer or hand-over under way) or back (nothing irreversible happened yet).
    pub fn recover(self: &Arc<Self>) -> Result<usize, ErrorReply> {
        let open: Vec<MigrationRecord> = self
            .journal
            .migrations()
            .map_err(internal)?
            .into_iter()
            .filter(|m| !m.phase.is_final())
            .collect();
        let n = open.len();
        for m in open {
            let me = self.clone();
            tokio::spawn(async move {
                tracing::info!(migration.id = %m.id, vm.id = %m.vm, phase = ?m.phase, "resuming migration from the journal");
                let result = me.resume(&m).await;
                if let Err(e) = &result {
                    if let Err(j) = me.finish_failed(m.id, e) {
                        tracing::error!(migration.id = %m.id, error = %j.message, "cannot journal the end of a resumed migration");
                    }
                }
                if let Err(j) = me.settle_vm_phase(m.id) {
                    tracing::error!(migration.id = %m.id, error = %j.message, "cannot journal the VM's phase after a resumed migration");
                }
            });
        }
        Ok(n)
    }

    async fn resume(&self, m: &MigrationRecord) -> Result<(), ErrorReply> {
        let record = self
            .journal
            .vm(&m.vm)
            .map_err(internal)?
            .ok_or_else(|| ErrorReply::new(ErrorCode::UnknownVm, "VM vanished"))?;
        match (&m.phase, &m.source) {
            (MigrationPhase::Committing { offer }, Some(source)) => {
                let ranked = m
                    .offers
                    .get(*offer)
                    .ok_or_else(|| internal("journal names a missing offer"))?;
                self.settle("commit at the destination", || {
                    self.commit_destination_side(m.id, &record, ranked)
                })
                .await?;
                self.settle("commit at the source", || {
                    self.commit_source_side(m.id, &record, source, m.source_via.as_ref())
                })
                .await?;
                for (j, other) in m.offers.iter().enumerate() {
                    if j != *offer {
                        self.release_offer(m.id, &record.vm, other).await;
                    }
                }
                self.update_migration(m.id, |r| r.phase = MigrationPhase::Committed)?;
                Ok(())
            }
            (MigrationPhase::Transferring { offer }, Some(source)) => {
                self.continue_after_prepare(
                    m.id,
                    &record,
                    &m.offers,
                    source,
                    m.source_via.as_ref(),
                    *offer,
                )
                .await
            }
            (MigrationPhase::Aborting, Some(source)) => {
                let reason = ErrorReply::new(
                    ErrorCode::TransferFailed,
                    "aborted; the VM stays where it was",
                );
                self.roll_back(m.id, &record.vm, source, m.source_via.as_ref(), reason)
                    .await
            }
            _ => {
                // Before the transfer started: nothing moved. Release the offers.
                for other in &m.offers {
                    self.release_offer(m.id, &record.vm, other).await;
                }
                let reason = ErrorReply::new(
                    ErrorCode::Internal,
                    "interrupted before the transfer started; nothing moved",
                );
                match (&m.phase, &m.source) {
                    // The source answered and was journaled: resume it with that token.
                    (MigrationPhase::Preparing, Some(source)) => {
                        self.roll_back(m.id, &record.vm, source, m.source_via.as_ref(), reason)
                            .await
                    }
                    // The crash came while the source was being prepared: it may have stopped
                    // the VM without this site journaling its answer. Prepare again (idempotent
                    // at the host) to learn its token, and abort, which runs the VM again.
                    (MigrationPhase::Preparing, None) if record.downstream.is_some() => {
                        self.undo_prepare(m.id, &record).await?;
                        self.update_migration(m.id, |r| {
                            r.phase = MigrationPhase::Aborted {
                                reason: format!("{} ({})", reason.message, reason.code.as_str()),
                            }
                        })?;
                        Err(reason)
                    }
                    _ => Err(reason),
                }
            }
        }
    }

    fn settle_vm_phase(&self, id: MigrationId) -> Result<(), ErrorReply> {
        let migration = self.journal.migration(&id).map_err(internal)?;
        // A migration left open mid hand-over still owns the VM.
        if let Some(vm) = migration.filter(|m| m.phase.is_final()).map(|m| m.vm) {
            if let Some(mut record) = self.journal.vm(&vm).map_err(internal)? {
                if record.phase == VmPhase::Migrating {
                    record.phase = if record.downstream.is_some() {
                        VmPhase::Placed
                    } else {
                        VmPhase::Unplaced
                    };
                    self.journal.put_vm(&record).map_err(internal)?;
                }
            }
        }
        Ok(())
    }

    async fn run_migration(&self, id: MigrationId, trigger: Trigger) -> Result<(), ErrorReply> {
        // Beyond the site's limit, a migration waits in the queue (its position is in status).
        let permit = self.slots.clone().acquire_owned().await.map_err(internal)?;
        let result = match self.check_cancelled(id) {
            Ok(()) => {
                self.update_migration(id, |m| m.phase = MigrationPhase::Requesting)?;
                self.run_steps(id, &trigger).await
            }
            Err(e) => Err(e),
        };
        drop(permit);
        if let Err(e) = &result {
            self.finish_failed(id, e)?;
        }
        // Whatever happened, the VM is no longer "migrating" from this site's point of view.
        self.settle_vm_phase(id)?;
        result
    }

    /// Marks a migration that ended in `error` as aborted — unless it stopped half way through
    /// a hand-over or a roll-back, whose outcome is still to be learnt: such a migration stays
    /// open in the journal and is taken up again when this site restarts.
    fn finish_failed(&self, id: MigrationId, error: &ErrorReply) -> Result<(), ErrorReply> {
        let reason = format!("{} ({})", error.message, error.code.as_str());
        let m = self.update_migration(id, |m| match m.phase {
            MigrationPhase::Committing { .. }
            | MigrationPhase::Aborting
            | MigrationPhase::Committed
            | MigrationPhase::Aborted { .. } => {}
            _ => m.phase = MigrationPhase::Aborted { reason },
        })?;
        if !m.phase.is_final() {
            tracing::error!(migration.id = %id, phase = ?m.phase, error = %error.message, "migration left open; it continues when this site restarts");
        }
        Ok(())
    }

    /// Repeats `step` while its outcome is uncertain (see [`uncertain`]), for at most
    /// [`SETTLE_LIMIT`]; the steps given to it are idempotent by migration id and token.
    async fn settle<T, F, Fut>(&self, what: &str, mut step: F) -> Result<T, ErrorReply>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, ErrorReply>>,
    {
        let started = std::time::Instant::now();
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

    /// Rolls the source back: it runs the VM again where it was. The migration ends aborted
    /// with `reason` once the source confirmed; until then it stays in the aborting phase.
    async fn roll_back(
        &self,
        id: MigrationId,
        vm: &VmId,
        source: &Endpoint,
        source_via: Option<&NextHop>,
        reason: ErrorReply,
    ) -> Result<(), ErrorReply> {
        self.update_migration(id, |m| m.phase = MigrationPhase::Aborting)?;
        tracing::info!(migration.id = %id, "aborting; resuming the source");
        self.settle("abort at the source", || {
            self.abort_source(id, vm, source, source_via)
        })
        .await?;
        self.update_migration(id, |m| {
            m.phase = MigrationPhase::Aborted {
                reason: format!("{} ({})", reason.message, reason.code.as_str()),
            }
        })?;
        Err(reason)
    }

    /// After a prepare whose outcome is unknown: prepare again (idempotent at the host, so it
    /// answers a token whether or not the first one stopped the VM) and abort at once, which
    /// runs the VM again at the source.
    async fn undo_prepare(&self, id: MigrationId, record: &VmRecord) -> Result<(), ErrorReply> {
        tracing::info!(migration.id = %id, "preparing the source again to undo an interrupted prepare");
        let (source, via, _) = self
            .settle("prepare again", || async {
                self.prepare_source(id, record).await.map_err(|f| f.reply)
            })
            .await?;
        self.update_migration(id, |m| {
            m.source = Some(source.clone());
            m.source_via = via.clone();
        })?;
        self.settle("abort at the source", || {
            self.abort_source(id, &record.vm, &source, via.as_ref())
        })
        .await
    }

    async fn run_steps(&self, id: MigrationId, trigger: &Trigger) -> Result<(), ErrorReply> {
        let m = self
            .journal
            .migration(&id)
            .map_err(internal)?
            .ok_or_else(|| internal("migration journal lost"))?;
        let record = self
            .journal
            .vm(&m.vm)
            .map_err(internal)?
            .ok_or_else(|| ErrorReply::new(ErrorCode::UnknownVm, "VM vanished"))?;

        // Steps 1–3: Migration request to every candidate, the local site included, in parallel.
        let offers = self.collect_offers(id, &record, trigger).await?;
        if offers.is_empty() {
            return Err(ErrorReply::new(
                ErrorCode::NoCapacity,
                "no site offered to take the VM",
            ));
        }
        self.check_cancelled(id)?;
        self.update_migration(id, |m| {
            m.offers = offers.clone();
            m.phase = MigrationPhase::Preparing;
        })?;
        tracing::info!(migration.id = %id, offers = offers.len(), "offers journaled; preparing the source");

        // Step 4: Forced migration on the Source.
        let (source, source_via, total) = match self.prepare_source(id, &record).await {
            Ok(p) => p,
            Err(f) => {
                for other in &offers {
                    self.release_offer(id, &record.vm, other).await;
                }
                if f.maybe_prepared {
                    tracing::info!(migration.id = %id, error = %f.reply.message, "prepare outcome unknown");
                    self.undo_prepare(id, &record).await?;
                }
                return Err(f.reply);
            }
        };
        self.update_migration(id, |m| {
            m.source = Some(source.clone());
            m.source_via = source_via.clone();
            m.bytes_total = total;
        })?;
        tracing::info!(migration.id = %id, "source journaled; starting the transfer");

        self.continue_after_prepare(id, &record, &offers, &source, source_via.as_ref(), 0)
            .await
    }

    /// Steps 5–7 from offer `first` on, then the hand-over; or the abort when every offer failed.
    async fn continue_after_prepare(
        &self,
        id: MigrationId,
        record: &VmRecord,
        offers: &[RankedOffer],
        source: &Endpoint,
        source_via: Option<&NextHop>,
        first: usize,
    ) -> Result<(), ErrorReply> {
        let mut source = source.clone();
        let mut source_via = source_via.cloned();
        let mut used = false;
        for (i, ranked) in offers.iter().enumerate().skip(first) {
            if used {
                // A serving token carries one transfer: the next offer needs a fresh one.
                // Preparing again is idempotent at the host; the VM stays stopped.
                let again = self
                    .settle("prepare again", || async {
                        self.prepare_source(id, record).await.map_err(|f| f.reply)
                    })
                    .await;
                match again {
                    Ok((fresh, via, _)) => {
                        self.update_migration(id, |m| {
                            m.source = Some(fresh.clone());
                            m.source_via = via.clone();
                        })?;
                        source = fresh;
                        source_via = via;
                    }
                    Err(e) => {
                        tracing::warn!(migration.id = %id, error = %e.message, "cannot prepare the source again");
                        break;
                    }
                }
            }
            used = true;
            if let Err(e) = self.check_cancelled(id) {
                for other in &offers[i..] {
                    self.release_offer(id, &record.vm, other).await;
                }
                return self
                    .roll_back(id, &record.vm, &source, source_via.as_ref(), e)
                    .await;
            }
            self.update_migration(id, |m| m.phase = MigrationPhase::Transferring { offer: i })?;
            tracing::info!(migration.id = %id, offer = i, "initiating the transfer");
            match self
                .transfer(id, &record.vm, &source, source_via.as_ref(), ranked)
                .await
            {
                Ok(()) => {
                    self.update_migration(id, |m| {
                        m.phase = MigrationPhase::Committing { offer: i }
                    })?;
                    tracing::info!(migration.id = %id, offer = i, "transfer verified; committing");
                    // A commit that got no definite answer may have activated the VM at the
                    // destination: it is repeated (idempotent) until the destination says, and
                    // the source is never resumed while that is unknown.
                    let committed = self
                        .settle("commit at the destination", || {
                            self.commit_destination_side(id, record, ranked)
                        })
                        .await;
                    match committed {
                        Ok(()) => {}
                        Err(e) if uncertain(&e) => return Err(e),
                        Err(e) => {
                            // The destination refused to activate: nothing runs there, the
                            // source is still stopped. Discard this offer, try the next one.
                            tracing::warn!(migration.id = %id, offer = i, error = %e.message, "destination refused to activate");
                            self.release_offer(id, &record.vm, ranked).await;
                            self.update_migration(id, |m| {
                                m.phase = MigrationPhase::Transferring { offer: i }
                            })?;
                            continue;
                        }
                    }
                    tracing::info!(migration.id = %id, offer = i, "destination committed; releasing the source");
                    self.settle("commit at the source", || {
                        self.commit_source_side(id, record, &source, source_via.as_ref())
                    })
                    .await?;
                    // Unused offers: release their reservations, best effort.
                    for (j, other) in offers.iter().enumerate() {
                        if j != i {
                            self.release_offer(id, &record.vm, other).await;
                        }
                    }
                    self.update_migration(id, |m| m.phase = MigrationPhase::Committed)?;
                    tracing::info!(migration.id = %id, vm.id = %record.vm, "migration committed");
                    return Ok(());
                }
                Err(e) => {
                    tracing::info!(migration.id = %id, offer = i, error = %e.message, "offer failed; trying the next");
                    self.release_offer(id, &record.vm, ranked).await;
                }
            }
        }
        // Every offer failed: the source resumes the VM where it was.
        let reason = ErrorReply::new(
            ErrorCode::TransferFailed,
            "every offer failed; the VM stays where it was",
        );
        self.roll_back(id, &record.vm, &source, source_via.as_ref(), reason)
            .await
    }

    async fn collect_offers(
        &self,
        id: MigrationId,
        record: &VmRecord,
        trigger: &Trigger,
    ) -> Result<Vec<RankedOffer>, ErrorReply> {
        let request = MigrationRequest {
            request_id: RequestId::random(),
            migration_id: id,
            vm: record.vm.clone(),
            descriptor: record.descriptor.clone(),
            depth: 0,
            max_depth: self.config.policy.delegation.max_depth,
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
        let remote = join_all(candidates.iter().map(|p| {
            let request = &request;
            async move {
                let r: Result<Offers, _> = self
                    .fed
                    .call(p, FederationOp::MigrationRequest, request)
                    .await;
                (p.clone(), r)
            }
        }));
        let (local, remote) = tokio::join!(local, remote);

        let mut ranked = Vec::new();
        for offer in local {
            // Local offers were routed by the local handler: the route says which host.
            let via = match self.journal.route(&offer.token).map_err(internal)? {
                Some(r) => r.next,
                None => continue,
            };
            ranked.push(RankedOffer { offer, via });
        }
        for (p, r) in remote {
            match r {
                Ok(o) => ranked.extend(o.offers.into_iter().map(|offer| RankedOffer {
                    offer,
                    via: NextHop::Site(p.clone()),
                })),
                Err(e) => tracing::info!(partner = %p, error = %e, "no offers from partner"),
            }
        }
        self.rank(&mut ranked);
        Ok(ranked)
    }

    /// Step 3: sort by greatest benefit for this site — partner preference first, then price,
    /// then shorter chains, then more free capacity; local offers count as preference 0.
    fn rank(&self, offers: &mut [RankedOffer]) {
        let preference = |o: &RankedOffer| match &o.via {
            NextHop::Host(_) => 0,
            NextHop::Site(s) => self
                .config
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

    async fn prepare_source(
        &self,
        id: MigrationId,
        record: &VmRecord,
    ) -> Result<(Endpoint, Option<NextHop>, u64), PrepareFailure> {
        match &record.downstream {
            None => {
                let p = self.local.image_source(id, &record.descriptor).await?;
                Ok((p.endpoint, None, p.total_bytes))
            }
            Some(NextHop::Host(h)) => {
                let p = self
                    .local
                    .prepare_source(id, &record.vm, h, PrepareMode::SaveState)
                    .await?;
                Ok((p.endpoint, Some(NextHop::Host(h.clone())), p.total_bytes))
            }
            Some(NextHop::Site(s)) => {
                let req = PrepareMigration {
                    migration_id: id,
                    vm: record.vm.clone(),
                    mode: PrepareMode::SaveState,
                };
                let p: Prepared = self
                    .fed
                    .call(s, FederationOp::MigrationPrepare, &req)
                    .await
                    .map_err(|e| PrepareFailure {
                        reply: e.to_reply(),
                        // Nobody listened: the request reached no handler, nothing stopped.
                        maybe_prepared: !matches!(e, CallError::Unreachable { .. })
                            && uncertain(&e.to_reply()),
                    })?;
                Ok((p.source, Some(NextHop::Site(s.clone())), p.total_bytes))
            }
        }
    }

    /// Steps 5–7: Initiate transfer on the destination and Transfer verification on the source
    /// until both report the same final status.
    async fn transfer(
        &self,
        id: MigrationId,
        vm: &VmId,
        source: &Endpoint,
        source_via: Option<&NextHop>,
        ranked: &RankedOffer,
    ) -> Result<(), ErrorReply> {
        let destination = Endpoint {
            proxy: ranked.offer.proxy.clone(),
            token: ranked.offer.token,
        };
        let max_bytes_per_sec = self
            .journal
            .migration(&id)
            .map_err(internal)?
            .and_then(|m| m.max_bytes_per_sec);
        let initiate = InitiateTransfer {
            migration_id: id,
            vm: vm.clone(),
            source: source.clone(),
            destination: destination.clone(),
            max_bytes_per_sec,
        };
        let mut failures = 0;
        // Short at first: a small transfer is over after a round trip or two.
        let mut pause = Duration::from_millis(5);
        let mut last_progress = (0u64, std::time::Instant::now());
        loop {
            let d_stat = self.initiate_via(&ranked.via, &initiate).await;
            let s_stat = self.verify_via(id, vm, source, source_via).await;
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
                            last_progress = (done, std::time::Instant::now());
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
            self.check_cancelled(id)?;
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

    async fn initiate_via(
        &self,
        via: &NextHop,
        req: &InitiateTransfer,
    ) -> Result<TransferStatus, ErrorReply> {
        match via {
            NextHop::Host(_) => {
                let me = self.site().clone();
                self.initiate(&me, req.clone()).await.map(|r| r.status)
            }
            NextHop::Site(s) => {
                let r: TransferStatusReply = self
                    .fed
                    .call(s, FederationOp::TransferInitiate, req)
                    .await
                    .map_err(|e| e.to_reply())?;
                Ok(r.status)
            }
        }
    }

    async fn verify_via(
        &self,
        id: MigrationId,
        vm: &VmId,
        source: &Endpoint,
        via: Option<&NextHop>,
    ) -> Result<TransferStatus, ErrorReply> {
        match via {
            None | Some(NextHop::Host(_)) => self.local.verify(id, &source.token).await,
            Some(NextHop::Site(s)) => {
                let req = TransferVerification {
                    migration_id: id,
                    vm: vm.clone(),
                    source: source.clone(),
                };
                let r: TransferStatusReply = self
                    .fed
                    .call(s, FederationOp::TransferVerify, &req)
                    .await
                    .map_err(|e| e.to_reply())?;
                Ok(r.status)
            }
        }
    }

    /// The hand-over, first half: commit the destination chain (which activates the VM) and
    /// re-point this site's record. The VM is activated only after the source stopped it
    /// (prepare), so it is never active twice.
    async fn commit_destination_side(
        &self,
        id: MigrationId,
        record: &VmRecord,
        ranked: &RankedOffer,
    ) -> Result<(), ErrorReply> {
        let me = self.site().clone();
        let dest = CommitMigration {
            migration_id: id,
            vm: record.vm.clone(),
            side: HandOverSide::Destination,
            endpoint: Endpoint {
                proxy: ranked.offer.proxy.clone(),
                token: ranked.offer.token,
            },
        };
        match &ranked.via {
            NextHop::Host(_) => {
                self.commit(&me, dest).await?;
            }
            NextHop::Site(s) => {
                let _: Committed = self
                    .fed
                    .call(s, FederationOp::MigrationCommit, &dest)
                    .await
                    .map_err(|e| e.to_reply())?;
                let mut r = self
                    .journal
                    .vm(&record.vm)
                    .map_err(internal)?
                    .unwrap_or_else(|| record.clone());
                r.downstream = Some(NextHop::Site(s.clone()));
                r.phase = VmPhase::Placed;
                self.journal.put_vm(&r).map_err(internal)?;
            }
        }
        Ok(())
    }

    /// The hand-over, second half: commit the source chain, which releases the old copy.
    async fn commit_source_side(
        &self,
        id: MigrationId,
        record: &VmRecord,
        source: &Endpoint,
        source_via: Option<&NextHop>,
    ) -> Result<(), ErrorReply> {
        let src = CommitMigration {
            migration_id: id,
            vm: record.vm.clone(),
            side: HandOverSide::Source,
            endpoint: source.clone(),
        };
        let released = match source_via {
            None => {
                self.local
                    .commit_source(&record.vm, None, &source.token)
                    .await
            }
            Some(NextHop::Host(h)) => {
                self.local
                    .commit_source(&record.vm, Some(h), &source.token)
                    .await
            }
            Some(NextHop::Site(s)) => self
                .fed
                .call::<_, Committed>(s, FederationOp::MigrationCommit, &src)
                .await
                .map(|_| ())
                .map_err(|e| e.to_reply()),
        };
        if let Err(e) = released {
            // The VM already runs at its new place; the old copy is stopped. Releasing it is
            // retried by the recovery loop, never by re-activating anything.
            tracing::warn!(migration.id = %id, error = %e.message, "source not released yet; will retry");
            return Err(e);
        }
        Ok(())
    }

    /// Releases an offer the migration does not use. Best effort: a reservation that cannot be
    /// released now (its site unreachable, say) is logged and expires on its own at the
    /// destination.
    async fn release_offer(&self, id: MigrationId, vm: &VmId, ranked: &RankedOffer) {
        if let Err(e) = self.abort_destination(id, vm, ranked).await {
            tracing::warn!(
                migration.id = %id,
                via = ?ranked.via,
                code = e.code.as_str(),
                error = %e.message,
                "an unused offer could not be released; its reservation expires on its own"
            );
        }
    }

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
            endpoint: Endpoint {
                proxy: ranked.offer.proxy.clone(),
                token: ranked.offer.token,
            },
            reason: "offer not used".into(),
        };
        match &ranked.via {
            NextHop::Host(_) => {
                let me = self.site().clone();
                self.abort(&me, req).await.map(|_| ())
            }
            NextHop::Site(s) => self
                .fed
                .call::<_, Aborted>(s, FederationOp::MigrationAbort, &req)
                .await
                .map(|_| ())
                .map_err(|e| e.to_reply()),
        }
    }

    async fn abort_source(
        &self,
        id: MigrationId,
        vm: &VmId,
        source: &Endpoint,
        via: Option<&NextHop>,
    ) -> Result<(), ErrorReply> {
        match via {
            None => self.local.abort_source(vm, None, &source.token).await,
            Some(NextHop::Host(h)) => self.local.abort_source(vm, Some(h), &source.token).await,
            Some(NextHop::Site(s)) => {
                let req = AbortMigration {
                    migration_id: id,
                    vm: vm.clone(),
                    side: HandOverSide::Source,
                    endpoint: source.clone(),
                    reason: "migration aborted".into(),
                };
                self.fed
                    .call::<_, Aborted>(s, FederationOp::MigrationAbort, &req)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_reply())
            }
        }
    }
}
