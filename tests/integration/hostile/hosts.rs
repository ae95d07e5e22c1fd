//! Inside one site: each host agent is its own NATS user, and the site accepts monitoring from a
//! host only for the VMs that host holds. A broken-into host can then neither speak for a VM of
//! another host (which the site would sign and send to the VM's primary) nor use another host's
//! intake subject.

use std::time::Duration;

use nubis_protocol::codec;
use nubis_protocol::descriptor::DataPoint;
use nubis_protocol::envelope::now_ms;
use nubis_protocol::message::{
    BatchPayload, BatchStored, ClearPayload, ErrorCode, HostReply, MonitoringBatch, ProducedBatch,
    ProducerId, Sample, Value,
};
use nubis_protocol::{SiteId, VmId};
use nubis_testkit::{require_nats_server, wait_until};
use serde_json::json;

use super::deploy_body;
use crate::stack::{ops, SiteSpec, Stack};

const LONG: Duration = Duration::from_secs(60);

/// A one-sample batch of `vm` (primary `a`) under `producer`.
fn produced(vm: &str, producer: &str, seq: u64) -> Vec<u8> {
    let dp = DataPoint::new("cpu.utilisation").unwrap();
    let t = now_ms();
    let batch = MonitoringBatch {
        vm: VmId::new(vm).unwrap(),
        primary_site: SiteId::new("a").unwrap(),
        producer: ProducerId::new(producer).unwrap(),
        epoch_ms: t,
        seq,
        payload: BatchPayload::Clear(ClearPayload {
            samples: vec![Sample {
                data_point: dp.clone(),
                ts_ms: t,
                value: Value::Float(0.5),
            }],
            ..ClearPayload::default()
        }),
    };
    codec::to_vec(&ProducedBatch {
        data_point: dp,
        batch,
    })
    .unwrap()
}

/// Sends `body` on host `host`'s intake as `client` and decodes the site's answer.
async fn intake(
    client: &async_nats::Client,
    host: &str,
    body: Vec<u8>,
) -> Result<HostReply<BatchStored>, String> {
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        client.request(format!("nubis.site.a.intake.{host}"), body.into()),
    )
    .await
    .map_err(|_| "timeout".to_string())?
    .map_err(|e| e.to_string())?;
    codec::from_slice(&answer.payload).map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_speaks_only_for_the_vms_it_holds() {
    let Some(binary) = require_nats_server() else {
        return;
    };
    let mut stack = Stack::start(
        &binary,
        vec![SiteSpec::new("a").host("h1", 4096).host("h2", 4096)],
    )
    .await;
    let op = stack.operator("a").await;
    std::fs::write(stack.image_store("a").join("img.qcow2"), b"disk").unwrap();
    ops(&op, "a", "deploy", deploy_body("vm-h", "img.qcow2"))
        .await
        .unwrap();
    let holder = wait_until(LONG, "vm-h placed on a host", || async {
        let v = ops(&op, "a", "vms", json!({"vm": "vm-h"})).await?;
        match (
            v["vms"][0]["phase"].as_str(),
            v["vms"][0]["next_hop"].as_str(),
        ) {
            (Some("placed"), Some(hop)) if hop.starts_with("host:") => {
                Ok(hop.trim_start_matches("host:").to_string())
            }
            _ => Err(v.to_string()),
        }
    })
    .await
    .unwrap();
    let other = if holder == "h1" { "h2" } else { "h1" };
    let holder_nats = stack.fed.connect_as_host("a", &holder).await.unwrap();
    let other_nats = stack.fed.connect_as_host("a", other).await.unwrap();

    // The other host claims the VM on its own intake: the site refuses, stores nothing.
    let forged = intake(
        &other_nats,
        other,
        produced("vm-h", "p-00000000000000bb", 1),
    )
    .await
    .unwrap();
    match forged {
        HostReply::Error(e) => {
            assert_eq!(e.code, ErrorCode::Refused, "{e:?}");
            assert!(e.message.contains(other), "{e:?}");
        }
        HostReply::Ok(stored) => panic!("a batch from {other} about vm-h was stored: {stored:?}"),
    }
    // It cannot use the holder's intake either: its server lets it publish on its own only.
    let through_holder = intake(
        &other_nats,
        &holder,
        produced("vm-h", "p-00000000000000bb", 2),
    )
    .await;
    assert!(through_holder.is_err(), "{through_holder:?}");

    // The holder speaks for its VM, under a new Producer as well as under the agent's own.
    let genuine = intake(
        &holder_nats,
        &holder,
        produced("vm-h", "p-00000000000000aa", 1),
    )
    .await
    .unwrap();
    match genuine {
        HostReply::Ok(stored) => {
            assert_eq!(stored.producer.as_str(), "p-00000000000000aa");
            assert!(!stored.duplicate);
        }
        HostReply::Error(e) => panic!("the holder's batch was refused: {e:?}"),
    }
    // Nor can the other host take over the Producer the holder registered for the VM.
    let taken = intake(
        &other_nats,
        other,
        produced("vm-h", "p-00000000000000aa", 2),
    )
    .await
    .unwrap();
    assert!(
        matches!(&taken, HostReply::Error(e) if e.code == ErrorCode::Refused),
        "{taken:?}"
    );
    // A VM the site does not hold at all is unknown, whoever asks.
    let unknown = intake(
        &holder_nats,
        &holder,
        produced("vm-nowhere", "p-00000000000000aa", 3),
    )
    .await
    .unwrap();
    assert!(
        matches!(&unknown, HostReply::Error(e) if e.code == ErrorCode::UnknownVm),
        "{unknown:?}"
    );
    stack.shutdown().await;
}
