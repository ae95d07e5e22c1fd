//! The operator API's requests and answers (`nubis.ops.<site>.<endpoint>`, JSON; `subjects.md`
//! section 13), defined once for the site that answers and for every reader: the `nubis` CLI,
//! the demo and the tests.
//!
//! These are plain data: no NATS client here (`nubis_bus::ops` sends them). The field names are
//! the wire's; an operator using the `nats` CLI sees exactly these objects. Requests refuse
//! unknown fields, as the site always has; answers accept them, so a reader keeps working when a
//! newer site adds a field.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::descriptor::{MonitoringSpecifier, VirtualHardware};
use crate::message::{ControlChange, DmtfState};
use crate::{MigrationId, SiteId, VmId};

/// `status`: the site's own state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteStatus {
    /// The site id.
    pub site: SiteId,
    /// The version of the site daemon.
    pub version: String,
    /// When the daemon started, in ms since the Unix epoch.
    pub started_ms: u64,
    /// How long it has run, in ms.
    pub uptime_ms: u64,
    /// The version of the nats-server the site is connected to.
    pub nats_server_version: String,
    /// Partners under contract.
    pub partners: u64,
    /// Partners whose directory heartbeat is fresh.
    pub partners_reachable: u64,
    /// The site's host agents.
    pub hosts: Vec<String>,
    /// VMs the site is responsible for.
    pub vms: u64,
    /// The site's own signing key, `ed25519:<base64>`.
    pub signing_key: String,
    /// Entries in each bounded table remote input fills (the replay cache and the journal's
    /// tables), by table name; empty from a site that does not report them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tables: BTreeMap<String, u64>,
}

/// One site as another site sees it in the directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteView {
    /// The site id.
    pub site: SiteId,
    /// Whether it is a partner under contract.
    pub partner: bool,
    /// Whether its directory entry verifies.
    pub trusted: bool,
    /// Whether its heartbeat is fresh.
    pub reachable: bool,
    /// Age of its last heartbeat, in ms; `u64::MAX` when it never appeared.
    pub heartbeat_age_ms: u64,
    /// Its Transfer proxies.
    pub proxies: Vec<String>,
    /// The key batches and messages of the site verify against, `ed25519:<base64>`: the pinned
    /// key of a partner, else the key of the site's directory entry.
    pub signing_key: Option<String>,
}

impl SiteView {
    /// Whether the site was ever seen in the directory.
    pub fn ever_seen(&self) -> bool {
        self.heartbeat_age_ms != u64::MAX
    }
}

/// `sites`: every site in the directory and every configured partner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SitesReply {
    /// The sites, by id.
    pub sites: Vec<SiteView>,
}

/// The phase of a migration as the operator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationPhase {
    /// Waiting beyond the site's `max_concurrent_migrations`.
    Queued,
    /// Migration requests are out.
    Requesting,
    /// Forced migration (prepare) at the Source.
    Preparing,
    /// Initiate transfer and Transfer verification on an offer.
    Transferring,
    /// The hand-over: committing the destination, then the source.
    Committing,
    /// Done: the VM moved.
    Committed,
    /// Rolling back.
    Aborting,
    /// Rolled back: the VM stays where it was.
    Aborted,
    /// A phase this reader does not know (a newer site); never sent by this version.
    #[serde(other)]
    Unknown,
}

impl MigrationPhase {
    /// Its name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Requesting => "requesting",
            Self::Preparing => "preparing",
            Self::Transferring => "transferring",
            Self::Committing => "committing",
            Self::Committed => "committed",
            Self::Aborting => "aborting",
            Self::Aborted => "aborted",
            Self::Unknown => "unknown",
        }
    }

    /// Whether the migration is over (committed or aborted).
    pub fn is_over(self) -> bool {
        matches!(self, Self::Committed | Self::Aborted)
    }
}

impl fmt::Display for MigrationPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A migration as the operator sees it (`vms` with `migration`, and within a [`VmView`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationView {
    /// The migration id.
    pub migration: MigrationId,
    /// The VM.
    pub vm: VmId,
    /// Where it stands.
    pub phase: MigrationPhase,
    /// Why it ended without moving the VM, if it did.
    pub reason: Option<String>,
    /// Bytes moved so far (never decreases).
    pub bytes_done: u64,
    /// Bytes to move.
    pub bytes_total: u64,
    /// Offers collected.
    pub offers: u64,
    /// Position in the queue of waiting migrations, from 1; 0 when running or over.
    pub queue_position: u64,
    /// Seconds since it started.
    pub elapsed_s: f64,
    /// Transfer rounds that failed (a digest mismatch, a lost source, ...), over every offer.
    pub failed_rounds: u32,
    /// Why the last failed round failed.
    pub last_failure: Option<String>,
}

/// The placement phase of a VM at the site asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlacementPhase {
    /// Recorded, not placed yet.
    Unplaced,
    /// Placed at the next hop.
    Placed,
    /// A migration of it is under way.
    Migrating,
    /// A phase this reader does not know (a newer site); never sent by this version.
    #[serde(other)]
    Unknown,
}

impl PlacementPhase {
    /// Its name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unplaced => "unplaced",
            Self::Placed => "placed",
            Self::Migrating => "migrating",
            Self::Unknown => "unknown",
        }
    }
}

impl fmt::Display for PlacementPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A VM as the operator sees it. Where it runs is shown only as the site's next hop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmView {
    /// The VM.
    pub vm: VmId,
    /// Its primary site.
    pub primary: SiteId,
    /// The site that delegated it here.
    pub upstream: Option<SiteId>,
    /// The next hop: `site:<id>` or `host:<id>` (hosts only of the site asked).
    pub next_hop: Option<String>,
    /// Placement phase.
    pub phase: PlacementPhase,
    /// Descriptor version.
    pub descriptor_version: u64,
    /// Migrations of this VM controlled by the site, newest last.
    pub migrations: Vec<MigrationView>,
}

/// `vms` without `migration`: one VM or every VM the site is responsible for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmsReply {
    /// The VMs.
    pub vms: Vec<VmView>,
}

/// The request of `vms`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmsQuery {
    /// Only this VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmId>,
    /// One migration instead of VMs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationId>,
}

/// `deploy`: a new VM for which the site is the primary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The VM.
    pub vm: VmId,
    /// Only offers from (or through) this partner, or the site's own hosts when it names the
    /// site itself.
    #[serde(default)]
    pub to_site: Option<SiteId>,
    /// A bandwidth cap for the file transfer, in bytes per second; none by default.
    #[serde(default)]
    pub max_bytes_per_sec: Option<u64>,
}

/// `evict`, and any request naming one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmRef {
    /// The VM.
    pub vm: VmId,
}

/// `control`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlOp {
    /// The VM.
    pub vm: VmId,
    /// The change.
    pub change: ControlChange,
}

/// `cancel`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {
    /// The migration.
    pub migration: MigrationId,
}

/// `usage`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    /// The VM.
    pub vm: VmId,
    /// Start of the period, ms since the Unix epoch (default 0).
    #[serde(default)]
    pub from_ms: u64,
    /// End of the period, ms since the Unix epoch (default now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_ms: Option<u64>,
}

/// `image_put`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImagePutRequest {
    /// The object of the upload bucket, and the name in the store.
    pub name: String,
    /// Replace an image of the same name.
    #[serde(default)]
    pub replace: bool,
}

/// `deploy` and `migrate` (and `evict` at the primary): a migration started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationStarted {
    /// The VM.
    pub vm: VmId,
    /// The migration, to follow with `vms`.
    pub migration: MigrationId,
}

/// `evict`: a notice sent up the chain, or at the primary a migration started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvictReply {
    /// The VM.
    pub vm: VmId,
    /// The eviction notice sent to the upstream site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notice: Option<String>,
    /// The upstream site it went to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_to: Option<SiteId>,
    /// The migration started, at the primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationId>,
}

/// `control`: the VM's state after the change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlView {
    /// The VM.
    pub vm: VmId,
    /// Its state.
    pub state: DmtfState,
    /// The same as CIM `EnabledState`; `null` for `migrating`, which has none.
    pub cim_enabled_state: Option<u16>,
    /// The descriptor version now in force.
    pub descriptor_version: u64,
}

/// `cancel`: the migration aborts at its next step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelReply {
    /// The migration.
    pub migration: MigrationId,
    /// The phase it was in, as the Controller names it.
    pub cancelling_in_phase: String,
}

/// The integrated usage of one VM over a period.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// ∫ `cpu.cores` dt, in core-hours.
    pub cpu_core_hours: f64,
    /// ∫ `mem.allocated_bytes` dt, in GiB-hours.
    pub memory_gib_hours: f64,
    /// ∫ `disk.read_bytes_rate` dt, in bytes.
    pub disk_read_bytes: f64,
    /// ∫ `disk.write_bytes_rate` dt, in bytes.
    pub disk_written_bytes: f64,
    /// ∫ `net.rx_bytes_rate` dt, in bytes.
    pub net_rx_bytes: f64,
    /// ∫ `net.tx_bytes_rate` dt, in bytes.
    pub net_tx_bytes: f64,
    /// Distinct batches stored within the period.
    pub batches: u64,
    /// Raw samples within the period plus processed values whose window overlaps it.
    pub samples: u64,
    /// Batches within the period whose sealed payload the site cannot open.
    pub sealed_unreadable: u64,
}

/// `usage`: a VM's integrated usage over a period, from the site's accounting stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageReport {
    /// The VM.
    pub vm: VmId,
    /// Start of the period (inclusive, ms since the Unix epoch).
    pub from_ms: u64,
    /// End of the period (exclusive, ms since the Unix epoch).
    pub to_ms: u64,
    /// The integrated usage (its fields sit beside `vm` in the JSON).
    #[serde(flatten)]
    pub usage: Usage,
}

/// One image of the site's image store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageView {
    /// The image's name (its file name in the store).
    pub name: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// When it was last written, in ms since the Unix epoch.
    pub modified_ms: u64,
    /// SHA-256 of its content, hex: known right after an import, not sent in a listing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// `images`: the site's image store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImagesReply {
    /// The images, by name.
    pub images: Vec<ImageView>,
}

/// `image_put`: the image imported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImagePutReply {
    /// The image, with its digest.
    pub image: ImageView,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use serde_json::json;

    fn migration_json(phase: &str) -> serde_json::Value {
        json!({"migration": "9a2b0c1d2e3f40516273849a0b1c2d3e", "vm": "vm-1", "phase": phase,
               "reason": null, "bytes_done": 10, "bytes_total": 20, "offers": 2,
               "queue_position": 0, "elapsed_s": 1.5, "failed_rounds": 0, "last_failure": null})
    }

    #[test]
    fn a_migration_view_keeps_the_wire_field_names() {
        let wire = migration_json("transferring");
        let view: MigrationView = serde_json::from_value(wire.clone()).unwrap();
        assert_eq!(view.phase, MigrationPhase::Transferring);
        assert!(!view.phase.is_over());
        assert_eq!(serde_json::to_value(&view).unwrap(), wire);
    }

    #[test]
    fn an_unknown_phase_reads_as_unknown() {
        let view: MigrationView = serde_json::from_value(migration_json("teleporting")).unwrap();
        assert_eq!(view.phase, MigrationPhase::Unknown);
        let vm: VmView = serde_json::from_value(json!({"vm": "vm-1", "primary": "a",
            "upstream": null, "next_hop": "site:b", "phase": "hovering",
            "descriptor_version": 1, "migrations": []}))
        .unwrap();
        assert_eq!(vm.phase, PlacementPhase::Unknown);
    }

    #[test]
    fn every_phase_name_round_trips() {
        for phase in [
            MigrationPhase::Queued,
            MigrationPhase::Requesting,
            MigrationPhase::Preparing,
            MigrationPhase::Transferring,
            MigrationPhase::Committing,
            MigrationPhase::Committed,
            MigrationPhase::Aborting,
            MigrationPhase::Aborted,
        ] {
            let text = serde_json::to_value(phase).unwrap();
            assert_eq!(text, json!(phase.as_str()));
            assert_eq!(
                serde_json::from_value::<MigrationPhase>(text).unwrap(),
                phase
            );
        }
    }

    #[test]
    fn answers_accept_fields_added_later_and_requests_refuse_unknown_ones() {
        let mut wire = serde_json::to_value(ImageView {
            name: "a.qcow2".into(),
            bytes: 3,
            modified_ms: 4,
            sha256: None,
        })
        .unwrap();
        assert_eq!(
            wire,
            json!({"name": "a.qcow2", "bytes": 3, "modified_ms": 4})
        );
        wire["owner"] = json!("x");
        assert!(serde_json::from_value::<ImageView>(wire).is_ok());
        assert!(serde_json::from_value::<VmsQuery>(json!({"vm": "v", "x": 1})).is_err());
        assert_eq!(
            serde_json::to_value(VmsQuery::default()).unwrap(),
            json!({})
        );
    }

    #[test]
    fn an_evict_reply_has_the_fields_of_its_case_only() {
        let at_primary = EvictReply {
            vm: VmId::new("vm-1").unwrap(),
            notice: None,
            sent_to: None,
            migration: Some(MigrationId::random()),
        };
        let wire = serde_json::to_value(&at_primary).unwrap();
        assert_eq!(wire.as_object().unwrap().len(), 2, "{wire}");
        let sent = json!({"vm": "vm-1", "notice": "n-1", "sent_to": "b"});
        let reply: EvictReply = serde_json::from_value(sent.clone()).unwrap();
        assert_eq!(serde_json::to_value(reply).unwrap(), sent);
    }

    #[test]
    fn a_usage_report_round_trips() {
        let wire = json!({"vm": "vm-1", "from_ms": 0, "to_ms": 10, "cpu_core_hours": 0.5,
            "memory_gib_hours": 0.25, "disk_read_bytes": 1.0, "disk_written_bytes": 2.0,
            "net_rx_bytes": 3.0, "net_tx_bytes": 4.0, "batches": 5, "samples": 6,
            "sealed_unreadable": 0});
        let report: UsageReport = serde_json::from_value(wire.clone()).unwrap();
        assert_eq!(serde_json::to_value(report).unwrap(), wire);
    }
}
