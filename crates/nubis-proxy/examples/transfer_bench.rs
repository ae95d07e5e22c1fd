//! Benchmark driver: one VM file from a source host file to a verified destination file across
//! two leaf sites of a real federation (hub + sites `a` and `b`, started by the test kit), with
//! both Transfer proxies in this process.
//!
//! Usage: `transfer_bench <source file> <destination dir> [chunk KiB] [publish window] [fetch
//! window]`. Prints one line
//! of `key=value` figures: seconds, bytes moved, bytes published, peak RSS (VmHWM) of this
//! process.
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

/// CPU seconds (user + system) of this process and of its waited-for children (the
/// nats-servers, once the federation is shut down), from `/proc/self/stat`.
fn cpu_seconds() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime is field 14 of the line.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    let tick = 100.0; // USER_HZ on Linux
    let at = |i: usize| f.get(i).copied().unwrap_or(0.0) / tick;
    (at(11) + at(12), at(13) + at(14))
}

fn main() -> anyhow::Result<()> {
    // As `nubis proxy` does: before any thread allocates.
    nubis_proxy::memory::bound_chunk_retention();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(bench())
}

async fn bench() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
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

    let fed = Federation::start(&["a", "b"]).await?;
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
    for (i, s) in ["a", "b"].iter().enumerate() {
        let other = &ids[1 - i];
        let p = TransferProxy::start(
            ProxyParams {
                uri: ProxyUri::new(SiteId::new(*s)?, ProxyId::new("p1")?),
                identity: ids[i].clone(),
                partners: vec![(other.site().clone(), other.public().signing)],
                store_dir: work.path().join(s),
                settings: settings.clone(),
            },
            fed.connect(s).await?,
        )
        .await?;
        proxies.push(p);
    }
    let (pa, pb) = (&proxies[0], &proxies[1]);
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
    let start = Instant::now();
    let s = pa
        .mint(MintToken {
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
        })
        .await?;
    let d = pb
        .mint(MintToken {
            migration_id: mig,
            vm: vm.clone(),
            host,
            ttl_ms: None,
            purpose: TokenPurpose::Receive {
                dir: dst.to_string_lossy().into_owned(),
            },
        })
        .await?;
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
    let TransferStatus::Succeeded { digests } = status else {
        bail!("transfer failed: {status:?}");
    };
    let size = std::fs::metadata(&src)?.len();
    let stats = pa.stats(&s.token).context("stats")?;
    let hwm = vm_hwm_kib();
    for p in proxies {
        p.shutdown().await;
    }
    fed.shutdown().await?;
    let (cpu_self, cpu_servers) = cpu_seconds();
    println!(
        "seconds={secs:.3} size={size} allocated={} published={} rate_mib_s={:.1} vmhwm_kib={hwm} cpu_proxies_s={cpu_self:.2} cpu_servers_s={cpu_servers:.2} sha256={}",
        stats.bytes_total,
        stats.bytes_published,
        size as f64 / secs / (1u64 << 20) as f64,
        hex_digest(&digests[0].sha256),
    );
    Ok(())
}

fn hex_digest(d: &[u8; 32]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}
