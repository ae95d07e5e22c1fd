//! Waiting for a condition by polling it until a deadline, instead of sleeping and hoping.
//!
//! Tests against real servers cannot know how long propagation takes on a loaded machine, so
//! they ask again and again with a short, growing pause, and give up only after a deadline far
//! beyond anything a healthy system needs. The deadline is a guard against hanging, not a
//! statement about speed.

use std::fmt::Display;
use std::future::Future;
use std::time::{Duration, Instant};

/// How long [`wait_until`] and [`assert_eventually!`](crate::assert_eventually) wait by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

const FIRST_PAUSE: Duration = Duration::from_millis(10);
const LONGEST_PAUSE: Duration = Duration::from_millis(250);

/// A condition did not hold before the deadline.
#[derive(Debug, Clone, thiserror::Error)]
#[error("timed out after {timeout:?} waiting for {what}; last attempt: {last}")]
pub struct WaitError {
    /// What was awaited.
    pub what: String,
    /// How long it was awaited.
    pub timeout: Duration,
    /// Why the last attempt did not succeed.
    pub last: String,
}

/// The pause between two polls: short at first so fast conditions are seen at once, growing so
/// slow ones do not burn a core that the servers under test need.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: FIRST_PAUSE }
    }
}

impl Backoff {
    /// Sleeps for the current pause and lengthens the next one.
    pub async fn pause(&mut self) {
        tokio::time::sleep(self.advance()).await;
    }

    /// Like [`Backoff::pause`], blocking the calling thread.
    pub fn pause_blocking(&mut self) {
        std::thread::sleep(self.advance());
    }

    /// The current pause; lengthens the next one.
    fn advance(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(LONGEST_PAUSE);
        now
    }
}

/// Calls `check` until it returns `Ok`, and returns that value; after `timeout`, returns a
/// [`WaitError`] carrying the last error `check` gave.
///
/// ```no_run
/// # async fn demo(client: async_nats::Client) -> Result<(), nubis_testkit::WaitError> {
/// use nubis_testkit::{wait_until, DEFAULT_TIMEOUT};
/// let js = async_nats::jetstream::with_domain(client, "hub");
/// let kv = wait_until(DEFAULT_TIMEOUT, "the directory bucket", || {
///     let js = js.clone();
///     async move { js.get_key_value("directory").await }
/// })
/// .await?;
/// # Ok(()) }
/// ```
pub async fn wait_until<T, E, F, Fut>(
    timeout: Duration,
    what: impl Into<String>,
    mut check: F,
) -> Result<T, WaitError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: Display,
{
    // A std clock, not tokio's: a test that pauses tokio's clock must still be bounded.
    let deadline = Instant::now() + timeout;
    let mut backoff = Backoff::default();
    loop {
        match check().await {
            Ok(value) => return Ok(value),
            Err(err) => {
                if Instant::now() >= deadline {
                    return Err(WaitError {
                        what: what.into(),
                        timeout,
                        last: err.to_string(),
                    });
                }
            }
        }
        backoff.pause().await;
    }
}

/// Calls `check` until it returns `Some`, and returns that value; panics with `what` after
/// `timeout`. For conditions with nothing to report while they do not hold yet.
pub async fn eventually<T>(
    timeout: Duration,
    what: impl Into<String>,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let what = what.into();
    match wait_until(timeout, what.as_str(), || {
        let v = check().ok_or("not yet");
        async move { v }
    })
    .await
    {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    }
}

/// Like [`eventually`], for tests without an async runtime: blocks the calling thread between
/// polls.
pub fn eventually_blocking<T>(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    let mut backoff = Backoff::default();
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        backoff.pause_blocking();
    }
}

/// Asserts that a boolean condition becomes true within a timeout ([`DEFAULT_TIMEOUT`] unless
/// given), polling it with a growing pause. The condition may contain `.await`.
///
/// ```no_run
/// # async fn demo(seen: std::sync::atomic::AtomicUsize) {
/// use std::sync::atomic::Ordering;
/// nubis_testkit::assert_eventually!(seen.load(Ordering::SeqCst) == 3);
/// nubis_testkit::assert_eventually!(seen.load(Ordering::SeqCst) > 0, std::time::Duration::from_secs(5));
/// # }
/// ```
#[macro_export]
macro_rules! assert_eventually {
    ($cond:expr $(,)?) => {
        $crate::assert_eventually!($cond, $crate::DEFAULT_TIMEOUT)
    };
    ($cond:expr, $timeout:expr $(,)?) => {{
        let timeout: ::std::time::Duration = $timeout;
        let deadline = ::std::time::Instant::now() + timeout;
        let mut backoff = $crate::Backoff::default();
        loop {
            if $cond {
                break;
            }
            if ::std::time::Instant::now() >= deadline {
                panic!(
                    "condition did not hold within {:?}: {}",
                    timeout,
                    stringify!($cond)
                );
            }
            backoff.pause().await;
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn returns_the_first_success() {
        let calls = AtomicUsize::new(0);
        let value = wait_until(DEFAULT_TIMEOUT, "third call", || {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                if n >= 3 {
                    Ok(n)
                } else {
                    Err(format!("call {n}"))
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(value, 3);
    }

    #[tokio::test]
    async fn reports_the_last_error_on_timeout() {
        let err = wait_until(Duration::ZERO, "the impossible", || async {
            Err::<(), _>("still impossible")
        })
        .await
        .unwrap_err();
        assert_eq!(err.what, "the impossible");
        assert_eq!(err.last, "still impossible");
    }

    #[tokio::test]
    async fn assert_eventually_sees_a_condition_become_true() {
        let counter = AtomicUsize::new(0);
        crate::assert_eventually!(counter.fetch_add(1, Ordering::SeqCst) >= 2);
        assert!(counter.load(Ordering::SeqCst) >= 3);
    }
}
