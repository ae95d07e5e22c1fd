//! Cost of one KPI report (open, write a two-line CSV, close) through the KPI filesystem, with
//! each durability setting, against the same write to a plain directory on the same disk and to
//! tmpfs (`/dev/shm`). Needs FUSE; without it the benchmark says so and measures nothing.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use criterion::{criterion_group, criterion_main, Criterion};
use nubis_kpifs::{Durability, KpiFs, KpiOptions};

const REPORT: &[u8] = b"current_users,queue_length,load\n42,7,0.75\n";

fn write_report(path: &Path) {
    let mut f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(REPORT)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("kpi_report_open_write_close");
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let plain = tempfile::tempdir_in(&base).unwrap_or_else(|e| panic!("tempdir: {e}"));
    group.bench_function("plain_dir", |b| {
        let path = plain.path().join("report");
        b.iter(|| write_report(&path));
    });
    if Path::new("/dev/shm").is_dir() {
        let shm = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|e| panic!("tempdir: {e}"));
        group.bench_function("tmpfs", |b| {
            let path = shm.path().join("report");
            b.iter(|| write_report(&path));
        });
    }
    if !Path::new("/dev/fuse").exists() {
        eprintln!("SKIPPED: /dev/fuse is missing, the KPI filesystem is not measured");
        return;
    }
    for (label, durability) in [
        ("kpifs_sync_full", Durability::Full),
        ("kpifs_sync_normal", Durability::Normal),
    ] {
        let dir = tempfile::tempdir_in(&base).unwrap_or_else(|e| panic!("tempdir: {e}"));
        let options = KpiOptions {
            durability,
            ..KpiOptions::default()
        };
        let mount = KpiFs::mount(
            &dir.path().join("mnt"),
            &dir.path().join("kpi.sqlite"),
            options,
        )
        .unwrap_or_else(|e| panic!("mount: {e}"));
        let path = mount.mountpoint().join("unencrypted").join("report");
        group.bench_function(label, |b| b.iter(|| write_report(&path)));
        mount.unmount().unwrap_or_else(|e| panic!("unmount: {e}"));
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
