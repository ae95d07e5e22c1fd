//! `cargo run -p nubis-tests --bin chaos -- --seed S --faults N`: a randomized chaos campaign
//! against a federation of processes on loopback (see `nubis_tests::chaos`). It prints the seed
//! and every fault as it goes, then the faults by kind, the time to settle (p50, p99) and every
//! invariant violation; it exits 1 when there was one. Without `--seed`, a seed from the clock.
// A harness: a failed setup step should stop it loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::ExitCode;

fn arg(args: &[String], name: &str) -> Option<u64> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1)?.parse().ok()
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let seed = arg(&args, "--seed").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs())
    });
    let faults = arg(&args, "--faults").unwrap_or(20) as usize;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let Some(binary) = nubis_testkit::require_nats_server() else {
        eprintln!("chaos: no usable nats-server (run ./scripts/setup.sh)");
        return ExitCode::from(3);
    };
    let started = std::time::Instant::now();
    let report = nubis_tests::chaos::run(&binary, seed, faults, |line| println!("{line}")).await;
    println!(
        "\nseed {}: {} faults in {:.0} s",
        report.seed,
        faults,
        started.elapsed().as_secs_f64()
    );
    for (kind, n) in &report.faults {
        println!("  {n:4}  {kind}");
    }
    println!(
        "migrations: {} committed, {} aborted; monitoring batches checked at the primary: {}",
        report.committed, report.aborted, report.batches
    );
    println!(
        "time to settle after a restore: p50 {:.1} s, p99 {:.1} s, max {:.1} s",
        report.settle_quantile(0.5).as_secs_f64(),
        report.settle_quantile(0.99).as_secs_f64(),
        report.settle_quantile(1.0).as_secs_f64()
    );
    if report.violations.is_empty() {
        println!("invariant violations: none");
        ExitCode::SUCCESS
    } else {
        println!("invariant violations: {}", report.violations.len());
        for v in &report.violations {
            println!("  {v}");
        }
        ExitCode::from(1)
    }
}
