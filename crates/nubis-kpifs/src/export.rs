//! The directory from which a KPI filesystem is shared with a guest (virtio-9p).
//!
//! A hypervisor opens a shared directory once, when the guest starts or is restored, and keeps
//! that descriptor for the guest's whole life. A KPI filesystem lives only as long as the host
//! agent that serves it, so exporting its mountpoint directly would leave a running guest with a
//! dead share after every agent restart. The export is therefore a directory that outlives the
//! agent: a tiny read-only tmpfs holding one empty directory, [`EXPORT_CHILD`], on which the live
//! KPI filesystem is bind-mounted ([`KpiMount::bind_into`](crate::KpiMount::bind_into)). The
//! hypervisor's 9p server resolves paths from the export at every access, so it crosses into
//! whichever bind is current; a restarted agent simply binds its new mount there.
//!
//! Because the tmpfs is read-only, a guest that writes before the KPI filesystem is bound (or
//! while the agent is down) gets `EROFS` instead of writing into a plain directory where the
//! report would silently be lost, and it cannot fill the host's disk through the share.
//!
//! Mounting needs `CAP_SYS_ADMIN`; it is done with `mount(8)` and `umount(8)`, as the lazy
//! unmount of a dead FUSE mount already is.

use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use tracing::{info, warn};

use crate::KpiError;

/// The directory inside an export on which the KPI filesystem is bound: the guest sees its
/// reports under `<share>/kpi/unencrypted/` and `<share>/kpi/encrypted/`.
pub const EXPORT_CHILD: &str = "kpi";

/// Options of the export's tmpfs: room for nothing but its one directory.
const EXPORT_TMPFS: &str = "size=16k,nr_inodes=8,mode=0755,nodev,nosuid,noexec";

fn run(path: &Path, args: &[&str], target: &[&Path]) -> Result<(), KpiError> {
    let mut cmd = Command::new("mount");
    cmd.args(args);
    for t in target {
        cmd.arg(t);
    }
    let err = |source| KpiError::Export {
        path: path.to_owned(),
        source,
    };
    let out = cmd.output().map_err(err)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(err(io::Error::other(format!(
            "mount {} exited with {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))))
    }
}

/// Whether something is mounted at `dir` (its device differs from its parent's).
fn is_mountpoint(dir: &Path) -> bool {
    let parent = dir.parent().unwrap_or(dir);
    match (std::fs::metadata(dir), std::fs::metadata(parent)) {
        (Ok(d), Ok(p)) => d.dev() != p.dev(),
        _ => false,
    }
}

/// Lazily unmounts whatever is mounted at `path`; nothing mounted there is fine.
fn detach_quietly(path: &Path) {
    let _ = Command::new("umount")
        .arg("-l")
        .arg(path)
        .stderr(std::process::Stdio::null())
        .status();
}

/// Makes `dir` an export (idempotent: an existing one is kept, because a running guest holds it).
/// Returns the directory on which the KPI filesystem is to be bound.
pub fn prepare_export(dir: &Path) -> Result<PathBuf, KpiError> {
    let child = dir.join(EXPORT_CHILD);
    if is_mountpoint(dir) && child.is_dir() {
        return Ok(child);
    }
    std::fs::create_dir_all(dir).map_err(|source| KpiError::Export {
        path: dir.to_owned(),
        source,
    })?;
    run(
        dir,
        &["-t", "tmpfs", "-o", EXPORT_TMPFS, "nubis-kpi-export"],
        &[dir],
    )?;
    let made = std::fs::create_dir(&child)
        .map_err(|source| KpiError::Export {
            path: child.clone(),
            source,
        })
        .and_then(|()| run(dir, &["-o", "remount,ro"], &[dir]));
    if let Err(e) = made {
        detach_quietly(dir);
        return Err(e);
    }
    info!(export = %dir.display(), "kpi export prepared");
    Ok(child)
}

/// Binds the KPI filesystem mounted at `mountpoint` on the export `dir`, replacing a bind left by
/// an earlier (stopped or killed) agent.
pub(crate) fn bind(mountpoint: &Path, dir: &Path) -> Result<PathBuf, KpiError> {
    let child = dir.join(EXPORT_CHILD);
    if !is_mountpoint(dir) {
        return Err(KpiError::Export {
            path: dir.to_owned(),
            source: io::Error::new(io::ErrorKind::NotFound, "not a prepared kpi export"),
        });
    }
    // A stale bind (its filesystem's daemon is gone) answers ENOTCONN; the mount replaces it.
    detach_quietly(&child);
    run(dir, &["--bind"], &[mountpoint, &child])?;
    Ok(child)
}

/// Removes the bind of a KPI filesystem from its export (lazily: a guest's open file keeps the
/// old one until it closes it).
pub(crate) fn unbind(child: &Path) {
    detach_quietly(child);
}

/// Removes the export `dir` entirely, once no guest uses it any more.
pub fn remove_export(dir: &Path) {
    detach_quietly(&dir.join(EXPORT_CHILD));
    if is_mountpoint(dir) {
        detach_quietly(dir);
    }
    if let Err(e) = std::fs::remove_dir(dir) {
        if e.kind() != io::ErrorKind::NotFound {
            warn!(export = %dir.display(), error = %e, "cannot remove a kpi export");
        }
    }
}
