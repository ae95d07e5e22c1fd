//! Reply inboxes of signed calls across sites: one subscription per site asked.
//!
//! A call from site R to site S takes its reply on `nubis.reply.<R>.<S>.<n>`, where only S may
//! publish (the hub's permissions), so no third site can answer first. Subscribing afresh for
//! every call would make every call announce and withdraw interest across the whole federation;
//! instead the first call to S subscribes `nubis.reply.<R>.<S>.<unique>.*` once, and each call
//! waits for the message on its own number. The unique token differs for every inbox (it is the
//! connection's own unique inbox token), so a late reply to a call made before a restart never
//! reaches a call made after it. Waiting calls are removed when they end, however they end, so
//! the table holds only the calls in flight.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::StreamExt as _;
use nubis_protocol::subject::Subject;
use nubis_protocol::SiteId;
use tokio::sync::oneshot;

/// The shared inboxes of one connection, one per site asked.
#[derive(Debug, Default)]
pub(crate) struct Replies {
    inboxes: Mutex<HashMap<SiteId, Arc<Inbox>>>,
}

/// The inbox of the calls to one site.
#[derive(Debug)]
struct Inbox {
    prefix: String,
    next: AtomicU64,
    waiting: Mutex<HashMap<u64, oneshot::Sender<async_nats::Message>>>,
}

/// One call waiting for its reply; dropping it forgets the call.
#[derive(Debug)]
pub(crate) struct Waiting {
    inbox: Arc<Inbox>,
    n: u64,
    /// The reply subject to send with the request.
    pub(crate) reply_to: String,
    /// The reply, or an error when the subscription ended.
    pub(crate) reply: oneshot::Receiver<async_nats::Message>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        lock(&self.inbox.waiting).remove(&self.n);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Replies {
    /// Registers a call of `requester` to `responder` on `client`, subscribing the responder's
    /// inbox first if no call to it has yet.
    pub(crate) async fn wait(
        &self,
        client: &async_nats::Client,
        requester: &SiteId,
        responder: &SiteId,
    ) -> Result<Waiting, async_nats::SubscribeError> {
        let inbox = self.inbox(client, requester, responder).await?;
        let n = inbox.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&inbox.waiting).insert(n, tx);
        Ok(Waiting {
            reply_to: format!("{}.{n}", inbox.prefix),
            inbox,
            n,
            reply: rx,
        })
    }

    async fn inbox(
        &self,
        client: &async_nats::Client,
        requester: &SiteId,
        responder: &SiteId,
    ) -> Result<Arc<Inbox>, async_nats::SubscribeError> {
        if let Some(inbox) = lock(&self.inboxes).get(responder) {
            return Ok(inbox.clone());
        }
        // The connection's fresh inbox ends in a unique token; the inbox takes it over.
        let fresh = client.new_inbox();
        let unique = fresh.rsplit('.').next().unwrap_or_default();
        let prefix = format!(
            "{}.{unique}",
            Subject::call_inbox_prefix(requester, responder)
        );
        let mut subscription = client.subscribe(format!("{prefix}.*")).await?;
        let inbox = Arc::new(Inbox {
            prefix,
            next: AtomicU64::new(0),
            waiting: Mutex::new(HashMap::new()),
        });
        let raced = {
            let mut inboxes = lock(&self.inboxes);
            match inboxes.get(responder) {
                Some(raced) => Some(raced.clone()),
                None => {
                    inboxes.insert(responder.clone(), inbox.clone());
                    None
                }
            }
        };
        if let Some(raced) = raced {
            // Another call subscribed meanwhile: use its inbox, let this subscription go.
            if let Err(e) = subscription.unsubscribe().await {
                tracing::debug!(error = %e, "cannot drop a duplicate reply subscription");
            }
            return Ok(raced);
        }
        let delivering = inbox.clone();
        tokio::spawn(async move {
            while let Some(message) = subscription.next().await {
                let n = message
                    .subject
                    .rsplit('.')
                    .next()
                    .and_then(|t| t.parse::<u64>().ok());
                let waiter = n.and_then(|n| lock(&delivering.waiting).remove(&n));
                match waiter {
                    // The caller may have given up meanwhile; nothing to do then.
                    Some(tx) => drop(tx.send(message)),
                    None => {
                        tracing::debug!(subject = %message.subject, "reply for no waiting call dropped")
                    }
                }
            }
            // The connection is closed: waiting calls learn it from their dropped senders.
            lock(&delivering.waiting).clear();
        });
        Ok(inbox)
    }
}
