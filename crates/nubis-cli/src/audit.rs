//! `nubis audit`: the site's record of mutating operator calls (who, what, when, outcome),
//! read from the `nubis-audit` stream of the site's own JetStream domain.

use async_nats::jetstream;
use clap::Args;
use nubis_site::audit::{AuditRecord, STREAM};
use serde::Serialize;

use crate::ops_client::{connect, Connection, OpsFailure};
use crate::output::{self, Printed, Table};

/// `nubis audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    #[command(flatten)]
    conn: Connection,
    /// How many of the latest records to show.
    #[arg(long, default_value_t = 50)]
    last: u64,
}

/// One record as printed, with its position in the stream.
#[derive(Debug, Serialize)]
struct Entry {
    seq: u64,
    #[serde(flatten)]
    record: AuditRecord,
}

/// `nubis audit`.
pub async fn run(args: AuditArgs) -> Result<Printed, OpsFailure> {
    args.conn.site_id()?;
    let nats = connect(&args.conn).await?;
    let js = jetstream::new(nats);
    let mut stream = js.get_stream(STREAM).await.map_err(|e| {
        OpsFailure::Unreachable(format!(
            "cannot open the audit stream {STREAM} (no mutating call recorded yet, or not \
             allowed to this user): {e}"
        ))
    })?;
    let state = stream
        .info()
        .await
        .map_err(|e| OpsFailure::Unreachable(format!("cannot read the audit stream: {e}")))?
        .state
        .clone();
    let mut entries = Vec::new();
    if state.messages > 0 {
        let from = state.first_sequence.max(
            state
                .last_sequence
                .saturating_sub(args.last.saturating_sub(1)),
        );
        for seq in from..=state.last_sequence {
            let message = match stream.get_raw_message(seq).await {
                Ok(m) => m,
                // Gone by age between the info and this read.
                Err(e)
                    if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
                {
                    continue
                }
                Err(e) => {
                    return Err(OpsFailure::Unreachable(format!(
                        "cannot read audit record {seq}: {e}"
                    )))
                }
            };
            let record: AuditRecord = serde_json::from_slice(&message.payload).map_err(|e| {
                OpsFailure::Internal(format!("audit record {seq} is not readable: {e}"))
            })?;
            entries.push(Entry { seq, record });
        }
    }
    let text = table(&entries);
    Ok(Printed::new(&entries, text))
}

fn table(entries: &[Entry]) -> String {
    let mut t = Table::new(&["SEQ", "TIME", "OPERATOR", "ENDPOINT", "OUTCOME", "REQUEST"]);
    for e in entries {
        let outcome = if e.record.ok {
            "ok".to_owned()
        } else {
            format!("refused {}: {}", e.record.code, e.record.message)
        };
        t.row(vec![
            e.seq.to_string(),
            output::time_ms(e.record.at_ms),
            e.record.caller.to_string(),
            e.record.endpoint.clone(),
            outcome,
            e.record.request.to_string(),
        ]);
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nubis_site::audit::Caller;

    #[test]
    fn a_record_shows_who_what_when_and_outcome() {
        let entries = [Entry {
            seq: 7,
            record: AuditRecord {
                at_ms: 0,
                caller: Caller::Operator("ann".into()),
                endpoint: "evict".into(),
                request: serde_json::json!({"vm": "v1"}),
                ok: false,
                code: 400,
                message: "no such vm (unknown_vm)".into(),
            },
        }];
        let text = table(&entries);
        for part in ["7", "ann", "evict", "refused 400", "unknown_vm", "\"v1\""] {
            assert!(text.contains(part), "{part} in {text}");
        }
        let json = serde_json::to_value(&entries).unwrap();
        assert_eq!(json[0]["caller"]["name"], "ann");
        assert_eq!(json[0]["seq"], 7);
    }
}
