//! The README's main job, run non-interactively: the whole walk must hold.

use std::process::Command;

#[test]
fn the_main_job_walks_through_every_step() {
    if nubis_testkit::require_nats_server().is_none() {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_nubis-demo"))
        .arg("--ci")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for step in [
        "b delegated to",
        "pause  -> \"paused\"",
        "resume -> \"enabled\"",
        "eviction notice",
        "state seen from a: \"enabled\"",
        "Every step held",
    ] {
        assert!(stdout.contains(step), "missing {step:?} in:\n{stdout}");
    }
}
