//! The federation over wide-area links (issue 19, point 2): every site's leaf connection behind
//! a userspace WAN link of the test kit ([`nubis_testkit::WanLink`]) of one profile, 25 ms one
//! way at 1 Gbit/s or at 100 Mbit/s, with loopback (no link) as the reference. Per profile:
//!
//! 1. **control**: the Controller's time of a primary placement through a chain of
//!    Intermediaries (`shared::chain`, 1 KiB image), every site behind a link;
//! 2. **raw**: a plain TCP stream through two links in a row, the links' own ceiling;
//! 3. **transfer**: one file between the Transfer proxies of two sites, each behind a link, so
//!    the data crosses two links (source site → hub → destination site); the proxies' fetch
//!    window sized for the link's rate (`transfer.link_bytes_per_sec`, as an operator sets it),
//!    and with the default settings where that differs;
//! 4. **scp**: the same file with `scp` to a throwaway `sshd` on loopback through two links of
//!    the same profile in a row (the sshd is started by `bench/wan.sh`, which passes its port
//!    and key in `NUBIS_WAN_SSH_PORT` and `NUBIS_WAN_SSH_KEY`);
//! 5. **kpi**: a report written into the VM's KPI filesystem at site c until the primary a's
//!    subscriber receives the batch, relayed c → b → a, every site behind a link.
//!
//! Run: `bench/wan.sh` (installs the sshd where it is missing, then runs
//! `cargo bench -p nubis-tests --bench wan`). Environment, for shorter runs:
//! `NUBIS_WAN_PROFILES` (`loopback,1g,100m`), `NUBIS_WAN_PARTS` (`control,raw,transfer,scp,kpi`),
//! `NUBIS_WAN_INTERMEDIARIES` (`2,3`), `NUBIS_WAN_PLACEMENTS` (8, at most 8),
//! `NUBIS_WAN_MIB` (1024, the file of transfer and scp), `NUBIS_WAN_RAW_MIB` (1024),
//! `NUBIS_WAN_RUNS` (1, runs of transfer and scp), `NUBIS_WAN_KPI_ROUNDS` (200).
//! Under `cargo test` it runs every part once, small, on the 1 Gbit/s profile, with 2
//! Intermediaries.
// A benchmark is a test harness: a failed setup step should stop it loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod shared;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nubis_protocol::envelope::Verifier;
use nubis_protocol::identity::SiteIdentity;
use nubis_protocol::message::{
    Endpoint, FetchTransfer, HostId, LocalFile, MintToken, ProxyId, ProxyUri, TokenPurpose,
    TransferStatus, TransferToken,
};
use nubis_protocol::replay::ReplayCache;
use nubis_protocol::{MigrationId, SiteId, VmId};
use nubis_proxy::{CallError, ProxyClient, ProxyParams, TransferProxy, TransferSettings};
use nubis_testkit::{wait_until, Federation, LinkSpec, NatsServerBinary, WanLink};
use nubis_tests::stack::{Layout, SiteSpec, Stack};
use rand::RngCore as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// One kind of link every site sits behind.
#[derive(Debug, Clone, Copy)]
struct Profile {
    name: &'static str,
    link: Option<LinkSpec>,
}

impl Profile {
    fn by_name(name: &str) -> Self {
        let wan = |name, bytes_per_sec| Profile {
            name,
            link: Some(LinkSpec::delay(Duration::from_millis(25)).bandwidth(bytes_per_sec)),
        };
        match name {
            "loopback" => Profile {
                name: "loopback",
                link: None,
            },
            "1g" => wan("25 ms, 1 Gbit/s", 125_000_000),
            "100m" => wan("25 ms, 100 Mbit/s", 12_500_000),
            other => panic!("unknown profile {other:?} (loopback, 1g, 100m)"),
        }
    }

    fn rate(&self) -> Option<u64> {
        self.link.and_then(|l| l.bandwidth)
    }

    /// The share of this profile's rate that `bytes_per_sec` fills, as text.
    fn filled(&self, bytes_per_sec: f64) -> String {
        self.rate().map_or("–".to_string(), |r| {
            format!("{:.0} %", 100.0 * bytes_per_sec / r as f64)
        })
    }
}

fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_string())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name).map_or(default, |v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a number"))
    })
}

/// A stack of `specs` with every site behind a link of `profile` (links start without delay, so
/// that the stack comes up quickly, and get the profile once it is ready).
async fn linked_stack(binary: &NatsServerBinary, specs: Vec<SiteSpec>, profile: Profile) -> Stack {
    let linked: Vec<&'static str> = match profile.link {
        Some(_) => specs.iter().map(|s| s.id).collect(),
        None => Vec::new(),
    };
    let layout = Layout {
        hub_nodes: 1,
        linked: linked.clone(),
    };
    let stack = Stack::start_full(binary, specs, &[], &layout).await;
    if let Some(spec) = profile.link {
        for site in linked {
            stack.fed.link(site).unwrap().set(spec);
        }
    }
    stack
}

/// The Controller's times (ms) of `placements` placements through `intermediaries`.
async fn control(
    binary: &NatsServerBinary,
    profile: Profile,
    intermediaries: usize,
    placements: usize,
) -> Vec<f64> {
    let stack = linked_stack(binary, shared::chain(intermediaries), profile).await;
    std::fs::write(stack.image_store("s0").join("tiny.qcow2"), vec![1u8; 1024]).unwrap();
    let op = stack.operator("s0").await;
    let mut times = Vec::new();
    for i in 0..placements {
        times.push(shared::place(&op, "s0", &format!("vm-{i}")).await);
    }
    stack.shutdown().await;
    times
}

/// Where a client connects to reach `target` through two links of `profile` in a row; the
/// links live as long as the returned value.
async fn two_links(target: SocketAddr, profile: Profile) -> (SocketAddr, Vec<WanLink>) {
    match profile.link {
        None => (target, Vec::new()),
        Some(spec) => {
            let far = WanLink::start(target, spec).await.unwrap();
            let near = WanLink::start(far.addr(), spec).await.unwrap();
            (near.addr(), vec![near, far])
        }
    }
}

/// Seconds to stream `bytes` over one TCP connection through two links until the receiver has
/// read them all.
async fn raw(profile: Profile, bytes: u64) -> f64 {
    let sink = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (addr, _links) = two_links(sink.local_addr().unwrap(), profile).await;
    let received = tokio::spawn(async move {
        let (mut s, _) = sink.accept().await.unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                return total;
            }
            total += n as u64;
        }
    });
    let buf = vec![0x5au8; 1 << 20];
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..n]).await.unwrap();
        left -= n as u64;
    }
    s.shutdown().await.unwrap();
    assert_eq!(received.await.unwrap(), bytes);
    start.elapsed().as_secs_f64()
}

/// A file of `mib` MiB of random bytes in `dir`.
fn random_file(dir: &Path, mib: usize) -> PathBuf {
    use std::io::Write as _;
    let path = dir.join("disk.img");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        rand::thread_rng().fill_bytes(&mut buf);
        f.write_all(&buf).unwrap();
    }
    f.into_inner().unwrap().sync_all().unwrap();
    path
}

/// Seconds to move `file` from a proxy of site a to a proxy of site b (verified and fsynced
/// there), each site behind a link of `profile`; the proxies size their fetch window for
/// `link_bytes_per_sec`.
async fn transfer(
    binary: &NatsServerBinary,
    profile: Profile,
    file: &Path,
    link_bytes_per_sec: u64,
) -> f64 {
    let fed = Federation::start_with_links(binary, &["a", "b"], |_| profile.link)
        .await
        .unwrap();
    let work = tempfile::tempdir().unwrap();
    let dst = work.path().join("received");
    std::fs::create_dir_all(&dst).unwrap();
    let ids: Vec<Arc<SiteIdentity>> = ["a", "b"]
        .iter()
        .map(|s| Arc::new(SiteIdentity::generate(SiteId::new(*s).unwrap())))
        .collect();
    let settings = TransferSettings {
        // The proxies may serve the source file and receive into the directory of `dst`.
        roots: vec![
            file.parent().unwrap().to_path_buf(),
            work.path().to_path_buf(),
        ],
        link_bytes_per_sec,
        ..TransferSettings::default()
    };
    let mut proxies = Vec::new();
    for (i, site) in ["a", "b"].into_iter().enumerate() {
        let other = &ids[1 - i];
        let params = ProxyParams {
            uri: ProxyUri::new(SiteId::new(site).unwrap(), ProxyId::new("p1").unwrap()),
            identity: ids[i].clone(),
            partners: vec![(other.site().clone(), other.public().signing)],
            store_dir: work.path().join(site),
            settings: settings.clone(),
        };
        let client = fed.connect(site).await.unwrap();
        proxies.push(TransferProxy::start(params, client).await.unwrap());
    }
    let (pa, pb) = (&proxies[0], &proxies[1]);
    let verifier = Verifier::new(
        SiteId::new("b").unwrap(),
        ids.iter()
            .map(|id| (id.site().clone(), id.public().signing)),
        ReplayCache::temporary(600_000).unwrap(),
    );
    let cb = ProxyClient::new(
        fed.connect("b").await.unwrap(),
        ids[1].clone(),
        Arc::new(verifier),
    );
    // A proxy that has just started is reachable from the other site only once its
    // subscriptions have crossed the links; a federation's proxies run long before a transfer.
    wait_until(
        Duration::from_secs(60),
        "a's proxy reachable from b",
        || async {
            match cb
                .status(pa.uri(), MigrationId::random(), TransferToken::random())
                .await
            {
                Ok(_) | Err(CallError::Refused { .. }) => Ok(()),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await
    .unwrap();
    let (migration_id, vm) = (MigrationId::random(), VmId::new("bench-vm").unwrap());
    let host = HostId::new("bench-host").unwrap();
    let start = Instant::now();
    let served = pa
        .mint(MintToken {
            migration_id,
            vm: vm.clone(),
            host: host.clone(),
            ttl_ms: None,
            purpose: TokenPurpose::Serve {
                files: vec![LocalFile {
                    name: "disk.img".to_string(),
                    path: file.to_string_lossy().into_owned(),
                }],
            },
        })
        .await
        .unwrap();
    let receiving = pb
        .mint(MintToken {
            migration_id,
            vm: vm.clone(),
            host,
            ttl_ms: None,
            purpose: TokenPurpose::Receive {
                dir: dst.to_string_lossy().into_owned(),
            },
        })
        .await
        .unwrap();
    cb.fetch(
        pb.uri(),
        &FetchTransfer {
            migration_id,
            vm,
            source: Endpoint {
                proxy: served.proxy.clone(),
                token: served.token,
            },
            destination: receiving.token,
            max_bytes_per_sec: None,
        },
    )
    .await
    .unwrap();
    let status = loop {
        let st = pb.status(&receiving.token).unwrap();
        if st.is_final() {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let secs = start.elapsed().as_secs_f64();
    assert!(
        matches!(status, TransferStatus::Succeeded { .. }),
        "transfer failed: {status:?}"
    );
    assert_eq!(
        std::fs::metadata(dst.join("disk.img")).unwrap().len(),
        std::fs::metadata(file).unwrap().len()
    );
    for p in proxies {
        p.shutdown().await;
    }
    fed.shutdown().await.unwrap();
    secs
}

/// The throwaway sshd of `bench/wan.sh`: its port and the client key it accepts.
fn sshd() -> Option<(u16, PathBuf)> {
    let port = std::env::var("NUBIS_WAN_SSH_PORT").ok()?.parse().ok()?;
    let key = PathBuf::from(std::env::var_os("NUBIS_WAN_SSH_KEY")?);
    Some((port, key))
}

/// Seconds of `scp` of `file` through two links of `profile` to the sshd, the copy synced.
async fn scp(profile: Profile, file: &Path, (port, key): (u16, PathBuf)) -> f64 {
    let (addr, _links) = two_links(SocketAddr::from(([127, 0, 0, 1], port)), profile).await;
    let work = tempfile::tempdir().unwrap();
    let copy = work.path().join("scp.out");
    let file = file.to_path_buf();
    let start = Instant::now();
    let copied = copy.clone();
    let status = tokio::task::spawn_blocking(move || {
        let status = std::process::Command::new("scp")
            .args(["-q", "-P", &addr.port().to_string(), "-i"])
            .arg(&key)
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "BatchMode=yes",
            ])
            .arg(&file)
            .arg(format!("127.0.0.1:{}", copied.display()))
            .status()
            .unwrap();
        std::fs::File::open(&copied).unwrap().sync_all().unwrap();
        status
    })
    .await
    .unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert!(status.success(), "scp failed: {status}");
    secs
}

/// Per report: the write alone and write → primary's subscriber (µs), the VM at site c
/// delegated a → b → c, every site behind a link of `profile`.
async fn kpi(
    binary: &NatsServerBinary,
    profile: Profile,
    warmup: usize,
    rounds: usize,
) -> (Vec<u128>, Vec<u128>) {
    let specs = vec![
        SiteSpec::new("a").partner("b", 10),
        SiteSpec::new("b").partner("a", 0).partner("c", 10),
        SiteSpec::new("c").partner("b", 0).host("h1", 4096),
    ];
    let stack = linked_stack(binary, specs, profile).await;
    let op = stack.operator("a").await;
    let (report, mut sub) =
        shared::kpi_vm(&stack, &op, "a", ("c", "h1"), Duration::from_secs(120)).await;
    let figures = shared::kpi_reports(&report, &mut sub, warmup, rounds).await;
    stack.shutdown().await;
    figures
}

fn ms(us: u128) -> String {
    format!("{:.1} ms", us as f64 / 1000.0)
}

async fn bench(binary: NatsServerBinary) {
    let full = shared::bench_mode();
    let profiles: Vec<Profile> = env_list(
        "NUBIS_WAN_PROFILES",
        if full { "loopback,1g,100m" } else { "1g" },
    )
    .iter()
    .map(|p| Profile::by_name(p))
    .collect();
    let parts = env_list("NUBIS_WAN_PARTS", "control,raw,transfer,scp,kpi");
    let part = |name: &str| parts.iter().any(|p| p == name);
    let intermediaries: Vec<usize> =
        env_list("NUBIS_WAN_INTERMEDIARIES", if full { "2,3" } else { "2" })
            .iter()
            .map(|k| k.parse().unwrap())
            .collect();
    let placements = env_number("NUBIS_WAN_PLACEMENTS", if full { 8 } else { 2 }).min(8);
    let mib = env_number("NUBIS_WAN_MIB", if full { 1024 } else { 16 });
    let raw_mib = env_number("NUBIS_WAN_RAW_MIB", if full { 1024 } else { 16 });
    let runs = env_number("NUBIS_WAN_RUNS", 1);
    let kpi_rounds = env_number("NUBIS_WAN_KPI_ROUNDS", if full { 200 } else { 5 });

    if part("control") {
        println!(
            "## control plane: Controller's time from start to commit, {placements} placements"
        );
        println!("| link | Intermediaries (hops) | p50 | p90 | max |");
        println!("|---|---|---|---|---|");
        for p in &profiles {
            for &k in &intermediaries {
                let mut t = control(&binary, *p, k, placements).await;
                println!(
                    "| {} | {k} ({}) | {:.0} ms | {:.0} ms | {:.0} ms |",
                    p.name,
                    k + 1,
                    shared::percentile(&mut t, 0.5),
                    shared::percentile(&mut t, 0.9),
                    shared::percentile(&mut t, 1.0),
                );
            }
        }
    }

    let bulk = ["raw", "transfer", "scp"].iter().any(|p| part(p));
    if bulk {
        println!(
            "## bulk data through two links of the profile: {mib} MiB (raw TCP: {raw_mib} MiB)"
        );
        println!("| link | what | run | seconds | MB/s | share of the link's rate |");
        println!("|---|---|---|---|---|---|");
    }
    let row = |p: &Profile, what: &str, run: usize, bytes: u64, secs: f64| {
        let rate = bytes as f64 / secs;
        println!(
            "| {} | {what} | {run} | {secs:.2} s | {:.1} | {} |",
            p.name,
            rate / 1e6,
            p.filled(rate)
        );
    };
    let data = tempfile::tempdir().unwrap();
    let file = (part("transfer") || part("scp")).then(|| random_file(data.path(), mib));
    let bytes = (mib as u64) << 20;
    for p in &profiles {
        if part("raw") {
            let secs = raw(*p, (raw_mib as u64) << 20).await;
            row(p, "raw TCP stream", 1, (raw_mib as u64) << 20, secs);
        }
        if let Some(file) = &file {
            // The rate an operator gives the proxy for this link, and the default where it
            // differs.
            let default_rate = TransferSettings::default().link_bytes_per_sec;
            let mut rates = vec![p.rate().unwrap_or(default_rate)];
            if !rates.contains(&default_rate) {
                rates.push(default_rate);
            }
            for run in 1..=runs {
                if part("transfer") {
                    for &rate in &rates {
                        let secs = transfer(&binary, *p, file, rate).await;
                        let what = if rate == default_rate {
                            "nubis proxies (default settings)".to_string()
                        } else {
                            format!("nubis proxies (`link_bytes_per_sec = {rate}`)")
                        };
                        row(p, &what, run, bytes, secs);
                    }
                }
                if part("scp") {
                    match sshd() {
                        Some(sshd) => {
                            let secs = scp(*p, file, sshd).await;
                            row(p, "scp", run, bytes, secs);
                        }
                        None => println!("| {} | scp | {run} | n/a (no sshd) | | |", p.name),
                    }
                }
            }
        }
    }

    if part("kpi") {
        if !Path::new("/dev/fuse").exists() {
            return nubis_testkit::skip_or_fail("no /dev/fuse").unwrap_or(());
        }
        let warmup = (kpi_rounds / 10).max(1);
        println!("## KPI write at c → subscriber at the primary a (relayed c → b → a), {kpi_rounds} reports after {warmup}");
        println!("| link | write (open, write, close) p50 | p99 | write → primary's subscriber p50 | p99 |");
        println!("|---|---|---|---|---|");
        for p in &profiles {
            let (mut w, mut s) = kpi(&binary, *p, warmup, kpi_rounds).await;
            println!(
                "| {} | {} | {} | {} | {} |",
                p.name,
                ms(shared::percentile(&mut w, 0.5)),
                ms(shared::percentile(&mut w, 0.99)),
                ms(shared::percentile(&mut s, 0.5)),
                ms(shared::percentile(&mut s, 0.99)),
            );
        }
    }
}

fn main() {
    // As `nubis proxy` does: before any thread allocates.
    nubis_proxy::memory::bound_chunk_retention();
    // RUST_LOG, when set, says what to log (to see where a transfer's time goes); otherwise the
    // stacks log as the tests do.
    if let Ok(filter) = std::env::var("RUST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter.as_str())
            .try_init();
    }
    let Some(binary) = nubis_testkit::require_nats_server() else {
        return;
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(bench(binary));
}
