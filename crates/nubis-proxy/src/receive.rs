//! The receiving side of a transfer (Initiate transfer at the destination proxy): reads the
//! source's manifest, writes each file under a temporary name through the chunk loop, verifies,
//! fsyncs and renames it, and acknowledges the digests to the source.
//!
//! A file being received is checkpointed: every `checkpoint_bytes` an fsync of what was written
//! starts, and once it has finished the position it covers is recorded in the token's record,
//! so a fetch resumed after a restart (or retried after bus trouble) reads only what was not
//! yet durable.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use async_nats::jetstream::stream::Stream;
use bytes::Bytes;
use nubis_protocol::message::{
    FileDigest, ManifestFile, TransferAck, TransferStatus, TransferToken,
};
use tokio::sync::oneshot::{self, error::TryRecvError};
use tracing::{debug, info, warn};

use crate::chunks::{copy_chunks, ChunkSink, ChunkSource};
use crate::io::{sync_dir, FileSink};
use crate::naming::TokenObjects;
use crate::objects::{ObjectFollower, ReadPosition};
use crate::proxy::{lock, sorted, TransferProxy};
use crate::seal::ContentKey;
use crate::store::{PartialFile, TokenRecord, TokenStore};
use crate::transfer::{update_record, Live, TaskError};

/// The temporary name a file is received under; hidden, and never the final name.
pub fn partial_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(".{name}.nubis-partial"))
}

impl TransferProxy {
    /// Fetches every file of the source's manifest into `dir`, then acknowledges the digests
    /// to the source and turns succeeded once the source confirms them.
    pub(crate) async fn receive(
        &self,
        rec: TokenRecord,
        dir: PathBuf,
        live: Arc<Live>,
    ) -> Result<(), TaskError> {
        let source = rec
            .source
            .clone()
            .ok_or_else(|| TaskError::Source("no source recorded".to_string()))?;
        let stream = self.source_bucket(&source).await?;
        let asked = std::time::Instant::now();
        let key = self.fetch_content_key(&source, rec.migration_id).await?;
        // The key's round trip measures the link to the source: the window follows it.
        let window = self.inner.settings.fetch_window_for(asked.elapsed());
        debug!(
            window,
            rtt_ms = asked.elapsed().as_millis() as u64,
            "fetch window"
        );
        let manifest = self.read_manifest(&stream, &source, &key).await?;
        let total: u64 = manifest.files.iter().map(|f| f.allocated).sum();
        live.total.store(total, Ordering::Relaxed);
        let names: Vec<String> = manifest.files.iter().map(|f| f.name.clone()).collect();
        let mut current = self.store_update(&rec.token, |r| {
            r.total_bytes = total;
            r.file_names = names;
        })?;
        let objs = TokenObjects::new(&source.token);
        for f in &manifest.files {
            if let Some(d) = current.digest_of(&f.name) {
                // Verified and renamed before a restart: keep it if it is still there intact.
                let ok = std::fs::metadata(dir.join(&f.name)).is_ok_and(|m| m.len() == d.len);
                if ok {
                    live.done.fetch_add(f.allocated, Ordering::Relaxed);
                    continue;
                }
            }
            let base = live.done.load(Ordering::Relaxed);
            let digest = self
                .retrying_authentic(&f.name, || {
                    live.done.store(base, Ordering::Relaxed);
                    self.receive_file(&stream, &objs, f, &dir, &live, rec.token, &key, window)
                })
                .await?;
            current = self.store_update(&current.token, |r| {
                r.digests.retain(|d| d.name != digest.name);
                r.digests.push(digest.clone());
            })?;
        }
        let digests = sorted(current.digests.clone());
        self.store_update(&current.token, |r| r.complete = true)?;
        // The source's status turns succeeded only on this acknowledgement; ours only when the
        // source confirms our digests equal what it served.
        let ack = TransferAck {
            migration_id: rec.migration_id,
            token: source.token,
            digests: digests.clone(),
        };
        let confirmed = self
            .retrying(|| async {
                self.inner
                    .peers
                    .ack(&source.proxy, &ack)
                    .await
                    .map_err(TaskError::from_source_call)
            })
            .await?;
        match confirmed {
            TransferStatus::Succeeded { digests: d } if d == digests => {
                self.store_update(&current.token, |r| {
                    r.status = TransferStatus::Succeeded {
                        digests: digests.clone(),
                    }
                })?;
                info!("transfer verified and acknowledged");
                Ok(())
            }
            other => Err(TaskError::Source(format!(
                "source did not confirm the digests: {other:?}"
            ))),
        }
    }

    /// One attempt at file `f`: resumes its partial file from the last checkpoint when there
    /// is one, and follows the object from there, `window` chunks at a time, opening its
    /// chunks with `key`.
    #[allow(clippy::too_many_arguments)]
    async fn receive_file(
        &self,
        stream: &Stream,
        objs: &TokenObjects,
        f: &ManifestFile,
        dir: &Path,
        live: &Live,
        token: TransferToken,
        key: &ContentKey,
        window: usize,
    ) -> Result<FileDigest, TaskError> {
        let s = &self.inner.settings;
        let name = objs.file_name(&f.name);
        let (target, from) = FileTarget::open(
            &self.inner.store,
            &self.inner.fetched,
            token,
            dir,
            f,
            s.checkpoint_bytes,
        )
        .await?;
        let mut follower = ObjectFollower::open(
            stream,
            objs.chunk_subject(Some(&f.name)),
            &name,
            Some(f.allocated),
            window,
            from,
            s.stall(),
            key.opener(&name),
        )
        .await?;
        target
            .fill(f, &mut follower, from.unwrap_or_default(), live)
            .await
    }
}

/// The sink of a file being received: its partial file, checkpointed into the token's record,
/// renamed to the file's name once verified.
#[derive(Debug)]
pub(crate) struct FileTarget<'a> {
    store: &'a TokenStore,
    /// Chunk bytes read from a source bucket per token (for [`TransferProxy::stats`]).
    fetched: &'a Mutex<HashMap<TransferToken, u64>>,
    token: TransferToken,
    name: String,
    dir: PathBuf,
    partial: PathBuf,
    /// Taken when the file is finished.
    sink: Option<FileSink>,
    checkpoints: Checkpoints,
}

impl<'a> FileTarget<'a> {
    /// Opens the partial file of `f` in `dir`: resumed from the token's last checkpoint of
    /// this file if the file is still there as it was recorded (the position to read on from
    /// is returned with it), otherwise created afresh.
    pub(crate) async fn open(
        store: &'a TokenStore,
        fetched: &'a Mutex<HashMap<TransferToken, u64>>,
        token: TransferToken,
        dir: &Path,
        f: &ManifestFile,
        checkpoint_bytes: u64,
    ) -> Result<(Self, Option<ReadPosition>), TaskError> {
        let partial = partial_path(dir, &f.name);
        let checkpoint = store
            .get(&token)?
            .and_then(|r| r.partial)
            .filter(|p| p.name == f.name);
        let resumed = match checkpoint {
            Some(p) => match FileSink::resume(partial.clone(), f.size, p.resume_at).await {
                Ok(sink) => Some((sink, p)),
                Err(e) => {
                    warn!(file = %f.name, error = %e, "cannot resume the partial file; starting it over");
                    None
                }
            },
            None => None,
        };
        let (sink, from) = match resumed {
            Some((sink, p)) => {
                info!(file = %f.name, bytes = p.position.bytes, "resuming the file");
                (sink, Some(p.position))
            }
            None => (
                FileSink::create(partial.clone(), f.size).map_err(|e| TaskError::io(&f.name, e))?,
                None,
            ),
        };
        let target = Self {
            store,
            fetched,
            token,
            name: f.name.clone(),
            dir: dir.to_path_buf(),
            partial,
            sink: Some(sink),
            checkpoints: Checkpoints::new(checkpoint_bytes),
        };
        Ok((target, from))
    }

    /// Runs the chunk loop from `source` (standing at `start`) into this file. On bus trouble
    /// the partial file and its checkpoint stay for the next attempt to resume; on any other
    /// failure they go.
    pub(crate) async fn fill(
        mut self,
        f: &ManifestFile,
        source: &mut impl ChunkSource,
        start: ReadPosition,
        live: &Live,
    ) -> Result<FileDigest, TaskError> {
        match copy_chunks(f, source, &mut self, start, live).await {
            Ok(d) => {
                debug!(file = %f.name, "file verified");
                Ok(d)
            }
            Err(e) if e.is_transient() => Err(e),
            Err(e) => {
                let _ = std::fs::remove_file(&self.partial);
                let _ = self.store.update(&self.token, |r| r.partial = None);
                Err(e)
            }
        }
    }
}

/// The chunk loop used a file target after it finished the file.
fn finished(name: &str) -> TaskError {
    TaskError::io(name, std::io::Error::other("file already finished"))
}

impl ChunkSink for FileTarget<'_> {
    async fn restart(&mut self) -> Result<(), TaskError> {
        // A checkpoint of the earlier attempt no longer applies.
        let sink = self.sink.as_mut().ok_or_else(|| finished(&self.name))?;
        sink.reset()
            .await
            .map_err(|e| TaskError::io(&self.name, e))?;
        self.checkpoints.reset();
        update_record(self.store, &self.token, |r| r.partial = None)?;
        Ok(())
    }

    async fn write(
        &mut self,
        offset: u64,
        data: Bytes,
        at: ReadPosition,
        more: bool,
    ) -> Result<(), TaskError> {
        let n = data.len() as u64;
        *lock(self.fetched).entry(self.token).or_default() += n;
        let name = &self.name;
        let sink = self.sink.as_mut().ok_or_else(|| finished(name))?;
        if let Err(e) = sink.write(offset, data).await {
            return Err(TaskError::Corrupt(format!("{name} ({e})")));
        }
        let checkpoint = || PartialFile {
            name: name.clone(),
            position: at,
            resume_at: offset + n,
        };
        let durable = self
            .checkpoints
            .after_write(sink, n, more, checkpoint)
            .await
            .map_err(|e| TaskError::io(name, e))?;
        if let Some(durable) = durable {
            update_record(self.store, &self.token, |r| r.partial = Some(durable))?;
        }
        Ok(())
    }

    async fn digest(&mut self) -> Result<[u8; 32], TaskError> {
        let sink = self.sink.take().ok_or_else(|| finished(&self.name))?;
        sink.finish()
            .await
            .map_err(|e| TaskError::io(&self.name, e))
    }

    async fn complete(&mut self, _sha256: &[u8; 32]) -> Result<(), TaskError> {
        let target = self.dir.join(&self.name);
        std::fs::rename(&self.partial, &target).map_err(|e| TaskError::io(&self.name, e))?;
        sync_dir(&self.dir).map_err(|e| TaskError::io(&self.name, e))?;
        update_record(self.store, &self.token, |r| r.partial = None)?;
        Ok(())
    }
}

/// Checkpoints of a file being received: every `every` bytes an fsync of what was written is
/// started, and the position it covers becomes durable (to be recorded) once it has finished.
#[derive(Debug)]
struct Checkpoints {
    every: u64,
    since: u64,
    syncing: Option<(oneshot::Receiver<std::io::Result<()>>, PartialFile)>,
}

impl Checkpoints {
    fn new(every: u64) -> Self {
        Self {
            every,
            since: 0,
            syncing: None,
        }
    }

    /// Forgets the progress of an attempt that started over.
    fn reset(&mut self) {
        self.since = 0;
        self.syncing = None;
    }

    /// Counts `n` more bytes written to `sink`. Returns the checkpoint whose bytes reached the
    /// disk since the last call, if any; starts the next fsync when one is due, no other is
    /// running, and `more` bytes are still to come (`at` says where the file stands then).
    async fn after_write(
        &mut self,
        sink: &mut FileSink,
        n: u64,
        more: bool,
        at: impl FnOnce() -> PartialFile,
    ) -> std::io::Result<Option<PartialFile>> {
        self.since += n;
        let mut durable = None;
        if let Some((rx, _)) = self.syncing.as_mut() {
            match rx.try_recv() {
                Err(TryRecvError::Empty) => {}
                Ok(synced) => {
                    synced?;
                    durable = self.syncing.take().map(|(_, checkpoint)| checkpoint);
                }
                Err(TryRecvError::Closed) => return Err(std::io::Error::other("sync lost")),
            }
        }
        if self.since >= self.every && more && self.syncing.is_none() {
            self.since = 0;
            let rx = sink.start_sync().await?;
            self.syncing = Some((rx, at()));
        }
        Ok(durable)
    }
}
