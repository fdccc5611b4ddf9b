//! End-to-end acknowledgement (docs/protocol.md): agents delete records only when the fleet's
//! commit watermark covers them, so neither a broker that restarts or crashes, nor a fleet or
//! an agent killed with SIGKILL, loses an acknowledged record. Real processes throughout:
//! Mosquitto (with persistence, restarted and SIGKILLed), the fleet (in-process, or its binary
//! for SIGKILL), `ember-agent`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ember_proto::{Committed, CommittedStream, Encoding};
use ember_testkit::tls::{RawClient, TestPki, client_config};
use ember_testkit::{TestAgent, TestAgentBuilder, TestBroker, free_port, wait_until};
use serde_json::Value;

use crate::support::{
    Kind, Store, TestFleet, WAIT, agent_bin, client_id, complete, fleet_bin, http,
};

/// The stream rate: at least 2,000 records a second.
const RATE_HZ: f64 = 2000.0;

/// An agent at 2,000 records/s with the default delivery mode (`auto`), re-sending what stays
/// uncommitted for 3 s (the default is 10 s), with time to drain at the end.
fn streaming_agent(device: &str, broker_port: u16) -> TestAgentBuilder {
    TestAgent::builder(agent_bin())
        .device_id(device)
        .broker_port(broker_port)
        .sim("imu", RATE_HZ, 3)
        .delivery("auto")
        .mqtt("commit_timeout_s", "3")
        .grace_ms(60_000)
}

fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

fn stop_agent(agent: &TestAgent) {
    agent.sigterm();
    let status = agent.wait_exit(WAIT * 2);
    assert!(
        status.success(),
        "the agent did not drain and exit cleanly ({status}); its log:\n{}",
        ember_testkit::tail(&agent.stderr_text(), 40)
    );
    let log = agent.last_run_stderr();
    assert!(
        log.contains("Queue drained"),
        "the agent stopped with records still queued:\n{}",
        ember_testkit::tail(&log, 40)
    );
}

/// The broker restarted gracefully and SIGKILLed, while the fleet is up and while it is down,
/// twice each, during a 2,000 records/s stream through the fleet's default shared
/// subscription: the ledger ends with every record stored once, none missing, none lost.
#[test]
fn broker_restarts_and_crashes_lose_no_record() {
    // Autosave far away: a SIGKILL loses everything the broker held since it started.
    let mut broker = TestBroker::start_persistent(3600);
    let store = Store::new(Kind::Sqlite);
    let id = client_id();
    let mut fleet = Some(TestFleet::start_with(&store, broker.port(), &id, ""));
    let agent = streaming_agent("bounce-dev", broker.port()).start();
    agent.expect_metric("delivery_commit", |v| v == 1.0, WAIT);
    let received = |f: &Option<TestFleet>| {
        f.as_ref()
            .and_then(|f| f.stream_ledger("bounce-dev", "imu"))
            .and_then(|l| l["received"].as_u64())
            .unwrap_or(0)
    };
    assert!(wait_until(WAIT, || received(&fleet) >= 2000));
    // The fleet records how the device deletes what it queues.
    let f = fleet.as_ref().expect("the fleet runs");
    assert!(
        wait_until(
            WAIT,
            || f.get_json("/api/v1/devices/bounce-dev")["delivery"] == "commit"
        ),
        "the device's delivery mode is not recorded: {}",
        f.get_json("/api/v1/devices/bounce-dev")
    );

    let mut rounds = Vec::new();
    for _ in 0..2 {
        for (fleet_up, crash) in [(true, false), (true, true), (false, false), (false, true)] {
            if !fleet_up && let Some(f) = fleet.take() {
                f.stop().expect("the fleet stops cleanly");
            }
            sleep_ms(1500);
            if crash {
                broker.kill();
            } else {
                broker.stop();
            }
            sleep_ms(300);
            broker.restart();
            sleep_ms(1500);
            if fleet.is_none() {
                fleet = Some(TestFleet::start_with(&store, broker.port(), &id, ""));
            }
            let before = received(&fleet);
            assert!(
                wait_until(WAIT, || received(&fleet) > before + 1000),
                "the fleet stopped receiving after a broker {} with the fleet {}",
                if crash { "crash" } else { "restart" },
                if fleet_up { "up" } else { "down" }
            );
            rounds.push((fleet_up, crash));
        }
    }
    let resent = agent.metric("records_resent_total");
    stop_agent(&agent);
    let fleet = fleet.expect("the fleet runs");
    let l = fleet.wait_ledger("bounce-dev", "imu", complete);
    eprintln!(
        "broker bounces (fleet up, crash) {rounds:?}: captured {}, lost {}, missing {}, duplicates {}, agent re-sent {resent} records",
        l["captured"], l["lost_count"], l["missing_count"], l["duplicates"]
    );
}

crate::on_both_backends!(refused_records_are_settled_and_the_watermark_passes_them);

/// A message the fleet refuses (here: a record's CRC does not match) would be refused again if
/// sent again: its records are settled as `rejected` (explained in the ledger, not lost) and
/// the commit watermark passes them, so the agent does not re-send them forever.
fn refused_records_are_settled_and_the_watermark_passes_them(kind: Kind) {
    use crate::support::mqtt::{Msg, batch, publish, status};
    let broker = TestBroker::start();
    let store = Store::new(kind);
    let fleet = TestFleet::start(&store, broker.port());
    let ts = crate::support::now_us();
    let mut bad = batch("rej-dev", "imu", 11..=20, ts);
    bad.records[4].crc ^= 1;
    let mut st = status("rej-dev", "imu", 30, 20, &[]);
    st.delivery = Some(ember_proto::Delivery::Commit);
    st.streams[0].head = Some(11);
    publish(
        broker.port(),
        vec![
            Msg::telemetry(&batch("rej-dev", "imu", 1..=10, ts)),
            Msg::telemetry(&bad),
            Msg::telemetry(&batch("rej-dev", "imu", 21..=30, ts)),
            Msg::status(&st),
        ],
    );
    let l = fleet.wait_ledger("rej-dev", "imu", |l| l["committed"] == 30);
    assert_eq!(l["lost_count"], 0, "{l}");
    assert_eq!(l["missing_count"], 10, "{l}");
    assert_eq!(
        l["evicted"],
        serde_json::json!([{"from": 11, "to": 20, "reasons": ["rejected"]}]),
        "{l}"
    );
}

/// The fleet's binary, for the SIGKILL test.
struct FleetProcess {
    config: PathBuf,
    port: u16,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl FleetProcess {
    fn start(store: &Store, broker_port: u16, client_id: &str) -> FleetProcess {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let config = dir.path().join("fleet.toml");
        let text = crate::support::config(
            &store.url(),
            broker_port,
            client_id,
            &format!("[http]\nlisten = \"127.0.0.1:{port}\""),
        );
        std::fs::write(&config, text).expect("write the fleet config");
        let mut f = FleetProcess {
            config,
            port,
            child: None,
            _dir: dir,
        };
        f.spawn();
        f
    }

    fn spawn(&mut self) {
        self.spawn_with(&[]);
    }

    fn spawn_with(&mut self, env: &[(&str, &str)]) {
        let mut cmd = Command::new(fleet_bin());
        cmd.envs(env.iter().copied());
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("EMBER_FLEET_") {
                cmd.env_remove(k);
            }
        }
        let child = cmd
            .arg("--config")
            .arg(&self.config)
            .arg("run")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot run ember-fleet");
        self.child = Some(child);
        let port = self.port;
        assert!(
            wait_until(WAIT, || http::try_request(
                port,
                "GET",
                "/api/v1/health",
                None,
                None
            )
            .is_ok_and(|r| r.status == 200)),
            "the fleet process did not become healthy"
        );
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn ledger(&self, device: &str, stream: &str) -> Option<Value> {
        crate::support::stream_ledger(self.port, device, stream)
    }
}

impl Drop for FleetProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The fleet SIGKILLed again and again while it stores a 2,000 records/s stream (between a
/// commit and its watermark, between a commit and its PUBACKs): every record is stored once.
#[test]
fn fleet_sigkilled_between_commit_and_watermark_stores_everything_once() {
    let broker = TestBroker::start();
    let store = Store::new(Kind::Sqlite);
    let id = client_id();
    let mut fleet = FleetProcess::start(&store, broker.port(), &id);
    let agent = streaming_agent("crash-fleet-dev", broker.port()).start();
    agent.expect_metric("delivery_commit", |v| v == 1.0, WAIT);
    for _ in 0..4 {
        sleep_ms(1200);
        fleet.kill();
        sleep_ms(700);
        fleet.spawn();
    }
    sleep_ms(1000);
    stop_agent(&agent);
    let mut last = None;
    let done = wait_until(WAIT, || {
        last = fleet.ledger("crash-fleet-dev", "imu");
        last.as_ref().is_some_and(complete)
    });
    assert!(done, "the ledger is not complete: {last:?}");
    let l = last.unwrap_or(Value::Null);
    eprintln!(
        "fleet SIGKILLed 4 times: captured {}, duplicates {}",
        l["captured"], l["duplicates"]
    );
}

/// The fleet aborted by its fault hook right after a commit, before that batch's watermark
/// and PUBACKs went out: the broker delivers the batch again after the restart, and every
/// record is stored once (the copies are counted as duplicates).
#[cfg(feature = "fault-injection")]
#[test]
fn fleet_crash_right_after_a_commit_before_its_watermark_stores_everything_once() {
    let broker = TestBroker::start();
    let store = Store::new(Kind::Sqlite);
    let id = client_id();
    let mut fleet = FleetProcess::start(&store, broker.port(), &id);
    let agent = streaming_agent("commit-crash-dev", broker.port()).start();
    agent.expect_metric("delivery_commit", |v| v == 1.0, WAIT);
    // Again with the hook armed: the 10th batch it commits is its last.
    fleet.kill();
    fleet.spawn_with(&[("EMBER_FLEET_FAULT_CRASH_BEFORE_WATERMARK", "10")]);
    let child = fleet.child.as_mut().expect("the fleet runs");
    let deadline = std::time::Instant::now() + WAIT;
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the fault hook did not fire"
        );
        sleep_ms(50);
    };
    assert!(!status.success(), "the fleet aborted: {status}");
    fleet.child = None;
    sleep_ms(1500);
    fleet.spawn();
    sleep_ms(1500);
    stop_agent(&agent);
    let mut last = None;
    let done = wait_until(WAIT, || {
        last = fleet.ledger("commit-crash-dev", "imu");
        last.as_ref().is_some_and(complete)
    });
    assert!(done, "the ledger is not complete: {last:?}");
    let l = last.unwrap_or(Value::Null);
    assert!(
        l["duplicates"].as_u64().unwrap_or(0) >= 1,
        "the batch committed before the crash was not delivered again: {l}"
    );
    eprintln!(
        "fleet aborted after a commit, before its watermark: captured {}, duplicates {}",
        l["captured"], l["duplicates"]
    );
}

/// An agent SIGKILLed with records the broker acknowledged but the fleet (down) has not
/// committed keeps them, sends them again after its restart, and the fleet stores each once.
#[test]
fn agent_sigkilled_with_uncommitted_records_resends_them_and_they_are_stored_once() {
    let broker = TestBroker::start();
    let store = Store::new(Kind::Sqlite);
    let id = client_id();
    let fleet = TestFleet::start_with(&store, broker.port(), &id, "");
    let agent = streaming_agent("crash-agent-dev", broker.port()).start();
    agent.expect_metric("delivery_commit", |v| v == 1.0, WAIT);
    fleet.stop().expect("the fleet stops cleanly");
    // The broker acknowledges and queues for the fleet's session; the agent keeps everything.
    let sent = agent.metric("records_sent_total");
    agent
        .wait_metric("records_sent_total", |v| v >= sent + 4000.0, WAIT)
        .expect("the agent keeps publishing while the fleet is down");
    let queued = agent.metric("queue_records");
    assert!(
        queued >= 4000.0,
        "records acknowledged by the broker left the queue: {queued} queued"
    );
    agent.sigkill();
    agent.restart();
    agent.wait_ready(WAIT);
    // Sent again from the first uncommitted record: the broker now holds two copies.
    agent
        .wait_metric("records_sent_total", |v| v >= queued, WAIT)
        .expect("the restarted agent re-sends what was not committed");
    let fleet = TestFleet::start_with(&store, broker.port(), &id, "");
    stop_agent(&agent);
    let l = fleet.wait_ledger("crash-agent-dev", "imu", complete);
    let duplicates = l["duplicates"].as_u64().unwrap_or(0);
    assert!(
        duplicates >= 1000,
        "the re-sent copies did not reach the fleet as duplicates: {l}"
    );
    eprintln!(
        "agent SIGKILLed with {queued} uncommitted records: captured {}, duplicates {duplicates}",
        l["captured"]
    );
}

/// Only the fleet identity may write a watermark: another device's forged watermark and a
/// device's own are dropped by the broker's ACL (and the agent would refuse another device's
/// anyway); the fleet's reaches the device.
#[test]
fn only_the_fleet_identity_can_publish_a_watermark() {
    let pki = TestPki::new("Ember test CA");
    let broker = TestBroker::start_tls(&pki);
    let tls = |cert| client_config(pki.ca_pem(), Some(cert));
    let a = pki.client("dev-a", "dev-a", 30);
    let b = pki.client("dev-b", "dev-b", 30);
    let fleet_cert = pki.fleet();
    let forged = |device: &str| {
        let mut c = Committed::new(device, 1);
        c.streams.push(CommittedStream {
            stream: "imu".into(),
            upto: 1_000_000,
        });
        ember_proto::message::encode(&c, Encoding::Json).expect("encode")
    };
    let topic = "ember/v1/dev-a/committed";
    // The fleet identity reads every device's topics: it sees whatever the broker lets through.
    let observer = RawClient::connect("ember-fleet-observer", broker.port(), tls(&fleet_cert));
    observer.subscribe("ember/v1/+/committed");
    {
        let device_b = RawClient::connect("dev-b", broker.port(), tls(&b));
        device_b.publish(topic, forged("dev-a"));
        let device_a = RawClient::connect("dev-a", broker.port(), tls(&a));
        device_a.publish(topic, forged("dev-a"));
        sleep_ms(1000);
        // Dropped here: they would otherwise keep reconnecting as dev-a and dev-b.
    }
    let got = |c: &RawClient| c.received().into_iter().filter(|(t, _)| t == topic).count();
    assert_eq!(
        got(&observer),
        0,
        "a device's forged watermark passed the broker: {:?}",
        observer.received()
    );
    // The control: the fleet identity's watermark does pass and reaches the device, so the
    // check above can fail.
    let listener = RawClient::connect("dev-a", broker.port(), tls(&a));
    listener.subscribe(topic);
    let fleet = RawClient::connect("ember-fleet-it", broker.port(), tls(&fleet_cert));
    fleet.publish(topic, forged("dev-a"));
    let arrived = wait_until(Duration::from_secs(10), || {
        got(&listener) == 1 && got(&observer) == 1
    });
    assert!(
        arrived,
        "the fleet's watermark did not arrive: device {:?}, observer {:?}; broker log:\n{}",
        listener
            .received()
            .iter()
            .map(|(t, p)| (t, String::from_utf8_lossy(p)))
            .collect::<Vec<_>>(),
        observer.received().len(),
        broker.log_text()
    );
}
