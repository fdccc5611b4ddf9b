//! Hardware in the loop, emulated: the real sensor-node firmware (`firmware/`, built here for
//! thumbv7em) boots in `qemu-system-arm -machine mps2-an386`; its UART0 goes through a TCP
//! proxy (that flips bits on demand and decodes what the node really sent) to the agent
//! binary's `serial` source, and on to a real Mosquitto. The node is reset through QEMU's
//! monitor (QMP `system_reset`) mid-stream. With `EMBER_HIL_SERIAL` set the node is a real
//! board instead (docs/hil.md, "A real board").
//!
//! The board path itself is tested here without a board: QEMU plays one
//! (`ember_testkit::node::QemuBoard`: UART0 on a pseudo-terminal, a real tty; flash, reset,
//! halt and resume as shell commands), and the same chain runs through the tty bridge.
//!
//! Needs `qemu-system-arm` (scripts/install-deps.sh installs it), `python3` and the
//! thumbv7em-none-eabihf Rust target; without them the test fails saying so.

use std::time::Instant;

use ember_testkit::node::{
    BoardNode, HilNode, LineProxy, QemuBoard, firmware_elf, qemu_firmware_elf,
};
use ember_testkit::{ALL_TOPICS, Subscriber, TestBroker, wait_until};

use crate::common::*;

/// The whole chain: node (QEMU, or the board `EMBER_HIL_SERIAL` names) → proxy → agent →
/// Mosquitto.
#[test]
fn the_node_feeds_the_agent_through_a_damaged_line_and_a_reset() {
    damaged_line_and_reset(|port| HilNode::start(firmware_elf(), port));
}

/// The board path (`BoardNode`: a tty configured with `stty`, bridged to the proxy; the node
/// started by the reset command once its line is open, its first `Hello` the line's start; halt
/// and resume by command) with QEMU playing the board, over a pseudo-terminal. Its "flash"
/// leaves the image running, as a real board's may: what it sends before the test starts it
/// must not reach the ledger.
#[test]
fn the_board_path_over_a_tty_feeds_the_agent_through_a_damaged_line_and_a_reset() {
    let elf = qemu_firmware_elf();
    let board = QemuBoard::start(elf);
    damaged_line_and_reset(|port| HilNode::Board(BoardNode::start(board.config(), elf, port)));
}

/// Phases: a clean stream, a damaged line (bits flipped: refused frames, counted, the stream
/// resumes), a node reset (a new boot, nothing double-counted), then the node is paused and
/// the ledger must close exactly: samples the agent captured + samples it counted as corrupt or
/// gap = the samples the node numbered on the line, and every captured sample reaches the
/// broker.
fn damaged_line_and_reset(start_node: impl FnOnce(u16) -> HilNode) {
    let broker = TestBroker::start();
    let sub = Subscriber::start(broker.port(), ALL_TOPICS);
    let proxy = LineProxy::start();
    let mut node = start_node(proxy.node_port);
    let dev = "node-1";
    let agent = agent(dev, broker.port())
        .source(&format!(
            "type = \"serial\"\nstream = \"imu\"\ndevice = \"tcp:127.0.0.1:{}\"\nrate_hz = 1000\nchannels = 6",
            proxy.agent_port
        ))
        .start();
    // The agent is connected (it greets the node at once); only now does the node run.
    assert!(
        wait_until(SHORT, || proxy.agent_connections() > 0),
        "the agent's serial source never connected to tcp:127.0.0.1:{}",
        proxy.agent_port
    );
    node.resume();

    // 1. Clean: samples flow; time how fast the source takes them.
    let t0 = Instant::now();
    let clean = agent.expect_metric("records_captured_total", |v| v >= 2000.0, LONG);
    let rate = clean / t0.elapsed().as_secs_f64();
    eprintln!(
        "hil: the serial source took {clean} samples at {rate:.0} samples/s (QEMU: node at 1 kHz guest time, -icount)"
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
    node.reset();
    agent.expect_metric("serial_node_reboots_total", |v| v >= 1.0, LONG);
    let before = agent.metric("records_captured_total");
    agent.expect_metric("records_captured_total", |v| v >= before + 500.0, LONG);

    // 4. Pause the node; wait until the agent has what the proxy forwarded; close the ledger.
    node.halt();
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
