//! `nubis host-user add`: credentials for one host agent of a site — a NATS user `host.<id>`
//! that may touch only that host's subjects (`nats-config/leaf-host-user.conf`, filled in), to
//! paste into the site server's configuration, and a random password written to a file only its
//! owner may read.
//!
//! One user per host is what lets the site tell which host sent a monitoring batch: each may
//! publish only on its own intake subject, and the site accepts a batch only from the host that
//! holds the VM.

use std::path::PathBuf;

use clap::Args;
use nubis_protocol::message::HostId;
use nubis_protocol::SiteId;
use serde::Serialize;

use crate::operator::{new_password, parse_site, AddError};

/// The template of one host user, shared with the test kit so the two cannot drift apart.
use nubis_bus::server_config::LEAF_HOST_USER as HOST_USER_TEMPLATE;

/// `nubis host-user add`.
#[derive(Debug, Args)]
pub struct AddArgs {
    /// The host's id, as in its agent's `host` setting and the site's `[[hosts]]`.
    pub host: String,
    /// The site whose server the host agent logs in to.
    #[arg(long, env = "NUBIS_SITE")]
    pub site: String,
    /// Where to write the password (mode 0600); default `host.<id>.nats-password`.
    #[arg(long)]
    pub password_file: Option<PathBuf>,
    /// Replace an existing password file.
    #[arg(long)]
    pub force: bool,
}

/// The result of `nubis host-user add`.
#[derive(Debug, Serialize)]
pub struct Added {
    /// The NATS user (`host.<id>`), for the agent's `nats_user`.
    pub user: String,
    /// The site.
    pub site: String,
    /// Where the password was written, for the agent's `nats_password_file`.
    pub password_file: PathBuf,
    /// The user block to paste into the site server's `FED` account users.
    pub block: String,
}

/// Generates the host agent's password, writes it and returns the user block.
pub fn add(args: &AddArgs) -> Result<Added, AddError> {
    let site = parse_site(&args.site)?;
    let host = HostId::new(&args.host)
        .map_err(|e| AddError::Name(format!("{:?} is not a valid host id: {e}", args.host)))?;
    let user = format!("host.{host}");
    let (file, password) = new_password(args.password_file.as_deref(), &user, args.force)?;
    Ok(Added {
        user,
        site: site.to_string(),
        password_file: file,
        block: user_block(&site, &host, &password),
    })
}

/// The user block of host `host` at `site`: `leaf-host-user.conf` with its placeholders filled.
pub fn user_block(site: &SiteId, host: &HostId, password: &str) -> String {
    HOST_USER_TEMPLATE
        .replace("{{SITE}}", site.as_str())
        .replace("{{HOST_ID}}", host.as_str())
        .replace("{{HOST_PASSWORD}}", password)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_block_names_only_the_hosts_own_subjects_and_fills_every_placeholder() {
        let site = SiteId::new("a").unwrap();
        let host = HostId::new("h1").unwrap();
        let block = user_block(&site, &host, "pw");
        assert!(!block.contains("{{"), "{block}");
        assert!(block.contains("user: \"host.h1\""));
        assert!(block.contains("password: \"pw\""));
        assert!(block.contains("\"nubis.site.a.intake.h1\""));
        assert!(block.contains("\"nubis.site.a.host.h1.>\""));
        assert!(!block.contains("nubis.site.a.>"));
    }

    #[test]
    fn an_invalid_host_is_refused_and_the_password_file_is_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("h1.pw");
        let args = AddArgs {
            host: "h.1".into(),
            site: "a".into(),
            password_file: Some(file.clone()),
            force: false,
        };
        assert!(matches!(add(&args), Err(AddError::Name(_))));
        assert!(!file.exists());
        let added = add(&AddArgs {
            host: "h1".into(),
            ..args
        })
        .unwrap();
        assert_eq!(added.user, "host.h1");
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let password = std::fs::read_to_string(&file).unwrap();
        assert!(added
            .block
            .contains(&format!("password: \"{}\"", password.trim())));
    }
}
