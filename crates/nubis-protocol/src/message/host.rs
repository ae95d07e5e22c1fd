//! Site-internal bodies of the host-agent subjects `nubis.site.<site>.host.<host>.<op>`: what a
//! site's Management layer asks of its own host agents (the paper's Implementation layer), and a
//! small typed client for them.
//!
//! These messages are **not signed**. They never leave the site: the subjects are not exported
//! over the leaf connection, and the site's NATS permissions let only the site daemon, its
//! transfer proxies and its host agents use them. They are the only bodies that carry host file
//! paths ([`LocalFile::path`], [`HostFile::path`]); those paths go to the site's own transfer
//! proxy and nowhere else.
//!
//! Requests and replies are MessagePack maps with named fields ([`crate::codec`]). Every reply is
//! a [`HostReply`]: `{"ok": <reply body>}` or `{"error": <ErrorReply>}`, so a client in any
//! language decodes it in one step. Every operation is idempotent, because a site retries after
//! its own crashes.
//!
//! | op ([`HostOp`]) | request | reply |
//! |---|---|---|
//! | `capacity` | [`CapacityQuery`] | [`HostCapacity`] |
//! | `vm.reserve` | [`ReserveVm`] | [`VmReserved`] |
//! | `vm.activate` | [`ActivateVm`] | [`HostVmStatus`] |
//! | `vm.prepare` | [`PrepareVm`] | [`VmPrepared`] |
//! | `vm.resume` | [`ResumeVm`] | [`HostVmStatus`] |
//! | `vm.release` | [`ReleaseVm`] | [`VmReleased`] |
//! | `vm.control` | [`ControlVm`] | [`HostVmStatus`] |
//! | `vm.update` | [`UpdateVm`] | [`VmUpdated`] |
//! | `vm.state` | [`VmStateQuery`] | [`HostVmStatus`] |
//! | `vm.list` | [`ListVms`] | [`HostVms`] |
//!
//! The agent also publishes its [`HostCapacity`] on `nubis.site.<site>.host.<host>.capacity.report`
//! when it starts, after every change of its commitments, and periodically, so the site learns
//! its hosts without polling them.

use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::control::{DmtfState, StateTransition};
use super::error::ErrorReply;
use super::migration::PrepareMode;
use super::names::HostId;
use super::proxy::LocalFile;
use super::Body;
use crate::codec::{self, CodecError};
use crate::descriptor::VmDescriptor;
use crate::ids::{SiteId, VmId};
use crate::subject::Subject;

/// The operations a host agent answers, each on `nubis.site.<site>.host.<host>.<op>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HostOp {
    /// What the host has, what its VMs hold, what is free.
    Capacity,
    /// Commit capacity for a VM and prepare its directory for incoming files.
    Reserve,
    /// Define the VM's domain and run it (restoring a saved state if one was received).
    Activate,
    /// Save or shut down the VM so its files can be transferred.
    Prepare,
    /// Run the VM again where it was, after an aborted migration.
    ResumeAfterAbort,
    /// Remove the VM, its files and its commitment.
    Release,
    /// A DMTF state change.
    Control,
    /// Apply a new descriptor version.
    Update,
    /// The VM's DMTF state.
    State,
    /// Every VM of the host.
    List,
}

impl HostOp {
    /// Every operation.
    pub const ALL: [HostOp; 10] = [
        Self::Capacity,
        Self::Reserve,
        Self::Activate,
        Self::Prepare,
        Self::ResumeAfterAbort,
        Self::Release,
        Self::Control,
        Self::Update,
        Self::State,
        Self::List,
    ];

    /// The subject tokens after `nubis.site.<site>.host.<host>.`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Capacity => "capacity",
            Self::Reserve => "vm.reserve",
            Self::Activate => "vm.activate",
            Self::Prepare => "vm.prepare",
            Self::ResumeAfterAbort => "vm.resume",
            Self::Release => "vm.release",
            Self::Control => "vm.control",
            Self::Update => "vm.update",
            Self::State => "vm.state",
            Self::List => "vm.list",
        }
    }

    /// The subject on which the host agent `host` of `site` answers this operation.
    pub fn subject(self, site: &SiteId, host: &HostId) -> Subject {
        host_subject(site, host, self.as_str())
    }
}

/// The operation tokens of the capacity report the agent publishes.
pub const CAPACITY_REPORT_OP: &str = "capacity.report";

fn host_subject(site: &SiteId, host: &HostId, op: &str) -> Subject {
    match Subject::host(site, host, op) {
        Ok(s) => s,
        // The op tokens are the constants of this module, all made of valid subject tokens
        // (checked by the `subjects_are_site_internal` test), so this cannot happen.
        Err(e) => unreachable!("invalid constant host operation token {op:?}: {e}"),
    }
}

/// `nubis.site.<site>.host.<host>.capacity.report`, where the agent publishes [`HostCapacity`].
pub fn capacity_report_subject(site: &SiteId, host: &HostId) -> Subject {
    host_subject(site, host, CAPACITY_REPORT_OP)
}

/// `nubis.site.<site>.host.*.capacity.report`: the subscription of a site to the capacity
/// reports of all its hosts.
pub fn capacity_reports_filter(site: &SiteId) -> String {
    format!("nubis.site.{site}.host.*.{CAPACITY_REPORT_OP}")
}

/// A site-internal request and the body type its successful reply carries.
pub trait HostRequest: Body {
    /// The operation, which names the subject.
    const OP: HostOp;
    /// The body of a successful reply.
    type Reply: Body;
}

/// The reply to any host-agent request. On the wire `{"ok": <body>}` or `{"error": <ErrorReply>}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostReply<T> {
    /// The operation succeeded.
    Ok(T),
    /// The operation failed; codes as in `subjects.md` section 5.
    Error(ErrorReply),
}

/// Amounts of the resources a host offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HostResources {
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Disk space in bytes (virtual sizes of the VMs' disks).
    pub disk_bytes: u64,
}

impl HostResources {
    /// What a descriptor's virtual hardware needs.
    pub fn of(descriptor: &VmDescriptor) -> Self {
        let hw = &descriptor.hardware;
        Self {
            vcpus: hw.vcpus,
            memory_mib: hw.memory_mib,
            disk_bytes: hw
                .disks
                .iter()
                .fold(0u64, |sum, d| sum.saturating_add(d.capacity_bytes)),
        }
    }
}

/// One host file of a VM, with its size: what a prepared VM hands to the transfer proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFile {
    /// Logical name (`disk-vda.qcow2`, `kernel`, `initrd`, `state.sav`).
    pub name: String,
    /// Absolute path on the host; never leaves the site.
    pub path: String,
    /// Size in bytes.
    pub size_bytes: u64,
}

/// `capacity`: ask for the host's capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CapacityQuery {}

impl Body for CapacityQuery {
    const TYPE: &'static str = "HostCapacityQuery";
}

impl HostRequest for CapacityQuery {
    const OP: HostOp = HostOp::Capacity;
    type Reply = HostCapacity;
}

/// The capacity of one host: the reply to `capacity` and the body of the capacity report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCapacity {
    /// The host.
    pub host: HostId,
    /// Everything it offers.
    pub total: HostResources,
    /// What its VMs hold.
    pub committed: HostResources,
    /// What is left.
    pub free: HostResources,
    /// How many VMs hold a reservation.
    pub vms: u32,
    /// When this was measured, in milliseconds since the Unix epoch.
    pub at_ms: u64,
}

impl Body for HostCapacity {
    const TYPE: &'static str = "HostCapacity";
}

/// `vm.reserve`: commit capacity for `vm` and create its directory. Repeating it returns the
/// same slots; a newer descriptor version replaces the stored one.
///
/// Errors: `no_capacity`, `malformed` (descriptor invalid or for another VM), `conflict` (the
/// descriptor version is older than the one held), `internal`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReserveVm {
    /// The VM.
    pub vm: VmId,
    /// Its descriptor.
    pub descriptor: Box<VmDescriptor>,
}

impl Body for ReserveVm {
    const TYPE: &'static str = "ReserveVm";
}

impl HostRequest for ReserveVm {
    const OP: HostOp = HostOp::Reserve;
    type Reply = VmReserved;
}

/// Reply to [`ReserveVm`]: where the VM's files must be written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmReserved {
    /// The VM.
    pub vm: VmId,
    /// The resources committed to it.
    pub resources: HostResources,
    /// One slot per file the VM may need: each disk (`disk-<name>.<format>`), `kernel` and
    /// `initrd` for direct kernel boot, and `state.sav` for a saved memory state.
    pub slots: Vec<LocalFile>,
}

impl Body for VmReserved {
    const TYPE: &'static str = "VmReserved";
}

/// `vm.activate`: define the domain from the descriptor and run it, restoring `state.sav` when
/// one was received. On a VM that already runs, it only reports the state.
///
/// Errors: `unknown_vm` (not reserved), `conflict` (a file is missing, or the state does not
/// allow it), `no_capacity` (a newer descriptor does not fit), `malformed`, `internal`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActivateVm {
    /// The VM.
    pub vm: VmId,
    /// Its descriptor (the newest the site holds).
    pub descriptor: Box<VmDescriptor>,
}

impl Body for ActivateVm {
    const TYPE: &'static str = "ActivateVm";
}

impl HostRequest for ActivateVm {
    const OP: HostOp = HostOp::Activate;
    type Reply = HostVmStatus;
}

/// The state of one VM on a host: the reply to `vm.activate`, `vm.resume`, `vm.control` and
/// `vm.state`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostVmStatus {
    /// The VM.
    pub vm: VmId,
    /// Its DMTF state.
    pub state: DmtfState,
    /// The descriptor version the host holds.
    pub descriptor_version: u64,
}

impl Body for HostVmStatus {
    const TYPE: &'static str = "HostVmStatus";
}

/// `vm.prepare`: save the running VM's memory to `state.sav` (`save_state`) or shut it down
/// (`shutdown`), leaving it not running, and list its files for the transfer proxy. Repeating it
/// lists the same files.
///
/// Errors: `unknown_vm`, `conflict`, `internal`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareVm {
    /// The VM.
    pub vm: VmId,
    /// Save the state or shut down.
    pub mode: PrepareMode,
}

impl Body for PrepareVm {
    const TYPE: &'static str = "PrepareVm";
}

impl HostRequest for PrepareVm {
    const OP: HostOp = HostOp::Prepare;
    type Reply = VmPrepared;
}

/// Reply to [`PrepareVm`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmPrepared {
    /// The VM.
    pub vm: VmId,
    /// Its state now (`suspended` after a save, `disabled` after a shutdown).
    pub state: DmtfState,
    /// The files that exist, with their sizes.
    pub files: Vec<HostFile>,
}

impl Body for VmPrepared {
    const TYPE: &'static str = "VmPrepared";
}

/// `vm.resume`: after an aborted migration, run the VM again here, from `state.sav` if it was
/// saved. On a VM that already runs, it only reports the state.
///
/// Errors: `unknown_vm`, `conflict`, `internal`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeVm {
    /// The VM.
    pub vm: VmId,
}

impl Body for ResumeVm {
    const TYPE: &'static str = "ResumeVm";
}

impl HostRequest for ResumeVm {
    const OP: HostOp = HostOp::ResumeAfterAbort;
    type Reply = HostVmStatus;
}

/// `vm.release`: stop and undefine the domain, delete the VM's directory and free its capacity.
/// Releasing a VM the host does not know succeeds.
///
/// Errors: `internal`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseVm {
    /// The VM.
    pub vm: VmId,
}

impl Body for ReleaseVm {
    const TYPE: &'static str = "ReleaseVm";
}

impl HostRequest for ReleaseVm {
    const OP: HostOp = HostOp::Release;
    type Reply = VmReleased;
}

/// Reply to [`ReleaseVm`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmReleased {
    /// The VM.
    pub vm: VmId,
    /// Whether the host held it before this request.
    pub was_present: bool,
    /// The resources freed (zero when it was not present).
    pub freed: HostResources,
}

impl Body for VmReleased {
    const TYPE: &'static str = "VmReleased";
}

/// `vm.control`: a DMTF state change. A transition to the state the VM is already in succeeds.
///
/// Errors: `unknown_vm`, `conflict` (the transition does not apply in the current state),
/// `internal`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlVm {
    /// The VM.
    pub vm: VmId,
    /// The requested transition.
    pub transition: StateTransition,
}

impl Body for ControlVm {
    const TYPE: &'static str = "ControlVm";
}

impl HostRequest for ControlVm {
    const OP: HostOp = HostOp::Control;
    type Reply = HostVmStatus;
}

/// `vm.update`: apply a new descriptor version. Memory changes apply at once to a running VM
/// when they stay within the memory it was started with; every other change applies when the
/// VM next starts (`restart_needed`). The same version again succeeds without change.
///
/// Errors: `unknown_vm`, `conflict` (older version), `no_capacity`, `malformed`, `internal`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateVm {
    /// The VM.
    pub vm: VmId,
    /// The new descriptor.
    pub descriptor: Box<VmDescriptor>,
}

impl Body for UpdateVm {
    const TYPE: &'static str = "UpdateVm";
}

impl HostRequest for UpdateVm {
    const OP: HostOp = HostOp::Update;
    type Reply = VmUpdated;
}

/// Reply to [`UpdateVm`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmUpdated {
    /// The VM.
    pub vm: VmId,
    /// Its state.
    pub state: DmtfState,
    /// The descriptor version now held.
    pub descriptor_version: u64,
    /// Whether some change waits for the VM's next start.
    pub restart_needed: bool,
}

impl Body for VmUpdated {
    const TYPE: &'static str = "VmUpdated";
}

/// `vm.state`: the VM's DMTF state.
///
/// Errors: `unknown_vm`, `internal`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStateQuery {
    /// The VM.
    pub vm: VmId,
}

impl Body for VmStateQuery {
    const TYPE: &'static str = "VmStateQuery";
}

impl HostRequest for VmStateQuery {
    const OP: HostOp = HostOp::State;
    type Reply = HostVmStatus;
}

/// `vm.list`: every VM the host holds (used by a site to rediscover after a restart).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ListVms {}

impl Body for ListVms {
    const TYPE: &'static str = "ListVms";
}

impl HostRequest for ListVms {
    const OP: HostOp = HostOp::List;
    type Reply = HostVms;
}

/// Reply to [`ListVms`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostVms {
    /// The host.
    pub host: HostId,
    /// Its VMs, ordered by id.
    pub vms: Vec<HostVmEntry>,
}

impl Body for HostVms {
    const TYPE: &'static str = "HostVms";
}

/// One VM in [`HostVms`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostVmEntry {
    /// The VM.
    pub vm: VmId,
    /// Its DMTF state.
    pub state: DmtfState,
    /// The descriptor version the host holds.
    pub descriptor_version: u64,
    /// What it holds.
    pub resources: HostResources,
}

/// Why a request over the bus got no reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// Nobody listens on the subject (the host agent is not running).
    #[error("no host agent answers")]
    NoResponders,
    /// No reply in time.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// Any other failure of the bus client.
    #[error("request failed: {0}")]
    Other(String),
}

/// Sends one request and waits for its reply; implemented over a NATS client by the caller, so
/// this crate needs no bus client.
pub trait HostTransport: Send + Sync {
    /// Publishes `payload` on `subject` with a reply inbox and returns the reply payload.
    fn request(
        &self,
        subject: Subject,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> impl Future<Output = Result<Vec<u8>, TransportError>> + Send;
}

/// Why a call to a host agent failed.
#[derive(Debug, thiserror::Error)]
pub enum HostCallError {
    /// The request did not reach the agent or its reply did not come back.
    #[error("host agent unreachable")]
    Transport(#[from] TransportError),
    /// The request or reply could not be encoded or decoded.
    #[error("cannot encode or decode")]
    Codec(#[from] CodecError),
    /// The agent answered with an error reply.
    #[error("host agent refused: {} ({})", .0.message, .0.code)]
    Refused(ErrorReply),
}

impl HostCallError {
    /// The error reply, when the agent sent one.
    pub fn reply(&self) -> Option<&ErrorReply> {
        match self {
            Self::Refused(e) => Some(e),
            _ => None,
        }
    }
}

/// Encodes a request body.
pub fn encode_request<R: HostRequest>(request: &R) -> Result<Vec<u8>, CodecError> {
    codec::to_vec(request)
}

/// Decodes a reply to `R`: its reply body, or the agent's error reply as
/// [`HostCallError::Refused`].
pub fn decode_reply<R: HostRequest>(bytes: &[u8]) -> Result<R::Reply, HostCallError> {
    match codec::from_slice::<HostReply<R::Reply>>(bytes)? {
        HostReply::Ok(body) => Ok(body),
        HostReply::Error(e) => Err(HostCallError::Refused(e)),
    }
}

/// Default time a client waits for quick operations.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Default time a client waits for operations that move a VM's memory or wait for its guest
/// (`vm.activate`, `vm.prepare`, `vm.resume`, `vm.control`, `vm.release`).
pub const DEFAULT_SLOW_TIMEOUT: Duration = Duration::from_secs(300);

/// A typed client for one host agent.
#[derive(Debug, Clone)]
pub struct HostClient<T> {
    transport: T,
    site: SiteId,
    host: HostId,
    timeout: Duration,
    slow_timeout: Duration,
}

impl<T: HostTransport> HostClient<T> {
    /// A client for `host` of `site` over `transport`, with the default timeouts.
    pub fn new(transport: T, site: SiteId, host: HostId) -> Self {
        Self {
            transport,
            site,
            host,
            timeout: DEFAULT_TIMEOUT,
            slow_timeout: DEFAULT_SLOW_TIMEOUT,
        }
    }

    /// Sets the timeouts for quick and for slow operations.
    pub fn with_timeouts(mut self, quick: Duration, slow: Duration) -> Self {
        self.timeout = quick;
        self.slow_timeout = slow;
        self
    }

    /// The host this client talks to.
    pub fn host(&self) -> &HostId {
        &self.host
    }

    /// Sends any request and decodes its reply.
    pub async fn call<R: HostRequest + Sync>(
        &self,
        request: &R,
    ) -> Result<R::Reply, HostCallError> {
        let timeout = match R::OP {
            HostOp::Activate
            | HostOp::Prepare
            | HostOp::ResumeAfterAbort
            | HostOp::Control
            | HostOp::Release => self.slow_timeout,
            _ => self.timeout,
        };
        let payload = encode_request(request)?;
        let bytes = self
            .transport
            .request(R::OP.subject(&self.site, &self.host), payload, timeout)
            .await?;
        decode_reply::<R>(&bytes)
    }

    /// `capacity`
    pub async fn capacity(&self) -> Result<HostCapacity, HostCallError> {
        self.call(&CapacityQuery {}).await
    }

    /// `vm.reserve`
    pub async fn reserve(&self, descriptor: &VmDescriptor) -> Result<VmReserved, HostCallError> {
        self.call(&ReserveVm {
            vm: descriptor.id.clone(),
            descriptor: Box::new(descriptor.clone()),
        })
        .await
    }

    /// `vm.activate`
    pub async fn activate(&self, descriptor: &VmDescriptor) -> Result<HostVmStatus, HostCallError> {
        self.call(&ActivateVm {
            vm: descriptor.id.clone(),
            descriptor: Box::new(descriptor.clone()),
        })
        .await
    }

    /// `vm.prepare`
    pub async fn prepare(&self, vm: &VmId, mode: PrepareMode) -> Result<VmPrepared, HostCallError> {
        self.call(&PrepareVm {
            vm: vm.clone(),
            mode,
        })
        .await
    }

    /// `vm.resume`
    pub async fn resume_after_abort(&self, vm: &VmId) -> Result<HostVmStatus, HostCallError> {
        self.call(&ResumeVm { vm: vm.clone() }).await
    }

    /// `vm.release`
    pub async fn release(&self, vm: &VmId) -> Result<VmReleased, HostCallError> {
        self.call(&ReleaseVm { vm: vm.clone() }).await
    }

    /// `vm.control`
    pub async fn control(
        &self,
        vm: &VmId,
        transition: StateTransition,
    ) -> Result<HostVmStatus, HostCallError> {
        self.call(&ControlVm {
            vm: vm.clone(),
            transition,
        })
        .await
    }

    /// `vm.update`
    pub async fn update(&self, descriptor: &VmDescriptor) -> Result<VmUpdated, HostCallError> {
        self.call(&UpdateVm {
            vm: descriptor.id.clone(),
            descriptor: Box::new(descriptor.clone()),
        })
        .await
    }

    /// `vm.state`
    pub async fn state(&self, vm: &VmId) -> Result<HostVmStatus, HostCallError> {
        self.call(&VmStateQuery { vm: vm.clone() }).await
    }

    /// `vm.list`
    pub async fn list(&self) -> Result<HostVms, HostCallError> {
        self.call(&ListVms {}).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::ErrorCode;

    #[test]
    fn subjects_are_site_internal() {
        let site = SiteId::new("a").unwrap();
        let host = HostId::new("h1").unwrap();
        for op in HostOp::ALL {
            let s = op.subject(&site, &host);
            assert!(s.as_str().starts_with("nubis.site.a.host.h1."), "{s}");
        }
        assert_eq!(
            HostOp::Prepare.subject(&site, &host).as_str(),
            "nubis.site.a.host.h1.vm.prepare"
        );
        assert_eq!(
            capacity_report_subject(&site, &host).as_str(),
            "nubis.site.a.host.h1.capacity.report"
        );
        assert_eq!(
            capacity_reports_filter(&site),
            "nubis.site.a.host.*.capacity.report"
        );
    }

    #[test]
    fn replies_are_tagged_ok_or_error() {
        let ok: HostReply<VmReleased> = HostReply::Ok(VmReleased {
            vm: VmId::new("vm-1").unwrap(),
            was_present: false,
            freed: HostResources::default(),
        });
        let v = serde_json::to_value(&ok).unwrap();
        assert_eq!(v["ok"]["vm"], "vm-1");
        let bytes = codec::to_vec(&ok).unwrap();
        assert!(decode_reply::<ReleaseVm>(&bytes).is_ok());

        let err: HostReply<VmReleased> =
            HostReply::Error(ErrorReply::new(ErrorCode::UnknownVm, "no such vm"));
        let bytes = codec::to_vec(&err).unwrap();
        match decode_reply::<ReleaseVm>(&bytes) {
            Err(HostCallError::Refused(e)) => assert_eq!(e.code, ErrorCode::UnknownVm),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decode_reply::<ReleaseVm>(&[0xc1]),
            Err(HostCallError::Codec(_))
        ));
    }
}
