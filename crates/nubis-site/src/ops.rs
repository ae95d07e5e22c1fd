//! The operator API: JSON requests on `nubis.ops.<site>.<endpoint>`, served as a NATS micro
//! service (ADR-32) so that `nats micro ls|info|stats` list it with per-endpoint counts.
//!
//! Operators are authenticated by the NATS user of their connection; which users may call a
//! site's ops subjects is decided by the server's permissions (`nats-config/`), not here.

use std::collections::HashMap;
use std::sync::Arc;

use async_nats::service::{self, ServiceExt as _};
use futures::StreamExt as _;
use nubis_protocol::envelope::now_ms;
use nubis_protocol::subject::{OpsEndpoint, Subject};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::config::SiteConfig;
use crate::directory::Directory;

/// Name under which every site's operator API registers (instances differ by id and metadata).
pub const SERVICE_NAME: &str = "nubis-site";

/// Why the operator API could not start.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// Registering the service or an endpoint failed.
    #[error("cannot register operator API endpoint {0}")]
    Register(String, #[source] async_nats::Error),
}

/// What the operator API reads.
#[derive(Debug)]
pub struct OpsContext {
    /// The site's configuration.
    pub config: Arc<SiteConfig>,
    /// The directory view.
    pub directory: Arc<Directory>,
    /// When the daemon started (ms since the epoch).
    pub started_ms: u64,
    /// Version of the nats-server the site is connected to.
    pub nats_server_version: String,
}

#[derive(Debug, Serialize)]
struct StatusReply<'a> {
    site: &'a str,
    version: &'static str,
    started_ms: u64,
    uptime_ms: u64,
    nats_server_version: &'a str,
    partners: usize,
    partners_reachable: usize,
    hosts: &'a [String],
    vms: usize,
}

#[derive(Debug, Serialize)]
struct SiteView {
    site: String,
    partner: bool,
    trusted: bool,
    reachable: bool,
    heartbeat_age_ms: u64,
    proxies: Vec<String>,
}

/// The JSON answer of the `sites` endpoint.
#[derive(Debug, Serialize)]
struct SitesReply {
    sites: Vec<SiteView>,
}

#[derive(Debug, Serialize)]
struct VmsReply {
    vms: Vec<serde_json::Value>,
}

impl OpsContext {
    fn sites(&self, now: u64) -> Vec<SiteView> {
        let liveness = self.config.directory.liveness_timeout_ms;
        let view = self.directory.snapshot();
        let mut out: Vec<SiteView> = view
            .iter()
            .filter(|(site, _)| **site != self.config.site)
            .map(|(site, record)| SiteView {
                site: site.to_string(),
                partner: self.config.partner(site).is_some(),
                trusted: record.trusted,
                reachable: record.reachable(now, liveness),
                heartbeat_age_ms: now.saturating_sub(record.entry.heartbeat_ms),
                proxies: record.entry.proxies.iter().map(|p| p.to_string()).collect(),
            })
            .collect();
        // Partners under contract that never appeared are listed too: an operator wants to see them.
        for p in &self.config.partners {
            if !view.contains_key(&p.site) {
                out.push(SiteView {
                    site: p.site.to_string(),
                    partner: true,
                    trusted: false,
                    reachable: false,
                    heartbeat_age_ms: u64::MAX,
                    proxies: Vec::new(),
                });
            }
        }
        out.sort_by(|a, b| a.site.cmp(&b.site));
        out
    }

    fn answer(&self, endpoint: OpsEndpoint, payload: &[u8]) -> Result<Vec<u8>, service::error::Error> {
        if !payload.iter().all(u8::is_ascii_whitespace) {
            serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(payload).map_err(|e| {
                service::error::Error {
                    status: format!("malformed request: expected a JSON object ({e})"),
                    code: 400,
                }
            })?;
        }
        let now = now_ms();
        let json = match endpoint {
            OpsEndpoint::Status => {
                let sites = self.sites(now);
                serde_json::to_vec(&StatusReply {
                    site: self.config.site.as_str(),
                    version: env!("CARGO_PKG_VERSION"),
                    started_ms: self.started_ms,
                    uptime_ms: now.saturating_sub(self.started_ms),
                    nats_server_version: &self.nats_server_version,
                    partners: self.config.partners.len(),
                    partners_reachable: sites.iter().filter(|s| s.partner && s.reachable).count(),
                    hosts: &self.config.hosts,
                    vms: 0,
                })
            }
            OpsEndpoint::Sites => serde_json::to_vec(&SitesReply { sites: self.sites(now) }),
            OpsEndpoint::Vms => serde_json::to_vec(&VmsReply { vms: Vec::new() }),
            other => {
                return Err(service::error::Error {
                    status: format!("endpoint {} is not available in this version", other.as_str()),
                    code: 501,
                })
            }
        };
        json.map_err(|e| service::error::Error {
            status: format!("internal error: {e}"),
            code: 500,
        })
    }
}

/// The endpoints served now.
const SERVED: [OpsEndpoint; 3] = [OpsEndpoint::Status, OpsEndpoint::Sites, OpsEndpoint::Vms];

/// Starts the operator API on `client`; its handlers run on `tracker` until `cancel`.
pub async fn serve(
    client: async_nats::Client,
    ctx: Arc<OpsContext>,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> Result<service::Service, OpsError> {
    let site = ctx.config.site.clone();
    let service = client
        .service_builder()
        .description(format!("nubis operator API of site {site}"))
        .metadata(HashMap::from([("site".to_string(), site.to_string())]))
        .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| OpsError::Register(SERVICE_NAME.into(), e))?;
    for endpoint in SERVED {
        let subject = Subject::ops(&site, endpoint);
        let mut requests = service
            .endpoint_builder()
            .name(endpoint.as_str())
            .add(subject.as_str())
            .await
            .map_err(|e| OpsError::Register(subject.as_str().to_string(), e))?;
        let ctx = ctx.clone();
        let cancel = cancel.clone();
        tracker.spawn(async move {
            loop {
                let request = tokio::select! {
                    _ = cancel.cancelled() => break,
                    r = requests.next() => match r { Some(r) => r, None => break },
                };
                let span = tracing::info_span!("ops", site.id = %ctx.config.site, endpoint = endpoint.as_str());
                async {
                    let answer = ctx.answer(endpoint, &request.message.payload);
                    if let Err(e) = &answer {
                        tracing::info!(code = e.code, error = %e.status, "operator request refused");
                    }
                    if let Err(e) = request.respond(answer.map(Into::into)).await {
                        tracing::warn!(error = %e, "cannot send operator reply");
                    }
                }
                .instrument(span)
                .await;
            }
        });
    }
    Ok(service)
}
