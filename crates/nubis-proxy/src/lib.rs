//! The Transfer proxy of nubis (Elmroth & Larsson, section III: Transfer proxies, Transfer
//! tokens, Initiate transfer, Transfer verification).
//!
//! A [`TransferProxy`] maps random [`TransferToken`](nubis_protocol::message::TransferToken)s to
//! a VM's files on a host, kept only in its own store; other sites see its
//! [`ProxyUri`](nubis_protocol::message::ProxyUri) and the token, nothing else. A serving proxy
//! publishes the files into its site's `nubis-xfer` object-store bucket (ADR-20 format, written
//! with a window of outstanding acknowledgements, allocated extents only); a fetching proxy
//! follows those objects across the leaf connections from the source site's JetStream domain,
//! writes each file under a temporary name, verifies its SHA-256 end to end, fsyncs and renames
//! it, and acknowledges the digests to the source, whose status only then turns succeeded.
//!
//! Code map: [`proxy`] (the proxy's lifecycle; its token operations in `tokens.rs`, the task of
//! a transfer in `transfer.rs`, serving, receiving and relaying in `serve.rs`, `receive.rs` and
//! `relay.rs`, their shared chunk loop in `chunks.rs`, the bus service in `service.rs`),
//! [`objects`] (the bucket format), [`io`] (blocking file reading and writing), [`extents`]
//! (SEEK_DATA/SEEK_HOLE), [`hashing`] (whole-file digests of sparse files), [`pace`]
//! (bandwidth caps), [`naming`] (object names from tokens), [`store`] (the token table),
//! [`client`] (signed requests to a proxy), [`config`], [`confine`] (the directories a proxy
//! may read and write, and the names a manifest may not use).

mod chunks;
pub mod client;
pub mod config;
pub mod confine;
pub mod error;
pub mod extents;
pub mod hashing;
pub mod io;
pub mod memory;
pub mod naming;
pub mod objects;
pub mod pace;
pub mod proxy;
mod receive;
mod relay;
pub mod seal;
mod serve;
mod service;
pub mod store;
mod tokens;
mod transfer;

use nubis_bus::{ConnectSpec, Inbox};
use std::sync::Arc;

use nubis_protocol::identity::{parse_signing_key, SiteIdentity};
use nubis_protocol::message::ProxyUri;
use tokio_util::sync::CancellationToken;

pub use client::ProxyClient;
pub use config::{Config, ConfigError, InvalidSetting, TransferSettings};
/// The key type of [`ProxyParams::partners`].
pub use ed25519_dalek::VerifyingKey;
pub use error::ProxyError;
pub use nubis_bus::CallError;
pub use proxy::{ProxyParams, StartError, TransferProxy, TransferStats};

/// Why `nubis proxy` stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The identity file could not be loaded.
    #[error("cannot load the site identity")]
    Identity(#[source] nubis_protocol::identity::KeyError),
    /// A partner key in the configuration is invalid.
    #[error("invalid partner key for {site}")]
    PartnerKey {
        /// The partner.
        site: String,
        /// The cause.
        #[source]
        source: nubis_protocol::identity::KeyError,
    },
    /// The identity belongs to another site than the configuration names.
    #[error("identity file is for site {found}, configuration says {expected}")]
    WrongSite {
        /// Site of the configuration.
        expected: String,
        /// Site of the identity file.
        found: String,
    },
    /// The site's nats-server could not be reached.
    #[error(transparent)]
    Connect(#[from] nubis_bus::ConnectError),
    /// The proxy could not start.
    #[error("proxy failed to start")]
    Start(#[from] StartError),
}

/// Runs a Transfer proxy until `shutdown` is cancelled, then stops its transfers where they
/// stand (they resume on the next start) and drains the connection.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    let identity = SiteIdentity::load(&config.identity_file).map_err(RunError::Identity)?;
    if identity.site() != &config.site {
        return Err(RunError::WrongSite {
            expected: config.site.to_string(),
            found: identity.site().to_string(),
        });
    }
    let mut partners = Vec::new();
    for p in &config.partners {
        let key = parse_signing_key(&p.signing_key, p.site.as_str()).map_err(|source| {
            RunError::PartnerKey {
                site: p.site.to_string(),
                source,
            }
        })?;
        partners.push((p.site.clone(), key));
    }
    let spec = ConnectSpec::daemon(format!("nubis-proxy-{}-{}", config.site, config.proxy))
        .inbox(Inbox::Federation(config.site.clone()));
    let client = nubis_bus::connect(&config.nats, &spec).await?;
    let params = ProxyParams {
        uri: ProxyUri::new(config.site.clone(), config.proxy.clone()),
        identity: Arc::new(identity),
        partners,
        store_dir: config.store_dir.clone(),
        settings: config.transfer.clone(),
    };
    let proxy = TransferProxy::start(params, client.clone()).await?;
    shutdown.cancelled().await;
    proxy.shutdown().await;
    let _ = client.drain().await;
    Ok(())
}
