//! Typed message bodies of every operation (paper section III-B and IV).

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A message body that can travel inside a signed envelope.
///
/// `TYPE` is written into the envelope's `type` field (and covered by the signature), so a
/// receiver in any language knows how to decode the body before looking at it.
pub trait Body: Serialize + DeserializeOwned {
    /// Stable name of the body type on the wire, e.g. `"MigrationRequest"`.
    const TYPE: &'static str;
}
