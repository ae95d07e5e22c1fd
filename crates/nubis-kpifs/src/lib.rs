//! The KPI filesystem of the paper's section IV-A: applications report Key Performance Indicators
//! by writing small files to a FUSE mount, and every complete write becomes a row in an SQLite
//! database that the host agent publishes.
//!
//! The mount has two directories:
//!
//! - `unencrypted/NAME` — a one- or two-line CSV report. With two lines the first names the
//!   columns (the names SLAs refer to, e.g. `current_users`); with one line, or for an empty label,
//!   a column is named `columnX`, X counted from one. Values keep SQLite's natural type: a field
//!   that parses as a 64-bit integer is an INTEGER, a finite float a REAL, an empty field NULL,
//!   anything else (and every quoted field) TEXT.
//! - `encrypted/NAME` — opaque bytes (sealed by the application for the primary site), stored whole
//!   as a BLOB and never parsed.
//!
//! Each accepted write adds one row to the table `"<dir>/NAME"` with its commit time `ts_ms`
//! (milliseconds since the Unix epoch) and a global row id (see [`KpiStore`] for the schema).
//!
//! # Rules
//!
//! - **A write session** is what one open file handle writes between `open` and `close`. Every
//!   session starts from an empty file, whether or not `O_TRUNC` was given, and the bytes are
//!   assembled in memory in the order of their offsets, so partial writes are fine. The session is
//!   committed as one row when the writer's `close()` flushes it (or `fsync()` is called). The
//!   kernel flushes at every `close()` of every duplicate of the descriptor, so a flush commits
//!   only if something was written since the last commit *and* the closing process is one that
//!   wrote (the kernel tags writes and flushes with the process's open-file table): a forked
//!   child closing its inherited copy at `exec` does not commit half a report. Should no writer's
//!   close come (a writer thread closed by another process), the final release commits.
//!   A session is committed once per batch of writes: writing again after an `fsync()` commits
//!   the whole buffer again as a new row. `cat` shows the content of the last accepted write.
//! - **Commit before `close()` returns.** The row is committed in WAL mode before the kernel's
//!   flush request is answered; [`Durability::Full`] (the default) also fsyncs the WAL, so a
//!   successful `close()` survives a power loss of the host, not only a crash of the host agent.
//! - **Header changes add columns.** A write whose header names a column that the table lacks adds
//!   it (`ALTER TABLE ... ADD COLUMN`); earlier rows read NULL there, and a write that omits a
//!   column stores NULL in it. Column names match without case, as SQLite's do.
//! - **Names.** File names are table names: `[A-Za-z0-9_][A-Za-z0-9_-]{0,63}`, also usable as a
//!   NATS subject token. A `.csv` suffix is refused, not stripped, so a table has one name.
//!   Column names are `[A-Za-z_][A-Za-z0-9_]{0,63}`, except the reserved `kpi_id` and `ts_ms`.
//! - **`rm`, `mv`, `ln`, `mkdir` are refused with `EPERM`**: rows are the record of what the VM
//!   reported, and a file is its table. `touch NAME` creates an empty file whose table is made
//!   with its first accepted row (so a refused first write leaves the database untouched, and an
//!   empty file does not outlive the mount); `truncate -s 0` is
//!   accepted and changes nothing; `>>` (`O_APPEND`) is refused with `EINVAL`, because a report
//!   replaces the previous one.
//! - **Owner and mode are fixed**: `chown` and `chmod` to anything else fail with `EPERM`; setting
//!   them to what they are succeeds (a virtio-9p server in passthrough mode does that after
//!   creating a file for a guest).
//!
//! # Sharing with a guest
//!
//! A guest reaches its KPI filesystem through a virtio-9p share of an export directory made with
//! [`prepare_export`], on which the live mount is bound with [`KpiMount::bind_into`]; the guest
//! finds the two directories under `kpi/` in the share. The mountpoint itself is never shared:
//! the hypervisor keeps a shared directory open for the guest's life, and a mount ends with the
//! process serving it, whereas the export outlives it and takes the next mount's bind.
//!
//! # Refused writes and the errno the writer sees
//!
//! Nothing of a refused session reaches the database, earlier rows stay, and the reason is logged
//! with `tracing` at `warn`. Once refused, every later `write()` and the `close()` of that handle
//! return the same errno.
//!
//! | input | errno | returned by |
//! |---|---|---|
//! | file name outside the charset | `EINVAL` | `open(O_CREAT)` |
//! | one table more than [`KpiOptions::max_tables`] | `ENOSPC` | `open(O_CREAT)` |
//! | opened with `O_APPEND` | `EINVAL` | `open` |
//! | content over [`KpiOptions::max_file_size`] | `EFBIG` | the `write()` (or `ftruncate`) that crosses it |
//! | more than two lines | `EINVAL` | the `write()` that adds the third line |
//! | invalid UTF-8 in `unencrypted/` | `EINVAL` | the `write()` with the bad byte (`close()` for a truncated character) |
//! | ragged header and values, bad or duplicate column names, bad quoting, no values | `EINVAL` | `close()` (and `fsync()`) |
//! | database failure | `EIO` | `close()` |
//!
//! Checks that can be made on a partial file are made at `write()` so that writers that ignore
//! `close()` errors (shell built-ins whose redirection is undone with `dup2`, for instance) still
//! see them; the rest can only be judged on the complete file and come from `close()`. Rust's
//! `File` ignores errors of its implicit close: call `sync_all()` (an `fsync`, which commits) to
//! see them.
//!
//! # Publishing
//!
//! Each committed row is sent as a [`KpiRow`] on a bounded channel ([`KpiMount::take_events`])
//! right after the commit: no polling. A consumer that falls behind never blocks the filesystem;
//! events that do not fit are counted ([`KpiMount::dropped_events`]) and the rows are read back with
//! [`KpiMount::unpublished_rows`], which after a restart resumes from the persisted `published`
//! mark that the producer advances with [`KpiMount::mark_published`].

mod error;
mod export;
mod fs;
mod report;
mod store;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use fuser::{BackgroundSession, MountOption, SessionACL};
use tokio::sync::mpsc;
use tracing::{info, warn};

pub use error::{KpiError, Refusal};
pub use export::{prepare_export, remove_export, EXPORT_CHILD};
pub use report::{parse_report, validate_table_name, KpiValue};
pub use store::{Durability, KpiDir, KpiRow, KpiRowKind, KpiStore, KpiTable};

use fs::{lock, KpiFilesystem, State};

/// Settings of one KPI filesystem.
#[derive(Debug, Clone)]
pub struct KpiOptions {
    /// Largest file, in bytes; a write beyond it fails with `EFBIG`.
    pub max_file_size: usize,
    /// Most files (tables) in both directories together; one more fails with `ENOSPC`.
    pub max_tables: usize,
    /// Most columns of an unencrypted table.
    pub max_columns: usize,
    /// Let other users (a 9p or virtiofs export, a monitoring tool) use the mount. Unprivileged
    /// mounting then needs `user_allow_other` in `/etc/fuse.conf`.
    pub allow_other: bool,
    /// How hard a commit presses data to disk.
    pub durability: Durability,
    /// Capacity of the event channel.
    pub event_capacity: usize,
}

impl Default for KpiOptions {
    fn default() -> Self {
        KpiOptions {
            max_file_size: 64 * 1024,
            max_tables: 256,
            max_columns: 256,
            allow_other: false,
            durability: Durability::Full,
            event_capacity: 4096,
        }
    }
}

/// Entry point: mounts KPI filesystems.
#[derive(Debug)]
pub struct KpiFs;

impl KpiFs {
    /// Mounts a KPI filesystem at `mountpoint` (created if missing) backed by the SQLite database
    /// at `db_path` (created if missing; rows from earlier mounts are kept and their files listed).
    ///
    /// A dead mount left at `mountpoint` by a killed process is detached first. The filesystem is
    /// served by a background thread until the returned [`KpiMount`] is unmounted or dropped.
    pub fn mount(
        mountpoint: &Path,
        db_path: &Path,
        options: KpiOptions,
    ) -> Result<KpiMount, KpiError> {
        prepare_mountpoint(mountpoint)?;
        let meta = std::fs::metadata(mountpoint).map_err(|source| KpiError::Mountpoint {
            path: mountpoint.to_owned(),
            source,
        })?;
        let store = KpiStore::open(db_path, &options)?;
        let state = Arc::new(Mutex::new(State::new(store)?));
        let (tx, rx) = mpsc::channel(options.event_capacity.max(1));
        let dropped = Arc::new(AtomicU64::new(0));
        let filesystem = KpiFilesystem {
            state: Arc::clone(&state),
            events: tx,
            dropped: Arc::clone(&dropped),
            max_file_size: options.max_file_size,
            max_tables: options.max_tables,
            uid: std::os::unix::fs::MetadataExt::uid(&meta),
            gid: std::os::unix::fs::MetadataExt::gid(&meta),
            started: SystemTime::now(),
        };
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            MountOption::FSName("nubis-kpifs".to_owned()),
            MountOption::Subtype("nubis-kpifs".to_owned()),
            MountOption::DefaultPermissions,
            MountOption::NoDev,
            MountOption::NoSuid,
            MountOption::NoExec,
        ];
        config.acl = if options.allow_other {
            SessionACL::All
        } else {
            SessionACL::Owner
        };
        let session = fuser::spawn_mount(filesystem, mountpoint, &config).map_err(|source| {
            KpiError::Mount {
                path: mountpoint.to_owned(),
                source,
            }
        })?;
        info!(mountpoint = %mountpoint.display(), db = %db_path.display(), "kpi filesystem mounted");
        Ok(KpiMount {
            mountpoint: mountpoint.to_owned(),
            session: Some(session),
            state,
            events: Some(rx),
            dropped,
            binds: Vec::new(),
        })
    }
}

/// Creates the mountpoint, or detaches a dead FUSE mount found there (its daemon was killed, so
/// every access fails with `ENOTCONN`).
fn prepare_mountpoint(mountpoint: &Path) -> Result<(), KpiError> {
    let err = |source| KpiError::Mountpoint {
        path: mountpoint.to_owned(),
        source,
    };
    // Reading the directory reaches the FUSE daemon even where its attributes are still cached.
    match std::fs::read_dir(mountpoint) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(mountpoint).map_err(err)
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            warn!(mountpoint = %mountpoint.display(), "detaching a dead kpi mount");
            detach(mountpoint);
            std::fs::read_dir(mountpoint).map(|_| ()).map_err(err)
        }
        Err(e) => Err(err(e)),
    }
}

/// Lazily unmounts whatever is mounted at `mountpoint`, through `fusermount3` (which also works
/// unprivileged) or, failing that, `umount`.
fn detach(mountpoint: &Path) {
    let tried = [
        Command::new("fusermount3")
            .args(["-u", "-z", "-q", "--"])
            .arg(mountpoint)
            .status(),
        Command::new("umount").arg("-l").arg(mountpoint).status(),
    ];
    for status in tried {
        if matches!(status, Ok(s) if s.success()) {
            return;
        }
    }
    warn!(mountpoint = %mountpoint.display(), "lazy unmount failed");
}

/// A mounted KPI filesystem. Dropping it unmounts (lazily if a file is still open).
#[derive(Debug)]
pub struct KpiMount {
    mountpoint: PathBuf,
    session: Option<BackgroundSession>,
    state: Arc<Mutex<State>>,
    events: Option<mpsc::Receiver<KpiRow>>,
    dropped: Arc<AtomicU64>,
    /// Where the filesystem is also bound (guest exports); undone before it is unmounted.
    binds: Vec<PathBuf>,
}

impl KpiMount {
    /// Where the filesystem is mounted; a plain directory that can be exported to a guest.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The directory of one kind of KPI file inside the mount.
    pub fn dir(&self, dir: KpiDir) -> PathBuf {
        self.mountpoint.join(dir.as_str())
    }

    /// The receiver of committed rows, in commit order. Available once.
    pub fn take_events(&mut self) -> Option<mpsc::Receiver<KpiRow>> {
        self.events.take()
    }

    /// Events not delivered because the channel was full; those rows are in the database.
    pub fn dropped_events(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The `published` mark: every row up to this id has been published.
    pub fn published(&self) -> Result<i64, KpiError> {
        lock(&self.state).store.published()
    }

    /// Advances the `published` mark to `rowid` (never backwards), persistently.
    pub fn mark_published(&self, rowid: i64) -> Result<i64, KpiError> {
        lock(&self.state).store.mark_published(rowid)
    }

    /// Rows above the `published` mark, oldest first, at most `limit`.
    pub fn unpublished_rows(&self, limit: usize) -> Result<Vec<KpiRow>, KpiError> {
        lock(&self.state).store.unpublished_rows(limit)
    }

    /// Rows with an id above `after`, oldest first, at most `limit`.
    pub fn rows_after(&self, after: i64, limit: usize) -> Result<Vec<KpiRow>, KpiError> {
        lock(&self.state).store.rows_after(after, limit)
    }

    /// Binds the filesystem on the export `dir` made by [`prepare_export`], so a guest sharing
    /// that directory reaches it (replacing the bind of an earlier mount). The bind goes when
    /// this mount is unmounted; the export stays for the guest.
    pub fn bind_into(&mut self, dir: &Path) -> Result<(), KpiError> {
        let child = export::bind(&self.mountpoint, dir)?;
        info!(export = %dir.display(), "kpi filesystem bound on its export");
        if !self.binds.contains(&child) {
            self.binds.push(child);
        }
        Ok(())
    }

    /// Unmounts and waits for the filesystem thread to finish.
    pub fn unmount(mut self) -> Result<(), KpiError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), KpiError> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        // A bind keeps the filesystem alive after its mountpoint is gone, so it goes first.
        for child in self.binds.drain(..) {
            export::unbind(&child);
        }
        match session.umount_and_join() {
            Ok(()) => {
                info!(mountpoint = %self.mountpoint.display(), "kpi filesystem unmounted");
                Ok(())
            }
            Err(source) => {
                // Busy (a file is still open): detach so the path is free; the kernel ends the
                // session when the last user lets go.
                detach(&self.mountpoint);
                Err(KpiError::Unmount {
                    path: self.mountpoint.clone(),
                    source,
                })
            }
        }
    }
}

impl Drop for KpiMount {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            warn!(error = %e, "kpi filesystem unmount on drop");
        }
    }
}
