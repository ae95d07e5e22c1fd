//! KPI write → bus latency (paper section IV-A, issue "KPI filesystem", benchmark second half):
//! an application's report written to the VM's KPI filesystem (open, write, close: the row is
//! committed when `close` returns) until a subscriber on the primary site's public monitoring
//! subject receives the batch carrying it. Real parts: a nats-server, a site daemon, a Transfer
//! proxy, a host agent on libvirt's test driver with its FUSE mount and SQLite database, and a
//! raw specifier with a delivery interval of zero. p50 and p99 of both the write alone and the
//! whole path.
//!
//! Run: `cargo bench -p nubis-tests --bench kpi_latency`. Under `cargo test` it runs a few rounds.
// A benchmark is a test harness: a failed setup step should stop it loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod shared;

use nubis_tests::stack;

use std::time::Duration;

use nubis_testkit::require_nats_server;
use stack::{SiteSpec, Stack};

#[tokio::main]
async fn main() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    if !std::path::Path::new("/dev/fuse").exists() {
        return nubis_testkit::skip_or_fail("no /dev/fuse").unwrap_or(());
    }
    let stack = Stack::start(
        &binary,
        vec![SiteSpec {
            id: "a",
            partners: vec![],
            hosts: vec![("h1", 4096)],
            policy: "",
            top: "",
        }],
    )
    .await;
    let op = stack.operator("a").await;
    let (report, mut sub) =
        shared::kpi_vm(&stack, &op, "a", ("a", "h1"), Duration::from_secs(60)).await;

    let rounds = if shared::bench_mode() { 2_000 } else { 20 };
    let warmup = rounds / 10;
    let (mut write_us, mut seen_us) = shared::kpi_reports(&report, &mut sub, warmup, rounds).await;
    let (w50, w99) = (
        shared::percentile(&mut write_us, 0.5),
        shared::percentile(&mut write_us, 0.99),
    );
    let (s50, s99) = (
        shared::percentile(&mut seen_us, 0.5),
        shared::percentile(&mut seen_us, 0.99),
    );
    println!("## KPI write → bus subscriber, {rounds} reports (after {warmup} warm-up)");
    println!("| step | p50 | p99 |");
    println!("|---|---|---|");
    println!("| open + write + close (row committed, synchronous=FULL) | {w50} µs | {w99} µs |");
    println!("| write → batch on the public subject | {s50} µs | {s99} µs |");
    stack.shutdown().await;
}
