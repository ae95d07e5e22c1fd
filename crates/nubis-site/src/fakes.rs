//! Fakes for unit tests of the roles and the Controller: a [`LocalSite`] and a federation
//! ([`Peers`]) that answer as a test scripts them and log every call, and a site configuration
//! with a journal in a temporary directory.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use nubis_protocol::codec;
use nubis_protocol::descriptor::{PrimaryKeys, VirtualHardware, VmDescriptor};
use nubis_protocol::identity::SiteIdentity;
use nubis_protocol::message::{
    AbortMigration, Aborted, Body, CommitMigration, Committed, ControlChange, ControlReply,
    DmtfState, Endpoint, ErrorCode, ErrorReply, HostId, InitiateTransfer, MigrationRequest, Offer,
    OfferTerms, Offers, PrepareMigration, PrepareMode, Prepared, ProxyId, ProxyUri, TransferStatus,
    TransferStatusReply, TransferToken, TransferVerification,
};
use nubis_protocol::subject::FederationOp;
use nubis_protocol::{MigrationId, SiteId, VmId};
use tokio::sync::Notify;

use crate::config::SiteConfig;
use crate::federation::CallError;
use crate::journal::{Journal, NextHop, VmPhase, VmRecord};
use crate::local::{LocalSite, PreparedSource};
use crate::peers::Peers;
use crate::roles::Roles;

/// How a fake answers one call.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// As a healthy peer would.
    Ok,
    /// With an error reply carrying this code.
    Refused(ErrorCode),
    /// Not in time.
    Timeout,
    /// Nobody listens (no responders).
    Unreachable,
    /// A transfer status `Failed` (Initiate transfer and Transfer verification only).
    TransferFailed,
    /// A transfer status `Transferring` that makes no progress (Initiate transfer and
    /// Transfer verification only).
    InProgress,
    /// Never: the caller waits forever (the test then drops it, as a crash would).
    Hang,
}

/// One scripted answer: for calls matching `site` (any when `None`) and `op`, `times` times.
#[derive(Debug)]
struct Rule {
    site: Option<String>,
    op: String,
    answer: Answer,
    times: usize,
}

#[derive(Debug, Default)]
struct Script {
    rules: Vec<Rule>,
    calls: Vec<String>,
}

impl Script {
    fn answer(&mut self, site: &str, op: &str) -> Answer {
        self.calls.push(format!("{op} {site}"));
        for rule in &mut self.rules {
            let matches = rule.op == op && rule.site.as_deref().is_none_or(|s| s == site);
            if matches && rule.times > 0 {
                rule.times -= 1;
                return rule.answer.clone();
            }
        }
        Answer::Ok
    }
}

/// The shared state of a fake: its script, its call log, and a signal when it hangs.
#[derive(Debug, Clone, Default)]
pub struct Fake {
    script: Arc<Mutex<Script>>,
    hung: Arc<Notify>,
}

impl Fake {
    /// Answers `answer` to `op` (at `site`, or anywhere), always.
    pub fn on(&self, site: Option<&str>, op: &str, answer: Answer) {
        self.on_times(site, op, answer, usize::MAX);
    }

    /// Answers `answer` to `op` (at `site`, or anywhere) the next `times` times.
    pub fn on_times(&self, site: Option<&str>, op: &str, answer: Answer, times: usize) {
        self.script.lock().unwrap().rules.push(Rule {
            site: site.map(str::to_string),
            op: op.to_string(),
            answer,
            times,
        });
    }

    /// Forgets every scripted answer: from now on every call is answered as by a healthy peer.
    pub fn heal(&self) {
        self.script.lock().unwrap().rules.clear();
    }

    /// Every call so far, as `"<op> <site or host>"`, oldest first.
    pub fn calls(&self) -> Vec<String> {
        self.script.lock().unwrap().calls.clone()
    }

    /// Forgets the calls logged so far.
    pub fn clear_calls(&self) {
        self.script.lock().unwrap().calls.clear();
    }

    /// How many logged calls are `call`.
    pub fn count(&self, call: &str) -> usize {
        self.calls().iter().filter(|c| *c == call).count()
    }

    /// Resolves once a call was answered with [`Answer::Hang`].
    pub async fn hung(&self) {
        self.hung.notified().await
    }

    async fn answer(&self, site: &str, op: &str) -> Answer {
        let answer = self.script.lock().unwrap().answer(site, op);
        if answer == Answer::Hang {
            self.hung.notify_one();
            std::future::pending::<()>().await;
        }
        answer
    }
}

/// A proxy URI at `site`.
pub fn proxy(site: &str) -> ProxyUri {
    ProxyUri::new(SiteId::new(site).unwrap(), ProxyId::new("p1").unwrap())
}

/// A fresh endpoint at `site`'s proxy.
pub fn endpoint(site: &str) -> Endpoint {
    Endpoint {
        proxy: proxy(site),
        token: TransferToken::random(),
    }
}

fn offer(site: &str) -> Offer {
    Offer {
        proxy: proxy(site),
        token: TransferToken::random(),
        terms: OfferTerms {
            price_milli: 1,
            capacity: None,
            depth: 0,
        },
        expires_ms: u64::MAX,
    }
}

fn succeeded() -> TransferStatus {
    TransferStatus::Succeeded {
        digests: Vec::new(),
    }
}

fn status(answer: &Answer) -> TransferStatus {
    match answer {
        Answer::TransferFailed => TransferStatus::Failed {
            reason: "digest mismatch".into(),
        },
        Answer::InProgress => TransferStatus::Transferring {
            bytes_done: 0,
            bytes_total: 100,
        },
        _ => succeeded(),
    }
}

fn error(answer: &Answer) -> Option<ErrorReply> {
    match answer {
        Answer::Refused(code) => Some(ErrorReply::new(code.clone(), "refused by the fake")),
        Answer::Timeout | Answer::Unreachable => Some(ErrorReply::new(
            ErrorCode::Timeout,
            "the fake host did not answer",
        )),
        _ => None,
    }
}

/// A fake federation: partner sites answering as scripted. Sites named in `offering` answer
/// a Migration request with one offer each, the others with none.
#[derive(Debug, Clone, Default)]
pub struct FakePeers {
    /// The script and call log.
    pub fake: Fake,
    offering: Vec<String>,
}

impl FakePeers {
    /// Partners of which those in `offering` offer to take a VM.
    pub fn new(offering: &[&str]) -> Self {
        Self {
            fake: Fake::default(),
            offering: offering.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn reply(&self, to: &SiteId, op: FederationOp, body: &[u8], answer: &Answer) -> Vec<u8> {
        let status = status(answer);
        let bytes = match op {
            FederationOp::MigrationRequest => {
                let req: MigrationRequest = codec::from_slice(body).unwrap();
                let offers = if self.offering.iter().any(|s| s == to.as_str()) {
                    vec![offer(to.as_str())]
                } else {
                    Vec::new()
                };
                codec::to_vec(&Offers {
                    request_id: req.request_id,
                    offers,
                })
            }
            FederationOp::MigrationPrepare => {
                let req: PrepareMigration = codec::from_slice(body).unwrap();
                codec::to_vec(&Prepared {
                    migration_id: req.migration_id,
                    source: endpoint(to.as_str()),
                    total_bytes: 100,
                })
            }
            FederationOp::TransferInitiate => {
                let req: InitiateTransfer = codec::from_slice(body).unwrap();
                codec::to_vec(&TransferStatusReply {
                    migration_id: req.migration_id,
                    status,
                })
            }
            FederationOp::TransferVerify => {
                let req: TransferVerification = codec::from_slice(body).unwrap();
                codec::to_vec(&TransferStatusReply {
                    migration_id: req.migration_id,
                    status,
                })
            }
            FederationOp::MigrationCommit => {
                let req: CommitMigration = codec::from_slice(body).unwrap();
                codec::to_vec(&Committed {
                    migration_id: req.migration_id,
                    side: req.side,
                })
            }
            FederationOp::MigrationAbort => {
                let req: AbortMigration = codec::from_slice(body).unwrap();
                codec::to_vec(&Aborted {
                    migration_id: req.migration_id,
                    side: req.side,
                })
            }
            FederationOp::MigrationEvict | FederationOp::VmControl => {
                panic!("the fake federation does not answer {op:?}")
            }
        };
        bytes.unwrap()
    }

    async fn answer<Req: Body + Sync, Rep: Body + Send>(
        &self,
        to: &SiteId,
        op: FederationOp,
        body: &Req,
    ) -> Result<Rep, CallError> {
        let answer = self.fake.answer(to.as_str(), op.suffix()).await;
        let site = to.clone();
        let op_name = op.suffix();
        match answer {
            Answer::Refused(code) => Err(CallError::Refused {
                site,
                op: op_name,
                reply: ErrorReply::new(code, "refused by the fake"),
            }),
            Answer::Timeout => Err(CallError::Timeout { site, op: op_name }),
            Answer::Unreachable => Err(CallError::Unreachable { site, op: op_name }),
            Answer::Ok | Answer::TransferFailed | Answer::InProgress | Answer::Hang => {
                let bytes = self.reply(to, op, &codec::to_vec(body).unwrap(), &answer);
                Ok(codec::from_slice(&bytes).unwrap())
            }
        }
    }
}

impl Peers for FakePeers {
    async fn call<Req: Body + Sync, Rep: Body + Send>(
        &self,
        to: &SiteId,
        op: FederationOp,
        body: &Req,
    ) -> Result<Rep, CallError> {
        self.answer(to, op, body).await
    }

    async fn call_with_timeout<Req: Body + Sync, Rep: Body + Send>(
        &self,
        to: &SiteId,
        op: FederationOp,
        body: &Req,
        _timeout: std::time::Duration,
    ) -> Result<Rep, CallError> {
        self.answer(to, op, body).await
    }
}

/// A fake site infrastructure: hosts and a Transfer proxy answering as scripted. Hosts named
/// in `offering` offer to take a VM.
#[derive(Debug, Clone, Default)]
pub struct FakeLocal {
    /// The script and call log (calls are logged as `"<method> <host or ->"`).
    pub fake: Fake,
    offering: Vec<HostId>,
}

impl FakeLocal {
    /// Hosts of which those in `offering` offer to take a VM.
    pub fn new(offering: &[&str]) -> Self {
        Self {
            fake: Fake::default(),
            offering: offering.iter().map(|h| HostId::new(*h).unwrap()).collect(),
        }
    }

    async fn unit(&self, method: &str, host: Option<&HostId>) -> Result<(), ErrorReply> {
        let host = host.map_or("-".to_string(), |h| h.to_string());
        match error(&self.fake.answer(&host, method).await) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn status(&self, method: &str) -> Result<TransferStatus, ErrorReply> {
        let answer = self.fake.answer("-", method).await;
        match error(&answer) {
            Some(e) => Err(e),
            None => Ok(status(&answer)),
        }
    }

    async fn prepared(&self, method: &str, host: &str) -> Result<PreparedSource, ErrorReply> {
        match error(&self.fake.answer(host, method).await) {
            Some(e) => Err(e),
            None => Ok(PreparedSource {
                endpoint: endpoint("a"),
                total_bytes: 100,
            }),
        }
    }
}

impl LocalSite for FakeLocal {
    async fn local_offers(
        &self,
        _migration: MigrationId,
        _descriptor: &VmDescriptor,
        exclude: Option<&HostId>,
    ) -> Result<Vec<(HostId, Offer)>, ErrorReply> {
        if let Some(e) = error(&self.fake.answer("-", "local_offers").await) {
            return Err(e);
        }
        Ok(self
            .offering
            .iter()
            .filter(|h| Some(*h) != exclude)
            .map(|h| (h.clone(), offer("a")))
            .collect())
    }

    async fn prepare_source(
        &self,
        _migration: MigrationId,
        _vm: &VmId,
        host: &HostId,
        _mode: PrepareMode,
    ) -> Result<PreparedSource, ErrorReply> {
        self.prepared("prepare_source", host.as_str()).await
    }

    async fn image_source(
        &self,
        _migration: MigrationId,
        _descriptor: &VmDescriptor,
    ) -> Result<PreparedSource, ErrorReply> {
        self.prepared("image_source", "-").await
    }

    async fn relay(
        &self,
        _migration: MigrationId,
        _vm: &VmId,
        _source: &Endpoint,
        _max_bytes_per_sec: Option<u64>,
    ) -> Result<PreparedSource, ErrorReply> {
        self.prepared("relay", "-").await
    }

    async fn initiate(
        &self,
        _migration: MigrationId,
        _vm: &VmId,
        _source: &Endpoint,
        _destination: &TransferToken,
        _max_bytes_per_sec: Option<u64>,
    ) -> Result<TransferStatus, ErrorReply> {
        self.status("initiate").await
    }

    async fn verify(
        &self,
        _migration: MigrationId,
        _source: &TransferToken,
    ) -> Result<TransferStatus, ErrorReply> {
        self.status("verify").await
    }

    async fn commit_destination(
        &self,
        _descriptor: &VmDescriptor,
        host: &HostId,
        _token: &TransferToken,
    ) -> Result<DmtfState, ErrorReply> {
        self.unit("commit_destination", Some(host)).await?;
        Ok(DmtfState::Enabled)
    }

    async fn commit_source(
        &self,
        _vm: &VmId,
        host: Option<&HostId>,
        _token: &TransferToken,
    ) -> Result<(), ErrorReply> {
        self.unit("commit_source", host).await
    }

    async fn abort_destination(
        &self,
        _vm: &VmId,
        host: &HostId,
        _token: &TransferToken,
    ) -> Result<(), ErrorReply> {
        self.unit("abort_destination", Some(host)).await
    }

    async fn abort_source(
        &self,
        _vm: &VmId,
        host: Option<&HostId>,
        _token: &TransferToken,
    ) -> Result<(), ErrorReply> {
        self.unit("abort_source", host).await
    }

    async fn control(
        &self,
        _descriptor: &VmDescriptor,
        host: &HostId,
        _change: &ControlChange,
    ) -> Result<ControlReply, ErrorReply> {
        self.fake.answer(host.as_str(), "control").await;
        Err(ErrorReply::new(
            ErrorCode::Refused,
            "the fake site has no Control interface",
        ))
    }
}

/// Site `a` with partners `b`, `c` and `d` (preferred in the order c, d, b), a journal in a
/// temporary directory, and fakes for its infrastructure and federation.
#[derive(Debug)]
pub struct TestSite {
    /// Holds the journal and the key file.
    pub _dir: tempfile::TempDir,
    /// The configuration.
    pub config: Arc<SiteConfig>,
    /// The journal, shared by every [`Roles`] built with [`TestSite::roles`].
    pub journal: Journal,
    /// The site's hosts and proxy.
    pub local: FakeLocal,
    /// Its partners.
    pub peers: FakePeers,
}

impl TestSite {
    /// Site `a`; partners in `offering` offer to take VMs, as do local hosts in `hosts`.
    pub fn new(offering: &[&str], hosts: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        SiteIdentity::generate(SiteId::new("a").unwrap())
            .save(&dir.path().join("a.key"), false)
            .unwrap();
        let mut text = String::from(
            "site = \"a\"\nkey_file = \"a.key\"\nnats_url = \"nats://127.0.0.1:4222\"\ndata_dir = \"data\"\n",
        );
        for h in hosts {
            text.push_str(&format!(
                "[[hosts]]\nid = \"{h}\"\nvm_root = \"/var/lib/nubis/{h}/vms\"\n"
            ));
        }
        for (site, preference) in [("b", 0), ("c", 5), ("d", 1)] {
            let partner = test_identity(site);
            text.push_str(&partner.public().partner_snippet());
            text.push_str(&format!("preference = {preference}\n"));
        }
        let config = SiteConfig::parse(&text, &dir.path().join("site.toml")).unwrap();
        let journal = Journal::open(&dir.path().join("journal")).unwrap();
        Self {
            _dir: dir,
            config: Arc::new(config),
            journal,
            local: FakeLocal::new(hosts),
            peers: FakePeers::new(offering),
        }
    }

    /// A new set of roles (a new Controller) on the same journal and fakes.
    pub fn roles(&self) -> Arc<Roles<FakeLocal, FakePeers>> {
        Arc::new(Roles::new(
            self.config.clone(),
            self.journal.clone(),
            self.peers.clone(),
            self.local.clone(),
        ))
    }

    /// Journals VM `vm` of primary site `a`, placed at `downstream`.
    pub fn place(&self, vm: &str, downstream: Option<NextHop>) -> VmId {
        let vm = VmId::new(vm).unwrap();
        let descriptor = VmDescriptor {
            id: vm.clone(),
            name: vm.to_string(),
            version: 1,
            primary_site: SiteId::new("a").unwrap(),
            primary_keys: PrimaryKeys {
                signing: [1; 32],
                sealing: [2; 32],
            },
            hardware: VirtualHardware {
                vcpus: 1,
                memory_mib: 64,
                disks: Vec::new(),
                networks: Vec::new(),
                boot: None,
            },
            monitoring: Vec::new(),
            properties: BTreeMap::new(),
        };
        let phase = if downstream.is_some() {
            VmPhase::Placed
        } else {
            VmPhase::Unplaced
        };
        self.journal
            .put_vm(&VmRecord {
                vm: vm.clone(),
                primary: SiteId::new("a").unwrap(),
                upstream: None,
                downstream,
                former_downstream: None,
                descriptor,
                phase,
            })
            .unwrap();
        vm
    }
}

/// A site's identity with keys derived from its name, so that a test can write a descriptor
/// naming the site as primary with the keys the test site pins for it.
pub fn test_identity(site: &str) -> SiteIdentity {
    let k = site.as_bytes().first().copied().unwrap_or(0);
    SiteIdentity::from_secrets(SiteId::new(site).unwrap(), [k; 32], [k.wrapping_add(1); 32])
}

/// The public keys of [`test_identity`]`(site)`, as a descriptor carries them.
pub fn test_keys(site: &str) -> PrimaryKeys {
    let public = test_identity(site).public();
    PrimaryKeys {
        signing: public.signing.to_bytes(),
        sealing: public.sealing,
    }
}

/// A small descriptor of `vm` whose primary is `primary`, with [`test_keys`]`(primary)`.
pub fn test_descriptor(vm: &str, primary: &str) -> VmDescriptor {
    VmDescriptor {
        id: VmId::new(vm).unwrap(),
        name: vm.to_string(),
        version: 1,
        primary_site: SiteId::new(primary).unwrap(),
        primary_keys: test_keys(primary),
        hardware: VirtualHardware {
            vcpus: 1,
            memory_mib: 64,
            disks: Vec::new(),
            networks: Vec::new(),
            boot: None,
        },
        monitoring: Vec::new(),
        properties: BTreeMap::new(),
    }
}

/// The next hop `site`.
pub fn site(id: &str) -> NextHop {
    NextHop::Site(SiteId::new(id).unwrap())
}

/// The next hop `host`.
pub fn host(id: &str) -> NextHop {
    NextHop::Host(HostId::new(id).unwrap())
}
