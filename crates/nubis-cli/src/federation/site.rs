//! One site's folder of a generated deployment: its server's configuration with the hub's
//! addresses and its leaf password, its leaf certificate and keys, and the site daemon's,
//! Transfer proxy's and host agents' configurations, every partner's keys pinned, with a
//! password file per user.

use std::fmt::Write as _;
use std::path::PathBuf;

use nubis_bus::server_config::{self, render};
use nubis_bus::tls::{CertificateAuthority, Validity};
use nubis_protocol::identity::SiteIdentity;

use super::install::{text, Install, TlsFile};
use super::{create_dir, password, quoted, write_new, InitArgs, NodeLayout, SiteLayout};

/// One site's folder.
pub(super) struct SiteFiles<'a> {
    pub(super) site: &'a SiteLayout,
    pub(super) identity: &'a SiteIdentity,
    pub(super) leaf_password: &'a str,
    /// Where it is written.
    pub(super) dir: PathBuf,
    /// Where it will be on the site's machine.
    pub(super) install: &'a Install,
}

impl SiteFiles<'_> {
    pub(super) fn write(
        &self,
        args: &InitArgs,
        ca: &CertificateAuthority,
        validity: Validity,
        nodes: &[NodeLayout],
        identities: &[SiteIdentity],
    ) -> anyhow::Result<()> {
        let id = &self.site.site;
        create_dir(&self.dir, 0o700)?;
        ca.issue_site(id, validity)?
            .write(&self.dir.join("tls"), ca)?;
        self.identity
            .save(&self.dir.join(format!("{id}.key")), false)?;
        if self.install.makes_state() {
            create_dir(&self.dir.join("state"), 0o700)?;
            for sub in ["nats", "site", "images", "proxy"] {
                create_dir(&self.dir.join("state").join(sub), 0o700)?;
            }
            for host in &self.site.hosts {
                create_dir(&self.dir.join("state/vms").join(host), 0o700)?;
            }
        }

        let mut passwords = Vec::new();
        for user in ["site", "proxy", "operator", "viewer", "admin"] {
            let pw = password();
            write_new(
                &self.dir.join(format!("{user}.nats-password")),
                &format!("{pw}\n"),
                0o600,
            )?;
            passwords.push((user, pw));
        }
        let password_of = |user: &str| {
            passwords
                .iter()
                .find(|(u, _)| *u == user)
                .map(|(_, p)| p.clone())
                .unwrap_or_default()
        };
        let mut host_users = Vec::new();
        for host in &self.site.hosts {
            let pw = password();
            write_new(
                &self.dir.join(format!("host.{host}.nats-password")),
                &format!("{pw}\n"),
                0o600,
            )?;
            host_users.push(render(
                server_config::LEAF_HOST_USER,
                [
                    ("SITE", id.clone()),
                    ("HOST_ID", host.clone()),
                    ("HOST_PASSWORD", pw),
                ],
            )?);
        }
        let leaf_urls = nodes
            .iter()
            .map(|n| {
                format!(
                    "\"nats-leaf://{id}:{}@{}:{}\"",
                    self.leaf_password, n.address, n.leaf_port
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let (store, ports) = self.install.site_store(id);
        let tls = |file| text(&self.install.site_tls(id, file));
        let conf = render(
            server_config::LEAF,
            [
                ("SITE", id.clone()),
                ("HOST", "127.0.0.1".to_owned()),
                ("CLIENT_PORT", self.site.client_port.to_string()),
                ("HTTP_PORT", self.site.http_port.to_string()),
                ("STORE", text(&store)),
                ("PORTS_DIR", text(&ports)),
                ("SYS_PASSWORD", password()),
                ("SITE_PASSWORD", password_of("site")),
                ("PROXY_PASSWORD", password_of("proxy")),
                ("OPERATOR_PASSWORD", password_of("operator")),
                ("VIEWER_PASSWORD", password_of("viewer")),
                ("ADMIN_PASSWORD", password_of("admin")),
                ("HOST_USERS", host_users.join("\n")),
                ("HUB_LEAF_URLS", leaf_urls),
                ("LEAF_PASSWORD", self.leaf_password.to_owned()),
                ("TLS_CA", tls(TlsFile::Ca)),
                ("TLS_CERT", tls(TlsFile::Cert)),
                ("TLS_KEY", tls(TlsFile::Key)),
            ],
        )?;
        write_new(&self.dir.join("nats-server.conf"), &conf, 0o600)?;

        let url = format!("nats://127.0.0.1:{}", self.site.client_port);
        let partners: Vec<&SiteIdentity> = identities
            .iter()
            .filter(|i| i.site().as_str() != id)
            .collect();
        write_new(
            &self.dir.join("site.toml"),
            &self.site_toml(&url, &partners),
            0o640,
        )?;
        write_new(
            &self.dir.join("proxy.toml"),
            &self.proxy_toml(&url, identities),
            0o640,
        )?;
        for host in &self.site.hosts {
            write_new(
                &self.dir.join(format!("host-{host}.toml")),
                &self.host_toml(&url, host, args),
                0o640,
            )?;
        }
        Ok(())
    }

    fn site_toml(&self, url: &str, partners: &[&SiteIdentity]) -> String {
        let id = &self.site.site;
        let at = |p: &str| quoted(&self.install.site_file(id, p));
        let state = |p: &str| quoted(&self.install.site_state(id, p));
        let mut t = format!(
            "# Site daemon of `{id}` (`nubis site --config site.toml`), from `nubis federation init`.\n\
             site = \"{id}\"\nkey_file = {}\nnats_url = \"{url}\"\nnats_user = \"site\"\n\
             nats_password_file = {}\nhub_domain = \"hub\"\ndata_dir = {}\nimage_store = {}\n\
             proxy = \"p1\"\n\n",
            at(&format!("{id}.key")),
            at("site.nats-password"),
            state("site"),
            state("images"),
        );
        t.push_str(
            "# How offers and prepared sources from a partner are passed upstream: `direct` (the\n\
             # far proxy's address reaches the upstream) or `relay` (this site's proxy relays the\n\
             # data, so the upstream learns nothing beyond this site). See subjects.md.\n\
             [transfer]\ndefault = \"direct\"\n\n",
        );
        for host in &self.site.hosts {
            let _ = write!(
                t,
                "[[hosts]]\nid = \"{host}\"\nvm_root = {}\n\n",
                state(&format!("vms/{host}"))
            );
        }
        t.push_str(
            "# The bilateral contracts: every other site of the federation, keys pinned. Remove a\n\
             # site to stop dealing with it; `preference` orders offers.\n",
        );
        for p in partners {
            let public = p.public();
            let _ = write!(
                t,
                "[[partners]]\nsite = \"{}\"\nsigning_key = \"{}\"\nsealing_key = \"{}\"\npreference = 0\n\n",
                public.site,
                public.signing_text(),
                public.sealing_text()
            );
        }
        t
    }

    fn proxy_toml(&self, url: &str, identities: &[SiteIdentity]) -> String {
        let id = &self.site.site;
        let at = |p: &str| quoted(&self.install.site_file(id, p));
        let state = |p: &str| quoted(&self.install.site_state(id, p));
        let roots: Vec<String> = self
            .site
            .hosts
            .iter()
            .map(|h| state(&format!("vms/{h}")))
            .chain([state("images")])
            .collect();
        let mut t = format!(
            "# Transfer proxy of `{id}` (`nubis proxy --config proxy.toml`), from `nubis federation init`.\n\
             site = \"{id}\"\nproxy = \"p1\"\nnats_url = \"{url}\"\nnats_user = \"proxy\"\n\
             nats_password_file = {}\nidentity_file = {}\nstore_dir = {}\n\n\
             [transfer]\n# The only directories whose files this proxy serves and receives into.\n\
             roots = [{}]\n# Set to true when site.toml relays any transfer.\nrelay_allowed = false\n\
             # The rate of this site's link to the hub, bytes per second: the fetch window follows\n\
             # it and the round trip to the source (default 125000000, 1 Gbit/s).\n\
             # link_bytes_per_sec = 125000000\n\n\
             # Every site whose proxy this one exchanges files with, keys pinned.\n",
            at("proxy.nats-password"),
            at(&format!("{id}.key")),
            state("proxy"),
            roots.join(", "),
        );
        for i in identities {
            let public = i.public();
            let _ = write!(
                t,
                "[[partners]]\nsite = \"{}\"\nsigning_key = \"{}\"\n\n",
                public.site,
                public.signing_text()
            );
        }
        t
    }

    fn host_toml(&self, url: &str, host: &str, args: &InitArgs) -> String {
        let id = &self.site.site;
        let at = |p: &str| quoted(&self.install.site_file(id, p));
        let state = |p: &str| quoted(&self.install.site_state(id, p));
        format!(
            "# Host agent `{host}` of `{id}` (`nubis host --config host-{host}.toml`), from `nubis federation init`.\n\
             site = \"{id}\"\nhost = \"{host}\"\nnats_url = \"{url}\"\nnats_user = \"host.{host}\"\n\
             nats_password_file = {}\nlibvirt_uri = {}\naccelerator = {}\nvm_root = {}\nkpi_root = {}\n",
            at(&format!("host.{host}.nats-password")),
            serde_json::Value::String(args.libvirt_uri.clone()),
            serde_json::Value::String(args.accelerator.clone()),
            state(&format!("vms/{host}")),
            state(&format!("kpi/{host}")),
        )
    }
}
