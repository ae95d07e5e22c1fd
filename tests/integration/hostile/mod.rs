//! The threat model, as tests: every federation member is a competitor, so each test here
//! attacks one endpoint or one piece of shared infrastructure the way a hostile member (or a
//! broken-into component of a site) would, with real servers and real daemons, and checks that
//! the attack changes nothing. Every refusal has its legitimate counterpart beside it, so no
//! test can pass by refusing everything.

use std::sync::Arc;
use std::time::Duration;

use nubis_bus::federation::FederationClient;
use nubis_bus::{CallPolicy, SignedClient};
use nubis_protocol::descriptor::{PrimaryKeys, VirtualHardware, VmDescriptor};
use nubis_protocol::envelope::Verifier;
use nubis_protocol::message::MigrationRequest;
use nubis_protocol::replay::ReplayCache;
use nubis_protocol::{MigrationId, RequestId, SiteId, VmId};

use crate::stack::{deploy_body, Stack};

mod bus;
mod chain;
mod confidential;
mod files;
mod hosts;
mod keys;
mod location;
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

/// A small VM descriptor of `vm` naming `primary` (with its real public keys) as its primary.
fn descriptor(stack: &Stack, vm: &str, primary: &str) -> VmDescriptor {
    let public = stack.identities[primary].public();
    VmDescriptor {
        id: VmId::new(vm).unwrap(),
        name: vm.to_string(),
        version: 1,
        primary_site: SiteId::new(primary).unwrap(),
        primary_keys: PrimaryKeys {
            signing: public.signing.to_bytes(),
            sealing: public.sealing,
        },
        hardware: VirtualHardware {
            vcpus: 1,
            memory_mib: 256,
            disks: Vec::new(),
            networks: Vec::new(),
            boot: None,
        },
        monitoring: Vec::new(),
        properties: std::collections::BTreeMap::new(),
    }
}

/// A Migration request of `migration_id` for `d`, at the start of a chain of at most 2 hops.
fn migration_request(migration_id: MigrationId, d: VmDescriptor) -> MigrationRequest {
    MigrationRequest {
        request_id: RequestId::random(),
        migration_id,
        vm: d.id.clone(),
        descriptor: d,
        depth: 0,
        max_depth: 2,
    }
}
