//! The certificates of one federation: its own CA, the hub's leaf-port certificate for the
//! loopback address, and one leaf certificate per site, made with `nubis_bus::tls` (what
//! `nubis tls` makes for a deployment) and written into the federation's directory.

use std::path::{Path, PathBuf};

use nubis_bus::tls::{
    CertificateAuthority, Issued, TlsError, Validity, CA_CERT_FILE, CERT_FILE, KEY_FILE,
};

use super::server::Server;
use super::{Error, Federation, HOST, HUB};

/// How long the test kit's certificates are valid: longer than any test or demo runs.
const VALIDITY_DAYS: u32 = 30;

/// The federation's CA and the folder its certificates are written to.
#[derive(Debug)]
pub(super) struct Pki {
    ca: CertificateAuthority,
    dir: PathBuf,
}

/// The three files a server's TLS block names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA certificate the peer is verified against.
    pub ca: PathBuf,
    /// The server's own certificate.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

impl TlsFiles {
    /// The files [`Issued::write`] leaves in `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            ca: dir.join(CA_CERT_FILE),
            cert: dir.join(CERT_FILE),
            key: dir.join(KEY_FILE),
        }
    }

    /// The template placeholders `TLS_CA`, `TLS_CERT` and `TLS_KEY` with these files.
    pub(super) fn values(&self) -> [(&'static str, String); 3] {
        let text = |p: &Path| p.to_string_lossy().into_owned();
        [
            ("TLS_CA", text(&self.ca)),
            ("TLS_CERT", text(&self.cert)),
            ("TLS_KEY", text(&self.key)),
        ]
    }
}

fn tls(source: TlsError) -> Error {
    Error::Tls { source }
}

impl Pki {
    /// A new CA for the federation whose directory is `root`.
    pub(super) fn new(root: &Path) -> Result<Self, Error> {
        let ca =
            CertificateAuthority::generate(Validity::days_from_now(VALIDITY_DAYS)).map_err(tls)?;
        let dir = root.join("tls");
        ca.write(&dir.join("ca")).map_err(tls)?;
        Ok(Self { ca, dir })
    }

    /// The federation's CA, to issue more certificates with.
    pub(super) fn ca(&self) -> &CertificateAuthority {
        &self.ca
    }

    /// Writes `issued` into a folder of its own named `name`, beside the CA's certificate.
    pub(super) fn write(&self, name: &str, issued: &Issued) -> Result<TlsFiles, Error> {
        let dir = self.dir.join(name);
        issued.write(&dir, &self.ca).map_err(tls)?;
        Ok(TlsFiles::in_dir(&dir))
    }

    /// The hub's certificate for the loopback address its leaf and route ports listen on.
    pub(super) fn hub(&self) -> Result<TlsFiles, Error> {
        let names = [HOST.to_owned(), "localhost".to_owned()];
        let issued = self
            .ca
            .issue_server(&names, Validity::days_from_now(VALIDITY_DAYS))
            .map_err(tls)?;
        self.write(HUB, &issued)
    }

    /// Site `site`'s leaf certificate.
    pub(super) fn site(&self, site: &str) -> Result<TlsFiles, Error> {
        let issued = self
            .ca
            .issue_site(site, Validity::days_from_now(VALIDITY_DAYS))
            .map_err(tls)?;
        self.write(&format!("site-{site}"), &issued)
    }
}

impl Federation {
    /// Makes the federation's CA in `root`, and fills the TLS placeholders of the hub's nodes
    /// (one certificate for the loopback address, shared by all) and of every site with their
    /// own certificates.
    pub(super) fn issue_certificates(
        root: &Path,
        hubs: &mut [Server],
        sites: &mut [Server],
    ) -> Result<Pki, Error> {
        let pki = Pki::new(root)?;
        let hub = pki.hub()?;
        for node in hubs {
            node.values.extend(hub.values());
        }
        for site in sites {
            let files = pki.site(&site.name)?;
            site.values.extend(files.values());
        }
        Ok(pki)
    }

    /// The federation's certificate authority, to issue certificates for tests of the leaf
    /// connections' TLS (see [`Federation::write_certificate`] and [`Federation::spawn_leaf`]).
    pub fn certificate_authority(&self) -> &CertificateAuthority {
        self.pki.ca()
    }

    /// The federation CA's certificate file, which every server verifies its peers against.
    pub fn ca_file(&self) -> PathBuf {
        self.pki.dir.join("ca").join(CA_CERT_FILE)
    }

    /// Writes `issued` (from this federation's CA or any other) into a folder `name` of the
    /// federation's directory, beside this federation's CA certificate, for
    /// [`Federation::spawn_leaf`].
    pub fn write_certificate(&self, name: &str, issued: &Issued) -> Result<TlsFiles, Error> {
        self.pki.write(name, issued)
    }
}
