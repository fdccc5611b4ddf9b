//! The rollout service in a running fleet: real Mosquitto, the fleet, simulated devices (MQTT
//! clients that publish retained statuses with `ota` reports and watch their retained desired
//! state).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use ember_fleet::config::{Backend, DatabaseSettings};
use ember_fleet::db::Db;
use ember_proto::ota::{DesiredState, OtaReport, OtaState};
use ember_proto::{DeviceState, Status};
use ember_testkit::{TestBroker, wait_until};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::api::token_cli;
use crate::on_both_backends;
use crate::support::mqtt::{Msg, publish};
use crate::support::{ADMIN, Kind, Store, TestFleet, WAIT, client_id, now_us};

on_both_backends!(a_rollout_goes_from_canary_to_completed);

/// Every desired state received, per device, in order (retained ones included).
pub(crate) struct Watcher {
    seen: Arc<Mutex<BTreeMap<String, Vec<DesiredState>>>>,
    stop: CancellationToken,
    thread: Option<JoinHandle<()>>,
}

impl Watcher {
    /// Subscribes to every device's desired topic; returns once the broker confirmed.
    pub(crate) fn start(port: u16) -> Watcher {
        let seen: Arc<Mutex<BTreeMap<String, Vec<DesiredState>>>> = Arc::default();
        let stop = CancellationToken::new();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    let mut opts = MqttOptions::new(client_id(), "127.0.0.1", port);
                    opts.set_keep_alive(Duration::from_secs(5));
                    let (client, mut el) = AsyncClient::new(opts, 10);
                    loop {
                        let ev = tokio::select! {
                            _ = stop.cancelled() => return,
                            ev = el.poll() => ev,
                        };
                        match ev {
                            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                                client
                                    .try_subscribe("ember/v1/+/desired", QoS::AtLeastOnce)
                                    .expect("subscribe");
                            }
                            Ok(Event::Incoming(Packet::SubAck(_))) => {
                                let _ = ready_tx.send(());
                            }
                            Ok(Event::Incoming(Packet::Publish(p))) => {
                                let (d, _) = ember_proto::message::decode_desired(&p.payload)
                                    .expect("the fleet publishes valid desired states");
                                let device = p.topic.split('/').nth(2).unwrap_or("").to_string();
                                assert_eq!(d.device, device, "desired state on the wrong topic");
                                seen.lock()
                                    .expect("lock")
                                    .entry(device)
                                    .or_default()
                                    .push(d);
                            }
                            Ok(_) => {}
                            Err(e) => panic!("watcher: {e}"),
                        }
                    }
                });
            })
        };
        ready_rx
            .recv_timeout(WAIT)
            .expect("the watcher did not subscribe");
        Watcher {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn devices(&self) -> Vec<String> {
        self.seen.lock().expect("lock").keys().cloned().collect()
    }

    pub(crate) fn latest(&self, device: &str) -> Option<DesiredState> {
        self.seen
            .lock()
            .expect("lock")
            .get(device)
            .and_then(|v| v.last().cloned())
    }

    /// Waits until the latest desired state of `device` names `version` of `model`.
    pub(crate) fn wait_version(&self, device: &str, model: &str, version: &str) -> DesiredState {
        let ok = wait_until(WAIT, || {
            self.latest(device).is_some_and(|d| {
                d.models
                    .iter()
                    .any(|m| m.name == model && m.version.as_deref() == Some(version))
            })
        });
        assert!(
            ok,
            "{device} was not told {model} {version} within {WAIT:?}; latest: {:?}",
            self.latest(device)
        );
        self.latest(device).expect("seen")
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A retained online status of `device` running `model` `running`, with one OTA report.
pub(crate) fn report(
    port: u16,
    device: &str,
    model: &str,
    running: &str,
    ota: Option<(&str, &str, OtaState, Option<&str>)>,
) {
    let mut s = Status::offline(device);
    s.state = DeviceState::Online;
    s.ts = now_us();
    s.agent_version = Some("sim".into());
    s.models.insert(model.into(), running.into());
    if let Some((version, rollout, state, reason)) = ota {
        s.ota.push(OtaReport {
            model: model.into(),
            version: version.into(),
            rollout: Some(rollout.into()),
            state,
            reason: reason.map(str::to_string),
            ts: now_us(),
            agreement: None,
            latency_ratio: None,
        });
    }
    publish(port, vec![Msg::status(&s)]);
}

/// Registers `model` `version` in the registry table directly (the upload route is another
/// part's; the rollout service only reads the table).
pub(crate) fn register_model(
    store: &Store,
    kind: Kind,
    model: &str,
    version: &str,
    deprecated: bool,
) {
    let settings = DatabaseSettings {
        url: store.url(),
        backend: match kind {
            Kind::Sqlite => Backend::Sqlite,
            Kind::Postgres => Backend::Postgres,
        },
        max_connections: 1,
        token_source: None,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let db = Db::open(&settings).await.expect("open the test database");
        let mut q = ember_fleet::db::Sql::new(
            "INSERT INTO models (name, version, kind, precision, sha256, size, key_id, manifest, blob_key, deprecated, created_at) VALUES (",
        );
        let digest = format!("{:0>64}", format!("{:x}", version.len() * 7919));
        q.bind(model)
            .push(", ")
            .bind(version)
            .push(", 'activity', 'f32', ")
            .bind(digest)
            .push(", 29711, 'test-key', '{}', ")
            .bind(format!("blobs/{model}-{version}"))
            .push(if deprecated { ", TRUE, " } else { ", FALSE, " })
            .bind(now_us() as i64)
            .push(")");
        q.query()
            .execute(db.pool())
            .await
            .expect("insert a registry row");
        db.close().await;
    });
}

/// Devices announce themselves running `model` 1.0.0 and the fleet has registered them.
pub(crate) fn bring_up(fleet: &TestFleet, port: u16, devices: &[&str], model: &str) {
    for d in devices {
        report(port, d, model, "1.0.0", None);
    }
    for d in devices {
        let ok = wait_until(WAIT, || {
            let r = fleet.get(&format!("/api/v1/devices/{d}"));
            r.status == 200 && r.json()["models"][model] == "1.0.0"
        });
        assert!(ok, "device {d} was not registered with its status");
    }
}

pub(crate) fn create(fleet: &TestFleet, body: Value) -> Value {
    let r = fleet.request("POST", "/api/v1/rollouts", Some(ADMIN), Some(&body));
    assert_eq!(r.status, 201, "create: {}", r.body);
    r.json()
}

pub(crate) fn rollout(fleet: &TestFleet, id: &str) -> Value {
    fleet.get_json(&format!("/api/v1/rollouts/{id}"))
}

/// Waits until the rollout satisfies `pred`; panics with the last view.
pub(crate) fn wait_rollout(
    fleet: &TestFleet,
    id: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let mut last = Value::Null;
    let ok = wait_until(WAIT, || {
        last = rollout(fleet, id);
        pred(&last)
    });
    assert!(
        ok,
        "rollout {id} did not reach {what} within {WAIT:?}: {last:#}"
    );
    last
}

fn device_state(v: &Value, device: &str) -> String {
    v["devices"]
        .as_array()
        .and_then(|ds| ds.iter().find(|d| d["device_id"] == device))
        .map(|d| d["state"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

/// Tags select four devices; the canary's retained desired state reaches a subscriber that
/// connects after it was published, nobody else is told anything until the canary is active;
/// then wave after wave to completed. Device tokens read their own desired state only; read
/// tokens cannot create or command.
fn a_rollout_goes_from_canary_to_completed(kind: Kind) {
    let broker = TestBroker::start();
    let store = Store::new(kind);
    let fleet = TestFleet::start(&store, broker.port());
    let port = broker.port();
    let ring = ["d-0", "d-1", "d-2", "d-3"];
    bring_up(
        &fleet,
        port,
        &["d-0", "d-1", "d-2", "d-3", "other"],
        "activity",
    );
    for d in ring {
        let r = fleet.request(
            "PUT",
            &format!("/api/v1/devices/{d}/tags"),
            Some(ADMIN),
            Some(&json!({"tags": {"ring": "beta"}})),
        );
        assert_eq!(r.status, 200, "{}", r.body);
    }
    register_model(&store, kind, "activity", "2.0.0", false);

    let read = token_cli(&fleet.db_url, &["create", "--scope", "read"]);
    let body = json!({
        "model": "activity", "version": "2.0.0",
        "targets": {"tags": ["ring=beta"]},
        "shadow": {"windows": 20, "min_agreement": 0.9, "max_latency_ratio": 3.0}
    });
    let r = fleet.request("POST", "/api/v1/rollouts", Some(&read), Some(&body));
    assert_eq!(r.status, 403, "a read token must not create: {}", r.body);

    let created = create(&fleet, body);
    let id = created["id"].as_str().expect("id").to_string();
    assert_eq!(created["state"], "running");
    assert_eq!(created["devices"].as_array().map(Vec::len), Some(4));
    assert_eq!(device_state(&created, "d-0"), "assigned");
    assert_eq!(device_state(&created, "d-1"), "pending");
    let r = fleet.request(
        "POST",
        &format!("/api/v1/rollouts/{id}/pause"),
        Some(&read),
        None,
    );
    assert_eq!(r.status, 403, "a read token must not command: {}", r.body);

    // Published and acknowledged, then a late subscriber still gets it (retained).
    wait_rollout(&fleet, &id, "the canary published", |v| {
        v["pending_publish"] == 0
    });
    let watcher = Watcher::start(port);
    let d = watcher.wait_version("d-0", "activity", "2.0.0");
    let m = &d.models[0];
    assert_eq!(m.rollout.as_deref(), Some(id.as_str()));
    assert_eq!(
        m.url.as_deref(),
        Some("/api/v1/models/activity/2.0.0/bundle")
    );
    assert_eq!(m.size, Some(29711));
    assert!(m.sha256.is_some());
    assert_eq!(m.shadow.map(|s| s.windows), Some(20));
    assert_eq!(watcher.devices(), vec!["d-0".to_string()]);

    // What the device is told, over HTTP: its own token yes, another device's no.
    let own = token_cli(&fleet.db_url, &["create", "--scope", "device:d-0"]);
    let r = fleet.request("GET", "/api/v1/devices/d-0/desired", Some(&own), None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["models"][0]["version"], "2.0.0");
    let r = fleet.request("GET", "/api/v1/devices/d-1/desired", Some(&own), None);
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(
        fleet.get_json("/api/v1/devices/d-1/desired")["models"],
        json!([])
    );

    // The canary goes through the stages; the next waves follow only once it is active.
    report(
        port,
        "d-0",
        "activity",
        "1.0.0",
        Some(("2.0.0", &id, OtaState::Downloading, None)),
    );
    report(
        port,
        "d-0",
        "activity",
        "1.0.0",
        Some(("2.0.0", &id, OtaState::Verified, None)),
    );
    wait_rollout(&fleet, &id, "canary verified", |v| {
        device_state(v, "d-0") == "verified"
    });
    assert_eq!(watcher.devices(), vec!["d-0".to_string()]);
    report(
        port,
        "d-0",
        "activity",
        "2.0.0",
        Some(("2.0.0", &id, OtaState::Active, None)),
    );

    // Every device told to install answers active, until the rollout completes.
    let mut answered = vec!["d-0".to_string()];
    let ok = wait_until(WAIT, || {
        for dev in watcher.devices() {
            if !answered.contains(&dev) {
                report(
                    port,
                    &dev,
                    "activity",
                    "2.0.0",
                    Some(("2.0.0", &id, OtaState::Active, None)),
                );
                answered.push(dev);
            }
        }
        rollout(&fleet, &id)["state"] == "completed"
    });
    let v = rollout(&fleet, &id);
    assert!(ok, "the rollout did not complete: {v:#}");
    assert_eq!(v["counts"]["active"], 4);
    assert!(
        v["waves"]
            .as_array()
            .is_some_and(|w| w.iter().all(|w| w["succeeded_at"].is_u64()))
    );
    assert_eq!(watcher.devices(), ring.map(str::to_string).to_vec());
    assert!(
        watcher.latest("other").is_none(),
        "an untargeted device was told something"
    );

    // The history, and the list.
    let events = fleet.get_json(&format!("/api/v1/rollouts/{id}/events"));
    let kinds: Vec<&str> = events["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert_eq!(kinds.first(), Some(&"created"));
    assert_eq!(kinds.last(), Some(&"completed"));
    assert!(kinds.contains(&"wave_started"));
    let list = fleet.get_json("/api/v1/rollouts");
    assert_eq!(list["items"][0]["id"], id.as_str());
    assert!(list["items"][0].get("devices").is_none());

    // A completed rollout cannot be paused: 409 with the reason.
    let r = fleet.request(
        "POST",
        &format!("/api/v1/rollouts/{id}/pause"),
        Some(ADMIN),
        None,
    );
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.body.contains("completed"), "{}", r.body);
}

/// A canary that fails pauses the rollout at once; no other device is told anything. The
/// operator rolls back: the canary is told its previous version again.
#[test]
fn a_failing_canary_pauses_the_rollout_and_rollback_restores_the_previous_version() {
    let broker = TestBroker::start();
    let store = Store::new(Kind::Sqlite);
    let fleet = TestFleet::start(&store, broker.port());
    let port = broker.port();
    bring_up(&fleet, port, &["a-0", "a-1", "a-2"], "activity");
    register_model(&store, Kind::Sqlite, "activity", "1.0.0", false);
    register_model(&store, Kind::Sqlite, "activity", "3.0.0", false);
    let watcher = Watcher::start(port);

    let created = create(
        &fleet,
        json!({"model": "activity", "version": "3.0.0", "targets": {"all": true},
               "waves": ["canary", "100%"]}),
    );
    let id = created["id"].as_str().expect("id").to_string();
    watcher.wait_version("a-0", "activity", "3.0.0");
    report(
        port,
        "a-0",
        "activity",
        "1.0.0",
        Some((
            "3.0.0",
            &id,
            OtaState::Failed,
            Some("golden vectors disagree"),
        )),
    );
    // (The canary's PUBACK may be recorded a moment after the watcher saw the message.)
    let v = wait_rollout(&fleet, &id, "paused, everything published", |v| {
        v["state"] == "paused" && v["pending_publish"] == 0
    });
    assert!(
        v["pause_reason"]
            .as_str()
            .unwrap_or("")
            .contains("failure threshold"),
        "{v:#}"
    );
    let a0 = v["devices"][0].clone();
    assert_eq!(a0["state"], "failed");
    assert_eq!(a0["reason"], "golden vectors disagree");
    assert_eq!(watcher.devices(), vec!["a-0".to_string()]);
    let events = fleet.get_json(&format!("/api/v1/rollouts/{id}/events"));
    assert!(events.to_string().contains("device_failed"), "{events:#}");

    // A second rollout of the model cannot take the same devices while this one is unfinished.
    let r = fleet.request(
        "POST",
        "/api/v1/rollouts",
        Some(ADMIN),
        Some(&json!({"model": "activity", "version": "1.0.0", "targets": {"devices": ["a-1"]}})),
    );
    assert_eq!(r.status, 409, "{}", r.body);

    // Paused: pausing again is refused with the state; rollback is not.
    let r = fleet.request(
        "POST",
        &format!("/api/v1/rollouts/{id}/pause"),
        Some(ADMIN),
        None,
    );
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.body.contains("paused"), "{}", r.body);
    let r = fleet.request(
        "POST",
        &format!("/api/v1/rollouts/{id}/rollback"),
        Some(ADMIN),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["state"], "rolled_back");
    let d = watcher.wait_version("a-0", "activity", "1.0.0");
    assert!(
        d.models[0].sha256.is_some(),
        "a registered previous version carries its digest"
    );
    assert_eq!(watcher.devices(), vec!["a-0".to_string()]);
    let r = fleet.request(
        "POST",
        &format!("/api/v1/rollouts/{id}/resume"),
        Some(ADMIN),
        None,
    );
    assert_eq!(r.status, 409, "{}", r.body);
}

/// Bad requests get specific 4xx answers.
#[test]
fn rollout_requests_are_checked() {
    let broker = TestBroker::start();
    let store = Store::new(Kind::Sqlite);
    let fleet = TestFleet::start(&store, broker.port());
    bring_up(&fleet, broker.port(), &["b-0"], "activity");
    register_model(&store, Kind::Sqlite, "activity", "2.0.0", false);
    register_model(&store, Kind::Sqlite, "activity", "0.9.0", true);
    let all = json!({"all": true});
    let cases = [
        (
            json!({"model": "activity", "version": "9.9.9", "targets": all}),
            404,
            "not registered",
        ),
        (
            json!({"model": "activity", "version": "0.9.0", "targets": all}),
            409,
            "deprecated",
        ),
        (
            json!({"model": "activity", "version": "2.0.0", "targets": {}}),
            400,
            "exactly one",
        ),
        (
            json!({"model": "activity", "version": "2.0.0", "targets": {"all": true, "devices": ["b-0"]}}),
            400,
            "exactly one",
        ),
        (
            json!({"model": "activity", "version": "2.0.0", "targets": {"devices": ["nope"]}}),
            404,
            "nope",
        ),
        // Well-formed but nothing to roll out to: not found, like an unknown device.
        (
            json!({"model": "activity", "version": "2.0.0", "targets": {"tags": ["none=here"]}}),
            404,
            "matches no",
        ),
        // Sizes outside the document's pattern (a plan that stops short of 100% is completed
        // with a last 100% wave instead: see the API tests).
        (
            json!({"model": "activity", "version": "2.0.0", "targets": all, "waves": ["canary", "148%"]}),
            400,
            "148%",
        ),
        (
            json!({"model": "activity", "version": "2.0.0", "targets": all, "waves": ["lots"]}),
            400,
            "lots",
        ),
        (
            json!({"model": "activity", "version": "2.0.0", "targets": all, "min_soak_s": u64::MAX}),
            400,
            "min_soak_s",
        ),
        (
            json!({"model": "activity", "version": "2.0.0", "targets": all, "failure_threshold": 1.0}),
            400,
            "failure_threshold",
        ),
        (
            json!({"model": "activity", "version": "2.0.0", "targets": all, "shadow": {"windows": 0, "min_agreement": 1, "max_latency_ratio": 2}}),
            400,
            "windows",
        ),
        (
            json!({"model": "a/b", "version": "2.0.0", "targets": all}),
            400,
            "model",
        ),
        (
            json!({"model": "activity", "version": "2.0.0", "targets": all, "surprise": 1}),
            400,
            "surprise",
        ),
    ];
    for (body, status, needle) in cases {
        let r = fleet.request("POST", "/api/v1/rollouts", Some(ADMIN), Some(&body));
        assert_eq!(r.status, status, "{body}: {}", r.body);
        assert!(
            r.body.contains(needle),
            "{body}: {} should mention {needle}",
            r.body
        );
    }
    for (method, path, status) in [
        ("GET", "/api/v1/rollouts/r-none", 404),
        ("GET", "/api/v1/rollouts/r-none/events", 404),
        ("POST", "/api/v1/rollouts/r-none/pause", 404),
        ("POST", "/api/v1/rollouts/r-none/explode", 404),
        ("GET", "/api/v1/rollouts?limit=0", 400),
        ("GET", "/api/v1/rollouts?cursor=zzz", 400),
        ("GET", "/api/v1/devices/ghost/desired", 404),
    ] {
        let r = fleet.request(method, path, Some(ADMIN), None);
        assert_eq!(r.status, status, "{method} {path}: {}", r.body);
    }
}

/// The fleet stops mid-rollout; the devices carry on meanwhile (retained statuses); a new
/// fleet on the same SQLite file resumes from the database and completes the rollout.
#[test]
fn a_fleet_restarted_mid_rollout_carries_on() {
    let broker = TestBroker::start();
    let store = Store::new(Kind::Sqlite);
    let port = broker.port();
    let fleet = TestFleet::start(&store, port);
    bring_up(&fleet, port, &["c-0", "c-1", "c-2"], "activity");
    register_model(&store, Kind::Sqlite, "activity", "2.0.0", false);
    let watcher = Watcher::start(port);
    let created = create(
        &fleet,
        json!({"model": "activity", "version": "2.0.0",
               "targets": {"devices": ["c-0", "c-1", "c-2"]}, "waves": ["canary", "100%"]}),
    );
    let id = created["id"].as_str().expect("id").to_string();
    watcher.wait_version("c-0", "activity", "2.0.0");
    report(
        port,
        "c-0",
        "activity",
        "2.0.0",
        Some(("2.0.0", &id, OtaState::Active, None)),
    );
    watcher.wait_version("c-1", "activity", "2.0.0");
    watcher.wait_version("c-2", "activity", "2.0.0");
    fleet.stop().expect("the fleet stops cleanly");

    for d in ["c-1", "c-2"] {
        report(
            port,
            d,
            "activity",
            "2.0.0",
            Some(("2.0.0", &id, OtaState::Active, None)),
        );
    }
    let fleet = TestFleet::start(&store, port);
    let v = wait_rollout(&fleet, &id, "completed after the restart", |v| {
        v["state"] == "completed"
    });
    assert_eq!(v["counts"]["active"], 3);
}

/// `ember-fleet rollout ...` against a running fleet over HTTP: create, list, show, pause,
/// rollback with --wait; a read token is refused with the API's message.
#[test]
fn the_cli_creates_lists_shows_and_commands_rollouts() {
    let broker = TestBroker::start();
    let store = Store::new(Kind::Sqlite);
    let fleet = TestFleet::start(&store, broker.port());
    bring_up(&fleet, broker.port(), &["e-0", "e-1"], "activity");
    register_model(&store, Kind::Sqlite, "activity", "2.0.0", false);
    let dir = tempfile::tempdir().expect("temp dir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{ADMIN}\n")).expect("write the token file");
    let url = format!("http://127.0.0.1:{}", fleet.port);
    let cli = |token: Option<&str>, args: &[&str]| {
        let mut cmd = std::process::Command::new(crate::support::fleet_bin());
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("EMBER_FLEET_") {
                cmd.env_remove(k);
            }
        }
        cmd.arg("rollout").arg("--url").arg(&url);
        match token {
            Some(t) => cmd.env("EMBER_FLEET_TOKEN", t),
            None => cmd.arg("--token-file").arg(&token_file),
        };
        let out = cmd.args(args).output().expect("cannot run ember-fleet");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, out, err) = cli(
        None,
        &[
            "--json",
            "create",
            "--model",
            "activity",
            "--version",
            "2.0.0",
            "--devices",
            "e-0,e-1",
            "--waves",
            "canary,100%",
            "--soak",
            "0",
            "--shadow-windows",
            "5",
            "--min-agreement",
            "0.8",
            "--max-latency-ratio",
            "2.5",
        ],
    );
    assert!(ok, "create failed: {err}");
    let v: Value = serde_json::from_str(&out).expect("--json prints JSON");
    let id = v["id"].as_str().expect("id").to_string();
    assert_eq!(v["shadow"]["windows"], 5);

    let (ok, out, err) = cli(None, &["list"]);
    assert!(ok, "{err}");
    assert!(out.contains(&id) && out.contains("running"), "{out}");
    let (ok, out, err) = cli(None, &["show", &id]);
    assert!(ok, "{err}");
    assert!(
        out.contains("wave 1 canary") && out.contains("created"),
        "{out}"
    );

    let read = token_cli(&fleet.db_url, &["create", "--scope", "read"]);
    let (ok, _, err) = cli(Some(&read), &["pause", &id]);
    assert!(!ok && err.contains("403") && err.contains("admin"), "{err}");

    let (ok, out, err) = cli(None, &["pause", &id, "--wait"]);
    assert!(ok && out.contains("paused"), "{out}{err}");
    let (ok, _, err) = cli(None, &["pause", &id]);
    assert!(!ok && err.contains("409"), "{err}");
    let (ok, out, err) = cli(None, &["--json", "rollback", &id, "--wait"]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["state"], "rolled_back");
    assert_eq!(
        v["pending_publish"], 0,
        "--wait returns once the broker has the desired states"
    );
}

/// The dashboard's Rollouts pages in Chromium: the list, a rollout's waves and devices, a live
/// update when the canary reports, and the Pause/Resume/Rollback buttons with an admin token.
#[test]
fn the_dashboard_shows_and_commands_a_rollout_live() {
    use std::io::{BufRead, BufReader, Write as _};
    crate::browser::require_browser();
    let broker = TestBroker::start();
    let port = broker.port();
    let store = Store::new(Kind::Sqlite);
    let fleet = TestFleet::start(&store, port);
    bring_up(&fleet, port, &["f-0", "f-1", "f-2"], "activity");
    register_model(&store, Kind::Sqlite, "activity", "2.0.0", false);
    let created = create(
        &fleet,
        json!({"model": "activity", "version": "2.0.0", "targets": {"all": true},
               "waves": ["canary", "100%"]}),
    );
    let id = created["id"].as_str().expect("id").to_string();
    let shots = tempfile::tempdir().expect("temp dir");
    let cfg = json!({
        "base": format!("http://127.0.0.1:{}", fleet.port), "token": ADMIN, "rollout": id,
        "canary": "f-0", "devices": 3, "screenshots": shots.path(),
    });
    let mut child = crate::browser::browser_script("rollouts.py", &cfg)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("cannot run python3");
    let mut stdin = child.stdin.take().expect("stdin");
    let stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut transcript = Vec::new();
    let mut ok = false;
    for line in stdout.lines().map_while(Result::ok) {
        transcript.push(line.clone());
        match line.as_str() {
            "READY canary_active" => {
                report(
                    port,
                    "f-0",
                    "activity",
                    "2.0.0",
                    Some(("2.0.0", &id, OtaState::Active, None)),
                );
                writeln!(stdin, "GO").expect("answer the browser");
            }
            l if l.starts_with("OK") => {
                ok = true;
                break;
            }
            _ => {}
        }
    }
    drop(stdin);
    let out = child.wait_with_output().expect("the browser script ends");
    assert!(
        ok,
        "the browser run failed: {}\n{}",
        transcript.join("\n"),
        String::from_utf8_lossy(&out.stderr)
    );
}
