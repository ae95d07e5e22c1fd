use super::tests_support::*;
use super::*;
use nubis_protocol::message::{BatchStored, ErrorCode, ErrorReply};

fn stored(m: &Monitor, key: u64) -> BatchStored {
    let out = &m.outbox[&key];
    BatchStored {
        producer: out.producer.clone(),
        epoch_ms: out.epoch_ms,
        seq: out.seq,
        duplicate: false,
    }
}

#[test]
fn outbox_keeps_order_drops_oldest_when_full_and_counts() {
    let (mut m, vm) = monitor_with_vm(3);
    m.enqueue(&vm, deliveries(5));
    assert_eq!(m.counters.dropped, 2);
    let seqs: Vec<u64> = m.outbox.values().map(|o| o.seq).collect();
    assert_eq!(
        seqs,
        vec![2, 3, 4],
        "the oldest went, sequence numbers have no gaps"
    );
    let unacked: Vec<u64> = m.vms[&vm].unacked.iter().copied().collect();
    assert_eq!(unacked, vec![2, 3, 4]);
    let first = *m.outbox.keys().next().unwrap();
    let producer = m.outbox[&first].producer.clone();
    m.busy.insert(producer.clone());
    m.on_sent(first, &producer, Ok(stored(&m, first)));
    assert_eq!(m.counters.acknowledged, 1);
    assert!(!m.busy.contains(&producer));
    assert_eq!(m.outbox.len(), 2);
    assert_eq!(m.vms[&vm].unacked.first(), Some(&3));
}

#[test]
fn failures_keep_the_batch_and_back_off_refusals_drop_it() {
    let (mut m, vm) = monitor_with_vm(10);
    m.enqueue(&vm, deliveries(2));
    let keys: Vec<u64> = m.outbox.keys().copied().collect();
    let producer = m.outbox[&keys[0]].producer.clone();
    m.on_sent(keys[0], &producer, Err(SendError::Timeout));
    assert_eq!(m.outbox[&keys[0]].attempts, 1);
    assert!(m.retry_at.is_some());
    assert_eq!(m.backoff, BACKOFF_MIN * 2);
    m.on_sent(keys[0], &producer, Err(SendError::Timeout));
    assert_eq!(m.backoff, BACKOFF_MIN * 4);
    assert_eq!(
        m.outbox.len(),
        2,
        "nothing is lost while the site does not answer"
    );
    let refused = SendError::Refused(ErrorReply::new(ErrorCode::Malformed, "bad"));
    m.on_sent(keys[1], &producer, Err(refused));
    assert_eq!(m.counters.dropped, 1);
    assert_eq!(m.outbox.len(), 1);
    m.on_sent(keys[0], &producer, Ok(stored(&m, keys[0])));
    assert!(m.outbox.is_empty());
    assert_eq!(m.backoff, BACKOFF_MIN, "success resets the back-off");
    assert!(m.vms[&vm].unacked.is_empty());
    // An acknowledgement for a batch already dropped changes nothing.
    m.on_sent(
        keys[1],
        &producer,
        Ok(BatchStored {
            producer: producer.clone(),
            epoch_ms: 0,
            seq: 1,
            duplicate: true,
        }),
    );
    assert_eq!(m.counters.acknowledged, 2);
}

#[test]
fn queries_skip_statistics_of_vms_not_due() {
    let (m, vm) = monitor_with_vm(10);
    // The specifier measures every 1000 ms and has measured nothing yet.
    assert!(!m.query(0).skip_stats.contains(&vm));
    assert_eq!(m.query(0).known.get(&vm), Some(&1));
}
