//! Readiness of the federation as a whole: every site a leaf of the hub, and every server's
//! clients reaching every JetStream domain they should.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::jetstream;

use super::server::Server;
use super::{Error, Federation, HUB, HUB_DOMAIN};
use crate::wait::{Backoff, DEFAULT_TIMEOUT};

/// The stream of every site's transfer bucket, the only stream of a site's JetStream domain
/// that partners may read (`nats-config/hub-leaf-user.conf`).
const TRANSFER_STREAM: &str = "OBJ_nubis-xfer";
/// A JetStream request in a readiness probe; a lost request must not stall the whole wait.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

impl Federation {
    /// Whether any node of the hub runs.
    fn hub_running(&self) -> bool {
        self.hubs.iter().any(Server::is_running)
    }

    fn check_hub_alive(&mut self) -> Result<(), Error> {
        for node in &mut self.hubs {
            node.check_alive()?;
        }
        Ok(())
    }

    pub(super) async fn wait_leaf_gone(&mut self, name: &str) -> Result<(), Error> {
        let is_node = self.hubs.iter().any(|n| n.name == name);
        if name == HUB || is_node || !self.hub_running() {
            return Ok(());
        }
        let deadline = Instant::now() + DEFAULT_TIMEOUT;
        let mut backoff = Backoff::default();
        loop {
            self.check_hub_alive()?;
            let last = match self.leaf_connections().await {
                Ok(names) if !names.iter().any(|n| n == name) => return Ok(()),
                Ok(names) => format!("hub still lists {names:?}"),
                Err(err) => err.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(Error::NotReady {
                    what: format!("the hub to drop site {name:?}"),
                    timeout: DEFAULT_TIMEOUT,
                    last,
                });
            }
            backoff.pause().await;
        }
    }

    /// Waits until every running site is a leaf of the running hub and every running server's
    /// clients reach the JetStream domain of every running server.
    pub async fn wait_federated(&mut self) -> Result<(), Error> {
        let deadline = Instant::now() + DEFAULT_TIMEOUT;
        let mut backoff = Backoff::default();
        let mut clients = HashMap::new();
        loop {
            self.check_hub_alive()?;
            for site in &mut self.sites {
                site.check_alive()?;
            }
            let last = match self.probe_federated(&mut clients).await {
                Ok(()) => return Ok(()),
                Err(reason) => reason,
            };
            if Instant::now() >= deadline {
                return Err(Error::NotReady {
                    what: "the federation to form".to_owned(),
                    timeout: DEFAULT_TIMEOUT,
                    last,
                });
            }
            backoff.pause().await;
        }
    }

    pub(super) async fn probe_federated(
        &self,
        clients: &mut HashMap<String, async_nats::Client>,
    ) -> Result<(), String> {
        let running: Vec<&Server> = self
            .hubs
            .iter()
            .chain(&self.sites)
            .filter(|s| s.is_running())
            .collect();
        let hub_running = self.hub_running();
        // The hub's domain is probed through one node; a clustered hub's nodes share it.
        let domains: Vec<&Server> = running
            .iter()
            .copied()
            .filter(|s| !s.is_hub() || s.name == self.hub().name)
            .collect();
        if hub_running {
            let leafs = self.leaf_connections().await.map_err(|e| e.to_string())?;
            for site in running.iter().filter(|s| !s.is_hub()) {
                if !leafs.contains(&site.name) {
                    return Err(format!(
                        "site {:?} is not a leaf of the hub yet (hub sees {leafs:?})",
                        site.name
                    ));
                }
            }
        }
        for from in &running {
            if !clients.contains_key(&from.name) {
                let client = from
                    .connect_as(from.default_role())
                    .await
                    .map_err(|e| format!("connect to {:?}: {e}", from.name))?;
                clients.insert(from.name.clone(), client);
            }
            let client = clients
                .get(&from.name)
                .ok_or_else(|| "client vanished".to_owned())?;
            for to in &domains {
                // Without a hub, a site reaches only its own domain.
                if !hub_running && from.name != to.name {
                    continue;
                }
                let domain = if to.is_hub() { HUB_DOMAIN } else { &to.name };
                let mut js = jetstream::with_domain(client.clone(), domain);
                js.set_timeout(PROBE_TIMEOUT);
                let reached = if to.is_hub() || from.name == to.name {
                    js.query_account()
                        .await
                        .map(drop)
                        .map_err(|e| e.to_string())
                } else {
                    // Another site's domain answers partners only about its transfer bucket
                    // (nats-config/README.md); any answer, "no such stream" included, shows
                    // the domain is reachable.
                    js.request::<_, _, serde_json::Value>(
                        format!("STREAM.INFO.{TRANSFER_STREAM}"),
                        &serde_json::json!({}),
                    )
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
                };
                reached.map_err(|e| {
                    format!("JetStream domain {domain:?} from {:?}: {e}", from.name)
                })?;
            }
        }
        Ok(())
    }
}
