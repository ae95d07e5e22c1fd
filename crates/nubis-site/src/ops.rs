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
use crate::local::LocalSite;
use crate::monitoring::Monitoring;
use crate::roles::Roles;
use crate::vm_ops::{ControlOp, DeployRequest, MigrateRequest, VmRef};

/// Name under which every site's operator API registers (instances differ by id and metadata).
pub const SERVICE_NAME: &str = "nubis-site";

/// Why the operator API could not start.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// Registering the service or an endpoint failed.
    #[error("cannot register operator API endpoint {0}")]
    Register(String, #[source] async_nats::Error),
}

/// What the operator API reads and drives.
#[derive(Debug)]
pub struct OpsContext<L> {
    /// The site's roles (VM operations).
    pub roles: Arc<Roles<L>>,
    /// The site's configuration.
    pub config: Arc<SiteConfig>,
    /// The directory view.
    pub directory: Arc<Directory>,
    /// When the daemon started (ms since the epoch).
    pub started_ms: u64,
    /// Version of the nats-server the site is connected to.
    pub nats_server_version: String,
    /// The monitoring service (counters, accounting stream).
    pub monitoring: Arc<Monitoring>,
    /// JetStream of the site's own domain (image uploads).
    pub local_js: async_nats::jetstream::Context,
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
    hosts: Vec<String>,
    vms: usize,
    /// The site's own signing key, `ed25519:<base64>`.
    signing_key: String,
}

#[derive(Debug, Serialize)]
struct SiteView {
    site: String,
    partner: bool,
    trusted: bool,
    reachable: bool,
    heartbeat_age_ms: u64,
    proxies: Vec<String>,
    /// The key batches and messages of the site verify against, `ed25519:<base64>`: the pinned
    /// key of a partner, else the key of the site's directory entry.
    signing_key: Option<String>,
}

fn key_text(bytes: &[u8; 32]) -> String {
    format!(
        "ed25519:{}",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, bytes)
    )
}

/// The JSON answer of the `sites` endpoint.
#[derive(Debug, Serialize)]
struct SitesReply {
    sites: Vec<SiteView>,
}

fn service_error(code: usize, status: impl Into<String>) -> service::error::Error {
    service::error::Error {
        status: status.into(),
        code,
    }
}

/// Maps a refusal to an ADR-32 service error: 4xx for the caller's mistakes, 5xx for ours.
fn refusal(e: nubis_protocol::message::ErrorReply) -> service::error::Error {
    use nubis_protocol::message::ErrorCode as C;
    let code = match e.code {
        C::Malformed | C::UnknownVm | C::UnknownToken => 400,
        C::Conflict => 409,
        C::Refused | C::NoCapacity | C::NotPartner | C::LoopDetected | C::DepthExceeded => 422,
        C::Timeout => 504,
        _ => 500,
    };
    service_error(code, format!("{} ({})", e.message, e.code.as_str()))
}

fn parse<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, service::error::Error> {
    serde_json::from_slice(payload)
        .map_err(|e| service_error(400, format!("malformed request: {e}")))
}

impl<L: LocalSite> OpsContext<L> {
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
                signing_key: Some(match self.config.partner(site) {
                    Some(p) => key_text(p.signing_key.as_bytes()),
                    None => key_text(&record.entry.signing_key),
                }),
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
                    signing_key: Some(key_text(p.signing_key.as_bytes())),
                });
            }
        }
        out.sort_by(|a, b| a.site.cmp(&b.site));
        out
    }

    async fn answer(
        &self,
        endpoint: OpsEndpoint,
        payload: &[u8],
    ) -> Result<Vec<u8>, service::error::Error> {
        let payload: &[u8] = if payload.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            payload
        };
        let to_json = |v: serde_json::Value| {
            serde_json::to_vec(&v).map_err(|e| service_error(500, format!("internal error: {e}")))
        };
        match endpoint {
            OpsEndpoint::Deploy => {
                let req: DeployRequest = parse(payload)?;
                let (vm, migration) = self.roles.deploy(req).map_err(refusal)?;
                return to_json(
                    serde_json::json!({"vm": vm.as_str(), "migration": migration.to_string()}),
                );
            }
            OpsEndpoint::Migrate => {
                let req: MigrateRequest = parse(payload)?;
                let trigger = crate::controller::Trigger::Operator {
                    to_site: req.to_site,
                };
                let id = self
                    .roles
                    .start_migration_capped(req.vm.clone(), trigger, req.max_bytes_per_sec)
                    .map_err(refusal)?;
                return to_json(
                    serde_json::json!({"vm": req.vm.as_str(), "migration": id.to_string()}),
                );
            }
            OpsEndpoint::Evict => {
                let req: VmRef = parse(payload)?;
                return to_json(self.roles.evict(&req.vm).map_err(refusal)?);
            }
            OpsEndpoint::Control => {
                let req: ControlOp = parse(payload)?;
                let reply = self.roles.control_vm(req).await.map_err(refusal)?;
                return to_json(serde_json::json!({
                    "vm": reply.vm.as_str(),
                    "state": reply.state,
                    "cim_enabled_state": reply.state.cim_enabled_state(),
                    "descriptor_version": reply.descriptor_version,
                }));
            }
            OpsEndpoint::Cancel => {
                #[derive(serde::Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Cancel {
                    migration: nubis_protocol::MigrationId,
                }
                let req: Cancel = parse(payload)?;
                let phase = self
                    .roles
                    .cancel_migration(&req.migration)
                    .map_err(refusal)?;
                return to_json(
                    serde_json::json!({"migration": req.migration.to_string(), "cancelling_in_phase": format!("{phase:?}")}),
                );
            }
            OpsEndpoint::Usage => {
                #[derive(serde::Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Query {
                    vm: nubis_protocol::VmId,
                    #[serde(default)]
                    from_ms: u64,
                    #[serde(default)]
                    to_ms: Option<u64>,
                }
                let q: Query = parse(payload)?;
                let to_ms = q.to_ms.unwrap_or_else(now_ms);
                if q.from_ms > to_ms {
                    return Err(service_error(
                        400,
                        "malformed request: from_ms is later than to_ms",
                    ));
                }
                let report = self
                    .monitoring
                    .usage(&q.vm, q.from_ms, to_ms)
                    .await
                    .map_err(refusal)?;
                return serde_json::to_vec(&report)
                    .map_err(|e| service_error(500, format!("internal error: {e}")));
            }
            OpsEndpoint::Images => {
                #[derive(serde::Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Query {}
                if !payload.is_empty() {
                    let _: Query = parse(payload)?;
                }
                let images = crate::images::list(&self.config.image_store)
                    .map_err(|e| service_error(500, format!("internal error: {e}")))?;
                return to_json(serde_json::json!({"images": images}));
            }
            OpsEndpoint::ImagePut => {
                #[derive(serde::Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Put {
                    name: String,
                    #[serde(default)]
                    replace: bool,
                }
                let q: Put = parse(payload)?;
                use crate::images::ImageError as E;
                let info = crate::images::import(
                    &self.local_js,
                    &self.config.image_store,
                    &q.name,
                    q.replace,
                )
                .await
                .map_err(|e| match e {
                    E::Name(_) | E::NoUpload(_) => service_error(400, format!("{e} (malformed)")),
                    E::Exists(_) => service_error(409, format!("{e} (conflict)")),
                    E::Digest { .. } => service_error(422, format!("{e} (transfer_failed)")),
                    E::Bucket(_) | E::Io { .. } => service_error(500, format!("{e} (internal)")),
                })?;
                return to_json(serde_json::json!({"image": info}));
            }
            OpsEndpoint::Monitoring => {
                #[derive(serde::Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Query {
                    #[serde(default)]
                    vm: Option<nubis_protocol::VmId>,
                }
                let q: Query = parse(payload)?;
                return to_json(self.monitoring.report(q.vm.as_ref()));
            }
            _ => {}
        }
        {
            serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(payload).map_err(
                |e| service::error::Error {
                    status: format!("malformed request: expected a JSON object ({e})"),
                    code: 400,
                },
            )?;
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
                    hosts: self.config.hosts.iter().map(|h| h.to_string()).collect(),
                    vms: self.roles.journal.vms().map(|v| v.len()).unwrap_or(0),
                    signing_key: key_text(self.config.identity.public().signing.as_bytes()),
                })
            }
            OpsEndpoint::Sites => serde_json::to_vec(&SitesReply {
                sites: self.sites(now),
            }),
            OpsEndpoint::Vms => {
                #[derive(serde::Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Query {
                    #[serde(default)]
                    vm: Option<nubis_protocol::VmId>,
                    #[serde(default)]
                    migration: Option<nubis_protocol::MigrationId>,
                }
                let q: Query = parse(payload)?;
                if let Some(m) = q.migration {
                    let view = self.roles.migration_view_of(&m).map_err(refusal)?;
                    serde_json::to_vec(&view)
                } else {
                    let vms = self.roles.vm_views(q.vm.as_ref()).map_err(refusal)?;
                    serde_json::to_vec(&serde_json::json!({"vms": vms}))
                }
            }
            other => {
                return Err(service::error::Error {
                    status: format!(
                        "endpoint {} is not available in this version",
                        other.as_str()
                    ),
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

/// Starts the operator API on `client`; its handlers run on `tracker` until `cancel`.
pub async fn serve<L: LocalSite>(
    client: async_nats::Client,
    ctx: Arc<OpsContext<L>>,
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
    for endpoint in OpsEndpoint::ALL {
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
                    let answer = ctx.answer(endpoint, &request.message.payload).await;
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
