//! Bandwidth caps: a token bucket that paces a fetch to at most a given number of bytes per
//! second (a migration's `max_bytes_per_sec`, or the proxy's own `transfer.max_bytes_per_sec`).
//!
//! The bucket holds at most `burst` bytes of credit and starts full, so over any interval the
//! bytes let through are at most `burst + rate × interval`. A chunk larger than the credit
//! left waits until the credit it lacks has accrued; the credit may run below zero by at most
//! one chunk, which the next chunk then waits for. Pacing the reading end is enough to pace the
//! transfer across sites: the reader's pull consumer asks the source's bucket for at most
//! `transfer.fetch_window` chunks at a time, so what crosses the sites never runs further
//! ahead of the paced reader than that window.

use std::time::Duration;

use tokio::time::Instant;

/// A token bucket of bytes.
#[derive(Debug)]
pub struct Pacer {
    rate: f64,
    burst: f64,
    credit: f64,
    last: Instant,
}

impl Pacer {
    /// A pacer letting through `bytes_per_sec` on average with bursts of at most `burst`
    /// bytes; `None` when there is no cap (a cap of 0 counts as none).
    pub fn new(bytes_per_sec: Option<u64>, burst: u64) -> Option<Self> {
        let rate = bytes_per_sec.filter(|r| *r > 0)? as f64;
        let burst = burst.max(1) as f64;
        Some(Self {
            rate,
            burst,
            credit: burst,
            last: Instant::now(),
        })
    }

    /// The cap, in bytes per second.
    pub fn rate(&self) -> u64 {
        self.rate as u64
    }

    /// The largest burst, in bytes.
    pub fn burst(&self) -> u64 {
        self.burst as u64
    }

    /// Takes `bytes` from the bucket and returns how long to wait before sending them.
    fn debit(&mut self, bytes: u64) -> Duration {
        let now = Instant::now();
        let accrued = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.last = now;
        self.credit = (self.credit + accrued).min(self.burst) - bytes as f64;
        if self.credit >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.credit / self.rate)
        }
    }

    /// Waits until `bytes` more may pass.
    pub async fn take(&mut self, bytes: u64) {
        let wait = self.debit(bytes);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// The cap that applies: the smaller of the transfer's own and the proxy's.
pub fn effective_cap(transfer: Option<u64>, proxy: Option<u64>) -> Option<u64> {
    match (transfer.filter(|c| *c > 0), proxy.filter(|c| *c > 0)) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_cap_means_no_pacer_and_the_smaller_cap_wins() {
        assert!(Pacer::new(None, 10).is_none());
        assert!(Pacer::new(Some(0), 10).is_none());
        assert_eq!(effective_cap(None, None), None);
        assert_eq!(effective_cap(Some(5), None), Some(5));
        assert_eq!(effective_cap(None, Some(7)), Some(7));
        assert_eq!(effective_cap(Some(9), Some(7)), Some(7));
        assert_eq!(effective_cap(Some(0), Some(7)), Some(7));
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_through_never_exceed_burst_plus_rate_times_elapsed() {
        let rate = 1_000_000u64;
        let burst = 250_000u64;
        let mut p = Pacer::new(Some(rate), burst).unwrap();
        let start = Instant::now();
        let mut through = 0u64;
        for _ in 0..40 {
            p.take(100_000).await;
            through += 100_000;
            let allowed = burst as f64 + rate as f64 * start.elapsed().as_secs_f64();
            assert!(through as f64 <= allowed + 1.0, "{through} > {allowed}");
        }
        // 4 MB at 1 MB/s with a 250 kB head start: at least 3.75 s of (paused) time.
        assert!(start.elapsed() >= Duration::from_millis(3_750));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_time_earns_at_most_one_burst() {
        let mut p = Pacer::new(Some(1_000), 500).unwrap();
        tokio::time::sleep(Duration::from_secs(60)).await;
        let start = Instant::now();
        p.take(500).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        p.take(500).await;
        assert!(start.elapsed() >= Duration::from_millis(500));
    }
}
