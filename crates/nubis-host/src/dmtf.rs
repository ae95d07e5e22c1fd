//! VM states in the terms of DMTF's CIM (`CIM_EnabledLogicalElement.EnabledState`), which the
//! paper's Control interface uses, and their mapping from libvirt's domain states.

use serde::{Deserialize, Serialize};
use virt::domain::{DomainPausedReason, DomainShutoffReason, DomainState, DomainStateReason};
use virt::enumutil::Enum;

/// The state of a VM as CIM `EnabledState` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DmtfState {
    /// The hypervisor cannot tell (CIM 0).
    Unknown,
    /// Running (CIM 2).
    Enabled,
    /// Defined but not running (CIM 3).
    Disabled,
    /// Being shut down (CIM 4).
    ShuttingDown,
    /// Memory state saved to a file, not running (CIM 6, "Enabled but Offline").
    Suspended,
    /// Paused in memory (CIM 9, "Quiesce").
    Paused,
    /// Being started (CIM 10).
    Starting,
}

impl DmtfState {
    /// The CIM `EnabledState` number.
    pub fn cim_value(self) -> u16 {
        match self {
            DmtfState::Unknown => 0,
            DmtfState::Enabled => 2,
            DmtfState::Disabled => 3,
            DmtfState::ShuttingDown => 4,
            DmtfState::Suspended => 6,
            DmtfState::Paused => 9,
            DmtfState::Starting => 10,
        }
    }

    /// The state for a CIM `EnabledState` number, if it is one of ours.
    pub fn from_cim_value(v: u16) -> Option<Self> {
        Some(match v {
            0 => DmtfState::Unknown,
            2 => DmtfState::Enabled,
            3 => DmtfState::Disabled,
            4 => DmtfState::ShuttingDown,
            6 => DmtfState::Suspended,
            9 => DmtfState::Paused,
            10 => DmtfState::Starting,
            _ => return None,
        })
    }

    /// Whether the domain holds a running (or paused) emulator.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            DmtfState::Enabled | DmtfState::Paused | DmtfState::ShuttingDown | DmtfState::Starting
        )
    }
}

/// Maps a libvirt state and its reason.
///
/// A crashed domain is no longer running, so it is `Disabled`; a guest suspended to RAM by its own
/// power management is quiesced in memory, so it is `Paused`; a domain paused while it is still
/// starting up is `Starting`; a domain shut off because its memory was saved is `Suspended`.
pub fn from_libvirt(
    state: Enum<DomainState, u32>,
    reason: Enum<DomainStateReason, i32>,
) -> DmtfState {
    let Enum::Known(state) = state else {
        return DmtfState::Unknown;
    };
    match state {
        DomainState::NoState => DmtfState::Unknown,
        DomainState::Running | DomainState::Blocked => DmtfState::Enabled,
        DomainState::Paused => match reason {
            Enum::Known(DomainStateReason::Paused(Enum::Known(DomainPausedReason::StartingUp))) => {
                DmtfState::Starting
            }
            _ => DmtfState::Paused,
        },
        DomainState::PMSuspended => DmtfState::Paused,
        DomainState::Shutdown => DmtfState::ShuttingDown,
        DomainState::Shutoff => match reason {
            Enum::Known(DomainStateReason::Shutoff(Enum::Known(DomainShutoffReason::Saved))) => {
                DmtfState::Suspended
            }
            _ => DmtfState::Disabled,
        },
        DomainState::Crashed => DmtfState::Disabled,
    }
}

#[cfg(test)]
mod tests {
    use virt::domain::{DomainRunningReason, DomainShutdownReason};

    use super::*;

    #[test]
    fn cim_values_round_trip() {
        for s in [
            DmtfState::Unknown,
            DmtfState::Enabled,
            DmtfState::Disabled,
            DmtfState::ShuttingDown,
            DmtfState::Suspended,
            DmtfState::Paused,
            DmtfState::Starting,
        ] {
            assert_eq!(DmtfState::from_cim_value(s.cim_value()), Some(s));
        }
        assert_eq!(DmtfState::from_cim_value(5), None);
    }

    #[test]
    fn maps_libvirt_states() {
        let running = Enum::Known(DomainStateReason::Running(Enum::Known(
            DomainRunningReason::Booted,
        )));
        assert_eq!(
            from_libvirt(Enum::Known(DomainState::Running), running),
            DmtfState::Enabled
        );
        assert_eq!(
            from_libvirt(Enum::Known(DomainState::Blocked), Enum::Unknown(0)),
            DmtfState::Enabled
        );
        let user = Enum::Known(DomainStateReason::Paused(Enum::Known(
            DomainPausedReason::User,
        )));
        assert_eq!(
            from_libvirt(Enum::Known(DomainState::Paused), user),
            DmtfState::Paused
        );
        let starting = Enum::Known(DomainStateReason::Paused(Enum::Known(
            DomainPausedReason::StartingUp,
        )));
        assert_eq!(
            from_libvirt(Enum::Known(DomainState::Paused), starting),
            DmtfState::Starting
        );
        let saved = Enum::Known(DomainStateReason::Shutoff(Enum::Known(
            DomainShutoffReason::Saved,
        )));
        assert_eq!(
            from_libvirt(Enum::Known(DomainState::Shutoff), saved),
            DmtfState::Suspended
        );
        let destroyed = Enum::Known(DomainStateReason::Shutoff(Enum::Known(
            DomainShutoffReason::Destroyed,
        )));
        assert_eq!(
            from_libvirt(Enum::Known(DomainState::Shutoff), destroyed),
            DmtfState::Disabled
        );
        let user_shutdown = Enum::Known(DomainStateReason::Shutdown(Enum::Known(
            DomainShutdownReason::User,
        )));
        assert_eq!(
            from_libvirt(Enum::Known(DomainState::Shutdown), user_shutdown),
            DmtfState::ShuttingDown
        );
        assert_eq!(
            from_libvirt(Enum::Known(DomainState::Crashed), Enum::Unknown(0)),
            DmtfState::Disabled
        );
        assert_eq!(
            from_libvirt(Enum::Known(DomainState::NoState), Enum::Unknown(0)),
            DmtfState::Unknown
        );
        assert_eq!(
            from_libvirt(Enum::Unknown(42), Enum::Unknown(0)),
            DmtfState::Unknown
        );
    }
}
