//! The `nubis` binary as an operator runs it: exit codes (2 user error, 3 refused by a peer,
//! 5 unreachable), messages that say what to do next, text for people by default and `--json`
//! output that parses.
//!
//! These run the real binary, so they live with the CLI crate (Cargo builds a crate's binaries
//! for its own integration tests only). The operator commands talk to a stand-in site: a real
//! nats-server (from the test kit) and a responder with fixed answers on `nubis.ops.a.>`, so
//! what is checked here is the CLI's side of the operator API, not the site's.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

fn nubis(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nubis"))
        .args(args)
        .env_remove("NUBIS_SITE")
        .env_remove("NUBIS_NATS_URL")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn keys_gen_writes_a_private_file_and_prints_json() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("a.key");
    let o = nubis(&[
        "--json",
        "keys",
        "gen",
        "--site",
        "a",
        "--out",
        key.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["site"], "a");
    assert!(v["signing_key"].as_str().unwrap().starts_with("ed25519:"));
    assert!(v["sealing_key"].as_str().unwrap().starts_with("x25519:"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // A second gen refuses to overwrite; a loose file is refused with the fix in the hint.
    let o = nubis(&["keys", "gen", "--site", "a", "--out", key.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--force"), "{}", stderr(&o));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = nubis(&["keys", "show", "--key", key.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("chmod 600"), "{}", stderr(&o));
}

#[test]
fn argument_errors_are_user_errors() {
    let o = nubis(&[
        "keys",
        "gen",
        "--site",
        "Not.Valid",
        "--out",
        "/nonexistent/x",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("not a valid site id"), "{}", stderr(&o));
    let o = nubis(&["vm", "status"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = nubis(&["site"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--config"), "{}", stderr(&o));
}

#[test]
fn a_bad_site_configuration_names_the_problem_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("site.toml");
    std::fs::write(
        &config,
        "site = \"a\"\nkey_file = \"a.key\"\nnats_url = \"nats://127.0.0.1:1\"\ndata_dir = \"d\"\n",
    )
    .unwrap();
    let o = nubis(&["site", "--config", config.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("key_file"), "{}", stderr(&o));

    let key = dir.path().join("a.key");
    assert!(
        nubis(&["keys", "gen", "--site", "a", "--out", key.to_str().unwrap()])
            .status
            .success()
    );
    std::fs::write(
        &config,
        "site = \"a\"\nkey_file = \"a.key\"\nnats_url = \"nats://127.0.0.1:1\"\ndata_dir = \"d\"\n\
         [[partners]]\nsite = \"b\"\nsigning_key = \"rsa:AAAA\"\nsealing_key = \"x25519:AAAA\"\n",
    )
    .unwrap();
    let o = nubis(&["site", "--config", config.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("partners[0].signing_key"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn an_unreachable_site_exits_5_with_a_hint() {
    // Port 1 on loopback: nothing listens there.
    let o = nubis(&[
        "site",
        "status",
        "--site",
        "a",
        "--nats-url",
        "nats://127.0.0.1:1",
        "--timeout",
        "1",
    ]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(stderr(&o).contains("hint:"), "{}", stderr(&o));
    let o = nubis(&[
        "vm",
        "list",
        "--site",
        "a",
        "--nats-url",
        "nats://127.0.0.1:1",
        "--timeout",
        "1",
    ]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
}

#[test]
fn completions_are_printed() {
    let o = nubis(&["completions", "bash"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("nubis"));
}

/// Fixed answers of the stand-in site `a`, per endpoint and request.
fn answer(endpoint: &str, request: &serde_json::Value) -> Result<serde_json::Value, &'static str> {
    use serde_json::json;
    let migration = |id: &str, phase: &str, reason: serde_json::Value| {
        json!({"migration": id, "vm": "vm-1", "phase": phase, "reason": reason,
               "bytes_done": 1048576, "bytes_total": 1048576, "offers": 2, "queue_position": 0,
               "elapsed_s": 125.2, "failed_rounds": 0, "last_failure": null})
    };
    let vm = |id: &str| {
        json!({"vm": id, "primary": "a", "upstream": null, "next_hop": "site:b",
               "phase": "placed", "descriptor_version": 1,
               "migrations": [migration(COMMITTED, "committed", json!(null))]})
    };
    Ok(match endpoint {
        "status" => json!({"site": "a", "version": "0.1.0", "started_ms": 1767225600000u64,
            "uptime_ms": 125000, "nats_server_version": "2.11.0", "partners": 1,
            "partners_reachable": 1, "hosts": ["h1"], "vms": 2,
            "signing_key": "ed25519:AAAA"}),
        "sites" => json!({"sites": [{"site": "b", "partner": true, "trusted": true,
            "reachable": true, "heartbeat_age_ms": 1500, "proxies": [], "signing_key": null}]}),
        "vms" => match (request["vm"].as_str(), request["migration"].as_str()) {
            (_, Some(COMMITTED)) => migration(COMMITTED, "committed", json!(null)),
            (_, Some(id)) => migration(id, "aborted", json!("no partner had room")),
            (Some("missing"), _) => {
                return Err("VM missing is not known at this site (unknown_vm)")
            }
            (Some(id), _) => json!({"vms": [vm(id)]}),
            (None, None) => json!({"vms": [vm("vm-1"), vm("a-longer-vm-name")]}),
        },
        "migrate" => match request["vm"].as_str() {
            Some("vm-1") => json!({"vm": "vm-1", "migration": COMMITTED}),
            _ => json!({"vm": "vm-2", "migration": ABORTED}),
        },
        "images" => json!({"images": [
            {"name": "busybox.qcow2", "bytes": 1572864, "modified_ms": 1767225600000u64},
            {"name": "a-much-longer-name.raw", "bytes": 12, "modified_ms": 0}]}),
        "usage" => json!({"vm": "vm-1", "from_ms": 1767225600000u64,
            "to_ms": 1767225725000u64, "cpu_core_hours": 0.012345678,
            "memory_gib_hours": 0.5, "disk_read_bytes": 1536.0, "disk_written_bytes": 0.0,
            "net_rx_bytes": 2048.0, "net_tx_bytes": 10.4, "batches": 3, "samples": 9,
            "sealed_unreadable": 0}),
        _ => return Err("endpoint not in this stand-in (malformed)"),
    })
}

const COMMITTED: &str = "9a2b0c1d2e3f40516273849a0b1c2d3e";
const ABORTED: &str = "0123456789abcdef0123456789abcdef";

/// A nats-server with a stand-in site `a` answering its operator API.
struct StandIn {
    fed: nubis_testkit::Federation,
    _responder: tokio::task::JoinHandle<()>,
}

impl StandIn {
    async fn start() -> Option<Self> {
        use futures::StreamExt as _;
        let binary = nubis_testkit::require_nats_server()?;
        let fed = nubis_testkit::Federation::start_with(&binary, &["a"])
            .await
            .unwrap();
        let site = fed.connect("a").await.unwrap();
        let mut requests = site.subscribe("nubis.ops.a.>").await.unwrap();
        site.flush().await.unwrap();
        let responder = tokio::spawn(async move {
            while let Some(m) = requests.next().await {
                let Some(reply) = m.reply else { continue };
                let endpoint = m.subject.as_str().rsplit('.').next().unwrap().to_string();
                let request: serde_json::Value =
                    serde_json::from_slice(&m.payload).unwrap_or_default();
                match answer(&endpoint, &request) {
                    Ok(v) => site
                        .publish(reply, serde_json::to_vec(&v).unwrap().into())
                        .await
                        .unwrap(),
                    Err(message) => {
                        let mut headers = async_nats::HeaderMap::new();
                        headers.insert("Nats-Service-Error", message);
                        headers.insert("Nats-Service-Error-Code", "400");
                        site.publish_with_headers(reply, headers, "".into())
                            .await
                            .unwrap()
                    }
                }
            }
        });
        Some(Self {
            fed,
            _responder: responder,
        })
    }

    /// Runs `nubis` against the stand-in (without blocking the responder's runtime).
    async fn nubis(&self, args: &[&str]) -> Output {
        let (user, password) = self
            .fed
            .credentials("a", nubis_testkit::Role::Operator)
            .unwrap();
        tokio::process::Command::new(env!("CARGO_BIN_EXE_nubis"))
            .args(args)
            .env("NUBIS_SITE", "a")
            .env("NUBIS_NATS_URL", self.fed.site_url("a").unwrap())
            .env("NUBIS_NATS_USER", user)
            .env("NUBIS_NATS_PASSWORD", password)
            .output()
            .await
            .unwrap()
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json_of(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", stderr(o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(o)))
}

fn text_of(o: &Output) -> String {
    assert!(o.status.success(), "{}", stderr(o));
    let text = stdout(o);
    assert!(
        serde_json::from_str::<serde_json::Value>(&text).is_err(),
        "text by default, not JSON: {text}"
    );
    text
}

#[tokio::test]
async fn vm_commands_print_tables_by_default_and_json_on_request() {
    let Some(site) = StandIn::start().await else {
        return;
    };
    let text = text_of(&site.nubis(&["vm", "list"]).await);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("VM  "), "{text}");
    assert_eq!(lines.len(), 3, "{text}");
    // Columns line up: every row has its next hop where the header has it.
    let column = lines[0].find("NEXT HOP").unwrap();
    assert!(
        lines[1..].iter().all(|l| l[column..].starts_with("site:b")),
        "{text}"
    );
    let v = json_of(&site.nubis(&["--json", "vm", "list"]).await);
    assert_eq!(v["vms"][1]["vm"], "a-longer-vm-name");

    let text = text_of(&site.nubis(&["vm", "status", "vm-1"]).await);
    assert!(text.contains("next hop"), "{text}");
    assert!(text.contains("1.0 MiB / 1.0 MiB (100%)"), "{text}");
    assert!(text.contains("2 m 05 s"), "{text}");
    let v = json_of(&site.nubis(&["vm", "status", "vm-1", "--json"]).await);
    assert_eq!(v["vms"][0]["next_hop"], "site:b");

    let text = text_of(&site.nubis(&["vm", "migrate", "vm-1"]).await);
    assert!(
        text.contains(&format!(
            "migration {COMMITTED} of VM vm-1 committed after 2 m 05 s"
        )),
        "{text}"
    );
    let v = json_of(&site.nubis(&["--json", "vm", "migrate", "vm-1"]).await);
    assert_eq!(v["phase"], "committed");
    assert_eq!(v["bytes_done"], 1048576);
    let v = json_of(
        &site
            .nubis(&["--json", "vm", "migrate", "vm-1", "--no-wait"])
            .await,
    );
    assert_eq!(v, serde_json::json!({"vm": "vm-1", "migration": COMMITTED}));

    // An aborted migration and an unknown VM are refusals (exit 3) that say why.
    let o = site.nubis(&["vm", "migrate", "vm-2"]).await;
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("no partner had room"), "{}", stderr(&o));
    let o = site.nubis(&["vm", "status", "missing"]).await;
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("unknown_vm"), "{}", stderr(&o));
}

#[tokio::test]
async fn site_usage_and_image_commands_print_times_units_and_aligned_columns() {
    let Some(site) = StandIn::start().await else {
        return;
    };
    let text = text_of(&site.nubis(&["site", "status"]).await);
    assert!(
        text.contains("2026-01-01T00:00:00Z (up 2 m 05 s)"),
        "{text}"
    );
    assert_eq!(
        json_of(&site.nubis(&["--json", "site", "status"]).await)["uptime_ms"],
        125000
    );

    let text = text_of(&site.nubis(&["sites"]).await);
    assert!(text.lines().nth(1).unwrap().contains("1.5 s ago"), "{text}");
    assert_eq!(
        json_of(&site.nubis(&["sites", "--json"]).await)["sites"][0]["site"],
        "b"
    );

    let text = text_of(&site.nubis(&["usage", "vm-1"]).await);
    assert!(
        text.contains("2026-01-01T00:00:00Z .. 2026-01-01T00:02:05Z (2 m 05 s)"),
        "{text}"
    );
    assert!(text.contains("0.0123 core-hours"), "{text}");
    let v = json_of(&site.nubis(&["usage", "vm-1", "--json"]).await);
    assert_eq!(v["cpu_core_hours"], 0.012345678);

    let text = text_of(&site.nubis(&["image", "list"]).await);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[1], "busybox.qcow2           1.5 MiB  2026-01-01T00:00:00Z",
        "{text}"
    );
    assert_eq!(
        lines[2], "a-much-longer-name.raw     12 B  1970-01-01T00:00:00Z",
        "{text}"
    );
    let v = json_of(&site.nubis(&["image", "list", "--json"]).await);
    assert_eq!(v["images"][0]["bytes"], 1572864);
}
