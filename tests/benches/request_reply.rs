//! Signed request/reply latency between two leaf sites through the hub, side by side with an
//! unsigned raw request/reply of the same body bytes on the same servers, and with the whole
//! bus layer (`FederationClient` → the bus serve loop) as the site daemons use it.
//!
//! Run: `cargo bench -p nubis-tests --bench request_reply` (needs nats-server >= 2.10).
//! Prints p50/p90/p99 in microseconds and the envelope size for each mode.
// A benchmark is a test harness: a failed setup step should stop it loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt as _;
use nubis_bus::federation::FederationClient;
use nubis_bus::serve::{sign_reply, Limits, Service};
use nubis_bus::{CallPolicy, SignedClient};
use nubis_protocol::codec;
use nubis_protocol::envelope::{now_ms, sign, Addressing, Verifier};
use nubis_protocol::identity::SiteIdentity;
use nubis_protocol::message::{
    Endpoint, ProxyId, ProxyUri, TransferStatus, TransferStatusReply, TransferToken,
    TransferVerification,
};
use nubis_protocol::replay::ReplayCache;
use nubis_protocol::subject::{FederationOp, ParsedSubject, Subject};
use nubis_protocol::{MigrationId, SiteId, VmId};
use nubis_testkit::{require_nats_server, Federation};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Rounds measured, and warm-up rounds, when run by `cargo bench`; `cargo test` runs a few only.
fn rounds() -> (usize, usize) {
    if std::env::args().any(|a| a == "--bench") {
        (2_000, 200)
    } else {
        (20, 2)
    }
}

fn percentiles(mut v: Vec<u128>) -> (u128, u128, u128) {
    v.sort_unstable();
    let at = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    (at(0.50), at(0.90), at(0.99))
}

#[tokio::main]
async fn main() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let fed = Federation::start_with(&binary, &["a", "b"])
        .await
        .expect("federation");
    let client_a = fed.connect("a").await.expect("connect a");
    let client_b = fed.connect("b").await.expect("connect b");
    let a = Arc::new(SiteIdentity::generate(SiteId::new("a").expect("id")));
    let b = Arc::new(SiteIdentity::generate(SiteId::new("b").expect("id")));
    let b_id = b.site().clone();
    let verifier_a = Verifier::new(
        a.site().clone(),
        [(b.site().clone(), b.public().signing)],
        ReplayCache::temporary(600_000).expect("cache"),
    );
    let verifier_b = Arc::new(Verifier::new(
        b.site().clone(),
        [(a.site().clone(), a.public().signing)],
        ReplayCache::temporary(600_000).expect("cache"),
    ));
    let request = TransferVerification {
        migration_id: MigrationId::random(),
        vm: VmId::new("web-1").expect("vm"),
        source: Endpoint {
            proxy: ProxyUri::new(b_id.clone(), ProxyId::new("p1").expect("proxy")),
            token: TransferToken::random(),
        },
    };
    let reply = TransferStatusReply {
        migration_id: request.migration_id,
        status: TransferStatus::Transferring {
            bytes_done: 1 << 30,
            bytes_total: 4 << 30,
        },
    };

    // Signed responder at b: verify the request, sign the reply.
    let signed_subject = "nubis.fed.b.transfer.verify";
    let mut sub = client_b.subscribe(signed_subject).await.expect("subscribe");
    {
        let (client_b, b, verifier_b, reply) = (
            client_b.clone(),
            b.clone(),
            verifier_b.clone(),
            reply.clone(),
        );
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let Ok(opened) = verifier_b.open_request(&msg.payload, signed_subject, now_ms())
                else {
                    continue;
                };
                let Ok(_req) = opened.body::<TransferVerification>() else {
                    continue;
                };
                let Ok(env) = sign(&b, Addressing::reply_to(&opened), &reply, now_ms()) else {
                    continue;
                };
                if let (Some(inbox), Ok(bytes)) = (msg.reply, env.encode()) {
                    let _ = client_b.publish(inbox, bytes.into()).await;
                }
            }
        });
    }
    // Raw responder at b: echo fixed reply bytes, no signature.
    // Same subject space as the signed requests (the hub carries only `nubis.fed.<site>.>` to
    // a site), without the envelope.
    let raw_subject = "nubis.fed.b.raw-bench";
    let raw_reply = codec::to_vec(&reply).expect("encode");
    let mut raw_sub = client_b.subscribe(raw_subject).await.expect("subscribe");
    {
        let client_b = client_b.clone();
        tokio::spawn(async move {
            while let Some(msg) = raw_sub.next().await {
                if let Some(inbox) = msg.reply {
                    let _ = client_b.publish(inbox, raw_reply.clone().into()).await;
                }
            }
        });
    }
    client_b.flush().await.expect("flush");
    // Wait until the interest has propagated across the hub.
    let raw_body = codec::to_vec(&request).expect("encode");
    for _ in 0..100 {
        if client_a
            .request(raw_subject, raw_body.clone().into())
            .await
            .is_ok()
        {
            break;
        }
    }

    // The bus layer at b: the serve loop of every site daemon (verify first, fair slots, signed
    // answer), on the commit subject.
    let bus_subject = Subject::federation(&b_id, FederationOp::MigrationCommit);
    let tracker = TaskTracker::new();
    let bus_sub = client_b
        .subscribe(bus_subject.as_str().to_string())
        .await
        .expect("subscribe");
    {
        let service = Service {
            name: "bench",
            identity: b.clone(),
            verifier: Arc::new(Verifier::new(
                b.site().clone(),
                [(a.site().clone(), a.public().signing)],
                ReplayCache::temporary(600_000).expect("cache"),
            )),
            limits: Limits::new(64),
        };
        let (b, reply) = (b.clone(), reply.clone());
        nubis_bus::serve::serve(
            service,
            client_b.clone(),
            bus_sub,
            &tracker,
            CancellationToken::new(),
            |subject: &str| match Subject::parse(subject) {
                Ok(ParsedSubject::Federation { op, .. }) => Some(op),
                _ => None,
            },
            move |_op, opened| {
                let bytes = sign_reply(&b, &opened, &reply).map_err(|e| {
                    nubis_protocol::message::ErrorReply::new(
                        nubis_protocol::message::ErrorCode::Internal,
                        e.to_string(),
                    )
                });
                async move { bytes }
            },
        );
    }
    client_b.flush().await.expect("flush");
    // The bus layer at a: `FederationClient` as a site daemon holds it.
    let fed_a = FederationClient::new(SignedClient::new(
        client_a.clone(),
        a.clone(),
        Arc::new(Verifier::new(
            a.site().clone(),
            [(b.site().clone(), b.public().signing)],
            ReplayCache::temporary(600_000).expect("cache"),
        )),
        CallPolicy::default(),
    ));
    for _ in 0..100 {
        let r: Result<TransferStatusReply, _> = fed_a
            .call(&b_id, FederationOp::MigrationCommit, &request)
            .await;
        if r.is_ok() {
            break;
        }
    }

    let (rounds, warm_up) = rounds();
    let mut bus = Vec::with_capacity(rounds);
    let mut raw = Vec::with_capacity(rounds);
    let mut signed = Vec::with_capacity(rounds);
    let mut signed_size = 0;
    for i in 0..warm_up + rounds {
        // Raw: the same body bytes, no envelope.
        let t = Instant::now();
        let ans = client_a
            .request(raw_subject, raw_body.clone().into())
            .await
            .expect("raw request");
        let _: TransferStatusReply = codec::from_slice(&ans.payload).expect("decode");
        let raw_us = t.elapsed().as_micros();

        // Signed: sign, send, verify the reply.
        let t = Instant::now();
        let env = sign(
            &a,
            Addressing::request(&b_id, signed_subject),
            &request,
            now_ms(),
        )
        .expect("sign");
        let nonce = env.nonce;
        let bytes = env.encode().expect("encode");
        signed_size = bytes.len();
        let ans = client_a
            .request(signed_subject, bytes.into())
            .await
            .expect("signed request");
        let opened = verifier_a
            .open_reply(&ans.payload, signed_subject, &nonce, now_ms())
            .expect("verify reply");
        let _: TransferStatusReply = opened.body().expect("decode");
        let signed_us = t.elapsed().as_micros();
        // The bus layer: the same exchange through `FederationClient` and the serve loop.
        let t = Instant::now();
        let _: TransferStatusReply = fed_a
            .call(&b_id, FederationOp::MigrationCommit, &request)
            .await
            .expect("bus call");
        let bus_us = t.elapsed().as_micros();
        if i >= warm_up {
            raw.push(raw_us);
            signed.push(signed_us);
            bus.push(bus_us);
        }
    }
    let (r50, r90, r99) = percentiles(raw);
    let (s50, s90, s99) = percentiles(signed);
    let (b50, b90, b99) = percentiles(bus);
    println!("request/reply a -> hub -> b, {rounds} rounds each, microseconds");
    println!("| mode | request bytes | p50 | p90 | p99 |");
    println!("|---|---|---|---|---|");
    println!(
        "| raw NATS request (same body, unsigned) | {} | {r50} | {r90} | {r99} |",
        raw_body.len()
    );
    println!("| signed envelope, verified both ways | {signed_size} | {s50} | {s90} | {s99} |");
    println!(
        "| the bus layer: `FederationClient` → serve loop (per-call reply inbox) | ~{signed_size} | {b50} | {b90} | {b99} |"
    );
}
