//! How long a newly started site takes to see all of its N partners in its directory view, for
//! N = 3 and N = 20 (issue: site daemon). Real nats-servers (hub + N+1 leaf sites) and real site
//! daemons on one machine; the new site pins all N others as partners.
//!
//! Run: `cargo bench -p nubis-tests --bench directory_join` (prints a table). Under `cargo test`
//! it runs N = 3 only, once.
// A benchmark is a test harness: a failed setup step should stop it loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use nubis_protocol::identity::SiteIdentity;
use nubis_protocol::SiteId;
use nubis_testkit::{require_nats_server, Federation, Role};
use tokio_util::sync::CancellationToken;

fn config_text(fed: &Federation, site: &str, ids: &[String], keys: &[Arc<SiteIdentity>]) -> String {
    let url = fed.site_url(site).unwrap();
    let (user, password) = fed.credentials(site, Role::Site).unwrap();
    let mut text = format!(
        "site = \"{site}\"\nkey_file = \"{site}.key\"\nnats_url = \"{url}\"\nnats_user = \"{user}\"\n\
         nats_password = \"{password}\"\ndata_dir = \"{site}-data\"\n\n[directory]\nheartbeat_ms = 2000\n\
         liveness_timeout_ms = 6000\n\n"
    );
    for (id, key) in ids.iter().zip(keys) {
        if id != site {
            text.push_str(&key.public().partner_snippet());
            text.push('\n');
        }
    }
    text
}

async fn run(binary: &nubis_testkit::NatsServerBinary, n: usize) -> (Duration, Duration) {
    let ids: Vec<String> = (0..=n).map(|i| format!("s{i}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let fed = Federation::start_with(binary, &refs).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let keys: Vec<Arc<SiteIdentity>> = ids
        .iter()
        .map(|id| {
            let k = SiteIdentity::generate(SiteId::new(id.as_str()).unwrap());
            k.save(&dir.path().join(format!("{id}.key")), false)
                .unwrap();
            Arc::new(k)
        })
        .collect();
    let load = |site: &str| {
        let path = dir.path().join(format!("{site}.toml"));
        std::fs::write(&path, config_text(&fed, site, &ids, &keys)).unwrap();
        nubis_site::config::SiteConfig::load(&path).unwrap()
    };
    // The N partners run first and have joined the directory.
    let mut tokens = Vec::new();
    for id in &ids[1..] {
        let t = CancellationToken::new();
        tokio::spawn(nubis_site::run(load(id), t.clone()));
        tokens.push(t);
    }
    let op = fed.connect_as("s0", Role::Operator).await.unwrap();
    // Then the new site starts; the clock runs from its start until its view shows every
    // partner trusted and reachable (first answer of its operator API is also reported).
    let start = Instant::now();
    let t = CancellationToken::new();
    tokio::spawn(nubis_site::run(load("s0"), t.clone()));
    tokens.push(t);
    let mut first_answer = None;
    loop {
        if let Ok(Ok(msg)) = tokio::time::timeout(
            Duration::from_millis(200),
            op.request("nubis.ops.s0.sites", "{}".into()),
        )
        .await
        {
            first_answer.get_or_insert_with(|| start.elapsed());
            let v: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap_or_default();
            let seen = v["sites"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter(|s| s["trusted"] == true && s["reachable"] == true)
                        .count()
                })
                .unwrap_or(0);
            if seen == n {
                break;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the new site never saw all partners"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let all = start.elapsed();
    for t in tokens {
        t.cancel();
    }
    (first_answer.unwrap_or(all), all)
}

#[tokio::main]
async fn main() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let bench = std::env::args().any(|a| a == "--bench");
    let sizes: &[usize] = if bench { &[3, 20] } else { &[3] };
    println!("| partners N | operator API answers after | all N partners seen after |");
    println!("|---|---|---|");
    for &n in sizes {
        let (first, all) = run(&binary, n).await;
        println!(
            "| {n} | {} ms | {} ms |",
            first.as_millis(),
            all.as_millis()
        );
    }
}
