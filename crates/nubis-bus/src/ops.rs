//! The operator API (`nubis.ops.<site>.<endpoint>`, JSON) from a client's side: the `nubis`
//! CLI, the demo and the tests call a site through [`OpsClient`] and read the typed answers of
//! `nubis_protocol::ops`.
//!
//! A site answers refusals the NATS micro-service way (headers `Nats-Service-Error` and
//! `Nats-Service-Error-Code`, `subjects.md` section 13); they come back as
//! [`OpsError::Refused`]. [`OpsClient::follow_migration`] polls a migration until it is over.

use std::time::Duration;

use async_nats::service::{NATS_SERVICE_ERROR, NATS_SERVICE_ERROR_CODE};
use nubis_protocol::ops::{
    CancelReply, CancelRequest, ControlOp, ControlView, DeployRequest, EvictReply, ImagePutReply,
    ImagePutRequest, ImagesReply, MigrateRequest, MigrationStarted, MigrationView, SiteStatus,
    SitesReply, UsageQuery, UsageReport, VmRef, VmView, VmsQuery, VmsReply,
};
use nubis_protocol::subject::{OpsEndpoint, Subject};
use nubis_protocol::{MigrationId, SiteId, VmId};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// How long [`OpsClient::follow_migration`] waits between two looks at a migration, unless told.
pub const FOLLOW_INTERVAL: Duration = Duration::from_millis(250);

/// Why an operator request failed.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// The request could not be encoded as JSON.
    #[error("cannot encode the request to {subject}")]
    Encode {
        /// The subject.
        subject: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// No site daemon listens on the subject.
    #[error("no site daemon answers on {subject}")]
    NoResponders {
        /// The subject.
        subject: String,
    },
    /// The site did not answer in time.
    #[error("the site did not answer on {subject} within {after:?}")]
    Timeout {
        /// The subject.
        subject: String,
        /// How long the client waited.
        after: Duration,
    },
    /// The request could not be sent or its answer not received.
    #[error("request on {subject} failed")]
    Request {
        /// The subject.
        subject: String,
        /// The cause.
        #[source]
        source: async_nats::RequestError,
    },
    /// The site refused the request.
    #[error("the site refused the request ({status}): {message}")]
    Refused {
        /// The service error code (400, 409, 422, 500, 504, ...).
        status: u16,
        /// The site's message, ending with the stable code of `subjects.md` section 5 in
        /// parentheses.
        message: String,
    },
    /// The answer is not the JSON this client expects.
    #[error("the site answered on {subject} with unexpected JSON")]
    Decode {
        /// The subject.
        subject: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

impl OpsError {
    /// Whether trying again may help: the site could not be reached or did not answer.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::NoResponders { .. } | Self::Timeout { .. } | Self::Request { .. }
        )
    }

    /// The stable code of a refusal (`unknown_vm`, `conflict`, ...), taken from the end of the
    /// site's message, when it names one.
    pub fn refusal_code(&self) -> Option<&str> {
        let Self::Refused { message, .. } = self else {
            return None;
        };
        let inner = message.trim_end().strip_suffix(')')?;
        let code = &inner[inner.rfind('(')? + 1..];
        code.bytes()
            .all(|b| b.is_ascii_lowercase() || b == b'_')
            .then_some(code)
            .filter(|c| !c.is_empty())
    }
}

/// A client of one site's operator API.
#[derive(Debug, Clone)]
pub struct OpsClient {
    client: async_nats::Client,
    site: SiteId,
    timeout: Duration,
    /// The operator whose per-operator subjects are used; `None` for the shared subjects.
    operator: Option<String>,
}

impl OpsClient {
    /// A client of `site`'s operator API over `client`, waiting up to `timeout` for each answer.
    pub fn new(client: async_nats::Client, site: SiteId, timeout: Duration) -> Self {
        Self {
            client,
            site,
            timeout,
            operator: None,
        }
    }

    /// Calls as `operator` on `nubis.ops.<site>.<operator>.<endpoint>`, the subjects the site's
    /// server lets only that operator's NATS user publish to (so the site records who called).
    /// A name that cannot be an operator's is ignored (the shared subjects are used).
    pub fn as_operator(mut self, operator: &str) -> Self {
        self.operator =
            nubis_protocol::subject::is_operator_name(operator).then(|| operator.to_owned());
        self
    }

    /// The subject of `endpoint` for this client.
    fn subject(&self, endpoint: OpsEndpoint) -> Subject {
        self.operator
            .as_deref()
            .and_then(|op| Subject::ops_by(&self.site, op, endpoint))
            .unwrap_or_else(|| Subject::ops(&self.site, endpoint))
    }

    /// The site asked.
    pub fn site(&self) -> &SiteId {
        &self.site
    }

    /// The NATS connection.
    pub fn nats(&self) -> &async_nats::Client {
        &self.client
    }

    /// Sends `request` as JSON to `endpoint` and reads the answer as `T`.
    pub async fn call<Q, T>(&self, endpoint: OpsEndpoint, request: &Q) -> Result<T, OpsError>
    where
        Q: Serialize + ?Sized,
        T: DeserializeOwned,
    {
        let subject = self.subject(endpoint);
        let payload = serde_json::to_vec(request).map_err(|source| OpsError::Encode {
            subject: subject.to_string(),
            source,
        })?;
        let answer = self.request(&subject, payload).await?;
        serde_json::from_slice(&answer).map_err(|source| OpsError::Decode {
            subject: subject.to_string(),
            source,
        })
    }

    async fn request(&self, subject: &Subject, payload: Vec<u8>) -> Result<Vec<u8>, OpsError> {
        let timed_out = || OpsError::Timeout {
            subject: subject.to_string(),
            after: self.timeout,
        };
        let answer = tokio::time::timeout(
            self.timeout,
            self.client
                .request(subject.as_str().to_string(), payload.into()),
        )
        .await
        .map_err(|_| timed_out())?
        .map_err(|source| match source.kind() {
            async_nats::RequestErrorKind::NoResponders => OpsError::NoResponders {
                subject: subject.to_string(),
            },
            async_nats::RequestErrorKind::TimedOut => timed_out(),
            _ => OpsError::Request {
                subject: subject.to_string(),
                source,
            },
        })?;
        if let Some(headers) = &answer.headers {
            if let Some(message) = headers.get(NATS_SERVICE_ERROR) {
                return Err(OpsError::Refused {
                    status: headers
                        .get(NATS_SERVICE_ERROR_CODE)
                        .and_then(|c| c.as_str().trim().parse().ok())
                        .unwrap_or(0),
                    message: message.to_string(),
                });
            }
        }
        Ok(answer.payload.to_vec())
    }

    /// `status`: the site's own state.
    pub async fn status(&self) -> Result<SiteStatus, OpsError> {
        self.call(OpsEndpoint::Status, &Empty {}).await
    }

    /// `sites`: the sites of the directory and the configured partners.
    pub async fn sites(&self) -> Result<SitesReply, OpsError> {
        self.call(OpsEndpoint::Sites, &Empty {}).await
    }

    /// `vms`: every VM the site is responsible for.
    pub async fn vms(&self) -> Result<VmsReply, OpsError> {
        self.call(OpsEndpoint::Vms, &VmsQuery::default()).await
    }

    /// `vms` of one VM.
    pub async fn vm(&self, vm: &VmId) -> Result<VmView, OpsError> {
        let subject = self.subject(OpsEndpoint::Vms);
        let reply: VmsReply = self
            .call(
                OpsEndpoint::Vms,
                &VmsQuery {
                    vm: Some(vm.clone()),
                    migration: None,
                },
            )
            .await?;
        reply
            .vms
            .into_iter()
            .find(|v| v.vm == *vm)
            .ok_or_else(|| OpsError::Decode {
                subject: subject.to_string(),
                source: serde::de::Error::custom(format!("the answer does not list VM {vm}")),
            })
    }

    /// `vms` of one migration.
    pub async fn migration(&self, migration: &MigrationId) -> Result<MigrationView, OpsError> {
        self.call(
            OpsEndpoint::Vms,
            &VmsQuery {
                vm: None,
                migration: Some(*migration),
            },
        )
        .await
    }

    /// `deploy`: primary placement of a new VM.
    pub async fn deploy(&self, request: &DeployRequest) -> Result<MigrationStarted, OpsError> {
        self.call(OpsEndpoint::Deploy, request).await
    }

    /// `migrate`: the site acts as Controller.
    pub async fn migrate(&self, request: &MigrateRequest) -> Result<MigrationStarted, OpsError> {
        self.call(OpsEndpoint::Migrate, request).await
    }

    /// `evict`: the VM must leave the site.
    pub async fn evict(&self, vm: &VmId) -> Result<EvictReply, OpsError> {
        self.call(OpsEndpoint::Evict, &VmRef { vm: vm.clone() })
            .await
    }

    /// `control`: a Control-interface change or query.
    pub async fn control(&self, request: &ControlOp) -> Result<ControlView, OpsError> {
        self.call(OpsEndpoint::Control, request).await
    }

    /// `cancel`: the migration aborts at its next step.
    pub async fn cancel(&self, migration: &MigrationId) -> Result<CancelReply, OpsError> {
        self.call(
            OpsEndpoint::Cancel,
            &CancelRequest {
                migration: *migration,
            },
        )
        .await
    }

    /// `usage`: a VM's usage over a period.
    pub async fn usage(&self, query: &UsageQuery) -> Result<UsageReport, OpsError> {
        self.call(OpsEndpoint::Usage, query).await
    }

    /// `images`: the site's image store.
    pub async fn images(&self) -> Result<ImagesReply, OpsError> {
        self.call(OpsEndpoint::Images, &Empty {}).await
    }

    /// `image_put`: imports an uploaded image into the store.
    pub async fn image_put(&self, request: &ImagePutRequest) -> Result<ImagePutReply, OpsError> {
        self.call(OpsEndpoint::ImagePut, request).await
    }

    /// Polls `migration` every `interval` until it is committed or aborted and returns its
    /// last view, whichever way it ended; `progress` sees every view on the way, the last one
    /// included.
    ///
    /// A site that cannot be reached or does not answer is asked again at the next poll (it may
    /// be restarting: a Controller's migrations are journaled); a refusal ends the follow. It
    /// never gives up by itself: bound it with `tokio::time::timeout` when it must.
    pub async fn follow_migration(
        &self,
        migration: &MigrationId,
        interval: Duration,
        mut progress: impl FnMut(&MigrationView),
    ) -> Result<MigrationView, OpsError> {
        loop {
            match self.migration(migration).await {
                Ok(view) => {
                    progress(&view);
                    if view.phase.is_over() {
                        return Ok(view);
                    }
                }
                Err(e) if e.is_transient() => {
                    tracing::debug!(migration.id = %migration, error = %e, "migration not readable yet");
                }
                Err(e) => return Err(e),
            }
            tokio::time::sleep(interval).await;
        }
    }
}

/// The request of endpoints without parameters: `{}`.
#[derive(Debug, Serialize)]
struct Empty {}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn refused(message: &str) -> OpsError {
        OpsError::Refused {
            status: 400,
            message: message.into(),
        }
    }

    #[test]
    fn the_stable_code_is_read_from_the_end_of_a_refusal() {
        assert_eq!(
            refused("VM x is not known at this site (unknown_vm)").refusal_code(),
            Some("unknown_vm")
        );
        assert_eq!(
            refused("exists (a) (conflict) ").refusal_code(),
            Some("conflict")
        );
        assert_eq!(refused("no code here").refusal_code(), None);
        assert_eq!(refused("odd (Not A Code)").refusal_code(), None);
        assert_eq!(refused("empty ()").refusal_code(), None);
        let timeout = OpsError::Timeout {
            subject: "s".into(),
            after: Duration::from_secs(1),
        };
        assert_eq!(timeout.refusal_code(), None);
        assert!(timeout.is_transient());
        assert!(!refused("x (conflict)").is_transient());
    }

    /// A stand-in site `a` whose migration `COMMITS` goes queued, transferring, committed over
    /// three looks; any other migration is unknown.
    async fn stand_in(
        fed: &nubis_testkit::Federation,
    ) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        use futures::StreamExt as _;
        let site = fed.connect("a").await?;
        let mut requests = site.subscribe("nubis.ops.a.vms").await?;
        site.flush().await?;
        Ok(tokio::spawn(async move {
            let mut looks = 0;
            while let Some(m) = requests.next().await {
                let Some(reply) = m.reply else { continue };
                let q: VmsQuery = serde_json::from_slice(&m.payload).unwrap();
                if q.migration.map(|m| m.to_string()).as_deref() != Some(COMMITS) {
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert(NATS_SERVICE_ERROR, "no migration here (unknown_vm)");
                    headers.insert(NATS_SERVICE_ERROR_CODE, "400");
                    site.publish_with_headers(reply, headers, "".into())
                        .await
                        .unwrap();
                    continue;
                }
                let phase = ["queued", "transferring", "committed"][looks.min(2)];
                looks += 1;
                let view = serde_json::json!({"migration": COMMITS, "vm": "vm-1",
                    "phase": phase, "reason": null, "bytes_done": looks * 10, "bytes_total": 30,
                    "offers": 1, "queue_position": 0, "elapsed_s": 0.5, "failed_rounds": 0,
                    "last_failure": null});
                site.publish(reply, serde_json::to_vec(&view).unwrap().into())
                    .await
                    .unwrap();
            }
        }))
    }

    const COMMITS: &str = "9a2b0c1d2e3f40516273849a0b1c2d3e";

    #[tokio::test]
    async fn a_migration_is_followed_until_it_is_over_and_refusals_are_typed() {
        use nubis_protocol::ops::MigrationPhase;
        let Some(binary) = nubis_testkit::require_nats_server() else {
            return;
        };
        let fed = nubis_testkit::Federation::start_with(&binary, &["a"])
            .await
            .unwrap();
        let _site = stand_in(&fed).await.unwrap();
        let operator = fed
            .connect_as("a", nubis_testkit::Role::Operator)
            .await
            .unwrap();
        let a = OpsClient::new(
            operator.clone(),
            SiteId::new("a").unwrap(),
            Duration::from_secs(5),
        );

        let mut seen = Vec::new();
        let end = a
            .follow_migration(&COMMITS.parse().unwrap(), Duration::from_millis(10), |v| {
                seen.push((v.phase, v.bytes_done))
            })
            .await
            .unwrap();
        assert_eq!(end.phase, MigrationPhase::Committed);
        assert_eq!(
            seen,
            [
                (MigrationPhase::Queued, 10),
                (MigrationPhase::Transferring, 20),
                (MigrationPhase::Committed, 30)
            ]
        );

        let e = a
            .follow_migration(&MigrationId::random(), Duration::from_millis(10), |_| {})
            .await
            .unwrap_err();
        assert!(matches!(e, OpsError::Refused { status: 400, .. }), "{e:?}");
        assert_eq!(e.refusal_code(), Some("unknown_vm"));

        // Nobody answers for site b here.
        let b = OpsClient::new(operator, SiteId::new("b").unwrap(), Duration::from_secs(1));
        let e = b.migration(&MigrationId::random()).await.unwrap_err();
        assert!(e.is_transient(), "{e:?}");
    }
}
