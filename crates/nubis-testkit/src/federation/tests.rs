//! Tests of the configuration templates, the credentials of each role and the site-id checks.

use super::*;

#[test]
fn templates_render_without_leftover_placeholders() {
    let dir = PathBuf::from("/nonexistent");
    let mut hub = Server::new(HUB, dir.join("hub"), HUB_TEMPLATE, true);
    for key in [
        "HOST",
        "LEAF_HOST",
        "STORE",
        "PORTS_DIR",
        "SYS_PASSWORD",
        "OPERATOR_PASSWORD",
        "LEAF_USERS",
        "TLS_CA",
        "TLS_CERT",
        "TLS_KEY",
        "NODE",
        "CLUSTER",
    ] {
        hub.values.insert(key, "x".to_owned());
    }
    let text = hub.render().unwrap();
    assert!(text.contains("max_payload: 8MB"));
    assert!(text.contains("domain: hub"));

    let mut leaf = Server::new("a", dir.join("a"), LEAF_TEMPLATE, false);
    leaf.client_port = Some(4222);
    let err = leaf.render().unwrap_err();
    assert!(matches!(err, Error::Template { .. }), "{err}");
    for key in [
        "HOST",
        "STORE",
        "PORTS_DIR",
        "SYS_PASSWORD",
        "SITE_PASSWORD",
        "PROXY_PASSWORD",
        "OPERATOR_PASSWORD",
        "VIEWER_PASSWORD",
        "HOST_USERS",
        "ADMIN_PASSWORD",
        "SITE",
        "HUB_LEAF_URLS",
        "LEAF_PASSWORD",
        "TLS_CA",
        "TLS_CERT",
        "TLS_KEY",
    ] {
        leaf.values.insert(key, "a".to_owned());
    }
    let text = leaf.render().unwrap();
    assert!(text.contains("listen: \"a:4222\""));
    assert!(text.contains("domain: \"a\""));
    // Every leaf connection is TLS: the hub verifies and maps the site's certificate, the site
    // presents one and verifies the hub's.
    let hub_text = hub.render().unwrap();
    let leafnodes = &hub_text[hub_text.find("leafnodes {").unwrap()..];
    assert!(leafnodes.contains("verify_and_map: true"), "{leafnodes}");
    assert!(leafnodes.contains("ca_file: \"x\""), "{leafnodes}");
    let remotes = &text[text.find("remotes: [").unwrap()..];
    for key in ["ca_file", "cert_file", "key_file"] {
        assert!(remotes.contains(&format!("{key}: \"a\"")), "{remotes}");
    }
    // No server maps credential-less clients to a user.
    for text in [&hub.render().unwrap(), &text] {
        assert!(!text.contains("no_auth_user:"), "{text}");
    }

    let user = render_template(
        HUB,
        HUB_LEAF_USER_TEMPLATE,
        [("SITE", "b".to_owned()), ("LEAF_PASSWORD", "pw".to_owned())],
    )
    .unwrap();
    assert!(user.contains("\"nubis.fed.b.>\""));
    assert!(user.contains("\"$JS.hub.API.$KV.nubis-directory.site.b\""));
    assert!(user.contains("allowed_connection_types: [\"LEAFNODE\"]"));
}

#[test]
fn credentials_exist_for_every_role_at_a_site_and_only_the_operator_at_the_hub() {
    let dir = PathBuf::from("/nonexistent");
    let mut hub = Server::new(HUB, dir.join("hub"), HUB_TEMPLATE, true);
    let mut site = Server::new("a", dir.join("a"), LEAF_TEMPLATE, false);
    for role in Role::ALL {
        site.values
            .insert(role.password_placeholder(), format!("pw-{role}"));
    }
    hub.values.insert("OPERATOR_PASSWORD", "hub-pw".to_owned());
    for role in Role::ALL {
        let (user, password) = site.credentials(role).unwrap();
        assert_eq!(user, role.user());
        assert_eq!(password, format!("pw-{role}"));
    }
    assert_eq!(
        hub.credentials(Role::Operator).unwrap(),
        ("operator".to_owned(), "hub-pw".to_owned())
    );
    for role in [Role::Site, Role::Proxy, Role::Viewer, Role::Admin] {
        let err = hub.credentials(role).unwrap_err();
        assert!(matches!(err, Error::NoSuchUser { .. }), "{err}");
    }
    for server in [&hub, &site] {
        let shown = format!("{server:?}");
        assert!(
            !shown.contains("pw-") && !shown.contains("hub-pw"),
            "{shown}"
        );
    }
    assert_eq!(hub.default_role(), Role::Operator);
    assert_eq!(site.default_role(), Role::Site);
}

#[tokio::test]
async fn invalid_and_duplicate_site_ids_are_refused_before_anything_starts() {
    let Some(binary) = crate::require_nats_server() else {
        return;
    };
    for bad in [
        &["a", "hub"][..],
        &["hub-2"],
        &["a b"],
        &[""],
        &["a.b"],
        &["a>"],
    ] {
        let err = Federation::start_with(&binary, bad).await.unwrap_err();
        assert!(matches!(err, Error::InvalidSiteId { .. }), "{err}");
    }
    let err = Federation::start_with(&binary, &["a", "a"])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::DuplicateSite { .. }), "{err}");
}

#[tokio::test]
async fn every_leaf_connection_is_tls_verified_both_ways() {
    let Some(binary) = crate::require_nats_server() else {
        return;
    };
    let federation = Federation::start_with(&binary, &["a"]).await.unwrap();
    let varz = monitor::get_json(federation.monitoring_port(HUB).unwrap(), "/varz")
        .await
        .unwrap();
    assert_eq!(varz.pointer("/leaf/tls_required"), Some(&true.into()));
    assert_eq!(varz.pointer("/leaf/tls_verify"), Some(&true.into()));
    assert_eq!(federation.leaf_connections().await.unwrap(), ["a"]);
    // Private keys are the owner's only.
    let key = federation.root().join("tls/site-a/key.pem");
    let mode = std::os::unix::fs::PermissionsExt::mode(&fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "{}", key.display());
    federation.shutdown().await.unwrap();
}
