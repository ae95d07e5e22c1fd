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

#[cfg(test)]
mod tests {
    use super::*;

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
