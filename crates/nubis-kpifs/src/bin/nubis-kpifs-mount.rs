//! Mounts one KPI filesystem in the foreground and prints each committed row, until SIGINT or
//! SIGTERM: `nubis-kpifs-mount MOUNTPOINT DATABASE`. For trying the filesystem by hand; the host
//! agent mounts through the library.

use std::path::PathBuf;

use anyhow::Context;
use nubis_kpifs::{KpiFs, KpiOptions};
use tokio::signal::unix::{signal, SignalKind};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut args = std::env::args_os().skip(1);
    let (Some(mountpoint), Some(db)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: nubis-kpifs-mount MOUNTPOINT DATABASE");
    };
    let (mountpoint, db) = (PathBuf::from(mountpoint), PathBuf::from(db));
    let mut mount = KpiFs::mount(&mountpoint, &db, KpiOptions::default())
        .with_context(|| format!("mounting {}", mountpoint.display()))?;
    let mut events = mount.take_events().context("event channel already taken")?;
    let mut term = signal(SignalKind::terminate())?;
    loop {
        tokio::select! {
            row = events.recv() => match row {
                Some(row) => println!("{row:?}"),
                None => break,
            },
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    mount.unmount().context("unmounting")?;
    Ok(())
}
