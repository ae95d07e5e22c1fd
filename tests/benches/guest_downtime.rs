//! Downtime of a real TCG guest migrated between two sites (save → transfer → restore),
//! broken down by phase, next to what an operator would do by hand on the same machine:
//! `virsh save`, `cp` of the disk and state file, `virsh restore`.
//!
//! Through nubis: site daemons, Transfer proxies and host agents on libvirtd's
//! `qemu:///system`, a hub and two leaf nats-servers on loopback. The phases are read from the
//! Controller's migration status and from libvirt, polled every 5 ms:
//! - save: from the start of the Forced migration until the transfer starts (request down the
//!   chain, `virDomainSave` at the Source host, the token back);
//! - transfer: Initiate transfer until verification (proxies, SHA-256 end to end);
//! - restore: from the commit until the guest runs at the Destination (`virDomainRestore`).
//!
//! The guest is down from the start of the save until it runs again.
//!
//! Run: `cargo bench -p nubis-tests --bench guest_downtime` (5 rounds each way). Under
//! `cargo test` it runs one round. It needs libvirtd and the test guest
//! (`scripts/setup.d/40-guest.sh`); without them it says so and stops.
// A benchmark is a test harness: a failed setup step should stop it loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use nubis_tests::stack;

use std::path::Path;
use std::time::{Duration, Instant};

use nubis_host::test_guest::{GuestImage, SerialLog};
use nubis_host::{DmtfState, Hypervisor as _, LibvirtHypervisor};
use serde_json::json;
use stack::{ops, Stack};

const POLL: Duration = Duration::from_millis(5);

#[derive(Debug, Default, Clone, Copy)]
struct Phases {
    save: f64,
    transfer: f64,
    restore: f64,
    total: f64,
    bytes: u64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn running(hv: &LibvirtHypervisor, vm: &str) -> bool {
    hv.state(vm).is_ok_and(|s| s == DmtfState::Enabled)
}

async fn wait_counting(log: &SerialLog, after: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some((n, _)) = log.last_counter().filter(|(n, _)| *n > after) {
            return n;
        }
        assert!(Instant::now() < deadline, "the guest does not count");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One migration of the running guest to `to`, timed phase by phase.
async fn migrate(
    stack: &Stack,
    op: &async_nats::Client,
    hv: &LibvirtHypervisor,
    vm: &str,
    to: &str,
) -> Phases {
    let r = ops(op, "a", "migrate", json!({"vm": vm, "to_site": to}))
        .await
        .unwrap();
    let id = r["migration"].as_str().unwrap().to_owned();
    let (mut preparing, mut transferring, mut committing, mut up) = (None, None, None, None);
    let mut bytes = 0;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        assert!(Instant::now() < deadline, "migration {id} does not end");
        let v = ops(op, "a", "vms", json!({"migration": id})).await.unwrap();
        let now = Instant::now();
        match v["phase"].as_str().unwrap_or_default() {
            "preparing" => {
                preparing.get_or_insert(now);
            }
            "transferring" => {
                preparing.get_or_insert(now);
                transferring.get_or_insert(now);
            }
            "committing" | "committed" => {
                preparing.get_or_insert(now);
                transferring.get_or_insert(now);
                committing.get_or_insert(now);
                bytes = v["bytes_total"].as_u64().unwrap_or(0);
            }
            "aborting" | "aborted" => panic!("migration aborted: {v}"),
            _ => {}
        }
        if committing.is_some() && up.is_none() && running(hv, vm) {
            up = Some(Instant::now());
        }
        if up.is_some() && v["phase"] == "committed" {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    let (p, t, c, u) = (
        preparing.unwrap(),
        transferring.unwrap(),
        committing.unwrap(),
        up.unwrap(),
    );
    let _ = stack;
    Phases {
        save: ms(t - p),
        transfer: ms(c - t),
        restore: ms(u - c),
        total: ms(u - p),
        bytes,
    }
}

/// The same guest moved by hand on the same machine: save, copy disk and state, restore.
fn by_hand(guest: &GuestImage, hv: &LibvirtHypervisor, dir: &Path) -> Phases {
    let name = format!("nubis-bench-hand-{}", std::process::id());
    let _ = hv.destroy(&name);
    let _ = hv.undefine(&name);
    let (src, dst) = (dir.join("src"), dir.join("dst"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&dst).unwrap();
    let mut spec = guest.spec(&name, &src).unwrap();
    let log = SerialLog::new(spec.serial_log.clone().unwrap());
    hv.define(&spec).unwrap();
    hv.start(&name).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while log.last_counter().is_none() {
        assert!(Instant::now() < deadline, "the guest does not count");
        std::thread::sleep(Duration::from_millis(50));
    }
    let state = src.join("state.sav");
    let t0 = Instant::now();
    hv.save(&name, &state).unwrap();
    let t1 = Instant::now();
    let mut bytes = 0;
    let disk = dst.join("disk.qcow2");
    bytes += std::fs::copy(&spec.disks[0].path, &disk).unwrap();
    bytes += std::fs::copy(&state, dst.join("state.sav")).unwrap();
    let t2 = Instant::now();
    let uuid = hv
        .list()
        .unwrap()
        .into_iter()
        .find(|d| d.handle.name == name)
        .unwrap()
        .handle
        .uuid;
    hv.undefine(&name).unwrap();
    spec.disks[0].path = disk;
    spec.uuid = Some(uuid);
    spec.serial_log = Some(dst.join("serial.log"));
    hv.restore(&dst.join("state.sav"), Some(&spec)).unwrap();
    let t3 = Instant::now();
    assert!(running(hv, &name));
    let _ = hv.destroy(&name);
    let _ = hv.undefine(&name);
    Phases {
        save: ms(t1 - t0),
        transfer: ms(t2 - t1),
        restore: ms(t3 - t2),
        total: ms(t3 - t0),
        bytes,
    }
}

fn row(label: &str, runs: &[Phases]) {
    let m = |f: fn(&Phases) -> f64| median(runs.iter().map(f).collect());
    println!(
        "| {label} | {} | {:.1} MiB | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms |",
        runs.len(),
        runs.iter().map(|p| p.bytes).max().unwrap_or(0) as f64 / (1 << 20) as f64,
        m(|p| p.save),
        m(|p| p.transfer),
        m(|p| p.restore),
        m(|p| p.total),
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let Some(binary) = nubis_testkit::require_nats_server() else {
        return;
    };
    let Some((guest, hv)) = stack::real_guest() else {
        return;
    };
    let rounds = if std::env::args().any(|a| a == "--bench") {
        5
    } else {
        1
    };
    let vm = format!("bench-guest-{}", std::process::id());
    let stack =
        Stack::start_with_qemu_hosts(&binary, stack::guest_sites(), stack::GUEST_HOSTS).await;
    stack.stock_guest_images("a", &guest);
    let op = stack.operator("a").await;
    let body = stack::guest_deploy_body(&vm);
    let r = ops(&op, "a", "deploy", body).await.unwrap();
    let m = stack::wait_migration(&op, "a", r["migration"].as_str().unwrap()).await;
    assert_eq!(m["phase"], "committed", "placement: {m}");
    let mut counted = wait_counting(
        &SerialLog::new(stack.vm_root("a", "a1").join(&vm).join("console.log")),
        0,
    )
    .await;

    let mut runs = Vec::new();
    for i in 0..rounds * 2 {
        let (to, host) = if i % 2 == 0 { ("b", "b1") } else { ("a", "a1") };
        runs.push(migrate(&stack, &op, &hv, &vm, to).await);
        let log = SerialLog::new(stack.vm_root(to, host).join(&vm).join("console.log"));
        counted = wait_counting(&log, counted).await;
    }
    let _ = ops(
        &op,
        "a",
        "control",
        json!({"vm": vm, "change": {"kind": "set_state", "transition": "power_off"}}),
    )
    .await;
    stack.shutdown().await;
    let _ = hv.destroy(&vm);
    let _ = hv.undefine(&vm);

    let dir = tempfile::tempdir().unwrap();
    let hand: Vec<Phases> = (0..rounds)
        .map(|_| by_hand(&guest, &hv, dir.path()))
        .collect();
    println!("| how | rounds | bytes moved | save | transfer | restore | guest down |");
    println!("|---|---|---|---|---|---|---|");
    row("nubis, site a ⇄ site b", &runs);
    row("by hand: save, cp, restore", &hand);
}
