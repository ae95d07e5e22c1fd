//! What the monitoring service counts: batches received and delivered by path, and batches
//! dropped by reason.

use std::sync::atomic::{AtomicU64, Ordering};

use nubis_protocol::envelope::EnvelopeError;
use serde::Serialize;

/// Why a batch was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Unknown sender or a signature that does not verify.
    Forged,
    /// A nonce seen before.
    Replayed,
    /// A timestamp outside the freshness window.
    Stale,
    /// Not an envelope, or not a batch, or oversize.
    Malformed,
    /// Signed for another subject or recipient, or a body that names another VM or primary site
    /// than its subject.
    WrongSubject,
    /// Relayed by a site that is not the VM's downstream partner here.
    WrongSender,
    /// A VM this site is not responsible for (or, at intake, that no local host runs).
    UnknownVm,
    /// A produced batch naming another primary site than the VM's record.
    Refused,
}

impl DropReason {
    /// Every reason.
    pub const ALL: [DropReason; 8] = [
        Self::Forged,
        Self::Replayed,
        Self::Stale,
        Self::Malformed,
        Self::WrongSubject,
        Self::WrongSender,
        Self::UnknownVm,
        Self::Refused,
    ];

    /// The reason's name in the `monitoring` endpoint's answer.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Forged => "forged",
            Self::Replayed => "replayed",
            Self::Stale => "stale",
            Self::Malformed => "malformed",
            Self::WrongSubject => "wrong_subject",
            Self::WrongSender => "wrong_sender",
            Self::UnknownVm => "unknown_vm",
            Self::Refused => "refused",
        }
    }

    /// The reason an envelope refused by the verifier is dropped for.
    pub fn of(e: &EnvelopeError) -> Self {
        match e {
            EnvelopeError::UnknownSender(_) | EnvelopeError::BadSignature => Self::Forged,
            EnvelopeError::Replayed => Self::Replayed,
            EnvelopeError::Stale { .. } => Self::Stale,
            EnvelopeError::WrongRecipient(_)
            | EnvelopeError::WrongSubject { .. }
            | EnvelopeError::NotAReplyToThis => Self::WrongSubject,
            _ => Self::Malformed,
        }
    }
}

/// Counters of one path a batch comes in by, or goes out by.
#[derive(Debug, Default)]
pub struct PathCounters {
    /// From (or to) the site's host agents; for delivery, unused.
    pub intake: AtomicU64,
    /// By relay.
    pub relay: AtomicU64,
    /// By the public monitoring subject.
    pub bus: AtomicU64,
}

/// What the monitoring service did so far.
#[derive(Debug, Default)]
pub struct MonitoringCounters {
    /// Batches accepted, by the way they came in.
    pub received: PathCounters,
    /// Batches sent on, by the way they went out.
    pub delivered: PathCounters,
    /// Batches that could not be published.
    pub delivery_failed: AtomicU64,
    /// Batches dropped, indexed like [`DropReason::ALL`].
    pub dropped: [AtomicU64; DropReason::ALL.len()],
    /// SLA events raised.
    pub sla_events: AtomicU64,
}

impl MonitoringCounters {
    /// Counts a dropped batch.
    pub fn drop_for(&self, reason: DropReason) {
        if let Some(i) = DropReason::ALL.iter().position(|r| *r == reason) {
            self.dropped[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Batches dropped for `reason` so far.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        DropReason::ALL
            .iter()
            .position(|r| *r == reason)
            .map(|i| self.dropped[i].load(Ordering::Relaxed))
            .unwrap_or(0)
    }
}

/// Per-VM figures.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(super) struct VmStats {
    pub(super) received: u64,
    pub(super) last_batch_ms: u64,
}
