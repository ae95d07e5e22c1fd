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
use nubis_bus::ops::OpsClient;
use nubis_protocol::envelope::{now_ms, SignedEnvelope, Verifier, DEFAULT_FRESHNESS_MS};
use nubis_protocol::identity::{parse_signing_key, SiteIdentity};
use nubis_protocol::message::{BatchPayload, ClearPayload, MonitoringBatch, Value};
use nubis_protocol::ops::{UsageReport, VmsReply};
use nubis_protocol::replay::ReplayCache;
use nubis_protocol::subject::{OpsEndpoint, Subject};
use nubis_protocol::{codec, SiteId, VmId};
use serde_json::{json, Value as Json};

use crate::ops_client::{client, Connection, OpsFailure};
use crate::output::{self, Printed};

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
pub async fn usage(args: UsageArgs) -> Result<Printed, OpsFailure> {
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
    let report: UsageReport = client(&args.conn)
        .await?
        .call(OpsEndpoint::Usage, &req)
        .await?;
    let text = usage_text(&report);
    Ok(Printed::new(&report, text))
}

/// A usage report for people.
fn usage_text(r: &UsageReport) -> String {
    let from = if r.from_ms == 0 {
        "the beginning".to_string()
    } else {
        output::time(r.from_ms)
    };
    output::fields(&[
        ("VM", r.vm.to_string()),
        (
            "period",
            format!(
                "{from} .. {} ({})",
                output::time(r.to_ms),
                if r.from_ms == 0 {
                    "everything recorded".to_string()
                } else {
                    output::duration_ms(r.to_ms.saturating_sub(r.from_ms))
                }
            ),
        ),
        (
            "CPU",
            format!("{} core-hours", output::number(r.usage.cpu_core_hours, 4)),
        ),
        (
            "memory",
            format!("{} GiB-hours", output::number(r.usage.memory_gib_hours, 4)),
        ),
        (
            "disk",
            format!(
                "{} read, {} written",
                output::bytes(r.usage.disk_read_bytes),
                output::bytes(r.usage.disk_written_bytes)
            ),
        ),
        (
            "network",
            format!(
                "{} received, {} sent",
                output::bytes(r.usage.net_rx_bytes),
                output::bytes(r.usage.net_tx_bytes)
            ),
        ),
        (
            "from",
            format!(
                "{} batches, {} samples ({} sealed batches not readable here)",
                r.usage.batches, r.usage.samples, r.usage.sealed_unreadable
            ),
        ),
    ])
}

/// Verifiers for the senders of batches, with the keys the operator's own site vouches for:
/// its own key, its partners' pinned keys, and the directory keys of other sites.
struct Keys {
    verifiers: BTreeMap<String, Verifier>,
}

impl Keys {
    async fn from_site(client: &OpsClient, own: &SiteId) -> Result<Self, OpsFailure> {
        let status = client.status().await?;
        let sites = client.sites().await?;
        let mut texts = vec![(own.to_string(), Some(status.signing_key))];
        for s in sites.sites {
            texts.push((s.site.to_string(), s.signing_key));
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

/// A value of a batch for people: floats rounded.
fn value_text(v: &Json) -> String {
    match v {
        Json::Number(n) if n.is_f64() => output::number(n.as_f64().unwrap_or(0.0), 3),
        Json::String(t) => t.clone(),
        other => other.to_string(),
    }
}

/// One verified batch for people: a line per sample, processed value and encrypted KPI row,
/// times in ISO-8601 UTC.
fn batch_text(v: &Json) -> String {
    let seq = &v["seq"];
    let from = v["from"].as_str().unwrap_or("?");
    let ms = |x: &Json| x.as_u64().map_or_else(|| "?".to_string(), output::time_ms);
    if v["readable"] == json!(false) {
        return format!(
            "{} seq {seq} from {from}: sealed for the primary site (pass --key to open)\n",
            v["subject"].as_str().unwrap_or("?")
        );
    }
    let mut out = String::new();
    for s in v["samples"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{} {} = {}  (raw, seq {seq}, from {from})\n",
            ms(&s["ts_ms"]),
            s["data_point"].as_str().unwrap_or("?"),
            value_text(&s["value"])
        ));
    }
    for p in v["processed"].as_array().into_iter().flatten() {
        let window = match (p["window_start_ms"].as_u64(), p["window_end_ms"].as_u64()) {
            (Some(a), Some(b)) => output::duration_ms(b.saturating_sub(a)),
            _ => "?".into(),
        };
        out.push_str(&format!(
            "{} {} {} = {} over {} samples in {window}  (seq {seq}, from {from})\n",
            ms(&p["window_end_ms"]),
            p["data_point"].as_str().unwrap_or("?"),
            p["aggregate"].as_str().unwrap_or("?"),
            value_text(&p["value"]),
            p["count"],
        ));
    }
    for k in v["encrypted_kpi"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{} kpi.{} encrypted row of {}  (seq {seq}, from {from})\n",
            ms(&k["ts_ms"]),
            k["table"].as_str().unwrap_or("?"),
            output::bytes(k["bytes"].as_f64().unwrap_or(0.0))
        ));
    }
    out
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
    let ops = client(&args.conn).await?;
    let primary = match &args.primary {
        Some(p) => p.clone(),
        None => {
            let reply: VmsReply = ops
                .call(OpsEndpoint::Vms, &json!({"vm": vm.as_str()}))
                .await?;
            reply
                .vms
                .into_iter()
                .next()
                .map(|v| v.primary.to_string())
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

    let keys = Keys::from_site(&ops, &own).await?;
    let filter = Subject::monitoring_vm(&primary, &vm);
    let mut sub = ops
        .nats()
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
                    print!("{}", batch_text(&v));
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn usage_shows_its_period_as_utc_times_and_rounded_units() {
        let r: UsageReport = serde_json::from_value(json!({"vm": "vm-1",
            "from_ms": 1767225600000u64, "to_ms": 1767225725000u64,
            "cpu_core_hours": 0.012345678, "memory_gib_hours": 0.5, "disk_read_bytes": 1536.0,
            "disk_written_bytes": 0.0, "net_rx_bytes": 2048.0, "net_tx_bytes": 10.4,
            "batches": 3, "samples": 9, "sealed_unreadable": 1}))
        .unwrap();
        let text = usage_text(&r);
        assert!(
            text.contains("2026-01-01T00:00:00Z .. 2026-01-01T00:02:05Z (2 m 05 s)"),
            "{text}"
        );
        assert!(text.contains("0.0123 core-hours"), "{text}");
        assert!(text.contains("1.5 KiB read, 0 B written"), "{text}");
        assert!(text.contains("2.0 KiB received, 10 B sent"), "{text}");
    }

    #[test]
    fn a_batch_prints_utc_times_and_rounded_values() {
        let v = json!({"subject": "s", "from": "b", "seq": 4, "samples": [
            {"data_point": "cpu.cores", "ts_ms": 1767225600250u64, "value": 0.333333333}],
            "processed": [{"data_point": "mem.allocated_bytes", "aggregate": "mean",
                "window_start_ms": 1767225600000u64, "window_end_ms": 1767225602000u64,
                "value": 268435456.0, "count": 5}],
            "encrypted_kpi": []});
        let text = batch_text(&v);
        assert!(
            text.contains("2026-01-01T00:00:00.250Z cpu.cores = 0.333  (raw, seq 4, from b)"),
            "{text}"
        );
        assert!(
            text.contains("2026-01-01T00:00:02.000Z mem.allocated_bytes mean = 268435456 over 5 samples in 2.0 s"),
            "{text}"
        );
    }
}
