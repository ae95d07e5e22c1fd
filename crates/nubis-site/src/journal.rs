//! The site's crash-safe journal (sled): VM responsibility records, token routes, migrations in
//! progress, seen Migration requests and pending eviction notices.
//!
//! Every role writes the step it is about to take here, flushed to disk, before acting, so that
//! after a crash (even `kill -9`) the site resumes or rolls back from what the journal says.

use std::path::Path;

use nubis_protocol::codec;
use nubis_protocol::descriptor::VmDescriptor;
use nubis_protocol::message::{Endpoint, EvictionNotice, HostId, Offer, TransferToken};
use nubis_protocol::{MigrationId, RequestId, SiteId, VmId};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

mod bounds;

pub use bounds::{refusal, JournalLimits, Sight};

/// Why the journal failed.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The store failed.
    #[error("journal store")]
    Store(#[from] sled::Error),
    /// A record could not be encoded or decoded.
    #[error("journal record")]
    Codec(#[from] codec::CodecError),
    /// A table remote input fills holds as many entries of this partner as it may.
    #[error("table {table} is full for partner {partner}")]
    Full {
        /// The table.
        table: &'static str,
        /// The partner.
        partner: String,
    },
}

/// The next hop towards where a VM runs (or will run): a partner site or a local host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "id", rename_all = "snake_case")]
pub enum NextHop {
    /// A partner site the VM was delegated to.
    Site(SiteId),
    /// A host of this site.
    Host(HostId),
}

/// Where a VM stands, as far as this site is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmPhase {
    /// Known (deployed at the primary) but not placed anywhere yet.
    Unplaced,
    /// Placed: running (or stopped) at the next hop.
    Placed,
    /// A migration of it is in progress.
    Migrating,
}

/// This site's record of a VM it is responsible for (paper: the chain of responsibility).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmRecord {
    /// The VM.
    pub vm: VmId,
    /// Its primary site.
    pub primary: SiteId,
    /// The site that delegated it here (`None` at the primary).
    pub upstream: Option<SiteId>,
    /// The next hop towards it (`None` while unplaced).
    pub downstream: Option<NextHop>,
    /// The partner that was the next hop before the VM last moved away from it, and until when
    /// (ms since the epoch) its monitoring batches are still taken: what it stored before the
    /// hand-over may still be on its way up ([`FORMER_DOWNSTREAM_GRACE_MS`]).
    #[serde(default)]
    pub former_downstream: Option<(SiteId, u64)>,
    /// The current descriptor.
    pub descriptor: VmDescriptor,
    /// Where it stands.
    pub phase: VmPhase,
}

/// How long a VM's former downstream partner's monitoring batches are still taken after the VM
/// moved away from it: longer than its outbox keeps sending a refused batch.
pub const FORMER_DOWNSTREAM_GRACE_MS: u64 = 15 * 60 * 1000;

impl VmRecord {
    /// This record with `next` as its next hop; a partner that was the next hop before stays
    /// the former downstream for [`FORMER_DOWNSTREAM_GRACE_MS`] from `now_ms`.
    pub fn repointed(mut self, next: NextHop, now_ms: u64) -> Self {
        if let Some(NextHop::Site(old)) = &self.downstream {
            if self.downstream.as_ref() != Some(&next) {
                self.former_downstream = Some((old.clone(), now_ms + FORMER_DOWNSTREAM_GRACE_MS));
            }
        }
        self.downstream = Some(next);
        self
    }

    /// Whether `site` may still pass up monitoring batches of this VM at `now_ms`: it is the
    /// next hop, or was until a moment ago.
    pub fn hears_from(&self, site: &SiteId, now_ms: u64) -> bool {
        self.downstream.as_ref() == Some(&NextHop::Site(site.clone()))
            || self
                .former_downstream
                .as_ref()
                .is_some_and(|(s, until)| s == site && now_ms < *until)
    }
}

/// Which end of a migration a token belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteSide {
    /// A destination offer: files will be received.
    Destination,
    /// A prepared source: files are served.
    Source,
}

/// How this site forwards operations that name a transfer token (Initiate transfer, Transfer
/// verification, commit, abort): to the partner it got the token from, or to a local host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Route {
    /// The token.
    pub token: TransferToken,
    /// The migration it belongs to.
    pub migration_id: MigrationId,
    /// The VM.
    pub vm: VmId,
    /// Which end.
    pub side: RouteSide,
    /// Where to forward.
    pub next: NextHop,
    /// The site that asked for it (receives the VM's responsibility on commit).
    pub upstream: SiteId,
    /// The VM's descriptor as offered (a destination needs it to activate the VM).
    pub descriptor: Option<VmDescriptor>,
    /// When an unused destination offer may be forgotten (ms since the epoch).
    pub expires_ms: u64,
    /// Set when this site relays the transfer (paper III-D): the token above is this site's
    /// own, and what the next hop gave stays here.
    #[serde(default)]
    pub relay: Option<RouteRelay>,
    /// Source side: the same migration's destination was committed through this site (both
    /// chains pass here, by the same next hop or not), so the source commit keeps the VM's
    /// record, which the destination commit re-pointed.
    #[serde(default)]
    pub destination_committed: bool,
}

/// The relayed part of a [`Route`]: the next hop's endpoint, which is never passed upstream,
/// and the relaying token at this site's own proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteRelay {
    /// The proxy and token the next hop gave (its offer, or its prepared source).
    pub downstream: Endpoint,
    /// This site's relaying token and the source it relays from: for a prepared source the
    /// next hop's files, minted with the route; for an offer the upstream's source, minted at
    /// the first Initiate transfer.
    pub relaying: Option<Relaying>,
}

/// A relaying token minted at this site's proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Relaying {
    /// The relaying token (its proxy is this site's own).
    pub endpoint: Endpoint,
    /// Where it relays from.
    pub source: Endpoint,
}

/// Steps of the Main migration algorithm at the Controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum MigrationPhase {
    /// Queued behind other migrations (position shown in status).
    Queued,
    /// Step 2: Migration requests out.
    Requesting,
    /// Step 4: Forced migration (prepare) at the Source.
    Preparing,
    /// Steps 5–7 on offer `offer`.
    Transferring {
        /// Index into the ranked offers.
        offer: usize,
    },
    /// Hand-over: committing the destination, then the source.
    Committing {
        /// The chosen offer.
        offer: usize,
    },
    /// Done.
    Committed,
    /// Rolling back.
    Aborting,
    /// Rolled back; the VM stays (or resumed) where it was.
    Aborted {
        /// Why.
        reason: String,
    },
}

impl MigrationPhase {
    /// Whether the migration is over.
    pub fn is_final(&self) -> bool {
        matches!(self, Self::Committed | Self::Aborted { .. })
    }
}

/// An offer with the hop it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankedOffer {
    /// The offer.
    pub offer: Offer,
    /// The hop that answered with it (this site itself for local offers).
    pub via: NextHop,
}

/// The Controller's journal of one migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationRecord {
    /// The migration.
    pub id: MigrationId,
    /// The VM.
    pub vm: VmId,
    /// Why it started (placement, operator, eviction, …).
    pub reason: String,
    /// Where it stands.
    pub phase: MigrationPhase,
    /// The offers, best first.
    pub offers: Vec<RankedOffer>,
    /// The prepared source.
    pub source: Option<Endpoint>,
    /// Where the source lies from here.
    pub source_via: Option<NextHop>,
    /// Bytes moved and total, as last reported.
    pub bytes_done: u64,
    /// Total bytes to move.
    pub bytes_total: u64,
    /// When it started (ms since the epoch).
    pub started_ms: u64,
    /// Last change (ms since the epoch).
    pub updated_ms: u64,
    /// The operator's bandwidth cap for the file transfer, in bytes per second.
    #[serde(default)]
    pub max_bytes_per_sec: Option<u64>,
    /// Transfer rounds (Initiate transfer and Transfer verification) that failed, over every
    /// offer tried.
    #[serde(default)]
    pub failed_rounds: u32,
    /// Why the last failed round failed.
    #[serde(default)]
    pub last_failure: Option<String>,
    /// Why the migration is being rolled back (set on entering [`MigrationPhase::Aborting`]),
    /// kept for the reason of the final [`MigrationPhase::Aborted`].
    #[serde(default)]
    pub abort_reason: Option<String>,
    /// Whether `source`'s token already carried a transfer to an earlier offer: a serving
    /// token carries one transfer, so the current offer needs a freshly prepared one.
    #[serde(default)]
    pub source_spent: bool,
    /// Indices into `offers` whose reservation was released.
    #[serde(default)]
    pub released: Vec<usize>,
    /// The relaying token this site, as Controller, hands the destination in place of the
    /// source (when it relays between two partners), and the source it fetches from.
    #[serde(default)]
    pub relaying: Option<Relaying>,
}

impl MigrationRecord {
    /// A new migration of `vm`, queued, started at `now_ms`.
    pub fn queued(
        id: MigrationId,
        vm: VmId,
        reason: String,
        max_bytes_per_sec: Option<u64>,
        now_ms: u64,
    ) -> Self {
        Self {
            id,
            vm,
            reason,
            phase: MigrationPhase::Queued,
            offers: Vec::new(),
            source: None,
            source_via: None,
            bytes_done: 0,
            bytes_total: 0,
            started_ms: now_ms,
            updated_ms: now_ms,
            max_bytes_per_sec,
            failed_rounds: 0,
            last_failure: None,
            abort_reason: None,
            source_spent: false,
            released: Vec::new(),
            relaying: None,
        }
    }
}

/// The journal.
#[derive(Debug, Clone)]
pub struct Journal {
    db: sled::Db,
    vms: sled::Tree,
    routes: sled::Tree,
    migrations: sled::Tree,
    requests: sled::Tree,
    evictions: sled::Tree,
    outgoing: sled::Tree,
    /// Seen Migration request ids by when they were seen (the collector's index).
    requests_by_time: sled::Tree,
    /// Bounds on the tables remote input fills.
    bounds: bounds::Bounds,
    taken: sled::Tree,
}

/// An eviction notice accepted from the downstream site, kept until the VM has moved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingEviction {
    /// The notice.
    pub notice: EvictionNotice,
    /// The site that sent it.
    pub from: SiteId,
}

fn get<T: DeserializeOwned>(tree: &sled::Tree, key: &[u8]) -> Result<Option<T>, JournalError> {
    match tree.get(key)? {
        Some(v) => Ok(Some(codec::from_slice(&v)?)),
        None => Ok(None),
    }
}

fn all<T: DeserializeOwned>(tree: &sled::Tree) -> Result<Vec<T>, JournalError> {
    tree.iter()
        .values()
        .map(|v| Ok(codec::from_slice(&v?)?))
        .collect()
}

impl Journal {
    /// Opens (or creates) the journal in directory `path`.
    pub fn open(path: &Path) -> Result<Self, JournalError> {
        let db = sled::Config::new().path(path).open()?;
        let journal = Self {
            vms: db.open_tree("vms")?,
            routes: db.open_tree("routes")?,
            migrations: db.open_tree("migrations")?,
            requests: db.open_tree("requests")?,
            evictions: db.open_tree("evictions")?,
            outgoing: db.open_tree("outgoing")?,
            requests_by_time: db.open_tree("requests_by_time")?,
            bounds: bounds::Bounds::default(),
            taken: db.open_tree("taken")?,
            db,
        };
        journal.rebuild_bounds()?;
        Ok(journal)
    }

    fn put<T: Serialize>(
        &self,
        tree: &sled::Tree,
        key: &[u8],
        value: &T,
    ) -> Result<(), JournalError> {
        tree.insert(key, codec::to_vec(value)?)?;
        self.db.flush()?;
        Ok(())
    }

    fn remove(&self, tree: &sled::Tree, key: &[u8]) -> Result<(), JournalError> {
        tree.remove(key)?;
        self.db.flush()?;
        Ok(())
    }

    /// The record of `vm`.
    pub fn vm(&self, vm: &VmId) -> Result<Option<VmRecord>, JournalError> {
        get(&self.vms, vm.as_str().as_bytes())
    }

    /// Writes the record of a VM.
    pub fn put_vm(&self, record: &VmRecord) -> Result<(), JournalError> {
        self.put(&self.vms, record.vm.as_str().as_bytes(), record)
    }

    /// Forgets a VM (this site is no longer on its chain).
    pub fn remove_vm(&self, vm: &VmId) -> Result<(), JournalError> {
        self.remove(&self.vms, vm.as_str().as_bytes())
    }

    /// Every VM record.
    pub fn vms(&self) -> Result<Vec<VmRecord>, JournalError> {
        all(&self.vms)
    }

    /// The route of `token`.
    pub fn route(&self, token: &TransferToken) -> Result<Option<Route>, JournalError> {
        get(&self.routes, token.to_string().as_bytes())
    }

    /// Writes a route.
    pub fn put_route(&self, route: &Route) -> Result<(), JournalError> {
        self.put(&self.routes, route.token.to_string().as_bytes(), route)
    }

    /// Forgets a route (and whether it was taken up).
    pub fn remove_route(&self, token: &TransferToken) -> Result<(), JournalError> {
        let key = token.to_string();
        self.routes.remove(key.as_bytes())?;
        self.remove(&self.taken, key.as_bytes())
    }

    /// Records that a transfer was initiated on the destination offer of `token` at `now_ms`:
    /// from then on the offer is taken up and no longer expires.
    pub fn mark_taken(&self, token: &TransferToken, now_ms: u64) -> Result<(), JournalError> {
        self.put(&self.taken, token.to_string().as_bytes(), &now_ms)
    }

    /// Whether a transfer was initiated on the destination offer of `token`.
    pub fn is_taken(&self, token: &TransferToken) -> Result<bool, JournalError> {
        Ok(self.taken.contains_key(token.to_string().as_bytes())?)
    }

    /// Every route, each with whether it was taken up.
    pub fn routes_taken(&self) -> Result<Vec<(Route, bool)>, JournalError> {
        let mut out = Vec::new();
        for r in self.routes()? {
            let taken = self.is_taken(&r.token)?;
            out.push((r, taken));
        }
        Ok(out)
    }

    /// Every route.
    pub fn routes(&self) -> Result<Vec<Route>, JournalError> {
        all(&self.routes)
    }

    /// The journal of a migration this site controls.
    pub fn migration(&self, id: &MigrationId) -> Result<Option<MigrationRecord>, JournalError> {
        get(&self.migrations, id.to_string().as_bytes())
    }

    /// Writes a migration's journal.
    pub fn put_migration(&self, record: &MigrationRecord) -> Result<(), JournalError> {
        self.put(&self.migrations, record.id.to_string().as_bytes(), record)
    }

    /// Every migration journal, oldest first.
    pub fn migrations(&self) -> Result<Vec<MigrationRecord>, JournalError> {
        let mut v: Vec<MigrationRecord> = all(&self.migrations)?;
        v.sort_by_key(|m| m.started_ms);
        Ok(v)
    }

    /// Records a Migration request id; `false` if it was seen before (a delegation loop).
    /// Not bounded: a partner's requests go through [`Journal::sight`].
    pub fn first_sight(&self, id: &RequestId, now_ms: u64) -> Result<bool, JournalError> {
        Ok(self.sight(id, None, now_ms)? == Sight::First)
    }

    /// Records an accepted eviction notice (idempotent by notice id).
    pub fn put_eviction(&self, notice: &EvictionNotice, from: &SiteId) -> Result<(), JournalError> {
        let pending = PendingEviction {
            notice: notice.clone(),
            from: from.clone(),
        };
        self.put(
            &self.evictions,
            notice.notice_id.to_string().as_bytes(),
            &pending,
        )
    }

    /// Eviction notices not acted upon yet.
    pub fn evictions(&self) -> Result<Vec<PendingEviction>, JournalError> {
        all(&self.evictions)
    }

    /// Forgets an eviction notice once its VM has moved.
    pub fn remove_eviction(&self, notice: &PendingEviction) -> Result<(), JournalError> {
        self.remove(
            &self.evictions,
            notice.notice.notice_id.to_string().as_bytes(),
        )
    }

    /// Records an eviction notice this site must deliver upstream (retried until accepted).
    /// Notices passed up carry a downstream partner's ids, so the notices waiting for one
    /// addressee are bounded ([`JournalError::Full`]; a notice passed up stays pending here
    /// meanwhile, counted against the partner that sent it).
    pub fn put_outgoing(&self, notice: &EvictionNotice, to: &SiteId) -> Result<(), JournalError> {
        self.check_outgoing_bound(notice, to)?;
        let pending = PendingEviction {
            notice: notice.clone(),
            from: to.clone(),
        };
        self.put(
            &self.outgoing,
            notice.notice_id.to_string().as_bytes(),
            &pending,
        )
    }

    /// Eviction notices not yet accepted upstream (`from` holds the addressee).
    pub fn outgoing(&self) -> Result<Vec<PendingEviction>, JournalError> {
        all(&self.outgoing)
    }

    /// Forgets an outgoing notice once accepted.
    pub fn remove_outgoing(&self, notice: &PendingEviction) -> Result<(), JournalError> {
        self.remove(
            &self.outgoing,
            notice.notice.notice_id.to_string().as_bytes(),
        )
    }

    /// Flushes everything to disk.
    pub fn flush(&self) -> Result<(), JournalError> {
        self.db.flush()?;
        Ok(())
    }
}

/// Opens the journal at `dir` again once a handle dropped just before has let go of it: sled's
/// background flusher releases the store's file lock shortly after the last handle is dropped,
/// so the open is repeated while the lock is still held.
#[cfg(test)]
pub(crate) fn reopen(dir: &Path) -> Journal {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match Journal::open(dir) {
            Err(JournalError::Store(sled::Error::Io(e)))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => return other.unwrap_or_else(|e| panic!("cannot reopen the journal: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_seen_once_even_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let id = RequestId::random();
        {
            let j = Journal::open(dir.path()).unwrap();
            assert!(j.first_sight(&id, 1).unwrap());
            assert!(!j.first_sight(&id, 2).unwrap());
        }
        let j = reopen(dir.path());
        assert!(!j.first_sight(&id, 3).unwrap());
        assert!(j.first_sight(&RequestId::random(), 3).unwrap());
    }
}
