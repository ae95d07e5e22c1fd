//! The site configuration (`site.toml`): identity, bus, partners (the bilateral contracts) and
//! policies. Loaded once, validated at start, with errors that name the file and the key.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ed25519_dalek::VerifyingKey;
use nubis_protocol::descriptor::{DataPoint, Predicate, PredicateOp};
use nubis_protocol::identity::{parse_sealing_key, parse_signing_key, SiteIdentity};
use nubis_protocol::message::{HostId, ProxyId, ProxyUri};
use nubis_protocol::{SiteId, VmId};
use serde::{Deserialize, Serialize};

/// Longest accounting retention accepted, in seconds (100 years).
pub const MAX_ACCOUNTING_AGE_S: u64 = 100 * 365 * 24 * 3600;

use nubis_bus::config::Secret;
pub use nubis_bus::config::{ConfigError, Credentials, Login};

/// Which offers a site passes upstream in its answer to a Migration request (paper III-C,
/// Migration request handler step 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Exposure {
    /// Only offers for this site's own hosts.
    OnlyLocal,
    /// Own offers and those obtained from preferred partners.
    OnlyPreferred,
    /// Every offer obtained.
    #[default]
    All,
}

/// How this site passes a transfer endpoint it got from downstream (a partner's offer, or a
/// partner's prepared source) on to its upstream (paper III-D, location unawareness).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TransferMode {
    /// Pass the downstream proxy and token on as they are: the upstream's transfer runs
    /// between the far ends' proxies, and the upstream learns the far end's proxy.
    #[default]
    Direct,
    /// Put this site's own proxy and token in their place: the data passes through this
    /// site's proxy, and the upstream never learns who is beyond this site.
    Relay,
}

/// The transfer policy (`[transfer]` and each partner's `transfer` key): which
/// [`TransferMode`] applies to endpoints passed to which upstream partner.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TransferPolicy {
    /// The mode for partners without a `transfer` key of their own.
    pub default: TransferMode,
    /// The partners' own modes.
    pub partners: BTreeMap<SiteId, TransferMode>,
}

impl TransferPolicy {
    /// The mode for endpoints passed to `upstream`.
    pub fn towards(&self, upstream: &SiteId) -> TransferMode {
        self.partners.get(upstream).copied().unwrap_or(self.default)
    }
}

/// The `[transfer]` table as written.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTransfer {
    #[serde(default)]
    default: TransferMode,
}

/// Delegation policy: whether and where this site forwards Migration requests.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Delegation {
    /// Whether this site may act as Controller on behalf of another site.
    #[serde(default = "yes")]
    pub allowed: bool,
    /// Partners to delegate to; empty means all partners.
    #[serde(default)]
    pub partners: Vec<SiteId>,
    /// Longest delegation chain this site takes part in.
    #[serde(default = "default_max_depth")]
    pub max_depth: u8,
}

impl Default for Delegation {
    fn default() -> Self {
        Self {
            allowed: true,
            partners: Vec::new(),
            max_depth: default_max_depth(),
        }
    }
}

/// The site's own policies (paper: "a site's own policies decide").
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Whether VMs of other primary sites are accepted at all.
    #[serde(default = "yes")]
    pub accept_foreign: bool,
    /// Delegation of Migration requests.
    #[serde(default)]
    pub delegation: Delegation,
    /// Which offers to expose upstream.
    #[serde(default)]
    pub expose: Exposure,
    /// What this site does with an eviction notice from downstream.
    #[serde(default)]
    pub eviction: EvictionPolicy,
    /// Whether endpoints passed upstream are relayed; from the `[transfer]` table and the
    /// partners' `transfer` keys, not from `[policy]`.
    #[serde(skip)]
    pub transfer: TransferPolicy,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            accept_foreign: true,
            delegation: Delegation::default(),
            expose: Exposure::All,
            eviction: EvictionPolicy::Migrate,
            transfer: TransferPolicy::default(),
        }
    }
}

/// What a site does with an eviction notice from the site it delegated a VM to (Forced
/// migration up the chain). The primary site has no upstream and always migrates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EvictionPolicy {
    /// Become Controller and migrate the VM away from the evicting site.
    #[default]
    Migrate,
    /// Pass the notice on to this site's own upstream, which must act in turn.
    PassUp,
}

/// Timing of the directory heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectoryTiming {
    /// How often the site refreshes its directory entry.
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// A partner whose heartbeat is older than this is shown unreachable.
    #[serde(default = "default_liveness_ms")]
    pub liveness_timeout_ms: u64,
}

impl Default for DirectoryTiming {
    fn default() -> Self {
        Self {
            heartbeat_ms: default_heartbeat_ms(),
            liveness_timeout_ms: default_liveness_ms(),
        }
    }
}

/// How a site delivers the monitoring batches of the VMs it runs (and passes on those relayed to
/// it) to the other sites on each VM's responsibility chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// Publish once on the public monitoring subject; every site on the chain receives it from
    /// the bus. The chain learns which site produces the batches (never which host).
    Bus,
    /// Hand each batch to the upstream site only, which passes it on under its own signature;
    /// the producing site stays hidden from everyone but its upstream.
    #[default]
    Relay,
}

impl Delivery {
    /// The policy's name in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bus => "bus",
            Self::Relay => "relay",
        }
    }
}

/// The `[monitoring]` section: delivery policy and accounting retention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitoringConfig {
    /// How batches travel up the chain.
    #[serde(default)]
    pub delivery: Delivery,
    /// How long the accounting stream keeps a batch, in seconds.
    #[serde(default = "default_accounting_max_age_s")]
    pub accounting_max_age_s: u64,
}

impl Default for MonitoringConfig {
    fn default() -> Self {
        Self {
            delivery: Delivery::default(),
            accounting_max_age_s: default_accounting_max_age_s(),
        }
    }
}

/// What a site does when an SLA rule's condition has held long enough.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SlaAction {
    /// Publish an event on the site's SLA event subject only.
    #[default]
    Event,
    /// Publish the event and ask the Controller to migrate the VM.
    Migrate,
}

/// One `[[sla]]` rule: `data_point op threshold`, holding continuously for `for_ms`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlaRule {
    /// The rule's name, unique in the file (it names the rule in events).
    pub name: String,
    /// The measured data point, e.g. `kpi.web.current_users`.
    pub data_point: DataPoint,
    /// The comparison.
    pub op: PredicateOp,
    /// The right-hand side of the comparison.
    pub threshold: f64,
    /// How long the condition must hold without interruption before the rule fires.
    #[serde(default)]
    pub for_ms: u64,
    /// The only VM the rule applies to; every VM when absent.
    #[serde(default)]
    pub vm: Option<VmId>,
    /// What to do when it fires.
    #[serde(default)]
    pub action: SlaAction,
}

impl SlaRule {
    /// The rule's condition as a descriptor predicate.
    pub fn predicate(&self) -> Predicate {
        Predicate {
            op: self.op,
            threshold: self.threshold,
        }
    }
}

fn default_accounting_max_age_s() -> u64 {
    30 * 24 * 3600
}
fn yes() -> bool {
    true
}
fn default_max_depth() -> u8 {
    3
}
fn default_heartbeat_ms() -> u64 {
    2_000
}
fn default_liveness_ms() -> u64 {
    6_000
}
fn default_hub_domain() -> String {
    "hub".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPartner {
    site: SiteId,
    signing_key: String,
    sealing_key: String,
    #[serde(default)]
    preference: i32,
    #[serde(default)]
    price_milli: u64,
    #[serde(default)]
    preferred: bool,
    #[serde(default)]
    transfer: Option<TransferMode>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHost {
    id: String,
    vm_root: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    site: SiteId,
    key_file: PathBuf,
    nats_url: String,
    #[serde(default)]
    nats_user: Option<String>,
    #[serde(default)]
    nats_password: Option<Secret>,
    #[serde(default)]
    nats_password_file: Option<PathBuf>,
    #[serde(default)]
    nats_tls_ca: Option<PathBuf>,
    #[serde(default)]
    nats_tls_cert: Option<PathBuf>,
    #[serde(default)]
    nats_tls_key: Option<PathBuf>,
    #[serde(default = "default_hub_domain")]
    hub_domain: String,
    data_dir: PathBuf,
    #[serde(default)]
    policy: Policy,
    #[serde(default)]
    directory: DirectoryTiming,
    #[serde(default)]
    partners: Vec<RawPartner>,
    #[serde(default)]
    hosts: Vec<RawHost>,
    #[serde(default = "default_proxy")]
    proxy: String,
    #[serde(default)]
    image_store: Option<PathBuf>,
    #[serde(default = "default_max_concurrent")]
    max_concurrent_migrations: usize,
    #[serde(default)]
    monitoring: MonitoringConfig,
    #[serde(default)]
    sla: Vec<SlaRule>,
    #[serde(default)]
    limits: crate::quota::Limits,
    #[serde(default)]
    retention: crate::retention::Retention,
    #[serde(default)]
    transfer: RawTransfer,
}

fn default_proxy() -> String {
    "p1".into()
}
fn default_max_concurrent() -> usize {
    4
}

/// A partner site under contract: its keys are pinned here, not taken from the directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partner {
    /// The partner's site id.
    pub site: SiteId,
    /// Verifies the partner's signatures.
    pub signing_key: VerifyingKey,
    /// Seals data for the partner.
    pub sealing_key: [u8; 32],
    /// Higher is better, for "greatest benefit" ranking.
    pub preference: i32,
    /// Contracted price in thousandths of a currency unit per VM-hour.
    pub price_milli: u64,
    /// Whether the partner counts as preferred for the exposure policy.
    pub preferred: bool,
}

/// The validated configuration of one site daemon.
#[derive(Debug)]
pub struct SiteConfig {
    /// This site.
    pub site: SiteId,
    /// The site's secret keys.
    pub identity: Arc<SiteIdentity>,
    /// How to reach the site's own (leaf) nats-server.
    pub nats: Credentials,
    /// JetStream domain of the federation hub (where the directory lives).
    pub hub_domain: String,
    /// Directory for the journal and the replay cache.
    pub data_dir: PathBuf,
    /// The site's policies.
    pub policy: Policy,
    /// Directory heartbeat timing.
    pub directory: DirectoryTiming,
    /// Partners under contract.
    pub partners: Vec<Partner>,
    /// Local VM hosts.
    pub hosts: Vec<HostId>,
    /// The VM root of each local host (its `host.toml`'s `vm_root`): a VM's files on a host
    /// are `<vm_root>/<vm id>/<logical name>`, computed here and never taken from a host's
    /// answer.
    pub vm_roots: std::collections::HashMap<HostId, PathBuf>,
    /// The site's Transfer proxy.
    pub proxy: ProxyUri,
    /// Directory of the primary site's VM images (the source of primary placements).
    pub image_store: PathBuf,
    /// Migrations this site runs as Controller at the same time; more wait in a queue.
    pub max_concurrent_migrations: usize,
    /// Monitoring delivery and accounting.
    pub monitoring: MonitoringConfig,
    /// SLA rules evaluated on the monitoring data this site can read.
    pub sla: Vec<SlaRule>,
    /// Per-partner limits (the `[limits]` table).
    pub limits: crate::quota::Limits,
    /// Freshness, retention and bounds of what partners send (the `[retention]` table).
    pub retention: crate::retention::Retention,
}

impl SiteConfig {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = nubis_bus::config::read(path)?;
        Self::parse(&text, path)
    }

    /// Validates configuration `text` read from `path` (relative paths resolve against its folder).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let invalid = |key: String, reason: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            reason,
        };
        let raw: RawConfig = nubis_bus::config::parse_toml(text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };

        if raw.hub_domain.is_empty() || raw.hub_domain.contains(['.', '*', '>', ' ']) {
            return Err(invalid(
                "hub_domain".into(),
                "must be a plain JetStream domain name".into(),
            ));
        }
        let nats = Credentials::from_keys(
            path,
            raw.nats_url,
            raw.nats_user,
            raw.nats_password,
            raw.nats_password_file,
        )?
        .with_tls(
            path,
            nubis_bus::config::TlsKeys {
                nats_tls_ca: raw.nats_tls_ca,
                nats_tls_cert: raw.nats_tls_cert,
                nats_tls_key: raw.nats_tls_key,
            },
        )?;
        if raw.directory.heartbeat_ms == 0 {
            return Err(invalid(
                "directory.heartbeat_ms".into(),
                "must be positive".into(),
            ));
        }
        if raw.directory.liveness_timeout_ms <= raw.directory.heartbeat_ms {
            return Err(invalid(
                "directory.liveness_timeout_ms".into(),
                "must be longer than directory.heartbeat_ms".into(),
            ));
        }

        let mut seen = BTreeSet::new();
        let mut partners = Vec::with_capacity(raw.partners.len());
        let mut policy = raw.policy;
        policy.transfer.default = raw.transfer.default;
        for (i, p) in raw.partners.into_iter().enumerate() {
            if p.site == raw.site {
                return Err(invalid(
                    format!("partners[{i}].site"),
                    "is this site itself".into(),
                ));
            }
            if !seen.insert(p.site.clone()) {
                return Err(invalid(
                    format!("partners[{i}].site"),
                    format!("repeats partner {:?}", p.site.as_str()),
                ));
            }
            let key = format!("partners[{i}].signing_key");
            let signing_key =
                parse_signing_key(&p.signing_key, &key).map_err(|e| invalid(key, e.to_string()))?;
            let key = format!("partners[{i}].sealing_key");
            let sealing_key =
                parse_sealing_key(&p.sealing_key, &key).map_err(|e| invalid(key, e.to_string()))?;
            if let Some(mode) = p.transfer {
                policy.transfer.partners.insert(p.site.clone(), mode);
            }
            partners.push(Partner {
                site: p.site,
                signing_key,
                sealing_key,
                preference: p.preference,
                price_milli: p.price_milli,
                preferred: p.preferred,
            });
        }
        for (i, d) in policy.delegation.partners.iter().enumerate() {
            if !seen.contains(d) {
                return Err(invalid(
                    format!("policy.delegation.partners[{i}]"),
                    format!("names {:?}, which is not a partner", d.as_str()),
                ));
            }
        }

        let identity =
            SiteIdentity::load(&resolve(&raw.key_file)).map_err(|source| ConfigError::Key {
                path: path.to_path_buf(),
                key: "key_file".into(),
                source,
            })?;
        if identity.site() != &raw.site {
            return Err(invalid(
                "key_file".into(),
                format!(
                    "holds the keys of site {:?}, not {:?}",
                    identity.site().as_str(),
                    raw.site.as_str()
                ),
            ));
        }

        let mut hosts = Vec::with_capacity(raw.hosts.len());
        let mut vm_roots = std::collections::HashMap::with_capacity(raw.hosts.len());
        for (i, h) in raw.hosts.into_iter().enumerate() {
            let id =
                HostId::new(&h.id).map_err(|e| invalid(format!("hosts[{i}].id"), e.to_string()))?;
            if !h.vm_root.is_absolute() {
                return Err(invalid(
                    format!("hosts[{i}].vm_root"),
                    "must be the absolute vm_root of the host's host.toml".into(),
                ));
            }
            if vm_roots.insert(id.clone(), h.vm_root).is_some() {
                return Err(invalid(format!("hosts[{i}].id"), "is listed twice".into()));
            }
            hosts.push(id);
        }
        let proxy = ProxyId::new(&raw.proxy).map_err(|e| invalid("proxy".into(), e.to_string()))?;
        if raw.max_concurrent_migrations == 0 {
            return Err(invalid(
                "max_concurrent_migrations".into(),
                "must be at least 1".into(),
            ));
        }
        if raw.monitoring.accounting_max_age_s == 0 {
            return Err(invalid(
                "monitoring.accounting_max_age_s".into(),
                "must be positive".into(),
            ));
        }
        // Far beyond any retention anyone wants; keeps the conversion to nanoseconds exact.
        if raw.monitoring.accounting_max_age_s > MAX_ACCOUNTING_AGE_S {
            return Err(invalid(
                "monitoring.accounting_max_age_s".into(),
                format!("must be at most {MAX_ACCOUNTING_AGE_S}"),
            ));
        }
        let mut names = BTreeSet::new();
        for (i, rule) in raw.sla.iter().enumerate() {
            if rule.name.is_empty() || rule.name.chars().any(char::is_control) {
                return Err(invalid(
                    format!("sla[{i}].name"),
                    "must be non-empty text".into(),
                ));
            }
            if !names.insert(rule.name.as_str()) {
                return Err(invalid(
                    format!("sla[{i}].name"),
                    format!("repeats rule {:?}", rule.name),
                ));
            }
            if !rule.threshold.is_finite() {
                return Err(invalid(
                    format!("sla[{i}].threshold"),
                    "must be a finite number".into(),
                ));
            }
        }
        if let Some((key, reason)) = raw.limits.invalid() {
            return Err(invalid(key.into(), reason.into()));
        }
        if let Some((key, reason)) = raw.retention.invalid() {
            return Err(invalid(key.into(), reason.into()));
        }
        let data_dir = resolve(&raw.data_dir);
        Ok(Self {
            limits: raw.limits,
            retention: raw.retention,
            monitoring: raw.monitoring,
            sla: raw.sla,
            proxy: ProxyUri::new(raw.site.clone(), proxy),
            image_store: raw
                .image_store
                .as_deref()
                .map(resolve)
                .unwrap_or_else(|| data_dir.join("images")),
            max_concurrent_migrations: raw.max_concurrent_migrations,
            site: raw.site,
            identity: Arc::new(identity),
            nats,
            hub_domain: raw.hub_domain,
            data_dir,
            policy,
            directory: raw.directory,
            partners,
            hosts,
            vm_roots,
        })
    }

    /// The partner record of `site`, if it is under contract.
    pub fn partner(&self, site: &SiteId) -> Option<&Partner> {
        self.partners.iter().find(|p| &p.site == site)
    }
}

#[cfg(test)]
mod tests;
