//! Fuzzes what a fetching proxy reads from another site's bucket before it trusts anything: the
//! signed manifest record (verification, then the body) and the manifest body itself, whose
//! file names must never name a path outside the receiving directory.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use nubis_protocol::codec;
use nubis_protocol::envelope::Verifier;
use nubis_protocol::identity::SiteIdentity;
use nubis_protocol::message::TransferManifest;
use nubis_protocol::replay::ReplayCache;
use nubis_protocol::SiteId;

fn verifier() -> Option<&'static Verifier> {
    static V: OnceLock<Option<Verifier>> = OnceLock::new();
    V.get_or_init(|| {
        let a = SiteIdentity::from_secrets(SiteId::new("a").ok()?, [1; 32], [2; 32]);
        let cache = ReplayCache::temporary(600_000).ok()?;
        Some(Verifier::new(SiteId::new("b").ok()?, [(a.site().clone(), a.public().signing)], cache))
    })
    .as_ref()
}

fn check(m: &TransferManifest) {
    for f in &m.files {
        assert!(!f.name.contains('/') && f.name != ".." && f.name != ".", "{:?}", f.name);
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = codec::from_slice::<TransferManifest>(data) {
        check(&m);
    }
    if let Some(v) = verifier() {
        if let Ok(opened) = v.open_record(data, "$O.nubis-xfer.M.bWFuaWZlc3Q=") {
            if let Ok(m) = opened.body::<TransferManifest>() {
                check(&m);
            }
        }
    }
});
