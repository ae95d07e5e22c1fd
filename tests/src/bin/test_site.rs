//! `nubis-test-site --config site.toml`: the site daemon as a process of its own, so that the
//! end-to-end tests can kill it with SIGKILL mid-operation and start it again.
//!
//! With `NUBIS_TEST_KILL_AT=<message>` in its environment the process kills itself with SIGKILL
//! the first time the site logs an event with exactly that message (at any level), from the
//! thread that logs it — so a crash lands precisely between two steps of the migration protocol
//! without any hook in the daemon's own code.
// A test harness: a failed setup step should stop it loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer as _;

/// Kills the process when an event with the configured message is logged.
struct KillAt(String);

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

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for KillAt {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let mut message = Message(None);
        event.record(&mut message);
        if message.0.as_deref() == Some(self.0.as_str()) {
            eprintln!("NUBIS_TEST_KILL_AT reached: {}", self.0);
            // SIGKILL, not an orderly exit: nothing is flushed, no task gets to run further.
            let _ = std::process::Command::new("kill")
                .arg("-KILL")
                .arg(std::process::id().to_string())
                .status();
            // `kill` returns only after the signal is queued; never go on past this point.
            loop {
                std::thread::park();
            }
        }
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
    let kill_at = std::env::var("NUBIS_TEST_KILL_AT").ok().map(KillAt);
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(tracing_subscriber::EnvFilter::new("info,async_nats=warn")),
        )
        .with(kill_at.with_filter(tracing_subscriber::EnvFilter::new(
            "info,nubis_site=debug,async_nats=warn",
        )))
        .try_init();
    let config = nubis_site::config::SiteConfig::load(std::path::Path::new(path)).unwrap();
    let token = tokio_util::sync::CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        t.cancel();
    });
    nubis_site::run(config, token).await.unwrap();
}
