//! The keys a VM's monitoring is sealed to are its primary's: an Intermediary that put its own
//! sealing key into the descriptor it passes on would read what is sealed for the primary. The
//! next site checks the descriptor's keys against the primary's, pinned or from the directory.

use std::time::Duration;

use nubis_bus::CallError;
use nubis_protocol::message::{ErrorCode, Offers};
use nubis_protocol::subject::FederationOp;
use nubis_protocol::{MigrationId, SiteId};
use nubis_testkit::{require_nats_server, wait_until};

use super::{descriptor, migration_request, signed_as};
use crate::stack::{SiteSpec, Stack};

const LONG: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intermediary_cannot_put_its_own_keys_into_a_descriptor() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let stack = Stack::start(
        &binary,
        vec![
            SiteSpec::new("a").partner("b", 10),
            SiteSpec::new("b").partner("a", 0).partner("c", 10),
            SiteSpec::new("c").partner("b", 0).host("c1", 4096),
        ],
    )
    .await;
    // b passes on a VM of a, which is no partner of c: c knows a's keys from the directory.
    let b = signed_as(&stack, "b", Duration::from_secs(10)).await;
    let c = SiteId::new("c").unwrap();
    let ask = |d| {
        let b = &b;
        let c = &c;
        async move {
            let req = migration_request(MigrationId::random(), d);
            b.call::<_, Offers>(c, FederationOp::MigrationRequest, &req)
                .await
        }
    };
    let offers = wait_until(LONG, "c offers a place to a's VM", || {
        ask(descriptor(&stack, "vm-genuine", "a"))
    })
    .await
    .unwrap();
    assert_eq!(offers.offers.len(), 1);

    // The same VM with b's sealing key, or b's signing key, in place of a's.
    let b_keys = stack.identities["b"].public();
    let mut sealed_for_b = descriptor(&stack, "vm-forged", "a");
    sealed_for_b.primary_keys.sealing = b_keys.sealing;
    let mut signed_by_b = descriptor(&stack, "vm-forged", "a");
    signed_by_b.primary_keys.signing = b_keys.signing.to_bytes();
    for d in [sealed_for_b, signed_by_b] {
        match ask(d).await {
            Err(CallError::Refused { reply, .. }) => {
                assert_eq!(reply.code, ErrorCode::Refused, "{reply:?}")
            }
            other => panic!("c took a descriptor with b's keys: {other:?}"),
        }
    }
    stack.shutdown().await;
}
