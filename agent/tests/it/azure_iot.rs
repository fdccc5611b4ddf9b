//! The `azure-iot-hub` connection profile against a stand-in for IoT Hub's MQTT front door
//! and device twin (`ember_testkit::iot_hub`: TLS with SNI, client id = device id, the
//! username IoT Hub requires, SAS tokens checked against the device key and enforced at their
//! expiry, no retain, fixed topics) in front of a Mosquitto configured like IoT Hub
//! (`retain_available false`, per-device topic ACL). Not tested here: the real service
//! (docs/deploy-azure.md says what that leaves open).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ember_proto::{DesiredState, OtaState, ShadowPolicy};
use ember_testkit::iot_hub::{IotHubFront, TwinResponder, start_broker};
use ember_testkit::tls::TestPki;
use ember_testkit::{Subscriber, TestAgentBuilder, wait_until};

use crate::common::*;
use crate::ota::{BundleServer, desired_entry, make_bundle, ota_builder, serving, wait_report};

/// The host name the front answers to (its certificate is for `localhost`; a real hub is
/// `<name>.azure-devices.net`).
const HUB: &str = "localhost";
const DEVICE: &str = "edge-az";
/// The device's symmetric key as Azure shows it (base64), and another one.
const KEY: &str = "c2VjcmV0LWRldmljZS1rZXktZm9yLWVkZ2UtYXotMDAwMA==";
const WRONG_KEY: &str = "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXktMDAwMA==";
/// Every events topic (the test subscriber reads them all).
const EVENTS: &str = "devices/+/messages/events/#";

fn key_file(dir: &Path, name: &str, key: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("{key}\n")).expect("write the key");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    p
}

/// `builder` with the `azure-iot-hub` profile: the hub `HUB` on the front's `port`, TLS
/// trusting the test CA, a SAS token from `key` valid `ttl_s` seconds.
fn azure(
    builder: TestAgentBuilder,
    pki: &TestPki,
    key: &Path,
    port: u16,
    ttl_s: u64,
) -> TestAgentBuilder {
    builder
        .broker_port(port)
        .mqtt("profile", "\"azure-iot-hub\"")
        .mqtt("host", &format!("\"{HUB}\""))
        .mqtt("delivery", "\"puback\"")
        .mqtt("sas_key_file", &format!("'{}'", key.display()))
        .mqtt("sas_token_ttl_s", &ttl_s.to_string())
        .mqtt("twin_report_min_interval_s", "2")
        .mqtt("reconnect_min_ms", "200")
        .mqtt("reconnect_max_ms", "1000")
        .set(
            "mqtt.tls",
            "ca_file",
            &format!("'{}'", pki.ca_file().display()),
        )
}

fn wait_refused(front: &IotHubFront, what: &str) {
    assert!(
        wait_until(SHORT, || front.refused().iter().any(|r| r.contains(what))),
        "the front should refuse a connection for {what:?}; refused: {:?}",
        front.refused()
    );
}

/// One agent through IoT Hub's rules for more than a SAS token's lifetime: it gets in with
/// the right username and token; every message goes to its events topic with Ember's
/// properties, never retained; it renews its token before expiry by reconnecting, and no
/// record is lost or repeated across that; its status reaches the twin's reported properties
/// (rate-limited); a model version set in the twin's desired properties is installed (the
/// whole OTA path: download, verify, shadow, switch) and reported back through the twin. The
/// same agent with a wrong key or without the profile is refused for exactly that; with its
/// X.509 certificate instead of a SAS key it gets in, and with another device's it does not.
#[test]
fn the_azure_iot_hub_profile_streams_events_renews_its_token_and_follows_the_twin() {
    let pki = TestPki::new("Ember test CA");
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = start_broker(dir.path());
    let front = IotHubFront::start(&pki, HUB, &[(DEVICE, KEY)], broker.port());
    let twin = TwinResponder::start(broker.port());
    let sub = Subscriber::start(broker.port(), EVENTS);
    let server = BundleServer::start();
    let v110 = make_bundle("1.1.0", None, |_| {});
    let path = "/api/v1/models/activity/1.1.0/bundle";
    server.put(path, v110.clone());
    let key = key_file(dir.path(), "device.key", KEY);

    // A 30 s token: renewed after 24 s, well inside the test.
    let a = azure(
        ota_builder(DEVICE, &broker, &server, dir.path()),
        &pki,
        &key,
        front.port(),
        30,
    )
    .sim("imu", 50.0, 3)
    .start();
    wait_highest_above(&sub, DEVICE, "imu", 100, LONG);
    let first = front.sessions();
    assert_eq!(first.len(), 1, "refused: {:?}", front.refused());
    assert_eq!(
        first[0].username,
        format!("{HUB}/{DEVICE}/?api-version=2021-04-12")
    );
    assert!(twin.gets() >= 1, "the agent reads its twin on connect");

    // The desired state as the fleet's azure-twin sink writes it: property "ember".
    let mut want = desired_entry("1.1.0", &v110, path);
    want.shadow = Some(ShadowPolicy {
        windows: 20,
        min_agreement: 0.5,
        max_latency_ratio: 50.0,
    });
    let mut desired = DesiredState::new(DEVICE);
    desired.models = vec![want];
    let state: serde_json::Value = serde_json::from_slice(
        &ember_proto::message::encode(&desired, ember_proto::Encoding::Json).expect("encode"),
    )
    .expect("JSON");
    twin.set_desired(serde_json::json!({ "ember": state }));
    wait_report(&sub, DEVICE, "1.1.0", OtaState::Active);
    assert_eq!(serving(&sub, DEVICE).as_deref(), Some("1.1.0"));
    // The same report reaches the twin's reported properties.
    let reported_active = || {
        twin.reported()["ember"]["ota"].as_array().is_some_and(|r| {
            r.iter()
                .any(|r| r["version"] == "1.1.0" && r["state"] == "active")
        })
    };
    assert!(
        wait_until(SHORT, reported_active),
        "the twin's reported properties lack the active 1.1.0: {}",
        twin.reported()
    );

    // Past the first token's expiry: the agent renewed it before, by reconnecting, and the
    // stream goes on (the front would have closed the first session at its expiry).
    assert!(
        wait_until(LONG, || {
            let s = front.sessions();
            s.len() >= 2 && s[0].closed.is_some()
        }),
        "the agent did not reconnect with a new token; sessions: {:?}",
        front.sessions()
    );
    let past_expiry = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
            > first[0].expiry + 1
    };
    assert!(wait_until(LONG, past_expiry));
    let marks = a.metric("records_enqueued_total");
    assert!(
        sub.wait_for(|v| v.unique(DEVICE, "imu") as f64 > marks, LONG),
        "the stream stalled after the renewal"
    );
    let renewals = a.metric("sas_renewals_total");
    stop_gracefully(&a, LONG);
    let last = stream_status(&final_status(&sub, DEVICE), "imu").last_seq;
    wait_all_delivered(&sub, DEVICE, "imu", last, SHORT);
    sub.with_view(assert_clean_delivery);
    assert_no_panic(&a);

    let sessions = front.sessions();
    assert!(renewals >= 1.0, "sas_renewals_total = {renewals}");
    for s in &sessions {
        assert_eq!(
            s.closed_by_front, None,
            "the front had to close a session: {s:?}"
        );
    }
    assert!(front.refused().is_empty(), "{:?}", front.refused());
    let patches = twin.reported_patches();
    assert!(!patches.is_empty(), "no reported patch reached the twin");
    // At most one patch per 2 s (twin_report_min_interval_s), measured where they arrive: a
    // little delivery jitter is allowed, a burst is not.
    let span = patches[patches.len() - 1].0.duration_since(patches[0].0);
    let allowed = span.as_secs_f64() / 2.0 + 2.0;
    assert!(
        patches.len() as f64 <= allowed,
        "{} twin reports in {span:?}: more than one per twin_report_min_interval_s (2 s)",
        patches.len()
    );
    eprintln!(
        "azure: {} sessions (token renewed {renewals} times), {} imu records once each, {} twin GETs, {} reported patches",
        sessions.len(),
        last,
        twin.gets(),
        patches.len()
    );

    // The checks are real: a wrong key and a generic client are refused, for that reason.
    let wrong = key_file(dir.path(), "wrong.key", WRONG_KEY);
    let bad = azure(
        agent(DEVICE, front.port()),
        &pki,
        &wrong,
        front.port(),
        3600,
    )
    .sim("imu", 10.0, 1)
    .start();
    wait_refused(&front, "signature does not match");
    drop(bad);
    let generic = agent(DEVICE, front.port())
        .mqtt("host", &format!("\"{HUB}\""))
        .set(
            "mqtt.tls",
            "ca_file",
            &format!("'{}'", pki.ca_file().display()),
        )
        .sim("imu", 10.0, 1)
        .start();
    wait_refused(&front, "username");
    drop(generic);

    // X.509 instead of SAS: the device's certificate (common name = device id) and no
    // password; a certificate for another device is refused.
    let x509 = |cn: &str| {
        let cert = pki.client(&format!("x509-{cn}"), cn, 30);
        agent(DEVICE, front.port())
            .mqtt("profile", "\"azure-iot-hub\"")
            .mqtt("host", &format!("\"{HUB}\""))
            .mqtt("reconnect_min_ms", "200")
            .mqtt("reconnect_max_ms", "1000")
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
            .sim("x509", 20.0, 1)
    };
    let other = x509("edge-other").start();
    wait_refused(&front, "the client certificate is for \"edge-other\"");
    drop(other);
    let before = front.sessions().len();
    let by_cert = x509(DEVICE).start();
    wait_highest_above(&sub, DEVICE, "x509", 20, LONG);
    let s = front.sessions();
    let s = s[before..]
        .iter()
        .find(|s| s.expiry == u64::MAX)
        .expect("an X.509 session");
    assert_eq!(
        s.username,
        format!("{HUB}/{DEVICE}/?api-version=2021-04-12")
    );
    stop_gracefully(&by_cert, LONG);
    let last = stream_status(&final_status(&sub, DEVICE), "x509").last_seq;
    wait_all_delivered(&sub, DEVICE, "x509", last, SHORT);
}
