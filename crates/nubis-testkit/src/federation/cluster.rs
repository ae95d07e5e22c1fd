//! The routes of a clustered hub: each node's `cluster` block (`nats-config/hub-cluster.conf`),
//! with route ports chosen before the first start, since every node lists every other's.

use std::net::TcpListener;

use super::server::{render_template, Server};
use super::{Error, HOST, HUB_CLUSTER_TEMPLATE};

/// Fills every node's `CLUSTER` placeholder: empty for a hub of one node, else the cluster
/// block with routes to all nodes (each skips its own), logging in with `route_password`, over
/// TLS with the node's own certificate (already among its values).
pub(super) fn configure(nodes: &mut [Server], route_password: &str) -> Result<(), Error> {
    if nodes.len() < 2 {
        for node in nodes {
            node.values.insert("CLUSTER", String::new());
        }
        return Ok(());
    }
    for node in nodes.iter_mut() {
        node.cluster_port = Some(free_port(&node.name)?);
    }
    let routes = nodes
        .iter()
        .map(|node| {
            format!(
                "\"nats-route://route:{route_password}@{HOST}:{}\"",
                node.cluster_port.unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    for node in nodes.iter_mut() {
        let mut values = vec![
            ("HOST", HOST.to_owned()),
            (
                "CLUSTER_PORT",
                node.cluster_port.unwrap_or_default().to_string(),
            ),
            ("ROUTE_PASSWORD", route_password.to_owned()),
            ("ROUTES", routes.clone()),
        ];
        for key in ["TLS_CA", "TLS_CERT", "TLS_KEY"] {
            values.push((key, node.values.get(key).cloned().unwrap_or_default()));
        }
        let block = render_template(&node.name, HUB_CLUSTER_TEMPLATE, values)?;
        node.values.insert("CLUSTER", block);
    }
    Ok(())
}

/// A loopback port free right now. Another process could take it before the node binds it;
/// the node then fails to start and says so in its log, which the start reports.
fn free_port(node: &str) -> Result<u16, Error> {
    let io = |source| Error::Spawn {
        server: node.to_owned(),
        source,
    };
    let listener = TcpListener::bind((HOST, 0)).map_err(io)?;
    Ok(listener.local_addr().map_err(io)?.port())
}
