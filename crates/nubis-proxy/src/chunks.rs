//! The chunk loop over one file's object in another proxy's bucket, shared by a receiving proxy
//! (its sink writes the file, [`crate::receive`]) and a relaying one (its sink publishes the
//! chunks again into the own bucket, [`crate::relay`]).
//!
//! Chunks come in order from a [`ChunkSource`] (an [`ObjectFollower`] on the bus) and go to a
//! [`ChunkSink`]:
//!
//! - a chunk 0 where a later one was due means the source started the file over (its proxy
//!   restarted), so the sink starts over too;
//! - any other chunk out of place (one missing, or one seen already) is a [`TaskError::Gap`],
//!   a transient failure: the caller reads the object again from its last durable position,
//!   which fetches the missing chunks again;
//! - when the object's info message arrives, the chunks and bytes taken must be what it
//!   counts (in plaintext terms, as the source yields it), and the file's digest must equal the
//!   one in its metadata before the sink may complete the file. (The ADR-20 digest covers the
//!   sealed chunk bytes, whose every chunk was authenticated already.)

use std::sync::atomic::Ordering;

use async_nats::jetstream::object_store::ObjectInfo;
use bytes::Bytes;
use nubis_protocol::message::{FileDigest, ManifestFile};

use crate::objects::{Incoming, ObjectError, ObjectFollower, ReadPosition, META_SHA256, META_SIZE};
use crate::transfer::{pace, Live, TaskError};

/// Where the chunks of one object come from.
pub(crate) trait ChunkSource {
    /// The next chunk, or the info message once every chunk it counts has been yielded.
    async fn next(&mut self) -> Result<Incoming, ObjectError>;

    /// Where the reader stands after the chunks yielded so far.
    fn position(&self) -> ReadPosition;
}

impl ChunkSource for ObjectFollower {
    async fn next(&mut self) -> Result<Incoming, ObjectError> {
        ObjectFollower::next(self).await
    }

    fn position(&self) -> ReadPosition {
        ObjectFollower::position(self)
    }
}

/// Where the chunks of one object go.
pub(crate) trait ChunkSink {
    /// The source started the file over: forget every chunk taken so far.
    async fn restart(&mut self) -> Result<(), TaskError>;

    /// Takes the chunk whose bytes belong at `offset`; `at` is where the reader stands with
    /// it, `more` whether bytes of the file are still to come after it.
    async fn write(
        &mut self,
        offset: u64,
        data: Bytes,
        at: ReadPosition,
        more: bool,
    ) -> Result<(), TaskError>;

    /// Every chunk is in: the SHA-256 of the whole file as taken, holes as zeros.
    async fn digest(&mut self) -> Result<[u8; 32], TaskError>;

    /// The file was verified as `sha256`: makes it final.
    async fn complete(&mut self, sha256: &[u8; 32]) -> Result<(), TaskError>;
}

/// Moves file `f`'s chunks from `source` to `sink` until the object is complete and verified.
/// `start` is where `source` stands when the sink already holds the object's first chunks (a
/// resumed file). Counts the bytes in `live` and keeps to its bandwidth cap.
pub(crate) async fn copy_chunks(
    f: &ManifestFile,
    source: &mut impl ChunkSource,
    sink: &mut impl ChunkSink,
    start: ReadPosition,
    live: &Live,
) -> Result<FileDigest, TaskError> {
    let mut expected = start.chunks;
    let mut got = start.bytes;
    live.done.fetch_add(got, Ordering::Relaxed);
    loop {
        match source.next().await? {
            Incoming::Chunk {
                index,
                offset,
                data,
            } => {
                if index == 0 && expected != 0 {
                    sink.restart().await?;
                    live.done.fetch_sub(got, Ordering::Relaxed);
                    expected = 0;
                    got = 0;
                } else if index != expected {
                    return Err(TaskError::Gap {
                        name: f.name.clone(),
                        index,
                        expected,
                    });
                }
                let n = data.len() as u64;
                pace(live, n).await;
                let more = got + n < f.allocated;
                sink.write(offset, data, source.position(), more).await?;
                expected += 1;
                got += n;
                live.done.fetch_add(n, Ordering::Relaxed);
            }
            Incoming::Done(info) => {
                if info.chunks as u64 != expected || info.size as u64 != got {
                    return Err(TaskError::Corrupt(format!(
                        "{} ({expected} chunks of {}, {got} bytes of {})",
                        f.name, info.chunks, info.size
                    )));
                }
                let sha256 = sink.digest().await?;
                if !verified(f, &info, &sha256) {
                    return Err(TaskError::DigestMismatch(f.name.clone()));
                }
                sink.complete(&sha256).await?;
                return Ok(FileDigest {
                    name: f.name.clone(),
                    sha256,
                    len: f.size,
                });
            }
        }
    }
}

/// Whether a file of the manifest, taken whole with digest `sha256`, is what the source's info
/// message describes.
fn verified(f: &ManifestFile, info: &ObjectInfo, sha256: &[u8; 32]) -> bool {
    let digest_ok = info
        .metadata
        .get(META_SHA256)
        .is_some_and(|want| *want == hex::encode(sha256));
    let size_ok = info
        .metadata
        .get(META_SIZE)
        .is_some_and(|v| v.parse::<u64>().ok() == Some(f.size));
    digest_ok && size_ok
}

#[cfg(test)]
mod tests;
