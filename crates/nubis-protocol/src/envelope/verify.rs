//! Verifying: the [`Verifier`] that opens envelopes addressed to one site, checking them from
//! the cheapest check to the most expensive, and the [`Opened`] envelope it returns.

use std::collections::HashMap;

use ed25519_dalek::{Signature, VerifyingKey};

use super::{EnvelopeError, Nonce, SignedEnvelope, BROADCAST, DEFAULT_FRESHNESS_MS};
use crate::codec::{self, MAX_BODY_LEN};
use crate::ids::SiteId;
use crate::message::Body;
use crate::replay::{ReplayCache, ReplayError};
use crate::version;

/// A verified envelope whose body has not been decoded yet.
#[derive(Debug, Clone)]
pub struct Opened {
    /// The verified envelope.
    pub envelope: SignedEnvelope,
    /// The sender, a pinned partner.
    pub from: SiteId,
}

impl Opened {
    /// Decodes the body as `B`, refusing another body type.
    pub fn body<B: Body>(&self) -> Result<B, EnvelopeError> {
        if self.envelope.body_type != B::TYPE {
            return Err(EnvelopeError::UnexpectedType {
                expected: B::TYPE,
                found: self.envelope.body_type.clone(),
            });
        }
        codec::from_slice(&self.envelope.body).map_err(EnvelopeError::from_codec)
    }

    /// The body type name.
    pub fn body_type(&self) -> &str {
        &self.envelope.body_type
    }
}

/// Verifies envelopes addressed to one site against its pinned partner keys.
#[derive(Debug)]
pub struct Verifier {
    own: SiteId,
    partners: HashMap<SiteId, VerifyingKey>,
    replay: ReplayCache,
    freshness_ms: u64,
}

impl Verifier {
    /// A verifier for site `own` trusting exactly `partners`, with the default freshness window.
    ///
    /// The replay cache should retain nonces for at least twice the freshness window.
    pub fn new(
        own: SiteId,
        partners: impl IntoIterator<Item = (SiteId, VerifyingKey)>,
        replay: ReplayCache,
    ) -> Self {
        Self {
            own,
            partners: partners.into_iter().collect(),
            replay,
            freshness_ms: DEFAULT_FRESHNESS_MS,
        }
    }

    /// Changes the freshness window.
    pub fn with_freshness_ms(mut self, freshness_ms: u64) -> Self {
        self.freshness_ms = freshness_ms;
        self
    }

    /// The site this verifier belongs to.
    pub fn own_site(&self) -> &SiteId {
        &self.own
    }

    /// The replay cache (flush it on shutdown).
    pub fn replay_cache(&self) -> &ReplayCache {
        &self.replay
    }

    /// Verifies a request or notice that arrived on `subject`, addressed to this site.
    pub fn open_request(
        &self,
        raw: &[u8],
        subject: &str,
        now_ms: u64,
    ) -> Result<Opened, EnvelopeError> {
        self.open_inner(raw, subject, now_ms, false, None, None)
    }

    /// Verifies a monitoring event that arrived on `subject`, addressed to this site or to all.
    pub fn open_event(
        &self,
        raw: &[u8],
        subject: &str,
        now_ms: u64,
    ) -> Result<Opened, EnvelopeError> {
        self.open_inner(raw, subject, now_ms, true, None, None)
    }

    /// Verifies a monitoring event like [`Verifier::open_event`], but against `key` given by the
    /// caller for `sender` instead of a pinned partner key: for sites outside the bilateral
    /// contracts whose key the caller took from another authority (the federation directory).
    /// An envelope from any other sender is refused as [`EnvelopeError::UnknownSender`].
    pub fn open_event_with_key(
        &self,
        raw: &[u8],
        subject: &str,
        now_ms: u64,
        sender: &SiteId,
        key: &VerifyingKey,
    ) -> Result<Opened, EnvelopeError> {
        self.open_inner(raw, subject, now_ms, true, None, Some((sender, key)))
    }

    /// Verifies a signed record that is state rather than a message, such as a directory entry
    /// (addressed to [`BROADCAST`], `subject` = the record's key subject).
    ///
    /// Records are read again and again (every watcher start replays the current value), so the
    /// freshness window and the replay cache do not apply; the caller compares the record's own
    /// sequence (e.g. a heartbeat time) with what it already holds.
    pub fn open_record(&self, raw: &[u8], subject: &str) -> Result<Opened, EnvelopeError> {
        self.open_record_by(raw, subject, None)
    }

    /// Verifies a signed record like [`Verifier::open_record`], but against `key` given by the
    /// caller for `sender` (a site outside the bilateral contracts, whose key the caller took
    /// from the federation directory). A record from any other sender is refused as
    /// [`EnvelopeError::UnknownSender`].
    pub fn open_record_with_key(
        &self,
        raw: &[u8],
        subject: &str,
        sender: &SiteId,
        key: &VerifyingKey,
    ) -> Result<Opened, EnvelopeError> {
        self.open_record_by(raw, subject, Some((sender, key)))
    }

    fn open_record_by(
        &self,
        raw: &[u8],
        subject: &str,
        key: Option<(&SiteId, &VerifyingKey)>,
    ) -> Result<Opened, EnvelopeError> {
        let (env, from) = self.check_signed_by(raw, key)?;
        if env.to != BROADCAST {
            return Err(EnvelopeError::WrongRecipient(env.to.clone()));
        }
        if env.subject != subject {
            return Err(EnvelopeError::WrongSubject {
                signed: env.subject.clone(),
                arrived: subject.to_string(),
            });
        }
        if env.re.is_some() {
            return Err(EnvelopeError::NotAReplyToThis);
        }
        Ok(Opened {
            from,
            envelope: env,
        })
    }

    /// Verifies the reply to a request this site sent on `request_subject` with `request_nonce`.
    pub fn open_reply(
        &self,
        raw: &[u8],
        request_subject: &str,
        request_nonce: &Nonce,
        now_ms: u64,
    ) -> Result<Opened, EnvelopeError> {
        self.open_inner(
            raw,
            request_subject,
            now_ms,
            false,
            Some(request_nonce),
            None,
        )
    }

    fn open_inner(
        &self,
        raw: &[u8],
        subject: &str,
        now_ms: u64,
        broadcast_ok: bool,
        reply_to: Option<&Nonce>,
        key: Option<(&SiteId, &VerifyingKey)>,
    ) -> Result<Opened, EnvelopeError> {
        let (env, from) = self.check_signed_by(raw, key)?;
        let to_me = env.to == self.own.as_str();
        if !(to_me || (broadcast_ok && env.to == BROADCAST)) {
            return Err(EnvelopeError::WrongRecipient(env.to.clone()));
        }
        if env.subject != subject {
            return Err(EnvelopeError::WrongSubject {
                signed: env.subject.clone(),
                arrived: subject.to_string(),
            });
        }
        if env.re.as_ref() != reply_to {
            return Err(EnvelopeError::NotAReplyToThis);
        }
        let skew_ms = env.ts.abs_diff(now_ms);
        if skew_ms > self.freshness_ms {
            return Err(EnvelopeError::Stale { skew_ms });
        }
        self.replay
            .check_and_insert(&from, &env.nonce, env.ts, now_ms)
            .map_err(|e| match e {
                ReplayError::Replayed => EnvelopeError::Replayed,
                other => EnvelopeError::ReplayStore(other),
            })?;
        Ok(Opened {
            from,
            envelope: env,
        })
    }

    /// Decodes `raw` and checks size, version, sender and signature: against `key` when given,
    /// else against the pinned keys.
    fn check_signed_by(
        &self,
        raw: &[u8],
        key: Option<(&SiteId, &VerifyingKey)>,
    ) -> Result<(SignedEnvelope, SiteId), EnvelopeError> {
        let env = SignedEnvelope::decode(raw)?;
        if env.body.len() > MAX_BODY_LEN {
            return Err(EnvelopeError::Oversize {
                len: env.body.len(),
                limit: MAX_BODY_LEN,
            });
        }
        if !version::is_supported(env.v) {
            return Err(EnvelopeError::UnsupportedVersion(env.v));
        }
        let (from, key) = match key {
            Some((sender, key)) if sender.as_str() == env.from => (sender, key),
            Some(_) => return Err(EnvelopeError::UnknownSender(env.from.clone())),
            None => self
                .partners
                .get_key_value(env.from.as_str())
                .ok_or_else(|| EnvelopeError::UnknownSender(env.from.clone()))?,
        };
        let sig = Signature::from_bytes(&env.sig);
        key.verify_strict(&env.signed_bytes(), &sig)
            .map_err(|_| EnvelopeError::BadSignature)?;
        Ok((env, from.clone()))
    }
}
