//! Relaying by policy: a proxy between two sites reads the source's objects and publishes them
//! again into its own bucket under its own token, with a manifest signed by its own site, so
//! the far end never learns the source. The chunks go through the same loop as a received
//! file's, with a sink that re-publishes them: opened with the source's content key (obtained
//! as any fetcher obtains it) and sealed again under the relaying token's own key, so the far
//! end holds only the relay's key and no key opens the chunks of both buckets.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_nats::jetstream::stream::Stream;
use bytes::Bytes;
use nubis_protocol::message::{
    Endpoint, FileDigest, ManifestFile, TransferManifest, TransferStatus, TransferToken,
};
use sha2::{Digest as _, Sha256};
use tracing::info;

use crate::chunks::{copy_chunks, ChunkSink};
use crate::hashing::LogicalHasher;
use crate::naming::TokenObjects;
use crate::objects::{ObjectFollower, ObjectWriter, ReadPosition};
use crate::proxy::{lock, TransferProxy};
use crate::seal::{ChunkSealer, ContentKey};
use crate::serve::sealed_metadata;
use crate::store::TokenRecord;
use crate::transfer::{Live, TaskError};
use nubis_bus::CallError;
use nubis_protocol::message::ErrorReply;

impl TransferProxy {
    /// Checks the source token, then relays every file of its manifest not yet relayed.
    pub(crate) async fn relay(
        &self,
        rec: TokenRecord,
        source: Endpoint,
        live: Arc<Live>,
    ) -> Result<(), TaskError> {
        match self
            .inner
            .peers
            .status(&source.proxy, rec.migration_id, source.token)
            .await
        {
            Ok(TransferStatus::Failed { reason }) => return Err(TaskError::Source(reason)),
            Ok(TransferStatus::Succeeded { .. }) => {
                return Err(TaskError::Source("source token already used".to_string()))
            }
            Ok(_) => {}
            Err(CallError::Refused {
                reply: ErrorReply { code, message, .. },
                ..
            }) => return Err(TaskError::Source(format!("{code}: {message}"))),
            Err(e) => return Err(TaskError::Source(e.to_string())),
        }
        let src_stream = self.source_bucket(&source).await?;
        let asked = std::time::Instant::now();
        let key = self.fetch_content_key(&source, rec.migration_id).await?;
        let window = self.inner.settings.fetch_window_for(asked.elapsed());
        let manifest = self.read_manifest(&src_stream, &source, &key).await?;
        let total: u64 = manifest.files.iter().map(|f| f.allocated).sum();
        live.total.store(total, Ordering::Relaxed);
        let names: Vec<String> = manifest.files.iter().map(|f| f.name.clone()).collect();
        let mut current = self.store_update(&rec.token, |r| {
            r.total_bytes = total;
            r.file_names = names;
            r.source = Some(source.clone());
            r.used = true;
            r.status = TransferStatus::Transferring {
                bytes_done: 0,
                bytes_total: total,
            };
        })?;
        let own = TokenObjects::new(&rec.token);
        let from = TokenObjects::new(&source.token);
        // The far end verifies the manifest against this site's key: it never learns the source.
        let own_manifest = TransferManifest {
            vm: rec.vm.clone(),
            files: manifest.files.clone(),
        };
        self.retrying(|| self.publish_manifest(&own, &own_manifest, &rec.token))
            .await?;
        for f in &manifest.files {
            if current.digest_of(&f.name).is_some() {
                live.done.fetch_add(f.allocated, Ordering::Relaxed);
                continue;
            }
            let base = live.done.load(Ordering::Relaxed);
            let digest = self
                .retrying_authentic(&f.name, || {
                    live.done.store(base, Ordering::Relaxed);
                    self.relay_file(&src_stream, &from, &own, f, &live, rec.token, &key, window)
                })
                .await?;
            current = self.store_update(&current.token, |r| r.digests.push(digest.clone()))?;
        }
        self.mark_all_published(&current.token, total)?;
        info!(bytes = total, "all files relayed");
        Ok(())
    }

    /// One attempt at file `f`: reads it from its first chunk, opening the chunks with the
    /// source's `key`, and publishes it again under the own key.
    #[allow(clippy::too_many_arguments)]
    async fn relay_file(
        &self,
        src: &Stream,
        from: &TokenObjects,
        own: &TokenObjects,
        f: &ManifestFile,
        live: &Live,
        token: TransferToken,
        key: &ContentKey,
        window: usize,
    ) -> Result<FileDigest, TaskError> {
        let s = &self.inner.settings;
        let src_name = from.file_name(&f.name);
        let mut follower = ObjectFollower::open(
            src,
            from.chunk_subject(Some(&f.name)),
            &src_name,
            Some(f.allocated),
            window,
            None,
            s.stall(),
            key.opener(&src_name),
        )
        .await?;
        let name = own.file_name(&f.name);
        let sealer = Arc::new(self.object_sealer(&token, &name)?);
        let mut target = RelayTarget {
            proxy: self,
            token,
            file: f,
            name,
            nuid: own.nuid(Some(&f.name)),
            sealer,
            index: 0,
            writer: None,
            whole: LogicalHasher::new(),
            packed: Sha256::new(),
        };
        target.writer = Some(target.begin().await?);
        copy_chunks(f, &mut follower, &mut target, ReadPosition::default(), live).await
    }
}

/// The sink of a relayed file: the file's object in the own bucket, hashed as it goes.
#[derive(Debug)]
struct RelayTarget<'a> {
    proxy: &'a TransferProxy,
    /// The relaying token (its published bytes are counted for [`TransferProxy::stats`]).
    token: TransferToken,
    file: &'a ManifestFile,
    /// Name and nuid of the own object.
    name: String,
    nuid: String,
    /// Seals the own object's chunks in the current write attempt.
    sealer: Arc<ChunkSealer>,
    /// Index of the next chunk of the own object.
    index: u64,
    /// Taken when the object is finished.
    writer: Option<ObjectWriter>,
    /// Digest of the file, holes as zeros.
    whole: LogicalHasher,
    /// ADR-20 digest of the chunk bytes.
    packed: Sha256,
}

impl RelayTarget<'_> {
    /// Starts the own object (again), dropping chunks an earlier attempt left.
    async fn begin(&self) -> Result<ObjectWriter, TaskError> {
        let inner = &self.proxy.inner;
        Ok(ObjectWriter::begin(
            &inner.js,
            &inner.stream,
            &self.name,
            &self.nuid,
            inner.settings.publish_window,
        )
        .await?)
    }

    fn corrupt(&self) -> TaskError {
        TaskError::Corrupt(self.file.name.clone())
    }
}

impl ChunkSink for RelayTarget<'_> {
    async fn restart(&mut self) -> Result<(), TaskError> {
        // The object is written again from its first chunk: a new attempt, with nonces of its own.
        self.sealer = Arc::new(self.proxy.object_sealer(&self.token, &self.name)?);
        self.index = 0;
        self.writer = Some(self.begin().await?);
        self.whole = LogicalHasher::new();
        self.packed = Sha256::new();
        Ok(())
    }

    async fn write(
        &mut self,
        offset: u64,
        data: Bytes,
        _at: ReadPosition,
        _more: bool,
    ) -> Result<(), TaskError> {
        self.whole
            .update(offset, &data)
            .map_err(|_| self.corrupt())?;
        // Sealed on a blocking thread, so the runtime goes on receiving meanwhile.
        let (sealer, index) = (self.sealer.clone(), self.index);
        let data = tokio::task::spawn_blocking(move || sealer.seal(index, &data))
            .await
            .map_err(|e| TaskError::io(&self.file.name, std::io::Error::other(e)))??;
        self.index += 1;
        self.packed.update(&data);
        let n = data.len() as u64;
        let Some(writer) = self.writer.as_mut() else {
            return Err(TaskError::Corrupt(self.file.name.clone()));
        };
        writer.chunk(offset, data).await?;
        *lock(&self.proxy.inner.published)
            .entry(self.token)
            .or_default() += n;
        Ok(())
    }

    async fn digest(&mut self) -> Result<[u8; 32], TaskError> {
        std::mem::take(&mut self.whole)
            .finish(self.file.size)
            .map_err(|_| self.corrupt())
    }

    async fn complete(&mut self, sha256: &[u8; 32]) -> Result<(), TaskError> {
        let packed: [u8; 32] = std::mem::take(&mut self.packed).finalize().into();
        let writer = self.writer.take().ok_or_else(|| self.corrupt())?;
        let meta = sealed_metadata(self.file.size, self.file.allocated, sha256, &self.sealer)?;
        writer.finish(packed, meta).await?;
        Ok(())
    }
}
