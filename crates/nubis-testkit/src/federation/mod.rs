//! A federation of real nats-server processes on loopback: one hub and N member sites, each
//! site its own server with its own JetStream domain, connected to the hub as a leaf node.
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
pub const HUB: &str = "hub";

/// JetStream domain of the hub, where the federation's shared buckets live.
pub const HUB_DOMAIN: &str = "hub";

const HOST: &str = "127.0.0.1";
const HUB_TEMPLATE: &str = include_str!("../../../../nats-config/hub.conf");
const LEAF_TEMPLATE: &str = include_str!("../../../../nats-config/leaf.conf");
const HUB_LEAF_USER_TEMPLATE: &str = include_str!("../../../../nats-config/hub-leaf-user.conf");

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
    hub: Server,
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
        for (i, id) in sites.iter().enumerate() {
            let valid = !id.is_empty()
                && *id != HUB
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

        let mut hub = Server::new(HUB, root.path().join(HUB), HUB_TEMPLATE);
        common(&mut hub);
        let mut leaf_users = Vec::new();
        let mut site_servers = Vec::new();
        for id in sites {
            let mut site = Server::new(id, root.path().join(format!("site-{id}")), LEAF_TEMPLATE);
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
        hub.values.insert("LEAF_USERS", leaf_users.join("\n"));
        let pki = Self::issue_certificates(root.path(), &mut hub, &mut site_servers)?;

        let mut federation = Self {
            binary: binary.clone(),
            hub,
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
        self.hub.spawn(&self.binary)?;
        self.hub.wait_started(DEFAULT_TIMEOUT).await?;
        self.create_directory_bucket().await?;
        let hub_leaf = format!("{HOST}:{}", self.hub.leaf_port.unwrap_or_default());
        for site in &mut self.sites {
            let url = match self.link_specs.get(&site.name) {
                Some(spec) => {
                    // HOST is loopback: the link listens there too, so the hub's certificate
                    // still matches the address the site dials.
                    let target = std::net::SocketAddr::from((
                        std::net::Ipv4Addr::LOCALHOST,
                        self.hub.leaf_port.unwrap_or_default(),
                    ));
                    let link = WanLink::start(target, *spec)
                        .await
                        .map_err(Error::WanLink)?;
                    let url = link.addr().to_string();
                    self.links.insert(site.name.clone(), link);
                    url
                }
                None => hub_leaf.clone(),
            };
            site.values.insert("HUB_LEAF_URL", url);
            site.spawn(&self.binary)?;
        }
        for site in &mut self.sites {
            site.wait_started(DEFAULT_TIMEOUT).await?;
        }
        self.wait_federated().await?;
        info!(hub = %self.hub_url(), sites = self.sites.len(), "federation ready");
        Ok(())
    }

    fn server(&self, name: &str) -> Result<&Server, Error> {
        if name == HUB {
            return Ok(&self.hub);
        }
        self.sites
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| Error::UnknownServer {
                name: name.to_owned(),
            })
    }

    fn server_mut(&mut self, name: &str) -> Result<&mut Server, Error> {
        if name == HUB {
            return Ok(&mut self.hub);
        }
        self.sites
            .iter_mut()
            .find(|s| s.name == name)
            .ok_or_else(|| Error::UnknownServer {
                name: name.to_owned(),
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

    /// Client URL of the hub. The hub is running whenever no test has stopped it, so this
    /// returns an empty string only between [`Federation::stop`] and [`Federation::restart`].
    pub fn hub_url(&self) -> String {
        self.hub.url().unwrap_or_default()
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

    /// Names of the sites the hub currently sees connected as leaf nodes, sorted.
    pub async fn leaf_connections(&self) -> Result<Vec<String>, Error> {
        let port = self.monitoring_port(HUB)?;
        monitor::leaf_names(port)
            .await
            .map_err(|source| Error::Monitor {
                server: HUB.to_owned(),
                source,
            })
    }

    /// Stops a server gracefully and waits until the hub no longer counts it (for a site).
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
        for server in std::iter::once(&self.hub).chain(&self.sites) {
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
        self.hub.stop(&binary).await
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
        self.hub.kill();
    }
}
