//! Fuzzes what a fetching proxy reads from another site's bucket before it trusts anything: the
//! signed manifest record (verification, then the body) and the manifest body itself, whose
//! file names must never name a path outside the receiving directory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nubis_protocol::codec;
use nubis_protocol::message::TransferManifest;

fn check(m: &TransferManifest) {
    for f in &m.files {
        assert!(!f.name.contains('/') && f.name != ".." && f.name != ".", "{:?}", f.name);
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = codec::from_slice::<TransferManifest>(data) {
        check(&m);
    }
    if let Some(v) = nubis_fuzz::verifier() {
        if let Ok(opened) = v.open_record(data, "$O.nubis-xfer.M.bWFuaWZlc3Q=") {
            if let Ok(m) = opened.body::<TransferManifest>() {
                check(&m);
            }
        }
    }
});
