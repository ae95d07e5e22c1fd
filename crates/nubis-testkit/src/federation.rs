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

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use rand::distributions::{Alphanumeric, DistString};
use tempfile::TempDir;
use tracing::{debug, info, warn};

use crate::binary::{LocateError, NatsServerBinary};
use crate::monitor::{self, MonitorError};
use crate::wait::{Backoff, DEFAULT_TIMEOUT};

/// The name under which the hub is addressed in [`Federation`] methods; no site may take it.
pub const HUB: &str = "hub";

/// JetStream domain of the hub, where the federation's shared buckets live.
pub const HUB_DOMAIN: &str = "hub";

/// The stream of every site's transfer bucket, the only stream of a site's JetStream domain
/// that partners may read (`nats-config/hub-leaf-user.conf`).
const TRANSFER_STREAM: &str = "OBJ_nubis-xfer";

const HOST: &str = "127.0.0.1";
const HUB_TEMPLATE: &str = include_str!("../../../nats-config/hub.conf");
const LEAF_TEMPLATE: &str = include_str!("../../../nats-config/leaf.conf");
const HUB_LEAF_USER_TEMPLATE: &str = include_str!("../../../nats-config/hub-leaf-user.conf");

/// How long a server may take to exit after being asked to, before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// A JetStream request in a readiness probe; a lost request must not stall the whole wait.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Distinguishes the log directories of several federations started by one test process.
static FEDERATION_SEQ: AtomicUsize = AtomicUsize::new(0);

/// A user of a server in the federation, as defined in `nats-config/` (see the permission
/// table in `nats-config/README.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// A site's daemon (`site`): federation requests addressed to the site, the operator API,
    /// its host agents and proxies, JetStream. What [`Federation::connect`] uses at a site.
    Site,
    /// A site's operators (`operator`): that site's operator API only, read access to the
    /// directory, monitoring. At the hub, the hub's operator, unrestricted; what
    /// [`Federation::connect`] uses there.
    Operator,
    /// A site's host agents (`host`): site-internal subjects and monitoring events only.
    Host,
    /// A site's administrator (`admin`): unrestricted inside the site, so it shows what a
    /// site can do at most; the hub's permissions on the leaf connection still apply.
    Admin,
}

impl Role {
    /// Every role, in a fixed order.
    pub const ALL: [Role; 4] = [Role::Site, Role::Operator, Role::Host, Role::Admin];

    /// The NATS user name of the role.
    pub fn user(self) -> &'static str {
        match self {
            Role::Site => "site",
            Role::Operator => "operator",
            Role::Host => "host",
            Role::Admin => "admin",
        }
    }

    /// The template placeholder holding the role's password.
    fn password_placeholder(self) -> &'static str {
        match self {
            Role::Site => "SITE_PASSWORD",
            Role::Operator => "OPERATOR_PASSWORD",
            Role::Host => "HOST_PASSWORD",
            Role::Admin => "ADMIN_PASSWORD",
        }
    }

    /// Whether the server has a user for this role: every site has all of them, the hub only
    /// its operator.
    fn exists_on(self, server_is_hub: bool) -> bool {
        !server_is_hub || self == Role::Operator
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.user())
    }
}

/// Why a federation could not be started or operated.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No usable nats-server binary.
    #[error("no usable nats-server")]
    Locate(#[from] LocateError),
    /// A site id that cannot serve as server name, user name and JetStream domain.
    #[error("invalid site id {id:?}: use letters, digits, '-' and '_', and not {HUB:?}")]
    InvalidSiteId {
        /// The id given.
        id: String,
    },
    /// The same site id given twice.
    #[error("site {id:?} given twice")]
    DuplicateSite {
        /// The id given.
        id: String,
    },
    /// A name that is neither the hub nor a site of this federation.
    #[error("no server named {name:?} in this federation")]
    UnknownServer {
        /// The name given.
        name: String,
    },
    /// The server has no user for this role (the hub has only its operator).
    #[error("server {server:?} has no {role} user")]
    NoSuchUser {
        /// The server.
        server: String,
        /// The role asked for.
        role: Role,
    },
    /// The server is stopped, so it has no address to offer.
    #[error("server {name:?} is not running")]
    NotRunning {
        /// The server.
        name: String,
    },
    /// A template still had a placeholder after rendering.
    #[error("config template for {server:?} has an unfilled placeholder {placeholder:?}")]
    Template {
        /// The server.
        server: String,
        /// The placeholder left over.
        placeholder: String,
    },
    /// A file operation in the federation's directory failed.
    #[error("cannot {action} {}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The server process could not be started.
    #[error("cannot start nats-server for {server:?}")]
    Spawn {
        /// The server.
        server: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The server process ended while it was expected to run.
    #[error("nats-server for {server:?} exited ({status}); see {}", log.display())]
    Exited {
        /// The server.
        server: String,
        /// How it ended.
        status: ExitStatus,
        /// Its log file.
        log: PathBuf,
    },
    /// A readiness condition did not hold in time.
    #[error("timed out after {timeout:?} waiting for {what}; last attempt: {last}")]
    NotReady {
        /// The condition.
        what: String,
        /// How long it was awaited.
        timeout: Duration,
        /// Why the last attempt failed.
        last: String,
    },
    /// A client could not connect.
    #[error("cannot connect to {server:?}")]
    Connect {
        /// The server.
        server: String,
        /// The cause.
        #[source]
        source: async_nats::ConnectError,
    },
    /// A monitoring endpoint could not be read.
    #[error("cannot read monitoring endpoint of {server:?}")]
    Monitor {
        /// The server.
        server: String,
        /// The cause.
        #[source]
        source: MonitorError,
    },
}

/// One nats-server process and everything needed to start it again the same way.
#[derive(Debug)]
struct Server {
    name: String,
    dir: PathBuf,
    template: &'static str,
    /// Placeholder values for the template; ports are filled in after the first start.
    values: BTreeMap<&'static str, String>,
    client_port: Option<u16>,
    http_port: Option<u16>,
    /// The hub's leaf-node port; sites have none.
    leaf_port: Option<u16>,
    child: Option<Child>,
}

impl Server {
    fn new(name: &str, dir: PathBuf, template: &'static str) -> Self {
        Self {
            name: name.to_owned(),
            dir,
            template,
            values: BTreeMap::new(),
            client_port: None,
            http_port: None,
            leaf_port: None,
            child: None,
        }
    }

    fn is_hub(&self) -> bool {
        self.name == HUB
    }

    fn is_running(&self) -> bool {
        self.child.is_some()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("server.conf")
    }

    fn ports_dir(&self) -> PathBuf {
        self.dir.join("ports")
    }

    fn url(&self) -> Result<String, Error> {
        match (self.client_port, self.is_running()) {
            (Some(port), true) => Ok(format!("nats://{HOST}:{port}")),
            _ => Err(Error::NotRunning {
                name: self.name.clone(),
            }),
        }
    }

    fn port_value(port: Option<u16>) -> String {
        port.map_or_else(|| "-1".to_owned(), |p| p.to_string())
    }

    fn render(&self) -> Result<String, Error> {
        let ports = [
            ("CLIENT_PORT", Self::port_value(self.client_port)),
            ("HTTP_PORT", Self::port_value(self.http_port)),
            ("LEAF_PORT", Self::port_value(self.leaf_port)),
        ];
        let values = self
            .values
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .chain(ports);
        render_template(&self.name, self.template, values)
    }

    /// User and password of `role` on this server.
    fn credentials(&self, role: Role) -> Result<(String, String), Error> {
        let no_such_user = || Error::NoSuchUser {
            server: self.name.clone(),
            role,
        };
        if !role.exists_on(self.is_hub()) {
            return Err(no_such_user());
        }
        let password = self
            .values
            .get(role.password_placeholder())
            .ok_or_else(no_such_user)?;
        Ok((role.user().to_owned(), password.clone()))
    }

    /// The role test-kit clients use unless told otherwise: the site daemon at a site, the
    /// operator at the hub.
    fn default_role(&self) -> Role {
        if self.is_hub() {
            Role::Operator
        } else {
            Role::Site
        }
    }

    /// Connects a client as `role`.
    async fn connect_as(&self, role: Role) -> Result<async_nats::Client, Error> {
        let url = self.url()?;
        let (user, password) = self.credentials(role)?;
        let mut options = async_nats::ConnectOptions::with_user_and_password(user, password)
            .name(format!("nubis-testkit-{}-{role}", self.name));
        // Site processes that talk across sites take their replies on `nubis.reply.<site>.`,
        // the only replies the hub carries to them (see nats-config/README.md).
        if self.is_hub() || matches!(role, Role::Site | Role::Admin) {
            options = options.custom_inbox_prefix(format!("nubis.reply.{}", self.name));
        }
        options.connect(url).await.map_err(|source| Error::Connect {
            server: self.name.clone(),
            source,
        })
    }

    fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.to_owned();
        move |source| Error::Io {
            action,
            path,
            source,
        }
    }

    /// Writes the configuration and starts the process; does not wait for it to be ready.
    fn spawn(&mut self, binary: &NatsServerBinary) -> Result<(), Error> {
        let ports_dir = self.ports_dir();
        fs::create_dir_all(&ports_dir).map_err(Self::io("create", &ports_dir))?;
        // A killed server leaves its ports file behind; a stale one would give wrong ports.
        for entry in fs::read_dir(&ports_dir).map_err(Self::io("list", &ports_dir))? {
            let path = entry.map_err(Self::io("list", &ports_dir))?.path();
            fs::remove_file(&path).map_err(Self::io("remove", &path))?;
        }
        let config = self.config_path();
        fs::write(&config, self.render()?).map_err(Self::io("write", &config))?;

        let log_path = self.log_path();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(Self::io("open", &log_path))?;
        let log_err = log.try_clone().map_err(Self::io("open", &log_path))?;
        let child = Command::new(binary.path())
            .arg("-c")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|source| Error::Spawn {
                server: self.name.clone(),
                source,
            })?;
        debug!(server = %self.name, pid = child.id(), "nats-server started");
        self.child = Some(child);
        Ok(())
    }

    /// Fails if the process has ended; a server that died will never become ready.
    fn check_alive(&mut self) -> Result<(), Error> {
        let Some(child) = self.child.as_mut() else {
            return Ok(());
        };
        match child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => {
                self.child = None;
                Err(Error::Exited {
                    server: self.name.clone(),
                    status,
                    log: self.log_path(),
                })
            }
            Err(source) => Err(Error::Io {
                action: "wait for",
                path: self.log_path(),
                source,
            }),
        }
    }

    /// Reads the ports the server bound from its ports file; `None` until it has written it.
    fn read_ports_file(&self) -> Result<Option<(u16, u16)>, String> {
        let dir = self.ports_dir();
        let entries = fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for entry in entries.flatten() {
            let Ok(text) = fs::read_to_string(entry.path()) else {
                continue;
            };
            // The file may be caught half-written; the next poll reads it whole.
            let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else {
                continue;
            };
            let port_of = |key: &str| {
                json.get(key)?
                    .as_array()?
                    .first()?
                    .as_str()?
                    .rsplit(':')
                    .next()?
                    .parse::<u16>()
                    .ok()
            };
            if let (Some(client), Some(http)) = (port_of("nats"), port_of("monitoring")) {
                return Ok(Some((client, http)));
            }
        }
        Ok(None)
    }

    /// One readiness probe of this server alone: ports known, monitoring up, `/healthz` (which
    /// includes JetStream) healthy.
    async fn probe_started(&mut self) -> Result<(), String> {
        if self.client_port.is_none() || self.http_port.is_none() {
            let (client, http) = self
                .read_ports_file()?
                .ok_or_else(|| "ports file not written yet".to_owned())?;
            self.client_port = Some(client);
            self.http_port = Some(http);
        }
        let http = self.http_port.unwrap_or_default();
        if self.is_hub() && self.leaf_port.is_none() {
            // The ports file does not list the leaf-node port; /varz does.
            let varz = monitor::get_json(http, "/varz")
                .await
                .map_err(|e| e.to_string())?;
            let port = varz
                .pointer("/leaf/port")
                .and_then(serde_json::Value::as_u64)
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p != 0)
                .ok_or_else(|| "/varz lists no leaf-node port yet".to_owned())?;
            self.leaf_port = Some(port);
        }
        monitor::get_json(http, "/healthz")
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    async fn wait_started(&mut self, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        let mut backoff = Backoff::default();
        loop {
            self.check_alive()?;
            let last = match self.probe_started().await {
                Ok(()) => return Ok(()),
                Err(reason) => reason,
            };
            if Instant::now() >= deadline {
                return Err(Error::NotReady {
                    what: format!("nats-server {:?} to start", self.name),
                    timeout,
                    last,
                });
            }
            backoff.pause().await;
        }
    }

    /// Asks the server to shut down (SIGTERM through the binary's own `--signal`, which keeps
    /// unsafe code and extra tools out), and kills it if it has not gone after a grace period.
    async fn stop(&mut self, binary: &NatsServerBinary) -> Result<(), Error> {
        let Some(child) = self.child.as_mut() else {
            return Ok(());
        };
        let pid = child.id();
        let asked = Command::new(binary.path())
            .arg("--signal")
            .arg(format!("term={pid}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !matches!(asked, Ok(status) if status.success()) {
            warn!(server = %self.name, pid, "could not signal nats-server; killing it");
            self.kill();
            return Ok(());
        }
        let deadline = Instant::now() + STOP_GRACE;
        let mut backoff = Backoff::default();
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => backoff.pause().await,
                _ => {
                    warn!(server = %self.name, pid, "nats-server did not stop in time; killing it");
                    self.kill();
                    return Ok(());
                }
            }
        }
        self.child = None;
        debug!(server = %self.name, pid, "nats-server stopped");
        Ok(())
    }

    /// SIGKILL, as a crash would end it.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Errors mean the process is already gone, which is what was wanted.
            let _ = child.kill();
            let _ = child.wait();
            debug!(server = %self.name, "nats-server killed");
        }
    }
}

/// Fills every `{{NAME}}` placeholder of `template`; fails if one is left unfilled.
fn render_template(
    server: &str,
    template: &str,
    values: impl IntoIterator<Item = (&'static str, String)>,
) -> Result<String, Error> {
    let mut text = template.to_owned();
    for (key, value) in values {
        text = text.replace(&format!("{{{{{key}}}}}"), &value);
    }
    if let Some(start) = text.find("{{") {
        let rest = &text[start..];
        let end = rest.find("}}").map_or(rest.len(), |e| e + 2);
        return Err(Error::Template {
            server: server.to_owned(),
            placeholder: rest[..end].to_owned(),
        });
    }
    Ok(text)
}

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
            site.values.insert("LEAF_PASSWORD", leaf_password);
            site_servers.push(site);
        }
        hub.values.insert("LEAF_USERS", leaf_users.join("\n"));

        let mut federation = Self {
            binary: binary.clone(),
            hub,
            sites: site_servers,
            label,
            root,
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
        let hub_leaf = format!("{HOST}:{}", self.hub.leaf_port.unwrap_or_default());
        for site in &mut self.sites {
            site.values.insert("HUB_LEAF_URL", hub_leaf.clone());
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

    async fn wait_leaf_gone(&mut self, name: &str) -> Result<(), Error> {
        if name == HUB || !self.hub.is_running() {
            return Ok(());
        }
        let deadline = Instant::now() + DEFAULT_TIMEOUT;
        let mut backoff = Backoff::default();
        loop {
            self.hub.check_alive()?;
            let last = match self.leaf_connections().await {
                Ok(names) if !names.iter().any(|n| n == name) => return Ok(()),
                Ok(names) => format!("hub still lists {names:?}"),
                Err(err) => err.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(Error::NotReady {
                    what: format!("the hub to drop site {name:?}"),
                    timeout: DEFAULT_TIMEOUT,
                    last,
                });
            }
            backoff.pause().await;
        }
    }

    /// Waits until every running site is a leaf of the running hub and every running server's
    /// clients reach the JetStream domain of every running server.
    pub async fn wait_federated(&mut self) -> Result<(), Error> {
        let deadline = Instant::now() + DEFAULT_TIMEOUT;
        let mut backoff = Backoff::default();
        let mut clients = HashMap::new();
        loop {
            self.hub.check_alive()?;
            for site in &mut self.sites {
                site.check_alive()?;
            }
            let last = match self.probe_federated(&mut clients).await {
                Ok(()) => return Ok(()),
                Err(reason) => reason,
            };
            if Instant::now() >= deadline {
                return Err(Error::NotReady {
                    what: "the federation to form".to_owned(),
                    timeout: DEFAULT_TIMEOUT,
                    last,
                });
            }
            backoff.pause().await;
        }
    }

    async fn probe_federated(
        &self,
        clients: &mut HashMap<String, async_nats::Client>,
    ) -> Result<(), String> {
        let running: Vec<&Server> = std::iter::once(&self.hub)
            .chain(&self.sites)
            .filter(|s| s.is_running())
            .collect();
        if self.hub.is_running() {
            let leafs = self.leaf_connections().await.map_err(|e| e.to_string())?;
            for site in running.iter().filter(|s| !s.is_hub()) {
                if !leafs.contains(&site.name) {
                    return Err(format!(
                        "site {:?} is not a leaf of the hub yet (hub sees {leafs:?})",
                        site.name
                    ));
                }
            }
        }
        for from in &running {
            if !clients.contains_key(&from.name) {
                let client = from
                    .connect_as(from.default_role())
                    .await
                    .map_err(|e| format!("connect to {:?}: {e}", from.name))?;
                clients.insert(from.name.clone(), client);
            }
            let client = clients
                .get(&from.name)
                .ok_or_else(|| "client vanished".to_owned())?;
            for to in &running {
                // Without a hub, a site reaches only its own domain.
                if !self.hub.is_running() && from.name != to.name {
                    continue;
                }
                let domain = if to.is_hub() { HUB_DOMAIN } else { &to.name };
                let mut js = jetstream::with_domain(client.clone(), domain);
                js.set_timeout(PROBE_TIMEOUT);
                let reached = if to.is_hub() || from.name == to.name {
                    js.query_account()
                        .await
                        .map(drop)
                        .map_err(|e| e.to_string())
                } else {
                    // Another site's domain answers partners only about its transfer bucket
                    // (nats-config/README.md); any answer, "no such stream" included, shows
                    // the domain is reachable.
                    js.request::<_, _, serde_json::Value>(
                        format!("STREAM.INFO.{TRANSFER_STREAM}"),
                        &serde_json::json!({}),
                    )
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
                };
                reached.map_err(|e| {
                    format!("JetStream domain {domain:?} from {:?}: {e}", from.name)
                })?;
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_render_without_leftover_placeholders() {
        let dir = PathBuf::from("/nonexistent");
        let mut hub = Server::new(HUB, dir.join("hub"), HUB_TEMPLATE);
        for key in [
            "HOST",
            "STORE",
            "PORTS_DIR",
            "SYS_PASSWORD",
            "OPERATOR_PASSWORD",
            "LEAF_USERS",
        ] {
            hub.values.insert(key, "x".to_owned());
        }
        let text = hub.render().unwrap();
        assert!(text.contains("max_payload: 8MB"));
        assert!(text.contains("domain: hub"));

        let mut leaf = Server::new("a", dir.join("a"), LEAF_TEMPLATE);
        leaf.client_port = Some(4222);
        let err = leaf.render().unwrap_err();
        assert!(matches!(err, Error::Template { .. }), "{err}");
        for key in [
            "HOST",
            "STORE",
            "PORTS_DIR",
            "SYS_PASSWORD",
            "SITE_PASSWORD",
            "OPERATOR_PASSWORD",
            "HOST_PASSWORD",
            "ADMIN_PASSWORD",
            "SITE",
            "HUB_LEAF_URL",
            "LEAF_PASSWORD",
        ] {
            leaf.values.insert(key, "a".to_owned());
        }
        let text = leaf.render().unwrap();
        assert!(text.contains("listen: \"a:4222\""));
        assert!(text.contains("domain: \"a\""));
        // No server maps credential-less clients to a user.
        for text in [&hub.render().unwrap(), &text] {
            assert!(!text.contains("no_auth_user:"), "{text}");
        }

        let user = render_template(
            HUB,
            HUB_LEAF_USER_TEMPLATE,
            [("SITE", "b".to_owned()), ("LEAF_PASSWORD", "pw".to_owned())],
        )
        .unwrap();
        assert!(user.contains("\"nubis.fed.b.>\""));
        assert!(user.contains("\"$JS.hub.API.$KV.nubis-directory.site.b\""));
        assert!(user.contains("allowed_connection_types: [\"LEAFNODE\"]"));
    }

    #[test]
    fn credentials_exist_for_every_role_at_a_site_and_only_the_operator_at_the_hub() {
        let dir = PathBuf::from("/nonexistent");
        let mut hub = Server::new(HUB, dir.join("hub"), HUB_TEMPLATE);
        let mut site = Server::new("a", dir.join("a"), LEAF_TEMPLATE);
        for role in Role::ALL {
            site.values
                .insert(role.password_placeholder(), format!("pw-{role}"));
        }
        hub.values.insert("OPERATOR_PASSWORD", "hub-pw".to_owned());
        for role in Role::ALL {
            let (user, password) = site.credentials(role).unwrap();
            assert_eq!(user, role.user());
            assert_eq!(password, format!("pw-{role}"));
        }
        assert_eq!(
            hub.credentials(Role::Operator).unwrap(),
            ("operator".to_owned(), "hub-pw".to_owned())
        );
        for role in [Role::Site, Role::Host, Role::Admin] {
            let err = hub.credentials(role).unwrap_err();
            assert!(matches!(err, Error::NoSuchUser { .. }), "{err}");
        }
        assert_eq!(hub.default_role(), Role::Operator);
        assert_eq!(site.default_role(), Role::Site);
    }

    #[tokio::test]
    async fn invalid_and_duplicate_site_ids_are_refused_before_anything_starts() {
        let Some(binary) = crate::require_nats_server() else {
            return;
        };
        for bad in [&["a", "hub"][..], &["a b"], &[""], &["a.b"], &["a>"]] {
            let err = Federation::start_with(&binary, bad).await.unwrap_err();
            assert!(matches!(err, Error::InvalidSiteId { .. }), "{err}");
        }
        let err = Federation::start_with(&binary, &["a", "a"])
            .await
            .unwrap_err();
        assert!(matches!(err, Error::DuplicateSite { .. }), "{err}");
    }
}
