//! Hardware in the loop, end to end: the sensor-node firmware booted in
//! `qemu-system-arm -machine mps2-an386`, its UART0 through a bit-flipping line
//! (`ember_testkit::node::LineProxy`) to the `ember-agent` binary's serial source, the agent's
//! int8 activity model on that stream, Mosquitto, and this fleet. What the node put on the line
//! (decoded by the proxy before any damage) must be accounted for in the fleet's ledger.
//!
//! With `EMBER_HIL_SERIAL` set the node is a real board instead (`ember_testkit::node::HilNode`;
//! docs/hil.md, "A real board").
//!
//! Needs `qemu-system-arm` and the thumbv7em-none-eabihf Rust target (scripts/install-deps.sh);
//! without them the test fails saying so.

use std::time::Duration;

use ember_testkit::node::{HilNode, LineProxy, firmware_elf};
use ember_testkit::{TestAgent, TestBroker, bundles, tail, wait_until};
use serde_json::Value;

use crate::support::{Kind, Store, TestFleet, WAIT, agent_bin, complete};

const LONG: Duration = Duration::from_secs(120);

fn rejected_total(m: &ember_testkit::Metrics) -> f64 {
    m.iter()
        .filter(|(k, _)| k.starts_with("input_rejected_total{"))
        .map(|(_, v)| v)
        .sum()
}

/// The node streams at 1 kHz (guest time) through a clean line, then a damaged one (a flipped
/// bit every 501 bytes: refused frames, counted, the stream resumes), then is reset through
/// QEMU's monitor (a new boot, nothing double-counted); then it is paused and the agent stops
/// gracefully. The fleet's ledger must close exactly: every sample the agent captured is
/// stored once (none missing, none lost), the agent's rejects reach the fleet in its status,
/// and `stored + rejected` equals the samples the node numbered on the line. The model's
/// results are in the ledger too (their own stream, complete).
#[test]
fn every_sample_the_node_sent_is_accounted_for_in_the_fleets_ledger() {
    let elf = firmware_elf();
    let broker = TestBroker::start();
    let store = Store::new(Kind::Sqlite);
    let fleet = TestFleet::start(&store, broker.port());
    let proxy = LineProxy::start();
    let mut node = HilNode::start(elf, proxy.node_port);
    let dev = "hil-node-1";
    let dev_pub = format!(
        "[{:?}]",
        bundles::dev_public_key_path().display().to_string()
    );
    let agent = TestAgent::builder(agent_bin())
        .device_id(dev)
        .broker_port(broker.port())
        .source(&format!(
            "type = \"serial\"\nstream = \"imu\"\ndevice = \"tcp:127.0.0.1:{}\"\nrate_hz = 1000\nchannels = 6",
            proxy.agent_port
        ))
        .model(&bundles::committed_path("activity-int8"), "imu")
        .set("inference", "trusted_keys", &dev_pub)
        .grace_ms(60_000)
        .start();
    assert!(
        wait_until(WAIT, || proxy.agent_connections() > 0),
        "the agent's serial source never connected to tcp:127.0.0.1:{}",
        proxy.agent_port
    );
    // The agent is connected (it greets the node at once); only now does the node run.
    node.resume();

    // 1. Clean.
    agent.expect_metric("records_captured_total", |v| v >= 2000.0, LONG);
    // 2. Damaged.
    proxy.flip_every(501);
    agent.expect_metric("serial_frames_refused_total", |v| v >= 10.0, LONG);
    proxy.flip_every(0);
    let before = agent.metric("records_captured_total");
    agent.expect_metric("records_captured_total", |v| v >= before + 500.0, LONG);
    // 3. Reset mid-stream.
    node.reset();
    agent.expect_metric("serial_node_reboots_total", |v| v >= 1.0, LONG);
    let before = agent.metric("records_captured_total");
    agent.expect_metric("records_captured_total", |v| v >= before + 2000.0, LONG);

    // 4. Pause the node; the agent's ledger closes against the line's truth.
    node.halt();
    let ledger = || {
        let m = agent.metrics();
        m.get("records_captured_total").copied().unwrap_or(0.0) + rejected_total(&m)
    };
    let closed = wait_until(LONG, || proxy.truth().numbered() as f64 == ledger());
    let truth = proxy.truth();
    assert!(
        closed,
        "the agent's ledger is open: the node numbered {} samples on the line ({truth:?}); the agent accounts for {} ({:?})",
        truth.numbered(),
        ledger(),
        agent.metrics()
    );
    assert!(
        truth.boots.len() >= 2,
        "the reset gave a new boot: {truth:?}"
    );
    let m = agent.metrics();
    let captured = m["records_captured_total"] as u64;
    let rejected = rejected_total(&m) as u64;
    let corrupt = m
        .get("input_rejected_total{reason=\"corrupt\"}")
        .copied()
        .unwrap_or(0.0);
    assert!(
        corrupt >= 1.0,
        "damaged samples are counted as corrupt: {m:?}"
    );
    assert!(m["inference_windows_total"] >= 1.0, "the model ran: {m:?}");

    // 5. The agent drains and stops; its final status carries its counters to the fleet.
    agent.sigterm();
    let status = agent.wait_exit(LONG);
    assert!(
        status.success(),
        "the agent did not drain and exit cleanly ({status}):\n{}",
        tail(&agent.stderr_text(), 40)
    );
    let imu = fleet.wait_ledger(dev, "imu", |l| {
        complete(l) && l["captured"].as_u64() == Some(captured)
    });
    let counters = |f: &TestFleet| -> Value {
        f.get_json(&format!("/api/v1/devices/{dev}"))["counters"].clone()
    };
    assert!(
        wait_until(WAIT, || counters(&fleet)["rejected"].as_u64()
            == Some(rejected)),
        "the fleet holds the agent's rejects ({rejected}): {}",
        counters(&fleet)
    );
    let received = imu["received"].as_u64().unwrap_or(0);
    assert_eq!(
        received + rejected,
        truth.numbered(),
        "stored + rejected = numbered by the node; ledger {imu}, node {truth:?}"
    );
    let results = fleet.wait_ledger(dev, "imu.activity", complete);
    eprintln!(
        "hil: node numbered {} samples over {} boots; the fleet stored {received}, the agent rejected {rejected} ({corrupt} corrupt); {} activity results, ledger complete",
        truth.numbered(),
        truth.boots.len(),
        results["received"]
    );
}

/// The agent SIGKILLed twice while the node streams (no drain, no final status): each time it
/// restarts from what its queue durably held and the node (which kept every sample the agent
/// had not acknowledged) sends the rest again. The fleet's ledger ends exact: every sample the
/// node numbered is stored once, none lost, no duplicate, nothing rejected.
#[test]
fn an_agent_killed_while_the_node_streams_loses_nothing_it_acknowledged() {
    let elf = firmware_elf();
    let broker = TestBroker::start();
    let store = Store::new(Kind::Sqlite);
    let fleet = TestFleet::start(&store, broker.port());
    let proxy = LineProxy::start();
    let mut node = HilNode::start(elf, proxy.node_port);
    let dev = "hil-node-2";
    let agent = TestAgent::builder(agent_bin())
        .device_id(dev)
        .broker_port(broker.port())
        .source(&format!(
            "type = \"serial\"\nstream = \"imu\"\ndevice = \"tcp:127.0.0.1:{}\"\nrate_hz = 1000\nchannels = 6",
            proxy.agent_port
        ))
        .grace_ms(60_000)
        .start();
    assert!(
        wait_until(WAIT, || proxy.agent_connections() > 0),
        "the agent's serial source never connected"
    );
    node.resume();
    for round in 1..=2u64 {
        // Each run's counters start at 0: it has stored some of its own before it dies.
        agent.expect_metric("records_enqueued_total", |v| v >= 1500.0, LONG);
        agent.sigkill();
        agent.restart();
        assert!(
            wait_until(WAIT, || proxy.agent_connections() > round),
            "the restarted agent never reconnected to the line"
        );
    }
    agent.expect_metric("records_captured_total", |v| v >= 1500.0, LONG);
    node.halt();
    // What the line carried may still be in the proxy's socket when the node stops: the truth is
    // read again on every poll. A busy machine (the whole suite in parallel) can take a while
    // to store the last restart's backlog: LONG, not WAIT.
    //
    // The node keeps what it wrote until the agent acknowledges it, in a ring of 4,096: a
    // restart slower than that many samples (a loaded machine; QEMU's `-icount` clock runs
    // ahead of real time) leaves the node without the oldest ones. The restarted agent then
    // resumes after its last stored sample and the node answers from the oldest it kept: the
    // samples between are known lost (the agent counts them as gaps) and are not expected.
    let dropped_by_node = || node_dropped_while_agent_was_down(&agent.stderr_text());
    let exact = wait_until(LONG, || {
        fleet.stream_ledger(dev, "imu").is_some_and(|l| {
            complete(&l)
                && l["received"].as_u64().map(|r| r + dropped_by_node())
                    == Some(proxy.truth().numbered())
        })
    });
    let imu = fleet.stream_ledger(dev, "imu").unwrap_or_default();
    let truth = proxy.truth();
    assert!(
        exact,
        "the fleet's ledger is not exact: the node numbered {} ({truth:?}), {} of them dropped by the node while the agent was down; ledger {imu}; device counters {}; agent log:\n{}",
        truth.numbered(),
        dropped_by_node(),
        fleet.get_json(&format!("/api/v1/devices/{dev}"))["counters"],
        tail(&agent.stderr_text(), 60)
    );
    agent.sigterm();
    let status = agent.wait_exit(LONG);
    assert!(
        status.success(),
        "the agent did not drain and exit cleanly ({status}):\n{}",
        tail(&agent.stderr_text(), 40)
    );
    let log = agent.stderr_text();
    assert_eq!(
        log.matches("Resuming the serial node's stream").count(),
        2,
        "each restart resumes from the queue:\n{}",
        tail(&log, 40)
    );
    let numbered = truth.numbered();
    assert_eq!(truth.boots.len(), 1, "no reset in this test: {truth:?}");
    assert!(
        truth.boots.iter().all(|b| b.overruns == 0),
        "the node's ring overran (the test needs it not to): {truth:?}"
    );
    // (`duplicates` may be above 0: a record the fleet stored but had not committed when the
    // agent died is sent again under the same seq; `received` counts distinct seqs.)
    let counters = fleet.get_json(&format!("/api/v1/devices/{dev}"))["counters"].clone();
    assert_eq!(counters["rejected"].as_u64(), Some(0), "{counters}");
    eprintln!(
        "hil: the node numbered {numbered} samples, sent {} sample frames (resent after each SIGKILL); the fleet stored {} once each; {} dropped by the node's ring while the agent was down",
        truth.sample_frames,
        imu["received"],
        dropped_by_node()
    );
}

/// Samples the node no longer held when a restarted agent asked it to resume: for each restart,
/// the agent resumed after its last stored `seq` and the node answered `from_seq`; the samples
/// between were dropped from the node's full ring while no agent acknowledged them.
fn node_dropped_while_agent_was_down(log: &str) -> u64 {
    let field = |line: &str, key: &str| -> Option<u64> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse().ok())
    };
    let mut asked = None;
    let mut dropped = 0;
    for line in log.lines() {
        if line.contains("Resuming the serial node's stream after its last stored sample") {
            asked = field(line, "seq=");
        } else if line.contains("The serial node resumed its stream")
            && let (Some(after), Some(from)) = (asked.take(), field(line, "from_seq="))
        {
            dropped += from.saturating_sub(after + 1);
        }
    }
    dropped
}

/// The log lines of the run where a loaded machine made the node drop 1,787 samples.
#[test]
fn samples_the_node_dropped_while_the_agent_was_down_are_read_from_its_log() {
    let log = "\
INFO source{kind=\"serial\" stream=imu}: ember_agent::source::serial: Resuming the serial node's stream after its last stored sample. stream=imu boot=1 seq=2779
INFO source{kind=\"serial\" stream=imu}: ember_agent::source::serial: The serial node resumed its stream. stream=imu boot=1 from_seq=4567
INFO source{kind=\"serial\" stream=imu}: ember_agent::source::serial: Resuming the serial node's stream after its last stored sample. stream=imu boot=1 seq=6099
INFO source{kind=\"serial\" stream=imu}: ember_agent::source::serial: The serial node resumed its stream. stream=imu boot=1 from_seq=6100";
    assert_eq!(node_dropped_while_agent_was_down(log), 4567 - 2780);
    assert_eq!(node_dropped_while_agent_was_down(""), 0);
}
