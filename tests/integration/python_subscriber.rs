//! The Python subscriber example (`examples/python/subscriber.py`) against a real nats-server:
//! proof that `subjects.md` is enough to verify, decode and open monitoring batches in another
//! language. Rust publishes a clear batch, a sealed batch and a forged one; the script must
//! print the clear values, open the sealed batch with the primary's key file, and reject the
//! forgery.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use nubis_protocol::codec;
use nubis_protocol::descriptor::{Aggregate, DataPoint};
use nubis_protocol::envelope::{self, now_ms, Addressing};
use nubis_protocol::identity::SiteIdentity;
use nubis_protocol::message::{
    BatchPayload, ClearPayload, EncryptedKpi, MonitoringBatch, ProcessedValue, ProducerId, Sample,
    Value,
};
use nubis_protocol::subject::Subject;
use nubis_protocol::{seal, SiteId, VmId};
use nubis_testkit::{require_nats_server, skip_or_fail, Federation, Role};
use serde_json::Value as Json;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::ChildStdout;

fn script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python/subscriber.py")
}

/// Whether `python3` with the example's packages is available.
fn python_ready() -> Result<(), String> {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import nacl.public, nacl.signing, msgpack, nats, tomllib",
        ])
        .output()
        .map_err(|e| format!("python3 cannot be started: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "python3 lacks PyNaCl, msgpack or nats-py (run scripts/setup.d/15-python.sh): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The next line the script prints, as JSON; `None` if it printed nothing for 60 s or exited.
async fn next_json(lines: &mut Lines<BufReader<ChildStdout>>) -> Option<Json> {
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .ok()?
        .ok()??;
    Some(serde_json::from_str::<Json>(&line).unwrap_or_else(|e| panic!("{e}: {line}")))
}

/// The next `n` lines the script prints, as JSON; fails with what the script wrote to stderr
/// if it prints fewer.
async fn next_events(
    lines: &mut Lines<BufReader<ChildStdout>>,
    child: &mut tokio::process::Child,
    n: usize,
) -> Vec<Json> {
    let mut events = Vec::new();
    while events.len() < n {
        match next_json(lines).await {
            Some(event) => events.push(event),
            None => {
                let _ = child.start_kill();
                let stderr = stderr_of(child).await;
                panic!(
                    "the subscriber printed {events:?} and then nothing for 60 s; stderr: {stderr}"
                );
            }
        }
    }
    events
}

/// What the script wrote to stderr, once it has exited (or was killed).
async fn stderr_of(child: &mut tokio::process::Child) -> String {
    use tokio::io::AsyncReadExt;
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        if let Err(err) = e.read_to_string(&mut stderr).await {
            stderr.push_str(&format!("<stderr unreadable: {err}>"));
        }
    }
    stderr
}

fn batch(primary: &SiteId, vm: &VmId, seq: u64, payload: BatchPayload) -> MonitoringBatch {
    MonitoringBatch {
        vm: vm.clone(),
        primary_site: primary.clone(),
        producer: ProducerId::new("p-7f3a").unwrap(),
        epoch_ms: 1_767_225_000_000,
        seq,
        payload,
    }
}

#[tokio::test]
async fn python_subscriber_verifies_decodes_and_opens_batches() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    if let Err(reason) = python_ready() {
        return skip_or_fail(reason).unwrap_or(());
    }
    let fed = Federation::start_with(&binary, &["a"]).await.unwrap();
    let url = fed.site_url("a").unwrap();
    // The batches come from the site (which signs what its host agents produce); the script
    // watches as one of the site's operators.
    let client = fed.connect_as("a", Role::Site).await.unwrap();
    let (user, password) = fed.credentials("a", Role::Operator).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let a = SiteId::new("a").unwrap();
    let identity = SiteIdentity::generate(a.clone());
    let key_file = dir.path().join("a.key");
    identity.save(&key_file, false).unwrap();

    let mut child = tokio::process::Command::new("python3")
        .arg(script())
        .args(["--server", &url, "--primary", "a", "--user", &user])
        .env("NUBIS_NATS_PASSWORD", &password)
        .arg("--key")
        .arg(&key_file)
        .args(["--count", "3", "--timeout", "60", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();

    // Publish only once the script has subscribed.
    let ready = next_events(&mut lines, &mut child, 1).await.remove(0);
    assert_eq!(ready["event"], "subscribed");
    assert_eq!(ready["subject"], "nubis.mon.a.>");

    let vm = VmId::new("vm-1").unwrap();
    let cpu = DataPoint::new("cpu.utilisation").unwrap();
    let subject = Subject::monitoring(&a, &vm, &cpu).to_string();
    let clear = ClearPayload {
        samples: vec![
            Sample {
                data_point: cpu.clone(),
                ts_ms: 1_767_225_300_000,
                value: Value::Float(0.37),
            },
            Sample {
                data_point: cpu.clone(),
                ts_ms: 1_767_225_301_000,
                value: Value::Int(42),
            },
        ],
        processed: vec![ProcessedValue {
            data_point: cpu.clone(),
            aggregate: Aggregate::Median,
            window_start_ms: 1_767_225_290_000,
            window_end_ms: 1_767_225_300_000,
            value: 0.25,
            count: 10,
        }],
        encrypted_kpi: vec![],
    };
    let env = envelope::sign(
        &identity,
        Addressing::broadcast(&subject),
        &batch(&a, &vm, 0, BatchPayload::Clear(clear)),
        now_ms(),
    )
    .unwrap();
    client
        .publish(subject.clone(), env.encode().unwrap().into())
        .await
        .unwrap();

    // A sealed KPI batch: only the holder of a's sealing key can read it.
    let kpi = DataPoint::new("kpi.web.current_users").unwrap();
    let kpi_subject = Subject::monitoring(&a, &vm, &kpi).to_string();
    let secret = ClearPayload {
        samples: vec![Sample {
            data_point: kpi.clone(),
            ts_ms: 1_767_225_302_000,
            value: Value::Text("1234 users".into()),
        }],
        processed: vec![],
        encrypted_kpi: vec![EncryptedKpi {
            table: "web".into(),
            ts_ms: 1_767_225_302_500,
            blob: vec![7; 60],
        }],
    };
    let plain = codec::to_vec(&secret).unwrap();
    let ciphertext = seal::seal(&identity.public().sealing, &plain).unwrap();
    assert!(!ciphertext.windows(10).any(|w| w == b"1234 users"));
    let env = envelope::sign(
        &identity,
        Addressing::broadcast(&kpi_subject),
        &batch(&a, &vm, 1, BatchPayload::Sealed { ciphertext }),
        now_ms(),
    )
    .unwrap();
    client
        .publish(kpi_subject.clone(), env.encode().unwrap().into())
        .await
        .unwrap();

    // A forgery: an impostor claims to be site a, with a key nobody pinned.
    let impostor = SiteIdentity::generate(a.clone());
    let forged_clear = ClearPayload {
        samples: vec![Sample {
            data_point: cpu.clone(),
            ts_ms: 1_767_225_303_000,
            value: Value::Float(99.0),
        }],
        ..ClearPayload::default()
    };
    let env = envelope::sign(
        &impostor,
        Addressing::broadcast(&subject),
        &batch(&a, &vm, 2, BatchPayload::Clear(forged_clear)),
        now_ms(),
    )
    .unwrap();
    client
        .publish(subject.clone(), env.encode().unwrap().into())
        .await
        .unwrap();
    client.flush().await.unwrap();

    // Each of the three messages is printed once, whatever order the script saw them in.
    let events = next_events(&mut lines, &mut child, 3).await;
    let find = |what: &dyn Fn(&Json) -> bool| -> Json {
        let found: Vec<&Json> = events.iter().filter(|e| what(e)).collect();
        assert_eq!(found.len(), 1, "{events:?}");
        found[0].clone()
    };
    let first = find(&|e| e["event"] == "batch" && e["seq"] == 0);
    let second = find(&|e| e["event"] == "batch" && e["seq"] == 1);
    let third = find(&|e| e["event"] == "rejected");
    assert_eq!(first["subject"], subject.as_str());
    assert_eq!(first["from"], "a");
    assert_eq!(first["vm"], "vm-1");
    assert_eq!(first["producer"], "p-7f3a");
    assert_eq!(first["seq"], 0);
    assert_eq!(first["sealed"], false);
    let samples = first["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 2);
    assert_eq!(samples[0]["data_point"], "cpu.utilisation");
    assert_eq!(samples[0]["ts_ms"], 1_767_225_300_000_u64);
    assert_eq!(samples[0]["value"], 0.37);
    assert_eq!(samples[1]["value"], 42);
    let processed = &first["processed"][0];
    assert_eq!(processed["aggregate"], "median");
    assert_eq!(processed["value"], 0.25);
    assert_eq!(processed["count"], 10);
    assert_eq!(processed["window_start_ms"], 1_767_225_290_000_u64);

    assert_eq!(second["subject"], kpi_subject.as_str());
    assert_eq!(second["seq"], 1);
    assert_eq!(second["sealed"], true);
    assert_eq!(second["opened"], true);
    assert_eq!(second["samples"][0]["data_point"], "kpi.web.current_users");
    assert_eq!(second["samples"][0]["value"], "1234 users");
    assert_eq!(second["encrypted_kpi"][0]["table"], "web");
    assert_eq!(second["encrypted_kpi"][0]["bytes"], 60);

    assert_eq!(third["reason"], "bad_signature");
    assert_eq!(third["subject"], subject.as_str());

    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the subscriber did not exit after --count messages")
        .unwrap();
    if !status.success() {
        let stderr = stderr_of(&mut child).await;
        panic!("subscriber exited with {status}: {stderr}");
    }
}
