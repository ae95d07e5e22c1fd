//! Relaying at the Controller (paper III-D, location unawareness): a Controller that moves a
//! VM between two of its partners — an Intermediary acting on an eviction notice, say — would
//! otherwise hand the Destination the Source's proxy, and each end would learn the other. When
//! its transfer policy towards either partner is `relay`, the Controller names its own proxy
//! instead: it mints a relaying token that fetches from the Source, hands that to the
//! Destination in Initiate transfer, and keeps it in the migration's record. Transfer
//! verification still asks the Source itself, whose files are acknowledged once the
//! Destination has verified what was relayed. The relaying token is released with the
//! hand-over or the roll-back.

use nubis_protocol::message::{Endpoint, ErrorReply};
use nubis_protocol::{MigrationId, VmId};

use crate::config::TransferMode;
use crate::journal::{MigrationRecord, NextHop, RankedOffer, Relaying};
use crate::local::LocalSite;
use crate::peers::Peers;
use crate::roles::Roles;

impl<L: LocalSite, P: Peers> Roles<L, P> {
    /// Whether this site, as Controller, relays a transfer from the source at `source_via` to
    /// the destination at `destination_via`: both are partner sites, not the same one, and the
    /// policy towards either says `relay`.
    fn controller_relays(&self, source_via: Option<&NextHop>, destination_via: &NextHop) -> bool {
        let (Some(NextHop::Site(from)), NextHop::Site(to)) = (source_via, destination_via) else {
            return false;
        };
        let policy = &self.config().policy.transfer;
        from != to
            && (policy.towards(from) == TransferMode::Relay
                || policy.towards(to) == TransferMode::Relay)
    }

    /// The source to name in Initiate transfer for offer `ranked`: `source` itself, or this
    /// site's relaying token that fetches from it (minted the first time and journaled, so a
    /// repeated round or a restarted Controller names the same one).
    pub(super) async fn source_for_destination(
        &self,
        id: MigrationId,
        vm: &VmId,
        source: &Endpoint,
        source_via: Option<&NextHop>,
        ranked: &RankedOffer,
    ) -> Result<Endpoint, ErrorReply> {
        if !self.controller_relays(source_via, &ranked.via) {
            return Ok(source.clone());
        }
        let m = self.migration_record(id)?;
        match &m.relaying {
            Some(r) if r.source == *source => return Ok(r.endpoint.clone()),
            // A source prepared again for a next offer: the old relaying token carried (or
            // was meant for) a transfer from the old one.
            Some(_) => self.release_own_relaying(&m, false).await,
            None => {}
        }
        let minted = self
            .local()
            .relay(id, vm, source, m.max_bytes_per_sec)
            .await?;
        self.update_migration(id, |m| {
            m.relaying = Some(Relaying {
                endpoint: minted.endpoint.clone(),
                source: source.clone(),
            });
        })?;
        tracing::info!(migration.id = %id, vm.id = %vm, "transfer relayed by the Controller");
        Ok(minted.endpoint)
    }

    /// Releases the relaying token of `m`, if it has one, and forgets it. Best effort: a token
    /// that cannot be released now ends with its lifetime at the proxy.
    pub(super) async fn release_own_relaying(&self, m: &MigrationRecord, committed: bool) {
        let Some(relaying) = &m.relaying else {
            return;
        };
        let released = self
            .release_relaying_token(&m.vm, &relaying.endpoint.token, committed)
            .await;
        if let Err(e) = released {
            tracing::warn!(migration.id = %m.id, error = %e.message, "relaying token not released at the proxy");
        }
        if let Err(e) = self.update_migration(m.id, |r| r.relaying = None) {
            tracing::warn!(migration.id = %m.id, error = %e.message, "released relaying token not forgotten");
        }
    }
}
