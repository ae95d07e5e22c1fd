//! The Control interface (paper section II-A.2): descriptor changes and DMTF state changes of a
//! deployed VM, forwarded hop by hop from any site on its chain to the site that runs it.
//!
//! States follow the CIM System Virtualization model (DSP1057, DSP2013): the wire carries
//! snake_case names, and [`DmtfState::cim_enabled_state`] / [`StateTransition::cim_requested_state`]
//! give the CIM numbers for tools that speak CIM.

use serde::{Deserialize, Serialize};

use super::Body;
use crate::descriptor::{MonitoringSpecifier, VmDescriptor};
use crate::ids::VmId;

/// A Control-interface request for one VM.
///
/// Reply: [`ControlReply`], or an `ErrorReply` (`unknown_vm`, `refused`, `busy`, …).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlRequest {
    /// The VM.
    pub vm: VmId,
    /// What to change.
    pub change: ControlChange,
}

impl Body for ControlRequest {
    const TYPE: &'static str = "ControlRequest";
}

/// What a [`ControlRequest`] changes. On the wire a map tagged by `kind`, e.g.
/// `{"kind":"set_state","transition":"pause"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ControlChange {
    /// Change nothing; report the current state and descriptor version.
    Query,
    /// Request a DMTF state change.
    SetState {
        /// The requested transition.
        transition: StateTransition,
    },
    /// Replace the descriptor. Its `version` must be greater than the current one; the hardware
    /// changes the running VM cannot take apply at its next start.
    UpdateDescriptor {
        /// The new descriptor (boxed: it is much larger than the other changes).
        descriptor: Box<VmDescriptor>,
    },
    /// Replace only the monitoring specifiers; Producers pick them up without a restart. Bumps
    /// the descriptor version.
    SetMonitoring {
        /// The new specifiers.
        monitoring: Vec<MonitoringSpecifier>,
    },
}

/// A requested state change (CIM `RequestStateChange`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateTransition {
    /// Boot a disabled VM, or restore a suspended one.
    Start,
    /// Graceful shutdown through the guest.
    Shutdown,
    /// Immediate power off.
    PowerOff,
    /// Pause the VCPUs, keeping memory (Quiesce).
    Pause,
    /// Resume a paused VM.
    Resume,
    /// Save the memory state and stop (Enabled but Offline).
    Suspend,
    /// Graceful reboot through the guest.
    Reboot,
    /// Hard reset.
    Reset,
}

impl StateTransition {
    /// The CIM `RequestedState` value: Enabled 2, Disabled 3, Shut Down 4, Offline 6, Quiesce 9,
    /// Reboot 10, Reset 11.
    pub fn cim_requested_state(self) -> u16 {
        match self {
            Self::Start | Self::Resume => 2,
            Self::PowerOff => 3,
            Self::Shutdown => 4,
            Self::Suspend => 6,
            Self::Pause => 9,
            Self::Reboot => 10,
            Self::Reset => 11,
        }
    }
}

/// The state of a VM in DMTF terms (CIM `EnabledState`), plus `migrating`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DmtfState {
    /// Running (EnabledState 2).
    Enabled,
    /// Defined but not running (EnabledState 3).
    Disabled,
    /// Shutting down (EnabledState 4).
    ShuttingDown,
    /// Suspended to a saved state: Enabled but Offline (EnabledState 6).
    Suspended,
    /// Paused, memory kept: Quiesce (EnabledState 9).
    Paused,
    /// Starting (EnabledState 10).
    Starting,
    /// Between prepare and commit of a migration; CIM models migration as a job, so this state
    /// has no EnabledState of its own.
    Migrating,
    /// Unknown (EnabledState 0).
    Unknown,
}

impl DmtfState {
    /// The CIM `EnabledState` number, or `None` for [`DmtfState::Migrating`].
    pub fn cim_enabled_state(self) -> Option<u16> {
        Some(match self {
            Self::Unknown => 0,
            Self::Enabled => 2,
            Self::Disabled => 3,
            Self::ShuttingDown => 4,
            Self::Suspended => 6,
            Self::Paused => 9,
            Self::Starting => 10,
            Self::Migrating => return None,
        })
    }

    /// The state for a CIM `EnabledState` number; numbers without a VM meaning give `Unknown`.
    pub fn from_cim_enabled_state(n: u16) -> Self {
        match n {
            2 => Self::Enabled,
            3 => Self::Disabled,
            4 => Self::ShuttingDown,
            6 => Self::Suspended,
            9 => Self::Paused,
            10 => Self::Starting,
            _ => Self::Unknown,
        }
    }

    /// Whether a VM in this state holds a running (or paused) emulator on its host.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            Self::Enabled | Self::Paused | Self::ShuttingDown | Self::Starting
        )
    }
}

/// Reply to a [`ControlRequest`]: the VM's state after the change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlReply {
    /// The VM.
    pub vm: VmId,
    /// Its state.
    pub state: DmtfState,
    /// The descriptor version now in force.
    pub descriptor_version: u64,
}

impl Body for ControlReply {
    const TYPE: &'static str = "ControlReply";
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [DmtfState; 8] = [
        DmtfState::Enabled,
        DmtfState::Disabled,
        DmtfState::ShuttingDown,
        DmtfState::Suspended,
        DmtfState::Paused,
        DmtfState::Starting,
        DmtfState::Migrating,
        DmtfState::Unknown,
    ];

    #[test]
    fn cim_numbers_round_trip() {
        for s in ALL {
            match s.cim_enabled_state() {
                Some(n) => assert_eq!(DmtfState::from_cim_enabled_state(n), s),
                None => assert_eq!(s, DmtfState::Migrating),
            }
        }
        assert_eq!(DmtfState::Migrating.cim_enabled_state(), None);
        assert_eq!(StateTransition::Pause.cim_requested_state(), 9);
    }

    #[test]
    fn only_states_with_an_emulator_are_active() {
        let active: Vec<DmtfState> = ALL.into_iter().filter(|s| s.is_active()).collect();
        assert_eq!(
            active,
            vec![
                DmtfState::Enabled,
                DmtfState::ShuttingDown,
                DmtfState::Paused,
                DmtfState::Starting
            ]
        );
    }

    #[test]
    fn change_is_tagged_by_kind() {
        let v = serde_json::to_value(ControlChange::SetState {
            transition: StateTransition::Pause,
        })
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"kind": "set_state", "transition": "pause"})
        );
    }
}
