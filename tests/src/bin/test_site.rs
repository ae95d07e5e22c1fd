//! `nubis-test-site --config site.toml`: the site daemon as a process of its own, so that the
//! end-to-end tests can kill it with SIGKILL mid-operation and start it again, or hold it
//! between two steps while they set up a fault. With `--proxy --config proxy.toml`, the site's
//! Transfer proxy instead, and with `--host --config host.toml` a host agent, with the same
//! hooks.
//!
//! With `NUBIS_TEST_KILL_AT=<message>` in its environment the process kills itself with SIGKILL
//! the first time the site logs an event with exactly that message (at any level), from the
//! thread that logs it — so a crash lands precisely between two steps of the migration protocol
//! without any hook in the daemon's own code.
//!
//! With `NUBIS_TEST_STOP_AT=<message>` it stops itself with SIGSTOP the first time that message
//! is logged, from the thread that logs it, and carries on from there once it is sent SIGCONT:
//! the step after the message has not started while the process is stopped.
// A test harness: a failed setup step should stop it loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, Ordering};

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer as _;

/// Sends this process `signal` (`KILL` or `STOP`, as `kill` names it) when an event with the
/// configured message is logged.
struct SignalAt {
    message: String,
    signal: &'static str,
    /// SIGKILL ends everything; SIGSTOP is sent once, the process goes on after SIGCONT.
    fired: AtomicBool,
}

/// Picks the `message` field out of an event.
struct Message(Option<String>);

impl tracing::field::Visit for Message {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.0 = Some(value.to_string());
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for SignalAt {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let mut message = Message(None);
        event.record(&mut message);
        if message.0.as_deref() != Some(self.message.as_str())
            || self.fired.swap(true, Ordering::SeqCst)
        {
            return;
        }
        eprintln!("NUBIS_TEST_{}_AT reached: {}", self.signal, self.message);
        // Not an orderly exit or pause: nothing is flushed, and the thread that logged the
        // step waits here (in `kill`) until the signal has taken effect.
        let _ = std::process::Command::new("kill")
            .arg(format!("-{}", self.signal))
            .arg(std::process::id().to_string())
            .status();
        if self.signal == "KILL" {
            // `kill` returns only after the signal is queued; never go on past this point.
            loop {
                std::thread::park();
            }
        }
        eprintln!("continued after {}", self.message);
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .iter()
        .position(|a| a == "--config")
        .and_then(|i| args.get(i + 1))
        .expect("usage: nubis-test-site --config site.toml");
    let at = |var: &str, signal: &'static str| {
        std::env::var(var).ok().map(|message| SignalAt {
            message,
            signal,
            fired: AtomicBool::new(false),
        })
    };
    let hook_filter =
        || tracing_subscriber::EnvFilter::new("info,nubis_site=debug,async_nats=warn");
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(tracing_subscriber::EnvFilter::new("info,async_nats=warn")),
        )
        .with(at("NUBIS_TEST_KILL_AT", "KILL").with_filter(hook_filter()))
        .with(at("NUBIS_TEST_STOP_AT", "STOP").with_filter(hook_filter()))
        .try_init();
    let token = tokio_util::sync::CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        t.cancel();
    });
    if args.iter().any(|a| a == "--host") {
        let config = nubis_host::config::HostConfig::load(std::path::Path::new(path)).unwrap();
        nubis_host::agent::run(config, token).await.unwrap();
        return;
    }
    if args.iter().any(|a| a == "--proxy") {
        let config = nubis_proxy::config::Config::load(std::path::Path::new(path)).unwrap();
        nubis_proxy::run(config, token).await.unwrap();
        return;
    }
    let config = nubis_site::config::SiteConfig::load(std::path::Path::new(path)).unwrap();
    nubis_site::run(config, token).await.unwrap();
}
