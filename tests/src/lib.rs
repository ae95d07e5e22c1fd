//! Test support of the integration tests, the demo and the benchmarks: [`stack`] runs a whole
//! federation (real hub and leaf nats-servers, site daemons, Transfer proxies, host agents)
//! from configuration files written the way an operator writes them. The tests themselves live
//! in `integration/`.
// A test harness: a failed setup step should stop it loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod chaos;
pub mod stack;
