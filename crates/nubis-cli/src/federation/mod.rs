//! `nubis federation init`: a whole deployment generated into one directory — the federation's
//! CA, every hub node's and every site's nats-server configuration (from the templates in
//! `nats-config/`), TLS certificates, site keys, the site daemons', proxies' and host agents'
//! configurations with every partner's keys pinned, and a fresh random password for every user,
//! each in a file of mode 0600. Nothing is left to fill in.
//!
//! The output has one folder per machine: `hub-<n>` for each hub node and `<site>` for each
//! site (its server, daemon, proxy and host agents on one machine), plus `ca/` with the CA's
//! key, which stays with the hub's operator. Every path written into a configuration is
//! `<install root>/<folder>/…`: by default the output directory itself, so the federation runs
//! where it was generated; `--install-root /etc/nubis` for folders copied to each machine's
//! `/etc/nubis/<folder>`.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use nubis_bus::server_config::{self, render};
use nubis_bus::tls::{CertificateAuthority, Validity};
use nubis_protocol::identity::SiteIdentity;
use nubis_protocol::message::HostId;
use nubis_protocol::SiteId;
use rand::distributions::{Alphanumeric, DistString};
use serde::Serialize;

mod install;
mod site;

use install::{text, Install, TlsFile};
use site::SiteFiles;

/// Length of generated passwords (alphanumeric).
const PASSWORD_LEN: usize = 32;

/// The directory bucket's replicas on a hub of three nodes or more.
const DIRECTORY_REPLICAS: usize = 3;

/// `nubis federation ...`.
#[derive(Debug, clap::Subcommand)]
pub enum FederationCommand {
    /// Generate a whole deployment into a directory: CA and certificates, every server's
    /// configuration, site keys, daemon configurations and per-role credentials.
    Init(InitArgs),
    /// Create the federation's directory bucket at the hub, as the hub's operator, once the
    /// hub's nodes run (idempotent: the same configuration again succeeds).
    Directory(crate::directory::DirectoryArgs),
}

/// Arguments of `nubis federation init`.
#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// The directory to generate into (created; must be empty or absent).
    #[arg(long)]
    pub out: PathBuf,
    /// A hub node's host name or address, the one the sites dial (repeat: three for a
    /// production hub, clustered).
    #[arg(long = "hub", required = true)]
    pub hubs: Vec<String>,
    /// A member site's id (repeat).
    #[arg(long = "site", required = true)]
    pub sites: Vec<String>,
    /// A host of every site (repeat; default one host `h1`).
    #[arg(long = "host")]
    pub hosts: Vec<String>,
    /// Where the folders will live on their machines (default: the output directory, so the
    /// federation runs where it was generated).
    #[arg(long, conflicts_with = "systemd")]
    pub install_root: Option<PathBuf>,
    /// Name the paths of the systemd units in `deploy/systemd` instead: each folder's files
    /// installed as `deploy/OPERATIONS.md` says (`/etc/nubis/...`), the servers' certificates
    /// as unit credentials, state under `/var/lib`.
    #[arg(long)]
    pub systemd: bool,
    /// The address the hub's leaf and route ports listen on.
    #[arg(long, default_value = "0.0.0.0")]
    pub listen: String,
    /// Give every server its own ports from this one on, for a federation on one machine
    /// (hub node n: base+10(n-1) clients, +1 monitoring, +2 leaf, +3 routes; site k, counting
    /// from 1: base+100+10(k-1) clients, +1 monitoring). Default: the standard ports (4222
    /// clients, 8222 monitoring, 7422 leaf, 6222 routes), one server per machine.
    #[arg(long)]
    pub port_base: Option<u16>,
    /// The hypervisor every host agent drives.
    #[arg(long, default_value = "qemu:///system")]
    pub libvirt_uri: String,
    /// The accelerator of QEMU guests (`kvm` or `tcg`).
    #[arg(long, default_value = "kvm")]
    pub accelerator: String,
    /// How many days the certificates are valid (the CA: ten times as long).
    #[arg(long, default_value_t = 825)]
    pub days: u32,
}

/// What `nubis federation init` wrote.
#[derive(Debug, Serialize)]
pub struct Generated {
    /// The output directory.
    pub out: PathBuf,
    /// The hub's nodes: folder, address, ports.
    pub hub_nodes: Vec<NodeLayout>,
    /// The sites: folder, ports.
    pub sites: Vec<SiteLayout>,
    /// The CA's folder (its key stays with the hub's operator).
    pub ca: PathBuf,
}

/// One hub node.
#[derive(Debug, Clone, Serialize)]
pub struct NodeLayout {
    /// Its server name and folder, `hub-<n>`.
    pub name: String,
    /// The address the sites dial.
    pub address: String,
    /// Client port (the hub's operator, on the node itself).
    pub client_port: u16,
    /// Monitoring port.
    pub http_port: u16,
    /// Leaf-node port.
    pub leaf_port: u16,
    /// Route port.
    pub cluster_port: u16,
}

/// One site.
#[derive(Debug, Clone, Serialize)]
pub struct SiteLayout {
    /// The site id, also its folder.
    pub site: String,
    /// Its server's client port (on loopback).
    pub client_port: u16,
    /// Its server's monitoring port (on loopback).
    pub http_port: u16,
    /// Its hosts.
    pub hosts: Vec<String>,
}

/// The layout the arguments describe, checked.
fn layout(args: &InitArgs) -> anyhow::Result<(Vec<NodeLayout>, Vec<SiteLayout>)> {
    let hosts: Vec<String> = if args.hosts.is_empty() {
        vec!["h1".to_owned()]
    } else {
        args.hosts.clone()
    };
    for host in &hosts {
        HostId::new(host).with_context(|| format!("--host {host:?} is not a valid host id"))?;
    }
    for (i, site) in args.sites.iter().enumerate() {
        SiteId::new(site).with_context(|| format!("--site {site:?} is not a valid site id"))?;
        if site.starts_with("hub") || site == "ca" {
            bail!("--site {site:?}: `hub…` and `ca` name the hub's and the CA's folders");
        }
        if args.sites[..i].contains(site) {
            bail!("--site {site:?} is given twice");
        }
    }
    let port = |offset: usize, standard: u16| -> anyhow::Result<u16> {
        match args.port_base {
            None => Ok(standard),
            Some(base) => u16::try_from(usize::from(base) + offset)
                .ok()
                .filter(|p| *p > 0)
                .context("--port-base leaves no room for every server's ports below 65536"),
        }
    };
    let mut nodes = Vec::new();
    for (i, address) in args.hubs.iter().enumerate() {
        if address.is_empty() || address.contains([':', '/', '"', ' ']) {
            bail!("--hub {address:?}: give a host name or an IPv4 address, without a port");
        }
        nodes.push(NodeLayout {
            name: format!("hub-{}", i + 1),
            address: address.clone(),
            client_port: port(10 * i, 4222)?,
            http_port: port(10 * i + 1, 8222)?,
            leaf_port: port(10 * i + 2, 7422)?,
            cluster_port: port(10 * i + 3, 6222)?,
        });
    }
    let sites = args
        .sites
        .iter()
        .enumerate()
        .map(|(k, site)| {
            Ok(SiteLayout {
                site: site.clone(),
                client_port: port(100 + 10 * k, 4222)?,
                http_port: port(100 + 10 * k + 1, 8222)?,
                hosts: hosts.clone(),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((nodes, sites))
}

fn password() -> String {
    Alphanumeric.sample_string(&mut rand::thread_rng(), PASSWORD_LEN)
}

/// Writes `text` to a new file of `mode` (never replacing one).
fn write_new(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn create_dir(path: &Path, mode: u32) -> anyhow::Result<()> {
    fs::create_dir_all(path).with_context(|| format!("cannot create {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", path.display()))
}

/// A path as a TOML or nats-server string (both take JSON's escapes).
fn quoted(path: &Path) -> String {
    serde_json::Value::String(path.to_string_lossy().into_owned()).to_string()
}

/// `nubis federation init`.
pub fn init(args: &InitArgs) -> anyhow::Result<Generated> {
    let (nodes, sites) = layout(args)?;
    if args.out.exists()
        && fs::read_dir(&args.out)
            .with_context(|| format!("cannot read {}", args.out.display()))?
            .next()
            .is_some()
    {
        bail!("{} is not empty", args.out.display());
    }
    create_dir(&args.out, 0o755)?;
    let out = fs::canonicalize(&args.out)
        .with_context(|| format!("cannot resolve {}", args.out.display()))?;
    let install = if args.systemd {
        Install::Systemd
    } else {
        Install::At(args.install_root.clone().unwrap_or_else(|| out.clone()))
    };

    let ca = CertificateAuthority::generate(Validity::days_from_now(args.days.saturating_mul(10)))?;
    ca.write(&out.join("ca"))?;
    let validity = Validity::days_from_now(args.days);

    let identities: Vec<SiteIdentity> = sites
        .iter()
        .map(|s| SiteId::new(&s.site).map(SiteIdentity::generate))
        .collect::<Result<_, _>>()?;
    let leaf_passwords: Vec<String> = sites.iter().map(|_| password()).collect();

    write_hub(
        args,
        &out,
        &install,
        &ca,
        validity,
        &nodes,
        &sites,
        &leaf_passwords,
    )?;
    for (k, site) in sites.iter().enumerate() {
        let written = SiteFiles {
            site,
            identity: &identities[k],
            leaf_password: &leaf_passwords[k],
            dir: out.join(&site.site),
            install: &install,
        };
        written.write(args, &ca, validity, &nodes, &identities)?;
    }
    Ok(Generated {
        out: out.clone(),
        hub_nodes: nodes,
        sites,
        ca: out.join("ca"),
    })
}

/// Every node's folder: its server configuration (one cluster when there are several nodes),
/// its certificate, the hub operator's password and the directory bucket's configuration.
#[allow(clippy::too_many_arguments)]
fn write_hub(
    args: &InitArgs,
    out: &Path,
    install: &Install,
    ca: &CertificateAuthority,
    validity: Validity,
    nodes: &[NodeLayout],
    sites: &[SiteLayout],
    leaf_passwords: &[String],
) -> anyhow::Result<()> {
    let sys_password = password();
    let operator_password = password();
    let route_password = password();
    let mut leaf_users = Vec::new();
    for (site, leaf_password) in sites.iter().zip(leaf_passwords) {
        leaf_users.push(render(
            server_config::HUB_LEAF_USER,
            [
                ("SITE", site.site.clone()),
                ("LEAF_PASSWORD", leaf_password.clone()),
            ],
        )?);
    }
    let routes = nodes
        .iter()
        .map(|n| {
            format!(
                "\"nats-route://route:{route_password}@{}:{}\"",
                n.address, n.cluster_port
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let mut bucket: serde_json::Value = serde_json::from_str(server_config::DIRECTORY_BUCKET)?;
    bucket["num_replicas"] = serde_json::json!(nodes.len().min(DIRECTORY_REPLICAS));
    for node in nodes {
        let dir = out.join(&node.name);
        create_dir(&dir, 0o700)?;
        let issued = ca.issue_server(std::slice::from_ref(&node.address), validity)?;
        issued.write(&dir.join("tls"), ca)?;
        let tls = [
            ("TLS_CA", TlsFile::Ca),
            ("TLS_CERT", TlsFile::Cert),
            ("TLS_KEY", TlsFile::Key),
        ]
        .map(|(k, file)| (k, text(&install.hub_tls(&node.name, file))));
        let cluster = if nodes.len() < 2 {
            String::new()
        } else {
            render(
                server_config::HUB_CLUSTER,
                [
                    ("HOST", args.listen.clone()),
                    ("CLUSTER_PORT", node.cluster_port.to_string()),
                    ("ROUTE_PASSWORD", route_password.clone()),
                    ("ROUTES", routes.clone()),
                ]
                .into_iter()
                .chain(tls.clone()),
            )?
        };
        let (store, ports) = install.hub_store(&node.name);
        let conf = render(
            server_config::HUB,
            [
                ("NODE", node.name.clone()),
                ("HOST", "127.0.0.1".to_owned()),
                ("LEAF_HOST", args.listen.clone()),
                ("CLIENT_PORT", node.client_port.to_string()),
                ("HTTP_PORT", node.http_port.to_string()),
                ("LEAF_PORT", node.leaf_port.to_string()),
                ("STORE", text(&store)),
                ("PORTS_DIR", text(&ports)),
                ("SYS_PASSWORD", sys_password.clone()),
                ("OPERATOR_PASSWORD", operator_password.clone()),
                ("LEAF_USERS", leaf_users.join("\n")),
                ("CLUSTER", cluster),
            ]
            .into_iter()
            .chain(tls),
        )?;
        write_new(&dir.join("nats-server.conf"), &conf, 0o600)?;
        if install.makes_state() {
            create_dir(&dir.join("state"), 0o700)?;
        }
        write_new(
            &dir.join("operator.nats-password"),
            &format!("{operator_password}\n"),
            0o600,
        )?;
        write_new(
            &dir.join("directory-bucket.json"),
            &serde_json::to_string_pretty(&bucket)?,
            0o644,
        )?;
    }
    Ok(())
}

impl Generated {
    /// Prints what was generated and what to do next.
    pub fn print(&self, json: bool) {
        if json {
            println!("{}", serde_json::json!(self));
            return;
        }
        let out = self.out.display();
        println!(
            "generated a federation of {} hub node(s) and {} site(s) in {out}",
            self.hub_nodes.len(),
            self.sites.len()
        );
        println!(
            "  {}/ the CA (ca-key.pem stays with the hub's operator, off the servers)",
            self.ca.display()
        );
        for node in &self.hub_nodes {
            println!(
                "  {out}/{}/ hub node at {} (leaf port {}, routes {}, clients 127.0.0.1:{})",
                node.name, node.address, node.leaf_port, node.cluster_port, node.client_port
            );
        }
        for site in &self.sites {
            println!(
                "  {out}/{}/ site {} (server 127.0.0.1:{}, hosts {})",
                site.site,
                site.site,
                site.client_port,
                site.hosts.join(", ")
            );
        }
        println!("next (deploy/OPERATIONS.md, \"Generate a federation\"):");
        println!("  on each hub node:  nats-server -c hub-N/nats-server.conf");
        if let Some(first) = self.hub_nodes.first() {
            println!(
                "  once, at the hub:  nubis federation directory --nats-url nats://127.0.0.1:{} --password-file {out}/{}/operator.nats-password --config {out}/{}/directory-bucket.json",
                first.client_port, first.name, first.name
            );
        }
        println!("  on each site:      nats-server -c SITE/nats-server.conf, then nubis site|proxy|host --config SITE/site.toml|proxy.toml|host-H.toml");
        println!("passwords are in the *.nats-password files (mode 0600); the site servers' files hold them too");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn args(hubs: &[&str], sites: &[&str], port_base: Option<u16>) -> InitArgs {
        InitArgs {
            out: PathBuf::from("/nonexistent"),
            hubs: hubs.iter().map(|s| (*s).to_owned()).collect(),
            sites: sites.iter().map(|s| (*s).to_owned()).collect(),
            hosts: Vec::new(),
            install_root: None,
            systemd: false,
            listen: "0.0.0.0".into(),
            port_base,
            libvirt_uri: "qemu:///system".into(),
            accelerator: "kvm".into(),
            days: 825,
        }
    }

    #[test]
    fn standard_ports_one_server_per_machine_or_a_range_on_one_machine() {
        let (nodes, sites) = layout(&args(&["h1.example", "h2.example"], &["a"], None)).unwrap();
        assert_eq!(nodes[1].name, "hub-2");
        assert_eq!(
            (
                nodes[1].client_port,
                nodes[1].leaf_port,
                nodes[1].cluster_port
            ),
            (4222, 7422, 6222)
        );
        assert_eq!(
            (sites[0].client_port, sites[0].hosts.clone()),
            (4222, vec!["h1".to_owned()])
        );

        let (nodes, sites) = layout(&args(&["127.0.0.1"; 3], &["a", "b"], Some(20000))).unwrap();
        assert_eq!((nodes[2].client_port, nodes[2].leaf_port), (20020, 20022));
        assert_eq!((sites[1].client_port, sites[1].http_port), (20110, 20111));
    }

    #[test]
    fn sites_that_collide_with_folders_or_each_other_and_bad_addresses_are_refused() {
        for (hubs, sites, base, why) in [
            (&["h"][..], &["a", "a"][..], None, "twice"),
            (&["h"][..], &["hub-1"][..], None, "hub"),
            (&["h"][..], &["ca"][..], None, "hub"),
            (&["h"][..], &["A b"][..], None, "valid site id"),
            (&["h:4222"][..], &["a"][..], None, "without a port"),
            (&["h"][..], &["a"][..], Some(65500), "65536"),
        ] {
            let err = layout(&args(hubs, sites, base)).unwrap_err();
            assert!(format!("{err:#}").contains(why), "{err:#}");
        }
    }
}
