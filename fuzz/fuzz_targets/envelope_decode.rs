//! Fuzzes the receiving side of a signed envelope: decoding and every verification step must
//! refuse arbitrary input with an error, never panic or allocate without bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nubis_protocol::envelope::SignedEnvelope;

fuzz_target!(|data: &[u8]| {
    let _ = SignedEnvelope::decode(data);
    if let Some(v) = nubis_fuzz::verifier() {
        let _ = v.open_request(data, "nubis.fed.b.migration.request", 1_800_000_000_000);
        let _ = v.open_event(data, "nubis.mon.a.vm1.infra.cpu", 1_800_000_000_000);
    }
});
