//! A real TCG guest migrated end to end through the whole stack: site daemons, Transfer
//! proxies and host agents on libvirtd's `qemu:///system`, on a real hub + leaf federation.
//! The guest (see `nubis_host::test_guest`) counts once a second on its serial console and in
//! the first sector of its disk.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nubis_host::test_guest::{SerialLog, DISK_BYTES, READY_MARKER};
use nubis_host::{Hypervisor as _, LibvirtHypervisor};
use nubis_testkit::{eventually, require_nats_server};
use serde_json::{json, Value};
use sha2::Digest as _;

use crate::stack::{
    guest_deploy_body, guest_sites, ops, real_guest, wait_migration, Stack, GUEST_HOSTS,
};

const LONG: Duration = Duration::from_secs(120);

/// The VM id, unique per test process: domains of a shared libvirtd are named after VM ids, and
/// two test runs on one machine must not touch each other's guests.
fn vm_id() -> String {
    format!("guest-{}", std::process::id())
}

async fn control(client: &async_nats::Client, site: &str, vm: &str, change: Value) -> Value {
    ops(client, site, "control", json!({"vm": vm, "change": change}))
        .await
        .unwrap()
}

fn sha256(path: &Path) -> String {
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

fn vm_dir(stack: &Stack, site: &str, host: &str, vm: &str) -> PathBuf {
    stack.vm_root(site, host).join(vm)
}

/// Domains of the shared libvirtd named `vm`, whoever defined them.
fn domains_of(hv: &LibvirtHypervisor, vm: &str) -> Vec<String> {
    hv.list()
        .unwrap()
        .into_iter()
        .map(|d| d.handle.name)
        .filter(|n| n == vm)
        .collect()
}

fn clear_domains(hv: &LibvirtHypervisor, vm: &str) {
    for name in domains_of(hv, vm) {
        let _ = hv.destroy(&name);
        let _ = hv.undefine(&name);
    }
}

/// Site A places the guest on its host; the operator pauses it and moves it to site B; there
/// it is restored paused with the very disk A had, and resumes counting where it stopped
/// without booting again. Then, running, it moves back to A the same way and keeps running.
#[tokio::test]
async fn a_real_guest_moves_between_sites_through_the_proxies_and_keeps_running() {
    let _qemu = crate::QEMU.lock().await;
    let Some((guest, libvirt)) = real_guest() else {
        return;
    };
    let Some(binary) = require_nats_server() else {
        return;
    };
    let vm = vm_id();
    clear_domains(&libvirt, &vm);
    let stack = Stack::start_with_qemu_hosts(&binary, guest_sites(), GUEST_HOSTS).await;
    stack.stock_guest_images("a", &guest);
    let op_a = stack.operator("a").await;
    let op_b = stack.operator("b").await;

    // Primary placement at A: cold migration from A's image store to its host.
    let r = ops(&op_a, "a", "deploy", guest_deploy_body(&vm))
        .await
        .unwrap();
    let m = wait_migration(&op_a, "a", r["migration"].as_str().unwrap()).await;
    assert_eq!(m["phase"], "committed", "{m}");
    let log_a = SerialLog::new(vm_dir(&stack, "a", "a1", &vm).join("console.log"));
    eventually(LONG, "the guest to boot and count at A", || {
        (log_a.count(READY_MARKER) == 1 && log_a.last_counter().is_some()).then_some(())
    })
    .await;
    assert_eq!(domains_of(&libvirt, &vm), vec![vm.clone()]);

    // Paused, the guest writes nothing more: the disk A holds now is what must arrive at B.
    let paused = control(
        &op_a,
        "a",
        &vm,
        json!({"kind": "set_state", "transition": "pause"}),
    )
    .await;
    assert_eq!(paused["state"], "paused", "{paused}");
    let (paused_n, paused_up) = log_a.last_counter().unwrap();
    let disk_at_a = sha256(&vm_dir(&stack, "a", "a1", &vm).join("disk-vda.qcow2"));

    let r = ops(&op_a, "a", "migrate", json!({"vm": vm, "to_site": "b"}))
        .await
        .unwrap();
    let m = wait_migration(&op_a, "a", r["migration"].as_str().unwrap()).await;
    assert_eq!(m["phase"], "committed", "{m}");
    // The memory state moved with the disk.
    assert!(
        m["bytes_total"].as_u64().unwrap() > DISK_BYTES / 16,
        "only {m}"
    );

    // A no longer has it: no files, no domain; B holds it, restored paused, same disk.
    assert!(
        !vm_dir(&stack, "a", "a1", &vm).exists(),
        "A kept the VM's files"
    );
    assert_eq!(domains_of(&libvirt, &vm), vec![vm.clone()]);
    let q = control(&op_a, "a", &vm, json!({"kind": "query"})).await;
    assert_eq!(q["state"], "paused", "{q}");
    assert_eq!(
        sha256(&vm_dir(&stack, "b", "b1", &vm).join("disk-vda.qcow2")),
        disk_at_a,
        "the disk at B differs from the disk A sent"
    );
    assert!(
        !vm_dir(&stack, "b", "b1", &vm).join("state.sav").exists(),
        "the saved state was consumed by the restore"
    );

    // Resumed through the chain from A, it continues counting at B without booting again.
    let resumed = control(
        &op_a,
        "a",
        &vm,
        json!({"kind": "set_state", "transition": "resume"}),
    )
    .await;
    assert_eq!(resumed["state"], "enabled", "{resumed}");
    let log_b = SerialLog::new(vm_dir(&stack, "b", "b1", &vm).join("console.log"));
    let (n, up) = eventually(LONG, "the counter to continue at B", || {
        log_b.last_counter().filter(|(n, _)| *n > paused_n)
    })
    .await;
    assert!(up > paused_up, "uptime continues: {up} after {paused_up}");
    // One line may have been in flight on the serial port when A saved the guest.
    let first_at_b = log_b.counters().first().map(|(n, _)| *n).unwrap();
    assert!(
        first_at_b == paused_n + 1 || first_at_b == paused_n + 2,
        "the first count at B ({first_at_b}) follows the last at A ({paused_n})"
    );
    assert_eq!(log_b.count(READY_MARKER), 0, "the guest booted again at B");

    // Running, back to A: saved while counting, restored at A, counting on.
    let before = eventually(LONG, "a count at B", || log_b.last_counter()).await;
    let r = ops(&op_b, "b", "vms", json!({"vm": vm})).await.unwrap();
    assert_eq!(r["vms"][0]["upstream"], "a", "{r}");
    let r = ops(&op_a, "a", "migrate", json!({"vm": vm, "to_site": "a"}))
        .await
        .unwrap();
    let m = wait_migration(&op_a, "a", r["migration"].as_str().unwrap()).await;
    assert_eq!(m["phase"], "committed", "{m}");
    assert!(
        !vm_dir(&stack, "b", "b1", &vm).exists(),
        "B kept the VM's files"
    );
    assert_eq!(domains_of(&libvirt, &vm), vec![vm.clone()]);
    let log_a = SerialLog::new(vm_dir(&stack, "a", "a1", &vm).join("console.log"));
    let (n2, up2) = eventually(LONG, "the counter to continue at A", || {
        log_a.last_counter().filter(|(n, _)| *n > before.0)
    })
    .await;
    assert!(up2 > before.1, "uptime continues: {up2} after {}", before.1);
    assert_eq!(log_a.count(READY_MARKER), 0, "the guest booted again at A");
    assert!(n2 > n);
    let q = control(&op_a, "a", &vm, json!({"kind": "query"})).await;
    assert_eq!(q["state"], "enabled", "{q}");

    // Shut down through the Control interface; the guest obeys the power button.
    let down = control(
        &op_a,
        "a",
        &vm,
        json!({"kind": "set_state", "transition": "shutdown"}),
    )
    .await;
    assert_eq!(down["state"], "disabled", "{down}");
    stack.shutdown().await;
    clear_domains(&libvirt, &vm);
}
