//! A federation of real nats-server processes on loopback: a hub and N member sites, each
//! site its own server with its own JetStream domain, connected to the hub as a leaf node. The
//! hub is one server, or a cluster of nodes ([`Federation::start_cluster`]: routes between
//! them, one JetStream domain, the directory replicated, every site's leaf remote listing every
//! node), as a production federation runs it.
//!
//! Configurations are rendered from the templates in `nats-config/` at the root of the
//! repository, so the tests run the same topology an operator deploys. Every server first binds
//! random ports (`-1`); the ports it got are read back and written into its configuration, so a
//! restarted server comes back on the same address with the same store, as a real site would.
//!
//! No server accepts clients without credentials. Every server gets fresh random passwords for
//! its users (see [`Role`]); [`Federation::connect`] logs in as a site's daemon (or the hub's
//! operator), [`Federation::connect_as`] as any role, and [`Federation::credentials`] hands
//! out a user and password for configuration files, such as a site daemon's.
//!
//! Every leaf connection is TLS verified both ways, as in a deployment: each federation makes a
//! CA of its own and certificates for the hub and every site (`pki.rs`, with the code of
//! `nubis tls`). Tests of which certificates the hub accepts issue their own
//! ([`Federation::certificate_authority`], [`Federation::write_certificate`]) and start a site
//! server with them ([`Federation::spawn_leaf`]). Clients stay on loopback without TLS.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use rand::distributions::{Alphanumeric, DistString};
use tempfile::TempDir;
use tracing::info;

use crate::binary::NatsServerBinary;
use crate::monitor;
use crate::wait::DEFAULT_TIMEOUT;
use crate::wan::{LinkSpec, WanLink};

mod bucket;
mod cluster;
mod error;
mod extra_leaf;
mod hosts;
mod pki;
mod readiness;
mod role;
mod server;
#[cfg(test)]
mod tests;

pub use bucket::DIRECTORY_BUCKET_CONFIG;
pub use error::Error;
pub use extra_leaf::ExtraLeaf;
pub use hosts::host_user;
pub use pki::TlsFiles;
pub use role::Role;
use server::{render_template, Server};

/// The name under which the hub is addressed in [`Federation`] methods; no site may take it.
/// It names the hub's first node; where a method reads or connects rather than stops, starts
/// or kills, it stands for any running node of the hub (the first one running).
pub const HUB: &str = "hub";

/// How many replicas the directory bucket gets at most: three, as on a production hub.
const DIRECTORY_REPLICAS: usize = 3;

/// JetStream domain of the hub, where the federation's shared buckets live.
pub const HUB_DOMAIN: &str = "hub";

const HOST: &str = "127.0.0.1";
use nubis_bus::server_config::{
    HUB as HUB_TEMPLATE, HUB_CLUSTER as HUB_CLUSTER_TEMPLATE,
    HUB_LEAF_USER as HUB_LEAF_USER_TEMPLATE, LEAF as LEAF_TEMPLATE,
};

/// The name of the hub's `n`-th node, counting from 1.
fn hub_node_name(n: usize) -> String {
    if n <= 1 {
        HUB.to_owned()
    } else {
        format!("{HUB}-{n}")
    }
}

/// Distinguishes the log directories of several federations started by one test process.
static FEDERATION_SEQ: AtomicUsize = AtomicUsize::new(0);

/// Where failing tests keep their server logs: `nubis-test-logs/` in the cargo target
/// directory (`CARGO_TARGET_DIR`, else the workspace's `target/`).
pub fn kept_logs_root() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(
            || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"),
            PathBuf::from,
        )
        .join("nubis-test-logs")
}

/// A hub and its member sites, each a real nats-server process on loopback.
///
/// Dropping it kills every server and removes its directory; when the drop happens during a
/// panic (a failing test), the server logs and configurations are first copied to
/// `target/nubis-test-logs/` and the path is printed.
#[derive(Debug)]
pub struct Federation {
    binary: NatsServerBinary,
    /// The hub's nodes, never none; the first is named [`HUB`], the others `hub-2`, `hub-3`, ...
    hubs: Vec<Server>,
    sites: Vec<Server>,
    label: String,
    root: TempDir,
    /// The federation's CA; every leaf connection is TLS verified against it.
    pki: pki::Pki,
    /// Per site, the passwords of its host agents' users (see [`Federation::host_credentials`]).
    host_passwords: BTreeMap<String, BTreeMap<String, String>>,
    /// The sites whose leaf connection goes through a WAN link, with the link's spec at start.
    link_specs: BTreeMap<String, LinkSpec>,
    /// Those links, once started (see [`Federation::link`]).
    links: BTreeMap<String, WanLink>,
}

impl Federation {
    /// Starts a hub and one leaf-node site per id, with the nats-server found by
    /// [`NatsServerBinary::locate`], and waits until all are federated.
    pub async fn start(sites: &[&str]) -> Result<Self, Error> {
        let binary = NatsServerBinary::locate()?;
        Self::start_with(&binary, sites).await
    }

    /// Like [`Federation::start`] with a given binary.
    pub async fn start_with(binary: &NatsServerBinary, sites: &[&str]) -> Result<Self, Error> {
        Self::start_with_links(binary, sites, |_| None).await
    }

    /// Like [`Federation::start_with`], with the leaf connection of every site for which
    /// `link_for` gives a spec going through a [`WanLink`] of that spec (TLS passes through
    /// it). [`Federation::link`] then changes, cuts and restores it.
    pub async fn start_with_links(
        binary: &NatsServerBinary,
        sites: &[&str],
        link_for: impl Fn(&str) -> Option<LinkSpec>,
    ) -> Result<Self, Error> {
        Self::start_cluster(binary, sites, 1, link_for).await
    }

    /// Like [`Federation::start_with_links`], with the hub as a cluster of `hub_nodes` nodes
    /// (at least one): routes between them, TLS verified both ways, one JetStream domain, the
    /// directory bucket replicated on up to three of them. Every site's leaf remote lists every
    /// node (through the site's link, if it has one), so a site whose node fails reconnects to
    /// another. The nodes are named [`HUB`], `hub-2`, `hub-3`, ... ([`Federation::hub_nodes`]).
    pub async fn start_cluster(
        binary: &NatsServerBinary,
        sites: &[&str],
        hub_nodes: usize,
        link_for: impl Fn(&str) -> Option<LinkSpec>,
    ) -> Result<Self, Error> {
        let node_names: Vec<String> = (1..=hub_nodes.max(1)).map(hub_node_name).collect();
        for (i, id) in sites.iter().enumerate() {
            let valid = !id.is_empty()
                && *id != HUB
                && !id.starts_with("hub-")
                && id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !valid {
                return Err(Error::InvalidSiteId {
                    id: (*id).to_owned(),
                });
            }
            if sites[..i].contains(id) {
                return Err(Error::DuplicateSite {
                    id: (*id).to_owned(),
                });
            }
        }
        let root = tempfile::Builder::new()
            .prefix("nubis-fed-")
            .tempdir()
            .map_err(Server::io("create", &std::env::temp_dir()))?;
        let label = std::thread::current()
            .name()
            .unwrap_or("federation")
            .replace("::", "__");

        let password = || Alphanumeric.sample_string(&mut rand::thread_rng(), 24);
        let sys_password = password();
        // Every server gets passwords of its own for every role, so that a credential of one
        // site is worth nothing at another.
        let common = |server: &mut Server| {
            server.values.insert("HOST", HOST.to_owned());
            server.values.insert("LEAF_HOST", HOST.to_owned());
            server.values.insert("SYS_PASSWORD", sys_password.clone());
            for role in Role::ALL {
                if role.exists_on(server.is_hub()) {
                    server
                        .values
                        .insert(role.password_placeholder(), password());
                }
            }
            let store = server.dir.join("store");
            let ports = server.ports_dir();
            server
                .values
                .insert("STORE", store.to_string_lossy().into_owned());
            server
                .values
                .insert("PORTS_DIR", ports.to_string_lossy().into_owned());
        };

        // Every node of the hub has the same users and passwords: a client that reconnects to
        // another node logs in as before.
        let mut first = Server::new(HUB, root.path().join(HUB), HUB_TEMPLATE, true);
        common(&mut first);
        let mut hubs = vec![first];
        for name in node_names.iter().skip(1) {
            let mut node = Server::new(name, root.path().join(name), HUB_TEMPLATE, true);
            node.values = hubs[0].values.clone();
            let store = node.dir.join("store");
            let ports = node.ports_dir();
            node.values
                .insert("STORE", store.to_string_lossy().into_owned());
            node.values
                .insert("PORTS_DIR", ports.to_string_lossy().into_owned());
            hubs.push(node);
        }
        for node in &mut hubs {
            node.values.insert("NODE", node.name.clone());
        }
        let mut leaf_users = Vec::new();
        let mut site_servers = Vec::new();
        for id in sites {
            let mut site = Server::new(
                id,
                root.path().join(format!("site-{id}")),
                LEAF_TEMPLATE,
                false,
            );
            common(&mut site);
            let leaf_password = password();
            leaf_users.push(render_template(
                HUB,
                HUB_LEAF_USER_TEMPLATE,
                [
                    ("SITE", (*id).to_owned()),
                    ("LEAF_PASSWORD", leaf_password.clone()),
                ],
            )?);
            site.values.insert("SITE", (*id).to_owned());
            site.values.insert(hosts::HOST_USERS, String::new());
            site.values.insert("LEAF_PASSWORD", leaf_password);
            site_servers.push(site);
        }
        for node in &mut hubs {
            node.values.insert("LEAF_USERS", leaf_users.join("\n"));
        }
        let pki = Self::issue_certificates(root.path(), &mut hubs, &mut site_servers)?;
        cluster::configure(&mut hubs, &password())?;

        let mut federation = Self {
            binary: binary.clone(),
            hubs,
            sites: site_servers,
            label,
            root,
            pki,
            host_passwords: BTreeMap::new(),
            link_specs: sites
                .iter()
                .filter_map(|id| link_for(id).map(|spec| ((*id).to_owned(), spec)))
                .collect(),
            links: BTreeMap::new(),
        };
        match federation.boot().await {
            Ok(()) => Ok(federation),
            Err(err) => {
                federation.report_kept_logs();
                Err(err)
            }
        }
    }

    async fn boot(&mut self) -> Result<(), Error> {
        // A clustered node becomes healthy only once its JetStream meta group has a leader, so
        // every node starts before any is waited for.
        for node in &mut self.hubs {
            node.spawn(&self.binary)?;
        }
        for node in &mut self.hubs {
            node.wait_started(DEFAULT_TIMEOUT).await?;
        }
        self.create_directory_bucket().await?;
        // HOST is loopback: a link listens there too, so the hub's certificate still matches
        // the address the site dials.
        let hub_leaves: Vec<std::net::SocketAddr> = self
            .hubs
            .iter()
            .map(|node| {
                std::net::SocketAddr::from((
                    std::net::Ipv4Addr::LOCALHOST,
                    node.leaf_port.unwrap_or_default(),
                ))
            })
            .collect();
        for site in &mut self.sites {
            let dialed = match self.link_specs.get(&site.name) {
                Some(spec) => {
                    let link = WanLink::start_many(&hub_leaves, *spec)
                        .await
                        .map_err(Error::WanLink)?;
                    let addrs = link.addrs().to_vec();
                    self.links.insert(site.name.clone(), link);
                    addrs
                }
                None => hub_leaves.clone(),
            };
            let password = site
                .values
                .get("LEAF_PASSWORD")
                .cloned()
                .unwrap_or_default();
            let urls = dialed
                .iter()
                .map(|addr| format!("\"nats-leaf://{}:{password}@{addr}\"", site.name))
                .collect::<Vec<_>>()
                .join(", ");
            site.values.insert("HUB_LEAF_URLS", urls);
            site.spawn(&self.binary)?;
        }
        for site in &mut self.sites {
            site.wait_started(DEFAULT_TIMEOUT).await?;
        }
        self.wait_federated().await?;
        info!(hub = %self.hub_url(), nodes = self.hubs.len(), sites = self.sites.len(), "federation ready");
        Ok(())
    }

    /// The hub node that clients reach as [`HUB`]: the first one running (the first one, if
    /// none runs).
    fn hub(&self) -> &Server {
        self.hubs
            .iter()
            .find(|node| node.is_running())
            .unwrap_or(&self.hubs[0])
    }

    fn server(&self, name: &str) -> Result<&Server, Error> {
        if name == HUB {
            return Ok(self.hub());
        }
        self.hubs
            .iter()
            .chain(&self.sites)
            .find(|s| s.name == name)
            .ok_or_else(|| Error::UnknownServer {
                name: name.to_owned(),
            })
    }

    fn server_mut(&mut self, name: &str) -> Result<&mut Server, Error> {
        self.hubs
            .iter_mut()
            .chain(&mut self.sites)
            .find(|s| s.name == name)
            .ok_or_else(|| Error::UnknownServer {
                name: name.to_owned(),
            })
    }

    /// The names of the hub's nodes: [`HUB`], then `hub-2`, `hub-3`, ...
    pub fn hub_nodes(&self) -> Vec<&str> {
        self.hubs.iter().map(|s| s.name.as_str()).collect()
    }

    /// The hub node that site `site`'s leaf connection is on, if it is connected.
    pub async fn hub_node_of(&self, site: &str) -> Result<Option<String>, Error> {
        for node in self.hubs.iter().filter(|n| n.is_running()) {
            if self.leaves_of(node).await?.iter().any(|n| n == site) {
                return Ok(Some(node.name.clone()));
            }
        }
        Ok(None)
    }

    async fn leaves_of(&self, node: &Server) -> Result<Vec<String>, Error> {
        let port = node.http_port.ok_or_else(|| Error::NotRunning {
            name: node.name.clone(),
        })?;
        monitor::leaf_names(port)
            .await
            .map_err(|source| Error::Monitor {
                server: node.name.clone(),
                source,
            })
    }

    /// The WAN link in front of a site's leaf connection, if it was started with one
    /// ([`Federation::start_with_links`]).
    pub fn link(&self, site: &str) -> Option<&WanLink> {
        self.links.get(site)
    }

    /// The nats-server binary in use.
    pub fn binary(&self) -> &NatsServerBinary {
        &self.binary
    }

    /// The site ids, in the order given at start.
    pub fn sites(&self) -> Vec<&str> {
        self.sites.iter().map(|s| s.name.as_str()).collect()
    }

    /// Client URL of the hub (its first running node). The hub is running whenever no test
    /// has stopped it, so this returns an empty string only while no node of it runs.
    pub fn hub_url(&self) -> String {
        self.hub().url().unwrap_or_default()
    }

    /// Client URL of a site's server (or of the hub, named [`HUB`]).
    pub fn site_url(&self, site: &str) -> Result<String, Error> {
        self.server(site)?.url()
    }

    /// Monitoring (HTTP) port of a server, for `/varz`, `/leafz`, `/jsz` and the like.
    pub fn monitoring_port(&self, name: &str) -> Result<u16, Error> {
        let server = self.server(name)?;
        server.http_port.ok_or_else(|| Error::NotRunning {
            name: name.to_owned(),
        })
    }

    /// The log file of a server; it accumulates across restarts.
    pub fn log_path(&self, name: &str) -> Result<PathBuf, Error> {
        Ok(self.server(name)?.log_path())
    }

    /// The process id of a server, while it runs (for measuring its CPU time, say).
    pub fn pid(&self, name: &str) -> Result<u32, Error> {
        self.server(name)?
            .child
            .as_ref()
            .map(std::process::Child::id)
            .ok_or_else(|| Error::NotRunning {
                name: name.to_owned(),
            })
    }

    /// Whether a server's process is running (as far as the federation last saw).
    pub fn is_running(&self, name: &str) -> Result<bool, Error> {
        Ok(self.server(name)?.is_running())
    }

    /// Connects a client to a site's server as that site's daemon ([`Role::Site`]), or to the
    /// hub, named [`HUB`], as the hub's operator.
    pub async fn connect(&self, name: &str) -> Result<async_nats::Client, Error> {
        let server = self.server(name)?;
        server.connect_as(server.default_role()).await
    }

    /// Connects a client to a site's server (or the hub's) as `role`.
    pub async fn connect_as(&self, name: &str, role: Role) -> Result<async_nats::Client, Error> {
        self.server(name)?.connect_as(role).await
    }

    /// A client of a site's daemon user for site-internal requests (to host agents): its
    /// replies arrive on `nubis.site.<site>.inbox.…`, which never leaves the site, as the site
    /// daemon's own site-internal connection does.
    pub async fn connect_site_internal(&self, site: &str) -> Result<async_nats::Client, Error> {
        let server = self.server(site)?;
        let (user, password) = server.credentials(Role::Site)?;
        async_nats::ConnectOptions::with_user_and_password(user, password)
            .name(format!("nubis-testkit-{site}-internal"))
            .custom_inbox_prefix(format!("nubis.site.{site}.inbox"))
            .connect(server.url()?)
            .await
            .map_err(|source| Error::Connect {
                server: site.to_string(),
                source,
            })
    }

    /// User name and password of `role` on a site's server (or the hub's), for a process that
    /// connects by itself, such as a site daemon from its configuration file. They stay the
    /// same across restarts.
    pub fn credentials(&self, name: &str, role: Role) -> Result<(String, String), Error> {
        self.server(name)?.credentials(role)
    }

    /// Names of the sites the hub (any of its running nodes) currently sees connected as leaf
    /// nodes, sorted.
    pub async fn leaf_connections(&self) -> Result<Vec<String>, Error> {
        let mut names = Vec::new();
        for node in self.hubs.iter().filter(|n| n.is_running()) {
            names.extend(self.leaves_of(node).await?);
        }
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// Stops a server gracefully and waits until the hub no longer counts it (for a site). A
    /// node of the hub is named exactly ([`HUB`] is the first node).
    pub async fn stop(&mut self, name: &str) -> Result<(), Error> {
        let binary = self.binary.clone();
        self.server_mut(name)?.stop(&binary).await?;
        self.wait_leaf_gone(name).await
    }

    /// Kills a server with SIGKILL, as a crash would, and waits until the hub no longer counts
    /// it (for a site).
    pub async fn kill(&mut self, name: &str) -> Result<(), Error> {
        self.server_mut(name)?.kill();
        self.wait_leaf_gone(name).await
    }

    /// Starts a server again (stopping it first if it runs) on the same ports with the same
    /// store, and waits until the federation is whole again.
    pub async fn restart(&mut self, name: &str) -> Result<(), Error> {
        let binary = self.binary.clone();
        let server = self.server_mut(name)?;
        server.stop(&binary).await?;
        server.spawn(&binary)?;
        server.wait_started(DEFAULT_TIMEOUT).await?;
        self.wait_federated().await?;
        info!(server = name, "restarted and federated");
        Ok(())
    }

    /// Copies every server's log and configuration out of the temporary directory into
    /// `target/nubis-test-logs/<test>-<pid>-<n>/` and returns that directory.
    pub fn keep_logs(&self) -> Result<PathBuf, Error> {
        let seq = FEDERATION_SEQ.fetch_add(1, Ordering::Relaxed);
        let dir = kept_logs_root().join(format!("{}-{}-{seq}", self.label, std::process::id()));
        fs::create_dir_all(&dir).map_err(Server::io("create", &dir))?;
        for server in self.hubs.iter().chain(&self.sites) {
            for (from, suffix) in [(server.log_path(), "log"), (server.config_path(), "conf")] {
                if from.exists() {
                    let to = dir.join(format!("{}.{suffix}", server.name));
                    fs::copy(&from, &to).map_err(Server::io("copy", &from))?;
                }
            }
        }
        Ok(dir)
    }

    fn report_kept_logs(&self) {
        match self.keep_logs() {
            Ok(dir) => eprintln!("nubis-testkit: nats-server logs kept in {}", dir.display()),
            Err(err) => eprintln!("nubis-testkit: could not keep nats-server logs: {err}"),
        }
    }

    /// Stops every server gracefully, sites first so the hub sees them leave, then removes the
    /// federation's directory.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        let binary = self.binary.clone();
        for site in &mut self.sites {
            site.stop(&binary).await?;
        }
        for node in &mut self.hubs {
            node.stop(&binary).await?;
        }
        Ok(())
    }

    /// The federation's temporary directory (stores, configurations, logs).
    pub fn root(&self) -> &Path {
        self.root.path()
    }
}

impl Drop for Federation {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.report_kept_logs();
        }
        for site in &mut self.sites {
            site.kill();
        }
        for node in &mut self.hubs {
            node.kill();
        }
    }
}
