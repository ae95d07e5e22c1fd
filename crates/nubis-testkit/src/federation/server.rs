//! One nats-server process of the federation: its configuration rendered from a template, its
//! ports, its credentials, and starting, probing, stopping and killing it.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::{Error, Role, HOST};
use crate::binary::NatsServerBinary;
use crate::monitor;
use crate::wait::Backoff;

/// How long a server may take to exit after being asked to, before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// One nats-server process and everything needed to start it again the same way. `Debug` names
/// the template's placeholders but shows none of their values: they include every password.
pub(super) struct Server {
    pub(super) name: String,
    pub(super) dir: PathBuf,
    pub(super) template: &'static str,
    /// Placeholder values for the template; ports are filled in after the first start.
    pub(super) values: BTreeMap<&'static str, String>,
    pub(super) client_port: Option<u16>,
    pub(super) http_port: Option<u16>,
    /// A hub node's leaf-node port; sites have none.
    pub(super) leaf_port: Option<u16>,
    /// A node of a clustered hub: its route port, chosen before the first start, since every
    /// node's configuration lists every other's.
    pub(super) cluster_port: Option<u16>,
    /// Whether this is a node of the hub rather than a site's server.
    pub(super) hub_node: bool,
    pub(super) child: Option<Child>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("name", &self.name)
            .field("dir", &self.dir)
            .field("placeholders", &self.values.keys().collect::<Vec<_>>())
            .field("client_port", &self.client_port)
            .field("http_port", &self.http_port)
            .field("leaf_port", &self.leaf_port)
            .field("cluster_port", &self.cluster_port)
            .field("running", &self.child.is_some())
            .finish_non_exhaustive()
    }
}

impl Server {
    pub(super) fn new(name: &str, dir: PathBuf, template: &'static str, hub_node: bool) -> Self {
        Self {
            name: name.to_owned(),
            dir,
            template,
            values: BTreeMap::new(),
            client_port: None,
            http_port: None,
            leaf_port: None,
            cluster_port: None,
            hub_node,
            child: None,
        }
    }

    pub(super) fn is_hub(&self) -> bool {
        self.hub_node
    }

    pub(super) fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub(super) fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    pub(super) fn config_path(&self) -> PathBuf {
        self.dir.join("server.conf")
    }

    pub(super) fn ports_dir(&self) -> PathBuf {
        self.dir.join("ports")
    }

    pub(super) fn url(&self) -> Result<String, Error> {
        match (self.client_port, self.is_running()) {
            (Some(port), true) => Ok(format!("nats://{HOST}:{port}")),
            _ => Err(Error::NotRunning {
                name: self.name.clone(),
            }),
        }
    }

    pub(super) fn port_value(port: Option<u16>) -> String {
        port.map_or_else(|| "-1".to_owned(), |p| p.to_string())
    }

    pub(super) fn render(&self) -> Result<String, Error> {
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
    pub(super) fn credentials(&self, role: Role) -> Result<(String, String), Error> {
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
    pub(super) fn default_role(&self) -> Role {
        if self.is_hub() {
            Role::Operator
        } else {
            Role::Site
        }
    }

    /// Connects a client as `role`.
    pub(super) async fn connect_as(&self, role: Role) -> Result<async_nats::Client, Error> {
        let url = self.url()?;
        let (user, password) = self.credentials(role)?;
        let mut options = async_nats::ConnectOptions::with_user_and_password(user, password)
            .name(format!("nubis-testkit-{}-{role}", self.name));
        // Site processes that talk across sites take their replies on `nubis.reply.<site>._any.`,
        // the only replies the hub carries to them besides those of signed calls (see
        // nats-config/README.md).
        if self.is_hub() || matches!(role, Role::Site | Role::Proxy | Role::Admin) {
            options = options.custom_inbox_prefix(format!("nubis.reply.{}._any", self.name));
        } else {
            // An operator hears replies only on its own inbox.
            options = options.custom_inbox_prefix(format!("_INBOX.{}", role.user()));
        }
        options.connect(url).await.map_err(|source| Error::Connect {
            server: self.name.clone(),
            source,
        })
    }

    pub(super) fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.to_owned();
        move |source| Error::Io {
            action,
            path,
            source,
        }
    }

    /// Writes the configuration and starts the process; does not wait for it to be ready.
    pub(super) fn spawn(&mut self, binary: &NatsServerBinary) -> Result<(), Error> {
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
    pub(super) fn check_alive(&mut self) -> Result<(), Error> {
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
    pub(super) fn read_ports_file(&self) -> Result<Option<(u16, u16)>, String> {
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
    pub(super) async fn probe_started(&mut self) -> Result<(), String> {
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

    pub(super) async fn wait_started(&mut self, timeout: Duration) -> Result<(), Error> {
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
    pub(super) async fn stop(&mut self, binary: &NatsServerBinary) -> Result<(), Error> {
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
    pub(super) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Errors mean the process is already gone, which is what was wanted.
            let _ = child.kill();
            let _ = child.wait();
            debug!(server = %self.name, "nats-server killed");
        }
    }
}

/// Fills every `{{NAME}}` placeholder of `template` (`nubis_bus::server_config::render`);
/// fails, naming `server`, if one is left unfilled.
pub(super) fn render_template(
    server: &str,
    template: &str,
    values: impl IntoIterator<Item = (&'static str, String)>,
) -> Result<String, Error> {
    nubis_bus::server_config::render(template, values).map_err(|e| Error::Template {
        server: server.to_owned(),
        placeholder: e.placeholder,
    })
}
