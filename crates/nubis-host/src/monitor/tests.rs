use nubis_kpifs::{KpiRow, KpiRowKind, KpiValue};
use nubis_protocol::codec::{self, MAX_BODY_LEN};
use nubis_protocol::descriptor::{Aggregate, DataPoint, DeliveryFormat, MonitoringSpecifier};
use nubis_protocol::message::{
    BatchPayload, ClearPayload, ErrorCode, ErrorReply, ProcessedValue, ProducedBatch, Sample, Value,
};

use super::kpi::feed_row;
use super::*;
use crate::producer::Delivery;

fn descriptor(sealing: [u8; 32]) -> VmDescriptor {
    super::tests_support::descriptor(
        sealing,
        MonitoringSpecifier {
            data_point: DataPoint::new("cpu.utilisation").unwrap(),
            monitoring_interval_ms: 0,
            delivery_interval_ms: 0,
            format: DeliveryFormat::Processed {
                aggregate: Aggregate::Max,
            },
            predicate: None,
            sealed: false,
        },
    )
}

fn delivery(sealed: bool) -> Delivery {
    let dp = DataPoint::new("cpu.utilisation").unwrap();
    Delivery {
        data_point: dp.clone(),
        payload: ClearPayload {
            samples: vec![Sample {
                data_point: dp.clone(),
                ts_ms: 5,
                value: Value::Float(0.5),
            }],
            processed: vec![ProcessedValue {
                data_point: dp,
                aggregate: Aggregate::Max,
                window_start_ms: 0,
                window_end_ms: 10,
                value: 0.5,
                count: 1,
            }],
            encrypted_kpi: vec![],
        },
        sealed,
    }
}

#[test]
fn batches_carry_producer_epoch_and_seq() {
    let id = random_producer_id().unwrap();
    assert!(
        id.as_str().starts_with("p-") && id.as_str().len() == 18,
        "{id}"
    );
    assert_ne!(id, random_producer_id().unwrap());
    let d = descriptor([9; 32]);
    let body = encode_batch(&d, &id, 1_000, 7, delivery(false)).unwrap();
    let produced: ProducedBatch = codec::from_slice(&body).unwrap();
    assert_eq!(produced.data_point.as_str(), "cpu.utilisation");
    let b = produced.batch;
    assert_eq!((b.producer, b.epoch_ms, b.seq), (id.clone(), 1_000, 7));
    assert_eq!(b.vm, d.id);
    assert_eq!(b.primary_site, d.primary_site);
    assert_eq!(b.payload, BatchPayload::Clear(delivery(false).payload));
}

#[test]
fn sealed_batches_open_only_with_the_primary_key() {
    let secret = crypto_box_secret();
    let public = secret.public_key();
    let d = descriptor(*public.as_bytes());
    let id = random_producer_id().unwrap();
    let body = encode_batch(&d, &id, 1, 0, delivery(true)).unwrap();
    let produced: ProducedBatch = codec::from_slice(&body).unwrap();
    let BatchPayload::Sealed { ciphertext } = produced.batch.payload else {
        panic!("not sealed");
    };
    let clear = nubis_protocol::seal::open(&secret, &ciphertext).unwrap();
    let payload: ClearPayload = codec::from_slice(&clear).unwrap();
    assert_eq!(payload, delivery(true).payload);
    let other = crypto_box_secret();
    assert!(nubis_protocol::seal::open(&other, &ciphertext).is_err());
}

fn crypto_box_secret() -> crypto_box::SecretKey {
    crypto_box::SecretKey::from(rand::random::<[u8; 32]>())
}

#[test]
fn oversized_batches_are_refused_before_sending() {
    let d = descriptor([9; 32]);
    let id = random_producer_id().unwrap();
    let mut big = delivery(false);
    big.payload
        .encrypted_kpi
        .push(nubis_protocol::message::EncryptedKpi {
            table: "t".into(),
            ts_ms: 0,
            blob: vec![0; MAX_BODY_LEN],
        });
    assert!(matches!(
        encode_batch(&d, &id, 1, 0, big),
        Err(MonitorError::TooLarge(_))
    ));
}

#[test]
fn kpi_rows_become_samples_and_blobs() {
    let mut p = Producer::new(
        &[
            MonitoringSpecifier {
                data_point: DataPoint::new("kpi.web").unwrap(),
                monitoring_interval_ms: 0,
                delivery_interval_ms: 0,
                format: DeliveryFormat::Raw,
                predicate: None,
                sealed: false,
            },
            MonitoringSpecifier {
                data_point: DataPoint::new("kpi.vault").unwrap(),
                monitoring_interval_ms: 0,
                delivery_interval_ms: 0,
                format: DeliveryFormat::Raw,
                predicate: None,
                sealed: true,
            },
        ],
        0,
    );
    feed_row(
        &mut p,
        &KpiRow {
            rowid: 1,
            table: "web".into(),
            kind: KpiRowKind::Unencrypted {
                columns: vec![
                    ("users".into(), KpiValue::Integer(42)),
                    ("load".into(), KpiValue::Real(0.5)),
                    ("note".into(), KpiValue::Text("ok".into())),
                    ("gap".into(), KpiValue::Null),
                ],
            },
            ts_ms: 100,
        },
    );
    feed_row(
        &mut p,
        &KpiRow {
            rowid: 2,
            table: "vault".into(),
            kind: KpiRowKind::Encrypted {
                blob: b"opaque".to_vec(),
            },
            ts_ms: 110,
        },
    );
    let out = p.poll(200);
    assert_eq!(out.len(), 2);
    let got: Vec<(String, u64, Value)> = out[0]
        .payload
        .samples
        .iter()
        .map(|s| (s.data_point.to_string(), s.ts_ms, s.value.clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("kpi.web.users".into(), 100, Value::Int(42)),
            ("kpi.web.load".into(), 100, Value::Float(0.5)),
            ("kpi.web.note".into(), 100, Value::Text("ok".into())),
        ]
    );
    assert!(out[1].sealed);
    assert_eq!(out[1].payload.encrypted_kpi[0].blob, b"opaque");
    assert_eq!(out[1].payload.encrypted_kpi[0].ts_ms, 110);
}

#[test]
fn only_undecodable_or_unheld_batches_are_given_up() {
    for (code, permanent) in [
        (ErrorCode::Malformed, true),
        (ErrorCode::Oversize, true),
        (ErrorCode::Busy, false),
        (ErrorCode::Internal, false),
        (ErrorCode::UnknownVm, true),
        (ErrorCode::Refused, true),
        (ErrorCode::Timeout, false),
    ] {
        let e = SendError::Refused(ErrorReply::new(code.clone(), "x"));
        assert_eq!(e.is_permanent(), permanent, "{code}");
    }
    assert!(!SendError::Timeout.is_permanent());
}
