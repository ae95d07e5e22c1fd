//! The serving side of a transfer: the source proxy publishes the signed manifest and each of
//! the token's host files into its site's transfer bucket, sealed under the token's content key
//! (see [`crate::seal`]; the file reader seals on its own thread), then waits for the receiving
//! end to acknowledge the digests (see [`TransferProxy::acknowledge`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use nubis_protocol::envelope::{self, Addressing};
use nubis_protocol::message::{
    FileDigest, LocalFile, ManifestFile, TransferManifest, TransferStatus, TransferToken,
};
use sha2::{Digest as _, Sha256};
use tracing::{debug, info};

use crate::io::{shape, spawn_reader, ReadItem};
use crate::naming::TokenObjects;
use crate::objects::{ObjectWriter, META_ALLOCATED, META_SHA256, META_SIZE};
use crate::proxy::{lock, sorted, TransferProxy};
use crate::seal::{ChunkSealer, SealError, SEAL_OVERHEAD};
use crate::store::TokenRecord;
use crate::transfer::{Live, TaskError};

/// The metadata of a file's object: logical size, allocated bytes, whole-file SHA-256.
pub(crate) fn file_metadata(
    size: u64,
    allocated: u64,
    sha256: &[u8; 32],
) -> HashMap<String, String> {
    HashMap::from([
        (META_SIZE.to_string(), size.to_string()),
        (META_ALLOCATED.to_string(), allocated.to_string()),
        (META_SHA256.to_string(), hex::encode(sha256)),
    ])
}

/// [`file_metadata`] as stored: the whole-file digest sealed by `sealer`.
pub(crate) fn sealed_metadata(
    size: u64,
    allocated: u64,
    sha256: &[u8; 32],
    sealer: &ChunkSealer,
) -> Result<HashMap<String, String>, SealError> {
    let mut meta = file_metadata(size, allocated, sha256);
    meta.insert(META_SHA256.to_string(), sealer.seal_digest(sha256)?);
    Ok(meta)
}

impl TransferProxy {
    /// Publishes the manifest and every file not yet published (a resumed task skips those
    /// whose digest is recorded).
    pub(crate) async fn serve(
        &self,
        rec: TokenRecord,
        mut files: Vec<LocalFile>,
        live: Arc<Live>,
    ) -> Result<(), TaskError> {
        files.sort_by(|a, b| a.name.cmp(&b.name));
        self.store_update(&rec.token, |r| {
            r.status = TransferStatus::Transferring {
                bytes_done: 0,
                bytes_total: r.total_bytes,
            }
        })?;
        let objs = TokenObjects::new(&rec.token);
        let mut manifest = TransferManifest {
            vm: rec.vm.clone(),
            files: Vec::new(),
        };
        let mut total = 0;
        for f in &files {
            let sh = shape(Path::new(&f.path)).map_err(|e| TaskError::io(&f.name, e))?;
            total += sh.allocated();
            manifest.files.push(ManifestFile {
                name: f.name.clone(),
                size: sh.size,
                allocated: sh.allocated(),
            });
        }
        live.total.store(total, Ordering::Relaxed);
        self.retrying(|| self.publish_manifest(&objs, &manifest, &rec.token))
            .await?;
        let mut current = self.inner.store.get(&rec.token)?.unwrap_or(rec);
        for f in &files {
            let allocated = manifest
                .files
                .iter()
                .find(|m| m.name == f.name)
                .map(|m| m.allocated)
                .unwrap_or(0);
            if current.digest_of(&f.name).is_some() {
                live.done.fetch_add(allocated, Ordering::Relaxed);
                continue;
            }
            let base = live.done.load(Ordering::Relaxed);
            let digest = self
                .retrying(|| {
                    live.done.store(base, Ordering::Relaxed);
                    self.publish_file(&objs, f, &live, current.token)
                })
                .await?;
            current = self.store_update(&current.token, |r| r.digests.push(digest.clone()))?;
        }
        self.mark_all_published(&current.token, total)?;
        info!(bytes = total, "all files published");
        Ok(())
    }

    /// Records that every file of a serving (or relaying) token is in the bucket; the status
    /// turns `Succeeded` only when the destination acknowledges the digests.
    pub(crate) fn mark_all_published(
        &self,
        token: &TransferToken,
        total: u64,
    ) -> Result<(), TaskError> {
        self.store_update(token, |r| {
            r.complete = true;
            r.digests = sorted(std::mem::take(&mut r.digests));
            r.status = TransferStatus::Transferring {
                bytes_done: total,
                bytes_total: total,
            };
        })?;
        Ok(())
    }

    /// Publishes `manifest` as the manifest object of `token` (whose names `objs` are),
    /// signed by this site and sealed under the token's content key.
    pub(crate) async fn publish_manifest(
        &self,
        objs: &TokenObjects,
        manifest: &TransferManifest,
        token: &TransferToken,
    ) -> Result<(), TaskError> {
        let name = objs.manifest_name();
        let subject = TokenObjects::meta_subject(&name);
        let (raw, _) = envelope::seal_message(
            &self.inner.identity,
            Addressing::broadcast(&subject),
            manifest,
        )
        .map_err(|e| TaskError::Manifest(e.to_string()))?;
        let sealed = self.object_sealer(token, &name)?.seal(0, &raw)?;
        let digest: [u8; 32] = Sha256::digest(&sealed).into();
        let mut w = ObjectWriter::begin(
            &self.inner.js,
            &self.inner.stream,
            &name,
            &objs.nuid(None),
            1,
        )
        .await?;
        w.chunk(0, sealed).await?;
        w.finish(digest, HashMap::new()).await?;
        Ok(())
    }

    /// Publishes host file `f` as the token's object of that name, its allocated extents only.
    async fn publish_file(
        &self,
        objs: &TokenObjects,
        f: &LocalFile,
        live: &Live,
        token: TransferToken,
    ) -> Result<FileDigest, TaskError> {
        let s = &self.inner.settings;
        let name = objs.file_name(&f.name);
        let sealer = self.object_sealer(&token, &name)?;
        let mut rx = spawn_reader(PathBuf::from(&f.path), s.chunk_size, sealer.clone());
        let mut w = ObjectWriter::begin(
            &self.inner.js,
            &self.inner.stream,
            &name,
            &objs.nuid(Some(&f.name)),
            s.publish_window,
        )
        .await?;
        while let Some(item) = rx.recv().await {
            match item {
                ReadItem::Chunk { offset, data } => {
                    let n = data.len() as u64;
                    w.chunk(offset, data).await?;
                    live.done
                        .fetch_add(n.saturating_sub(SEAL_OVERHEAD as u64), Ordering::Relaxed);
                    live.sent.fetch_add(n, Ordering::Relaxed);
                    *lock(&self.inner.published).entry(token).or_default() += n;
                }
                ReadItem::Done {
                    sha256,
                    packed_sha256,
                    size,
                    allocated,
                } => {
                    let meta = sealed_metadata(size, allocated, &sha256, &sealer)?;
                    w.finish(packed_sha256, meta).await?;
                    debug!(file = %f.name, size, allocated, "file published");
                    return Ok(FileDigest {
                        name: f.name.clone(),
                        sha256,
                        len: size,
                    });
                }
                ReadItem::Failed(e) => return Err(TaskError::io(&f.name, e)),
            }
        }
        Err(TaskError::io(
            &f.name,
            std::io::Error::other("reader stopped early"),
        ))
    }
}
