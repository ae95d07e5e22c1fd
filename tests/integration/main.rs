//! One integration-test binary, one module per capability, all against real servers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod envelope;
mod federation;
mod host_agent;
mod hypervisor;
mod kpifs;
mod proxy;
mod permissions;
mod python_subscriber;
mod site;
mod stack;
mod migration;
