//! Federation test kit: real `nats-server` processes for tests and demos.
//!
//! Modelled on the `nats-server` helper crate of async-nats, and extended with what nubis
//! needs: a hub with N leaf-node sites, each in its own JetStream domain with its own store,
//! configured from the templates in `nats-config/`; readiness by polling rather than sleeping;
//! stop, restart and kill of single servers for fault tests; and server logs kept when a test
//! fails.
//!
//! ```no_run
//! # async fn demo() {
//! use nubis_testkit::{require_nats_server, Federation};
//! let Some(binary) = require_nats_server() else { return };
//! let federation = Federation::start_with(&binary, &["a", "b"]).await.unwrap();
//! let client_a = federation.connect("a").await.unwrap();
//! let operator_a = federation.connect_as("a", nubis_testkit::Role::Operator).await.unwrap();
//! # }
//! ```

pub mod binary;
pub mod federation;
pub mod localfed;
pub mod monitor;
pub mod wait;
pub mod wan;

pub use binary::{LocateError, NatsServerBinary, Version, MIN_VERSION, NATS_SERVER_ENV};
pub use federation::{
    kept_logs_root, Error, ExtraLeaf, Federation, Role, TlsFiles, DIRECTORY_BUCKET_CONFIG, HUB,
    HUB_DOMAIN,
};
pub use wait::{eventually, eventually_blocking, wait_until, Backoff, WaitError, DEFAULT_TIMEOUT};
pub use wan::{LinkSpec, WanLink};

/// Whether the tests run under CI (`CI=true`), where a missing prerequisite is a failure.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Applies the rule for a missing prerequisite (a server binary, libvirt, FUSE, KVM): outside
/// CI, print the reason and return `None` so the test returns early as skipped; under
/// `CI=true`, panic with the reason, because CI must run everything.
///
/// # Panics
///
/// Under `CI=true`, always.
pub fn skip_or_fail<T>(reason: impl std::fmt::Display) -> Option<T> {
    if under_ci() {
        panic!("prerequisite missing under CI=true: {reason}");
    }
    let test = std::thread::current()
        .name()
        .map(|name| format!(" {name}"))
        .unwrap_or_default();
    eprintln!("SKIPPED{test}: {reason}");
    None
}

/// The `nats-server` binary for a test, or `None` (test skipped) when there is none or it is
/// too old; see [`skip_or_fail`] for the rule under CI.
///
/// # Panics
///
/// Under `CI=true`, when no usable binary is found.
pub fn require_nats_server() -> Option<NatsServerBinary> {
    match NatsServerBinary::locate() {
        Ok(binary) => Some(binary),
        Err(err) => skip_or_fail(err),
    }
}
