//! Unit tests of the site configuration.

use super::*;
use nubis_protocol::identity::KeyError;
use std::os::unix::fs::PermissionsExt;

struct Fixture {
    dir: tempfile::TempDir,
    partner: SiteIdentity,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    SiteIdentity::generate(SiteId::new("a").unwrap())
        .save(&dir.path().join("a.key"), false)
        .unwrap();
    Fixture {
        dir,
        partner: SiteIdentity::generate(SiteId::new("b").unwrap()),
    }
}

fn good(f: &Fixture) -> String {
    format!(
        "site = \"a\"\nkey_file = \"a.key\"\nnats_url = \"nats://127.0.0.1:4222\"\ndata_dir = \"data\"\n\n{}preference = 5\n",
        f.partner.public().partner_snippet()
    )
}

fn parse(f: &Fixture, text: &str) -> Result<SiteConfig, ConfigError> {
    SiteConfig::parse(text, &f.dir.path().join("site.toml"))
}

#[test]
fn a_good_config_loads_with_defaults() {
    let f = fixture();
    let c = parse(&f, &good(&f)).unwrap();
    assert_eq!(c.site.as_str(), "a");
    assert_eq!(c.hub_domain, "hub");
    assert_eq!(c.partners.len(), 1);
    assert_eq!(c.partners[0].signing_key, f.partner.public().signing);
    assert_eq!(c.partners[0].preference, 5);
    assert_eq!(c.policy, Policy::default());
    assert_eq!(c.data_dir, f.dir.path().join("data"));
}

#[test]
fn the_nats_password_can_come_from_a_private_file() {
    let f = fixture();
    let pw = f.dir.path().join("nats.pw");
    std::fs::write(&pw, "s3cret\n").unwrap();
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    let text = good(&f).replace(
        "data_dir = \"data\"\n",
        "data_dir = \"data\"\nnats_user = \"site\"\nnats_password_file = \"nats.pw\"\n",
    );
    let c = parse(&f, &text).unwrap();
    assert_eq!(c.nats.login.as_ref().unwrap().password, "s3cret");
    assert!(!format!("{c:?}").contains("s3cret"));
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = parse(&f, &text).unwrap_err();
    assert_eq!(err.key(), Some("nats_password_file"), "{err}");
}

#[test]
fn a_missing_key_is_named() {
    let f = fixture();
    let text = good(&f).replace("nats_url = \"nats://127.0.0.1:4222\"\n", "");
    let err = parse(&f, &text).unwrap_err();
    assert!(
        matches!(&err, ConfigError::Parse { message, .. } if message.contains("nats_url")),
        "{err}"
    );
}

#[test]
fn a_bad_partner_key_is_named() {
    let f = fixture();
    let text = good(&f).replace("signing_key = \"ed25519:", "signing_key = \"rsa:");
    let err = parse(&f, &text).unwrap_err();
    assert!(
        matches!(&err, ConfigError::Invalid { key, .. } if key == "partners[0].signing_key"),
        "{err}"
    );
    let text = good(&f).replace("sealing_key = \"x25519:", "sealing_key = \"x25519:AAAA");
    let err = parse(&f, &text).unwrap_err();
    assert!(
        matches!(&err, ConfigError::Invalid { key, .. } if key == "partners[0].sealing_key"),
        "{err}"
    );
}

#[test]
fn a_loose_key_file_is_refused() {
    let f = fixture();
    std::fs::set_permissions(
        f.dir.path().join("a.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let err = parse(&f, &good(&f)).unwrap_err();
    assert!(
        matches!(
            err,
            ConfigError::Key {
                source: KeyError::TooOpen { .. },
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn another_sites_key_file_is_refused() {
    let f = fixture();
    let text = good(&f).replacen("site = \"a\"", "site = \"c\"", 1);
    let err = parse(&f, &text).unwrap_err();
    assert!(
        matches!(&err, ConfigError::Invalid { key, .. } if key == "key_file"),
        "{err}"
    );
}

#[test]
fn policies_are_checked_against_partners() {
    let f = fixture();
    let text = format!(
        "site = \"a\"\nkey_file = \"a.key\"\nnats_url = \"nats://127.0.0.1:4222\"\ndata_dir = \"d\"\n\
         [policy.delegation]\npartners = [\"z\"]\n\n{}",
        f.partner.public().partner_snippet()
    );
    let err = parse(&f, &text).unwrap_err();
    assert!(
        matches!(&err, ConfigError::Invalid { key, .. } if key == "policy.delegation.partners[0]"),
        "{err}"
    );
}

#[test]
fn eviction_policy_defaults_to_migrate_and_reads_pass_up() {
    let f = fixture();
    let c = parse(&f, &good(&f)).unwrap();
    assert_eq!(c.policy.eviction, EvictionPolicy::Migrate);
    let text = format!(
        "site = \"a\"\nkey_file = \"a.key\"\nnats_url = \"nats://127.0.0.1:4222\"\ndata_dir = \"d\"\n\
         [policy]\neviction = \"pass_up\"\n\n{}",
        f.partner.public().partner_snippet()
    );
    assert_eq!(
        parse(&f, &text).unwrap().policy.eviction,
        EvictionPolicy::PassUp
    );
}

#[test]
fn monitoring_defaults_to_relay_and_thirty_days() {
    let f = fixture();
    let c = parse(&f, &good(&f)).unwrap();
    assert_eq!(c.monitoring.delivery, Delivery::Relay);
    assert_eq!(c.monitoring.accounting_max_age_s, 30 * 24 * 3600);
    assert!(c.sla.is_empty());
}

fn with_sections(f: &Fixture, sections: &str) -> String {
    format!(
        "site = \"a\"\nkey_file = \"a.key\"\nnats_url = \"nats://127.0.0.1:4222\"\ndata_dir = \"d\"\n{sections}\n{}",
        f.partner.public().partner_snippet()
    )
}

#[test]
fn monitoring_and_sla_sections_load() {
    let f = fixture();
    let text = with_sections(
        &f,
        "[monitoring]\ndelivery = \"bus\"\naccounting_max_age_s = 3600\n\
         [[sla]]\nname = \"busy\"\ndata_point = \"kpi.web.current_users\"\nop = \"gt\"\n\
         threshold = 1000.0\nfor_ms = 60000\nvm = \"web-1\"\naction = \"migrate\"\n\
         [[sla]]\nname = \"idle\"\ndata_point = \"cpu.cores\"\nop = \"le\"\nthreshold = 0.5\n",
    );
    let c = parse(&f, &text).unwrap();
    assert_eq!(c.monitoring.delivery, Delivery::Bus);
    assert_eq!(c.monitoring.accounting_max_age_s, 3600);
    assert_eq!(c.sla.len(), 2);
    let busy = &c.sla[0];
    assert_eq!(busy.data_point.as_str(), "kpi.web.current_users");
    assert_eq!(busy.op, PredicateOp::Gt);
    assert_eq!(busy.for_ms, 60_000);
    assert_eq!(busy.vm.as_ref().map(|v| v.as_str()), Some("web-1"));
    assert_eq!(busy.action, SlaAction::Migrate);
    assert!(busy.predicate().holds(1001.0) && !busy.predicate().holds(1000.0));
    let idle = &c.sla[1];
    assert_eq!(
        (idle.for_ms, idle.vm.clone(), idle.action),
        (0, None, SlaAction::Event)
    );
}

#[test]
fn bad_monitoring_and_sla_keys_are_named() {
    let f = fixture();
    let cases = [
        (
            "[monitoring]\naccounting_max_age_s = 0\n",
            "monitoring.accounting_max_age_s",
        ),
        (
            "[monitoring]\naccounting_max_age_s = 99999999999\n",
            "monitoring.accounting_max_age_s",
        ),
        (
            "[[sla]]\nname = \"\"\ndata_point = \"cpu.cores\"\nop = \"gt\"\nthreshold = 1.0\n",
            "sla[0].name",
        ),
        (
            "[[sla]]\nname = \"x\"\ndata_point = \"cpu.cores\"\nop = \"gt\"\nthreshold = 1.0\n\
             [[sla]]\nname = \"x\"\ndata_point = \"cpu.cores\"\nop = \"lt\"\nthreshold = 1.0\n",
            "sla[1].name",
        ),
        (
            "[[sla]]\nname = \"x\"\ndata_point = \"cpu.cores\"\nop = \"gt\"\nthreshold = nan\n",
            "sla[0].threshold",
        ),
    ];
    for (section, key) in cases {
        let err = parse(&f, &with_sections(&f, section)).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid { key: k, .. } if k == key),
            "{section}: {err}"
        );
    }
    // Shape errors come from the TOML parser, which names the key.
    let cases = [
        ("[monitoring]\ndelivery = \"pigeon\"\n", "delivery"),
        ("[monitoring]\ncolour = 1\n", "colour"),
        (
            "[[sla]]\nname = \"x\"\ndata_point = \"cpu.*\"\nop = \"gt\"\nthreshold = 1.0\n",
            "data_point",
        ),
        (
            "[[sla]]\nname = \"x\"\ndata_point = \"cpu\"\nop = \"about\"\nthreshold = 1.0\n",
            "op",
        ),
        (
            "[[sla]]\nname = \"x\"\ndata_point = \"cpu\"\nop = \"gt\"\nthreshold = 1.0\naction = \"panic\"\n",
            "action",
        ),
        ("[[sla]]\nname = \"x\"\ndata_point = \"cpu\"\nop = \"gt\"\n", "threshold"),
    ];
    for (section, key) in cases {
        let err = parse(&f, &with_sections(&f, section)).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Parse { message, .. } if message.contains(key)),
            "{section}: {err}"
        );
    }
}

#[test]
fn unknown_keys_are_refused() {
    let f = fixture();
    let text = format!("colour = \"blue\"\n{}", good(&f));
    let err = parse(&f, &text).unwrap_err();
    assert!(
        matches!(&err, ConfigError::Parse { message, .. } if message.contains("colour")),
        "{err}"
    );
}

#[test]
fn transfer_mode_defaults_to_direct_for_every_partner() {
    let f = fixture();
    let c = parse(&f, &good(&f)).unwrap();
    assert_eq!(c.policy.transfer, TransferPolicy::default());
    assert_eq!(
        c.policy.transfer.towards(f.partner.site()),
        TransferMode::Direct
    );
}

#[test]
fn transfer_mode_reads_a_default_and_per_partner_exceptions() {
    let f = fixture();
    let other = SiteIdentity::generate(SiteId::new("c").unwrap());
    // Relay by default; partner c is an exception, partner b follows the default.
    let text = format!(
        "{}{}transfer = \"direct\"\n",
        with_sections(&f, "[transfer]\ndefault = \"relay\"\n"),
        other.public().partner_snippet()
    );
    let c = parse(&f, &text).unwrap();
    assert_eq!(c.policy.transfer.default, TransferMode::Relay);
    assert_eq!(
        c.policy.transfer.towards(f.partner.site()),
        TransferMode::Relay
    );
    assert_eq!(
        c.policy.transfer.towards(other.site()),
        TransferMode::Direct
    );
    // A site with no entry (not a partner) gets the default.
    let stranger = SiteId::new("z").unwrap();
    assert_eq!(c.policy.transfer.towards(&stranger), TransferMode::Relay);

    // And the other way round: direct by default, one partner relayed.
    let text = format!("{}transfer = \"relay\"\n", good(&f));
    let c = parse(&f, &text).unwrap();
    assert_eq!(c.policy.transfer.default, TransferMode::Direct);
    assert_eq!(
        c.policy.transfer.towards(f.partner.site()),
        TransferMode::Relay
    );
    assert_eq!(c.policy.transfer.towards(&stranger), TransferMode::Direct);
}

#[test]
fn bad_transfer_keys_are_named() {
    let f = fixture();
    for (text, key) in [
        (
            with_sections(&f, "[transfer]\ndefault = \"tunnel\"\n"),
            "default",
        ),
        (with_sections(&f, "[transfer]\nmode = \"relay\"\n"), "mode"),
        (format!("{}transfer = \"maybe\"\n", good(&f)), "transfer"),
        // The mode is not a `[policy]` key.
        (
            with_sections(&f, "[policy]\ntransfer = \"relay\"\n"),
            "transfer",
        ),
    ] {
        let err = parse(&f, &text).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Parse { message, .. } if message.contains(key)),
            "{text}: {err}"
        );
    }
}
