//! The audit trail of the operator API: every mutating call (deploy, migrate, evict, control,
//! cancel, image put) is recorded — who, what, when and with which outcome — in the
//! `nubis-audit` stream of the site's own JetStream domain, written by the site daemon alone.
//!
//! Who called is taken from the subject, never from the request body: an operator calls on
//! `nubis.ops.<site>.<operator>.<endpoint>`, and the site's server lets each operator's NATS
//! user publish only under its own name (`nats-config/leaf.conf`). A call on the shared subject
//! `nubis.ops.<site>.<endpoint>` is recorded as [`Caller::Shared`]: only the site's shared
//! `operator` user (and the unrestricted `admin`) may publish there.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use nubis_protocol::subject::{is_operator_name, Subject};
use nubis_protocol::SiteId;
use serde::{Deserialize, Serialize};

/// Name of the audit stream in the site's own domain.
pub const STREAM: &str = "nubis-audit";

/// Requests larger than this are recorded by their size only.
const MAX_RECORDED_REQUEST: usize = 4096;

/// How long records are kept.
const MAX_AGE: Duration = Duration::from_secs(365 * 24 * 3600);

/// How many records are kept at most; the oldest go first.
const MAX_MSGS: i64 = 1_000_000;

/// How many bytes of records are kept at most; the oldest go first.
const MAX_BYTES: i64 = 1 << 30;

/// How long the site waits for the stream to acknowledge a record.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a record could not be written.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The stream could not be created or updated.
    #[error("cannot create the audit stream")]
    Stream(#[source] async_nats::Error),
    /// The record could not be encoded.
    #[error("cannot encode an audit record")]
    Encode(#[source] serde_json::Error),
    /// The stream did not store the record.
    #[error("cannot store an audit record")]
    Publish(#[source] async_nats::Error),
}

/// Who made an operator call, as the site's server vouches for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "name", rename_all = "snake_case")]
pub enum Caller {
    /// A named operator, from `nubis.ops.<site>.<operator>.<endpoint>`.
    Operator(String),
    /// Someone allowed on the shared subjects `nubis.ops.<site>.<endpoint>`: the site's shared
    /// `operator` user or its `admin`.
    Shared,
}

impl Caller {
    /// The caller of a request on `subject` to `site`'s operator API; `None` if the subject is
    /// not one of the site's ops subjects.
    pub fn from_subject(site: &SiteId, subject: &str) -> Option<Self> {
        let rest = subject
            .strip_prefix("nubis.ops.")?
            .strip_prefix(site.as_str())?;
        let tokens: Vec<&str> = rest.strip_prefix('.')?.split('.').collect();
        match tokens.as_slice() {
            [_endpoint] => Some(Caller::Shared),
            [operator, _endpoint] if is_operator_name(operator) => {
                Some(Caller::Operator((*operator).to_owned()))
            }
            _ => None,
        }
    }
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Operator(name) => f.write_str(name),
            Caller::Shared => f.write_str("(shared operator)"),
        }
    }
}

/// One mutating operator call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// When the call was answered (ms since the epoch).
    pub at_ms: u64,
    /// Who called.
    pub caller: Caller,
    /// The endpoint (`deploy`, `migrate`, …).
    pub endpoint: String,
    /// The request as sent (JSON), or `{"bytes": n}` if it was too large or not JSON.
    pub request: serde_json::Value,
    /// Whether the site carried the call out.
    pub ok: bool,
    /// The service error code of a refusal (0 when `ok`).
    pub code: u16,
    /// The refusal's message (empty when `ok`).
    pub message: String,
}

impl AuditRecord {
    /// The request as it is recorded: its JSON if small and valid, else its size.
    pub fn request_value(payload: &[u8]) -> serde_json::Value {
        let size = || serde_json::json!({ "bytes": payload.len() });
        if payload.len() > MAX_RECORDED_REQUEST {
            return size();
        }
        serde_json::from_slice(payload).unwrap_or_else(|_| size())
    }
}

/// The configuration of `site`'s audit stream. Records can be neither deleted nor purged
/// through the JetStream API; they leave only by age or by the stream's limits.
pub fn stream_config(site: &SiteId) -> stream::Config {
    stream::Config {
        name: STREAM.to_owned(),
        description: Some(format!("mutating operator calls of site {site}")),
        subjects: vec![Subject::audit(site).as_str().to_owned()],
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::Old,
        storage: stream::StorageType::File,
        max_age: MAX_AGE,
        max_messages: MAX_MSGS,
        max_bytes: MAX_BYTES,
        deny_delete: true,
        deny_purge: true,
        allow_direct: true,
        ..Default::default()
    }
}

/// The writer of a site's audit stream.
#[derive(Debug, Clone)]
pub struct Audit {
    js: jetstream::Context,
    site: SiteId,
}

impl Audit {
    /// A writer over `js`, the JetStream of the site's own domain.
    pub fn new(mut js: jetstream::Context, site: SiteId) -> Self {
        js.set_timeout(ACK_TIMEOUT);
        Self { js, site }
    }

    /// Creates the stream, or brings an existing one to its configuration.
    pub async fn ensure(&self) -> Result<(), AuditError> {
        let config = stream_config(&self.site);
        self.js
            .get_or_create_stream(config.clone())
            .await
            .map_err(|e| AuditError::Stream(e.into()))?;
        self.js
            .update_stream(&config)
            .await
            .map_err(|e| AuditError::Stream(e.into()))?;
        Ok(())
    }

    /// Stores `record`, creating the stream first if it is missing.
    pub async fn record(&self, record: &AuditRecord) -> Result<(), AuditError> {
        let payload = serde_json::to_vec(record).map_err(AuditError::Encode)?;
        let subject = Subject::audit(&self.site).as_str().to_owned();
        match self.publish(&subject, payload.clone()).await {
            Ok(()) => Ok(()),
            Err(_) => {
                // The stream may not exist yet (the server was not ready at start): make it
                // and try once more.
                self.ensure().await?;
                self.publish(&subject, payload).await
            }
        }
    }

    async fn publish(&self, subject: &str, payload: Vec<u8>) -> Result<(), AuditError> {
        self.js
            .publish(subject.to_owned(), payload.into())
            .await
            .map_err(|e| AuditError::Publish(e.into()))?
            .await
            .map_err(|e| AuditError::Publish(e.into()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_caller_is_read_from_the_subject_only() {
        let a = SiteId::new("a").unwrap();
        assert_eq!(
            Caller::from_subject(&a, "nubis.ops.a.alice.deploy"),
            Some(Caller::Operator("alice".into()))
        );
        assert_eq!(
            Caller::from_subject(&a, "nubis.ops.a.deploy"),
            Some(Caller::Shared)
        );
        assert_eq!(Caller::from_subject(&a, "nubis.ops.ab.alice.deploy"), None);
        assert_eq!(Caller::from_subject(&a, "nubis.ops.b.alice.deploy"), None);
        assert_eq!(Caller::from_subject(&a, "nubis.ops.a.Alice.deploy"), None);
        assert_eq!(Caller::from_subject(&a, "nubis.ops.a.x.y.deploy"), None);
    }

    #[test]
    fn large_or_invalid_requests_are_recorded_by_size() {
        assert_eq!(
            AuditRecord::request_value(br#"{"vm":"v"}"#),
            serde_json::json!({"vm": "v"})
        );
        assert_eq!(
            AuditRecord::request_value(b"[1,"),
            serde_json::json!({"bytes": 3})
        );
        let big = vec![b' '; MAX_RECORDED_REQUEST + 1];
        assert_eq!(
            AuditRecord::request_value(&big),
            serde_json::json!({"bytes": MAX_RECORDED_REQUEST + 1})
        );
    }

    #[test]
    fn records_cannot_be_deleted_through_the_api() {
        let c = stream_config(&SiteId::new("a").unwrap());
        assert!(c.deny_delete && c.deny_purge);
        assert_eq!(c.subjects, vec!["nubis.audit.a".to_owned()]);
    }
}
