//! Typed constructors and a parser for every NATS subject nubis uses, and the directory's key names.
//!
//! Subjects are built only from validated identifiers ([`SiteId`], [`VmId`], [`ProxyId`],
//! [`HostId`], [`DataPoint`]), so a subject can never gain a wildcard or an extra token from
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
use crate::message::{
    AbortMigration, Aborted, Body, CommitMigration, Committed, ControlReply, ControlRequest,
    EvictionAccepted, EvictionNotice, HostId, InitiateTransfer, MigrationRequest, MonitoringBatch,
    Offers, PrepareMigration, Prepared, ProducerId, ProxyId, ProxyUri, TransferStatusReply,
    TransferVerification,
};

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

/// The federation operations, each answered on `nubis.fed.<site>.<suffix>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FederationOp {
    /// Migration request → offers.
    MigrationRequest,
    /// Forced migration down the chain (prepare at the Source).
    MigrationPrepare,
    /// Forced migration up the chain (eviction notice).
    MigrationEvict,
    /// Commit of a verified migration.
    MigrationCommit,
    /// Abort of a migration.
    MigrationAbort,
    /// Initiate transfer.
    TransferInitiate,
    /// Transfer verification.
    TransferVerify,
    /// The Control interface.
    VmControl,
}

impl FederationOp {
    /// Every federation operation.
    pub const ALL: [FederationOp; 8] = [
        Self::MigrationRequest,
        Self::MigrationPrepare,
        Self::MigrationEvict,
        Self::MigrationCommit,
        Self::MigrationAbort,
        Self::TransferInitiate,
        Self::TransferVerify,
        Self::VmControl,
    ];

    /// The two subject tokens after `nubis.fed.<site>.`.
    pub fn suffix(self) -> &'static str {
        match self {
            Self::MigrationRequest => "migration.request",
            Self::MigrationPrepare => "migration.prepare",
            Self::MigrationEvict => "migration.evict",
            Self::MigrationCommit => "migration.commit",
            Self::MigrationAbort => "migration.abort",
            Self::TransferInitiate => "transfer.initiate",
            Self::TransferVerify => "transfer.verify",
            Self::VmControl => "vm.control",
        }
    }

    /// The body type a request on this subject must carry.
    pub fn request_type(self) -> &'static str {
        match self {
            Self::MigrationRequest => MigrationRequest::TYPE,
            Self::MigrationPrepare => PrepareMigration::TYPE,
            Self::MigrationEvict => EvictionNotice::TYPE,
            Self::MigrationCommit => CommitMigration::TYPE,
            Self::MigrationAbort => AbortMigration::TYPE,
            Self::TransferInitiate => InitiateTransfer::TYPE,
            Self::TransferVerify => TransferVerification::TYPE,
            Self::VmControl => ControlRequest::TYPE,
        }
    }

    /// The body type of a successful reply (any request may also be answered by `ErrorReply`).
    pub fn reply_type(self) -> &'static str {
        match self {
            Self::MigrationRequest => Offers::TYPE,
            Self::MigrationPrepare => Prepared::TYPE,
            Self::MigrationEvict => EvictionAccepted::TYPE,
            Self::MigrationCommit => Committed::TYPE,
            Self::MigrationAbort => Aborted::TYPE,
            Self::TransferInitiate | Self::TransferVerify => TransferStatusReply::TYPE,
            Self::VmControl => ControlReply::TYPE,
        }
    }

    fn from_suffix(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|op| op.suffix() == s)
    }
}

/// Operations of a Transfer proxy, on `nubis.proxy.<site>.<proxy>.<op>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProxyOp {
    /// Site-internal: mint a transfer token for a VM on a host.
    Mint,
    /// Destination side: fetch the files of a source token (sent by the Destination site).
    Fetch,
    /// Status of a token (Transfer verification and Initiate transfer answer from it).
    Status,
    /// Site-internal: release a token and delete its objects after commit or abort.
    Release,
}

impl ProxyOp {
    /// Every proxy operation.
    pub const ALL: [ProxyOp; 4] = [Self::Mint, Self::Fetch, Self::Status, Self::Release];

    /// The subject token.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mint => "mint",
            Self::Fetch => "fetch",
            Self::Status => "status",
            Self::Release => "release",
        }
    }
}

/// Endpoints of the operator API, on `nubis.ops.<site>.<endpoint>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpsEndpoint {
    /// The site's own status.
    Status,
    /// Known partner sites and their liveness.
    Sites,
    /// VMs the site is responsible for.
    Vms,
    /// Deploy a new VM (primary placement). (planned)
    Deploy,
    /// Migrate a VM. (planned)
    Migrate,
    /// Evict a VM (Forced migration up the chain). (planned)
    Evict,
    /// Control-interface change of a VM. (planned)
    Control,
    /// Cancel a migration. (planned)
    Cancel,
    /// Resource usage of a VM over a time range, computed from the site's accounting stream.
    Usage,
    /// List the images of the site's image store.
    Images,
    /// Import an uploaded image into the site's image store.
    ImagePut,
    /// Counters of the site's monitoring delivery (received, delivered, stored, dropped).
    Monitoring,
}

impl OpsEndpoint {
    /// Every endpoint.
    pub const ALL: [OpsEndpoint; 12] = [
        Self::Status,
        Self::Sites,
        Self::Vms,
        Self::Deploy,
        Self::Migrate,
        Self::Evict,
        Self::Control,
        Self::Cancel,
        Self::Usage,
        Self::Monitoring,
        Self::Images,
        Self::ImagePut,
    ];

    /// The subject token.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Status => "status",
            Self::Sites => "sites",
            Self::Vms => "vms",
            Self::Deploy => "deploy",
            Self::Migrate => "migrate",
            Self::Evict => "evict",
            Self::Control => "control",
            Self::Cancel => "cancel",
            Self::Usage => "usage",
            Self::Images => "images",
            Self::ImagePut => "image_put",
            Self::Monitoring => "monitoring",
        }
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

    /// `nubis.site.<site>.mon.intake`: host agents hand their batches to the site here.
    pub fn monitoring_intake(site: &SiteId) -> Self {
        Self(format!("nubis.site.{site}.mon.intake"))
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

    /// `nubis.reply.<site>`: the reply-inbox prefix of every process of a site that sends
    /// requests across sites (site daemon, proxy, JetStream across domains). The hub delivers
    /// `nubis.reply.<site>.>` only to that site; replies on the default `_INBOX` never leave a
    /// site.
    pub fn reply_inbox_prefix(site: &SiteId) -> String {
        format!("nubis.reply.{site}")
    }

    /// `nubis.site.<site>.inbox`: the reply-inbox prefix of a site's site-internal requests, so
    /// that replies carrying host paths stay under `nubis.site.>`, which never leaves the site.
    pub fn site_inbox_prefix(site: &SiteId) -> String {
        format!("nubis.site.{site}.inbox")
    }

    /// `nubis.ops.<site>.<endpoint>`: the operator API.
    pub fn ops(site: &SiteId, endpoint: OpsEndpoint) -> Self {
        Self(format!("nubis.ops.{site}.{}", endpoint.as_str()))
    }

    /// `nubis.ops.<site>.>`: the whole operator API of a site.
    pub fn ops_all(site: &SiteId) -> Self {
        Self(format!("nubis.ops.{site}.>"))
    }

    /// Recognises a concrete (wildcard-free) nubis subject.
    pub fn parse(s: &str) -> Result<ParsedSubject, SubjectError> {
        let unrecognised = || SubjectError::Unrecognised(s.chars().take(256).collect());
        let rest = s.strip_prefix("nubis.").ok_or_else(unrecognised)?;
        let (area, rest) = rest.split_once('.').ok_or_else(unrecognised)?;
        let (first, rest) = rest.split_once('.').ok_or_else(unrecognised)?;
        match area {
            "fed" => {
                let site = SiteId::new(first)?;
                let op = FederationOp::from_suffix(rest).ok_or_else(unrecognised)?;
                Ok(ParsedSubject::Federation { site, op })
            }
            "proxy" => {
                let site = SiteId::new(first)?;
                let (proxy, op) = rest.split_once('.').ok_or_else(unrecognised)?;
                let proxy = ProxyUri::new(site, ProxyId::new(proxy)?);
                if let Some(m) = op.strip_prefix("progress.") {
                    let migration = m.parse().map_err(|_| unrecognised())?;
                    return Ok(ParsedSubject::ProxyProgress { proxy, migration });
                }
                let op = ProxyOp::ALL
                    .into_iter()
                    .find(|o| o.as_str() == op)
                    .ok_or_else(unrecognised)?;
                Ok(ParsedSubject::Proxy { proxy, op })
            }
            "mon" => {
                let primary = SiteId::new(first)?;
                let (vm, name) = rest.split_once('.').ok_or_else(unrecognised)?;
                let vm = VmId::new(vm)?;
                let data_point = if let Some(infra) = name.strip_prefix("infra.") {
                    DataPoint::new(infra).map_err(|_| SubjectError::Token(infra.to_owned()))?
                } else if name == "kpi" || name.starts_with("kpi.") {
                    DataPoint::new(name).map_err(|_| SubjectError::Token(name.to_owned()))?
                } else {
                    return Err(unrecognised());
                };
                if data_point.class() == DataPointClass::Kpi && name.starts_with("infra.") {
                    // `infra.kpi.…` would not round-trip through `monitoring`.
                    return Err(unrecognised());
                }
                Ok(ParsedSubject::Monitoring {
                    primary,
                    vm,
                    data_point,
                })
            }
            "site" => {
                let site = SiteId::new(first)?;
                let rest = rest.strip_prefix("host.").ok_or_else(unrecognised)?;
                let (host, op) = rest.split_once('.').ok_or_else(unrecognised)?;
                let host = HostId::new(host)?;
                if !is_dotted_tokens(op, MAX_OP_LEN) {
                    return Err(SubjectError::Token(op.to_owned()));
                }
                Ok(ParsedSubject::Host {
                    site,
                    host,
                    op: op.to_owned(),
                })
            }
            "ops" => {
                let site = SiteId::new(first)?;
                let endpoint = OpsEndpoint::ALL
                    .into_iter()
                    .find(|e| e.as_str() == rest)
                    .ok_or_else(unrecognised)?;
                Ok(ParsedSubject::Ops { site, endpoint })
            }
            _ => Err(unrecognised()),
        }
    }
}

/// A recognised subject, as returned by [`Subject::parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParsedSubject {
    /// `nubis.fed.<site>.<op>`
    Federation {
        /// The answering site.
        site: SiteId,
        /// The operation.
        op: FederationOp,
    },
    /// `nubis.proxy.<site>.<proxy>.<op>`
    Proxy {
        /// The proxy.
        proxy: ProxyUri,
        /// The operation.
        op: ProxyOp,
    },
    /// `nubis.proxy.<site>.<proxy>.progress.<migration>`
    ProxyProgress {
        /// The proxy.
        proxy: ProxyUri,
        /// The migration whose transfer progresses.
        migration: MigrationId,
    },
    /// `nubis.mon.<primary>.<vm>.infra.<dp>` or `nubis.mon.<primary>.<vm>.kpi.<…>`
    Monitoring {
        /// The VM's primary site.
        primary: SiteId,
        /// The VM.
        vm: VmId,
        /// The data point (for KPIs including the leading `kpi.`).
        data_point: DataPoint,
    },
    /// `nubis.site.<site>.host.<host>.<op>`
    Host {
        /// The site.
        site: SiteId,
        /// The host.
        host: HostId,
        /// The operation tokens.
        op: String,
    },
    /// `nubis.ops.<site>.<endpoint>`
    Ops {
        /// The site.
        site: SiteId,
        /// The endpoint.
        endpoint: OpsEndpoint,
    },
}

impl ParsedSubject {
    /// The body type a signed message on this subject must carry, where that is fixed.
    pub fn expected_body_type(&self) -> Option<&'static str> {
        match self {
            Self::Federation { op, .. } => Some(op.request_type()),
            Self::Monitoring { .. } => Some(MonitoringBatch::TYPE),
            _ => None,
        }
    }
}

/// A key in the directory bucket [`DIRECTORY_BUCKET`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DirectoryKey(String);

impl DirectoryKey {
    /// `site.<site>`: a [`crate::message::SiteEntry`].
    pub fn site(site: &SiteId) -> Self {
        Self(format!("site.{site}"))
    }

    /// `proxy.<site>.<proxy>`: a [`crate::message::ProxyEntry`].
    pub fn proxy(uri: &ProxyUri) -> Self {
        Self(format!("proxy.{}.{}", uri.site(), uri.proxy()))
    }

    /// `producer.<vm>.<producer>`: a [`crate::message::ProducerRegistration`].
    pub fn producer(vm: &VmId, producer: &ProducerId) -> Self {
        Self(format!("producer.{vm}.{producer}"))
    }

    /// `consumer.<vm>.<site>`: a [`crate::message::ConsumerRegistration`].
    pub fn consumer(vm: &VmId, site: &SiteId) -> Self {
        Self(format!("consumer.{vm}.{site}"))
    }

    /// The key as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `$KV.<bucket>.<key>`: the subject a put of this key is published on, which is the
    /// `subject` field of the entry's signed envelope.
    pub fn subject(&self) -> Subject {
        Subject(format!("$KV.{DIRECTORY_BUCKET}.{}", self.0))
    }

    /// Key filter for watching every site entry: `site.*`.
    pub fn sites_filter() -> &'static str {
        "site.*"
    }

    /// Key filter for watching the producers of one VM: `producer.<vm>.*`.
    pub fn producers_filter(vm: &VmId) -> String {
        format!("producer.{vm}.*")
    }
}

impl fmt::Display for DirectoryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(s: &str) -> SiteId {
        SiteId::new(s).unwrap()
    }

    #[test]
    fn federation_subjects_are_exact_and_parse_back() {
        let a = site("site-a");
        let cases = [
            (
                Subject::migration_request(&a),
                "nubis.fed.site-a.migration.request",
            ),
            (
                Subject::migration_prepare(&a),
                "nubis.fed.site-a.migration.prepare",
            ),
            (
                Subject::migration_evict(&a),
                "nubis.fed.site-a.migration.evict",
            ),
            (
                Subject::migration_commit(&a),
                "nubis.fed.site-a.migration.commit",
            ),
            (
                Subject::migration_abort(&a),
                "nubis.fed.site-a.migration.abort",
            ),
            (
                Subject::transfer_initiate(&a),
                "nubis.fed.site-a.transfer.initiate",
            ),
            (
                Subject::transfer_verify(&a),
                "nubis.fed.site-a.transfer.verify",
            ),
            (Subject::vm_control(&a), "nubis.fed.site-a.vm.control"),
        ];
        for (op, (subject, text)) in FederationOp::ALL.into_iter().zip(cases) {
            assert_eq!(subject.as_str(), text);
            assert_eq!(
                Subject::parse(text).unwrap(),
                ParsedSubject::Federation {
                    site: a.clone(),
                    op
                }
            );
        }
        assert_eq!(Subject::federation_all(&a).as_str(), "nubis.fed.site-a.>");
        assert_eq!(
            Subject::parse("nubis.fed.site-a.migration.request")
                .unwrap()
                .expected_body_type(),
            Some("MigrationRequest")
        );
    }

    #[test]
    fn proxy_subjects() {
        let uri: ProxyUri = "nats://b/proxy/p1".parse().unwrap();
        assert_eq!(
            Subject::proxy(&uri, ProxyOp::Fetch).as_str(),
            "nubis.proxy.b.p1.fetch"
        );
        assert_eq!(Subject::proxy_all(&uri).as_str(), "nubis.proxy.b.p1.>");
        let m = MigrationId([0xab; 16]);
        let progress = Subject::proxy_progress(&uri, &m);
        assert_eq!(
            progress.as_str(),
            format!("nubis.proxy.b.p1.progress.{}", "ab".repeat(16))
        );
        assert_eq!(
            Subject::parse(progress.as_str()).unwrap(),
            ParsedSubject::ProxyProgress {
                proxy: uri.clone(),
                migration: m
            }
        );
        for op in ProxyOp::ALL {
            let s = Subject::proxy(&uri, op);
            assert_eq!(
                Subject::parse(s.as_str()).unwrap(),
                ParsedSubject::Proxy {
                    proxy: uri.clone(),
                    op
                }
            );
        }
    }

    #[test]
    fn relay_subjects_are_parsed_only_when_addressed_here_and_exact() {
        let b = site("b");
        let vm = VmId::new("vm-1").unwrap();
        for dp in ["cpu.cores", "kpi.web.current_users"] {
            let dp = DataPoint::new(dp).unwrap();
            let s = Subject::monitoring_relay(&b, &site("a"), &vm, &dp);
            assert_eq!(
                Subject::parse_monitoring_relay(&b, s.as_str()),
                Some((site("a"), vm.clone(), dp.clone()))
            );
            assert_eq!(
                Subject::parse_monitoring_relay(&site("c"), s.as_str()),
                None
            );
        }
        for bad in [
            "nubis.relay.b",
            "nubis.relay.b.a.vm-1",
            "nubis.relay.b.a.vm-1.other.x",
            "nubis.relay.b.a.vm-1.infra.kpi.x",
            "nubis.mon.a.vm-1.infra.cpu",
            "nubis.relay.bb.a.vm-1.infra.cpu",
        ] {
            assert_eq!(Subject::parse_monitoring_relay(&b, bad), None, "{bad}");
        }
    }

    #[test]
    fn sla_events_stay_on_a_site_subject() {
        let vm = VmId::new("web-1").unwrap();
        assert_eq!(
            Subject::sla_event(&site("a"), &vm).as_str(),
            "nubis.events.a.sla.web-1"
        );
    }

    #[test]
    fn monitoring_subjects() {
        let a = site("a");
        let vm = VmId::new("vm-1").unwrap();
        let cpu = DataPoint::new("cpu.utilisation").unwrap();
        let kpi = DataPoint::new("kpi.web.current_users").unwrap();
        let s = Subject::monitoring(&a, &vm, &cpu);
        assert_eq!(s.as_str(), "nubis.mon.a.vm-1.infra.cpu.utilisation");
        assert_eq!(
            Subject::parse(s.as_str()).unwrap(),
            ParsedSubject::Monitoring {
                primary: a.clone(),
                vm: vm.clone(),
                data_point: cpu
            }
        );
        let s = Subject::monitoring(&a, &vm, &kpi);
        assert_eq!(s.as_str(), "nubis.mon.a.vm-1.kpi.web.current_users");
        assert_eq!(
            Subject::parse(s.as_str()).unwrap(),
            ParsedSubject::Monitoring {
                primary: a.clone(),
                vm: vm.clone(),
                data_point: kpi
            }
        );
        assert_eq!(
            Subject::monitoring_vm(&a, &vm).as_str(),
            "nubis.mon.a.vm-1.>"
        );
        assert_eq!(Subject::monitoring_primary(&a).as_str(), "nubis.mon.a.>");
        assert!(Subject::parse("nubis.mon.a.vm-1.infra.kpi.x").is_err());
        assert!(Subject::parse("nubis.mon.a.vm-1.other.x").is_err());
        assert!(Subject::parse("nubis.mon.a.vm-1.infra.*").is_err());
    }

    #[test]
    fn host_and_ops_subjects() {
        let a = site("a");
        let h = HostId::new("h1").unwrap();
        let s = Subject::host(&a, &h, "vm.prepare").unwrap();
        assert_eq!(s.as_str(), "nubis.site.a.host.h1.vm.prepare");
        assert_eq!(
            Subject::parse(s.as_str()).unwrap(),
            ParsedSubject::Host {
                site: a.clone(),
                host: h.clone(),
                op: "vm.prepare".into()
            }
        );
        for bad in ["", "a..b", "*", ">", "a.>", "a b", "x."] {
            assert!(
                matches!(Subject::host(&a, &h, bad), Err(SubjectError::Token(_))),
                "{bad:?}"
            );
        }
        assert_eq!(Subject::host_all(&a, &h).as_str(), "nubis.site.a.host.h1.>");
        assert_eq!(Subject::site_internal_all(&a).as_str(), "nubis.site.a.>");
        for e in OpsEndpoint::ALL {
            let s = Subject::ops(&a, e);
            assert_eq!(s.as_str(), format!("nubis.ops.a.{}", e.as_str()));
            assert_eq!(
                Subject::parse(s.as_str()).unwrap(),
                ParsedSubject::Ops {
                    site: a.clone(),
                    endpoint: e
                }
            );
        }
        assert_eq!(Subject::ops_all(&a).as_str(), "nubis.ops.a.>");
    }

    #[test]
    fn parse_rejects_foreign_and_malformed_subjects() {
        for bad in [
            "",
            "nubis",
            "nubis.fed",
            "nubis.fed.a",
            "nubis.fed.a.migration",
            "nubis.fed.a.migration.request.extra",
            "nubis.fed.*.migration.request",
            "nubis.fed.A.migration.request",
            "nubis.fed.a.>",
            "nubis.other.a.x",
            "other.fed.a.migration.request",
            "nubis.proxy.b.p1.delete",
            "nubis.proxy.b.p1.progress.nothex",
            "nubis.ops.a.drop",
            "nubis.site.a.vm.x",
        ] {
            assert!(Subject::parse(bad).is_err(), "{bad:?}");
        }
        assert!(matches!(
            Subject::parse("nubis.fed.a*.migration.request"),
            Err(SubjectError::Id(_))
        ));
    }

    #[test]
    fn directory_keys() {
        let a = site("a");
        let vm = VmId::new("vm-1").unwrap();
        let uri: ProxyUri = "nats://a/proxy/p1".parse().unwrap();
        let p = ProducerId::new("prod-7").unwrap();
        assert_eq!(DirectoryKey::site(&a).as_str(), "site.a");
        assert_eq!(DirectoryKey::proxy(&uri).as_str(), "proxy.a.p1");
        assert_eq!(
            DirectoryKey::producer(&vm, &p).as_str(),
            "producer.vm-1.prod-7"
        );
        assert_eq!(DirectoryKey::consumer(&vm, &a).as_str(), "consumer.vm-1.a");
        assert_eq!(
            DirectoryKey::site(&a).subject().as_str(),
            "$KV.nubis-directory.site.a"
        );
        assert_eq!(DirectoryKey::producers_filter(&vm), "producer.vm-1.*");
    }
}
