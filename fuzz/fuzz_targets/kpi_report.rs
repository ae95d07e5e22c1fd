//! Fuzzes the KPI report parser: whatever an application (or a hostile guest) writes into its
//! KPI filesystem is parsed into values or refused, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(values) = nubis_kpifs::parse_report(data, 64) {
        assert!(values.len() <= 64);
    }
    if let Ok(name) = std::str::from_utf8(data) {
        let _ = nubis_kpifs::validate_table_name(name);
    }
});
