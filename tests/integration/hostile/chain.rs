//! Monitoring is accepted only from a VM's chain. A member without a contract and a partner that
//! is not on the chain publish well-signed batches about a VM they do not carry — values that
//! would fire the primary's SLA rule, and the ids of the genuine batches still to come — on the
//! public subject (bus delivery) and on the primary's relay subject. The primary stores none of
//! them and fires nothing, while every genuine batch, produced two hops down and accepted on the
//! vouch of the site in between, is stored, and the rightful site's batch fires the rule.

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt as _;
use nubis_protocol::codec;
use nubis_protocol::descriptor::DataPoint;
use nubis_protocol::envelope::{now_ms, sign, Addressing, SignedEnvelope};
use nubis_protocol::identity::SiteIdentity;
use nubis_protocol::message::{
    BatchPayload, ClearPayload, MonitoringBatch, ProducerId, Sample, Value,
};
use nubis_protocol::{SiteId, VmId};
use nubis_testkit::{require_nats_server, wait_until, Role};
use serde_json::{json, Value as Json};

use crate::stack::{ops, wait_migration, SiteSpec, Stack};

const LONG: Duration = Duration::from_secs(90);
const VM: &str = "vm-h";
const DP: &str = "cpu.utilisation";
const BUS: &str = "[monitoring]\ndelivery = \"bus\"\n";
/// The primary's rule: a CPU utilisation above 100 (impossible for a genuine measurement, which
/// is at most 1) fires at once.
const BUS_AND_SLA: &str = "[monitoring]\ndelivery = \"bus\"\n\n[[sla]]\nname = \"hot\"\n\
    data_point = \"cpu.utilisation\"\nop = \"gt\"\nthreshold = 100.0\nfor_ms = 0\naction = \"event\"\n";
/// How many of the genuine producer's next sequence numbers each hostile sender takes first.
const AHEAD: u64 = 5;

/// A clear batch of `VM` with one `cpu.utilisation` sample of `value`.
fn batch(producer: &ProducerId, epoch_ms: u64, seq: u64, value: f64) -> MonitoringBatch {
    MonitoringBatch {
        vm: VmId::new(VM).unwrap(),
        primary_site: SiteId::new("a").unwrap(),
        producer: producer.clone(),
        epoch_ms,
        seq,
        payload: BatchPayload::Clear(ClearPayload {
            samples: vec![Sample {
                data_point: DataPoint::new(DP).unwrap(),
                ts_ms: now_ms(),
                value: Value::Float(value),
            }],
            ..Default::default()
        }),
    }
}

/// `batch` signed by `by` for the public subject.
fn public(by: &SiteIdentity, subject: &str, batch: &MonitoringBatch) -> Vec<u8> {
    sign(by, Addressing::broadcast(subject), batch, now_ms())
        .unwrap()
        .encode()
        .unwrap()
}

/// `batch` signed by `by` for the primary's relay subject, addressed to it.
fn relayed(by: &SiteIdentity, subject: &str, batch: &MonitoringBatch) -> Vec<u8> {
    let a = SiteId::new("a").unwrap();
    sign(by, Addressing::request(&a, subject), batch, now_ms())
        .unwrap()
        .encode()
        .unwrap()
}

async fn counters(stack: &Stack, site: &str) -> Json {
    let op = stack.operator(site).await;
    ops(&op, site, "monitoring", json!({})).await.unwrap()
}

fn dropped(v: &Json, reason: &str) -> u64 {
    v["dropped"][reason].as_u64().unwrap_or(0)
}

/// The message ids (`<sender>.<producer>.<epoch>.<seq>`) in `site`'s accounting stream for
/// `VM`.
async fn accounting_ids(stack: &Stack, site: &str) -> BTreeSet<String> {
    let admin = stack.fed.connect_as(site, Role::Admin).await.unwrap();
    let js = jetstream::new(admin);
    let stream = js.get_stream("NUBIS_ACCOUNTING").await.unwrap();
    let info = stream.get_info().await.unwrap();
    let mut ids = BTreeSet::new();
    if info.state.messages == 0 {
        return ids;
    }
    let last = info.state.last_sequence;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: format!("nubis.acct.{site}.{VM}"),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(2), messages.next()).await {
        let m = m.unwrap();
        if let Some(id) = m.headers.as_ref().and_then(|h| h.get("Nats-Msg-Id")) {
            ids.insert(id.to_string());
        }
        if m.info().unwrap().stream_sequence >= last {
            break;
        }
    }
    ids
}

/// Bus delivery on the chain a → b → c (c runs the VM), with x a partner of a that is not on
/// the chain and d a member that has no contract with anyone.
#[tokio::test]
async fn only_the_vms_chain_is_heard_and_only_it_can_fire_an_sla_rule() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let stack = Stack::start(
        &binary,
        vec![
            SiteSpec::new("a")
                .partner("b", 10)
                .partner("x", 0)
                .top(BUS_AND_SLA),
            SiteSpec::new("b").partner("a", 0).partner("c", 10).top(BUS),
            SiteSpec::new("c").partner("b", 0).host("c1", 4096).top(BUS),
            SiteSpec::new("x").partner("a", 0).top(BUS),
            SiteSpec::new("d").top(BUS),
        ],
    )
    .await;
    let op_a = stack.operator("a").await;
    let mut events = op_a.subscribe("nubis.events.a.sla.>").await.unwrap();
    let mut public_sub = op_a.subscribe(format!("nubis.mon.a.{VM}.>")).await.unwrap();
    op_a.flush().await.unwrap();

    std::fs::write(stack.image_store("a").join("img.qcow2"), b"image").unwrap();
    let body = json!({
        "vm": VM, "name": "monitored VM",
        "hardware": {"vcpus": 1, "memory_mib": 256,
            "disks": [{"name": "vda", "capacity_bytes": 1048576, "format": "qcow2", "image": "img.qcow2"}],
            "networks": []},
        "monitoring": [{"data_point": DP, "monitoring_interval_ms": 200, "delivery_interval_ms": 400,
                        "format": {"kind": "raw"}}],
    });
    let v = ops(&op_a, "a", "deploy", body).await.unwrap();
    let end = wait_migration(&op_a, "a", v["migration"].as_str().unwrap()).await;
    assert_eq!(end["phase"], "committed", "{end}");

    // d's directory entry is in a's view, so that a can verify what d signs.
    wait_until(LONG, "a sees d in the directory", || async {
        let v = ops(&op_a, "a", "sites", json!({})).await?;
        let seen = v["sites"].as_array().into_iter().flatten();
        let d = seen.clone().any(|s| s["site"] == "d");
        d.then_some(()).ok_or(v.to_string())
    })
    .await
    .unwrap();
    // The primary takes c's batches from the bus once b's registration vouches for c: wait
    // until it has stored a few of them.
    let (producer, epoch_ms, mut last) =
        wait_until(LONG, "a stores batches produced at c", || async {
            let ids = accounting_ids(&stack, "a").await;
            let mut from_c: Vec<(ProducerId, u64, u64)> = ids
                .iter()
                .filter_map(|id| {
                    let mut parts = id.strip_prefix("c.")?.split('.');
                    let producer = ProducerId::new(parts.next()?).ok()?;
                    Some((
                        producer,
                        parts.next()?.parse().ok()?,
                        parts.next()?.parse().ok()?,
                    ))
                })
                .collect();
            from_c.sort_by_key(|(_, _, seq)| *seq);
            match from_c.last() {
                Some(l) if from_c.len() >= 3 => Ok(l.clone()),
                _ => Err(format!("{ids:?}")),
            }
        })
        .await
        .unwrap();
    // The last sequence number published so far.
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(1), public_sub.next()).await
    {
        let env = SignedEnvelope::decode(&m.payload).unwrap();
        let b: MonitoringBatch = codec::from_slice(&env.body).unwrap();
        if env.from == "c" && b.producer == producer && b.epoch_ms == epoch_ms {
            last = last.max(b.seq);
        }
    }
    let before = counters(&stack, "a").await;
    assert_eq!(before["sla_events"], 0, "{before}");

    // The attack: each hostile sender publishes the genuine producer's last sequence number
    // and its next ones with values that fire the rule, and a batch of its own.
    let subject = format!("nubis.mon.a.{VM}.infra.{DP}");
    let relay_subject = format!("nubis.relay.a.a.{VM}.infra.{DP}");
    let mut bus_sent = 0;
    for hostile in ["x", "d"] {
        let conn = stack.fed.connect(hostile).await.unwrap();
        let id = &stack.identities[hostile];
        let own = ProducerId::new(format!("p-{hostile}")).unwrap();
        let mut forged: Vec<MonitoringBatch> = (last..=last + AHEAD)
            .map(|seq| batch(&producer, epoch_ms, seq, 1000.0))
            .collect();
        forged.push(batch(&own, 1, 0, 1000.0));
        for b in &forged {
            conn.publish(subject.clone(), public(id, &subject, b).into())
                .await
                .unwrap();
            bus_sent += 1;
        }
        // And straight to the primary's relay subject, as if it were the VM's downstream.
        let b = batch(&own, 1, 1, 1000.0);
        conn.publish(
            relay_subject.clone(),
            relayed(id, &relay_subject, &b).into(),
        )
        .await
        .unwrap();
        conn.flush().await.unwrap();
    }
    // x is a partner (pinned key): refused as not the VM's downstream; d has no pinned key.
    let after = wait_until(LONG, "a drops every hostile batch", || async {
        let v = counters(&stack, "a").await;
        let wrong = dropped(&v, "wrong_sender") - dropped(&before, "wrong_sender");
        let forged = dropped(&v, "forged") - dropped(&before, "forged");
        if wrong == bus_sent + 1 && forged == 1 {
            Ok(v)
        } else {
            Err(v.to_string())
        }
    })
    .await
    .unwrap();
    assert_eq!(after["sla_events"], 0, "{after}");

    // The legitimate counterpart: the same kind of batch from the site that runs the VM is
    // taken and fires the rule — the first and only event.
    let rightful = ProducerId::new("p-rightful").unwrap();
    let conn_c = stack.fed.connect("c").await.unwrap();
    let hot = batch(&rightful, 1, 0, 4242.0);
    conn_c
        .publish(
            subject.clone(),
            public(&stack.identities["c"], &subject, &hot).into(),
        )
        .await
        .unwrap();
    conn_c.flush().await.unwrap();
    let event = tokio::time::timeout(LONG, events.next())
        .await
        .expect("the rightful site's batch fires the rule")
        .unwrap();
    let event: Json = serde_json::from_slice(&event.payload).unwrap();
    assert_eq!(event["rule"], "hot", "{event}");
    assert_eq!(
        event["value"], 4242.0,
        "the first event is not a hostile one: {event}"
    );

    // Every genuine batch, including those whose ids were taken first, is stored at a, under
    // c's name; nothing from x or d is stored anywhere on the chain.
    let wanted: BTreeSet<String> = (last + 1..=last + AHEAD)
        .map(|seq| format!("c.{producer}.{epoch_ms}.{seq}"))
        .chain([format!("c.{rightful}.1.0")])
        .collect();
    let ids = wait_until(LONG, "a stores the genuine batches", || async {
        let ids = accounting_ids(&stack, "a").await;
        let missing: Vec<&String> = wanted.difference(&ids).collect();
        if missing.is_empty() {
            Ok(ids)
        } else {
            Err(format!("missing {missing:?}"))
        }
    })
    .await
    .unwrap();
    // Every batch c published since the attack began is among them.
    let mut published = BTreeSet::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(1), public_sub.next()).await
    {
        let env = SignedEnvelope::decode(&m.payload).unwrap();
        let b: MonitoringBatch = codec::from_slice(&env.body).unwrap();
        if env.from == "c" && b.producer == producer && b.seq > last && b.seq <= last + AHEAD {
            published.insert(format!("c.{}", b.message_id()));
        }
    }
    assert!(
        published.is_subset(&ids),
        "{published:?} not all in {ids:?}"
    );
    for site in ["a", "b"] {
        let ids = accounting_ids(&stack, site).await;
        assert!(
            ids.iter().all(|id| id.starts_with("c.")),
            "{site} stored a batch from off the chain: {ids:?}"
        );
    }
    let end = counters(&stack, "a").await;
    assert_eq!(end["sla_events"], 1, "{end}");
    stack.shutdown().await;
}
