//! The tiny real guest used by tests and demonstrations: a Debian kernel and a busybox initramfs
//! built by `scripts/setup.d/40-guest.sh`, booted directly from files.
//!
//! Its console protocol, on the first serial port: `NUBIS-GUEST-READY …` once booted, then once a
//! second `NUBIS-COUNTER <n> <uptime-seconds>`, where `n` is also written to the first sector of
//! its disk and continues from there at the next boot; `NUBIS-GUEST-POWEROFF` when it obeys an
//! ACPI power-button press.
//!
//! Given a KPI share (tag [`KPI_SHARE_TAG`](crate::spec::KPI_SHARE_TAG)), a sidecar script in the
//! guest writes the two-line report `current_users` / `<k>` to `unencrypted/guest` every two
//! seconds, `k` counting the attempts from one, and prints `NUBIS-KPI <k>` when the write
//! succeeded, `NUBIS-KPI-FAILED <k>` when it did not (for instance before the host agent has
//! bound the KPI filesystem on the share). It mounts the share only while it writes, so the
//! guest can be saved between two reports.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::spec::{DiskFormat, DiskSpec, DomainSpec, KernelBoot};

/// Where `40-guest.sh` puts the guest unless `NUBIS_GUEST_DIR` says otherwise.
pub const DEFAULT_GUEST_DIR: &str = "/var/cache/nubis/guest";

/// The marker the guest prints once it has booted.
pub const READY_MARKER: &str = "NUBIS-GUEST-READY";
/// The prefix of the guest's counter lines.
pub const COUNTER_MARKER: &str = "NUBIS-COUNTER";
/// The marker the guest prints when it powers off on request.
pub const POWEROFF_MARKER: &str = "NUBIS-GUEST-POWEROFF";

/// The prefix of the lines of a KPI report written by the guest's sidecar.
pub const KPI_MARKER: &str = "NUBIS-KPI";
/// The prefix of the lines of a KPI report the guest's sidecar could not write.
pub const KPI_FAILED_MARKER: &str = "NUBIS-KPI-FAILED";
/// The KPI table the guest's sidecar writes, and its column.
pub const KPI_TABLE: &str = "guest";
/// The column of [`KPI_TABLE`].
pub const KPI_COLUMN: &str = "current_users";

/// Size of the guest's disk.
pub const DISK_BYTES: u64 = 16 << 20;

/// The guest's kernel and initramfs.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// The kernel.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
}

/// The guest cannot be used here.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The guest has not been built.
    #[error("test guest not built in {0} (run scripts/setup.d/40-guest.sh)")]
    NotBuilt(PathBuf),
    /// `qemu-img` failed or is missing.
    #[error("cannot create disk {path}")]
    Disk {
        /// The disk image.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// The accelerator for real guests on this machine: `NUBIS_USE_KVM=1` (KVM) or `=0` (TCG) when
/// set, otherwise the answer `scripts/setup.d/45-kvm.sh` wrote into the guest directory after
/// trying to boot the guest under KVM, and TCG when there is none.
pub fn accelerator() -> crate::Accelerator {
    match std::env::var("NUBIS_USE_KVM").as_deref() {
        Ok("1") => return crate::Accelerator::Kvm,
        Ok("0") => return crate::Accelerator::Tcg,
        _ => {}
    }
    match std::fs::read_to_string(GuestImage::default_dir().join("accelerator")) {
        Ok(text) if text.trim() == "kvm" => crate::Accelerator::Kvm,
        _ => crate::Accelerator::Tcg,
    }
}

impl GuestImage {
    /// The directory named by `NUBIS_GUEST_DIR`, or [`DEFAULT_GUEST_DIR`].
    pub fn default_dir() -> PathBuf {
        std::env::var_os("NUBIS_GUEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_GUEST_DIR))
    }

    /// The guest in `dir`, if it is complete.
    pub fn locate(dir: &Path) -> Result<Self, GuestError> {
        let kernel = dir.join("vmlinuz");
        let initrd = dir.join("initramfs.cpio.gz");
        if kernel.is_file() && initrd.is_file() {
            Ok(Self { kernel, initrd })
        } else {
            Err(GuestError::NotBuilt(dir.to_path_buf()))
        }
    }

    /// Creates an empty qcow2 disk for the guest at `path`.
    pub fn create_disk(path: &Path) -> Result<(), GuestError> {
        let err = |source| GuestError::Disk {
            path: path.to_path_buf(),
            source,
        };
        let status = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(path)
            .arg(DISK_BYTES.to_string())
            .status()
            .map_err(err)?;
        if status.success() {
            Ok(())
        } else {
            Err(err(io::Error::other(format!(
                "qemu-img exited with {status}"
            ))))
        }
    }

    /// A spec for the guest named `name`, with its disk (`disk.qcow2`, created if missing) and
    /// serial log (`serial.log`) in `workdir`.
    pub fn spec(&self, name: &str, workdir: &Path) -> Result<DomainSpec, GuestError> {
        let disk = workdir.join("disk.qcow2");
        if !disk.exists() {
            Self::create_disk(&disk)?;
        }
        let mut spec = DomainSpec::new(name, 1, 128);
        spec.disks.push(DiskSpec {
            path: disk,
            format: DiskFormat::Qcow2,
            target: "vda".into(),
            capacity_bytes: DISK_BYTES,
            read_only: false,
        });
        spec.kernel_boot = Some(KernelBoot {
            kernel: self.kernel.clone(),
            initrd: Some(self.initrd.clone()),
            cmdline: "console=ttyS0 quiet panic=-1".into(),
        });
        spec.serial_log = Some(workdir.join("serial.log"));
        Ok(spec)
    }
}

/// The guest's console output as written so far.
#[derive(Debug, Clone)]
pub struct SerialLog {
    path: PathBuf,
}

impl SerialLog {
    /// The log at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The whole log (empty if not yet created).
    pub fn text(&self) -> String {
        std::fs::read(&self.path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// How many lines contain `marker`.
    pub fn count(&self, marker: &str) -> usize {
        self.text().lines().filter(|l| l.contains(marker)).count()
    }

    /// Every `(counter, uptime seconds)` the guest printed, in order.
    pub fn counters(&self) -> Vec<(u64, f64)> {
        self.text()
            .lines()
            .filter_map(|l| {
                let rest = &l[l.find(COUNTER_MARKER)? + COUNTER_MARKER.len()..];
                let mut it = rest.split_whitespace();
                let n = it.next()?.parse().ok()?;
                let up = it.next()?.parse().ok()?;
                Some((n, up))
            })
            .collect()
    }

    /// The values of `current_users` the guest's sidecar wrote successfully, in order.
    pub fn kpi_reports(&self) -> Vec<i64> {
        self.text()
            .lines()
            .filter_map(|l| {
                let rest = &l[l.find(KPI_MARKER)? + KPI_MARKER.len()..];
                rest.strip_prefix(' ')?.trim().parse().ok()
            })
            .collect()
    }

    /// The last counter the guest printed.
    pub fn last_counter(&self) -> Option<(u64, f64)> {
        self.counters().last().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_console_output() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        let log = SerialLog::new(&path);
        assert_eq!(log.last_counter(), None);
        std::fs::write(
            &path,
            "[    1.0] boot\nNUBIS-GUEST-READY disk=vda counter=0\nNUBIS-COUNTER 1 2.28\nNUBIS-COUNTER 2 3.30\ngarbage NUBIS-COUNTER x\n",
        )
        .unwrap();
        assert_eq!(log.count(READY_MARKER), 1);
        assert_eq!(log.counters(), vec![(1, 2.28), (2, 3.30)]);
        assert_eq!(log.last_counter(), Some((2, 3.30)));
        std::fs::write(
            &path,
            "NUBIS-KPI-FAILED 1\nNUBIS-COUNTER 3 4.1\nNUBIS-KPI 2\nNUBIS-KPI 3\n",
        )
        .unwrap();
        assert_eq!(log.kpi_reports(), vec![2, 3]);
        assert_eq!(log.count(KPI_FAILED_MARKER), 1);
    }

    #[test]
    fn missing_guest_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            GuestImage::locate(dir.path()),
            Err(GuestError::NotBuilt(_))
        ));
    }
}
