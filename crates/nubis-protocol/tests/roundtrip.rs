//! Every message body round-trips through the codec, tolerates unknown fields, and random
//! messages (proptest) decode to exactly what was encoded.

// Helpers and strategies outside `#[test]` functions panic on purpose: this is test code.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fmt::Debug;

use nubis_protocol::codec;
use nubis_protocol::descriptor::{
    Aggregate, DataPoint, DeliveryFormat, DiskFormat, DiskSpec, KernelBoot, MonitoringSpecifier,
    NetworkSpec, Predicate, PredicateOp, PrimaryKeys, VirtualHardware, VmDescriptor,
};
use nubis_protocol::message::*;
use nubis_protocol::subject::Subject;
use nubis_protocol::{MigrationId, RequestId, SiteId, VmId};
use proptest::prelude::*;
use proptest::strategy::Union;

fn round_trip<T: Body + PartialEq + Debug>(x: &T) -> T {
    let bytes = codec::to_vec(x).unwrap();
    codec::from_slice(&bytes).unwrap()
}

/// Encodes `x`, adds an unknown top-level field, and decodes it again.
fn with_unknown_field<T: Body + PartialEq + Debug>(x: &T) -> T {
    let bytes = codec::to_vec(x).unwrap();
    let mut v = rmpv::decode::read_value(&mut &bytes[..]).unwrap();
    let rmpv::Value::Map(entries) = &mut v else {
        panic!("{} is not encoded as a map", T::TYPE)
    };
    entries.insert(
        0,
        (
            rmpv::Value::from("field_from_the_future"),
            rmpv::Value::Array(vec![rmpv::Value::from(1), rmpv::Value::from("x")]),
        ),
    );
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &v).unwrap();
    codec::from_slice(&out).unwrap()
}

fn check<T: Body + PartialEq + Debug>(x: T) {
    assert_eq!(round_trip(&x), x, "{}", T::TYPE);
    assert_eq!(with_unknown_field(&x), x, "{}", T::TYPE);
}

// ---- strategies ----

fn site() -> impl Strategy<Value = SiteId> {
    "[a-z0-9][a-z0-9_-]{0,15}".prop_map(|s| SiteId::new(s).unwrap())
}

fn vm() -> impl Strategy<Value = VmId> {
    "[a-z0-9][a-z0-9_-]{0,20}".prop_map(|s| VmId::new(s).unwrap())
}

fn id16() -> impl Strategy<Value = [u8; 16]> {
    any::<[u8; 16]>()
}

fn proxy_uri() -> impl Strategy<Value = ProxyUri> {
    (site(), "[a-z0-9][a-z0-9-]{0,8}").prop_map(|(s, p)| ProxyUri::new(s, ProxyId::new(p).unwrap()))
}

fn endpoint() -> impl Strategy<Value = Endpoint> {
    (proxy_uri(), id16()).prop_map(|(proxy, t)| Endpoint {
        proxy,
        token: TransferToken(t),
    })
}

fn data_point() -> impl Strategy<Value = DataPoint> {
    "(kpi\\.)?[a-z][a-z0-9_]{0,7}(\\.[A-Za-z0-9_-]{1,8}){0,3}"
        .prop_map(|s| DataPoint::new(s).unwrap())
}

fn finite() -> impl Strategy<Value = f64> {
    prop::num::f64::NORMAL | prop::num::f64::ZERO | prop::num::f64::SUBNORMAL
}

fn text() -> impl Strategy<Value = String> {
    "\\PC{0,24}"
}

fn aggregate() -> impl Strategy<Value = Aggregate> {
    prop_oneof![
        Just(Aggregate::Min),
        Just(Aggregate::Max),
        Just(Aggregate::Mean),
        Just(Aggregate::Median)
    ]
}

fn specifier() -> impl Strategy<Value = MonitoringSpecifier> {
    let op = prop_oneof![
        Just(PredicateOp::Lt),
        Just(PredicateOp::Le),
        Just(PredicateOp::Gt),
        Just(PredicateOp::Ge),
        Just(PredicateOp::Eq),
        Just(PredicateOp::Ne)
    ];
    let format = prop_oneof![
        Just(DeliveryFormat::Raw),
        aggregate().prop_map(|aggregate| DeliveryFormat::Processed { aggregate })
    ];
    (
        data_point(),
        any::<u64>(),
        any::<u64>(),
        format,
        proptest::option::of(
            (op, finite()).prop_map(|(op, threshold)| Predicate { op, threshold }),
        ),
        any::<bool>(),
    )
        .prop_map(
            |(data_point, mi, di, format, predicate, sealed)| MonitoringSpecifier {
                data_point,
                monitoring_interval_ms: mi,
                delivery_interval_ms: di,
                format,
                predicate,
                sealed,
            },
        )
}

fn disk_format() -> impl Strategy<Value = DiskFormat> {
    let known: Vec<_> = DiskFormat::KNOWN.iter().cloned().map(Just).collect();
    prop_oneof![
        Union::new(known),
        "x[a-z0-9]{1,6}".prop_map(DiskFormat::Other)
    ]
}

fn descriptor() -> impl Strategy<Value = VmDescriptor> {
    let disk = (
        "[a-z][a-z0-9]{0,5}",
        1u64..,
        disk_format(),
        proptest::option::of("[A-Za-z0-9][A-Za-z0-9._-]{0,20}"),
    )
        .prop_map(|(name, capacity_bytes, format, image)| DiskSpec {
            name,
            capacity_bytes,
            format,
            image,
        });
    let net = ("[a-z][a-z0-9-]{0,8}", "virtio|e1000").prop_map(|(name, model)| NetworkSpec {
        name,
        model: model.to_string(),
    });
    let boot = proptest::option::of(
        (
            "[a-z][a-z0-9.-]{0,10}",
            proptest::option::of("[a-z][a-z0-9.]{0,10}"),
            text(),
        )
            .prop_map(|(kernel, initrd, cmdline)| KernelBoot {
                kernel,
                initrd,
                cmdline,
            }),
    );
    let hardware = (
        1u32..256,
        1u64..1 << 24,
        prop::collection::vec(disk, 0..4),
        prop::collection::vec(net, 0..3),
        boot,
    )
        .prop_map(
            |(vcpus, memory_mib, disks, networks, boot)| VirtualHardware {
                vcpus,
                memory_mib,
                disks,
                networks,
                boot,
            },
        );
    (
        vm(),
        text(),
        any::<u64>(),
        site(),
        any::<[u8; 32]>(),
        any::<[u8; 32]>(),
        hardware,
        prop::collection::vec(specifier(), 0..5),
        prop::collection::btree_map("[a-z]{1,8}", text(), 0..4),
    )
        .prop_map(
            |(
                id,
                name,
                version,
                primary_site,
                signing,
                sealing,
                hardware,
                monitoring,
                properties,
            )| {
                VmDescriptor {
                    id,
                    name,
                    version,
                    primary_site,
                    primary_keys: PrimaryKeys { signing, sealing },
                    hardware,
                    monitoring,
                    properties,
                }
            },
        )
}

fn offer() -> impl Strategy<Value = Offer> {
    let capacity = proptest::option::of(prop_oneof![
        Just(CapacityHint::Low),
        Just(CapacityHint::Medium),
        Just(CapacityHint::High)
    ]);
    (
        endpoint(),
        any::<u64>(),
        capacity,
        any::<u8>(),
        any::<u64>(),
    )
        .prop_map(|(e, price_milli, capacity, depth, expires_ms)| Offer {
            proxy: e.proxy,
            token: e.token,
            terms: OfferTerms {
                price_milli,
                capacity,
                depth,
            },
            expires_ms,
        })
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        finite().prop_map(Value::Float),
        any::<i64>().prop_map(Value::Int),
        text().prop_map(Value::Text)
    ]
}

fn clear_payload() -> impl Strategy<Value = ClearPayload> {
    let sample =
        (data_point(), any::<u64>(), value()).prop_map(|(data_point, ts_ms, value)| Sample {
            data_point,
            ts_ms,
            value,
        });
    let processed = (
        data_point(),
        aggregate(),
        any::<u64>(),
        any::<u64>(),
        finite(),
        any::<u32>(),
    )
        .prop_map(
            |(data_point, aggregate, s, e, value, count)| ProcessedValue {
                data_point,
                aggregate,
                window_start_ms: s,
                window_end_ms: e,
                value,
                count,
            },
        );
    let kpi = (
        "[a-z][a-z0-9_]{0,8}",
        any::<u64>(),
        prop::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(table, ts_ms, blob)| EncryptedKpi { table, ts_ms, blob });
    (
        prop::collection::vec(sample, 0..20),
        prop::collection::vec(processed, 0..5),
        prop::collection::vec(kpi, 0..3),
    )
        .prop_map(|(samples, processed, encrypted_kpi)| ClearPayload {
            samples,
            processed,
            encrypted_kpi,
        })
}

fn batch() -> impl Strategy<Value = MonitoringBatch> {
    let payload = prop_oneof![
        clear_payload().prop_map(BatchPayload::Clear),
        prop::collection::vec(any::<u8>(), 48..256)
            .prop_map(|ciphertext| BatchPayload::Sealed { ciphertext })
    ];
    (
        vm(),
        site(),
        "[a-z0-9][a-z0-9-]{0,10}",
        any::<u64>(),
        any::<u64>(),
        payload,
    )
        .prop_map(
            |(vm, primary_site, producer, epoch_ms, seq, payload)| MonitoringBatch {
                vm,
                primary_site,
                producer: ProducerId::new(producer).unwrap(),
                epoch_ms,
                seq,
                payload,
            },
        )
}

fn transition() -> impl Strategy<Value = StateTransition> {
    prop_oneof![
        Just(StateTransition::Start),
        Just(StateTransition::Shutdown),
        Just(StateTransition::PowerOff),
        Just(StateTransition::Pause),
        Just(StateTransition::Resume),
        Just(StateTransition::Suspend),
        Just(StateTransition::Reboot),
        Just(StateTransition::Reset)
    ]
}

fn control() -> impl Strategy<Value = ControlRequest> {
    let change = prop_oneof![
        Just(ControlChange::Query),
        transition().prop_map(|transition| ControlChange::SetState { transition }),
        descriptor().prop_map(|descriptor| ControlChange::UpdateDescriptor {
            descriptor: Box::new(descriptor)
        }),
        prop::collection::vec(specifier(), 0..4)
            .prop_map(|monitoring| ControlChange::SetMonitoring { monitoring }),
    ];
    (vm(), change).prop_map(|(vm, change)| ControlRequest { vm, change })
}

fn transfer_status() -> impl Strategy<Value = TransferStatus> {
    let digest = ("[a-z][a-z0-9-]{0,10}", any::<[u8; 32]>(), any::<u64>())
        .prop_map(|(name, sha256, len)| FileDigest { name, sha256, len });
    prop_oneof![
        Just(TransferStatus::Pending),
        (any::<u64>(), any::<u64>()).prop_map(|(bytes_done, bytes_total)| {
            TransferStatus::Transferring {
                bytes_done,
                bytes_total,
            }
        }),
        prop::collection::vec(digest, 0..4)
            .prop_map(|digests| TransferStatus::Succeeded { digests }),
        text().prop_map(|reason| TransferStatus::Failed { reason }),
    ]
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    let known: Vec<_> = ErrorCode::KNOWN.iter().cloned().map(Just).collect();
    prop_oneof![
        Union::new(known),
        "zz_[a-z_]{1,10}".prop_map(ErrorCode::Other)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn descriptors_round_trip(d in descriptor()) {
        let bytes = codec::to_vec(&d).unwrap();
        prop_assert_eq!(codec::from_slice::<VmDescriptor>(&bytes).unwrap(), d);
    }

    #[test]
    fn migration_requests_round_trip(
        r in id16(), m in id16(), d in descriptor(), depth in any::<u8>(), max_depth in any::<u8>()
    ) {
        check(MigrationRequest {
            request_id: RequestId(r),
            migration_id: MigrationId(m),
            vm: d.id.clone(),
            descriptor: d,
            depth,
            max_depth,
        });
    }

    #[test]
    fn offers_round_trip(r in id16(), offers in prop::collection::vec(offer(), 0..6)) {
        check(Offers { request_id: RequestId(r), offers });
    }

    #[test]
    fn batches_round_trip(b in batch()) {
        check(b);
    }

    #[test]
    fn sealed_plaintext_round_trips(p in clear_payload()) {
        let bytes = codec::to_vec(&p).unwrap();
        prop_assert_eq!(codec::from_slice::<ClearPayload>(&bytes).unwrap(), p);
    }

    #[test]
    fn control_round_trips(c in control(), state in prop_oneof![
        Just(DmtfState::Enabled), Just(DmtfState::Paused), Just(DmtfState::Migrating)
    ], version in any::<u64>()) {
        check(ControlReply { vm: c.vm.clone(), state, descriptor_version: version });
        check(c);
    }

    #[test]
    fn transfer_messages_round_trip(
        m in id16(), v in vm(), s in endpoint(), d in endpoint(), cap in proptest::option::of(any::<u64>()),
        status in transfer_status(), total in any::<u64>()
    ) {
        let migration_id = MigrationId(m);
        check(PrepareMigration {
            migration_id,
            vm: v.clone(),
            mode: PrepareMode::SaveState,
            max_bytes_per_sec: Some(2 << 20),
        });
        check(Prepared { migration_id, source: s.clone(), total_bytes: total });
        check(InitiateTransfer {
            migration_id, vm: v.clone(), source: s.clone(), destination: d.clone(), max_bytes_per_sec: cap,
        });
        check(TransferVerification { migration_id, vm: v.clone(), source: s.clone() });
        check(TransferStatusReply { migration_id, status });
        for side in [HandOverSide::Destination, HandOverSide::Source] {
            check(CommitMigration { migration_id, vm: v.clone(), side, endpoint: d.clone() });
            check(Committed { migration_id, side });
            check(AbortMigration {
                migration_id, vm: v.clone(), side, endpoint: s.clone(), reason: "verification failed".into(),
            });
            check(Aborted { migration_id, side });
        }
    }

    #[test]
    fn errors_round_trip(code in error_code(), message in text(), retryable in any::<bool>()) {
        check(ErrorReply { code, message, retryable });
    }
}

#[test]
fn eviction_and_directory_round_trip() {
    let a = SiteId::new("a").unwrap();
    let vm = VmId::new("vm-1").unwrap();
    let uri: ProxyUri = "nats://a/proxy/p1".parse().unwrap();
    let notice_id = NoticeId::random();
    check(EvictionNotice {
        notice_id,
        vm: vm.clone(),
        reason: "host maintenance".into(),
        deadline_ms: 1_700_000_000_000,
    });
    check(EvictionAccepted {
        notice_id,
        vm: vm.clone(),
    });
    check(SiteEntry {
        site: a.clone(),
        signing_key: [1; 32],
        sealing_key: [2; 32],
        proxies: vec![uri.clone()],
        subjects: vec!["nubis.fed.a.migration.request".into()],
        heartbeat_ms: 5,
        started_ms: 1,
    });
    check(ProxyEntry {
        proxy: uri,
        heartbeat_ms: 5,
        started_ms: 1,
    });
    let dp = DataPoint::new("cpu.utilisation").unwrap();
    check(ProducerRegistration {
        vm: vm.clone(),
        primary_site: a.clone(),
        producer: ProducerId::new("prod-1").unwrap(),
        data_points: vec![dp.clone()],
        subject: "nubis.mon.a.vm-1.>".into(),
        heartbeat_ms: 9,
    });
    check(ConsumerRegistration {
        consumer_site: a,
        vm,
        data_points: vec![dp],
        downstream: Some(SiteId::new("b").unwrap()),
        heartbeat_ms: 9,
    });
}

#[test]
fn every_body_type_is_listed_once() {
    let mut seen = BTreeMap::new();
    for t in BODY_TYPES {
        assert!(seen.insert(*t, ()).is_none(), "{t} listed twice");
    }
    // One body type of each family must be listed, so a receiver can tell them apart.
    for t in [
        "MigrationRequest",
        "ErrorReply",
        "ControlRequest",
        "MonitoringBatch",
        "SiteEntry",
        "MintToken",
        "ReserveVm",
    ] {
        assert!(seen.contains_key(t), "{t} missing from BODY_TYPES");
    }
}

#[test]
fn tagged_enums_decode_whatever_the_key_order() {
    // A client in another language may write the tag after the other fields.
    let mut out = Vec::new();
    let v = rmpv::Value::Map(vec![
        ("bytes_total".into(), 10.into()),
        ("bytes_done".into(), 3.into()),
        ("state".into(), "transferring".into()),
    ]);
    rmpv::encode::write_value(&mut out, &v).unwrap();
    assert_eq!(
        codec::from_slice::<TransferStatus>(&out).unwrap(),
        TransferStatus::Transferring {
            bytes_done: 3,
            bytes_total: 10
        }
    );
}

#[test]
fn optional_fields_may_be_omitted() {
    // A minimal descriptor from another language: no monitoring, properties, networks or boot.
    let hw = rmpv::Value::Map(vec![
        ("vcpus".into(), 1.into()),
        ("memory_mib".into(), 512.into()),
    ]);
    let keys = rmpv::Value::Map(vec![
        ("signing".into(), rmpv::Value::Binary(vec![1; 32])),
        ("sealing".into(), rmpv::Value::Binary(vec![2; 32])),
    ]);
    let d = rmpv::Value::Map(vec![
        ("id".into(), "vm-1".into()),
        ("name".into(), "x".into()),
        ("version".into(), 1.into()),
        ("primary_site".into(), "a".into()),
        ("primary_keys".into(), keys),
        ("hardware".into(), hw),
    ]);
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &d).unwrap();
    let d: VmDescriptor = codec::from_slice(&out).unwrap();
    d.validate().unwrap();
    assert!(d.monitoring.is_empty() && d.hardware.disks.is_empty());
}

#[test]
fn keys_must_be_32_bytes() {
    let keys = rmpv::Value::Map(vec![
        ("signing".into(), rmpv::Value::Binary(vec![1; 31])),
        ("sealing".into(), rmpv::Value::Binary(vec![2; 32])),
    ]);
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &keys).unwrap();
    assert!(matches!(
        codec::from_slice::<PrimaryKeys>(&out),
        Err(codec::CodecError::Malformed(_))
    ));
}

/// The worked example of `subjects.md` section 15 decodes, has exactly the documented signed
/// bytes, verifies strictly against the documented key, and carries the documented body.
#[test]
fn worked_example_in_subjects_md_verifies() {
    use base64::Engine as _;
    use nubis_protocol::envelope::SignedEnvelope;

    let doc = include_str!("../../../subjects.md");
    let section = &doc[doc.find("## 15. Worked example").unwrap()..];
    let fenced_after = |marker: &str| -> Vec<u8> {
        let at = section.find(marker).unwrap();
        let start = at + section[at..].find("```\n").unwrap() + 4;
        let end = start + section[start..].find("```").unwrap();
        let text: String = section[start..end]
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        hex::decode(text).unwrap()
    };
    let raw = fenced_after("The envelope as published");
    let env = SignedEnvelope::decode(&raw).unwrap();
    assert_eq!(env.v, 1);
    assert_eq!(env.body_type, EvictionNotice::TYPE);
    assert_eq!(
        env.subject,
        Subject::migration_evict(&SiteId::new("site-b").unwrap()).as_str()
    );

    let key_text = "A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=";
    assert!(section.contains(&format!("ed25519:{key_text}")));
    let key: [u8; 32] = base64::engine::general_purpose::STANDARD
        .decode(key_text)
        .unwrap()
        .try_into()
        .unwrap();
    let key = ed25519_dalek::VerifyingKey::from_bytes(&key).unwrap();
    let sig = ed25519_dalek::Signature::from_bytes(&env.sig);
    key.verify_strict(&env.signed_bytes(), &sig).unwrap();
    assert!(section.contains(&hex::encode(env.sig)));

    let body: EvictionNotice = codec::from_slice(&env.body).unwrap();
    assert_eq!(
        body,
        EvictionNotice {
            notice_id: "0123456789abcdef0123456789abcdef".parse().unwrap(),
            vm: VmId::new("vm-1").unwrap(),
            reason: "host maintenance".into(),
            deadline_ms: 1_767_225_600_000,
        }
    );
    // The documented body bytes are exactly what the codec writes.
    assert_eq!(codec::to_vec(&body).unwrap(), env.body);
}

proptest! {
    #[test]
    fn monitoring_subjects_parse_back(p in site(), v in vm(), dp in data_point()) {
        use nubis_protocol::subject::ParsedSubject;
        let s = Subject::monitoring(&p, &v, &dp);
        prop_assert_eq!(
            Subject::parse(s.as_str()).unwrap(),
            ParsedSubject::Monitoring { primary: p, vm: v, data_point: dp }
        );
    }

    #[test]
    fn parse_never_panics(s in "nubis\\.[a-z.*>-]{0,40}") {
        let _ = Subject::parse(&s);
    }
}
