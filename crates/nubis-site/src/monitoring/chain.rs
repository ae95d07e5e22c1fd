//! Which sites speak for a VM on the public monitoring subject: the sites of its responsibility
//! chain below this one, as far as this site can establish them.
//!
//! The first is this site's downstream partner, from its journal. Every further site is vouched
//! for by the site above it: the `downstream` of that site's Consumer registration of the VM
//! (directory key `consumer.<vm>.<site>`, which the hub lets only that site write), verified
//! against that site's pinned partner key or else its directory key. A site names its downstream
//! there only under bus delivery; under relay delivery it keeps it to itself, and nothing below
//! it is accepted from the bus above it (its batches come up by relay instead).
//!
//! A batch from any other sender is never stored and never reaches an SLA rule. The chain of a
//! VM is read from the directory when a sender is not on the chain last read, at most once per
//! [`RESOLVE_EVERY`] and VM, so that strangers cannot make the site read the directory at their
//! pace; a chain that grew below this site (a delegation, a migration) is picked up within that
//! time.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nubis_protocol::{SiteId, VmId};

use super::{sender_key, Monitoring};
use crate::journal::{NextHop, VmRecord};

/// Longest chain followed below this site: one site per delegation hop the protocol allows.
pub const MAX_CHAIN: usize = u8::MAX as usize + 1;

/// How long a chain read from the directory is used before a sender off it makes it be read
/// again.
pub const RESOLVE_EVERY: Duration = Duration::from_millis(500);

/// The chains last read, per VM.
#[derive(Debug, Default)]
pub(super) struct Chains {
    read: Mutex<HashMap<VmId, Read>>,
}

/// One VM's chain below this site, downstream partner first, and when it was read.
#[derive(Debug, Clone)]
struct Read {
    sites: Vec<SiteId>,
    at: Instant,
}

/// What the chain last read says about a sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lookup {
    /// The sender is on the chain.
    OnChain,
    /// The sender is not on a chain read less than [`RESOLVE_EVERY`] ago.
    Off,
    /// The chain is to be read again (marked as read at `now`, so that concurrent lookups do
    /// not read it too).
    Resolve,
}

impl Chains {
    /// Whether `from` is on the chain of `vm` whose downstream partner is `downstream`, at `now`.
    pub(super) fn lookup(
        &self,
        vm: &VmId,
        downstream: &SiteId,
        from: &SiteId,
        now: Instant,
    ) -> Lookup {
        if from == downstream {
            return Lookup::OnChain;
        }
        let Ok(mut read) = self.read.lock() else {
            return Lookup::Off;
        };
        match read.get_mut(vm) {
            Some(r) if r.sites.first() == Some(downstream) => {
                if r.sites.contains(from) {
                    Lookup::OnChain
                } else if now.saturating_duration_since(r.at) < RESOLVE_EVERY {
                    Lookup::Off
                } else {
                    r.at = now;
                    Lookup::Resolve
                }
            }
            _ => {
                read.insert(
                    vm.clone(),
                    Read {
                        sites: vec![downstream.clone()],
                        at: now,
                    },
                );
                Lookup::Resolve
            }
        }
    }

    /// Keeps `sites` as the chain of `vm` read at `now`.
    pub(super) fn store(&self, vm: &VmId, sites: Vec<SiteId>, now: Instant) {
        if let Ok(mut read) = self.read.lock() {
            read.insert(vm.clone(), Read { sites, at: now });
        }
    }

    /// Forgets the chains of the VMs `keep` does not name (the table holds at most one entry
    /// per VM this site delegated).
    pub(super) fn retain(&self, keep: impl Fn(&VmId) -> bool) {
        if let Ok(mut read) = self.read.lock() {
            read.retain(|vm, _| keep(vm));
        }
    }
}

/// Whether `next`, vouched for by the last site of `chain`, extends it: not this site, not a
/// site already on it (a loop), and not beyond [`MAX_CHAIN`].
pub fn extends(chain: &[SiteId], own: &SiteId, next: &SiteId) -> bool {
    next != own && !chain.contains(next) && chain.len() < MAX_CHAIN
}

impl Monitoring {
    /// Whether `from` is on the chain of `record`'s VM below this site.
    pub(super) async fn on_chain(&self, record: &VmRecord, from: &SiteId) -> bool {
        let Some(NextHop::Site(downstream)) = &record.downstream else {
            return false;
        };
        match self
            .chains
            .lookup(&record.vm, downstream, from, Instant::now())
        {
            Lookup::OnChain => true,
            Lookup::Off => false,
            Lookup::Resolve => {
                let sites = self.read_chain(&record.vm, downstream).await;
                let on = sites.contains(from);
                tracing::debug!(vm.id = %record.vm, chain = ?sites, "monitoring chain read");
                self.chains.store(&record.vm, sites, Instant::now());
                on
            }
        }
    }

    /// The chain of `vm` below this site, from `downstream` along the vouches of the directory.
    async fn read_chain(&self, vm: &VmId, downstream: &SiteId) -> Vec<SiteId> {
        let directory = self.deps.directory.snapshot();
        let mut chain = vec![downstream.clone()];
        while let Some(last) = chain.last().cloned() {
            let Some(key) = sender_key(&self.deps.config, &directory, &last) else {
                break;
            };
            match self
                .deps
                .directory
                .vouched_downstream(vm, &last, &key)
                .await
            {
                Ok(Some(next)) if extends(&chain, &self.site, &next) => chain.push(next),
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, vm.id = %vm, "cannot read the VM's chain");
                    break;
                }
            }
        }
        chain
    }
}
