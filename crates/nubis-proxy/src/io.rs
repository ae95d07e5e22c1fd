//! Blocking file I/O of a transfer, on threads of their own so hashing, sealing and disk work
//! overlap with the network: a reader that turns a host file into sealed chunks of its
//! allocated extents, and a sink that writes chunks into a temporary file and hashes it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, oneshot};

use crate::extents::{data_extents, Extent};
use crate::hashing::LogicalHasher;
use crate::seal::{ChunkSealer, NONCE_LEN, SEAL_OVERHEAD};

/// Chunks read ahead of the network, per file.
const READ_AHEAD: usize = 4;

/// Size and allocation of a host file.
#[derive(Debug, Clone)]
pub struct FileShape {
    /// Length in bytes.
    pub size: u64,
    /// Allocated extents.
    pub extents: Vec<Extent>,
}

impl FileShape {
    /// Bytes in the allocated extents.
    pub fn allocated(&self) -> u64 {
        self.extents.iter().map(|e| e.len).sum()
    }

    /// Whether the file has no holes (its chunk bytes are the whole file).
    pub fn is_dense(&self) -> bool {
        self.allocated() == self.size
    }
}

/// Looks at a regular file's size and extents.
pub fn shape(path: &Path) -> io::Result<FileShape> {
    let f = File::open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    let size = meta.len();
    let extents = data_extents(&f, size)?;
    Ok(FileShape { size, extents })
}

/// What the reader sends.
#[derive(Debug)]
pub enum ReadItem {
    /// The next chunk of allocated data, sealed.
    Chunk {
        /// Its offset in the file.
        offset: u64,
        /// Its sealed bytes (the plaintext is [`SEAL_OVERHEAD`] bytes shorter).
        data: Bytes,
    },
    /// End of file.
    Done {
        /// SHA-256 of the whole file, holes as zeros.
        sha256: [u8; 32],
        /// SHA-256 of the sealed chunk bytes in order (the ADR-20 digest).
        packed_sha256: [u8; 32],
        /// The file's length.
        size: u64,
        /// Bytes sent in chunks.
        allocated: u64,
    },
    /// Reading failed.
    Failed(io::Error),
}

/// Reads `path` in chunks of at most `chunk_size` on a blocking thread, sealing each with
/// `sealer` (the chunks are numbered from 0).
pub fn spawn_reader(
    path: PathBuf,
    chunk_size: usize,
    sealer: ChunkSealer,
) -> mpsc::Receiver<ReadItem> {
    let (tx, rx) = mpsc::channel(READ_AHEAD);
    tokio::task::spawn_blocking(move || {
        if let Err(e) = read_file(&path, chunk_size, &sealer, &tx) {
            let _ = tx.blocking_send(ReadItem::Failed(e));
        }
    });
    rx
}

fn read_file(
    path: &Path,
    chunk_size: usize,
    sealer: &ChunkSealer,
    tx: &mpsc::Sender<ReadItem>,
) -> io::Result<()> {
    let f = File::open(path)?;
    let size = f.metadata()?.len();
    let extents = data_extents(&f, size)?;
    let mut whole = LogicalHasher::new();
    let mut packed = Sha256::new();
    let mut allocated = 0u64;
    let mut index = 0u64;
    for ext in extents {
        let mut off = ext.offset;
        let end = ext.offset + ext.len;
        while off < end {
            let n = (end - off).min(chunk_size as u64) as usize;
            // Read straight behind the nonce's room and sealed in place: no copy of the bytes.
            let mut buf = ChunkSealer::buffer(n);
            buf.resize(NONCE_LEN + n, 0);
            f.read_exact_at(&mut buf[NONCE_LEN..], off)?;
            whole
                .update(off, &buf[NONCE_LEN..])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            let data = sealer.seal_buffer(index, buf).map_err(io::Error::other)?;
            debug_assert_eq!(data.len(), n + SEAL_OVERHEAD);
            packed.update(&data);
            index += 1;
            allocated += n as u64;
            if tx
                .blocking_send(ReadItem::Chunk { offset: off, data })
                .is_err()
            {
                // The publisher gave up; nothing left to do.
                return Ok(());
            }
            off += n as u64;
        }
    }
    let sha256 = whole
        .finish(size)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let packed_sha256 = packed.finalize().into();
    let _ = tx.blocking_send(ReadItem::Done {
        sha256,
        packed_sha256,
        size,
        allocated,
    });
    Ok(())
}

/// Commands to a [`FileSink`] thread.
#[derive(Debug)]
enum SinkCmd {
    Reset,
    Sync {
        reply: oneshot::Sender<io::Result<()>>,
    },
    Data {
        offset: u64,
        data: Bytes,
    },
    Finish {
        reply: oneshot::Sender<io::Result<[u8; 32]>>,
    },
}

/// Writes a file of known size from its extents on a blocking thread, holes left as holes, and
/// hashes it as written.
#[derive(Debug)]
pub struct FileSink {
    tx: mpsc::Sender<SinkCmd>,
    done: Option<tokio::task::JoinHandle<io::Result<()>>>,
}

fn sink_closed() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "file writer stopped")
}

impl FileSink {
    /// Creates (truncates) `path` with length `size`.
    pub fn create(path: PathBuf, size: u64) -> io::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&path)?;
        file.set_len(size)?;
        Ok(Self::spawn(file, size, LogicalHasher::new()))
    }

    /// Reopens `path`, a file of length `size` whose bytes before `resume_at` were written
    /// (and synced) by an earlier sink, to go on writing at `resume_at`. The kept part is read
    /// back to hash it (its allocated extents only); the caller verifies the whole file at the
    /// end as usual. Fails if the file is missing or has another length.
    pub async fn resume(path: PathBuf, size: u64, resume_at: u64) -> io::Result<Self> {
        let (file, hasher) = tokio::task::spawn_blocking(move || -> io::Result<_> {
            let file = OpenOptions::new().read(true).write(true).open(&path)?;
            if file.metadata()?.len() != size || resume_at > size {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "partial file does not match what was recorded",
                ));
            }
            let mut hasher = LogicalHasher::new();
            let mut buf = vec![0u8; 1 << 20];
            for ext in data_extents(&file, resume_at)? {
                let (mut off, end) = (ext.offset, (ext.offset + ext.len).min(resume_at));
                while off < end {
                    let n = (end - off).min(buf.len() as u64) as usize;
                    file.read_exact_at(&mut buf[..n], off)?;
                    hasher
                        .update(off, &buf[..n])
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    off += n as u64;
                }
            }
            Ok((file, hasher))
        })
        .await
        .map_err(io::Error::other)??;
        Ok(Self::spawn(file, size, hasher))
    }

    fn spawn(file: File, size: u64, hasher: LogicalHasher) -> Self {
        let (tx, mut rx) = mpsc::channel::<SinkCmd>(READ_AHEAD);
        let done = tokio::task::spawn_blocking(move || -> io::Result<()> {
            let mut hasher = hasher;
            while let Some(cmd) = rx.blocking_recv() {
                match cmd {
                    SinkCmd::Reset => {
                        // Start over: drop what was written so no stale extent survives.
                        file.set_len(0)?;
                        file.set_len(size)?;
                        hasher = LogicalHasher::new();
                    }
                    SinkCmd::Sync { reply } => {
                        // fdatasync on a second handle of the same file, on a thread of its
                        // own: it covers every write made before it, and the writes after it
                        // go on meanwhile.
                        let handle = file.try_clone()?;
                        std::thread::spawn(move || {
                            let _ = reply.send(handle.sync_data());
                        });
                    }
                    SinkCmd::Data { offset, data } => {
                        if offset + data.len() as u64 > size {
                            return Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                "chunk beyond the end of the file",
                            ));
                        }
                        hasher
                            .update(offset, &data)
                            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                        file.write_all_at(&data, offset)?;
                    }
                    SinkCmd::Finish { reply } => {
                        let r = std::mem::take(&mut hasher)
                            .finish(size)
                            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
                            .and_then(|d| file.sync_all().map(|()| d));
                        let _ = reply.send(r);
                        return Ok(());
                    }
                }
            }
            Ok(())
        });
        Self {
            tx,
            done: Some(done),
        }
    }

    async fn failure(&mut self) -> io::Error {
        match self.done.take() {
            Some(h) => match h.await {
                Ok(Err(e)) => e,
                _ => sink_closed(),
            },
            None => sink_closed(),
        }
    }

    /// Writes `data` at `offset` (offsets must increase).
    pub async fn write(&mut self, offset: u64, data: Bytes) -> io::Result<()> {
        if self.tx.send(SinkCmd::Data { offset, data }).await.is_err() {
            return Err(self.failure().await);
        }
        Ok(())
    }

    /// Starts making everything written so far durable, without holding up later writes; the
    /// answer arrives when those bytes are on disk.
    pub async fn start_sync(&mut self) -> io::Result<oneshot::Receiver<io::Result<()>>> {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(SinkCmd::Sync { reply }).await.is_err() {
            return Err(self.failure().await);
        }
        Ok(rx)
    }

    /// Discards everything written.
    pub async fn reset(&mut self) -> io::Result<()> {
        if self.tx.send(SinkCmd::Reset).await.is_err() {
            return Err(self.failure().await);
        }
        Ok(())
    }

    /// Fsyncs the file and returns its SHA-256.
    pub async fn finish(mut self) -> io::Result<[u8; 32]> {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(SinkCmd::Finish { reply }).await.is_err() {
            return Err(self.failure().await);
        }
        match rx.await {
            Ok(r) => r,
            Err(_) => Err(self.failure().await),
        }
    }
}

/// Makes a rename into `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
