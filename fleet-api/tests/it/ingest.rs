//! Ingestion against a real Mosquitto and real agents, on SQLite and on PostgreSQL.

use std::collections::BTreeSet;

use ember_testkit::{TestAgent, TestBroker, wait_until};
use serde_json::Value;

use crate::on_both_backends;
use crate::support::mqtt::{Msg, batch, publish, status};
use crate::support::{Kind, Store, TestFleet, WAIT, agent_bin, client_id, complete, now_us};

on_both_backends!(
    agents_stream_every_record_exactly_once,
    injected_gap_is_lost_until_explained,
    rejects_are_counted_and_valid_records_stored_once,
    telemetry_that_disagrees_with_the_streams_schema_is_rejected,
    retention_prunes_old_rows_and_keeps_the_ledger,
    fleet_restart_loses_nothing,
);

/// Several replicas need PostgreSQL (a second process on one SQLite file is refused, see
/// `scale_out::a_second_process_on_one_sqlite_file_is_refused`).
#[test]
fn replicas_share_telemetry_and_store_it_once_on_postgres() {
    replicas_share_telemetry_and_store_it_once(Kind::Postgres)
}

/// PostgreSQL's `COPY` path (`ingest.copy_min_records`, `server::ingest::staging`): batches
/// above the threshold go through the writer's staging table. The same batch twice, batches
/// that overlap, and the whole lot redelivered store each record exactly once, and every
/// count (ledger received and duplicates, metrics, per-minute aggregates) is what the
/// multi-row `INSERT` path reports.
#[test]
fn copy_path_stores_each_record_once_under_redelivery_on_postgres() {
    let broker = TestBroker::start();
    let store = Store::new(Kind::Postgres);
    let fleet = TestFleet::start_with(
        &store,
        broker.port(),
        &client_id(),
        "[ingest]\ncopy_min_records = 250\nbatch_max_delay_ms = 200\n",
    );
    let ts = now_us();
    let a1 = || Msg::telemetry(&batch("cp-a", "imu", 1..=500, ts));
    let a2 = || Msg::telemetry(&batch("cp-a", "imu", 300..=800, ts));
    let b1 = || Msg::telemetry(&batch("cp-b", "imu", 1..=400, ts));
    publish(broker.port(), vec![a1(), a1(), a2(), b1()]);
    fleet.wait_ledger("cp-a", "imu", |l| l["received"] == 800);
    fleet.wait_ledger("cp-b", "imu", |l| l["received"] == 400);
    // Everything again, as a broker redelivers after a crash: all of it duplicates.
    publish(
        broker.port(),
        vec![
            a1(),
            a2(),
            b1(),
            Msg::status(&status("cp-a", "imu", 800, 0, &[])),
            Msg::status(&status("cp-b", "imu", 400, 0, &[])),
        ],
    );
    // cp-a: 1,501 records for 800 new ones, then 1,001 again; cp-b: 400 again.
    let a = fleet.wait_ledger("cp-a", "imu", |l| complete(l) && l["duplicates"] == 1702);
    assert_eq!(a["received"], 800, "{a}");
    let b = fleet.wait_ledger("cp-b", "imu", |l| complete(l) && l["duplicates"] == 400);
    assert_eq!(b["received"], 400, "{b}");
    assert_exactly_once(&fleet, "cp-a", "imu", 800);
    assert_exactly_once(&fleet, "cp-b", "imu", 400);

    let m = fleet.metrics();
    assert_eq!(
        m.get("records_total{outcome=\"stored\"}").copied(),
        Some(1200.0)
    );
    assert_eq!(
        m.get("records_total{outcome=\"duplicate\"}").copied(),
        Some(2102.0)
    );
    // Every batch held at least 400 distinct records, so all of them went by COPY.
    let copied = m.get("records_copied_total").copied().unwrap_or(0.0);
    assert!(
        copied >= 1200.0 + 1001.0 + 400.0,
        "records_copied_total = {copied}"
    );
    // Only the new rows count in the per-minute aggregates.
    for (device, n) in [("cp-a", 800), ("cp-b", 400)] {
        let v = fleet.get_json(&format!(
            "/api/v1/devices/{device}/streams/imu/aggregates?channel=0&limit=1000"
        ));
        let count: u64 = v["items"]
            .as_array()
            .map(|a| a.iter().map(|i| i["count"].as_u64().unwrap_or(0)).sum())
            .unwrap_or(0);
        assert_eq!(count, n, "{device}: aggregates {v}");
    }
}

fn ranges(v: &Value) -> Vec<(u64, u64)> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    (
                        r["from"].as_u64().unwrap_or(0),
                        r["to"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Checks that the telemetry API returns exactly `1..=last` once each, in (ts, seq) order.
pub(crate) fn assert_exactly_once(fleet: &TestFleet, device: &str, stream: &str, last: u64) {
    let records = fleet.all_records(device, stream, 700);
    let seqs: Vec<u64> = records
        .iter()
        .map(|r| r["seq"].as_u64().unwrap_or(0))
        .collect();
    let unique: BTreeSet<u64> = seqs.iter().copied().collect();
    assert_eq!(
        seqs.len(),
        unique.len(),
        "{device}/{stream}: a record is listed twice"
    );
    assert_eq!(
        unique,
        (1..=last).collect::<BTreeSet<u64>>(),
        "{device}/{stream}: stored seqs are not exactly 1..={last}"
    );
    let keys: Vec<(u64, u64)> = records
        .iter()
        .map(|r| {
            (
                r["ts"].as_u64().unwrap_or(0),
                r["seq"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert!(
        keys.windows(2).all(|w| w[0] < w[1]),
        "records are not in (ts, seq) order"
    );
}

/// Two real agents (JSON and CBOR) stream through the broker into the fleet; one is killed
/// with SIGKILL (its Last Will marks it offline, and after a restart it re-sends what was not
/// acknowledged), then both stop gracefully. Every record is stored exactly once, the ledger
/// shows nothing lost, and the aggregates count every record once.
fn agents_stream_every_record_exactly_once(kind: Kind) {
    let broker = TestBroker::start();
    let store = Store::new(kind);
    let fleet = TestFleet::start(&store, broker.port());
    let json = TestAgent::builder(agent_bin())
        .device_id("dev-json")
        .broker_port(broker.port())
        .sim("imu", 150.0, 3)
        .start();
    let cbor = TestAgent::builder(agent_bin())
        .device_id("dev-cbor")
        .broker_port(broker.port())
        .encoding("cbor")
        .sim("env", 100.0, 2)
        .start();

    fleet.wait_ledger("dev-json", "imu", |l| l["received"].as_u64() >= Some(150));
    let d = fleet.get_json("/api/v1/devices/dev-json");
    assert_eq!(d["online"], true, "{d}");

    // Kill -9: no goodbye, so the broker publishes the Last Will.
    json.sigkill();
    let offline = wait_until(WAIT, || {
        fleet.get_json("/api/v1/devices/dev-json")["online"] == false
    });
    assert!(offline, "the Last Will did not mark dev-json offline");
    json.restart();
    json.wait_ready(WAIT);
    assert!(
        wait_until(
            WAIT,
            || fleet.get_json("/api/v1/devices/dev-json")["online"] == true
        ),
        "dev-json did not come back online"
    );
    let before = fleet.stream_ledger("dev-json", "imu").unwrap_or_default()["received"]
        .as_u64()
        .unwrap_or(0);
    fleet.wait_ledger("dev-json", "imu", |l| {
        l["received"].as_u64() > Some(before + 100)
    });

    for agent in [&json, &cbor] {
        agent.sigterm();
        assert!(
            agent.wait_exit(WAIT).success(),
            "{}",
            agent.last_run_stderr()
        );
    }
    for (device, stream) in [("dev-json", "imu"), ("dev-cbor", "env")] {
        let l = fleet.wait_ledger(device, stream, complete);
        let last = l["captured"].as_u64().unwrap_or(0);
        assert_exactly_once(&fleet, device, stream, last);
        let d = fleet.get_json(&format!("/api/v1/devices/{device}"));
        assert_eq!(d["online"], false, "a clean stop says offline: {d}");
        assert_eq!(d["agent_version"], env!("CARGO_PKG_VERSION"));
        // Every record counted once in the per-minute aggregates of channel 0.
        let mut count = 0;
        let mut cursor = String::new();
        loop {
            let v = fleet.get_json(&format!(
                "/api/v1/devices/{device}/streams/{stream}/aggregates?channel=0&limit=1000{cursor}"
            ));
            count += v["items"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|i| i["count"].as_u64().unwrap_or(0))
                        .sum::<u64>()
                })
                .unwrap_or(0);
            match v["next_cursor"].as_str() {
                Some(c) => cursor = format!("&cursor={c}"),
                None => break,
            }
        }
        assert_eq!(count, last, "{device}/{stream}: aggregates count");
    }
    let streams = fleet.get_json("/api/v1/devices/dev-cbor/streams");
    assert_eq!(streams["items"][0]["channels"], 2, "{streams}");
    assert_eq!(
        fleet.metrics().get("rejects_total").copied().unwrap_or(0.0),
        0.0,
        "real agents' messages are never rejected"
    );
}

/// A gap published on purpose (records missing, a status whose last_seq covers them) is lost;
/// evicted ranges (merged across status messages), late records and records still queued on
/// the device explain gaps.
fn injected_gap_is_lost_until_explained(kind: Kind) {
    let broker = TestBroker::start();
    let store = Store::new(kind);
    let fleet = TestFleet::start(&store, broker.port());
    let ts = now_us();
    publish(
        broker.port(),
        vec![
            Msg::telemetry(&batch("gap-dev", "imu", 1..=10, ts)),
            Msg::telemetry(&batch("gap-dev", "imu", 16..=20, ts)),
            Msg::status(&status("gap-dev", "imu", 25, 0, &[(21, 22, "bytes")])),
        ],
    );
    let l = fleet.wait_ledger("gap-dev", "imu", |l| {
        l["captured"] == 25 && l["received"] == 15
    });
    assert_eq!(ranges(&l["missing"]), vec![(11, 15), (21, 25)], "{l}");
    assert_eq!(ranges(&l["lost"]), vec![(11, 15), (23, 25)], "{l}");
    assert_eq!(l["lost_count"], 8);
    assert_eq!(l["evicted"][0]["reasons"], serde_json::json!(["bytes"]));
    assert_eq!(
        fleet.get_json("/api/v1/devices/gap-dev/ledger")["lost_count"],
        8
    );

    // A later status reports another range (a status only carries the most recent 32): the
    // fleet keeps the union.
    publish(
        broker.port(),
        vec![Msg::status(&status(
            "gap-dev",
            "imu",
            25,
            0,
            &[(23, 23, "age")],
        ))],
    );
    let l = fleet.wait_ledger("gap-dev", "imu", |l| l["lost_count"] == 7);
    assert_eq!(ranges(&l["evicted"]), vec![(21, 23)], "{l}");
    assert_eq!(
        l["evicted"][0]["reasons"],
        serde_json::json!(["age", "bytes"])
    );
    assert_eq!(ranges(&l["lost"]), vec![(11, 15), (24, 25)], "{l}");

    // The missing records arrive late (out of order): no longer lost.
    publish(
        broker.port(),
        vec![Msg::telemetry(&batch("gap-dev", "imu", 11..=15, ts))],
    );
    let l = fleet.wait_ledger("gap-dev", "imu", |l| l["received"] == 20);
    assert_eq!(ranges(&l["lost"]), vec![(24, 25)], "{l}");

    // The device says its last two are still queued: pending, not lost.
    publish(
        broker.port(),
        vec![Msg::status(&status("gap-dev", "imu", 25, 2, &[]))],
    );
    let l = fleet.wait_ledger("gap-dev", "imu", |l| l["lost_count"] == 0);
    assert_eq!(
        l["pending"],
        serde_json::json!({"from": 24, "to": 25}),
        "{l}"
    );
    assert_eq!(l["pending_count"], 2);
    assert_eq!(
        l["missing_count"], 5,
        "21..=23 evicted, 24..=25 pending: {l}"
    );

    // An older status (an earlier `ts`, nothing queued) arriving late, as a transport without
    // order delivers it, does not undo the newer one: still pending, not lost. A marker status
    // of another device published after it says it was processed.
    let mut older = status("gap-dev", "imu", 25, 0, &[]);
    older.ts -= 60_000_000;
    publish(
        broker.port(),
        vec![
            Msg::status(&older),
            Msg::status(&status("gap-marker", "imu", 1, 0, &[])),
        ],
    );
    fleet.wait_ledger("gap-marker", "imu", |l| l["captured"] == 1);
    let l = fleet.wait_ledger("gap-dev", "imu", |_| true);
    assert_eq!(
        l["pending_count"], 2,
        "an older status set queued back: {l}"
    );
    assert_eq!(l["lost_count"], 0, "{l}");
}

/// Garbage, a future schema version, an oversized payload, a device speaking for another, a
/// corrupted record, a bad topic and duplicates: the fleet stays up, counts each reject by
/// reason (table, API and metrics), and stores each valid record exactly once.
fn rejects_are_counted_and_valid_records_stored_once(kind: Kind) {
    let broker = TestBroker::start();
    let store = Store::new(kind);
    let fleet = TestFleet::start_with(
        &store,
        broker.port(),
        &client_id(),
        "[ingest]\nmax_payload_bytes = 4096\n",
    );
    let ts = now_us();
    let good = batch("rj-dev", "imu", 1..=5, ts);
    let mut corrupt = batch("rj-dev", "imu", 6..=6, ts);
    corrupt.records[0].values[0] = 99.0;
    let oversized = Msg::telemetry(&batch("rj-dev", "imu", 100..=400, ts));
    assert!(oversized.payload.len() > 4096);
    publish(
        broker.port(),
        vec![
            Msg::raw("ember/v1/rj-dev/telemetry", "garbage"),
            Msg::raw(
                "ember/v1/rj-dev/telemetry",
                vec![0xd9, 0xd9, 0xf7, 0xff, 0x00],
            ),
            Msg::raw(
                "ember/v1/rj-dev/telemetry",
                r#"{"v":2,"device":"rj-dev","stream":"imu","records":[],"future":true}"#,
            ),
            Msg::raw("ember/v1/rj-dev/status", r#"{"v":9,"device":"rj-dev"}"#),
            oversized,
            Msg::raw(
                "ember/v1/rj-dev/telemetry",
                ember_proto::message::encode(
                    &batch("someone-else", "imu", 1..=3, ts),
                    ember_proto::Encoding::Json,
                )
                .expect("encodes"),
            ),
            Msg::telemetry(&corrupt),
            Msg::raw("ember/v1/rj-dev/heartbeat", "{"),
            Msg::telemetry(&good),
            Msg::telemetry(&good),
            Msg::telemetry(&batch("rj-dev", "imu", 3..=8, ts)),
        ],
    );
    let expected = [
        ("malformed", 3),
        ("unsupported_version", 2),
        ("too_large", 1),
        ("device_mismatch", 1),
        ("crc", 1),
    ];
    let mut last = Value::Null;
    let all_counted = wait_until(WAIT, || {
        last = fleet.get_json("/api/v1/rejects?device=rj-dev");
        let items = last["items"].as_array().cloned().unwrap_or_default();
        expected.iter().all(|(reason, n)| {
            items
                .iter()
                .any(|i| i["reason"] == *reason && i["count"] == *n)
        }) && items.len() == expected.len()
    });
    assert!(all_counted, "rejects not counted as expected: {last}");
    let crc = last["items"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["reason"] == "crc").cloned())
        .unwrap_or_default();
    assert!(
        crc["last_detail"].as_str().unwrap_or("").contains("CRC"),
        "{crc}"
    );
    let only_crc = fleet.get_json("/api/v1/rejects?reason=crc");
    assert_eq!(only_crc["items"].as_array().map(Vec::len), Some(1));

    let l = fleet.wait_ledger("rj-dev", "imu", |l| l["received"] == 8);
    assert_eq!(l["duplicates"], 8, "5 re-sent plus 3..=5 again: {l}");
    assert_exactly_once(&fleet, "rj-dev", "imu", 8);

    let m = fleet.metrics();
    for (reason, n) in expected {
        assert_eq!(
            m.get(&format!("rejects_total{{reason=\"{reason}\"}}"))
                .copied(),
            Some(n as f64),
            "metric for {reason}"
        );
    }
    assert_eq!(
        m.get("records_total{outcome=\"stored\"}").copied(),
        Some(8.0)
    );
    assert_eq!(
        m.get("records_total{outcome=\"duplicate\"}").copied(),
        Some(8.0)
    );
    assert_eq!(fleet.get("/api/v1/health").status, 200, "still healthy");
    // The device exists (valid messages), the someone-else device does not (its message was
    // rejected, and rejects never register devices).
    assert_eq!(fleet.get("/api/v1/devices/someone-else").status, 404);
}

/// A stream's schema is its channel count: reported in the agent's status (`imu`: 2) or set
/// by the first records stored (`gps`: 3). A telemetry batch whose records disagree with it,
/// or with each other, is rejected with reason `schema` (table, API, metrics) and stores
/// nothing; the batches that fit are stored exactly once; the device API shows the schema.
fn telemetry_that_disagrees_with_the_streams_schema_is_rejected(kind: Kind) {
    let broker = TestBroker::start();
    let store = Store::new(kind);
    let fleet = TestFleet::start(&store, broker.port());
    let ts = now_us();
    let dev = "sc-dev";
    let mut st = status(dev, "imu", 0, 0, &[]);
    st.streams[0].channels = Some(2);
    publish(broker.port(), vec![Msg::status(&st)]);
    assert!(
        wait_until(WAIT, || fleet.get("/api/v1/devices/sc-dev").status == 200),
        "the status registers the device"
    );
    let wide = |stream: &str, seqs: std::ops::RangeInclusive<u64>, n: usize| {
        let mut b = ember_proto::TelemetryBatch::new(dev, stream);
        for seq in seqs {
            b.push(seq, ts + seq * 1000, vec![seq as f32; n]);
        }
        b
    };
    let mut mixed = ember_proto::TelemetryBatch::new(dev, "imu");
    for (seq, n) in [(4, 2), (5, 3), (6, 2)] {
        mixed.push(seq, ts + seq * 1000, vec![0.5; n]);
    }
    publish(
        broker.port(),
        vec![
            Msg::telemetry(&batch(dev, "imu", 1..=3, ts)),
            // 3 values on the 2-channel stream; then one record of 3 among records of 2.
            Msg::telemetry(&wide("imu", 4..=5, 3)),
            Msg::telemetry(&mixed),
            Msg::telemetry(&batch(dev, "imu", 4..=6, ts)),
            // No status for gps: its first records fix 3 channels, then 2 are refused.
            Msg::telemetry(&wide("gps", 1..=2, 3)),
            Msg::telemetry(&batch(dev, "gps", 3..=3, ts)),
            Msg::telemetry(&wide("gps", 3..=4, 3)),
        ],
    );
    let l = fleet.wait_ledger(dev, "gps", |l| l["received"] == 4);
    assert_eq!(l["duplicates"], 0, "{l}");
    fleet.wait_ledger(dev, "imu", |l| l["received"] == 6);
    assert_exactly_once(&fleet, dev, "imu", 6);
    assert_exactly_once(&fleet, dev, "gps", 4);
    let mut last = Value::Null;
    let counted = wait_until(WAIT, || {
        last = fleet.get_json("/api/v1/rejects?reason=schema");
        last["items"][0]["count"] == 3
    });
    assert!(counted, "three schema rejects expected: {last}");
    let detail = last["items"][0]["last_detail"].as_str().unwrap_or("");
    assert!(
        detail.contains("record 3 of stream \"gps\" has 2 values but the stream has 3 channels"),
        "{detail}"
    );
    assert_eq!(
        fleet
            .metrics()
            .get("rejects_total{reason=\"schema\"}")
            .copied(),
        Some(3.0)
    );
    let streams = fleet.get_json("/api/v1/devices/sc-dev/streams");
    let channels: Vec<(String, i64)> = streams["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|s| {
            (
                s["stream"].as_str().unwrap_or("").to_string(),
                s["channels"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    assert_eq!(
        channels,
        vec![("gps".to_string(), 3), ("imu".to_string(), 2)]
    );
}

/// Retention deletes telemetry older than `telemetry_days` as a prefix of sequence numbers and
/// archives the gaps in it, so the ledger still reports them; a record arriving after its
/// prefix was pruned is counted as expired, not stored.
fn retention_prunes_old_rows_and_keeps_the_ledger(kind: Kind) {
    let broker = TestBroker::start();
    let store = Store::new(kind);
    let fleet = TestFleet::start_with(
        &store,
        broker.port(),
        &client_id(),
        "[retention]\ntelemetry_days = 1\naggregates_days = 1\ninterval_s = 1\n",
    );
    let now = now_us();
    let old = now - 3 * 86_400_000_000;
    publish(
        broker.port(),
        vec![
            Msg::telemetry(&batch("ret-dev", "imu", 1..=5, old)),
            Msg::telemetry(&batch("ret-dev", "imu", 7..=10, now)),
            Msg::status(&status("ret-dev", "imu", 10, 0, &[])),
        ],
    );
    fleet.wait_ledger("ret-dev", "imu", |l| l["captured"] == 10);
    let mut remaining = Vec::new();
    let pruned = wait_until(WAIT, || {
        remaining = fleet.all_records("ret-dev", "imu", 100);
        remaining.len() == 4
    });
    assert!(
        pruned,
        "retention did not prune: {} rows left",
        remaining.len()
    );
    let seqs: Vec<u64> = remaining
        .iter()
        .map(|r| r["seq"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(seqs, vec![7, 8, 9, 10]);
    let l = fleet.wait_ledger("ret-dev", "imu", |l| l["captured"] == 10);
    assert_eq!(l["received"], 9, "received survives retention: {l}");
    assert_eq!(
        ranges(&l["lost"]),
        vec![(6, 6)],
        "the archived gap is still lost: {l}"
    );

    publish(
        broker.port(),
        vec![Msg::telemetry(&batch("ret-dev", "imu", 2..=3, old))],
    );
    let l = fleet.wait_ledger("ret-dev", "imu", |l| l["expired"] == 2);
    assert_eq!(l["received"], 9, "{l}");
    assert_eq!(fleet.all_records("ret-dev", "imu", 100).len(), 4);
    // The old aggregates went too.
    let aggs = fleet.get_json(&format!(
        "/api/v1/devices/ret-dev/streams/imu/aggregates?to={}",
        now - 86_400_000_000
    ));
    assert_eq!(aggs["items"], serde_json::json!([]), "{aggs}");
}

/// The fleet stops (gracefully) while an agent streams and starts again with the same client
/// id: the broker kept the fleet's persistent session, so nothing published meanwhile is
/// lost, and nothing is stored twice.
fn fleet_restart_loses_nothing(kind: Kind) {
    let broker = TestBroker::start();
    let store = Store::new(kind);
    let id = client_id();
    let fleet = TestFleet::start_with(&store, broker.port(), &id, "");
    let agent = TestAgent::builder(agent_bin())
        .device_id("restart-dev")
        .broker_port(broker.port())
        .sim("imu", 200.0, 2)
        .start();
    fleet.wait_ledger("restart-dev", "imu", |l| {
        l["received"].as_u64() >= Some(100)
    });
    fleet.stop().expect("the fleet stops cleanly");
    // The agent keeps publishing; the broker queues for the fleet's session.
    let published = agent.metric("records_acked_total");
    assert!(
        agent
            .wait_metric("records_acked_total", |v| v >= published + 200.0, WAIT)
            .is_some(),
        "the agent did not keep publishing"
    );
    let fleet = TestFleet::start_with(&store, broker.port(), &id, "");
    agent.sigterm();
    assert!(agent.wait_exit(WAIT).success());
    // The agent's goodbye (its offline status) carries its final count; until the fleet has
    // worked through the backlog to it, an older status can make the ledger look complete.
    assert!(
        wait_until(
            WAIT,
            || fleet.get_json("/api/v1/devices/restart-dev")["online"] == false
        ),
        "the agent's offline status never reached the fleet"
    );
    let l = fleet.wait_ledger("restart-dev", "imu", complete);
    assert_exactly_once(
        &fleet,
        "restart-dev",
        "imu",
        l["captured"].as_u64().unwrap_or(0),
    );
}

/// Two replicas in one shared-subscription group on one database: the broker splits the
/// telemetry between them (both store some), and every record is stored exactly once.
fn replicas_share_telemetry_and_store_it_once(kind: Kind) {
    let broker = TestBroker::start();
    let store = Store::new(kind);
    let a = TestFleet::start(&store, broker.port());
    let b = TestFleet::start(&store, broker.port());
    let agent = TestAgent::builder(agent_bin())
        .device_id("shared-dev")
        .broker_port(broker.port())
        .sim("imu", 200.0, 2)
        .mqtt("message_max_records", "10")
        .start();
    let accepted = |f: &TestFleet| {
        f.metrics()
            .get("messages_total{channel=\"telemetry\",outcome=\"accepted\"}")
            .copied()
            .unwrap_or(0.0)
    };
    let both = wait_until(WAIT, || accepted(&a) >= 5.0 && accepted(&b) >= 5.0);
    assert!(
        both,
        "the broker did not split telemetry: {} and {} messages",
        accepted(&a),
        accepted(&b)
    );
    agent.sigterm();
    assert!(agent.wait_exit(WAIT).success());
    let l = a.wait_ledger("shared-dev", "imu", complete);
    assert_exactly_once(&b, "shared-dev", "imu", l["captured"].as_u64().unwrap_or(0));
}
