//! Signing: addressing a body and sealing it in a [`SignedEnvelope`] under a site's key.

use ed25519_dalek::Signer as _;

use super::{now_ms, EnvelopeError, Nonce, Opened, SignedEnvelope, BROADCAST};
use crate::codec::{self, MAX_BODY_LEN};
use crate::identity::SiteIdentity;
use crate::ids::SiteId;
use crate::message::Body;
use crate::version::PROTOCOL_VERSION;

/// What to sign: recipient, subject and (for replies) the request answered.
#[derive(Debug, Clone, Copy)]
pub struct Addressing<'a> {
    /// Recipient site id, or [`BROADCAST`].
    pub to: &'a str,
    /// The subject (for a reply: the request's subject).
    pub subject: &'a str,
    /// For a reply, the nonce of the request.
    pub re: Option<Nonce>,
}

impl<'a> Addressing<'a> {
    /// A request or notice to `to` on `subject`.
    pub fn request(to: &'a SiteId, subject: &'a str) -> Self {
        Self {
            to: to.as_str(),
            subject,
            re: None,
        }
    }

    /// A monitoring event for every site on the chain.
    pub fn broadcast(subject: &'a str) -> Self {
        Self {
            to: BROADCAST,
            subject,
            re: None,
        }
    }

    /// The reply to a verified request.
    pub fn reply_to(request: &'a Opened) -> Self {
        Self {
            to: request.envelope.from.as_str(),
            subject: request.envelope.subject.as_str(),
            re: Some(request.envelope.nonce),
        }
    }
}

/// Signs `body` as `identity` at `ts_ms`; returns the envelope ready to encode.
pub fn sign<B: Body>(
    identity: &SiteIdentity,
    addressing: Addressing<'_>,
    body: &B,
    ts_ms: u64,
) -> Result<SignedEnvelope, EnvelopeError> {
    let body = codec::to_vec(body).map_err(EnvelopeError::Encode)?;
    if body.len() > MAX_BODY_LEN {
        return Err(EnvelopeError::Oversize {
            len: body.len(),
            limit: MAX_BODY_LEN,
        });
    }
    let mut nonce = [0u8; 16];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut nonce);
    let mut env = SignedEnvelope {
        v: PROTOCOL_VERSION,
        body_type: B::TYPE.to_string(),
        from: identity.site().as_str().to_string(),
        to: addressing.to.to_string(),
        subject: addressing.subject.to_string(),
        ts: ts_ms,
        nonce,
        re: addressing.re,
        body,
        sig: [0; 64],
    };
    env.sig = identity.signing_key().sign(&env.signed_bytes()).to_bytes();
    Ok(env)
}

/// Signs and encodes `body` now; returns the bytes to publish and the nonce (to match replies).
pub fn seal_message<B: Body>(
    identity: &SiteIdentity,
    addressing: Addressing<'_>,
    body: &B,
) -> Result<(Vec<u8>, Nonce), EnvelopeError> {
    let env = sign(identity, addressing, body, now_ms())?;
    Ok((env.encode()?, env.nonce))
}
