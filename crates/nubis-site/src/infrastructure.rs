//! [`LocalSite`] over NATS: the site's own host agents (site-internal `nubis.site.<site>.host.…`
//! subjects) and its Transfer proxy (`nubis.proxy.<site>.<proxy>.…`).
//!
//! Host file paths appear only here, between this site and its own hosts and proxy; what leaves
//! the site is the proxy URI and the opaque token the proxy minted.
//!
//! The paths the proxy is asked to serve or receive into come from the site's configuration
//! (each host's `vm_root`, the image store), never from a host agent's answer: a host agent
//! that answers a file or directory other than `<vm_root>/<vm>/<logical name>` of a VM file
//! (a broken-into host naming the site's key file, say) gets no token minted, and the
//! operation is refused (`refused`, "host agent named files outside the vm's directory").

use std::collections::HashMap;
use std::path::{Path, PathBuf};

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
    vm_roots: HashMap<HostId, PathBuf>,
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

/// A failed call to the site's own proxy, with the code the call's failure has: a proxy that
/// is not running (restarting) is `unreachable`, so a Controller waits for it instead of
/// counting a failed transfer round.
fn proxy_error(e: CallError) -> ErrorReply {
    let reply = e.to_reply();
    ErrorReply::new(reply.code, format!("transfer proxy: {}", reply.message))
}

impl NatsLocalSite {
    /// Infrastructure of `site`: its `hosts` with the VM root of each, its proxy at
    /// `proxy_uri`, its image store.
    pub fn new(
        site: SiteId,
        client: async_nats::Client,
        hosts: Vec<HostId>,
        vm_roots: HashMap<HostId, PathBuf>,
        proxy: ProxyClient,
        proxy_uri: ProxyUri,
        image_store: PathBuf,
    ) -> Self {
        Self {
            site,
            transport: NatsTransport(client),
            hosts,
            vm_roots,
            proxy,
            proxy_uri,
            image_store,
            failures_reported: Default::default(),
        }
    }

    /// The directory of `vm` on `host`, from the site's configuration.
    fn vm_dir(&self, host: &HostId, vm: &VmId) -> Result<PathBuf, ErrorReply> {
        self.vm_roots
            .get(host)
            .map(|root| root.join(vm.as_str()))
            .ok_or_else(|| {
                ErrorReply::new(ErrorCode::Internal, "the host has no configured vm_root")
            })
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
        self.mint_source(migration, vm, host, TokenPurpose::Serve { files })
            .await
    }

    /// Mints a token that serves files to another proxy (`purpose` serve or relay) at the
    /// site's proxy: the source endpoint to pass on.
    async fn mint_source(
        &self,
        migration: MigrationId,
        vm: &VmId,
        host: HostId,
        purpose: TokenPurpose,
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
                    purpose,
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

/// Whether `name` is the logical name of a file that moves with a VM: a disk image, the
/// direct-boot kernel and initial RAM disk, or the saved memory state (never the host agent's
/// own files, such as the descriptor, the domain marker or the guest's console log).
pub fn is_vm_file_name(name: &str) -> bool {
    nubis_protocol::descriptor::is_image_name(name)
        && (matches!(name, "kernel" | "initrd" | "state.sav")
            || (name.starts_with("disk-") && (name.ends_with(".raw") || name.ends_with(".qcow2"))))
}

/// The files a host agent named, each as `<dir>/<name>`, if every one is a VM file at exactly
/// that path; otherwise why not (for the log: it names paths).
pub fn confined<'a>(
    dir: &Path,
    named: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Result<Vec<LocalFile>, String> {
    let mut files: Vec<LocalFile> = Vec::new();
    for (name, path) in named {
        if !is_vm_file_name(name) {
            return Err(format!("{name:?} is not a vm file"));
        }
        let expected = dir.join(name);
        if Path::new(path) != expected {
            return Err(format!("{name:?} is at {path:?}, not {expected:?}"));
        }
        if files.iter().any(|f| &f.name == name) {
            return Err(format!("{name:?} is named twice"));
        }
        files.push(LocalFile {
            name: name.clone(),
            path: expected.to_string_lossy().into_owned(),
        });
    }
    Ok(files)
}

fn outside_vm_dir() -> ErrorReply {
    ErrorReply::new(
        ErrorCode::Refused,
        "host agent named files outside the vm's directory",
    )
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
            let dir = self.vm_dir(host, &descriptor.id).and_then(|dir| {
                confined(&dir, reserved.slots.iter().map(|s| (&s.name, &s.path)))
                    .map(|_| dir)
                    .map_err(|e| {
                        tracing::warn!(vm.id = %descriptor.id, host = %host, "reservation refused: {e}");
                        outside_vm_dir()
                    })
            });
            let dir = match dir {
                Ok(d) => d.to_string_lossy().into_owned(),
                Err(r) => {
                    if let Err(e) = client.release(&descriptor.id).await {
                        tracing::warn!(vm.id = %descriptor.id, host = %host, error = %e, "cannot release a reservation; the host keeps it until the VM is released");
                    }
                    last_refusal = Some(r);
                    continue;
                }
            };
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
        let dir = self.vm_dir(host, vm)?;
        let files =
            confined(&dir, prepared.files.iter().map(|f| (&f.name, &f.path))).map_err(|e| {
                tracing::warn!(vm.id = %vm, host = %host, "prepared files refused: {e}");
                outside_vm_dir()
            })?;
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

    async fn relay(
        &self,
        migration: MigrationId,
        vm: &VmId,
        source: &Endpoint,
        max_bytes_per_sec: Option<u64>,
    ) -> Result<PreparedSource, ErrorReply> {
        // A relaying token holds no host's files; the proxy's store wants a host name.
        let host = HostId::new("relay")
            .map_err(|e| ErrorReply::new(ErrorCode::Internal, e.to_string()))?;
        let purpose = TokenPurpose::Relay {
            source: source.clone(),
            max_bytes_per_sec,
        };
        self.mint_source(migration, vm, host, purpose).await
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

#[cfg(test)]
mod tests {
    use super::*;

    fn named(files: &[(&str, &str)]) -> Vec<(String, String)> {
        files
            .iter()
            .map(|(n, p)| (n.to_string(), p.to_string()))
            .collect()
    }

    fn check(dir: &str, files: &[(&str, &str)]) -> Result<Vec<LocalFile>, String> {
        let files = named(files);
        confined(Path::new(dir), files.iter().map(|(n, p)| (n, p)))
    }

    #[test]
    fn host_files_must_be_vm_files_in_the_vm_directory() {
        // The legitimate answer: the VM's files, each in its directory under its name.
        let ok = check(
            "/vms/web-1",
            &[
                ("disk-vda.qcow2", "/vms/web-1/disk-vda.qcow2"),
                ("state.sav", "/vms/web-1/state.sav"),
                ("kernel", "/vms/web-1/kernel"),
            ],
        )
        .unwrap();
        assert_eq!(ok.len(), 3);
        assert_eq!(ok[0].path, "/vms/web-1/disk-vda.qcow2");
        // A file elsewhere, a way out, another VM's directory, a control file: refused.
        for bad in [
            ("state.sav", "/etc/nubis/a/a.key"),
            ("state.sav", "/vms/web-1/../../etc/nubis/a/a.key"),
            ("state.sav", "/vms/web-2/state.sav"),
            ("disk-vda.qcow2", "/vms/web-1/state.sav"),
            ("descriptor.msgpack", "/vms/web-1/descriptor.msgpack"),
            ("domain", "/vms/web-1/domain"),
            ("console.log", "/vms/web-1/console.log"),
            ("../a.key", "/vms/a.key"),
        ] {
            assert!(check("/vms/web-1", &[bad]).is_err(), "{bad:?}");
        }
        assert!(check(
            "/vms/web-1",
            &[
                ("state.sav", "/vms/web-1/state.sav"),
                ("state.sav", "/vms/web-1/state.sav")
            ]
        )
        .is_err());
    }
}
