//! `nubis-demo`: the README's main job. Brings up a local federation on loopback — a hub and
//! four leaf sites, each with its site daemon, Transfer proxy and host agent (libvirt's test
//! driver) — and walks through the paper's usage scenarios with real parts:
//!
//! 1. a VM described by an OVF envelope is deployed at site a, which has no room; a delegates
//!    through b, which has none either, to c or d (usage scenario 1);
//! 2. the primary pauses and resumes it through the chain (the Control interface, DMTF states);
//! 3. the site running it evicts it (host maintenance); b, which delegated it, becomes the
//!    Controller and moves it to the other site, files going site to site directly (usage
//!    scenario 2).
//!
//! Then it prints a cheat-sheet and keeps the federation running until Ctrl-C. With `--ci` it
//! exits after the walk: 0 when every step held, 1 otherwise.
// A demo harness: a failed setup step should stop it loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../integration/stack.rs"]
#[allow(dead_code)]
mod stack;

use std::process::ExitCode;
use std::time::Duration;

use serde_json::{json, Value};
use stack::{ops, SiteSpec, Stack};

const STEP_TIMEOUT: Duration = Duration::from_secs(120);

fn say(text: &str) {
    println!("\n\x1b[1m== {text}\x1b[0m");
}

async fn follow(client: &async_nats::Client, site: &str, migration: &str) -> Result<Value, String> {
    let deadline = std::time::Instant::now() + STEP_TIMEOUT;
    let mut shown = 0u64;
    loop {
        let v = ops(client, site, "vms", json!({"migration": migration})).await?;
        let done = v["bytes_done"].as_u64().unwrap_or(0).max(shown);
        shown = done;
        let total = v["bytes_total"].as_u64().unwrap_or(0);
        let phase = v["phase"].as_str().unwrap_or("?").to_string();
        let pct = (done * 100).checked_div(total).unwrap_or(0);
        println!("   {phase:<13} {done:>10} / {total:<10} bytes ({pct:>3}%)");
        match phase.as_str() {
            "committed" => return Ok(v),
            "aborted" => return Err(format!("migration aborted: {}", v["reason"])),
            _ if std::time::Instant::now() > deadline => {
                return Err("migration did not finish in time".into())
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn view(client: &async_nats::Client, site: &str, vm: &str) -> Result<Value, String> {
    let v = ops(client, site, "vms", json!({"vm": vm})).await?;
    Ok(v["vms"][0].clone())
}

async fn show_chain(stack: &Stack, vm: &str, sites: &[&str]) -> Result<(), String> {
    for site in sites {
        let op = stack.operator(site).await;
        match view(&op, site, vm).await {
            Ok(v) => println!(
                "   site {site}: upstream {:<6} next hop {:<16} ({})",
                v["upstream"].as_str().unwrap_or("-"),
                v["next_hop"].as_str().unwrap_or("-"),
                v["phase"].as_str().unwrap_or("?")
            ),
            Err(_) => println!("   site {site}: not on the chain"),
        }
    }
    Ok(())
}

async fn walk(stack: &Stack) -> Result<(), String> {
    let op_a = stack.operator("a").await;
    let op_b = stack.operator("b").await;

    say("Usage scenario 1: deploy an OVF at site a, which has no room");
    let ovf_path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples/demo.ovf");
    let ovf = std::fs::read_to_string(ovf_path).map_err(|e| format!("{ovf_path}: {e}"))?;
    let package = nubis_ovf::OvfPackage::parse(&ovf).map_err(|e| e.to_string())?;
    let t = package.template;
    for disk in &t.disks {
        if let Some(image) = &disk.image {
            // The primary site's image store holds the VM's image (`nubis image put` uploads it).
            let data: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
            std::fs::write(stack.image_store("a").join(image), data).map_err(|e| e.to_string())?;
        }
    }
    println!(
        "   OVF: {} vCPU, {} MiB, {} disk(s), {} monitoring specifier(s)",
        t.vcpus.unwrap_or(0),
        t.memory_mib.unwrap_or(0),
        t.disks.len(),
        t.monitoring.len()
    );
    let deploy = json!({
        "vm": "shop-web",
        "name": t.name,
        "hardware": {
            "vcpus": t.vcpus,
            "memory_mib": t.memory_mib,
            "disks": serde_json::to_value(&t.disks).map_err(|e| e.to_string())?,
            "networks": serde_json::to_value(&t.networks).map_err(|e| e.to_string())?,
        },
        "monitoring": serde_json::to_value(&t.monitoring).map_err(|e| e.to_string())?,
        "properties": t.properties,
    });
    let r = ops(&op_a, "a", "deploy", deploy).await?;
    follow(&op_a, "a", r["migration"].as_str().unwrap_or_default()).await?;
    let first = view(&op_b, "b", "shop-web").await?["next_hop"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let (x, y) = if first == "site:c" {
        ("c", "d")
    } else {
        ("d", "c")
    };
    println!("   placed: a knows only b; b delegated to {x}");
    show_chain(stack, "shop-web", &["a", "b", "c", "d"]).await?;

    say("Control interface: the primary pauses and resumes the VM two hops away");
    for transition in ["pause", "resume"] {
        let v = ops(
            &op_a,
            "a",
            "control",
            json!({"vm": "shop-web", "change": {"kind": "set_state", "transition": transition}}),
        )
        .await?;
        println!(
            "   {transition:<6} -> {} (CIM EnabledState {})",
            v["state"], v["cim_enabled_state"]
        );
    }

    say(&format!(
        "Usage scenario 2: site {x} drains its host and evicts the VM"
    ));
    let op_x = stack.operator(x).await;
    let notice = ops(&op_x, x, "evict", json!({"vm": "shop-web"})).await?;
    println!(
        "   eviction notice {} sent to {}",
        notice["notice"], notice["sent_to"]
    );
    let deadline = std::time::Instant::now() + STEP_TIMEOUT;
    loop {
        let v = view(&op_b, "b", "shop-web").await?;
        if v["next_hop"] == format!("site:{y}") && v["phase"] == "placed" {
            if let Some(m) = v["migrations"].as_array().and_then(|m| m.last()) {
                println!(
                    "   b migrated it ({} bytes moved {x} -> {y} directly)",
                    m["bytes_done"]
                );
            }
            break;
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("the VM did not move to {y}: {v}"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    show_chain(stack, "shop-web", &["a", "b", "c", "d"]).await?;
    let q = ops(
        &op_a,
        "a",
        "control",
        json!({"vm": "shop-web", "change": {"kind": "query"}}),
    )
    .await?;
    println!("   state seen from a: {}", q["state"]);
    if q["state"] != "enabled" {
        return Err(format!("the VM is not running after the eviction: {q}"));
    }
    Ok(())
}

fn cheat_sheet(stack: &Stack) {
    say("The federation keeps running. Try:");
    let url = stack.fed.site_url("a").unwrap_or_default();
    let (user, password) = stack
        .fed
        .credentials("a", nubis_testkit::Role::Operator)
        .unwrap_or_default();
    let nubis = "target/debug/nubis";
    println!("   export NUBIS_SITE=a NUBIS_NATS_URL={url} NUBIS_NATS_USER={user} NUBIS_NATS_PASSWORD={password}");
    println!("   {nubis} site status");
    println!("   {nubis} sites");
    println!("   {nubis} vm list");
    println!("   {nubis} vm status shop-web");
    println!("   {nubis} vm control shop-web pause");
    println!("   {nubis} vm migrate shop-web");
    println!(
        "   nats --server {url} --user {user} --password {password} req nubis.ops.a.status '{{}}'"
    );
    println!("   nats --server {url} --user {user} --password {password} micro ls");
    println!("   Configuration and key files: {}", stack.root().display());
    println!("   Ctrl-C stops everything.");
}

#[tokio::main]
async fn main() -> ExitCode {
    let ci = std::env::args().any(|a| a == "--ci");
    // Warnings only, on stderr, unless RUST_LOG asks for more: the walk speaks for itself.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let Some(binary) = nubis_testkit::require_nats_server() else {
        eprintln!("nubis-demo: no usable nats-server (run ./scripts/setup.sh)");
        return ExitCode::from(3);
    };
    say("Starting a hub and sites a, b, c, d (site daemon, transfer proxy, host agent each)");
    let stack = Stack::start(
        &binary,
        vec![
            SiteSpec {
                id: "a",
                partners: vec![("b", 10)],
                hosts: vec![("a-host", 128)],
                policy: "",
                top: "",
            },
            SiteSpec {
                id: "b",
                partners: vec![("a", 0), ("c", 10), ("d", 5)],
                hosts: vec![("b-host", 128)],
                policy: "",
                top: "",
            },
            SiteSpec {
                id: "c",
                partners: vec![("b", 0)],
                hosts: vec![("c-host", 4096)],
                policy: "",
                top: "",
            },
            SiteSpec {
                id: "d",
                partners: vec![("b", 0)],
                hosts: vec![("d-host", 4096)],
                policy: "",
                top: "",
            },
        ],
    )
    .await;
    println!("   hub at {}", stack.fed.hub_url());
    for s in ["a", "b", "c", "d"] {
        println!(
            "   site {s} at {}",
            stack.fed.site_url(s).unwrap_or_default()
        );
    }
    let result = walk(&stack).await;
    match &result {
        Ok(()) => say("Every step held"),
        Err(e) => say(&format!("FAILED: {e}")),
    }
    if !ci && result.is_ok() {
        cheat_sheet(&stack);
        let _ = tokio::signal::ctrl_c().await;
        say("Stopping");
    }
    stack.shutdown().await;
    if result.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
