//! Cutting strings that came from a peer or a file down to a bounded length before they are
//! quoted in an error or a log line, so a huge value cannot flood either.

/// The longest prefix of `value` that is at most `limit` bytes long and ends on a character
/// boundary; `value` itself when it is short enough.
pub fn clip(value: &str, limit: usize) -> &str {
    if value.len() <= limit {
        return value;
    }
    let mut cut = limit;
    while !value.is_char_boundary(cut) {
        cut -= 1;
    }
    &value[..cut]
}

/// `value` cut to at most `limit` bytes (see [`clip`]), with `…` appended when it was cut.
pub fn clip_marked(value: &str, limit: usize) -> String {
    if value.len() <= limit {
        return value.to_owned();
    }
    format!("{}…", clip(value, limit))
}

/// The most bytes a peer's words for operators (an error message, a reason) keep once decoded.
pub const REASON_LIMIT: usize = 1024;

/// Deserializes a peer's words for operators cut to [`REASON_LIMIT`] bytes (marked with `…`),
/// so a reason a partner makes as large as a message may be cannot fill a journal, a
/// migration's view or a log line.
pub fn capped_reason<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let value = <String as serde::Deserialize>::deserialize(d)?;
    Ok(if value.len() > REASON_LIMIT {
        clip_marked(&value, REASON_LIMIT)
    } else {
        value
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decoded_reason_is_cut_to_its_limit_and_a_short_one_kept() {
        #[derive(serde::Deserialize)]
        struct Why {
            #[serde(deserialize_with = "capped_reason")]
            reason: String,
        }
        let long = "x".repeat(REASON_LIMIT * 8);
        let raw = crate::codec::to_vec(&serde_json::json!({ "reason": long })).unwrap();
        let why: Why = crate::codec::from_slice(&raw).unwrap();
        assert_eq!(why.reason, format!("{}…", "x".repeat(REASON_LIMIT)));
        let raw = crate::codec::to_vec(&serde_json::json!({ "reason": "disk full" })).unwrap();
        let why: Why = crate::codec::from_slice(&raw).unwrap();
        assert_eq!(why.reason, "disk full");
    }

    #[test]
    fn short_values_are_kept_and_long_ones_cut_on_a_character_boundary() {
        assert_eq!(clip("abc", 3), "abc");
        assert_eq!(clip("abcd", 3), "abc");
        // `é` is two bytes: a cut inside it backs off to the character before.
        assert_eq!(clip("aé", 2), "a");
        assert_eq!(clip_marked("abc", 3), "abc");
        assert_eq!(clip_marked("abcd", 3), "abc…");
        assert_eq!(clip_marked("aéb", 2), "a…");
    }
}
