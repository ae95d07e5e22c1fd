//! `nubis image put|list`: the primary site's image store, from which primary placement copies
//! a new VM's disks (cold migration without state).
//!
//! `put` uploads the file into the object-store bucket `nubis-image-uploads` of the site's own
//! JetStream domain, with a progress bar (bytes, rate, ETA), then asks the site (ops endpoint
//! `image_put`) to import it; the site checks the digest and moves it into its store.

use std::path::PathBuf;

use async_nats::jetstream;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use nubis_protocol::ops::{ImagePutReply, ImagesReply};
use nubis_protocol::subject::OpsEndpoint;
use nubis_site::images::{validate_name, UPLOAD_BUCKET};
use serde_json::json;

use crate::ops_client::{client, Connection, OpsFailure};
use crate::output::{self, Printed};

/// Image commands.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Upload a disk image into the site's image store.
    Put {
        /// The image file.
        file: PathBuf,
        /// The name in the store (default: the file name).
        #[arg(long)]
        name: Option<String>,
        /// Replace an image of the same name.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// List the images of the site's image store.
    List {
        #[command(flatten)]
        conn: Connection,
    },
}

/// Runs an image command; returns what to print.
pub async fn run(cmd: ImageCommand, json_out: bool) -> Result<Printed, OpsFailure> {
    match cmd {
        ImageCommand::List { conn } => {
            let reply = client(&conn).await?.images().await?;
            let text = list_text(&reply);
            Ok(Printed::new(&reply, text))
        }
        ImageCommand::Put {
            file,
            name,
            force,
            conn,
        } => {
            let name = match name {
                Some(n) => n,
                None => file
                    .file_name()
                    .and_then(|n| n.to_str())
                    .map(str::to_string)
                    .ok_or_else(|| {
                        OpsFailure::User(format!(
                            "{} has no file name; pass --name",
                            file.display()
                        ))
                    })?,
            };
            validate_name(&name).map_err(|e| OpsFailure::User(e.to_string()))?;
            let source = tokio::fs::File::open(&file)
                .await
                .map_err(|e| OpsFailure::User(format!("cannot read {}: {e}", file.display())))?;
            let size = source
                .metadata()
                .await
                .map_err(|e| OpsFailure::User(format!("cannot read {}: {e}", file.display())))?
                .len();
            let ops = client(&conn).await?;
            let js = jetstream::new(ops.nats().clone());
            let bucket = match js.get_object_store(UPLOAD_BUCKET).await {
                Ok(b) => b,
                Err(_) => js
                    .create_object_store(jetstream::object_store::Config {
                        bucket: UPLOAD_BUCKET.to_string(),
                        description: Some("disk images on their way into the image store".into()),
                        storage: jetstream::stream::StorageType::File,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| {
                        OpsFailure::Unreachable(format!(
                            "cannot open the upload bucket {UPLOAD_BUCKET} at site {}: {e}",
                            conn.site
                        ))
                    })?,
            };
            let bar = if json_out {
                ProgressBar::hidden()
            } else {
                ProgressBar::new(size)
            };
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_message(format!("uploading {name}"));
            let mut reader = bar.wrap_async_read(source);
            bucket
                .put(name.as_str(), &mut reader)
                .await
                .map_err(|e| OpsFailure::Unreachable(format!("upload of {name} failed: {e}")))?;
            bar.finish_and_clear();
            let reply: ImagePutReply = ops
                .call(
                    OpsEndpoint::ImagePut,
                    &json!({"name": name, "replace": force}),
                )
                .await?;
            let i = &reply.image;
            let text = format!(
                "imported {} into the image store of site {}: {}, sha256 {}\n",
                i.name,
                conn.site,
                output::bytes(i.bytes as f64),
                output::or_dash(i.sha256.as_ref())
            );
            Ok(Printed::new(&reply, text))
        }
    }
}

/// An image listing for people.
fn list_text(reply: &ImagesReply) -> String {
    if reply.images.is_empty() {
        return "no images in the store\n".into();
    }
    let mut t = output::Table::new(&["IMAGE", ">SIZE", "MODIFIED"]);
    for i in &reply.images {
        t.row(vec![
            i.name.clone(),
            output::bytes(i.bytes as f64),
            output::time(i.modified_ms),
        ]);
    }
    t.render()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_listing_is_aligned_with_sizes_and_times() {
        let reply: ImagesReply = serde_json::from_value(json!({"images": [
            {"name": "busybox.qcow2", "bytes": 1572864, "modified_ms": 1767225600000u64},
            {"name": "a-much-longer-name.raw", "bytes": 12, "modified_ms": 0}]}))
        .unwrap();
        let text = list_text(&reply);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "IMAGE                      SIZE  MODIFIED");
        assert_eq!(
            lines[1],
            "busybox.qcow2           1.5 MiB  2026-01-01T00:00:00Z"
        );
        assert_eq!(
            lines[2],
            "a-much-longer-name.raw     12 B  1970-01-01T00:00:00Z"
        );
    }
}
