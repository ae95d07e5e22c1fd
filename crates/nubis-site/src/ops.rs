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
use nubis_protocol::ops::{
    CancelReply, CancelRequest, ControlView, ImagePutReply, ImagePutRequest, ImageView,
    ImagesReply, MigrationStarted, SiteStatus, SiteView, SitesReply, UsageQuery, VmsQuery,
    VmsReply,
};
use nubis_protocol::subject::{OpsEndpoint, Subject};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::audit::{Audit, AuditRecord, Caller};
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
    /// The verifier of federation requests (its replay cache's size is in the status).
    pub request_verifier: Arc<nubis_protocol::envelope::Verifier>,
}

fn key_text(bytes: &[u8; 32]) -> String {
    format!(
        "ed25519:{}",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, bytes)
    )
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
        C::Busy => 503,
        C::Quota => 429,
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
                site: site.clone(),
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
                    site: p.site.clone(),
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
        match endpoint {
            OpsEndpoint::Deploy => {
                let req: DeployRequest = parse(payload)?;
                let (vm, migration) = self.roles.deploy(req).map_err(refusal)?;
                to_json(&MigrationStarted { vm, migration })
            }
            OpsEndpoint::Migrate => {
                let req: MigrateRequest = parse(payload)?;
                let trigger = crate::controller::Trigger::Operator {
                    to_site: req.to_site,
                };
                let migration = self
                    .roles
                    .start_migration_capped(req.vm.clone(), trigger, req.max_bytes_per_sec)
                    .map_err(refusal)?;
                to_json(&MigrationStarted {
                    vm: req.vm,
                    migration,
                })
            }
            OpsEndpoint::Evict => {
                let req: VmRef = parse(payload)?;
                to_json(&self.roles.evict(&req.vm).map_err(refusal)?)
            }
            OpsEndpoint::Control => {
                let req: ControlOp = parse(payload)?;
                let reply = self.roles.control_vm(req).await.map_err(refusal)?;
                to_json(&ControlView {
                    vm: reply.vm,
                    state: reply.state,
                    cim_enabled_state: reply.state.cim_enabled_state(),
                    descriptor_version: reply.descriptor_version,
                })
            }
            OpsEndpoint::Cancel => {
                let req: CancelRequest = parse(payload)?;
                let phase = self
                    .roles
                    .cancel_migration(&req.migration)
                    .map_err(refusal)?;
                to_json(&CancelReply {
                    migration: req.migration,
                    cancelling_in_phase: format!("{phase:?}"),
                })
            }
            OpsEndpoint::Usage => {
                let q: UsageQuery = parse(payload)?;
                let to_ms = q.to_ms.unwrap_or_else(now_ms);
                if q.from_ms > to_ms {
                    return Err(service_error(
                        400,
                        "malformed request: from_ms is later than to_ms",
                    ));
                }
                let r = self
                    .monitoring
                    .usage(&q.vm, q.from_ms, to_ms)
                    .await
                    .map_err(refusal)?;
                to_json(&r)
            }
            OpsEndpoint::Images => {
                #[derive(serde::Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Query {}
                let _: Query = parse(payload)?;
                let images = crate::images::list(&self.config.image_store)
                    .map_err(|e| service_error(500, format!("internal error: {e}")))?;
                to_json(&ImagesReply {
                    images: images.into_iter().map(image_view).collect(),
                })
            }
            OpsEndpoint::ImagePut => {
                let q: ImagePutRequest = parse(payload)?;
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
                to_json(&ImagePutReply {
                    image: image_view(info),
                })
            }
            OpsEndpoint::Monitoring => {
                #[derive(serde::Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Query {
                    #[serde(default)]
                    vm: Option<nubis_protocol::VmId>,
                }
                let q: Query = parse(payload)?;
                to_json(&self.monitoring.report(q.vm.as_ref()))
            }
            OpsEndpoint::Status => {
                object(payload)?;
                let now = now_ms();
                let sites = self.sites(now);
                to_json(&SiteStatus {
                    site: self.config.site.clone(),
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    started_ms: self.started_ms,
                    uptime_ms: now.saturating_sub(self.started_ms),
                    nats_server_version: self.nats_server_version.clone(),
                    partners: self.config.partners.len() as u64,
                    partners_reachable: sites.iter().filter(|s| s.partner && s.reachable).count()
                        as u64,
                    hosts: self.config.hosts.iter().map(|h| h.to_string()).collect(),
                    vms: self
                        .roles
                        .journal()
                        .vms()
                        .map(|v| v.len() as u64)
                        .unwrap_or(0),
                    signing_key: key_text(self.config.identity.public().signing.as_bytes()),
                    tables: {
                        let mut tables = self.roles.journal().table_sizes();
                        let replay = self.request_verifier.replay_cache().len() as u64;
                        tables.insert("replay".into(), replay);
                        tables
                    },
                })
            }
            OpsEndpoint::Sites => {
                object(payload)?;
                to_json(&SitesReply {
                    sites: self.sites(now_ms()),
                })
            }
            OpsEndpoint::Vms => {
                let q: VmsQuery = parse(payload)?;
                if let Some(m) = q.migration {
                    to_json(&self.roles.migration_view_of(&m).map_err(refusal)?)
                } else {
                    let vms = self.roles.vm_views(q.vm.as_ref()).map_err(refusal)?;
                    to_json(&VmsReply { vms })
                }
            }
        }
    }
}

/// Checks that a request without parameters is a JSON object (whose fields are ignored).
fn object(payload: &[u8]) -> Result<(), service::error::Error> {
    serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(payload)
        .map(drop)
        .map_err(|e| {
            service_error(
                400,
                format!("malformed request: expected a JSON object ({e})"),
            )
        })
}

fn to_json<T: Serialize>(answer: &T) -> Result<Vec<u8>, service::error::Error> {
    serde_json::to_vec(answer).map_err(|e| service_error(500, format!("internal error: {e}")))
}

fn image_view(info: crate::images::ImageInfo) -> ImageView {
    ImageView {
        name: info.name,
        bytes: info.bytes,
        modified_ms: info.modified_ms,
        sha256: info.sha256,
    }
}

/// Name of the second service, whose endpoints are the per-operator subjects
/// `nubis.ops.<site>.<operator>.<endpoint>` (same endpoint names, same answers).
pub const BY_OPERATOR_SERVICE_NAME: &str = "nubis-site-by-operator";

/// Starts the operator API on `client`; its handlers run on `tracker` until `cancel`. Each
/// endpoint answers on the shared subject `nubis.ops.<site>.<endpoint>` (service
/// [`SERVICE_NAME`]) and on the per-operator subjects `nubis.ops.<site>.*.<endpoint>` (service
/// [`BY_OPERATOR_SERVICE_NAME`]); mutating calls are recorded in the audit stream.
pub async fn serve<L: LocalSite>(
    client: async_nats::Client,
    ctx: Arc<OpsContext<L>>,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> Result<Vec<service::Service>, OpsError> {
    let site = ctx.config.site.clone();
    let audit = Arc::new(Audit::new(ctx.local_js.clone(), site.clone()));
    if let Err(e) = audit.ensure().await {
        tracing::warn!(error = %e, "audit stream not ready; it is created on the first record");
    }
    let mut services = Vec::new();
    for (name, by_operator) in [(SERVICE_NAME, false), (BY_OPERATOR_SERVICE_NAME, true)] {
        let service = client
            .service_builder()
            .description(format!("nubis operator API of site {site}"))
            .metadata(HashMap::from([("site".to_string(), site.to_string())]))
            .start(name, env!("CARGO_PKG_VERSION"))
            .await
            .map_err(|e| OpsError::Register(name.into(), e))?;
        for endpoint in OpsEndpoint::ALL {
            let subject = if by_operator {
                format!("nubis.ops.{site}.*.{}", endpoint.as_str())
            } else {
                Subject::ops(&site, endpoint).as_str().to_owned()
            };
            let requests = service
                .endpoint_builder()
                .name(endpoint.as_str())
                .add(subject.as_str())
                .await
                .map_err(|e| OpsError::Register(subject.clone(), e))?;
            let handler = Handler {
                ctx: ctx.clone(),
                audit: audit.clone(),
                endpoint,
            };
            tracker.spawn(handler.run(requests, cancel.clone()));
        }
        services.push(service);
    }
    Ok(services)
}

/// Answers one endpoint's requests, one at a time.
struct Handler<L> {
    ctx: Arc<OpsContext<L>>,
    audit: Arc<Audit>,
    endpoint: OpsEndpoint,
}

impl<L: LocalSite> Handler<L> {
    async fn run(self, mut requests: service::endpoint::Endpoint, cancel: CancellationToken) {
        loop {
            let request = tokio::select! {
                _ = cancel.cancelled() => break,
                r = requests.next() => match r { Some(r) => r, None => break },
            };
            let caller = Caller::from_subject(&self.ctx.config.site, &request.message.subject);
            let caller_name = caller.as_ref().map(ToString::to_string).unwrap_or_default();
            let span = tracing::info_span!(
                "ops",
                site.id = %self.ctx.config.site,
                endpoint = self.endpoint.as_str(),
                operator = %caller_name,
            );
            self.handle(request, caller).instrument(span).await;
        }
    }

    async fn handle(&self, request: service::Request, caller: Option<Caller>) {
        let payload = request.message.payload.clone();
        let answer = match &caller {
            Some(_) => self.ctx.answer(self.endpoint, &payload).await,
            None => Err(service_error(
                400,
                "malformed request: not an operator subject",
            )),
        };
        if let Err(e) = &answer {
            tracing::info!(code = e.code, error = %e.status, "operator request refused");
        }
        let record = match (&caller, self.endpoint.is_mutating()) {
            (Some(caller), true) => Some(AuditRecord {
                at_ms: now_ms(),
                caller: caller.clone(),
                endpoint: self.endpoint.as_str().to_owned(),
                request: AuditRecord::request_value(&payload),
                ok: answer.is_ok(),
                code: answer
                    .as_ref()
                    .err()
                    .map_or(0, |e| u16::try_from(e.code).unwrap_or(u16::MAX)),
                message: answer
                    .as_ref()
                    .err()
                    .map(|e| e.status.clone())
                    .unwrap_or_default(),
            }),
            _ => None,
        };
        // Recorded before the answer goes out, so an operator who has the answer finds the
        // record in the stream.
        if let Some(record) = record {
            if let Err(e) = self.audit.record(&record).await {
                tracing::error!(error = %e, "mutating operator call not recorded in the audit stream");
            }
        }
        if let Err(e) = request.respond(answer.map(Into::into)).await {
            tracing::warn!(error = %e, "cannot send operator reply");
        }
    }
}
