//! Tests of the descriptor, its validation and the monitoring specifier's parts, and a sample
//! descriptor for the tests of other modules.

use super::*;
use crate::codec;

pub(crate) fn sample_descriptor() -> VmDescriptor {
    VmDescriptor {
        id: VmId::new("vm-1").unwrap(),
        name: "web front end".into(),
        version: 3,
        primary_site: SiteId::new("site-a").unwrap(),
        primary_keys: PrimaryKeys {
            signing: [7; 32],
            sealing: [9; 32],
        },
        hardware: VirtualHardware {
            vcpus: 2,
            memory_mib: 2048,
            disks: vec![
                DiskSpec {
                    name: "vda".into(),
                    capacity_bytes: 10 << 30,
                    format: DiskFormat::Qcow2,
                    image: Some("debian-12.qcow2".into()),
                },
                DiskSpec {
                    name: "vdb".into(),
                    capacity_bytes: 1 << 30,
                    format: DiskFormat::Raw,
                    image: None,
                },
            ],
            networks: vec![NetworkSpec {
                name: "service-net".into(),
                model: "virtio".into(),
            }],
            boot: None,
        },
        monitoring: vec![
            MonitoringSpecifier {
                data_point: DataPoint::new("cpu.utilisation").unwrap(),
                monitoring_interval_ms: 1000,
                delivery_interval_ms: 10_000,
                format: DeliveryFormat::Processed {
                    aggregate: Aggregate::Median,
                },
                predicate: None,
                sealed: false,
            },
            MonitoringSpecifier {
                data_point: DataPoint::new("kpi.web.current_users").unwrap(),
                monitoring_interval_ms: 0,
                delivery_interval_ms: 0,
                format: DeliveryFormat::Raw,
                predicate: Some(Predicate {
                    op: PredicateOp::Gt,
                    threshold: 1000.0,
                }),
                sealed: true,
            },
        ],
        properties: BTreeMap::from([("service".into(), "shop".into())]),
    }
}

#[test]
fn descriptor_round_trips_and_validates() {
    let d = sample_descriptor();
    d.validate().unwrap();
    let bytes = codec::to_vec(&d).unwrap();
    assert_eq!(codec::from_slice::<VmDescriptor>(&bytes).unwrap(), d);
}

#[test]
fn keys_are_msgpack_bin() {
    let bytes = codec::to_vec(&sample_descriptor().primary_keys).unwrap();
    // map of 2, "signing", bin8 of 32 bytes.
    assert_eq!(&bytes[..10], b"\x82\xa7signing\xc4");
    assert_eq!(bytes[10], 32);
}

#[test]
fn delivery_format_is_tagged_by_kind() {
    let v = serde_json::to_value(DeliveryFormat::Processed {
        aggregate: Aggregate::Median,
    })
    .unwrap();
    assert_eq!(
        v,
        serde_json::json!({"kind": "processed", "aggregate": "median"})
    );
    let raw = codec::to_vec(&DeliveryFormat::Raw).unwrap();
    assert_eq!(raw, b"\x81\xa4kind\xa3raw");
}

#[test]
fn validation_catches_each_problem() {
    let mut d = sample_descriptor();
    d.hardware.vcpus = 0;
    assert_eq!(d.validate(), Err(DescriptorError::NoVcpus));

    let mut d = sample_descriptor();
    d.hardware.memory_mib = 0;
    assert_eq!(d.validate(), Err(DescriptorError::NoMemory));

    let mut d = sample_descriptor();
    d.hardware.disks[1].name = "vda".into();
    assert!(matches!(
        d.validate(),
        Err(DescriptorError::Duplicate { field: "disk", .. })
    ));

    let mut d = sample_descriptor();
    d.hardware.disks[0].image = Some("/var/lib/images/x.qcow2".into());
    assert!(matches!(
        d.validate(),
        Err(DescriptorError::Invalid {
            field: "disk image",
            ..
        })
    ));

    let mut d = sample_descriptor();
    d.hardware.disks[0].capacity_bytes = 0;
    assert!(matches!(d.validate(), Err(DescriptorError::EmptyDisk(_))));

    let mut d = sample_descriptor();
    d.monitoring[1].predicate = Some(Predicate {
        op: PredicateOp::Lt,
        threshold: f64::NAN,
    });
    assert!(matches!(
        d.validate(),
        Err(DescriptorError::NonFiniteThreshold(_))
    ));

    let mut d = sample_descriptor();
    d.primary_keys.sealing = [0; 32];
    assert_eq!(d.validate(), Err(DescriptorError::MissingKey("sealing")));

    let mut d = sample_descriptor();
    d.hardware.boot = Some(KernelBoot {
        kernel: "../vmlinuz".into(),
        initrd: None,
        cmdline: String::new(),
    });
    assert!(matches!(d.validate(), Err(DescriptorError::Invalid { .. })));
}

#[test]
fn data_points_are_subject_safe() {
    for ok in [
        "cpu.utilisation",
        "disk.vda.read_bytes_rate",
        "kpi.web.current_users",
    ] {
        assert!(DataPoint::new(ok).is_ok(), "{ok}");
    }
    for bad in ["", "cpu..x", ".cpu", "cpu.", "cpu.*", "cpu.>", "a b", "ü"] {
        assert!(DataPoint::new(bad).is_err(), "{bad:?}");
    }
    assert!(DataPoint::new("x".repeat(MAX_DATA_POINT_LEN + 1)).is_err());
    assert_eq!(
        DataPoint::new("kpi.web.users").unwrap().class(),
        DataPointClass::Kpi
    );
    assert_eq!(
        DataPoint::new("kpis.x").unwrap().class(),
        DataPointClass::Infra
    );
    // A bad name inside a message is refused while decoding.
    let bytes = codec::to_vec("cpu.*").unwrap();
    assert!(codec::from_slice::<DataPoint>(&bytes).is_err());
}

#[test]
fn predicate_semantics() {
    let p = |op, threshold| Predicate { op, threshold };
    assert!(p(PredicateOp::Lt, 1.0).holds(0.5));
    assert!(!p(PredicateOp::Lt, 1.0).holds(1.0));
    assert!(p(PredicateOp::Le, 1.0).holds(1.0));
    assert!(p(PredicateOp::Gt, 1.0).holds(1.5));
    assert!(!p(PredicateOp::Gt, 1.0).holds(1.0));
    assert!(p(PredicateOp::Ge, 1.0).holds(1.0));
    assert!(p(PredicateOp::Eq, 2.0).holds(2.0));
    assert!(!p(PredicateOp::Eq, 2.0).holds(2.5));
    assert!(p(PredicateOp::Ne, 2.0).holds(2.5));
    for op in [PredicateOp::Lt, PredicateOp::Ne, PredicateOp::Ge] {
        assert!(!p(op, 1.0).holds(f64::NAN));
    }
}

#[test]
fn aggregates() {
    let v = [3.0, 1.0, 4.0, 1.0, 5.0];
    assert_eq!(Aggregate::Min.apply(&v), Some(1.0));
    assert_eq!(Aggregate::Max.apply(&v), Some(5.0));
    assert_eq!(Aggregate::Mean.apply(&v), Some(2.8));
    assert_eq!(Aggregate::Median.apply(&v), Some(3.0));
    assert_eq!(Aggregate::Median.apply(&[1.0, 2.0, 3.0, 10.0]), Some(2.5));
    assert_eq!(Aggregate::Mean.apply(&[]), None);
}

#[test]
fn delivery_schemes() {
    let mut s = sample_descriptor().monitoring[0].clone();
    assert_eq!(
        s.delivery_scheme(),
        DeliveryScheme::AtIntervals { every_ms: 10_000 }
    );
    s.delivery_interval_ms = 0;
    assert_eq!(s.delivery_scheme(), DeliveryScheme::AsSoonAsAvailable);
    let p = Predicate {
        op: PredicateOp::Lt,
        threshold: 0.1,
    };
    s.predicate = Some(p);
    assert_eq!(s.delivery_scheme(), DeliveryScheme::WhenPredicateHolds(p));
}

#[test]
fn unknown_disk_format_is_kept() {
    let bytes = codec::to_vec("qed").unwrap();
    let f: DiskFormat = codec::from_slice(&bytes).unwrap();
    assert_eq!(f, DiskFormat::Other("qed".into()));
    assert_eq!(codec::to_vec(&f).unwrap(), bytes);
    assert_eq!(DiskFormat::from_wire("qcow2"), DiskFormat::Qcow2);
}
