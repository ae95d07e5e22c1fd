//! Directory entries (the GMA Directory Service and the federation's site list), stored as
//! values in the directory KV bucket in the hub's JetStream domain.
//!
//! Each value is a signed envelope written by the site the entry describes, so a reader verifies
//! it against that site's pinned key; the key names are built by
//! [`crate::subject::DirectoryKey`].

use serde::{Deserialize, Serialize};

use super::names::{ProducerId, ProxyUri};
use super::Body;
use crate::descriptor::DataPoint;
use crate::ids::{SiteId, VmId};

/// A site of the federation: its keys, its Transfer proxies and what it serves. Key `site.<site>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteEntry {
    /// The site.
    pub site: SiteId,
    /// Its Ed25519 verifying key. Informative: receivers verify against pinned partner keys.
    #[serde(with = "serde_bytes")]
    pub signing_key: [u8; 32],
    /// Its X25519 sealing key (monitoring of VMs it is primary for is sealed to it).
    #[serde(with = "serde_bytes")]
    pub sealing_key: [u8; 32],
    /// Its Transfer proxies.
    #[serde(default)]
    pub proxies: Vec<ProxyUri>,
    /// The federation subjects it answers on (e.g. `nubis.fed.<site>.migration.request`).
    #[serde(default)]
    pub subjects: Vec<String>,
    /// Time of this heartbeat, in milliseconds since the Unix epoch.
    pub heartbeat_ms: u64,
    /// When the site process started, in milliseconds since the Unix epoch.
    pub started_ms: u64,
}

impl Body for SiteEntry {
    const TYPE: &'static str = "SiteEntry";
}

/// One Transfer proxy. Key `proxy.<site>.<proxy>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyEntry {
    /// The proxy.
    pub proxy: ProxyUri,
    /// Time of this heartbeat, in milliseconds since the Unix epoch.
    pub heartbeat_ms: u64,
    /// When the proxy started, in milliseconds since the Unix epoch.
    pub started_ms: u64,
}

impl Body for ProxyEntry {
    const TYPE: &'static str = "ProxyEntry";
}

/// A GMA Producer: what it publishes for one VM. Key `producer.<site>.<vm>.<producer>`, written
/// by the site whose hosts run it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerRegistration {
    /// The VM measured.
    pub vm: VmId,
    /// Its primary site.
    pub primary_site: SiteId,
    /// The Producer (opaque; never a host name).
    pub producer: ProducerId,
    /// The data points it publishes.
    #[serde(default)]
    pub data_points: Vec<DataPoint>,
    /// A subject (with wildcards) covering everything it publishes, e.g. `nubis.mon.a.vm-1.>`.
    pub subject: String,
    /// Time of this heartbeat, in milliseconds since the Unix epoch.
    pub heartbeat_ms: u64,
}

impl Body for ProducerRegistration {
    const TYPE: &'static str = "ProducerRegistration";
}

/// A GMA Consumer: a site that consumes a VM's monitoring. Key `consumer.<vm>.<site>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerRegistration {
    /// The consuming site.
    pub consumer_site: SiteId,
    /// The VM.
    pub vm: VmId,
    /// The data points it wants; empty means all.
    #[serde(default)]
    pub data_points: Vec<DataPoint>,
    /// The site it delegated the VM to, named only under bus delivery: its word that this site
    /// is the next one of the VM's chain, so that the sites above may accept its batches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downstream: Option<SiteId>,
    /// Time of this heartbeat, in milliseconds since the Unix epoch.
    pub heartbeat_ms: u64,
}

impl Body for ConsumerRegistration {
    const TYPE: &'static str = "ConsumerRegistration";
}
