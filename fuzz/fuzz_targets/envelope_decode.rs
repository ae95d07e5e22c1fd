//! Fuzzes the receiving side of a signed envelope: decoding and every verification step must
//! refuse arbitrary input with an error, never panic or allocate without bound.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use nubis_protocol::envelope::{SignedEnvelope, Verifier};
use nubis_protocol::identity::SiteIdentity;
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

fuzz_target!(|data: &[u8]| {
    let _ = SignedEnvelope::decode(data);
    if let Some(v) = verifier() {
        let _ = v.open_request(data, "nubis.fed.b.migration.request", 1_800_000_000_000);
        let _ = v.open_event(data, "nubis.mon.a.vm1.infra.cpu", 1_800_000_000_000);
    }
});
