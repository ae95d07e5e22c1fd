//! A competitor's files, or a broken-into host agent, against the file system of a site. Paths
//! come from the site's own configuration: the Transfer proxy serves and writes only under its
//! configured roots (the host VM roots and the image store), a transfer manifest cannot name a
//! VM directory's control files, and a received qcow2 image that names another file of the
//! host (a backing file, an external data file) is refused before any domain is defined.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nubis_host::client::{host_client, NatsTransport};
use nubis_host::{HostConfig, Hypervisor, HypervisorError, LibvirtConfig, LibvirtHypervisor};
use nubis_protocol::descriptor::{
    DiskFormat, DiskSpec, PrimaryKeys, VirtualHardware, VmDescriptor,
};
use nubis_protocol::message::{
    DmtfState, Endpoint, ErrorCode, HostCallError, HostClient, HostId, TransferStatus,
};
use nubis_protocol::{MigrationId, SiteId, VmId};
use nubis_proxy::{ProxyError, TransferSettings};
use nubis_testkit::{require_nats_server, wait_until, Federation, DEFAULT_TIMEOUT};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::proxy::{
    fetch_req, final_status, mint_receive, mint_serve, settings, start_proxy, uri, write_dense,
    Keys,
};
use crate::stack::{ops, wait_migration, SiteSpec, Stack};

const GIB: u64 = 1 << 30;

/// Runs `qemu-img` with `args` in `dir`; `None` (the test skips) when it is not installed,
/// which fails under CI.
fn qemu_img(dir: &Path, args: &[&str]) -> Option<()> {
    match Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
    {
        Ok(o) if o.status.success() => Some(()),
        Ok(o) => panic!("qemu-img {args:?} failed: {o:?}"),
        Err(e) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "qemu-img is needed under CI: {e}"
            );
            eprintln!("skipped: qemu-img is not installed ({e})");
            None
        }
    }
}

/// A qcow2 image whose backing file is a file of the host: what a hostile partner sends.
const BACKED: &[&str] = &[
    "create",
    "-q",
    "-f",
    "qcow2",
    "-b",
    "/etc/hostname",
    "-F",
    "raw",
];

#[tokio::test]
async fn a_proxy_serves_and_receives_only_under_its_roots() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let fed = Federation::start_with(&binary, &["a"]).await.unwrap();
    let keys = Keys::new(&["a"]);
    let tmp = tempfile::tempdir().unwrap();
    let vms = tmp.path().join("vms");
    let vm_dir = vms.join("vm-1");
    std::fs::create_dir_all(&vm_dir).unwrap();
    std::fs::create_dir_all(vms.join("vm-2")).unwrap();
    let disk = vm_dir.join("disk-vda.raw");
    write_dense(&disk, 10_000, 1);
    // The site's secret key, beside the VM root: what a broken-into host agent would name.
    let key = tmp.path().join("a.key");
    std::fs::write(&key, b"secret").unwrap();
    let link = vm_dir.join("state.sav");
    std::os::unix::fs::symlink(&key, &link).unwrap();
    let confined = TransferSettings {
        roots: vec![vms.clone()],
        ..settings()
    };
    let pa = start_proxy(&fed, &keys, "a", "p1", &tmp.path().join("store"), confined).await;
    let mig = MigrationId::random();

    let escape = vm_dir.join("../../a.key");
    for (what, path) in [
        ("the key file", key.as_path()),
        ("a link to it in the vm directory", link.as_path()),
        ("a way out with ..", escape.as_path()),
    ] {
        let r = pa.mint(mint_serve(&[("state.sav", path)], mig)).await;
        assert!(
            matches!(r, Err(ProxyError::OutsideRoots { .. })),
            "serving {what}: {r:?}"
        );
    }
    for (what, dir) in [
        ("the directory of the key file", tmp.path()),
        ("the root itself", vms.as_path()),
    ] {
        let r = pa.mint(mint_receive(dir, mig)).await;
        assert!(
            matches!(r, Err(ProxyError::OutsideRoots { .. })),
            "receiving into {what}: {r:?}"
        );
    }
    let refused = pa
        .mint(mint_serve(&[("state.sav", &key)], mig))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), ErrorCode::Refused);
    assert!(!refused.to_string().contains('/'), "no path in {refused}");

    // The legitimate counterparts: a VM's file and a VM's directory under the root.
    let served = pa
        .mint(mint_serve(&[("disk-vda.raw", &disk)], mig))
        .await
        .unwrap();
    assert_eq!(served.total_bytes, 10_000);
    pa.mint(mint_receive(&vms.join("vm-2"), mig)).await.unwrap();
    pa.shutdown().await;
}

#[tokio::test]
async fn a_manifest_naming_a_control_file_writes_nothing() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let fed = Federation::start_with(&binary, &["a", "b"]).await.unwrap();
    let keys = Keys::new(&["a", "b"]);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("a-vms").join("vm-1");
    let dst = tmp.path().join("b-vms").join("vm-1");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&dst).unwrap();
    // The destination host's own descriptor, stored at reservation.
    std::fs::write(dst.join("descriptor.msgpack"), b"the host's descriptor").unwrap();
    let forged = src.join("forged");
    std::fs::write(&forged, b"a competitor's descriptor").unwrap();
    let disk = src.join("disk-vda.raw");
    write_dense(&disk, 50_000, 2);

    let pa = start_proxy(&fed, &keys, "a", "p1", &tmp.path().join("sa"), settings()).await;
    let pb = start_proxy(&fed, &keys, "b", "p1", &tmp.path().join("sb"), settings()).await;
    let cb = keys.client("b", fed.connect("b").await.unwrap());
    let at_b = uri("b", "p1");

    // Site a (the competitor) serves files under the names of b's control files.
    for name in ["descriptor.msgpack", "domain"] {
        let mig = MigrationId::random();
        let s = pa.mint(mint_serve(&[(name, &forged)], mig)).await.unwrap();
        let d = pb.mint(mint_receive(&dst, mig)).await.unwrap();
        let source = Endpoint {
            proxy: s.proxy,
            token: s.token,
        };
        let _ = pb.fetch(fetch_req(mig, source, d.token)).await;
        match final_status(&cb, &at_b, mig, d.token).await {
            TransferStatus::Failed { reason } => {
                assert!(
                    reason.contains("not a file a transfer may write"),
                    "{reason}"
                )
            }
            other => panic!("a manifest naming {name} was received: {other:?}"),
        }
    }
    assert_eq!(
        std::fs::read(dst.join("descriptor.msgpack")).unwrap(),
        b"the host's descriptor"
    );
    assert!(!dst.join("domain").exists());

    // The legitimate counterpart: a disk image is received into the same directory.
    let mig = MigrationId::random();
    let s = pa
        .mint(mint_serve(&[("disk-vda.raw", &disk)], mig))
        .await
        .unwrap();
    let d = pb.mint(mint_receive(&dst, mig)).await.unwrap();
    let source = Endpoint {
        proxy: s.proxy,
        token: s.token,
    };
    let _ = pb.fetch(fetch_req(mig, source, d.token)).await;
    let status = final_status(&cb, &at_b, mig, d.token).await;
    assert!(
        matches!(status, TransferStatus::Succeeded { .. }),
        "{status:?}"
    );
    assert_eq!(
        std::fs::read(dst.join("disk-vda.raw")).unwrap(),
        std::fs::read(&disk).unwrap()
    );
    pa.shutdown().await;
    pb.shutdown().await;
}

fn descriptor(id: &str) -> VmDescriptor {
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
            vcpus: 1,
            memory_mib: 256,
            disks: vec![DiskSpec {
                name: "vda".into(),
                capacity_bytes: GIB,
                format: DiskFormat::Qcow2,
                image: Some("base.qcow2".into()),
            }],
            networks: Vec::new(),
            boot: None,
        },
        monitoring: Vec::new(),
        properties: Default::default(),
    }
}

/// A host agent of site `a` on libvirt's test driver, whose domains every connection of this
/// process sees.
async fn host_agent(
    fed: &mut Federation,
    dir: &Path,
    host: &str,
) -> (CancellationToken, HostClient<NatsTransport>) {
    let (user, password) = fed.host_credentials("a", host).await.unwrap();
    let path = dir.join("host.toml");
    std::fs::write(
        &path,
        format!(
            "site = \"a\"\nhost = \"{host}\"\nnats_url = \"{}\"\nnats_user = \"{user}\"\n\
             nats_password = \"{password}\"\nlibvirt_uri = \"test:///default\"\nvm_root = \"vms\"\n\
             [capacity]\nvcpus = 8\nmemory_mib = 8192\ndisk_bytes = 107374182400\n",
            fed.site_url("a").unwrap()
        ),
    )
    .unwrap();
    let config = HostConfig::load(&path).unwrap();
    let token = CancellationToken::new();
    tokio::spawn(nubis_host::run(config, token.clone()));
    let nats = fed.connect_site_internal("a").await.unwrap();
    let client = host_client(nats, SiteId::new("a").unwrap(), HostId::new(host).unwrap());
    wait_until(DEFAULT_TIMEOUT, "the host agent answers", || {
        let c = client.clone();
        async move { c.capacity().await }
    })
    .await
    .unwrap();
    (token, client)
}

#[tokio::test]
async fn a_qcow2_image_naming_a_host_file_defines_no_domain() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    if qemu_img(tmp.path(), &["--version"]).is_none() {
        return;
    }
    let mut fed = Federation::start_with(&binary, &["a"]).await.unwrap();
    let (agent, c) = host_agent(&mut fed, tmp.path(), "h-files").await;
    let hv = LibvirtHypervisor::connect(LibvirtConfig::new("test:///default")).unwrap();

    // Each image lands in its VM's disk slot, as the transfer proxy would write it.
    let cases: [(&str, Vec<&str>, &str); 3] = [
        (
            "files-backed",
            [BACKED, &["x.qcow2", "16M"]].concat(),
            "backing file",
        ),
        (
            "files-data",
            vec![
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                // `qemu-img create` writes the data file it names, so it is one of the test's
                // own; the agent refuses the image for naming a file at all.
                "data_file=data.raw",
                "x.qcow2",
                "16M",
            ],
            "external data file",
        ),
        (
            "files-large",
            vec!["create", "-q", "-f", "qcow2", "x.qcow2", "2G"],
            "larger than the declared capacity",
        ),
    ];
    for (vm, args, why) in cases {
        let d = descriptor(vm);
        let reserved = c.reserve(&d).await.unwrap();
        let slot = &reserved.slots[0];
        assert_eq!(slot.name, "disk-vda.qcow2");
        let made = tmp.path().join(vm);
        std::fs::create_dir_all(&made).unwrap();
        qemu_img(&made, &args).unwrap();
        std::fs::rename(made.join("x.qcow2"), &slot.path).unwrap();
        match c.activate(&d).await {
            Err(HostCallError::Refused(e)) => {
                assert_eq!(e.code, ErrorCode::Refused, "{vm}: {e:?}");
                assert!(e.message.contains(why), "{vm}: {}", e.message);
                assert!(!e.message.contains('/'), "no path in {}", e.message);
            }
            other => panic!("{vm}: activated: {other:?}"),
        }
        assert!(
            matches!(hv.state(vm), Err(HypervisorError::UnknownDomain { .. })),
            "{vm}: a domain was defined"
        );
        c.release(&d.id).await.unwrap();
    }

    // The legitimate counterpart: a plain, self-contained qcow2 image runs.
    let d = descriptor("files-plain");
    let reserved = c.reserve(&d).await.unwrap();
    qemu_img(
        tmp.path(),
        &["create", "-q", "-f", "qcow2", "plain.qcow2", "16M"],
    )
    .unwrap();
    std::fs::rename(tmp.path().join("plain.qcow2"), &reserved.slots[0].path).unwrap();
    assert_eq!(c.activate(&d).await.unwrap().state, DmtfState::Enabled);
    assert_eq!(hv.state("files-plain").unwrap(), DmtfState::Enabled);
    c.release(&d.id).await.unwrap();
    agent.cancel();
}

#[tokio::test]
async fn a_placement_carrying_a_backed_image_is_refused_and_a_plain_one_is_placed() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    if qemu_img(work.path(), &["--version"]).is_none() {
        return;
    }
    let stack = Stack::start(
        &binary,
        vec![
            SiteSpec::new("a").partner("b", 10),
            SiteSpec::new("b").partner("a", 0).host("b1", 4096),
        ],
    )
    .await;
    let store = stack.image_store("a");
    qemu_img(&store, &[BACKED, &["backed.qcow2", "1M"]].concat()).unwrap();
    qemu_img(
        &store,
        &["create", "-q", "-f", "qcow2", "plain.qcow2", "1M"],
    )
    .unwrap();
    let op_a = stack.operator("a").await;
    let deploy = |vm: &str, image: &str| {
        json!({
            "vm": vm,
            "name": "test VM",
            "hardware": {
                "vcpus": 1,
                "memory_mib": 256,
                "disks": [{"name": "vda", "capacity_bytes": 1048576, "format": "qcow2", "image": image}],
                "networks": [],
            },
        })
    };

    let r = ops(&op_a, "a", "deploy", deploy("backed-1", "backed.qcow2"))
        .await
        .unwrap();
    let m = wait_migration(&op_a, "a", r["migration"].as_str().unwrap()).await;
    // b's host agent refused to activate it ("disk image disk-vda.qcow2 is refused: the image
    // names a backing file"), the only offer: the placement ends aborted.
    assert_eq!(m["phase"], "aborted", "{m}");
    assert!(
        m["reason"].as_str().unwrap().contains("every offer failed"),
        "{m}"
    );
    let view = ops(&op_a, "a", "vms", json!({"vm": "backed-1"}))
        .await
        .unwrap();
    assert_eq!(view["vms"][0]["phase"], "unplaced", "{view}");
    // Nothing of it stays on b's host: the reservation and its files were released.
    let dir = stack.vm_root("b", "b1").join("backed-1");
    wait_until(
        Duration::from_secs(30),
        "the refused VM's files are gone",
        || {
            let dir = dir.clone();
            async move {
                if dir.exists() {
                    Err(format!("{} still exists", dir.display()))
                } else {
                    Ok(())
                }
            }
        },
    )
    .await
    .unwrap();

    let r = ops(&op_a, "a", "deploy", deploy("plain-1", "plain.qcow2"))
        .await
        .unwrap();
    let m = wait_migration(&op_a, "a", r["migration"].as_str().unwrap()).await;
    assert_eq!(m["phase"], "committed", "{m}");
    let q = ops(
        &op_a,
        "a",
        "control",
        json!({"vm": "plain-1", "change": {"kind": "query"}}),
    )
    .await
    .unwrap();
    assert_eq!(q["state"], "enabled", "{q}");
    stack.shutdown().await;
}

/// A broken-into host agent of site b: it answers `vm.reserve` with slots naming the site's
/// key file, and counts the reservations it is asked to give back.
async fn hostile_host_agent(
    stack: &mut Stack,
    key: std::path::PathBuf,
) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    use futures::StreamExt as _;
    use nubis_protocol::codec;
    use nubis_protocol::message::host::{ReleaseVm, ReserveVm, VmReleased, VmReserved};
    use nubis_protocol::message::{HostReply, HostResources, LocalFile};

    let nats = stack.fed.connect_as_host("b", "evil").await.unwrap();
    let mut requests = nats.subscribe("nubis.site.b.host.evil.>").await.unwrap();
    nats.flush().await.unwrap();
    let (seen, heard) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(m) = requests.next().await {
            let Some(reply) = m.reply.clone() else {
                continue;
            };
            let op = m
                .subject
                .as_str()
                .trim_start_matches("nubis.site.b.host.evil.");
            let body = match op {
                "vm.reserve" => {
                    let r: ReserveVm = codec::from_slice(&m.payload).unwrap();
                    let path = key.to_string_lossy().into_owned();
                    codec::to_vec(&HostReply::Ok(VmReserved {
                        vm: r.vm,
                        resources: HostResources::of(&r.descriptor),
                        slots: vec![
                            LocalFile {
                                name: "disk-vda.qcow2".into(),
                                path: path.clone(),
                            },
                            LocalFile {
                                name: "state.sav".into(),
                                path,
                            },
                        ],
                    }))
                }
                "vm.release" => {
                    let r: ReleaseVm = codec::from_slice(&m.payload).unwrap();
                    codec::to_vec(&HostReply::Ok(VmReleased {
                        vm: r.vm,
                        was_present: true,
                        freed: HostResources::default(),
                    }))
                }
                _ => codec::to_vec(&HostReply::<()>::Error(
                    nubis_protocol::message::ErrorReply::new(ErrorCode::Refused, "not served"),
                )),
            };
            let _ = seen.send(op.to_string());
            let _ = nats.publish(reply, body.unwrap().into()).await;
        }
    });
    heard
}

#[tokio::test]
async fn a_host_agent_naming_the_site_key_gets_no_token_and_an_honest_host_takes_the_vm() {
    use futures::StreamExt as _;
    let Some(binary) = require_nats_server() else {
        return;
    };
    let mut stack = Stack::start(
        &binary,
        vec![
            SiteSpec::new("a").partner("b", 10),
            SiteSpec::new("b")
                .partner("a", 0)
                .host("b1", 4096)
                // Listed first, so its answer is asked for first.
                .top("[[hosts]]\nid = \"evil\"\nvm_root = \"/var/lib/nubis-test/evil-vms\""),
        ],
    )
    .await;
    let key = stack.root().join("b.key");
    let key_text = key.to_string_lossy().into_owned();
    let mut heard = hostile_host_agent(&mut stack, key.clone()).await;
    // Every mint request of site b, as its proxy receives it.
    let observer = stack.fed.connect_site_internal("b").await.unwrap();
    let mut mints = observer.subscribe("nubis.proxy.b.p1.mint").await.unwrap();
    observer.flush().await.unwrap();

    std::fs::write(stack.image_store("a").join("img.qcow2"), vec![3u8; 40_000]).unwrap();
    let op_a = stack.operator("a").await;
    let body = json!({
        "vm": "evil-1",
        "name": "test VM",
        "hardware": {
            "vcpus": 1,
            "memory_mib": 256,
            "disks": [{"name": "vda", "capacity_bytes": 1048576, "format": "qcow2", "image": "img.qcow2"}],
            "networks": [],
        },
    });
    let r = ops(&op_a, "a", "deploy", body).await.unwrap();
    let m = wait_migration(&op_a, "a", r["migration"].as_str().unwrap()).await;
    // The honest host took the VM.
    assert_eq!(m["phase"], "committed", "{m}");
    assert!(stack
        .vm_root("b", "b1")
        .join("evil-1")
        .join("disk-vda.qcow2")
        .is_file());
    // The hostile one was asked, refused, and given its reservation back.
    assert_eq!(heard.recv().await.as_deref(), Some("vm.reserve"));
    assert_eq!(heard.recv().await.as_deref(), Some("vm.release"));
    // The hosts are asked one after the other, the hostile one first: had the site minted a
    // token for its answer, that mint would be the first. The first names b1's VM directory.
    let first = mints.next().await.unwrap();
    let payload = String::from_utf8_lossy(&first.payload).into_owned();
    let b1_dir = stack.vm_root("b", "b1").join("evil-1");
    assert!(payload.contains(&*b1_dir.to_string_lossy()), "{payload}");
    assert!(!payload.contains(&key_text), "{payload}");
    stack.shutdown().await;
}
