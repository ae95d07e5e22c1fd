//! The site daemon's life cycle: connect, check the server, join the directory, serve the
//! federation roles, monitoring and the operator API, and on shutdown stop serving, drain the
//! connections and flush local state.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use nubis_protocol::envelope::{now_ms, Verifier, DEFAULT_FRESHNESS_MS};
use nubis_protocol::message::SiteEntry;
use nubis_protocol::replay::{Durability, ReplayCache};
use nubis_protocol::subject::{FederationOp, Subject};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::accounting::Accounting;
use crate::config::SiteConfig;
use crate::controller::Trigger;
use crate::directory::{self, Directory};
use crate::federation::{self, FederationClient};
use crate::infrastructure::NatsLocalSite;
use crate::journal::Journal;
use crate::monitoring::{MigrateFn, Monitoring, MonitoringDeps, Outbox};
use crate::ops::{self, OpsContext};
use crate::roles::Roles;
use nubis_bus::proxy::ProxyClient;
use nubis_bus::{CallPolicy, ConnectSpec, Inbox, SignedClient};

/// Oldest nats-server release whose JetStream API the daemon can use.
pub const MIN_NATS_SERVER: (u64, u64) = (2, 10);

/// How long in-flight work may take to finish after a shutdown signal.
const GRACE: Duration = Duration::from_secs(10);

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    /// The site's nats-server could not be reached.
    #[error(transparent)]
    Connect(#[from] nubis_bus::ConnectError),
    /// The site's nats-server is too old.
    #[error("nats-server {found} is too old; nubis needs {}.{} or newer", MIN_NATS_SERVER.0, MIN_NATS_SERVER.1)]
    NatsServerTooOld {
        /// The version the server reported.
        found: String,
    },
    /// The directory could not be joined.
    #[error("directory")]
    Directory(#[from] directory::DirectoryError),
    /// The operator API could not start.
    #[error("operator API")]
    Ops(#[from] ops::OpsError),
    /// The journal could not be opened.
    #[error("journal")]
    Journal(#[source] crate::journal::JournalError),
    /// The federation subjects could not be subscribed.
    #[error("cannot subscribe to the federation subjects")]
    Subscribe(#[source] async_nats::Error),
    /// The monitoring service could not start.
    #[error("monitoring")]
    Monitoring(#[from] crate::monitoring::MonitoringError),
    /// Local state could not be opened.
    #[error("local state in {path}")]
    State {
        /// The directory.
        path: String,
        /// The cause.
        #[source]
        source: nubis_protocol::replay::ReplayError,
    },
}

/// Whether a server version string (e.g. `2.10.27`) is at least [`MIN_NATS_SERVER`].
pub fn server_version_ok(version: &str) -> bool {
    let mut parts = version.trim_start_matches('v').split('.').map(|p| {
        p.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse::<u64>()
            .unwrap_or(0)
    });
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    (major, minor) >= MIN_NATS_SERVER
}

/// Runs the site daemon until `shutdown` is cancelled.
pub async fn run(config: SiteConfig, shutdown: CancellationToken) -> Result<(), SiteError> {
    let config = Arc::new(config);
    let site = config.site.clone();
    let started_ms = now_ms();

    let spec =
        ConnectSpec::daemon(format!("nubis-site-{site}")).inbox(Inbox::Federation(site.clone()));
    let client = nubis_bus::connect(&config.nats, &spec).await?;
    let server_version = client.server_info().version;
    if !server_version_ok(&server_version) {
        return Err(SiteError::NatsServerTooOld {
            found: server_version,
        });
    }
    tracing::info!(site.id = %site, nats_server = %server_version, "connected");

    std::fs::create_dir_all(&config.data_dir).map_err(|e| SiteError::State {
        path: config.data_dir.display().to_string(),
        source: nubis_protocol::replay::ReplayError::Store(e.into()),
    })?;
    // The request verifier and its persistent replay cache are used by the migration handlers.
    let replay = ReplayCache::open(
        &config.data_dir.join("replay"),
        config.retention.replay_retain_ms(),
        Durability::Sync,
    )
    .map_err(|source| SiteError::State {
        path: config.data_dir.display().to_string(),
        source,
    })?
    .with_max_per_sender(config.retention.replay_per_partner);
    let identity = config.identity.clone();
    let mut pinned: Vec<_> = config
        .partners
        .iter()
        .map(|p| (p.site.clone(), p.signing_key))
        .collect();
    // The site's own key is pinned too: its Transfer proxy answers signed with it.
    pinned.push((site.clone(), identity.public().signing));
    let request_verifier = Arc::new(
        Verifier::new(site.clone(), pinned.clone(), replay)
            .with_freshness_ms(config.retention.freshness_ms),
    );
    let record_verifier = Verifier::new(
        site.clone(),
        pinned,
        ReplayCache::temporary(0).map_err(|source| SiteError::State {
            path: "memory".into(),
            source,
        })?,
    );

    let hub = jetstream::with_domain(client.clone(), &config.hub_domain);
    let kv = directory::open_bucket(&hub).await?;
    let directory = Arc::new(Directory::new(kv, identity.clone(), record_verifier));

    let tracker = TaskTracker::new();
    let cancel = shutdown.child_token();

    // Heartbeat: the site's signed self-description, refreshed so partners see it alive.
    let entry_template = SiteEntry {
        site: site.clone(),
        signing_key: identity.public().signing.to_bytes(),
        sealing_key: identity.public().sealing,
        proxies: vec![config.proxy.clone()],
        subjects: FederationOp::ALL
            .into_iter()
            .map(|op| Subject::federation(&site, op).as_str().to_string())
            .collect(),
        heartbeat_ms: 0,
        started_ms,
    };
    {
        let directory = directory.clone();
        let cancel = cancel.clone();
        let every = Duration::from_millis(config.directory.heartbeat_ms);
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let entry = SiteEntry {
                    heartbeat_ms: now_ms(),
                    ..entry_template.clone()
                };
                if let Err(e) = directory.publish_self(&entry).await {
                    tracing::warn!(error = %e, "directory heartbeat failed; will retry");
                }
            }
        });
    }
    // Watcher: keeps the view current, re-subscribing after a hub outage.
    {
        let directory = directory.clone();
        let cancel = cancel.clone();
        tracker.spawn(async move {
            while !cancel.is_cancelled() {
                if let Err(e) = directory.watch(cancel.clone()).await {
                    tracing::warn!(error = %e, "directory watch interrupted; restarting");
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        });
    }

    let journal = Journal::open(&config.data_dir.join("journal"))
        .map_err(SiteError::Journal)?
        .with_limits(config.retention.journal_limits());
    crate::retention::spawn_collector(
        &config.retention,
        journal.clone(),
        request_verifier.clone(),
        &tracker,
        cancel.clone(),
    );
    let signed = SignedClient::new(
        client.clone(),
        identity.clone(),
        request_verifier.clone(),
        // A call that finds no responder fails at once: a site forwarding as Intermediary
        // passes `unreachable` upstream before its upstream times out, and a Migration request
        // to a partner that is down costs a fan-out nothing. The Controller does the waiting,
        // between transfer rounds.
        CallPolicy::with_timeout(Duration::from_secs(10)).with_no_responder_wait(Duration::ZERO),
    );
    let signed_calls = signed.clone();
    let fed = FederationClient::new(signed.clone());
    let proxy = ProxyClient::from_signed(signed);
    // Site-internal requests (to host agents) get replies on a site-internal inbox, which the
    // leaf connection never carries: their bodies name host paths. `_INBOX.>` replies do cross
    // the hub (federation replies need them), so they must not carry anything site-internal.
    let spec = ConnectSpec::daemon(format!("nubis-site-{site}-internal"))
        .inbox(Inbox::SiteInternal(site.clone()));
    let internal = nubis_bus::connect(&config.nats, &spec).await?;
    let local = NatsLocalSite::new(
        site.clone(),
        internal.clone(),
        config.hosts.clone(),
        config.vm_roots.clone(),
        proxy,
        config.proxy.clone(),
        config.image_store.clone(),
    );
    let roles =
        Arc::new(Roles::new(config.clone(), journal, fed, local).with_key_book(directory.clone()));
    {
        let roles = roles.clone();
        federation::serve(
            client.clone(),
            identity.clone(),
            request_verifier.clone(),
            64,
            &tracker,
            cancel.clone(),
            move |op, opened| roles.clone().handle(op, opened),
        )
        .await
        .map_err(SiteError::Subscribe)?;
    }
    match roles.recover() {
        Ok(0) => {}
        Ok(n) => tracing::info!(migrations = n, "resuming migrations from the journal"),
        Err(e) => tracing::warn!(error = %e.message, "cannot read the migration journal"),
    }
    // Offers never taken up are released at their expiry, those that expired meanwhile first.
    crate::expiry::start(
        roles.clone(),
        Duration::from_millis(config.limits.sweep_interval_ms),
        &tracker,
        cancel.clone(),
    );
    // Eviction notices: deliver ours upstream, act on those from downstream; both journaled.
    {
        let roles = roles.clone();
        let cancel = cancel.clone();
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tick.tick() => {}
                }
                roles.deliver_evictions().await;
                roles.act_on_evictions();
            }
        });
    }

    // Monitoring: the accounting stream in this site's own domain (never the hub's), then
    // intake from the hosts, relay and bus delivery, and the SLA rules.
    let accounting = Accounting::start(
        internal.clone(),
        site.clone(),
        Duration::from_secs(config.monitoring.accounting_max_age_s),
        &tracker,
        cancel.clone(),
    )
    .await;
    let monitoring_replay = ReplayCache::open(
        &config.data_dir.join("monitoring-replay"),
        2 * DEFAULT_FRESHNESS_MS,
        Durability::Background,
    )
    .map_err(|source| SiteError::State {
        path: config.data_dir.display().to_string(),
        source,
    })?;
    let partner_keys = config
        .partners
        .iter()
        .map(|p| (p.site.clone(), p.signing_key));
    let migrate: MigrateFn = {
        let roles = roles.clone();
        Arc::new(move |vm| {
            roles
                .start_migration(vm, Trigger::Operator { to_site: None })
                .map(|id| id.to_string())
        })
    };
    let monitoring = Monitoring::new(
        MonitoringDeps {
            config: config.clone(),
            journal: roles.journal().clone(),
            directory: directory.clone(),
            accounting,
            public: client.clone(),
            calls: signed_calls.clone(),
            outbox: Outbox::new(internal.clone(), site.clone()),
            internal: internal.clone(),
            verifier: Verifier::new(site.clone(), partner_keys, monitoring_replay),
            migrate,
        },
        tracker.clone(),
    );
    monitoring.serve(cancel.clone()).await?;

    let ctx = Arc::new(OpsContext {
        monitoring: monitoring.clone(),
        local_js: jetstream::new(internal.clone()),
        roles: roles.clone(),
        config: config.clone(),
        directory: directory.clone(),
        started_ms,
        nats_server_version: server_version,
        request_verifier: request_verifier.clone(),
    });
    let services = ops::serve(client.clone(), ctx, &tracker, cancel.clone()).await?;
    tracing::info!(site.id = %site, "site daemon running");

    shutdown.cancelled().await;
    tracing::info!(site.id = %site, "shutting down");
    cancel.cancel();
    tracker.close();
    if tokio::time::timeout(GRACE, tracker.wait()).await.is_err() {
        tracing::warn!("tasks did not finish within the grace period");
    }
    for service in services {
        if let Err(e) = service.stop().await {
            tracing::warn!(error = %e, "cannot stop the operator API cleanly");
        }
    }
    if let Err(e) = roles.journal().flush() {
        tracing::warn!(error = %e, "cannot flush the journal");
    }
    if let Err(e) = request_verifier.replay_cache().flush() {
        tracing::warn!(error = %e, "cannot flush the replay cache");
    }
    if let Err(e) = internal.drain().await {
        tracing::warn!(error = %e, "cannot drain the site-internal NATS connection");
    }
    if let Err(e) = client.drain().await {
        tracing::warn!(error = %e, "cannot drain the NATS connection");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_versions_are_compared_numerically() {
        assert!(server_version_ok("2.10.27"));
        assert!(server_version_ok("2.11.0"));
        assert!(server_version_ok("3.0.0-beta"));
        assert!(!server_version_ok("2.9.10"));
        assert!(!server_version_ok("2.2.0"));
        assert!(!server_version_ok("garbage"));
    }
}
