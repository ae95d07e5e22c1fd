//! `nubis-demo`: the README's main job. Brings up a local federation on loopback — a hub of
//! three clustered nodes and four leaf sites, each with its site daemon, Transfer proxy and host
//! agent — and walks through the paper's usage scenarios with real parts. The hosts of c and d run a real QEMU guest
//! (libvirtd's `qemu:///system`, TCG unless KVM is usable; the tiny guest built by
//! `scripts/setup.d/40-guest.sh`), the hosts of a and b libvirt's test driver (they have no
//! room anyway). Without libvirtd or the guest, c and d fall back to the test driver and say so
//! (under `CI=true` that is a failure).
//!
//! 1. a VM described by an OVF envelope is deployed at site a, which has no room; a delegates
//!    through b, which has none either, to c or d (usage scenario 1);
//! 2. the primary pauses and resumes it through the chain (the Control interface, DMTF states);
//! 3. monitoring: the host agent measures the VM and reads the KPI files the application writes
//!    into its FUSE mount; the batches (one sealed for a) reach a through b;
//! 4. the site running it evicts it (host maintenance); b, which delegated it, becomes the
//!    Controller and moves it to the other site, files going site to site directly (usage
//!    scenario 2): the guest is saved, its disk and memory state move, it is restored there and
//!    keeps counting without booting again; the monitoring follows it on the same subjects;
//! 5. a reports the VM's usage from its accounting stream.
//!
//! Then it prints a cheat-sheet and keeps the federation running until Ctrl-C. With `--ci` it
//! exits after the walk: 0 when every step held, 1 otherwise.
// A demo harness: a failed setup step should stop it loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use nubis_tests::stack;

use std::process::ExitCode;
use std::time::Duration;

use futures::StreamExt as _;
use nubis_bus::ops::OpsClient;
use nubis_host::test_guest::{GuestImage, SerialLog, READY_MARKER};
use nubis_host::{Hypervisor as _, LibvirtConfig, LibvirtHypervisor};
use nubis_protocol::codec;
use nubis_protocol::envelope::{now_ms, SignedEnvelope, Verifier};
use nubis_protocol::message::{BatchPayload, ClearPayload, DmtfState, MonitoringBatch, Value};
use nubis_protocol::ops::{
    ControlView, MigrationPhase, MigrationStarted, MigrationView, UsageQuery, UsageReport, VmView,
};
use nubis_protocol::replay::ReplayCache;
use nubis_protocol::subject::OpsEndpoint;
use nubis_protocol::{MigrationId, SiteId, VmId};
use serde_json::{json, Value as Json};
use stack::{SiteSpec, Stack};

const STEP_TIMEOUT: Duration = Duration::from_secs(120);

/// The hub's nodes: a cluster of three, as a federation deploys it (any one may fail).
const HUB_NODES: usize = 3;

/// The demo's VM.
const VM: &str = "shop-web";

/// The real guest, when this machine can run it: its kernel and initramfs, and libvirtd.
struct RealGuest {
    image: GuestImage,
    hv: LibvirtHypervisor,
}

impl RealGuest {
    fn find() -> Result<Self, String> {
        let image = GuestImage::locate(&GuestImage::default_dir()).map_err(|e| e.to_string())?;
        let hv = LibvirtHypervisor::connect(LibvirtConfig::new("qemu:///system"))
            .map_err(|e| format!("libvirtd is not reachable: {e}"))?;
        Ok(Self { image, hv })
    }

    /// Removes the demo's domain, left by an interrupted run or at the end of this one.
    fn clear(&self) {
        let _ = self.hv.destroy(VM);
        let _ = self.hv.undefine(VM);
    }
}

/// The guest's serial console at `site`'s host.
fn console(stack: &Stack, site: &str) -> SerialLog {
    SerialLog::new(
        stack
            .vm_root(site, &format!("{site}-host"))
            .join(VM)
            .join("console.log"),
    )
}

/// Waits until the guest at `site` has printed a counter above `after`.
async fn counted(stack: &Stack, site: &str, after: u64) -> Result<(u64, f64), String> {
    let log = console(stack, site);
    let deadline = std::time::Instant::now() + STEP_TIMEOUT;
    loop {
        if let Some(c) = log.last_counter().filter(|(n, _)| *n > after) {
            return Ok(c);
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "the guest at {site} does not count: {}",
                log.text()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn say(text: &str) {
    println!("\n\x1b[1m== {text}\x1b[0m");
}

/// Follows `migration` at the site of `client` until it commits (an abort or a step that takes
/// too long is an error).
async fn follow(
    client: &OpsClient,
    migration: &MigrationId,
    ci: bool,
) -> Result<MigrationView, String> {
    // Interactive runs show a bar (bytes, rate, ETA); `--ci` prints each phase once.
    let bar = if ci {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(0)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "   {msg:<13} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let mut shown = 0u64;
    let mut last_phase = None;
    let followed = tokio::time::timeout(
        STEP_TIMEOUT,
        client.follow_migration(migration, Duration::from_millis(100), |v| {
            let done = v.bytes_done.max(shown);
            shown = done;
            let total = v.bytes_total;
            bar.set_length(total.max(done));
            bar.set_position(done);
            bar.set_message(v.phase.to_string());
            if ci && last_phase != Some(v.phase) {
                let pct = (done * 100).checked_div(total).unwrap_or(0);
                println!(
                    "   {:<13} {done:>10} / {total:<10} bytes ({pct:>3}%)",
                    v.phase.as_str()
                );
            }
            last_phase = Some(v.phase);
        }),
    )
    .await;
    match followed {
        Ok(Ok(v)) if v.phase == MigrationPhase::Committed => {
            bar.finish();
            if !ci {
                println!();
            }
            Ok(v)
        }
        Ok(Ok(v)) => {
            bar.abandon();
            Err(format!(
                "migration aborted: {}",
                v.reason.unwrap_or_else(|| "no reason given".into())
            ))
        }
        Ok(Err(e)) => {
            bar.abandon();
            Err(format!("following migration {migration}: {e}"))
        }
        Err(_) => {
            bar.abandon();
            Err("migration did not finish in time".into())
        }
    }
}

/// The usage report of `vm` at the site of `client`, over everything recorded.
async fn usage_of(client: &OpsClient, vm: &VmId) -> Result<UsageReport, String> {
    client
        .usage(&UsageQuery {
            vm: vm.clone(),
            from_ms: 0,
            to_ms: None,
        })
        .await
        .map_err(|e| e.to_string())
}

/// A DMTF state as JSON text (`"paused"`, `"enabled"`, ...), as the walk has always shown it.
fn state_name(state: DmtfState) -> String {
    serde_json::to_string(&state).unwrap_or_else(|_| format!("{state:?}"))
}

/// A monitoring batch as the primary's consumer sees it: verified with the sender's key and,
/// when sealed, opened with the primary's key.
fn open_batch(
    stack: &Stack,
    raw: &[u8],
    subject: &str,
) -> Result<(String, MonitoringBatch, ClearPayload), String> {
    let env = SignedEnvelope::decode(raw).map_err(|e| e.to_string())?;
    let sender = stack
        .identities
        .get(env.from.as_str())
        .ok_or_else(|| format!("batch from unknown site {}", env.from))?;
    let verifier = Verifier::new(
        SiteId::new("a").map_err(|e| e.to_string())?,
        [(sender.site().clone(), sender.public().signing)],
        ReplayCache::temporary(600_000).map_err(|e| e.to_string())?,
    );
    let opened = verifier
        .open_event(raw, subject, now_ms())
        .map_err(|e| format!("batch refused: {e}"))?;
    let batch: MonitoringBatch = opened.body().map_err(|e| e.to_string())?;
    let clear = match &batch.payload {
        BatchPayload::Clear(c) => c.clone(),
        BatchPayload::Sealed { ciphertext } => {
            let bytes = nubis_protocol::seal::open(stack.identities["a"].sealing_key(), ciphertext)
                .map_err(|e| format!("cannot open a sealed batch with a's key: {e}"))?;
            codec::from_slice(&bytes).map_err(|e| e.to_string())?
        }
    };
    Ok((env.from, batch, clear))
}

fn describe(from: &str, batch: &MonitoringBatch, clear: &ClearPayload) -> Vec<String> {
    let sealed = if matches!(batch.payload, BatchPayload::Sealed { .. }) {
        "sealed for a, opened"
    } else {
        "clear"
    };
    let mut lines = Vec::new();
    for s in &clear.samples {
        let value = match &s.value {
            Value::Float(f) => format!("{f:.3}"),
            Value::Int(i) => i.to_string(),
            Value::Text(t) => t.clone(),
        };
        lines.push(format!(
            "{:<26} = {value:<12} raw        seq {:<4} signed by {from}, {sealed}",
            s.data_point, batch.seq
        ));
    }
    for p in &clear.processed {
        lines.push(format!(
            "{:<26} = {:<12.3} {:<10} seq {:<4} signed by {from}, {sealed} ({} samples)",
            p.data_point.as_str(),
            p.value,
            format!("{:?}", p.aggregate).to_lowercase(),
            batch.seq,
            p.count
        ));
    }
    lines
}

/// Waits for batches on `sub` until `want` holds for one; prints what arrives.
async fn watch_until(
    stack: &Stack,
    sub: &mut async_nats::Subscriber,
    mut want: impl FnMut(&MonitoringBatch, &ClearPayload) -> bool,
    what: &str,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    loop {
        let m = tokio::time::timeout_at(deadline, sub.next())
            .await
            .map_err(|_| format!("no monitoring batch with {what} arrived"))?
            .ok_or("the monitoring subscription ended")?;
        let (from, batch, clear) = open_batch(stack, &m.payload, &m.subject)?;
        for line in describe(&from, &batch, &clear) {
            println!("   {line}");
        }
        if want(&batch, &clear) {
            return Ok(());
        }
    }
}

async fn view(client: &OpsClient, vm: &str) -> Result<VmView, String> {
    let vm = VmId::new(vm).map_err(|e| e.to_string())?;
    client.vm(&vm).await.map_err(|e| e.to_string())
}

async fn show_chain(stack: &Stack, vm: &str, sites: &[&str]) -> Result<(), String> {
    for site in sites {
        let op = stack::ops_client(&stack.operator(site).await, site);
        match view(&op, vm).await {
            Ok(v) => println!(
                "   site {site}: upstream {:<6} next hop {:<16} ({})",
                v.upstream.as_ref().map_or("-", |u| u.as_str()),
                v.next_hop.as_deref().unwrap_or("-"),
                v.phase
            ),
            Err(_) => println!("   site {site}: not on the chain"),
        }
    }
    Ok(())
}

async fn walk(stack: &Stack, ci: bool, guest: Option<&RealGuest>) -> Result<(), String> {
    let op_a = stack.operator("a").await;
    let ops_a = stack::ops_client(&op_a, "a");
    let ops_b = stack::ops_client(&stack.operator("b").await, "b");
    let vm = VmId::new(VM).map_err(|e| e.to_string())?;

    say("Usage scenario 1: deploy an OVF at site a, which has no room");
    let ovf_path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples/demo.ovf");
    let ovf = std::fs::read_to_string(ovf_path).map_err(|e| format!("{ovf_path}: {e}"))?;
    let package = nubis_ovf::OvfPackage::parse(&ovf).map_err(|e| e.to_string())?;
    let t = package.template;
    // The primary site's image store holds the VM's images (`nubis image put` uploads them).
    let store = stack.image_store("a");
    for disk in &t.disks {
        if let Some(image) = &disk.image {
            let path = store.join(image);
            if guest.is_some() {
                // An empty qcow2 disk of the capacity the OVF gives; the guest writes its
                // counter into the first sector.
                let status = std::process::Command::new("qemu-img")
                    .args(["create", "-q", "-f", "qcow2"])
                    .arg(&path)
                    .arg(disk.capacity_bytes.to_string())
                    .status()
                    .map_err(|e| format!("qemu-img: {e}"))?;
                if !status.success() {
                    return Err(format!("qemu-img could not create {}", path.display()));
                }
            } else {
                let data: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
                std::fs::write(&path, data).map_err(|e| e.to_string())?;
            }
        }
    }
    // The guest boots the kernel and initramfs from a's image store (direct kernel boot).
    let boot = match guest {
        Some(g) => {
            std::fs::copy(&g.image.kernel, store.join("guest-vmlinuz"))
                .and_then(|_| std::fs::copy(&g.image.initrd, store.join("guest-initramfs")))
                .map_err(|e| format!("stocking a's image store: {e}"))?;
            json!({"kernel": "guest-vmlinuz", "initrd": "guest-initramfs",
                   "cmdline": "console=ttyS0 quiet panic=-1"})
        }
        None => Json::Null,
    };
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
            "boot": boot,
        },
        "monitoring": serde_json::to_value(&t.monitoring).map_err(|e| e.to_string())?,
        "properties": t.properties,
    });
    let mut public = op_a
        .subscribe("nubis.mon.a.shop-web.>")
        .await
        .map_err(|e| e.to_string())?;
    let r: MigrationStarted = ops_a
        .call(OpsEndpoint::Deploy, &deploy)
        .await
        .map_err(|e| e.to_string())?;
    follow(&ops_a, &r.migration, ci).await?;
    let first = view(&ops_b, "shop-web").await?.next_hop.unwrap_or_default();
    let (x, y) = if first == "site:c" {
        ("c", "d")
    } else {
        ("d", "c")
    };
    println!("   placed: a knows only b; b delegated to {x}");
    show_chain(stack, "shop-web", &["a", "b", "c", "d"]).await?;
    if guest.is_some() {
        let (n, up) = counted(stack, x, 0).await?;
        println!("   the real QEMU guest booted at {x}: counter {n} after {up:.1} s of uptime");
    }

    say(&format!(
        "Monitoring: {x} measures the VM and reads its KPI files; batches reach a through b"
    ));
    let mount = stack
        .wait_kpi_mount(x, &format!("{x}-host"), "shop-web", STEP_TIMEOUT)
        .await?;
    println!(
        "   the application writes KPI reports into {}",
        mount.display()
    );
    for users in [12, 1234] {
        std::fs::write(
            mount.join("unencrypted").join("web"),
            format!("current_users\n{users}\n"),
        )
        .map_err(|e| format!("writing a KPI report: {e}"))?;
        println!("   wrote current_users = {users} (the descriptor delivers only values > 1000)");
    }
    let (mut cpu, mut mem, mut kpi) = (false, false, false);
    watch_until(
        stack,
        &mut public,
        |_, c| {
            for s in &c.samples {
                if s.data_point.as_str() == "kpi.web.current_users" {
                    if s.value.as_f64() == Some(12.0) {
                        kpi = false;
                        return true;
                    }
                    kpi = true;
                }
            }
            for p in &c.processed {
                cpu |= p.data_point.as_str() == "cpu.utilisation";
                mem |= p.data_point.as_str() == "mem.allocated_bytes";
            }
            cpu && mem && kpi
        },
        "CPU, memory and the KPI",
    )
    .await?;
    if !kpi {
        return Err("the predicate let current_users = 12 through".into());
    }
    let usage = usage_of(&ops_a, &vm).await?;
    println!(
        "   a's accounting so far: {} batches, {:.6} GiB-hours of memory",
        usage.usage.batches, usage.usage.memory_gib_hours
    );

    say("Control interface: the primary pauses and resumes the VM two hops away");
    for transition in ["pause", "resume"] {
        let v: ControlView = ops_a
            .call(
                OpsEndpoint::Control,
                &json!({"vm": "shop-web", "change": {"kind": "set_state", "transition": transition}}),
            )
            .await
            .map_err(|e| e.to_string())?;
        println!(
            "   {transition:<6} -> {} (CIM EnabledState {})",
            state_name(v.state),
            v.cim_enabled_state
                .map_or_else(|| "null".to_string(), |c| c.to_string())
        );
    }

    say(&format!(
        "Usage scenario 2: site {x} drains its host and evicts the VM"
    ));
    let ops_x = stack::ops_client(&stack.operator(x).await, x);
    let notice = ops_x.evict(&vm).await.map_err(|e| e.to_string())?;
    println!(
        "   eviction notice {} sent to {}",
        notice.notice.unwrap_or_default(),
        notice.sent_to.map(|s| s.to_string()).unwrap_or_default()
    );
    // b, the site that delegated the VM, acts as Controller: follow its migration.
    let deadline = std::time::Instant::now() + STEP_TIMEOUT;
    let before = view(&ops_b, "shop-web").await?.migrations.len();
    let migration = loop {
        let v = view(&ops_b, "shop-web").await?;
        if let Some(m) = v.migrations.get(before) {
            break m.migration;
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("b did not start moving the VM: {v:?}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let before_move = console(stack, x).last_counter();
    println!("   b is the Controller of migration {migration}, {x} -> {y} directly:");
    follow(&ops_b, &migration, ci).await?;
    if let (Some(_), Some((n, up))) = (guest, before_move) {
        let (m, up2) = counted(stack, y, n).await?;
        let log = console(stack, y);
        if log.count(READY_MARKER) != 0 {
            return Err(format!("the guest booted again at {y}: {}", log.text()));
        }
        println!(
            "   the guest was saved at {x} (counter {n}, uptime {up:.1} s) and restored at {y}: \
             counter {m}, uptime {up2:.1} s, no reboot"
        );
    }
    let v = view(&ops_b, "shop-web").await?;
    if v.next_hop != Some(format!("site:{y}")) {
        return Err(format!("the VM did not move to {y}: {v:?}"));
    }
    show_chain(stack, "shop-web", &["a", "b", "c", "d"]).await?;
    let q: ControlView = ops_a
        .call(
            OpsEndpoint::Control,
            &json!({"vm": "shop-web", "change": {"kind": "query"}}),
        )
        .await
        .map_err(|e| e.to_string())?;
    println!("   state seen from a: {}", state_name(q.state));
    if q.state != DmtfState::Enabled {
        return Err(format!("the VM is not running after the eviction: {q:?}"));
    }

    say("Monitoring follows the VM: same subject, new producer, nothing to change at a");
    let mount = stack
        .wait_kpi_mount(y, &format!("{y}-host"), "shop-web", STEP_TIMEOUT)
        .await?;
    std::fs::write(
        mount.join("unencrypted").join("web"),
        "current_users\n2048\n",
    )
    .map_err(|e| format!("writing a KPI report at {y}: {e}"))?;
    println!("   the application, now at {y}, writes current_users = 2048");
    watch_until(
        stack,
        &mut public,
        |_, c| {
            c.samples.iter().any(|s| {
                s.data_point.as_str() == "kpi.web.current_users" && s.value.as_f64() == Some(2048.0)
            })
        },
        "the KPI from the new site",
    )
    .await?;

    say("Usage, from a's accounting stream (the paper's billing purpose)");
    let u = usage_of(&ops_a, &vm).await?.usage;
    println!(
        "   {} batches, {} samples: {:.6} CPU core-hours, {:.6} GiB-hours, {:.0} bytes read, {:.0} bytes sent",
        u.batches,
        u.samples,
        u.cpu_core_hours,
        u.memory_gib_hours,
        u.disk_read_bytes,
        u.net_tx_bytes
    );
    if u.batches == 0 {
        return Err(format!("a holds no accounting for the VM: {u:?}"));
    }
    Ok(())
}

/// Every daemon of the federation as a process of its own, as `deploy/systemd` runs them, so
/// an operator can stop, kill and restart any one of them.
struct Daemons(Vec<(String, std::process::Child)>);

impl Daemons {
    /// Replaces each site's in-process daemons by processes: site daemon, Transfer proxy,
    /// and each host agent.
    async fn start(stack: &mut Stack, sites: &[(&str, &[&str])]) -> Self {
        let mut daemons = Vec::new();
        for (site, hosts) in sites {
            for host in *hosts {
                let log = format!("{site}-{host}.log");
                let child = stack.host_as_process(site, host, &log).await;
                daemons.push((format!("{site}/{host}"), child));
            }
            let child = stack
                .proxy_as_process(site, &format!("{site}-proxy.log"), &[])
                .await;
            daemons.push((format!("{site}/proxy"), child));
            let child = stack.site_daemon_as_process(site).await;
            stack.wait_ready(site).await;
            daemons.push((format!("{site}/site"), child));
        }
        Self(daemons)
    }

    /// Asks every daemon to stop as Ctrl-C would (host agents unmount their KPI filesystems),
    /// and kills those that have not after ten seconds.
    fn stop(&mut self) {
        for (_, child) in &self.0 {
            let _ = std::process::Command::new("kill")
                .arg("-INT")
                .arg(child.id().to_string())
                .status();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        for (name, child) in &mut self.0 {
            while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if matches!(child.try_wait(), Ok(None)) {
                eprintln!("nubis-demo: {name} did not stop; killing it");
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        self.0.clear();
    }
}

impl Drop for Daemons {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Every login the federation's servers know: each role of each server, and each site's leaf
/// login at the hub.
fn credentials(stack: &Stack) {
    say("Credentials (every server has its own passwords)");
    let mut servers: Vec<&str> = stack.fed.hub_nodes();
    servers.extend(["a", "b", "c", "d"]);
    for server in servers {
        let url = stack.fed.site_url(server).unwrap_or_default();
        for role in nubis_testkit::Role::ALL {
            if let Ok((user, password)) = stack.fed.credentials(server, role) {
                println!("   {server:6} {url}  {user:9} {password}");
            }
        }
    }
    for site in ["a", "b", "c", "d"] {
        if let Ok((user, password)) = stack.fed.leaf_login(site) {
            println!("   {site:6} leaf login at the hub: {user} {password}");
        }
    }
    println!(
        "   host agents: user `host.<host>`, passwords in {}/<site>-<host>.toml",
        stack.root().display()
    );
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
        "   {nubis} watch shop-web --key {}",
        stack.root().join("a.key").display()
    );
    println!("   {nubis} usage shop-web");
    println!("   {nubis} image list");
    println!(
        "   nats --server {url} --user {user} --password {password} sub 'nubis.mon.a.shop-web.>'"
    );
    println!(
        "   nats --server {url} --user {user} --password {password} --inbox-prefix _INBOX.{user} req nubis.ops.a.status '{{}}'"
    );
    println!(
        "   nats --server {url} --user {user} --password {password} --inbox-prefix _INBOX.{user} micro ls"
    );
    println!("   Configuration and key files: {}", stack.root().display());
    println!("   Every daemon is a process of its own; stop, kill or restart any one:");
    println!("     pgrep -af nubis-test-site                     # which is which, by --config");
    println!(
        "     {nubis} site --config {}/a.toml                # a's site daemon again",
        stack.root().display()
    );
    println!(
        "     {nubis} proxy --config {}/a-proxy.toml         # a's Transfer proxy again",
        stack.root().display()
    );
    println!(
        "     {nubis} host --config {}/c-c-host.toml         # c's host agent again",
        stack.root().display()
    );
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
    say("Starting a hub of three clustered nodes and sites a, b, c, d (site daemon, transfer proxy, host agent each)");
    let guest = match RealGuest::find() {
        Ok(g) => {
            g.clear();
            println!("   the hosts of c and d run a real QEMU guest (libvirtd qemu:///system)");
            Some(g)
        }
        Err(e) if nubis_testkit::under_ci() => {
            eprintln!("nubis-demo: no real guest under CI=true: {e}");
            return ExitCode::from(3);
        }
        Err(e) => {
            println!("   no real guest ({e}; ./scripts/setup.sh prepares one): every host on libvirt's test driver");
            None
        }
    };
    let qemu_hosts: &[(&str, &str)] = if guest.is_some() {
        &[("c", "c-host"), ("d", "d-host")]
    } else {
        &[]
    };
    let mut stack = Stack::start_full(
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
        qemu_hosts,
        &stack::Layout {
            hub_nodes: HUB_NODES,
            ..stack::Layout::default()
        },
    )
    .await;
    let mut daemons = Daemons::start(
        &mut stack,
        &[
            ("a", &["a-host"]),
            ("b", &["b-host"]),
            ("c", &["c-host"]),
            ("d", &["d-host"]),
        ],
    )
    .await;
    println!("   every site daemon, Transfer proxy and host agent runs as a process of its own");
    for node in stack.fed.hub_nodes() {
        println!(
            "   hub node {node} at {}",
            stack.fed.site_url(node).unwrap_or_default()
        );
    }
    for s in ["a", "b", "c", "d"] {
        println!(
            "   site {s} at {}",
            stack.fed.site_url(s).unwrap_or_default()
        );
    }
    let result = walk(&stack, ci, guest.as_ref()).await;
    match &result {
        Ok(()) => say("Every step held"),
        Err(e) => say(&format!("FAILED: {e}")),
    }
    if !ci && result.is_ok() {
        credentials(&stack);
        cheat_sheet(&stack);
        let _ = tokio::signal::ctrl_c().await;
        say("Stopping");
    }
    daemons.stop();
    stack.shutdown().await;
    if let Some(g) = &guest {
        // The guest outlives the host agents (libvirtd runs it): nothing stays behind.
        g.clear();
    }
    if result.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
