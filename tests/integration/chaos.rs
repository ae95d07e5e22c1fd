//! A short chaos campaign (see `nubis_tests::chaos`): ten random faults, from a seed that
//! `NUBIS_CHAOS_SEED` may set (printed, so a failure replays with
//! `cargo run -p nubis-tests --bin chaos -- --seed S --faults 10`).

#[tokio::test]
async fn a_short_chaos_campaign_breaks_no_invariant() {
    let Some(binary) = nubis_testkit::require_nats_server() else {
        return;
    };
    let seed = std::env::var("NUBIS_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_261_202);
    let faults = std::env::var("NUBIS_CHAOS_FAULTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let report = nubis_tests::chaos::run(&binary, seed, faults, |line| eprintln!("{line}")).await;
    assert_eq!(report.faults.values().sum::<u32>() as usize, faults);
    assert!(report.batches > 0, "no monitoring batch checked");
    assert!(
        report.violations.is_empty(),
        "seed {seed}: {:#?}",
        report.violations
    );
}
