//! [`LocalSite`] over NATS: the site's own host agents (site-internal `nubis.site.<site>.host.…`
//! subjects) and its Transfer proxy (`nubis.proxy.<site>.<proxy>.…`).
//!
//! Host file paths appear only here, between this site and its own hosts and proxy; what leaves
//! the site is the proxy URI and the opaque token the proxy minted.

use std::path::PathBuf;

use nubis_bus::proxy::ProxyClient;
use nubis_bus::CallError;
use nubis_protocol::descriptor::VmDescriptor;
use nubis_protocol::message::host::{HostCallError, HostClient, TransportError};
use nubis_protocol::message::{
    CapacityHint, ControlChange, ControlReply, DmtfState, Endpoint, ErrorCode, ErrorReply,
    FetchTransfer, HostId, LocalFile, MintToken, Offer, OfferTerms, PrepareMode, ProxyUri,
    ReleaseOutcome, ReleaseToken, TokenPurpose, TransferStatus, TransferToken,
};
use nubis_protocol::{MigrationId, SiteId, VmId};

pub use nubis_bus::host::NatsTransport;

use crate::local::{LocalSite, PreparedSource};

/// The site's infrastructure, reached over NATS.
#[derive(Debug, Clone)]
pub struct NatsLocalSite {
    site: SiteId,
    transport: NatsTransport,
    hosts: Vec<HostId>,
    proxy: ProxyClient,
    proxy_uri: ProxyUri,
    image_store: PathBuf,
    /// Receiving tokens whose failed transfer the Controller has not been told about yet.
    failures_reported: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<TransferToken>>>,
}

fn host_error(e: HostCallError) -> ErrorReply {
    match e {
        HostCallError::Refused(r) => r,
        HostCallError::Transport(TransportError::NoResponders) => {
            ErrorReply::new(ErrorCode::Busy, "host agent is not running")
        }
        HostCallError::Transport(TransportError::Timeout(_)) => {
            ErrorReply::new(ErrorCode::Timeout, "host agent did not answer in time")
        }
        other => ErrorReply::new(ErrorCode::Internal, format!("host agent: {other}")),
    }
}

fn proxy_error(e: CallError) -> ErrorReply {
    match e {
        CallError::Refused { reply, .. } => {
            ErrorReply::new(reply.code, format!("transfer proxy: {}", reply.message))
        }
        other => ErrorReply::new(ErrorCode::Internal, format!("transfer proxy: {other}")),
    }
}

impl NatsLocalSite {
    /// Infrastructure of `site`: its `hosts`, its proxy at `proxy_uri`, its image store.
    pub fn new(
        site: SiteId,
        client: async_nats::Client,
        hosts: Vec<HostId>,
        proxy: ProxyClient,
        proxy_uri: ProxyUri,
        image_store: PathBuf,
    ) -> Self {
        Self {
            site,
            transport: NatsTransport(client),
            hosts,
            proxy,
            proxy_uri,
            image_store,
            failures_reported: Default::default(),
        }
    }

    fn host(&self, host: &HostId) -> HostClient<NatsTransport> {
        HostClient::new(self.transport.clone(), self.site.clone(), host.clone())
    }

    /// Mints a serving token for `files` at the site's proxy.
    async fn mint_serve(
        &self,
        migration: MigrationId,
        vm: &VmId,
        host: HostId,
        files: Vec<LocalFile>,
    ) -> Result<PreparedSource, ErrorReply> {
        let minted = self
            .proxy
            .mint(
                &self.proxy_uri,
                &MintToken {
                    migration_id: migration,
                    vm: vm.clone(),
                    host,
                    ttl_ms: None,
                    purpose: TokenPurpose::Serve { files },
                },
            )
            .await
            .map_err(proxy_error)?;
        Ok(PreparedSource {
            endpoint: Endpoint {
                proxy: minted.proxy,
                token: minted.token,
            },
            total_bytes: minted.total_bytes,
        })
    }

    async fn release_token(
        &self,
        migration: MigrationId,
        token: &TransferToken,
        outcome: ReleaseOutcome,
    ) -> Result<(), ErrorReply> {
        let req = ReleaseToken {
            migration_id: migration,
            token: *token,
            outcome,
        };
        match self.proxy.release(&self.proxy_uri, &req).await {
            Ok(_) => Ok(()),
            // Releasing twice is fine: the first release already did the work.
            Err(e) if matches!(e.code(), Some(ErrorCode::UnknownToken)) => Ok(()),
            Err(e) => Err(proxy_error(e)),
        }
    }
}

/// Tokens are released with the migration id they were minted for; commit and abort requests
/// carry the token only, so the release uses an all-zero id the proxy ignores for lookups.
const ANY_MIGRATION: MigrationId = MigrationId([0; 16]);

impl LocalSite for NatsLocalSite {
    async fn local_offers(
        &self,
        migration: MigrationId,
        descriptor: &VmDescriptor,
        exclude: Option<&HostId>,
    ) -> Result<Vec<(HostId, Offer)>, ErrorReply> {
        let mut offers = Vec::new();
        let mut last_refusal = None;
        for host in self.hosts.iter().filter(|h| Some(*h) != exclude) {
            let client = self.host(host);
            let reserved = match client.reserve(descriptor).await {
                Ok(r) => r,
                Err(e) => {
                    last_refusal = Some(host_error(e));
                    continue;
                }
            };
            let dir = reserved
                .slots
                .first()
                .and_then(|s| std::path::Path::new(&s.path).parent())
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            let minted = self
                .proxy
                .mint(
                    &self.proxy_uri,
                    &MintToken {
                        migration_id: migration,
                        vm: descriptor.id.clone(),
                        host: host.clone(),
                        ttl_ms: None,
                        purpose: TokenPurpose::Receive { dir },
                    },
                )
                .await;
            let minted = match minted {
                Ok(m) => m,
                Err(e) => {
                    // Without a token the reservation is useless: give it back.
                    if let Err(r) = client.release(&descriptor.id).await {
                        tracing::warn!(vm.id = %descriptor.id, host = %host, error = %r, "cannot release a reservation; the host keeps it until the VM is released");
                    }
                    last_refusal = Some(proxy_error(e));
                    continue;
                }
            };
            let capacity = client.capacity().await.ok().map(|c| {
                let share = |free: u64, total: u64| {
                    if total == 0 {
                        0.0
                    } else {
                        free as f64 / total as f64
                    }
                };
                match share(c.free.memory_mib, c.total.memory_mib) {
                    f if f > 0.5 => CapacityHint::High,
                    f if f > 0.2 => CapacityHint::Medium,
                    _ => CapacityHint::Low,
                }
            });
            offers.push((
                host.clone(),
                Offer {
                    proxy: minted.proxy,
                    token: minted.token,
                    terms: OfferTerms {
                        price_milli: 0,
                        capacity,
                        depth: 0,
                    },
                    expires_ms: minted.expires_ms,
                },
            ));
        }
        if offers.is_empty() {
            return Err(last_refusal.unwrap_or_else(|| {
                ErrorReply::new(ErrorCode::NoCapacity, "no local host can take the VM")
            }));
        }
        Ok(offers)
    }

    async fn prepare_source(
        &self,
        migration: MigrationId,
        vm: &VmId,
        host: &HostId,
        mode: PrepareMode,
    ) -> Result<PreparedSource, ErrorReply> {
        let prepared = self
            .host(host)
            .prepare(vm, mode)
            .await
            .map_err(host_error)?;
        let files = prepared
            .files
            .into_iter()
            .map(|f| LocalFile {
                name: f.name,
                path: f.path,
            })
            .collect();
        self.mint_serve(migration, vm, host.clone(), files).await
    }

    async fn image_source(
        &self,
        migration: MigrationId,
        descriptor: &VmDescriptor,
    ) -> Result<PreparedSource, ErrorReply> {
        let hw = &descriptor.hardware;
        let mut files = Vec::new();
        for disk in &hw.disks {
            if let Some(image) = &disk.image {
                files.push(LocalFile {
                    name: format!("disk-{}.{}", disk.name, disk.format.as_str()),
                    path: self.image_store.join(image).to_string_lossy().into_owned(),
                });
            }
        }
        if let Some(boot) = &hw.boot {
            files.push(LocalFile {
                name: "kernel".into(),
                path: self
                    .image_store
                    .join(&boot.kernel)
                    .to_string_lossy()
                    .into_owned(),
            });
            if let Some(initrd) = &boot.initrd {
                files.push(LocalFile {
                    name: "initrd".into(),
                    path: self.image_store.join(initrd).to_string_lossy().into_owned(),
                });
            }
        }
        for f in &files {
            if !std::path::Path::new(&f.path).is_file() {
                return Err(ErrorReply::new(
                    ErrorCode::Refused,
                    format!("image for {} is not in this site's image store (upload it with `nubis image put`)", f.name),
                ));
            }
        }
        let store_host = HostId::new("image-store")
            .map_err(|e| ErrorReply::new(ErrorCode::Internal, e.to_string()))?;
        self.mint_serve(migration, &descriptor.id, store_host, files)
            .await
    }

    async fn initiate(
        &self,
        migration: MigrationId,
        vm: &VmId,
        source: &Endpoint,
        destination: &TransferToken,
        max_bytes_per_sec: Option<u64>,
    ) -> Result<TransferStatus, ErrorReply> {
        // A failed attempt is reported once before a repeated Initiate transfer starts it over,
        // so the Controller counts its failed rounds (and moves on after a bounded number)
        // instead of seeing a transfer that forever starts again.
        if let Ok(TransferStatus::Failed { reason }) = self
            .proxy
            .status(&self.proxy_uri, migration, *destination)
            .await
        {
            let first_report = self
                .failures_reported
                .lock()
                .map(|mut set| set.insert(*destination))
                .unwrap_or(true);
            if first_report {
                return Ok(TransferStatus::Failed { reason });
            }
        }
        if let Ok(mut set) = self.failures_reported.lock() {
            set.remove(destination);
        }
        let fetched = self
            .proxy
            .fetch(
                &self.proxy_uri,
                &FetchTransfer {
                    migration_id: migration,
                    vm: vm.clone(),
                    source: source.clone(),
                    destination: *destination,
                    max_bytes_per_sec,
                },
            )
            .await;
        match fetched {
            // Initiate transfer is repeated by the Controller until both ends agree (paper step
            // 7): once the proxy has started the transfer, a repeat asks for its status.
            Err(e) if matches!(e.code(), Some(ErrorCode::TokenUsed)) => self
                .proxy
                .status(&self.proxy_uri, migration, *destination)
                .await
                .map_err(proxy_error),
            other => other.map_err(proxy_error),
        }
    }

    async fn verify(
        &self,
        migration: MigrationId,
        source: &TransferToken,
    ) -> Result<TransferStatus, ErrorReply> {
        self.proxy
            .status(&self.proxy_uri, migration, *source)
            .await
            .map_err(proxy_error)
    }

    async fn commit_destination(
        &self,
        descriptor: &VmDescriptor,
        host: &HostId,
        token: &TransferToken,
    ) -> Result<DmtfState, ErrorReply> {
        let status = self
            .host(host)
            .activate(descriptor)
            .await
            .map_err(host_error)?;
        if let Err(e) = self
            .release_token(ANY_MIGRATION, token, ReleaseOutcome::Commit)
            .await
        {
            tracing::warn!(error = %e.message, "received files not released at the proxy");
        }
        Ok(status.state)
    }

    async fn commit_source(
        &self,
        vm: &VmId,
        host: Option<&HostId>,
        token: &TransferToken,
    ) -> Result<(), ErrorReply> {
        if let Some(host) = host {
            self.host(host).release(vm).await.map_err(host_error)?;
        }
        self.release_token(ANY_MIGRATION, token, ReleaseOutcome::Commit)
            .await
    }

    async fn abort_destination(
        &self,
        vm: &VmId,
        host: &HostId,
        token: &TransferToken,
    ) -> Result<(), ErrorReply> {
        self.release_token(ANY_MIGRATION, token, ReleaseOutcome::Abort)
            .await?;
        self.host(host).release(vm).await.map_err(host_error)?;
        Ok(())
    }

    async fn abort_source(
        &self,
        vm: &VmId,
        host: Option<&HostId>,
        token: &TransferToken,
    ) -> Result<(), ErrorReply> {
        self.release_token(ANY_MIGRATION, token, ReleaseOutcome::Abort)
            .await?;
        if let Some(host) = host {
            self.host(host)
                .resume_after_abort(vm)
                .await
                .map_err(host_error)?;
        }
        Ok(())
    }

    async fn control(
        &self,
        descriptor: &VmDescriptor,
        host: &HostId,
        change: &ControlChange,
    ) -> Result<ControlReply, ErrorReply> {
        let client = self.host(host);
        let vm = descriptor.id.clone();
        let (state, version) = match change {
            ControlChange::Query => {
                let s = client.state(&vm).await.map_err(host_error)?;
                (s.state, s.descriptor_version)
            }
            ControlChange::SetState { transition } => {
                let s = client.control(&vm, *transition).await.map_err(host_error)?;
                (s.state, s.descriptor_version)
            }
            ControlChange::UpdateDescriptor { descriptor: new } => {
                if new.id != vm {
                    return Err(ErrorReply::new(
                        ErrorCode::Malformed,
                        "descriptor is for another VM",
                    ));
                }
                if new.version <= descriptor.version {
                    return Err(ErrorReply::new(
                        ErrorCode::Conflict,
                        "descriptor version must increase",
                    ));
                }
                let u = client.update(new).await.map_err(host_error)?;
                let s = client.state(&vm).await.map_err(host_error)?;
                (s.state, u.descriptor_version)
            }
            ControlChange::SetMonitoring { monitoring } => {
                let mut new = descriptor.clone();
                new.monitoring = monitoring.clone();
                new.version = descriptor.version + 1;
                let u = client.update(&new).await.map_err(host_error)?;
                let s = client.state(&vm).await.map_err(host_error)?;
                (s.state, u.descriptor_version)
            }
        };
        Ok(ControlReply {
            vm,
            state,
            descriptor_version: version,
        })
    }
}
