//! Batches on the public monitoring subjects (consumer role): the subscriptions for the VMs this
//! site is responsible for but does not run, its Consumer registrations (which, under bus
//! delivery, vouch for the site's downstream), and verifying what arrives with the sender's
//! pinned or directory key and accepting it from the VM's chain only.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ed25519_dalek::VerifyingKey;
use nubis_protocol::envelope::{now_ms, SignedEnvelope};
use nubis_protocol::message::ConsumerRegistration;
use nubis_protocol::subject::{ParsedSubject, Subject};
use nubis_protocol::{SiteId, VmId};
use tokio_util::sync::CancellationToken;

use super::{target, DropReason, Monitoring, Path, Target};
use crate::accounting;
use crate::config::{Delivery, SiteConfig};
use crate::directory::{SiteRecord, Withdraw};
use crate::journal::NextHop;

/// How often the bus subscriptions are brought in line with the VM records.
const RESUBSCRIBE_EVERY: Duration = Duration::from_millis(500);

/// The key that verifies `from`'s batches: its pinned partner key, else its directory entry's.
pub fn sender_key(
    config: &SiteConfig,
    directory: &BTreeMap<SiteId, SiteRecord>,
    from: &SiteId,
) -> Option<VerifyingKey> {
    if let Some(p) = config.partner(from) {
        return Some(p.signing_key);
    }
    let record = directory.get(from)?;
    if record.entry.site != *from {
        return None;
    }
    VerifyingKey::from_bytes(&record.entry.signing_key).ok()
}

impl Monitoring {
    /// Subscribes to the public monitoring subjects of the VMs this site is responsible for but
    /// does not run, and drops the subscriptions of VMs it no longer is.
    pub(super) async fn keep_bus_subscriptions(self: Arc<Self>, cancel: CancellationToken) {
        // Per VM: the subscription, and the downstream site it was registered with.
        let mut held: HashMap<(SiteId, VmId), (CancellationToken, SiteId)> = HashMap::new();
        let mut swept = false;
        let mut tick = tokio::time::interval(RESUBSCRIBE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            let records = match self.deps.journal.vms() {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the VM records");
                    continue;
                }
            };
            let local: HashSet<VmId> = records
                .iter()
                .filter(|r| matches!(r.downstream, Some(NextHop::Host(_))))
                .map(|r| r.vm.clone())
                .collect();
            // The VMs whose batches this site may publish on the public subject, and so
            // register Producers of: those it runs, and those it is the primary of.
            let publishing: HashSet<VmId> = records
                .iter()
                .filter(|r| {
                    matches!(r.downstream, Some(NextHop::Host(_)))
                        || (r.primary == self.site && r.downstream.is_some())
                })
                .map(|r| r.vm.clone())
                .collect();
            self.withdraw_departed_producers(&local, &publishing);
            let wanted: HashMap<(SiteId, VmId), SiteId> = records
                .into_iter()
                .filter_map(|r| match r.downstream {
                    Some(NextHop::Site(d)) => Some(((r.primary, r.vm), d)),
                    _ => None,
                })
                .collect();
            held.retain(|key, (token, _)| {
                let keep = wanted.contains_key(key);
                if !keep {
                    tracing::debug!(vm.id = %key.1, "monitoring subscription dropped");
                    token.cancel();
                    self.withdraw_in_background(key.1.clone(), Withdraw::Consumer);
                }
                keep
            });
            if !swept {
                // Registrations left by an earlier run for VMs this site no longer holds.
                let delegated: HashSet<VmId> = wanted.keys().map(|(_, vm)| vm.clone()).collect();
                match self
                    .deps
                    .directory
                    .sweep_own(|vm, which| match which {
                        Withdraw::Producers => publishing.contains(vm),
                        Withdraw::Consumer => delegated.contains(vm),
                    })
                    .await
                {
                    Ok(n) => {
                        swept = true;
                        if n > 0 {
                            tracing::info!(keys = n, "stale directory registrations removed");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot sweep own registrations; will retry")
                    }
                }
            }
            let delegated: HashSet<&VmId> = wanted.keys().map(|(_, vm)| vm).collect();
            self.chains.retain(|vm| delegated.contains(vm));
            for (key, downstream) in wanted {
                if let Some((_, registered)) = held.get_mut(&key) {
                    if *registered != downstream {
                        // The VM moved below this site: vouch for the new downstream.
                        self.register_consumer(&key.1, &downstream);
                        *registered = downstream;
                    }
                    continue;
                }
                let subject = Subject::monitoring_vm(&key.0, &key.1);
                match self
                    .deps
                    .public
                    .subscribe(subject.as_str().to_string())
                    .await
                {
                    Ok(sub) => {
                        tracing::debug!(vm.id = %key.1, subject = %subject, "monitoring subscription added");
                        let token = cancel.child_token();
                        self.spawn_loop(token.clone(), sub, Path::Bus);
                        self.register_consumer(&key.1, &downstream);
                        held.insert(key, (token, downstream));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, subject = %subject, "cannot subscribe; will retry")
                    }
                }
            }
        }
    }

    /// Forgets the Producers of VMs that no longer run on this site's hosts (`local`), and
    /// withdraws the directory registrations of VMs whose batches it no longer publishes
    /// (`publishing`).
    fn withdraw_departed_producers(&self, local: &HashSet<VmId>, publishing: &HashSet<VmId>) {
        if let Ok(mut table) = self.producers.lock() {
            table.retain(|vm, _| local.contains(vm));
        }
        let departed: Vec<VmId> = match self.published.lock() {
            Ok(mut table) => {
                let departed: Vec<VmId> = table
                    .keys()
                    .filter(|vm| !publishing.contains(*vm))
                    .cloned()
                    .collect();
                for vm in &departed {
                    table.remove(vm);
                }
                departed
            }
            Err(_) => Vec::new(),
        };
        for vm in departed {
            tracing::debug!(vm.id = %vm, "vm no longer published here; producers withdrawn");
            self.withdraw_in_background(vm, Withdraw::Producers);
        }
    }

    fn withdraw_in_background(&self, vm: VmId, which: Withdraw) {
        let directory = self.deps.directory.clone();
        self.tracker.spawn(async move {
            if let Err(e) = directory.withdraw(&vm, which).await {
                tracing::warn!(error = %e, vm.id = %vm, ?which, "cannot withdraw registration");
            }
        });
    }

    /// Registers this site as a GMA Consumer of `vm`'s monitoring in the directory (best
    /// effort, in the background: the subscription does not wait for the hub). Under bus
    /// delivery the registration names `downstream`, vouching for it to the sites above.
    pub(super) fn register_consumer(&self, vm: &VmId, downstream: &SiteId) {
        let vouch = self.deps.config.monitoring.delivery == Delivery::Bus;
        let registration = ConsumerRegistration {
            consumer_site: self.site.clone(),
            vm: vm.clone(),
            data_points: Vec::new(),
            downstream: vouch.then(|| downstream.clone()),
            heartbeat_ms: now_ms(),
        };
        let directory = self.deps.directory.clone();
        self.tracker.spawn(async move {
            if let Err(e) = directory.register_consumer(&registration).await {
                tracing::warn!(error = %e, vm.id = %registration.vm, "cannot register as consumer");
            }
        });
    }

    /// A batch on the public monitoring subject of a VM this site is responsible for.
    pub(super) async fn bus(&self, subject: &str, payload: &[u8]) {
        let Ok(ParsedSubject::Monitoring {
            primary,
            vm,
            data_point,
        }) = Subject::parse(subject)
        else {
            return self.drop_batch(
                DropReason::WrongSubject,
                subject,
                "not a monitoring subject",
            );
        };
        let env = match SignedEnvelope::decode(payload) {
            Ok(env) => env,
            Err(e) => return self.drop_batch(DropReason::of(&e), subject, &e.to_string()),
        };
        if env.from == self.site.as_str() {
            // This site's own publication, heard back.
            return;
        }
        let Ok(from) = SiteId::new(env.from.as_str()) else {
            return self.drop_batch(DropReason::Forged, subject, "sender is not a site id");
        };
        let key = sender_key(&self.deps.config, &self.deps.directory.snapshot(), &from);
        let Some(key) = key else {
            return self.drop_batch(
                DropReason::Forged,
                subject,
                &format!("no key known for site {from}"),
            );
        };
        let opened =
            match self
                .deps
                .verifier
                .open_event_with_key(payload, subject, now_ms(), &from, &key)
            {
                Ok(o) => o,
                Err(e) => return self.drop_batch(DropReason::of(&e), subject, &e.to_string()),
            };
        let Some((batch, record)) = self.batch_on_record(&opened, subject, &primary, &vm) else {
            return;
        };
        if record.upstream.as_ref() == Some(&from) || record.primary == from {
            // Published above this site (by the primary, or by an upstream under bus
            // delivery): a batch that came up the chain through this site, or none of its
            // business. Not this site's to store.
            tracing::trace!(vm.id = %vm, site.from = %from, "batch from above ignored");
            return;
        }
        if !self.on_chain(&record, &from).await {
            return self.drop_batch(
                DropReason::WrongSender,
                subject,
                &format!("site {from} is not on the VM's chain below this site"),
            );
        }
        self.note_received(&vm, &self.counters.received.bus);
        let stored = self
            .deps
            .accounting
            .store(
                &vm,
                &data_point,
                accounting::message_id(&from, &batch),
                Bytes::copy_from_slice(payload),
            )
            .await;
        // Under relay delivery this site passes the batch up, as if it had been relayed to it:
        // it does not vouch for its downstream, so the sites above cannot take it from the bus.
        let target = target(self.deps.config.monitoring.delivery, &self.site, &record);
        if let Some(relay @ Target::Relay(_)) = &target {
            if let Err(e) = self.deliver(Some(relay), &data_point, &batch).await {
                tracing::warn!(error = %e.message, vm.id = %vm, "cannot pass the batch on");
            }
        }
        match stored {
            Ok(s) if !s.duplicate => self.evaluate_sla(&record, &batch).await,
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, vm.id = %vm, "batch not stored"),
        }
    }
}
