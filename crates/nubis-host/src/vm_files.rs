//! The per-VM directories the host agent owns: `<vm_root>/<vm id>/`, holding everything of one
//! VM on this host.
//!
//! | file | what |
//! |---|---|
//! | `descriptor.msgpack` | the VM descriptor the host holds (written first, atomically); its presence is what makes the directory a VM of this host when the agent restarts |
//! | `disk-<name>.<format>` | one per disk of the descriptor |
//! | `kernel`, `initrd` | the direct-boot files, when the descriptor asks for direct kernel boot |
//! | `state.sav` | the saved memory state, between a save and the restore that consumes it |
//! | `console.log` | the guest's serial console |
//!
//! The logical names (everything but the descriptor and the console) are the slots the transfer
//! proxy reads from and writes to. Paths never leave the site.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use nubis_protocol::codec::{self, CodecError};
use nubis_protocol::descriptor::{DiskFormat, DiskSpec, VmDescriptor};
use nubis_protocol::message::{HostFile, LocalFile};
use nubis_protocol::VmId;

/// The file that marks a directory as a VM of this host.
pub const DESCRIPTOR_FILE: &str = "descriptor.msgpack";
/// The saved memory state.
pub const STATE_FILE: &str = "state.sav";
/// The direct-boot kernel.
pub const KERNEL_FILE: &str = "kernel";
/// The direct-boot initial RAM disk.
pub const INITRD_FILE: &str = "initrd";
/// The guest's serial console.
pub const CONSOLE_FILE: &str = "console.log";
/// Present while this host has the VM's domain defined on its hypervisor: only then is a domain
/// with the VM's name this host's to act on. Without it (reserved, files arriving, or prepared
/// for a transfer) the VM is only its files here, and a domain with its name belongs to another
/// host sharing the hypervisor (several hosts on one machine).
pub const DOMAIN_MARKER: &str = "domain";

/// A file that is there while `vm` should run on this host: written before it is started
/// (activated, or resumed after an aborted migration, or started by the Control interface),
/// removed before it is prepared for a transfer, stopped or suspended. An agent that starts
/// (after a crash, or a reboot of the host) runs again each VM that has it and does not run.
pub const RUN_MARKER: &str = "run";

/// Why a VM directory could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum VmFilesError {
    /// A file system operation failed.
    #[error("cannot {operation} {path}")]
    Io {
        /// What was attempted.
        operation: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The stored descriptor cannot be encoded or decoded.
    #[error("unreadable descriptor in {path}")]
    Descriptor {
        /// The descriptor file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: CodecError,
    },
}

fn io(operation: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> VmFilesError {
    let path = path.to_path_buf();
    move |source| VmFilesError::Io {
        operation,
        path,
        source,
    }
}

/// The logical name of a disk's image file, or `None` for a format the host cannot run.
pub fn disk_file_name(disk: &DiskSpec) -> Option<String> {
    match disk.format {
        DiskFormat::Raw | DiskFormat::Qcow2 => {
            Some(format!("disk-{}.{}", disk.name, disk.format.as_str()))
        }
        _ => None,
    }
}

/// What one directory under the root turned out to be when it was scanned.
#[derive(Debug)]
pub enum Found {
    /// A VM with its stored descriptor.
    Vm(VmId, Box<VmDescriptor>),
    /// A VM directory without a descriptor: a reservation that never completed.
    Incomplete(VmId),
    /// A VM directory whose descriptor cannot be read.
    Unreadable(VmId, VmFilesError),
}

/// The root under which each VM has its directory.
#[derive(Debug, Clone)]
pub struct VmFiles {
    root: PathBuf,
}

impl VmFiles {
    /// The VM directories under `root` (created if missing).
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, VmFilesError> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(io("create", &root))?;
        Ok(Self { root })
    }

    /// The root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of `vm`.
    pub fn dir(&self, vm: &VmId) -> PathBuf {
        self.root.join(vm.as_str())
    }

    /// A file of `vm` by its logical name.
    pub fn path(&self, vm: &VmId, name: &str) -> PathBuf {
        self.dir(vm).join(name)
    }

    /// The saved state file of `vm`.
    pub fn state_file(&self, vm: &VmId) -> PathBuf {
        self.path(vm, STATE_FILE)
    }

    /// The logical names of every file `descriptor` may need, in a stable order.
    pub fn slot_names(descriptor: &VmDescriptor) -> Vec<String> {
        let hw = &descriptor.hardware;
        let mut names: Vec<String> = hw.disks.iter().filter_map(disk_file_name).collect();
        if let Some(boot) = &hw.boot {
            names.push(KERNEL_FILE.into());
            if boot.initrd.is_some() {
                names.push(INITRD_FILE.into());
            }
        }
        names.push(STATE_FILE.into());
        names
    }

    /// The slots of `descriptor`: logical name and local path of each file.
    pub fn slots(&self, descriptor: &VmDescriptor) -> Vec<LocalFile> {
        Self::slot_names(descriptor)
            .into_iter()
            .map(|name| LocalFile {
                path: self
                    .path(&descriptor.id, &name)
                    .to_string_lossy()
                    .into_owned(),
                name,
            })
            .collect()
    }

    /// The slots of `descriptor` whose files exist, with their sizes.
    pub fn existing(&self, descriptor: &VmDescriptor) -> Result<Vec<HostFile>, VmFilesError> {
        let mut out = Vec::new();
        for slot in self.slots(descriptor) {
            match fs::metadata(&slot.path) {
                Ok(m) if m.is_file() => out.push(HostFile {
                    name: slot.name,
                    path: slot.path,
                    size_bytes: m.len(),
                }),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("inspect", Path::new(&slot.path))(e)),
            }
        }
        Ok(out)
    }

    /// Creates the directory of the descriptor's VM (if needed) and stores the descriptor.
    pub fn create(&self, descriptor: &VmDescriptor) -> Result<(), VmFilesError> {
        let dir = self.dir(&descriptor.id);
        fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        self.store_descriptor(descriptor)
    }

    /// Replaces the stored descriptor, atomically: a crash leaves the old or the new one.
    pub fn store_descriptor(&self, descriptor: &VmDescriptor) -> Result<(), VmFilesError> {
        let path = self.path(&descriptor.id, DESCRIPTOR_FILE);
        let bytes = codec::to_vec(descriptor).map_err(|source| VmFilesError::Descriptor {
            path: path.clone(),
            source,
        })?;
        let tmp = path.with_extension("msgpack.tmp");
        let mut f = fs::File::create(&tmp).map_err(io("create", &tmp))?;
        f.write_all(&bytes).map_err(io("write", &tmp))?;
        f.sync_all().map_err(io("sync", &tmp))?;
        drop(f);
        fs::rename(&tmp, &path).map_err(io("rename", &tmp))?;
        Ok(())
    }

    fn load_descriptor(&self, vm: &VmId) -> Result<Option<VmDescriptor>, VmFilesError> {
        let path = self.path(vm, DESCRIPTOR_FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("read", &path)(e)),
        };
        codec::from_slice(&bytes)
            .map(Some)
            .map_err(|source| VmFilesError::Descriptor { path, source })
    }

    /// Creates a sparse raw image of `bytes` at `path` unless a file is there already.
    pub fn create_blank_raw(path: &Path, bytes: u64) -> Result<(), VmFilesError> {
        let f = match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
            Err(e) => return Err(io("create", path)(e)),
        };
        f.set_len(bytes).map_err(io("size", path))
    }

    /// Deletes a file if it exists.
    pub fn remove_file(path: &Path) -> Result<(), VmFilesError> {
        match fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("delete", path)(e)),
        }
    }

    /// Whether this host has `vm`'s domain defined (see [`DOMAIN_MARKER`]).
    pub fn has_domain(&self, vm: &VmId) -> bool {
        self.path(vm, DOMAIN_MARKER).is_file()
    }

    /// Records, durably, that this host is about to define `vm`'s domain: the marker and its
    /// directory entry are on disk before this returns, so a crash right after the definition
    /// still leaves the domain this host's.
    pub fn mark_domain(&self, vm: &VmId) -> Result<(), VmFilesError> {
        self.touch_durably(vm, DOMAIN_MARKER)
    }

    /// Creates the empty file `name` of `vm`, and has it and its directory entry on disk.
    fn touch_durably(&self, vm: &VmId, name: &str) -> Result<(), VmFilesError> {
        let path = self.path(vm, name);
        fs::File::create(&path)
            .and_then(|f| f.sync_all())
            .map_err(io("create", &path))?;
        let dir = self.dir(vm);
        fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io("sync", &dir))
    }

    /// Records, durably, that `vm` should run here ([`RUN_MARKER`]).
    pub fn mark_running(&self, vm: &VmId) -> Result<(), VmFilesError> {
        self.touch_durably(vm, RUN_MARKER)
    }

    /// Records, durably, that `vm` should not run here; no marker is fine.
    pub fn clear_running(&self, vm: &VmId) -> Result<(), VmFilesError> {
        Self::remove_file(&self.path(vm, RUN_MARKER))?;
        let dir = self.dir(vm);
        match fs::File::open(&dir) {
            Ok(d) => d.sync_all().map_err(io("sync", &dir)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("open", &dir)(e)),
        }
    }

    /// Whether `vm` should run here (see [`RUN_MARKER`]).
    pub fn should_run(&self, vm: &VmId) -> bool {
        self.path(vm, RUN_MARKER).is_file()
    }

    /// Records that `vm`'s domain is no longer defined here; no marker is fine.
    pub fn clear_domain(&self, vm: &VmId) -> Result<(), VmFilesError> {
        Self::remove_file(&self.path(vm, DOMAIN_MARKER))
    }

    /// Deletes the directory of `vm` and everything in it; nothing to delete is fine.
    pub fn remove(&self, vm: &VmId) -> Result<(), VmFilesError> {
        let dir = self.dir(vm);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("delete", &dir)(e)),
        }
    }

    /// Every VM directory under the root. Entries whose names are not VM ids are not ours and
    /// are left alone.
    pub fn scan(&self) -> Result<Vec<Found>, VmFilesError> {
        let mut out = Vec::new();
        let entries = fs::read_dir(&self.root).map_err(io("list", &self.root))?;
        for entry in entries {
            let entry = entry.map_err(io("list", &self.root))?;
            let Ok(file_type) = entry.file_type() else {
                continue;
            };
            if !file_type.is_dir() {
                continue;
            }
            let Some(vm) = entry.file_name().to_str().and_then(|s| VmId::new(s).ok()) else {
                continue;
            };
            out.push(match self.load_descriptor(&vm) {
                Ok(Some(d)) if d.id == vm => Found::Vm(vm, Box::new(d)),
                Ok(Some(_)) | Ok(None) => Found::Incomplete(vm),
                Err(e) => Found::Unreadable(vm, e),
            });
        }
        out.sort_by(|a, b| found_id(a).cmp(found_id(b)));
        Ok(out)
    }

    /// Total size of the file system holding the root, in bytes.
    pub fn filesystem_bytes(&self) -> Result<u64, VmFilesError> {
        let st = rustix::fs::statvfs(&self.root).map_err(|e| VmFilesError::Io {
            operation: "inspect the file system of",
            path: self.root.clone(),
            source: e.into(),
        })?;
        Ok(st.f_blocks.saturating_mul(st.f_frsize))
    }
}

fn found_id(f: &Found) -> &VmId {
    match f {
        Found::Vm(vm, _) | Found::Incomplete(vm) | Found::Unreadable(vm, _) => vm,
    }
}
