//! The transfer bucket in the ADR-20 object-store format, written faster than the stock
//! `ObjectStore::put`.
//!
//! The format is unchanged, so any NATS client can list and read the objects: chunks on
//! `$O.nubis-xfer.C.<nuid>`, then one info message (JSON, `Nats-Rollup: sub`) on
//! `$O.nubis-xfer.M.<base64url(name)>` with `name`, `nuid`, `size`, `chunks` and
//! `digest = "SHA-256=<base64url>"` of the chunk bytes. What differs is how it is written:
//! the stock writer waits for each chunk's acknowledgement before sending the next, so it is
//! bound by round trips; [`ObjectWriter`] keeps a bounded window of acknowledgements
//! outstanding and awaits them in order. Chunks also carry a `Nubis-Offset` header (where the
//! bytes belong in the file; a sparse file sends only its allocated extents) and a `Nubis-Chunk`
//! index. The info message carries in `metadata` the file's logical size, allocated bytes and
//! whole-file SHA-256 (holes as zeros). Chunk payloads and that digest are sealed under the
//! transfer's content key ([`crate::seal`]): a stock reader gets the object's sealed bytes, and
//! the ADR-20 `digest` and `size` are those of the sealed bytes.
//!
//! [`ObjectFollower`] reads an object while it is still being written: the nuid is derived from
//! the token (see [`crate::naming`]), so the reader follows the chunk subject with an ordered
//! pull consumer before the info message exists, and knows the object is complete when an info
//! message written after those chunks counts them all (it is always written after the last
//! chunk was acknowledged). It asks for a bounded number of chunks at a time, so the bytes in
//! flight towards the reader are bounded too, and it can start after a given stream sequence
//! (a reader that resumes a file it partly received).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::consumer::pull::{Ordered, OrderedConfig};
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::object_store::ObjectInfo;
use async_nats::jetstream::stream::{LastRawMessageErrorKind, Stream};
use async_nats::jetstream::{self, ErrorCode as JsErrorCode};
use async_nats::HeaderMap;
use base64::engine::general_purpose::URL_SAFE;
use base64::Engine as _;
use bytes::Bytes;
use futures::StreamExt as _;

use crate::naming::{BUCKET, STREAM};
use crate::seal::{ChunkOpener, SealError, SEAL_OVERHEAD};

/// Chunk header: the file offset of the chunk's first byte.
pub const OFFSET_HEADER: &str = "Nubis-Offset";
/// Chunk header: the chunk's index within the object, from 0.
pub const CHUNK_HEADER: &str = "Nubis-Chunk";
/// Info metadata: the file's logical size in bytes.
pub const META_SIZE: &str = "nubis-size";
/// Info metadata: bytes in the file's allocated extents.
pub const META_ALLOCATED: &str = "nubis-allocated";
/// Info metadata: SHA-256 of the whole file, holes read as zeros, sealed under the transfer's
/// content key and hex-encoded (an [`ObjectFollower`] yields it opened, as plain hex).
pub const META_SHA256: &str = "nubis-sha256";

/// Why an object could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    /// The bucket could not be created or found.
    #[error("transfer bucket unavailable: {0}")]
    Bucket(String),
    /// The bucket reached its configured size.
    #[error("transfer bucket is full")]
    BucketFull,
    /// Publishing a chunk or info message failed.
    #[error("publish failed: {0}")]
    Publish(String),
    /// Reading failed.
    #[error("read failed: {0}")]
    Read(String),
    /// Nothing arrived for too long.
    #[error("no data for {0:?}")]
    Stalled(Duration),
    /// An info or chunk message is not what the format requires.
    #[error("malformed object: {0}")]
    Malformed(String),
    /// The object was deleted.
    #[error("object was deleted")]
    Deleted,
    /// A chunk, or the sealed digest, failed authentication (see [`crate::seal`]): it was
    /// altered in the bucket, moved from another position, or sealed under another key.
    #[error(transparent)]
    Unauthentic(#[from] SealError),
}

/// Most consumers the transfer bucket holds at once. Partners create them to fetch (one per
/// object being read), and NATS permissions cannot say how many a partner may create, so the
/// stream itself bounds them.
pub const MAX_CONSUMERS: i32 = 256;

/// Longest a consumer of the transfer bucket may stay without activity before the server
/// deletes it, whatever its creator asked: a consumer left behind, durable or not, goes away.
/// The proxies' own readers ask for less.
pub const CONSUMER_INACTIVE_LIMIT: Duration = Duration::from_secs(60);

/// The consumer limits of the transfer bucket.
fn consumer_limits() -> jetstream::stream::ConsumerLimits {
    jetstream::stream::ConsumerLimits {
        inactive_threshold: CONSUMER_INACTIVE_LIMIT,
        max_ack_pending: 0,
    }
}

/// The bucket in this site's domain, created with `max_bytes` if missing: the stream of the
/// ADR-20 object store `nubis-xfer`, with a bound on its consumers. An existing bucket gets the
/// consumer limits if it lacks them (its consumer count cannot be changed after creation).
pub async fn ensure_bucket(js: &jetstream::Context, max_bytes: i64) -> Result<Stream, ObjectError> {
    if let Ok(mut stream) = js.get_stream(STREAM).await {
        let mut config = stream.cached_info().config.clone();
        if config.consumer_limits != Some(consumer_limits()) {
            config.consumer_limits = Some(consumer_limits());
            js.update_stream(config)
                .await
                .map_err(|e| ObjectError::Bucket(e.to_string()))?;
            stream
                .info()
                .await
                .map_err(|e| ObjectError::Bucket(e.to_string()))?;
        }
        return Ok(stream);
    }
    js.create_stream(jetstream::stream::Config {
        name: STREAM.to_string(),
        description: Some("nubis transfer proxies: VM files in flight".to_string()),
        subjects: vec![format!("$O.{BUCKET}.C.>"), format!("$O.{BUCKET}.M.>")],
        max_bytes,
        storage: jetstream::stream::StorageType::File,
        discard: jetstream::stream::DiscardPolicy::New,
        allow_rollup: true,
        allow_direct: true,
        max_consumers: MAX_CONSUMERS,
        consumer_limits: Some(consumer_limits()),
        ..Default::default()
    })
    .await
    .map_err(|e| ObjectError::Bucket(e.to_string()))
}

/// A consumer name nobody can guess ahead of its creation, so that no partner can take it
/// first: a process-wide counter hashed with the standard library's randomly keyed hasher.
fn consumer_name() -> String {
    use std::hash::BuildHasher as _;
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let hash = std::collections::hash_map::RandomState::new().hash_one(seq);
    format!("nubis-{hash:016x}{seq:x}")
}

/// The bucket of another site (or this one), without creating it.
pub async fn open_bucket(js: &jetstream::Context) -> Result<Stream, ObjectError> {
    js.get_stream(STREAM)
        .await
        .map_err(|e| ObjectError::Bucket(e.to_string()))
}

fn publish_error(e: async_nats::jetstream::context::PublishError) -> ObjectError {
    // The server answers a full stream (discard-new) with "maximum bytes exceeded" under one of
    // these codes; name it, so the site can tell "full" from "broken".
    let full = std::error::Error::source(&e)
        .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>())
        .is_some_and(|je| {
            je.error_code() == JsErrorCode::STREAM_STORE_FAILED
                || je.error_code() == JsErrorCode::STORAGE_RESOURCES_EXCEEDED
                || je.to_string().contains("maximum bytes")
        });
    if full {
        ObjectError::BucketFull
    } else {
        ObjectError::Publish(e.to_string())
    }
}

/// Writes one object: chunks with a bounded window of outstanding acknowledgements, then the
/// info message.
#[derive(Debug)]
pub struct ObjectWriter {
    js: jetstream::Context,
    name: String,
    nuid: String,
    subject: String,
    window: usize,
    in_flight: VecDeque<PublishAckFuture>,
    chunks: u64,
    size: u64,
    max_chunk: usize,
}

impl ObjectWriter {
    /// Starts object `name` with chunks under `nuid`, purging chunks a previous attempt left.
    pub async fn begin(
        js: &jetstream::Context,
        stream: &Stream,
        name: &str,
        nuid: &str,
        window: usize,
    ) -> Result<Self, ObjectError> {
        let subject = format!("$O.{BUCKET}.C.{nuid}");
        stream
            .purge()
            .filter(&subject)
            .await
            .map_err(|e| ObjectError::Publish(e.to_string()))?;
        Ok(Self {
            js: js.clone(),
            name: name.to_string(),
            nuid: nuid.to_string(),
            subject,
            window: window.max(1),
            in_flight: VecDeque::new(),
            chunks: 0,
            size: 0,
            max_chunk: 0,
        })
    }

    /// Sends the next chunk, holding `offset` (its place in the file).
    pub async fn chunk(&mut self, offset: u64, data: Bytes) -> Result<(), ObjectError> {
        while self.in_flight.len() >= self.window {
            if let Some(ack) = self.in_flight.pop_front() {
                ack.await.map_err(publish_error)?;
            }
        }
        let mut headers = HeaderMap::new();
        headers.insert(OFFSET_HEADER, offset.to_string().as_str());
        headers.insert(CHUNK_HEADER, self.chunks.to_string().as_str());
        self.size += data.len() as u64;
        self.max_chunk = self.max_chunk.max(data.len());
        self.chunks += 1;
        let ack = self
            .js
            .publish_with_headers(self.subject.clone(), headers, data)
            .await
            .map_err(publish_error)?;
        self.in_flight.push_back(ack);
        Ok(())
    }

    /// Bytes sent in chunks so far.
    pub fn bytes_sent(&self) -> u64 {
        self.size
    }

    /// Waits for every chunk, then writes the info message; `digest` is the SHA-256 of the chunk
    /// bytes in order.
    pub async fn finish(
        mut self,
        digest: [u8; 32],
        metadata: HashMap<String, String>,
    ) -> Result<(), ObjectError> {
        while let Some(ack) = self.in_flight.pop_front() {
            ack.await.map_err(publish_error)?;
        }
        let info = serde_json::json!({
            "name": self.name,
            "description": null,
            "metadata": metadata,
            "headers": null,
            "options": {"link": null, "max_chunk_size": self.max_chunk},
            "bucket": BUCKET,
            "nuid": self.nuid,
            "size": self.size,
            "chunks": self.chunks,
            "mtime": rfc3339_now(),
            "digest": format!("SHA-256={}", URL_SAFE.encode(digest)),
        });
        let payload =
            serde_json::to_vec(&info).map_err(|e| ObjectError::Malformed(e.to_string()))?;
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Rollup", "sub");
        let subject = format!("$O.{BUCKET}.M.{}", URL_SAFE.encode(&self.name));
        self.js
            .publish_with_headers(subject, headers, payload.into())
            .await
            .map_err(publish_error)?
            .await
            .map_err(publish_error)?;
        Ok(())
    }
}

/// What an [`ObjectFollower`] yields.
#[derive(Debug)]
pub enum Incoming {
    /// The next chunk.
    Chunk {
        /// Its index; 0 again means the writer started the object over.
        index: u64,
        /// Where its bytes belong in the file.
        offset: u64,
        /// The bytes.
        data: Bytes,
    },
    /// The info message: the object is complete.
    Done(Box<ObjectInfo>),
}

/// First pause before the info message is looked up again while no chunk arrives.
const INFO_POLL_MIN: Duration = Duration::from_millis(20);
/// Longest pause between two looks at the info message.
const INFO_POLL_MAX: Duration = Duration::from_millis(500);
/// While fewer bytes than the reader expects have arrived, the info message is looked up only
/// after this long without a chunk. A look is a round trip to the source site's server whose
/// answer queues behind the chunks already on their way, and the chunks that arrive meanwhile
/// are not taken, so the consumer asks for no more: on a slow link, where chunks are tens of
/// milliseconds apart, looking at every pause emptied the pipe once per look.
const INFO_POLL_EARLY: Duration = Duration::from_secs(2);

/// Longest life of one pull request of a reader's consumer. The server sends an idle heartbeat
/// every half of it while it has nothing to deliver, and the reader recreates its consumer (at
/// the stream sequence after its last chunk) once two heartbeats in a row went missing, i.e.
/// after about twice this long without a word from the source site's server: a consumer lost
/// with that server's restart is replaced within seconds, long before the reader's stall
/// deadline (with the client's defaults, 30 s pulls and 15 s heartbeats, it took a minute).
const PULL_EXPIRES: Duration = Duration::from_secs(3);

/// Where a reader of an object stands, so that another reader can resume there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReadPosition {
    /// Chunks received (the next one due has this index).
    pub chunks: u64,
    /// Chunk bytes received.
    pub bytes: u64,
    /// Stream sequence of the last chunk received; 0 before the first.
    pub stream_sequence: u64,
}

/// Reads one object's chunks in stream order while they are being written, and tells when the
/// object is complete.
///
/// The consumer filters on the chunk subject alone. The info message is fetched on its own
/// (a stored-message get of the last message on its subject) instead of through the same
/// consumer: the writer publishes it with `Nats-Rollup: sub`, and nats-server applies that
/// rollup to every consumer whose filters match the info subject by moving the consumer's
/// delivery cursor past the rollup message. A consumer that also filtered on the chunk subject
/// and was behind the writer (a reader on the far side of the leaf connections usually is)
/// silently skipped the chunks it had not yet delivered, and waited for them until it
/// stalled. A consumer filtering on chunks only is not moved by the rollup.
///
/// Every chunk is opened with the object's [`ChunkOpener`] (on a blocking thread, so the
/// runtime goes on receiving meanwhile) and yielded as plaintext; a chunk that fails
/// authentication ends the read with [`ObjectError::Unauthentic`]. Positions count plaintext
/// bytes, and the info message is yielded in plaintext terms too: `size` counts the plaintext
/// bytes, the whole-file digest in the metadata is opened, and the ADR-20 `digest` (over the
/// sealed bytes, which authentication already covers) is dropped.
pub struct ObjectFollower {
    messages: Ordered,
    stream: Stream,
    chunk_subject: String,
    meta_subject: String,
    nuid: String,
    expected_bytes: Option<u64>,
    stall: Duration,
    /// Chunks and bytes received since the last chunk 0 (the writer starts over with one).
    chunks: u64,
    bytes: u64,
    /// Stream sequence of the last chunk received; an info message stored before it belongs
    /// to an earlier attempt of the writer.
    last_seq: u64,
    check_info: bool,
    opener: Arc<ChunkOpener>,
}

impl std::fmt::Debug for ObjectFollower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectFollower")
            .field("chunk_subject", &self.chunk_subject)
            .field("chunks", &self.chunks)
            .field("bytes", &self.bytes)
            .field("stall", &self.stall)
            .finish_non_exhaustive()
    }
}

impl ObjectFollower {
    /// Follows the chunks on `chunk_subject` of object `name` in `stream`, asking for at most
    /// `window` chunks at a time. `expected_bytes`, when the reader knows the object's size
    /// (from a signed manifest), lets it ask for the info message as soon as the last chunk is
    /// in. `from`, when the reader already holds the object's first chunks, starts after them.
    /// `opener` opens the object's sealed chunks.
    #[allow(clippy::too_many_arguments)]
    pub async fn open(
        stream: &Stream,
        chunk_subject: String,
        name: &str,
        expected_bytes: Option<u64>,
        window: usize,
        from: Option<ReadPosition>,
        stall: Duration,
        opener: ChunkOpener,
    ) -> Result<Self, ObjectError> {
        let nuid = chunk_subject
            .rsplit('.')
            .next()
            .unwrap_or_default()
            .to_string();
        let from = from.unwrap_or_default();
        let deliver_policy = if from.stream_sequence == 0 {
            DeliverPolicy::All
        } else {
            DeliverPolicy::ByStartSequence {
                start_sequence: from.stream_sequence + 1,
            }
        };
        // A pull consumer whose requests ask for `window` chunks: what is in flight towards
        // this reader (across the leaf connections) never exceeds that many chunks. It is named,
        // so it is created on `CONSUMER.CREATE.<stream>.<name>.<filter>`: the one form whose
        // subject carries the filter, which the hub lets partners use on chunk subjects only.
        let consumer = stream
            .create_consumer(OrderedConfig {
                name: Some(consumer_name()),
                filter_subject: chunk_subject.clone(),
                deliver_policy,
                max_batch: i64::try_from(window.max(1)).unwrap_or(i64::MAX),
                max_expires: PULL_EXPIRES,
                ..Default::default()
            })
            .await
            .map_err(|e| ObjectError::Read(e.to_string()))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| ObjectError::Read(e.to_string()))?;
        Ok(Self {
            messages,
            stream: stream.clone(),
            chunk_subject,
            meta_subject: format!("$O.{BUCKET}.M.{}", URL_SAFE.encode(name)),
            nuid,
            expected_bytes,
            stall,
            chunks: from.chunks,
            bytes: from.bytes,
            last_seq: from.stream_sequence,
            // An object without chunks (or whose chunks are all held already) may be complete
            // as soon as its info message exists.
            check_info: expected_bytes.is_some_and(|e| from.bytes >= e),
            opener: Arc::new(opener),
        })
    }

    /// Where the reader stands: chunks and bytes received since the object's chunk 0, and the
    /// stream sequence of the last one.
    pub fn position(&self) -> ReadPosition {
        ReadPosition {
            chunks: self.chunks,
            bytes: self.bytes,
            stream_sequence: self.last_seq,
        }
    }

    /// The next chunk, or the info message once every chunk it counts has been yielded.
    pub async fn next(&mut self) -> Result<Incoming, ObjectError> {
        let started = tokio::time::Instant::now();
        let deadline = started + self.stall;
        let mut poll = INFO_POLL_MIN;
        loop {
            if std::mem::take(&mut self.check_info) {
                if let Some(info) = self.complete_info().await? {
                    return Ok(Incoming::Done(info));
                }
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(ObjectError::Stalled(self.stall));
            }
            let wait = poll.min(deadline - now);
            let item = match tokio::time::timeout(wait, self.messages.next()).await {
                Ok(item) => item,
                Err(_) => {
                    // Nothing new: the writer may be done (its info message comes after the
                    // last acknowledgement) or merely slow. Short of the expected bytes, only
                    // a long pause is worth a look (an object shorter than its manifest said).
                    self.check_info = self.expected_bytes.is_none_or(|e| self.bytes >= e)
                        || started.elapsed() >= INFO_POLL_EARLY;
                    poll = (poll * 2).min(INFO_POLL_MAX);
                    continue;
                }
            };
            let msg = match item {
                Some(Ok(m)) => m,
                // The ordered consumer recreates itself after a server restart; errors in
                // between are transient until the stall deadline says otherwise.
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "ordered consumer hiccup");
                    continue;
                }
                None => return Err(ObjectError::Read("consumer ended".to_string())),
            };
            if msg.subject.as_str() != self.chunk_subject {
                continue;
            }
            let header = |name: &str| -> Result<u64, ObjectError> {
                msg.headers
                    .as_ref()
                    .and_then(|h| h.get(name))
                    .and_then(|v| v.as_str().parse().ok())
                    .ok_or_else(|| ObjectError::Malformed(format!("chunk without {name}")))
            };
            let index = header(CHUNK_HEADER)?;
            let offset = header(OFFSET_HEADER)?;
            let seq = msg
                .info()
                .map_err(|e| ObjectError::Malformed(e.to_string()))?
                .stream_sequence;
            let opener = self.opener.clone();
            let sealed = msg.payload.clone();
            let data = tokio::task::spawn_blocking(move || opener.open(index, &sealed))
                .await
                .map_err(|e| ObjectError::Read(e.to_string()))??;
            if index == 0 {
                self.chunks = 0;
                self.bytes = 0;
            }
            self.chunks += 1;
            self.bytes += data.len() as u64;
            self.last_seq = seq;
            self.check_info = self.expected_bytes.is_none_or(|e| self.bytes >= e);
            return Ok(Incoming::Chunk {
                index,
                offset,
                data,
            });
        }
    }

    /// The object's info message if it was written after the chunks received so far and
    /// counts no more chunks than were received.
    async fn complete_info(&mut self) -> Result<Option<Box<ObjectInfo>>, ObjectError> {
        let msg = match self
            .stream
            .get_last_raw_message_by_subject(&self.meta_subject)
            .await
        {
            Ok(m) => m,
            Err(e) => {
                // Not written yet, or the source site's server is restarting: look again
                // later; the stall deadline bounds the wait.
                if e.kind() != LastRawMessageErrorKind::NoMessageFound {
                    tracing::debug!(error = %e, "info message lookup failed");
                }
                return Ok(None);
            }
        };
        if msg.sequence < self.last_seq {
            return Ok(None);
        }
        let mut info: ObjectInfo = serde_json::from_slice(&msg.payload)
            .map_err(|e| ObjectError::Malformed(e.to_string()))?;
        if info.deleted {
            return Err(ObjectError::Deleted);
        }
        if info.nuid != self.nuid {
            return Err(ObjectError::Malformed(
                "info message names other chunks".to_string(),
            ));
        }
        if info.chunks as u64 > self.chunks {
            return Ok(None);
        }
        // In plaintext terms: what the chunks hold once opened, and the digest opened.
        info.size = info
            .chunks
            .checked_mul(SEAL_OVERHEAD)
            .and_then(|overhead| info.size.checked_sub(overhead))
            .ok_or_else(|| ObjectError::Malformed("size below its sealed chunks".to_string()))?;
        if let Some(sealed) = info.metadata.get(META_SHA256) {
            let sha256 = self.opener.open_digest(sealed)?;
            info.metadata
                .insert(META_SHA256.to_string(), hex::encode(sha256));
        }
        info.digest = None;
        Ok(Some(Box::new(info)))
    }
}

/// Deletes an object outright: its chunks and its info message.
pub async fn purge_object(
    stream: &Stream,
    chunk_subject: &str,
    name: &str,
) -> Result<u64, ObjectError> {
    let meta_subject = format!("$O.{BUCKET}.M.{}", URL_SAFE.encode(name));
    let mut purged = 0;
    for subject in [chunk_subject, meta_subject.as_str()] {
        let r = stream
            .purge()
            .filter(subject)
            .await
            .map_err(|e| ObjectError::Publish(e.to_string()))?;
        purged += r.purged;
    }
    Ok(purged)
}

/// The current time as RFC 3339 in UTC, the `mtime` format of ADR-20.
fn rfc3339_now() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant's algorithm), valid for any date after 1970.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60,
        d.subsec_nanos()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mtime_is_rfc3339() {
        let s = rfc3339_now();
        assert_eq!(s.len(), 30, "{s}");
        assert!(s.starts_with("20") && s.ends_with('Z'));
    }
}
