//! `nubis watch` and `nubis usage`: the operator as a monitoring Consumer (paper section IV).
//!
//! `watch` subscribes to a VM's monitoring subjects like any service would (`subjects.md`,
//! section 9): it verifies every batch against the sender's public key (as the operator's own
//! site knows it: pinned for partners, from the directory otherwise), refuses stale and replayed
//! batches, and opens sealed
//! payloads when given the primary site's key file. `usage` asks the site for the usage report it
//! computes from its accounting stream.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use futures::StreamExt as _;
use nubis_protocol::envelope::{now_ms, SignedEnvelope, Verifier, DEFAULT_FRESHNESS_MS};
use nubis_protocol::identity::{parse_signing_key, SiteIdentity};
use nubis_protocol::message::{BatchPayload, ClearPayload, MonitoringBatch, Value};
use nubis_protocol::replay::ReplayCache;
use nubis_protocol::subject::{OpsEndpoint, Subject};
use nubis_protocol::{codec, SiteId, VmId};
use serde_json::{json, Value as Json};

use crate::ops_client::{call, Connection, OpsFailure};

/// Arguments of `nubis watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// The VM.
    pub vm: String,
    /// The VM's primary site (default: asked of --site).
    #[arg(long)]
    pub primary: Option<String>,
    /// The primary site's key file: sealed batches are opened with it.
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Stop after this many batches (default: until Ctrl-C).
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop after this many seconds without any batch (default: wait forever).
    #[arg(long)]
    pub idle_timeout: Option<u64>,
    #[command(flatten)]
    pub conn: Connection,
}

/// Arguments of `nubis usage`.
#[derive(Debug, Args)]
pub struct UsageArgs {
    /// The VM.
    pub vm: String,
    /// Start of the period, in milliseconds since the Unix epoch (default: the beginning).
    #[arg(long)]
    pub from: Option<u64>,
    /// End of the period, in milliseconds since the Unix epoch (default: now).
    #[arg(long)]
    pub to: Option<u64>,
    #[command(flatten)]
    pub conn: Connection,
}

/// `nubis usage`: the site's usage report of one VM.
pub async fn usage(args: UsageArgs) -> Result<Json, OpsFailure> {
    if let (Some(from), Some(to)) = (args.from, args.to) {
        if from >= to {
            return Err(OpsFailure::User(format!(
                "--from {from} must be before --to {to}"
            )));
        }
    }
    let mut req = json!({"vm": args.vm});
    if let Some(from) = args.from {
        req["from_ms"] = json!(from);
    }
    if let Some(to) = args.to {
        req["to_ms"] = json!(to);
    }
    call(&args.conn, OpsEndpoint::Usage, req).await
}

/// Prints a usage report for people.
pub fn print_usage(v: &Json) {
    let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
    println!("VM              {}", v["vm"].as_str().unwrap_or("?"));
    println!(
        "period          {} .. {} (ms since epoch)",
        v["from_ms"], v["to_ms"]
    );
    println!("CPU             {:.6} core-hours", f("cpu_core_hours"));
    println!("memory          {:.6} GiB-hours", f("memory_gib_hours"));
    println!(
        "disk            {:.0} bytes read, {:.0} bytes written",
        f("disk_read_bytes"),
        f("disk_written_bytes")
    );
    println!(
        "network         {:.0} bytes received, {:.0} bytes sent",
        f("net_rx_bytes"),
        f("net_tx_bytes")
    );
    println!(
        "from            {} batches, {} samples ({} sealed batches not readable here)",
        v["batches"], v["samples"], v["sealed_unreadable"]
    );
}

/// Verifiers for the senders of batches, with the keys the operator's own site vouches for:
/// its own key, its partners' pinned keys, and the directory keys of other sites.
struct Keys {
    verifiers: BTreeMap<String, Verifier>,
}

impl Keys {
    async fn from_site(conn: &Connection, own: &SiteId) -> Result<Self, OpsFailure> {
        let status = call(conn, OpsEndpoint::Status, json!({})).await?;
        let sites = call(conn, OpsEndpoint::Sites, json!({})).await?;
        let mut texts = vec![(
            own.to_string(),
            status["signing_key"].as_str().map(str::to_string),
        )];
        for s in sites["sites"].as_array().into_iter().flatten() {
            texts.push((
                s["site"].as_str().unwrap_or_default().to_string(),
                s["signing_key"].as_str().map(str::to_string),
            ));
        }
        let mut verifiers = BTreeMap::new();
        for (site, text) in texts {
            let (Ok(id), Some(text)) = (SiteId::new(&site), text) else {
                continue;
            };
            let key = parse_signing_key(&text, &site).map_err(|e| {
                OpsFailure::Internal(format!("site {own} gave an unusable key for {site}: {e}"))
            })?;
            let replay = ReplayCache::temporary(2 * DEFAULT_FRESHNESS_MS)
                .map_err(|e| OpsFailure::Internal(format!("replay cache: {e}")))?;
            verifiers.insert(site, Verifier::new(own.clone(), [(id, key)], replay));
        }
        Ok(Self { verifiers })
    }

    fn verifier(&self, site: &str) -> Result<&Verifier, String> {
        self.verifiers
            .get(site)
            .ok_or_else(|| format!("no key known for sender {site}"))
    }
}

/// One verified batch, ready to print.
fn batch_json(
    subject: &str,
    from: &str,
    batch: &MonitoringBatch,
    clear: Option<&ClearPayload>,
) -> Json {
    let value = |v: &Value| match v {
        Value::Float(f) => json!(f),
        Value::Int(i) => json!(i),
        Value::Text(t) => json!(t),
    };
    let mut out = json!({
        "subject": subject,
        "from": from,
        "vm": batch.vm.as_str(),
        "producer": batch.producer.as_str(),
        "epoch_ms": batch.epoch_ms,
        "seq": batch.seq,
        "sealed": matches!(batch.payload, BatchPayload::Sealed { .. }),
    });
    match clear {
        Some(c) => {
            out["samples"] = c
                .samples
                .iter()
                .map(|s| json!({"data_point": s.data_point.as_str(), "ts_ms": s.ts_ms, "value": value(&s.value)}))
                .collect();
            out["processed"] = c
                .processed
                .iter()
                .map(|p| {
                    json!({"data_point": p.data_point.as_str(), "aggregate": p.aggregate,
                           "window_start_ms": p.window_start_ms, "window_end_ms": p.window_end_ms,
                           "value": p.value, "count": p.count})
                })
                .collect();
            out["encrypted_kpi"] = c
                .encrypted_kpi
                .iter()
                .map(|k| json!({"table": k.table, "ts_ms": k.ts_ms, "bytes": k.blob.len()}))
                .collect();
        }
        None => out["readable"] = json!(false),
    }
    out
}

fn print_batch(v: &Json) {
    let seq = &v["seq"];
    let from = v["from"].as_str().unwrap_or("?");
    if v["readable"] == json!(false) {
        println!(
            "{} seq {seq} from {from}: sealed for the primary site (pass --key to open)",
            v["subject"].as_str().unwrap_or("?")
        );
        return;
    }
    for s in v["samples"].as_array().into_iter().flatten() {
        println!(
            "{:>15} {} = {}  (raw, seq {seq}, from {from})",
            s["ts_ms"],
            s["data_point"].as_str().unwrap_or("?"),
            s["value"]
        );
    }
    for p in v["processed"].as_array().into_iter().flatten() {
        println!(
            "{:>15} {} {} = {} over {} samples [{}, {})  (seq {seq}, from {from})",
            p["window_end_ms"],
            p["data_point"].as_str().unwrap_or("?"),
            p["aggregate"].as_str().unwrap_or("?"),
            p["value"],
            p["count"],
            p["window_start_ms"],
            p["window_end_ms"]
        );
    }
    for k in v["encrypted_kpi"].as_array().into_iter().flatten() {
        println!(
            "{:>15} kpi.{} encrypted row of {} bytes  (seq {seq}, from {from})",
            k["ts_ms"],
            k["table"].as_str().unwrap_or("?"),
            k["bytes"]
        );
    }
}

/// `nubis watch`: prints the VM's monitoring as it arrives; returns how many batches were shown.
pub async fn watch(args: WatchArgs, json_out: bool) -> Result<Json, OpsFailure> {
    let vm = VmId::new(&args.vm)
        .map_err(|e| OpsFailure::User(format!("{:?} is not a valid VM id: {e}", args.vm)))?;
    let own = SiteId::new(&args.conn.site).map_err(|e| {
        OpsFailure::User(format!(
            "--site {:?} is not a valid site id: {e}",
            args.conn.site
        ))
    })?;
    let identity = match &args.key {
        Some(path) => Some(
            SiteIdentity::load(path)
                .map_err(|e| OpsFailure::User(format!("{}: {e}", path.display())))?,
        ),
        None => None,
    };
    let primary = match &args.primary {
        Some(p) => p.clone(),
        None => {
            let v = call(&args.conn, OpsEndpoint::Vms, json!({"vm": vm.as_str()})).await?;
            v["vms"][0]["primary"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| {
                    OpsFailure::User(format!(
                        "site {own} does not know VM {vm}; pass --primary <site>"
                    ))
                })?
        }
    };
    let primary =
        SiteId::new(&primary).map_err(|e| OpsFailure::User(format!("primary {primary:?}: {e}")))?;
    let opener = identity.filter(|i| i.site() == &primary);
    if args.key.is_some() && opener.is_none() {
        return Err(OpsFailure::User(format!(
            "--key is not the key of the primary site {primary}; only the primary can open sealed batches"
        )));
    }

    let keys = Keys::from_site(&args.conn, &own).await?;
    let client = crate::ops_client::connect(&args.conn).await?;
    let filter = Subject::monitoring_vm(&primary, &vm);
    let mut sub = client
        .subscribe(filter.as_str().to_string())
        .await
        .map_err(|e| OpsFailure::Unreachable(format!("cannot subscribe to {filter}: {e}")))?;
    if !json_out {
        eprintln!("watching {filter} (Ctrl-C to stop)");
    }
    let mut shown = 0u64;
    let mut dropped = 0u64;
    let idle = args.idle_timeout.map(Duration::from_secs);
    loop {
        if args.count.is_some_and(|c| shown >= c) {
            break;
        }
        let next = match idle {
            Some(d) => match tokio::time::timeout(d, sub.next()).await {
                Ok(m) => m,
                Err(_) => break,
            },
            None => tokio::select! {
                m = sub.next() => m,
                _ = tokio::signal::ctrl_c() => None,
            },
        };
        let Some(message) = next else { break };
        let subject = message.subject.to_string();
        match open(&keys, &message.payload, &subject, opener.as_ref()) {
            Ok(v) => {
                shown += 1;
                if json_out {
                    println!("{v}");
                } else {
                    print_batch(&v);
                }
            }
            Err(e) => {
                dropped += 1;
                eprintln!("dropped a batch on {subject}: {e}");
            }
        }
    }
    Ok(json!({"batches": shown, "dropped": dropped}))
}

fn open(
    keys: &Keys,
    raw: &[u8],
    subject: &str,
    opener: Option<&SiteIdentity>,
) -> Result<Json, String> {
    let env = SignedEnvelope::decode(raw).map_err(|e| format!("malformed: {e}"))?;
    let verifier = keys.verifier(&env.from)?;
    let opened = verifier
        .open_event(raw, subject, now_ms())
        .map_err(|e| format!("refused ({}): {e}", e.code()))?;
    let batch: MonitoringBatch = opened.body().map_err(|e| format!("malformed body: {e}"))?;
    let clear = match &batch.payload {
        BatchPayload::Clear(c) => Some(c.clone()),
        BatchPayload::Sealed { ciphertext } => match opener {
            Some(id) => {
                let bytes = nubis_protocol::seal::open(id.sealing_key(), ciphertext)
                    .map_err(|e| format!("cannot open the sealed payload: {e}"))?;
                Some(
                    codec::from_slice::<ClearPayload>(&bytes)
                        .map_err(|e| format!("sealed payload: {e}"))?,
                )
            }
            None => None,
        },
    };
    Ok(batch_json(subject, &env.from, &batch, clear.as_ref()))
}
