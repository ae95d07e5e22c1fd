//! Control-plane cost of one migration (a primary placement) through chains of 0 to 3
//! Intermediaries: cross-site control messages and their bytes (as seen on the hub), and the
//! Controller's time from start to commit with a tiny image, so that the file transfer is
//! negligible. Real site daemons, proxies and host agents (libvirt test driver).
//!
//! Run: `cargo bench -p nubis-tests --bench migration_control` (prints a table). Under
//! `cargo test` it runs one placement through one Intermediary.
// A benchmark is a test harness: a failed setup step should stop it loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod shared;

use nubis_tests::stack;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use shared::{chain, place};
use stack::Stack;

#[derive(Default)]
struct Tally {
    inboxes: HashSet<String>,
    messages: u64,
    bytes: u64,
}

async fn run(
    binary: &nubis_testkit::NatsServerBinary,
    intermediaries: usize,
    placements: usize,
) -> (f64, f64, Vec<f64>) {
    let stack = Stack::start(binary, chain(intermediaries)).await;
    std::fs::write(stack.image_store("s0").join("tiny.qcow2"), vec![1u8; 1024]).unwrap();
    // Everything that crosses a site boundary passes the hub: count the federation requests,
    // the Transfer proxies' cross-site calls, and the replies to exactly those.
    let observer = stack
        .fed
        .connect_as("hub", nubis_testkit::Role::Operator)
        .await
        .unwrap();
    let mut sub = observer.subscribe("nubis.>").await.unwrap();
    observer.flush().await.unwrap();
    let tally = Arc::new(Mutex::new(Tally::default()));
    let t2 = tally.clone();
    let counter = tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let s = m.subject.as_str();
            let control_request = s.starts_with("nubis.fed.")
                || (s.starts_with("nubis.proxy.")
                    && (s.ends_with(".fetch") || s.ends_with(".status")));
            let mut t = t2.lock().unwrap();
            if control_request {
                t.messages += 1;
                t.bytes += m.payload.len() as u64;
                if let Some(r) = &m.reply {
                    t.inboxes.insert(r.to_string());
                }
            } else if t.inboxes.remove(s) {
                t.messages += 1;
                t.bytes += m.payload.len() as u64;
            }
        }
    });
    let op = stack.operator("s0").await;
    let mut times = Vec::new();
    let (mut messages, mut bytes) = (0u64, 0u64);
    for i in 0..placements {
        {
            let mut t = tally.lock().unwrap();
            t.messages = 0;
            t.bytes = 0;
        }
        let elapsed_ms = place(&op, "s0", &format!("vm-{i}")).await;
        // Let the last replies reach the observer before reading the tally.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = tally.lock().unwrap();
        messages = t.messages;
        bytes = t.bytes;
        times.push(elapsed_ms);
    }
    counter.abort();
    stack.shutdown().await;
    (messages as f64, bytes as f64, times)
}

#[tokio::main]
async fn main() {
    let Some(binary) = nubis_testkit::require_nats_server() else {
        return;
    };
    let bench = std::env::args().any(|a| a == "--bench");
    let (chains, placements): (Vec<usize>, usize) = if bench {
        (vec![0, 1, 2, 3], 8)
    } else {
        (vec![1], 1)
    };
    println!("| Intermediaries | control messages | control bytes | p50 | p90 | max |");
    println!("|---|---|---|---|---|---|");
    for k in chains {
        let (messages, bytes, mut times) = run(&binary, k, placements).await;
        times.sort_by(f64::total_cmp);
        let at = |p: f64| times[((times.len() - 1) as f64 * p).round() as usize];
        println!(
            "| {k} | {messages:.0} | {bytes:.0} B ({:.1} KiB) | {:.0} ms | {:.0} ms | {:.0} ms |",
            bytes / 1024.0,
            at(0.5),
            at(0.9),
            at(1.0)
        );
    }
}
