//! The host agent daemon against a real nats-server site and libvirt's test driver: every
//! operation over NATS through the typed client, its error replies, capacity accounting and
//! reports, and a restarted agent finding its VMs again from its VM directories.
//!
//! libvirt's `test:///default` keeps its domains only while a connection to it is open, so the
//! restart test holds a connection of its own across the agent's restart (as libvirtd does for
//! a real host). Every test uses its own host and VM ids, because the test driver's domains are
//! shared by all connections of this process.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nubis_host::client::{host_client, NatsTransport};
use nubis_host::{HostConfig, Hypervisor, LibvirtConfig, LibvirtHypervisor};
use nubis_protocol::codec;
use nubis_protocol::descriptor::{
    DiskFormat, DiskSpec, KernelBoot, PrimaryKeys, VirtualHardware, VmDescriptor,
};
use nubis_protocol::message::host::{capacity_report_subject, HostOp};
use nubis_protocol::message::{
    DmtfState, ErrorCode, ErrorReply, HostCallError, HostCapacity, HostClient, HostId, HostReply,
    PrepareMode, StateTransition,
};
use nubis_protocol::{SiteId, VmId};
use nubis_testkit::{eventually, require_nats_server, wait_until, Federation, DEFAULT_TIMEOUT};

/// How long a real guest may take to boot or count again; a guard against hanging only.
const GUEST_TIMEOUT: Duration = Duration::from_secs(180);
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const GIB: u64 = 1 << 30;

/// A host agent running in this process.
struct Agent {
    token: CancellationToken,
    handle: JoinHandle<Result<(), nubis_host::AgentError>>,
}

impl Agent {
    async fn stop(self) {
        self.token.cancel();
        self.handle.await.unwrap().unwrap();
    }
}

/// Writes `host.toml` into `dir` and starts an agent from it.
async fn start_agent(fed: &mut Federation, dir: &Path, host: &str, extra: &str) -> Agent {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("info")
        .try_init();
    // The agent connects as its own host user, with only that host's permissions.
    let (user, password) = fed.host_credentials("a", host).await.unwrap();
    let text = format!(
        "site = \"a\"\nhost = \"{host}\"\nnats_url = \"{}\"\nnats_user = \"{user}\"\n\
         nats_password = \"{password}\"\nlibvirt_uri = \"test:///default\"\nvm_root = \"vms\"\n\
         shutdown_timeout_ms = 2000\ncapacity_report_interval_ms = 200\n{extra}",
        fed.site_url("a").unwrap()
    );
    let path = dir.join("host.toml");
    std::fs::write(&path, text).unwrap();
    let config = HostConfig::load(&path).unwrap();
    let token = CancellationToken::new();
    let handle = tokio::spawn(nubis_host::run(config, token.clone()));
    Agent { token, handle }
}

const SMALL_HOST: &str = "[capacity]\nvcpus = 4\nmemory_mib = 4096\ndisk_bytes = 10737418240\n";

async fn client(fed: &Federation, host: &str) -> HostClient<NatsTransport> {
    let nats = fed.connect_site_internal("a").await.unwrap();
    let client = host_client(nats, SiteId::new("a").unwrap(), HostId::new(host).unwrap());
    wait_until(DEFAULT_TIMEOUT, "the host agent answers", || {
        let c = client.clone();
        async move { c.capacity().await }
    })
    .await
    .unwrap();
    client
}

async fn federation() -> Option<Federation> {
    let binary = require_nats_server()?;
    Some(Federation::start_with(&binary, &["a"]).await.unwrap())
}

fn descriptor(id: &str, vcpus: u32, memory_mib: u64, disks: &[(&str, DiskFormat)]) -> VmDescriptor {
    VmDescriptor {
        id: VmId::new(id).unwrap(),
        name: format!("test vm {id}"),
        version: 1,
        primary_site: SiteId::new("a").unwrap(),
        primary_keys: PrimaryKeys {
            signing: [1; 32],
            sealing: [2; 32],
        },
        hardware: VirtualHardware {
            vcpus,
            memory_mib,
            disks: disks
                .iter()
                .map(|(name, format)| DiskSpec {
                    name: (*name).into(),
                    capacity_bytes: GIB,
                    format: format.clone(),
                    image: Some("base.qcow2".into()),
                })
                .collect(),
            networks: Vec::new(),
            boot: None,
        },
        monitoring: Vec::new(),
        properties: Default::default(),
    }
}

fn refused<T: std::fmt::Debug>(r: Result<T, HostCallError>) -> ErrorReply {
    match r {
        Err(HostCallError::Refused(e)) => e,
        other => panic!("expected an error reply, got {other:?}"),
    }
}

/// Writes a file into every slot named like a disk or boot file, as the transfer proxy would.
fn receive_files(slots: &[nubis_protocol::message::LocalFile]) -> Vec<PathBuf> {
    let mut written = Vec::new();
    for s in slots.iter().filter(|s| s.name != "state.sav") {
        std::fs::write(&s.path, format!("contents of {}", s.name)).unwrap();
        written.push(PathBuf::from(&s.path));
    }
    written
}

#[tokio::test]
async fn host_agent_reserves_activates_prepares_and_releases() {
    let Some(mut fed) = federation().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(&mut fed, dir.path(), "h-flow", SMALL_HOST).await;
    let c = client(&fed, "h-flow").await;

    let empty = c.capacity().await.unwrap();
    assert_eq!(empty.host.as_str(), "h-flow");
    assert_eq!(empty.total.vcpus, 4);
    assert_eq!(empty.committed.vcpus, 0);
    assert_eq!(empty.free, empty.total);

    let d = descriptor("flow-1", 2, 1024, &[("vda", DiskFormat::Qcow2)]);
    let reserved = c.reserve(&d).await.unwrap();
    let names: Vec<&str> = reserved.slots.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["disk-vda.qcow2", "state.sav"]);
    for s in &reserved.slots {
        let p = Path::new(&s.path);
        assert!(
            p.starts_with(dir.path().join("vms").join("flow-1")),
            "{}",
            s.path
        );
        assert!(p.parent().unwrap().is_dir());
    }
    // Reserving again returns the same slots and commits nothing more.
    assert_eq!(c.reserve(&d).await.unwrap(), reserved);
    let held = c.capacity().await.unwrap();
    assert_eq!(held.committed.vcpus, 2);
    assert_eq!(held.committed.memory_mib, 1024);
    assert_eq!(held.committed.disk_bytes, GIB);
    assert_eq!(held.vms, 1);

    // Activating before the disk arrived is a conflict naming the missing file.
    let e = refused(c.activate(&d).await);
    assert_eq!(e.code, ErrorCode::Conflict);
    assert!(e.message.contains("disk-vda.qcow2"), "{}", e.message);
    assert!(!e.message.contains('/'), "no path in {}", e.message);

    receive_files(&reserved.slots);
    let active = c.activate(&d).await.unwrap();
    assert_eq!(active.state, DmtfState::Enabled);
    assert_eq!(active.descriptor_version, 1);
    // Activating a running VM reports its state.
    assert_eq!(c.activate(&d).await.unwrap(), active);
    assert_eq!(c.state(&d.id).await.unwrap().state, DmtfState::Enabled);

    // Prepare with the memory state: it stops, and its files exist with their sizes.
    let prepared = c.prepare(&d.id, PrepareMode::SaveState).await.unwrap();
    assert_eq!(prepared.state, DmtfState::Suspended);
    let names: Vec<&str> = prepared.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["disk-vda.qcow2", "state.sav"]);
    for f in &prepared.files {
        let m = std::fs::metadata(&f.path).unwrap();
        assert_eq!(m.len(), f.size_bytes, "{}", f.name);
        assert!(f.size_bytes > 0, "{}", f.name);
    }
    assert_eq!(
        c.prepare(&d.id, PrepareMode::SaveState).await.unwrap(),
        prepared,
        "prepare is idempotent"
    );

    // The migration was aborted: the VM runs again here, and the saved state is consumed.
    let resumed = c.resume_after_abort(&d.id).await.unwrap();
    assert_eq!(resumed.state, DmtfState::Enabled);
    assert!(!Path::new(&prepared.files[1].path).exists());
    assert_eq!(
        c.resume_after_abort(&d.id).await.unwrap().state,
        DmtfState::Enabled
    );

    // Cold preparation shuts it down; only the disk is listed.
    let cold = c.prepare(&d.id, PrepareMode::Shutdown).await.unwrap();
    assert_eq!(cold.state, DmtfState::Disabled);
    assert_eq!(cold.files.len(), 1);

    let listed = c.list().await.unwrap();
    assert_eq!(listed.vms.len(), 1);
    assert_eq!(listed.vms[0].vm, d.id);
    assert_eq!(listed.vms[0].state, DmtfState::Disabled);

    // Release frees everything; releasing again (or an unknown VM) succeeds.
    let released = c.release(&d.id).await.unwrap();
    assert!(released.was_present);
    assert_eq!(released.freed.vcpus, 2);
    assert!(!dir.path().join("vms").join("flow-1").exists());
    let again = c.release(&d.id).await.unwrap();
    assert!(!again.was_present);
    assert_eq!(c.capacity().await.unwrap().committed, empty.committed);
    assert_eq!(refused(c.state(&d.id).await).code, ErrorCode::UnknownVm);

    agent.stop().await;
}

#[tokio::test]
async fn host_agent_refuses_what_does_not_fit_and_frees_on_release() {
    let Some(mut fed) = federation().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(&mut fed, dir.path(), "h-cap", SMALL_HOST).await;
    let c = client(&fed, "h-cap").await;

    // The capacity report arrives without asking.
    let nats = fed.connect_site_internal("a").await.unwrap();
    let subject =
        capacity_report_subject(&SiteId::new("a").unwrap(), &HostId::new("h-cap").unwrap());
    let mut reports = nats.subscribe(String::from(subject)).await.unwrap();

    let big = descriptor("cap-big", 3, 3072, &[]);
    c.reserve(&big).await.unwrap();
    let other = descriptor("cap-other", 2, 512, &[]);
    let e = refused(c.reserve(&other).await);
    assert_eq!(e.code, ErrorCode::NoCapacity);
    assert!(e.retryable);
    // The refused VM holds nothing and has no directory.
    assert!(!dir.path().join("vms").join("cap-other").exists());
    assert_eq!(c.capacity().await.unwrap().committed.vcpus, 3);

    // A report shows the commitment.
    let report = tokio::time::timeout(DEFAULT_TIMEOUT, async {
        loop {
            let m = futures::StreamExt::next(&mut reports).await.unwrap();
            let cap: HostCapacity = codec::from_slice(&m.payload).unwrap();
            if cap.committed.vcpus == 3 {
                return cap;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(report.free.vcpus, 1);

    c.release(&big.id).await.unwrap();
    c.reserve(&other).await.unwrap();
    assert_eq!(c.capacity().await.unwrap().committed.vcpus, 2);
    c.release(&other.id).await.unwrap();
    agent.stop().await;
}

#[tokio::test]
async fn host_agent_control_transitions_map_to_dmtf_states() {
    let Some(mut fed) = federation().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(&mut fed, dir.path(), "h-ctl", SMALL_HOST).await;
    let c = client(&fed, "h-ctl").await;

    // A blank raw disk is created by the host; nothing needs to be received.
    let mut d = descriptor("ctl-1", 1, 512, &[("vda", DiskFormat::Raw)]);
    d.hardware.disks[0].image = None;
    c.reserve(&d).await.unwrap();
    assert_eq!(c.state(&d.id).await.unwrap().state, DmtfState::Disabled);
    assert_eq!(c.activate(&d).await.unwrap().state, DmtfState::Enabled);

    let vm = &d.id;
    let steps = [
        (StateTransition::Pause, DmtfState::Paused),
        (StateTransition::Pause, DmtfState::Paused),
        (StateTransition::Resume, DmtfState::Enabled),
        (StateTransition::Suspend, DmtfState::Suspended),
        (StateTransition::Start, DmtfState::Enabled),
        (StateTransition::Reset, DmtfState::Enabled),
        (StateTransition::PowerOff, DmtfState::Disabled),
        (StateTransition::Start, DmtfState::Enabled),
        (StateTransition::Shutdown, DmtfState::Disabled),
        (StateTransition::Shutdown, DmtfState::Disabled),
        (StateTransition::Start, DmtfState::Enabled),
    ];
    for (t, want) in steps {
        let got = c.control(vm, t).await.unwrap();
        assert_eq!(got.state, want, "after {t:?}");
        assert_eq!(c.state(vm).await.unwrap().state, want, "state after {t:?}");
    }

    // A transition that does not apply is a conflict, and the agent keeps serving.
    c.control(vm, StateTransition::PowerOff).await.unwrap();
    let e = refused(c.control(vm, StateTransition::Pause).await);
    assert_eq!(e.code, ErrorCode::Conflict);
    assert_eq!(c.state(vm).await.unwrap().state, DmtfState::Disabled);
    assert_eq!(
        refused(
            c.control(&VmId::new("ctl-nobody").unwrap(), StateTransition::Start)
                .await
        )
        .code,
        ErrorCode::UnknownVm
    );

    // Descriptor updates: memory of a running VM within its maximum applies at once; an older
    // version is a conflict; a larger VM than fits is refused and leaves the old one in force.
    c.control(vm, StateTransition::Start).await.unwrap();
    let mut smaller = d.clone();
    smaller.version = 2;
    smaller.hardware.memory_mib = 256;
    let updated = c.update(&smaller).await.unwrap();
    assert_eq!(updated.descriptor_version, 2);
    assert!(!updated.restart_needed);
    assert_eq!(c.capacity().await.unwrap().committed.memory_mib, 256);
    let mut more_cpus = smaller.clone();
    more_cpus.version = 3;
    more_cpus.hardware.vcpus = 2;
    assert!(c.update(&more_cpus).await.unwrap().restart_needed);
    assert_eq!(refused(c.update(&d).await).code, ErrorCode::Conflict);
    let mut huge = more_cpus.clone();
    huge.version = 4;
    huge.hardware.vcpus = 64;
    assert_eq!(refused(c.update(&huge).await).code, ErrorCode::NoCapacity);
    assert_eq!(c.state(vm).await.unwrap().descriptor_version, 3);
    assert_eq!(c.capacity().await.unwrap().committed.vcpus, 2);

    c.release(vm).await.unwrap();
    agent.stop().await;
}

#[tokio::test]
async fn host_agent_answers_bad_requests_and_keeps_serving() {
    let Some(mut fed) = federation().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(&mut fed, dir.path(), "h-bad", SMALL_HOST).await;
    let c = client(&fed, "h-bad").await;
    let nats = fed.connect_site_internal("a").await.unwrap();
    let site = SiteId::new("a").unwrap();
    let host = HostId::new("h-bad").unwrap();

    let raw = |op: HostOp, payload: Vec<u8>| {
        let nats = nats.clone();
        let subject = String::from(op.subject(&site, &host));
        async move {
            let m = nats.request(subject, payload.into()).await.unwrap();
            match codec::from_slice::<HostReply<serde::de::IgnoredAny>>(&m.payload).unwrap() {
                HostReply::Error(e) => e,
                HostReply::Ok(_) => panic!("expected an error reply"),
            }
        }
    };
    // Not MessagePack, the wrong shape, nesting bombs, an oversize body.
    assert_eq!(
        raw(HostOp::Reserve, vec![0xc1, 0xff]).await.code,
        ErrorCode::Malformed
    );
    assert_eq!(
        raw(
            HostOp::Control,
            codec::to_vec(&serde_json::json!({"vm": "x"})).unwrap()
        )
        .await
        .code,
        ErrorCode::Malformed
    );
    assert_eq!(
        raw(
            HostOp::Release,
            codec::to_vec(&serde_json::json!({"vm": "Not An Id"})).unwrap()
        )
        .await
        .code,
        ErrorCode::Malformed
    );
    let mut nested = rmpv::Value::Nil;
    for _ in 0..200 {
        nested = rmpv::Value::Array(vec![nested]);
    }
    let bomb = rmpv::Value::Map(vec![
        ("vm".into(), "bad-1".into()),
        ("mode".into(), "save_state".into()),
        ("extra".into(), nested),
    ]);
    let mut deep = Vec::new();
    rmpv::encode::write_value(&mut deep, &bomb).unwrap();
    assert_eq!(raw(HostOp::Prepare, deep).await.code, ErrorCode::TooDeep);
    assert_eq!(
        raw(HostOp::Update, vec![0xc0; codec::MAX_BODY_LEN + 1])
            .await
            .code,
        ErrorCode::Oversize
    );

    // A descriptor for another VM, or an invalid one.
    let d = descriptor("bad-1", 1, 256, &[]);
    let mut other = d.clone();
    other.id = VmId::new("bad-2").unwrap();
    let e = refused(
        c.call(&nubis_protocol::message::ReserveVm {
            vm: d.id.clone(),
            descriptor: Box::new(other),
        })
        .await,
    );
    assert_eq!(e.code, ErrorCode::Malformed);
    let mut invalid = d.clone();
    invalid.hardware.vcpus = 0;
    assert_eq!(
        refused(c.reserve(&invalid).await).code,
        ErrorCode::Malformed
    );
    let mut vmdk = descriptor("bad-3", 1, 256, &[("vda", DiskFormat::Vmdk)]);
    vmdk.version = 1;
    assert_eq!(refused(c.reserve(&vmdk).await).code, ErrorCode::Refused);

    // Unknown VMs, for every VM operation that needs one.
    let ghost = VmId::new("bad-ghost").unwrap();
    assert_eq!(refused(c.state(&ghost).await).code, ErrorCode::UnknownVm);
    assert_eq!(
        refused(c.prepare(&ghost, PrepareMode::SaveState).await).code,
        ErrorCode::UnknownVm
    );
    assert_eq!(
        refused(c.resume_after_abort(&ghost).await).code,
        ErrorCode::UnknownVm
    );
    assert_eq!(
        refused(c.activate(&descriptor("bad-ghost", 1, 1, &[])).await).code,
        ErrorCode::UnknownVm
    );
    assert_eq!(
        refused(c.update(&descriptor("bad-ghost", 1, 1, &[])).await).code,
        ErrorCode::UnknownVm
    );
    assert!(!c.release(&ghost).await.unwrap().was_present);

    // A VM whose direct-boot kernel never arrived cannot start.
    let mut boot = descriptor("bad-boot", 1, 256, &[]);
    boot.hardware.boot = Some(KernelBoot {
        kernel: "vmlinuz".into(),
        initrd: None,
        cmdline: "console=ttyS0".into(),
    });
    let slots = c.reserve(&boot).await.unwrap().slots;
    assert!(slots.iter().any(|s| s.name == "kernel"));
    let e = refused(c.activate(&boot).await);
    assert_eq!(e.code, ErrorCode::Conflict);
    assert!(e.message.contains("kernel"), "{}", e.message);

    // After all that, it still serves.
    c.reserve(&d).await.unwrap();
    assert_eq!(c.activate(&d).await.unwrap().state, DmtfState::Enabled);
    c.release(&d.id).await.unwrap();
    c.release(&boot.id).await.unwrap();
    assert_eq!(c.capacity().await.unwrap().vms, 0);
    agent.stop().await;
}

#[tokio::test]
async fn host_agent_restarted_rediscovers_its_vms() {
    let Some(mut fed) = federation().await else {
        return;
    };
    // The test driver forgets its domains when its last connection closes; this connection
    // stands for libvirtd, which outlives the agent on a real host.
    let libvirt = LibvirtHypervisor::connect(LibvirtConfig::new("test:///default")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(&mut fed, dir.path(), "h-restart", SMALL_HOST).await;
    let c = client(&fed, "h-restart").await;

    let running = descriptor("restart-run", 1, 512, &[("vda", DiskFormat::Qcow2)]);
    receive_files(&c.reserve(&running).await.unwrap().slots);
    c.activate(&running).await.unwrap();
    let saved = descriptor("restart-saved", 1, 256, &[("vda", DiskFormat::Qcow2)]);
    receive_files(&c.reserve(&saved).await.unwrap().slots);
    c.activate(&saved).await.unwrap();
    c.prepare(&saved.id, PrepareMode::SaveState).await.unwrap();
    let reserved_only = descriptor("restart-reserved", 1, 128, &[]);
    c.reserve(&reserved_only).await.unwrap();
    let before = c.capacity().await.unwrap();
    let listed_before = c.list().await.unwrap();
    // A reservation that crashed half-way: a directory without a descriptor.
    std::fs::create_dir_all(dir.path().join("vms").join("restart-torn")).unwrap();

    agent.stop().await;
    assert_eq!(
        libvirt.state("restart-run").unwrap(),
        nubis_host::DmtfState::Enabled
    );

    let agent = start_agent(&mut fed, dir.path(), "h-restart", SMALL_HOST).await;
    let c = client(&fed, "h-restart").await;
    let after = c.capacity().await.unwrap();
    assert_eq!(after.committed, before.committed);
    assert_eq!(after.vms, 3);
    assert_eq!(c.list().await.unwrap().vms, listed_before.vms);
    assert_eq!(
        c.state(&running.id).await.unwrap().state,
        DmtfState::Enabled
    );
    assert_eq!(
        c.state(&saved.id).await.unwrap().state,
        DmtfState::Suspended
    );
    assert_eq!(
        c.state(&reserved_only.id).await.unwrap().state,
        DmtfState::Disabled
    );
    assert!(!dir.path().join("vms").join("restart-torn").exists());

    // The rediscovered VMs are fully usable.
    assert_eq!(
        c.resume_after_abort(&saved.id).await.unwrap().state,
        DmtfState::Enabled
    );
    for vm in [&running.id, &saved.id, &reserved_only.id] {
        assert!(c.release(vm).await.unwrap().was_present);
    }
    assert_eq!(c.capacity().await.unwrap().committed.vcpus, 0);
    assert!(libvirt
        .list()
        .unwrap()
        .iter()
        .all(|d| !d.handle.name.starts_with("restart-")));
    agent.stop().await;
}

#[tokio::test]
async fn host_agent_stops_answering_when_stopped() {
    let Some(mut fed) = federation().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(&mut fed, dir.path(), "h-stop", SMALL_HOST).await;
    let c = client(&fed, "h-stop").await;
    agent.stop().await;
    let quick = c
        .clone()
        .with_timeouts(Duration::from_secs(5), Duration::from_secs(5));
    match quick.capacity().await {
        Err(HostCallError::Transport(_)) => {}
        other => panic!("expected no answer, got {other:?}"),
    }
}

/// A real TCG guest moves between two host agents of one site on `qemu:///system`: saved on
/// h1, its disk, kernel, initrd and memory state copied into h2's slots (as the transfer
/// proxies would), released on h1 and activated on h2, where it continues counting without
/// booting again.
#[tokio::test]
async fn host_agent_moves_a_real_guest_between_hosts() {
    use nubis_host::test_guest::{GuestImage, SerialLog, DISK_BYTES, READY_MARKER};
    let _qemu = crate::QEMU.lock().await;

    let guest = match GuestImage::locate(&GuestImage::default_dir()) {
        Ok(g) => g,
        Err(e) => return nubis_testkit::skip_or_fail(e).unwrap_or(()),
    };
    let libvirt = match LibvirtHypervisor::connect(LibvirtConfig::new("qemu:///system")) {
        Ok(hv) => hv,
        Err(e) => {
            return nubis_testkit::skip_or_fail(format!("libvirtd not reachable: {e}"))
                .unwrap_or(())
        }
    };
    let Some(mut fed) = federation().await else {
        return;
    };
    let vm = "qemu-move-1";
    // A domain left over by an interrupted run.
    let _ = libvirt.destroy(vm);
    let _ = libvirt.undefine(vm);

    let accel = if nubis_host::test_guest::accelerator() == nubis_host::Accelerator::Kvm {
        "kvm"
    } else {
        "tcg"
    };
    let q1 = fed.host_credentials("a", "q1").await.unwrap();
    let q2 = fed.host_credentials("a", "q2").await.unwrap();
    let qemu_agent = |dir: &Path, host: &str, (user, password): (String, String)| {
        let text = format!(
            "site = \"a\"\nhost = \"{host}\"\nnats_url = \"{}\"\nnats_user = \"{user}\"\n\
             nats_password = \"{password}\"\nlibvirt_uri = \"qemu:///system\"\naccelerator = \"{accel}\"\n\
             vm_root = \"vms\"\nshutdown_timeout_ms = 5000\n{SMALL_HOST}",
            fed.site_url("a").unwrap()
        );
        let path = dir.join("host.toml");
        std::fs::write(&path, text).unwrap();
        let token = CancellationToken::new();
        let handle = tokio::spawn(nubis_host::run(
            HostConfig::load(&path).unwrap(),
            token.clone(),
        ));
        Agent { token, handle }
    };
    let (dir1, dir2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (agent1, agent2) = (
        qemu_agent(dir1.path(), "q1", q1),
        qemu_agent(dir2.path(), "q2", q2),
    );
    let (h1, h2) = (client(&fed, "q1").await, client(&fed, "q2").await);

    let mut d = descriptor(vm, 1, 128, &[("vda", DiskFormat::Qcow2)]);
    d.hardware.disks[0].capacity_bytes = DISK_BYTES;
    d.hardware.boot = Some(KernelBoot {
        kernel: "vmlinuz".into(),
        initrd: Some("initramfs".into()),
        cmdline: "console=ttyS0 quiet panic=-1".into(),
    });

    // Primary placement on h1: the image files arrive in the slots, then the VM boots.
    let slots = h1.reserve(&d).await.unwrap().slots;
    let slot = |name: &str| PathBuf::from(&slots.iter().find(|s| s.name == name).unwrap().path);
    GuestImage::create_disk(&slot("disk-vda.qcow2")).unwrap();
    std::fs::copy(&guest.kernel, slot("kernel")).unwrap();
    std::fs::copy(&guest.initrd, slot("initrd")).unwrap();
    assert_eq!(h1.activate(&d).await.unwrap().state, DmtfState::Enabled);
    let log1 = SerialLog::new(dir1.path().join("vms").join(vm).join("console.log"));
    eventually(GUEST_TIMEOUT, "the guest to boot and count on h1", || {
        (log1.count(READY_MARKER) == 1 && log1.last_counter().is_some()).then_some(())
    })
    .await;

    // Forced migration: save on h1, files to h2, release on h1, activate on h2.
    let prepared = h1.prepare(&d.id, PrepareMode::SaveState).await.unwrap();
    assert_eq!(prepared.state, DmtfState::Suspended);
    let (saved_n, saved_up) = log1.last_counter().unwrap();
    let target = h2.reserve(&d).await.unwrap().slots;
    for f in &prepared.files {
        let to = target.iter().find(|s| s.name == f.name).unwrap();
        assert_eq!(std::fs::copy(&f.path, &to.path).unwrap(), f.size_bytes);
    }
    assert!(prepared.files.iter().any(|f| f.name == "state.sav"));
    assert!(h1.release(&d.id).await.unwrap().was_present);
    assert_eq!(h2.activate(&d).await.unwrap().state, DmtfState::Enabled);

    let log2 = SerialLog::new(dir2.path().join("vms").join(vm).join("console.log"));
    let (n, up) = eventually(GUEST_TIMEOUT, "the counter to continue on h2", || {
        log2.last_counter().filter(|(n, _)| *n > saved_n)
    })
    .await;
    assert!(
        n > saved_n && up > saved_up,
        "continues: {n}/{up} after {saved_n}/{saved_up}"
    );
    assert_eq!(log2.count(READY_MARKER), 0, "the guest did not boot again");
    assert!(
        !dir1.path().join("vms").join(vm).exists(),
        "the source kept nothing"
    );

    // The Control interface on the destination, then the VM leaves.
    assert_eq!(
        h2.control(&d.id, StateTransition::Pause)
            .await
            .unwrap()
            .state,
        DmtfState::Paused
    );
    assert_eq!(
        h2.control(&d.id, StateTransition::Resume)
            .await
            .unwrap()
            .state,
        DmtfState::Enabled
    );
    assert_eq!(
        h2.control(&d.id, StateTransition::Shutdown)
            .await
            .unwrap()
            .state,
        DmtfState::Disabled
    );
    h2.release(&d.id).await.unwrap();
    agent1.stop().await;
    agent2.stop().await;
}
