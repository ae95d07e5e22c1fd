//! Tests of the configuration templates, the credentials of each role and the site-id checks.

use super::*;

#[test]
fn templates_render_without_leftover_placeholders() {
    let dir = PathBuf::from("/nonexistent");
    let mut hub = Server::new(HUB, dir.join("hub"), HUB_TEMPLATE);
    for key in [
        "HOST",
        "STORE",
        "PORTS_DIR",
        "SYS_PASSWORD",
        "OPERATOR_PASSWORD",
        "LEAF_USERS",
    ] {
        hub.values.insert(key, "x".to_owned());
    }
    let text = hub.render().unwrap();
    assert!(text.contains("max_payload: 8MB"));
    assert!(text.contains("domain: hub"));

    let mut leaf = Server::new("a", dir.join("a"), LEAF_TEMPLATE);
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
        "HOST_PASSWORD",
        "ADMIN_PASSWORD",
        "SITE",
        "HUB_LEAF_URL",
        "LEAF_PASSWORD",
    ] {
        leaf.values.insert(key, "a".to_owned());
    }
    let text = leaf.render().unwrap();
    assert!(text.contains("listen: \"a:4222\""));
    assert!(text.contains("domain: \"a\""));
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
    let mut hub = Server::new(HUB, dir.join("hub"), HUB_TEMPLATE);
    let mut site = Server::new("a", dir.join("a"), LEAF_TEMPLATE);
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
    for role in [
        Role::Site,
        Role::Proxy,
        Role::Viewer,
        Role::Host,
        Role::Admin,
    ] {
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
    for bad in [&["a", "hub"][..], &["a b"], &[""], &["a.b"], &["a>"]] {
        let err = Federation::start_with(&binary, bad).await.unwrap_err();
        assert!(matches!(err, Error::InvalidSiteId { .. }), "{err}");
    }
    let err = Federation::start_with(&binary, &["a", "a"])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::DuplicateSite { .. }), "{err}");
}
