//! The host agent daemon (`nubis host --config host.toml`): answers its site's requests on
//! `nubis.site.<site>.host.<host>.<op>` and publishes its capacity.
//!
//! One thread owns the hypervisor connection, the capacity ledger and the VM directories (the
//! [`Engine`]) and runs one operation at a time from a bounded command channel; so two requests
//! about the same VM never interleave. The bus side decodes each request (a malformed body is
//! answered at once with `malformed`, and the agent keeps serving), hands it to the engine and
//! publishes the encoded reply. Requests and replies are not signed: the subjects stay inside the
//! site, protected by its NATS permissions (see `subjects.md`, section 11).
//!
//! Alongside, the monitoring task ([`crate::monitor`]) asks the engine thread at every tick for
//! the VMs it holds and their statistics, and hands monitoring batches to the site.
//!
//! Shutdown on the [`CancellationToken`]: stop taking requests, let the ones in flight finish
//! within the grace period, drain the NATS connection. The VMs keep running; a restarted agent
//! finds them again from its VM directories.

use nubis_bus::{ConnectSpec, Inbox};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use nubis_protocol::codec::{self, CodecError};
use nubis_protocol::message::host::{capacity_report_subject, HostOp};
use nubis_protocol::message::{
    ActivateVm, CapacityQuery, ControlVm, ErrorCode, ErrorReply, HostCapacity, HostReply, ListVms,
    PrepareVm, ReleaseVm, ReserveVm, ResumeVm, UpdateVm, VmStateQuery,
};
use nubis_protocol::subject::Subject;
use nubis_protocol::VmId;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::capacity::Resources;
use crate::config::HostConfig;
use crate::engine::{Engine, MonitorQuery, MonitoredVm, OpError, WaitOver};
use crate::hypervisor::{Hypervisor, HypervisorError};
use crate::libvirt::{LibvirtConfig, LibvirtHypervisor};
use crate::monitor::{self, MonitorSettings};
use crate::vm_files::{VmFiles, VmFilesError};

/// Requests waiting for the engine beyond this are refused with `busy`.
const COMMAND_QUEUE: usize = 256;
/// Requests decoded and waiting at once.
const MAX_IN_FLIGHT: usize = 512;

/// Why the agent could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The hypervisor could not be reached or asked for the host's resources.
    #[error("hypervisor")]
    Hypervisor(#[from] HypervisorError),
    /// The VM root could not be used.
    #[error("vm directories")]
    Files(#[from] VmFilesError),
    /// The site's nats-server could not be reached.
    #[error(transparent)]
    Connect(#[from] nubis_bus::ConnectError),
    /// A subscription could not be made.
    #[error("cannot subscribe to {subject}")]
    Subscribe {
        /// The subject.
        subject: String,
        /// The cause.
        #[source]
        source: async_nats::SubscribeError,
    },
    /// The engine thread could not be started or ended abnormally.
    #[error("engine thread")]
    Engine(#[source] std::io::Error),
}

/// A request decoded from the bus.
#[derive(Debug)]
enum Request {
    Capacity,
    Reserve(ReserveVm),
    Activate(ActivateVm),
    Prepare(PrepareVm),
    Resume(ResumeVm),
    Release(ReleaseVm),
    Control(ControlVm),
    Update(UpdateVm),
    State(VmStateQuery),
    List,
}

impl Request {
    fn decode(op: HostOp, payload: &[u8]) -> Result<Self, CodecError> {
        fn body<T: DeserializeOwned>(p: &[u8]) -> Result<T, CodecError> {
            codec::from_slice(p)
        }
        Ok(match op {
            // Bodiless requests still have to be MessagePack maps (an empty payload is allowed).
            HostOp::Capacity => {
                if !payload.is_empty() {
                    body::<CapacityQuery>(payload)?;
                }
                Self::Capacity
            }
            HostOp::List => {
                if !payload.is_empty() {
                    body::<ListVms>(payload)?;
                }
                Self::List
            }
            HostOp::Reserve => Self::Reserve(body(payload)?),
            HostOp::Activate => Self::Activate(body(payload)?),
            HostOp::Prepare => Self::Prepare(body(payload)?),
            HostOp::ResumeAfterAbort => Self::Resume(body(payload)?),
            HostOp::Release => Self::Release(body(payload)?),
            HostOp::Control => Self::Control(body(payload)?),
            HostOp::Update => Self::Update(body(payload)?),
            HostOp::State => Self::State(body(payload)?),
        })
    }

    fn vm(&self) -> Option<&VmId> {
        match self {
            Self::Capacity | Self::List => None,
            Self::Reserve(r) => Some(&r.vm),
            Self::Activate(r) => Some(&r.vm),
            Self::Prepare(r) => Some(&r.vm),
            Self::Resume(r) => Some(&r.vm),
            Self::Release(r) => Some(&r.vm),
            Self::Control(r) => Some(&r.vm),
            Self::Update(r) => Some(&r.vm),
            Self::State(r) => Some(&r.vm),
        }
    }

    /// Whether a success may change what the host has committed.
    fn changes_capacity(&self) -> bool {
        matches!(
            self,
            Self::Reserve(_) | Self::Release(_) | Self::Update(_) | Self::Activate(_)
        )
    }
}

/// What the engine thread is asked to do.
#[derive(Debug)]
enum Command {
    /// Run a request and send back the encoded [`HostReply`].
    Handle(Request, oneshot::Sender<Bytes>),
    /// Report the capacity.
    Capacity(oneshot::Sender<HostCapacity>),
    /// The VMs held, for the monitoring task.
    Monitor(
        MonitorQuery,
        oneshot::Sender<Result<Vec<MonitoredVm>, HypervisorError>>,
    ),
    /// A long wait of an operation ended on its own thread; the engine finishes the operation.
    WaitOver(WaitOver),
}

fn encode_reply<T: Serialize>(reply: &HostReply<T>) -> Bytes {
    match codec::to_vec(reply) {
        Ok(b) => b.into(),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode a reply");
            let fallback: HostReply<()> = HostReply::Error(ErrorReply::new(
                ErrorCode::Internal,
                "the reply could not be encoded",
            ));
            codec::to_vec(&fallback).unwrap_or_default().into()
        }
    }
}

fn reply_of<T: Serialize>(result: Result<T, OpError>) -> Bytes {
    match result {
        Ok(body) => encode_reply(&HostReply::Ok(body)),
        Err(e) => {
            let reply = e.to_reply();
            if reply.code == ErrorCode::Internal {
                tracing::error!(error = %ErrorChain(&e), "operation failed");
            } else {
                tracing::info!(error = %ErrorChain(&e), code = %reply.code, "operation refused");
            }
            encode_reply::<()>(&HostReply::Error(reply))
        }
    }
}

fn error_reply(code: ErrorCode, message: impl Into<String>) -> Bytes {
    encode_reply::<()>(&HostReply::Error(ErrorReply::new(code, message)))
}

/// Displays an error with all its causes, for logs.
pub(crate) struct ErrorChain<'a>(pub(crate) &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

fn handle<H: Hypervisor + 'static>(
    engine: &mut Engine<H>,
    request: Request,
    reply: oneshot::Sender<Bytes>,
) {
    // The requester may have given up; the operation is done either way.
    let send = move |bytes: Bytes| {
        let _ = reply.send(bytes);
    };
    match request {
        Request::Capacity => send(reply_of(Ok(engine.capacity()))),
        Request::Reserve(r) => send(reply_of(engine.reserve(&r.vm, &r.descriptor))),
        Request::Activate(r) => send(reply_of(engine.activate(&r.vm, &r.descriptor))),
        Request::Prepare(r) => engine.prepare(&r.vm, r.mode, move |result| send(reply_of(result))),
        Request::Resume(r) => send(reply_of(engine.resume_after_abort(&r.vm))),
        Request::Release(r) => send(reply_of(engine.release(&r.vm))),
        Request::Control(r) => {
            engine.control(&r.vm, r.transition, move |result| send(reply_of(result)))
        }
        Request::Update(r) => send(reply_of(engine.update(&r.vm, &r.descriptor))),
        Request::State(r) => send(reply_of(engine.state(&r.vm))),
        Request::List => send(reply_of(engine.list())),
    }
}

/// The engine thread: runs commands until every sender is gone.
fn engine_loop<H: Hypervisor + 'static>(
    mut engine: Engine<H>,
    mut commands: mpsc::Receiver<Command>,
) {
    while let Some(command) = commands.blocking_recv() {
        match command {
            Command::Handle(request, reply) => {
                let span = match request.vm() {
                    Some(vm) => tracing::info_span!("host_op", vm.id = %vm),
                    None => tracing::info_span!("host_op", vm.id = tracing::field::Empty),
                };
                // A request about a VM in a long wait runs once its operation has finished.
                let vm = request.vm().cloned();
                engine.run_for(vm.as_ref(), move |engine| {
                    span.in_scope(|| handle(engine, request, reply));
                });
            }
            Command::Capacity(reply) => {
                let _ = reply.send(engine.capacity());
            }
            Command::Monitor(query, reply) => {
                let _ = reply.send(engine.monitored(&query));
            }
            Command::WaitOver(over) => engine.wait_over(over),
        }
    }
    tracing::debug!("engine stopped");
}

/// What the host offers: the operator's figures, else the hypervisor's and the file system's.
fn total_resources<H: Hypervisor>(
    config: &HostConfig,
    hv: &H,
    files: &VmFiles,
) -> Result<Resources, AgentError> {
    let o = config.capacity;
    let info = match (o.vcpus, o.memory_mib) {
        (Some(_), Some(_)) => None,
        _ => Some(hv.host_info()?),
    };
    let disk_bytes = match o.disk_bytes {
        Some(b) => b,
        None => files.filesystem_bytes()?,
    };
    Ok(Resources {
        vcpus: o
            .vcpus
            .or(info.as_ref().map(|i| i.cpus))
            .unwrap_or_default(),
        memory_mib: o
            .memory_mib
            .or(info.as_ref().map(|i| i.memory_kib / 1024))
            .unwrap_or_default(),
        disk_bytes,
    })
}

/// Runs the host agent until `shutdown` is cancelled.
pub async fn run(config: HostConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    let span = tracing::info_span!("host_agent", site.id = %config.site, host.id = %config.host);
    run_inner(config, shutdown).instrument(span).await
}

async fn run_inner(config: HostConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    // Connect to libvirt and take over the VM directories on a blocking thread.
    let setup = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || -> Result<_, AgentError> {
            let hv = LibvirtHypervisor::connect(LibvirtConfig {
                uri: config.libvirt_uri.clone(),
                accelerator: config.accelerator,
            })?;
            let files = VmFiles::open(&config.vm_root)?;
            let total = total_resources(&config, &hv, &files)?;
            tracing::info!(?total, "host capacity");
            let mut engine = Engine::open(
                hv,
                config.host.clone(),
                files,
                total,
                config.shutdown_timeout,
            )?
            .with_restore_as_saved_fallback(config.libvirt_uri.starts_with("test:"))
            .with_kpi_share(config.kpi_share.then(|| config.kpi_root.clone()));
            engine.restart_interrupted();
            Ok(engine)
        })
    };
    let engine = setup
        .await
        .map_err(|e| AgentError::Engine(std::io::Error::other(e)))??;

    let spec = ConnectSpec::daemon(format!("nubis-host-{}-{}", config.site, config.host))
        .inbox(Inbox::Host(config.site.clone(), config.host.clone()));
    let client = tokio::select! {
        r = nubis_bus::connect(&config.nats, &spec) => r?,
        () = shutdown.cancelled() => return Ok(()),
    };

    let mut subscriptions = Vec::with_capacity(HostOp::ALL.len());
    for op in HostOp::ALL {
        let subject = op.subject(&config.site, &config.host);
        let sub = client
            .subscribe(String::from(subject.clone()))
            .await
            .map_err(|source| AgentError::Subscribe {
                subject: subject.to_string(),
                source,
            })?;
        subscriptions.push(sub.map(move |m| (op, m)).boxed());
    }
    let mut requests = futures::stream::select_all(subscriptions);
    // Make sure the server has the subscriptions before anyone is told the agent is up.
    if let Err(e) = client.flush().await {
        tracing::warn!(error = %e, "flush after subscribing failed");
    }

    let (commands, receiver) = mpsc::channel(COMMAND_QUEUE);
    // A long wait reports through the command channel and keeps it open until it has: the
    // engine thread ends only after the operations it started have finished.
    let reports = commands.downgrade();
    let engine = engine.with_wait_reports(move || {
        let commands = reports.upgrade()?;
        // The wait's thread is outside the runtime, so it may block on a full channel.
        Some(move |over| {
            let _ = commands.blocking_send(Command::WaitOver(over));
        })
    });
    let engine_thread = std::thread::Builder::new()
        .name(format!("nubis-host-{}", config.host))
        .spawn(move || engine_loop(engine, receiver))
        .map_err(AgentError::Engine)?;

    let capacity_changed = Arc::new(Notify::new());
    let stop_reports = shutdown.child_token();
    let tracker = TaskTracker::new();
    tracker.spawn(
        report_capacity(
            client.clone(),
            capacity_report_subject(&config.site, &config.host),
            commands.clone(),
            capacity_changed.clone(),
            config.capacity_report_interval,
            stop_reports.clone(),
        )
        .in_current_span(),
    );
    let monitor_commands = commands.clone();
    tracker.spawn(
        monitor::run(
            client.clone(),
            MonitorSettings::from_config(&config),
            Box::new(move |query| {
                let (tx, rx) = oneshot::channel();
                // A full queue skips a tick rather than delaying the site's requests.
                monitor_commands
                    .try_send(Command::Monitor(query, tx))
                    .ok()
                    .map(|()| rx)
            }),
            stop_reports.clone(),
        )
        .in_current_span(),
    );
    tracing::info!("host agent serving");

    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    loop {
        let next = tokio::select! {
            m = requests.next() => m,
            () = shutdown.cancelled() => None,
        };
        let Some((op, message)) = next else { break };
        let Some(reply_to) = message.reply.clone() else {
            tracing::debug!(subject = %message.subject, "ignoring a message without reply subject");
            continue;
        };
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let client = client.clone();
        let commands = commands.clone();
        let capacity_changed = capacity_changed.clone();
        tracker.spawn(
            async move {
                let reply = serve(op, &message.payload, &commands, &capacity_changed).await;
                if let Err(e) = client.publish(reply_to, reply).await {
                    tracing::warn!(error = %e, "cannot publish a reply");
                }
                drop(permit);
            }
            .in_current_span(),
        );
    }

    tracing::info!("host agent stopping");
    stop_reports.cancel();
    drop(requests);
    drop(commands);
    tracker.close();
    if tokio::time::timeout(config.grace_period, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("requests still in flight at the end of the grace period");
    }
    if let Err(e) = client.drain().await {
        tracing::warn!(error = %e, "draining the nats connection failed");
    }
    // The engine thread ends when the last command sender is gone; a request still running
    // there finishes first.
    let joined = tokio::task::spawn_blocking(move || engine_thread.join()).await;
    if !matches!(joined, Ok(Ok(()))) {
        return Err(AgentError::Engine(std::io::Error::other(
            "the engine thread panicked",
        )));
    }
    tracing::info!("host agent stopped");
    Ok(())
}

/// Decodes one request, runs it on the engine and returns the encoded reply.
async fn serve(
    op: HostOp,
    payload: &[u8],
    commands: &mpsc::Sender<Command>,
    capacity_changed: &Notify,
) -> Bytes {
    let request = match Request::decode(op, payload) {
        Ok(r) => r,
        Err(e) => {
            let code = match e {
                CodecError::Oversize { .. } => ErrorCode::Oversize,
                CodecError::TooDeep => ErrorCode::TooDeep,
                CodecError::Malformed(_) | CodecError::Encode(_) => ErrorCode::Malformed,
            };
            tracing::info!(op = op.as_str(), error = %ErrorChain(&e), "undecodable request");
            return error_reply(code, format!("{} request: {e}", op.as_str()));
        }
    };
    let changes_capacity = request.changes_capacity();
    let (tx, rx) = oneshot::channel();
    if let Err(e) = commands.try_send(Command::Handle(request, tx)) {
        return match e {
            mpsc::error::TrySendError::Full(_) => {
                error_reply(ErrorCode::Busy, "too many requests waiting")
            }
            mpsc::error::TrySendError::Closed(_) => {
                error_reply(ErrorCode::Internal, "the host agent is stopping")
            }
        };
    }
    match rx.await {
        Ok(bytes) => {
            if changes_capacity {
                capacity_changed.notify_one();
            }
            bytes
        }
        Err(_) => error_reply(ErrorCode::Internal, "the operation was interrupted"),
    }
}

/// Publishes the capacity at start, after changes and at every interval.
async fn report_capacity(
    client: async_nats::Client,
    subject: Subject,
    commands: mpsc::Sender<Command>,
    changed: Arc<Notify>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = changed.notified() => {}
            () = shutdown.cancelled() => return,
        }
        let (tx, rx) = oneshot::channel();
        if commands.send(Command::Capacity(tx)).await.is_err() {
            return;
        }
        let Ok(capacity) = rx.await else { return };
        match codec::to_vec(&capacity) {
            Ok(bytes) => {
                if let Err(e) = client
                    .publish(String::from(subject.clone()), bytes.into())
                    .await
                {
                    tracing::warn!(error = %e, "cannot publish the capacity report");
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot encode the capacity report"),
        }
    }
}
