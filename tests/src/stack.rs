//! A whole federation for end-to-end tests: a real hub and leaf nats-servers (test kit), and at
//! every site a real site daemon, Transfer proxy and host agents on libvirt's test driver, each
//! started from a configuration file written the way an operator writes one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nubis_protocol::identity::SiteIdentity;
use nubis_protocol::SiteId;
use nubis_testkit::{Federation, Role};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How one site is set up.
#[derive(Debug, Clone)]
pub struct SiteSpec {
    /// Site id.
    pub id: &'static str,
    /// Partner sites (pinned keys), with a preference each.
    pub partners: Vec<(&'static str, i32)>,
    /// Hosts and the memory (MiB) each offers (the test VMs need 256 MiB).
    pub hosts: Vec<(&'static str, u64)>,
    /// Extra TOML for the `[policy]` table.
    pub policy: &'static str,
    /// Extra top-level TOML keys of the site configuration.
    pub top: &'static str,
}

impl SiteSpec {
    /// Site `id` as the tests usually want it: no partners, no hosts, no extra configuration.
    /// The other builder methods add only what differs.
    pub fn new(id: &'static str) -> Self {
        Self {
            id,
            partners: Vec::new(),
            hosts: Vec::new(),
            policy: "",
            top: "",
        }
    }

    /// Adds partner `site`, with the preference this site gives it.
    pub fn partner(mut self, site: &'static str, preference: i32) -> Self {
        self.partners.push((site, preference));
        self
    }

    /// Adds host `host`, offering `memory_mib` MiB.
    pub fn host(mut self, host: &'static str, memory_mib: u64) -> Self {
        self.hosts.push((host, memory_mib));
        self
    }

    /// Sets the extra TOML of the `[policy]` table.
    pub fn policy(mut self, toml: &'static str) -> Self {
        self.policy = toml;
        self
    }

    /// Sets the extra top-level TOML keys of the site configuration.
    pub fn top(mut self, toml: &'static str) -> Self {
        self.top = toml;
        self
    }
}

/// One running daemon.
struct Daemon {
    name: String,
    token: CancellationToken,
    handle: JoinHandle<Result<(), String>>,
}

/// The `nubis-test-site` binary: `NUBIS_TEST_SITE_BIN`, else beside the running test or
/// benchmark executable (cargo builds a package's binaries into the directory above `deps/`
/// before it runs its integration tests and benchmarks).
fn site_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("NUBIS_TEST_SITE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    let mut dir = exe.parent().unwrap().to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join("nubis-test-site")
}

/// How the stack's servers are laid out.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Nodes of the hub (clustered when more than one).
    pub hub_nodes: usize,
    /// Sites whose leaf connection goes through a WAN link of the test kit (no delay at
    /// start), which a test cuts and restores with `stack.fed.link(site)`.
    pub linked: Vec<&'static str>,
}

impl Default for Layout {
    fn default() -> Self {
        Self {
            hub_nodes: 1,
            linked: Vec::new(),
        }
    }
}

/// The running stack.
pub struct Stack {
    pub fed: Federation,
    pub dir: tempfile::TempDir,
    pub identities: BTreeMap<&'static str, Arc<SiteIdentity>>,
    specs: Vec<SiteSpec>,
    daemons: Vec<Daemon>,
    /// Hosts (site, host) whose agent drives real QEMU guests on `qemu:///system`.
    qemu_hosts: Vec<(&'static str, &'static str)>,
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack")
            .field("root", &self.dir.path())
            .field("specs", &self.specs)
            .field("qemu_hosts", &self.qemu_hosts)
            .finish_non_exhaustive()
    }
}

fn spawn<F, E>(name: String, run: impl FnOnce(CancellationToken) -> F) -> Daemon
where
    F: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Debug,
{
    let token = CancellationToken::new();
    let fut = run(token.clone());
    let label = name.clone();
    let handle = tokio::spawn(async move {
        let r = fut.await.map_err(|e| format!("{e:?}"));
        if let Err(e) = &r {
            eprintln!("{label} stopped with an error: {e}");
        }
        r
    });
    Daemon {
        name,
        token,
        handle,
    }
}

impl Stack {
    /// Starts the servers and every site's daemons.
    pub async fn start(binary: &nubis_testkit::NatsServerBinary, specs: Vec<SiteSpec>) -> Self {
        Self::start_with_qemu_hosts(binary, specs, &[]).await
    }

    /// Like [`Stack::start`], with the agents of the hosts `(site, host)` in `qemu_hosts` on
    /// libvirtd's `qemu:///system` (real guests; KVM where `nubis_host::test_guest::accelerator` found it usable, else TCG) instead of the
    /// test driver. They share one libvirtd: a VM prepared for a transfer leaves its domain
    /// name to the destination.
    pub async fn start_with_qemu_hosts(
        binary: &nubis_testkit::NatsServerBinary,
        specs: Vec<SiteSpec>,
        qemu_hosts: &[(&'static str, &'static str)],
    ) -> Self {
        Self::start_full(binary, specs, qemu_hosts, &Layout::default()).await
    }

    /// Like [`Stack::start`], on a hub of `hub_nodes` clustered nodes
    /// ([`Federation::start_cluster`]).
    pub async fn start_clustered(
        binary: &nubis_testkit::NatsServerBinary,
        specs: Vec<SiteSpec>,
        hub_nodes: usize,
    ) -> Self {
        let layout = Layout {
            hub_nodes,
            ..Layout::default()
        };
        Self::start_full(binary, specs, &[], &layout).await
    }

    /// Like [`Stack::start_with_qemu_hosts`], with the servers laid out as `layout` says.
    pub async fn start_full(
        binary: &nubis_testkit::NatsServerBinary,
        specs: Vec<SiteSpec>,
        qemu_hosts: &[(&'static str, &'static str)],
        layout: &Layout,
    ) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter("info,async_nats=warn")
            .try_init();
        let ids: Vec<&str> = specs.iter().map(|s| s.id).collect();
        let fed = Federation::start_cluster(binary, &ids, layout.hub_nodes, |site| {
            layout
                .linked
                .contains(&site)
                .then(|| nubis_testkit::LinkSpec::delay(std::time::Duration::ZERO))
        })
        .await
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut identities = BTreeMap::new();
        for s in &specs {
            let identity = SiteIdentity::generate(SiteId::new(s.id).unwrap());
            identity
                .save(&dir.path().join(format!("{}.key", s.id)), false)
                .unwrap();
            identities.insert(s.id, Arc::new(identity));
        }
        let mut stack = Self {
            fed,
            dir,
            identities,
            specs: specs.clone(),
            daemons: Vec::new(),
            qemu_hosts: qemu_hosts.to_vec(),
        };
        for s in &specs {
            stack.start_site(s.id).await;
        }
        for s in &specs {
            stack.wait_ready(s.id).await;
        }
        stack
    }

    /// Waits until `site`'s daemon answers and sees every partner alive.
    pub async fn wait_ready(&self, site: &str) {
        let op = self.operator(site).await;
        let partners = self.spec(site).partners.len() as u64;
        nubis_testkit::wait_until(
            nubis_testkit::DEFAULT_TIMEOUT,
            format!("site {site} ready"),
            || async {
                let v = ops(&op, site, "status", serde_json::json!({})).await?;
                if v["partners_reachable"].as_u64() == Some(partners) {
                    Ok(())
                } else {
                    Err(v.to_string())
                }
            },
        )
        .await
        .unwrap();
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The image store of `site`.
    pub fn image_store(&self, site: &str) -> PathBuf {
        let p = self.path(&format!("{site}-images"));
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    /// The VM root of a host.
    pub fn vm_root(&self, site: &str, host: &str) -> PathBuf {
        self.path(&format!("{site}-{host}-vms"))
    }

    /// Where a host agent mounts the KPI filesystems of its VMs (`<kpi root>/<vm>`).
    pub fn kpi_root(&self, site: &str, host: &str) -> PathBuf {
        self.path(&format!("{site}-{host}-kpi"))
    }

    /// Waits up to `timeout` until the host agent `host` of `site` has mounted the KPI
    /// filesystem of `vm`; returns the mount point.
    pub async fn wait_kpi_mount(
        &self,
        site: &str,
        host: &str,
        vm: &str,
        timeout: std::time::Duration,
    ) -> Result<PathBuf, String> {
        let mount = self.kpi_root(site, host).join(vm);
        let deadline = std::time::Instant::now() + timeout;
        while !mount.join("unencrypted").is_dir() {
            if std::time::Instant::now() > deadline {
                return Err(format!("no KPI filesystem at {}", mount.display()));
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        Ok(mount)
    }

    fn spec(&self, site: &str) -> SiteSpec {
        self.specs.iter().find(|s| s.id == site).unwrap().clone()
    }

    fn partner_blocks(&self, spec: &SiteSpec, with_sealing: bool) -> String {
        let mut text = String::new();
        for (p, pref) in &spec.partners {
            let public = self.identities[p].public();
            text.push_str(&format!(
                "[[partners]]\nsite = \"{p}\"\nsigning_key = \"{}\"\n",
                public.signing_text()
            ));
            if with_sealing {
                text.push_str(&format!(
                    "sealing_key = \"{}\"\npreference = {pref}\n",
                    public.sealing_text()
                ));
            }
            text.push('\n');
        }
        text
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// Writes the configuration files of `site` and starts its site daemon, proxy and hosts.
    pub async fn start_site(&mut self, site: &'static str) {
        let spec = self.spec(site);
        let url = self.fed.site_url(site).unwrap();
        let (user, password) = self.fed.credentials(site, Role::Site).unwrap();
        let (proxy_user, proxy_password) = self.fed.credentials(site, Role::Proxy).unwrap();
        let hosts: String = spec
            .hosts
            .iter()
            .map(|(h, _)| {
                format!(
                    "[[hosts]]\nid = \"{h}\"\nvm_root = \"{}\"\n",
                    self.vm_root(site, h).display()
                )
            })
            .collect();
        let site_toml = format!(
            "site = \"{site}\"\nkey_file = \"{site}.key\"\nnats_url = \"{url}\"\nnats_user = \"{user}\"\nnats_password = \"{password}\"\n\
             data_dir = \"{site}-data\"\nproxy = \"p1\"\nimage_store = \"{site}-images\"\n{}\n\n\
             [directory]\nheartbeat_ms = 300\nliveness_timeout_ms = 2000\n\n[policy]\n{}\n\n{hosts}\n{}",
            spec.top,
            spec.policy,
            self.partner_blocks(&spec, true)
        );
        let site_path = self.write(&format!("{site}.toml"), &site_toml);
        // Transfers go directly between the source and destination proxies, which need not be
        // partners of each other's sites: each proxy pins every site it exchanges files with
        // (here: the whole federation, and its own site).
        let proxy_partners: String = self
            .identities
            .iter()
            .map(|(id, identity)| {
                format!(
                    "[[partners]]\nsite = \"{id}\"\nsigning_key = \"{}\"\n\n",
                    identity.public().signing_text()
                )
            })
            .collect();
        // The proxy serves and receives only under the site's host VM roots and image store.
        let roots: Vec<String> = spec
            .hosts
            .iter()
            .map(|(h, _)| self.vm_root(site, h))
            .chain([self.image_store(site)])
            .map(|p| format!("{:?}", p.display().to_string()))
            .collect();
        // A site that relays any transfer (its `[transfer]` policy) runs a proxy that may relay.
        let site_config = nubis_site::config::SiteConfig::load(&site_path).unwrap();
        let transfer = &site_config.policy.transfer;
        let relay_allowed = std::iter::once(&transfer.default)
            .chain(transfer.partners.values())
            .any(|m| *m == nubis_site::config::TransferMode::Relay);
        let proxy_toml = format!(
            "site = \"{site}\"\nproxy = \"p1\"\nnats_url = \"{url}\"\nnats_user = \"{proxy_user}\"\nnats_password = \"{proxy_password}\"\n\
             identity_file = \"{}\"\nstore_dir = \"{}\"\n\n[transfer]\nroots = [{}]\nrelay_allowed = {relay_allowed}\n\n{proxy_partners}",
            self.path(&format!("{site}.key")).display(),
            self.path(&format!("{site}-proxy")).display(),
            roots.join(", "),
        );
        let proxy_path = self.write(&format!("{site}-proxy.toml"), &proxy_toml);
        // Every host's user exists before the site's daemons connect: adding one reloads the
        // site's server, and a client logging in during a reload may be refused.
        for (host, _) in &spec.hosts {
            self.fed.host_credentials(site, host).await.unwrap();
        }
        let proxy_config = nubis_proxy::config::Config::load(&proxy_path).unwrap();
        self.daemons.push(spawn(format!("{site}/proxy"), move |t| {
            nubis_proxy::run(proxy_config, t)
        }));
        for (host, memory) in &spec.hosts {
            let (host_user, host_password) = self.fed.host_credentials(site, host).await.unwrap();
            // Each host its own hypervisor: `test:///default` is one shared state per process,
            // a test driver opened on a node file is private to its connection.
            let node = self.write(
                &format!("{site}-{host}-node.xml"),
                "<node><cpu><mhz>2000</mhz><model>nubis-test</model><nodes>1</nodes><sockets>1</sockets>\
                 <cores>8</cores><threads>1</threads></cpu><memory>8388608</memory></node>\n",
            );
            let hypervisor = if self.qemu_hosts.contains(&(site, *host)) {
                let accelerator =
                    if nubis_host::test_guest::accelerator() == nubis_host::Accelerator::Kvm {
                        "kvm"
                    } else {
                        "tcg"
                    };
                format!(
                    "libvirt_uri = \"qemu:///system\"\naccelerator = \"{accelerator}\"\n\
                     shutdown_timeout_ms = 5000\n"
                )
            } else {
                format!("libvirt_uri = \"test://{}\"\n", node.display())
            };
            let host_toml = format!(
                "site = \"{site}\"\nhost = \"{host}\"\nnats_url = \"{url}\"\nnats_user = \"{host_user}\"\nnats_password = \"{host_password}\"\n\
                 {hypervisor}vm_root = \"{}\"\nkpi_root = \"{}\"\nmonitor_tick_ms = 100\n\n[capacity]\nvcpus = 8\nmemory_mib = {memory}\ndisk_bytes = 107374182400\n",
                self.vm_root(site, host).display(),
                self.kpi_root(site, host).display()
            );
            let host_path = self.write(&format!("{site}-{host}.toml"), &host_toml);
            let host_config = nubis_host::config::HostConfig::load(&host_path).unwrap();
            self.daemons.push(spawn(format!("{site}/{host}"), move |t| {
                nubis_host::agent::run(host_config, t)
            }));
        }
        self.daemons.push(spawn(format!("{site}/site"), move |t| {
            nubis_site::run(site_config, t)
        }));
    }

    /// Stops every daemon of `site` (orderly), leaving its nats-server running.
    pub async fn stop_site(&mut self, site: &str) {
        let prefix = format!("{site}/");
        let (stop, keep): (Vec<Daemon>, Vec<Daemon>) = self
            .daemons
            .drain(..)
            .partition(|d| d.name.starts_with(&prefix));
        self.daemons = keep;
        for d in stop {
            d.token.cancel();
            let _ = d.handle.await;
        }
    }

    /// Replaces the in-process site daemon of `site` by a process of its own (same
    /// configuration file), which a test may kill with SIGKILL and start again.
    pub async fn site_daemon_as_process(&mut self, site: &str) -> std::process::Child {
        let name = format!("{site}/site");
        if let Some(i) = self.daemons.iter().position(|d| d.name == name) {
            let d = self.daemons.remove(i);
            d.token.cancel();
            let _ = d.handle.await;
        }
        self.spawn_site_process(site)
    }

    /// Starts the site daemon of `site` as a process (see [`Stack::site_daemon_as_process`]).
    pub fn spawn_site_process(&self, site: &str) -> std::process::Child {
        self.spawn_site_process_with(site, &format!("{site}-site.log"), &[])
    }

    /// Like [`Stack::spawn_site_process`], logging to `log` in the stack's directory, with
    /// `env` added to its environment (the hooks of `nubis-test-site`).
    pub fn spawn_site_process_with(
        &self,
        site: &str,
        log: &str,
        env: &[(&str, &str)],
    ) -> std::process::Child {
        let log = std::fs::File::create(self.path(log)).unwrap();
        std::process::Command::new(site_binary())
            .arg("--config")
            .arg(self.path(&format!("{site}.toml")))
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    /// The VMs host agent `host` of `site` lists, by its own account (a site-internal request,
    /// as the site daemon makes it), with their states.
    pub async fn host_vms(
        &self,
        site: &str,
        host: &str,
    ) -> Result<Vec<(String, nubis_protocol::message::DmtfState)>, String> {
        let client = self
            .fed
            .connect_site_internal(site)
            .await
            .map_err(|e| e.to_string())?;
        let agent = nubis_bus::host::host_client(
            client,
            SiteId::new(site).map_err(|e| e.to_string())?,
            nubis_protocol::message::HostId::new(host).map_err(|e| e.to_string())?,
        );
        let vms = agent
            .list()
            .await
            .map_err(|e| format!("{site}/{host}: {e}"))?;
        Ok(vms
            .vms
            .into_iter()
            .map(|e| (e.vm.to_string(), e.state))
            .collect())
    }

    /// The message ids (`<signer>.<producer>.<epoch>.<seq>`) in `site`'s accounting stream, of
    /// `vm` or of every VM, in stream order; read as the site's administrator.
    pub async fn accounting_ids(
        &self,
        site: &str,
        vm: Option<&str>,
    ) -> Result<Vec<String>, String> {
        use futures::StreamExt as _;
        let admin = self
            .fed
            .connect_as(site, Role::Admin)
            .await
            .map_err(|e| e.to_string())?;
        let js = async_nats::jetstream::new(admin);
        let stream = js
            .get_stream("NUBIS_ACCOUNTING")
            .await
            .map_err(|e| e.to_string())?;
        let info = stream.get_info().await.map_err(|e| e.to_string())?;
        let mut ids = Vec::new();
        if info.state.messages == 0 {
            return Ok(ids);
        }
        let last = info.state.last_sequence;
        let consumer = stream
            .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
                filter_subject: vm.map_or_else(String::new, |vm| format!("nubis.acct.{site}.{vm}")),
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
        while let Ok(Some(m)) =
            tokio::time::timeout(std::time::Duration::from_secs(5), messages.next()).await
        {
            let m = m.map_err(|e| e.to_string())?;
            if let Some(id) = m.headers.as_ref().and_then(|h| h.get("Nats-Msg-Id")) {
                ids.push(id.to_string());
            }
            if m.info().map_err(|e| e.to_string())?.stream_sequence >= last {
                break;
            }
        }
        Ok(ids)
    }

    /// Replaces the in-process host agent `host` of `site` by a process of its own (same
    /// configuration file, `nubis-test-site --host`), logging to `log` in the stack's
    /// directory; returns once the agent serves.
    pub async fn host_as_process(
        &mut self,
        site: &str,
        host: &str,
        log: &str,
    ) -> std::process::Child {
        let name = format!("{site}/{host}");
        if let Some(i) = self.daemons.iter().position(|d| d.name == name) {
            let d = self.daemons.remove(i);
            d.token.cancel();
            let _ = d.handle.await;
        }
        self.spawn_process_until(
            &["--host"],
            &format!("{site}-{host}.toml"),
            log,
            "host agent serving",
        )
        .await
    }

    /// Starts `nubis-test-site <args> --config <config>` (a file of the stack's directory),
    /// logging to `log` there, and waits until the log says `ready`.
    pub async fn spawn_process_until(
        &self,
        args: &[&str],
        config: &str,
        log: &str,
        ready: &str,
    ) -> std::process::Child {
        self.spawn_process_with(args, config, log, &[], ready).await
    }

    /// Like [`Stack::spawn_process_until`], with `env` added to the process's environment.
    async fn spawn_process_with(
        &self,
        args: &[&str],
        config: &str,
        log: &str,
        env: &[(&str, &str)],
        ready: &str,
    ) -> std::process::Child {
        let log_path = self.path(log);
        let child = std::process::Command::new(site_binary())
            .args(args)
            .arg("--config")
            .arg(self.path(config))
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap();
        nubis_testkit::wait_until(
            std::time::Duration::from_secs(30),
            format!("{config} started"),
            || {
                let log_path = log_path.clone();
                async move {
                    let text = std::fs::read_to_string(&log_path).map_err(|e| e.to_string())?;
                    if text.contains(ready) {
                        Ok(())
                    } else {
                        Err(text)
                    }
                }
            },
        )
        .await
        .unwrap();
        child
    }

    /// Replaces the in-process Transfer proxy of `site` by a process of its own (same
    /// configuration file, `nubis-test-site --proxy`), logging to `log` in the stack's
    /// directory, with `env` added (the hooks of `nubis-test-site`); returns once the proxy
    /// has started.
    pub async fn proxy_as_process(
        &mut self,
        site: &str,
        log: &str,
        env: &[(&str, &str)],
    ) -> std::process::Child {
        let name = format!("{site}/proxy");
        if let Some(i) = self.daemons.iter().position(|d| d.name == name) {
            let d = self.daemons.remove(i);
            d.token.cancel();
            let _ = d.handle.await;
        }
        self.spawn_process_with(
            &["--proxy"],
            &format!("{site}-proxy.toml"),
            log,
            env,
            "transfer proxy started",
        )
        .await
    }

    /// A client of `site` allowed to call its operator API.
    pub async fn operator(&self, site: &str) -> async_nats::Client {
        self.fed.connect_as(site, Role::Operator).await.unwrap()
    }

    /// The directory of the stack's files.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Stops everything.
    pub async fn shutdown(mut self) {
        for d in self.daemons.drain(..) {
            d.token.cancel();
            let _ = d.handle.await;
        }
    }
}

/// Calls an operator endpoint and returns its JSON, or the service error as `Err`.
pub async fn ops(
    client: &async_nats::Client,
    site: &str,
    endpoint: &str,
    body: serde_json::Value,
) -> Result<serde_json::Value, String> {
    let msg = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        client.request(
            format!("nubis.ops.{site}.{endpoint}"),
            serde_json::to_vec(&body).unwrap().into(),
        ),
    )
    .await
    .map_err(|_| "timeout".to_string())?
    .map_err(|e| e.to_string())?;
    if let Some(h) = &msg.headers {
        if let Some(err) = h.get("Nats-Service-Error") {
            return Err(err.to_string());
        }
    }
    serde_json::from_slice(&msg.payload).map_err(|e| e.to_string())
}

/// A typed client of `site`'s operator API over an operator connection.
pub fn ops_client(client: &async_nats::Client, site: &str) -> nubis_bus::ops::OpsClient {
    nubis_bus::ops::OpsClient::new(
        client.clone(),
        nubis_protocol::SiteId::new(site).unwrap(),
        std::time::Duration::from_secs(10),
    )
}

/// Waits (up to two minutes) until `migration` at `site` is committed or aborted; its view.
pub async fn wait_migration(
    client: &async_nats::Client,
    site: &str,
    migration: &str,
) -> serde_json::Value {
    let id: nubis_protocol::MigrationId = migration.parse().unwrap();
    let mut last = None;
    let end = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        ops_client(client, site).follow_migration(
            &id,
            std::time::Duration::from_millis(100),
            |v| last = Some(v.clone()),
        ),
    )
    .await;
    match end {
        Ok(Ok(view)) => serde_json::to_value(view).unwrap(),
        Ok(Err(e)) => panic!("migration {migration} at {site}: {e}"),
        Err(_) => panic!("migration {migration} at {site} did not end in two minutes: {last:?}"),
    }
}

/// The real test guest and libvirtd's `qemu:///system`, or `None` (skipped, or a failure under
/// CI) when this machine lacks either.
pub fn real_guest() -> Option<(
    nubis_host::test_guest::GuestImage,
    nubis_host::LibvirtHypervisor,
)> {
    use nubis_host::test_guest::GuestImage;
    let guest = match GuestImage::locate(&GuestImage::default_dir()) {
        Ok(g) => g,
        Err(e) => return nubis_testkit::skip_or_fail(e),
    };
    match nubis_host::LibvirtHypervisor::connect(nubis_host::LibvirtConfig::new("qemu:///system")) {
        Ok(hv) => Some((guest, hv)),
        Err(e) => nubis_testkit::skip_or_fail(format!("libvirtd not reachable: {e}")),
    }
}

/// Two sites for a real guest: `a` (host `a1`, preferring its own host to partner `b`) and `b`
/// (host `b1`); start them with [`Stack::start_with_qemu_hosts`] and [`GUEST_HOSTS`].
pub fn guest_sites() -> Vec<SiteSpec> {
    vec![
        // Below the local host's preference (0): A places the guest at home.
        SiteSpec::new("a").partner("b", -1).host("a1", 1024),
        SiteSpec::new("b").partner("a", 1).host("b1", 1024),
    ]
}

/// The hosts of [`guest_sites`] that run real guests.
pub const GUEST_HOSTS: &[(&str, &str)] = &[("a", "a1"), ("b", "b1")];

impl Stack {
    /// Puts the test guest's kernel, initramfs and a fresh disk into `site`'s image store under
    /// the names [`guest_deploy_body`] uses.
    pub fn stock_guest_images(&self, site: &str, guest: &nubis_host::test_guest::GuestImage) {
        let store = self.image_store(site);
        std::fs::copy(&guest.kernel, store.join("guest-vmlinuz")).unwrap();
        std::fs::copy(&guest.initrd, store.join("guest-initramfs")).unwrap();
        nubis_host::test_guest::GuestImage::create_disk(&store.join("guest-disk.qcow2")).unwrap();
    }
}

/// The operator's deploy body of a 1-vCPU, 256 MiB VM `vm` whose one disk comes from `image`
/// of the site's image store (the libvirt test driver runs it).
pub fn deploy_body(vm: &str, image: &str) -> serde_json::Value {
    serde_json::json!({
        "vm": vm,
        "name": "test VM",
        "hardware": {
            "vcpus": 1,
            "memory_mib": 256,
            "disks": [{"name": "vda", "capacity_bytes": 1048576, "format": "qcow2",
                       "image": image}],
            "networks": [],
        },
    })
}

/// The deploy request of the test guest `vm`, booting from the images of
/// [`Stack::stock_guest_images`].
pub fn guest_deploy_body(vm: &str) -> serde_json::Value {
    serde_json::json!({
        "vm": vm,
        "name": "counting guest",
        "hardware": {
            "vcpus": 1,
            "memory_mib": 128,
            "disks": [{"name": "vda", "capacity_bytes": nubis_host::test_guest::DISK_BYTES,
                       "format": "qcow2", "image": "guest-disk.qcow2"}],
            "networks": [],
            "boot": {"kernel": "guest-vmlinuz", "initrd": "guest-initramfs",
                     "cmdline": "console=ttyS0 quiet panic=-1"},
        },
    })
}
