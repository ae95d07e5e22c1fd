//! A local federation for people rather than tests: a hub and three sites on loopback, checked
//! end to end and left running until shut down. `nubis-localfed` is its command-line front.

use std::future::Future;
use std::time::{SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, kv};
use bytes::Bytes;

use crate::binary::NatsServerBinary;
use crate::federation::{self, Federation, HUB, HUB_DOMAIN};

/// The sites of the local federation.
pub const SITES: [&str; 3] = ["a", "b", "c"];

/// KV bucket in the hub's domain used to show that the sites share state through the hub.
pub const CHECK_BUCKET: &str = "nubis-localfed";

/// Why the local federation failed its checks.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// Starting or operating the servers failed.
    #[error("federation failed")]
    Federation(#[from] federation::Error),
    /// The hub does not see every site as a leaf node.
    #[error("hub sees leaf connections {seen:?}, expected {expected:?}")]
    LeafsMissing {
        /// What the hub reported.
        seen: Vec<String>,
        /// The sites started.
        expected: Vec<String>,
    },
    /// A JetStream key-value operation failed.
    #[error("key-value {operation} in domain {HUB_DOMAIN:?} failed")]
    KeyValue {
        /// What was attempted.
        operation: &'static str,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A site read something other than what the hub wrote.
    #[error("site {site} read {read:?} where the hub wrote {wrote:?}")]
    Mismatch {
        /// The site that read.
        site: String,
        /// Written at the hub.
        wrote: String,
        /// Read by the site.
        read: Option<String>,
    },
}

fn kv_error(
    operation: &'static str,
) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> CheckError {
    move |source| CheckError::KeyValue { operation, source }
}

/// Starts the federation, prints its servers and checks it; then, unless `ci` is set, keeps it
/// running until `shutdown` completes. Stops every server before returning.
pub async fn run(
    binary: &NatsServerBinary,
    ci: bool,
    shutdown: impl Future<Output = ()>,
) -> Result<(), CheckError> {
    println!(
        "nats-server {} at {}",
        binary.version(),
        binary.path().display()
    );
    let federation = Federation::start_with(binary, &SITES).await?;
    let outcome = check(&federation).await;
    if outcome.is_err() {
        // Keep the evidence: the directory with the logs is removed when the federation stops.
        if let Ok(dir) = federation.keep_logs() {
            eprintln!("server logs kept in {}", dir.display());
        }
    }
    if outcome.is_ok() && !ci {
        println!("\nThe federation is running. Press Ctrl-C to stop it.");
        shutdown.await;
        println!("stopping");
    }
    federation.shutdown().await?;
    outcome
}

async fn check(federation: &Federation) -> Result<(), CheckError> {
    println!(
        "\n{:<6} {:<26} {:<8} monitoring",
        "server", "client URL", "domain"
    );
    for name in std::iter::once(HUB).chain(SITES) {
        let domain = if name == HUB { HUB_DOMAIN } else { name };
        println!(
            "{:<6} {:<26} {:<8} http://127.0.0.1:{}",
            name,
            federation.site_url(name)?,
            domain,
            federation.monitoring_port(name)?
        );
    }

    let seen = federation.leaf_connections().await?;
    let expected: Vec<String> = SITES.iter().map(|s| (*s).to_owned()).collect();
    if seen != expected {
        return Err(CheckError::LeafsMissing { seen, expected });
    }
    println!("\nhub: leaf connections from sites {}", seen.join(", "));

    // Only the hub's operator may create buckets in the hub's domain (sites may write only
    // their own directory entries); every site may read them through the hub.
    let hub = federation.connect(HUB).await?;
    let kv_hub = jetstream::new(hub)
        .create_key_value(kv::Config {
            bucket: CHECK_BUCKET.to_owned(),
            history: 1,
            ..Default::default()
        })
        .await
        .map_err(|e| kv_error("create bucket")(e.into()))?;
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    let wrote = format!("hello from the hub at {stamp}");
    kv_hub
        .put("greeting", Bytes::from(wrote.clone()))
        .await
        .map_err(|e| kv_error("put")(e.into()))?;
    println!("hub: put {CHECK_BUCKET}.greeting = {wrote:?} in domain {HUB_DOMAIN:?}");

    for site in SITES {
        let kv_site = jetstream::with_domain(federation.connect(site).await?, HUB_DOMAIN)
            .get_key_value(CHECK_BUCKET)
            .await
            .map_err(|e| kv_error("open bucket")(e.into()))?;
        let read = kv_site
            .get("greeting")
            .await
            .map_err(|e| kv_error("get")(e.into()))?
            .map(|v| String::from_utf8_lossy(&v).into_owned());
        if read.as_deref() != Some(wrote.as_str()) {
            return Err(CheckError::Mismatch {
                site: site.to_owned(),
                wrote,
                read,
            });
        }
        println!("site {site}: got {CHECK_BUCKET}.greeting through the hub");
    }
    println!(
        "\nfederation OK: hub + sites {} connected",
        SITES.join(", ")
    );
    Ok(())
}
