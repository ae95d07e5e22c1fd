//! Typed constructors and a parser for every NATS subject nubis uses, and the directory's key names.
//!
//! Subjects are built only from validated identifiers ([`SiteId`], [`VmId`],
//! [`ProxyId`](crate::message::ProxyId), [`HostId`], [`DataPoint`]), so a subject can never gain a wildcard or an extra token from
//! input. The subject space (documented in `subjects.md`):
//!
//! | prefix | crosses sites | purpose |
//! |---|---|---|
//! | `nubis.fed.<site>.…` | yes | migration and Control-interface operations answered by `<site>` |
//! | `nubis.proxy.<site>.<proxy>.…` | yes | Transfer proxy operations |
//! | `nubis.mon.<primary>.<vm>.{infra,kpi}.…` | yes | monitoring batches of a VM |
//! | `nubis.site.<site>.host.<host>.…` | never | the site's own host agents |
//! | `nubis.ops.<site>.…` | never | the operator API (JSON, unsigned) |

use std::fmt;

use crate::descriptor::{DataPoint, DataPointClass};
use crate::ids::{IdError, MigrationId, SiteId, VmId};
use crate::message::{HostId, ProxyUri};

mod directory_key;
mod ops;
mod parse;
#[cfg(test)]
mod tests;

pub use directory_key::DirectoryKey;
pub use ops::{is_operator_name, FederationOp, OpsEndpoint, ProxyOp};
pub use parse::ParsedSubject;

/// Name of the directory KV bucket, in the hub's JetStream domain.
pub const DIRECTORY_BUCKET: &str = "nubis-directory";

/// The JetStream stream (in each site's own domain) where a site keeps the monitoring batches
/// of the VMs it is responsible for: the accounting record of the paper's billing purpose.
pub const ACCOUNTING_STREAM: &str = "NUBIS_ACCOUNTING";

/// Longest accepted operation name on a host-agent subject, in bytes.
pub const MAX_OP_LEN: usize = 128;

/// Why a subject or key could not be built or parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    /// The subject is not one nubis uses.
    #[error("unrecognised subject {0:?}")]
    Unrecognised(String),
    /// A site, VM, proxy, host or producer token is invalid.
    #[error("invalid identifier in subject")]
    Id(#[source] IdError),
    /// An operation or data point token is invalid.
    #[error("invalid subject token {0:?}")]
    Token(String),
}

impl From<IdError> for SubjectError {
    fn from(e: IdError) -> Self {
        Self::Id(e)
    }
}

/// A NATS subject built by one of the constructors below.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Subject(String);

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Subject {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl From<Subject> for String {
    fn from(s: Subject) -> String {
        s.0
    }
}

/// Dot-separated tokens of `[A-Za-z0-9_-]`, none empty.
fn is_dotted_tokens(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.split('.').all(|t| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        })
}

impl Subject {
    /// The subject as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `nubis.fed.<site>.<op suffix>`: where `site` answers the federation operation `op`.
    pub fn federation(site: &SiteId, op: FederationOp) -> Self {
        Self(format!("nubis.fed.{site}.{}", op.suffix()))
    }

    /// `nubis.fed.<site>.migration.request`
    pub fn migration_request(site: &SiteId) -> Self {
        Self::federation(site, FederationOp::MigrationRequest)
    }

    /// `nubis.fed.<site>.migration.prepare` (Forced migration down the chain)
    pub fn migration_prepare(site: &SiteId) -> Self {
        Self::federation(site, FederationOp::MigrationPrepare)
    }

    /// `nubis.fed.<site>.migration.evict` (Forced migration up the chain)
    pub fn migration_evict(site: &SiteId) -> Self {
        Self::federation(site, FederationOp::MigrationEvict)
    }

    /// `nubis.fed.<site>.migration.commit`
    pub fn migration_commit(site: &SiteId) -> Self {
        Self::federation(site, FederationOp::MigrationCommit)
    }

    /// `nubis.fed.<site>.migration.abort`
    pub fn migration_abort(site: &SiteId) -> Self {
        Self::federation(site, FederationOp::MigrationAbort)
    }

    /// `nubis.fed.<site>.transfer.initiate`
    pub fn transfer_initiate(site: &SiteId) -> Self {
        Self::federation(site, FederationOp::TransferInitiate)
    }

    /// `nubis.fed.<site>.transfer.verify`
    pub fn transfer_verify(site: &SiteId) -> Self {
        Self::federation(site, FederationOp::TransferVerify)
    }

    /// `nubis.fed.<site>.vm.control`
    pub fn vm_control(site: &SiteId) -> Self {
        Self::federation(site, FederationOp::VmControl)
    }

    /// `nubis.fed.<site>.>`: everything `site` answers (its subscription).
    pub fn federation_all(site: &SiteId) -> Self {
        Self(format!("nubis.fed.{site}.>"))
    }

    /// `nubis.proxy.<site>.<proxy>.<op>` for the proxy named by `uri`.
    pub fn proxy(uri: &ProxyUri, op: ProxyOp) -> Self {
        Self(format!(
            "nubis.proxy.{}.{}.{}",
            uri.site(),
            uri.proxy(),
            op.as_str()
        ))
    }

    /// `nubis.proxy.<site>.<proxy>.progress.<migration>`: progress events of one transfer.
    pub fn proxy_progress(uri: &ProxyUri, migration: &MigrationId) -> Self {
        Self(format!(
            "nubis.proxy.{}.{}.progress.{migration}",
            uri.site(),
            uri.proxy()
        ))
    }

    /// `nubis.proxy.<site>.<proxy>.>`: everything the proxy answers (its subscription).
    pub fn proxy_all(uri: &ProxyUri) -> Self {
        Self(format!("nubis.proxy.{}.{}.>", uri.site(), uri.proxy()))
    }

    /// The subject of a monitoring batch of `data_point`:
    /// `nubis.mon.<primary>.<vm>.infra.<data point>` for an infrastructure measurement, and
    /// `nubis.mon.<primary>.<vm>.<data point>` for a KPI (whose name starts with `kpi.`), i.e.
    /// `nubis.mon.<primary>.<vm>.kpi.<table>.<column>`.
    pub fn monitoring(primary: &SiteId, vm: &VmId, data_point: &DataPoint) -> Self {
        match data_point.class() {
            DataPointClass::Infra => Self(format!("nubis.mon.{primary}.{vm}.infra.{data_point}")),
            DataPointClass::Kpi => Self(format!("nubis.mon.{primary}.{vm}.{data_point}")),
        }
    }

    /// `nubis.mon.<primary>.<vm>.>`: all monitoring of one VM.
    pub fn monitoring_vm(primary: &SiteId, vm: &VmId) -> Self {
        Self(format!("nubis.mon.{primary}.{vm}.>"))
    }

    /// `nubis.mon.<primary>.>`: all monitoring of the VMs `primary` is primary site for.
    pub fn monitoring_primary(primary: &SiteId) -> Self {
        Self(format!("nubis.mon.{primary}.>"))
    }

    /// `nubis.relay.<to>.<primary>.<vm>.infra.<dp>` (or `….kpi.…`): relay delivery of a
    /// monitoring batch to `to`, the next site up the VM's chain, which verifies it with its
    /// pinned partner key and passes it on under its own signature.
    pub fn monitoring_relay(
        to: &SiteId,
        primary: &SiteId,
        vm: &VmId,
        data_point: &DataPoint,
    ) -> Self {
        let tail = Self::monitoring(primary, vm, data_point);
        let tail = tail
            .as_str()
            .strip_prefix("nubis.mon.")
            .unwrap_or(tail.as_str());
        Self(format!("nubis.relay.{to}.{tail}"))
    }

    /// `nubis.relay.<site>.>`: the relay deliveries addressed to `site` (its subscription).
    pub fn monitoring_relay_all(site: &SiteId) -> Self {
        Self(format!("nubis.relay.{site}.>"))
    }

    /// The primary site, VM and data point of a relay subject addressed to `to`; `None` for
    /// any other subject, or one not in the exact form [`Subject::monitoring_relay`] builds.
    pub fn parse_monitoring_relay(to: &SiteId, subject: &str) -> Option<(SiteId, VmId, DataPoint)> {
        let tail = subject.strip_prefix(&format!("nubis.relay.{to}."))?;
        let ParsedSubject::Monitoring {
            primary,
            vm,
            data_point,
        } = Self::parse(&format!("nubis.mon.{tail}")).ok()?
        else {
            return None;
        };
        (Self::monitoring_relay(to, &primary, &vm, &data_point).as_str() == subject)
            .then_some((primary, vm, data_point))
    }

    /// `nubis.events.<site>.sla.<vm>`: where a site publishes the SLA events of a VM. Never
    /// leaves the site (the leaf connection denies `nubis.events.>`).
    pub fn sla_event(site: &SiteId, vm: &VmId) -> Self {
        Self(format!("nubis.events.{site}.sla.{vm}"))
    }

    /// `nubis.site.<site>.intake.<host>`: host agent `host` hands its batches to the site here.
    /// Each host's NATS user may publish only on its own, so the site knows which host sent a
    /// batch from the subject it arrived on.
    pub fn monitoring_intake(site: &SiteId, host: &HostId) -> Self {
        Self(format!("nubis.site.{site}.intake.{host}"))
    }

    /// `nubis.site.<site>.intake.*`: the site's subscription to the intake of all its hosts.
    pub fn monitoring_intake_all(site: &SiteId) -> Self {
        Self(format!("nubis.site.{site}.intake.*"))
    }

    /// The host of an intake subject of `site` (`nubis.site.<site>.intake.<host>`), if it is one.
    pub fn intake_host(site: &SiteId, subject: &str) -> Option<HostId> {
        let rest = subject.strip_prefix("nubis.site.")?;
        let rest = rest.strip_prefix(site.as_str())?;
        let host = rest.strip_prefix(".intake.")?;
        HostId::new(host).ok()
    }

    /// `nubis.acct.<site>.<vm>`: the subject of `site`'s accounting stream for one VM (in the
    /// site's own JetStream domain; never leaves the site).
    pub fn accounting(site: &SiteId, vm: &VmId) -> Self {
        Self(format!("nubis.acct.{site}.{vm}"))
    }

    /// `nubis.acct.<site>.>`: all of `site`'s accounting stream.
    pub fn accounting_all(site: &SiteId) -> Self {
        Self(format!("nubis.acct.{site}.>"))
    }

    /// `nubis.site.<site>.outbox.<upstream>`: site-internal, the subject of `site`'s monitoring
    /// outbox stream for batches on their way to `upstream`.
    pub fn outbox(site: &SiteId, upstream: &SiteId) -> Self {
        Self(format!("nubis.site.{site}.outbox.{upstream}"))
    }

    /// Every outbox subject of `site`.
    pub fn outbox_all(site: &SiteId) -> Self {
        Self(format!("nubis.site.{site}.outbox.*"))
    }

    /// `nubis.site.<site>.host.<host>.<op>`: a site-internal request to a host agent. `op` is
    /// one or more dot-separated tokens of `[A-Za-z0-9_-]` (e.g. `capacity`, `vm.prepare`).
    pub fn host(site: &SiteId, host: &HostId, op: &str) -> Result<Self, SubjectError> {
        if !is_dotted_tokens(op, MAX_OP_LEN) {
            return Err(SubjectError::Token(op.to_owned()));
        }
        Ok(Self(format!("nubis.site.{site}.host.{host}.{op}")))
    }

    /// `nubis.site.<site>.host.<host>.>`: everything a host agent answers.
    pub fn host_all(site: &SiteId, host: &HostId) -> Self {
        Self(format!("nubis.site.{site}.host.{host}.>"))
    }

    /// `nubis.site.<site>.>`: all site-internal traffic (never exported over a leaf connection).
    pub fn site_internal_all(site: &SiteId) -> Self {
        Self(format!("nubis.site.{site}.>"))
    }

    /// `nubis.reply.<site>._any`: the connection-wide reply-inbox prefix of every process of a
    /// site that sends requests across sites (JetStream across domains, plain requests). The hub
    /// delivers `nubis.reply.<site>.>` only to that site; replies on the default `_INBOX` never
    /// leave a site. Any site may publish under `_any` (the token cannot be a site id, which
    /// starts with a letter or digit), so signed calls take their replies on
    /// [`Subject::call_inbox_prefix`] instead.
    pub fn reply_inbox_prefix(site: &SiteId) -> String {
        format!("nubis.reply.{site}._any")
    }

    /// `nubis.reply.<requester>.<responder>`: the prefix of the inbox of one signed call from
    /// `requester` answered by `responder`. The hub lets only `responder` publish under it, so
    /// no third site can put a reply in the way of the real one.
    pub fn call_inbox_prefix(requester: &SiteId, responder: &SiteId) -> String {
        format!("nubis.reply.{requester}.{responder}")
    }

    /// `nubis.site.<site>.inbox`: the reply-inbox prefix of a site's site-internal requests, so
    /// that replies carrying host paths stay under `nubis.site.>`, which never leaves the site.
    pub fn site_inbox_prefix(site: &SiteId) -> String {
        format!("nubis.site.{site}.inbox")
    }

    /// `nubis.site.<site>.host.<host>.inbox`: the reply-inbox prefix of host agent `host`'s own
    /// requests (the monitoring intake), inside the subjects only that host may subscribe to.
    pub fn host_inbox_prefix(site: &SiteId, host: &HostId) -> String {
        format!("nubis.site.{site}.host.{host}.inbox")
    }

    /// `_INBOX.<operator>`: the reply-inbox prefix of operator `operator`'s connections (the
    /// nubis CLI's, or the nats CLI's with `--inbox-prefix`). Each operator's NATS user may
    /// subscribe only under its own, so no operator reads another's replies.
    pub fn operator_inbox_prefix(operator: &str) -> String {
        format!("_INBOX.{operator}")
    }

    /// `nubis.ops.<site>.<endpoint>`: the operator API.
    pub fn ops(site: &SiteId, endpoint: OpsEndpoint) -> Self {
        Self(format!("nubis.ops.{site}.{}", endpoint.as_str()))
    }

    /// `nubis.ops.<site>.<operator>.<endpoint>`: the operator API called by a named operator.
    /// The site's server lets each operator's NATS user publish only under its own name, so the
    /// name in the subject is the caller's. `None` if `operator` is not a valid operator name.
    pub fn ops_by(site: &SiteId, operator: &str, endpoint: OpsEndpoint) -> Option<Self> {
        ops::is_operator_name(operator)
            .then(|| Self(format!("nubis.ops.{site}.{operator}.{}", endpoint.as_str())))
    }

    /// `nubis.audit.<site>`: the site's audit records of mutating operator calls, captured by
    /// the `nubis-audit` stream of the site's own domain; never leaves the site.
    pub fn audit(site: &SiteId) -> Self {
        Self(format!("nubis.audit.{site}"))
    }

    /// `nubis.ops.<site>.>`: the whole operator API of a site.
    pub fn ops_all(site: &SiteId) -> Self {
        Self(format!("nubis.ops.{site}.>"))
    }
}
