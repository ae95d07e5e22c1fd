//! A randomized chaos campaign: a federation of processes (a clustered hub of three nodes; sites
//! a, b and c, every daemon of b and c and the site daemon and proxy of a a process of its own,
//! every site behind a WAN link) kept busy with migrations of its VMs between b and c while
//! monitoring flows, and one fault after another: SIGKILL of a random process (site daemon,
//! Transfer proxy, host agent, a site's nats-server, a hub node, or every daemon of a site at
//! once) or a cut link, at a random moment, restored after a random delay. After each fault the
//! campaign waits for the federation to settle and checks the invariants:
//!
//! - no VM listed by two host agents' own lists, and after settling each listed by exactly one;
//! - the primary's chain agrees (a's record of each VM names the site whose host holds it);
//! - no migration stays open;
//! - each VM's disk at its host is the image it was deployed from;
//! - at the end, every monitoring batch the site running a VM stored (and so told its host agent
//!   was stored) is in the primary's accounting, once.
//!
//! Everything random comes from one seed, printed first, so a failing campaign replays: the
//! same faults at the same points of the workload (the timing of the processes themselves
//! varies).

use std::collections::{BTreeMap, BTreeSet};
use std::process::Child;
use std::time::{Duration, Instant};

use nubis_protocol::message::DmtfState;
use nubis_testkit::{wait_until, NatsServerBinary};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde_json::json;

use crate::stack::{deploy_body, ops, Layout, SiteSpec, Stack};

/// The VMs the campaign moves.
const VMS: [&str; 3] = ["cx-1", "cx-2", "cx-3"];

/// Sites that run VMs, with their one host.
const RUNNERS: [(&str, &str); 2] = [("b", "b1"), ("c", "c1")];

/// How long the federation may take to settle after a fault before that is a violation.
const SETTLE_LIMIT: Duration = Duration::from_secs(240);

/// One kind of fault.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// SIGKILL of a site daemon.
    SiteDaemon(&'static str),
    /// SIGKILL of a Transfer proxy.
    Proxy(&'static str),
    /// SIGKILL of a host agent.
    HostAgent(&'static str),
    /// SIGKILL of every daemon of a site at once.
    WholeSite(&'static str),
    /// SIGKILL of a site's nats-server.
    LeafServer(&'static str),
    /// SIGKILL of a node of the hub.
    HubNode(&'static str),
    /// A site's link cut.
    LinkCut(&'static str),
}

impl Fault {
    /// The fault's kind, for the tally.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::SiteDaemon(_) => "site daemon killed",
            Self::Proxy(_) => "transfer proxy killed",
            Self::HostAgent(_) => "host agent killed",
            Self::WholeSite(_) => "all daemons of a site killed",
            Self::LeafServer(_) => "site nats-server killed",
            Self::HubNode(_) => "hub node killed",
            Self::LinkCut(_) => "link cut",
        }
    }

    fn pick(rng: &mut StdRng) -> Self {
        let site = ["a", "b", "c"][rng.gen_range(0..3)];
        let runner = RUNNERS[rng.gen_range(0..RUNNERS.len())].0;
        match rng.gen_range(0..7) {
            0 => Self::SiteDaemon(site),
            1 => Self::Proxy(site),
            2 => Self::HostAgent(runner),
            3 => Self::WholeSite(runner),
            4 => Self::LeafServer(site),
            5 => Self::HubNode(["hub", "hub-2", "hub-3"][rng.gen_range(0..3)]),
            _ => Self::LinkCut(site),
        }
    }
}

/// What a campaign found.
#[derive(Debug, Default)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, u32>,
    /// Invariant violations, each with the fault after which it was seen.
    pub violations: Vec<String>,
    /// Time from each restore to a settled federation.
    pub settle: Vec<Duration>,
    /// Migrations that committed and that aborted.
    pub committed: u32,
    /// Migrations that aborted (the VM stayed where it was).
    pub aborted: u32,
    /// Monitoring batches checked at the end.
    pub batches: usize,
}

impl Report {
    /// The `q`-quantile of the settle times.
    pub fn settle_quantile(&self, q: f64) -> Duration {
        let mut times = self.settle.clone();
        times.sort();
        let i = ((times.len() as f64 * q).ceil() as usize).saturating_sub(1);
        times.get(i).copied().unwrap_or_default()
    }
}

/// The campaign's processes, by name (`b/site`, `b/proxy`, `b/b1`).
struct Processes {
    children: BTreeMap<String, Child>,
}

impl Processes {
    fn kill(&mut self, name: &str) {
        if let Some(mut child) = self.children.remove(name) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        let names: Vec<String> = self.children.keys().cloned().collect();
        for name in names {
            self.kill(&name);
        }
    }
}

/// Starts process `name` of the stack again.
async fn spawn(stack: &mut Stack, procs: &mut Processes, name: &str) {
    let (site, what) = name.split_once('/').unwrap_or((name, "site"));
    let log = format!("{}.log", name.replace('/', "-"));
    let child = match what {
        "site" => {
            let child = stack.spawn_site_process_with(site, &log, &[]);
            stack.wait_ready(site).await;
            child
        }
        "proxy" => stack.proxy_as_process(site, &log, &[]).await,
        host => stack.host_as_process(site, host, &log).await,
    };
    procs.children.insert(name.to_owned(), child);
}

fn processes_of(site: &str) -> Vec<String> {
    let mut names = vec![format!("{site}/site"), format!("{site}/proxy")];
    if let Some((_, host)) = RUNNERS.iter().find(|(s, _)| *s == site) {
        names.push(format!("{site}/{host}"));
    }
    names
}

/// Runs a campaign of `faults` faults from `seed`, printing each step with `say`.
pub async fn run(
    binary: &NatsServerBinary,
    seed: u64,
    faults: usize,
    mut say: impl FnMut(String),
) -> Report {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut report = Report {
        seed,
        ..Report::default()
    };
    say(format!("chaos campaign: seed {seed}, {faults} faults"));
    let layout = Layout {
        hub_nodes: 3,
        linked: vec!["a", "b", "c"],
    };
    let mut stack = Stack::start_full(
        binary,
        vec![
            SiteSpec::new("a").partner("b", 10).partner("c", 5),
            SiteSpec::new("b").partner("a", 0).host("b1", 8192),
            SiteSpec::new("c").partner("a", 0).host("c1", 8192),
        ],
        &[],
        &layout,
    )
    .await;
    let mut procs = Processes {
        children: BTreeMap::new(),
    };
    for site in ["a", "b", "c"] {
        let child = stack.site_daemon_as_process(site).await;
        procs.children.insert(format!("{site}/site"), child);
        stack.wait_ready(site).await;
        let log = format!("{site}-proxy.log");
        let child = stack.proxy_as_process(site, &log, &[]).await;
        procs.children.insert(format!("{site}/proxy"), child);
    }
    for (site, host) in RUNNERS {
        let child = stack
            .host_as_process(site, host, &format!("{site}-{host}.log"))
            .await;
        procs.children.insert(format!("{site}/{host}"), child);
    }

    let image: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 241) as u8).collect();
    std::fs::write(stack.image_store("a").join("cx.qcow2"), &image).unwrap();
    let op = stack.operator("a").await;
    for vm in VMS {
        let mut body = deploy_body(vm, "cx.qcow2");
        body["monitoring"] = json!([{"data_point": "cpu.utilisation",
            "monitoring_interval_ms": 500, "delivery_interval_ms": 0, "format": {"kind": "raw"}}]);
        let r = ops(&op, "a", "deploy", body).await.unwrap();
        settle_migration(&stack, r["migration"].as_str().unwrap(), &mut report).await;
    }
    if let Err(v) = check(&stack, &image).await {
        report.violations.push(format!("after deployment: {v}"));
    }

    for n in 1..=faults {
        // The workload: one VM moves to the other site while the fault strikes.
        let vm = VMS[rng.gen_range(0..VMS.len())];
        let fault = Fault::pick(&mut rng);
        let before = Duration::from_millis(rng.gen_range(0..2500));
        let outage = Duration::from_millis(rng.gen_range(500..6000));
        let migration = match where_runs(&stack, vm).await.as_deref() {
            Some(at) => {
                let to = if at == "b" { "c" } else { "b" };
                let op = stack.operator("a").await;
                ops(&op, "a", "migrate", json!({"vm": vm, "to_site": to}))
                    .await
                    .ok()
                    .and_then(|r| r["migration"].as_str().map(str::to_owned))
            }
            None => None,
        };
        say(format!(
            "fault {n}/{faults}: {fault:?} {} ms into moving {vm}, for {} ms",
            before.as_millis(),
            outage.as_millis()
        ));
        tokio::time::sleep(before).await;
        inject(&mut stack, &mut procs, &fault, outage).await;
        *report.faults.entry(fault.kind()).or_default() += 1;
        let restored = Instant::now();
        if let Some(m) = &migration {
            settle_migration(&stack, m, &mut report).await;
        }
        let settled = wait_until(SETTLE_LIMIT, "the federation settled", || async {
            check(&stack, &image).await
        })
        .await;
        match settled {
            Ok(()) => {
                let took = restored.elapsed();
                report.settle.push(took);
                say(format!("  settled in {:.1} s", took.as_secs_f64()));
            }
            Err(e) => {
                let v = format!("after fault {n} ({fault:?}): {e}");
                say(format!("  VIOLATION {v}"));
                report.violations.push(v);
            }
        }
    }

    // Monitoring: every batch the running sites stored reaches the primary, once.
    let checked = wait_until(SETTLE_LIMIT, "monitoring reached the primary", || async {
        monitoring_complete(&stack).await
    })
    .await;
    match checked {
        Ok(n) => report.batches = n,
        Err(e) => report.violations.push(format!("monitoring: {e}")),
    }
    drop(procs);
    stack.shutdown().await;
    report
}

async fn inject(stack: &mut Stack, procs: &mut Processes, fault: &Fault, outage: Duration) {
    match fault {
        Fault::SiteDaemon(site) => {
            let name = format!("{site}/site");
            procs.kill(&name);
            tokio::time::sleep(outage).await;
            spawn(stack, procs, &name).await;
        }
        Fault::Proxy(site) => {
            let name = format!("{site}/proxy");
            procs.kill(&name);
            tokio::time::sleep(outage).await;
            spawn(stack, procs, &name).await;
        }
        Fault::HostAgent(site) => {
            let name = processes_of(site).pop().unwrap_or_default();
            procs.kill(&name);
            tokio::time::sleep(outage).await;
            spawn(stack, procs, &name).await;
        }
        Fault::WholeSite(site) => {
            let names = processes_of(site);
            for name in &names {
                procs.kill(name);
            }
            tokio::time::sleep(outage).await;
            for name in names.iter().rev() {
                spawn(stack, procs, name).await;
            }
        }
        Fault::LeafServer(site) | Fault::HubNode(site) => {
            stack.fed.kill(site).await.unwrap();
            tokio::time::sleep(outage).await;
            stack.fed.restart(site).await.unwrap();
        }
        Fault::LinkCut(site) => {
            let link = stack.fed.link(site).expect("every site has a link");
            link.cut();
            tokio::time::sleep(outage).await;
            link.restore();
        }
    }
}

/// Waits until migration `id` at a is over, and counts how it ended.
async fn settle_migration(stack: &Stack, id: &str, report: &mut Report) {
    let end = wait_until(SETTLE_LIMIT, format!("migration {id} over"), || async {
        let op = stack.operator("a").await;
        let v = ops(&op, "a", "vms", json!({"migration": id})).await?;
        match v["phase"].as_str() {
            Some("committed") | Some("aborted") => Ok(v),
            _ => Err(v.to_string()),
        }
    })
    .await;
    match end {
        Ok(v) if v["phase"] == "committed" => report.committed += 1,
        Ok(_) => report.aborted += 1,
        Err(e) => report
            .violations
            .push(format!("migration stayed open: {e}")),
    }
}

/// The site among b and c whose host agent lists `vm`, if exactly one does.
async fn where_runs(stack: &Stack, vm: &str) -> Option<String> {
    let lists = host_lists(stack).await.ok()?;
    let at: Vec<&String> = lists
        .iter()
        .filter(|(_, vms)| vms.contains_key(vm))
        .map(|(site, _)| site)
        .collect();
    (at.len() == 1).then(|| at[0].clone())
}

/// Each running site's host agent's own list: VM → state.
async fn host_lists(
    stack: &Stack,
) -> Result<BTreeMap<String, BTreeMap<String, DmtfState>>, String> {
    let mut lists = BTreeMap::new();
    for (site, host) in RUNNERS {
        let vms = stack.host_vms(site, host).await?;
        lists.insert(site.to_owned(), vms.into_iter().collect());
    }
    Ok(lists)
}

/// The invariants of a settled federation; the first one broken, else `Ok`.
async fn check(stack: &Stack, image: &[u8]) -> Result<(), String> {
    let lists = host_lists(stack).await?;
    let op = stack.operator("a").await;
    for vm in VMS {
        let at: Vec<(&String, &DmtfState)> = lists
            .iter()
            .filter_map(|(site, vms)| vms.get(vm).map(|s| (site, s)))
            .collect();
        let [(site, state)] = at[..] else {
            return Err(format!(
                "{vm} is listed by {} host agents: {at:?}",
                at.len()
            ));
        };
        if *state != DmtfState::Enabled {
            return Err(format!("{vm} is {state:?} at {site}"));
        }
        let v = ops(&op, "a", "vms", json!({"vm": vm})).await?;
        let open = v["vms"][0]["migrations"].as_array().map_or(0, |ms| {
            ms.iter()
                .filter(|m| !matches!(m["phase"].as_str(), Some("committed" | "aborted")))
                .count()
        });
        if open > 0 {
            return Err(format!("{vm} has {open} migrations open at a"));
        }
        let hop = v["vms"][0]["next_hop"].as_str().unwrap_or_default();
        if hop != format!("site:{site}") {
            return Err(format!(
                "a's record of {vm} says {hop}, its host is at {site}"
            ));
        }
        let host = RUNNERS
            .iter()
            .find(|(s, _)| s == site)
            .map(|(_, h)| *h)
            .unwrap_or_default();
        let disk = stack.vm_root(site, host).join(vm).join("disk-vda.qcow2");
        let bytes = std::fs::read(&disk).map_err(|e| format!("{}: {e}", disk.display()))?;
        if bytes != image {
            return Err(format!("{vm}'s disk at {site} differs from its image"));
        }
    }
    Ok(())
}

/// The `<producer>.<epoch>.<seq>` of every batch in `site`'s accounting, with how many times
/// each is stored.
async fn accounting(stack: &Stack, site: &str) -> Result<BTreeMap<String, u32>, String> {
    let mut ids = BTreeMap::new();
    for id in stack.accounting_ids(site, None).await? {
        let batch = id.split_once('.').map_or(id.clone(), |(_, b)| b.to_owned());
        *ids.entry(batch).or_default() += 1;
    }
    Ok(ids)
}

/// `Ok(batches)` once every batch stored at b or c is in a's accounting, each once.
async fn monitoring_complete(stack: &Stack) -> Result<usize, String> {
    let mut produced = BTreeSet::new();
    for (site, _) in RUNNERS {
        produced.extend(accounting(stack, site).await?.into_keys());
    }
    let at_a = accounting(stack, "a").await?;
    if let Some((id, n)) = at_a.iter().find(|(_, n)| **n > 1) {
        return Err(format!("batch {id} stored {n} times at a"));
    }
    let missing = produced.iter().filter(|id| !at_a.contains_key(*id)).count();
    if missing > 0 {
        return Err(format!(
            "{missing} of {} batches missing at a",
            produced.len()
        ));
    }
    Ok(produced.len())
}
