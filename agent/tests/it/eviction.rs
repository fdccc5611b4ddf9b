//! The byte cap: eviction of the oldest records and the ledger that accounts for them.

use ember_testkit::{ALL_TOPICS, Subscriber, TestBroker, restart_broker};

use crate::common::*;

const CAP: u64 = 65_536;

/// The broker is down until a small queue (64 KiB) has evicted thousands of records, then
/// comes back. Everything reconciles exactly: captured = delivered (unique seqs at the
/// subscriber) + evicted + still queued, and the evicted ranges in the final status are
/// exactly the seqs the subscriber never got.
#[test]
fn byte_cap_evicts_oldest_and_counters_reconcile() {
    let mut broker = TestBroker::start();
    let sub = Subscriber::start(broker.port(), ALL_TOPICS);
    broker.stop();
    let dev = "cap-1";
    let agent = agent(dev, broker.port())
        .sim("imu", 5000.0, 6)
        .max_bytes(CAP)
        .start();
    agent.expect_metric(
        "records_evicted_total{reason=\"bytes\"}",
        |v| v >= 5000.0,
        LONG,
    );
    // Offline nothing is in flight, so the cap holds exactly.
    let m = agent.metrics();
    assert!(
        m["queue_bytes"] <= CAP as f64,
        "queue_bytes {} over the cap",
        m["queue_bytes"]
    );
    assert_eq!(m["records_in_flight"], 0.0);

    restart_broker(&mut broker, &sub, &agent, SHORT);
    agent.expect_metric("connected", |v| v == 1.0, SHORT);
    let evicted_offline = m["records_evicted_total{reason=\"bytes\"}"] as u64;
    // Live records flow again after the backlog.
    wait_highest_above(&sub, dev, "imu", evicted_offline + 5000, LONG);

    // Read the books only once nothing moves any more: after a graceful stop (the broker is up,
    // so the drain empties the queue), from the final status, whose counters and ledger are
    // taken after the last append and the last PUBACK.
    stop_gracefully(&agent, SHORT);
    let fin = final_status(&sub, dev);
    let c = fin.counters.clone().expect("counters");
    let st = stream_status(&fin, "imu");
    let queued = fin.queue.as_ref().expect("queue gauge").records;
    assert_eq!(
        queued, 0,
        "a graceful stop with the broker up drains the queue"
    );
    assert_eq!(st.queued, 0);
    let evicted = c.evicted_bytes + c.evicted_age + c.evicted_disk;
    assert!(c.evicted_bytes >= 5000, "{c:?}");
    assert_eq!(
        c.captured, st.last_seq,
        "one stream, one process: every captured sample got a seq"
    );
    let expect_delivered = c.captured - evicted - queued;
    let arrived = sub.wait_for(|v| v.unique(dev, "imu") >= expect_delivered, LONG);
    assert!(
        arrived,
        "expected {expect_delivered} delivered; {}",
        progress(&sub, dev, "imu")
    );

    let view = sub.snapshot();
    assert_clean_delivery(&view);
    let log = view.stream(dev, "imu").expect("imu");
    let delivered = log.unique();
    println!(
        "captured {} = delivered {delivered} + evicted {evicted} + queued {queued}",
        c.captured
    );
    assert_eq!(c.captured, delivered + evicted + queued, "{c:?}");
    assert_eq!(log.beyond(st.last_seq), 0);

    // The ledger: the ranges the agent reports as evicted are exactly what is missing.
    assert!(
        st.evicted.len() < 32,
        "the evicted-range list is bounded at 32 and may have dropped some: {:?}",
        st.evicted
    );
    assert!(
        st.evicted.iter().all(|r| r.reason == "bytes"),
        "{:?}",
        st.evicted
    );
    let reported = merge(st.evicted.iter().map(|r| (r.from, r.to)));
    let missing = missing_ranges(log, st.last_seq);
    assert_eq!(missing, reported, "missing seqs vs evicted ranges");
    let reported_count: u64 = reported.iter().map(|(a, b)| b - a + 1).sum();
    assert_eq!(reported_count, evicted);
    // Oldest first: the first eviction starts at seq 1.
    assert_eq!(reported.first().map(|r| r.0), Some(1));
    assert_no_panic(&agent);
}
