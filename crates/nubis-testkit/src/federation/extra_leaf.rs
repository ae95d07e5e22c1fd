//! A second server for one of the federation's sites, started with TLS material of the test's
//! choosing: how tests show which certificates the hub's leaf port accepts.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use super::server::Server;
use super::{Error, Federation, TlsFiles, LEAF_TEMPLATE};
use crate::wait::DEFAULT_TIMEOUT;

/// A site server started by [`Federation::spawn_leaf`]; killed on drop.
#[derive(Debug)]
pub struct ExtraLeaf {
    server: Server,
}

impl ExtraLeaf {
    /// Its log file.
    pub fn log_path(&self) -> PathBuf {
        self.server.log_path()
    }

    /// What it has logged so far (empty if the log cannot be read).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.server.log_path()).unwrap_or_default()
    }
}

impl Drop for ExtraLeaf {
    fn drop(&mut self) {
        self.server.kill();
    }
}

impl Federation {
    /// Starts another server for site `site`, configured exactly as the site's own (the same
    /// users, the same leaf login at the hub) except for its leaf connection's TLS files, its
    /// ports and its store, and waits until it serves its own clients. It does not wait for the
    /// hub to accept its leaf connection: that is what the caller checks, in
    /// [`Federation::leaf_connections`] or in [`ExtraLeaf::log`]. Stop the site's own server
    /// first if both must not be connected at once.
    pub async fn spawn_leaf(&self, site: &str, tls: &TlsFiles) -> Result<ExtraLeaf, Error> {
        let original = self.server(site)?;
        if original.is_hub() {
            return Err(Error::UnknownServer {
                name: site.to_owned(),
            });
        }
        let seq = super::FEDERATION_SEQ.fetch_add(1, Ordering::Relaxed);
        let dir = self.root.path().join(format!("extra-{site}-{seq}"));
        let mut server = Server::new(site, dir, LEAF_TEMPLATE, false);
        server.values = original.values.clone();
        server.values.extend(tls.values());
        let store = server.dir.join("store");
        let ports = server.ports_dir();
        server
            .values
            .insert("STORE", store.to_string_lossy().into_owned());
        server
            .values
            .insert("PORTS_DIR", ports.to_string_lossy().into_owned());
        let mut leaf = ExtraLeaf { server };
        leaf.server.spawn(&self.binary)?;
        leaf.server.wait_started(DEFAULT_TIMEOUT).await?;
        Ok(leaf)
    }

    /// The leaf-node port of the hub (its first running node), which the sites dial.
    pub fn hub_leaf_port(&self) -> Result<u16, Error> {
        self.hub().leaf_port.ok_or_else(|| Error::NotRunning {
            name: super::HUB.to_owned(),
        })
    }
}

impl Federation {
    /// The user and password site `site`'s server logs in with on the hub's leaf port.
    pub fn leaf_login(&self, site: &str) -> Result<(String, String), Error> {
        let server = self.server(site)?;
        let password = server
            .values
            .get("LEAF_PASSWORD")
            .ok_or_else(|| Error::UnknownServer {
                name: site.to_owned(),
            })?;
        Ok((site.to_owned(), password.clone()))
    }
}
