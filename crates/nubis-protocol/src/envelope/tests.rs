//! Tests of signing and verifying: every refusal has its own error, and a flipped byte anywhere
//! is caught by the right check.

use ed25519_dalek::Signer as _;

use super::*;
use crate::identity::SiteIdentity;
use crate::ids::SiteId;
use crate::message::Body;
use crate::replay::ReplayCache;
use crate::version::PROTOCOL_VERSION;
use proptest::prelude::*;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Ping {
    text: String,
    n: u64,
}

impl Body for Ping {
    const TYPE: &'static str = "Ping";
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Pong {
    n: u64,
}

impl Body for Pong {
    const TYPE: &'static str = "Pong";
}

const SUBJ: &str = "nubis.fed.b.migration.request";
const NOW: u64 = 1_800_000_000_000;

fn site(s: &str) -> SiteId {
    SiteId::new(s).unwrap()
}

struct World {
    a: SiteIdentity,
    b: SiteIdentity,
    verifier_b: Verifier,
    b_id: SiteId,
}

fn world() -> World {
    let a = SiteIdentity::generate(site("a"));
    let b = SiteIdentity::generate(site("b"));
    let verifier_b = Verifier::new(
        site("b"),
        [(site("a"), a.public().signing)],
        ReplayCache::temporary(2 * DEFAULT_FRESHNESS_MS).unwrap(),
    );
    World {
        a,
        b,
        verifier_b,
        b_id: site("b"),
    }
}

fn ping() -> Ping {
    Ping {
        text: "hello".into(),
        n: 7,
    }
}

fn signed(w: &World, ts: u64) -> SignedEnvelope {
    sign(&w.a, Addressing::request(&w.b_id, SUBJ), &ping(), ts).unwrap()
}

#[test]
fn a_signed_request_opens_once() {
    let w = world();
    let raw = signed(&w, NOW).encode().unwrap();
    let opened = w.verifier_b.open_request(&raw, SUBJ, NOW + 5).unwrap();
    assert_eq!(opened.from, site("a"));
    assert_eq!(opened.body::<Ping>().unwrap(), ping());
    assert!(matches!(
        opened.body::<Pong>(),
        Err(EnvelopeError::UnexpectedType {
            expected: "Pong",
            ..
        })
    ));
    assert!(matches!(
        w.verifier_b.open_request(&raw, SUBJ, NOW + 6),
        Err(EnvelopeError::Replayed)
    ));
}

#[test]
fn envelope_fields_are_named() {
    let w = world();
    let raw = signed(&w, NOW).encode().unwrap();
    let v = rmpv::decode::read_value(&mut &raw[..]).unwrap();
    let keys: Vec<&str> = v
        .as_map()
        .unwrap()
        .iter()
        .map(|(k, _)| k.as_str().unwrap())
        .collect();
    assert_eq!(
        keys,
        ["v", "type", "from", "to", "subject", "ts", "nonce", "re", "body", "sig"]
    );
}

#[test]
fn unknown_sender_is_refused() {
    let w = world();
    let c = SiteIdentity::generate(site("c"));
    let raw = sign(&c, Addressing::request(&w.b_id, SUBJ), &ping(), NOW)
        .unwrap()
        .encode()
        .unwrap();
    assert!(matches!(
        w.verifier_b.open_request(&raw, SUBJ, NOW),
        Err(EnvelopeError::UnknownSender(s)) if s == "c"
    ));
}

#[test]
fn signature_by_another_key_is_refused() {
    let w = world();
    // An impostor claims to be "a" but signs with its own key.
    let impostor = SiteIdentity::generate(site("a"));
    let raw = sign(&impostor, Addressing::request(&w.b_id, SUBJ), &ping(), NOW)
        .unwrap()
        .encode()
        .unwrap();
    assert!(matches!(
        w.verifier_b.open_request(&raw, SUBJ, NOW),
        Err(EnvelopeError::BadSignature)
    ));
}

#[test]
fn wrong_recipient_is_refused() {
    let w = world();
    let c_id = site("c");
    let raw = sign(&w.a, Addressing::request(&c_id, SUBJ), &ping(), NOW)
        .unwrap()
        .encode()
        .unwrap();
    assert!(matches!(
        w.verifier_b.open_request(&raw, SUBJ, NOW),
        Err(EnvelopeError::WrongRecipient(s)) if s == "c"
    ));
    // A broadcast is not a request.
    let raw = sign(&w.a, Addressing::broadcast(SUBJ), &ping(), NOW)
        .unwrap()
        .encode()
        .unwrap();
    assert!(matches!(
        w.verifier_b.open_request(&raw, SUBJ, NOW),
        Err(EnvelopeError::WrongRecipient(_))
    ));
    assert!(w.verifier_b.open_event(&raw, SUBJ, NOW).is_ok());
}

#[test]
fn wrong_subject_is_refused() {
    let w = world();
    let raw = signed(&w, NOW).encode().unwrap();
    assert!(matches!(
        w.verifier_b
            .open_request(&raw, "nubis.fed.b.migration.commit", NOW),
        Err(EnvelopeError::WrongSubject { .. })
    ));
}

#[test]
fn stale_and_future_timestamps_are_refused() {
    let w = world();
    let old = signed(&w, NOW - DEFAULT_FRESHNESS_MS - 1).encode().unwrap();
    assert!(matches!(
        w.verifier_b.open_request(&old, SUBJ, NOW),
        Err(EnvelopeError::Stale { skew_ms }) if skew_ms == DEFAULT_FRESHNESS_MS + 1
    ));
    let future = signed(&w, NOW + DEFAULT_FRESHNESS_MS + 1).encode().unwrap();
    assert!(matches!(
        w.verifier_b.open_request(&future, SUBJ, NOW),
        Err(EnvelopeError::Stale { .. })
    ));
    let edge = signed(&w, NOW - DEFAULT_FRESHNESS_MS).encode().unwrap();
    assert!(w.verifier_b.open_request(&edge, SUBJ, NOW).is_ok());
}

#[test]
fn replies_must_answer_the_request() {
    let w = world();
    let req_raw = signed(&w, NOW).encode().unwrap();
    let req = w.verifier_b.open_request(&req_raw, SUBJ, NOW).unwrap();
    let reply = sign(&w.b, Addressing::reply_to(&req), &Pong { n: 1 }, NOW)
        .unwrap()
        .encode()
        .unwrap();
    let verifier_a = Verifier::new(
        site("a"),
        [(site("b"), w.b.public().signing)],
        ReplayCache::temporary(2 * DEFAULT_FRESHNESS_MS).unwrap(),
    );
    assert!(matches!(
        verifier_a.open_reply(&reply, SUBJ, &[9; 16], NOW),
        Err(EnvelopeError::NotAReplyToThis)
    ));
    assert!(matches!(
        verifier_a.open_request(&reply, SUBJ, NOW),
        Err(EnvelopeError::NotAReplyToThis)
    ));
    let opened = verifier_a
        .open_reply(&reply, SUBJ, &req.envelope.nonce, NOW)
        .unwrap();
    assert_eq!(opened.body::<Pong>().unwrap(), Pong { n: 1 });
}

#[test]
fn oversize_bodies_are_refused_at_both_ends() {
    let w = world();
    let big = Ping {
        text: "x".repeat(MAX_BODY_LEN + 1),
        n: 0,
    };
    assert!(matches!(
        sign(&w.a, Addressing::request(&w.b_id, SUBJ), &big, NOW),
        Err(EnvelopeError::Oversize { .. })
    ));
    let mut env = signed(&w, NOW);
    env.body = vec![0xc0; MAX_BODY_LEN + 1];
    let raw = env.encode().unwrap();
    assert!(matches!(
        w.verifier_b.open_request(&raw, SUBJ, NOW),
        Err(EnvelopeError::Oversize { .. })
    ));
    let huge = vec![0u8; 3 * MAX_BODY_LEN];
    assert!(matches!(
        w.verifier_b.open_request(&huge, SUBJ, NOW),
        Err(EnvelopeError::Oversize { .. })
    ));
}

#[test]
fn malformed_and_deep_input_is_refused() {
    let w = world();
    for raw in [&b""[..], b"\xc1", b"\x81\xa1v", b"{\"json\": true}"] {
        assert!(
            matches!(
                w.verifier_b.open_request(raw, SUBJ, NOW),
                Err(EnvelopeError::Malformed(_))
            ),
            "{raw:?}"
        );
    }
    // A map whose one (unknown, ignored) field nests 200 arrays deep.
    let mut deep = vec![0x81u8, 0xa1, b'x'];
    deep.extend(std::iter::repeat_n(0x91u8, 200));
    deep.push(0xc0);
    assert!(matches!(
        w.verifier_b.open_request(&deep, SUBJ, NOW),
        Err(EnvelopeError::TooDeep)
    ));
    // A validly signed envelope whose body nests too deeply.
    let mut env = signed(&w, NOW);
    let mut body = vec![0x81, 0xa4, b'x', b't', b'r', b'a'];
    body.extend(std::iter::repeat_n(0x91u8, 100));
    body.push(0xc0);
    env.body = body;
    env.sig = w.a.signing_key().sign(&env.signed_bytes()).to_bytes();
    let opened = w
        .verifier_b
        .open_request(&env.encode().unwrap(), SUBJ, NOW)
        .unwrap();
    assert!(matches!(opened.body::<Ping>(), Err(EnvelopeError::TooDeep)));
}

#[test]
fn unsupported_version_is_refused() {
    let w = world();
    let mut env = signed(&w, NOW);
    env.v = PROTOCOL_VERSION + 1;
    env.sig = w.a.signing_key().sign(&env.signed_bytes()).to_bytes();
    assert!(matches!(
        w.verifier_b.open_request(&env.encode().unwrap(), SUBJ, NOW),
        Err(EnvelopeError::UnsupportedVersion(v)) if v == PROTOCOL_VERSION + 1
    ));
}

#[test]
fn forged_messages_do_not_poison_the_replay_cache() {
    let w = world();
    let good = signed(&w, NOW);
    let mut forged = good.clone();
    forged.sig[0] ^= 1;
    assert!(matches!(
        w.verifier_b
            .open_request(&forged.encode().unwrap(), SUBJ, NOW),
        Err(EnvelopeError::BadSignature)
    ));
    assert!(w
        .verifier_b
        .open_request(&good.encode().unwrap(), SUBJ, NOW)
        .is_ok());
}

/// The error a verifier must give for an envelope whose encoding had one byte flipped,
/// worked out independently of the verifier's own code path.
fn expected_code_after_flip(w: &World, original: &SignedEnvelope, raw: &[u8]) -> &'static str {
    let Ok(env) = SignedEnvelope::decode(raw) else {
        return "malformed_or_too_deep";
    };
    if env.v != original.v {
        return "unsupported_version";
    }
    if env.from != original.from {
        return if env.from == "a" {
            "bad_signature"
        } else {
            "unknown_sender"
        };
    }
    let _ = w;
    // Any other change alters the signed bytes or the signature itself.
    "bad_signature"
}

#[test]
fn flipping_any_byte_fails_with_the_right_error() {
    let w = world();
    let original = signed(&w, NOW);
    let raw = original.encode().unwrap();
    for i in 0..raw.len() {
        for bit in [0x01u8, 0x80] {
            let mut t = raw.clone();
            t[i] ^= bit;
            let got = w.verifier_b.open_request(&t, SUBJ, NOW);
            let want = expected_code_after_flip(&w, &original, &t);
            match got {
                Ok(_) => panic!("byte {i} bit {bit:#x} flipped and still verified"),
                Err(e) => {
                    let code = e.code();
                    let ok = if want == "malformed_or_too_deep" {
                        code == "malformed" || code == "too_deep"
                    } else {
                        code == want
                    };
                    assert!(ok, "byte {i} bit {bit:#x}: got {code} ({e}), want {want}");
                }
            }
        }
    }
}

#[test]
fn records_verify_without_freshness_or_replay() {
    let w = world();
    let subj = "$KV.nubis-directory.site.a";
    let raw = sign(&w.a, Addressing::broadcast(subj), &ping(), 1)
        .unwrap()
        .encode()
        .unwrap();
    for _ in 0..2 {
        assert_eq!(
            w.verifier_b
                .open_record(&raw, subj)
                .unwrap()
                .body::<Ping>()
                .unwrap(),
            ping()
        );
    }
    assert!(matches!(
        w.verifier_b.open_record(&raw, "$KV.nubis-directory.site.c"),
        Err(EnvelopeError::WrongSubject { .. })
    ));
    let to_b = signed(&w, 1).encode().unwrap();
    assert!(matches!(
        w.verifier_b.open_record(&to_b, SUBJ),
        Err(EnvelopeError::WrongRecipient(_))
    ));
}

#[test]
fn records_verify_against_an_explicit_key_and_only_for_its_sender() {
    let w = world();
    let c = SiteIdentity::generate(site("c"));
    let subj = "$KV.nubis-directory.consumer.vm-1.c";
    let raw = sign(&c, Addressing::broadcast(subj), &ping(), 1)
        .unwrap()
        .encode()
        .unwrap();
    assert!(matches!(
        w.verifier_b.open_record(&raw, subj),
        Err(EnvelopeError::UnknownSender(_))
    ));
    let key = c.public().signing;
    for _ in 0..2 {
        let opened = w
            .verifier_b
            .open_record_with_key(&raw, subj, &site("c"), &key)
            .unwrap();
        assert_eq!(opened.from, site("c"));
    }
    // c's key given for another sender, or another key for c: refused.
    assert!(matches!(
        w.verifier_b
            .open_record_with_key(&raw, subj, &site("d"), &key),
        Err(EnvelopeError::UnknownSender(_))
    ));
    let other = SiteIdentity::generate(site("c")).public().signing;
    assert!(matches!(
        w.verifier_b
            .open_record_with_key(&raw, subj, &site("c"), &other),
        Err(EnvelopeError::BadSignature)
    ));
}

#[test]
fn events_verify_against_an_explicit_key() {
    let w = world();
    let c = SiteIdentity::generate(site("c"));
    let subj = "nubis.mon.c.vm-1.infra.cpu";
    let raw = sign(&c, Addressing::broadcast(subj), &ping(), NOW)
        .unwrap()
        .encode()
        .unwrap();
    // Not pinned: refused by the ordinary check, accepted with c's key given explicitly.
    assert!(matches!(
        w.verifier_b.open_event(&raw, subj, NOW),
        Err(EnvelopeError::UnknownSender(_))
    ));
    assert!(matches!(
        w.verifier_b
            .open_event_with_key(&raw, subj, NOW, &site("c"), &w.a.public().signing),
        Err(EnvelopeError::BadSignature)
    ));
    assert!(matches!(
        w.verifier_b
            .open_event_with_key(&raw, subj, NOW, &site("d"), &c.public().signing),
        Err(EnvelopeError::UnknownSender(s)) if s == "c"
    ));
    let opened = w
        .verifier_b
        .open_event_with_key(&raw, subj, NOW, &site("c"), &c.public().signing)
        .unwrap();
    assert_eq!(opened.from, site("c"));
    // The freshness window and the replay cache still apply.
    assert!(matches!(
        w.verifier_b
            .open_event_with_key(&raw, subj, NOW, &site("c"), &c.public().signing),
        Err(EnvelopeError::Replayed)
    ));
    assert!(matches!(
        w.verifier_b.open_event_with_key(
            &raw,
            subj,
            NOW + DEFAULT_FRESHNESS_MS + 1,
            &site("c"),
            &c.public().signing
        ),
        Err(EnvelopeError::Stale { .. })
    ));
}

proptest! {
    #[test]
    fn any_body_and_subject_round_trips(text in ".{0,200}", n in any::<u64>(), subj in "[a-z.]{1,60}") {
        let w = world();
        let body = Ping { text, n };
        let raw = sign(&w.a, Addressing::request(&w.b_id, &subj), &body, NOW).unwrap().encode().unwrap();
        let opened = w.verifier_b.open_request(&raw, &subj, NOW).unwrap();
        prop_assert_eq!(opened.body::<Ping>().unwrap(), body);
    }

    #[test]
    fn random_bytes_never_verify(raw in proptest::collection::vec(any::<u8>(), 0..512)) {
        let w = world();
        prop_assert!(w.verifier_b.open_request(&raw, SUBJ, NOW).is_err());
    }
}
