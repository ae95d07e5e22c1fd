//! The Controller: the Main migration algorithm (paper section III-C.1), with the hand-over
//! the paper leaves implicit — commit at the destination, then at the source; abort otherwise.
//!
//! A migration is a state machine over [`MigrationPhase`], kept in its [`MigrationRecord`] in
//! the journal. One step, [`Roles::advance`](machine), takes the migration from the phase the
//! journal names to the next one and journals that before acting on it; a migration started
//! here and one taken up by [`Roles::recover`] after a crash are driven by the same steps. The
//! only difference: a step before the transfer (queued, requesting, preparing) is never
//! repeated after a restart but rolled back, because nothing irreversible happened yet.
//!
//! Any site on a VM's chain may be Controller: the primary for a placement or an operator's
//! migration, an Intermediary for an eviction notice.

mod machine;
mod relay;
mod steps;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use nubis_protocol::envelope::now_ms;
use nubis_protocol::message::{ErrorCode, ErrorReply};
use nubis_protocol::{MigrationId, SiteId, VmId};
use tracing::Instrument as _;

use crate::journal::{MigrationPhase, MigrationRecord, VmPhase};
use crate::local::LocalSite;
use crate::peers::Peers;
use crate::roles::{internal, Roles};

use machine::Run;

/// How often Initiate transfer / Transfer verification may both fail on one offer before the
/// Controller moves on to the next offer.
pub const MAX_FAILED_ROUNDS: u32 = 3;

/// How long one migration may keep polling a transfer that makes no progress.
const STALL_LIMIT: Duration = Duration::from_secs(120);

/// How long the Controller keeps repeating a step whose outcome it must learn (a hand-over, a
/// roll-back, undoing a prepare) while the peer does not answer. Past it the migration stays
/// open in the journal and is taken up again when this site restarts.
const SETTLE_LIMIT: Duration = Duration::from_secs(300);

/// How long the Controller keeps repeating transfer rounds that find a peer with no responder
/// (its daemon is down or restarting) before that offer counts as failed. Such rounds are not
/// failed rounds: nothing acted on them.
pub const UNREACHABLE_LIMIT: Duration = Duration::from_secs(60);

/// The cap of the first pause after a round that found no responder; it doubles for each
/// further one, up to [`UNREACHABLE_BACKOFF_MAX`].
const UNREACHABLE_BACKOFF: Duration = Duration::from_millis(250);

/// The largest cap of one pause after a round that found no responder.
const UNREACHABLE_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Whether a failed request may have taken effect at the peer (it may have acted and then
/// crashed, or its answer was lost): the Controller must then learn the outcome by repeating
/// the idempotent request, never assume it did not happen. A peer with no responder is
/// repeated too: this request did not act, but an earlier one of the same step may have, and
/// only the peer, once back, can tell.
fn uncertain(e: &ErrorReply) -> bool {
    matches!(
        e.code,
        ErrorCode::Timeout | ErrorCode::Busy | ErrorCode::Internal | ErrorCode::Unreachable
    )
}

/// The reason journaled in [`MigrationPhase::Aborted`] for an error reply.
fn reason_of(e: &ErrorReply) -> String {
    format!("{} ({})", e.message, e.code.as_str())
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

impl<L: LocalSite, P: Peers> Roles<L, P> {
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
        let id = self.queue_migration(&vm, &trigger, max_bytes_per_sec)?;
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

    /// Journals a new migration of `vm` as queued and marks the VM as migrating.
    fn queue_migration(
        &self,
        vm: &VmId,
        trigger: &Trigger,
        max_bytes_per_sec: Option<u64>,
    ) -> Result<MigrationId, ErrorReply> {
        if max_bytes_per_sec == Some(0) {
            return Err(ErrorReply::new(
                ErrorCode::Malformed,
                "max_bytes_per_sec must be greater than zero (leave it out for no cap)",
            ));
        }
        let mut record = self.vm_record(vm)?;
        if record.phase == VmPhase::Migrating {
            return Err(ErrorReply::new(
                ErrorCode::Conflict,
                format!("VM {vm} is already being migrated"),
            ));
        }
        let id = MigrationId::random();
        self.journal()
            .put_migration(&MigrationRecord::queued(
                id,
                vm.clone(),
                format!("{trigger:?}"),
                max_bytes_per_sec,
                now_ms(),
            ))
            .map_err(internal)?;
        record.phase = VmPhase::Migrating;
        self.journal().put_vm(&record).map_err(internal)?;
        Ok(id)
    }

    /// Runs a migration started here, from its queue slot to its end.
    async fn run_migration(&self, id: MigrationId, trigger: Trigger) -> Result<(), ErrorReply> {
        // Beyond the site's limit, a migration waits in the queue (its position is in status).
        let permit = self
            .slots()
            .clone()
            .acquire_owned()
            .await
            .map_err(internal)?;
        let result = self.drive(id, &Run::Live(&trigger)).await;
        drop(permit);
        // Whatever happened, the VM is no longer "migrating" from this site's point of view.
        self.settle_vm_phase(id)?;
        result
    }

    /// After a restart: every migration this site controlled that had not ended is taken up
    /// again from its journaled phase — rolled forward (transfer or hand-over under way) or
    /// back (nothing irreversible happened yet). Returns how many.
    pub fn recover(self: &Arc<Self>) -> Result<usize, ErrorReply> {
        let open: Vec<MigrationRecord> = self
            .journal()
            .migrations()
            .map_err(internal)?
            .into_iter()
            .filter(|m| !m.phase.is_final())
            .collect();
        let n = open.len();
        for m in open {
            let me = self.clone();
            let span = tracing::info_span!("migration", migration.id = %m.id, vm.id = %m.vm, site.id = %me.site());
            tokio::spawn(
                async move {
                    tracing::info!(phase = ?m.phase, "resuming migration from the journal");
                    if let Err(e) = me.resume(m.id).await {
                        tracing::warn!(error = %e.message, "resumed migration ended without moving the VM");
                    }
                }
                .instrument(span),
            );
        }
        Ok(n)
    }

    /// Drives one journaled migration after a restart to its end (or until it is left open).
    async fn resume(&self, id: MigrationId) -> Result<(), ErrorReply> {
        let result = self.drive(id, &Run::Resumed).await;
        if let Err(e) = self.settle_vm_phase(id) {
            tracing::error!(migration.id = %id, error = %e.message, "cannot journal the VM's phase after a resumed migration");
        }
        result
    }

    /// Advances the migration step by step until it is over: `Ok` once committed, the reason
    /// once aborted, or the error that left it open (its outcome still to be learnt).
    async fn drive(&self, id: MigrationId, run: &Run<'_>) -> Result<(), ErrorReply> {
        loop {
            let m = self.migration_record(id)?;
            match &m.phase {
                MigrationPhase::Committed => return Ok(()),
                MigrationPhase::Aborted { reason } => {
                    return Err(ErrorReply::new(ErrorCode::Refused, reason.clone()))
                }
                _ => {}
            }
            if let Err(e) = self.advance(&m, run).await {
                self.finish_failed(id, &e)?;
                return Err(e);
            }
        }
    }

    /// The journal of migration `id`, which must exist.
    fn migration_record(&self, id: MigrationId) -> Result<MigrationRecord, ErrorReply> {
        self.journal()
            .migration(&id)
            .map_err(internal)?
            .ok_or_else(|| internal("migration journal lost"))
    }

    /// Changes the journal of migration `id` with `f` and flushes it.
    fn update_migration(
        &self,
        id: MigrationId,
        f: impl FnOnce(&mut MigrationRecord),
    ) -> Result<MigrationRecord, ErrorReply> {
        let mut m = self.migration_record(id)?;
        f(&mut m);
        m.updated_ms = now_ms();
        self.journal().put_migration(&m).map_err(internal)?;
        Ok(m)
    }

    /// Asks a running migration to stop: it aborts at its next step unless it is already
    /// committing (a hand-over is never left half done).
    pub fn cancel_migration(&self, id: &MigrationId) -> Result<MigrationPhase, ErrorReply> {
        let m = self
            .journal()
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
                match self.cancelled().lock() {
                    Ok(mut set) => {
                        set.insert(*id);
                    }
                    Err(_) => return Err(internal("the cancellation set is poisoned")),
                }
                Ok(phase)
            }
        }
    }

    /// The operator's cancellation, if one was asked for migration `id`.
    fn cancellation(&self, id: MigrationId) -> Option<ErrorReply> {
        let cancelled = match self.cancelled().lock() {
            Ok(set) => set.contains(&id),
            Err(poisoned) => poisoned.get_ref().contains(&id),
        };
        cancelled.then(|| ErrorReply::new(ErrorCode::Refused, "cancelled by the operator"))
    }

    /// The journal of a migration.
    pub fn migration_status(
        &self,
        id: &MigrationId,
    ) -> Result<Option<MigrationRecord>, ErrorReply> {
        self.journal().migration(id).map_err(internal)
    }

    /// Once a migration is over, the VM is placed (or unplaced) again rather than migrating.
    /// A migration left open mid hand-over still owns the VM.
    fn settle_vm_phase(&self, id: MigrationId) -> Result<(), ErrorReply> {
        let migration = self.journal().migration(&id).map_err(internal)?;
        if let Some(vm) = migration.filter(|m| m.phase.is_final()).map(|m| m.vm) {
            if let Some(mut record) = self.journal().vm(&vm).map_err(internal)? {
                if record.phase == VmPhase::Migrating {
                    record.phase = if record.downstream.is_some() {
                        VmPhase::Placed
                    } else {
                        VmPhase::Unplaced
                    };
                    self.journal().put_vm(&record).map_err(internal)?;
                }
            }
        }
        Ok(())
    }

    /// Marks a migration whose step failed with `error` as aborted — unless it stopped half
    /// way through a transfer, a hand-over or a roll-back, whose outcome is still to be learnt:
    /// such a migration stays open in the journal and is taken up again when this site
    /// restarts.
    fn finish_failed(&self, id: MigrationId, error: &ErrorReply) -> Result<(), ErrorReply> {
        let m = self.update_migration(id, |m| {
            if m.phase.is_final() || m.source.is_some() {
                return;
            }
            m.phase = MigrationPhase::Aborted {
                reason: reason_of(error),
            };
        })?;
        if !m.phase.is_final() {
            tracing::error!(migration.id = %id, phase = ?m.phase, error = %error.message, "migration left open; it continues when this site restarts");
        }
        Ok(())
    }
}
