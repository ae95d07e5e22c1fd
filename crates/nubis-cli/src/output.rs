//! What the CLI prints: text for people by default (aligned tables, ISO-8601 UTC times, rounded
//! values with units, humanised durations), the site's JSON with `--json`.

use serde::Serialize;
use serde_json::Value;

/// A command's result in both forms; `main` prints the one asked for.
#[derive(Debug)]
pub struct Printed {
    /// The JSON form (`--json`), as the site answered it.
    pub json: Value,
    /// The text form, ending with a newline unless empty.
    pub text: String,
}

impl Printed {
    /// `value` as JSON, `text` for people.
    pub fn new(value: &impl Serialize, text: String) -> Self {
        Self {
            json: serde_json::to_value(value).unwrap_or(Value::Null),
            text,
        }
    }

    /// Prints the form asked for on stdout.
    pub fn print(&self, json: bool) {
        if json {
            println!("{}", self.json);
        } else {
            print!("{}", self.text);
        }
    }
}

/// A table with columns as wide as their widest cell; numeric columns align right.
#[derive(Debug)]
pub struct Table {
    headers: Vec<&'static str>,
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers; a header starting with `>` aligns its column right
    /// (the `>` is not shown).
    pub fn new(headers: &[&'static str]) -> Self {
        Self {
            headers: headers
                .iter()
                .map(|h| h.strip_prefix('>').unwrap_or(h))
                .collect(),
            right: headers.iter().map(|h| h.starts_with('>')).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (missing cells are empty, extra cells are dropped).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as lines of text, columns two spaces apart, no trailing blanks.
    pub fn render(&self) -> String {
        let cell = |row: &[String], i: usize| row.get(i).map_or("", |s| s.as_str()).to_string();
        let header: Vec<String> = self.headers.iter().map(|h| h.to_string()).collect();
        let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, w) in widths.iter_mut().enumerate() {
                *w = (*w).max(cell(row, i).chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, width) in widths.iter().enumerate() {
                let text = cell(row, i);
                let pad = width.saturating_sub(text.chars().count());
                if i > 0 {
                    line.push_str("  ");
                }
                if self.right[i] {
                    line.push_str(&" ".repeat(pad));
                    line.push_str(&text);
                } else {
                    line.push_str(&text);
                    line.push_str(&" ".repeat(pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Label/value lines with the values aligned.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    pairs
        .iter()
        .map(|(k, v)| format!("{k:<width$}  {v}\n"))
        .collect()
}

/// Milliseconds since the Unix epoch as ISO-8601 UTC, to the second: `2026-01-01T12:00:00Z`.
pub fn time(ms: u64) -> String {
    utc(ms, false)
}

/// Milliseconds since the Unix epoch as ISO-8601 UTC, to the millisecond.
pub fn time_ms(ms: u64) -> String {
    utc(ms, true)
}

fn utc(ms: u64, millis: bool) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    match time::OffsetDateTime::from_unix_timestamp_nanos(nanos) {
        Ok(t) => {
            let mut s = format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            );
            if millis {
                s.push_str(&format!(".{:03}", t.millisecond()));
            }
            s.push('Z');
            s
        }
        Err(_) => format!("{ms} ms after the epoch"),
    }
}

/// A duration for people: `850 ms`, `12.3 s`, `2 m 05 s`, `3 h 07 m`, `2 d 04 h`.
pub fn duration_ms(ms: u64) -> String {
    let s = ms / 1000;
    match ms {
        0..1_000 => format!("{ms} ms"),
        1_000..60_000 => format!("{:.1} s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{} m {:02} s", s / 60, s % 60),
        3_600_000..86_400_000 => format!("{} h {:02} m", s / 3600, s % 3600 / 60),
        _ => format!("{} d {:02} h", s / 86_400, s % 86_400 / 3600),
    }
}

/// A duration in seconds for people (see [`duration_ms`]).
pub fn duration_s(seconds: f64) -> String {
    duration_ms((seconds.max(0.0) * 1000.0).round() as u64)
}

/// A byte count in binary units: `512 B`, `1.5 KiB`, `3.0 GiB`.
pub fn bytes(n: f64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n.max(0.0);
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A number rounded to `decimals`, trailing zeros dropped: `0.5`, `12`, `0.001`.
pub fn number(value: f64, decimals: usize) -> String {
    let text = format!("{value:.decimals$}");
    let text = if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    };
    if text == "-0" {
        "0".into()
    } else {
        text
    }
}

/// `yes` or `no`.
pub fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

/// The text of an optional value, `-` when absent.
pub fn or_dash(v: Option<impl ToString>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn columns_are_as_wide_as_their_widest_cell() {
        let mut t = Table::new(&["NAME", ">SIZE"]);
        t.row(vec!["a-long-image-name.qcow2".into(), "1.0 MiB".into()]);
        t.row(vec!["b".into(), "12 B".into()]);
        let text = t.render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "NAME                        SIZE");
        assert_eq!(lines[1], "a-long-image-name.qcow2  1.0 MiB");
        assert_eq!(lines[2], "b                           12 B");
    }

    #[test]
    fn times_are_iso_8601_utc() {
        assert_eq!(time(0), "1970-01-01T00:00:00Z");
        assert_eq!(time(1_767_225_600_000), "2026-01-01T00:00:00Z");
        assert_eq!(time_ms(1_767_225_600_123), "2026-01-01T00:00:00.123Z");
    }

    #[test]
    fn durations_read_like_people_say_them() {
        assert_eq!(duration_ms(850), "850 ms");
        assert_eq!(duration_ms(12_345), "12.3 s");
        assert_eq!(duration_ms(125_000), "2 m 05 s");
        assert_eq!(duration_ms(3 * 3_600_000 + 7 * 60_000), "3 h 07 m");
        assert_eq!(duration_ms(2 * 86_400_000 + 4 * 3_600_000), "2 d 04 h");
        assert_eq!(duration_s(125.4), "2 m 05 s");
    }

    #[test]
    fn sizes_and_numbers_are_rounded_with_units() {
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(bytes(1536.0), "1.5 KiB");
        assert_eq!(bytes(3.0 * 1024.0 * 1024.0 * 1024.0), "3.0 GiB");
        assert_eq!(number(0.500_000_1, 4), "0.5");
        assert_eq!(number(12.0, 3), "12");
        assert_eq!(number(-0.000_01, 3), "0");
        assert_eq!(number(0.123_456, 3), "0.123");
    }

    #[test]
    fn fields_align_their_values() {
        assert_eq!(
            fields(&[("site", "a".into()), ("partners", "2".into())]),
            "site      a\npartners  2\n"
        );
    }
}
