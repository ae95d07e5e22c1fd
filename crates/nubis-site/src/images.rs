//! The primary site's image store (paper: primary placement is cold migration from it).
//!
//! Operators upload a disk image with `nubis image put`: the CLI writes it into the object-store
//! bucket [`UPLOAD_BUCKET`] of the site's own JetStream domain, then asks the site (ops endpoint
//! `image_put`) to import it. The site copies the object into its image-store directory under a
//! temporary name, checks the object store's SHA-256 digest, moves it into place atomically and
//! deletes the upload. Image names are plain file names; nothing else of the site's file system
//! can be named.

use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use async_nats::jetstream;
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The object-store bucket, in the site's own JetStream domain, that uploads pass through.
pub const UPLOAD_BUCKET: &str = "nubis-image-uploads";

/// Longest image name.
pub const MAX_NAME_LEN: usize = 128;

/// Why an image operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The name is not a plain file name of `[A-Za-z0-9._-]`.
    #[error("{0:?} is not a valid image name (1-128 of A-Z a-z 0-9 . _ -, not starting with '.' or '-')")]
    Name(String),
    /// An image of this name exists and replacing it was not asked for.
    #[error("image {0:?} already exists (ask to replace it)")]
    Exists(String),
    /// No upload of this name waits in the upload bucket.
    #[error("no upload named {0:?} is waiting; upload it first")]
    NoUpload(String),
    /// The object store could not be used.
    #[error("upload bucket: {0}")]
    Bucket(String),
    /// The copy did not match the digest the object store recorded.
    #[error("image {name:?}: digest mismatch (uploaded {expected}, received {actual})")]
    Digest {
        /// The image.
        name: String,
        /// The digest the object store recorded.
        expected: String,
        /// The digest of what was read.
        actual: String,
    },
    /// The image store directory could not be read or written.
    #[error("image store {path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// One image of the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageInfo {
    /// The image's name (its file name in the store).
    pub name: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// When it was last written, in milliseconds since the Unix epoch.
    pub modified_ms: u64,
    /// SHA-256 of its content, hex (known right after an import; not computed for a listing).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// Checks an image name.
pub fn validate_name(name: &str) -> Result<(), ImageError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ImageError::Name(name.to_string()))
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn info_of(path: &Path, name: &str) -> Result<ImageInfo, ImageError> {
    let meta = std::fs::metadata(path).map_err(io(path))?;
    let modified_ms = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    Ok(ImageInfo {
        name: name.to_string(),
        bytes: meta.len(),
        modified_ms,
        sha256: None,
    })
}

/// The images of the store, by name. Files whose names are not image names (such as an import
/// in progress) are left out.
pub fn list(store: &Path) -> Result<Vec<ImageInfo>, ImageError> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(store) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io(store)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io(store))?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if validate_name(&name).is_err() || !entry.path().is_file() {
            continue;
        }
        out.push(info_of(&entry.path(), &name)?);
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Imports the upload `name` from [`UPLOAD_BUCKET`] of `js` into `store`, then deletes the
/// upload. With `replace`, an existing image of that name is replaced (atomically).
pub async fn import(
    js: &jetstream::Context,
    store: &Path,
    name: &str,
    replace: bool,
) -> Result<ImageInfo, ImageError> {
    validate_name(name)?;
    let target = store.join(name);
    if !replace && target.exists() {
        return Err(ImageError::Exists(name.to_string()));
    }
    std::fs::create_dir_all(store).map_err(io(store))?;
    let bucket = js
        .get_object_store(UPLOAD_BUCKET)
        .await
        .map_err(|_| ImageError::NoUpload(name.to_string()))?;
    let mut object = bucket.get(name).await.map_err(|e| match e.kind() {
        jetstream::object_store::GetErrorKind::NotFound => ImageError::NoUpload(name.to_string()),
        _ => ImageError::Bucket(e.to_string()),
    })?;
    let expected = object.info().digest.clone();
    let partial = store.join(format!(".{name}.import"));
    // Async file I/O: a whole disk image must not hold up one of the daemon's workers.
    let digest = match copy_verified(&mut object, &partial, name, expected).await {
        Ok(digest) => digest,
        Err(e) => {
            if let Err(rm) = tokio::fs::remove_file(&partial).await {
                if rm.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(image = name, error = %rm, "cannot remove the partial import");
                }
            }
            return Err(e);
        }
    };
    tokio::fs::rename(&partial, &target)
        .await
        .map_err(io(&target))?;
    if let Err(e) = bucket.delete(name).await {
        tracing::warn!(image = name, error = %e, "imported, but the upload could not be deleted");
    }
    let mut info = info_of(&target, name)?;
    info.sha256 = Some(hex::encode(digest));
    tracing::info!(image = name, bytes = info.bytes, "image imported");
    Ok(info)
}

/// Copies `object` into a new file at `partial`, durably, and checks it against the digest the
/// object store recorded; returns its SHA-256.
async fn copy_verified(
    object: &mut jetstream::object_store::Object,
    partial: &Path,
    name: &str,
    expected: Option<String>,
) -> Result<sha2::digest::Output<Sha256>, ImageError> {
    let mut file = tokio::fs::File::create(partial)
        .await
        .map_err(io(partial))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = object
            .read(&mut buf)
            .await
            .map_err(|e| ImageError::Bucket(format!("reading {name}: {e}")))?;
        if n == 0 {
            break;
        }
        let chunk = buf.get(..n).unwrap_or_default();
        hasher.update(chunk);
        file.write_all(chunk).await.map_err(io(partial))?;
    }
    file.sync_all().await.map_err(io(partial))?;
    drop(file);
    let digest = hasher.finalize();
    if let Some(expected) = expected {
        let actual = format!(
            "SHA-256={}",
            base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE, digest)
        );
        if expected != actual {
            return Err(ImageError::Digest {
                name: name.to_string(),
                expected,
                actual,
            });
        }
    }
    Ok(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_plain_file_names() {
        for good in ["web.qcow2", "a", "debian-12_amd64.raw", "x.y.z"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        let long = "a".repeat(MAX_NAME_LEN + 1);
        for bad in [
            "",
            ".hidden",
            "-rf",
            "a/b",
            "../etc/passwd",
            "a b",
            long.as_str(),
        ] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn listing_shows_images_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b.qcow2"), b"12345").unwrap();
        std::fs::write(dir.path().join("a.raw"), b"1").unwrap();
        std::fs::write(dir.path().join(".a.raw.import"), b"partial").unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let l = list(dir.path()).unwrap();
        let names: Vec<_> = l.iter().map(|i| (i.name.as_str(), i.bytes)).collect();
        assert_eq!(names, [("a.raw", 1), ("b.qcow2", 5)]);
        assert!(list(&dir.path().join("missing")).unwrap().is_empty());
    }
}
