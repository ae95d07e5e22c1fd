//! The long waits of an operation, run off the engine thread so they never hold up the other
//! VMs of the host.
//!
//! Two steps of an operation can take seconds: saving a guest (its memory goes to disk, and a
//! save that meets the guest's KPI share mounted is tried again for [`KPI_SHARE_SAVE_WAIT`]), and
//! a graceful shutdown (the guest has the configured shutdown timeout to power off). When the
//! engine has a way to report ([`Engine::with_wait_reports`]), such a step runs on a thread of
//! its own; the operation resumes on the engine thread when the step's [`WaitOver`] comes back
//! through the engine's command channel ([`Engine::wait_over`]). Meanwhile the engine serves the
//! other VMs, and keeps every request about the waiting VM ([`Engine::run_for`]) until the
//! operation has finished, so two operations on one VM still never interleave. Without a way to
//! report (or if no thread can be started) the step runs in place, as a plain call.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nubis_protocol::VmId;

use super::{Engine, OpError};
use crate::hypervisor::{Hypervisor, HypervisorError, ShutdownOutcome};

/// How long a save waits for a guest to unmount its KPI share. A guest's KPI writer holds the
/// share mounted only while it writes a report (see `ARCHITECTURE.md`), so a save that meets it
/// mounted is tried again for this long before it is refused.
pub const KPI_SHARE_SAVE_WAIT: Duration = Duration::from_secs(5);
/// Pause between two save attempts while the KPI share is mounted.
const KPI_SHARE_SAVE_RETRY: Duration = Duration::from_millis(100);

/// Whether a save was refused because the guest holds a virtio-9p share mounted: QEMU names the
/// export ("VirtFS") in its refusal.
fn blocked_by_share(e: &HypervisorError) -> bool {
    matches!(e, HypervisorError::Operation { source, .. } if source.message.contains("VirtFS"))
}

/// A step of an operation that can take seconds.
#[derive(Debug, Clone)]
pub(super) enum LongWait {
    /// Save the domain to `state_file`. With `retry_on_share`, a refusal because the guest holds
    /// its KPI share mounted is tried again until [`KPI_SHARE_SAVE_WAIT`] has passed, then
    /// reported as [`OpError::KpiShareMounted`].
    Save {
        /// The VM's state file.
        state_file: PathBuf,
        /// Whether the guest has a KPI share it may hold mounted.
        retry_on_share: bool,
    },
    /// Ask the guest to power off, and destroy it if it has not within `timeout`.
    Shutdown {
        /// How long the guest has.
        timeout: Duration,
    },
}

/// How a long wait ended well.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Waited {
    /// The domain is saved to its state file.
    Saved,
    /// The domain is shut down.
    ShutDown(ShutdownOutcome),
}

impl LongWait {
    /// Runs the step; blocks for as long as it takes.
    fn run<H: Hypervisor>(&self, hv: &H, vm: &VmId) -> Result<Waited, OpError> {
        match self {
            Self::Save {
                state_file,
                retry_on_share,
            } => {
                let deadline = Instant::now() + KPI_SHARE_SAVE_WAIT;
                loop {
                    match hv.save(vm.as_str(), state_file) {
                        Err(e) if *retry_on_share && blocked_by_share(&e) => {
                            if Instant::now() >= deadline {
                                return Err(OpError::KpiShareMounted(e));
                            }
                            tracing::debug!(error = %e, "save refused; the guest may hold its kpi share");
                            std::thread::sleep(KPI_SHARE_SAVE_RETRY);
                        }
                        other => return other.map(|()| Waited::Saved).map_err(OpError::from),
                    }
                }
            }
            Self::Shutdown { timeout } => hv
                .shutdown(vm.as_str(), *timeout)
                .map(Waited::ShutDown)
                .map_err(OpError::from),
        }
    }
}

/// The end of a long wait of VM `vm`, reported from the wait's thread to the engine thread,
/// which passes it to [`Engine::wait_over`].
#[derive(Debug)]
pub struct WaitOver {
    vm: VmId,
    result: Result<Waited, OpError>,
}

impl WaitOver {
    /// The VM whose operation waited.
    pub fn vm(&self) -> &VmId {
        &self.vm
    }
}

/// Hands one [`WaitOver`] to the engine thread.
type Report = Box<dyn FnOnce(WaitOver) + Send>;
/// Opens a [`Report`] for one wait; `None` when the engine thread no longer listens.
type OpenReport = Box<dyn Fn() -> Option<Report> + Send>;
/// Work on the engine that must wait for a VM's operation to finish.
type Job<H> = Box<dyn FnOnce(&mut Engine<H>) + Send>;
/// The rest of an operation, once its long wait is over.
type Resume<H> = Box<dyn FnOnce(&mut Engine<H>, Result<Waited, OpError>) + Send>;

/// An operation in its long wait, and the work that waits for it.
struct Waiting<H> {
    resume: Resume<H>,
    queued: VecDeque<Job<H>>,
}

/// The engine's operations in a long wait, by VM.
pub(super) struct Waits<H> {
    open_report: Option<OpenReport>,
    waiting: HashMap<VmId, Waiting<H>>,
}

impl<H> Default for Waits<H> {
    fn default() -> Self {
        Self {
            open_report: None,
            waiting: HashMap::new(),
        }
    }
}

impl<H> std::fmt::Debug for Waits<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waits")
            .field("reports", &self.open_report.is_some())
            .field("waiting", &self.waiting.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl<H: Hypervisor + 'static> Engine<H> {
    /// Runs the long waits of operations on threads of their own: `open` is called when one
    /// starts and returns where to report its end (the engine thread's command channel), or
    /// `None` when the engine thread no longer listens, and the step then runs in place. The
    /// report must reach [`Engine::wait_over`] on the engine thread.
    pub fn with_wait_reports<F, R>(mut self, open: F) -> Self
    where
        F: Fn() -> Option<R> + Send + 'static,
        R: FnOnce(WaitOver) + Send + 'static,
    {
        self.waits.open_report = Some(Box::new(move || open().map(|r| Box::new(r) as Report)));
        self
    }

    /// Whether an operation on `vm` is in its long wait.
    pub fn is_waiting(&self, vm: &VmId) -> bool {
        self.waits.waiting.contains_key(vm)
    }

    /// Runs `job` now, unless it concerns a VM whose operation is in its long wait: then it runs
    /// once that operation has finished, after the jobs queued before it.
    pub fn run_for(&mut self, vm: Option<&VmId>, job: impl FnOnce(&mut Self) + Send + 'static) {
        if let Some(waiting) = vm.and_then(|vm| self.waits.waiting.get_mut(vm)) {
            waiting.queued.push_back(Box::new(job));
            return;
        }
        job(self);
    }

    /// A long wait reported its end: the operation finishes, then the jobs that waited for it
    /// run in order (until one of them starts a long wait of its own).
    pub fn wait_over(&mut self, over: WaitOver) {
        let WaitOver { vm, result } = over;
        let Some(waiting) = self.waits.waiting.remove(&vm) else {
            tracing::warn!(vm.id = %vm, "end of a wait that no operation waits for");
            return;
        };
        (waiting.resume)(self, result);
        let mut queued = waiting.queued;
        while let Some(job) = queued.pop_front() {
            job(self);
            if let Some(again) = self.waits.waiting.get_mut(&vm) {
                again.queued.append(&mut queued);
                return;
            }
        }
    }

    /// Runs `wait` for `vm`, then `resume` on the engine thread with its outcome.
    pub(super) fn wait_then(
        &mut self,
        vm: &VmId,
        wait: LongWait,
        resume: impl FnOnce(&mut Self, Result<Waited, OpError>) + Send + 'static,
    ) {
        let report = self.waits.open_report.as_ref().and_then(|open| open());
        let Some(report) = report else {
            let result = wait.run(&*self.hv, vm);
            return resume(self, result);
        };
        let span = tracing::Span::current();
        let resume_span = span.clone();
        self.waits.waiting.insert(
            vm.clone(),
            Waiting {
                resume: Box::new(move |engine, result| {
                    resume_span.in_scope(|| resume(engine, result));
                }),
                queued: VecDeque::new(),
            },
        );
        let hv = Arc::clone(&self.hv);
        let (thread_vm, thread_wait) = (vm.clone(), wait.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("nubis-wait-{vm}"))
            .spawn(move || {
                let result = span.in_scope(|| thread_wait.run(&*hv, &thread_vm));
                report(WaitOver {
                    vm: thread_vm,
                    result,
                });
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no thread for a long wait; waiting on the engine thread");
            if let Some(waiting) = self.waits.waiting.remove(vm) {
                let result = wait.run(&*self.hv, vm);
                (waiting.resume)(self, result);
            }
        }
    }
}
