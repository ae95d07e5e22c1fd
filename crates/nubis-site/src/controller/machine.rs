//! The Controller's state machine: one step per journaled [`MigrationPhase`].
//!
//! | phase | action | next phase |
//! |---|---|---|
//! | `Queued` | wait for a slot | `Requesting`; `Aborted` if cancelled |
//! | `Requesting` | Migration requests, ranking (steps 1–3) | `Preparing` with the offers; `Aborted` with none |
//! | `Preparing` | Forced migration at the Source (step 4) | `Transferring{0}` with the source; `Aborted` if it failed for sure; `Aborting` if its outcome is unknown |
//! | `Transferring{i}` | a fresh source if the last one is spent, then steps 5–7 on offer `i` | `Committing{i}`; `Transferring{i+1}` on failure; `Aborting` with no offer left or if cancelled |
//! | `Committing{i}` | commit the destination, then the source | `Committed`; `Transferring{i+1}` if the destination refused for sure |
//! | `Aborting` | release the offers, resume the source (prepared again first if its token is unknown) | `Aborted` |
//!
//! Each step reads the phase the journal names, takes that phase's action, and journals the
//! next phase before anything of it is done: after a crash the journal always names the step
//! that was under way. Every action a step repeats after a restart is idempotent at the peer
//! (by migration id or token). After a restart ([`Run::Resumed`]), a phase before the
//! transfer is not repeated: the migration is rolled back instead. A step whose outcome stays
//! unknown (a hand-over or a roll-back nobody answers) stops the machine without a new phase:
//! the migration stays open until the next restart.

use nubis_protocol::message::{ErrorCode, ErrorReply};
use nubis_protocol::MigrationId;

use crate::journal::{MigrationPhase, MigrationRecord, VmRecord};
use crate::local::LocalSite;
use crate::peers::Peers;
use crate::roles::{internal, Roles};

use super::steps::PrepareFailure;
use super::{reason_of, uncertain, Trigger};

/// How the Controller came to drive a migration.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Run<'a> {
    /// Started at this site in this process, for `Trigger`.
    Live(&'a Trigger),
    /// Taken up from the journal after a restart.
    Resumed,
}

/// The reason of a roll-back after every offer failed, the last one because of `last`.
fn every_offer_failed(last: &ErrorReply) -> ErrorReply {
    ErrorReply::new(
        ErrorCode::TransferFailed,
        format!(
            "every offer failed; the VM stays where it was (last: {})",
            reason_of(last)
        ),
    )
}

/// The reason of a roll-back after a restart before the transfer started.
fn interrupted() -> ErrorReply {
    ErrorReply::new(
        ErrorCode::Internal,
        "interrupted before the transfer started; nothing moved",
    )
}

/// The reason of a roll-back journaled before reasons were (an older journal).
fn aborted_unknown() -> String {
    reason_of(&ErrorReply::new(
        ErrorCode::TransferFailed,
        "aborted; the VM stays where it was",
    ))
}

impl<L: LocalSite, P: Peers> Roles<L, P> {
    /// Takes migration `m` one step from the phase its journal names, journaling the next
    /// phase. An error leaves the journal as it was for this step: the migration stops there.
    pub(crate) async fn advance(
        &self,
        m: &MigrationRecord,
        run: &Run<'_>,
    ) -> Result<(), ErrorReply> {
        let record = self
            .journal()
            .vm(&m.vm)
            .map_err(internal)?
            .ok_or_else(|| ErrorReply::new(ErrorCode::UnknownVm, "VM vanished"))?;
        match (&m.phase, run) {
            (MigrationPhase::Queued, Run::Live(_)) => self.step_queued(m),
            (MigrationPhase::Requesting, Run::Live(trigger)) => {
                self.step_requesting(m, &record, trigger).await
            }
            (MigrationPhase::Preparing, Run::Live(_)) => self.step_preparing(m, &record).await,
            (
                MigrationPhase::Queued | MigrationPhase::Requesting | MigrationPhase::Preparing,
                Run::Resumed,
            ) => self.step_interrupted(m, &record).await,
            (MigrationPhase::Transferring { offer }, _) => {
                self.step_transferring(m, &record, *offer).await
            }
            (MigrationPhase::Committing { offer }, _) => {
                self.step_committing(m, &record, *offer).await
            }
            (MigrationPhase::Aborting, _) => self.step_aborting(m, &record).await,
            (MigrationPhase::Committed | MigrationPhase::Aborted { .. }, _) => Ok(()),
        }
    }

    /// Queued → Requesting once a slot is free, unless the operator cancelled meanwhile.
    fn step_queued(&self, m: &MigrationRecord) -> Result<(), ErrorReply> {
        if let Some(cancel) = self.cancellation(m.id) {
            return self.end_aborted(m.id, &cancel);
        }
        self.update_migration(m.id, |r| r.phase = MigrationPhase::Requesting)?;
        Ok(())
    }

    /// Requesting → Preparing with the ranked offers (steps 1–3); Aborted when none came.
    async fn step_requesting(
        &self,
        m: &MigrationRecord,
        record: &VmRecord,
        trigger: &Trigger,
    ) -> Result<(), ErrorReply> {
        let offers = self.collect_offers(m.id, record, trigger).await?;
        if offers.is_empty() {
            let none = ErrorReply::new(ErrorCode::NoCapacity, "no site offered to take the VM");
            return self.end_aborted(m.id, &none);
        }
        let n = offers.len();
        self.update_migration(m.id, |r| {
            r.offers = offers;
            r.phase = MigrationPhase::Preparing;
        })?;
        tracing::info!(migration.id = %m.id, offers = n, "offers journaled; preparing the source");
        Ok(())
    }

    /// Preparing → Transferring{0} once the Source is prepared (step 4). A prepare that
    /// failed for sure ends the migration; one whose outcome is unknown rolls the source back.
    async fn step_preparing(
        &self,
        m: &MigrationRecord,
        record: &VmRecord,
    ) -> Result<(), ErrorReply> {
        if let Some(cancel) = self.cancellation(m.id) {
            return self.end_before_transfer(m, &cancel).await;
        }
        // A source (or an Intermediary on its chain) with no responder did not act: preparing
        // is idempotent anyway, and the Controller waits for it rather than give up.
        let prepared = self
            .waiting_for_peers(
                m.id,
                "prepare",
                |f: &PrepareFailure| &f.reply,
                || self.prepare_source(m.id, record),
            )
            .await;
        match prepared {
            Ok((source, via, total)) => {
                self.update_migration(m.id, |r| {
                    r.source = Some(source);
                    r.source_via = via;
                    r.bytes_total = total;
                    r.source_spent = false;
                })?;
                tracing::info!(migration.id = %m.id, "source journaled; starting the transfer");
                self.update_migration(m.id, |r| {
                    r.phase = MigrationPhase::Transferring { offer: 0 }
                })?;
                Ok(())
            }
            Err(f) if f.maybe_prepared => {
                tracing::info!(migration.id = %m.id, error = %f.reply.message, "prepare outcome unknown");
                self.start_aborting(m.id, &f.reply)
            }
            Err(f) => self.end_before_transfer(m, &f.reply).await,
        }
    }

    /// After a restart in a phase before the transfer: nothing moved. A source that may have
    /// been prepared is rolled back; otherwise the migration ends aborted.
    async fn step_interrupted(
        &self,
        m: &MigrationRecord,
        record: &VmRecord,
    ) -> Result<(), ErrorReply> {
        let maybe_prepared = m.phase == MigrationPhase::Preparing
            && (m.source.is_some() || record.downstream.is_some());
        if maybe_prepared {
            self.start_aborting(m.id, &interrupted())
        } else {
            self.end_before_transfer(m, &interrupted()).await
        }
    }

    /// Transferring{i}: steps 5–7 on offer `i`, then Committing{i}; on failure the next offer
    /// (with a source prepared afresh) or, with none left, Aborting.
    async fn step_transferring(
        &self,
        m: &MigrationRecord,
        record: &VmRecord,
        i: usize,
    ) -> Result<(), ErrorReply> {
        let (Some(source), Some(ranked)) = (&m.source, m.offers.get(i)) else {
            return self.end_before_transfer(m, &interrupted()).await;
        };
        if let Some(cancel) = self.cancellation(m.id) {
            return self.start_aborting(m.id, &cancel);
        }
        if m.source_spent {
            // A serving token carries one transfer: this offer needs a fresh one. Preparing
            // again is idempotent at the host; the VM stays stopped.
            let again = self
                .settle("prepare again", || async {
                    self.prepare_source(m.id, record).await.map_err(|f| f.reply)
                })
                .await;
            return match again {
                Ok((fresh, via, _)) => {
                    self.update_migration(m.id, |r| {
                        r.source = Some(fresh);
                        r.source_via = via;
                        r.source_spent = false;
                    })?;
                    Ok(())
                }
                Err(e) => {
                    tracing::warn!(migration.id = %m.id, error = %e.message, "cannot prepare the source again");
                    self.start_aborting(m.id, &every_offer_failed(&e))
                }
            };
        }
        tracing::info!(migration.id = %m.id, offer = i, "initiating the transfer");
        match self
            .transfer(m.id, &m.vm, source, m.source_via.as_ref(), ranked)
            .await
        {
            Ok(()) => {
                self.update_migration(m.id, |r| r.phase = MigrationPhase::Committing { offer: i })?;
                tracing::info!(migration.id = %m.id, offer = i, "transfer verified; committing");
                Ok(())
            }
            Err(e) => {
                if let Some(cancel) = self.cancellation(m.id) {
                    return self.start_aborting(m.id, &cancel);
                }
                tracing::info!(migration.id = %m.id, offer = i, error = %e.message, "offer failed; trying the next");
                self.next_offer(m, i, &e).await
            }
        }
    }

    /// Committing{i}: the hand-over — commit the destination (which activates the VM), then
    /// the source (which releases the old copy), then Committed. A destination that refuses
    /// for sure leaves nothing running there: the next offer is tried. An outcome that stays
    /// unknown leaves the migration open: the source is never resumed while a destination may
    /// run the VM.
    async fn step_committing(
        &self,
        m: &MigrationRecord,
        record: &VmRecord,
        i: usize,
    ) -> Result<(), ErrorReply> {
        let Some(source) = &m.source else {
            return self.end_before_transfer(m, &interrupted()).await;
        };
        let ranked = m
            .offers
            .get(i)
            .ok_or_else(|| internal("journal names a missing offer"))?;
        let committed = self
            .settle("commit at the destination", || {
                self.commit_destination_side(m.id, record, ranked)
            })
            .await;
        match committed {
            Ok(()) => {}
            Err(e) if uncertain(&e) => return Err(e),
            Err(e) => {
                tracing::warn!(migration.id = %m.id, offer = i, error = %e.message, "destination refused to activate");
                return self.next_offer(m, i, &e).await;
            }
        }
        tracing::info!(migration.id = %m.id, offer = i, "destination committed; releasing the source");
        self.settle("commit at the source", || {
            self.commit_source_side(m.id, record, source, m.source_via.as_ref())
        })
        .await?;
        self.release_own_relaying(m, true).await;
        self.release_offers(m, Some(i)).await?;
        self.update_migration(m.id, |r| r.phase = MigrationPhase::Committed)?;
        tracing::info!(migration.id = %m.id, vm.id = %m.vm, "migration committed");
        Ok(())
    }

    /// Aborting: release the offers, then resume the source where it was, then Aborted. A
    /// source whose token was never journaled (its prepare's outcome unknown) is prepared
    /// again first to learn it. Until the source confirmed, the migration stays here.
    async fn step_aborting(
        &self,
        m: &MigrationRecord,
        record: &VmRecord,
    ) -> Result<(), ErrorReply> {
        self.release_offers(m, None).await?;
        let Some(source) = &m.source else {
            tracing::info!(migration.id = %m.id, "preparing the source again to undo an interrupted prepare");
            let again = self
                .settle("prepare again", || async {
                    self.prepare_source(m.id, record).await.map_err(|f| f.reply)
                })
                .await;
            return match again {
                Ok((source, via, _)) => {
                    self.update_migration(m.id, |r| {
                        r.source = Some(source);
                        r.source_via = via;
                    })?;
                    Ok(())
                }
                // Nothing to resume that this site could reach.
                Err(e) => self.end_aborted(m.id, &e),
            };
        };
        tracing::info!(migration.id = %m.id, "aborting; resuming the source");
        self.settle("abort at the source", || {
            self.abort_source(m.id, &m.vm, source, m.source_via.as_ref())
        })
        .await?;
        self.release_own_relaying(m, false).await;
        let reason = m.abort_reason.clone().unwrap_or_else(aborted_unknown);
        self.update_migration(m.id, |r| r.phase = MigrationPhase::Aborted { reason })?;
        Ok(())
    }

    /// Offer `i` failed because of `why`: release it, then try the next one, or roll back with
    /// none left.
    async fn next_offer(
        &self,
        m: &MigrationRecord,
        i: usize,
        why: &ErrorReply,
    ) -> Result<(), ErrorReply> {
        if let Some(ranked) = m.offers.get(i) {
            self.release_offer(m.id, &m.vm, i, ranked).await?;
        }
        if i + 1 < m.offers.len() {
            self.update_migration(m.id, |r| {
                r.phase = MigrationPhase::Transferring { offer: i + 1 };
                r.source_spent = true;
            })?;
            Ok(())
        } else {
            self.start_aborting(m.id, &every_offer_failed(why))
        }
    }

    /// Journals Aborting with `reason`: the next step rolls the source back.
    fn start_aborting(&self, id: MigrationId, reason: &ErrorReply) -> Result<(), ErrorReply> {
        let reason = reason_of(reason);
        self.update_migration(id, |r| {
            r.phase = MigrationPhase::Aborting;
            r.abort_reason = Some(reason);
        })?;
        Ok(())
    }

    /// Ends a migration whose source was never prepared: its offers are released, then it is
    /// journaled aborted with `reason`.
    async fn end_before_transfer(
        &self,
        m: &MigrationRecord,
        reason: &ErrorReply,
    ) -> Result<(), ErrorReply> {
        self.release_offers(m, None).await?;
        self.end_aborted(m.id, reason)
    }

    /// Journals Aborted with `reason`.
    fn end_aborted(&self, id: MigrationId, reason: &ErrorReply) -> Result<(), ErrorReply> {
        let reason = reason_of(reason);
        self.update_migration(id, |r| r.phase = MigrationPhase::Aborted { reason })?;
        Ok(())
    }
}
