//! Why an operation of the host agent failed, and the error reply the site receives for it.

use nubis_protocol::descriptor::DescriptorError;
use nubis_protocol::message::{ErrorCode, ErrorReply};
use nubis_protocol::VmId;

use crate::capacity::CapacityError;
use crate::dmtf::DmtfState;
use crate::hypervisor::HypervisorError;
use crate::vm_files::VmFilesError;

/// Why an operation failed; each maps to a stable error code on the bus.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// The host holds no such VM.
    #[error("vm {0} is not on this host")]
    UnknownVm(VmId),
    /// The VM does not fit.
    #[error("the vm does not fit on this host")]
    NoCapacity(#[source] CapacityError),
    /// The descriptor names another VM than the request.
    #[error("descriptor is for vm {found}, not {expected}")]
    WrongVm {
        /// The VM of the request.
        expected: VmId,
        /// The VM of the descriptor.
        found: VmId,
    },
    /// The descriptor is invalid.
    #[error("invalid descriptor")]
    InvalidDescriptor(#[source] DescriptorError),
    /// The descriptor is older than the one the host holds.
    #[error("descriptor version {offered} is older than version {held} held here")]
    StaleDescriptor {
        /// The version offered.
        offered: u64,
        /// The version held.
        held: u64,
    },
    /// A disk format this host cannot run.
    #[error("disk format {0:?} is not supported by this host")]
    UnsupportedFormat(String),
    /// A file the VM needs is not in its directory.
    #[error("file {0} of the vm has not been received")]
    MissingFile(String),
    /// A received file cannot be used as the disk it stands for: an image that names another
    /// file (a backing or external data file), is not of its declared format, is larger than
    /// the descriptor declares, or is not a regular file. No domain is defined with it.
    #[error("disk image {name} is refused: {reason}")]
    UnsafeImage {
        /// The file's logical name.
        name: String,
        /// Why, without any path.
        reason: String,
    },
    /// The hypervisor refused or failed.
    #[error("hypervisor")]
    Hypervisor(#[from] HypervisorError),
    /// The VM's directory could not be used.
    #[error("vm files")]
    Files(#[from] VmFilesError),
    /// The directory that shares the VM's KPI filesystem with its guest could not be made.
    #[error("cannot prepare the kpi share")]
    KpiShare(#[source] nubis_kpifs::KpiError),
    /// QEMU refuses to save a guest that holds a virtio-9p share mounted, and the guest kept its
    /// KPI share mounted for longer than [`KPI_SHARE_SAVE_WAIT`](super::KPI_SHARE_SAVE_WAIT).
    #[error("the guest has its KPI share mounted; it cannot be saved until it unmounts it")]
    KpiShareMounted(#[source] HypervisorError),
    /// The VM has no domain on this host (its files are arriving, or it is prepared for a
    /// transfer): only starting it or releasing it makes sense.
    #[error("the vm has no domain on this host; start it here first")]
    NoDomain,
}

impl OpError {
    /// The error reply for the bus. Its message never contains a path or a hypervisor URI,
    /// because a site may pass it on to other sites.
    pub fn to_reply(&self) -> ErrorReply {
        let (code, message) = match self {
            Self::UnknownVm(_) => (ErrorCode::UnknownVm, self.to_string()),
            Self::NoCapacity(CapacityError::DoesNotFit { needed, free, .. }) => (
                ErrorCode::NoCapacity,
                format!(
                    "the vm needs {} vcpus, {} MiB, {} disk bytes; free are {} vcpus, {} MiB, {} disk bytes",
                    needed.vcpus,
                    needed.memory_mib,
                    needed.disk_bytes,
                    free.vcpus,
                    free.memory_mib,
                    free.disk_bytes
                ),
            ),
            Self::NoCapacity(CapacityError::AlreadyCommitted(_)) => {
                (ErrorCode::Conflict, "the vm already holds a reservation".into())
            }
            Self::WrongVm { .. } => (ErrorCode::Malformed, self.to_string()),
            Self::InvalidDescriptor(e) => (ErrorCode::Malformed, format!("invalid descriptor: {e}")),
            Self::StaleDescriptor { .. }
            | Self::MissingFile(_)
            | Self::NoDomain
            | Self::KpiShareMounted(_) => (ErrorCode::Conflict, self.to_string()),
            Self::KpiShare(_) => (
                ErrorCode::Internal,
                "cannot prepare the vm's kpi share".into(),
            ),
            Self::UnsupportedFormat(_) | Self::UnsafeImage { .. } => {
                (ErrorCode::Refused, self.to_string())
            }
            Self::Hypervisor(e) => hypervisor_reply(e),
            Self::Files(_) => (ErrorCode::Internal, "cannot use the vm's files".into()),
        };
        ErrorReply::new(code, message)
    }
}

fn hypervisor_reply(e: &HypervisorError) -> (ErrorCode, String) {
    match e {
        HypervisorError::InvalidState {
            operation, state, ..
        } => (
            ErrorCode::Conflict,
            format!(
                "cannot {operation} the vm while it is {}",
                state_name(*state)
            ),
        ),
        HypervisorError::AlreadyDefined { .. } => {
            (ErrorCode::Conflict, "the vm is already defined".into())
        }
        HypervisorError::StateFileMissing { .. } => {
            (ErrorCode::Conflict, "the vm has no saved state".into())
        }
        HypervisorError::CorruptStateFile { .. } => {
            (ErrorCode::Conflict, "the saved state is not usable".into())
        }
        HypervisorError::RestoreFailed { .. } => (
            ErrorCode::Internal,
            "the vm could not be restored from its saved state".into(),
        ),
        HypervisorError::InvalidSpec(e) => (
            ErrorCode::Malformed,
            format!("the descriptor cannot be run: {e}"),
        ),
        HypervisorError::Unsupported { operation } => (
            ErrorCode::Refused,
            format!("{operation} is not supported by this host"),
        ),
        HypervisorError::Connect { .. } | HypervisorError::ConnectionLost { .. } => (
            ErrorCode::Internal,
            "the hypervisor is not reachable".into(),
        ),
        HypervisorError::UnknownDomain { .. } => {
            (ErrorCode::Internal, "the vm's domain disappeared".into())
        }
        HypervisorError::DomainXml(_) | HypervisorError::Operation { .. } => {
            (ErrorCode::Internal, "the hypervisor failed".into())
        }
    }
}

fn state_name(s: DmtfState) -> &'static str {
    match s {
        DmtfState::Unknown => "in an unknown state",
        DmtfState::Enabled => "running",
        DmtfState::Disabled => "stopped",
        DmtfState::ShuttingDown => "shutting down",
        DmtfState::Suspended => "suspended",
        DmtfState::Paused => "paused",
        DmtfState::Starting => "starting",
        DmtfState::Migrating => "migrating",
    }
}
