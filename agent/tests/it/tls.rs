//! Security: mutual TLS to a Mosquitto that applies the Ember per-device ACL, certificate
//! checks on both sides, private key hygiene and certificate rotation (docs/security.md).

use std::os::unix::fs::PermissionsExt;
use std::time::{SystemTime, UNIX_EPOCH};

use ember_proto::{Encoding, TelemetryBatch};
use ember_testkit::tls::{RawClient, TestPki, client_config, try_connect, write_file};
use ember_testkit::{ALL_TOPICS, Subscriber, TestBroker, wait_until};

use crate::common::*;

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

fn fleet_subscriber(pki: &TestPki, broker: &TestBroker) -> Subscriber {
    Subscriber::start_tls(
        broker.port(),
        ALL_TOPICS,
        client_config(pki.ca_pem(), Some(&pki.fleet())),
    )
}

/// The broker lets in only clients with a current certificate from its own CA.
#[test]
fn broker_refuses_clients_without_a_valid_certificate() {
    let pki = TestPki::new("Ember test CA");
    let other = TestPki::new("Another CA");
    let broker = TestBroker::start_tls(&pki);
    let port = broker.port();

    let ok = pki.client("good", "dev-ok", 30);
    assert_eq!(
        try_connect(port, client_config(pki.ca_pem(), Some(&ok))),
        Ok(()),
        "a device with a valid certificate must get in"
    );
    let none = try_connect(port, client_config(pki.ca_pem(), None));
    assert!(none.is_err(), "no client certificate: {none:?}");
    let expired = pki.client_valid("expired", "dev-old", now_s() - 2 * 86_400, now_s() - 86_400);
    let r = try_connect(port, client_config(pki.ca_pem(), Some(&expired)));
    assert!(r.is_err(), "an expired certificate: {r:?}");
    let foreign = other.client("foreign", "dev-ok", 30);
    let r = try_connect(port, client_config(pki.ca_pem(), Some(&foreign)));
    assert!(r.is_err(), "a certificate from another CA: {r:?}");
}

/// Device A, with a valid certificate of its own, can neither inject into device B's topics
/// (the fleet identity never sees it) nor read B's traffic.
#[test]
fn a_device_cannot_publish_or_subscribe_to_another_devices_topics() {
    let pki = TestPki::new("Ember test CA");
    let broker = TestBroker::start_tls(&pki);
    let fleet = fleet_subscriber(&pki, &broker);
    let dev_b = "dev-b";
    let b_cert = pki.client("dev-b", dev_b, 30);
    let agent_b = agent(dev_b, broker.port())
        .tls(pki.ca_file(), &b_cert)
        .sim("imu", 100.0, 3)
        .start();
    wait_highest_above(&fleet, dev_b, "imu", 0, SHORT);

    let a_cert = pki.client("dev-a", "dev-a", 30);
    let a = RawClient::connect(
        "dev-a",
        broker.port(),
        client_config(pki.ca_pem(), Some(&a_cert)),
    );

    // Reading: A subscribes to B's topics and to everything; B keeps publishing, and none of
    // it may reach A.
    let codes_b = a.subscribe("ember/v1/dev-b/#");
    let codes_all = a.subscribe("ember/v1/#");
    let seen = highest(&fleet, dev_b, "imu");
    wait_highest_above(&fleet, dev_b, "imu", seen + 20, SHORT);
    let leaked: Vec<String> = a
        .received()
        .into_iter()
        .map(|(t, _)| t)
        .filter(|t| t.starts_with("ember/"))
        .collect();
    assert!(
        leaked.is_empty(),
        "A read other devices' topics (SUBACK codes {codes_b:?} {codes_all:?}): {leaked:?}"
    );

    // Writing: forged telemetry and status for B. Mosquitto 2.0.11 acknowledges a publish its
    // ACL denies and drops it, keeping the connection (MQTT 3.1.1). Then markers on A's own
    // topic until one reaches the fleet: the broker handles one client's packets in order, so
    // by then it has dealt with the forgeries.
    let forged_seq = 9_000_000;
    let mut forged = TelemetryBatch::new(dev_b, "imu");
    forged.push(forged_seq, 1, vec![6.66, 6.66, 6.66]);
    let forged = ember_proto::message::encode(&forged, Encoding::Json).expect("encode");
    a.publish("ember/v1/dev-b/telemetry", forged);
    a.publish("ember/v1/dev-b/status", b"{\"v\":1}".to_vec());
    let mut marker_seq = 0;
    let mut marker_arrived = || {
        wait_until(SHORT, || {
            if !a.is_connected() {
                return false;
            }
            marker_seq += 1;
            let mut marker = TelemetryBatch::new("dev-a", "marker");
            marker.push(marker_seq, 1, vec![1.0]);
            a.publish(
                "ember/v1/dev-a/telemetry",
                ember_proto::message::encode(&marker, Encoding::Json).expect("encode"),
            );
            let seq = marker_seq;
            fleet.wait_for(
                |v| {
                    v.stream("dev-a", "marker")
                        .is_some_and(|s| s.records.contains_key(&seq))
                },
                std::time::Duration::from_secs(2),
            )
        })
    };
    assert!(
        marker_arrived(),
        "A's message on its own topic must reach the fleet; broker log:\n{}",
        broker.log_text()
    );
    let seen = highest(&fleet, dev_b, "imu");
    wait_highest_above(&fleet, dev_b, "imu", seen + 5, SHORT);
    let b_log = fleet
        .with_view(|v| v.stream(dev_b, "imu").cloned())
        .expect("B's stream");
    assert!(
        !b_log.records.contains_key(&forged_seq),
        "the forged record reached the fleet"
    );
    assert_eq!(b_log.conflicts, 0);
    let b_status = fleet.with_view(|v| v.status(dev_b).cloned());
    assert!(
        b_status.is_some_and(|s| s.device == dev_b),
        "B's status must be B's own"
    );
    assert_eq!(
        fleet.with_view(|v| v.decode_errors),
        0,
        "a forged payload reached the fleet identity"
    );
    assert_no_panic(&agent_b);

    // B's desired-state topic as B sees it (B may read its own; only the fleet may write it).
    // One device, one connection: the broker refuses a second client id for B's certificate,
    // so B's own connection is the agent's until it stops.
    stop_gracefully(&agent_b, SHORT);
    let b_watch = RawClient::connect(
        dev_b,
        broker.port(),
        client_config(pki.ca_pem(), Some(&b_cert)),
    );
    let codes = b_watch.subscribe("ember/v1/dev-b/desired");
    assert!(
        !format!("{codes:?}").contains("Failure"),
        "B may read its own desired state: {codes:?}"
    );
    a.publish("ember/v1/dev-b/desired", b"{}".to_vec());
    assert!(
        marker_arrived(),
        "A's message on its own topic must reach the fleet; broker log:\n{}",
        broker.log_text()
    );
    // The forged desired state never reached B; the fleet identity's does.
    let fleet_writer = RawClient::connect(
        "fleet-desired",
        broker.port(),
        client_config(pki.ca_pem(), Some(&pki.fleet())),
    );
    fleet_writer.publish("ember/v1/dev-b/desired", b"from-the-fleet".to_vec());
    let desired = || -> Vec<Vec<u8>> {
        b_watch
            .received()
            .into_iter()
            .filter(|(t, _)| t == "ember/v1/dev-b/desired")
            .map(|(_, p)| p)
            .collect()
    };
    assert!(
        wait_until(SHORT, || !desired().is_empty()),
        "the fleet identity must be able to write B's desired state; broker log:\n{}",
        broker.log_text()
    );
    assert_eq!(
        desired(),
        vec![b"from-the-fleet".to_vec()],
        "only the fleet's desired state may reach B"
    );
}

/// An agent that pins another CA refuses the broker's certificate and says why.
#[test]
fn agent_refuses_a_broker_certificate_from_an_untrusted_ca() {
    let pki = TestPki::new("Ember test CA");
    let other = TestPki::new("Another CA");
    let broker = TestBroker::start_tls(&pki);
    let cert = pki.client("dev-c", "dev-c", 30);
    let agent = agent("dev-c", broker.port())
        .tls(other.ca_file(), &cert)
        .sim("imu", 50.0, 1)
        .start();
    assert!(
        wait_until(SHORT, || agent
            .stderr_text()
            .contains("the broker's certificate was refused")),
        "the agent should log that it refused the broker's certificate; stderr:\n{}",
        agent.stderr_text()
    );
    assert_eq!(agent.metric("connected"), 0.0);
    assert_eq!(agent.metric("records_acked_total"), 0.0);
}

/// A private key readable by others stops the agent before it does anything (exit 2).
#[test]
fn agent_refuses_to_start_with_a_world_readable_key() {
    let pki = TestPki::new("Ember test CA");
    let cert = pki.client("dev-d", "dev-d", 30);
    std::fs::set_permissions(&cert.key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let agent = agent("dev-d", 1)
        .tls(pki.ca_file(), &cert)
        .sim("imu", 10.0, 1)
        .spawn();
    let status = agent.wait_exit(SHORT);
    let stderr = agent.stderr_text();
    assert_eq!(status.code(), Some(2), "stderr:\n{stderr}");
    assert!(
        stderr.contains("mqtt.tls.key_file") && stderr.contains("chmod 600"),
        "the error should name the key and the fix: {stderr}"
    );
    assert!(
        !stderr.contains(cert.key_pem.trim()),
        "the key leaked into stderr"
    );
    assert!(
        !agent.data_dir().exists(),
        "nothing may be created before the configuration is accepted"
    );
}

/// The certificate is replaced on disk while the agent streams; SIGHUP makes it reconnect with
/// the new one. No record is lost, and the metric shows the new expiry.
#[test]
fn certificate_rotation_keeps_every_record() {
    let pki = TestPki::new("Ember test CA");
    let mut broker = TestBroker::start_tls(&pki);
    let fleet = fleet_subscriber(&pki, &broker);
    let dev = "dev-rot";
    let first = pki.client("dev-rot-1", dev, 30);
    // The agent's own files, replaced in place (atomic renames) during the test.
    let cert_file = pki.dir().join("agent.pem");
    let key_file = pki.dir().join("agent.key");
    write_file(&cert_file, &first.cert_pem, 0o644);
    write_file(&key_file, &first.key_pem, 0o600);
    let live = ember_testkit::tls::CertFiles {
        cert: cert_file.clone(),
        key: key_file.clone(),
        ..first.clone()
    };
    let agent = agent(dev, broker.port())
        .tls(pki.ca_file(), &live)
        .sim("imu", 200.0, 3)
        .start();
    agent.expect_metric(
        "tls_client_cert_expiry_timestamp_seconds",
        |v| v as i64 == first.not_after,
        SHORT,
    );
    wait_highest_above(&fleet, dev, "imu", 50, SHORT);

    let second = pki.client("dev-rot-2", dev, 90);
    assert_ne!(second.not_after, first.not_after);
    write_file(&key_file, &second.key_pem, 0o600);
    write_file(&cert_file, &second.cert_pem, 0o644);
    agent.sighup();
    agent.expect_metric(
        "tls_client_cert_expiry_timestamp_seconds",
        |v| v as i64 == second.not_after,
        SHORT,
    );
    agent.expect_metric("reconnects_total", |v| v >= 1.0, SHORT);
    let seen = highest(&fleet, dev, "imu");
    wait_highest_above(&fleet, dev, "imu", seen + 50, SHORT);

    stop_gracefully(&agent, SHORT);
    let fin = final_status(&fleet, dev);
    let last = stream_status(&fin, "imu").last_seq;
    wait_all_delivered(&fleet, dev, "imu", last, SHORT);
    assert_clean_delivery(&fleet.snapshot());
    let log = broker.log_text();
    assert!(
        log.matches(&format!("u'{dev}'")).count() >= 2,
        "the broker should have seen {dev} connect twice under the same user name:\n{log}"
    );
    assert!(
        agent
            .stderr_text()
            .contains("Loaded a new client certificate."),
        "{}",
        agent.stderr_text()
    );
    assert_no_panic(&agent);
    broker.stop();
}
