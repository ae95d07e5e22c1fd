//! Identities of a VM's domain derived from the VM id alone, the same on every host: a domain
//! restored elsewhere keeps its UUID and its guest keeps its MAC addresses.

use nubis_protocol::VmId;
use sha2::{Digest, Sha256};

/// A UUID derived from the VM id alone, so the same VM has the same UUID on every host (libvirt
/// requires it when a saved state is restored with a rewritten definition). Name-based, with
/// the version nibble of RFC 9562's vendor-specific version 8.
pub fn vm_uuid(vm: &VmId) -> String {
    let digest = Sha256::new()
        .chain_update(b"nubis vm uuid\0")
        .chain_update(vm.as_str().as_bytes())
        .finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A locally administered MAC address derived from the VM id and interface index, stable across
/// hosts so the guest's network configuration survives a migration.
pub fn vm_mac(vm: &VmId, index: usize) -> String {
    let digest = Sha256::new()
        .chain_update(b"nubis vm mac\0")
        .chain_update(vm.as_str().as_bytes())
        .chain_update((index as u64).to_be_bytes())
        .finalize();
    format!(
        "52:54:00:{:02x}:{:02x}:{:02x}",
        digest[0], digest[1], digest[2]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_and_macs_are_stable_and_well_formed() {
        let vm = VmId::new("vm-1").unwrap();
        let u = vm_uuid(&vm);
        assert!(crate::spec::is_uuid(&u), "{u}");
        assert_eq!(u, vm_uuid(&vm));
        assert_ne!(u, vm_uuid(&VmId::new("vm-2").unwrap()));
        assert_eq!(&u[14..15], "8");
        let m = vm_mac(&vm, 0);
        assert!(m.starts_with("52:54:00:") && m.len() == 17, "{m}");
        assert_ne!(m, vm_mac(&vm, 1));
    }
}
