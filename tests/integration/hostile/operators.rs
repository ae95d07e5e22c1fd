//! Operators are people, and not all of them may change things. A `read` operator (the test
//! kit's `viewer`) may look but not touch; an `operate` operator (`operator`) may do both; and
//! neither may speak in the other's name, answer in the site's place, or touch the audit trail
//! the site daemon keeps of every mutating call. The site's own nats-server enforces all of it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use nubis_testkit::{require_nats_server, wait_until, Role};
use serde_json::{json, Value};

use super::deploy_body;
use crate::stack::{ops_client, wait_migration, SiteSpec, Stack};

const LONG: Duration = Duration::from_secs(30);

/// A client of site `site` as `role` and the permissions violations its server reports to it.
async fn watched(
    stack: &Stack,
    site: &str,
    (user, password): (String, String),
) -> (async_nats::Client, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    // Each user hears replies on its own inbox only: a host agent under its subjects, an
    // operator under `_INBOX.<name>`.
    let inbox = match user.strip_prefix("host.") {
        Some(host) => format!("nubis.site.{site}.host.{host}.inbox"),
        None => format!("_INBOX.{user}"),
    };
    let client = async_nats::ConnectOptions::with_user_and_password(user, password)
        .custom_inbox_prefix(inbox)
        .event_callback(move |event| {
            let sink = sink.clone();
            async move {
                if let async_nats::Event::ServerError(async_nats::ServerError::Other(m)) = event {
                    sink.lock().unwrap().push(m);
                }
            }
        })
        .connect(stack.fed.site_url(site).unwrap())
        .await
        .unwrap();
    (client, seen)
}

/// Waits until the server has reported a permissions violation naming `subject`.
async fn violation(seen: &Arc<Mutex<Vec<String>>>, subject: &str) {
    let quoted = format!("\"{subject}\"");
    wait_until(
        LONG,
        format!("a permissions violation for {subject}"),
        || {
            let seen = seen.clone();
            let quoted = quoted.clone();
            async move {
                let found = seen.lock().unwrap().iter().any(|m| {
                    m.to_lowercase().contains("permissions violation") && m.contains(&quoted)
                });
                if found {
                    Ok(())
                } else {
                    Err("not reported yet")
                }
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("no permissions violation for {subject}: {e}"));
}

/// Runs the `nubis` CLI against site `a` as `role`.
async fn nubis(stack: &Stack, role: Role, args: &[&str]) -> std::process::Output {
    let (user, password) = stack.fed.credentials("a", role).unwrap();
    let cli = std::path::Path::new(env!("CARGO_BIN_EXE_nubis-test-site")).with_file_name("nubis");
    assert!(
        cli.exists(),
        "{} is missing: build it with `cargo build -p nubis-cli`",
        cli.display()
    );
    tokio::process::Command::new(&cli)
        .args(args)
        .env("NUBIS_SITE", "a")
        .env("NUBIS_NATS_URL", stack.fed.site_url("a").unwrap())
        .env("NUBIS_NATS_USER", user)
        .env("NUBIS_NATS_PASSWORD", password)
        .output()
        .await
        .unwrap()
}

/// The audit trail as `nubis audit --json` shows it to `role`.
async fn audit(stack: &Stack, role: Role) -> Vec<Value> {
    let out = nubis(stack, role, &["audit", "--json"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_operator_is_refused_by_the_server_and_mutating_calls_are_audited_by_name() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let stack = Stack::start(&binary, vec![SiteSpec::new("a").host("h1", 4096)]).await;

    // The viewer reads.
    let out = nubis(&stack, Role::Viewer, &["vm", "list", "--json"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = nubis(&stack, Role::Viewer, &["site", "status", "--json"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The viewer's eviction is refused by the server: the CLI says so (exit 3), naming the
    // subject, rather than reporting an unreachable site.
    let out = nubis(
        &stack,
        Role::Viewer,
        &["vm", "evict", "vm-x", "--timeout", "2"],
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("may not publish") && stderr.contains("nubis.ops.a.viewer.evict"),
        "{stderr}"
    );

    // The operator's eviction reaches the site, which refuses it on its merits.
    let out = nubis(&stack, Role::Operator, &["vm", "evict", "vm-x"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("the site refused") && stderr.contains("unknown_vm"),
        "{stderr}"
    );

    // And the operator's deployment is carried out.
    std::fs::write(stack.image_store("a").join("img.qcow2"), b"image").unwrap();
    let op = stack.operator("a").await;
    let started = ops_client(&op, "a")
        .as_operator("operator")
        .call::<_, Value>(
            nubis_protocol::subject::OpsEndpoint::Deploy,
            &deploy_body("vm-1", "img.qcow2"),
        )
        .await
        .unwrap();
    let end = wait_migration(&op, "a", started["migration"].as_str().unwrap()).await;
    assert_eq!(end["phase"], "committed", "{end}");

    // The viewer reads the audit: both mutating calls, by name, with their outcome; none of
    // the reads, and nothing of the viewer's refused call (it never reached the site).
    let records = audit(&stack, Role::Viewer).await;
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(
        records[0]["caller"],
        json!({"kind": "operator", "name": "operator"})
    );
    assert_eq!(records[0]["endpoint"], "evict");
    assert_eq!(records[0]["ok"], false);
    assert_eq!(records[0]["code"], 400);
    assert_eq!(records[0]["request"], json!({"vm": "vm-x"}));
    assert_eq!(records[1]["caller"]["name"], "operator");
    assert_eq!(records[1]["endpoint"], "deploy");
    assert_eq!(records[1]["ok"], true);
    assert!(records[1]["at_ms"].as_u64().unwrap() >= records[0]["at_ms"].as_u64().unwrap());

    // The text table shows the same.
    let out = nubis(&stack, Role::Viewer, &["audit"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("OPERATOR") && text.contains("deploy") && text.contains("refused 400"),
        "{text}"
    );
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_operator_speaks_in_anothers_name_answers_for_the_site_or_touches_the_audit() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let mut stack = Stack::start(&binary, vec![SiteSpec::new("a").host("h1", 4096)]).await;
    let (viewer, viewer_seen) = watched(
        &stack,
        "a",
        stack.fed.credentials("a", Role::Viewer).unwrap(),
    )
    .await;
    let (operator, operator_seen) = watched(
        &stack,
        "a",
        stack.fed.credentials("a", Role::Operator).unwrap(),
    )
    .await;

    // The viewer cannot call in the operator's name; the operator can.
    let forged = "nubis.ops.a.operator.evict";
    let body: bytes::Bytes = serde_json::to_vec(&json!({"vm": "vm-x"})).unwrap().into();
    viewer
        .publish_with_reply(forged, viewer.new_inbox(), body.clone())
        .await
        .unwrap();
    viewer.flush().await.unwrap();
    violation(&viewer_seen, forged).await;
    let answer = operator.request(forged, body.clone()).await.unwrap();
    assert!(answer
        .headers
        .unwrap()
        .get("Nats-Service-Error")
        .unwrap()
        .as_str()
        .contains("unknown_vm"));

    // Neither operator role, nor a host agent, nor a transfer proxy may subscribe to the operator API (so none can
    // join its queue group and answer in the site's place); the site daemon still answers.
    let host_credentials = stack.fed.host_credentials("a", "h1").await.unwrap();
    let (host, host_seen) = watched(&stack, "a", host_credentials).await;
    let (proxy, proxy_seen) = watched(
        &stack,
        "a",
        stack.fed.credentials("a", Role::Proxy).unwrap(),
    )
    .await;
    for (client, seen) in [
        (&viewer, &viewer_seen),
        (&operator, &operator_seen),
        (&host, &host_seen),
        (&proxy, &proxy_seen),
    ] {
        let _sub = client
            .queue_subscribe("nubis.ops.a.>", "q".into())
            .await
            .unwrap();
        client.flush().await.unwrap();
        violation(seen, "nubis.ops.a.>").await;
    }
    let status = ops_client(&viewer, "a")
        .as_operator("viewer")
        .status()
        .await
        .unwrap();
    assert_eq!(status.site.as_str(), "a");

    // Only the site daemon writes the audit stream, and no operator deletes or purges it.
    let records = audit(&stack, Role::Viewer).await;
    assert_eq!(records.len(), 1, "{records:?}");
    operator
        .publish("nubis.audit.a", "{}".into())
        .await
        .unwrap();
    operator.flush().await.unwrap();
    violation(&operator_seen, "nubis.audit.a").await;
    // Nor the accounting stream, the site's bills, nor any stream but the image uploads.
    for subject in [
        "$JS.API.STREAM.PURGE.nubis-audit",
        "$JS.API.STREAM.DELETE.nubis-audit",
        "$JS.API.STREAM.PURGE.NUBIS_ACCOUNTING",
        "$JS.API.STREAM.DELETE.NUBIS_ACCOUNTING",
        "$JS.API.STREAM.UPDATE.NUBIS_ACCOUNTING",
        "$JS.API.STREAM.MSG.DELETE.NUBIS_ACCOUNTING",
        "$JS.API.STREAM.DELETE.OBJ_nubis-xfer",
    ] {
        operator
            .publish_with_reply(subject, operator.new_inbox(), "{}".into())
            .await
            .unwrap();
        operator.flush().await.unwrap();
        violation(&operator_seen, subject).await;
    }
    // Even the site's unrestricted administrator cannot purge it through the API.
    let admin = stack.fed.connect_as("a", Role::Admin).await.unwrap();
    let purge = admin
        .request("$JS.API.STREAM.PURGE.nubis-audit", "{}".into())
        .await
        .unwrap();
    let purge: Value = serde_json::from_slice(&purge.payload).unwrap();
    assert!(purge.get("error").is_some(), "{purge}");
    assert_eq!(audit(&stack, Role::Operator).await, records);
    // What the operator may do in the domain still works: read the accounting stream.
    let accounting = operator
        .request("$JS.API.STREAM.INFO.NUBIS_ACCOUNTING", "".into())
        .await
        .unwrap();
    let accounting: Value = serde_json::from_slice(&accounting.payload).unwrap();
    assert_eq!(
        accounting["config"]["name"], "NUBIS_ACCOUNTING",
        "{accounting}"
    );
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_hears_only_its_own_replies() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let stack = Stack::start(&binary, vec![SiteSpec::new("a").host("h1", 4096)]).await;
    let viewer_login = stack.fed.credentials("a", Role::Viewer).unwrap();
    let operator_login = stack.fed.credentials("a", Role::Operator).unwrap();
    let (viewer, viewer_seen) = watched(&stack, "a", viewer_login).await;
    let (operator, _) = watched(&stack, "a", operator_login).await;

    // The viewer tries to hear every reply, and the operator's in particular: refused.
    let mut every = viewer.subscribe("_INBOX.>").await.unwrap();
    let mut theirs = viewer.subscribe("_INBOX.operator.>").await.unwrap();
    viewer.flush().await.unwrap();
    violation(&viewer_seen, "_INBOX.>").await;
    violation(&viewer_seen, "_INBOX.operator.>").await;
    // Nor may it put a reply of its own into the operator's inbox.
    viewer
        .publish("_INBOX.operator.forged", "first reply wins".into())
        .await
        .unwrap();
    viewer.flush().await.unwrap();
    violation(&viewer_seen, "_INBOX.operator.forged").await;

    // Each gets its own answers on its own inbox; the viewer heard none of the operator's.
    let mine = ops_client(&operator, "a")
        .as_operator("operator")
        .status()
        .await
        .unwrap();
    let its = ops_client(&viewer, "a")
        .as_operator("viewer")
        .status()
        .await
        .unwrap();
    assert_eq!(mine.site, its.site);
    for sub in [&mut every, &mut theirs] {
        let heard = tokio::time::timeout(Duration::ZERO, futures::StreamExt::next(sub))
            .await
            .ok()
            .flatten();
        assert!(heard.is_none(), "the viewer heard {heard:?}");
    }
    stack.shutdown().await;
}
