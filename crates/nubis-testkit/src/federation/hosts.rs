//! Host agents' users: one NATS user per host of a site (`nats-config/leaf-host-user.conf`),
//! added to the site's server while it runs, as an operator adds a host to a real site.

use std::collections::BTreeMap;
use std::fs;
use std::process::{Command, Stdio};

use rand::distributions::{Alphanumeric, DistString};

use super::server::{render_template, Server};
use super::{Error, Federation, HOST};
use crate::wait::{wait_until, DEFAULT_TIMEOUT};

use nubis_bus::server_config::LEAF_HOST_USER as HOST_USER_TEMPLATE;

/// The placeholder of `leaf.conf` that holds the host users.
pub(super) const HOST_USERS: &str = "HOST_USERS";

/// The NATS user of host agent `host`.
pub fn host_user(host: &str) -> String {
    format!("host.{host}")
}

/// The host users of `site`, each `leaf-host-user.conf` filled in.
pub(super) fn render_host_users(
    site: &str,
    hosts: &BTreeMap<String, String>,
) -> Result<String, Error> {
    let mut users = Vec::with_capacity(hosts.len());
    for (host, password) in hosts {
        users.push(render_template(
            site,
            HOST_USER_TEMPLATE,
            [
                ("SITE", site.to_owned()),
                ("HOST_ID", host.clone()),
                ("HOST_PASSWORD", password.clone()),
            ],
        )?);
    }
    Ok(users.join("\n"))
}

impl Federation {
    /// User name and password of host agent `host` of `site`. The first call for a host adds
    /// its user to the site's server (configuration rewritten, server reloaded) and returns once
    /// the server accepts it; the user can touch only that host's subjects. They stay the same
    /// across restarts.
    pub async fn host_credentials(
        &mut self,
        site: &str,
        host: &str,
    ) -> Result<(String, String), Error> {
        let valid = !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid {
            return Err(Error::InvalidHostId {
                id: host.to_owned(),
            });
        }
        let user = host_user(host);
        if let Some(password) = self
            .host_passwords
            .get(site)
            .and_then(|hosts| hosts.get(host))
        {
            return Ok((user, password.clone()));
        }
        let binary = self.binary.clone();
        let password = Alphanumeric.sample_string(&mut rand::thread_rng(), 24);
        let hosts = self.host_passwords.entry(site.to_owned()).or_default();
        hosts.insert(host.to_owned(), password.clone());
        let users = render_host_users(site, hosts)?;
        let server = self.server_mut(site)?;
        server.values.insert(HOST_USERS, users);
        reload(server, &binary)?;
        let server = self.server(site)?;
        let url = server.url()?;
        let (u, p) = (user.clone(), password.clone());
        wait_until(DEFAULT_TIMEOUT, format!("host user {u} at {site}"), || {
            let (u, p, url) = (u.clone(), p.clone(), url.clone());
            async move {
                async_nats::ConnectOptions::with_user_and_password(u, p)
                    .max_reconnects(Some(0))
                    .connect(url)
                    .await
                    .map(|_| ())
            }
        })
        .await
        .map_err(|e| Error::NotReady {
            what: e.what,
            timeout: e.timeout,
            last: e.last,
        })?;
        Ok((user, password))
    }

    /// Connects a client to `site`'s server as host agent `host` (adding its user first, see
    /// [`Federation::host_credentials`]), with replies on that host's own inbox as the host
    /// agent takes them.
    pub async fn connect_as_host(
        &mut self,
        site: &str,
        host: &str,
    ) -> Result<async_nats::Client, Error> {
        let (user, password) = self.host_credentials(site, host).await?;
        let url = self.site_url(site)?;
        async_nats::ConnectOptions::with_user_and_password(user, password)
            .name(format!("nubis-testkit-{site}-host-{host}"))
            .custom_inbox_prefix(format!("nubis.site.{site}.host.{host}.inbox"))
            .connect(url)
            .await
            .map_err(|source| Error::Connect {
                server: site.to_owned(),
                source,
            })
    }
}

/// Rewrites `server`'s configuration and asks the running server to reload it.
fn reload(server: &mut Server, binary: &crate::binary::NatsServerBinary) -> Result<(), Error> {
    let config = server.config_path();
    // A server refuses to reload a change of its ports: one first started on ports it picked
    // (`-1`) keeps that in its configuration until it is restarted.
    let on_disk = fs::read_to_string(&config).map_err(Server::io("read", &config))?;
    let picked_ports = on_disk.contains(&format!("listen: \"{HOST}:-1\""));
    let text = if picked_ports {
        let ports = (server.client_port.take(), server.http_port.take());
        let text = server.render();
        (server.client_port, server.http_port) = ports;
        text?
    } else {
        server.render()?
    };
    fs::write(&config, text).map_err(Server::io("write", &config))?;
    let Some(child) = server.child.as_ref() else {
        // Not running: the next start reads the new configuration.
        return Ok(());
    };
    let status = Command::new(binary.path())
        .arg("--signal")
        .arg(format!("reload={}", child.id()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(Server::io("signal", &config))?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::Io {
            action: "reload",
            path: config,
            source: std::io::Error::other(format!("nats-server --signal reload: {status}")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_host_gets_a_user_limited_to_its_own_subjects() {
        let hosts = BTreeMap::from([
            ("h1".to_owned(), "pw-1".to_owned()),
            ("h2".to_owned(), "pw-2".to_owned()),
        ]);
        let text = render_host_users("a", &hosts).unwrap();
        assert!(text.contains("user: \"host.h1\""), "{text}");
        assert!(text.contains("password: \"pw-2\""), "{text}");
        assert!(text.contains("\"nubis.site.a.intake.h1\""), "{text}");
        assert!(text.contains("\"nubis.site.a.host.h2.>\""), "{text}");
        // No host may subscribe to the whole site-internal space or the default inbox.
        assert!(!text.contains("nubis.site.a.>"), "{text}");
        assert!(!text.contains("_INBOX"), "{text}");
        assert_eq!(render_host_users("a", &BTreeMap::new()).unwrap(), "");
    }
}
