//! Tests of the subject constructors, the parser and the directory keys.

use super::*;
use crate::message::ProducerId;

fn site(s: &str) -> SiteId {
    SiteId::new(s).unwrap()
}

#[test]
fn federation_subjects_are_exact_and_parse_back() {
    let a = site("site-a");
    let cases = [
        (
            Subject::migration_request(&a),
            "nubis.fed.site-a.migration.request",
        ),
        (
            Subject::migration_prepare(&a),
            "nubis.fed.site-a.migration.prepare",
        ),
        (
            Subject::migration_evict(&a),
            "nubis.fed.site-a.migration.evict",
        ),
        (
            Subject::migration_commit(&a),
            "nubis.fed.site-a.migration.commit",
        ),
        (
            Subject::migration_abort(&a),
            "nubis.fed.site-a.migration.abort",
        ),
        (
            Subject::transfer_initiate(&a),
            "nubis.fed.site-a.transfer.initiate",
        ),
        (
            Subject::transfer_verify(&a),
            "nubis.fed.site-a.transfer.verify",
        ),
        (Subject::vm_control(&a), "nubis.fed.site-a.vm.control"),
    ];
    for (op, (subject, text)) in FederationOp::ALL.into_iter().zip(cases) {
        assert_eq!(subject.as_str(), text);
        assert_eq!(
            Subject::parse(text).unwrap(),
            ParsedSubject::Federation {
                site: a.clone(),
                op
            }
        );
    }
    assert_eq!(Subject::federation_all(&a).as_str(), "nubis.fed.site-a.>");
    assert_eq!(
        Subject::parse("nubis.fed.site-a.migration.request")
            .unwrap()
            .expected_body_type(),
        Some("MigrationRequest")
    );
}

#[test]
fn proxy_subjects() {
    let uri: ProxyUri = "nats://b/proxy/p1".parse().unwrap();
    assert_eq!(
        Subject::proxy(&uri, ProxyOp::Fetch).as_str(),
        "nubis.proxy.b.p1.fetch"
    );
    assert_eq!(Subject::proxy_all(&uri).as_str(), "nubis.proxy.b.p1.>");
    let m = MigrationId([0xab; 16]);
    let progress = Subject::proxy_progress(&uri, &m);
    assert_eq!(
        progress.as_str(),
        format!("nubis.proxy.b.p1.progress.{}", "ab".repeat(16))
    );
    assert_eq!(
        Subject::parse(progress.as_str()).unwrap(),
        ParsedSubject::ProxyProgress {
            proxy: uri.clone(),
            migration: m
        }
    );
    for op in ProxyOp::ALL {
        let s = Subject::proxy(&uri, op);
        assert_eq!(
            Subject::parse(s.as_str()).unwrap(),
            ParsedSubject::Proxy {
                proxy: uri.clone(),
                op
            }
        );
    }
}

#[test]
fn relay_subjects_are_parsed_only_when_addressed_here_and_exact() {
    let b = site("b");
    let vm = VmId::new("vm-1").unwrap();
    for dp in ["cpu.cores", "kpi.web.current_users"] {
        let dp = DataPoint::new(dp).unwrap();
        let s = Subject::monitoring_relay(&b, &site("a"), &vm, &dp);
        assert_eq!(
            Subject::parse_monitoring_relay(&b, s.as_str()),
            Some((site("a"), vm.clone(), dp.clone()))
        );
        assert_eq!(
            Subject::parse_monitoring_relay(&site("c"), s.as_str()),
            None
        );
    }
    for bad in [
        "nubis.relay.b",
        "nubis.relay.b.a.vm-1",
        "nubis.relay.b.a.vm-1.other.x",
        "nubis.relay.b.a.vm-1.infra.kpi.x",
        "nubis.mon.a.vm-1.infra.cpu",
        "nubis.relay.bb.a.vm-1.infra.cpu",
    ] {
        assert_eq!(Subject::parse_monitoring_relay(&b, bad), None, "{bad}");
    }
}

#[test]
fn sla_events_stay_on_a_site_subject() {
    let vm = VmId::new("web-1").unwrap();
    assert_eq!(
        Subject::sla_event(&site("a"), &vm).as_str(),
        "nubis.events.a.sla.web-1"
    );
}

#[test]
fn monitoring_subjects() {
    let a = site("a");
    let vm = VmId::new("vm-1").unwrap();
    let cpu = DataPoint::new("cpu.utilisation").unwrap();
    let kpi = DataPoint::new("kpi.web.current_users").unwrap();
    let s = Subject::monitoring(&a, &vm, &cpu);
    assert_eq!(s.as_str(), "nubis.mon.a.vm-1.infra.cpu.utilisation");
    assert_eq!(
        Subject::parse(s.as_str()).unwrap(),
        ParsedSubject::Monitoring {
            primary: a.clone(),
            vm: vm.clone(),
            data_point: cpu
        }
    );
    let s = Subject::monitoring(&a, &vm, &kpi);
    assert_eq!(s.as_str(), "nubis.mon.a.vm-1.kpi.web.current_users");
    assert_eq!(
        Subject::parse(s.as_str()).unwrap(),
        ParsedSubject::Monitoring {
            primary: a.clone(),
            vm: vm.clone(),
            data_point: kpi
        }
    );
    assert_eq!(
        Subject::monitoring_vm(&a, &vm).as_str(),
        "nubis.mon.a.vm-1.>"
    );
    assert_eq!(Subject::monitoring_primary(&a).as_str(), "nubis.mon.a.>");
    assert!(Subject::parse("nubis.mon.a.vm-1.infra.kpi.x").is_err());
    assert!(Subject::parse("nubis.mon.a.vm-1.other.x").is_err());
    assert!(Subject::parse("nubis.mon.a.vm-1.infra.*").is_err());
}

#[test]
fn host_and_ops_subjects() {
    let a = site("a");
    let h = HostId::new("h1").unwrap();
    let s = Subject::host(&a, &h, "vm.prepare").unwrap();
    assert_eq!(s.as_str(), "nubis.site.a.host.h1.vm.prepare");
    assert_eq!(
        Subject::parse(s.as_str()).unwrap(),
        ParsedSubject::Host {
            site: a.clone(),
            host: h.clone(),
            op: "vm.prepare".into()
        }
    );
    for bad in ["", "a..b", "*", ">", "a.>", "a b", "x."] {
        assert!(
            matches!(Subject::host(&a, &h, bad), Err(SubjectError::Token(_))),
            "{bad:?}"
        );
    }
    assert_eq!(Subject::host_all(&a, &h).as_str(), "nubis.site.a.host.h1.>");
    assert_eq!(Subject::site_internal_all(&a).as_str(), "nubis.site.a.>");
    for e in OpsEndpoint::ALL {
        let s = Subject::ops(&a, e);
        assert_eq!(s.as_str(), format!("nubis.ops.a.{}", e.as_str()));
        assert_eq!(
            Subject::parse(s.as_str()).unwrap(),
            ParsedSubject::Ops {
                site: a.clone(),
                endpoint: e
            }
        );
    }
    assert_eq!(Subject::ops_all(&a).as_str(), "nubis.ops.a.>");
}

#[test]
fn parse_rejects_foreign_and_malformed_subjects() {
    for bad in [
        "",
        "nubis",
        "nubis.fed",
        "nubis.fed.a",
        "nubis.fed.a.migration",
        "nubis.fed.a.migration.request.extra",
        "nubis.fed.*.migration.request",
        "nubis.fed.A.migration.request",
        "nubis.fed.a.>",
        "nubis.other.a.x",
        "other.fed.a.migration.request",
        "nubis.proxy.b.p1.delete",
        "nubis.proxy.b.p1.progress.nothex",
        "nubis.ops.a.drop",
        "nubis.site.a.vm.x",
    ] {
        assert!(Subject::parse(bad).is_err(), "{bad:?}");
    }
    assert!(matches!(
        Subject::parse("nubis.fed.a*.migration.request"),
        Err(SubjectError::Id(_))
    ));
}

#[test]
fn directory_keys() {
    let a = site("a");
    let vm = VmId::new("vm-1").unwrap();
    let uri: ProxyUri = "nats://a/proxy/p1".parse().unwrap();
    let p = ProducerId::new("prod-7").unwrap();
    assert_eq!(DirectoryKey::site(&a).as_str(), "site.a");
    assert_eq!(DirectoryKey::proxy(&uri).as_str(), "proxy.a.p1");
    assert_eq!(
        DirectoryKey::producer(&a, &vm, &p).as_str(),
        "producer.a.vm-1.prod-7"
    );
    assert_eq!(DirectoryKey::consumer(&vm, &a).as_str(), "consumer.vm-1.a");
    assert_eq!(
        DirectoryKey::site(&a).subject().as_str(),
        "$KV.nubis-directory.site.a"
    );
    assert_eq!(DirectoryKey::producers_filter(&vm), "producer.*.vm-1.*");
    assert_eq!(DirectoryKey::consumers_filter(&vm), "consumer.vm-1.*");
    for key in [
        DirectoryKey::site(&a),
        DirectoryKey::proxy(&uri),
        DirectoryKey::producer(&a, &vm, &p),
        DirectoryKey::consumer(&vm, &a),
    ] {
        assert_eq!(key.writer(), Some("a"), "{key}");
    }
    assert_eq!(DirectoryKey::from_stored("other.a").writer(), None);
}

#[test]
fn intake_subjects_name_their_host() {
    let a = SiteId::new("a").unwrap();
    let h = HostId::new("h1").unwrap();
    let intake = Subject::monitoring_intake(&a, &h);
    assert_eq!(intake.as_str(), "nubis.site.a.intake.h1");
    assert_eq!(
        Subject::monitoring_intake_all(&a).as_str(),
        "nubis.site.a.intake.*"
    );
    assert_eq!(Subject::intake_host(&a, intake.as_str()), Some(h.clone()));
    // Another site's intake, a wildcard, or a subject with more tokens names no host of `a`.
    let b = SiteId::new("b").unwrap();
    assert_eq!(Subject::intake_host(&b, intake.as_str()), None);
    assert_eq!(Subject::intake_host(&a, "nubis.site.a.intake.*"), None);
    assert_eq!(Subject::intake_host(&a, "nubis.site.a.intake.h1.x"), None);
    assert_eq!(Subject::intake_host(&a, "nubis.site.ab.intake.h1"), None);
    assert_eq!(
        Subject::host_inbox_prefix(&a, &h),
        "nubis.site.a.host.h1.inbox"
    );
}
