//! The NATS bus layer of nubis: the one place that turns protocol messages into NATS requests
//! and back.
//!
//! `nubis-protocol` defines what is said (subjects, signed envelopes, message bodies) and stays
//! free of any NATS client so its decoders can be fuzzed; this crate says it on a NATS
//! connection. Site daemons, Transfer proxies, host agents and the CLI connect, call and serve
//! through it; none of them builds a NATS request by hand.
//!
//! - [`config`]: the daemons' shared configuration error and [`config::Credentials`];
//! - [`connect`](mod@connect): connections from credentials;
//! - [`call`]: the signed client, which accepts only replies signed by the site asked;
//! - [`serve`](mod@serve): the serve loop (verify first, fair bounded handlers, signed answers);
//! - [`tls`]: the federation's certificates (its CA, the hub's, each site's leaf certificate);
//! - [`server_config`]: the nats-server configurations of `nats-config/`, and their rendering;
//! - [`federation`], [`proxy`], [`host`], [`ops`]: the typed clients of other sites, of Transfer
//!   proxies, of host agents (site-internal) and of the operator API.

pub mod call;
pub mod config;
pub mod connect;
pub mod federation;
pub mod host;
pub mod ops;
pub mod proxy;
mod replies;
pub mod serve;
pub mod server_config;
pub mod tls;

pub use call::{CallError, CallPolicy, SignedClient, Target};
pub use config::{ConfigError, Credentials, Login, Secret};
pub use connect::{connect, ConnectError, ConnectSpec, Inbox};
