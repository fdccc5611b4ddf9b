//! The agent under systemd's `Type=notify` protocol (agent/src/notify.rs): a test plays the
//! service manager's notification socket. And the packaged unit's hardening is checked by
//! `systemd-analyze security --offline` in scripts/test.sh.

use std::os::unix::net::UnixDatagram;

use ember_testkit::TestBroker;

use crate::common::*;

fn recv(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 256];
    let n = sock
        .recv(&mut buf)
        .expect("a notification from the agent within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// READY=1 once it serves, WATCHDOG=1 at half of WATCHDOG_USEC, STOPPING=1 when SIGTERM
/// starts the drain; the watchdog is still fed during the drain.
#[test]
fn the_agent_notifies_ready_feeds_the_watchdog_and_says_stopping() {
    let broker = TestBroker::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
    sock.set_read_timeout(Some(SHORT)).expect("timeout");
    let agent = agent("notify-1", broker.port())
        .sim("imu", 50.0, 3)
        .env("NOTIFY_SOCKET", path.to_str().expect("utf-8 path"))
        .env("WATCHDOG_USEC", "200000")
        .start();
    assert_eq!(recv(&sock), "READY=1");
    for _ in 0..3 {
        assert_eq!(recv(&sock), "WATCHDOG=1");
    }
    stop_gracefully(&agent, LONG);
    let mut rest = Vec::new();
    sock.set_read_timeout(Some(std::time::Duration::from_millis(500)))
        .expect("timeout");
    let mut buf = [0u8; 256];
    while let Ok(n) = sock.recv(&mut buf) {
        rest.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(
        rest.iter().any(|m| m == "STOPPING=1"),
        "STOPPING=1 on SIGTERM; got {rest:?}"
    );
    assert!(
        rest.iter().all(|m| m == "STOPPING=1" || m == "WATCHDOG=1"),
        "{rest:?}"
    );
}
