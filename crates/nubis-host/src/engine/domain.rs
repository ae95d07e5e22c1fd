//! The domain spec of a held VM: its descriptor's hardware, with the paths of the files in its
//! directory and the identities derived from its id.

use std::path::{Path, PathBuf};

use nubis_protocol::VmId;

use super::{vm_mac, vm_uuid, Engine, OpError};
use crate::hypervisor::Hypervisor;
use crate::qcow2::{self, Qcow2Error};
use crate::spec::{DiskFormat, DiskSpec, DomainSpec, FilesystemShare, InterfaceSpec, KernelBoot};
use crate::vm_files::{self, VmFiles, VmFilesError};

impl<H: Hypervisor + 'static> Engine<H> {
    /// The domain spec of a held VM, from its descriptor and the files in its directory. A
    /// blank raw disk is created when missing; every other file must have been received.
    pub(super) fn spec(&self, vm: &VmId) -> Result<DomainSpec, OpError> {
        let d = self.held(vm)?;
        let hw = &d.hardware;
        let mut spec = DomainSpec::new(vm.as_str(), hw.vcpus, hw.memory_mib);
        spec.uuid = Some(vm_uuid(vm));
        for disk in &hw.disks {
            let name = vm_files::disk_file_name(disk)
                .ok_or_else(|| OpError::UnsupportedFormat(disk.format.as_str().to_owned()))?;
            let path = self.files.path(vm, &name);
            let format = match disk.format {
                nubis_protocol::descriptor::DiskFormat::Qcow2 => DiskFormat::Qcow2,
                _ => DiskFormat::Raw,
            };
            if !path.is_file() {
                if disk.image.is_none() && format == DiskFormat::Raw {
                    VmFiles::create_blank_raw(&path, disk.capacity_bytes)?;
                } else {
                    return Err(OpError::MissingFile(name));
                }
            }
            check_disk_image(&path, &name, format, disk.capacity_bytes)?;
            spec.disks.push(DiskSpec {
                path,
                format,
                target: disk.name.clone(),
                capacity_bytes: disk.capacity_bytes,
                read_only: false,
            });
        }
        for (i, _) in hw.networks.iter().enumerate() {
            spec.interfaces.push(InterfaceSpec::User {
                mac: Some(vm_mac(vm, i)),
            });
        }
        if let Some(boot) = &hw.boot {
            let kernel = self.required(vm, vm_files::KERNEL_FILE)?;
            let initrd = match boot.initrd {
                Some(_) => Some(self.required(vm, vm_files::INITRD_FILE)?),
                None => None,
            };
            spec.kernel_boot = Some(KernelBoot {
                kernel,
                initrd,
                cmdline: boot.cmdline.clone(),
            });
        }
        spec.serial_log = Some(self.files.path(vm, vm_files::CONSOLE_FILE));
        // Every domain gets the share whatever its monitoring specifiers say, so the device set
        // never changes with a descriptor update: a saved state restores only into a domain
        // with the same devices.
        if let Some(root) = &self.kpi_share {
            spec.filesystems
                .push(FilesystemShare::kpi(root, vm.as_str()));
        }
        Ok(spec)
    }

    fn required(&self, vm: &VmId, name: &str) -> Result<PathBuf, OpError> {
        let p = self.files.path(vm, name);
        if p.is_file() {
            regular_file(&p, name)?;
            Ok(p)
        } else {
            Err(OpError::MissingFile(name.to_owned()))
        }
    }
}

fn refused(name: &str, reason: impl Into<String>) -> OpError {
    OpError::UnsafeImage {
        name: name.to_owned(),
        reason: reason.into(),
    }
}

/// The file must be the VM's own, not a link to a file elsewhere on the host.
fn regular_file(path: &Path, name: &str) -> Result<std::fs::Metadata, OpError> {
    let meta = std::fs::symlink_metadata(path).map_err(|source| {
        OpError::Files(VmFilesError::Io {
            operation: "inspect",
            path: path.to_path_buf(),
            source,
        })
    })?;
    if meta.file_type().is_file() {
        Ok(meta)
    } else {
        Err(refused(name, "it is not a regular file"))
    }
}

/// Checks a disk's file before any domain uses it: a qcow2 image must refer to no other file
/// of the host (see [`crate::qcow2`]) and show the guest no more than the declared capacity; a
/// raw image must be no larger than it. Content that is not qcow2 under a qcow2 name is left
/// to the hypervisor, which opens it as qcow2 only (the format is pinned) and so refuses it.
fn check_disk_image(
    path: &Path,
    name: &str,
    format: DiskFormat,
    capacity_bytes: u64,
) -> Result<(), OpError> {
    let meta = regular_file(path, name)?;
    match format {
        DiskFormat::Raw => {
            if meta.len() > capacity_bytes {
                return Err(refused(name, "it is larger than the declared capacity"));
            }
        }
        DiskFormat::Qcow2 => match qcow2::inspect_file(path) {
            Ok(image) if image.virtual_size > capacity_bytes => {
                return Err(refused(
                    name,
                    "its size is larger than the declared capacity",
                ));
            }
            Ok(_) | Err(Qcow2Error::NotQcow2 | Qcow2Error::Truncated) => {}
            Err(Qcow2Error::Io(source)) => {
                return Err(OpError::Files(VmFilesError::Io {
                    operation: "read",
                    path: path.to_path_buf(),
                    source,
                }))
            }
            Err(e) => {
                tracing::warn!(file = name, error = %e, "received disk image refused");
                return Err(refused(name, e.to_string()));
            }
        },
    }
    Ok(())
}
