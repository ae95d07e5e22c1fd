//! VM states in the terms of DMTF's CIM (`CIM_EnabledLogicalElement.EnabledState`), which the
//! paper's Control interface uses, and their mapping from libvirt's domain states. The states
//! themselves and their CIM numbers are the protocol's [`DmtfState`].

use virt::domain::{DomainPausedReason, DomainShutoffReason, DomainState, DomainStateReason};
use virt::enumutil::Enum;

/// The state of a VM as CIM `EnabledState` values: the protocol's own type, so the host and the
/// wire share one table of CIM numbers.
pub use nubis_protocol::message::DmtfState;

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
