//! `nubis-test-site --config site.toml`: the site daemon as a process of its own, so that the
//! end-to-end tests can kill it with SIGKILL mid-operation and start it again.
// A test harness: a failed setup step should stop it loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .iter()
        .position(|a| a == "--config")
        .and_then(|i| args.get(i + 1))
        .expect("usage: nubis-test-site --config site.toml");
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info,async_nats=warn"))
        .with_writer(std::io::stderr)
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
