//! The token operations of a Transfer proxy: mint a token, Initiate transfer (fetch),
//! status (Transfer verification), grant the content key, acknowledge, release, and the expiry
//! of tokens, over the
//! token store ([`crate::store`]). The bus service ([`crate::service`]) calls these for signed
//! requests; a site daemon that runs the proxy in its own process calls them directly.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use nubis_protocol::message::{
    ErrorCode, FetchKey, FetchTransfer, MintToken, Minted, ReleaseOutcome, ReleaseToken, Released,
    SealedContentKey, TokenPurpose, TransferAck, TransferStatus, TransferToken,
};
use nubis_protocol::SiteId;
use tracing::{info, warn};

use crate::confine::{within_roots, ConfineError};
use crate::error::ProxyError;
use crate::io::shape;
use crate::naming::TokenObjects;
use crate::objects::purge_object;
use crate::proxy::{lock, now_ms, sorted, TransferProxy, TransferStats};
use crate::receive::partial_path;
use crate::seal::ContentKey;
use crate::store::TokenRecord;
use nubis_bus::CallError;
use nubis_protocol::message::ErrorReply;

/// How long a fetch request waits for its transfer to end before it answers with progress.
const FIRST_ANSWER_WAIT: Duration = Duration::from_millis(100);

/// Refuses a path outside the proxy's roots (see [`crate::confine`]); `name` is what the error
/// may say instead of the path.
fn confined(roots: &[std::path::PathBuf], path: &str, name: &str) -> Result<(), ProxyError> {
    match within_roots(roots, Path::new(path)) {
        Ok(_) => Ok(()),
        Err(ConfineError::Resolve(source)) => Err(ProxyError::File {
            name: name.to_string(),
            source,
        }),
        Err(ConfineError::Outside) => {
            warn!(
                file = name,
                "mint refused: the path is outside the proxy's roots"
            );
            Err(ProxyError::OutsideRoots {
                name: name.to_string(),
            })
        }
    }
}

impl TransferProxy {
    /// Mints a token (site-internal). Serving and relaying start at once. Files to serve and
    /// the directory to receive into must lie under the proxy's roots, whoever named them.
    pub async fn mint(&self, req: MintToken) -> Result<Minted, ProxyError> {
        let s = &self.inner.settings;
        let mut total = 0;
        let mut file_names = Vec::new();
        match &req.purpose {
            TokenPurpose::Serve { files } => {
                if files.is_empty() {
                    return Err(ProxyError::Invalid("no files to serve"));
                }
                for f in files {
                    if file_names.contains(&f.name) {
                        return Err(ProxyError::Invalid("duplicate logical file name"));
                    }
                    if !Path::new(&f.path).is_absolute() {
                        return Err(ProxyError::Invalid("file paths must be absolute"));
                    }
                    confined(&s.roots, &f.path, &f.name)?;
                    let sh = shape(Path::new(&f.path)).map_err(|source| ProxyError::File {
                        name: f.name.clone(),
                        source,
                    })?;
                    total += sh.allocated();
                    file_names.push(f.name.clone());
                }
            }
            TokenPurpose::Receive { dir } => {
                let p = Path::new(dir);
                if !p.is_absolute() {
                    return Err(ProxyError::Invalid("receive directory must be absolute"));
                }
                confined(&s.roots, dir, "receive directory")?;
                let meta = std::fs::metadata(p).map_err(|source| ProxyError::File {
                    name: "receive directory".to_string(),
                    source,
                })?;
                if !meta.is_dir() {
                    return Err(ProxyError::Invalid("receive directory is not a directory"));
                }
            }
            TokenPurpose::Relay { source, .. } => {
                if !s.relay_allowed {
                    return Err(ProxyError::RelayNotAllowed);
                }
                if source.proxy == self.inner.uri {
                    return Err(ProxyError::Invalid("cannot relay from this proxy itself"));
                }
            }
        }
        let ttl = req.ttl_ms.unwrap_or(s.default_ttl_ms).min(s.max_ttl_ms);
        let now = now_ms();
        let token = TransferToken::random();
        // Serving and relaying tokens seal what they store in the bucket (see `crate::seal`).
        let content_key = matches!(
            req.purpose,
            TokenPurpose::Serve { .. } | TokenPurpose::Relay { .. }
        )
        .then(ContentKey::random);
        let max_bytes_per_sec = match &req.purpose {
            TokenPurpose::Relay {
                max_bytes_per_sec, ..
            } => *max_bytes_per_sec,
            _ => None,
        };
        let rec = TokenRecord {
            token,
            migration_id: req.migration_id,
            vm: req.vm,
            host: req.host,
            purpose: req.purpose,
            created_ms: now,
            expires_ms: now.saturating_add(ttl),
            status: TransferStatus::Pending,
            expired: false,
            digests: Vec::new(),
            source: None,
            total_bytes: total,
            used: false,
            complete: false,
            file_names,
            max_bytes_per_sec,
            partial: None,
            content_key,
            seal_attempts: 0,
            fetcher: None,
        };
        self.inner.store.put_new(&rec)?;
        info!(migration.id = %rec.migration_id, vm.id = %rec.vm, "token minted");
        if matches!(
            rec.purpose,
            TokenPurpose::Serve { .. } | TokenPurpose::Relay { .. }
        ) {
            self.spawn_transfer(rec.clone());
        }
        Ok(Minted {
            token,
            proxy: self.inner.uri.clone(),
            expires_ms: rec.expires_ms,
            total_bytes: total,
        })
    }

    /// Initiate transfer at this (destination) proxy: checks both tokens and starts fetching,
    /// paced to at most the request's `max_bytes_per_sec` (the migration's bandwidth cap; the
    /// proxy's own `transfer.max_bytes_per_sec` applies when smaller). Returns the status right
    /// away; the transfer continues in the background. A repeated request for a transfer under
    /// way keeps the cap it started with.
    pub async fn fetch(&self, req: FetchTransfer) -> Result<TransferStatus, ProxyError> {
        let max_bytes_per_sec = req.max_bytes_per_sec;
        let rec = self.live_record(&req.destination)?;
        if !matches!(rec.purpose, TokenPurpose::Receive { .. }) {
            return Err(ProxyError::WrongPurpose {
                expected: "receive",
            });
        }
        match &rec.status {
            TransferStatus::Succeeded { .. } => return Err(ProxyError::TokenUsed),
            TransferStatus::Transferring { .. } if self.is_running(&rec.token) => {
                // A repeated Initiate transfer (e.g. after a lost reply) is answered, not
                // started twice; a different source is someone else using the token.
                return if rec.source.as_ref() == Some(&req.source) {
                    self.status(&req.destination)
                } else {
                    Err(ProxyError::TokenUsed)
                };
            }
            _ => {}
        }
        // Ask the source proxy first, so a bad source token is refused now with its reason
        // rather than after a stall.
        match self
            .inner
            .peers
            .status(&req.source.proxy, req.migration_id, req.source.token)
            .await
        {
            Ok(TransferStatus::Succeeded { .. }) => return Err(ProxyError::TokenUsed),
            Ok(TransferStatus::Failed { reason }) => {
                return Err(ProxyError::SourceRefused {
                    code: ErrorCode::TransferFailed,
                    message: reason,
                })
            }
            Ok(_) => {}
            Err(CallError::Refused {
                reply: ErrorReply { code, message, .. },
                ..
            }) => return Err(ProxyError::SourceRefused { code, message }),
            Err(e) => return Err(ProxyError::SourceUnreachable(e)),
        }
        let source = req.source.clone();
        let rec = self
            .inner
            .store
            .update(&rec.token, |r| {
                r.used = true;
                r.source = Some(source);
                r.max_bytes_per_sec = max_bytes_per_sec;
                r.status = TransferStatus::Transferring {
                    bytes_done: 0,
                    bytes_total: r.total_bytes,
                };
            })?
            .ok_or(ProxyError::UnknownToken)?;
        self.spawn_transfer(rec.clone());
        // A small transfer is over within a few milliseconds: answering with its outcome
        // saves the Controller a round of Initiate transfer across the whole chain. A large
        // one is answered with its progress after this short wait.
        // (The status is read from memory: polling it often costs nothing on the bus.)
        let deadline = tokio::time::Instant::now() + FIRST_ANSWER_WAIT;
        loop {
            let status = self.status(&rec.token)?;
            if !matches!(status, TransferStatus::Transferring { .. })
                || tokio::time::Instant::now() >= deadline
            {
                return Ok(status);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Status of a token minted here.
    pub fn status(&self, token: &TransferToken) -> Result<TransferStatus, ProxyError> {
        let rec = self.live_record(token)?;
        if let TransferStatus::Transferring { .. } = rec.status {
            if let Some(l) = lock(&self.inner.live).get(token) {
                return Ok(TransferStatus::Transferring {
                    bytes_done: l.done.load(Ordering::Relaxed),
                    bytes_total: l.total.load(Ordering::Relaxed),
                });
            }
        }
        Ok(rec.status)
    }

    /// Figures of a token (bytes handled and published).
    pub fn stats(&self, token: &TransferToken) -> Option<TransferStats> {
        let rec = self.inner.store.get(token).ok()??;
        let live = lock(&self.inner.live).get(token).cloned();
        let published = lock(&self.inner.published).get(token).copied().unwrap_or(0);
        let fetched = lock(&self.inner.fetched).get(token).copied().unwrap_or(0);
        Some(TransferStats {
            bytes_done: live
                .as_ref()
                .map(|l| l.done.load(Ordering::Relaxed))
                .unwrap_or(if rec.complete { rec.total_bytes } else { 0 }),
            bytes_total: rec.total_bytes,
            bytes_published: published,
            bytes_fetched: fetched,
        })
    }

    /// Grants the content key of a serving (or relaying) token to the proxy of site `fetcher`
    /// about to read its objects, sealed to the ephemeral key of its signed request. The first
    /// site granted the key is the only one granted it again (a restarted fetcher asks anew
    /// with a new ephemeral key); any other site is refused `token_used`.
    pub fn grant_key(
        &self,
        fetcher: &SiteId,
        req: FetchKey,
    ) -> Result<SealedContentKey, ProxyError> {
        let rec = self.live_record(&req.token)?;
        if !matches!(
            rec.purpose,
            TokenPurpose::Serve { .. } | TokenPurpose::Relay { .. }
        ) {
            return Err(ProxyError::WrongPurpose {
                expected: "serve or relay",
            });
        }
        if rec.migration_id != req.migration_id {
            return Err(ProxyError::Invalid(
                "the token belongs to another migration",
            ));
        }
        // After success only the site that fetched may ask again (a proxy that restarted
        // before it recorded the source's confirmation reads the objects once more).
        if matches!(rec.status, TransferStatus::Succeeded { .. })
            && rec.fetcher.as_ref() != Some(fetcher)
        {
            return Err(ProxyError::TokenUsed);
        }
        // The store changes a record atomically, so two sites asking at once cannot both be
        // first.
        let granted = self
            .inner
            .store
            .update(&rec.token, |r| {
                r.fetcher.get_or_insert_with(|| fetcher.clone());
            })?
            .ok_or(ProxyError::UnknownToken)?;
        if granted.fetcher.as_ref() != Some(fetcher) {
            warn!(migration.id = %rec.migration_id, vm.id = %rec.vm, site.id = %fetcher, "content key refused: granted to another site");
            return Err(ProxyError::TokenUsed);
        }
        let key = granted.content_key.ok_or(ProxyError::NotReady)?;
        let sealed = key
            .seal_to(&req.fetcher_key)
            .map_err(|_| ProxyError::Invalid("unusable fetcher key"))?;
        info!(migration.id = %rec.migration_id, vm.id = %rec.vm, site.id = %fetcher, "content key granted");
        Ok(SealedContentKey {
            migration_id: req.migration_id,
            token: req.token,
            sealed,
        })
    }

    /// The receiving end acknowledges the digests it verified; the serving (or relaying) end
    /// turns succeeded only if they equal its own.
    pub async fn acknowledge(&self, ack: TransferAck) -> Result<TransferStatus, ProxyError> {
        let rec = self.live_record(&ack.token)?;
        let relay_source = match &rec.purpose {
            TokenPurpose::Serve { .. } => None,
            TokenPurpose::Relay { source, .. } => Some(source.clone()),
            TokenPurpose::Receive { .. } => {
                return Err(ProxyError::WrongPurpose {
                    expected: "serve or relay",
                })
            }
        };
        match &rec.status {
            TransferStatus::Succeeded { digests } => {
                return if *digests == sorted(ack.digests) {
                    Ok(rec.status)
                } else {
                    Err(ProxyError::TokenUsed)
                };
            }
            TransferStatus::Failed { .. } => return Ok(rec.status),
            _ => {}
        }
        if !rec.complete {
            return Err(ProxyError::NotReady);
        }
        let acked = sorted(ack.digests);
        let status = if acked != sorted(rec.digests.clone()) {
            warn!(migration.id = %rec.migration_id, vm.id = %rec.vm, "acknowledged digests differ");
            TransferStatus::Failed {
                reason: "digests acknowledged by the receiving end differ from the served files"
                    .to_string(),
            }
        } else if let Some(source) = relay_source {
            // The source turns succeeded only when the far end verified, so the relay passes
            // the acknowledgement on and reports what the source says.
            let fwd = TransferAck {
                migration_id: ack.migration_id,
                token: source.token,
                digests: acked.clone(),
            };
            match self.inner.peers.ack(&source.proxy, &fwd).await {
                Ok(TransferStatus::Succeeded { digests }) if digests == acked => {
                    TransferStatus::Succeeded { digests: acked }
                }
                Ok(other) => TransferStatus::Failed {
                    reason: format!("source did not confirm the digests: {other:?}"),
                },
                Err(e) => return Err(ProxyError::SourceUnreachable(e)),
            }
        } else {
            TransferStatus::Succeeded { digests: acked }
        };
        self.inner
            .store
            .update(&rec.token, |r| r.status = status.clone())?;
        info!(migration.id = %rec.migration_id, vm.id = %rec.vm, ?status, "transfer acknowledged");
        Ok(status)
    }

    /// Releases a token after commit or abort (site-internal): stops its transfer, deletes its
    /// objects, and on abort also the files it received.
    pub async fn release(&self, req: ReleaseToken) -> Result<Released, ProxyError> {
        let rec = self
            .inner
            .store
            .get(&req.token)?
            .ok_or(ProxyError::UnknownToken)?;
        self.stop_transfer(&rec.token).await;
        let deleted = self
            .discard(&rec, req.outcome == ReleaseOutcome::Abort)
            .await?;
        self.inner.store.remove(&rec.token)?;
        lock(&self.inner.published).remove(&rec.token);
        info!(migration.id = %rec.migration_id, vm.id = %rec.vm, outcome = ?req.outcome, "token released");
        Ok(Released {
            token: rec.token,
            objects_deleted: deleted,
        })
    }

    /// Collects expired tokens now: stops their transfers, deletes their objects and partial
    /// files, and keeps a tombstone (refused as expired) until it is old enough to forget.
    /// Returns how many tokens expired in this pass.
    pub async fn collect_garbage(&self) -> Result<usize, ProxyError> {
        let now = now_ms();
        let mut expired = 0;
        for rec in self.inner.store.all()? {
            if rec.expired {
                if now
                    > rec
                        .expires_ms
                        .saturating_add(self.inner.settings.tombstone_ms)
                {
                    self.inner.store.remove(&rec.token)?;
                }
                continue;
            }
            if now <= rec.expires_ms {
                continue;
            }
            self.stop_transfer(&rec.token).await;
            // Received files that were verified may be a committed VM's: only partial files go.
            if let Err(e) = self.discard(&rec, false).await {
                warn!(error = %e, "clean-up of an expired token failed; retried next pass");
                continue;
            }
            self.inner.store.update(&rec.token, |r| {
                r.expired = true;
                if !matches!(r.status, TransferStatus::Succeeded { .. }) {
                    r.status = TransferStatus::Failed {
                        reason: "token expired".to_string(),
                    };
                }
            })?;
            lock(&self.inner.published).remove(&rec.token);
            expired += 1;
            info!(migration.id = %rec.migration_id, vm.id = %rec.vm, "token expired");
        }
        Ok(expired)
    }

    // ----- internals --------------------------------------------------------------------

    /// The record of a token that is known and has not expired.
    pub(crate) fn live_record(&self, token: &TransferToken) -> Result<TokenRecord, ProxyError> {
        let rec = self
            .inner
            .store
            .get(token)?
            .ok_or(ProxyError::UnknownToken)?;
        if rec.expired || now_ms() > rec.expires_ms {
            return Err(ProxyError::ExpiredToken);
        }
        Ok(rec)
    }

    /// Whether a task of `token` is running.
    fn is_running(&self, token: &TransferToken) -> bool {
        lock(&self.inner.live).contains_key(token)
    }

    /// Stops `token`'s task, if one runs, and waits for it to end.
    async fn stop_transfer(&self, token: &TransferToken) {
        let live = lock(&self.inner.live).remove(token);
        if let Some(l) = live {
            l.cancel.cancel();
            let task = lock(&l.task).take();
            if let Some(t) = task {
                let _ = t.await;
            }
        }
    }

    /// Deletes a token's objects (serve, relay) or partial files (receive; all received files
    /// too when `received_too`). Returns the number of objects deleted.
    pub(crate) async fn discard(
        &self,
        rec: &TokenRecord,
        received_too: bool,
    ) -> Result<u64, ProxyError> {
        match &rec.purpose {
            TokenPurpose::Serve { .. } | TokenPurpose::Relay { .. } => {
                let objs = TokenObjects::new(&rec.token);
                let mut n = 0;
                if purge_object(
                    &self.inner.stream,
                    &objs.chunk_subject(None),
                    &objs.manifest_name(),
                )
                .await?
                    > 0
                {
                    n += 1;
                }
                for name in &rec.file_names {
                    if purge_object(
                        &self.inner.stream,
                        &objs.chunk_subject(Some(name)),
                        &objs.file_name(name),
                    )
                    .await?
                        > 0
                    {
                        n += 1;
                    }
                }
                Ok(n)
            }
            TokenPurpose::Receive { dir } => {
                let dir = Path::new(dir);
                for name in &rec.file_names {
                    let _ = std::fs::remove_file(partial_path(dir, name));
                    if received_too {
                        let _ = std::fs::remove_file(dir.join(name));
                    }
                }
                Ok(0)
            }
        }
    }

    /// Starts again the transfers that were running when the proxy stopped.
    pub(crate) fn resume(&self) -> Result<(), ProxyError> {
        for rec in self.inner.store.all()? {
            if rec.expired || now_ms() > rec.expires_ms || rec.status.is_final() {
                continue;
            }
            let run = match rec.purpose {
                TokenPurpose::Serve { .. } | TokenPurpose::Relay { .. } => !rec.complete,
                TokenPurpose::Receive { .. } => {
                    rec.used && matches!(rec.status, TransferStatus::Transferring { .. })
                }
            };
            if run {
                info!(migration.id = %rec.migration_id, vm.id = %rec.vm, "resuming transfer");
                self.spawn_transfer(rec);
            }
        }
        Ok(())
    }
}
