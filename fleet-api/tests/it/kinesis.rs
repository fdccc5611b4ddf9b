//! The Kinesis ingestion source against a real Kinesis API: moto's server mode on 127.0.0.1
//! (testkit's `TestS3` runs `python3 -m moto.server`, which serves Kinesis on the same port).
//! Records are what terraform/aws's topic rule writes: the device id as partition key, a JSON
//! envelope with the agent's payload (CBOR here) base64-encoded.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ember_fleet::cloud::aws::AwsClient;
use ember_fleet::config::{Backend, DatabaseSettings};
use ember_fleet::db::Db;
use ember_proto::Encoding;
use ember_testkit::{TestBroker, TestS3, wait_until};
use serde_json::{Value, json};
use sqlx::Row;

use crate::support::mqtt::batch;
use crate::support::replicas::{FleetProcess, wait_for};
use crate::support::{Kind, Store, WAIT, now_us};

const STREAM: &str = "ember-ingest";
const REGION: &str = "us-east-1";
const DEVICES: usize = 10;
/// Telemetry messages per device and phase, each of RECORDS records.
const MESSAGES: u64 = 40;
const RECORDS: u64 = 50;

struct Kinesis {
    client: AwsClient,
    endpoint: String,
    rt: tokio::runtime::Runtime,
}

impl Kinesis {
    fn new(moto: &TestS3) -> Kinesis {
        Kinesis {
            client: AwsClient::with_static_credentials(
                REGION,
                "ember-test",
                "ember-test-secret",
                true,
            )
            .expect("client"),
            endpoint: moto.endpoint(),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime"),
        }
    }

    fn call(&self, action: &str, body: Value) -> Value {
        self.rt
            .block_on(self.client.json_call(
                "kinesis",
                &self.endpoint,
                &format!("Kinesis_20131202.{action}"),
                &body,
            ))
            .unwrap_or_else(|e| panic!("{action}: {e}"))
    }

    /// Puts records as the topic rule would; returns the last sequence number per shard.
    fn put(&self, records: &[(String, &str, Vec<u8>)]) -> BTreeMap<String, String> {
        let mut last = BTreeMap::new();
        for chunk in records.chunks(100) {
            let entries: Vec<Value> = chunk
                .iter()
                .map(|(device, channel, payload)| {
                    let envelope = json!({
                        "device": device, "channel": channel,
                        "payload": B64.encode(payload), "received_ms": now_us() / 1000
                    });
                    json!({
                        "PartitionKey": device,
                        "Data": B64.encode(serde_json::to_vec(&envelope).expect("json")),
                    })
                })
                .collect();
            let v = self.call(
                "PutRecords",
                json!({ "StreamName": STREAM, "Records": entries }),
            );
            assert_eq!(
                v["FailedRecordCount"].as_u64().unwrap_or(0),
                0,
                "PutRecords: {v}"
            );
            for r in v["Records"].as_array().expect("records") {
                last.insert(
                    r["ShardId"].as_str().expect("shard").to_string(),
                    r["SequenceNumber"].as_str().expect("seq").to_string(),
                );
            }
        }
        last
    }
}

fn device(i: usize) -> String {
    format!("kin-{i}")
}

/// Phase `phase`'s telemetry of every device (seqs continue across phases), CBOR-encoded.
fn telemetry(phase: u64, base_ts: u64) -> Vec<(String, &'static str, Vec<u8>)> {
    let mut out = Vec::new();
    for m in 0..MESSAGES {
        for i in 0..DEVICES {
            let first = (phase * MESSAGES + m) * RECORDS + 1;
            let b = batch(&device(i), "imu", first..first + RECORDS, base_ts);
            let payload = ember_proto::message::encode(&b, Encoding::Cbor).expect("cbor");
            out.push((device(i), "telemetry", payload));
        }
    }
    out
}

/// The database's view: per device (rows, distinct seqs); the stored checkpoints.
struct Stored {
    rows: BTreeMap<String, (i64, i64)>,
    rejects: i64,
    positions: BTreeMap<String, String>,
}

fn stored(url: &str) -> Stored {
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
            let rows = sqlx::query(
                "SELECT device_id, CAST(COUNT(*) AS BIGINT) AS n, CAST(COUNT(DISTINCT seq) AS BIGINT) AS d \
                 FROM telemetry GROUP BY device_id",
            )
            .fetch_all(db.pool())
            .await
            .expect("count");
            let rejects: i64 = sqlx::query(
                "SELECT CAST(COALESCE(SUM(count), 0) AS BIGINT) AS n FROM rejects WHERE device_id = 'kin-0'",
            )
            .fetch_one(db.pool())
            .await
            .expect("rejects")
            .try_get("n")
            .expect("n");
            let positions = sqlx::query(
                "SELECT partition_id, position FROM ingest_leases WHERE position IS NOT NULL",
            )
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
                        (
                            r.try_get("partition_id").expect("shard"),
                            r.try_get("position").expect("position"),
                        )
                    })
                    .collect(),
            }
        })
}

fn total(s: &Stored) -> i64 {
    s.rows.values().map(|(n, _)| n).sum()
}

/// Kinesis sequence numbers are decimal strings of varying length.
fn seq_le(a: &str, b: &str) -> bool {
    (a.len(), a) <= (b.len(), b)
}

/// Ten agents' telemetry through Kinesis; the fleet is SIGKILLed mid-stream, a second replica
/// takes the shard leases over when they expire and resumes after the stored checkpoints:
/// nothing lost, nothing stored twice, checkpoints only move forward and end at the stream's
/// last record. A record whose payload names another device than its partition key is refused.
#[test]
fn kinesis_source_survives_sigkill_mid_stream() {
    let moto = TestS3::start();
    let broker = TestBroker::start();
    let store = Store::new(Kind::Postgres);
    let k = Kinesis::new(&moto);
    k.call(
        "CreateStream",
        json!({ "StreamName": STREAM, "ShardCount": 2 }),
    );

    // Captured an hour ago: well inside the retention period.
    let base_ts = now_us() - 3_600_000_000;
    let spoof = {
        let b = batch("kin-1", "imu", 1..2, base_ts);
        (
            device(0),
            "telemetry",
            ember_proto::message::encode(&b, Encoding::Cbor).expect("cbor"),
        )
    };
    let mut first = telemetry(0, base_ts);
    first.push(spoof);
    let mut last = k.put(&first);

    let data = tempfile::tempdir().expect("temp dir");
    let extra = format!(
        "[ingest]\nsource = \"kinesis\"\nbatch_max_records = {RECORDS}\nchannel_capacity = 1\n\
         [ingest.kinesis]\nstream = \"{STREAM}\"\nregion = \"{REGION}\"\nendpoint = \"{}\"\n\
         lease_s = 3\npoll_ms = 200\n",
        moto.endpoint()
    );
    let env = [
        ("AWS_ACCESS_KEY_ID", "ember-test"),
        ("AWS_SECRET_ACCESS_KEY", "ember-test-secret"),
        ("AWS_REGION", REGION),
    ];
    let url = store.url();
    let mut a = FleetProcess::start_env(
        &url,
        broker.port(),
        "ember-fleet-a",
        data.path(),
        &extra,
        &env,
    );
    let phase = (MESSAGES * RECORDS) as i64 * DEVICES as i64;
    wait_for("a quarter of the first phase stored", WAIT, || {
        total(&stored(&url)) >= phase / 4
    });
    a.sigkill();
    let at_kill = stored(&url);
    assert!(
        total(&at_kill) < phase,
        "the fleet stored everything before it was killed: the test must kill it mid-stream"
    );
    assert!(
        !at_kill.positions.is_empty(),
        "checkpoints are stored with the batches"
    );

    // More records while no fleet runs, then another replica (the leases of the killed one
    // expire after lease_s).
    last.extend(k.put(&telemetry(1, base_ts)));
    let resumed = std::time::Instant::now();
    let b = FleetProcess::start_env(
        &url,
        broker.port(),
        "ember-fleet-b",
        data.path(),
        &extra,
        &env,
    );
    let expected = 2 * phase;
    let done = wait_until(WAIT * 2, || {
        let s = stored(&url);
        total(&s) >= expected && s.positions == last
    });
    let catch_up = resumed.elapsed();
    let end = stored(&url);
    assert!(
        done,
        "stored {} of {expected} records, checkpoints {:?} (stream ends at {last:?}); replica log:\n{}",
        total(&end),
        end.positions,
        b.log_text()
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
    for (shard, pos) in &at_kill.positions {
        assert!(
            seq_le(pos, &end.positions[shard]),
            "{shard}: the checkpoint went back from {pos} to {}",
            end.positions[shard]
        );
    }
    assert!(
        end.rejects >= 1,
        "the record naming another device is refused"
    );
    let read_again = b.metric("records_total{outcome=\"duplicate\"}");
    eprintln!(
        "kinesis: {expected} records from {DEVICES} devices in {} Kinesis records; killed at {} stored; \
         re-read and dropped as duplicates after the kill: {read_again}; the second replica stored \
         the remaining {} in {:.1} s (start and lease expiry included); checkpoints {:?}",
        2 * MESSAGES as usize * DEVICES + 1,
        total(&at_kill),
        expected - total(&at_kill),
        catch_up.as_secs_f64(),
        end.positions
    );
}
