//! The site daemon against a real hub and leaf sites: the directory (appearance, liveness,
//! forged and non-partner entries), and the operator API as a NATS micro service.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use nubis_protocol::envelope::{self, now_ms, Addressing};
use nubis_protocol::identity::SiteIdentity;
use nubis_protocol::message::SiteEntry;
use nubis_protocol::subject::{DirectoryKey, DIRECTORY_BUCKET};
use nubis_protocol::SiteId;
use nubis_site::config::SiteConfig;
use nubis_testkit::{require_nats_server, wait_until, Federation, Role, DEFAULT_TIMEOUT, HUB};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A site daemon running in this process.
struct RunningSite {
    token: CancellationToken,
    handle: JoinHandle<Result<(), nubis_site::SiteError>>,
}

impl RunningSite {
    async fn stop(self) {
        self.token.cancel();
        self.handle.await.unwrap().unwrap();
    }
}

/// Key files and configurations of a set of sites that are all partners of each other
/// (except those listed in `strangers`, which nobody pins).
struct Sites {
    dir: tempfile::TempDir,
    identities: Vec<Arc<SiteIdentity>>,
}

impl Sites {
    fn new(ids: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let identities = ids
            .iter()
            .map(|id| {
                let identity = SiteIdentity::generate(SiteId::new(*id).unwrap());
                identity
                    .save(&dir.path().join(format!("{id}.key")), false)
                    .unwrap();
                Arc::new(identity)
            })
            .collect();
        Self { dir, identities }
    }

    fn identity(&self, id: &str) -> &SiteIdentity {
        self.identities
            .iter()
            .find(|i| i.site().as_str() == id)
            .unwrap()
    }

    /// The configuration text of `id`, logging in as `user`, pinning every site in `partners`.
    fn config_text(
        &self,
        id: &str,
        url: &str,
        user: &(String, String),
        partners: &[&str],
    ) -> String {
        let (user, password) = user;
        let mut text = format!(
            "site = \"{id}\"\nkey_file = \"{id}.key\"\nnats_url = \"{url}\"\ndata_dir = \"{id}-data\"\n\
             nats_user = \"{user}\"\nnats_password = \"{password}\"\n\
             [directory]\nheartbeat_ms = 200\nliveness_timeout_ms = 1500\n\n"
        );
        for p in partners {
            text.push_str(&self.identity(p).public().partner_snippet());
            text.push('\n');
        }
        text
    }

    fn config(
        &self,
        id: &str,
        url: &str,
        user: &(String, String),
        partners: &[&str],
    ) -> SiteConfig {
        let path = self.dir.path().join(format!("{id}.toml"));
        let text = self.config_text(id, url, user, partners);
        std::fs::write(&path, &text).unwrap();
        SiteConfig::load(&path).unwrap()
    }

    fn start(&self, fed: &Federation, id: &str, partners: &[&str]) -> RunningSite {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter("info")
            .try_init();
        let user = fed.credentials(id, Role::Site).unwrap();
        let config = self.config(id, &fed.site_url(id).unwrap(), &user, partners);
        let token = CancellationToken::new();
        let run = nubis_site::run(config, token.clone());
        let handle = tokio::spawn(async move {
            let result = run.await;
            if let Err(e) = &result {
                // Visible in the test output when a daemon dies before the test looks at it.
                eprintln!("site daemon stopped with an error: {e:?}");
            }
            result
        });
        RunningSite { token, handle }
    }
}

/// One operator client per site: a site's operator API answers only its own operators.
async fn operators(
    fed: &Federation,
    ids: &[&str],
) -> std::collections::HashMap<String, async_nats::Client> {
    let mut clients = std::collections::HashMap::new();
    for id in ids {
        clients.insert(
            (*id).to_owned(),
            fed.connect_as(id, Role::Operator).await.unwrap(),
        );
    }
    clients
}

async fn ops(client: &async_nats::Client, site: &str, endpoint: &str) -> serde_json::Value {
    let msg = client
        .request(format!("nubis.ops.{site}.{endpoint}"), "{}".into())
        .await
        .unwrap();
    serde_json::from_slice(&msg.payload).unwrap()
}

/// The `sites` view of `site` as (site, trusted, reachable) triples, when the site answers.
async fn view(
    client: &async_nats::Client,
    site: &str,
) -> Result<Vec<(String, bool, bool)>, String> {
    let msg = tokio::time::timeout(
        Duration::from_secs(2),
        client.request(format!("nubis.ops.{site}.sites"), "{}".into()),
    )
    .await
    .map_err(|_| "timeout".to_string())?
    .map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_slice(&msg.payload).map_err(|e| e.to_string())?;
    Ok(v["sites"]
        .as_array()
        .ok_or("no sites")?
        .iter()
        .map(|s| {
            (
                s["site"].as_str().unwrap_or_default().to_string(),
                s["trusted"].as_bool().unwrap_or(false),
                s["reachable"].as_bool().unwrap_or(false),
            )
        })
        .collect())
}

async fn wait_view(
    client: &async_nats::Client,
    site: &str,
    what: &str,
    want: impl Fn(&[(String, bool, bool)]) -> bool,
) {
    wait_until(DEFAULT_TIMEOUT, what, || async {
        let v = view(client, site).await?;
        if want(&v) {
            Ok(())
        } else {
            Err(format!("view of {site}: {v:?}"))
        }
    })
    .await
    .unwrap();
}

fn has(v: &[(String, bool, bool)], site: &str, trusted: bool, reachable: bool) -> bool {
    v.iter()
        .any(|(s, t, r)| s == site && *t == trusted && *r == reachable)
}

#[tokio::test]
async fn sites_appear_go_unreachable_and_come_back() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let fed = Federation::start_with(&binary, &["a", "b", "c"])
        .await
        .unwrap();
    let sites = Sites::new(&["a", "b", "c"]);
    let a = sites.start(&fed, "a", &["b", "c"]);
    let b = sites.start(&fed, "b", &["a", "c"]);
    let c = sites.start(&fed, "c", &["a", "b"]);
    let op = operators(&fed, &["a", "b", "c"]).await;

    for (me, others) in [("a", ["b", "c"]), ("b", ["a", "c"]), ("c", ["a", "b"])] {
        wait_view(&op[me], me, "every partner trusted and reachable", |v| {
            others.iter().all(|o| has(v, o, true, true))
        })
        .await;
    }

    c.stop().await;
    wait_view(&op["a"], "a", "c marked unreachable", |v| {
        has(v, "c", true, false)
    })
    .await;
    wait_view(&op["b"], "b", "c marked unreachable", |v| {
        has(v, "c", true, false)
    })
    .await;

    let c = sites.start(&fed, "c", &["a", "b"]);
    wait_view(&op["a"], "a", "c reachable again", |v| {
        has(v, "c", true, true)
    })
    .await;

    let status = ops(&op["a"], "a", "status").await;
    assert_eq!(status["site"], "a");
    assert_eq!(status["partners"], 2);
    assert_eq!(status["partners_reachable"], 2);
    assert_eq!(
        ops(&op["a"], "a", "vms").await["vms"],
        serde_json::json!([])
    );
    for s in [a, b, c] {
        s.stop().await;
    }
}

#[tokio::test]
async fn forged_entries_are_ignored_and_strangers_are_not_trusted() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let fed = Federation::start_with(&binary, &["a", "b", "c"])
        .await
        .unwrap();
    let sites = Sites::new(&["a", "b", "c"]);
    // a and b are partners; c is a stranger to a.
    let a = sites.start(&fed, "a", &["b"]);
    let b = sites.start(&fed, "b", &["a"]);
    let c = sites.start(&fed, "c", &[]);
    let client = fed.connect_as("a", Role::Operator).await.unwrap();
    wait_view(&client, "a", "b trusted, c visible but untrusted", |v| {
        has(v, "b", true, true) && has(v, "c", false, true)
    })
    .await;

    // Stop b, then forge a fresh-looking entry for b signed with an impostor's key.
    b.stop().await;
    let impostor = SiteIdentity::generate(SiteId::new("b").unwrap());
    let key = DirectoryKey::site(impostor.site());
    let forged = SiteEntry {
        site: impostor.site().clone(),
        signing_key: impostor.public().signing.to_bytes(),
        sealing_key: impostor.public().sealing,
        proxies: Vec::new(),
        subjects: Vec::new(),
        heartbeat_ms: now_ms() + 3_600_000,
        started_ms: now_ms(),
    };
    let env = envelope::sign(
        &impostor,
        Addressing::broadcast(key.subject().as_str()),
        &forged,
        now_ms(),
    )
    .unwrap();
    // Only b's own leaf connection may write b's entry, so the forger is the hub's operator.
    let kv = jetstream::with_domain(fed.connect(HUB).await.unwrap(), "hub")
        .get_key_value(DIRECTORY_BUCKET)
        .await
        .unwrap();
    kv.put(key.as_str(), env.encode().unwrap().into())
        .await
        .unwrap();

    // The forgery must not make b look alive: a still sees b as trusted (last good entry) and,
    // once its real heartbeat is old, unreachable.
    wait_view(&client, "a", "forged b ignored", |v| {
        has(v, "b", true, false)
    })
    .await;

    a.stop().await;
    c.stop().await;
}

#[tokio::test]
async fn the_operator_api_is_a_nats_micro_service() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let fed = Federation::start_with(&binary, &["a", "b"]).await.unwrap();
    let sites = Sites::new(&["a", "b"]);
    let a = sites.start(&fed, "a", &["b"]);
    let client = fed.connect_as("a", Role::Operator).await.unwrap();
    wait_view(&client, "a", "a answers", |_| true).await;

    let ping = client
        .request("$SRV.PING.nubis-site", "".into())
        .await
        .unwrap();
    let ping: serde_json::Value = serde_json::from_slice(&ping.payload).unwrap();
    assert_eq!(ping["type"], "io.nats.micro.v1.ping_response");
    assert_eq!(ping["name"], "nubis-site");
    assert!(ping["id"].as_str().is_some_and(|id| !id.is_empty()));
    assert!(ping["version"].as_str().is_some());
    assert_eq!(ping["metadata"]["site"], "a");

    let info = client
        .request("$SRV.INFO.nubis-site", "".into())
        .await
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.payload).unwrap();
    assert_eq!(info["type"], "io.nats.micro.v1.info_response");
    let endpoints = info["endpoints"].as_array().unwrap();
    let names: Vec<&str> = endpoints
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    let all = [
        "status",
        "sites",
        "vms",
        "deploy",
        "migrate",
        "evict",
        "control",
        "cancel",
        "usage",
        "monitoring",
        "images",
        "image_put",
    ];
    assert_eq!(names.len(), all.len(), "{info}");
    for name in all {
        assert!(names.contains(&name), "{info}");
        let e = endpoints.iter().find(|e| e["name"] == name).unwrap();
        assert_eq!(e["subject"], format!("nubis.ops.a.{name}"));
    }

    // One good request and one malformed request, then the counts in STATS.
    ops(&client, "a", "status").await;
    let bad = client
        .request("nubis.ops.a.status", "[1,2".into())
        .await
        .unwrap();
    let headers = bad.headers.unwrap();
    assert_eq!(
        headers.get("Nats-Service-Error-Code").unwrap().as_str(),
        "400"
    );
    assert!(headers
        .get("Nats-Service-Error")
        .unwrap()
        .as_str()
        .contains("malformed request"));

    let stats = client
        .request("$SRV.STATS.nubis-site", "".into())
        .await
        .unwrap();
    let stats: serde_json::Value = serde_json::from_slice(&stats.payload).unwrap();
    assert_eq!(stats["type"], "io.nats.micro.v1.stats_response");
    let status = stats["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "status")
        .unwrap();
    assert_eq!(status["num_requests"], 2, "{stats}");
    assert_eq!(status["num_errors"], 1, "{stats}");
    assert!(
        status["last_error"].as_str().unwrap().contains("malformed"),
        "{stats}"
    );
    a.stop().await;
}

/// The GMA directory: producers and consumers of a VM's monitoring register in the directory;
/// a consumer finds the producer by VM id alone (an opaque producer id and a subject, no host);
/// a registration signed by a non-partner is visible but not trusted, a forged one is dropped.
#[tokio::test]
async fn gma_registrations_are_found_by_vm_id_and_trusted_only_from_partners() {
    use nubis_protocol::descriptor::DataPoint;
    use nubis_protocol::envelope::Verifier;
    use nubis_protocol::message::{ConsumerRegistration, ProducerId, ProducerRegistration};
    use nubis_protocol::replay::ReplayCache;
    use nubis_protocol::VmId;
    use nubis_site::directory::{open_bucket, Directory};

    let Some(binary) = require_nats_server() else {
        return;
    };
    let fed = Federation::start_with(&binary, &["a", "b", "c"])
        .await
        .unwrap();
    let ids: Vec<Arc<SiteIdentity>> = ["a", "b", "c"]
        .iter()
        .map(|s| Arc::new(SiteIdentity::generate(SiteId::new(*s).unwrap())))
        .collect();
    let directory = |me: usize, pinned: &[usize]| {
        let ids = ids.clone();
        let pinned: Vec<usize> = pinned.to_vec();
        let fed = &fed;
        async move {
            let site = ["a", "b", "c"][me];
            let js = jetstream::with_domain(fed.connect(site).await.unwrap(), "hub");
            let kv = open_bucket(&js).await.unwrap();
            let keys = pinned
                .iter()
                .map(|i| (ids[*i].site().clone(), ids[*i].public().signing));
            let verifier = Verifier::new(
                ids[me].site().clone(),
                keys,
                ReplayCache::temporary(0).unwrap(),
            );
            Directory::new(kv, ids[me].clone(), verifier)
        }
    };
    let dir_a = directory(0, &[0, 1]).await;
    let dir_b = directory(1, &[0, 1]).await;
    let dir_c = directory(2, &[2]).await;
    let vm = VmId::new("web-1").unwrap();
    let producer = |id: &str| ProducerRegistration {
        vm: vm.clone(),
        primary_site: SiteId::new("a").unwrap(),
        producer: ProducerId::new(id).unwrap(),
        data_points: vec![DataPoint::new("cpu.utilisation").unwrap()],
        subject: "nubis.mon.a.web-1.>".into(),
        heartbeat_ms: now_ms(),
    };
    dir_b.register_producer(&producer("p-7f3a")).await.unwrap();
    dir_c
        .register_producer(&producer("p-stranger"))
        .await
        .unwrap();
    dir_a
        .register_consumer(&ConsumerRegistration {
            consumer_site: SiteId::new("a").unwrap(),
            vm: vm.clone(),
            data_points: vec![DataPoint::new("cpu.utilisation").unwrap()],
            downstream: None,
            heartbeat_ms: now_ms(),
        })
        .await
        .unwrap();
    // A forgery: c writes a producer entry that claims to be signed by b.
    let impostor = SiteIdentity::generate(SiteId::new("b").unwrap());
    let key = DirectoryKey::producer(
        &SiteId::new("c").unwrap(),
        &vm,
        &ProducerId::new("p-forged").unwrap(),
    );
    let env = envelope::sign(
        &impostor,
        Addressing::broadcast(key.subject().as_str()),
        &producer("p-forged"),
        now_ms(),
    )
    .unwrap();
    let kv_c = jetstream::with_domain(fed.connect("c").await.unwrap(), "hub")
        .get_key_value(DIRECTORY_BUCKET)
        .await
        .unwrap();
    kv_c.put(key.as_str(), env.encode().unwrap().into())
        .await
        .unwrap();

    let found = dir_a.producers_of(&vm).await.unwrap();
    let trusted: Vec<_> = found.iter().filter(|r| r.trusted).collect();
    assert_eq!(trusted.len(), 1, "{found:?}");
    assert_eq!(trusted[0].signer.as_str(), "b");
    assert_eq!(trusted[0].body.producer.as_str(), "p-7f3a");
    assert_eq!(trusted[0].body.subject, "nubis.mon.a.web-1.>");
    let strangers: Vec<_> = found.iter().filter(|r| !r.trusted).collect();
    assert_eq!(strangers.len(), 1, "{found:?}");
    assert_eq!(strangers[0].signer.as_str(), "c");
    assert!(found.iter().all(|r| r.body.producer.as_str() != "p-forged"));
    assert_eq!(
        dir_a
            .counters()
            .forged
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    let consumers = dir_b.consumers_of(&vm).await.unwrap();
    assert_eq!(consumers.len(), 1);
    assert!(consumers[0].trusted);
    assert_eq!(consumers[0].body.consumer_site.as_str(), "a");
    // Nothing for a VM nobody registered.
    assert!(dir_a
        .producers_of(&VmId::new("other").unwrap())
        .await
        .unwrap()
        .is_empty());
}
