//! Benchmark driver: one VM file from a source host file to a verified destination file across
//! two leaf sites of a real federation (hub + sites `a` and `b`, started by the test kit), with
//! both Transfer proxies in this process.
//!
//! Usage: `transfer_bench <source file> <destination dir> [chunk KiB] [publish window] [fetch
//! window]`. Prints one line
//! of `key=value` figures: seconds, bytes moved, bytes published, peak RSS (VmHWM) of this
//! process, CPU seconds of each proxy and server.
//!
//! Then, through the same servers and TLS links, the floor that the bus itself sets: as many
//! bytes of random chunks, published raw by a client at `a` into the transfer bucket and read
//! by a client at `b` with the same kind of pull consumer, across the hub (no file, no digest,
//! no sealing). Its figures are the `floor_…` keys.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context as _};
use nubis_protocol::envelope::Verifier;
use nubis_protocol::identity::SiteIdentity;
use nubis_protocol::message::{
    Endpoint, FetchTransfer, HostId, LocalFile, MintToken, ProxyId, ProxyUri, TokenPurpose,
    TransferStatus,
};
use nubis_protocol::replay::ReplayCache;
use nubis_protocol::{MigrationId, SiteId, VmId};
use nubis_proxy::{ProxyClient, ProxyParams, TransferProxy, TransferSettings};
use nubis_testkit::Federation;

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU seconds (user + system) in a `/proc/.../stat` line: utime and stime are fields 14
/// and 15, counted after the command name (in parentheses, which may hold spaces).
fn stat_cpu_seconds(stat: &str) -> f64 {
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    let tick = 100.0; // USER_HZ on Linux
    (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / tick
}

/// CPU seconds of process `pid`.
fn process_cpu(pid: u32) -> f64 {
    stat_cpu_seconds(&std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default())
}

/// CPU seconds of this process's threads whose name starts with `prefix`.
fn threads_cpu(prefix: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.trim_end().starts_with(prefix))
        })
        .map(|t| {
            stat_cpu_seconds(&std::fs::read_to_string(t.path().join("stat")).unwrap_or_default())
        })
        .sum()
}

/// A runtime of its own for one proxy, its threads named `name-…`, so its CPU time can be
/// told apart from the other proxy's in the same process.
fn runtime(name: &'static str) -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(format!("{name}-rt"))
        // A blocking thread that exits takes its CPU time out of `/proc/self/task`: keep them
        // all until the figures are read.
        .thread_keep_alive(std::time::Duration::from_secs(3600))
        .enable_all()
        .build()?)
}

fn main() -> anyhow::Result<()> {
    // As `nubis proxy` does: before any thread allocates.
    nubis_proxy::memory::bound_chunk_retention();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let main_rt = tokio::runtime::Builder::new_current_thread()
        .thread_name("bench")
        .enable_all()
        .build()?;
    let fed = main_rt.block_on(Federation::start(&["a", "b"]))?;
    // Each proxy connects and runs on its own runtime: its connection's tasks (TLS included),
    // its service and its transfer tasks all run on that runtime's threads.
    let source = runtime("src")?;
    let destination = runtime("dst")?;
    let clients = (
        source.block_on(fed.connect("a"))?,
        destination.block_on(fed.connect("b"))?,
    );
    let result = main_rt.block_on(bench(
        &fed,
        clients,
        source.handle().clone(),
        destination.handle().clone(),
    ));
    let floor_clients = (
        source.block_on(fed.connect("a"))?,
        destination.block_on(fed.connect("b"))?,
    );
    let result = result.and_then(|moved| {
        main_rt.block_on(floor(
            &fed,
            moved,
            floor_clients,
            source.handle().clone(),
            destination.handle().clone(),
        ))
    });
    let shutdown = main_rt.block_on(fed.shutdown());
    source.shutdown_background();
    destination.shutdown_background();
    result?;
    shutdown?;
    Ok(())
}

/// CPU seconds spent since it started: by this process's `src-` and `dst-` threads, and by
/// the nats-servers in the order the figures name them (source, hub, destination).
struct CpuMeter {
    pids: [u32; 3],
    threads: (f64, f64),
    servers: [f64; 3],
}

impl CpuMeter {
    fn start(fed: &Federation) -> anyhow::Result<Self> {
        let pids = [fed.pid("a")?, fed.pid(nubis_testkit::HUB)?, fed.pid("b")?];
        Ok(Self {
            pids,
            threads: (threads_cpu("src-"), threads_cpu("dst-")),
            servers: pids.map(process_cpu),
        })
    }

    /// (source threads, destination threads), and each server's.
    fn read(&self) -> ((f64, f64), [f64; 3]) {
        let threads = (
            threads_cpu("src-") - self.threads.0,
            threads_cpu("dst-") - self.threads.1,
        );
        let mut servers = self.pids.map(process_cpu);
        for (now, before) in servers.iter_mut().zip(self.servers) {
            *now -= before;
        }
        (threads, servers)
    }
}

/// `size` bytes of random 1 MiB chunks from a client at `a` into the transfer bucket, read at
/// `b` across the hub by an ordered pull consumer asking for 8 chunks at a time, as the
/// proxies' chunks travel; prints the `floor_…` figures.
async fn floor(
    fed: &Federation,
    size: u64,
    (publisher, reader): (async_nats::Client, async_nats::Client),
    source_rt: tokio::runtime::Handle,
    destination_rt: tokio::runtime::Handle,
) -> anyhow::Result<()> {
    use async_nats::jetstream::{self, consumer::pull::OrderedConfig};
    use futures::StreamExt as _;
    const CHUNK: usize = 1 << 20;
    let subject = format!(
        "$O.{}.C.floor{:016x}",
        nubis_proxy::naming::BUCKET,
        rand_core::RngCore::next_u64(&mut rand_core::OsRng)
    );
    let chunks = size.div_ceil(CHUNK as u64);
    let publisher = jetstream::new(publisher);
    // The proxies' objects go first: the bucket is sized for one image at a time.
    publisher
        .get_stream(nubis_proxy::naming::STREAM)
        .await?
        .purge()
        .await?;
    let meter = CpuMeter::start(fed)?;
    let start = Instant::now();
    let consume = {
        let subject = subject.clone();
        destination_rt.spawn(async move {
            let js = jetstream::with_domain(reader, "a");
            let stream = js.get_stream(nubis_proxy::naming::STREAM).await?;
            let consumer = stream
                .create_consumer(OrderedConfig {
                    name: Some(format!(
                        "nubis-floor{:016x}",
                        rand_core::RngCore::next_u64(&mut rand_core::OsRng)
                    )),
                    filter_subject: subject,
                    max_batch: 8,
                    ..Default::default()
                })
                .await?;
            let mut messages = consumer.messages().await?;
            let mut got = 0u64;
            for _ in 0..chunks {
                let m = messages.next().await.context("consumer ended")??;
                got += m.payload.len() as u64;
            }
            anyhow::Ok(got)
        })
    };
    let publish = source_rt.spawn(async move {
        let mut chunk = vec![0u8; CHUNK];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut chunk);
        let chunk = bytes::Bytes::from(chunk);
        let mut acks = std::collections::VecDeque::new();
        for _ in 0..chunks {
            if acks.len() >= 32 {
                let ack: async_nats::jetstream::context::PublishAckFuture =
                    acks.pop_front().context("window")?;
                ack.await?;
            }
            acks.push_back(publisher.publish(subject.clone(), chunk.clone()).await?);
        }
        for ack in acks {
            ack.await?;
        }
        anyhow::Ok(())
    });
    publish.await??;
    let got = consume.await??;
    let secs = start.elapsed().as_secs_f64();
    let (clients, servers) = meter.read();
    println!(
        "floor_seconds={secs:.3} floor_bytes={got} floor_cpu_source_client_s={:.2} \
         floor_cpu_source_server_s={:.2} floor_cpu_hub_s={:.2} floor_cpu_destination_server_s={:.2} \
         floor_cpu_destination_client_s={:.2}",
        clients.0, servers[0], servers[1], servers[2], clients.1,
    );
    Ok(())
}

/// The proxies' transfer; returns the bytes it moved (the file's allocated bytes).
async fn bench(
    fed: &Federation,
    clients: (async_nats::Client, async_nats::Client),
    source_rt: tokio::runtime::Handle,
    destination_rt: tokio::runtime::Handle,
) -> anyhow::Result<u64> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        bail!("usage: transfer_bench <source file> <destination dir> [chunk KiB] [publish window] [fetch window]");
    }
    let src = std::fs::canonicalize(&args[1]).context("source file")?;
    let dst = PathBuf::from(&args[2]);
    std::fs::create_dir_all(&dst)?;
    let dst = std::fs::canonicalize(dst)?;
    let chunk_kib: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(1024);
    let window: usize = args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(32);
    let fetch_window: usize = args.get(5).map(|s| s.parse()).transpose()?.unwrap_or(8);

    let work = tempfile::tempdir()?;
    let ids: Vec<Arc<SiteIdentity>> = ["a", "b"]
        .iter()
        .map(|s| Arc::new(SiteIdentity::generate(SiteId::new(*s).unwrap())))
        .collect();
    let settings = TransferSettings {
        chunk_size: chunk_kib << 10,
        publish_window: window,
        fetch_window,
        bucket_max_bytes: 6 << 30,
        // The proxies may serve the source file and receive into the destination directory.
        roots: [src.parent(), dst.parent()]
            .into_iter()
            .flatten()
            .map(Path::to_path_buf)
            .collect(),
        ..TransferSettings::default()
    };
    let mut proxies = Vec::new();
    let sides = [
        ("a", &source_rt, clients.0),
        ("b", &destination_rt, clients.1),
    ];
    for (i, (s, rt, client)) in sides.into_iter().enumerate() {
        let other = &ids[1 - i];
        let params = ProxyParams {
            uri: ProxyUri::new(SiteId::new(s)?, ProxyId::new("p1")?),
            identity: ids[i].clone(),
            partners: vec![(other.site().clone(), other.public().signing)],
            store_dir: work.path().join(s),
            settings: settings.clone(),
        };
        let p = rt
            .spawn(async move { TransferProxy::start(params, client).await })
            .await??;
        proxies.push(p);
    }
    let (pa, pb) = (proxies[0].clone(), proxies[1].clone());
    let verifier = Verifier::new(
        SiteId::new("b")?,
        [
            (ids[0].site().clone(), ids[0].public().signing),
            (ids[1].site().clone(), ids[1].public().signing),
        ],
        ReplayCache::temporary(600_000)?,
    );
    let cb = ProxyClient::new(fed.connect("b").await?, ids[1].clone(), Arc::new(verifier));
    let mig = MigrationId::random();
    let vm = VmId::new("bench-vm")?;
    let host = HostId::new("bench-host")?;
    let name = "disk.img".to_string();
    let meter = CpuMeter::start(fed)?;
    let start = Instant::now();
    let serve = MintToken {
        migration_id: mig,
        vm: vm.clone(),
        host: host.clone(),
        ttl_ms: None,
        purpose: TokenPurpose::Serve {
            files: vec![LocalFile {
                name: name.clone(),
                path: src.to_string_lossy().into_owned(),
            }],
        },
    };
    let s = {
        let pa = pa.clone();
        source_rt
            .spawn(async move { pa.mint(serve).await })
            .await??
    };
    let receive = MintToken {
        migration_id: mig,
        vm: vm.clone(),
        host,
        ttl_ms: None,
        purpose: TokenPurpose::Receive {
            dir: dst.to_string_lossy().into_owned(),
        },
    };
    let d = {
        let pb = pb.clone();
        destination_rt
            .spawn(async move { pb.mint(receive).await })
            .await??
    };
    cb.fetch(
        pb.uri(),
        &FetchTransfer {
            migration_id: mig,
            vm,
            source: Endpoint {
                proxy: s.proxy.clone(),
                token: s.token,
            },
            destination: d.token,
            max_bytes_per_sec: None,
        },
    )
    .await?;
    let status = loop {
        let st = pb.status(&d.token)?;
        if st.is_final() {
            break st;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let secs = start.elapsed().as_secs_f64();
    let (cpu_proxies, cpu_servers) = meter.read();
    let TransferStatus::Succeeded { digests } = status else {
        bail!("transfer failed: {status:?}");
    };
    let size = std::fs::metadata(&src)?.len();
    let stats = pa.stats(&s.token).context("stats")?;
    let hwm = vm_hwm_kib();
    for p in proxies {
        p.shutdown().await;
    }
    println!(
        "seconds={secs:.3} size={size} allocated={} published={} rate_mib_s={:.1} vmhwm_kib={hwm} \
         cpu_proxies_s={:.2} cpu_servers_s={:.2} cpu_source_proxy_s={:.2} cpu_source_server_s={:.2} \
         cpu_hub_s={:.2} cpu_destination_server_s={:.2} cpu_destination_proxy_s={:.2} sha256={}",
        stats.bytes_total,
        stats.bytes_published,
        size as f64 / secs / (1u64 << 20) as f64,
        cpu_proxies.0 + cpu_proxies.1,
        cpu_servers.iter().sum::<f64>(),
        cpu_proxies.0,
        cpu_servers[0],
        cpu_servers[1],
        cpu_servers[2],
        cpu_proxies.1,
        hex_digest(&digests[0].sha256),
    );
    Ok(stats.bytes_total)
}

fn hex_digest(d: &[u8; 32]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}
