//! Fuzzes the OVF reader and the TOML descriptor form: an envelope from anyone (a customer's
//! upload, another provider's export) must be refused with an error naming what is wrong, never
//! panic, recurse without bound or allocate without bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nubis_protocol::descriptor::PrimaryKeys;
use nubis_protocol::{SiteId, VmId};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(package) = nubis_ovf::OvfPackage::parse(text) {
        if let (Ok(vm), Ok(site)) = (VmId::new("fuzz-vm"), SiteId::new("a")) {
            let keys = PrimaryKeys {
                signing: [1; 32],
                sealing: [2; 32],
            };
            let _ = package.into_descriptor(vm, site, keys);
        }
    }
    let _ = nubis_ovf::descriptor_from_toml(text);
});
