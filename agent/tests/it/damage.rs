//! A damaged queue directory: the agent never panics, and never loses records silently.

use std::fs::OpenOptions;
use std::path::Path;

use ember_testkit::{ALL_TOPICS, Subscriber, TestBroker, restart_broker, wait_until};

use crate::common::*;

/// 4 KiB flipped at a quarter, half and three quarters of sled's data file. Where that lands
/// depends on sled's layout at the time: seen outcomes are no live data hit, records lost
/// (detected against `queue.mark`), and a database sled refuses to open (moved aside).
#[test]
fn damaged_queue_flipped_bytes_in_db() {
    damaged_queue("dmg-flip", |queue| {
        let path = queue.join("db");
        let mut bytes = std::fs::read(&path).expect("read db");
        let len = bytes.len();
        for at in [len / 4, len / 2, len * 3 / 4] {
            for b in &mut bytes[at.saturating_sub(2048)..(at + 2048).min(len)] {
                *b ^= 0xa5;
            }
        }
        std::fs::write(&path, bytes).expect("write db");
    });
}

#[test]
fn damaged_queue_truncated_db() {
    damaged_queue("dmg-trunc", |queue| {
        let f = OpenOptions::new()
            .write(true)
            .open(queue.join("db"))
            .expect("open db");
        let len = f.metadata().expect("stat db").len();
        f.set_len(len / 2).expect("truncate db");
    });
}

#[test]
fn damaged_queue_garbage_conf() {
    damaged_queue("dmg-conf", |queue| {
        std::fs::write(
            queue.join("conf"),
            b"\x00\xffnot a sled config at all\n\xde\xad\xbe\xef",
        )
        .expect("write conf");
    });
}

/// Fills the queue while the broker is down, stops the agent, applies `damage` to
/// `<data_dir>/queue`, and starts the agent again with the broker back. Accepted outcomes:
///
/// * the agent exits non-zero with an `ember-agent: ...` message; or
/// * it starts, streams on, and after a graceful stop every seq it ever assigned is either
///   delivered or listed as evicted (`corrupt` / `reset`) in its final status, with
///   `records_corrupt_total` / `queue_resets_total` saying so: nothing is lost silently, and no
///   sequence number is reused for a different record.
///
/// Either way, no run panics.
fn damaged_queue(dev: &str, damage: impl FnOnce(&Path)) {
    let mut broker = TestBroker::start();
    let sub = Subscriber::start(broker.port(), ALL_TOPICS);
    let agent = agent(dev, broker.port())
        .sim("imu", 2000.0, 6)
        .grace_ms(200)
        .start();
    assert!(
        sub.wait_for(|v| v.unique(dev, "imu") >= 500, SHORT),
        "{}",
        progress(&sub, dev, "imu")
    );
    broker.stop();
    agent.expect_metric("connected", |v| v == 0.0, SHORT);
    agent.expect_metric("queue_records", |v| v >= 6000.0, LONG);
    // A lower bound of the last seq this first run assigns (it started on an empty queue).
    let appended_before = agent.metric("records_enqueued_total") as u64;
    stop_gracefully(&agent, SHORT);
    let highest_before = highest(&sub, dev, "imu");
    // Records captured from here on belong to the run after the damage.
    let restart_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_micros() as u64;

    damage(&agent.data_dir().join("queue"));
    restart_broker(&mut broker, &sub, &agent, SHORT);
    agent.restart();
    let decided = wait_until(SHORT, || {
        agent.try_exit_status().is_some() || agent.try_metrics().is_ok()
    });
    assert!(
        decided,
        "the agent neither started nor exited; stderr:\n{}",
        agent.last_run_stderr()
    );

    if let Some(status) = agent.try_exit_status() {
        let text = agent.last_run_stderr();
        println!("{dev}: the agent refused to start ({status}):\n{text}");
        assert!(
            !status.success(),
            "refusing to start must be a non-zero exit"
        );
        assert!(
            text.contains("ember-agent: "),
            "a refusal must say why; stderr:\n{text}"
        );
        assert_no_panic(&agent);
        return;
    }

    let m = agent.metrics();
    let (resets, corrupt) = (m["queue_resets_total"], m["records_corrupt_total"]);
    println!(
        "{dev}: started after damage: queue_resets_total {resets}, records_corrupt_total {corrupt}"
    );
    // It goes on streaming: new records arrive.
    let seqs_before = highest_before.max(1);
    wait_highest_above(&sub, dev, "imu", seqs_before, LONG);
    stop_gracefully(&agent, SHORT);

    let fin = final_status(&sub, dev);
    let st = stream_status(&fin, "imu").clone();
    let c = fin.counters.clone().expect("counters");
    let reported = merge(st.evicted.iter().map(|r| (r.from, r.to)));
    println!(
        "{dev}: last_seq {}, evicted ranges {:?}, counters {c:?}",
        st.last_seq, st.evicted
    );
    assert!(
        st.evicted
            .iter()
            .all(|r| ["corrupt", "reset", "bytes", "age"].contains(&r.reason.as_str())),
        "{:?}",
        st.evicted
    );
    // Everything not reported as lost arrives.
    let accounted = sub.wait_for(
        |v| {
            v.stream(dev, "imu")
                .is_some_and(|l| covered(&missing_ranges(l, st.last_seq), &reported))
        },
        LONG,
    );
    let view = sub.snapshot();
    let log = view.stream(dev, "imu").expect("imu");
    let missing = missing_ranges(log, st.last_seq);
    assert!(
        accounted,
        "{dev}: records lost without being reported: missing {missing:?}, reported {reported:?}"
    );
    if !missing.is_empty() {
        assert!(
            c.queue_resets + c.corrupt > 0 || resets + corrupt > 0.0,
            "{dev}: records were lost ({missing:?}) but neither queue_resets nor records_corrupt counted it: {c:?}"
        );
        let text = agent.last_run_stderr();
        assert!(
            text.contains("lost") || text.contains("corrupt"),
            "{dev}: no log line reports the loss:\n{text}"
        );
    }
    // Sequence numbers never repeat: a record captured after the damage must not carry a seq
    // the first run had already assigned (the fleet would take it for that older record).
    let reused: Vec<u64> = log
        .records
        .iter()
        .filter(|(seq, r)| r.ts >= restart_us && **seq <= appended_before)
        .map(|(s, _)| *s)
        .collect();
    assert!(
        reused.is_empty(),
        "{dev}: {} new records reuse seqs the first run assigned (it appended at least {appended_before}): first {:?}",
        reused.len(),
        &reused[..reused.len().min(5)]
    );
    assert_clean_delivery(&view);
    assert_eq!(log.beyond(st.last_seq), 0);
    assert_no_panic(&agent);
}
