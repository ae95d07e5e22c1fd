//! Integration tests: the KPI filesystem (paper section IV-A) on a real FUSE mount backed by a
//! real SQLite file, driven with ordinary shell tools and with Rust file I/O.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nubis_kpifs::{KpiDir, KpiFs, KpiMount, KpiOptions, KpiRow, KpiRowKind, KpiStore, KpiValue};
use nubis_testkit::{eventually_blocking, skip_or_fail};

/// How long a condition may take before the test fails; a guard against hanging only.
const POLL_TIMEOUT: Duration = Duration::from_secs(30);

/// Environment variable that turns `restart_child_serves_a_mount` into the mount process of
/// `restart_after_sigkill_keeps_every_acknowledged_write`.
const CHILD_ENV: &str = "NUBIS_KPIFS_CHILD_MOUNT";

/// The Linux errno values the KPI filesystem returns (`asm-generic/errno-base.h`).
mod errno {
    pub const EPERM: i32 = 1;
    pub const EFBIG: i32 = 27;
    pub const EINVAL: i32 = 22;
    pub const ENOSPC: i32 = 28;
}

/// FUSE needs the device and the `fusermount3` helper (used to detach dead mounts).
fn fuse_available() -> bool {
    if !Path::new("/dev/fuse").exists() {
        return skip_or_fail::<()>("/dev/fuse is missing").is_some();
    }
    let helper = Command::new("fusermount3")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !matches!(helper, Ok(s) if s.success()) {
        return skip_or_fail::<()>("fusermount3 is missing (scripts/setup.d/20-fuse.sh)").is_some();
    }
    true
}

struct Fixture {
    _dir: tempfile::TempDir,
    mnt: PathBuf,
    db: PathBuf,
    mount: Option<KpiMount>,
}

impl Fixture {
    fn new(options: KpiOptions) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("mnt");
        let db = dir.path().join("kpi.sqlite");
        let mount = KpiFs::mount(&mnt, &db, options).unwrap();
        Fixture {
            _dir: dir,
            mnt,
            db,
            mount: Some(mount),
        }
    }

    fn mount(&mut self) -> &mut KpiMount {
        self.mount.as_mut().unwrap()
    }

    fn remount(&mut self, options: KpiOptions) {
        if let Some(m) = self.mount.take() {
            m.unmount().unwrap();
        }
        self.mount = Some(KpiFs::mount(&self.mnt, &self.db, options).unwrap());
    }

    fn u(&self, name: &str) -> PathBuf {
        self.mnt.join("unencrypted").join(name)
    }

    fn e(&self, name: &str) -> PathBuf {
        self.mnt.join("encrypted").join(name)
    }

    /// Runs `script` with `sh -c` in the mount.
    fn sh(&self, script: &str) -> Output {
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(&self.mnt)
            .output()
            .unwrap()
    }

    /// A second connection to the database, as the host agent or an operator would open it.
    fn store(&self) -> KpiStore {
        KpiStore::open(&self.db, &KpiOptions::default()).unwrap()
    }

    fn rows(&self) -> Vec<KpiRow> {
        self.store().rows_after(0, usize::MAX).unwrap()
    }
}

fn columns(row: &KpiRow) -> Vec<(String, KpiValue)> {
    match &row.kind {
        KpiRowKind::Unencrypted { columns } => columns.clone(),
        KpiRowKind::Encrypted { .. } => panic!("row {} is encrypted", row.rowid),
    }
}

fn int(name: &str, v: i64) -> (String, KpiValue) {
    (name.to_owned(), KpiValue::Integer(v))
}

fn text(name: &str, v: &str) -> (String, KpiValue) {
    (name.to_owned(), KpiValue::Text(v.to_owned()))
}

fn assert_fails(out: &Output, what: &str, message: &str) {
    assert!(!out.status.success(), "{what} should fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(message),
        "{what}: stderr {stderr:?} lacks {message:?}"
    );
}

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error()
        .unwrap_or_else(|| panic!("no errno in {e}"))
}

#[test]
fn two_line_report_becomes_one_typed_row_with_shell_tools() {
    if !fuse_available() {
        return;
    }
    let mut fx = Fixture::new(KpiOptions::default());
    let mut events = fx.mount().take_events().unwrap();
    let content = "current_users,load,host,note\n42,0.75,web1,\n";
    let out = fx.sh("printf 'current_users,load,host,note\\n42,0.75,web1,\\n' > unencrypted/app");
    assert!(out.status.success(), "{out:?}");

    let rows = fx.rows();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].table, "app");
    assert_eq!(
        columns(&rows[0]),
        vec![
            int("current_users", 42),
            ("load".into(), KpiValue::Real(0.75)),
            text("host", "web1"),
            ("note".into(), KpiValue::Null),
        ]
    );
    assert!(rows[0].ts_ms > 0);
    // The event of the write path equals the stored row.
    assert_eq!(events.try_recv().unwrap(), rows[0]);

    let cat = fx.sh("cat unencrypted/app");
    assert_eq!(cat.stdout, content.as_bytes());
    let ls = fx.sh("ls unencrypted; echo --; ls encrypted; echo --; ls");
    assert_eq!(
        String::from_utf8_lossy(&ls.stdout),
        "app\n--\n--\nencrypted\nunencrypted\n"
    );
    let size = fx.sh("stat -c %s unencrypted/app");
    assert_eq!(
        String::from_utf8_lossy(&size.stdout).trim(),
        content.len().to_string()
    );
    assert_eq!(
        fs::metadata(fx.u("app")).unwrap().len(),
        content.len() as u64
    );
}

#[test]
fn one_line_and_unlabelled_columns_get_standard_names() {
    if !fuse_available() {
        return;
    }
    let fx = Fixture::new(KpiOptions::default());
    assert!(fx.sh("echo 7,8.5,up > unencrypted/plain").status.success());
    fs::write(fx.u("partly"), "users,,state\n1,2,\"3\"\n").unwrap();
    let rows = fx.rows();
    assert_eq!(
        columns(&rows[0]),
        vec![
            int("column1", 7),
            ("column2".into(), KpiValue::Real(8.5)),
            text("column3", "up")
        ]
    );
    assert_eq!(
        columns(&rows[1]),
        vec![int("users", 1), int("column2", 2), text("state", "3")]
    );
}

#[test]
fn a_changed_header_adds_columns_and_keeps_earlier_rows() {
    if !fuse_available() {
        return;
    }
    let fx = Fixture::new(KpiOptions::default());
    for content in [
        "users,load\n1,2\n",
        "users,queue\n3,4\n",
        "load,users,queue\n5,6,7\n",
    ] {
        fs::write(fx.u("svc"), content).unwrap();
    }
    let rows = fx.rows();
    assert_eq!(rows.len(), 3);
    assert_eq!(columns(&rows[0]), vec![int("users", 1), int("load", 2)]);
    assert_eq!(columns(&rows[1]), vec![int("users", 3), int("queue", 4)]);
    assert_eq!(
        columns(&rows[2]),
        vec![int("load", 5), int("users", 6), int("queue", 7)]
    );
    assert_eq!(fs::read(fx.u("svc")).unwrap(), b"load,users,queue\n5,6,7\n");
}

#[test]
fn encrypted_files_are_stored_as_opaque_blobs() {
    if !fuse_available() {
        return;
    }
    let fx = Fixture::new(KpiOptions::default());
    // Not UTF-8, more than two lines, commas: none of it matters in encrypted/.
    let blob: Vec<u8> = (0..=255u8).chain(b"\n\n\n,,\xff".iter().copied()).collect();
    fs::write(fx.e("sealed"), &blob).unwrap();
    assert!(fx.sh("cp encrypted/sealed encrypted/copy").status.success());
    let rows = fx.rows();
    assert_eq!(rows.len(), 2);
    for (row, name) in rows.iter().zip(["sealed", "copy"]) {
        assert_eq!(row.table, name);
        assert_eq!(row.dir(), KpiDir::Encrypted);
        assert_eq!(row.kind, KpiRowKind::Encrypted { blob: blob.clone() });
    }
    assert_eq!(fs::read(fx.e("copy")).unwrap(), blob);
}

#[test]
fn ordinary_tools_overwrite_copy_and_read_the_last_content() {
    if !fuse_available() {
        return;
    }
    let fx = Fixture::new(KpiOptions::default());
    let src = fx._dir.path().join("report.csv");
    fs::write(&src, "users\n5\n").unwrap();
    let script = format!(
        "echo 'users' > unencrypted/a && \
         printf 'users\\n2\\n' > unencrypted/a && \
         cp {} unencrypted/a && \
         {{ printf 'us'; printf 'ers\\n'; printf '9\\n'; }} > unencrypted/b && \
         touch unencrypted/empty && ls unencrypted && cat unencrypted/a unencrypted/b",
        src.display()
    );
    let out = fx.sh(&script);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "a\nb\nempty\nusers\n5\nusers\n9\n"
    );
    let rows = fx.rows();
    let by_table: Vec<(String, Vec<(String, KpiValue)>)> =
        rows.iter().map(|r| (r.table.clone(), columns(r))).collect();
    assert_eq!(
        by_table,
        vec![
            ("a".into(), vec![text("column1", "users")]),
            ("a".into(), vec![int("users", 2)]),
            ("a".into(), vec![int("users", 5)]),
            // Three writes of one redirection are one row.
            ("b".into(), vec![int("users", 9)]),
        ]
    );
    // An empty file has a size of zero and no rows; truncating by path is accepted.
    assert_eq!(fs::metadata(fx.u("empty")).unwrap().len(), 0);
    assert!(fx.sh("truncate -s 0 unencrypted/a").status.success());
    assert_eq!(fs::read(fx.u("a")).unwrap(), b"users\n5\n");
}

#[test]
fn partial_and_out_of_order_writes_are_assembled_into_one_row() {
    if !fuse_available() {
        return;
    }
    let fx = Fixture::new(KpiOptions::default());
    let mut f = File::create(fx.u("pieces")).unwrap();
    for piece in [&b"cpu,"[..], b"mem", b"\n0.5,", b"1024\n"] {
        f.write_all(piece).unwrap();
        f.flush().unwrap();
    }
    drop(f);
    // The second half first, then the first half, at explicit offsets.
    let f = File::create(fx.u("backwards")).unwrap();
    f.write_all_at(b"2\n", 2).unwrap();
    f.write_all_at(b"a\n", 0).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let rows = fx.rows();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        columns(&rows[0]),
        vec![("cpu".into(), KpiValue::Real(0.5)), int("mem", 1024)]
    );
    assert_eq!(columns(&rows[1]), vec![int("a", 2)]);
}

#[test]
fn a_duplicated_descriptor_commits_one_row_per_write_session() {
    if !fuse_available() {
        return;
    }
    let fx = Fixture::new(KpiOptions::default());
    // As a shell does: open, duplicate, close the original before anything is written.
    let original = File::create(fx.u("dup")).unwrap();
    let mut copy = original.try_clone().unwrap();
    drop(original);
    copy.write_all(b"x\n1\n").unwrap();
    drop(copy);
    // Written through one descriptor, then both closed.
    let mut original = File::create(fx.u("dup")).unwrap();
    let copy = original.try_clone().unwrap();
    original.write_all(b"x\n2\n").unwrap();
    drop(copy);
    drop(original);
    // Read-only opens and their closes commit nothing.
    let mut s = String::new();
    File::open(fx.u("dup"))
        .unwrap()
        .read_to_string(&mut s)
        .unwrap();
    assert_eq!(s, "x\n2\n");
    let rows = fx.rows();
    let values: Vec<_> = rows.iter().map(columns).collect();
    assert_eq!(values, vec![vec![int("x", 1)], vec![int("x", 2)]]);
}

#[test]
fn a_forked_child_closing_an_inherited_descriptor_commits_nothing() {
    if !fuse_available() {
        return;
    }
    let fx = Fixture::new(KpiOptions::default());
    let mut f = File::create(fx.u("forked")).unwrap();
    f.write_all(b"half,").unwrap();
    // The child gets a copy of the descriptor table; exec closes the copy, which flushes.
    assert!(Command::new("true").status().unwrap().success());
    f.write_all(b"whole\n1,2\n").unwrap();
    drop(f);
    // A child that writes through an inherited descriptor commits at its own close.
    let out = fx.sh(
        "exec 3>unencrypted/inherited; /usr/bin/printf 'k\\n5\\n' >&3; exec 3>&-; cat unencrypted/inherited",
    );
    assert_eq!(out.stdout, b"k\n5\n", "{out:?}");
    let values: Vec<_> = fx.rows().iter().map(columns).collect();
    assert_eq!(
        values,
        vec![vec![int("half", 1), int("whole", 2)], vec![int("k", 5)]]
    );
}

#[test]
fn a_bad_file_name_is_refused_at_create_with_einval() {
    if !fuse_available() {
        return;
    }
    let fx = Fixture::new(KpiOptions::default());
    for name in ["load.csv", "bad name", ".hidden", "-x"] {
        let e = File::create(fx.u(name)).unwrap_err();
        assert_eq!(errno_of(&e), errno::EINVAL, "{name}");
    }
    let e = File::create(fx.u(&"x".repeat(65))).unwrap_err();
    assert_eq!(errno_of(&e), errno::EINVAL);
    assert_fails(
        &fx.sh("echo 1 > unencrypted/q.csv"),
        "shell create",
        "Invalid argument",
    );
    // Files only live in the two directories.
    let e = File::create(fx.mnt.join("top")).unwrap_err();
    assert_eq!(errno_of(&e), errno::EPERM);
    assert!(fx.sh("ls unencrypted").stdout.is_empty());
    assert!(fx.store().tables().unwrap().is_empty());
}

#[test]
fn one_table_too_many_is_refused_at_create_with_enospc() {
    if !fuse_available() {
        return;
    }
    let fx = Fixture::new(KpiOptions {
        max_tables: 3,
        ..KpiOptions::default()
    });
    fs::write(fx.u("t1"), "1\n").unwrap();
    fs::write(fx.u("t2"), "2\n").unwrap();
    fs::write(fx.e("t3"), "3").unwrap();
    let e = File::create(fx.u("t4")).unwrap_err();
    assert_eq!(errno_of(&e), errno::ENOSPC);
    assert_fails(
        &fx.sh("echo 4 > encrypted/t5"),
        "shell create",
        "No space left on device",
    );
    // Existing files still take new rows.
    fs::write(fx.u("t1"), "11\n").unwrap();
    assert_eq!(fx.rows().len(), 4);
    assert_eq!(fx.store().tables().unwrap().len(), 3);
}

#[test]
fn an_oversize_file_is_refused_at_write_with_efbig() {
    if !fuse_available() {
        return;
    }
    let limit = 64 * 1024;
    let fx = Fixture::new(KpiOptions::default());
    fs::write(fx.e("big"), vec![7u8; limit]).unwrap();
    let mut f = File::create(fx.e("big")).unwrap();
    let e = f.write_all(&vec![8u8; limit + 1]).unwrap_err();
    assert_eq!(errno_of(&e), errno::EFBIG);
    // The refused session stays refused, at fsync and at close.
    assert_eq!(errno_of(&f.sync_all().unwrap_err()), errno::EFBIG);
    drop(f);
    assert_fails(
        &fx.sh("head -c 70000 /dev/zero > encrypted/big"),
        "shell write",
        "File too large",
    );
    assert_fails(
        &fx.sh("head -c 70000 /dev/zero | tr '\\0' 1 > unencrypted/big"),
        "shell write",
        "File too large",
    );
    let rows = fx.rows();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0].kind,
        KpiRowKind::Encrypted {
            blob: vec![7u8; limit]
        }
    );
    assert_eq!(fs::read(fx.e("big")).unwrap(), vec![7u8; limit]);
}

#[test]
fn a_third_line_is_refused_at_write_with_einval() {
    if !fuse_available() {
        return;
    }
    let fx = Fixture::new(KpiOptions::default());
    fs::write(fx.u("lines"), "a\n1\n").unwrap();
    let mut f = File::create(fx.u("lines")).unwrap();
    let e = f.write_all(b"a\n1\n2\n").unwrap_err();
    assert_eq!(errno_of(&e), errno::EINVAL);
    drop(f);
    // A shell built-in sees the failed write (dash words every write error as an I/O error),
    // and coreutils names the errno.
    assert_fails(
        &fx.sh("printf 'a\\n1\\n2\\n' > unencrypted/lines"),
        "printf built-in",
        "I/O error",
    );
    assert_fails(
        &fx.sh("/usr/bin/printf 'a\\n1\\n2\\n' > unencrypted/lines"),
        "printf",
        "Invalid argument",
    );
    assert_fails(
        &fx.sh("printf 'a\\n1\\n' > unencrypted/lines && echo 3 >> unencrypted/lines"),
        "append",
        "Invalid argument",
    );
    let rows = fx.rows();
    assert_eq!(rows.len(), 2, "the valid write before the append is kept");
    assert_eq!(fs::read(fx.u("lines")).unwrap(), b"a\n1\n");
}

#[test]
fn a_ragged_report_is_refused_at_close_with_einval() {
    if !fuse_available() {
        return;
    }
    let fx = Fixture::new(KpiOptions::default());
    fs::write(fx.u("rag"), "a,b\n1,2\n").unwrap();
    // Rust: the write succeeds, the commit (fsync, and close) fails.
    let mut f = File::create(fx.u("rag")).unwrap();
    f.write_all(b"a,b\n1\n").unwrap();
    assert_eq!(errno_of(&f.sync_all().unwrap_err()), errno::EINVAL);
    drop(f);
    // External tools check close(): coreutils printf and cp report it and exit non-zero.
    assert_fails(
        &fx.sh("/usr/bin/printf 'a,b\\n1\\n' > unencrypted/rag"),
        "printf",
        "Invalid argument",
    );
    let src = fx._dir.path().join("ragged.csv");
    fs::write(&src, "a,b,c\n1,2\n").unwrap();
    assert_fails(
        &fx.sh(&format!("cp {} unencrypted/rag", src.display())),
        "cp",
        "Invalid argument",
    );
    // Other refusals that need the whole file are reported the same way.
    for bad in ["a,a\n1,2\n", "ts_ms\n1\n", "\"open\n", "x\n\n"] {
        let mut f = File::create(fx.u("rag")).unwrap();
        f.write_all(bad.as_bytes()).unwrap();
        assert_eq!(
            errno_of(&f.sync_all().unwrap_err()),
            errno::EINVAL,
            "{bad:?}"
        );
    }
    let rows = fx.rows();
    assert_eq!(rows.len(), 1);
    assert_eq!(columns(&rows[0]), vec![int("a", 1), int("b", 2)]);
    assert_eq!(fs::read(fx.u("rag")).unwrap(), b"a,b\n1,2\n");
}

#[test]
fn non_utf8_in_unencrypted_is_refused_with_einval() {
    if !fuse_available() {
        return;
    }
    let fx = Fixture::new(KpiOptions::default());
    let mut f = File::create(fx.u("text")).unwrap();
    assert_eq!(
        errno_of(&f.write_all(b"\xff\xfe\n").unwrap_err()),
        errno::EINVAL
    );
    drop(f);
    // A character cut at the end can only be judged when the file is complete.
    let mut f = File::create(fx.u("text")).unwrap();
    f.write_all(b"caf\xc3").unwrap();
    assert_eq!(errno_of(&f.sync_all().unwrap_err()), errno::EINVAL);
    drop(f);
    assert_fails(
        &fx.sh("printf 'x\\377\\n' > unencrypted/text"),
        "printf built-in",
        "I/O error",
    );
    assert_fails(
        &fx.sh("/usr/bin/printf 'x\\377\\n' > unencrypted/text"),
        "printf",
        "Invalid argument",
    );
    fs::write(fx.u("text"), "café\n").unwrap();
    let rows = fx.rows();
    assert_eq!(rows.len(), 1);
    assert_eq!(columns(&rows[0]), vec![text("column1", "café")]);
}

#[test]
fn rm_mv_and_mkdir_are_refused_with_eperm() {
    if !fuse_available() {
        return;
    }
    let fx = Fixture::new(KpiOptions::default());
    fs::write(fx.u("keep"), "1\n").unwrap();
    assert_eq!(
        errno_of(&fs::remove_file(fx.u("keep")).unwrap_err()),
        errno::EPERM
    );
    assert_fails(
        &fx.sh("rm unencrypted/keep"),
        "rm",
        "Operation not permitted",
    );
    assert_fails(
        &fx.sh("mv unencrypted/keep unencrypted/other"),
        "mv",
        "Operation not permitted",
    );
    assert_fails(
        &fx.sh("mkdir unencrypted/d"),
        "mkdir",
        "Operation not permitted",
    );
    assert_fails(
        &fx.sh("ln unencrypted/keep unencrypted/l"),
        "ln",
        "Operation not permitted",
    );
    assert_eq!(
        String::from_utf8_lossy(&fx.sh("ls unencrypted").stdout),
        "keep\n"
    );
    assert_eq!(fx.rows().len(), 1);
}

#[test]
fn rows_are_announced_and_publishing_resumes_after_a_remount() {
    if !fuse_available() {
        return;
    }
    let mut fx = Fixture::new(KpiOptions::default());
    let mut events = fx.mount().take_events().unwrap();
    fs::write(fx.u("a"), "n\n1\n").unwrap();
    fs::write(fx.e("b"), b"\x00sealed").unwrap();
    fs::write(fx.u("a"), "n\n3\n").unwrap();
    let mut seen = Vec::new();
    eventually_blocking(POLL_TIMEOUT, "three events", || {
        while let Ok(row) = events.try_recv() {
            seen.push(row);
        }
        (seen.len() == 3).then_some(())
    });
    let ids: Vec<i64> = seen.iter().map(|r| r.rowid).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert_eq!(seen, fx.mount().rows_after(0, 10).unwrap());

    assert_eq!(fx.mount().published().unwrap(), 0);
    assert_eq!(fx.mount().mark_published(ids[1]).unwrap(), ids[1]);
    // The mark never moves back, and never past the newest row.
    assert_eq!(fx.mount().mark_published(ids[0]).unwrap(), ids[1]);
    assert_eq!(
        fx.mount().unpublished_rows(10).unwrap(),
        vec![seen[2].clone()]
    );

    fx.remount(KpiOptions::default());
    assert_eq!(fx.mount().published().unwrap(), ids[1]);
    assert_eq!(
        fx.mount().unpublished_rows(10).unwrap(),
        vec![seen[2].clone()]
    );
    assert_eq!(fx.mount().mark_published(i64::MAX).unwrap(), ids[2]);
    assert!(fx.mount().unpublished_rows(10).unwrap().is_empty());
    // Files and their last content survive the remount.
    assert_eq!(fs::read(fx.u("a")).unwrap(), b"n\n3\n");
    assert_eq!(fs::read(fx.e("b")).unwrap(), b"\x00sealed");
    fx.store().check_consistency().unwrap();
}

/// A report big enough that writing it in small pieces takes many FUSE requests.
fn report(writer: usize, seq: usize) -> String {
    format!(
        "writer,seq,pad\n{writer},{seq},{}\n",
        "p".repeat(600 + writer * 7)
    )
}

#[test]
fn concurrent_writers_leave_no_torn_rows() {
    if !fuse_available() {
        return;
    }
    let fx = Fixture::new(KpiOptions::default());
    let writers = 6;
    let per_writer = 25;
    let mut threads = Vec::new();
    for w in 0..writers {
        // Half the writers share one file, the others each have their own.
        let path = if w % 2 == 0 {
            fx.u("shared")
        } else {
            fx.u(&format!("own{w}"))
        };
        threads.push(std::thread::spawn(move || {
            for i in 0..per_writer {
                let mut f = File::create(&path).unwrap();
                for piece in report(w, i).as_bytes().chunks(64) {
                    f.write_all(piece).unwrap();
                }
                f.sync_all().unwrap();
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    let rows = fx.rows();

    assert_eq!(rows.len(), writers * per_writer);
    let mut next: HashMap<i64, i64> = HashMap::new();
    for row in &rows {
        let cols = columns(row);
        let (KpiValue::Integer(w), KpiValue::Integer(i), KpiValue::Text(pad)) =
            (&cols[0].1, &cols[1].1, &cols[2].1)
        else {
            panic!("torn row {cols:?}");
        };
        assert_eq!(
            format!("writer,seq,pad\n{w},{i},{pad}\n"),
            report(*w as usize, *i as usize),
            "row {} is not one whole write",
            row.rowid
        );
        let expected_table = if w % 2 == 0 {
            "shared".to_owned()
        } else {
            format!("own{w}")
        };
        assert_eq!(row.table, expected_table);
        // Each writer's rows are committed in its own order.
        let n = next.entry(*w).or_insert(0);
        assert_eq!(*i, *n);
        *n += 1;
    }
    fx.store().check_consistency().unwrap();
}

#[test]
fn allow_other_lets_another_user_read_the_mount() {
    if !fuse_available() {
        return;
    }
    let is_root = Command::new("id").arg("-u").output().unwrap().stdout == b"0\n";
    if !is_root {
        skip_or_fail::<()>("reading as another user needs root to switch users");
        return;
    }
    let run_as_nobody = |fx: &Fixture| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
            .arg(fx.u("shared"))
            .output()
            .unwrap()
    };
    for allow_other in [false, true] {
        let fx = Fixture::new(KpiOptions {
            allow_other,
            ..KpiOptions::default()
        });
        fs::set_permissions(fx._dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(fx.u("shared"), "v\n1\n").unwrap();
        let out = run_as_nobody(&fx);
        assert_eq!(out.status.success(), allow_other, "{out:?}");
        if allow_other {
            assert_eq!(out.stdout, b"v\n1\n");
        }
    }
}

/// The mount process of `restart_after_sigkill_keeps_every_acknowledged_write`: when started
/// with [`CHILD_ENV`] set to `MOUNTPOINT\nDATABASE` it serves that mount until it is killed;
/// otherwise it returns at once.
#[test]
fn restart_child_serves_a_mount() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (mnt, db) = spec.split_once('\n').unwrap();
    let _mount = KpiFs::mount(Path::new(mnt), Path::new(db), KpiOptions::default()).unwrap();
    loop {
        std::thread::park();
    }
}

#[test]
fn restart_after_sigkill_keeps_every_acknowledged_write() {
    if !fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    let db = dir.path().join("kpi.sqlite");
    fs::create_dir(&mnt).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "kpifs::restart_child_serves_a_mount",
            "--nocapture",
        ])
        .env(CHILD_ENV, format!("{}\n{}", mnt.display(), db.display()))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    eventually_blocking(POLL_TIMEOUT, "the child's mount", || {
        mnt.join("unencrypted").exists().then_some(())
    });

    // Writers record each report whose commit (fsync) returned success.
    let acknowledged = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for w in 0..3usize {
        let (mnt, acknowledged, stop) = (mnt.clone(), acknowledged.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let name = format!("w{w}");
            let path = mnt.join("unencrypted").join(&name);
            for i in 0.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let content = report(w, i);
                let committed = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&path)
                    .and_then(|mut f| {
                        f.write_all(content.as_bytes())?;
                        f.sync_all()
                    });
                match committed {
                    Ok(()) => acknowledged.lock().unwrap().push((name.clone(), content)),
                    Err(_) => break,
                }
            }
        }));
    }
    eventually_blocking(POLL_TIMEOUT, "some acknowledged writes", || {
        (acknowledged.lock().unwrap().len() >= 30).then_some(())
    });
    child.kill().unwrap();
    child.wait().unwrap();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }

    // The dead mount is detached by the new mount; the database is whole and holds every
    // acknowledged write.
    let mount = KpiFs::mount(&mnt, &db, KpiOptions::default()).unwrap();
    let store = KpiStore::open(&db, &KpiOptions::default()).unwrap();
    store.check_consistency().unwrap();
    let stored: HashSet<(String, String)> = store
        .rows_after(0, usize::MAX)
        .unwrap()
        .iter()
        .map(|row| {
            let cols = columns(row);
            let values: Vec<String> = cols
                .iter()
                .map(|(_, v)| match v {
                    KpiValue::Integer(i) => i.to_string(),
                    KpiValue::Text(t) => t.clone(),
                    other => panic!("unexpected {other:?}"),
                })
                .collect();
            (
                row.table.clone(),
                format!("writer,seq,pad\n{}\n", values.join(",")),
            )
        })
        .collect();
    let acknowledged = acknowledged.lock().unwrap();
    for write in acknowledged.iter() {
        assert!(stored.contains(write), "acknowledged write lost: {write:?}");
    }
    // The mount is back and takes writes.
    fs::write(mnt.join("unencrypted").join("after"), "ok\n1\n").unwrap();
    assert_eq!(
        fs::read(mnt.join("unencrypted").join("after")).unwrap(),
        b"ok\n1\n"
    );
    mount.unmount().unwrap();
}
