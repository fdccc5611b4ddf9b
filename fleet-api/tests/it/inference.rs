//! The inference channel (`ember/v1/<device>/inference`) against a real Mosquitto, on SQLite
//! and PostgreSQL, with hand-built `InferenceBatch` payloads.

use ember_testkit::{TestBroker, wait_until};
use serde_json::{Value, json};

use crate::on_both_backends;
use crate::support::mqtt::{Msg, Out, inference_batch, publish, status};
use crate::support::{Kind, Store, TestFleet, WAIT, client_id, now_us};

on_both_backends!(
    inference_results_are_stored_once_and_covered_by_the_ledger,
    inference_rejects_are_counted_per_device_and_reason,
    inference_retention_prunes_results_and_keeps_the_ledger,
    many_inference_streams_span_several_statements_exactly_once,
    anomaly_incidents_group_consecutive_windows_and_rates_count_them,
);

const MINUTE: u64 = 60_000_000;

fn seqs(items: &Value) -> Vec<u64> {
    items
        .as_array()
        .map(|a| a.iter().filter_map(|r| r["seq"].as_u64()).collect())
        .unwrap_or_default()
}

/// Results stored exactly once (a batch published twice, and one overlapping), queryable by
/// time range with pagination, aggregated per minute, listed as anomalies, and covered by the
/// durability ledger like telemetry: a gap nobody explains is lost.
fn inference_results_are_stored_once_and_covered_by_the_ledger(kind: Kind) {
    let broker = TestBroker::start();
    let store = Store::new(kind);
    let fleet = TestFleet::start(&store, broker.port());
    // A minute boundary, so the per-minute buckets are predictable.
    let t0 = (now_us() / MINUTE - 5) * MINUTE;
    let probs = [0.1f32, 0.7, 0.2];
    let classes = inference_batch(
        "inf-dev",
        "imu",
        "activity",
        "1.0.0",
        &[
            (1, t0 + 1_000_000, Out::Class("walking", 1, &probs)),
            (2, t0 + 2_000_000, Out::Class("walking", 1, &probs)),
            (
                3,
                t0 + 3_000_000,
                Out::Class("running", 2, &[0.1, 0.2, 0.7]),
            ),
        ],
    );
    let anomalies = |results: &[(u64, u64, Out<'_>)]| {
        inference_batch("inf-dev", "imu", "anomaly", "2.1.0", results)
    };
    publish(
        broker.port(),
        vec![
            inference_batch(
                "inf-dev",
                "imu",
                "activity",
                "1.0.0",
                &[
                    (1, t0 + 1_000_000, Out::Class("walking", 1, &probs)),
                    (2, t0 + 2_000_000, Out::Class("walking", 1, &probs)),
                    (
                        3,
                        t0 + 3_000_000,
                        Out::Class("running", 2, &[0.1, 0.2, 0.7]),
                    ),
                ],
            ),
            classes,
            anomalies(&[
                (1, t0 + 1_000_000, Out::Anomaly(0.2, 0.5)),
                (2, t0 + 2_000_000, Out::Anomaly(0.9, 0.5)),
                // seq 3 never arrives
                (4, t0 + MINUTE + 1_000_000, Out::Anomaly(0.4, 0.5)),
            ]),
            // Overlaps seq 4 (a re-send) and adds 5.
            anomalies(&[
                (4, t0 + MINUTE + 1_000_000, Out::Anomaly(0.4, 0.5)),
                (5, t0 + MINUTE + 2_000_000, Out::Anomaly(0.8, 0.5)),
            ]),
            Msg::status(&{
                let mut s = status("inf-dev", "imu.activity", 3, 0, &[]);
                s.streams.push(ember_proto::StreamStatus {
                    head: None,
                    channels: None,
                    stream: "imu.anomaly".into(),
                    last_seq: 5,
                    queued: 0,
                    evicted: vec![],
                });
                s.models.insert("activity".into(), "1.0.0".into());
                s.models.insert("anomaly".into(), "2.1.0".into());
                s
            }),
        ],
    );

    let l = fleet.wait_ledger("inf-dev", "imu.anomaly", |l| {
        l["received"] == 4 && l["captured"] == 5
    });
    assert_eq!(l["kind"], "inference", "{l}");
    assert_eq!(l["duplicates"], 1, "{l}");
    assert_eq!(l["lost"], json!([{"from": 3, "to": 3}]), "{l}");
    let l = fleet.wait_ledger("inf-dev", "imu.activity", |l| l["received"] == 3);
    assert_eq!(
        (&l["duplicates"], &l["lost_count"], &l["kind"]),
        (&json!(3), &json!(0), &json!("inference")),
        "{l}"
    );

    // Results by time range, paged two at a time.
    let base = "/api/v1/devices/inf-dev/streams/imu.anomaly/inference";
    let p1 = fleet.get_json(&format!("{base}?limit=2"));
    assert_eq!(seqs(&p1["items"]), vec![1, 2], "{p1}");
    let cursor = p1["next_cursor"].as_str().expect("a second page");
    let p2 = fleet.get_json(&format!("{base}?limit=2&cursor={cursor}"));
    assert_eq!(seqs(&p2["items"]), vec![4, 5], "{p2}");
    assert_eq!(p2["next_cursor"], Value::Null);
    let r = &p1["items"][1];
    assert_eq!(
        (
            &r["model"],
            &r["version"],
            &r["output_kind"],
            &r["anomalous"]
        ),
        (
            &json!("anomaly"),
            &json!("2.1.0"),
            &json!("anomaly"),
            &json!(true)
        ),
        "{r}"
    );
    assert!(
        (r["score"].as_f64().unwrap_or(0.0) - 0.9).abs() < 1e-6,
        "{r}"
    );
    assert_eq!(r["latency_us"], 70);
    assert_eq!(r["window_start"].as_u64(), Some(t0 + 2_000_000 - 100_000));
    let ranged = fleet.get_json(&format!(
        "{base}?from={}&to={}",
        t0 + MINUTE,
        t0 + MINUTE + 2_000_000
    ));
    assert_eq!(seqs(&ranged["items"]), vec![4], "{ranged}");
    let class = fleet.get_json("/api/v1/devices/inf-dev/streams/imu.activity/inference");
    let c = &class["items"][2];
    assert_eq!(
        (&c["label"], &c["class"]),
        (&json!("running"), &json!(2)),
        "{c}"
    );
    assert_eq!(c["probabilities"].as_array().map(Vec::len), Some(3), "{c}");

    // Per-minute aggregates: label counts; anomaly count, mean and max score.
    let aggs = fleet.get_json("/api/v1/devices/inf-dev/streams/imu.activity/inference/aggregates");
    let labels: Vec<(String, i64)> = aggs["items"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| {
                    (
                        x["label"].as_str().unwrap_or("").to_string(),
                        x["results"].as_i64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        labels,
        vec![("running".to_string(), 1), ("walking".to_string(), 2)],
        "{aggs}"
    );
    let aggs = fleet.get_json(
        "/api/v1/devices/inf-dev/streams/imu.anomaly/inference/aggregates?bucket_s=3600&limit=1",
    );
    let hour = &aggs["items"][0];
    // Whether both minutes fall into one hour depends on the clock; check the first bucket.
    let minute = fleet.get_json(&format!(
        "/api/v1/devices/inf-dev/streams/imu.anomaly/inference/aggregates?from={t0}&to={}",
        t0 + MINUTE
    ));
    let m = &minute["items"][0];
    assert_eq!(
        (&m["results"], &m["anomalies"]),
        (&json!(2), &json!(1)),
        "{minute}"
    );
    assert!(
        (m["mean_score"].as_f64().unwrap_or(0.0) - 0.55).abs() < 1e-6,
        "{m}"
    );
    assert!(
        (m["max_score"].as_f64().unwrap_or(0.0) - 0.9).abs() < 1e-6,
        "{m}"
    );
    assert!(hour["results"].as_i64().unwrap_or(0) >= 2, "{aggs}");

    // Anomalies, newest first; the overview counts model versions.
    let an = fleet.get_json("/api/v1/anomalies");
    assert_eq!(seqs(&an["items"]), vec![5, 2], "{an}");
    let ov = fleet.get_json("/api/v1/overview");
    assert_eq!(ov["devices"], 1, "{ov}");
    assert_eq!(ov["lost_records"], 1, "{ov}");
    assert_eq!(
        ov["models"],
        json!([{"model": "activity", "version": "1.0.0", "devices": 1},
               {"model": "anomaly", "version": "2.1.0", "devices": 1}]),
        "{ov}"
    );
    let m = fleet.metrics();
    assert_eq!(
        m.get("messages_total{channel=\"inference\",outcome=\"accepted\"}"),
        Some(&4.0),
        "{m:?}"
    );
}

/// Malformed results are refused with a reason, counted per device; nothing is stored.
fn inference_rejects_are_counted_per_device_and_reason(kind: Kind) {
    let broker = TestBroker::start();
    let store = Store::new(kind);
    let fleet = TestFleet::start(&store, broker.port());
    let ts = now_us();
    let good = inference_batch(
        "inf-ok",
        "imu",
        "anomaly",
        "1.0.0",
        &[(1, ts, Out::Anomaly(0.1, 0.5))],
    );
    // Published on another device's topic.
    let mismatch = Msg::raw("ember/v1/inf-bad/inference", good.payload.clone());
    // `class` does not index `probabilities`.
    let bad_class = inference_batch(
        "inf-bad",
        "imu",
        "activity",
        "1.0.0",
        &[(1, ts, Out::Class("x", 5, &[0.5, 0.5]))],
    );
    let garbage = Msg::raw("ember/v1/inf-bad/inference", "{\"v\":1}");
    let future = Msg::raw(
        "ember/v1/inf-bad/inference",
        "{\"v\":9,\"device\":\"inf-bad\",\"stream\":\"a.b\",\"source\":\"a\",\"records\":[]}",
    );
    publish(
        broker.port(),
        vec![mismatch, bad_class, garbage, future, good],
    );
    fleet.wait_ledger("inf-ok", "imu.anomaly", |l| l["received"] == 1);
    let mut last = Value::Null;
    let counted = wait_until(WAIT, || {
        last = fleet.get_json("/api/v1/rejects?device=inf-bad");
        let got: Vec<(String, i64)> = last["items"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|i| {
                        (
                            i["reason"].as_str().unwrap_or("").to_string(),
                            i["count"].as_i64().unwrap_or(0),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        got == vec![
            ("device_mismatch".to_string(), 1),
            ("malformed".to_string(), 2),
            ("unsupported_version".to_string(), 1),
        ]
    });
    assert!(counted, "rejects: {last}");
    let r = fleet.get("/api/v1/devices/inf-bad/streams/imu.activity/inference");
    assert_eq!(
        r.status, 404,
        "a reject never registers a device: {}",
        r.body
    );
}

/// Results older than `telemetry_days` are deleted as a prefix of sequence numbers; the gap
/// below the cut stays in the ledger, late copies count as expired, old aggregates go.
fn inference_retention_prunes_results_and_keeps_the_ledger(kind: Kind) {
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
    let res = |seqs: std::ops::RangeInclusive<u64>, base: u64| {
        let results: Vec<(u64, u64, Out<'_>)> = seqs
            .map(|s| (s, base + s * 1000, Out::Anomaly(0.1, 0.5)))
            .collect();
        inference_batch("ret-inf", "env", "anomaly", "1.0.0", &results)
    };
    publish(
        broker.port(),
        vec![
            res(1..=5, old),
            res(7..=10, now),
            Msg::status(&status("ret-inf", "env.anomaly", 10, 0, &[])),
        ],
    );
    fleet.wait_ledger("ret-inf", "env.anomaly", |l| l["captured"] == 10);
    let base = "/api/v1/devices/ret-inf/streams/env.anomaly/inference?limit=100";
    let mut last = Value::Null;
    let pruned = wait_until(WAIT, || {
        last = fleet.get_json(base);
        seqs(&last["items"]) == vec![7, 8, 9, 10]
    });
    assert!(pruned, "retention did not prune the old results: {last}");
    let l = fleet.wait_ledger("ret-inf", "env.anomaly", |l| l["captured"] == 10);
    assert_eq!(l["received"], 9, "{l}");
    assert_eq!(l["lost"], json!([{"from": 6, "to": 6}]), "{l}");
    publish(broker.port(), vec![res(2..=3, old)]);
    let l = fleet.wait_ledger("ret-inf", "env.anomaly", |l| l["expired"] == 2);
    assert_eq!(l["received"], 9, "{l}");
    let aggs = fleet.get_json(&format!(
        "/api/v1/devices/ret-inf/streams/env.anomaly/inference/aggregates?to={}",
        now - 86_400_000_000
    ));
    assert_eq!(aggs["items"], json!([]), "{aggs}");
}

/// Batches larger than one multi-row statement (32 rows on SQLite), with several devices and
/// streams in one statement, are still stored and counted exactly once when re-sent.
fn many_inference_streams_span_several_statements_exactly_once(kind: Kind) {
    let broker = TestBroker::start();
    let store = Store::new(kind);
    let fleet = TestFleet::start(&store, broker.port());
    let t0 = (now_us() / MINUTE - 5) * MINUTE;
    let batch = |device: &str, model: &str, seqs: std::ops::RangeInclusive<u64>| {
        let results: Vec<(u64, u64, Out<'_>)> = seqs
            .map(|s| (s, t0 + s * 1_000, Out::Anomaly(0.1, 0.5)))
            .collect();
        inference_batch(device, "imu", model, "1.0.0", &results)
    };
    let mut first = Vec::new();
    let mut again = Vec::new();
    for device in ["many-a", "many-b"] {
        for model in ["m1", "m2"] {
            first.push(batch(device, model, 1..=80));
            again.push(batch(device, model, 41..=120));
        }
    }
    publish(broker.port(), first);
    publish(broker.port(), again);
    for device in ["many-a", "many-b"] {
        for stream in ["imu.m1", "imu.m2"] {
            let l = fleet.wait_ledger(device, stream, |l| l["received"] == 120);
            assert_eq!(
                (&l["duplicates"], &l["lost_count"], &l["kind"]),
                (&json!(40), &json!(0), &json!("inference")),
                "{l}"
            );
            let aggs = fleet.get_json(&format!(
                "/api/v1/devices/{device}/streams/{stream}/inference/aggregates"
            ));
            let results: i64 = aggs["items"]
                .as_array()
                .map(|a| a.iter().filter_map(|x| x["results"].as_i64()).sum())
                .unwrap_or(0);
            assert_eq!(results, 120, "{aggs}");
        }
    }
}

/// Consecutive anomalous windows of a device form one incident (a normal window, or a result
/// never stored, ends it), with its peak score, window count and the labels the activity
/// classifier gave the same windows; the rate per device counts anomalous windows over all.
fn anomaly_incidents_group_consecutive_windows_and_rates_count_them(kind: Kind) {
    let broker = TestBroker::start();
    let store = Store::new(kind);
    let fleet = TestFleet::start(&store, broker.port());
    let t0 = now_us() - 5 * MINUTE;
    let at = |seq: u64| t0 + seq * 1_000_000;
    // Windows 1-12 of inc-a: 2-4 anomalous (peak 3.5), 5 normal, 6-7 anomalous, 8 never
    // arrives, 9 anomalous, 10-11 normal, 12 anomalous (the newest: ongoing).
    let anomalous = [2, 3, 4, 6, 7, 9, 12];
    let scores: Vec<(u64, u64, Out<'_>)> = (1..=12u64)
        .filter(|s| *s != 8)
        .map(|s| {
            let score = match s {
                3 => 3.5,
                _ if anomalous.contains(&s) => 1.5,
                _ => 0.2,
            };
            (s, at(s), Out::Anomaly(score, 0.9))
        })
        .collect();
    let probs = [0.9f32, 0.1];
    let labels: Vec<(u64, u64, Out<'_>)> = (1..=12u64)
        .map(|s| {
            let label = if s == 4 { "Walking" } else { "Running" };
            (s, at(s), Out::Class(label, u32::from(s == 4), &probs))
        })
        .collect();
    publish(
        broker.port(),
        vec![
            inference_batch("inc-a", "motion", "anomaly", "1.0.0", &scores),
            inference_batch("inc-a", "motion", "activity", "1.0.0", &labels),
            // inc-b: four windows, one anomalous, no classifier.
            inference_batch(
                "inc-b",
                "motion",
                "anomaly",
                "1.0.0",
                &[
                    (1, at(1), Out::Anomaly(0.1, 0.9)),
                    (2, at(2), Out::Anomaly(2.0, 0.9)),
                    (3, at(3), Out::Anomaly(0.1, 0.9)),
                    (4, at(4), Out::Anomaly(0.1, 0.9)),
                ],
            ),
        ],
    );
    fleet.wait_ledger("inc-a", "motion.anomaly", |l| l["received"] == 11);
    fleet.wait_ledger("inc-a", "motion.activity", |l| l["received"] == 12);
    fleet.wait_ledger("inc-b", "motion.anomaly", |l| l["received"] == 4);

    let inc = fleet.get_json("/api/v1/anomalies/incidents");
    let runs: Vec<(String, u64, u64, u64, bool)> = inc["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| {
            (
                i["device_id"].as_str().unwrap_or("").to_string(),
                i["first_seq"].as_u64().unwrap_or(0),
                i["last_seq"].as_u64().unwrap_or(0),
                i["windows"].as_u64().unwrap_or(0),
                i["ongoing"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    let a = |f, l, w, o| ("inc-a".to_string(), f, l, w, o);
    // Most recent end first.
    assert_eq!(
        runs,
        vec![
            a(12, 12, 1, true),
            a(9, 9, 1, false),
            a(6, 7, 2, false),
            a(2, 4, 3, false),
            ("inc-b".to_string(), 2, 2, 1, false),
        ],
        "{inc}"
    );
    let first = &inc["items"][3];
    assert_eq!(first["peak_score"], json!(3.5), "{first}");
    assert_eq!(
        first["threshold"].as_f64().map(|t| (t * 10.0).round()),
        Some(9.0),
        "{first}"
    );
    assert_eq!(first["start"], json!(at(2)), "{first}");
    assert_eq!(first["end"], json!(at(4)), "{first}");
    assert_eq!(
        first["labels"],
        json!([{"label": "Running", "windows": 2}, {"label": "Walking", "windows": 1}]),
        "{first}"
    );
    assert_eq!(inc["items"][4]["labels"], json!([]), "{inc}");
    let limited = fleet.get_json("/api/v1/anomalies/incidents?limit=2");
    assert_eq!(
        limited["items"].as_array().map(Vec::len),
        Some(2),
        "{limited}"
    );
    // A look-back shorter than the data's age finds none.
    let none = fleet.get_json("/api/v1/anomalies/incidents?window_s=60");
    assert_eq!(none["items"], json!([]), "{none}");
    for bad in ["limit=0", "limit=201", "window_s=0", "window_s=604801"] {
        let r = fleet.request(
            "GET",
            &format!("/api/v1/anomalies/incidents?{bad}"),
            Some(crate::support::ADMIN),
            None,
        );
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
    }

    let rates = fleet.get_json("/api/v1/anomalies/rates");
    let got: Vec<(String, i64, i64)> = rates["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|r| {
            (
                r["device_id"].as_str().unwrap_or("").to_string(),
                r["anomalies"].as_i64().unwrap_or(-1),
                r["windows"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![("inc-a".to_string(), 7, 11), ("inc-b".to_string(), 1, 4)],
        "{rates}"
    );
    assert!((rates["items"][0]["rate"].as_f64().unwrap_or(0.0) - 7.0 / 11.0).abs() < 1e-9);
    let r = fleet.request(
        "GET",
        "/api/v1/anomalies/rates?window_s=0",
        Some(crate::support::ADMIN),
        None,
    );
    assert_eq!(r.status, 400, "{}", r.body);
}
