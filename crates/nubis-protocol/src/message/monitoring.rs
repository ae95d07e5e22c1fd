//! Monitoring events (paper section IV): batches of raw samples, processed values and encrypted
//! KPI rows, published by a Producer on the VM's monitoring subjects.
//!
//! One signed envelope carries one batch, so the cost of a signature is shared by many samples.
//! When a specifier asks for sealing, the batch's [`ClearPayload`] is encoded with
//! [`crate::codec::to_vec`] and sealed to the primary site's X25519 key (libsodium
//! `crypto_box_seal`); Intermediaries then see that data arrives but cannot read it.

use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::names::ProducerId;
use super::Body;
use crate::descriptor::{Aggregate, DataPoint};
use crate::ids::{SiteId, VmId};

/// One delivery of monitoring data for one VM.
///
/// Published (not requested) on `nubis.mon.<primary>.<vm>.{infra,kpi}.<data point>`, in an
/// envelope addressed to `*`. No reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MonitoringBatch {
    /// The VM measured.
    pub vm: VmId,
    /// Its primary site (the first token of the subject after `nubis.mon`).
    pub primary_site: SiteId,
    /// Opaque id of the Producer, registered in the directory; never a host name.
    pub producer: ProducerId,
    /// When this Producer instance started, in milliseconds since the Unix epoch; a restarted
    /// Producer starts a new epoch, so (`producer`, `epoch_ms`, `seq`) names a batch uniquely.
    pub epoch_ms: u64,
    /// Sequence number within the epoch, from 0, without gaps.
    pub seq: u64,
    /// The values, clear or sealed.
    pub payload: BatchPayload,
}

impl Body for MonitoringBatch {
    const TYPE: &'static str = "MonitoringBatch";
}

/// Site-internal: a host agent hands one batch to its site daemon, which signs it and delivers
/// it (bus or relay) and stores it in its accounting stream.
///
/// A request on [`crate::subject::Subject::monitoring_intake`], not signed (it never leaves the
/// site); the reply is a [`super::HostReply`] of [`BatchStored`], sent only once the batch is in
/// the site's accounting stream. Until then the host agent keeps the batch and sends it again
/// with the same (`producer`, `epoch_ms`, `seq`), which the stream de-duplicates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProducedBatch {
    /// The data point the batch carries values of (it names the monitoring subject).
    pub data_point: DataPoint,
    /// The batch, payload already sealed when the specifier asks for it.
    pub batch: MonitoringBatch,
}

/// The site's acknowledgement of a [`ProducedBatch`]: stored (or found already stored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchStored {
    /// The Producer of the batch.
    pub producer: ProducerId,
    /// Its epoch.
    pub epoch_ms: u64,
    /// Its sequence number.
    pub seq: u64,
    /// True when the accounting stream already held it (a retry).
    pub duplicate: bool,
}

impl Body for BatchStored {
    const TYPE: &'static str = "BatchStored";
}

impl MonitoringBatch {
    /// `<producer>.<epoch_ms>.<seq>`: names the batch uniquely; the JetStream message id
    /// (`Nats-Msg-Id`) under which every site stores it, so retries are de-duplicated.
    pub fn message_id(&self) -> String {
        format!("{}.{}.{}", self.producer, self.epoch_ms, self.seq)
    }
}

/// The values of a batch. On the wire a map tagged by `kind`: `{"kind":"clear","samples":[…],
/// "processed":[…],"encrypted_kpi":[…]}` or `{"kind":"sealed","ciphertext":<bin>}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BatchPayload {
    /// Readable by every site on the chain.
    Clear(ClearPayload),
    /// Readable only by the primary site.
    Sealed {
        /// `crypto_box_seal` of the MessagePack of a [`ClearPayload`]: ephemeral public key (32
        /// bytes) followed by the XSalsa20-Poly1305 box.
        #[serde(with = "serde_bytes")]
        ciphertext: Vec<u8>,
    },
}

/// The readable content of a batch.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClearPayload {
    /// Raw samples (delivery format `raw`).
    #[serde(default)]
    pub samples: Vec<Sample>,
    /// Processed values (delivery format `processed`).
    #[serde(default)]
    pub processed: Vec<ProcessedValue>,
    /// Rows the application wrote to the `encrypted/` directory of its KPI filesystem, forwarded
    /// as the opaque blobs it wrote.
    #[serde(default)]
    pub encrypted_kpi: Vec<EncryptedKpi>,
}

/// One raw measurement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// What was measured.
    pub data_point: DataPoint,
    /// When, in milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// The value.
    pub value: Value,
}

/// A measured value: a MessagePack float, integer or string on the wire (no wrapper), so a
/// client in any language reads it as its native number or text.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A floating-point measurement (float 64).
    Float(f64),
    /// An integer measurement or counter.
    Int(i64),
    /// A text KPI column.
    Text(String),
}

impl Value {
    /// The value as a number, for processing and predicates; `None` for text.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Self::Float(f) => Some(*f),
            Self::Int(i) => Some(*i as f64),
            Self::Text(_) => None,
        }
    }
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Float(f) => s.serialize_f64(*f),
            Self::Int(i) => s.serialize_i64(*i),
            Self::Text(t) => s.serialize_str(t),
        }
    }
}

struct ValueVisitor;

impl Visitor<'_> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a number or a string")
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Int(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        i64::try_from(v)
            .map(Value::Int)
            .map_err(|_| E::custom("integer value out of range"))
    }

    fn visit_f32<E: de::Error>(self, v: f32) -> Result<Value, E> {
        Ok(Value::Float(f64::from(v)))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Float(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Text(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::Text(v))
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
}

/// One processed value: `aggregate` over the samples of a window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessedValue {
    /// What was measured.
    pub data_point: DataPoint,
    /// The function applied.
    pub aggregate: Aggregate,
    /// Start of the window (inclusive), in milliseconds since the Unix epoch.
    pub window_start_ms: u64,
    /// End of the window (exclusive), in milliseconds since the Unix epoch.
    pub window_end_ms: u64,
    /// The result.
    pub value: f64,
    /// How many samples the window held.
    pub count: u32,
}

/// One row from a file in the KPI filesystem's `encrypted/` directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptedKpi {
    /// The table (the file's name, as a token of `[A-Za-z0-9_-]`).
    #[serde(deserialize_with = "table_name")]
    pub table: String,
    /// When the row was written, in milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// The bytes the application wrote (sealed by the application to the primary site's key).
    #[serde(with = "serde_bytes")]
    pub blob: Vec<u8>,
}

fn table_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    if !s.contains('.') && DataPoint::new(s.as_str()).is_ok() {
        Ok(s)
    } else {
        Err(de::Error::custom("invalid kpi table name"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;

    #[test]
    fn values_are_plain_msgpack_scalars() {
        assert_eq!(codec::to_vec(&Value::Int(5)).unwrap(), [0x05]);
        assert_eq!(
            codec::to_vec(&Value::Text("a".into())).unwrap(),
            [0xa1, b'a']
        );
        assert_eq!(codec::to_vec(&Value::Float(1.5)).unwrap()[0], 0xcb);
        for v in [
            Value::Int(-3),
            Value::Int(i64::MAX),
            Value::Float(0.25),
            Value::Text("x".into()),
        ] {
            let b = codec::to_vec(&v).unwrap();
            assert_eq!(codec::from_slice::<Value>(&b).unwrap(), v);
        }
        assert!(codec::from_slice::<Value>(&codec::to_vec(&u64::MAX).unwrap()).is_err());
        assert!(codec::from_slice::<Value>(&[0x90]).is_err());
    }

    #[test]
    fn bad_table_names_are_refused() {
        let row = EncryptedKpi {
            table: "../etc".into(),
            ts_ms: 1,
            blob: vec![1],
        };
        let b = codec::to_vec(&row).unwrap();
        assert!(codec::from_slice::<EncryptedKpi>(&b).is_err());
    }
}
