//! One integration-test binary, one module per capability, all against real servers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod chaos;
mod demo;
mod envelope;
mod federation;
mod federation_init;
mod guest_kpi;
mod guest_migration;
mod host_agent;
mod hostile;
mod hub_cluster;
mod hypervisor;
mod kpifs;
mod migration;
mod monitoring;
mod partitions;
mod permissions;
mod proxy;
mod python_subscriber;
mod relay;
mod retries;
mod site;
mod tls;
mod wan;
mod wire;

use nubis_tests::stack;

/// Tests that use libvirtd's `qemu:///system` share it (one of them restarts it) and two cores:
/// they run one at a time, across modules.
pub static QEMU: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
