//! Integration test: a federation brought up from the output of `nubis federation init` alone,
//! as an operator would — three clustered hub nodes, three sites, every server and daemon a
//! process started with the generated files — then a VM deployed and migrated across sites
//! with the `nubis` CLI. Beside it, the refusals: init does not write over an existing
//! deployment, and one site's generated operator password is worth nothing at another site.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nubis_testkit::monitor::meta_group;
use nubis_testkit::{require_nats_server, wait_until, NatsServerBinary, DEFAULT_TIMEOUT};

const SITES: [&str; 3] = ["a", "b", "c"];
const HUB_NODES: usize = 3;

/// How long a clustered hub may take to form its meta group before a node left out is
/// restarted, as `deploy/OPERATIONS.md` tells an operator to do.
const MEMBERSHIP_GRACE: Duration = Duration::from_secs(8);

/// The `nubis` CLI, built beside the test binaries.
fn nubis_cli() -> PathBuf {
    let cli = Path::new(env!("CARGO_BIN_EXE_nubis-test-site")).with_file_name("nubis");
    assert!(
        cli.exists(),
        "{} is missing: build it with `cargo build -p nubis-cli`",
        cli.display()
    );
    cli
}

/// Runs the CLI with `args`; returns its exit code and its stdout and stderr together.
async fn nubis(args: &[&str]) -> (i32, String) {
    let out = tokio::process::Command::new(nubis_cli())
        .args(args)
        .env_remove("NUBIS_SITE")
        .env_remove("NUBIS_NATS_URL")
        .output()
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// Every process the test started, killed when it ends (passing or not); a failing test
/// prints the end of every process's log.
#[derive(Default)]
struct Processes {
    running: Vec<(String, Child)>,
    logs: Vec<PathBuf>,
}

impl Processes {
    fn spawn(&mut self, name: &str, program: &Path, args: &[&str], log: &Path) {
        self.logs.push(log.to_owned());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.running.push((name.to_owned(), child));
    }

    fn kill(&mut self, name: &str) {
        if let Some(i) = self.running.iter().position(|(n, _)| n == name) {
            let (_, mut child) = self.running.remove(i);
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for (_, child) in &mut self.running {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            for log in &self.logs {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                eprintln!("--- {} (last 30 lines)", log.display());
                for line in &lines[lines.len().saturating_sub(30)..] {
                    eprintln!("{line}");
                }
            }
        }
    }
}

/// A base port below the kernel's ephemeral range (where the other tests' servers and every
/// client's ports come from) whose 130 ports are free now.
fn free_port_base() -> u16 {
    let start = 20_000 + (std::process::id() % 500) as u16 * 20;
    (0..50)
        .map(|i| 20_000 + (start - 20_000 + i * 130) % 10_000)
        .find(|base| (0..130).all(|p| std::net::TcpListener::bind(("127.0.0.1", base + p)).is_ok()))
        .expect("a free range of 130 ports")
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Starts the hub's nodes from their generated files and waits until the leader of the
/// JetStream meta group counts all three; a node left out of the group when it formed is
/// restarted once (`deploy/OPERATIONS.md`, "Generate a federation").
async fn start_hub(procs: &mut Processes, server: &NatsServerBinary, out: &Path, base: u16) {
    let nodes: Vec<(String, u16)> = (0..HUB_NODES)
        .map(|i| (format!("hub-{}", i + 1), base + 10 * i as u16 + 1))
        .collect();
    let names: Vec<String> = nodes.iter().map(|(n, _)| n.clone()).collect();
    let spawn_node = |procs: &mut Processes, name: &str| {
        let conf = out.join(name).join("nats-server.conf");
        procs.spawn(
            name,
            server.path(),
            &["-c", conf.to_str().unwrap()],
            &out.join(format!("{name}.log")),
        );
    };
    for name in &names {
        spawn_node(procs, name);
    }
    let started = std::time::Instant::now();
    let mut healed = false;
    loop {
        let group = meta_group(&nodes).await;
        match group {
            Ok(group) if group.counts_all_current(&names) => return,
            Ok(group) if !healed && started.elapsed() >= MEMBERSHIP_GRACE => {
                healed = true;
                for name in group.left_out(&names) {
                    procs.kill(&name);
                    spawn_node(procs, &name);
                }
            }
            other => {
                assert!(
                    started.elapsed() < DEFAULT_TIMEOUT,
                    "the hub's meta group never counted every node: {other:?}"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federation_comes_up_from_the_generated_deployment_alone() {
    let Some(server) = require_nats_server() else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("federation");
    let out_s = out.to_str().unwrap().to_owned();
    let base = free_port_base();
    let base_s = base.to_string();
    let mut init: Vec<&str> = vec!["federation", "init", "--out", &out_s];
    for _ in 0..HUB_NODES {
        init.extend(["--hub", "127.0.0.1"]);
    }
    for site in SITES {
        init.extend(["--site", site]);
    }
    init.extend([
        "--listen",
        "127.0.0.1",
        "--port-base",
        &base_s,
        "--libvirt-uri",
        "test:///default",
        "--accelerator",
        "tcg",
    ]);
    let (code, text) = nubis(&init).await;
    assert_eq!(code, 0, "init failed: {text}");

    // Nothing is left to fill in, and every secret is readable by its owner only.
    let generated = files(&out);
    for file in &generated {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let secret = name.ends_with(".nats-password")
            || name.ends_with(".key")
            || name == "key.pem"
            || name == "ca-key.pem"
            || name == "nats-server.conf";
        let mode = std::fs::metadata(file).unwrap().permissions().mode() & 0o777;
        if secret {
            assert_eq!(mode, 0o600, "{} has mode {mode:o}", file.display());
        }
        if name.ends_with(".conf") || name.ends_with(".toml") {
            let text = std::fs::read_to_string(file).unwrap();
            assert!(
                !text.contains("{{") && !text.contains("CHANGE-ME") && !text.contains("PASTE-"),
                "{} has a placeholder left",
                file.display()
            );
        }
    }

    // The refusal beside it: a second init does not write over the first.
    let before = std::fs::read(out.join("a/site.toml")).unwrap();
    let (code, text) = nubis(&init).await;
    assert_eq!(code, 2, "a second init into the same directory: {text}");
    assert!(text.contains("is not empty"), "{text}");
    assert_eq!(std::fs::read(out.join("a/site.toml")).unwrap(), before);

    let mut procs = Processes::default();
    start_hub(&mut procs, &server, &out, base).await;
    let hub_url = format!("nats://127.0.0.1:{base}");
    let (code, text) = nubis(&[
        "federation",
        "directory",
        "--nats-url",
        &hub_url,
        "--password-file",
        &format!("{out_s}/hub-1/operator.nats-password"),
        "--config",
        &format!("{out_s}/hub-1/directory-bucket.json"),
    ])
    .await;
    assert_eq!(code, 0, "directory: {text}");
    assert!(text.contains("3 replica(s)"), "{text}");

    let cli = nubis_cli();
    for site in SITES {
        let dir = out.join(site);
        let conf = dir.join("nats-server.conf");
        procs.spawn(
            &format!("{site}-server"),
            server.path(),
            &["-c", conf.to_str().unwrap()],
            &work.path().join(format!("{site}-server.log")),
        );
    }
    // As the units' ordering does (`nubis-site@` after `nats-site@`): a daemon whose server
    // refuses its first connection stops, for systemd to start again.
    for k in 0..SITES.len() as u16 {
        let http = base + 100 + 10 * k + 1;
        wait_until(DEFAULT_TIMEOUT, format!("site server {k} healthy"), || {
            nubis_testkit::monitor::get_json(http, "/healthz")
        })
        .await
        .unwrap();
    }
    for site in SITES {
        let dir = out.join(site);
        for (role, file) in [
            ("site", "site.toml"),
            ("proxy", "proxy.toml"),
            ("host", "host-h1.toml"),
        ] {
            procs.spawn(
                &format!("{site}-{role}"),
                &cli,
                &[role, "--config", dir.join(file).to_str().unwrap()],
                &work.path().join(format!("{site}-{role}.log")),
            );
        }
    }

    let site_url = |k: u16| format!("nats://127.0.0.1:{}", base + 100 + 10 * k);
    let password = |site: &str| format!("{out_s}/{site}/operator.nats-password");
    let as_operator = |site: &'static str, k: u16| {
        let url = site_url(k);
        let pw = password(site);
        move |args: &[&str]| {
            let mut all: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
            all.extend(
                [
                    "--site",
                    site,
                    "--nats-url",
                    &url,
                    "--user",
                    "operator",
                    "--password-file",
                    &pw,
                    "--timeout",
                    "10",
                ]
                .map(str::to_owned),
            );
            async move {
                let refs: Vec<&str> = all.iter().map(String::as_str).collect();
                nubis(&refs).await
            }
        }
    };
    let at_a = as_operator("a", 0);
    let at_b = as_operator("b", 1);

    wait_until(
        DEFAULT_TIMEOUT,
        "a to see b and c trusted and reachable",
        || {
            let call = at_a(&["sites", "--json"]);
            async move {
                let (code, text) = call.await;
                let reachable = text.matches("\"reachable\":true").count();
                if code == 0 && reachable >= 2 {
                    Ok(())
                } else {
                    Err(format!("exit {code}: {text}"))
                }
            }
        },
    )
    .await
    .unwrap();

    let image = work.path().join("disk.img");
    std::fs::write(&image, vec![7u8; 1 << 20]).unwrap();
    let (code, text) = at_a(&[
        "image",
        "put",
        image.to_str().unwrap(),
        "--name",
        "disk.img",
    ])
    .await;
    assert_eq!(code, 0, "image put: {text}");
    let vm = work.path().join("vm.toml");
    std::fs::write(
        &vm,
        "vm = \"vm-1\"\n[hardware]\nvcpus = 1\nmemory_mib = 256\n\n[[hardware.disks]]\nname = \"vda\"\n\
         capacity_bytes = 1048576\nformat = \"raw\"\nimage = \"disk.img\"\n",
    )
    .unwrap();
    let (code, text) = at_a(&["vm", "deploy", vm.to_str().unwrap()]).await;
    assert_eq!(code, 0, "deploy: {text}");
    assert!(text.contains("committed"), "{text}");
    let (code, text) = at_a(&["vm", "migrate", "vm-1", "--to-site", "b"]).await;
    assert_eq!(code, 0, "migrate: {text}");
    assert!(text.contains("committed"), "{text}");

    let (code, text) = at_a(&["vm", "list", "--json"]).await;
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("\"next_hop\":\"site:b\""), "{text}");
    let (code, text) = at_b(&["vm", "list", "--json"]).await;
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("\"next_hop\":\"host:h1\""), "{text}");

    // Each site's server has passwords of its own: a's operator password does not open b.
    let (code, text) = nubis(&[
        "vm",
        "list",
        "--site",
        "b",
        "--nats-url",
        &site_url(1),
        "--user",
        "operator",
        "--password-file",
        &password("a"),
    ])
    .await;
    assert_ne!(code, 0, "a's operator password was accepted at b: {text}");
    assert!(text.to_lowercase().contains("authorization"), "{text}");
}
