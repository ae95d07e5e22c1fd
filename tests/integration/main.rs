//! One integration-test binary, one module per capability, all against real servers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod demo;
mod envelope;
mod federation;
mod host_agent;
mod hypervisor;
mod kpifs;
mod migration;
mod permissions;
mod proxy;
mod python_subscriber;
mod site;
mod stack;
