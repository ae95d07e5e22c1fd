//! Why a federation could not be started or operated.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use super::{Role, HUB};
use crate::binary::LocateError;
use crate::monitor::MonitorError;

/// Why a federation could not be started or operated.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No usable nats-server binary.
    #[error("no usable nats-server")]
    Locate(#[from] LocateError),
    /// A site id that cannot serve as server name, user name and JetStream domain.
    #[error("invalid site id {id:?}: use letters, digits, '-' and '_', and not {HUB:?}")]
    InvalidSiteId {
        /// The id given.
        id: String,
    },
    /// A host id that cannot be a NATS user name part and a subject token.
    #[error("invalid host id {id:?}: use letters, digits, '-' and '_'")]
    InvalidHostId {
        /// The id given.
        id: String,
    },
    /// The same site id given twice.
    #[error("site {id:?} given twice")]
    DuplicateSite {
        /// The id given.
        id: String,
    },
    /// A name that is neither the hub nor a site of this federation.
    #[error("no server named {name:?} in this federation")]
    UnknownServer {
        /// The name given.
        name: String,
    },
    /// The server has no user for this role (the hub has only its operator).
    #[error("server {server:?} has no {role} user")]
    NoSuchUser {
        /// The server.
        server: String,
        /// The role asked for.
        role: Role,
    },
    /// A WAN link in front of a site's leaf connection could not start.
    #[error("cannot start a wan link")]
    WanLink(#[source] std::io::Error),
    /// The server is stopped, so it has no address to offer.
    #[error("server {name:?} is not running")]
    NotRunning {
        /// The server.
        name: String,
    },
    /// A template still had a placeholder after rendering.
    #[error("config template for {server:?} has an unfilled placeholder {placeholder:?}")]
    Template {
        /// The server.
        server: String,
        /// The placeholder left over.
        placeholder: String,
    },
    /// A file operation in the federation's directory failed.
    #[error("cannot {action} {}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The server process could not be started.
    #[error("cannot start nats-server for {server:?}")]
    Spawn {
        /// The server.
        server: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The server process ended while it was expected to run.
    #[error("nats-server for {server:?} exited ({status}); see {}", log.display())]
    Exited {
        /// The server.
        server: String,
        /// How it ended.
        status: ExitStatus,
        /// Its log file.
        log: PathBuf,
    },
    /// A readiness condition did not hold in time.
    #[error("timed out after {timeout:?} waiting for {what}; last attempt: {last}")]
    NotReady {
        /// The condition.
        what: String,
        /// How long it was awaited.
        timeout: Duration,
        /// Why the last attempt failed.
        last: String,
    },
    /// A client could not connect.
    #[error("cannot connect to {server:?}")]
    Connect {
        /// The server.
        server: String,
        /// The cause.
        #[source]
        source: async_nats::ConnectError,
    },
    /// The hub refused to create the directory bucket.
    #[error("cannot create the directory bucket at the hub: {last}")]
    Bucket {
        /// The hub's last answer.
        last: String,
    },
    /// A monitoring endpoint could not be read.
    #[error("cannot read monitoring endpoint of {server:?}")]
    Monitor {
        /// The server.
        server: String,
        /// The cause.
        #[source]
        source: MonitorError,
    },
    /// The federation's certificates could not be made or written.
    #[error("cannot make the federation's TLS certificates")]
    Tls {
        /// The cause.
        #[source]
        source: nubis_bus::tls::TlsError,
    },
}
