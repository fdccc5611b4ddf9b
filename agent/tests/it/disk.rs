//! Disk space: a drained backlog gives its space back.

use ember_testkit::{ALL_TOPICS, Subscriber, TestBroker, restart_broker};

use crate::common::*;

/// Records in the backlog.
const N: u64 = 300_000;

/// With the broker down, a few hundred thousand records pile up in the queue and sled's files
/// grow. Once the broker is back and the backlog drained, the queue compacts and
/// `queue_disk_bytes` falls far below its peak. The backlog is a replay (`loop = false`) so
/// that its stream really ends and drains to zero; a slow live stream runs beside it, as on a
/// real device, and because the writer task, which runs housekeeping and so compaction, ends
/// once every source has finished.
#[test]
fn drained_backlog_gives_disk_space_back() {
    let mut broker = TestBroker::start();
    let sub = Subscriber::start(broker.port(), ALL_TOPICS);
    broker.stop();
    let files = tempfile::tempdir().expect("tempdir");
    let csv = files.path().join("backlog.csv");
    write_csv(&csv, N, 4);
    let dev = "disk-1";
    let agent = agent(dev, broker.port())
        .replay_csv("bulk", &csv, 100_000.0)
        .sim("live", 10.0, 2)
        .fsync("never")
        .queue("reclaim_bytes", &(4u64 << 20).to_string())
        .start();
    agent.expect_metric("records_enqueued_total", |v| v >= N as f64, LONG);
    let live = agent.metric("queue_bytes");
    // `queue_disk_bytes` is refreshed by housekeeping about once a second: wait until it has
    // seen the whole backlog.
    let peak = agent.expect_metric("queue_disk_bytes", |v| v >= live, LONG);
    println!("backlog: {N} records, {live} bytes of records, {peak} bytes on disk");

    restart_broker(&mut broker, &sub, &agent, SHORT);
    assert!(
        sub.wait_for(|v| v.unique(dev, "bulk") >= N, LONG),
        "backlog not delivered: {}",
        progress(&sub, dev, "bulk")
    );
    // Only the live stream's last few records may still be queued.
    agent.expect_metric("queue_records", |v| v < 100.0, LONG);
    let after = agent.expect_metric("queue_disk_bytes", |v| v < peak / 4.0, LONG);
    println!("after the drain: {after} bytes on disk (peak {peak})");
    assert!(
        agent
            .last_run_stderr()
            .contains("Compacted the queue database"),
        "{}",
        agent.last_run_stderr()
    );

    stop_gracefully(&agent, SHORT);
    let fin = final_status(&sub, dev);
    wait_all_delivered(
        &sub,
        dev,
        "live",
        stream_status(&fin, "live").last_seq,
        SHORT,
    );
    let view = sub.snapshot();
    assert_clean_delivery(&view);
    assert!(view.stream(dev, "bulk").expect("bulk").is_exactly(N));
    assert_no_panic(&agent);
}
