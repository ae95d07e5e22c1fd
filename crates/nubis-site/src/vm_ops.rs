//! What an operator asks of a site about VMs: deploy (primary placement), migrate, evict,
//! control, cancel and status — in the JSON shapes of the operator API (`subjects.md`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use nubis_protocol::descriptor::{MonitoringSpecifier, PrimaryKeys, VirtualHardware, VmDescriptor};
use nubis_protocol::envelope::now_ms;
use nubis_protocol::message::{
    ControlChange, ControlReply, ControlRequest, ErrorCode, ErrorReply, EvictionAccepted,
    EvictionNotice, NoticeId,
};
use nubis_protocol::subject::FederationOp;
use nubis_protocol::{MigrationId, VmId};
use serde::{Deserialize, Serialize};

use crate::config::EvictionPolicy;
use crate::controller::Trigger;
use crate::journal::{MigrationPhase, NextHop, VmPhase, VmRecord};
use crate::local::LocalSite;
use crate::roles::{internal, Roles};

/// How long an eviction notice gives the upstream site to move the VM.
const EVICTION_DEADLINE: Duration = Duration::from_secs(600);

/// `deploy`: a new VM for which this site is the primary.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployRequest {
    /// The VM id (unique in the federation; a-z, 0-9, '-', '_').
    pub vm: VmId,
    /// A human-readable name.
    #[serde(default)]
    pub name: String,
    /// Virtual hardware.
    pub hardware: VirtualHardware,
    /// Monitoring specifiers.
    #[serde(default)]
    pub monitoring: Vec<MonitoringSpecifier>,
    /// Free properties.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

/// `migrate`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The VM.
    pub vm: VmId,
    /// Only offers from (or through) this partner, or `"local"`-site hosts when it names this site.
    #[serde(default)]
    pub to_site: Option<nubis_protocol::SiteId>,
    /// A bandwidth cap for the file transfer, in bytes per second; none by default.
    #[serde(default)]
    pub max_bytes_per_sec: Option<u64>,
}

/// `evict` / `status` of one VM.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmRef {
    /// The VM.
    pub vm: VmId,
}

/// `control`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlOp {
    /// The VM.
    pub vm: VmId,
    /// The change.
    pub change: ControlChange,
}

/// A migration as the operator sees it.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationView {
    /// The migration id.
    pub migration: String,
    /// The VM.
    pub vm: String,
    /// Phase name.
    pub phase: String,
    /// Why it ended without moving the VM, if it did.
    pub reason: Option<String>,
    /// Bytes moved so far (never decreases).
    pub bytes_done: u64,
    /// Bytes to move.
    pub bytes_total: u64,
    /// Offers collected.
    pub offers: usize,
    /// Position in the queue of waiting migrations (0 = running).
    pub queue_position: usize,
    /// Seconds since it started.
    pub elapsed_s: f64,
    /// Transfer rounds that failed (a digest mismatch, a lost source, ...), over every offer.
    pub failed_rounds: u32,
    /// Why the last failed round failed.
    pub last_failure: Option<String>,
}

/// A VM as the operator sees it. Where it runs is shown only as this site's next hop.
#[derive(Debug, Clone, Serialize)]
pub struct VmView {
    /// The VM.
    pub vm: String,
    /// Its primary site.
    pub primary: String,
    /// Who delegated it here.
    pub upstream: Option<String>,
    /// The next hop: `site:<id>` or `host:<id>` (hosts only for this site's own).
    pub next_hop: Option<String>,
    /// Placement phase.
    pub phase: String,
    /// Descriptor version.
    pub descriptor_version: u64,
    /// Migrations of this VM controlled by this site, newest last.
    pub migrations: Vec<MigrationView>,
}

fn hop(h: &NextHop) -> String {
    match h {
        NextHop::Site(s) => format!("site:{s}"),
        NextHop::Host(h) => format!("host:{h}"),
    }
}

fn phase_name(p: &MigrationPhase) -> (String, Option<String>) {
    match p {
        MigrationPhase::Queued => ("queued".into(), None),
        MigrationPhase::Requesting => ("requesting".into(), None),
        MigrationPhase::Preparing => ("preparing".into(), None),
        MigrationPhase::Transferring { .. } => ("transferring".into(), None),
        MigrationPhase::Committing { .. } => ("committing".into(), None),
        MigrationPhase::Committed => ("committed".into(), None),
        MigrationPhase::Aborting => ("aborting".into(), None),
        MigrationPhase::Aborted { reason } => ("aborted".into(), Some(reason.clone())),
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

impl<L: LocalSite> Roles<L> {
    /// Primary placement: records the VM as this site's own and places it with the Main
    /// migration algorithm, its source being this site's image store.
    pub fn deploy(self: &Arc<Self>, req: DeployRequest) -> Result<(VmId, MigrationId), ErrorReply> {
        if self.journal.vm(&req.vm).map_err(internal)?.is_some() {
            return Err(ErrorReply::new(
                ErrorCode::Conflict,
                format!("VM {} already exists", req.vm),
            ));
        }
        let public = self.config.identity.public();
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
        self.journal
            .put_vm(&VmRecord {
                vm: req.vm.clone(),
                primary: self.site().clone(),
                upstream: None,
                downstream: None,
                descriptor,
                phase: VmPhase::Unplaced,
            })
            .map_err(internal)?;
        let id = self.start_migration(req.vm.clone(), Trigger::Placement)?;
        Ok((req.vm, id))
    }

    /// Forced migration up the chain, started here: the VM must leave this site. The site that
    /// delegated it is told (and must act); at the primary this site acts itself.
    pub fn evict(self: &Arc<Self>, vm: &VmId) -> Result<serde_json::Value, ErrorReply> {
        let record = self.journal.vm(vm).map_err(internal)?.ok_or_else(|| {
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
                self.journal.put_outgoing(&notice, up).map_err(internal)?;
                Ok(
                    serde_json::json!({"vm": vm.as_str(), "notice": notice.notice_id.to_string(), "sent_to": up.as_str()}),
                )
            }
            None => {
                let id = self.start_migration(
                    vm.clone(),
                    Trigger::Eviction {
                        from: self.site().clone(),
                    },
                )?;
                Ok(serde_json::json!({"vm": vm.as_str(), "migration": id.to_string()}))
            }
        }
    }

    /// Delivers pending outgoing eviction notices; each stays journaled until accepted.
    pub async fn deliver_evictions(&self) {
        let Ok(pending) = self.journal.outgoing() else {
            return;
        };
        for p in pending {
            let r: Result<EvictionAccepted, _> = self
                .fed
                .call(&p.from, FederationOp::MigrationEvict, &p.notice)
                .await;
            match r {
                Ok(_) => {
                    tracing::info!(vm.id = %p.notice.vm, to = %p.from, "eviction notice accepted");
                    let _ = self.journal.remove_outgoing(&p);
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
        let Ok(pending) = self.journal.evictions() else {
            return;
        };
        for p in pending {
            let record = match self.journal.vm(&p.notice.vm) {
                Ok(Some(r)) => r,
                _ => {
                    let _ = self.journal.remove_eviction(&p);
                    continue;
                }
            };
            if record.downstream != Some(NextHop::Site(p.from.clone())) {
                let _ = self.journal.remove_eviction(&p);
                continue;
            }
            if record.phase == VmPhase::Migrating {
                continue;
            }
            if let (EvictionPolicy::PassUp, Some(up)) =
                (self.config.policy.eviction, record.upstream.as_ref())
            {
                // Journaled for delivery before the incoming notice is let go, so the notice
                // is never lost between the two.
                let onward = p.notice.clone();
                match self.journal.put_outgoing(&onward, up) {
                    Ok(()) => {
                        tracing::info!(vm.id = %p.notice.vm, to = %up, "passing the eviction notice up");
                        let _ = self.journal.remove_eviction(&p);
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
        let (phase, reason) = phase_name(&m.phase);
        MigrationView {
            migration: m.id.to_string(),
            vm: m.vm.to_string(),
            phase,
            reason,
            bytes_done: m.bytes_done,
            bytes_total: m.bytes_total,
            offers: m.offers.len(),
            queue_position,
            elapsed_s: (m.updated_ms.saturating_sub(m.started_ms)) as f64 / 1000.0,
            failed_rounds: m.failed_rounds,
            last_failure: m.last_failure.clone(),
        }
    }

    /// One VM, or every VM this site is responsible for.
    pub fn vm_views(&self, only: Option<&VmId>) -> Result<Vec<VmView>, ErrorReply> {
        let migrations = self.journal.migrations().map_err(internal)?;
        let mut out = Vec::new();
        for r in self.journal.vms().map_err(internal)? {
            if only.is_some_and(|v| *v != r.vm) {
                continue;
            }
            out.push(VmView {
                vm: r.vm.to_string(),
                primary: r.primary.to_string(),
                upstream: r.upstream.as_ref().map(|u| u.to_string()),
                next_hop: r.downstream.as_ref().map(hop),
                phase: match r.phase {
                    VmPhase::Unplaced => "unplaced",
                    VmPhase::Placed => "placed",
                    VmPhase::Migrating => "migrating",
                }
                .into(),
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
        let all = self.journal.migrations().map_err(internal)?;
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
