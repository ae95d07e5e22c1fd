//! The `[retention]` table of `site.toml` and the collector it drives: how long this site
//! remembers what partners sent it (the envelope freshness window, hence the replay cache's
//! retention, and seen Migration request ids), how many such entries one partner may hold, and
//! how often expired entries are collected.
//!
//! Every table keyed by remote input is bounded per partner and collected, so a partner (a
//! competitor) cannot grow the site's state without limit, however many well-signed requests
//! it sends: a full table answers `busy` and keeps what it already accepted.

use std::sync::Arc;
use std::time::Duration;

use nubis_protocol::envelope::{now_ms, Verifier, DEFAULT_FRESHNESS_MS};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::journal::{Journal, JournalLimits};

/// The `[retention]` table: each bound applies to every partner separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retention {
    /// How far a request's timestamp may be from this site's clock (ms); nonces are remembered
    /// for twice as long.
    pub freshness_ms: u64,
    /// How often expired entries are collected (ms). Insertions collect a few expired entries
    /// each as well, so this only matters once a partner falls silent.
    pub gc_interval_ms: u64,
    /// Unexpired nonces one partner may hold in the replay cache.
    pub replay_per_partner: usize,
    /// Seen Migration request ids one partner may hold (they are remembered as long as nonces).
    pub requests_per_partner: usize,
    /// Eviction notices one partner may have pending here.
    pub evictions_per_partner: usize,
}

impl Default for Retention {
    fn default() -> Self {
        let journal = JournalLimits::default();
        Self {
            freshness_ms: DEFAULT_FRESHNESS_MS,
            gc_interval_ms: 10_000,
            replay_per_partner: nubis_protocol::replay::DEFAULT_MAX_PER_SENDER,
            requests_per_partner: journal.requests_per_partner,
            evictions_per_partner: journal.evictions_per_partner,
        }
    }
}

impl Retention {
    /// The first invalid key of the table and why, if any.
    pub fn invalid(&self) -> Option<(&'static str, &'static str)> {
        let positive = [
            ("retention.freshness_ms", self.freshness_ms),
            ("retention.gc_interval_ms", self.gc_interval_ms),
            (
                "retention.replay_per_partner",
                self.replay_per_partner as u64,
            ),
            (
                "retention.requests_per_partner",
                self.requests_per_partner as u64,
            ),
            (
                "retention.evictions_per_partner",
                self.evictions_per_partner as u64,
            ),
        ];
        positive
            .into_iter()
            .find(|(_, v)| *v == 0)
            .map(|(key, _)| (key, "must be positive"))
    }

    /// How long the replay cache remembers a nonce: twice the freshness window (an older
    /// envelope is refused as stale before the cache is asked).
    pub fn replay_retain_ms(&self) -> u64 {
        self.freshness_ms.saturating_mul(2)
    }

    /// The journal's bounds.
    pub fn journal_limits(&self) -> JournalLimits {
        JournalLimits {
            request_retain_ms: self.replay_retain_ms(),
            requests_per_partner: self.requests_per_partner,
            evictions_per_partner: self.evictions_per_partner,
        }
    }
}

/// Starts the collector on `tracker`: every `gc_interval_ms` until `cancel`, it forgets the
/// expired nonces of `verifier`'s replay cache and the expired request ids of `journal`.
pub fn spawn_collector(
    retention: &Retention,
    journal: Journal,
    verifier: Arc<Verifier>,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) {
    let every = Duration::from_millis(retention.gc_interval_ms);
    tracker.spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            let now = now_ms();
            let cache = verifier.replay_cache();
            let nonces = cache.prune(now).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot collect expired nonces; will retry");
                0
            });
            let requests = journal.collect_garbage(now).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot collect expired request ids; will retry");
                0
            });
            if nonces + requests > 0 {
                tracing::debug!(
                    nonces,
                    requests,
                    replay = cache.len(),
                    "collected expired entries"
                );
            }
        }
    });
}
