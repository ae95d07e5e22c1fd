//! Integration tests: TLS on the leaf connections. Every leaf connection between a site's
//! server and the hub is TLS verified both ways, and the hub maps the site's certificate to the
//! leaf user it logs in as (`nats-config/README.md`, "TLS"). Each refusal is shown on a real
//! hub next to its legitimate counterpart: the same site server with its own certificate joins.

use std::time::{Duration, SystemTime};

use nubis_bus::tls::{CertificateAuthority, Validity};
use nubis_testkit::{require_nats_server, wait_until, Federation, TlsFiles, DEFAULT_TIMEOUT, HUB};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};

const DAY: Duration = Duration::from_secs(24 * 60 * 60);

/// A federation of sites `a` and `b` with `b`'s own server stopped, so that the tests can
/// start other servers for `b` with certificates of their choosing.
async fn federation_without_b() -> Option<Federation> {
    let binary = require_nats_server()?;
    let mut federation = Federation::start_with(&binary, &["a", "b"]).await.unwrap();
    assert_eq!(federation.leaf_connections().await.unwrap(), ["a", "b"]);
    federation.stop("b").await.unwrap();
    Some(federation)
}

/// How many lines of the hub's log contain `needle`.
fn hub_log_count(federation: &Federation, needle: &str) -> usize {
    let log = std::fs::read_to_string(federation.log_path(HUB).unwrap()).unwrap_or_default();
    log.lines().filter(|line| line.contains(needle)).count()
}

/// Starts a server for site `b` with `files`, waits until the hub has refused its leaf
/// connection twice (the first attempt and a retry) for the reason its log states as
/// `refusal`, and checks that the hub does not count `b` among its leaf nodes. Then the
/// legitimate counterpart: a server for `b` with a certificate the federation's CA issued for
/// `b` joins.
async fn refused_then_rightful_joins(federation: &Federation, files: &TlsFiles, refusal: &str) {
    let before = hub_log_count(federation, refusal);
    let leaf = federation.spawn_leaf("b", files).await.unwrap();
    wait_until(
        DEFAULT_TIMEOUT,
        format!("the hub to refuse b twice: {refusal}"),
        || async {
            match hub_log_count(federation, refusal) - before {
                n if n >= 2 => Ok(()),
                n => Err(format!("{n} refusals so far; b logged:\n{}", leaf.log())),
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(
        federation.leaf_connections().await.unwrap(),
        ["a"],
        "a refused leaf is not a leaf of the hub"
    );
    drop(leaf);

    let own = federation
        .certificate_authority()
        .issue_site("b", Validity::days_from_now(1))
        .unwrap();
    let own = federation.write_certificate("b-own", &own).unwrap();
    let _leaf = federation.spawn_leaf("b", &own).await.unwrap();
    wait_until(
        DEFAULT_TIMEOUT,
        "b to join with its own certificate",
        || async {
            match federation.leaf_connections().await {
                Ok(names) if names == ["a", "b"] => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_site_certificate_from_another_ca_is_refused() {
    let Some(federation) = federation_without_b().await else {
        return;
    };
    let other = CertificateAuthority::generate(Validity::days_from_now(1)).unwrap();
    let cert = other.issue_site("b", Validity::days_from_now(1)).unwrap();
    // The server still trusts the federation's CA for the hub: only its own certificate is
    // foreign.
    let files = federation.write_certificate("other-ca", &cert).unwrap();
    refused_then_rightful_joins(
        &federation,
        &files,
        "certificate signed by unknown authority",
    )
    .await;
}

#[tokio::test]
async fn an_expired_site_certificate_is_refused() {
    let Some(federation) = federation_without_b().await else {
        return;
    };
    let now = SystemTime::now();
    let expired = federation
        .certificate_authority()
        .issue_site("b", Validity::between(now - 3 * DAY, now - DAY))
        .unwrap();
    let files = federation.write_certificate("expired", &expired).unwrap();
    refused_then_rightful_joins(&federation, &files, "certificate has expired").await;
}

#[tokio::test]
async fn a_certificate_of_another_site_cannot_log_in_as_this_site() {
    let Some(federation) = federation_without_b().await else {
        return;
    };
    // A valid certificate of the federation, but naming `a`: the hub maps it to the leaf user
    // `a`, whose password `b`'s server does not have.
    let of_a = federation
        .certificate_authority()
        .issue_site("a", Validity::days_from_now(1))
        .unwrap();
    let files = federation.write_certificate("of-a", &of_a).unwrap();
    refused_then_rightful_joins(&federation, &files, "authentication error - User \"a\"").await;
}

#[tokio::test]
async fn a_site_that_cannot_verify_the_hub_does_not_connect() {
    let Some(federation) = federation_without_b().await else {
        return;
    };
    // `b`'s own certificate, but another CA to check the hub's against: the hub's certificate
    // fails `b`'s verification, and `b` aborts the handshake.
    let own = federation
        .certificate_authority()
        .issue_site("b", Validity::days_from_now(1))
        .unwrap();
    let mut files = federation.write_certificate("distrusting", &own).unwrap();
    let other = CertificateAuthority::generate(Validity::days_from_now(1)).unwrap();
    let other_ca = federation.root().join("other-ca.pem");
    std::fs::write(&other_ca, other.cert_pem()).unwrap();
    files.ca = other_ca;
    refused_then_rightful_joins(
        &federation,
        &files,
        "TLS leafnode handshake error: remote error",
    )
    .await;
}

#[tokio::test]
async fn plain_tcp_to_the_hubs_leaf_port_is_refused() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let federation = Federation::start_with(&binary, &["a", "b"]).await.unwrap();
    // The legitimate counterpart: both sites are leaf nodes, over TLS.
    assert_eq!(federation.leaf_connections().await.unwrap(), ["a", "b"]);

    // A client speaking plain NATS with b's right login: the hub announces that TLS with a
    // client certificate is required, and closes the connection at the first plain byte,
    // without answering.
    let (user, password) = federation.leaf_login("b").unwrap();
    let port = federation.hub_leaf_port().unwrap();
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut stream = BufReader::new(stream);
    let mut info = String::new();
    stream.read_line(&mut info).await.unwrap();
    let json: serde_json::Value =
        serde_json::from_str(info.strip_prefix("INFO ").unwrap().trim()).unwrap();
    assert_eq!(json["tls_required"], true, "{info}");
    assert_eq!(json["tls_verify"], true, "{info}");
    let connect = serde_json::json!({ "user": user, "pass": password, "name": "b" });
    stream
        .get_mut()
        .write_all(format!("CONNECT {connect}\r\nPING\r\n").as_bytes())
        .await
        .unwrap();
    let mut rest = Vec::new();
    // Bounded so that a hub that kept the connection open fails the test instead of hanging.
    tokio::time::timeout(DEFAULT_TIMEOUT, stream.read_to_end(&mut rest))
        .await
        .expect("the hub closes a plain leaf connection")
        .ok();
    let rest = String::from_utf8_lossy(&rest);
    assert!(!rest.contains("PONG") && !rest.contains("+OK"), "{rest}");
    assert_eq!(federation.leaf_connections().await.unwrap(), ["a", "b"]);
}
