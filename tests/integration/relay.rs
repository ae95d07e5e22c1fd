//! Relaying by policy (paper III-D, location unawareness) end to end: a placement from `apex`
//! goes through the Intermediary `bridge` to `cove`, which runs the VM. With `bridge`'s
//! `[transfer] default = "relay"`, everything `apex` receives names `bridge` and never `cove`:
//! the offers, the migration, the proxy that fetches `apex`'s files. With `direct` (the
//! default) the offer passed up names `cove`'s proxy, which then fetches from `apex` itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use nubis_protocol::envelope::SignedEnvelope;
use nubis_protocol::message::{Offers, Prepared, TransferProgress, TransferRole};
use nubis_testkit::{require_nats_server, wait_until, Role};
use serde_json::{json, Value};

use crate::stack::{deploy_body, ops, wait_migration, SiteSpec, Stack};

const LONG: Duration = Duration::from_secs(90);

/// What `apex`'s server delivered to a client subscribed to everything there.
#[derive(Debug, Default)]
struct Seen {
    /// Every message that names `cove` (subject, reply subject or payload), as subject: text.
    naming_far_end: Vec<String>,
    /// The proxies of every offer in an `Offers` reply delivered at `apex`.
    offer_proxies: Vec<String>,
    /// The proxies of every source in a `Prepared` reply delivered at `apex`.
    source_proxies: Vec<String>,
    /// The sites whose proxies asked apex's proxy about a token (status, content key, ack).
    proxy_askers: Vec<String>,
    /// How many messages were read.
    count: usize,
}

/// Everything `sub` (a subscription of `client`'s) received so far: `client` publishes to
/// `marker`, which `sub` must hear, and what came before it is returned.
pub(crate) async fn heard_until_marker(
    client: &async_nats::Client,
    sub: &mut async_nats::Subscriber,
    marker: &str,
) -> Vec<async_nats::Message> {
    client
        .publish(marker.to_string(), "end".into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    let mut out = Vec::new();
    loop {
        let msg = tokio::time::timeout(LONG, sub.next())
            .await
            .expect("the observer's marker never came back")
            .expect("the observer's subscription ended");
        if msg.subject.as_str() == marker {
            return out;
        }
        out.push(msg);
    }
}

/// Whether `msg` belongs to the directory, which lists every member site and its proxies to
/// every other (membership is public; the chain of a VM is not).
pub(crate) fn directory(msg: &async_nats::Message) -> bool {
    let header = |name: &str| {
        msg.headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_string())
            .unwrap_or_default()
    };
    msg.subject.starts_with("$KV.nubis-directory.")
        || header("Nats-Stream") == "KV_nubis-directory"
        || header("Nats-Subject").starts_with("$KV.nubis-directory.")
}

/// The chain apex → bridge → cove, cove's hosts `cove_hosts`, bridge configured by
/// `bridge_top`, and an observer of everything apex's own server hands to its clients: its
/// administrator subscribes to every subject there (the hub still decides what crosses).
struct Chain {
    stack: Stack,
    observer: async_nats::Client,
    seen: async_nats::Subscriber,
    op_apex: async_nats::Client,
    op_bridge: async_nats::Client,
    op_cove: async_nats::Client,
    /// The image `web-1` is placed from.
    image: Vec<u8>,
}

impl Chain {
    async fn start(bridge_top: &'static str, cove_hosts: &[&'static str]) -> Option<Self> {
        let binary = require_nats_server()?;
        let mut cove = SiteSpec::new("cove").partner("bridge", 0);
        for h in cove_hosts {
            cove = cove.host(h, 4096);
        }
        let stack = Stack::start(
            &binary,
            vec![
                SiteSpec::new("apex").partner("bridge", 10),
                SiteSpec::new("bridge")
                    .partner("apex", 0)
                    .partner("cove", 10)
                    .top(bridge_top),
                cove,
            ],
        )
        .await;
        let observer = stack.fed.connect_as("apex", Role::Admin).await.unwrap();
        let seen = observer.subscribe(">").await.unwrap();
        observer.flush().await.unwrap();
        let image: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(stack.image_store("apex").join("tiny.qcow2"), &image).unwrap();
        Some(Self {
            op_apex: stack.operator("apex").await,
            op_bridge: stack.operator("bridge").await,
            op_cove: stack.operator("cove").await,
            stack,
            observer,
            seen,
            image,
        })
    }

    /// Places `web-1` from apex; the migration's view at apex.
    async fn deploy(&self) -> Value {
        let body = deploy_body("web-1", "tiny.qcow2");
        let r = ops(&self.op_apex, "apex", "deploy", body).await.unwrap();
        let m = wait_migration(&self.op_apex, "apex", r["migration"].as_str().unwrap()).await;
        assert_eq!(m["phase"], "committed", "{m}");
        assert_eq!(m["bytes_done"], m["bytes_total"], "{m}");
        m
    }

    /// `web-1` as `site` records it.
    async fn vm(&self, site: &str) -> Value {
        let client = match site {
            "apex" => &self.op_apex,
            "bridge" => &self.op_bridge,
            _ => &self.op_cove,
        };
        let v = ops(client, site, "vms", json!({"vm": "web-1"}))
            .await
            .unwrap();
        v["vms"][0].clone()
    }

    /// Checks the chain apex → bridge → cove → `host`, each site knowing its next hop only,
    /// `web-1`'s image byte for byte on `host`, and the VM running (asked from the primary).
    async fn check_placed_at(&self, host: &str) {
        let at_apex = self.vm("apex").await;
        assert_eq!(at_apex["next_hop"], "site:bridge", "{at_apex}");
        assert!(!at_apex.to_string().contains("cove"), "{at_apex}");
        let at_bridge = self.vm("bridge").await;
        assert_eq!(
            (&at_bridge["upstream"], &at_bridge["next_hop"]),
            (&Value::from("apex"), &Value::from("site:cove")),
            "{at_bridge}"
        );
        let at_cove = self.vm("cove").await;
        assert_eq!(at_cove["upstream"], "bridge", "{at_cove}");
        assert_eq!(at_cove["next_hop"], format!("host:{host}"), "{at_cove}");
        let disk = self
            .stack
            .vm_root("cove", host)
            .join("web-1")
            .join("disk-vda.qcow2");
        assert_eq!(std::fs::read(disk).unwrap(), self.image);
        let q = ops(
            &self.op_apex,
            "apex",
            "control",
            json!({"vm": "web-1", "change": {"kind": "query"}}),
        )
        .await
        .unwrap();
        assert_eq!(q["state"], "enabled", "{q}");
    }

    /// Everything apex's server delivered so far (read up to a marker).
    async fn drain(&mut self) -> Seen {
        let mut out = Seen::default();
        let heard =
            heard_until_marker(&self.observer, &mut self.seen, "nubis.test.relay-marker").await;
        for msg in heard {
            out.count += 1;
            if directory(&msg) {
                continue;
            }
            if let Ok(env) = SignedEnvelope::decode(&msg.payload) {
                if msg.subject.as_str() == "nubis.proxy.apex.p1.status" && env.from != "apex" {
                    out.proxy_askers.push(env.from.clone());
                }
                if env.body_type == "Offers" {
                    if let Ok(o) = nubis_protocol::codec::from_slice::<Offers>(&env.body) {
                        out.offer_proxies
                            .extend(o.offers.iter().map(|o| o.proxy.to_string()));
                    }
                }
                if env.body_type == "Prepared" {
                    if let Ok(p) = nubis_protocol::codec::from_slice::<Prepared>(&env.body) {
                        out.source_proxies.push(p.source.proxy.to_string());
                    }
                }
            }
            let reply = msg.reply.as_ref().map(|r| r.as_str()).unwrap_or("");
            let text = String::from_utf8_lossy(&msg.payload);
            if msg.subject.contains("cove") || reply.contains("cove") || text.contains("cove") {
                out.naming_far_end
                    .push(format!("{} (reply {reply}): {text}", msg.subject));
            }
        }
        assert!(
            out.count > 10,
            "the observer saw only {} messages",
            out.count
        );
        out
    }
}

/// Asserts that nothing in `seen` names the far end, and that it saw offers at all.
fn assert_hidden(seen: &Seen) {
    assert!(
        seen.naming_far_end.is_empty(),
        "apex received messages naming the far end:\n{}",
        seen.naming_far_end.join("\n")
    );
    for p in seen.offer_proxies.iter().chain(&seen.source_proxies) {
        assert!(p.contains("bridge"), "apex was named proxy {p}");
    }
}

/// A relaying Intermediary: the Controller's offers, the transfer and everything else apex
/// receives name only the Intermediary; the VM still runs at the far end, its files verified
/// at every hop.
#[tokio::test]
async fn a_relaying_intermediary_hides_the_far_end_from_the_controller() {
    let Some(mut chain) = Chain::start(RELAY, &["rack7-node3"]).await else {
        return;
    };
    let m = chain.deploy().await;
    assert!(!m.to_string().contains("cove"), "{m}");
    chain.check_placed_at("rack7-node3").await;
    let seen = chain.drain().await;
    assert!(!seen.offer_proxies.is_empty(), "no offer reached apex");
    // The files left apex through bridge's proxy.
    assert!(!seen.proxy_askers.is_empty());
    assert!(
        seen.proxy_askers.iter().all(|s| s == "bridge"),
        "{:?}",
        seen.proxy_askers
    );
    assert_hidden(&seen);
    chain.stack.shutdown().await;
}

/// The legitimate counterpart: a direct Intermediary (the default) passes the far end's offer
/// on as it is, so apex learns cove's proxy, which fetches apex's files itself.
#[tokio::test]
async fn a_direct_intermediary_passes_the_far_ends_proxy_on() {
    let Some(mut chain) = Chain::start("", &["rack7-node3"]).await else {
        return;
    };
    chain.deploy().await;
    chain.check_placed_at("rack7-node3").await;
    let seen = chain.drain().await;
    assert!(
        seen.offer_proxies.iter().any(|p| p.contains("cove")),
        "{:?}",
        seen.offer_proxies
    );
    assert!(
        seen.proxy_askers.iter().any(|s| s == "cove"),
        "{:?}",
        seen.proxy_askers
    );
    assert!(!seen.naming_far_end.is_empty());
    chain.stack.shutdown().await;
}

/// The host the VM runs on at cove, and the other one.
async fn hosts_of(chain: &Chain) -> (&'static str, &'static str) {
    let at = chain.vm("cove").await;
    if at["next_hop"] == "host:rack7-node3" {
        ("rack7-node3", "rack7-node4")
    } else {
        ("rack7-node4", "rack7-node3")
    }
}

/// A migration apex controls of a VM behind the relaying bridge: the source bridge passes up
/// is its own relaying token (bridge's proxy serves cove's files), the offer its own too, and
/// the VM moves between cove's hosts with nothing at apex naming cove.
#[tokio::test]
async fn a_forced_migration_through_a_relaying_site_names_only_it() {
    let Some(mut chain) = Chain::start(RELAY, &["rack7-node3", "rack7-node4"]).await else {
        return;
    };
    chain.deploy().await;
    let (from, to) = hosts_of(&chain).await;
    chain.check_placed_at(from).await;
    let r = ops(&chain.op_apex, "apex", "migrate", json!({"vm": "web-1"}))
        .await
        .unwrap();
    let m = wait_migration(&chain.op_apex, "apex", r["migration"].as_str().unwrap()).await;
    assert_eq!(m["phase"], "committed", "{m}");
    chain.check_placed_at(to).await;
    assert!(
        !chain.stack.vm_root("cove", from).join("web-1").exists(),
        "the VM's files stayed on {from}"
    );
    let seen = chain.drain().await;
    assert!(
        !seen.source_proxies.is_empty(),
        "no prepared source reached apex"
    );
    assert_hidden(&seen);
    chain.stack.shutdown().await;
}

/// The operator's bandwidth cap holds on the relayed leg too: apex moves `web-1` between
/// cove's hosts with a cap, bridge relays the prepared source, and bridge's proxy fetches it
/// from cove no faster than the cap (read from the relaying transfer's own progress events,
/// heard by bridge's operators); the files still arrive whole. Placing the VM, without a cap,
/// goes through the same relaying.
#[tokio::test]
async fn a_bandwidth_cap_paces_the_relayed_leg() {
    let Some(mut chain) = Chain::start(RELAY, &["rack7-node3", "rack7-node4"]).await else {
        return;
    };
    chain.image = (0..(4u32 << 20)).map(|i| (i % 251) as u8).collect();
    std::fs::write(
        chain.stack.image_store("apex").join("tiny.qcow2"),
        &chain.image,
    )
    .unwrap();
    let ear = chain
        .stack
        .fed
        .connect_as("bridge", Role::Operator)
        .await
        .unwrap();
    let mut progress = ear
        .subscribe("nubis.proxy.bridge.*.progress.>")
        .await
        .unwrap();
    ear.flush().await.unwrap();
    // How long each relaying transfer at bridge ran, from its first progress event to its
    // last as they arrive, and the most bytes it reported, by migration.
    let spans: Arc<Mutex<Spans>> = Arc::default();
    let into = spans.clone();
    let collector = tokio::spawn(async move {
        let _ear = ear;
        while let Some(m) = progress.next().await {
            let now = Instant::now();
            let env = SignedEnvelope::decode(&m.payload).unwrap();
            let p: TransferProgress = nubis_protocol::codec::from_slice(&env.body).unwrap();
            if p.role != TransferRole::Relay {
                continue;
            }
            let mut spans = into.lock().unwrap();
            let e = spans
                .entry(p.migration_id.to_string())
                .or_insert((now, now, 0));
            e.1 = now;
            e.2 = e.2.max(p.bytes_done);
        }
    });
    let placed = chain.deploy().await;
    let (from, to) = hosts_of(&chain).await;
    let cap: u64 = 512 << 10;
    let r = ops(
        &chain.op_apex,
        "apex",
        "migrate",
        json!({"vm": "web-1", "max_bytes_per_sec": cap}),
    )
    .await
    .unwrap();
    let moved = wait_migration(&chain.op_apex, "apex", r["migration"].as_str().unwrap()).await;
    assert_eq!(moved["phase"], "committed", "{moved}");
    chain.check_placed_at(to).await;
    assert_ne!(from, to);
    // The last events of both relaying transfers reach the collector.
    wait_until(LONG, "the relays' last progress events", || async {
        let spans = spans.lock().unwrap();
        let done = |v: &Value| {
            spans
                .get(v["migration"].as_str().unwrap_or(""))
                .is_some_and(|s| s.2 >= 4 << 20)
        };
        if done(&placed) && done(&moved) {
            Ok(())
        } else {
            Err(format!("{} relays heard", spans.len()))
        }
    })
    .await
    .unwrap();
    collector.abort();
    let spans = spans.lock().unwrap().clone();
    let span = |view: &Value| {
        let (first, last, bytes) = spans[view["migration"].as_str().unwrap()];
        (last.duration_since(first).as_secs_f64(), bytes)
    };
    let (capped_s, capped_bytes) = span(&moved);
    // The pacer lets one chunk (1 MiB) through at once; the rest waits for the cap.
    let floor = (capped_bytes - (1 << 20)) as f64 / cap as f64;
    assert!(
        capped_s >= floor,
        "bridge relayed {capped_bytes} bytes in {capped_s} s, faster than {cap} B/s allows ({floor} s)"
    );
    chain.stack.shutdown().await;
}

/// Per migration: the first and last progress event of a relaying transfer, and its bytes.
type Spans = HashMap<String, (Instant, Instant, u64)>;

/// bridge's policy: relay towards every partner.
const RELAY: &str = "[transfer]\ndefault = \"relay\"\n";

/// A process killed when the test ends, however it ends.
struct KilledOnDrop(std::process::Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// bridge's relaying proxy is killed with SIGKILL in the middle of a relayed placement — at
/// the step where it grants cove's proxy the key to what it relays, so the grant is recorded
/// but never answered — and started again: the placement ends (committed or aborted), and the
/// VM is placed exactly once, or nowhere.
#[tokio::test]
async fn a_relaying_proxy_killed_mid_transfer_leaves_the_vm_placed_once() {
    let Some(mut chain) = Chain::start(RELAY, &["rack7-node3"]).await else {
        return;
    };
    let mut proxy = chain
        .stack
        .proxy_as_process(
            "bridge",
            "bridge-proxy-killed.log",
            &[("NUBIS_TEST_KILL_AT", "content key granted")],
        )
        .await;
    let body = deploy_body("web-1", "tiny.qcow2");
    let r = ops(&chain.op_apex, "apex", "deploy", body).await.unwrap();
    // The kill lands at that step, whatever the timing.
    let status = tokio::task::spawn_blocking(move || proxy.wait().unwrap())
        .await
        .unwrap();
    assert!(!status.success(), "the proxy was not killed: {status}");
    let _restarted = KilledOnDrop(
        chain
            .stack
            .proxy_as_process("bridge", "bridge-proxy-again.log", &[])
            .await,
    );
    let m = wait_migration(&chain.op_apex, "apex", r["migration"].as_str().unwrap()).await;
    eprintln!("the placement ended {}", m["phase"]);
    match m["phase"].as_str() {
        Some("committed") => chain.check_placed_at("rack7-node3").await,
        Some("aborted") => {
            let at_apex = chain.vm("apex").await;
            assert_eq!(at_apex["next_hop"], Value::Null, "{at_apex}");
            let at_cove = ops(&chain.op_cove, "cove", "vms", json!({})).await.unwrap();
            assert_eq!(at_cove["vms"], json!([]), "{at_cove}");
        }
        other => panic!("the placement did not end: {other:?} {m}"),
    }
    let seen = chain.drain().await;
    assert_hidden(&seen);
    chain.stack.shutdown().await;
}
