//! `nubis tls`: the federation's certificates for a deployment. Every leaf connection between a
//! site's server and the hub is TLS verified both ways (`nats-config/README.md`, "TLS"); the
//! hub's operator keeps the federation CA and issues the hub's certificate and one certificate
//! per member site, which the site's operator installs beside its `leaf.conf`.
//!
//! The certificates are made by `nubis_bus::tls`, the code the test kit uses for every test
//! federation. Private keys go to files of mode 0600 and are never printed.

use std::path::PathBuf;

use anyhow::Context as _;

use nubis_bus::tls::{CertificateAuthority, Validity, CA_CERT_FILE, CERT_FILE, KEY_FILE};
use nubis_protocol::SiteId;
use serde::Serialize;

/// `nubis tls ...`.
#[derive(Debug, clap::Subcommand)]
pub enum TlsCommand {
    /// Create the federation's certificate authority: `ca.pem` (give it to every site) and
    /// `ca-key.pem` (mode 0600; it stays with the hub's operator).
    Ca(CaArgs),
    /// Issue a certificate signed by the federation CA: a site's leaf certificate (`--name
    /// SITE`), or the hub's server certificate (`--name hub --server-name HOST`). Writes
    /// `ca.pem`, `cert.pem` and `key.pem` (mode 0600) into `--out`.
    Issue(IssueArgs),
}

/// Arguments of `nubis tls ca`.
#[derive(Debug, clap::Args)]
pub struct CaArgs {
    /// The folder to write the CA into (created if absent; existing files are not replaced).
    #[arg(long)]
    pub out: PathBuf,
    /// How many days the CA is valid.
    #[arg(long, default_value_t = 3650)]
    pub days: u32,
}

/// Arguments of `nubis tls issue`.
#[derive(Debug, clap::Args)]
pub struct IssueArgs {
    /// The CA's folder, as `nubis tls ca` wrote it.
    #[arg(long)]
    pub ca: PathBuf,
    /// The site id the certificate is for (the hub maps it to the site's leaf user), or a
    /// label for the hub's certificate with --server-name.
    #[arg(long)]
    pub name: String,
    /// Issue a server certificate for the hub's leaf port instead, naming this host name or IP
    /// address, the one in the sites' `HUB_LEAF_URLS` (repeat for several).
    #[arg(long = "server-name")]
    pub server_names: Vec<String>,
    /// The folder to write the certificate into (created if absent; existing files are not
    /// replaced).
    #[arg(long)]
    pub out: PathBuf,
    /// How many days the certificate is valid.
    #[arg(long, default_value_t = 825)]
    pub days: u32,
}

/// What a `nubis tls` command wrote.
#[derive(Debug, Serialize)]
pub struct Written {
    /// `ca`, `site` or `server`.
    pub kind: &'static str,
    /// The site id, or the label of a server certificate.
    pub name: String,
    /// The names the certificate carries (the site id; the server's host names and addresses).
    pub names: Vec<String>,
    /// The CA certificate file.
    pub ca: PathBuf,
    /// The certificate file (the CA's own for `ca`).
    pub cert: PathBuf,
    /// The private key file (mode 0600).
    pub key: PathBuf,
}

/// `nubis tls ca`.
pub fn ca(args: &CaArgs) -> anyhow::Result<Written> {
    let ca = CertificateAuthority::generate(Validity::days_from_now(args.days))?;
    ca.write(&args.out)?;
    Ok(Written {
        kind: "ca",
        name: "nubis federation CA".into(),
        names: Vec::new(),
        ca: args.out.join(CA_CERT_FILE),
        cert: args.out.join(CA_CERT_FILE),
        key: args.out.join(nubis_bus::tls::CA_KEY_FILE),
    })
}

/// `nubis tls issue`.
pub fn issue(args: &IssueArgs) -> anyhow::Result<Written> {
    let ca = CertificateAuthority::load(&args.ca)?;
    let validity = Validity::days_from_now(args.days);
    let (kind, names, issued) = if args.server_names.is_empty() {
        SiteId::new(&args.name)
            .with_context(|| format!("--name {:?} is not a valid site id", args.name))?;
        let issued = ca.issue_site(&args.name, validity)?;
        ("site", vec![args.name.clone()], issued)
    } else {
        let issued = ca.issue_server(&args.server_names, validity)?;
        ("server", args.server_names.clone(), issued)
    };
    issued.write(&args.out, &ca)?;
    Ok(Written {
        kind,
        name: args.name.clone(),
        names,
        ca: args.out.join(CA_CERT_FILE),
        cert: args.out.join(CERT_FILE),
        key: args.out.join(KEY_FILE),
    })
}

impl Written {
    /// Prints what was written, and where it goes in the servers' configuration.
    pub fn print(&self, json: bool) {
        if json {
            println!("{}", serde_json::json!(self));
            return;
        }
        if self.kind == "ca" {
            eprintln!(
                "wrote {} and {} (mode 0600)",
                self.cert.display(),
                self.key.display()
            );
        } else {
            eprintln!(
                "wrote {}, {} and {} (mode 0600)",
                self.ca.display(),
                self.cert.display(),
                self.key.display()
            );
        }
        match self.kind {
            "ca" => println!(
                "# The federation CA. Give {} to every site; keep {} with the hub's operator.\n# Issue the hub's certificate: nubis tls issue --ca <this folder> --name hub --server-name <hub address> --out <folder>\n# and each site's: nubis tls issue --ca <this folder> --name <site> --out <folder>",
                self.ca.display(),
                self.key.display()
            ),
            "site" => println!(
                "# Leaf certificate of site {}: in its leaf.conf, TLS_CA = {}, TLS_CERT = {}, TLS_KEY = {}",
                self.name,
                self.ca.display(),
                self.cert.display(),
                self.key.display()
            ),
            _ => println!(
                "# Server certificate for {}: in hub.conf, TLS_CA = {}, TLS_CERT = {}, TLS_KEY = {}",
                self.names.join(", "),
                self.ca.display(),
                self.cert.display(),
                self.key.display()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use nubis_bus::tls::TlsError;

    use super::*;

    #[test]
    fn a_ca_issues_site_and_hub_certificates_with_private_keys() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        ca(&CaArgs {
            out: ca_dir.clone(),
            days: 10,
        })
        .unwrap();
        let issue_args = |name: &str, server_names: &[&str], out: &str| IssueArgs {
            ca: ca_dir.clone(),
            name: name.into(),
            server_names: server_names.iter().map(|s| (*s).to_owned()).collect(),
            out: dir.path().join(out),
            days: 10,
        };
        let site = issue(&issue_args("a", &[], "a")).unwrap();
        assert_eq!(site.kind, "site");
        let mode = std::fs::metadata(&site.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let hub = issue(&issue_args("hub", &["hub.example.org", "10.0.0.1"], "hub")).unwrap();
        assert_eq!(hub.kind, "server");
        // The hub's name is no site's; a bad id is refused; nothing is replaced.
        let refused = |args: IssueArgs| issue(&args).unwrap_err();
        assert!(matches!(
            refused(issue_args("hub", &[], "x")).downcast_ref::<TlsError>(),
            Some(TlsError::InvalidName { .. })
        ));
        assert!(refused(issue_args("A.B", &[], "x"))
            .downcast_ref::<nubis_protocol::IdError>()
            .is_some());
        assert!(matches!(
            refused(issue_args("a", &[], "a")).downcast_ref::<TlsError>(),
            Some(TlsError::Exists { .. })
        ));
    }
}
