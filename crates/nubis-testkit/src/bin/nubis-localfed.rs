//! `nubis-localfed`: brings up a local nubis federation (a hub and sites a, b, c on loopback),
//! shows that the sites are connected, and keeps it running until Ctrl-C. With `--ci` it runs
//! the checks and exits: 0 when they pass, 1 when they fail.

use std::process::ExitCode;

use nubis_testkit::localfed;
use nubis_testkit::NatsServerBinary;
use tracing_subscriber::EnvFilter;

const USAGE: &str = "usage: nubis-localfed [--ci]

Starts a nats-server hub and leaf sites a, b, c on loopback, each in its own JetStream
domain, checks that they are federated, and runs until Ctrl-C.

  --ci    check and exit instead of running (exit 0 when the checks pass)

Environment: NUBIS_NATS_SERVER names the nats-server binary (default: nats-server on PATH);
RUST_LOG sets the log filter (default: warn).";

/// Exit code when the checks fail.
const EXIT_FAILED: u8 = 1;
/// Exit code for a bad command line.
const EXIT_USAGE: u8 = 2;
/// Exit code when no usable nats-server is installed.
const EXIT_PREREQUISITE: u8 = 3;

fn print_chain(err: &dyn std::error::Error) {
    eprintln!("error: {err}");
    let mut source = err.source();
    while let Some(cause) = source {
        eprintln!("  caused by: {cause}");
        source = cause.source();
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        // Without a SIGTERM handler Ctrl-C still works.
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();

    let mut ci = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--ci" => ci = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("unknown argument {other:?}\n\n{USAGE}");
                return ExitCode::from(EXIT_USAGE);
            }
        }
    }

    let binary = match NatsServerBinary::locate() {
        Ok(binary) => binary,
        Err(err) => {
            print_chain(&err);
            return ExitCode::from(EXIT_PREREQUISITE);
        }
    };
    match localfed::run(&binary, ci, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            print_chain(&err);
            ExitCode::from(EXIT_FAILED)
        }
    }
}
