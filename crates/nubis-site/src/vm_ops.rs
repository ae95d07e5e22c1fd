//! What an operator asks of a site about VMs: deploy (primary placement), migrate, evict,
//! control, cancel and status — in the JSON shapes of the operator API (`subjects.md`).

use std::sync::Arc;
use std::time::Duration;

use nubis_protocol::descriptor::{PrimaryKeys, VmDescriptor};
use nubis_protocol::envelope::now_ms;
use nubis_protocol::message::{
    ControlReply, ControlRequest, ErrorCode, ErrorReply, EvictionAccepted, EvictionNotice, NoticeId,
};
pub use nubis_protocol::ops::{
    ControlOp, DeployRequest, MigrateRequest, MigrationView, VmRef, VmView,
};
use nubis_protocol::ops::{EvictReply, MigrationPhase as PhaseView, PlacementPhase};
use nubis_protocol::subject::FederationOp;
use nubis_protocol::{MigrationId, VmId};

use crate::config::EvictionPolicy;
use crate::controller::Trigger;
use crate::journal::{MigrationPhase, NextHop, VmPhase, VmRecord};
use crate::local::LocalSite;
use crate::peers::Peers;
use crate::roles::{internal, Roles};

/// How long an eviction notice gives the upstream site to move the VM.
const EVICTION_DEADLINE: Duration = Duration::from_secs(600);

fn hop(h: &NextHop) -> String {
    match h {
        NextHop::Site(s) => format!("site:{s}"),
        NextHop::Host(h) => format!("host:{h}"),
    }
}

fn phase_view(p: &MigrationPhase) -> (PhaseView, Option<String>) {
    match p {
        MigrationPhase::Queued => (PhaseView::Queued, None),
        MigrationPhase::Requesting => (PhaseView::Requesting, None),
        MigrationPhase::Preparing => (PhaseView::Preparing, None),
        MigrationPhase::Transferring { .. } => (PhaseView::Transferring, None),
        MigrationPhase::Committing { .. } => (PhaseView::Committing, None),
        MigrationPhase::Committed => (PhaseView::Committed, None),
        MigrationPhase::Aborting => (PhaseView::Aborting, None),
        MigrationPhase::Aborted { reason } => (PhaseView::Aborted, Some(reason.clone())),
    }
}

/// 1-based position of a queued migration among the queued ones (oldest first); 0 when running
/// or over.
fn queue_position(
    all: &[crate::journal::MigrationRecord],
    m: &crate::journal::MigrationRecord,
) -> usize {
    if m.phase != MigrationPhase::Queued {
        return 0;
    }
    all.iter()
        .filter(|o| o.phase == MigrationPhase::Queued && o.started_ms <= m.started_ms)
        .count()
}

impl<L: LocalSite, P: Peers> Roles<L, P> {
    /// Primary placement: records the VM as this site's own and places it with the Main
    /// migration algorithm, its source being this site's image store.
    pub fn deploy(self: &Arc<Self>, req: DeployRequest) -> Result<(VmId, MigrationId), ErrorReply> {
        if self.journal().vm(&req.vm).map_err(internal)?.is_some() {
            return Err(ErrorReply::new(
                ErrorCode::Conflict,
                format!("VM {} already exists", req.vm),
            ));
        }
        let public = self.config().identity.public();
        let descriptor = VmDescriptor {
            id: req.vm.clone(),
            name: if req.name.is_empty() {
                req.vm.to_string()
            } else {
                req.name
            },
            version: 1,
            primary_site: self.site().clone(),
            primary_keys: PrimaryKeys {
                signing: public.signing.to_bytes(),
                sealing: public.sealing,
            },
            hardware: req.hardware,
            monitoring: req.monitoring,
            properties: req.properties,
        };
        descriptor.validate().map_err(|e| {
            ErrorReply::new(ErrorCode::Malformed, format!("invalid VM descriptor: {e}"))
        })?;
        self.journal()
            .put_vm(&VmRecord {
                vm: req.vm.clone(),
                primary: self.site().clone(),
                upstream: None,
                downstream: None,
                former_downstream: None,
                descriptor,
                phase: VmPhase::Unplaced,
            })
            .map_err(internal)?;
        let id = self.start_migration(req.vm.clone(), Trigger::Placement)?;
        Ok((req.vm, id))
    }

    /// Forced migration up the chain, started here: the VM must leave this site. The site that
    /// delegated it is told (and must act); at the primary this site acts itself.
    pub fn evict(self: &Arc<Self>, vm: &VmId) -> Result<EvictReply, ErrorReply> {
        let record = self.journal().vm(vm).map_err(internal)?.ok_or_else(|| {
            ErrorReply::new(
                ErrorCode::UnknownVm,
                format!("VM {vm} is not known at this site"),
            )
        })?;
        match &record.upstream {
            Some(up) => {
                let notice = EvictionNotice {
                    notice_id: NoticeId::random(),
                    vm: vm.clone(),
                    reason: "evicted by the operator of the running site".into(),
                    deadline_ms: now_ms() + EVICTION_DEADLINE.as_millis() as u64,
                };
                // A full table of notices to `up` is `busy`: the operator may try again later.
                self.journal()
                    .put_outgoing(&notice, up)
                    .map_err(crate::journal::refusal)?;
                Ok(EvictReply {
                    vm: vm.clone(),
                    notice: Some(notice.notice_id.to_string()),
                    sent_to: Some(up.clone()),
                    migration: None,
                })
            }
            None => {
                let id = self.start_migration(
                    vm.clone(),
                    Trigger::Eviction {
                        from: self.site().clone(),
                    },
                )?;
                Ok(EvictReply {
                    vm: vm.clone(),
                    notice: None,
                    sent_to: None,
                    migration: Some(id),
                })
            }
        }
    }

    /// Delivers pending outgoing eviction notices; each stays journaled until accepted.
    pub async fn deliver_evictions(&self) {
        let Ok(pending) = self.journal().outgoing() else {
            return;
        };
        for p in pending {
            let r: Result<EvictionAccepted, _> = self
                .peers()
                .call(&p.from, FederationOp::MigrationEvict, &p.notice)
                .await;
            match r {
                Ok(_) => {
                    tracing::info!(vm.id = %p.notice.vm, to = %p.from, "eviction notice accepted");
                    if let Err(e) = self.journal().remove_outgoing(&p) {
                        tracing::warn!(vm.id = %p.notice.vm, error = %e, "cannot forget a delivered eviction notice; it will be delivered again");
                    }
                }
                Err(e) => {
                    tracing::warn!(vm.id = %p.notice.vm, to = %p.from, error = %e, "eviction notice not accepted yet; will retry")
                }
            }
        }
    }

    /// Acts on accepted eviction notices: starts a migration for each VM still delegated to the
    /// evicting site — or, when this site's policy says `pass_up` and it has an upstream, hands
    /// the notice on to that upstream (delivered by [`Roles::deliver_evictions`] until accepted)
    /// — and forgets notices whose VM has moved. The primary site always migrates.
    pub fn act_on_evictions(self: &Arc<Self>) {
        let Ok(pending) = self.journal().evictions() else {
            return;
        };
        let forget = |p: &_| {
            if let Err(e) = self.journal().remove_eviction(p) {
                tracing::warn!(error = %e, "cannot forget a settled eviction notice; it will be looked at again");
            }
        };
        for p in pending {
            let record = match self.journal().vm(&p.notice.vm) {
                Ok(Some(r)) => r,
                _ => {
                    forget(&p);
                    continue;
                }
            };
            if record.downstream != Some(NextHop::Site(p.from.clone())) {
                forget(&p);
                continue;
            }
            if record.phase == VmPhase::Migrating {
                continue;
            }
            if let (EvictionPolicy::PassUp, Some(up)) =
                (self.config().policy.eviction, record.upstream.as_ref())
            {
                // Journaled for delivery before the incoming notice is let go, so the notice
                // is never lost between the two.
                let onward = p.notice.clone();
                match self.journal().put_outgoing(&onward, up) {
                    Ok(()) => {
                        tracing::info!(vm.id = %p.notice.vm, to = %up, "passing the eviction notice up");
                        forget(&p);
                    }
                    Err(e) => {
                        tracing::warn!(vm.id = %p.notice.vm, error = %e, "cannot pass the eviction notice up yet")
                    }
                }
                continue;
            }
            match self.start_migration(
                p.notice.vm.clone(),
                Trigger::Eviction {
                    from: p.from.clone(),
                },
            ) {
                Ok(id) => {
                    tracing::info!(vm.id = %p.notice.vm, migration.id = %id, "acting on eviction notice")
                }
                Err(e) => {
                    tracing::warn!(vm.id = %p.notice.vm, error = %e.message, "cannot act on eviction notice yet")
                }
            }
        }
    }

    /// The Control interface from this site's operator.
    pub async fn control_vm(&self, op: ControlOp) -> Result<ControlReply, ErrorReply> {
        let me = self.site().clone();
        self.control(
            &me,
            ControlRequest {
                vm: op.vm,
                change: op.change,
            },
        )
        .await
    }

    fn migration_view(
        &self,
        m: &crate::journal::MigrationRecord,
        queue_position: usize,
    ) -> MigrationView {
        let (phase, reason) = phase_view(&m.phase);
        MigrationView {
            migration: m.id,
            vm: m.vm.clone(),
            phase,
            reason,
            bytes_done: m.bytes_done,
            bytes_total: m.bytes_total,
            offers: m.offers.len() as u64,
            queue_position: queue_position as u64,
            elapsed_s: (m.updated_ms.saturating_sub(m.started_ms)) as f64 / 1000.0,
            failed_rounds: m.failed_rounds,
            last_failure: m.last_failure.clone(),
        }
    }

    /// One VM, or every VM this site is responsible for.
    pub fn vm_views(&self, only: Option<&VmId>) -> Result<Vec<VmView>, ErrorReply> {
        let migrations = self.journal().migrations().map_err(internal)?;
        let mut out = Vec::new();
        for r in self.journal().vms().map_err(internal)? {
            if only.is_some_and(|v| *v != r.vm) {
                continue;
            }
            out.push(VmView {
                vm: r.vm.clone(),
                primary: r.primary.clone(),
                upstream: r.upstream.clone(),
                next_hop: r.downstream.as_ref().map(hop),
                phase: match r.phase {
                    VmPhase::Unplaced => PlacementPhase::Unplaced,
                    VmPhase::Placed => PlacementPhase::Placed,
                    VmPhase::Migrating => PlacementPhase::Migrating,
                },
                descriptor_version: r.descriptor.version,
                migrations: migrations
                    .iter()
                    .filter(|m| m.vm == r.vm)
                    .map(|m| self.migration_view(m, queue_position(&migrations, m)))
                    .collect(),
            });
        }
        if let Some(vm) = only {
            if out.is_empty() {
                return Err(ErrorReply::new(
                    ErrorCode::UnknownVm,
                    format!("VM {vm} is not known at this site"),
                ));
            }
        }
        Ok(out)
    }

    /// One migration.
    pub fn migration_view_of(&self, id: &MigrationId) -> Result<MigrationView, ErrorReply> {
        let all = self.journal().migrations().map_err(internal)?;
        all.iter()
            .find(|m| m.id == *id)
            .map(|m| self.migration_view(m, queue_position(&all, m)))
            .ok_or_else(|| {
                ErrorReply::new(
                    ErrorCode::UnknownVm,
                    format!("no migration {id} at this site"),
                )
            })
    }
}
