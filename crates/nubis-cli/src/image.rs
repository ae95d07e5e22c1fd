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
use nubis_protocol::subject::OpsEndpoint;
use nubis_site::images::{validate_name, UPLOAD_BUCKET};
use serde_json::{json, Value};

use crate::ops_client::{call, connect, Connection, OpsFailure};

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

/// Runs an image command; returns its JSON result.
pub async fn run(cmd: ImageCommand, json_out: bool) -> Result<Value, OpsFailure> {
    match cmd {
        ImageCommand::List { conn } => call(&conn, OpsEndpoint::Images, json!({})).await,
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
            let client = connect(&conn).await?;
            let js = jetstream::new(client);
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
            call(
                &conn,
                OpsEndpoint::ImagePut,
                json!({"name": name, "replace": force}),
            )
            .await
        }
    }
}

/// Prints an image listing for people.
pub fn print_list(v: &Value) {
    println!("{:<40} {:>14} {:>14}", "IMAGE", "BYTES", "MODIFIED_MS");
    for i in v["images"].as_array().into_iter().flatten() {
        println!(
            "{:<40} {:>14} {:>14}",
            i["name"].as_str().unwrap_or("?"),
            i["bytes"],
            i["modified_ms"]
        );
    }
}
