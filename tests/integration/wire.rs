//! What each site hears on the wire, with TLS on every leaf link: an observer on every site's
//! own server, subscribed to everything there (the hub decides what crosses), records what that
//! site is handed while a VM of `apex` goes through usage scenarios 1 (placed through the
//! Intermediary `bridge` at `cove` or `dock`), 3 (moved between two hosts of the site running
//! it) and 2 (evicted by that site and re-placed by `bridge` at the other one), with monitoring
//! flowing to the primary all along.
//!
//! With `bridge` relaying, nothing handed to a site names a site other than its neighbours on
//! the chain and the VM's primary: `apex` never hears of `cove` or `dock`, and neither of them
//! hears of the other. With `bridge` passing endpoints on directly, the only such mentions are
//! the ones `subjects.md` documents as the cost of direct transfers: the far Transfer proxy's
//! address, and the proxy-to-proxy calls of the transfer itself.

use std::collections::BTreeSet;
use std::time::Duration;

use nubis_protocol::envelope::SignedEnvelope;
use nubis_testkit::{require_nats_server, wait_until, Role};
use serde_json::json;

use crate::relay::{directory, heard_until_marker};
use crate::stack::{deploy_body, ops, wait_migration, SiteSpec, Stack};

const LONG: Duration = Duration::from_secs(90);
const VM: &str = "wire-1";
const PRIMARY: &str = "apex";
const SITES: [&str; 4] = ["apex", "bridge", "cove", "dock"];

/// The sites a site talks to on the VM's chains: `bridge` is the one Intermediary.
fn neighbours(site: &str) -> &'static [&'static str] {
    match site {
        "bridge" => &["apex", "cove", "dock"],
        _ => &["bridge"],
    }
}

/// One message a site's server handed to its observer.
#[derive(Debug)]
struct Heard {
    subject: String,
    reply: String,
    /// The payload, as text where it is text (MessagePack strings stay readable).
    text: String,
    /// The signed envelope's body type, signer and addressee, when it is one.
    envelope: Option<(String, String, String)>,
}

impl Heard {
    /// Whether anything of this message names `site`.
    fn names(&self, site: &str) -> bool {
        self.subject.contains(site) || self.reply.contains(site) || self.text.contains(site)
    }

    /// Whether every mention of `far` in this message is one `subjects.md` documents as the
    /// cost of a direct transfer: the address of `far`'s Transfer proxy (`nats://far/proxy/…`)
    /// in an offer, a prepared source or Initiate transfer; a call between the Source's and the
    /// Destination's proxies (`nubis.proxy.…`, signed by or addressed to `far`), its signed
    /// reply; and the JetStream reads of `far`'s transfer bucket that a fetch makes.
    fn documented_direct(&self, far: &str) -> bool {
        // A proxy's call to another proxy (status, content key, acknowledgement), signed by
        // one and addressed to the other, and its signed reply.
        let proxy_call = self.subject.starts_with("nubis.proxy.")
            || self.envelope.as_ref().is_some_and(|(body, from, to)| {
                (from == far || to == far)
                    && matches!(body.as_str(), "TransferStatusReply" | "SealedContentKey")
            });
        // A fetching proxy's reads of the serving site's transfer bucket: JetStream API calls
        // whose answers go to the fetcher's reply subjects (`nubis.reply.<fetcher>._any.…`),
        // and those answers, which name the serving site's JetStream domain.
        let bucket_read = self.subject.starts_with("$JS.")
            || (self.subject.starts_with("nubis.reply.") && self.subject.contains("._any."));
        if proxy_call || bucket_read {
            return true;
        }
        let stripped = self.text.replace(&format!("nats://{far}/proxy/"), "");
        !(self.subject.contains(far) || self.reply.contains(far) || stripped.contains(far))
    }
}

/// An observer of everything one site's server hands out.
struct Ear {
    site: &'static str,
    client: async_nats::Client,
    sub: async_nats::Subscriber,
}

impl Ear {
    async fn open(stack: &Stack, site: &'static str) -> Self {
        let client = stack.fed.connect_as(site, Role::Admin).await.unwrap();
        let sub = client.subscribe(">").await.unwrap();
        client.flush().await.unwrap();
        Self { site, client, sub }
    }

    /// Everything heard so far, up to a marker of its own; the directory (whose site entries
    /// name every member: membership is public, chains are not) left out.
    async fn drain(&mut self) -> Vec<Heard> {
        let marker = format!("nubis.test.wire-marker.{}", self.site);
        let heard = heard_until_marker(&self.client, &mut self.sub, &marker).await;
        heard
            .into_iter()
            .filter(|msg| !directory(msg))
            .map(|msg| Heard {
                subject: msg.subject.to_string(),
                reply: msg
                    .reply
                    .as_ref()
                    .map(|r| r.to_string())
                    .unwrap_or_default(),
                text: String::from_utf8_lossy(&msg.payload).into_owned(),
                envelope: SignedEnvelope::decode(&msg.payload)
                    .ok()
                    .map(|e| (e.body_type, e.from, e.to)),
            })
            .collect()
    }
}

/// The sites a site must not hear of: all but itself, its neighbours and the VM's primary.
fn beyond(site: &str) -> Vec<&'static str> {
    SITES
        .into_iter()
        .filter(|s| *s != site && *s != PRIMARY && !neighbours(site).contains(s))
        .collect()
}

/// The VM's record at `site`, as its operators see it.
async fn vm_at(op: &async_nats::Client, site: &str) -> Result<serde_json::Value, String> {
    let v = ops(op, site, "vms", json!({"vm": VM})).await?;
    Ok(v["vms"][0].clone())
}

/// Runs scenarios 1, 3 and 2 with `bridge` configured by `bridge_top`; what every site heard.
async fn scenarios(bridge_top: &'static str) -> Option<Vec<(&'static str, Vec<Heard>)>> {
    let binary = require_nats_server()?;
    let stack = Stack::start(
        &binary,
        vec![
            SiteSpec::new("apex").partner("bridge", 10),
            SiteSpec::new("bridge")
                .partner("apex", 0)
                .partner("cove", 10)
                .partner("dock", 5)
                .top(bridge_top),
            SiteSpec::new("cove")
                .partner("bridge", 0)
                .host("cove-h1", 4096)
                .host("cove-h2", 4096),
            SiteSpec::new("dock")
                .partner("bridge", 0)
                .host("dock-h1", 4096)
                .host("dock-h2", 4096),
        ],
    )
    .await;
    let mut ears = Vec::new();
    for site in SITES {
        ears.push(Ear::open(&stack, site).await);
    }
    let image: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(stack.image_store("apex").join("img.qcow2"), &image).unwrap();
    let op = |site: &'static str| stack.operator(site);
    let (op_apex, op_bridge) = (op("apex").await, op("bridge").await);

    // Usage scenario 1: apex places the VM through bridge.
    let mut body = deploy_body(VM, "img.qcow2");
    body["monitoring"] = json!([{"data_point": "cpu.utilisation", "monitoring_interval_ms": 200,
                                 "delivery_interval_ms": 400, "format": {"kind": "raw"}}]);
    let r = ops(&op_apex, "apex", "deploy", body).await.unwrap();
    let m = wait_migration(&op_apex, "apex", r["migration"].as_str().unwrap()).await;
    assert_eq!(m["phase"], "committed", "{m}");
    let (x, y) = match vm_at(&op_bridge, "bridge").await.unwrap()["next_hop"].as_str() {
        Some("site:cove") => ("cove", "dock"),
        Some("site:dock") => ("dock", "cove"),
        other => panic!("placed at {other:?}"),
    };
    let op_x = op(x).await;

    // Usage scenario 3: x moves the VM to its other host, with the same protocol.
    let before = vm_at(&op_x, x).await.unwrap()["next_hop"].clone();
    let r = ops(&op_x, x, "migrate", json!({"vm": VM, "to_site": x}))
        .await
        .unwrap();
    let m = wait_migration(&op_x, x, r["migration"].as_str().unwrap()).await;
    assert_eq!(m["phase"], "committed", "{m}");
    let after = vm_at(&op_x, x).await.unwrap();
    assert_ne!(after["next_hop"], before, "{after}");
    assert_eq!(after["upstream"], "bridge", "{after}");

    // Usage scenario 2: x evicts the VM; bridge, its upstream, re-places it at y.
    let notice = ops(&op_x, x, "evict", json!({"vm": VM})).await.unwrap();
    assert_eq!(notice["sent_to"], "bridge", "{notice}");
    wait_until(LONG, "bridge re-places the VM at y", || async {
        let v = vm_at(&op_bridge, "bridge").await?;
        if v["next_hop"] == format!("site:{y}") && v["phase"] == "placed" {
            Ok(())
        } else {
            Err(v.to_string())
        }
    })
    .await
    .unwrap();
    let op_y = op(y).await;
    let at_y = vm_at(&op_y, y).await.unwrap();
    assert_eq!(at_y["upstream"], "bridge", "{at_y}");
    let host = at_y["next_hop"]
        .as_str()
        .unwrap()
        .trim_start_matches("host:");
    let disk = stack.vm_root(y, host).join(VM).join("disk-vda.qcow2");
    assert_eq!(
        std::fs::read(disk).unwrap(),
        image,
        "the disk did not verify"
    );
    // Monitoring from y reaches the primary.
    let batches = || async {
        let v = ops(&op_apex, "apex", "usage", json!({"vm": VM})).await?;
        Ok::<u64, String>(v["batches"].as_u64().unwrap_or(0))
    };
    let so_far = batches().await.unwrap();
    wait_until(
        LONG,
        "monitoring from the new site at the primary",
        || async {
            match batches().await? {
                n if n >= so_far + 2 => Ok(()),
                n => Err(format!("{n} batches")),
            }
        },
    )
    .await
    .unwrap();

    let mut heard = Vec::new();
    for mut ear in ears {
        let h = ear.drain().await;
        assert!(
            h.iter().any(|m| m.names(VM)),
            "{} heard nothing about the VM",
            ear.site
        );
        heard.push((ear.site, h));
    }
    stack.shutdown().await;
    Some(heard)
}

/// Every message heard by each site that names a site beyond its neighbours, as
/// `(site heard, site named, message)`.
fn beyond_neighbours<'h>(
    heard: &'h [(&'static str, Vec<Heard>)],
) -> Vec<(&'static str, &'static str, &'h Heard)> {
    let mut out = Vec::new();
    for (site, messages) in heard {
        for far in beyond(site) {
            for m in messages.iter().filter(|m| m.names(far)) {
                out.push((*site, far, m));
            }
        }
    }
    out
}

/// With `bridge` relaying towards every partner, no site hears of a site beyond its
/// neighbours and the primary, through three usage scenarios and the monitoring in between.
#[tokio::test]
async fn relayed_a_site_hears_of_no_site_beyond_its_neighbours() {
    let Some(heard) = scenarios("[transfer]\ndefault = \"relay\"\n").await else {
        return;
    };
    let leaks = beyond_neighbours(&heard);
    assert!(
        leaks.is_empty(),
        "{}",
        leaks
            .iter()
            .map(|(s, far, m)| format!("{s} heard of {far}: {m:?}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The counterpart: with `bridge` passing endpoints on directly (the default), the sites at
/// both ends and apex do hear of a site beyond their neighbours — through the far proxy's
/// address and the proxies' own calls, exactly what `subjects.md` documents, and nothing else.
#[tokio::test]
async fn direct_a_site_hears_of_far_sites_only_through_documented_proxy_traffic() {
    let Some(heard) = scenarios("").await else {
        return;
    };
    let leaks = beyond_neighbours(&heard);
    let sites: BTreeSet<&str> = leaks.iter().map(|(s, _, _)| *s).collect();
    assert!(
        sites.contains("apex") && sites.contains("cove") && sites.contains("dock"),
        "direct transfers named no far proxy to {sites:?}"
    );
    let kinds: BTreeSet<String> = leaks
        .iter()
        .map(|(s, far, m)| {
            let head: Vec<&str> = m.subject.split('.').take(3).collect();
            let body = m.envelope.as_ref().map(|e| e.0.as_str()).unwrap_or("-");
            format!("{s} hears {far}: {} {body}", head.join("."))
        })
        .collect();
    eprintln!("direct transfers: {kinds:#?}");
    let undocumented: Vec<String> = leaks
        .iter()
        .filter(|(_, far, m)| !m.documented_direct(far))
        .map(|(s, far, m)| format!("{s} heard of {far}: {m:?}"))
        .collect();
    assert!(undocumented.is_empty(), "{}", undocumented.join("\n"));
}
