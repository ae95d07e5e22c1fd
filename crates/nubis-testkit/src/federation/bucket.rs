//! The hub operator's part of starting a federation: the shared directory bucket, created once
//! at the hub with its final configuration (`nats-config/directory-bucket.json`), before any site
//! joins. Sites may neither create nor reconfigure it (`nats-config/hub-leaf-user.conf`).

use std::time::{Duration, Instant};

use super::{Error, Federation};
use crate::wait::{Backoff, DEFAULT_TIMEOUT};

/// The directory's stream configuration, as the hub operator creates it.
pub const DIRECTORY_BUCKET_CONFIG: &str =
    include_str!("../../../../nats-config/directory-bucket.json");

/// One creation request; a lost one is sent again until [`DEFAULT_TIMEOUT`].
const CREATE_TIMEOUT: Duration = Duration::from_secs(2);

impl Federation {
    /// Creates the directory bucket at the hub as its operator. Creating it again with the same
    /// configuration succeeds, so a hub restarted on its store is no different.
    pub(super) async fn create_directory_bucket(&self) -> Result<(), Error> {
        let config: serde_json::Value =
            serde_json::from_str(DIRECTORY_BUCKET_CONFIG).map_err(|e| Error::Bucket {
                last: format!("nats-config/directory-bucket.json: {e}"),
            })?;
        let name = config
            .get("name")
            .and_then(|n| n.as_str())
            .unwrap_or_default()
            .to_owned();
        let client = self.hub.connect_as(self.hub.default_role()).await?;
        let deadline = Instant::now() + DEFAULT_TIMEOUT;
        let mut backoff = Backoff::default();
        loop {
            let answer = tokio::time::timeout(
                CREATE_TIMEOUT,
                client.request(
                    format!("$JS.API.STREAM.CREATE.{name}"),
                    DIRECTORY_BUCKET_CONFIG.into(),
                ),
            )
            .await;
            let last = match answer {
                Ok(Ok(msg)) => {
                    let reply: serde_json::Value =
                        serde_json::from_slice(&msg.payload).unwrap_or_default();
                    match reply.get("error") {
                        None => return Ok(()),
                        Some(error) => error.to_string(),
                    }
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer in {CREATE_TIMEOUT:?}"),
            };
            if Instant::now() >= deadline {
                return Err(Error::Bucket { last });
            }
            backoff.pause().await;
        }
    }
}
