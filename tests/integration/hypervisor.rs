//! Integration tests: the host agent's hypervisor layer against real libvirt.
//!
//! `test:///default` (libvirt's built-in test driver) exercises every call and its errors; its
//! state is shared by the connections of one process, so each test uses its own domain names.
//! `qemu:///system` runs the tiny real guest under TCG: boot, statistics, save and restore with
//! the guest's counter continuing, graceful and forced shutdown, a libvirtd restart.
//!
//! The real-guest tests need libvirtd and the guest built by `scripts/setup.d/30-libvirt.sh` and
//! `40-guest.sh`; without them they are skipped with a reason, except under `CI=true`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nubis_host::hypervisor::HostInfo;
use nubis_host::sampling::rates;
use nubis_host::spec::{DiskFormat, DiskSpec, FilesystemShare, InterfaceSpec, KernelBoot};
use nubis_host::test_guest::{GuestImage, SerialLog, POWEROFF_MARKER, READY_MARKER};
use nubis_host::{
    DmtfState, DomainSpec, Hypervisor, HypervisorError, LibvirtConfig, LibvirtHypervisor, Sampler,
    ShutdownOutcome,
};
use nubis_testkit::eventually_blocking;

/// Generous bound for anything to happen; a guard against hanging, not a speed requirement.
const DEADLINE: Duration = Duration::from_secs(120);

/// Skips (returns `None`) with a printed reason, or fails under `CI=true`.
fn prerequisite<T>(what: Result<T, String>) -> Option<T> {
    match what {
        Ok(v) => Some(v),
        Err(reason) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("prerequisite missing under CI: {reason}")
        }
        Err(reason) => {
            eprintln!("skipped: {reason}");
            None
        }
    }
}

fn test_driver() -> LibvirtHypervisor {
    LibvirtHypervisor::connect(LibvirtConfig::new("test:///default"))
        .expect("libvirt's test driver is built into libvirt")
}

fn test_spec(name: &str) -> DomainSpec {
    let mut spec = DomainSpec::new(name, 2, 256);
    spec.disks.push(DiskSpec {
        path: PathBuf::from(format!("/var/lib/nubis/{name}/disk.qcow2")),
        format: DiskFormat::Qcow2,
        target: "vda".into(),
        capacity_bytes: 1 << 30,
        read_only: false,
    });
    spec.interfaces.push(InterfaceSpec::User {
        mac: Some("52:54:00:12:34:56".into()),
    });
    spec.kernel_boot = Some(KernelBoot {
        kernel: "/boot/vmlinuz".into(),
        initrd: None,
        cmdline: "console=ttyS0".into(),
    });
    spec.filesystems.push(FilesystemShare {
        source: PathBuf::from(format!("/var/lib/nubis/{name}/kpi")),
        tag: "kpi".into(),
        read_only: false,
    });
    spec
}

#[test]
fn test_driver_runs_every_lifecycle_call() {
    let hv = test_driver();
    let dir = tempfile::tempdir().unwrap();
    let name = "lifecycle";
    let handle = hv.define(&test_spec(name)).unwrap();
    assert_eq!(handle.name, name);
    assert_eq!(hv.state(name).unwrap(), DmtfState::Disabled);

    hv.start(name).unwrap();
    assert_eq!(hv.state(name).unwrap(), DmtfState::Enabled);
    hv.suspend(name).unwrap();
    assert_eq!(hv.state(name).unwrap(), DmtfState::Paused);
    hv.resume(name).unwrap();
    assert_eq!(hv.state(name).unwrap(), DmtfState::Enabled);

    let state_file = dir.path().join("lifecycle.state");
    hv.save(name, &state_file).unwrap();
    assert!(state_file.is_file());
    assert_eq!(hv.state(name).unwrap(), DmtfState::Suspended);
    let restored = hv.restore(&state_file, None).unwrap();
    assert_eq!(restored, handle);
    assert_eq!(hv.state(name).unwrap(), DmtfState::Enabled);

    assert_eq!(
        hv.shutdown(name, Duration::from_secs(30)).unwrap(),
        ShutdownOutcome::Graceful
    );
    assert_eq!(hv.state(name).unwrap(), DmtfState::Disabled);
    assert_eq!(
        hv.shutdown(name, Duration::from_secs(30)).unwrap(),
        ShutdownOutcome::AlreadyOff
    );

    hv.start(name).unwrap();
    hv.destroy(name).unwrap();
    assert_eq!(hv.state(name).unwrap(), DmtfState::Disabled);

    hv.undefine(name).unwrap();
    assert!(matches!(
        hv.state(name),
        Err(HypervisorError::UnknownDomain { .. })
    ));
}

#[test]
fn test_driver_reports_clear_errors_and_keeps_serving() {
    let hv = test_driver();
    let dir = tempfile::tempdir().unwrap();
    let missing = "no-such-vm";
    let unknown = |r: Result<(), HypervisorError>| {
        assert!(
            matches!(r, Err(HypervisorError::UnknownDomain { ref name }) if name == missing),
            "{r:?}"
        )
    };
    unknown(hv.start(missing));
    unknown(hv.destroy(missing));
    unknown(hv.suspend(missing));
    unknown(hv.resume(missing));
    unknown(hv.undefine(missing));
    unknown(hv.save(missing, &dir.path().join("x")));
    unknown(hv.shutdown(missing, Duration::from_secs(1)).map(|_| ()));
    unknown(hv.state(missing).map(|_| ()));
    unknown(hv.stats(missing).map(|_| ()));

    let name = "errors";
    hv.define(&test_spec(name)).unwrap();
    assert!(matches!(
        hv.define(&test_spec(name)),
        Err(HypervisorError::AlreadyDefined { .. })
    ));
    assert!(matches!(
        hv.define(&DomainSpec::new("bad/name", 1, 64)),
        Err(HypervisorError::InvalidSpec(_))
    ));

    // Operations that do not apply in the current state.
    assert!(matches!(
        hv.resume(name),
        Err(HypervisorError::InvalidState {
            state: DmtfState::Disabled,
            ..
        })
    ));
    assert!(matches!(
        hv.save(name, &dir.path().join("off.state")),
        Err(HypervisorError::InvalidState { .. })
    ));
    hv.start(name).unwrap();
    assert!(matches!(
        hv.start(name),
        Err(HypervisorError::InvalidState {
            state: DmtfState::Enabled,
            ..
        })
    ));

    // Saved states that cannot be restored.
    let corrupt = dir.path().join("corrupt.state");
    std::fs::write(&corrupt, b"this is not a saved domain\n").unwrap();
    assert!(matches!(
        hv.restore(&corrupt, None),
        Err(HypervisorError::CorruptStateFile { .. })
    ));
    let empty = dir.path().join("empty.state");
    std::fs::write(&empty, b"").unwrap();
    assert!(matches!(
        hv.restore(&empty, None),
        Err(HypervisorError::CorruptStateFile { .. })
    ));
    assert!(matches!(
        hv.restore(&dir.path().join("absent.state"), None),
        Err(HypervisorError::StateFileMissing { .. })
    ));

    // Still serving after all of that.
    assert_eq!(hv.state(name).unwrap(), DmtfState::Enabled);
    assert!(hv.list().unwrap().iter().any(|d| d.handle.name == name));
    hv.destroy(name).unwrap();
    hv.undefine(name).unwrap();
}

#[test]
fn test_driver_restores_a_domain_undefined_after_saving() {
    // What a destination host does: it has only the state file, not the definition.
    let hv = test_driver();
    let dir = tempfile::tempdir().unwrap();
    let name = "moved";
    let handle = hv.define(&test_spec(name)).unwrap();
    hv.start(name).unwrap();
    let state_file = dir.path().join("moved.state");
    hv.save(name, &state_file).unwrap();
    hv.undefine(name).unwrap();
    assert!(!hv.list().unwrap().iter().any(|d| d.handle.name == name));

    let restored = hv.restore(&state_file, None).unwrap();
    assert_eq!(restored, handle);
    let listed = hv.list().unwrap();
    let summary = listed.iter().find(|d| d.handle.name == name).unwrap();
    assert_eq!(summary.state, DmtfState::Enabled);
    assert!(
        summary.persistent,
        "restored domain is defined on this host"
    );

    // Restoring over a running domain of the same name is refused.
    assert!(matches!(
        hv.restore(&state_file, None),
        Err(HypervisorError::InvalidState { .. } | HypervisorError::RestoreFailed { .. })
    ));
    hv.destroy(name).unwrap();
    hv.undefine(name).unwrap();
}

#[test]
fn test_driver_lists_domains_and_host() {
    let hv = test_driver();
    for name in ["list-a", "list-b"] {
        hv.define(&test_spec(name)).unwrap();
    }
    hv.start("list-b").unwrap();
    let listed = hv.list().unwrap();
    let state_of = |n: &str| listed.iter().find(|d| d.handle.name == n).map(|d| d.state);
    assert_eq!(state_of("list-a"), Some(DmtfState::Disabled));
    assert_eq!(state_of("list-b"), Some(DmtfState::Enabled));
    assert!(listed.iter().all(|d| !d.handle.uuid.is_empty()));

    let HostInfo {
        cpus, memory_kib, ..
    } = hv.host_info().unwrap();
    assert!(cpus > 0 && memory_kib > 0);

    // A new connection (the agent restarted) finds the same domains.
    let again = test_driver();
    let names: Vec<String> = again
        .list()
        .unwrap()
        .into_iter()
        .map(|d| d.handle.name)
        .collect();
    assert!(names.contains(&"list-a".to_string()) && names.contains(&"list-b".to_string()));

    hv.destroy("list-b").unwrap();
    for name in ["list-a", "list-b"] {
        hv.undefine(name).unwrap();
    }
}

#[test]
fn test_driver_statistics_become_rates() {
    let hv = test_driver();
    let name = "sampled";
    hv.define(&test_spec(name)).unwrap();
    hv.start(name).unwrap();

    let first = hv.stats(name).unwrap();
    assert_eq!(first.state, DmtfState::Enabled);
    assert_eq!(first.vcpus, 2);
    assert!(first.memory.current_kib > 0);
    assert_eq!(first.disks.len(), 1);
    assert_eq!(first.disks[0].device, "vda");
    assert_eq!(first.interfaces.len(), 1);

    let mut sampler = Sampler::new();
    assert!(sampler.observe(first.clone()).unwrap().is_none());
    // The test driver's counters follow the clock; wait until they have moved.
    let second = eventually_blocking(DEADLINE, "counters to advance", || {
        let s = hv.stats(name).unwrap();
        (s.taken_at > first.taken_at && s.cpu_time_ns > first.cpu_time_ns).then_some(s)
    });
    let r = sampler.observe(second.clone()).unwrap().unwrap();
    assert_eq!(r, rates(&first, &second).unwrap());
    assert!(r.cpu_utilisation.is_finite() && r.cpu_utilisation > 0.0);
    assert!(r.disks[0].rd_bytes_per_s.is_finite() && r.disks[0].rd_bytes_per_s >= 0.0);
    assert!(r.interfaces[0].rx_bytes_per_s.is_finite());
    assert!(!r.counters_reset);

    // A stopped domain still answers, with no device counters.
    hv.destroy(name).unwrap();
    let off = hv.stats(name).unwrap();
    assert_eq!(off.state, DmtfState::Disabled);
    assert!(off.disks.is_empty());
    hv.undefine(name).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Real QEMU guests (TCG) under qemu:///system.

struct Qemu {
    hv: LibvirtHypervisor,
    guest: GuestImage,
    _lock: tokio::sync::MutexGuard<'static, ()>,
}

fn qemu() -> Option<Qemu> {
    let lock = crate::QEMU.blocking_lock();
    let guest =
        prerequisite(GuestImage::locate(&GuestImage::default_dir()).map_err(|e| e.to_string()))?;
    let mut config = LibvirtConfig::new("qemu:///system");
    config.accelerator = nubis_host::test_guest::accelerator();
    let hv = prerequisite(
        LibvirtHypervisor::connect(config)
            .map_err(|e| format!("libvirtd not reachable on qemu:///system: {e}")),
    )?;
    Some(Qemu {
        hv,
        guest,
        _lock: lock,
    })
}

/// Removes a domain left over by an earlier, interrupted run.
fn clear(hv: &LibvirtHypervisor, name: &str) {
    let _ = hv.destroy(name);
    let _ = hv.undefine(name);
}

/// A guest running in `dir`, booted and counting.
fn boot(q: &Qemu, name: &str, dir: &Path) -> (DomainSpec, SerialLog) {
    clear(&q.hv, name);
    let spec = q.guest.spec(name, dir).unwrap();
    let log = SerialLog::new(spec.serial_log.clone().unwrap());
    q.hv.define(&spec).unwrap();
    q.hv.start(name).unwrap();
    eventually_blocking(DEADLINE, "the guest to boot and count", || {
        (log.count(READY_MARKER) == 1 && log.last_counter().is_some()).then_some(())
    });
    (spec, log)
}

#[test]
fn qemu_guest_runs_saves_restores_and_shuts_down() {
    let Some(q) = qemu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let name = "nubis-test-lifecycle";
    let (_spec, log) = boot(&q, name, dir.path());
    assert_eq!(q.hv.state(name).unwrap(), DmtfState::Enabled);

    // Statistics: the guest burns CPU and writes its counter to vda.
    let mut sampler = Sampler::new();
    let first = q.hv.stats(name).unwrap();
    assert!(first.cpu_time_ns > 0);
    assert!(first.memory.current_kib >= 128 * 1024);
    sampler.observe(first.clone()).unwrap();
    let second = eventually_blocking(DEADLINE, "the guest to write to its disk", || {
        let s = q.hv.stats(name).unwrap();
        let written = |s: &nubis_host::DomainStats| {
            s.disks
                .iter()
                .find(|d| d.device == "vda")
                .map_or(0, |d| d.wr_req)
        };
        (written(&s) > written(&first)).then_some(s)
    });
    assert_eq!(second.run_id, first.run_id);
    let r = sampler.observe(second).unwrap().unwrap();
    assert!(r.cpu_utilisation > 0.0 && r.cpu_utilisation.is_finite());
    assert!(r.disks[0].wr_bytes_per_s > 0.0 && r.disks[0].wr_req_per_s > 0.0);
    assert!(!r.counters_reset);

    // Pause and continue.
    q.hv.suspend(name).unwrap();
    assert_eq!(q.hv.state(name).unwrap(), DmtfState::Paused);
    q.hv.resume(name).unwrap();
    assert_eq!(q.hv.state(name).unwrap(), DmtfState::Enabled);

    // Save, then restore: the guest continues where it was, it does not boot again.
    let state_file = dir.path().join("memory.state");
    q.hv.save(name, &state_file).unwrap();
    assert_eq!(q.hv.state(name).unwrap(), DmtfState::Suspended);
    let (saved_n, saved_up) = log.last_counter().unwrap();
    q.hv.restore(&state_file, None).unwrap();
    assert_eq!(q.hv.state(name).unwrap(), DmtfState::Enabled);
    let (n, up) = eventually_blocking(DEADLINE, "the counter to continue after restore", || {
        log.last_counter().filter(|(n, _)| *n > saved_n)
    });
    assert!(up > saved_up, "uptime continues: {up} after {saved_up}");
    assert!(n > saved_n);
    assert_eq!(log.count(READY_MARKER), 1, "the guest did not boot again");

    // A graceful shutdown reaches the guest as an ACPI power-button press.
    assert_eq!(
        q.hv.shutdown(name, DEADLINE).unwrap(),
        ShutdownOutcome::Graceful
    );
    assert_eq!(log.count(POWEROFF_MARKER), 1);
    assert_eq!(q.hv.state(name).unwrap(), DmtfState::Disabled);
    q.hv.undefine(name).unwrap();
}

#[test]
fn qemu_guest_restores_with_relocated_disk() {
    // A destination host restores the saved memory with the disk at its own path.
    let Some(q) = qemu() else { return };
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let name = "nubis-test-relocated";
    let (mut spec, log) = boot(&q, name, src.path());
    let state_file = src.path().join("memory.state");
    q.hv.save(name, &state_file).unwrap();
    let (saved_n, _) = log.last_counter().unwrap();
    let uuid =
        q.hv.list()
            .unwrap()
            .into_iter()
            .find(|d| d.handle.name == name)
            .unwrap()
            .handle
            .uuid;
    q.hv.undefine(name).unwrap();

    let new_disk = dst.path().join("disk.qcow2");
    std::fs::copy(&spec.disks[0].path, &new_disk).unwrap();
    std::fs::remove_file(&spec.disks[0].path).unwrap();
    spec.disks[0].path = new_disk;
    spec.uuid = Some(uuid);
    let dst_log = SerialLog::new(dst.path().join("serial.log"));
    spec.serial_log = Some(dst.path().join("serial.log"));

    q.hv.restore(&state_file, Some(&spec)).unwrap();
    assert_eq!(q.hv.state(name).unwrap(), DmtfState::Enabled);
    eventually_blocking(
        DEADLINE,
        "the counter to continue on the relocated disk",
        || dst_log.last_counter().filter(|(n, _)| *n > saved_n),
    );
    assert_eq!(
        dst_log.count(READY_MARKER),
        0,
        "the guest did not boot again"
    );
    clear(&q.hv, name);
}

#[test]
fn qemu_refuses_damaged_state_files_and_forces_a_stuck_shutdown() {
    let Some(q) = qemu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let name = "nubis-test-damaged";
    let (_spec, _log) = boot(&q, name, dir.path());
    let state_file = dir.path().join("memory.state");
    q.hv.save(name, &state_file).unwrap();

    let garbage = dir.path().join("garbage.state");
    std::fs::write(&garbage, vec![0x5a; 64 * 1024]).unwrap();
    assert!(matches!(
        q.hv.restore(&garbage, None),
        Err(HypervisorError::CorruptStateFile { .. })
    ));
    // A state file cut short: the header is fine, the memory image is not.
    let truncated = dir.path().join("truncated.state");
    let bytes = std::fs::read(&state_file).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert!(matches!(
        q.hv.restore(&truncated, None),
        Err(HypervisorError::CorruptStateFile { .. } | HypervisorError::RestoreFailed { .. })
    ));
    assert_ne!(q.hv.state(name).unwrap(), DmtfState::Enabled);

    // The intact file still works, and the domain is usable afterwards.
    q.hv.restore(&state_file, None).unwrap();
    assert_eq!(q.hv.state(name).unwrap(), DmtfState::Enabled);

    // A paused guest cannot answer the power button: the shutdown ends in a destroy.
    q.hv.suspend(name).unwrap();
    assert_eq!(
        q.hv.shutdown(name, Duration::from_secs(2)).unwrap(),
        ShutdownOutcome::Forced
    );
    assert_eq!(q.hv.state(name).unwrap(), DmtfState::Disabled);
    q.hv.undefine(name).unwrap();
}

fn libvirtd_pids() -> Vec<u32> {
    let out = Command::new("pgrep").args(["-x", "libvirtd"]).output();
    out.map(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    })
    .unwrap_or_default()
}

#[test]
fn qemu_agent_survives_a_libvirtd_restart() {
    let Some(q) = qemu() else { return };
    let pids = libvirtd_pids();
    let Some(&pid) = pids.first() else {
        prerequisite::<()>(Err(
            "libvirtd is not a separate process here (socket activation?)".into(),
        ));
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let name = "nubis-test-restart";
    let (_spec, log) = boot(&q, name, dir.path());

    // Stop the libvirtd this test found running and start a new one, as an operator would.
    let killed = Command::new("kill").arg(pid.to_string()).status().unwrap();
    assert!(killed.success());
    eventually_blocking(DEADLINE, "libvirtd to exit", || {
        (!libvirtd_pids().contains(&pid)).then_some(())
    });
    // Calls fail cleanly while it is down.
    assert!(matches!(
        q.hv.state(name),
        Err(HypervisorError::ConnectionLost { .. } | HypervisorError::Connect { .. })
    ));
    let started = Command::new("libvirtd").arg("-d").status().unwrap();
    assert!(started.success());

    // The agent reconnects by itself, and the guest kept running meanwhile.
    let state = eventually_blocking(DEADLINE, "the agent to reconnect", || q.hv.state(name).ok());
    assert_eq!(state, DmtfState::Enabled);
    let (before, _) = log.last_counter().unwrap();
    eventually_blocking(DEADLINE, "the guest to keep counting", || {
        log.last_counter().filter(|(n, _)| *n > before)
    });

    // A restarted agent (a new connection) rediscovers its domain.
    let agent = LibvirtHypervisor::connect(LibvirtConfig::new("qemu:///system")).unwrap();
    assert!(agent
        .list()
        .unwrap()
        .iter()
        .any(|d| d.handle.name == name && d.state == DmtfState::Enabled));
    q.hv.destroy(name).unwrap();
    q.hv.undefine(name).unwrap();
}

#[test]
fn qemu_guest_mounts_a_share_and_cannot_be_saved_meanwhile() {
    // QEMU refuses to save (migrate) a guest while it has a virtio-9p export mounted: the saved
    // state could not carry the open files. The refusal is an error, the guest keeps running.
    let Some(q) = qemu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    let name = "nubis-test-share";
    clear(&q.hv, name);
    let mut spec = q.guest.spec(name, dir.path()).unwrap();
    spec.filesystems.push(FilesystemShare {
        source: share,
        tag: "kpi".into(),
        read_only: false,
    });
    let log = SerialLog::new(spec.serial_log.clone().unwrap());
    q.hv.define(&spec).unwrap();
    q.hv.start(name).unwrap();
    eventually_blocking(DEADLINE, "the guest to mount its share and count", || {
        (log.count("NUBIS-SHARE kpi") == 1 && log.last_counter().is_some()).then_some(())
    });
    assert!(matches!(
        q.hv.save(name, &dir.path().join("memory.state")),
        Err(HypervisorError::Operation { .. })
    ));
    assert_eq!(q.hv.state(name).unwrap(), DmtfState::Enabled);
    clear(&q.hv, name);
}
