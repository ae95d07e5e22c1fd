//! The domain spec of a held VM: its descriptor's hardware, with the paths of the files in its
//! directory and the identities derived from its id.

use std::path::PathBuf;

use nubis_protocol::VmId;

use super::{vm_mac, vm_uuid, Engine, OpError};
use crate::hypervisor::Hypervisor;
use crate::spec::{DiskFormat, DiskSpec, DomainSpec, FilesystemShare, InterfaceSpec, KernelBoot};
use crate::vm_files::{self, VmFiles};

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
            Ok(p)
        } else {
            Err(OpError::MissingFile(name.to_owned()))
        }
    }
}
