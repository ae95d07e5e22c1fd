//! The threat model, as tests: every federation member is a competitor, so each test here
//! attacks one endpoint or one piece of shared infrastructure the way a hostile member (or a
//! broken-into component of a site) would, with real servers and real daemons, and checks that
//! the attack changes nothing. Every refusal has its legitimate counterpart beside it, so no
//! test can pass by refusing everything.

use std::sync::Arc;
use std::time::Duration;

use nubis_bus::federation::FederationClient;
use nubis_bus::{CallPolicy, SignedClient};
use nubis_protocol::envelope::Verifier;
use nubis_protocol::replay::ReplayCache;
use nubis_protocol::SiteId;

use crate::stack::Stack;

mod bus;
mod chain;
mod files;
mod operators;
mod quota;
mod soak;
mod tokens;

/// A federation client of site `me`, on `me`'s own server, signing with `me`'s key and accepting
/// replies signed by any other site of the stack, waiting `timeout` for each.
async fn signed_as(stack: &Stack, me: &str, timeout: Duration) -> FederationClient {
    let identity = stack.identities[me].clone();
    let pinned: Vec<_> = stack
        .identities
        .iter()
        .filter(|(s, _)| **s != me)
        .map(|(s, i)| (SiteId::new(*s).unwrap(), i.public().signing))
        .collect();
    let verifier = Verifier::new(
        identity.site().clone(),
        pinned,
        ReplayCache::temporary(600_000).unwrap(),
    );
    let nats = stack.fed.connect(me).await.unwrap();
    FederationClient::new(SignedClient::new(
        nats,
        identity,
        Arc::new(verifier),
        CallPolicy::with_timeout(timeout),
    ))
}
