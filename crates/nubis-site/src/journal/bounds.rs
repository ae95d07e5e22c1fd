//! Bounds on the journal's tables that remote input fills: the Migration request ids seen here
//! (loop detection) and the eviction notices accepted from downstream partners.
//!
//! A partner is a competitor, so each such table is bounded per partner and, where its entries
//! have a natural lifetime, collected when they expire. A full table refuses new entries
//! ([`JournalError::Full`], answered `busy`) and never drops entries it already accepted.
//!
//! Seen request ids live in two trees: `requests` (id → when it was first seen, as before) and
//! `requests_by_time` (when ‖ id → the partner it came from), which the collector walks from the
//! oldest entry so that its work is proportional to what expired, never to the table's size.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use nubis_protocol::message::{ErrorCode, ErrorReply, EvictionNotice};
use nubis_protocol::{RequestId, SiteId};

use super::{Journal, JournalError, PendingEviction};

/// How a table is bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalLimits {
    /// How long a seen Migration request id is remembered (ms): longer than any delegation
    /// chain takes to come back to this site.
    pub request_retain_ms: u64,
    /// Seen request ids one partner may hold within that time.
    pub requests_per_partner: usize,
    /// Eviction notices one partner may have pending here.
    pub evictions_per_partner: usize,
}

impl Default for JournalLimits {
    fn default() -> Self {
        Self {
            request_retain_ms: 2 * nubis_protocol::envelope::DEFAULT_FRESHNESS_MS,
            requests_per_partner: 100_000,
            evictions_per_partner: 1_024,
        }
    }
}

/// The in-memory side of the bounds: the limits and how many seen request ids each partner
/// holds (rebuilt from the store on open).
#[derive(Debug, Clone, Default)]
pub(super) struct Bounds {
    limits: JournalLimits,
    requests: Arc<Mutex<HashMap<String, usize>>>,
}

impl Bounds {
    fn requests(&self) -> MutexGuard<'_, HashMap<String, usize>> {
        // Plain counters: a panic elsewhere cannot leave them inconsistent.
        self.requests.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn time_key(ms: u64, id: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + id.len());
    key.extend_from_slice(&ms.to_be_bytes());
    key.extend_from_slice(id);
    key
}

/// The error reply for a journal failure: `busy` (retryable) for a full table, else `internal`.
pub fn refusal(e: JournalError) -> ErrorReply {
    let code = match e {
        JournalError::Full { .. } => ErrorCode::Busy,
        _ => ErrorCode::Internal,
    };
    ErrorReply::new(code, e.to_string())
}

/// Whether a Migration request id was new here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sight {
    /// First seen now (and recorded).
    First,
    /// Seen before: the request came back along a delegation loop (or was sent twice).
    Again,
}

impl Journal {
    /// Sets the bounds of the tables remote input fills.
    pub fn with_limits(mut self, limits: JournalLimits) -> Self {
        self.bounds.limits = limits;
        self
    }

    /// The bounds in force.
    pub fn limits(&self) -> JournalLimits {
        self.bounds.limits
    }

    /// Rebuilds the expiry index and the per-partner counts from the store: ids recorded before
    /// the index existed (or whose index line a crash lost) are indexed under no partner, and
    /// index lines without their id are dropped.
    pub(super) fn rebuild_bounds(&self) -> Result<(), JournalError> {
        for entry in self.requests.iter() {
            let (id, seen) = entry?;
            let seen = seen
                .as_ref()
                .try_into()
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            let _ = self.requests_by_time.compare_and_swap(
                time_key(seen, &id),
                None as Option<&[u8]>,
                Some(&[][..]),
            )?;
        }
        let mut counts: HashMap<String, usize> = HashMap::new();
        for entry in self.requests_by_time.iter() {
            let (k, partner) = entry?;
            let (seen, id) = k.split_at(8.min(k.len()));
            if self.requests.get(id)?.as_deref() != Some(seen) {
                self.requests_by_time.remove(&k)?;
                continue;
            }
            if !partner.is_empty() {
                *counts
                    .entry(String::from_utf8_lossy(&partner).into_owned())
                    .or_default() += 1;
            }
        }
        *self.bounds.requests() = counts;
        Ok(())
    }

    /// Records Migration request id `id` from `from` (`None`: this site itself), seen at
    /// `now_ms`. A partner holding as many unexpired ids as it may is refused with
    /// [`JournalError::Full`]; the site's own requests are never refused.
    pub fn sight(
        &self,
        id: &RequestId,
        from: Option<&SiteId>,
        now_ms: u64,
    ) -> Result<Sight, JournalError> {
        let key = id.to_string();
        let partner = from.map(SiteId::as_str).unwrap_or_default();
        {
            let mut counts = self.bounds.requests();
            if self.requests.contains_key(key.as_bytes())? {
                return Ok(Sight::Again);
            }
            let limit = self.bounds.limits.requests_per_partner;
            let held = |c: &HashMap<String, usize>| c.get(partner).copied().unwrap_or(0);
            if !partner.is_empty() && held(&counts) >= limit {
                // Everything expired goes before a partner is refused.
                self.sweep_requests(&mut counts, now_ms)?;
                if held(&counts) >= limit {
                    return Err(JournalError::Full {
                        table: "requests",
                        partner: partner.to_string(),
                    });
                }
            }
            let fresh = self
                .requests
                .compare_and_swap(
                    key.as_bytes(),
                    None as Option<&[u8]>,
                    Some(&now_ms.to_be_bytes()[..]),
                )?
                .is_ok();
            if !fresh {
                return Ok(Sight::Again);
            }
            self.requests_by_time
                .insert(time_key(now_ms, key.as_bytes()), partner.as_bytes())?;
            if !partner.is_empty() {
                *counts.entry(partner.to_string()).or_default() += 1;
            }
        }
        self.db.flush()?;
        Ok(Sight::First)
    }

    fn sweep_requests(
        &self,
        counts: &mut HashMap<String, usize>,
        now_ms: u64,
    ) -> Result<usize, JournalError> {
        let cutoff = now_ms.saturating_sub(self.bounds.limits.request_retain_ms);
        let mut removed = 0;
        while let Some(entry) = self.requests_by_time.range(..cutoff.to_be_bytes()).next() {
            let (k, partner) = entry?;
            self.requests_by_time.remove(&k)?;
            let (seen, id) = k.split_at(8.min(k.len()));
            let gone = self
                .requests
                .compare_and_swap(id, Some(seen), None as Option<&[u8]>)?
                .is_ok();
            if gone {
                removed += 1;
                let partner = String::from_utf8_lossy(&partner).into_owned();
                if let Some(n) = counts.get_mut(&partner) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        counts.remove(&partner);
                    }
                }
            }
        }
        Ok(removed)
    }

    /// Forgets seen request ids older than the retention; returns how many. Its work is
    /// proportional to what expired.
    pub fn collect_garbage(&self, now_ms: u64) -> Result<usize, JournalError> {
        let removed = {
            let mut counts = self.bounds.requests();
            self.sweep_requests(&mut counts, now_ms)?
        };
        if removed > 0 {
            self.db.flush()?;
        }
        Ok(removed)
    }

    /// Records an accepted eviction notice from `from`, refusing it with [`JournalError::Full`]
    /// when `from` already has as many pending notices as it may. A notice already pending is
    /// accepted again (delivery is retried until accepted).
    pub fn put_eviction_bounded(
        &self,
        notice: &EvictionNotice,
        from: &SiteId,
    ) -> Result<(), JournalError> {
        self.check_notice_bound("evictions", &self.evictions, notice, from, || {
            self.evictions()
        })?;
        self.put_eviction(notice, from)
    }

    /// Refuses a new outgoing notice to `to` when as many wait for `to` as one partner may have
    /// pending (a notice already waiting is written again).
    pub(super) fn check_outgoing_bound(
        &self,
        notice: &EvictionNotice,
        to: &SiteId,
    ) -> Result<(), JournalError> {
        self.check_notice_bound("outgoing", &self.outgoing, notice, to, || self.outgoing())
    }

    /// The bound of both notice tables: a notice `tree` already holds passes again; a new one
    /// is refused when `party` already has `evictions_per_partner` notices among `all`.
    fn check_notice_bound(
        &self,
        table: &'static str,
        tree: &sled::Tree,
        notice: &EvictionNotice,
        party: &SiteId,
        all: impl FnOnce() -> Result<Vec<PendingEviction>, JournalError>,
    ) -> Result<(), JournalError> {
        if tree.contains_key(notice.notice_id.to_string().as_bytes())? {
            return Ok(());
        }
        let held = all()?.iter().filter(|p| p.from == *party).count();
        if held >= self.bounds.limits.evictions_per_partner {
            return Err(JournalError::Full {
                table,
                partner: party.to_string(),
            });
        }
        Ok(())
    }

    /// Entries in each table, by table name (`requests`, `evictions`, `outgoing`, `routes`,
    /// `migrations`, `vms`), for the operator's status.
    pub fn table_sizes(&self) -> BTreeMap<String, u64> {
        [
            ("requests", &self.requests),
            ("evictions", &self.evictions),
            ("outgoing", &self.outgoing),
            ("routes", &self.routes),
            ("migrations", &self.migrations),
            ("vms", &self.vms),
        ]
        .into_iter()
        .map(|(name, tree)| (name.to_string(), tree.len() as u64))
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The journal at `dir` with `limits` (opened again if a test dropped a handle just before).
    fn journal(dir: &std::path::Path, limits: JournalLimits) -> Journal {
        super::super::reopen(dir).with_limits(limits)
    }

    #[test]
    fn request_ids_expire_and_a_partner_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let limits = JournalLimits {
            request_retain_ms: 1_000,
            requests_per_partner: 2,
            evictions_per_partner: 1,
        };
        let j = journal(dir.path(), limits);
        let (a, b) = (SiteId::new("a").unwrap(), SiteId::new("b").unwrap());
        let ids: Vec<RequestId> = (0..4).map(|_| RequestId::random()).collect();
        assert_eq!(j.sight(&ids[0], Some(&a), 100).unwrap(), Sight::First);
        assert_eq!(j.sight(&ids[0], Some(&b), 100).unwrap(), Sight::Again);
        assert_eq!(j.sight(&ids[1], Some(&a), 200).unwrap(), Sight::First);
        assert!(matches!(
            j.sight(&ids[2], Some(&a), 300),
            Err(JournalError::Full { .. })
        ));
        // Another partner and the site itself are not affected.
        assert_eq!(j.sight(&ids[2], Some(&b), 300).unwrap(), Sight::First);
        assert_eq!(j.sight(&ids[3], None, 300).unwrap(), Sight::First);
        // Once the first id expired, the partner may send one more; ids already accepted stay.
        assert_eq!(
            j.sight(&RequestId::random(), Some(&a), 1_150).unwrap(),
            Sight::First
        );
        assert_eq!(j.sight(&ids[1], Some(&b), 1_150).unwrap(), Sight::Again);
        assert_eq!(j.collect_garbage(1_350).unwrap(), 3);
        assert_eq!(j.table_sizes()["requests"], 1);
        drop(j);
        // The counts and the index are rebuilt on open.
        let j = journal(dir.path(), limits);
        assert!(matches!(
            j.sight(&RequestId::random(), Some(&a), 1_400),
            Ok(Sight::First)
        ));
        assert!(matches!(
            j.sight(&RequestId::random(), Some(&a), 1_400),
            Err(JournalError::Full { .. })
        ));
        assert_eq!(j.collect_garbage(10_000).unwrap(), 2);
        assert_eq!(j.table_sizes()["requests"], 0);
    }

    #[test]
    fn ids_recorded_before_the_index_existed_are_collected() {
        let dir = tempfile::tempdir().unwrap();
        {
            let j = Journal::open(dir.path()).unwrap();
            j.requests
                .insert(RequestId::random().to_string(), &5u64.to_be_bytes())
                .unwrap();
        }
        let j = journal(dir.path(), JournalLimits::default());
        assert_eq!(j.collect_garbage(u64::MAX).unwrap(), 1);
        assert_eq!(j.table_sizes()["requests"], 0);
    }

    /// A fresh eviction notice of `vm`.
    fn notice(vm: &str) -> EvictionNotice {
        EvictionNotice {
            notice_id: nubis_protocol::message::NoticeId::random(),
            vm: nubis_protocol::VmId::new(vm).unwrap(),
            reason: "test".into(),
            deadline_ms: 0,
        }
    }

    #[test]
    fn pending_evictions_are_bounded_per_partner() {
        let dir = tempfile::tempdir().unwrap();
        let limits = JournalLimits {
            evictions_per_partner: 1,
            ..JournalLimits::default()
        };
        let j = journal(dir.path(), limits);
        let (a, b) = (SiteId::new("a").unwrap(), SiteId::new("b").unwrap());
        let first = notice("v1");
        j.put_eviction_bounded(&first, &a).unwrap();
        // The same notice again is accepted; a second one is refused, the first one kept.
        j.put_eviction_bounded(&first, &a).unwrap();
        assert!(matches!(
            j.put_eviction_bounded(&notice("v2"), &a),
            Err(JournalError::Full { .. })
        ));
        j.put_eviction_bounded(&notice("v2"), &b).unwrap();
        assert_eq!(j.evictions().unwrap().len(), 2);
        j.remove_eviction(
            &j.evictions()
                .unwrap()
                .into_iter()
                .find(|p| p.from == a)
                .unwrap(),
        )
        .unwrap();
        j.put_eviction_bounded(&notice("v3"), &a).unwrap();
    }

    #[test]
    fn notices_waiting_for_one_addressee_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let limits = JournalLimits {
            evictions_per_partner: 1,
            ..JournalLimits::default()
        };
        let j = journal(dir.path(), limits);
        let (up, other) = (SiteId::new("up").unwrap(), SiteId::new("other").unwrap());
        let first = notice("v1");
        j.put_outgoing(&first, &up).unwrap();
        j.put_outgoing(&first, &up).unwrap();
        assert!(matches!(
            j.put_outgoing(&notice("v2"), &up),
            Err(JournalError::Full { .. })
        ));
        j.put_outgoing(&notice("v2"), &other).unwrap();
        assert_eq!(j.outgoing().unwrap().len(), 2);
    }
}
