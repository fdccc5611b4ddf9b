//! The `aws-iot-core` connection profile against a stand-in for IoT Core's front door
//! (`ember_testkit::iot_core`: TLS with SNI and ALPN, client id = the certificate's thing,
//! payload and QoS limits, publish timing) in front of a Mosquitto with IoT Core's limits.
//! Not tested here: the real service (docs/deploy-aws.md says what that leaves open).

use std::time::{Duration, Instant};

use ember_testkit::iot_core::{ALPN, IOT_CORE_LIMITS, IotCoreFront, PUBLISH_PER_SECOND};
use ember_testkit::tls::{CertFiles, TestPki};
use ember_testkit::{ALL_TOPICS, Subscriber, TestAgentBuilder, TestBroker, wait_until};

use crate::common::*;

/// The name the front answers to: the SNI it demands (its certificate is for `localhost`; a
/// real endpoint is `<prefix>-ats.iot.<region>.amazonaws.com`).
const ENDPOINT: &str = "localhost";

/// An agent with the `aws-iot-core` profile for thing `device`, trusting the test CA as its
/// "system" store (`system_roots`, with `SSL_CERT_FILE` pointing at the CA, as an operator
/// would for a private store), on the front's port, offering ALPN as on port 443.
fn aws_agent(device: &str, pki: &TestPki, cert: &CertFiles, port: u16) -> TestAgentBuilder {
    agent(device, port)
        .mqtt("profile", "\"aws-iot-core\"")
        .mqtt("host", &format!("\"{ENDPOINT}\""))
        .mqtt("reconnect_min_ms", "1000")
        .mqtt("reconnect_max_ms", "2000")
        .set("mqtt.tls", "system_roots", "true")
        .set(
            "mqtt.tls",
            "cert_file",
            &format!("'{}'", cert.cert.display()),
        )
        .set("mqtt.tls", "key_file", &format!("'{}'", cert.key.display()))
        .set("mqtt.tls", "alpn", &format!("[\"{ALPN}\"]"))
        .env("SSL_CERT_FILE", &pki.ca_file().display().to_string())
}

fn wait_refused(front: &IotCoreFront, what: &str) {
    assert!(
        wait_until(SHORT, || front.refused().iter().any(|r| r.contains(what))),
        "the front should refuse a connection for {what:?}; refused: {:?}",
        front.refused()
    );
}

/// The profile passes every check IoT Core makes at connect time, and what it sends arrives
/// whole; the same agent without the profile's settings is refused for each of them, so the
/// checks are real.
#[test]
fn the_aws_iot_core_profile_passes_iot_cores_connect_checks_and_delivers_everything() {
    let pki = TestPki::new("Ember test CA");
    let broker = TestBroker::start_with_conf(IOT_CORE_LIMITS);
    let front = IotCoreFront::start(&pki, ENDPOINT, true, broker.port());
    let sub = Subscriber::start(broker.port(), ALL_TOPICS);
    let cert = pki.client("edge-1", "edge-1", 30);

    let a = aws_agent("edge-1", &pki, &cert, front.port())
        .sim("imu", 50.0, 3)
        .start();
    wait_highest_above(&sub, "edge-1", "imu", 100, LONG);
    let sessions = front.sessions();
    assert_eq!(sessions.len(), 1, "refused: {:?}", front.refused());
    let s = &sessions[0];
    assert_eq!(s.sni.as_deref(), Some(ENDPOINT));
    assert_eq!(s.alpn.as_deref(), Some(ALPN));
    assert_eq!(
        (s.thing.as_str(), s.client_id.as_str()),
        ("edge-1", "edge-1")
    );
    assert!(
        (30..=1200).contains(&s.keep_alive_s),
        "keep-alive {}",
        s.keep_alive_s
    );
    // The retained status reaches the broker through the front.
    assert!(
        sub.wait_for(|v| v.status("edge-1").is_some(), SHORT),
        "no status from edge-1"
    );
    stop_gracefully(&a, LONG);
    let last = stream_status(&final_status(&sub, "edge-1"), "imu").last_seq;
    wait_all_delivered(&sub, "edge-1", "imu", last, SHORT);
    sub.with_view(assert_clean_delivery);
    assert!(front.refused().is_empty(), "{:?}", front.refused());

    // What the profile guarantees, broken one at a time with the generic profile.
    let generic = |id: &str| {
        agent(id, front.port())
            .mqtt("host", &format!("\"{ENDPOINT}\""))
            .set(
                "mqtt.tls",
                "ca_file",
                &format!("'{}'", pki.ca_file().display()),
            )
            .set(
                "mqtt.tls",
                "cert_file",
                &format!("'{}'", cert.cert.display()),
            )
            .set("mqtt.tls", "key_file", &format!("'{}'", cert.key.display()))
            .sim("imu", 10.0, 1)
    };
    let other = generic("edge-1")
        .mqtt("client_id", "\"edge-2\"")
        .set("mqtt.tls", "alpn", &format!("[\"{ALPN}\"]"))
        .start();
    wait_refused(&front, "is not the certificate's thing");
    drop(other);
    let no_alpn = generic("edge-1").start();
    wait_refused(&front, "ALPN");
    drop(no_alpn);
    let by_address = generic("edge-1")
        .mqtt("host", "\"127.0.0.1\"")
        .set("mqtt.tls", "server_name", "\"localhost\"")
        .set("mqtt.tls", "alpn", &format!("[\"{ALPN}\"]"))
        .start();
    wait_refused(&front, "SNI");
    drop(by_address);
    assert_eq!(front.sessions().len(), 1, "only the profiled agent got in");
}

/// Streams through an outage of `outage` and returns the session after it, the agent's
/// `publishes_paced_total`, and how long catching up took.
fn catch_up_after(
    outage: Duration,
    profile: impl FnOnce(TestAgentBuilder) -> TestAgentBuilder,
) -> (ember_testkit::iot_core::Session, f64, Duration) {
    let pki = TestPki::new("Ember test CA");
    let broker = TestBroker::start_with_conf(IOT_CORE_LIMITS);
    let front = IotCoreFront::start(&pki, ENDPOINT, true, broker.port());
    let sub = Subscriber::start(broker.port(), ALL_TOPICS);
    let cert = pki.client("edge-1", "edge-1", 30);
    // 200 samples/s in messages of 10 records: 20 messages/s live, so an outage leaves a
    // backlog of 20 messages per second of it.
    let a = profile(aws_agent("edge-1", &pki, &cert, front.port()))
        .mqtt("message_max_records", "10")
        .sim("imu", 200.0, 3)
        .start();
    wait_highest_above(&sub, "edge-1", "imu", 200, LONG);
    front.set_down(true);
    // The outage is the scenario, not a wait for a condition.
    std::thread::sleep(outage);
    front.set_down(false);
    let back = Instant::now();
    let sessions_before = front.sessions().len();
    assert!(
        wait_until(SHORT, || front.sessions().len() > sessions_before),
        "the agent did not reconnect; refused: {:?}",
        front.refused()
    );
    // Caught up: the uplink reports Online again once its backlog is a message or two.
    let captured = a.metric("records_enqueued_total");
    wait_all_delivered(&sub, "edge-1", "imu", captured as u64, LONG);
    let caught_up = back.elapsed();
    let paced = a.metric("publishes_paced_total");
    stop_gracefully(&a, LONG);
    let last = stream_status(&final_status(&sub, "edge-1"), "imu").last_seq;
    wait_all_delivered(&sub, "edge-1", "imu", last, SHORT);
    sub.with_view(assert_clean_delivery);
    let session = front.sessions().pop().expect("a session after the outage");
    (session, paced, caught_up)
}

/// IoT Core allows 100 publishes per second per connection. After a 60 s outage the agent
/// holds 1,200 messages; the profile's pacing sends them at most 90 per second (plus status
/// and heartbeat), so no second of the catch-up exceeds the quota, and nothing is lost.
#[test]
fn catching_up_after_a_60_s_outage_stays_under_iot_cores_publish_rate() {
    let (session, paced, caught_up) = catch_up_after(Duration::from_secs(60), |b| b);
    let max = session.max_per_second();
    eprintln!(
        "catch-up after 60 s: {} publishes on the new connection, at most {max} in one second, caught up in {caught_up:?}, paced {paced} times",
        session.publishes.len()
    );
    assert!(
        max <= PUBLISH_PER_SECOND,
        "{max} publishes within one second: IoT Core throttles above {PUBLISH_PER_SECOND}"
    );
    assert!(
        session.publishes.len() >= 1000,
        "the backlog should be over 1,000 messages, got {}",
        session.publishes.len()
    );
    assert!(
        max >= 80,
        "the catch-up should run near the limit, got {max}/s"
    );
    assert!(paced > 0.0, "the pacer never held a message back");
}

/// The control: without the profile's pacing the same catch-up, after only 10 s, bursts
/// far above the quota (what IoT Core would throttle), so the test above can fail.
#[test]
fn without_pacing_the_catch_up_bursts_above_iot_cores_publish_rate() {
    let (session, paced, _) = catch_up_after(Duration::from_secs(10), |b| {
        b.mqtt("profile", "\"generic\"")
            .mqtt("max_publish_rate", "0")
    });
    let max = session.max_per_second();
    eprintln!("unpaced catch-up after 10 s: at most {max} publishes in one second");
    assert!(
        max > PUBLISH_PER_SECOND,
        "an unpaced catch-up of 200 messages should exceed {PUBLISH_PER_SECOND}/s, got {max}"
    );
    assert_eq!(paced, 0.0);
}
