//! The multi-replica harness (issue 16): three `ember-fleet` processes on one PostgreSQL and
//! one Mosquitto, with ten real agents or a dozen simulated devices, and replicas killed with
//! SIGKILL or restarted one after another in the middle of it. After each: every device's
//! ledger shows nothing lost, nothing is stored twice, and every device's retained desired
//! state equals the rollout's final revision.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use ember_fleet::config::{Backend, DatabaseSettings};
use ember_fleet::db::Db;
use ember_proto::ota::{OtaReport, OtaState};
use ember_proto::{DeviceState, Status};
use ember_testkit::{TestAgent, TestAgentBuilder, TestBroker, wait_until};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::json;
use sqlx::Row;
use tokio_util::sync::CancellationToken;

use crate::rollout_service::register_model;
use crate::support::mqtt::{Msg, batch, publish};
use crate::support::replicas::{FleetProcess, wait_for};
use crate::support::{ADMIN, Kind, Store, WAIT, agent_bin, complete, http, now_us, stream_ledger};

const REPLICAS: usize = 3;

/// Three replicas sharing one data dir (their `fs` model store, a shared volume).
fn replicas(store: &Store, broker: u16, data: &tempfile::TempDir) -> Vec<FleetProcess> {
    (0..REPLICAS)
        .map(|i| {
            FleetProcess::start(
                &store.url(),
                broker,
                &format!("ember-fleet-{i}"),
                data.path(),
                "",
            )
        })
        .collect()
}

/// An agent streaming a 2-channel simulated IMU at 40 Hz in batches of 5 records: what the
/// tests below run 10 of while replicas die, leave and restart.
fn streaming_agent(device: &str, broker_port: u16) -> TestAgentBuilder {
    TestAgent::builder(agent_bin())
        .device_id(device)
        .broker_port(broker_port)
        .sim("imu", 40.0, 2)
        .mqtt("message_max_records", "5")
}

fn stored(r: &FleetProcess) -> f64 {
    r.metric("records_total{outcome=\"stored\"}")
}

/// Stored rows of a device's stream: (rows, distinct seqs, highest seq).
fn rows(url: &str, device: &str) -> (i64, i64, i64) {
    let settings = DatabaseSettings {
        url: url.to_string(),
        backend: Backend::Postgres,
        max_connections: 1,
        token_source: None,
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async {
            let db = Db::connect(&settings).await.expect("db");
            let row = sqlx::query(
                "SELECT CAST(COUNT(*) AS BIGINT) AS n, CAST(COUNT(DISTINCT seq) AS BIGINT) AS d, \
                 CAST(COALESCE(MAX(seq), 0) AS BIGINT) AS m FROM telemetry WHERE device_id = $1 AND stream = 'imu'",
            )
            .bind(device)
            .fetch_one(db.pool())
            .await
            .expect("count");
            db.close().await;
            (
                row.try_get("n").expect("n"),
                row.try_get("d").expect("d"),
                row.try_get("m").expect("m"),
            )
        })
}

/// Stops the agents and checks every device: the ledger complete (0 lost, 0 missing) as any
/// replica reports it, and the stored rows exactly 1..=captured (0 duplicates).
fn stop_and_check(url: &str, replicas: &[FleetProcess], agents: &[TestAgent]) {
    for a in agents {
        a.sigterm();
    }
    for a in agents {
        assert!(a.wait_exit(WAIT).success(), "{}", a.last_run_stderr());
    }
    for a in agents {
        for r in replicas {
            let mut last = None;
            let ok = wait_until(WAIT, || {
                last = stream_ledger(r.port, a.device_id(), "imu");
                last.as_ref().is_some_and(complete)
            });
            assert!(ok, "{} on {}: {last:?}", a.device_id(), r.client_id);
        }
        let captured = stream_ledger(replicas[0].port, a.device_id(), "imu")
            .and_then(|l| l["captured"].as_i64())
            .unwrap_or(0);
        assert_eq!(
            rows(url, a.device_id()),
            (captured, captured, captured),
            "{}: stored rows must be exactly 1..={captured}",
            a.device_id()
        );
    }
}

/// SIGKILL one of three replicas while ten agents stream (their records leave them on the
/// broker's PUBACK), then start it again under its stable client id: its persistent session
/// kept what the broker routed to it meanwhile. Then SIGKILL the leader and do not bring it
/// back: another replica leads. Nothing is lost, nothing stored twice.
#[test]
fn sigkill_a_replica_mid_ingest_loses_nothing() {
    let broker = TestBroker::start();
    let store = Store::new(Kind::Postgres);
    let data = tempfile::tempdir().expect("temp dir");
    let mut rs = replicas(&store, broker.port(), &data);
    let agents: Vec<TestAgent> = (0..10)
        .map(|i| streaming_agent(&format!("kill-{i}"), broker.port()).start())
        .collect();
    wait_for("every replica stores some telemetry", WAIT, || {
        rs.iter().all(|r| stored(r) >= 20.0)
    });
    rs[1].sigkill();
    let before = stored(&rs[0]) + stored(&rs[2]);
    wait_for("the other replicas keep storing", WAIT, || {
        stored(&rs[0]) + stored(&rs[2]) >= before + 200.0
    });
    rs[1].restart();
    wait_for("the restarted replica gets its session back", WAIT, || {
        stored(&rs[1]) >= 20.0
    });
    let leader = wait_leader(&rs);
    rs[leader].sigkill();
    let rest: Vec<usize> = (0..REPLICAS).filter(|i| *i != leader).collect();
    wait_for("another replica leads", WAIT, || {
        rest.iter()
            .filter(|i| rs[**i].metric("leader") == 1.0)
            .count()
            == 1
    });
    rs[leader].restart();
    stop_and_check(&store.url(), &rs, &agents);
}

/// Finding 2 (session expiry): a replica that dies without leaving (SIGKILL) and never comes
/// back under its client id used to keep its persistent session at the broker for ever, and
/// the broker kept handing that session its share of the shared subscription: whatever an
/// agent had deleted on PUBACK was never stored. The reader now connects with MQTT 5 and a
/// Session Expiry Interval (`mqtt.session_expiry_s`, 2 s here): once it has passed, the
/// broker removes the dead session and its subscriptions, and the live replicas get all of
/// the telemetry. Shown with a probe that publishes batches at QoS 1 once and never again
/// (a device in `"puback"` delivery): after the expiry every probe batch is stored. Ten real
/// agents on end-to-end acknowledgement stream throughout (what went to the dead session
/// before it expired, they send again): every ledger complete, 0 lost, 0 duplicates.
#[test]
fn a_dead_replicas_session_expires_and_its_share_goes_to_the_live_replicas() {
    const EXPIRY_S: u64 = 2;
    let broker = TestBroker::start();
    let store = Store::new(Kind::Postgres);
    let data = tempfile::tempdir().expect("temp dir");
    let mut rs: Vec<FleetProcess> = (0..REPLICAS)
        .map(|i| {
            FleetProcess::start_with_mqtt(
                &store.url(),
                broker.port(),
                &format!("ember-fleet-expiry-{i}"),
                data.path(),
                &format!("session_expiry_s = {EXPIRY_S}"),
                "",
            )
        })
        .collect();
    let agents: Vec<TestAgent> = (0..10)
        .map(|i| {
            streaming_agent(&format!("expiry-{i}"), broker.port())
                // End-to-end acknowledgement (the agent's default; the testkit's is "puback"):
                // what the broker routed to the dead session before it expired is sent again.
                .delivery("commit")
                .mqtt("commit_timeout_s", "3")
                .start()
        })
        .collect();
    wait_for("every replica stores some telemetry", WAIT, || {
        rs.iter().all(|r| stored(r) >= 20.0)
    });
    // Gone for good: a node lost, a pod replaced under another name.
    rs[2].sigkill();
    let killed = std::time::Instant::now();
    let deadline = killed + Duration::from_secs(EXPIRY_S) + WAIT;
    // Probe rounds: 12 one-record batches, each published once. While the dead session is a
    // member of the share group, some of them go to it and are never stored.
    let base = now_us();
    let mut seq = 0u64;
    let mut rounds = 0;
    loop {
        let before = rows(&store.url(), "probe").1;
        let msgs: Vec<Msg> = (seq + 1..=seq + 12)
            .map(|s| Msg::telemetry(&batch("probe", "imu", s..=s, base)))
            .collect();
        seq += 12;
        publish(broker.port(), msgs);
        rounds += 1;
        if wait_until(Duration::from_secs(3), || {
            rows(&store.url(), "probe").1 - before == 12
        }) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{EXPIRY_S} s after the replica died, the broker still hands its session a share \
             of the telemetry (round {rounds}: {} of 12 stored)",
            rows(&store.url(), "probe").1 - before
        );
    }
    // Another full round, so the first one's success was no accident of the round-robin.
    let before = rows(&store.url(), "probe").1;
    publish(
        broker.port(),
        (seq + 1..=seq + 12)
            .map(|s| Msg::telemetry(&batch("probe", "imu", s..=s, base)))
            .collect(),
    );
    wait_for("every probe batch after the expiry is stored", WAIT, || {
        rows(&store.url(), "probe").1 - before == 12
    });
    let live: Vec<FleetProcess> = rs.drain(..2).collect();
    stop_and_check(&store.url(), &live, &agents);
}

/// GET requests for model bundles a replica answered (200 or 206).
fn bundle_gets(r: &FleetProcess) -> f64 {
    r.metrics()
        .iter()
        .filter(|(k, _)| {
            k.starts_with("http_requests_total{")
                && k.contains("method=\"GET\"")
                && k.contains("bundle")
                && (k.contains("status=\"200\"") || k.contains("status=\"206\""))
        })
        .map(|(_, v)| v)
        .sum()
}

/// Model download through any replica: a bundle uploaded through replica 0 is served by
/// replicas 1 and 2 with the sha256 its row names (one shared store), and real agents whose
/// `ota.fleet_url` is replica 1 or 2 install it in a rollout created through replica 0;
/// replica 0 serves no bundle at all.
#[test]
fn a_model_uploaded_through_one_replica_downloads_and_installs_through_the_others() {
    use crate::ota::{bundle_path, dev_pub, repo, version, write_private};
    let broker = TestBroker::start();
    let store = Store::new(Kind::Postgres);
    let data = tempfile::tempdir().expect("temp dir");
    let models = format!("[models]\ntrusted_keys = [\"{}\"]\n", dev_pub().display());
    let rs: Vec<FleetProcess> = (0..REPLICAS)
        .map(|i| {
            FleetProcess::start(
                &store.url(),
                broker.port(),
                &format!("ember-fleet-ota-{i}"),
                data.path(),
                &models,
            )
        })
        .collect();
    let ids: Vec<String> = (0..4).map(|i| format!("any-{i}")).collect();
    let agents: Vec<TestAgent> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let token = crate::api::token_cli(
                &store.url(),
                &["create", "--scope", &format!("device:{id}")],
            );
            let token_file = data.path().join(format!("{id}.token"));
            write_private(&token_file, &token);
            // Devices 0 and 1 download through replica 1, devices 2 and 3 through replica 2.
            let via = &rs[1 + i / 2];
            TestAgent::builder(agent_bin())
                .device_id(id)
                .broker_port(broker.port())
                .replay_ts(
                    "motion",
                    &repo().join("models/data/BasicMotions_TEST.ts"),
                    100.0,
                    true,
                )
                .model(&bundle_path(), "motion")
                .set(
                    "inference",
                    "trusted_keys",
                    &format!("[\"{}\"]", dev_pub().display()),
                )
                .set(
                    "ota",
                    "fleet_url",
                    &format!("\"http://127.0.0.1:{}\"", via.port),
                )
                .set(
                    "ota",
                    "token_file",
                    &format!("\"{}\"", token_file.display()),
                )
                .start()
        })
        .collect();
    let bytes = version("1.1.0");
    assert_eq!(crate::models::upload_to(rs[0].port, &bytes), 201);
    let sha = ember_bundle::hex::sha256(&bytes);
    let row = rs[0]
        .try_get_json("/api/v1/models/activity/1.1.0")
        .expect("the registered version");
    assert_eq!(row["sha256"], sha.as_str(), "{row}");
    for r in &rs[1..] {
        let body = crate::models::download_from(r.port, "/api/v1/models/activity/1.1.0/bundle");
        assert_eq!(
            ember_bundle::hex::sha256(&body),
            sha,
            "{} serves other bytes than replica 0 stored",
            r.client_id
        );
    }
    wait_for("every agent runs 1.0.0", WAIT, || {
        ids.iter().all(|d| {
            rs[0]
                .try_get_json(&format!("/api/v1/devices/{d}"))
                .is_some_and(|v| v["models"]["activity"] == "1.0.0")
        })
    });
    let body = json!({"model": "activity", "version": "1.1.0", "targets": {"all": true},
                      "waves": ["50%", "100%"]});
    let r = http::request(
        rs[0].port,
        "POST",
        "/api/v1/rollouts",
        Some(ADMIN),
        Some(&body.to_string()),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.json()["id"].as_str().expect("id").to_string();
    let mut last = None;
    let done = wait_until(WAIT * 2, || {
        last = rollout(&rs, &id);
        last.as_ref().is_some_and(|v| v["state"] == "completed")
    });
    assert!(
        done,
        "the rollout did not complete: {last:?}\n{}",
        agents
            .iter()
            .map(|a| a.last_run_stderr())
            .collect::<Vec<_>>()
            .join("\n")
    );
    wait_for("every agent runs 1.1.0", WAIT, || {
        ids.iter().all(|d| {
            rs[0]
                .try_get_json(&format!("/api/v1/devices/{d}"))
                .is_some_and(|v| v["models"]["activity"] == "1.1.0")
        })
    });
    assert_eq!(bundle_gets(&rs[0]), 0.0, "replica 0 served no bundle");
    for r in &rs[1..] {
        // The check above, and at least one agent each.
        assert!(
            bundle_gets(r) >= 2.0,
            "{} served {} bundle downloads",
            r.client_id,
            bundle_gets(r)
        );
    }
    for a in &agents {
        a.sigterm();
    }
    for a in &agents {
        assert!(a.wait_exit(WAIT).success(), "{}", a.last_run_stderr());
    }
}

/// The index of the one replica that leads.
fn wait_leader(rs: &[FleetProcess]) -> usize {
    let mut leader = None;
    wait_for("exactly one leader", WAIT, || {
        let l: Vec<usize> = (0..rs.len())
            .filter(|i| rs[*i].metric("leader") == 1.0)
            .collect();
        leader = l.first().copied();
        l.len() == 1
    });
    leader.expect("a leader")
}

/// Simulated devices: each answers the desired state it is told with a retained status that
/// runs that version, reporting the rollout's version `active` (what a healthy agent does
/// once it has installed it). Every desired state received is kept, per device.
struct Devices {
    seen: Arc<Mutex<BTreeMap<String, Vec<ember_proto::ota::DesiredState>>>>,
    stop: CancellationToken,
    thread: Option<JoinHandle<()>>,
}

fn status(device: &str, model: &str, running: &str, report: Option<(&str, &str)>) -> Vec<u8> {
    let mut s = Status::offline(device);
    s.state = DeviceState::Online;
    s.ts = now_us();
    s.agent_version = Some("sim".into());
    s.models.insert(model.into(), running.into());
    if let Some((version, rollout)) = report {
        s.ota.push(OtaReport {
            model: model.into(),
            version: version.into(),
            rollout: Some(rollout.into()),
            state: OtaState::Active,
            reason: None,
            ts: now_us(),
            agreement: None,
            latency_ratio: None,
        });
    }
    ember_proto::message::encode(&s, ember_proto::Encoding::Json).expect("encodes")
}

impl Devices {
    fn start(port: u16, ids: Vec<String>, model: &'static str) -> Devices {
        let seen: Arc<Mutex<BTreeMap<String, Vec<_>>>> = Arc::default();
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
                    let mut opts = MqttOptions::new(crate::support::client_id(), "127.0.0.1", port);
                    opts.set_keep_alive(Duration::from_secs(5));
                    let (client, mut el) = AsyncClient::new(opts, 4096);
                    loop {
                        let ev = tokio::select! {
                            _ = stop.cancelled() => return,
                            ev = el.poll() => ev,
                        };
                        match ev {
                            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                                for d in &ids {
                                    let _ = client.try_publish(
                                        format!("ember/v1/{d}/status"),
                                        QoS::AtLeastOnce,
                                        true,
                                        status(d, model, "1.0.0", None),
                                    );
                                }
                                let _ =
                                    client.try_subscribe("ember/v1/+/desired", QoS::AtLeastOnce);
                            }
                            Ok(Event::Incoming(Packet::SubAck(_))) => {
                                let _ = ready_tx.send(());
                            }
                            Ok(Event::Incoming(Packet::Publish(p))) => {
                                let Ok((d, _)) = ember_proto::message::decode_desired(&p.payload)
                                else {
                                    continue;
                                };
                                let device = d.device.clone();
                                if let Some(m) = d.models.iter().find(|m| m.name == model)
                                    && let Some(v) = &m.version
                                {
                                    let report = m.rollout.as_deref().map(|r| (v.as_str(), r));
                                    let _ = client.try_publish(
                                        format!("ember/v1/{device}/status"),
                                        QoS::AtLeastOnce,
                                        true,
                                        status(&device, model, v, report),
                                    );
                                }
                                seen.lock()
                                    .expect("lock")
                                    .entry(device)
                                    .or_default()
                                    .push(d);
                            }
                            Ok(_) => {}
                            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                        }
                    }
                });
            })
        };
        ready_rx
            .recv_timeout(WAIT)
            .expect("the devices did not subscribe");
        Devices {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    /// The version of `model` in the latest desired state of `device`.
    fn latest(&self, device: &str, model: &str) -> Option<String> {
        self.seen
            .lock()
            .expect("lock")
            .get(device)
            .and_then(|v| v.last())
            .and_then(|d| d.models.iter().find(|m| m.name == model).cloned())
            .and_then(|m| m.version)
    }
}

impl Drop for Devices {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The retained desired version of `model` for each of `devices`, as a device connecting now
/// would be told.
fn retained(
    port: u16,
    devices: &[String],
    model: &'static str,
) -> BTreeMap<String, Option<String>> {
    let fresh = Devices::start(port, Vec::new(), model);
    wait_until(Duration::from_secs(5), || {
        devices.iter().all(|d| fresh.latest(d, model).is_some())
    });
    devices
        .iter()
        .map(|d| (d.clone(), fresh.latest(d, model)))
        .collect()
}

fn rollout(rs: &[FleetProcess], id: &str) -> Option<serde_json::Value> {
    rs.iter()
        .find_map(|r| r.try_get_json(&format!("/api/v1/rollouts/{id}")))
}

/// A rollout to twelve devices through three replicas: the leader is killed with SIGKILL mid
/// rollout, then every replica is restarted one after another (SIGTERM, start) while an
/// operator rolls the rollout back in the middle. The rollback wins everywhere: every
/// device's retained desired state is the version it had before, and no replica publishes
/// the rolled-back version afterwards. Ten real agents stream telemetry throughout: every
/// ledger complete, 0 lost, 0 duplicates.
#[test]
fn leader_killed_and_rolling_restart_during_a_rollout_with_a_rollback() {
    let broker = TestBroker::start();
    let store = Store::new(Kind::Postgres);
    let data = tempfile::tempdir().expect("temp dir");
    let mut rs = replicas(&store, broker.port(), &data);
    register_model(&store, Kind::Postgres, "activity", "2.0.0", false);
    let ids: Vec<String> = (0..12).map(|i| format!("sim-{i}")).collect();
    let devices = Devices::start(broker.port(), ids.clone(), "activity");
    // Ten real agents stream through all of it: their ledgers are checked at the end.
    let agents: Vec<TestAgent> = (0..10)
        .map(|i| streaming_agent(&format!("roll-{i}"), broker.port()).start())
        .collect();
    wait_for("every simulated device registered", WAIT, || {
        ids.iter().all(|d| {
            rs[0]
                .try_get_json(&format!("/api/v1/devices/{d}"))
                .is_some_and(|v| v["models"]["activity"] == "1.0.0")
        })
    });
    let body = json!({"model": "activity", "version": "2.0.0", "targets": {"all": true},
                      "waves": ["canary", "25%", "50%", "100%"], "min_soak_s": 5});
    let r = http::request(
        rs[2].port,
        "POST",
        "/api/v1/rollouts",
        Some(ADMIN),
        Some(&body.to_string()),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.json()["id"].as_str().expect("id").to_string();
    wait_for("the canary is active", WAIT, || {
        devices.latest(&ids[0], "activity").as_deref() == Some("2.0.0")
    });
    let leader = wait_leader(&rs);
    rs[leader].sigkill();
    wait_for("a new leader", WAIT, || {
        (0..REPLICAS)
            .filter(|i| *i != leader && rs[*i].metric("leader") == 1.0)
            .count()
            == 1
    });
    rs[leader].restart();
    // Rolling restart; the rollback comes after the first replica is back.
    for i in 0..REPLICAS {
        rs[i].stop();
        rs[i].restart();
        if i == 0 {
            let other = (i + 1) % REPLICAS;
            let r = http::request(
                rs[other].port,
                "POST",
                &format!("/api/v1/rollouts/{id}/rollback"),
                Some(ADMIN),
                None,
            );
            assert_eq!(r.status, 200, "rollback: {}", r.body);
        }
    }
    wait_for("the rollback is published", WAIT, || {
        rollout(&rs, &id).is_some_and(|v| v["state"] == "rolled_back" && v["pending_publish"] == 0)
    });
    let mut last = BTreeMap::new();
    let ok = wait_until(WAIT, || {
        last = retained(broker.port(), &ids, "activity");
        last.values().all(|v| v.as_deref() != Some("2.0.0"))
            && ids
                .iter()
                .all(|d| devices.latest(d, "activity").as_deref() != Some("2.0.0"))
    });
    assert!(
        ok,
        "a device is still told the rolled-back version: {last:?}"
    );
    stop_and_check(&store.url(), &rs, &agents);
}
