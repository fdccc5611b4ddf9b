//! The Azure side of the fleet: the Event Hubs source and the IoT Hub twin sink.
//!
//! * The source's AMQP 1.0 transport ([`AmqpHub`]) against a real AMQP 1.0 broker: RabbitMQ
//!   with its AMQP 1.0 plugin (testkit's `TestRabbitMq`). RabbitMQ has queues, not Event Hubs'
//!   partitions, sequence numbers or selector filters, so this test covers what they share:
//!   connection, SASL PLAIN, session, a receiver link with link credit and the selector filter
//!   in its source, and IoT Hub's message shape (annotations, application properties, data
//!   body) surviving the broker.
//! * Partition leasing and checkpoints against a test double of the Event Hubs endpoint behind
//!   the same transport (`support::eventhubs::TestEventHub`: partitions, sequence numbers,
//!   the selector filters): the fleet process SIGKILLed twice mid-stream.
//! * The twin sink against a test double of IoT Hub's twin service API
//!   (`support::twin::TestTwinService`), which checks the SAS header.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_fleet::config::{Backend, DatabaseSettings};
use ember_fleet::db::Db;
use ember_fleet::metrics::Metrics;
use ember_fleet::ota::rollout::azure_twin::{AzureTwinSink, IotHubConnection};
use ember_fleet::ota::rollout::sink::DesiredStateSink;
use ember_fleet::server::ingest::eventhubs::{AmqpAuth, AmqpHub, Decoded, EventHub, decode};
use ember_proto::{Channel, Encoding};
use ember_testkit::{RABBITMQ_PASSWORD, RABBITMQ_USER, TestBroker, TestRabbitMq, wait_until};
use fe2o3_amqp::link::delivery::Sendable;
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::{Connection, Sender, Session};
use serde_json::json;
use sqlx::Row;

use crate::rollout_service::{bring_up, create, register_model, wait_rollout};
use crate::support::eventhubs::{HubEvent, TestEventHub};
use crate::support::mqtt::batch;
use crate::support::replicas::{FleetProcess, wait_for};
use crate::support::twin::{self, TestTwinService};
use crate::support::{Kind, Store, TestFleet, WAIT, client_id, now_us};

const DEVICES: usize = 10;
const PARTITIONS: usize = 2;
/// Telemetry messages per device and phase, each of RECORDS records.
const MESSAGES: u64 = 40;
const RECORDS: u64 = 50;
const HUB: &str = "ember-test-hub";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// IoT-Hub-shaped events through RabbitMQ's AMQP 1.0 plugin into the source's transport.
#[test]
fn eventhubs_amqp_transport_reads_iot_hub_events_through_rabbitmq() {
    let started = Instant::now();
    let rabbit = TestRabbitMq::start();
    let broker_up = started.elapsed();
    let rt = rt();
    const EVENTS: i64 = 200;
    let events: Vec<HubEvent> = (0..EVENTS)
        .map(|i| {
            if i % 50 == 49 {
                HubEvent::connection_state(&format!("rmq-{}", i % 3), i % 100 == 49)
            } else {
                HubEvent::telemetry(&format!("rmq-{}", i % 3), "telemetry", vec![i as u8; 100])
            }
        })
        .collect();
    rt.block_on(async {
        // What IoT Hub would have routed, published with the broker-stamped annotations
        // (RabbitMQ stamps none of its own).
        let mut conn = Connection::builder()
            .container_id("ember-test-publisher")
            .sasl_profile(SaslProfile::Plain {
                username: RABBITMQ_USER.into(),
                password: RABBITMQ_PASSWORD.into(),
            })
            .open(format!("amqp://127.0.0.1:{}", rabbit.port()).as_str())
            .await
            .expect("connect to RabbitMQ");
        let mut session = Session::begin(&mut conn).await.expect("session");
        let mut sender = Sender::attach(&mut session, "ember-test-sender", "/queue/ember-p0")
            .await
            .expect("sender");
        for (i, e) in events.iter().enumerate() {
            let outcome = sender
                .send(
                    Sendable::builder()
                        .message(e.message(Some((i as i64, i as i64 * 1000))))
                        .build(),
                )
                .await
                .expect("send");
            assert!(
                outcome.is_accepted(),
                "RabbitMQ refused event {i}: {outcome:?}"
            );
        }
        let _ = sender.close().await;
        let _ = session.end().await;
        let _ = conn.close().await;

        let hub = AmqpHub {
            host: "127.0.0.1".into(),
            port: rabbit.port(),
            tls: false,
            namespace_host: "localhost".into(),
            entity: HUB.into(),
            consumer_group: "ember-fleet".into(),
            auth: AmqpAuth::Plain {
                username: RABBITMQ_USER.into(),
                password: RABBITMQ_PASSWORD.into(),
            },
            prefetch: 50,
            container_id: "ember-test-fleet".into(),
            address: "/queue/ember-p{partition}".into(),
        };
        assert_eq!(hub.address_of("0"), "/queue/ember-p0");
        let mut rx = hub
            .open("0", None)
            .await
            .expect("open a receiver on RabbitMQ");
        for (i, sent) in events.iter().enumerate() {
            let got = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!("event {i} did not arrive; RabbitMQ:\n{}", rabbit.log_text())
                })
                .expect("recv");
            assert_eq!(got.sequence, i as i64, "in order, sequence annotation kept");
            assert_eq!(
                got.offset.as_deref(),
                Some((i as i64 * 1000).to_string().as_str())
            );
            assert_eq!(
                got.device, sent.device,
                "the device-id annotation survives the broker"
            );
            assert_eq!(got.message_source, sent.message_source);
            for (k, v) in &sent.properties {
                assert_eq!(got.properties.get(k), Some(v), "application property {k}");
            }
            assert_eq!(got.body, sent.body);
            match decode(&got) {
                Decoded::Message {
                    device, channel, ..
                } => {
                    assert_eq!(Some(device), sent.device);
                    assert_eq!(channel, Channel::Telemetry);
                }
                Decoded::Presence { device, online } => {
                    assert_eq!(Some(device), sent.device);
                    assert_eq!(online, i % 100 == 49);
                }
                other => panic!("event {i} decoded as {other:?}"),
            }
        }
        rx.close().await;

        // auth = "cbs" against a broker without a $cbs node: SASL ANONYMOUS gets through,
        // the put-token is refused, and the error says so.
        let cbs = AmqpHub {
            auth: AmqpAuth::Cbs {
                key_name: "ember-fleet-service".into(),
                key: ember_host::sas::SasKey::from_base64("a2V5").expect("key"),
            },
            ..hub
        };
        let e = match cbs.open("0", None).await {
            Ok(_) => panic!("RabbitMQ has no $cbs node, yet the CBS put-token succeeded"),
            Err(e) => e,
        };
        assert!(
            matches!(
                e,
                ember_fleet::server::ingest::eventhubs::EventHubsError::Cbs { .. }
            ),
            "{e}"
        );
        assert!(
            e.to_string().contains("sb://localhost/ember-test-hub"),
            "{e}"
        );
        eprintln!("eventhubs transport: auth = \"cbs\" on RabbitMQ: {e}");
    });
    eprintln!(
        "eventhubs transport: {EVENTS} IoT-Hub-shaped events through RabbitMQ's AMQP 1.0 plugin; \
         RabbitMQ started in {:.1} s, the test took {:.1} s",
        broker_up.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

fn device(i: usize) -> String {
    format!("eh-{i}")
}

/// Phase `phase`'s telemetry of every device (seqs continue across phases), CBOR, as
/// (partition, event).
fn telemetry(phase: u64, base_ts: u64) -> Vec<(usize, HubEvent)> {
    let mut out = Vec::new();
    for m in 0..MESSAGES {
        for i in 0..DEVICES {
            let first = (phase * MESSAGES + m) * RECORDS + 1;
            let b = batch(&device(i), "imu", first..first + RECORDS, base_ts);
            let payload = ember_proto::message::encode(&b, Encoding::Cbor).expect("cbor");
            out.push((
                i % PARTITIONS,
                HubEvent::telemetry(&device(i), "telemetry", payload),
            ));
        }
    }
    out
}

struct Stored {
    rows: BTreeMap<String, (i64, i64)>,
    rejects: i64,
    positions: BTreeMap<String, i64>,
    online: BTreeMap<String, bool>,
}

fn stored(url: &str) -> Stored {
    let settings = DatabaseSettings {
        url: url.to_string(),
        backend: Backend::Postgres,
        max_connections: 1,
        token_source: None,
    };
    rt().block_on(async {
        let db = Db::connect(&settings).await.expect("db");
        let rows = sqlx::query(
            "SELECT device_id, CAST(COUNT(*) AS BIGINT) AS n, CAST(COUNT(DISTINCT seq) AS BIGINT) AS d \
             FROM telemetry GROUP BY device_id",
        )
        .fetch_all(db.pool())
        .await
        .expect("count");
        let rejects: i64 = sqlx::query(
            "SELECT CAST(COALESCE(SUM(count), 0) AS BIGINT) AS n FROM rejects WHERE device_id = 'eh-0'",
        )
        .fetch_one(db.pool())
        .await
        .expect("rejects")
        .try_get("n")
        .expect("n");
        let positions = sqlx::query(
            "SELECT partition_id, position FROM ingest_leases WHERE position IS NOT NULL AND source LIKE 'eventhubs:%'",
        )
        .fetch_all(db.pool())
        .await
        .unwrap_or_default();
        let online = sqlx::query("SELECT device_id, online FROM devices")
            .fetch_all(db.pool())
            .await
            .unwrap_or_default();
        db.close().await;
        Stored {
            rows: rows
                .iter()
                .map(|r| {
                    (
                        r.try_get("device_id").expect("device"),
                        (r.try_get("n").expect("n"), r.try_get("d").expect("d")),
                    )
                })
                .collect(),
            rejects,
            positions: positions
                .iter()
                .map(|r| {
                    let p: String = r.try_get("position").expect("position");
                    (
                        r.try_get("partition_id").expect("partition"),
                        p.parse().expect("a sequence number"),
                    )
                })
                .collect(),
            online: online
                .iter()
                .map(|r| {
                    (
                        r.try_get("device_id").expect("device"),
                        r.try_get("online").expect("online"),
                    )
                })
                .collect(),
        }
    })
}

fn total(s: &Stored) -> i64 {
    s.rows.values().map(|(n, _)| n).sum()
}

/// Ten devices' telemetry through the Event Hubs endpoint (the double); the fleet is SIGKILLed
/// twice mid-stream and each next replica takes the partition leases over when they expire,
/// resuming after the stored checkpoints with the sequence-number filter: nothing lost, nothing
/// stored twice, checkpoints only move forward and end at each partition's last event. An event
/// whose payload names another device than IoT Hub's annotation is refused; connection-state
/// events set the devices' presence.
#[test]
fn eventhubs_source_survives_sigkill_mid_stream_twice() {
    let started = Instant::now();
    let hub = TestEventHub::start(HUB, PARTITIONS);
    let broker = TestBroker::start();
    let store = Store::new(Kind::Postgres);
    let base_ts = now_us() - 3_600_000_000;
    let publish = |events: Vec<(usize, HubEvent)>| {
        for (p, e) in events {
            hub.publish(p, e);
        }
    };
    // Every device connects (presence), then phase 0; one event claims eh-0 in IoT Hub's
    // annotation but names eh-1 in its payload.
    publish(
        (0..DEVICES)
            .map(|i| (i % PARTITIONS, HubEvent::connection_state(&device(i), true)))
            .collect(),
    );
    let spoof = {
        let b = batch(&device(1), "imu", 1..2, base_ts);
        HubEvent::telemetry(
            &device(0),
            "telemetry",
            ember_proto::message::encode(&b, Encoding::Cbor).expect("cbor"),
        )
    };
    let mut first = telemetry(0, base_ts);
    first.insert(first.len() / 2, (0, spoof));
    publish(first);

    let data = tempfile::tempdir().expect("temp dir");
    let conn_file = data.path().join("eventhub-connection-string");
    std::fs::write(&conn_file, hub.connection_string()).expect("write the connection string");
    let extra = format!(
        "[ingest]\nsource = \"eventhubs\"\nbatch_max_records = {RECORDS}\nchannel_capacity = 1\n\
         [ingest.eventhubs]\nconnection_string_file = \"{}\"\nendpoint = \"{}\"\n\
         consumer_group = \"ember-fleet\"\npartitions = {PARTITIONS}\nauth = \"plain\"\n\
         lease_s = 3\nprefetch = 100\n",
        conn_file.display(),
        hub.endpoint()
    );
    let url = store.url();
    let phase = (MESSAGES * RECORDS) as i64 * DEVICES as i64;
    let expected = 2 * phase;
    let start =
        |name: &str| FleetProcess::start_env(&url, broker.port(), name, data.path(), &extra, &[]);

    let mut a = start("ember-fleet-a");
    wait_for("a quarter of the first phase stored", WAIT, || {
        total(&stored(&url)) >= phase / 4
    });
    a.sigkill();
    let at_kill_1 = stored(&url);
    assert!(
        total(&at_kill_1) < phase,
        "the fleet stored everything before it was killed: the test must kill it mid-stream"
    );
    assert!(
        !at_kill_1.positions.is_empty(),
        "checkpoints are stored with the batches"
    );

    // More events while no fleet runs; eh-9 disconnects at the end.
    let mut second = telemetry(1, base_ts);
    second.push((
        9 % PARTITIONS,
        HubEvent::connection_state(&device(9), false),
    ));
    publish(second);
    let mut b = start("ember-fleet-b");
    wait_for("more stored after the first kill", WAIT, || {
        total(&stored(&url)) >= total(&at_kill_1) + phase / 2
    });
    b.sigkill();
    let at_kill_2 = stored(&url);
    assert!(
        total(&at_kill_2) < expected,
        "the second replica stored everything before it was killed: the test must kill it mid-stream"
    );

    let resumed = Instant::now();
    let c = start("ember-fleet-c");
    let last: BTreeMap<String, i64> = hub
        .last_sequences()
        .iter()
        .enumerate()
        .filter_map(|(p, s)| s.map(|s| (p.to_string(), s)))
        .collect();
    let done = wait_until(WAIT * 2, || {
        let s = stored(&url);
        total(&s) >= expected && s.positions == last
    });
    let catch_up = resumed.elapsed();
    let end = stored(&url);
    assert!(
        done,
        "stored {} of {expected} records, checkpoints {:?} (partitions end at {last:?}); replica log:\n{}",
        total(&end),
        end.positions,
        c.log_text()
    );
    for i in 0..DEVICES {
        let (n, d) = end.rows.get(&device(i)).copied().unwrap_or_default();
        assert_eq!(
            n,
            2 * (MESSAGES * RECORDS) as i64,
            "{}: lost records",
            device(i)
        );
        assert_eq!(n, d, "{}: a record stored twice", device(i));
    }
    assert_eq!(total(&end), expected, "no record beyond the devices' own");
    for (earlier, later) in [(&at_kill_1, &at_kill_2), (&at_kill_2, &end)] {
        for (p, pos) in &earlier.positions {
            assert!(
                later.positions.get(p).is_some_and(|l| l >= pos),
                "partition {p}: the checkpoint went back from {pos} to {:?}",
                later.positions.get(p)
            );
        }
    }
    assert!(
        end.rejects >= 1,
        "the event naming another device is refused"
    );
    for i in 0..DEVICES {
        assert_eq!(
            end.online.get(&device(i)).copied(),
            Some(i != 9),
            "{}: presence from the connection-state events",
            device(i)
        );
    }
    // The replicas after a kill resumed after the stored checkpoints, not from the start.
    let resumed_filters = hub
        .filters()
        .iter()
        .filter(|(_, f)| f.contains("x-opt-sequence-number > '"))
        .count();
    assert!(
        resumed_filters >= PARTITIONS,
        "receivers resumed with the sequence-number filter: {:?}",
        hub.filters()
    );
    let read_again = c.metric("records_total{outcome=\"duplicate\"}");
    eprintln!(
        "eventhubs: {expected} records from {DEVICES} devices in {} events on {PARTITIONS} partitions; \
         killed at {} and {} stored; re-read and dropped as duplicates by the last replica: {read_again}; \
         it stored the remaining {} in {:.1} s (start and lease expiry included); checkpoints {:?}; \
         receivers attached with {:?}; whole test {:.1} s",
        2 * MESSAGES as usize * DEVICES + DEVICES + 2,
        total(&at_kill_1),
        total(&at_kill_2),
        expected - total(&at_kill_2),
        catch_up.as_secs_f64(),
        end.positions,
        hub.filters(),
        started.elapsed().as_secs_f64()
    );
}

fn sink(t: &TestTwinService, key: Option<&str>) -> AzureTwinSink {
    let mut c = IotHubConnection::parse(&t.connection_string()).expect("connection string");
    if let Some(k) = key {
        c.key = k.to_string();
    }
    AzureTwinSink::new(&c, Some(&t.base_url()), 3600, Arc::new(Metrics::new())).expect("sink")
}

/// Desired states become twin desired properties through IoT Hub's service API (the double
/// checks the SAS header); 429 waits Retry-After, 503 is retried, 404 and a wrong key fail.
#[test]
fn azure_twin_sink_patches_desired_properties_with_sas_and_retries() {
    let t = TestTwinService::start();
    let rt = rt();
    let s = sink(&t, None);
    let state = br#"{"v":1,"device":"dev 1","models":[{"name":"m","version":"2"}]}"#;
    rt.block_on(s.deliver("dev 1", state)).expect("delivered");
    let patches = t.patches();
    assert_eq!(patches.len(), 1);
    assert_eq!(
        patches[0].0, "dev%201",
        "the device id is percent-encoded in the path"
    );
    assert_eq!(
        patches[0].1["properties"]["desired"]["ember"],
        serde_json::from_slice::<serde_json::Value>(state).expect("json")
    );

    t.script(&[(429, Some(1)), (503, None)]);
    let before = Instant::now();
    rt.block_on(s.deliver("dev-2", state))
        .expect("delivered after retries");
    assert!(
        before.elapsed() >= Duration::from_secs(1),
        "Retry-After: 1 is honoured ({:?})",
        before.elapsed()
    );
    let statuses: Vec<u16> = t
        .seen()
        .iter()
        .filter(|r| r.path.starts_with("/twins/dev-2"))
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, [429, 503, 200]);

    t.script(&[(404, None)]);
    let e = rt
        .block_on(s.deliver("dev-3", state))
        .expect_err("404 fails at once");
    assert!(e.to_string().contains("404"), "{e}");

    let wrong = sink(&t, Some("d3Jvbmcta2V5"));
    let e = rt
        .block_on(wrong.deliver("dev-4", state))
        .expect_err("a wrong key is refused");
    assert!(e.to_string().contains("401"), "{e}");
    assert!(
        twin::check_sas("SharedAccessSignature sr=x&sig=y&se=1&skn=z").is_err(),
        "the double checks tokens"
    );
}

/// The fleet with `desired.sink = "azure-twin"`: a rollout's canary gets its desired state as
/// the twin's desired property `ember` through the twin double (one 429 first, waited out),
/// and the outbox row counts as published only after IoT Hub's 2xx (`pending_publish` 0).
#[test]
fn a_rollout_reaches_the_device_twin_through_the_azure_sink() {
    let twin = TestTwinService::start();
    twin.script(&[(429, Some(1))]);
    let broker = TestBroker::start();
    let store = Store::new(Kind::Sqlite);
    let dir = tempfile::tempdir().expect("temp dir");
    let conn = dir.path().join("service-connection-string");
    std::fs::write(&conn, twin.connection_string()).expect("write the connection string");
    let extra = format!(
        "[desired]\nsink = \"azure-twin\"\n[desired.azure_twin]\nconnection_string_file = \"{}\"\nendpoint = \"{}\"\n",
        conn.display(),
        twin.base_url()
    );
    let fleet = TestFleet::start_with(&store, broker.port(), &client_id(), &extra);
    bring_up(&fleet, broker.port(), &["tw-0", "tw-1"], "activity");
    register_model(&store, Kind::Sqlite, "activity", "2.0.0", false);
    let created = create(
        &fleet,
        json!({"model": "activity", "version": "2.0.0", "targets": {"devices": ["tw-0", "tw-1"]}}),
    );
    let id = created["id"].as_str().expect("id").to_string();
    wait_rollout(&fleet, &id, "the canary's twin updated", |v| {
        v["pending_publish"] == 0
    });
    let patches = twin.patches();
    let (device, body) = patches.first().expect("a PATCH reached the twin service");
    let desired = &body["properties"]["desired"]["ember"];
    assert_eq!(desired["device"].as_str(), Some(device.as_str()));
    assert_eq!(desired["models"][0]["name"], "activity");
    assert_eq!(desired["models"][0]["version"], "2.0.0");
    assert_eq!(desired["models"][0]["rollout"].as_str(), Some(id.as_str()));
    assert!(
        twin.seen().iter().any(|s| s.status == 429),
        "the throttled first attempt was retried"
    );
}
