//! Where the files of a generated deployment live on their machines, which is what the
//! configurations name: in place (every folder where it was generated, or under another root),
//! or the layout of the systemd units in `deploy/systemd` (configurations in `/etc/nubis`,
//! servers' certificates as unit credentials, state in `/var/lib`).

use std::path::{Path, PathBuf};

/// Where a generated deployment is installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Install {
    /// Each folder `<root>/<folder>`, state in its `state/` (a federation on one machine, or
    /// folders copied under one root on each machine).
    At(PathBuf),
    /// The systemd units of `deploy/systemd`: `/etc/nubis/<site>/` for the daemons' files, the
    /// servers' certificates loaded as credentials, state under `/var/lib`.
    Systemd,
}

/// One of a server's three TLS files.
#[derive(Debug, Clone, Copy)]
pub enum TlsFile {
    /// The federation CA's certificate.
    Ca,
    /// The server's own certificate.
    Cert,
    /// Its private key.
    Key,
}

impl TlsFile {
    fn name(self) -> &'static str {
        match self {
            TlsFile::Ca => "ca.pem",
            TlsFile::Cert => "cert.pem",
            TlsFile::Key => "key.pem",
        }
    }
}

/// A path as text, for a template's value.
pub fn text(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

impl Install {
    /// A hub node's TLS file.
    pub fn hub_tls(&self, node: &str, file: TlsFile) -> PathBuf {
        match self {
            Install::At(root) => root.join(node).join("tls").join(file.name()),
            Install::Systemd => PathBuf::from(format!(
                "/run/credentials/nats-hub.service/tls-{}",
                file.name()
            )),
        }
    }

    /// A hub node's JetStream store and the folder its server writes its ports to.
    pub fn hub_store(&self, node: &str) -> (PathBuf, PathBuf) {
        match self {
            Install::At(root) => {
                let state = root.join(node).join("state");
                (state.join("jetstream"), state)
            }
            Install::Systemd => ("/var/lib/nats/hub".into(), "/run/nats-hub".into()),
        }
    }

    /// A site server's TLS file.
    pub fn site_tls(&self, site: &str, file: TlsFile) -> PathBuf {
        match self {
            Install::At(root) => root.join(site).join("tls").join(file.name()),
            Install::Systemd => PathBuf::from(format!(
                "/run/credentials/nats-site@{site}.service/tls-{}",
                file.name()
            )),
        }
    }

    /// A site server's JetStream store and the folder it writes its ports to.
    pub fn site_store(&self, site: &str) -> (PathBuf, PathBuf) {
        match self {
            Install::At(root) => {
                let state = root.join(site).join("state").join("nats");
                (state.join("jetstream"), state)
            }
            Install::Systemd => (
                format!("/var/lib/nats/{site}").into(),
                format!("/run/nats-{site}").into(),
            ),
        }
    }

    /// A file of the site's daemons: its key, a password file.
    pub fn site_file(&self, site: &str, file: &str) -> PathBuf {
        match self {
            Install::At(root) => root.join(site).join(file),
            Install::Systemd => Path::new("/etc/nubis").join(site).join(file),
        }
    }

    /// A state folder of the site's daemons: `data`, `images`, `proxy`, `vms/<host>`,
    /// `kpi/<host>`.
    pub fn site_state(&self, site: &str, sub: &str) -> PathBuf {
        match self {
            Install::At(root) => root.join(site).join("state").join(sub),
            Install::Systemd => Path::new("/var/lib/nubis").join(site).join(sub),
        }
    }

    /// Whether the state folders are made with the files (in place), rather than by the
    /// units when they first start.
    pub fn makes_state(&self) -> bool {
        matches!(self, Install::At(_))
    }
}
