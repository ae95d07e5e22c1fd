//! A wide-area link in userspace: a TCP forwarder that delays every byte by a one-way delay in
//! each direction, bounds the bytes per second with a token bucket, and can be cut and
//! restored. Put in front of a listening port (the hub's leaf port, for one site), it makes
//! that site far away without the kernel's `netem`.
//!
//! It forwards bytes and nothing else, so TLS passes through it untouched: the certificate
//! checks happen end to end, as over a real link.
//!
//! ```no_run
//! # async fn demo(hub_leaf: std::net::SocketAddr) -> std::io::Result<()> {
//! use std::time::Duration;
//! use nubis_testkit::wan::{LinkSpec, WanLink};
//! let link = WanLink::start(hub_leaf, LinkSpec::delay(Duration::from_millis(25))).await?;
//! // Point the site at `link.addr()` instead of `hub_leaf`; later:
//! link.cut();
//! link.restore();
//! # Ok(()) }
//! ```

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::debug;

/// The most bytes read at once, and so the most one write of the link carries.
pub const CHUNK: usize = 16 * 1024;

/// The least burst of the token bucket: at least this many bytes pass at once when the link
/// was idle.
pub const BURST: u64 = CHUNK as u64;

/// The bucket also holds the bytes of this long at its rate, when that is more than
/// [`BURST`]. A write waits on tokio's timer, which fires on whole milliseconds at the
/// earliest: a wait of a fraction of one lasts a whole one or two. With a bucket smaller than
/// what the rate earns meanwhile, the credit earned beyond it is lost and a fast link falls
/// far below its rate (at 1 Gbit/s a chunk is earned in a tenth of a millisecond).
const TIMER_SLACK: Duration = Duration::from_millis(4);

/// What [`WanLink::addr`] gives for a link started with no target.
const UNSPECIFIED: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

/// How many chunks may be in flight in one direction of one connection; beyond it the link
/// stops reading, as a full network path pushes back.
const IN_FLIGHT: usize = 256;

/// What a link does to the bytes it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkSpec {
    /// How long each byte takes from one end to the other, in either direction.
    pub delay: Duration,
    /// At most this many bytes per second in each direction (all connections together); `None`
    /// for no bound.
    pub bandwidth: Option<u64>,
}

impl LinkSpec {
    /// A link with one-way delay `delay` and no bandwidth bound.
    pub fn delay(delay: Duration) -> Self {
        Self {
            delay,
            bandwidth: None,
        }
    }

    /// The same link with at most `bytes_per_sec` in each direction.
    pub fn bandwidth(self, bytes_per_sec: u64) -> Self {
        Self {
            bandwidth: Some(bytes_per_sec),
            ..self
        }
    }
}

/// A token bucket with debt: a write takes its bytes at once and waits for the bucket to
/// refill above zero, so `n` bytes after an idle link take at least
/// `(n - burst) / rate`, the burst being [`TokenBucket::burst`].
#[derive(Debug)]
struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new() -> Self {
        Self {
            tokens: BURST as f64,
            last: Instant::now(),
        }
    }

    /// The most bytes the bucket holds at `rate`: [`BURST`], or what [`TIMER_SLACK`] earns
    /// when that is more.
    fn burst(rate: f64) -> f64 {
        (BURST as f64).max(rate * TIMER_SLACK.as_secs_f64())
    }

    /// Takes `n` bytes at `rate` and returns how long to wait before sending them.
    fn take(&mut self, n: usize, rate: u64, now: Instant) -> Duration {
        let rate = rate.max(1) as f64;
        let refill = now.saturating_duration_since(self.last).as_secs_f64() * rate;
        self.tokens = (self.tokens + refill).min(Self::burst(rate)) - n as f64;
        self.last = now;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / rate)
        }
    }
}

/// What every connection of a link shares: its spec, whether it is cut, and one bucket per
/// direction.
#[derive(Debug, Clone)]
struct Shared {
    spec: watch::Receiver<LinkSpec>,
    cut: watch::Receiver<bool>,
    up: Arc<Mutex<TokenBucket>>,
    down: Arc<Mutex<TokenBucket>>,
}

/// A running link: listens on [`WanLink::addr`] and forwards each connection to its target.
/// A link to several targets (the nodes of a clustered hub) listens once per target, and all
/// its connections share one spec, one cut and one bandwidth, as one site's WAN access would.
/// Dropping it stops the link and closes every connection.
#[derive(Debug)]
pub struct WanLink {
    addrs: Vec<SocketAddr>,
    targets: Vec<SocketAddr>,
    spec: watch::Sender<LinkSpec>,
    cut: watch::Sender<bool>,
    accepts: Vec<JoinHandle<()>>,
}

impl WanLink {
    /// Starts a link to `target` on a free loopback port.
    pub async fn start(target: SocketAddr, spec: LinkSpec) -> io::Result<Self> {
        Self::start_many(&[target], spec).await
    }

    /// Starts one link to several targets: one free port per target, in the same order
    /// ([`WanLink::addrs`]).
    pub async fn start_many(targets: &[SocketAddr], spec: LinkSpec) -> io::Result<Self> {
        let (spec_tx, spec_rx) = watch::channel(spec);
        let (cut_tx, cut_rx) = watch::channel(false);
        let shared = Shared {
            spec: spec_rx,
            cut: cut_rx,
            up: Arc::new(Mutex::new(TokenBucket::new())),
            down: Arc::new(Mutex::new(TokenBucket::new())),
        };
        let mut addrs = Vec::with_capacity(targets.len());
        let mut accepts = Vec::with_capacity(targets.len());
        for target in targets {
            let listener = TcpListener::bind((target.ip(), 0)).await?;
            let addr = listener.local_addr()?;
            accepts.push(tokio::spawn(accept_loop(listener, *target, shared.clone())));
            debug!(%addr, %target, ?spec, "wan link started");
            addrs.push(addr);
        }
        Ok(Self {
            addrs,
            targets: targets.to_vec(),
            spec: spec_tx,
            cut: cut_tx,
            accepts,
        })
    }

    /// The addresses to connect to instead of the targets, in the targets' order.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The address to connect to instead of the (first) target.
    pub fn addr(&self) -> SocketAddr {
        self.addrs.first().copied().unwrap_or(UNSPECIFIED)
    }

    /// The address the link forwards to (the first one, for a link to several).
    pub fn target(&self) -> SocketAddr {
        self.targets.first().copied().unwrap_or(UNSPECIFIED)
    }

    /// The spec in force.
    pub fn spec(&self) -> LinkSpec {
        *self.spec.borrow()
    }

    /// Changes delay and bandwidth; bytes read from now on get the new delay.
    pub fn set(&self, spec: LinkSpec) {
        self.spec.send_replace(spec);
    }

    /// Cuts the link: every open connection is reset and new ones are reset as soon as they
    /// are accepted, until [`WanLink::restore`].
    pub fn cut(&self) {
        self.cut.send_replace(true);
        debug!(addrs = ?self.addrs, "wan link cut");
    }

    /// Lets new connections through again.
    pub fn restore(&self) {
        self.cut.send_replace(false);
        debug!(addrs = ?self.addrs, "wan link restored");
    }

    /// Whether the link is cut.
    pub fn is_cut(&self) -> bool {
        *self.cut.borrow()
    }
}

impl Drop for WanLink {
    fn drop(&mut self) {
        // Connections end too: they see the senders gone.
        for accept in &self.accepts {
            accept.abort();
        }
    }
}

/// Closes `stream` with a reset rather than an orderly close, as a broken path would look.
fn reset(stream: TcpStream) {
    // Without the option the close is merely orderly; nothing else depends on it.
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, shared: Shared) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(e) => {
                // Out of descriptors, say: try again shortly rather than spin.
                debug!(error = %e, "wan link accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if *shared.cut.borrow() {
            reset(client);
            continue;
        }
        tokio::spawn(connection(client, target, shared.clone()));
    }
}

/// Whether the link is cut now or the link is gone; resolves when it becomes so.
async fn cut_or_gone(cut: &mut watch::Receiver<bool>) {
    let _ = cut.wait_for(|c| *c).await;
}

async fn connection(mut client: TcpStream, target: SocketAddr, shared: Shared) {
    let mut cut = shared.cut.clone();
    let mut server = tokio::select! {
        connected = TcpStream::connect(target) => match connected {
            Ok(server) => server,
            Err(e) => {
                debug!(error = %e, %target, "wan link cannot reach its target");
                return reset(client);
            }
        },
        () = cut_or_gone(&mut cut) => return reset(client),
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let severed = {
        let (client_read, client_write) = client.split();
        let (server_read, server_write) = server.split();
        let up = pipe(client_read, server_write, shared.spec.clone(), shared.up);
        let down = pipe(server_read, client_write, shared.spec.clone(), shared.down);
        tokio::select! {
            (up, down) = async { tokio::join!(up, down) } => {
                if let Err(e) = up.and(down) {
                    debug!(error = %e, "wan link connection ended");
                }
                false
            }
            () = cut_or_gone(&mut cut) => true,
        }
    };
    if severed {
        reset(client);
        reset(server);
    }
}

/// Carries bytes from `from` to `to`, each chunk held for the delay in force when it was read
/// and then for as long as `bucket` asks.
async fn pipe<R, W>(
    mut from: R,
    mut to: W,
    spec: watch::Receiver<LinkSpec>,
    bucket: Arc<Mutex<TokenBucket>>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(IN_FLIGHT);
    let read = {
        let spec = spec.clone();
        async move {
            loop {
                let mut buf = vec![0; CHUNK];
                let n = from.read(&mut buf).await?;
                if n == 0 {
                    return Ok::<(), io::Error>(());
                }
                buf.truncate(n);
                let due = Instant::now() + spec.borrow().delay;
                if tx.send((due, buf)).await.is_err() {
                    return Ok(());
                }
            }
        }
    };
    let write = async move {
        while let Some((due, buf)) = rx.recv().await {
            // tokio's timer rounds every deadline up to the next whole millisecond, even one
            // already past: sleeping when there is nothing to wait for would hold each chunk
            // up to a millisecond and bound the link to a chunk per millisecond.
            if due > Instant::now() {
                tokio::time::sleep_until(due).await;
            }
            let bandwidth = spec.borrow().bandwidth;
            if let Some(rate) = bandwidth {
                let wait = match bucket.lock() {
                    Ok(mut b) => b.take(buf.len(), rate, Instant::now()),
                    Err(poisoned) => poisoned.into_inner().take(buf.len(), rate, Instant::now()),
                };
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
            }
            to.write_all(&buf).await?;
        }
        to.shutdown().await
    };
    let (read, write) = tokio::join!(read, write);
    read.and(write)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// An echo server on loopback: every connection gets back what it sends.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    /// Sends `data` over a fresh connection to `addr` and reads as many bytes back.
    async fn round_trip(addr: SocketAddr, data: &[u8]) -> io::Result<Vec<u8>> {
        let s = TcpStream::connect(addr).await?;
        let (mut r, mut w) = s.into_split();
        let data = data.to_vec();
        let n = data.len();
        let writer = tokio::spawn(async move { w.write_all(&data).await.map(|()| w) });
        let mut back = vec![0; n];
        r.read_exact(&mut back).await?;
        writer.await.unwrap()?;
        Ok(back)
    }

    #[tokio::test]
    async fn bytes_pass_unchanged_and_each_direction_is_delayed() {
        let delay = Duration::from_millis(40);
        let link = WanLink::start(echo().await, LinkSpec::delay(delay))
            .await
            .unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let started = Instant::now();
        assert_eq!(round_trip(link.addr(), &data).await.unwrap(), data);
        assert!(started.elapsed() >= 2 * delay, "{:?}", started.elapsed());

        let longer = Duration::from_millis(80);
        link.set(LinkSpec::delay(longer));
        assert_eq!(link.spec(), LinkSpec::delay(longer));
        let started = Instant::now();
        assert_eq!(round_trip(link.addr(), b"x").await.unwrap(), b"x");
        assert!(started.elapsed() >= 2 * longer, "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn bandwidth_bounds_the_bytes_per_second() {
        let rate = 128 * 1024;
        let link = WanLink::start(echo().await, LinkSpec::default().bandwidth(rate))
            .await
            .unwrap();
        let n = 160 * 1024;
        let data = vec![7u8; n];
        let started = Instant::now();
        assert_eq!(round_trip(link.addr(), &data).await.unwrap(), data);
        let least = Duration::from_secs_f64((n as u64 - BURST) as f64 / rate as f64);
        assert!(
            started.elapsed() >= least,
            "{:?} < {least:?}",
            started.elapsed()
        );
    }

    #[test]
    fn the_bucket_lets_a_burst_through_and_then_paces() {
        let start = Instant::now();
        let mut b = TokenBucket {
            tokens: BURST as f64,
            last: start,
        };
        assert_eq!(b.take(BURST as usize, 1000, start), Duration::ZERO);
        assert_eq!(b.take(500, 1000, start), Duration::from_millis(500));
        // A second later the debt is paid and half a second more is earned.
        let later = start + Duration::from_millis(1000);
        assert_eq!(b.take(500, 1000, later), Duration::ZERO);
    }

    #[test]
    fn a_fast_link_keeps_its_rate_though_timers_fire_on_whole_milliseconds() {
        let rate = 125_000_000;
        let start = Instant::now();
        let mut b = TokenBucket {
            tokens: BURST as f64,
            last: start,
        };
        // Every wait lasts until the next whole millisecond at the earliest, as tokio's
        // timer makes it.
        let chunks = 20_000u64;
        let mut now = start;
        for _ in 0..chunks {
            let wait = b.take(CHUNK, rate, now);
            now += Duration::from_millis(wait.as_nanos().div_ceil(1_000_000) as u64);
        }
        let seen = (chunks * CHUNK as u64) as f64 / (now - start).as_secs_f64();
        assert!(seen >= 0.95 * rate as f64, "{seen} bytes/s");
        assert!(seen <= 1.05 * rate as f64, "{seen} bytes/s");
    }

    #[test]
    fn a_slow_link_keeps_the_least_burst() {
        assert_eq!(TokenBucket::burst(1000.0), BURST as f64);
        assert_eq!(TokenBucket::burst(125e6), 500_000.0);
    }

    #[tokio::test]
    async fn a_cut_resets_connections_and_refuses_new_ones_until_restored() {
        let link = WanLink::start(echo().await, LinkSpec::default())
            .await
            .unwrap();
        let open = TcpStream::connect(link.addr()).await.unwrap();
        let (mut r, mut w) = open.into_split();
        w.write_all(b"before").await.unwrap();
        let mut buf = [0u8; 6];
        r.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"before");

        link.cut();
        assert!(link.is_cut());
        // The open connection ends: its next read sees the reset or the end of the stream.
        let mut rest = Vec::new();
        let ended = r.read_to_end(&mut rest).await;
        assert!(ended.is_err() || rest.is_empty(), "{ended:?} {rest:?}");
        // A new connection gets nothing through.
        assert!(round_trip(link.addr(), b"during").await.is_err());

        link.restore();
        assert!(!link.is_cut());
        assert_eq!(round_trip(link.addr(), b"after").await.unwrap(), b"after");
    }
}
