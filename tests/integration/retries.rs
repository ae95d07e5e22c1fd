//! Retries that wait: a destination whose daemons restart between two transfer rounds answers
//! "no responders" for a while; the Controller waits for it instead of counting failed rounds,
//! and the migration commits once it is back.

use std::path::Path;
use std::time::Duration;

use nubis_testkit::wait_until;
use serde_json::{json, Value};

use crate::stack::{ops, wait_migration, SiteSpec, Stack};

const LONG: Duration = Duration::from_secs(90);

fn deploy_body(vm: &str) -> Value {
    json!({
        "vm": vm,
        "name": "test VM",
        "hardware": {
            "vcpus": 1,
            "memory_mib": 256,
            "disks": [{"name": "vda", "capacity_bytes": 1048576, "format": "qcow2", "image": "img.qcow2"}],
            "networks": [],
        },
    })
}

/// Waits until `child` is stopped (by the SIGSTOP it sent itself at its hook).
async fn wait_stopped(child: &std::process::Child) {
    let stat = format!("/proc/{}/stat", child.id());
    wait_until(LONG, "the Controller stopped at its hook", || {
        let state = std::fs::read_to_string(&stat).map_err(|e| e.to_string());
        async move {
            // `pid (comm) S ...`: the state follows the last parenthesis.
            let state = state?;
            match state.rsplit_once(") ").and_then(|(_, r)| r.chars().next()) {
                Some('T') => Ok(()),
                s => Err(format!("state {s:?}")),
            }
        }
    })
    .await
    .unwrap();
}

fn send_signal(child: &std::process::Child, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {}", child.id());
}

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
    let r = ops(&op, "a", "deploy", deploy_body("rt-1")).await.unwrap();
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
    wait_stopped(&controller).await;

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
