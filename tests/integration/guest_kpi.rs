//! A real guest reports a KPI through its KPI share (paper section IV-A, reachable from inside
//! the VM): the host agent exports the VM's KPI filesystem over virtio-9p, a sidecar script in
//! the guest's initramfs mounts the share, writes a two-line CSV report and unmounts it; the row
//! lands in the VM's SQLite database and reaches the primary site's public monitoring subject.
//! Because the guest holds the share only while it writes, the VM can still be saved and moved,
//! and it keeps reporting at its destination.

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt as _;
use nubis_host::test_guest::{SerialLog, KPI_COLUMN, KPI_TABLE, READY_MARKER};
use nubis_host::{HostConfig, Hypervisor as _, LibvirtHypervisor};
use nubis_kpifs::{KpiFs, KpiOptions, KpiRowKind, KpiStore, KpiValue, EXPORT_CHILD};
use nubis_protocol::codec;
use nubis_protocol::envelope::SignedEnvelope;
use nubis_protocol::message::{BatchPayload, MonitoringBatch, Value};
use nubis_testkit::{eventually, require_nats_server};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::stack::{
    guest_deploy_body, guest_sites, ops, real_guest, wait_migration, Stack, GUEST_HOSTS,
};

const LONG: Duration = Duration::from_secs(120);

/// Whether this process may mount (FUSE, tmpfs, binds); prints why not.
fn can_mount() -> bool {
    if !Path::new("/dev/fuse").exists() {
        return nubis_testkit::skip_or_fail("no /dev/fuse").unwrap_or(false);
    }
    let probe = tempfile::tempdir().unwrap();
    let export = probe.path().join("probe.share");
    match nubis_kpifs::prepare_export(&export) {
        Ok(_) => {
            nubis_kpifs::remove_export(&export);
            true
        }
        Err(e) => {
            nubis_testkit::skip_or_fail(format!("cannot mount a kpi export: {e}")).unwrap_or(false)
        }
    }
}

fn kpi_values(db: &Path) -> Vec<i64> {
    let Ok(store) = KpiStore::open(db, &KpiOptions::default()) else {
        return Vec::new();
    };
    store
        .rows_after(0, 10_000)
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.table == KPI_TABLE)
        .filter_map(|r| match r.kind {
            KpiRowKind::Unencrypted { columns } => columns
                .into_iter()
                .find(|(c, _)| c == KPI_COLUMN)
                .and_then(|(_, v)| match v {
                    KpiValue::Integer(i) => Some(i),
                    _ => None,
                }),
            KpiRowKind::Encrypted { .. } => None,
        })
        .collect()
}

/// Removes an export even when the test fails half-way, so no mount outlives the test.
struct RemoveExport(PathBuf);

impl Drop for RemoveExport {
    fn drop(&mut self) {
        nubis_kpifs::remove_export(&self.0);
    }
}

/// The export a guest shares outlives the KPI filesystem bound on it: while nothing is bound a
/// write through it fails (nothing lands in a plain directory), a new mount of the same database
/// is bound in place of the old one, and the export goes only when asked.
#[test]
fn the_kpi_export_outlives_its_mount_and_refuses_writes_while_unbound() {
    if !can_mount() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let export = dir.path().join("vm-1.share");
    let mountpoint = dir.path().join("vm-1");
    let db = dir.path().join("vm-1.sqlite");
    let child = nubis_kpifs::prepare_export(&export).unwrap();
    let _cleanup = RemoveExport(export.clone());
    assert_eq!(child, export.join(EXPORT_CHILD));
    let report = child.join("unencrypted").join(KPI_TABLE);

    assert!(std::fs::write(&report, "current_users\n1\n").is_err());
    assert!(
        std::fs::write(export.join("stray"), "x").is_err(),
        "the export itself is read-only"
    );

    let mut first = KpiFs::mount(&mountpoint, &db, KpiOptions::default()).unwrap();
    first.bind_into(&export).unwrap();
    std::fs::write(&report, "current_users\n1\n").unwrap();
    assert_eq!(
        std::fs::read_to_string(&report).unwrap(),
        "current_users\n1\n"
    );
    // What a 9p server in passthrough mode does after creating a file: owner and mode set to
    // what they are. A real change stays refused.
    let meta = std::fs::metadata(&report).unwrap();
    std::os::unix::fs::chown(&report, Some(meta.uid()), Some(meta.gid())).unwrap();
    std::fs::set_permissions(&report, meta.permissions()).unwrap();
    assert!(std::fs::set_permissions(&report, std::fs::Permissions::from_mode(0o600)).is_err());
    first.unmount().unwrap();

    assert!(std::fs::write(&report, "current_users\n2\n").is_err());
    assert_eq!(
        nubis_kpifs::prepare_export(&export).unwrap(),
        child,
        "an export in use is kept"
    );
    let mut second = KpiFs::mount(&mountpoint, &db, KpiOptions::default()).unwrap();
    second.bind_into(&export).unwrap();
    std::fs::write(&report, "current_users\n3\n").unwrap();
    second.unmount().unwrap();
    assert_eq!(kpi_values(&db), vec![1, 3]);

    nubis_kpifs::remove_export(&export);
    assert!(!export.exists());
}

/// The VM id, unique per test process (other runs may share this libvirtd).
fn vm_id() -> String {
    format!("kpi-guest-{}", std::process::id())
}

fn clear_domains(hv: &LibvirtHypervisor, vm: &str) {
    for d in hv.list().unwrap_or_default() {
        if d.handle.name == vm {
            let _ = hv.destroy(vm);
            let _ = hv.undefine(vm);
        }
    }
}

/// A daemon of a site started by the test, with its stop button.
struct Daemon(CancellationToken, JoinHandle<()>);

/// Restarts every daemon of `site` with `kpi_share = true` in its host configurations.
async fn restart_with_kpi_share(
    stack: &mut Stack,
    site: &'static str,
    hosts: &[&str],
) -> Vec<Daemon> {
    stack.stop_site(site).await;
    let root = stack.root().to_path_buf();
    let mut daemons = Vec::new();
    let token = CancellationToken::new();
    let proxy =
        nubis_proxy::config::Config::load(&root.join(format!("{site}-proxy.toml"))).unwrap();
    let t = token.clone();
    daemons.push(Daemon(
        token,
        tokio::spawn(async move {
            let _ = nubis_proxy::run(proxy, t).await;
        }),
    ));
    for host in hosts {
        let path = root.join(format!("{site}-{host}.toml"));
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(
            &path,
            text.replacen("\n[capacity]", "kpi_share = true\n\n[capacity]", 1),
        )
        .unwrap();
        let config = HostConfig::load(&path).unwrap();
        assert!(config.kpi_share);
        let token = CancellationToken::new();
        let t = token.clone();
        daemons.push(Daemon(
            token,
            tokio::spawn(async move {
                if let Err(e) = nubis_host::agent::run(config, t).await {
                    panic!("host agent: {e:?}");
                }
            }),
        ));
    }
    let config = nubis_site::config::SiteConfig::load(&root.join(format!("{site}.toml"))).unwrap();
    let token = CancellationToken::new();
    let t = token.clone();
    daemons.push(Daemon(
        token,
        tokio::spawn(async move {
            let _ = nubis_site::run(config, t).await;
        }),
    ));
    stack.wait_ready(site).await;
    daemons
}

async fn stop(daemons: Vec<Daemon>) {
    for Daemon(token, handle) in daemons.into_iter().rev() {
        token.cancel();
        let _ = handle.await;
    }
}

/// Reads batches from `sub` until one carries the KPI value `want`; returns every value seen.
async fn wait_on_bus(sub: &mut async_nats::Subscriber, want: i64) -> Vec<i64> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + LONG;
    while !seen.contains(&want) {
        let m = tokio::time::timeout_at(deadline, sub.next())
            .await
            .unwrap_or_else(|_| panic!("no batch with {want} on the bus; saw {seen:?}"))
            .unwrap();
        let env = SignedEnvelope::decode(&m.payload).unwrap();
        let batch: MonitoringBatch = codec::from_slice(&env.body).unwrap();
        let BatchPayload::Clear(clear) = batch.payload else {
            panic!("sealed payload where a clear one was asked for");
        };
        for s in clear.samples {
            assert_eq!(s.data_point.as_str(), "kpi.guest.current_users");
            if let Value::Int(i) = s.value {
                seen.push(i);
            }
        }
    }
    seen
}

fn vm_dir(stack: &Stack, site: &str, host: &str, vm: &str) -> PathBuf {
    stack.vm_root(site, host).join(vm)
}

/// The guest's sidecar writes `current_users` through its KPI share on host A: the row is in
/// A's database for the VM and on the public monitoring subject. The guest holds the share only
/// while writing, so it is then saved and moved to site B while running, where it goes on
/// reporting through B's share, and A keeps nothing of its KPI filesystem.
#[tokio::test]
async fn a_real_guest_reports_a_kpi_through_its_share_and_still_migrates() {
    let _qemu = crate::QEMU.lock().await;
    let Some((guest, libvirt)) = real_guest() else {
        return;
    };
    let Some(binary) = require_nats_server() else {
        return;
    };
    if !can_mount() {
        return;
    }
    let vm = vm_id();
    clear_domains(&libvirt, &vm);
    let mut stack = Stack::start_with_qemu_hosts(&binary, guest_sites(), GUEST_HOSTS).await;
    // Both ends share KPI filesystems: a saved state restores only into the same devices.
    let mut daemons = restart_with_kpi_share(&mut stack, "a", &["a1"]).await;
    daemons.extend(restart_with_kpi_share(&mut stack, "b", &["b1"]).await);
    stack.stock_guest_images("a", &guest);
    let op_a = stack.operator("a").await;
    let mut public = op_a
        .subscribe(format!("nubis.mon.a.{vm}.kpi.guest.current_users"))
        .await
        .unwrap();

    let mut body = guest_deploy_body(&vm);
    body["monitoring"] = json!([{"data_point": "kpi.guest.current_users",
        "monitoring_interval_ms": 0, "delivery_interval_ms": 0, "format": {"kind": "raw"}}]);
    let r = ops(&op_a, "a", "deploy", body).await.unwrap();
    let m = wait_migration(&op_a, "a", r["migration"].as_str().unwrap()).await;
    assert_eq!(m["phase"], "committed", "{m}");

    // Written in the guest, committed in A's database for the VM, published by the site.
    let log_a = SerialLog::new(vm_dir(&stack, "a", "a1", &vm).join("console.log"));
    let db_a = stack.kpi_root("a", "a1").join(format!("{vm}.sqlite"));
    let k = eventually(LONG, "the guest to write a KPI report at A", || {
        log_a.kpi_reports().first().copied()
    })
    .await;
    eventually(LONG, "the report to be a row at A", || {
        kpi_values(&db_a).contains(&k).then_some(())
    })
    .await;
    wait_on_bus(&mut public, k).await;
    assert_eq!(log_a.count(READY_MARKER), 1);

    // Running and reporting, it moves to B: the save succeeds because the share is not held.
    let before = log_a.kpi_reports().last().copied().unwrap();
    let r = ops(&op_a, "a", "migrate", json!({"vm": vm, "to_site": "b"}))
        .await
        .unwrap();
    let m = wait_migration(&op_a, "a", r["migration"].as_str().unwrap()).await;
    assert_eq!(m["phase"], "committed", "{m}");
    let q = ops(
        &op_a,
        "a",
        "control",
        json!({"vm": vm, "change": {"kind": "query"}}),
    )
    .await
    .unwrap();
    assert_eq!(q["state"], "enabled", "{q}");

    // At B the guest was restored, not booted, and reports on through B's share.
    let log_b = SerialLog::new(vm_dir(&stack, "b", "b1", &vm).join("console.log"));
    let db_b = stack.kpi_root("b", "b1").join(format!("{vm}.sqlite"));
    let k2 = eventually(LONG, "the guest to report again at B", || {
        log_b.kpi_reports().into_iter().find(|v| *v > before)
    })
    .await;
    eventually(LONG, "the report to be a row at B", || {
        kpi_values(&db_b).contains(&k2).then_some(())
    })
    .await;
    wait_on_bus(&mut public, k2).await;
    assert_eq!(log_b.count(READY_MARKER), 0, "the guest booted again at B");
    let kpi_a = stack.kpi_root("a", "a1");
    eventually(LONG, "A to drop the VM's KPI filesystem and export", || {
        (!kpi_a.join(&vm).exists() && !kpi_a.join(format!("{vm}.share")).exists()).then_some(())
    })
    .await;

    let down = ops(
        &op_a,
        "a",
        "control",
        json!({"vm": vm, "change": {"kind": "set_state", "transition": "power_off"}}),
    )
    .await
    .unwrap();
    assert_eq!(down["state"], "disabled", "{down}");
    stop(daemons).await;
    let exports: Vec<PathBuf> = [("a", "a1"), ("b", "b1")]
        .iter()
        .map(|(site, host)| stack.kpi_root(site, host).join(format!("{vm}.share")))
        .collect();
    stack.shutdown().await;
    clear_domains(&libvirt, &vm);
    for export in exports {
        assert!(!export.exists(), "{} left behind", export.display());
        nubis_kpifs::remove_export(&export);
    }
}
