//! The compact text forms of a monitoring specifier's delivery format and predicate, shared by
//! the OVF extension section and the TOML form: `format = "median"`, `predicate = "gt:0.9"`.

use nubis_protocol::descriptor::{Aggregate, DeliveryFormat, Predicate, PredicateOp};

/// Parses `raw`, `min`, `max`, `mean` or `median`.
pub fn parse_format(text: &str) -> Option<DeliveryFormat> {
    let aggregate = match text.trim() {
        "raw" => return Some(DeliveryFormat::Raw),
        "min" => Aggregate::Min,
        "max" => Aggregate::Max,
        "mean" => Aggregate::Mean,
        "median" => Aggregate::Median,
        _ => return None,
    };
    Some(DeliveryFormat::Processed { aggregate })
}

/// The text form of a delivery format, the inverse of [`parse_format`].
pub fn format_text(format: &DeliveryFormat) -> &'static str {
    match format {
        DeliveryFormat::Raw => "raw",
        DeliveryFormat::Processed { aggregate } => match aggregate {
            Aggregate::Min => "min",
            Aggregate::Max => "max",
            Aggregate::Mean => "mean",
            Aggregate::Median => "median",
        },
    }
}

/// Parses `<op>:<threshold>`, op one of `lt le gt ge eq ne`, threshold a finite number.
pub fn parse_predicate(text: &str) -> Option<Predicate> {
    let (op, threshold) = text.trim().split_once(':')?;
    let op = match op.trim() {
        "lt" => PredicateOp::Lt,
        "le" => PredicateOp::Le,
        "gt" => PredicateOp::Gt,
        "ge" => PredicateOp::Ge,
        "eq" => PredicateOp::Eq,
        "ne" => PredicateOp::Ne,
        _ => return None,
    };
    let threshold: f64 = threshold.trim().parse().ok()?;
    threshold.is_finite().then_some(Predicate { op, threshold })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_round_trip() {
        for text in ["raw", "min", "max", "mean", "median"] {
            let f = parse_format(text);
            assert_eq!(f.as_ref().map(format_text), Some(text));
        }
        assert_eq!(parse_format("average"), None);
    }

    #[test]
    fn predicates() {
        assert_eq!(
            parse_predicate("lt:0.5"),
            Some(Predicate {
                op: PredicateOp::Lt,
                threshold: 0.5
            })
        );
        assert_eq!(
            parse_predicate("ge: 1000"),
            Some(Predicate {
                op: PredicateOp::Ge,
                threshold: 1000.0
            })
        );
        for bad in ["lt", "<:1", "gt:NaN", "gt:inf", "gt:x", ""] {
            assert_eq!(parse_predicate(bad), None, "{bad}");
        }
    }
}
