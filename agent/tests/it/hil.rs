//! Hardware in the loop, emulated: the real sensor-node firmware (`firmware/`, built here for
//! thumbv7em) boots in `qemu-system-arm -machine mps2-an386`; its UART0 goes through a TCP
//! proxy (that flips bits on demand and decodes what the node really sent) to the agent
//! binary's `serial` source, and on to a real Mosquitto. The node is reset through QEMU's
//! monitor (QMP `system_reset`) mid-stream.
//!
//! Needs `qemu-system-arm` (scripts/install-deps.sh installs it) and the thumbv7em-none-eabihf
//! Rust target; without them the test fails saying so.

use std::time::Instant;

use ember_testkit::node::{LineProxy, QemuNode, firmware_elf};
use ember_testkit::{ALL_TOPICS, Subscriber, TestBroker, wait_until};

use crate::common::*;

/// The whole chain: node (QEMU) → proxy → agent → Mosquitto. Phases: a clean stream, a damaged
/// line (bits flipped: refused frames, counted, the stream resumes), a node reset (a new boot,
/// nothing double-counted), then the node is paused and the ledger must close exactly:
/// samples the agent captured + samples it counted as corrupt or gap = the samples the node
/// numbered on the line, and every captured sample reaches the broker.
#[test]
fn firmware_in_qemu_feeds_the_agent_through_a_damaged_line_and_a_reset() {
    let elf = firmware_elf();
    let broker = TestBroker::start();
    let sub = Subscriber::start(broker.port(), ALL_TOPICS);
    let proxy = LineProxy::start();
    let mut qemu = QemuNode::start(elf, proxy.node_port);
    let dev = "node-1";
    let agent = agent(dev, broker.port())
        .source(&format!(
            "type = \"serial\"\nstream = \"imu\"\ndevice = \"tcp:127.0.0.1:{}\"\nrate_hz = 1000\nchannels = 6",
            proxy.agent_port
        ))
        .start();
    // The agent is connected (it greets the node at once); only now does the guest run.
    assert!(
        wait_until(SHORT, || proxy.agent_connections() > 0),
        "the agent's serial source never connected to tcp:127.0.0.1:{}",
        proxy.agent_port
    );
    qemu.execute("cont");

    // 1. Clean: samples flow; time how fast the source takes them.
    let t0 = Instant::now();
    let clean = agent.expect_metric("records_captured_total", |v| v >= 2000.0, LONG);
    let rate = clean / t0.elapsed().as_secs_f64();
    eprintln!(
        "hil: the serial source took {clean} samples at {rate:.0} samples/s (node at 1 kHz guest time, QEMU -icount)"
    );
    // An undamaged line refuses no frame (a node overrun on a starved machine would be a gap,
    // which the ledger below accounts for: it is not asserted away here).
    let m = agent.metrics();
    assert_eq!(
        m.get("serial_frames_refused_total").copied().unwrap_or(0.0),
        0.0,
        "a clean line refuses nothing: {m:?}"
    );

    // 2. Damaged: one flipped bit every 501 bytes.
    proxy.flip_every(501);
    agent.expect_metric("serial_frames_refused_total", |v| v >= 10.0, LONG);
    proxy.flip_every(0);
    let before = agent.metric("records_captured_total");
    agent.expect_metric("records_captured_total", |v| v >= before + 500.0, LONG);

    // 3. Reset the node mid-stream.
    qemu.execute("system_reset");
    agent.expect_metric("serial_node_reboots_total", |v| v >= 1.0, LONG);
    let before = agent.metric("records_captured_total");
    agent.expect_metric("records_captured_total", |v| v >= before + 500.0, LONG);

    // 4. Pause the node; wait until the agent has what the proxy forwarded; close the ledger.
    qemu.execute("stop");
    let truth = || {
        let t = proxy.truth();
        (t.numbered(), t.last, t.boots)
    };
    let ledger = || {
        let m = agent.metrics();
        m.get("records_captured_total").copied().unwrap_or(0.0) + rejected_total(&m)
    };
    let closed = wait_until(LONG, || truth().0 as f64 == ledger());
    let (numbered, last, boots) = truth();
    assert!(
        closed,
        "ledger open: the node numbered {numbered} samples on the line (boots {boots:?}, last {last:?}); the agent accounts for {} (metrics {:?})",
        ledger(),
        agent.metrics()
    );
    assert!(boots.len() >= 2, "the reset gave a new boot: {boots:?}");
    let m = agent.metrics();
    let corrupt = m
        .get("input_rejected_total{reason=\"corrupt\"}")
        .copied()
        .unwrap_or(0.0);
    assert!(
        corrupt >= 1.0,
        "damaged samples are counted as corrupt: {m:?}"
    );
    assert!(proxy.flipped() > 0);

    // Every captured sample reaches the broker, in order, once.
    let captured = m.get("records_captured_total").copied().unwrap_or(0.0) as u64;
    wait_all_delivered(&sub, dev, "imu", captured, LONG);
    sub.with_view(assert_clean_delivery);
    stop_gracefully(&agent, LONG);
    let status = final_status(&sub, dev);
    let counters = status.counters.expect("the final status carries counters");
    assert_eq!(
        counters.rejected as f64,
        rejected_total(&m),
        "the status carries the source's rejects to the fleet"
    );
}
