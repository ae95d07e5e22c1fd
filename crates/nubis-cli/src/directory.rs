//! `nubis federation directory`: the hub operator's one-time creation of the federation's
//! directory bucket (the KV stream `KV_nubis-directory`), with its final configuration
//! (`nats-config/directory-bucket.json`, or the `directory-bucket.json` that `nubis federation
//! init` wrote beside a hub node). Sites may neither create nor reconfigure it.
//!
//! Creating it again with the same configuration succeeds, so the command is safe to repeat.
//! A clustered hub answers only once its JetStream meta group has a leader, and places three
//! replicas only once the leader counts three nodes: until then the command waits and asks
//! again, up to `--wait` seconds, and says what the hub answered last.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use nubis_bus::{ConnectSpec, Credentials};

/// How long one creation request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The pause between two creation requests.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// Arguments of `nubis federation directory`.
#[derive(Debug, clap::Args)]
pub struct DirectoryArgs {
    /// A hub node's client URL, on the node itself.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// The hub operator's NATS user.
    #[arg(long, default_value = "operator")]
    pub user: String,
    /// The file holding its password (mode 0600).
    #[arg(long)]
    pub password_file: PathBuf,
    /// The bucket's stream configuration (default: nats-config/directory-bucket.json, three
    /// replicas).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// How long to keep asking while the hub is not ready, in seconds.
    #[arg(long, default_value_t = 60)]
    pub wait: u64,
}

/// What was created.
#[derive(Debug, serde::Serialize)]
pub struct Created {
    /// The stream's name.
    pub stream: String,
    /// Its replicas.
    pub replicas: u64,
    /// The hub's nodes holding them, as the hub reported.
    pub placed_on: Vec<String>,
}

/// `nubis federation directory`.
pub async fn create(args: &DirectoryArgs) -> anyhow::Result<Created> {
    let config_text = match &args.config {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?,
        None => nubis_bus::server_config::DIRECTORY_BUCKET.to_owned(),
    };
    let config: serde_json::Value =
        serde_json::from_str(&config_text).context("the bucket configuration is not valid JSON")?;
    let Some(name) = config.get("name").and_then(|n| n.as_str()) else {
        bail!("the bucket configuration has no `name`");
    };
    let password = nubis_bus::config::read_password_file(&args.password_file)
        .with_context(|| format!("cannot use {}", args.password_file.display()))?;
    let credentials = Credentials::with_login(&args.nats_url, &args.user, password.expose());
    let client = nubis_bus::connect(
        &credentials,
        &ConnectSpec::tool("nubis federation directory", REQUEST_TIMEOUT),
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(args.wait);
    loop {
        let last = match nubis_bus::server_config::create_stream(&client, &config, REQUEST_TIMEOUT)
            .await
        {
            Ok(reply) => return Ok(created(name, &reply)),
            Err(last) => last,
        };
        tracing::info!(answer = %last, "the hub cannot create the directory yet");
        if Instant::now() >= deadline {
            bail!(
                "the hub did not create {name} within {} s; it answered last: {last}",
                args.wait
            );
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

fn created(name: &str, reply: &serde_json::Value) -> Created {
    let replicas = reply
        .pointer("/config/num_replicas")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(1);
    let mut placed_on: Vec<String> = reply
        .pointer("/cluster/leader")
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned)
        .into_iter()
        .collect();
    if let Some(peers) = reply
        .pointer("/cluster/replicas")
        .and_then(serde_json::Value::as_array)
    {
        placed_on.extend(
            peers
                .iter()
                .filter_map(|p| p.get("name").and_then(serde_json::Value::as_str))
                .map(str::to_owned),
        );
    }
    Created {
        stream: name.to_owned(),
        replicas,
        placed_on,
    }
}
