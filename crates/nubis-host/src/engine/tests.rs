use std::collections::HashMap;
use std::path::Path;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};

use super::*;
use crate::hypervisor::{DomainHandle, DomainStats, DomainSummary, HostInfo, ShutdownOutcome};
use crate::spec::DomainSpec;

/// Long enough that a test never fails for a slow machine; only a broken engine waits this long.
const NEVER: Duration = Duration::from_secs(60);

/// A hypervisor in memory. A graceful shutdown or a save of a VM given a gate blocks until the
/// test opens the gate, the way a guest takes its time to power off.
#[derive(Debug, Default)]
struct FakeHypervisor {
    domains: Mutex<HashMap<String, DmtfState>>,
    gates: Mutex<HashMap<String, std_mpsc::Receiver<()>>>,
}

impl FakeHypervisor {
    /// The next shutdown or save of `name` waits until the returned sender sends.
    fn gate(&self, name: &str) -> std_mpsc::Sender<()> {
        let (open, gate) = std_mpsc::channel();
        self.gates.lock().unwrap().insert(name.to_owned(), gate);
        open
    }

    fn pass_gate(&self, name: &str) {
        let gate = self.gates.lock().unwrap().remove(name);
        if let Some(gate) = gate {
            gate.recv_timeout(NEVER).expect("the test opens the gate");
        }
    }

    fn set(&self, name: &str, state: DmtfState) -> Result<(), HypervisorError> {
        match self.domains.lock().unwrap().get_mut(name) {
            Some(s) => {
                *s = state;
                Ok(())
            }
            None => Err(HypervisorError::UnknownDomain { name: name.into() }),
        }
    }

    fn handle(name: &str) -> DomainHandle {
        DomainHandle {
            name: name.to_owned(),
            uuid: String::new(),
        }
    }
}

impl Hypervisor for FakeHypervisor {
    fn define(&self, spec: &DomainSpec) -> Result<DomainHandle, HypervisorError> {
        self.domains
            .lock()
            .unwrap()
            .insert(spec.name.clone(), DmtfState::Disabled);
        Ok(Self::handle(&spec.name))
    }
    fn start(&self, name: &str) -> Result<(), HypervisorError> {
        self.set(name, DmtfState::Enabled)
    }
    fn shutdown(&self, name: &str, _timeout: Duration) -> Result<ShutdownOutcome, HypervisorError> {
        self.pass_gate(name);
        self.set(name, DmtfState::Disabled)?;
        Ok(ShutdownOutcome::Graceful)
    }
    fn destroy(&self, name: &str) -> Result<(), HypervisorError> {
        self.set(name, DmtfState::Disabled)
    }
    fn suspend(&self, name: &str) -> Result<(), HypervisorError> {
        self.set(name, DmtfState::Paused)
    }
    fn resume(&self, name: &str) -> Result<(), HypervisorError> {
        self.set(name, DmtfState::Enabled)
    }
    fn reset(&self, _name: &str) -> Result<(), HypervisorError> {
        Ok(())
    }
    fn reboot(&self, _name: &str) -> Result<(), HypervisorError> {
        Ok(())
    }
    fn set_memory(&self, _name: &str, _memory_mib: u64) -> Result<(), HypervisorError> {
        Ok(())
    }
    fn save(&self, name: &str, state_file: &Path) -> Result<(), HypervisorError> {
        self.pass_gate(name);
        std::fs::write(state_file, b"saved").expect("state file");
        self.set(name, DmtfState::Suspended)
    }
    fn restore(
        &self,
        _state_file: &Path,
        _spec: Option<&DomainSpec>,
    ) -> Result<DomainHandle, HypervisorError> {
        Err(HypervisorError::Unsupported {
            operation: "restore",
        })
    }
    fn undefine(&self, name: &str) -> Result<(), HypervisorError> {
        self.domains.lock().unwrap().remove(name);
        Ok(())
    }
    fn state(&self, name: &str) -> Result<DmtfState, HypervisorError> {
        self.domains
            .lock()
            .unwrap()
            .get(name)
            .copied()
            .ok_or_else(|| HypervisorError::UnknownDomain { name: name.into() })
    }
    fn list(&self) -> Result<Vec<DomainSummary>, HypervisorError> {
        Ok(self
            .domains
            .lock()
            .unwrap()
            .iter()
            .map(|(name, state)| DomainSummary {
                handle: Self::handle(name),
                state: *state,
                persistent: true,
            })
            .collect())
    }
    fn stats(&self, _name: &str) -> Result<DomainStats, HypervisorError> {
        Err(HypervisorError::Unsupported { operation: "stats" })
    }
    fn host_info(&self) -> Result<HostInfo, HypervisorError> {
        Ok(HostInfo {
            cpus: 8,
            memory_kib: 8 << 20,
            cpu_model: "fake".into(),
            cpu_mhz: 0,
        })
    }
}

fn descriptor(vm: &VmId) -> VmDescriptor {
    crate::test_support::descriptor(vm, [2; 32], vec![])
}

/// An engine over a [`FakeHypervisor`] running VMs `a` and `b`, and the ends of its long waits.
struct Fixture {
    _dir: tempfile::TempDir,
    engine: Engine<FakeHypervisor>,
    waits: std_mpsc::Receiver<WaitOver>,
    a: VmId,
    b: VmId,
}

/// An engine over a [`FakeHypervisor`] with its VM root in `dir`, without wait reports.
fn open_engine(dir: &Path) -> Engine<FakeHypervisor> {
    let total = Resources {
        vcpus: 8,
        memory_mib: 1024,
        disk_bytes: 1 << 30,
    };
    Engine::open(
        FakeHypervisor::default(),
        HostId::new("host-1").unwrap(),
        VmFiles::open(dir.join("vms")).unwrap(),
        total,
        Duration::from_secs(30),
    )
    .unwrap()
}

/// Reserves and starts `vm`.
fn start(engine: &mut Engine<FakeHypervisor>, vm: &VmId) {
    engine.reserve(vm, &descriptor(vm)).unwrap();
    let status = engine.activate(vm, &descriptor(vm)).unwrap();
    assert_eq!(status.state, DmtfState::Enabled);
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (report, waits) = std_mpsc::channel();
        let report = Mutex::new(report);
        let mut engine = open_engine(dir.path()).with_wait_reports(move || {
            let report = report.lock().unwrap().clone();
            Some(move |over| report.send(over).unwrap())
        });
        let (a, b) = (VmId::new("vm-a").unwrap(), VmId::new("vm-b").unwrap());
        start(&mut engine, &a);
        start(&mut engine, &b);
        Self {
            _dir: dir,
            engine,
            waits,
            a,
            b,
        }
    }

    /// Waits for the end of the one long wait under way and hands it to the engine.
    fn finish_wait(&mut self) {
        let over = self.waits.recv_timeout(NEVER).expect("the wait ends");
        self.engine.wait_over(over);
    }
}

/// Where an operation's callback hands its result.
type Results<T> = std_mpsc::Receiver<Result<T, OpError>>;

/// The state an operation reported to `rx`, which must have been called.
fn state_in(rx: &Results<HostVmStatus>) -> DmtfState {
    rx.try_recv().expect("called").expect("succeeded").state
}

/// A callback that hands an operation's result to the returned receiver.
fn reply<T: Send + 'static>() -> (impl FnOnce(Result<T, OpError>) + Send + 'static, Results<T>) {
    let (tx, rx) = std_mpsc::channel();
    (move |r| tx.send(r).unwrap(), rx)
}

#[test]
fn another_vm_is_served_while_a_shutdown_waits_for_its_guest() {
    let mut f = Fixture::new();
    let open = f.engine.hypervisor().gate(f.a.as_str());
    let (done_a, a_result) = reply();
    f.engine.control(&f.a, StateTransition::Shutdown, done_a);
    assert!(f.engine.is_waiting(&f.a));
    assert!(
        a_result.try_recv().is_err(),
        "the shutdown waits for the guest"
    );

    // VM B's operations complete while A's guest has not powered off.
    let (done_b, b_result) = reply();
    f.engine.control(&f.b, StateTransition::Pause, done_b);
    assert_eq!(state_in(&b_result), DmtfState::Paused, "done at once");
    assert_eq!(f.engine.state(&f.b).unwrap().state, DmtfState::Paused);

    // A request about A waits for A's operation to finish.
    let order = Arc::new(Mutex::new(Vec::new()));
    let seen = order.clone();
    let vm = f.a.clone();
    f.engine.run_for(Some(&f.a), move |engine| {
        let state = engine.state(&vm).unwrap().state;
        seen.lock().unwrap().push(state);
    });
    assert!(order.lock().unwrap().is_empty());

    open.send(()).unwrap();
    f.finish_wait();
    assert_eq!(state_in(&a_result), DmtfState::Disabled);
    assert_eq!(*order.lock().unwrap(), vec![DmtfState::Disabled]);
    assert!(!f.engine.is_waiting(&f.a));
}

#[test]
fn prepare_saves_off_the_engine_thread_then_leaves_only_files() {
    let mut f = Fixture::new();
    let open = f.engine.hypervisor().gate(f.a.as_str());
    let (done, result) = reply();
    f.engine.prepare(&f.a, PrepareMode::SaveState, done);
    assert!(result.try_recv().is_err(), "the save is under way");
    let listed = f.engine.list().unwrap();
    assert_eq!(listed.vms.len(), 2, "the engine answers during the save");

    open.send(()).unwrap();
    f.finish_wait();
    let prepared = result.try_recv().expect("done").unwrap();
    assert_eq!(prepared.state, DmtfState::Suspended);
    assert!(
        f.engine.hypervisor().state(f.a.as_str()).is_err(),
        "a prepared vm has no domain"
    );
    assert_eq!(f.engine.state(&f.b).unwrap().state, DmtfState::Enabled);
}

#[test]
fn a_queued_operation_that_waits_again_keeps_the_rest_queued() {
    let mut f = Fixture::new();
    let first = f.engine.hypervisor().gate(f.a.as_str());
    let (done_shutdown, shutdown_result) = reply();
    f.engine
        .control(&f.a, StateTransition::Shutdown, done_shutdown);
    // Queued behind the shutdown: start again, shut down again (a second long wait), and a
    // state query that must wait for that one too.
    let (done_start, start_result) = reply();
    let vm = f.a.clone();
    f.engine.run_for(Some(&f.a), move |engine| {
        engine.control(&vm, StateTransition::Start, done_start);
    });
    let (done_again, again_result) = reply();
    let vm = f.a.clone();
    f.engine.run_for(Some(&f.a), move |engine| {
        engine.control(&vm, StateTransition::Shutdown, done_again);
    });
    let (done_state, state_result) = reply();
    let vm = f.a.clone();
    f.engine
        .run_for(Some(&f.a), move |engine| done_state(engine.state(&vm)));

    first.send(()).unwrap();
    let over = f.waits.recv_timeout(NEVER).expect("the first wait ends");
    let second = f.engine.hypervisor().gate(f.a.as_str());
    f.engine.wait_over(over);
    assert_eq!(state_in(&shutdown_result), DmtfState::Disabled);
    assert_eq!(state_in(&start_result), DmtfState::Enabled);
    assert!(f.engine.is_waiting(&f.a), "the second shutdown waits");
    assert!(
        state_result.try_recv().is_err(),
        "the query waits for the second shutdown"
    );

    second.send(()).unwrap();
    f.finish_wait();
    assert_eq!(state_in(&again_result), DmtfState::Disabled);
    assert_eq!(state_in(&state_result), DmtfState::Disabled);
    assert!(!f.engine.is_waiting(&f.a));
}

#[test]
fn without_reports_a_long_wait_runs_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let mut engine = open_engine(dir.path());
    let vm = VmId::new("vm-a").unwrap();
    start(&mut engine, &vm);
    let (done, result) = reply();
    engine.control(&vm, StateTransition::Shutdown, done);
    assert_eq!(state_in(&result), DmtfState::Disabled, "done at once");
}

#[test]
fn a_restarted_agent_runs_again_what_should_run_and_never_a_prepared_or_stopped_vm() {
    let mut f = Fixture::new();
    let c = VmId::new("vm-c").unwrap();
    start(&mut f.engine, &c);
    // a is prepared for a transfer, c shut down by the Control interface, b keeps running.
    let open = f.engine.hypervisor().gate(f.a.as_str());
    let (done, prepared) = reply();
    f.engine.prepare(&f.a, PrepareMode::SaveState, done);
    open.send(()).unwrap();
    f.finish_wait();
    prepared.try_recv().expect("done").unwrap();
    let (done, off) = reply();
    f.engine.control(&c, StateTransition::PowerOff, done);
    assert_eq!(state_in(&off), DmtfState::Disabled);

    // The host goes down: a new agent, on a hypervisor that remembers nothing.
    let dir = f._dir.path().to_path_buf();
    drop(f.engine);
    let mut engine = open_engine(&dir);
    assert_eq!(engine.state(&f.b).unwrap().state, DmtfState::Disabled);
    engine.restart_interrupted();
    assert_eq!(engine.state(&f.b).unwrap().state, DmtfState::Enabled);
    assert_eq!(
        engine.state(&f.a).unwrap().state,
        DmtfState::Suspended,
        "a prepared vm is the migration's"
    );
    assert_eq!(engine.state(&c).unwrap().state, DmtfState::Disabled);
    // Started again by the Control interface, it is one that should run.
    let (done, started) = reply();
    engine.control(&c, StateTransition::Start, done);
    assert_eq!(state_in(&started), DmtfState::Enabled);
    drop(engine);
    let mut engine = open_engine(&dir);
    engine.restart_interrupted();
    assert_eq!(engine.state(&c).unwrap().state, DmtfState::Enabled);
    assert_eq!(engine.state(&f.b).unwrap().state, DmtfState::Enabled);
}
