//! The chunk loop with a receiving proxy's file sink, fed scripted chunk sequences instead of a
//! bus: gaps, duplicates, a source that starts over, digest mismatches, and resuming from a
//! checkpoint.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use nubis_protocol::message::{HostId, TokenPurpose, TransferStatus, TransferToken};
use nubis_protocol::{MigrationId, VmId};
use nubis_testkit::Backoff;
use sha2::{Digest as _, Sha256};

use super::*;
use crate::receive::{partial_path, FileTarget};
use crate::serve::file_metadata;
use crate::store::{TokenRecord, TokenStore};
use crate::transfer::retry_transient;

/// Bytes per chunk of the sample files.
const CHUNK: usize = 512;

/// A file as its source published it, the way an object follower yields it once opened: its
/// bytes, its plaintext chunks, its manifest entry and the info message of its object in
/// plaintext terms (no ADR-20 digest, the whole-file digest opened).
struct Sample {
    content: Vec<u8>,
    chunks: Vec<(u64, Bytes)>,
    file: ManifestFile,
    info: ObjectInfo,
}

impl Sample {
    /// `count` chunks of data; a sparse sample leaves a hole after every other chunk and at
    /// the end, as a source sends only a file's allocated extents.
    fn new(count: usize, sparse: bool) -> Self {
        let stride = if sparse { 2 * CHUNK } else { CHUNK };
        let size = count * stride;
        let mut content = vec![0u8; size];
        let mut chunks = Vec::new();
        for i in 0..count {
            let offset = i * stride;
            let data: Vec<u8> = (0..CHUNK).map(|j| (i * 31 + j * 7 + 1) as u8).collect();
            content[offset..offset + CHUNK].copy_from_slice(&data);
            chunks.push((offset as u64, Bytes::from(data)));
        }
        let allocated = (count * CHUNK) as u64;
        let sha256: [u8; 32] = Sha256::digest(&content).into();
        let info = serde_json::from_value(serde_json::json!({
            "name": "prefix/disk.img",
            "bucket": "nubis-xfer",
            "nuid": "nuid",
            "size": allocated,
            "chunks": count,
            "metadata": file_metadata(size as u64, allocated, &sha256),
        }))
        .unwrap();
        Self {
            content,
            chunks,
            file: ManifestFile {
                name: "disk.img".to_string(),
                size: size as u64,
                allocated,
            },
            info,
        }
    }

    fn sha256(&self) -> [u8; 32] {
        Sha256::digest(&self.content).into()
    }

    fn chunk(&self, index: usize) -> Step {
        let (offset, data) = self.chunks[index].clone();
        Step::Chunk {
            index: index as u64,
            offset,
            data,
        }
    }

    fn done(&self) -> Step {
        Step::Done(Box::new(self.info.clone()))
    }

    /// The chunks with these indices, in this order, then the info message.
    fn script(&self, indices: impl IntoIterator<Item = usize>) -> VecDeque<Step> {
        let mut steps: VecDeque<Step> = indices.into_iter().map(|i| self.chunk(i)).collect();
        steps.push_back(self.done());
        steps
    }

    /// The object as a follower reads it from `at` on.
    fn from<'a>(&self, at: ReadPosition) -> Script<'a> {
        Script::new(self.script(at.chunks as usize..self.chunks.len()), at)
    }
}

/// One thing a scripted source yields.
enum Step {
    Chunk {
        index: u64,
        offset: u64,
        data: Bytes,
    },
    Done(Box<ObjectInfo>),
    Fail(ObjectError),
}

/// A source that yields its steps and stands where an object follower would after them.
struct Script<'a> {
    steps: VecDeque<Step>,
    at: ReadPosition,
    /// The connection drops before the next chunk once this holds.
    drop_when: Option<Box<dyn Fn() -> bool + 'a>>,
    backoff: Backoff,
}

impl<'a> Script<'a> {
    fn new(steps: VecDeque<Step>, at: ReadPosition) -> Self {
        Self {
            steps,
            at,
            drop_when: None,
            backoff: Backoff::default(),
        }
    }
}

impl ChunkSource for Script<'_> {
    async fn next(&mut self) -> Result<Incoming, ObjectError> {
        if let Some(drop_when) = &self.drop_when {
            if drop_when() {
                return Err(ObjectError::Read("connection lost".to_string()));
            }
            // Give what was written time to reach the disk before the next chunk.
            self.backoff.pause().await;
        }
        match self.steps.pop_front() {
            Some(Step::Chunk {
                index,
                offset,
                data,
            }) => {
                if index == 0 {
                    self.at.chunks = 0;
                    self.at.bytes = 0;
                }
                self.at.chunks += 1;
                self.at.bytes += data.len() as u64;
                self.at.stream_sequence += 1;
                Ok(Incoming::Chunk {
                    index,
                    offset,
                    data,
                })
            }
            Some(Step::Done(info)) => Ok(Incoming::Done(info)),
            Some(Step::Fail(e)) => Err(e),
            None => Err(ObjectError::Stalled(Duration::from_secs(1))),
        }
    }

    fn position(&self) -> ReadPosition {
        self.at
    }
}

/// A receive token in a store of its own, and the directory it receives into.
struct Receiver {
    dir: tempfile::TempDir,
    _store_dir: tempfile::TempDir,
    store: TokenStore,
    fetched: Mutex<HashMap<TransferToken, u64>>,
    token: TransferToken,
}

impl Receiver {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store_dir = tempfile::tempdir().unwrap();
        let store = TokenStore::open(store_dir.path()).unwrap();
        let token = TransferToken::random();
        store
            .put(&TokenRecord {
                token,
                migration_id: MigrationId::random(),
                vm: VmId::new("vm-1").unwrap(),
                host: HostId::new("host-a").unwrap(),
                purpose: TokenPurpose::Receive {
                    dir: dir.path().to_string_lossy().into_owned(),
                },
                created_ms: 0,
                expires_ms: u64::MAX,
                status: TransferStatus::Pending,
                expired: false,
                digests: Vec::new(),
                source: None,
                total_bytes: 0,
                used: true,
                complete: false,
                file_names: Vec::new(),
                max_bytes_per_sec: None,
                partial: None,
                content_key: None,
                seal_attempts: 0,
                fetcher: None,
            })
            .unwrap();
        Self {
            dir,
            _store_dir: store_dir,
            store,
            fetched: Mutex::new(HashMap::new()),
            token,
        }
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn checkpoint(&self) -> Option<crate::store::PartialFile> {
        self.store.get(&self.token).unwrap().unwrap().partial
    }

    fn fetched(&self) -> u64 {
        self.fetched
            .lock()
            .unwrap()
            .get(&self.token)
            .copied()
            .unwrap_or(0)
    }

    /// One attempt at the file, as a receiving proxy makes it: resumed from the recorded
    /// checkpoint if there is one, reading the object from there with `source`.
    async fn attempt<'s>(
        &self,
        sample: &Sample,
        checkpoint_bytes: u64,
        live: &Live,
        source: impl FnOnce(ReadPosition) -> Script<'s>,
    ) -> Result<FileDigest, TaskError> {
        let (target, from) = FileTarget::open(
            &self.store,
            &self.fetched,
            self.token,
            self.dir(),
            &sample.file,
            checkpoint_bytes,
        )
        .await?;
        let start = from.unwrap_or_default();
        let mut source = source(start);
        target.fill(&sample.file, &mut source, start, live).await
    }

    /// Asserts that the file was received whole and nothing partial is left.
    fn assert_received(&self, sample: &Sample, digest: &FileDigest) {
        assert_eq!(digest.sha256, sample.sha256());
        assert_eq!(digest.len, sample.file.size);
        let got = std::fs::read(self.dir().join(&sample.file.name)).unwrap();
        assert!(got == sample.content, "received bytes differ");
        assert!(!partial_path(self.dir(), &sample.file.name).exists());
        assert_eq!(self.checkpoint(), None);
    }
}

#[tokio::test]
async fn chunks_in_order_make_the_file() {
    for sparse in [false, true] {
        let sample = Sample::new(8, sparse);
        let rx = Receiver::new();
        let live = Live::default();
        let digest = rx
            .attempt(&sample, 1 << 20, &live, |at| sample.from(at))
            .await
            .unwrap();
        rx.assert_received(&sample, &digest);
        assert_eq!(live.done.load(Ordering::Relaxed), sample.file.allocated);
        assert_eq!(rx.fetched(), sample.file.allocated);
    }
}

#[tokio::test]
async fn a_missing_chunk_is_a_gap_and_is_read_again() {
    let sample = Sample::new(8, true);
    let rx = Receiver::new();
    let live = Live::default();
    // Chunk 2 never arrives in the first reading.
    let first = rx
        .attempt(&sample, 1 << 20, &live, |at| {
            Script::new(sample.script([0, 1, 3, 4, 5, 6, 7]), at)
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            first,
            TaskError::Gap {
                index: 3,
                expected: 2,
                ..
            }
        ),
        "{first:?}"
    );
    assert!(first.is_transient());
    // The partial file stays for the next reading, which the retry makes.
    assert!(partial_path(rx.dir(), &sample.file.name).exists());

    let rx = Receiver::new();
    let attempts = AtomicUsize::new(0);
    let digest = retry_transient(Duration::from_secs(60), || {
        let n = attempts.fetch_add(1, Ordering::Relaxed);
        let sample = &sample;
        let rx = &rx;
        async move {
            let live = Live::default();
            rx.attempt(sample, 1 << 20, &live, |at| {
                if n == 0 {
                    Script::new(sample.script([0, 1, 3]), at)
                } else {
                    sample.from(at)
                }
            })
            .await
        }
    })
    .await
    .unwrap();
    assert_eq!(attempts.load(Ordering::Relaxed), 2);
    rx.assert_received(&sample, &digest);
}

#[tokio::test]
async fn a_duplicate_chunk_is_a_gap_and_the_file_is_read_again() {
    let sample = Sample::new(6, false);
    let rx = Receiver::new();
    let attempts = AtomicUsize::new(0);
    let digest = retry_transient(Duration::from_secs(60), || {
        let n = attempts.fetch_add(1, Ordering::Relaxed);
        let sample = &sample;
        let rx = &rx;
        async move {
            let live = Live::default();
            let result = rx
                .attempt(sample, 1 << 20, &live, |at| {
                    if n == 0 {
                        Script::new(sample.script([0, 1, 2, 2, 3, 4, 5]), at)
                    } else {
                        sample.from(at)
                    }
                })
                .await;
            if n == 0 {
                assert!(
                    matches!(
                        result,
                        Err(TaskError::Gap {
                            index: 2,
                            expected: 3,
                            ..
                        })
                    ),
                    "{result:?}"
                );
            }
            result
        }
    })
    .await
    .unwrap();
    assert_eq!(attempts.load(Ordering::Relaxed), 2);
    rx.assert_received(&sample, &digest);
}

#[tokio::test]
async fn a_source_that_starts_over_is_followed_from_its_first_chunk() {
    let sample = Sample::new(6, true);
    let rx = Receiver::new();
    let live = Live::default();
    // The source's proxy restarted after publishing three chunks and published the file again.
    let digest = rx
        .attempt(&sample, 1 << 20, &live, |at| {
            Script::new(sample.script([0, 1, 2, 0, 1, 2, 3, 4, 5]), at)
        })
        .await
        .unwrap();
    rx.assert_received(&sample, &digest);
    // Bytes of the abandoned reading are not counted as done.
    assert_eq!(live.done.load(Ordering::Relaxed), sample.file.allocated);
}

#[tokio::test]
async fn a_digest_mismatch_fails_and_leaves_nothing() {
    // The metadata's digest and a chunk's bytes must agree with the file taken. (A chunk
    // altered in the bucket is refused earlier, when it is opened: see `crate::seal`.)
    let mut wrong_metadata = Sample::new(4, true);
    wrong_metadata
        .info
        .metadata
        .insert(META_SHA256.to_string(), hex::encode([7u8; 32]));
    let mut wrong_chunk = Sample::new(4, true);
    let (offset, data) = wrong_chunk.chunks[1].clone();
    let mut bad = data.to_vec();
    bad[0] ^= 0xff;
    wrong_chunk.chunks[1] = (offset, Bytes::from(bad));
    let mut wrong_size = Sample::new(4, false);
    wrong_size
        .info
        .metadata
        .insert(META_SIZE.to_string(), "1".to_string());
    for sample in [wrong_metadata, wrong_chunk, wrong_size] {
        let rx = Receiver::new();
        let live = Live::default();
        let err = rx
            .attempt(&sample, 1, &live, |at| sample.from(at))
            .await
            .unwrap_err();
        assert!(matches!(err, TaskError::DigestMismatch(_)), "{err:?}");
        assert!(!err.is_transient());
        assert!(!partial_path(rx.dir(), &sample.file.name).exists());
        assert!(!rx.dir().join(&sample.file.name).exists());
        assert_eq!(rx.checkpoint(), None);
    }
}

#[tokio::test]
async fn an_info_message_counting_other_chunks_is_corrupt() {
    let mut sample = Sample::new(4, false);
    sample.info.chunks = 5;
    let rx = Receiver::new();
    let live = Live::default();
    let err = rx
        .attempt(&sample, 1 << 20, &live, |at| sample.from(at))
        .await
        .unwrap_err();
    assert!(matches!(err, TaskError::Corrupt(_)), "{err:?}");
    assert!(!partial_path(rx.dir(), &sample.file.name).exists());
}

#[tokio::test]
async fn a_fetch_resumes_from_its_checkpoint() {
    for sparse in [false, true] {
        let sample = Sample::new(64, sparse);
        let rx = Receiver::new();
        // Checkpoint after every chunk; the connection drops once a few chunks are durable.
        let live = Live::default();
        let err = rx
            .attempt(&sample, 1, &live, |at| {
                let mut script = sample.from(at);
                script.drop_when = Some(Box::new(|| {
                    rx.checkpoint().is_some_and(|c| c.position.chunks >= 4)
                }));
                script
            })
            .await
            .unwrap_err();
        assert!(err.is_transient(), "{err:?}");
        let checkpoint = rx.checkpoint().unwrap();
        assert_eq!(checkpoint.name, sample.file.name);
        let held = checkpoint.position.chunks as usize;
        assert!(held >= 4 && held < sample.chunks.len());
        let (last_offset, last_data) = &sample.chunks[held - 1];
        assert_eq!(checkpoint.resume_at, last_offset + last_data.len() as u64);
        assert_eq!(checkpoint.position.bytes, (held * CHUNK) as u64);
        assert!(partial_path(rx.dir(), &sample.file.name).exists());

        // The next attempt reads on from the checkpoint, not from the first chunk.
        let before = rx.fetched();
        let live = Live::default();
        let mut resumed_at = None;
        let digest = rx
            .attempt(&sample, 1, &live, |at| {
                resumed_at = Some(at);
                sample.from(at)
            })
            .await
            .unwrap();
        assert_eq!(resumed_at, Some(checkpoint.position));
        assert_eq!(
            rx.fetched() - before,
            sample.file.allocated - checkpoint.position.bytes
        );
        assert_eq!(live.done.load(Ordering::Relaxed), sample.file.allocated);
        rx.assert_received(&sample, &digest);
    }
}

#[tokio::test]
async fn a_checkpoint_whose_partial_file_is_gone_starts_the_file_over() {
    let sample = Sample::new(16, false);
    let rx = Receiver::new();
    let live = Live::default();
    let _ = rx
        .attempt(&sample, 1, &live, |at| {
            let mut script = sample.from(at);
            script.drop_when = Some(Box::new(|| rx.checkpoint().is_some()));
            script
        })
        .await
        .unwrap_err();
    assert!(rx.checkpoint().is_some());
    std::fs::remove_file(partial_path(rx.dir(), &sample.file.name)).unwrap();
    let mut resumed_at = None;
    let digest = rx
        .attempt(&sample, 1 << 20, &live, |at| {
            resumed_at = Some(at);
            sample.from(at)
        })
        .await
        .unwrap();
    assert_eq!(resumed_at, Some(ReadPosition::default()));
    rx.assert_received(&sample, &digest);
}

#[tokio::test]
async fn bus_trouble_keeps_the_partial_file_for_the_retry() {
    let sample = Sample::new(4, false);
    let rx = Receiver::new();
    let live = Live::default();
    let err = rx
        .attempt(&sample, 1 << 20, &live, |at| {
            let mut steps = sample.script([0, 1]);
            steps.insert(
                2,
                Step::Fail(ObjectError::Read("server restarting".to_string())),
            );
            Script::new(steps, at)
        })
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert!(partial_path(rx.dir(), &sample.file.name).exists());
    // A failure that is not transient removes it.
    let err = rx
        .attempt(&sample, 1 << 20, &live, |at| {
            let mut steps = sample.script([0]);
            steps.push_front(Step::Fail(ObjectError::Deleted));
            Script::new(steps, at)
        })
        .await
        .unwrap_err();
    assert!(!err.is_transient(), "{err:?}");
    assert!(!partial_path(rx.dir(), &sample.file.name).exists());
}
