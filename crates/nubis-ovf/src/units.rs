//! Allocation units of OVF quantities (`byte * 2^20`, `MegaBytes`, …) as byte multipliers.
//!
//! OVF takes its units from DMTF DSP0004 "programmatic units": `byte` optionally multiplied by
//! powers such as `2^20` or `10^6`. Exporters also write the older CIM names (`MegaBytes`,
//! `KiloBytes`, `GigaBytes`) and short forms (`MB`). The binary reading is used for those names
//! (`MegaBytes` = 2^20 bytes), as VMware and VirtualBox mean it.

/// The number of bytes one unit of `units` stands for, or `None` for a unit that is not a
/// byte unit (e.g. `hertz * 10^6`) or that overflows.
pub fn byte_multiplier(units: &str) -> Option<u64> {
    let compact: String = units
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase();
    let named = match compact.as_str() {
        "byte" | "bytes" | "b" => Some(1),
        "kilobyte" | "kilobytes" | "kb" | "kib" => Some(1 << 10),
        "megabyte" | "megabytes" | "mb" | "mib" => Some(1 << 20),
        "gigabyte" | "gigabytes" | "gb" | "gib" => Some(1 << 30),
        "terabyte" | "terabytes" | "tb" | "tib" => Some(1 << 40),
        _ => None,
    };
    if named.is_some() {
        return named;
    }
    let mut factors = compact.split('*');
    if !matches!(factors.next(), Some("byte" | "bytes")) {
        return None;
    }
    let mut total: u64 = 1;
    for factor in factors {
        let value = match factor.split_once('^') {
            Some((base, exp)) => {
                let base: u64 = base.parse().ok()?;
                let exp: u32 = exp.parse().ok()?;
                base.checked_pow(exp)?
            }
            None => factor.parse().ok()?,
        };
        total = total.checked_mul(value)?;
    }
    (total > 0).then_some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_seen_in_real_exports() {
        assert_eq!(byte_multiplier("byte * 2^20"), Some(1 << 20));
        assert_eq!(byte_multiplier("byte*2^30"), Some(1 << 30));
        assert_eq!(byte_multiplier("byte"), Some(1));
        assert_eq!(byte_multiplier("MegaBytes"), Some(1 << 20));
        assert_eq!(byte_multiplier("GigaBytes"), Some(1 << 30));
        assert_eq!(byte_multiplier("KiloBytes"), Some(1 << 10));
        assert_eq!(byte_multiplier("MB"), Some(1 << 20));
        assert_eq!(byte_multiplier("byte * 10^6"), Some(1_000_000));
        assert_eq!(byte_multiplier("byte * 2^10 * 2^10"), Some(1 << 20));
    }

    #[test]
    fn other_units_are_not_bytes() {
        assert_eq!(byte_multiplier("hertz * 10^6"), None);
        assert_eq!(byte_multiplier("byte * 2^70"), None);
        assert_eq!(byte_multiplier("byte * x"), None);
        assert_eq!(byte_multiplier(""), None);
    }
}
