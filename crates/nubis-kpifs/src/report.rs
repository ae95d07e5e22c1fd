//! The paper's KPI report format (section IV-A): table names, and the one- or two-line CSV of an
//! unencrypted file turned into named, typed values.

use crate::error::Refusal;

/// Longest table or column name.
pub const MAX_NAME_LEN: usize = 64;

/// Columns that every unencrypted table has and that a header may not name.
pub const RESERVED_COLUMNS: [&str; 2] = ["kpi_id", "ts_ms"];

/// One value of an unencrypted KPI row, with SQLite's natural type.
#[derive(Debug, Clone, PartialEq)]
pub enum KpiValue {
    /// An empty field.
    Null,
    /// A field that parses as a 64-bit signed integer.
    Integer(i64),
    /// A field that parses as a finite floating-point number.
    Real(f64),
    /// Any other field, and every quoted field.
    Text(String),
}

/// Checks a file name against the table-name charset `[A-Za-z0-9_][A-Za-z0-9_-]{0,63}`.
///
/// The name becomes a table name and a NATS subject token, so dots, spaces and slashes are
/// refused; a leading `-` is refused so that no name reads as a command-line option. A `.csv`
/// suffix is refused rather than stripped, so one table never has two file names.
pub fn validate_table_name(name: &str) -> Result<(), Refusal> {
    let bytes = name.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= MAX_NAME_LEN
        && bytes[0] != b'-'
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Refusal::InvalidName(name.to_owned()))
    }
}

fn validate_column_name(name: &str) -> Result<(), Refusal> {
    let bytes = name.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= MAX_NAME_LEN
        && (bytes[0].is_ascii_alphabetic() || bytes[0] == b'_')
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'_');
    if !ok {
        return Err(Refusal::InvalidColumnName(name.to_owned()));
    }
    if RESERVED_COLUMNS
        .iter()
        .any(|r| r.eq_ignore_ascii_case(name))
    {
        return Err(Refusal::ReservedColumn(name.to_owned()));
    }
    Ok(())
}

/// Checks what can already be judged of a report while it is still being written: invalid UTF-8
/// (an incomplete character at the end may still be completed) and a third line. Refusing these at
/// `write()` lets even writers that ignore `close()` errors, such as shell built-ins, see them.
pub fn precheck_partial(content: &[u8]) -> Result<(), Refusal> {
    if let Err(e) = std::str::from_utf8(content) {
        if e.error_len().is_some() {
            return Err(Refusal::NotUtf8);
        }
    }
    if too_many_lines(content) {
        return Err(Refusal::TooManyLines);
    }
    Ok(())
}

/// A report has more than two lines when, after dropping one final newline, two newlines remain.
fn too_many_lines(content: &[u8]) -> bool {
    let body = content.strip_suffix(b"\n").unwrap_or(content);
    body.iter().filter(|b| **b == b'\n').count() >= 2
}

/// One CSV field: its text and whether it was quoted.
struct Field {
    text: String,
    quoted: bool,
}

/// Splits one CSV line into fields. Quoting follows RFC 4180 (`""` inside quotes is one quote);
/// whitespace around a field is not part of it.
fn split_fields(line: &str) -> Result<Vec<Field>, Refusal> {
    let mut fields = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        let position = fields.len() + 1;
        while chars.peek().is_some_and(|c| *c == ' ' || *c == '\t') {
            chars.next();
        }
        let mut text = String::new();
        let quoted = chars.peek() == Some(&'"');
        if quoted {
            chars.next();
            let mut closed = false;
            while let Some(c) = chars.next() {
                if c == '"' {
                    if chars.peek() == Some(&'"') {
                        chars.next();
                        text.push('"');
                    } else {
                        closed = true;
                        break;
                    }
                } else {
                    text.push(c);
                }
            }
            if !closed {
                return Err(Refusal::BadQuote { field: position });
            }
            while chars.peek().is_some_and(|c| *c == ' ' || *c == '\t') {
                chars.next();
            }
            match chars.next() {
                None => {
                    fields.push(Field { text, quoted });
                    return Ok(fields);
                }
                Some(',') => fields.push(Field { text, quoted }),
                Some(_) => return Err(Refusal::BadQuote { field: position }),
            }
        } else {
            let mut ended = true;
            for c in chars.by_ref() {
                if c == ',' {
                    ended = false;
                    break;
                }
                text.push(c);
            }
            let text = text.trim_end_matches([' ', '\t']).to_owned();
            fields.push(Field { text, quoted });
            if ended {
                return Ok(fields);
            }
        }
    }
}

fn typed(field: Field) -> KpiValue {
    if field.quoted {
        return KpiValue::Text(field.text);
    }
    if field.text.is_empty() {
        return KpiValue::Null;
    }
    if let Ok(i) = field.text.parse::<i64>() {
        return KpiValue::Integer(i);
    }
    match field.text.parse::<f64>() {
        Ok(f) if f.is_finite() => KpiValue::Real(f),
        _ => KpiValue::Text(field.text),
    }
}

/// Parses a complete unencrypted report into named values, in the order written.
///
/// One line holds values; two lines hold a header and values. Header fields that are empty (or a
/// header line that is empty) name their column `columnX`, X counted from one. A final newline, and
/// `\r` before any newline, are optional.
pub fn parse_report(
    content: &[u8],
    max_columns: usize,
) -> Result<Vec<(String, KpiValue)>, Refusal> {
    let text = std::str::from_utf8(content).map_err(|_| Refusal::NotUtf8)?;
    if too_many_lines(content) {
        return Err(Refusal::TooManyLines);
    }
    let body = text.strip_suffix('\n').unwrap_or(text);
    let mut lines = body.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let (header, values) = match (lines.next(), lines.next()) {
        (Some(values), None) => (None, values),
        (Some(header), Some(values)) => (Some(header), values),
        (None, _) => return Err(Refusal::Empty),
    };
    if values.trim().is_empty() {
        return Err(Refusal::Empty);
    }
    let values = split_fields(values)?;
    if values.len() > max_columns {
        return Err(Refusal::TooManyColumns { limit: max_columns });
    }
    let names: Vec<String> = match header {
        Some(h) if !h.trim().is_empty() => {
            let labels = split_fields(h)?;
            if labels.len() != values.len() {
                return Err(Refusal::Ragged {
                    header: labels.len(),
                    values: values.len(),
                });
            }
            labels
                .into_iter()
                .enumerate()
                .map(|(i, l)| {
                    if l.text.is_empty() {
                        Ok(format!("column{}", i + 1))
                    } else {
                        validate_column_name(&l.text).map(|()| l.text)
                    }
                })
                .collect::<Result<_, _>>()?
        }
        _ => (1..=values.len()).map(|i| format!("column{i}")).collect(),
    };
    let mut seen = std::collections::HashSet::new();
    for n in &names {
        if !seen.insert(n.to_ascii_lowercase()) {
            return Err(Refusal::DuplicateColumn(n.clone()));
        }
    }
    Ok(names
        .into_iter()
        .zip(values.into_iter().map(typed))
        .collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn int(n: &str, v: i64) -> (String, KpiValue) {
        (n.to_owned(), KpiValue::Integer(v))
    }

    #[test]
    fn two_lines_name_the_columns() {
        let r = parse_report(b"current_users,load\n42,0.5\n", 16).unwrap();
        assert_eq!(
            r,
            vec![
                int("current_users", 42),
                ("load".into(), KpiValue::Real(0.5))
            ]
        );
    }

    #[test]
    fn one_line_and_empty_labels_get_standard_names() {
        let r = parse_report(b"1,x,", 16).unwrap();
        assert_eq!(
            r,
            vec![
                int("column1", 1),
                ("column2".into(), KpiValue::Text("x".into())),
                ("column3".into(), KpiValue::Null)
            ]
        );
        let r = parse_report(b"a,,c\r\n1,2,3\r\n", 16).unwrap();
        assert_eq!(r, vec![int("a", 1), int("column2", 2), int("c", 3)]);
        let r = parse_report(b"\n7\n", 16).unwrap();
        assert_eq!(r, vec![int("column1", 7)]);
    }

    #[test]
    fn quoting_keeps_text() {
        let r = parse_report(b"\"a, b\",\"12\", \"say \"\"hi\"\"\" ", 16).unwrap();
        assert_eq!(
            r,
            vec![
                ("column1".into(), KpiValue::Text("a, b".into())),
                ("column2".into(), KpiValue::Text("12".into())),
                ("column3".into(), KpiValue::Text("say \"hi\"".into())),
            ]
        );
        assert_eq!(
            parse_report(b"\"open", 16),
            Err(Refusal::BadQuote { field: 1 })
        );
        assert_eq!(
            parse_report(b"1,\"x\"y", 16),
            Err(Refusal::BadQuote { field: 2 })
        );
    }

    #[test]
    fn bad_reports_are_refused() {
        assert_eq!(parse_report(b"a\nb\nc\n", 16), Err(Refusal::TooManyLines));
        assert_eq!(parse_report(b"a\nb\n\n", 16), Err(Refusal::TooManyLines));
        assert_eq!(
            parse_report(b"a,b\n1\n", 16),
            Err(Refusal::Ragged {
                header: 2,
                values: 1
            })
        );
        assert_eq!(parse_report(b"\xff\n", 16), Err(Refusal::NotUtf8));
        assert_eq!(parse_report(b"\n", 16), Err(Refusal::Empty));
        assert_eq!(parse_report(b"a\n\n", 16), Err(Refusal::Empty));
        assert_eq!(
            parse_report(b"A,a\n1,2", 16),
            Err(Refusal::DuplicateColumn("a".into()))
        );
        assert_eq!(
            parse_report(b"ts_ms\n1", 16),
            Err(Refusal::ReservedColumn("ts_ms".into()))
        );
        assert_eq!(
            parse_report(b"my col\n1", 16),
            Err(Refusal::InvalidColumnName("my col".into()))
        );
        assert_eq!(
            parse_report(b"1,2,3", 2),
            Err(Refusal::TooManyColumns { limit: 2 })
        );
    }

    #[test]
    fn partial_writes_are_judged_only_on_what_is_final() {
        assert_eq!(precheck_partial(b"users\n4"), Ok(()));
        assert_eq!(precheck_partial("é".as_bytes().split_at(1).0), Ok(()));
        assert_eq!(precheck_partial(b"\xff"), Err(Refusal::NotUtf8));
        assert_eq!(precheck_partial(b"a\nb\nc"), Err(Refusal::TooManyLines));
    }

    #[test]
    fn table_names() {
        for ok in ["load", "current_users", "A-1", "_x"] {
            assert_eq!(validate_table_name(ok), Ok(()));
        }
        for bad in ["", "-x", "a.csv", "a b", ".hidden", &"x".repeat(65), "é"] {
            assert!(validate_table_name(bad).is_err(), "{bad}");
        }
    }
}
