//! The agent process dying: SIGKILL at random points, and the second SIGTERM.

use std::time::{Duration, Instant};

use ember_testkit::{ALL_TOPICS, Subscriber, TestBroker, restart_broker};

use crate::common::*;

/// Kills per run of the crash test.
const KILLS: usize = 25;

/// The agent is SIGKILLed at 25 random moments while it streams (seeded: set
/// `EMBER_TEST_SEED` to replay a run) and restarted on the same data dir each time. With
/// `fsync = every_batch`, every record that was appended is delivered at least once: the
/// subscriber's seqs, deduplicated on `(device, stream, seq)`, are exactly `1..=last_seq`.
#[test]
fn sigkill_at_random_points_loses_nothing_appended() {
    let seed = std::env::var("EMBER_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_e3be_u64);
    println!("crash test seed: {seed} (set EMBER_TEST_SEED to replay)");
    let mut rng = fastrand::Rng::with_seed(seed);
    let broker = TestBroker::start();
    let sub = Subscriber::start(broker.port(), ALL_TOPICS);
    let dev = "crash-1";
    let agent = agent(dev, broker.port()).sim("imu", 2000.0, 6).spawn();

    let mut kills_while_streaming = 0;
    for i in 0..KILLS {
        let before = highest(&sub, dev, "imu");
        // The kill point: a random moment after the start, from inside `Queue::open` and
        // recovery to well into streaming. This sleep *is* the scenario, not a synchronisation.
        std::thread::sleep(Duration::from_millis(rng.u64(20..=700)));
        agent.sigkill();
        if highest(&sub, dev, "imu") > before {
            kills_while_streaming += 1;
        }
        assert_no_panic(&agent);
        println!(
            "kill {i}: highest seq delivered {}",
            highest(&sub, dev, "imu")
        );
        agent.restart();
    }
    agent.wait_ready(SHORT);
    wait_highest_above(&sub, dev, "imu", highest(&sub, dev, "imu"), SHORT);
    stop_gracefully(&agent, SHORT);

    let fin = final_status(&sub, dev);
    let last = stream_status(&fin, "imu").last_seq;
    wait_all_delivered(&sub, dev, "imu", last, LONG);
    let view = sub.snapshot();
    assert_clean_delivery(&view);
    let log = view.stream(dev, "imu").expect("imu");
    println!(
        "{KILLS} SIGKILLs ({kills_while_streaming} while records were flowing): {last} records, {} delivered more than once",
        log.duplicates
    );
    // Deduplicated on (device, stream, seq), the delivered set is exactly 1..=last_seq.
    assert_eq!(log.unique(), last, "dedup set size");
    assert!(log.is_exactly(last));
    assert!(
        kills_while_streaming >= KILLS / 3,
        "only {kills_while_streaming} of {KILLS} kills hit a streaming agent"
    );
    assert_no_panic(&agent);
}

/// SIGTERM starts a drain that cannot finish (broker down, long grace); a second SIGTERM ends
/// the process at once, and a later run delivers everything that was appended.
#[test]
fn second_sigterm_exits_at_once() {
    let mut broker = TestBroker::start();
    let sub = Subscriber::start(broker.port(), ALL_TOPICS);
    broker.stop();
    let dev = "term-1";
    let agent = agent(dev, broker.port())
        .sim("imu", 2000.0, 6)
        .grace_ms(120_000)
        .start();
    agent.expect_metric("queue_records", |v| v >= 2000.0, SHORT);

    agent.sigterm();
    let draining = ember_testkit::wait_until(SHORT, || {
        agent.last_run_stderr().contains("Shutdown requested")
    });
    assert!(
        draining,
        "the first SIGTERM was not acknowledged; stderr:\n{}",
        agent.last_run_stderr()
    );
    assert!(
        agent.is_running(),
        "with the broker down and a 120 s grace, the agent keeps draining"
    );
    let second = Instant::now();
    agent.sigterm();
    let status = agent.wait_exit(Duration::from_secs(10));
    println!(
        "exited {:?} after the second SIGTERM, with {status}",
        second.elapsed()
    );
    assert!(
        !status.success(),
        "a forced exit is not a clean one: {status}"
    );
    assert_eq!(status.code(), Some(130), "{}", agent.last_run_stderr());
    assert!(
        agent.last_run_stderr().contains("Second signal"),
        "{}",
        agent.last_run_stderr()
    );

    // Everything appended before the forced exit is still on disk and goes out on the next run.
    restart_broker(&mut broker, &sub, &agent, SHORT);
    agent.restart();
    agent.wait_ready(SHORT);
    wait_highest_above(&sub, dev, "imu", 2000, SHORT);
    stop_gracefully(&agent, SHORT);
    let fin = final_status(&sub, dev);
    let last = stream_status(&fin, "imu").last_seq;
    wait_all_delivered(&sub, dev, "imu", last, LONG);
    let view = sub.snapshot();
    assert_clean_delivery(&view);
    assert!(view.stream(dev, "imu").expect("imu").is_exactly(last));
    assert_no_panic(&agent);
}
