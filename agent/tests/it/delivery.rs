//! End-to-end delivery: volume, order, a broker outage, the CBOR encoding.

use ember_testkit::{ALL_TOPICS, Subscriber, TestBroker, restart_broker};

use crate::common::*;

/// 100,000 replayed records plus a live simulated stream arrive exactly once each, gap-free
/// and in order per stream, with the right values; the agent's counters agree.
#[test]
fn hundred_thousand_records_arrive_gap_free_and_in_order() {
    const N: u64 = 100_000;
    const CH: usize = 4;
    let broker = TestBroker::start();
    let sub = Subscriber::start_keeping_values(broker.port(), ALL_TOPICS);
    let files = tempfile::tempdir().expect("tempdir");
    let csv = files.path().join("rows.csv");
    write_csv(&csv, N, CH);
    let dev = "bulk-1";
    let agent = agent(dev, broker.port())
        .replay_csv("replay", &csv, 50_000.0)
        .sim("live", 200.0, 3)
        .start();

    assert!(
        sub.wait_for(|v| v.unique(dev, "replay") >= N, LONG),
        "replay not delivered: {}",
        progress(&sub, dev, "replay")
    );
    let live_seen = highest(&sub, dev, "live");
    wait_highest_above(&sub, dev, "live", live_seen, SHORT);
    stop_gracefully(&agent, SHORT);
    let fin = final_status(&sub, dev);
    let replay_last = stream_status(&fin, "replay").last_seq;
    let live_last = stream_status(&fin, "live").last_seq;
    assert_eq!(replay_last, N, "every CSV row becomes one record");
    wait_all_delivered(&sub, dev, "live", live_last, SHORT);

    let view = sub.snapshot();
    assert_clean_delivery(&view);
    for (stream, last) in [("replay", N), ("live", live_last)] {
        let log = view.stream(dev, stream).expect("stream received");
        assert!(
            log.is_exactly(last),
            "{stream}: expected exactly 1..={last}, missing {:?}",
            log.missing(last)
        );
        assert_eq!(
            log.duplicates, 0,
            "{stream}: the broker never went away, so nothing should be re-sent"
        );
    }
    // Record k carries row k-1: nothing was reordered or mixed up between records.
    let replay = view.stream(dev, "replay").expect("replay received");
    for (seq, r) in &replay.records {
        assert_eq!(
            r.values.as_deref(),
            Some(csv_row(seq - 1, CH).as_slice()),
            "values of replay record {seq}"
        );
    }
    let c = fin.counters.expect("final status has counters");
    assert_eq!(c.enqueued, N + live_last, "{c:?}");
    assert_eq!(c.captured, c.enqueued, "{c:?}");
    assert_eq!(
        c.acked, c.enqueued,
        "everything enqueued was acknowledged: {c:?}"
    );
    assert_eq!(fin.queue.expect("queue gauge").records, 0);
    assert_no_panic(&agent);
}

/// The broker goes away for ~10 s of data (20,000 records at 2 kHz) and comes back on the same
/// port: after a graceful stop the subscriber holds every seq the agent ever assigned.
#[test]
fn broker_outage_loses_nothing() {
    let mut broker = TestBroker::start();
    let sub = Subscriber::start(broker.port(), ALL_TOPICS);
    let dev = "outage-1";
    let agent = agent(dev, broker.port()).sim("imu", 2000.0, 6).start();
    assert!(
        sub.wait_for(|v| v.unique(dev, "imu") >= 1000, SHORT),
        "{}",
        progress(&sub, dev, "imu")
    );

    broker.stop();
    agent.expect_metric("connected", |v| v == 0.0, SHORT);
    // The outage lasts as long as 10 s of samples take to pile up (measured, not slept).
    agent.expect_metric("queue_records", |v| v >= 20_000.0, LONG);
    let before_restart = highest(&sub, dev, "imu");
    restart_broker(&mut broker, &sub, &agent, SHORT);
    agent.expect_metric("reconnects_total", |v| v >= 1.0, SHORT);
    agent.expect_metric("queue_records", |v| v < 2_000.0, LONG);
    wait_highest_above(&sub, dev, "imu", before_restart + 20_000, LONG);

    stop_gracefully(&agent, SHORT);
    let fin = final_status(&sub, dev);
    let last = stream_status(&fin, "imu").last_seq;
    assert!(last > before_restart + 20_000, "last_seq {last}");
    wait_all_delivered(&sub, dev, "imu", last, LONG);
    let view = sub.snapshot();
    assert_clean_delivery(&view);
    let log = view.stream(dev, "imu").expect("imu");
    assert_eq!(log.beyond(last), 0, "no seq beyond the final last_seq");
    println!(
        "broker outage: {last} records, {} duplicates re-sent after the reconnect",
        log.duplicates
    );
    assert!(fin.counters.expect("counters").reconnects >= 1);
    assert_no_panic(&agent);
}

/// With `mqtt.encoding = "cbor"` every payload starts with the CBOR self-describe tag and
/// decodes, telemetry and status alike.
#[test]
fn cbor_encoding_end_to_end() {
    let broker = TestBroker::start();
    let sub = Subscriber::start(broker.port(), ALL_TOPICS);
    let dev = "cbor-1";
    let agent = agent(dev, broker.port())
        .sim("imu", 1000.0, 6)
        .encoding("cbor")
        .start();
    assert!(
        sub.wait_for(|v| v.unique(dev, "imu") >= 500, SHORT),
        "{}",
        progress(&sub, dev, "imu")
    );
    stop_gracefully(&agent, SHORT);
    let fin = final_status(&sub, dev);
    let last = stream_status(&fin, "imu").last_seq;
    wait_all_delivered(&sub, dev, "imu", last, SHORT);
    let view = sub.snapshot();
    assert_clean_delivery(&view);
    assert_eq!(
        view.telemetry_prefixes.iter().collect::<Vec<_>>(),
        vec![&vec![0xd9, 0xd9, 0xf7]]
    );
    assert_eq!(
        view.telemetry_encodings.keys().copied().collect::<Vec<_>>(),
        vec!["cbor"]
    );
    assert_eq!(
        view.status_encodings.keys().copied().collect::<Vec<_>>(),
        vec!["cbor"],
        "status messages are CBOR too"
    );
    assert_no_panic(&agent);
}

/// A new agent against a fleet that sends no commit watermark (here a plain subscriber, like a
/// fleet older than end-to-end acknowledgement), with the default `delivery = "auto"`: it keeps
/// what the broker acknowledged until `commit_fallback_s`, then deletes on PUBACK, says so in
/// its status, and delivers everything.
#[test]
fn auto_delivery_falls_back_to_puback_without_a_commit_watermark() {
    let broker = TestBroker::start();
    let sub = Subscriber::start(broker.port(), ALL_TOPICS);
    let dev = "legacy-fleet-1";
    let agent = agent(dev, broker.port())
        .delivery("auto")
        .mqtt("commit_fallback_s", "3")
        .sim("imu", 500.0, 2)
        .start();
    // Acknowledged by the broker, kept: waiting for a watermark that never comes.
    agent.expect_metric("records_sent_total", |v| v >= 500.0, SHORT);
    assert_eq!(agent.metric("delivery_commit"), 1.0);
    assert!(agent.metric("queue_records") >= 400.0);
    assert_eq!(agent.metric("records_acked_total"), 0.0);
    // The fallback: records leave on PUBACK from now on.
    agent.expect_metric("delivery_commit", |v| v == 0.0, SHORT);
    agent.expect_metric("queue_records", |v| v < 400.0, SHORT);
    stop_gracefully(&agent, SHORT);
    let fin = final_status(&sub, dev);
    assert_eq!(fin.delivery, Some(ember_proto::Delivery::Puback));
    let last = stream_status(&fin, "imu").last_seq;
    assert_eq!(stream_status(&fin, "imu").queued, 0);
    wait_all_delivered(&sub, dev, "imu", last, SHORT);
    assert!(
        agent
            .last_run_stderr()
            .contains("No commit watermark came from the fleet"),
        "the fallback is logged"
    );
}
