//! The `ProductSection` (descriptor properties) and nubis's own `MonitoringSection` (the
//! paper's monitoring specifiers) of a virtual system.

use std::collections::BTreeMap;

use nubis_protocol::descriptor::{DataPoint, MonitoringSpecifier};

use super::reader::Reader;
use super::NUBIS_MONITORING_NS;
use crate::error::{clip, OvfError};
use crate::spec::{parse_format, parse_predicate};
use crate::xml::Element;

impl Reader {
    pub(super) fn product_section(
        &mut self,
        section: &Element,
        properties: &mut BTreeMap<String, String>,
    ) -> Result<(), OvfError> {
        let class = self
            .attr(section, "class")
            .map(|c| format!("{}.", c.trim()))
            .unwrap_or_default();
        let instance = self
            .attr(section, "instance")
            .map(|i| format!(".{}", i.trim()))
            .unwrap_or_default();
        let mut insert = |key: String, value: String| {
            if properties.insert(key.clone(), value).is_some() {
                return Err(OvfError::Duplicate {
                    element: "Property".into(),
                    attribute: "ovf:key",
                    value: clip(&key),
                });
            }
            Ok(())
        };
        for el in &section.children {
            if !self.is_ovf(el) {
                self.not_understood(el, "ProductSection")?;
                continue;
            }
            let meta = match el.local.as_str() {
                "Product" => "product",
                "Vendor" => "vendor",
                "Version" => "version",
                "FullVersion" => "full_version",
                "Property" => {
                    let key = self.attr(el, "key").ok_or(OvfError::Missing {
                        element: el.qname.clone(),
                        what: "ovf:key",
                    })?;
                    let mut value = self.attr(el, "value").unwrap_or("").to_owned();
                    // A `Value` child overrides the default in its configuration.
                    for v in el.children_named(&self.ns, "Value") {
                        let applies = self.attr(v, "configuration").is_some_and(|c| {
                            self.selected
                                .as_ref()
                                .is_some_and(|s| c.split_whitespace().any(|x| x == s))
                        });
                        if applies {
                            value = self.attr(v, "value").unwrap_or("").to_owned();
                        }
                    }
                    let full_key = format!("{class}{key}{instance}");
                    if self.attr(el, "password").map(str::trim) == Some("true") && !value.is_empty()
                    {
                        return Err(OvfError::SecretProperty { key: full_key });
                    }
                    insert(full_key, value)?;
                    continue;
                }
                _ => continue,
            };
            let text = el.text.trim();
            if !text.is_empty() {
                insert(format!("ovf.{class}{meta}{instance}"), text.to_owned())?;
            }
        }
        Ok(())
    }

    pub(super) fn monitoring_section(
        &mut self,
        section: &Element,
        out: &mut Vec<MonitoringSpecifier>,
    ) -> Result<(), OvfError> {
        for el in &section.children {
            if el.local == "Info" {
                continue;
            }
            if !el.is(NUBIS_MONITORING_NS, "Specifier") {
                self.not_understood(el, "MonitoringSection")?;
                continue;
            }
            out.push(specifier(el)?);
        }
        Ok(())
    }
}

const SPECIFIER_ATTRIBUTES: &[&str] = &[
    "dataPoint",
    "monitoringIntervalMs",
    "deliveryIntervalMs",
    "format",
    "predicate",
    "sealed",
];

fn specifier(el: &Element) -> Result<MonitoringSpecifier, OvfError> {
    let dp = el.attr_plain("dataPoint").ok_or(OvfError::Missing {
        element: "Specifier".into(),
        what: "dataPoint",
    })?;
    let label = format!("Specifier {dp:?}");
    if let Some(unknown) = el
        .attrs
        .iter()
        .find(|a| a.ns.is_none() && !SPECIFIER_ATTRIBUTES.contains(&a.local.as_str()))
    {
        return Err(OvfError::UnknownAttribute {
            element: label,
            attribute: unknown.local.clone(),
        });
    }
    let invalid = |attribute, value: &str, reason| OvfError::InvalidValue {
        element: label.clone(),
        attribute,
        value: clip(value),
        reason,
    };
    let data_point = DataPoint::new(dp).map_err(|_| {
        invalid(
            "dataPoint",
            dp,
            "not a data point name (dot-separated [A-Za-z0-9_-] tokens)",
        )
    })?;
    let ms = |attribute: &'static str, default: Option<u64>| -> Result<u64, OvfError> {
        match (el.attr_plain(attribute), default) {
            (Some(v), _) => v
                .trim()
                .parse()
                .map_err(|_| invalid(attribute, v, "not a number of milliseconds")),
            (None, Some(d)) => Ok(d),
            (None, None) => Err(OvfError::Missing {
                element: label.clone(),
                what: attribute,
            }),
        }
    };
    let monitoring_interval_ms = ms("monitoringIntervalMs", None)?;
    let delivery_interval_ms = ms("deliveryIntervalMs", Some(0))?;
    let format = match el.attr_plain("format") {
        None => nubis_protocol::descriptor::DeliveryFormat::Raw,
        Some(f) => parse_format(f)
            .ok_or_else(|| invalid("format", f, "expected raw, min, max, mean or median"))?,
    };
    let predicate = match el.attr_plain("predicate") {
        None => None,
        Some(p) => Some(parse_predicate(p).ok_or_else(|| {
            invalid(
                "predicate",
                p,
                "expected <lt|le|gt|ge|eq|ne>:<finite number>, e.g. lt:0.5",
            )
        })?),
    };
    let sealed = match el.attr_plain("sealed").map(str::trim) {
        None | Some("false" | "0") => false,
        Some("true" | "1") => true,
        Some(other) => return Err(invalid("sealed", other, "expected true or false")),
    };
    Ok(MonitoringSpecifier {
        data_point,
        monitoring_interval_ms,
        delivery_interval_ms,
        format,
        predicate,
        sealed,
    })
}
