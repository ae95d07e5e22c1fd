//! Per-partner limits on what a partner may hold at this site and how fast it may ask: the
//! policy layer above the bus's per-sender handler bound. A partner is a competitor, so every
//! table a partner's requests fill at a Destination is bounded per partner: offers outstanding
//! (untaken destination routes), the vCPUs and memory reserved on local hosts for its offers,
//! the transfers it runs here at once, and the rate of its Migration requests (a token bucket).
//!
//! What a partner holds is counted from the journal's routes, never kept on the side, so the
//! counts survive a restart and can never drift from what the sweep in [`crate::expiry`]
//! releases. The site's own requests are never limited: a flooding partner cannot stop the
//! site placing its own VMs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use nubis_protocol::descriptor::VmDescriptor;
use nubis_protocol::message::{ErrorCode, ErrorReply};
use nubis_protocol::SiteId;
use serde::Deserialize;
use tokio::time::Instant;

use crate::journal::{NextHop, Route, RouteSide};

/// The `[limits]` table of `site.toml`: each value bounds every partner separately.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Offers a partner may hold here that it has not taken up (no transfer initiated yet).
    pub offers_outstanding: usize,
    /// vCPUs reserved on local hosts for one partner's offers and transfers.
    pub reserved_vcpus: u64,
    /// Memory (MiB) reserved on local hosts for one partner's offers and transfers.
    pub reserved_memory_mib: u64,
    /// Migration requests per second a partner may send, sustained.
    pub requests_per_sec: f64,
    /// Migration requests a partner may send in a burst (the token bucket's size).
    pub request_burst: u32,
    /// Transfers (Initiate transfer on an offer made here) a partner may run here at once.
    pub concurrent_transfers: usize,
    /// How long an offer made here stays reserved if nobody takes it up.
    pub offer_ttl_ms: u64,
    /// How often expired offers are looked for and released.
    pub sweep_interval_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            offers_outstanding: 32,
            reserved_vcpus: 64,
            reserved_memory_mib: 131_072,
            requests_per_sec: 10.0,
            request_burst: 20,
            concurrent_transfers: 4,
            offer_ttl_ms: crate::roles::OFFER_TTL_MS,
            sweep_interval_ms: 1_000,
        }
    }
}

impl Limits {
    /// The first invalid key of the table and why, if any.
    pub fn invalid(&self) -> Option<(&'static str, &'static str)> {
        if !(self.requests_per_sec.is_finite() && self.requests_per_sec > 0.0) {
            return Some(("limits.requests_per_sec", "must be a positive number"));
        }
        if self.request_burst == 0 {
            return Some(("limits.request_burst", "must be at least 1"));
        }
        if self.offer_ttl_ms == 0 {
            return Some(("limits.offer_ttl_ms", "must be positive"));
        }
        if self.sweep_interval_ms == 0 {
            return Some(("limits.sweep_interval_ms", "must be positive"));
        }
        None
    }
}

/// What one partner holds at this site, counted from the journal's destination routes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Holdings {
    /// Untaken offers.
    pub offers: usize,
    /// vCPUs reserved on local hosts (offers and transfers).
    pub vcpus: u64,
    /// Memory (MiB) reserved on local hosts (offers and transfers).
    pub memory_mib: u64,
    /// Transfers initiated and not yet committed or aborted.
    pub transfers: usize,
}

impl Holdings {
    /// What `partner` holds according to `routes`, each with whether it was taken up.
    pub fn of<'a>(partner: &SiteId, routes: impl IntoIterator<Item = &'a (Route, bool)>) -> Self {
        let mut h = Self::default();
        for (r, taken) in routes {
            if r.side != RouteSide::Destination || r.upstream != *partner {
                continue;
            }
            if *taken {
                h.transfers += 1;
            } else {
                h.offers += 1;
            }
            if let (NextHop::Host(_), Some(d)) = (&r.next, &r.descriptor) {
                h.add(d);
            }
        }
        h
    }

    /// Adds the reservation of one local offer of `d`.
    pub fn add(&mut self, d: &VmDescriptor) {
        self.vcpus += u64::from(d.hardware.vcpus);
        self.memory_mib += d.hardware.memory_mib;
    }

    /// The limit one more local offer of `d` would exceed, if any.
    pub fn local_shortfall(&self, d: &VmDescriptor, limits: &Limits) -> Option<&'static str> {
        if self.offers >= limits.offers_outstanding {
            Some("offers outstanding")
        } else if self.vcpus + u64::from(d.hardware.vcpus) > limits.reserved_vcpus {
            Some("reserved vCPUs")
        } else if self.memory_mib + d.hardware.memory_mib > limits.reserved_memory_mib {
            Some("reserved memory")
        } else {
            None
        }
    }

    /// Whether one more offer passed on from a partner stays within `limits`.
    pub fn room_for_delegated(&self, limits: &Limits) -> bool {
        self.offers < limits.offers_outstanding
    }
}

/// The refusal of a request that would take a partner beyond one of its limits.
pub fn quota(what: &str) -> ErrorReply {
    ErrorReply::new(
        ErrorCode::Quota,
        format!("this site's limit on {what} per partner is reached"),
    )
}

/// The refusal of a Migration request beyond the partner's rate.
pub fn too_fast() -> ErrorReply {
    ErrorReply::new(
        ErrorCode::Busy,
        "too many Migration requests from this partner; retry later",
    )
}

/// A token bucket: `burst` requests at once, refilled at `rate` per second.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Per-partner admission: a token bucket of Migration requests and a lock that makes a
/// partner's quota check and the routes it leads to one step. Both tables are keyed by the
/// verified sender, which the envelope layer admits only among pinned partners, so they hold
/// at most one entry per partner.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    buckets: Mutex<HashMap<SiteId, Bucket>>,
    locks: Mutex<HashMap<SiteId, Arc<tokio::sync::Mutex<()>>>>,
}

impl Admission {
    /// Admission under `limits`.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            buckets: Mutex::default(),
            locks: Mutex::default(),
        }
    }

    /// The limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Takes one Migration request from `partner`'s bucket at `now`; `false` if it is empty.
    pub fn try_request(&self, partner: &SiteId, now: Instant) -> bool {
        let burst = f64::from(self.limits.request_burst);
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let b = buckets.entry(partner.clone()).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.limits.requests_per_sec).min(burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Holds `partner`'s quota lock: a partner's check of its holdings and the routes that
    /// change them are one step, so its concurrent requests cannot all pass the same check.
    pub async fn lock(&self, partner: &SiteId) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(partner.clone())
            .or_default()
            .clone();
        lock.lock_owned().await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limits(rate: f64, burst: u32) -> Limits {
        Limits {
            requests_per_sec: rate,
            request_burst: burst,
            ..Limits::default()
        }
    }

    fn site(s: &str) -> SiteId {
        SiteId::new(s).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_bucket_admits_its_burst_then_refills_at_its_rate() {
        let a = Admission::new(limits(2.0, 3));
        let b = site("b");
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(a.try_request(&b, t0));
        }
        assert!(!a.try_request(&b, t0), "the burst is spent");
        // Half a second at two per second refills one request, not two.
        tokio::time::advance(Duration::from_millis(500)).await;
        let t1 = Instant::now();
        assert!(a.try_request(&b, t1));
        assert!(!a.try_request(&b, t1));
        // A long pause refills no more than the burst.
        tokio::time::advance(Duration::from_secs(60)).await;
        let t2 = Instant::now();
        for _ in 0..3 {
            assert!(a.try_request(&b, t2));
        }
        assert!(!a.try_request(&b, t2));
    }

    #[tokio::test(start_paused = true)]
    async fn each_partner_has_its_own_bucket() {
        let a = Admission::new(limits(1.0, 1));
        let now = Instant::now();
        assert!(a.try_request(&site("b"), now));
        assert!(!a.try_request(&site("b"), now));
        assert!(a.try_request(&site("c"), now), "b's flood costs c nothing");
    }

    #[test]
    fn limits_are_validated() {
        assert_eq!(Limits::default().invalid(), None);
        assert!(limits(0.0, 1).invalid().is_some());
        assert!(limits(f64::NAN, 1).invalid().is_some());
        assert!(limits(1.0, 0).invalid().is_some());
    }
}
