//! The hub operator's part of starting a federation: the shared directory bucket, created once
//! at the hub with its final configuration (`nats-config/directory-bucket.json`, replicated on
//! three nodes of a clustered hub), before any site joins. Sites may neither create nor reconfigure it (`nats-config/hub-leaf-user.conf`).

use std::time::{Duration, Instant};

use super::{Error, Federation, DIRECTORY_REPLICAS};
use crate::monitor;
use crate::wait::{Backoff, DEFAULT_TIMEOUT};

/// The directory's stream configuration, as the hub operator creates it.
pub const DIRECTORY_BUCKET_CONFIG: &str = nubis_bus::server_config::DIRECTORY_BUCKET;

/// How long a clustered hub's nodes may take to form their meta group before one left out is
/// restarted.
const MEMBERSHIP_GRACE: Duration = Duration::from_secs(8);

/// One creation request; a lost one is sent again until [`DEFAULT_TIMEOUT`].
const CREATE_TIMEOUT: Duration = Duration::from_secs(2);

impl Federation {
    /// Creates the directory bucket at the hub as its operator. Creating it again with the same
    /// configuration succeeds, so a hub restarted on its store is no different.
    pub(super) async fn create_directory_bucket(&mut self) -> Result<(), Error> {
        self.wait_meta_cluster().await?;
        let mut config: serde_json::Value =
            serde_json::from_str(DIRECTORY_BUCKET_CONFIG).map_err(|e| Error::Bucket {
                last: format!("nats-config/directory-bucket.json: {e}"),
            })?;
        // Three replicas on a hub of three nodes or more, as deployed; one per node below that.
        config["num_replicas"] = serde_json::json!(self.hubs.len().min(DIRECTORY_REPLICAS));
        let hub = self.hub();
        let client = hub.connect_as(hub.default_role()).await?;
        let deadline = Instant::now() + DEFAULT_TIMEOUT;
        let mut backoff = Backoff::default();
        loop {
            let Err(last) =
                nubis_bus::server_config::create_stream(&client, &config, CREATE_TIMEOUT).await
            else {
                return Ok(());
            };
            if Instant::now() >= deadline {
                let last = format!("{last}; {}", self.meta_cluster_state().await);
                return Err(Error::Bucket { last });
            }
            backoff.pause().await;
        }
    }
}

impl Federation {
    /// Waits until a clustered hub's JetStream meta group has a leader that counts every node
    /// as a current peer: before that, a stream with a replica on every node may find "no
    /// suitable peers for placement". Nodes that start at the same moment on an empty store
    /// sometimes form the group without one of them (nats-server 2.10 sizes a new group by the
    /// peers it sees when it bootstraps); a node left out is restarted once, and joins.
    async fn wait_meta_cluster(&mut self) -> Result<(), Error> {
        if self.hubs.len() < 2 {
            return Ok(());
        }
        let started = Instant::now();
        let mut healed = false;
        let deadline = started + DEFAULT_TIMEOUT;
        let mut backoff = Backoff::default();
        loop {
            let last = match self.meta_cluster_ready().await {
                Ok(()) => return Ok(()),
                Err(reason) => reason,
            };
            if !healed && started.elapsed() >= MEMBERSHIP_GRACE {
                healed = true;
                for name in self.meta_cluster_missing().await {
                    tracing::warn!(node = %name, "hub node left out of the JetStream meta group; restarting it");
                    let binary = self.binary.clone();
                    let node = self.server_mut(&name)?;
                    node.stop(&binary).await?;
                    node.spawn(&binary)?;
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::NotReady {
                    what: "the hub's JetStream meta group to count every node".to_owned(),
                    timeout: DEFAULT_TIMEOUT,
                    last,
                });
            }
            backoff.pause().await;
        }
    }

    /// The hub's nodes that run, by name and monitoring port.
    fn running_nodes(&self) -> Vec<(String, u16)> {
        self.hubs
            .iter()
            .filter_map(|n| n.http_port.map(|port| (n.name.clone(), port)))
            .collect()
    }

    /// The nodes the meta leader does not count as members (none when there is no leader).
    async fn meta_cluster_missing(&self) -> Vec<String> {
        let names: Vec<String> = self.hubs.iter().map(|n| n.name.clone()).collect();
        monitor::meta_group(&self.running_nodes())
            .await
            .map(|group| group.left_out(&names))
            .unwrap_or_default()
    }

    /// `Ok` once the meta leader counts every node as a current member.
    async fn meta_cluster_ready(&self) -> Result<(), String> {
        let names: Vec<String> = self.hubs.iter().map(|n| n.name.clone()).collect();
        let group = monitor::meta_group(&self.running_nodes()).await?;
        if group.counts_all_current(&names) {
            Ok(())
        } else {
            Err(format!("the meta group is not complete yet: {group:?}"))
        }
    }

    /// The meta group as each node sees it, for an error message.
    async fn meta_cluster_state(&self) -> String {
        let mut state = Vec::new();
        for node in &self.hubs {
            if let Some(port) = node.http_port {
                let meta = monitor::get_json(port, "/jsz")
                    .await
                    .map(|v| v.get("meta_cluster").cloned().unwrap_or_default());
                state.push(format!("{}: {meta:?}", node.name));
            }
        }
        state.join("; ")
    }
}
