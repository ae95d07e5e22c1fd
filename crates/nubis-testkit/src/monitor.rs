//! Reading a nats-server's HTTP monitoring endpoints (`/healthz`, `/varz`, `/leafz`).
//!
//! The endpoints answer small JSON documents on loopback, so a plain HTTP/1.0 request over a
//! TCP stream is all that is needed; it keeps an HTTP client library out of the test kit.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A monitoring request gives up after this long, so a wedged server turns into an error that
/// the caller's polling loop can retry or report, never into a hang.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a monitoring endpoint could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    /// Connecting, writing or reading failed.
    #[error("monitoring request to port {port} failed")]
    Io {
        /// The monitoring port.
        port: u16,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// No complete answer arrived in time.
    #[error("monitoring request to port {port} timed out")]
    Timeout {
        /// The monitoring port.
        port: u16,
    },
    /// The answer was not HTTP.
    #[error("malformed monitoring response from port {port}")]
    Malformed {
        /// The monitoring port.
        port: u16,
    },
    /// The server answered with an error status.
    #[error("{path} answered status {status}: {body}")]
    Status {
        /// The endpoint.
        path: String,
        /// HTTP status code.
        status: u16,
        /// The body, for the reason the server gave.
        body: String,
    },
    /// The body was not the expected JSON.
    #[error("{path} answered malformed JSON")]
    Json {
        /// The endpoint.
        path: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

/// GETs `path` from the monitoring port on loopback and parses the JSON body; a status other
/// than 200 is an error.
pub async fn get_json(port: u16, path: &str) -> Result<serde_json::Value, MonitorError> {
    let (status, body) = tokio::time::timeout(REQUEST_TIMEOUT, get(port, path))
        .await
        .map_err(|_| MonitorError::Timeout { port })??;
    if status != 200 {
        return Err(MonitorError::Status {
            path: path.to_owned(),
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        });
    }
    serde_json::from_slice(&body).map_err(|source| MonitorError::Json {
        path: path.to_owned(),
        source,
    })
}

async fn get(port: u16, path: &str) -> Result<(u16, Vec<u8>), MonitorError> {
    let io = |source| MonitorError::Io { port, source };
    let mut stream = TcpStream::connect((std::net::Ipv4Addr::LOCALHOST, port))
        .await
        .map_err(io)?;
    // HTTP/1.0 with `Connection: close`: the server ends the stream after the body, so reading
    // to the end needs neither chunked decoding nor Content-Length bookkeeping.
    let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.map_err(io)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.map_err(io)?;

    let header_end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or(MonitorError::Malformed { port })?;
    let status_line = response
        .split(|b| *b == b'\n')
        .next()
        .map(String::from_utf8_lossy)
        .ok_or(MonitorError::Malformed { port })?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or(MonitorError::Malformed { port })?;
    Ok((status, response[header_end + 4..].to_vec()))
}

/// Names of the servers connected as leaf nodes to the server behind `port`, from `/leafz`.
pub async fn leaf_names(port: u16) -> Result<Vec<String>, MonitorError> {
    let leafz = get_json(port, "/leafz").await?;
    let mut names: Vec<String> = leafz
        .get("leafs")
        .and_then(|leafs| leafs.as_array())
        .map(|leafs| {
            leafs
                .iter()
                .filter_map(|leaf| leaf.get("name")?.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    Ok(names)
}

/// The JetStream meta group of a clustered hub, as its leader's `/jsz` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaGroup {
    /// The leader's server name.
    pub leader: String,
    /// The other members the leader counts, each with whether it is current.
    pub peers: Vec<(String, bool)>,
}

impl MetaGroup {
    /// Whether the leader counts every one of `nodes` (itself included) as a current member.
    pub fn counts_all_current(&self, nodes: &[String]) -> bool {
        nodes
            .iter()
            .all(|n| *n == self.leader || self.peers.iter().any(|(p, current)| p == n && *current))
    }

    /// The nodes of `nodes` that are not members at all: left out when the group formed.
    pub fn left_out(&self, nodes: &[String]) -> Vec<String> {
        nodes
            .iter()
            .filter(|n| **n != self.leader && !self.peers.iter().any(|(p, _)| p == *n))
            .cloned()
            .collect()
    }
}

/// The meta group of the hub whose nodes' names and monitoring ports are `nodes`: asks the
/// first node that answers who leads, then asks the leader. An error says what is missing.
pub async fn meta_group(nodes: &[(String, u16)]) -> Result<MetaGroup, String> {
    let mut last = "no node given".to_owned();
    let mut leader = None;
    for (name, port) in nodes {
        match get_json(*port, "/jsz").await {
            Ok(jsz) => {
                leader = jsz
                    .pointer("/meta_cluster/leader")
                    .and_then(serde_json::Value::as_str)
                    .filter(|l| !l.is_empty())
                    .map(str::to_owned);
                if leader.is_some() {
                    break;
                }
                last = format!("{name} knows no meta leader yet");
            }
            Err(e) => last = format!("{name}: {e}"),
        }
    }
    let leader = leader.ok_or(last)?;
    let port = nodes
        .iter()
        .find(|(name, _)| *name == leader)
        .map(|(_, port)| *port)
        .ok_or_else(|| format!("meta leader {leader} is not one of the nodes"))?;
    let jsz = get_json(port, "/jsz").await.map_err(|e| e.to_string())?;
    let peers = jsz
        .pointer("/meta_cluster/replicas")
        .and_then(serde_json::Value::as_array)
        .map(|peers| {
            peers
                .iter()
                .filter_map(|p| {
                    let name = p.get("name")?.as_str()?.to_owned();
                    let current = p.get("current").and_then(serde_json::Value::as_bool);
                    Some((name, current == Some(true)))
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(MetaGroup { leader, peers })
}
