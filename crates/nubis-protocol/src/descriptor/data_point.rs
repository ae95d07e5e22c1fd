//! Data point names: what a monitoring specifier measures, and the subject tokens it becomes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{DescriptorError, MAX_DATA_POINT_LEN};

/// The name of something that can be monitored, e.g. `cpu.utilisation`, `mem.used`,
/// `disk.vda.read_bytes_rate`, or `kpi.<table>.<column>` for an application KPI.
///
/// One to [`MAX_DATA_POINT_LEN`] bytes of dot-separated tokens, each token non-empty and made of
/// `[A-Za-z0-9_-]`. The tokens become NATS subject tokens (see
/// [`crate::subject::Subject::monitoring`]), so no wildcard or whitespace can slip in. A name
/// whose first token is `kpi` is an application KPI, any other name an infrastructure
/// measurement.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DataPoint(String);

/// What a data point measures, derived from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPointClass {
    /// A measurement taken by the hypervisor (Implementation layer).
    Infra,
    /// An application KPI from the VM's KPI filesystem.
    Kpi,
}

impl DataPoint {
    /// Validates and wraps `s`.
    pub fn new(s: impl Into<String>) -> Result<Self, DescriptorError> {
        let s = s.into();
        if Self::is_valid(&s) {
            Ok(Self(s))
        } else {
            Err(DescriptorError::DataPoint(s))
        }
    }

    fn is_valid(s: &str) -> bool {
        !s.is_empty()
            && s.len() <= MAX_DATA_POINT_LEN
            && s.split('.').all(|t| {
                !t.is_empty()
                    && t.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            })
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is an infrastructure measurement or an application KPI.
    pub fn class(&self) -> DataPointClass {
        if self.0 == "kpi" || self.0.starts_with("kpi.") {
            DataPointClass::Kpi
        } else {
            DataPointClass::Infra
        }
    }
}

impl fmt::Display for DataPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for DataPoint {
    type Err = DescriptorError;
    fn from_str(s: &str) -> Result<Self, DescriptorError> {
        Self::new(s)
    }
}

impl Serialize for DataPoint {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for DataPoint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(s).map_err(serde::de::Error::custom)
    }
}
