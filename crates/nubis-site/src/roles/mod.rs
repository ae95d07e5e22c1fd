//! The paper's roles at one site (section III-C), one module per role: the Destination
//! ([`destination`]: Migration request handler with delegation, Initiate transfer handler), the
//! Source ([`source`]: Forced migration and Transfer verification handlers), the hand-over at
//! either end ([`hand_over`]: commit, abort), the VM's chain of responsibility ([`chain`]:
//! eviction notices, the Control interface) — and, for every one of them, the Intermediary's
//! forwarding to the next hop ([`intermediary`]) and its relaying of transfers by policy
//! ([`relay`]). The Controller lives in [`crate::controller`].
//!
//! Operations that name a transfer token are routed by the token's [`Route`]; operations that
//! name a VM are routed by the VM's [`VmRecord`]. A site never learns more than the next hop.

mod chain;
mod destination;
mod hand_over;
mod intermediary;
mod keys;
mod relay;
mod source;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use nubis_protocol::envelope::Opened;
use nubis_protocol::message::{
    AbortMigration, CommitMigration, ControlRequest, ErrorCode, ErrorReply, EvictionNotice,
    InitiateTransfer, MigrationRequest, PrepareMigration, TransferToken, TransferVerification,
};
use nubis_protocol::subject::FederationOp;
use nubis_protocol::{MigrationId, SiteId, VmId};
use tokio::sync::Semaphore;

use crate::config::SiteConfig;
use crate::federation::{sign_reply, FederationClient, HandlerResult};
use crate::journal::{Journal, Route, RouteSide, VmRecord};
use crate::local::LocalSite;
use crate::peers::Peers;
use crate::quota::Admission;

pub use destination::OFFER_TTL_MS;
pub use keys::{check_primary_keys, known_keys, KeyBook};

/// Everything a role handler needs: the site's configuration, its journal, its partners
/// (`P`, the federation) and its own hosts and proxy (`L`).
#[derive(Debug)]
pub struct Roles<L, P = FederationClient> {
    config: Arc<SiteConfig>,
    journal: Journal,
    peers: P,
    local: L,
    /// Migrations an operator asked to cancel.
    cancelled: Mutex<HashSet<MigrationId>>,
    /// Slots for migrations this site runs as Controller at the same time; the rest queue.
    slots: Arc<Semaphore>,
    /// Per-partner rate and quota admission (the `[limits]` table).
    admission: Admission,
    /// The keys of sites that are not partners, for checking a VM's primary keys.
    key_book: Option<Arc<dyn KeyBook>>,
}

pub(crate) fn internal(e: impl std::fmt::Display) -> ErrorReply {
    ErrorReply::new(ErrorCode::Internal, e.to_string())
}

fn malformed(e: impl std::fmt::Display) -> ErrorReply {
    ErrorReply::new(ErrorCode::Malformed, e.to_string())
}

fn unknown_token() -> ErrorReply {
    ErrorReply::new(
        ErrorCode::UnknownToken,
        "no transfer with this token passes through this site",
    )
}

/// Checks that a request naming a route's token asks for exactly what the token was minted
/// for: it comes from the site the route was opened for (the one that received the offer or
/// asked for the prepare), and names the route's migration and VM. A token is a capability for
/// one transfer, never for whatever VM its holder names next to it.
pub(crate) fn check_route(
    route: &Route,
    from: &SiteId,
    migration: &MigrationId,
    vm: &VmId,
) -> Result<(), ErrorReply> {
    if route.upstream != *from {
        return Err(ErrorReply::new(
            ErrorCode::Refused,
            format!("this transfer was not opened for site {from}"),
        ));
    }
    if route.migration_id != *migration || route.vm != *vm {
        return Err(ErrorReply::new(
            ErrorCode::TokenMismatch,
            "the token was minted for another migration or VM",
        ));
    }
    Ok(())
}

impl<L: LocalSite, P: Peers> Roles<L, P> {
    /// Roles over `journal`, `peers` and `local` with `config`'s policies.
    pub fn new(config: Arc<SiteConfig>, journal: Journal, peers: P, local: L) -> Self {
        let slots = Arc::new(Semaphore::new(config.max_concurrent_migrations));
        Self {
            slots,
            admission: Admission::new(config.limits.clone()),
            config,
            journal,
            peers,
            local,
            cancelled: Default::default(),
            key_book: None,
        }
    }

    /// The same, checking the primary keys of VMs of non-partner primaries against `book`
    /// (the directory); without one, only partners' and this site's own VMs are taken in.
    pub fn with_key_book(mut self, book: Arc<dyn KeyBook>) -> Self {
        self.key_book = Some(book);
        self
    }

    /// The key book, if any.
    pub(crate) fn key_book(&self) -> Option<&dyn KeyBook> {
        self.key_book.as_deref()
    }

    /// This site.
    pub fn site(&self) -> &SiteId {
        &self.config.site
    }

    /// The site's configuration.
    pub fn config(&self) -> &SiteConfig {
        &self.config
    }

    /// The site's crash-safe journal.
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// The site's partners.
    pub fn peers(&self) -> &P {
        &self.peers
    }

    /// The site's own hosts and proxy.
    pub(crate) fn local(&self) -> &L {
        &self.local
    }

    /// The migrations an operator asked to cancel.
    pub(crate) fn cancelled(&self) -> &Mutex<HashSet<MigrationId>> {
        &self.cancelled
    }

    /// Per-partner rate and quota admission.
    pub(crate) fn admission(&self) -> &Admission {
        &self.admission
    }

    /// The Controller's slots for concurrent migrations.
    pub(crate) fn slots(&self) -> &Arc<Semaphore> {
        &self.slots
    }

    /// Dispatches a verified federation request to its role and signs the answer.
    pub async fn handle(self: Arc<Self>, op: FederationOp, request: Opened) -> HandlerResult {
        let from = request.from.clone();
        macro_rules! run {
            ($body:ty, $method:ident) => {{
                let body: $body = request.body().map_err(malformed)?;
                let reply = self.$method(&from, body).await?;
                sign_reply(&self.config.identity, &request, &reply).map_err(internal)
            }};
        }
        match op {
            FederationOp::MigrationRequest => run!(MigrationRequest, migration_request),
            FederationOp::MigrationPrepare => run!(PrepareMigration, prepare),
            FederationOp::MigrationEvict => run!(EvictionNotice, eviction),
            FederationOp::MigrationCommit => run!(CommitMigration, commit),
            FederationOp::MigrationAbort => run!(AbortMigration, abort),
            FederationOp::TransferInitiate => run!(InitiateTransfer, initiate),
            FederationOp::TransferVerify => run!(TransferVerification, verify),
            FederationOp::VmControl => run!(ControlRequest, control),
        }
    }

    /// This site's record of `vm`, or `UnknownVm`.
    pub(crate) fn vm_record(&self, vm: &VmId) -> Result<VmRecord, ErrorReply> {
        self.journal.vm(vm).map_err(internal)?.ok_or_else(|| {
            ErrorReply::new(
                ErrorCode::UnknownVm,
                format!("VM {vm} is not known at this site"),
            )
        })
    }

    /// The route of `token` at end `side`, once [`check_route`] allowed `from` to use it for
    /// `migration` of `vm`.
    fn route(
        &self,
        from: &SiteId,
        token: &TransferToken,
        side: RouteSide,
        migration: &MigrationId,
        vm: &VmId,
    ) -> Result<Route, ErrorReply> {
        match self.journal.route(token).map_err(internal)? {
            Some(r) if r.side == side => {
                check_route(&r, from, migration, vm)?;
                Ok(r)
            }
            _ => Err(unknown_token()),
        }
    }

    /// Checks that `from` may act on `vm` here: its upstream, or this site itself.
    fn check_upstream(&self, from: &SiteId, record: &VmRecord) -> Result<(), ErrorReply> {
        if from == self.site() || record.upstream.as_ref() == Some(from) {
            Ok(())
        } else {
            Err(ErrorReply::new(
                ErrorCode::Refused,
                format!("site {from} did not delegate VM {} to this site", record.vm),
            ))
        }
    }
}
