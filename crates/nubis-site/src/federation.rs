//! Signed requests between sites, through the bus layer: the client side is
//! [`FederationClient`] (every reply verified against the site asked), the server side
//! [`serve`], which serves `nubis.fed.<site>.>` with the bus layer's serve loop (verify first,
//! refusals signed over the arrival subject, bounded handlers with fairness across partners).

use std::future::Future;
use std::sync::Arc;

use nubis_bus::serve::{Limits, Service};
use nubis_protocol::envelope::{Opened, Verifier};
use nubis_protocol::identity::SiteIdentity;
use nubis_protocol::subject::{FederationOp, ParsedSubject, Subject};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use nubis_bus::federation::FederationClient;
pub use nubis_bus::serve::{sign_reply, HandlerResult};
pub use nubis_bus::CallError;

/// Serves `nubis.fed.<site>.>`: verifies every request, hands it to `handler`, and signs the
/// answer. At most `concurrency` requests are handled at once, at most half of them for one
/// partner; more wait for a slot in a bounded queue per partner.
#[allow(clippy::too_many_arguments)]
pub async fn serve<H, Fut>(
    client: async_nats::Client,
    identity: Arc<SiteIdentity>,
    verifier: Arc<Verifier>,
    concurrency: usize,
    tracker: &TaskTracker,
    cancel: CancellationToken,
    handler: H,
) -> Result<(), async_nats::Error>
where
    H: Fn(FederationOp, Opened) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    let site = identity.site().clone();
    let subscription = client
        .subscribe(Subject::federation_all(&site).as_str().to_string())
        .await?;
    let service = Service {
        name: "fed",
        identity,
        verifier,
        limits: Limits::new(concurrency),
    };
    let parse = move |subject: &str| match Subject::parse(subject) {
        Ok(ParsedSubject::Federation { site: s, op }) if s == site => Some(op),
        _ => None,
    };
    nubis_bus::serve::serve(
        service,
        client,
        subscription,
        tracker,
        cancel,
        parse,
        handler,
    );
    Ok(())
}
