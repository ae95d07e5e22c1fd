//! A partner that sends more than any table can hold. Every table a site keys by what partners
//! send (the replay cache's nonces, the journal's seen Migration request ids) is bounded per
//! partner and collected once its entries expire: a partner at its bound is refused with `busy`
//! while entries it already had accepted stay, another partner is served as before, and after a
//! long run of well-signed requests the tables and the site daemon's memory return to a bounded
//! size once the freshness window has passed.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures::future::join_all;
use nubis_bus::federation::FederationClient;
use nubis_bus::CallError;
use nubis_protocol::message::{MigrationRequest, Offers};
use nubis_protocol::subject::FederationOp;
use nubis_protocol::{MigrationId, SiteId};
use nubis_testkit::{require_nats_server, wait_until};
use serde_json::json;

use super::{descriptor, migration_request, signed_as};
use crate::stack::{ops, SiteSpec, Stack};

const LONG: Duration = Duration::from_secs(90);

/// Migration requests of the soak, unless `NUBIS_SOAK_REQUESTS` says otherwise. One the role
/// answers costs the Destination two flushed writes and two signatures; beyond the partner's
/// bound of seen request ids (some fifty a second at this test's freshness window) the rest are
/// refused `busy` for the price of a signature check. The long soak
/// (`NUBIS_SOAK_REQUESTS=100000`, about a minute and a half on two cores) is run by hand and its
/// figures are in `bench/RESULTS.md`.
const SOAK_REQUESTS: usize = 6_000;

/// The soak's request count: `NUBIS_SOAK_REQUESTS`, else [`SOAK_REQUESTS`].
fn soak_requests() -> usize {
    std::env::var("NUBIS_SOAK_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(SOAK_REQUESTS)
}

/// Requests in flight at once during the soak: as many as the site handles at once, so none
/// waits in a queue long enough to go stale.
const BATCH: usize = 64;

/// How far above its baseline the site daemon's resident memory may end, in KiB.
const RSS_SLACK_KIB: u64 = 64 * 1024;

/// A well-signed Migration request the Destination records (its id is seen) and then refuses
/// as `depth_exceeded`: the cheapest request that still fills the journal.
fn too_deep(stack: &Stack, primary: &str) -> MigrationRequest {
    MigrationRequest {
        depth: 3,
        ..migration_request(MigrationId::random(), descriptor(stack, "soak", primary))
    }
}

/// Sends `req` to site `to` and returns the refusal's code (`ok` for offers).
async fn ask(client: &FederationClient, to: &str, req: &MigrationRequest) -> String {
    let r: Result<Offers, CallError> = client
        .call(
            &SiteId::new(to).unwrap(),
            FederationOp::MigrationRequest,
            req,
        )
        .await;
    match r {
        Ok(_) => "ok".into(),
        Err(e) => match e.code() {
            Some(code) => code.as_str().to_string(),
            None => format!("no answer: {e}"),
        },
    }
}

/// The `tables` object of `site`'s status.
async fn tables(stack: &Stack, site: &str) -> BTreeMap<String, u64> {
    let op = stack.operator(site).await;
    let status = ops(&op, site, "status", json!({})).await.unwrap();
    serde_json::from_value(status["tables"].clone()).unwrap()
}

/// A site daemon process, killed when the test ends however it ends.
struct Process(std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The resident memory of process `pid`, in KiB (`VmRSS` of `/proc/<pid>/status`).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Extra configuration of the Destination: the request rate limit out of the way, so the
/// tables' own bounds are what a flood meets.
const NO_RATE_LIMIT: &str =
    "[limits]\nrequests_per_sec = 1000000000.0\nrequest_burst = 1000000000\n";

#[tokio::test]
async fn a_partner_at_its_bound_is_refused_busy_while_others_are_served() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let top: &'static str = Box::leak(
        format!(
            "[retention]\nrequests_per_partner = 40\nreplay_per_partner = 60\n\n{NO_RATE_LIMIT}"
        )
        .into_boxed_str(),
    );
    let stack = Stack::start(
        &binary,
        vec![
            SiteSpec::new("a").partner("b", 0),
            SiteSpec::new("b").partner("a", 0).partner("c", 0).top(top),
            SiteSpec::new("c").partner("b", 0),
        ],
    )
    .await;
    let a = signed_as(&stack, "a", Duration::from_secs(30)).await;
    let c = signed_as(&stack, "c", Duration::from_secs(30)).await;

    // Up to its bound, every request of a is recorded and answered by the role.
    let accepted: Vec<MigrationRequest> = (0..40).map(|_| too_deep(&stack, "b")).collect();
    for code in join_all(accepted.iter().map(|r| ask(&a, "b", r))).await {
        assert_eq!(code, "depth_exceeded");
    }
    assert_eq!(tables(&stack, "b").await["requests"], 40);
    // One more is refused as busy, and nothing of it is kept.
    assert_eq!(ask(&a, "b", &too_deep(&stack, "b")).await, "busy");
    assert_eq!(tables(&stack, "b").await["requests"], 40);
    // The ids already accepted stay: the same request again is a loop, not a new entry.
    assert_eq!(ask(&a, "b", &accepted[0]).await, "loop_detected");
    // Another partner is served as before.
    assert_eq!(ask(&c, "b", &too_deep(&stack, "b")).await, "depth_exceeded");
    assert_eq!(tables(&stack, "b").await["requests"], 41);

    // The replay cache bounds a's nonces too: 42 of a's 60 are used, the rest go, then busy
    // before any role is asked.
    let more: Vec<MigrationRequest> = (0..30).map(|_| too_deep(&stack, "b")).collect();
    let codes = join_all(more.iter().map(|r| ask(&a, "b", r))).await;
    assert!(codes.iter().all(|c| c == "busy"), "{codes:?}");
    let t = tables(&stack, "b").await;
    assert_eq!(t["replay"], 60 + 1, "a at its bound, c's one nonce: {t:?}");
    assert_eq!(ask(&c, "b", &too_deep(&stack, "b")).await, "depth_exceeded");
    stack.shutdown().await;
}

#[tokio::test]
async fn a_soak_of_well_signed_requests_leaves_bounded_tables_and_memory() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    const REQUESTS_BOUND: u64 = 500;
    const REPLAY_BOUND: u64 = 800;
    let top: &'static str = Box::leak(
        format!(
            "[retention]\nfreshness_ms = 10000\ngc_interval_ms = 250\n\
             requests_per_partner = {REQUESTS_BOUND}\nreplay_per_partner = {REPLAY_BOUND}\n\n{NO_RATE_LIMIT}"
        )
        .into_boxed_str(),
    );
    let mut stack = Stack::start(
        &binary,
        vec![
            SiteSpec::new("a").partner("b", 0),
            SiteSpec::new("b").partner("a", 0).top(top),
        ],
    )
    .await;
    let daemon = Process(stack.site_daemon_as_process("b").await);
    stack.wait_ready("b").await;
    let pid = daemon.0.id();
    let a = signed_as(&stack, "a", Duration::from_secs(30)).await;
    // Warm up (connections, first writes) before the baseline is taken.
    assert_eq!(ask(&a, "b", &too_deep(&stack, "b")).await, "depth_exceeded");
    let baseline = rss_kib(pid);

    let started = std::time::Instant::now();
    let mut codes: HashMap<String, usize> = HashMap::new();
    let mut peak = 0;
    let mut sent = 0;
    let total = soak_requests();
    while sent < total {
        let n = BATCH.min(total - sent);
        let batch: Vec<MigrationRequest> = (0..n).map(|_| too_deep(&stack, "b")).collect();
        for code in join_all(batch.iter().map(|r| ask(&a, "b", r))).await {
            *codes.entry(code).or_default() += 1;
        }
        sent += n;
        if (sent / BATCH).is_multiple_of(10) {
            let t = tables(&stack, "b").await;
            assert!(t["requests"] <= REQUESTS_BOUND, "{t:?}");
            assert!(t["replay"] <= REPLAY_BOUND + 1, "{t:?}");
            peak = peak.max(rss_kib(pid));
        }
    }
    eprintln!(
        "soak: {sent} requests in {:?}: {codes:?}; rss baseline {baseline} KiB, peak {peak} KiB",
        started.elapsed()
    );
    // Every request was answered by the role or refused as busy at a bound; nothing else.
    assert!(
        codes.keys().all(|c| c == "depth_exceeded" || c == "busy"),
        "{codes:?}"
    );
    assert!(codes.get("depth_exceeded").copied().unwrap_or(0) > 0);

    // Once the freshness window has passed, the collector empties both tables.
    wait_until(LONG, "tables collected", || async {
        let t = tables(&stack, "b").await;
        if t["requests"] == 0 && t["replay"] == 0 {
            Ok(())
        } else {
            Err(format!("{t:?}"))
        }
    })
    .await
    .unwrap();
    let after = rss_kib(pid);
    eprintln!("soak: rss after collection {after} KiB");
    assert!(
        after < baseline + RSS_SLACK_KIB,
        "resident memory {after} KiB, baseline {baseline} KiB"
    );
    // The partner is served as before.
    assert_eq!(ask(&a, "b", &too_deep(&stack, "b")).await, "depth_exceeded");

    drop(daemon);
    stack.shutdown().await;
}
