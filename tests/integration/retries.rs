//! Retries that wait: a destination whose daemons restart between two transfer rounds answers
//! "no responders" for a while; the Controller waits for it instead of counting failed rounds,
//! and the migration commits once it is back.

use std::path::Path;
use std::time::Duration;

use nubis_testkit::wait_until;
use serde_json::json;

use crate::migration::{send_signal, wait_stopped};
use crate::stack::{deploy_body, ops, wait_migration, SiteSpec, Stack};

const LONG: Duration = Duration::from_secs(90);

/// Waits until the log at `path` holds `line`.
async fn wait_logged(path: &Path, line: &str) {
    wait_until(LONG, format!("{line:?} logged"), || {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        async move {
            if text.contains(line) {
                Ok(())
            } else {
                Err("not yet")
            }
        }
    })
    .await
    .unwrap();
}

/// The VM runs at b; a migrates it to c. The Controller is held just before the first
/// transfer round, c's daemons are stopped, and the Controller goes on: its rounds find no
/// responder at c, and it waits. Once it said so in its log, c starts again, and the migration
/// commits there with no failed round.
#[tokio::test]
async fn a_destination_restarting_before_a_transfer_round_is_waited_for() {
    let Some(binary) = nubis_testkit::require_nats_server() else {
        return;
    };
    let mut stack = Stack::start(
        &binary,
        vec![
            SiteSpec::new("a").partner("b", 10).partner("c", 5),
            SiteSpec::new("b").partner("a", 0).host("b1", 4096),
            SiteSpec::new("c").partner("a", 0).host("c1", 4096),
        ],
    )
    .await;
    std::fs::write(stack.image_store("a").join("img.qcow2"), vec![7u8; 1 << 20]).unwrap();
    let op = stack.operator("a").await;
    let r = ops(&op, "a", "deploy", deploy_body("rt-1", "img.qcow2"))
        .await
        .unwrap();
    let m = wait_migration(&op, "a", r["migration"].as_str().unwrap()).await;
    assert_eq!(m["phase"], "committed", "{m}");

    // The Controller as a process that stops itself once the source is prepared, before it
    // sends the first Initiate transfer.
    let mut plain = stack.site_daemon_as_process("a").await;
    plain.kill().unwrap();
    plain.wait().unwrap();
    let log = "a-site-held.log";
    let mut controller = stack.spawn_site_process_with(
        "a",
        log,
        &[(
            "NUBIS_TEST_STOP_AT",
            "source journaled; starting the transfer",
        )],
    );
    stack.wait_ready("a").await;
    let r = ops(&op, "a", "migrate", json!({"vm": "rt-1", "to_site": "c"}))
        .await
        .unwrap();
    let migration = r["migration"].as_str().unwrap().to_string();
    wait_stopped(&controller, "the Controller").await;

    stack.stop_site("c").await;
    send_signal(&controller, "CONT");
    wait_logged(
        &stack.root().join(log),
        "a peer has no responder; waiting for it",
    )
    .await;
    stack.start_site("c").await;

    let m = wait_migration(&op, "a", &migration).await;
    assert_eq!(m["phase"], "committed", "{m}");
    assert_eq!(m["failed_rounds"], 0, "{m}");
    let vms = ops(&op, "a", "vms", json!({"vm": "rt-1"})).await.unwrap();
    assert_eq!(vms["vms"][0]["next_hop"], "site:c", "{vms}");

    controller.kill().unwrap();
    controller.wait().unwrap();
    stack.shutdown().await;
}
