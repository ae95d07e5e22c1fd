//! One integration-test binary, one module per capability, all against real servers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod envelope;
mod federation;
mod hypervisor;
mod kpifs;
mod site;
