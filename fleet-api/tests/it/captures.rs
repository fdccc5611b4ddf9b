//! Field capture and labelling end to end: a real agent replays BasicMotions TRAIN through the
//! committed int8 activity bundle with a capture policy (low confidence, a random sample) into
//! a real Mosquitto and the fleet. The captured windows arrive as their own stream (ledger
//! exact), each the very samples the model saw; an operator labels them through the REST API
//! (one at a time with a `label` token, in bulk with the admin token; a read token, a wrong
//! label, a missing capture and a bulk request with one bad item are refused and change
//! nothing); the lake holds every captured window and every labelling, and DuckDB finds each
//! capture's latest label equal to the API's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ember_fleet::auth::Scope;
use ember_testkit::{TestAgent, TestBroker, bundles, wait_until};
use serde_json::{Value, json};

use crate::support::{ADMIN, Kind, Store, TestFleet, WAIT, agent_bin, client_id, config, http};

const DEVICE: &str = "cap-1";
const CAPTURES: &str = "imu.activity.capture";

fn train_ts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/data/BasicMotions_TRAIN.ts")
}

/// The TRAIN recording as the replay streams it: per channel, every series' samples in turn.
fn replay_stream() -> Vec<Vec<f32>> {
    let text = std::fs::read_to_string(train_ts()).expect("read BasicMotions TRAIN");
    let ts = ember_ts::parse_ts(&text).expect("parse BasicMotions TRAIN");
    let mut out = vec![Vec::new(); ts.dimensions];
    for s in &ts.series {
        for (c, ch) in s.channels.iter().enumerate() {
            out[c].extend_from_slice(ch);
        }
    }
    out
}

/// A `label` token (id, secret) named alice, and a `read` token.
fn tokens(db_url: &str) -> ((i64, String), String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let settings = ember_fleet::config::Settings::from_toml(
            &format!("[database]\nurl = \"{db_url}\"\n"),
            "test",
            Vec::new(),
        )
        .expect("settings");
        let db = ember_fleet::db::Db::open(&settings.database)
            .await
            .expect("open the database");
        let t = ember_fleet::auth::create(&db, &Scope::Label, "alice")
            .await
            .expect("create a label token");
        let (_, read) = ember_fleet::auth::create(&db, &Scope::Read, "viewer")
            .await
            .expect("create a read token");
        db.close().await;
        (t, read)
    })
}

fn post_labels(port: u16, labels: &[Value]) -> http::Resp {
    http::request(
        port,
        "POST",
        "/api/v1/captures/labels",
        Some(ADMIN),
        Some(&json!({ "labels": labels }).to_string()),
    )
}

fn put_label(port: u16, token: &str, seq: i64, label: &str) -> http::Resp {
    http::request(
        port,
        "PUT",
        &format!("/api/v1/captures/{DEVICE}/{CAPTURES}/{seq}/label"),
        Some(token),
        Some(&json!({ "label": label }).to_string()),
    )
}

#[test]
fn captured_windows_arrive_exactly_are_labelled_through_the_api_and_land_in_the_lake() {
    let broker = TestBroker::start();
    let store = Store::new(Kind::Sqlite);
    let data = tempfile::tempdir().expect("temp dir");
    let lake = data.path().join("lake");
    let extra = format!(
        "[models]\ntrusted_keys = [\"{}\"]\n[lake]\nstore = \"{}\"\ninterval_s = 1\n",
        bundles::dev_public_key_path().display(),
        lake.display()
    );
    let fleet = TestFleet::spawn(&format!(
        "data_dir = \"{}\"\n{}",
        data.path().display(),
        config(&store.url(), broker.port(), &client_id(), &extra)
    ));
    fleet.wait_healthy();
    assert_eq!(
        crate::models::upload_to(fleet.port, &bundles::committed("activity-int8")),
        201
    );

    // The policy: windows below 0.9 confidence, and one in five at random.
    let agent = TestAgent::builder(agent_bin())
        .device_id(DEVICE)
        .broker_port(broker.port())
        .replay_ts("imu", &train_ts(), 2000.0, false)
        .model_with_capture(
            &bundles::committed_path("activity-int8"),
            "imu",
            "below_confidence = 0.9\nsample = 0.2\nmax_per_minute = 6000",
        )
        .set(
            "inference",
            "trusted_keys",
            &format!("[\"{}\"]", bundles::dev_public_key_path().display()),
        )
        .start();

    // Every window of the recording evaluated and its result stored: the agent's capture count
    // is final. Then the capture stream's ledger is exact and holds that many.
    let results = fleet.wait_ledger(DEVICE, "imu.activity", |l| {
        l["received"].as_u64().unwrap_or(0) >= 79
    });
    let metrics = agent.metrics();
    let counted: f64 = ["low_confidence", "sample", "anomaly"]
        .iter()
        .map(|t| {
            metrics
                .get(&format!("inference_captures_total{{trigger=\"{t}\"}}"))
                .copied()
                .unwrap_or(0.0)
        })
        .sum();
    let n = counted as i64;
    let ledger = fleet.wait_ledger(DEVICE, CAPTURES, |l| {
        l["received"].as_i64() == Some(n)
            && l["received"] == l["captured"]
            && l["missing_count"] == 0
            && l["lost_count"] == 0
    });
    assert_eq!(ledger["received"].as_i64(), Some(n), "{ledger}");
    assert!(
        n >= 5 && n < results["received"].as_i64().expect("received"),
        "{n} captures of {results}"
    );

    // Each capture is the raw window the model saw: the replayed samples ending at source_seq.
    let page = fleet.get_json(&format!("/api/v1/captures?device={DEVICE}&limit=1000"));
    let items = page["items"].as_array().expect("items").clone();
    assert_eq!(items.len() as i64, n);
    let stream = replay_stream();
    for c in &items {
        assert_eq!(
            (c["channels"].as_i64(), c["samples"].as_i64()),
            (Some(6), Some(100))
        );
        let end = c["source_seq"].as_u64().expect("source_seq") as usize;
        let window: Vec<f32> = c["window"]
            .as_array()
            .expect("window")
            .iter()
            .map(|v| v.as_f64().expect("number") as f32)
            .collect();
        let expected: Vec<f32> = stream
            .iter()
            .flat_map(|ch| ch[end - 100..end].to_vec())
            .collect();
        assert_eq!(
            window, expected,
            "capture {} is not the replayed window",
            c["seq"]
        );
        assert_eq!(c["model"], "activity");
        assert_eq!(c["output"]["kind"], "class");
        let trigger = c["trigger"].as_str().expect("trigger");
        let top = c["output"]["probabilities"]
            .as_array()
            .expect("probabilities")
            .iter()
            .map(|p| p.as_f64().expect("p"))
            .fold(0.0, f64::max);
        match trigger {
            "low_confidence" => assert!(top < 0.9, "{c}"),
            "sample" => assert!(
                top >= 0.9,
                "a low-confidence window is a low_confidence capture: {c}"
            ),
            other => panic!("trigger {other}"),
        }
    }

    // The dashboard: every capture plotted; one labelled through the page (admin token).
    crate::browser::require_browser();
    let cfg = json!({
        "base": format!("http://127.0.0.1:{}", fleet.port), "token": ADMIN,
        "device": DEVICE, "seq": items[0]["seq"], "label": "Badminton",
    });
    let out = crate::browser::browser_script("captures.py", &cfg)
        .output()
        .expect("cannot run python3");
    assert!(
        out.status.success(),
        "captures.py failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let page = fleet.get_json("/api/v1/captures?labelled=true");
    assert_eq!(page["items"][0]["seq"], items[0]["seq"]);
    assert_eq!(page["items"][0]["label"], "Badminton");

    // Labelling: a read token may not, a label token may (with who and when); a label the
    // model does not have and a missing capture are refused.
    let seqs: Vec<i64> = items
        .iter()
        .map(|c| c["seq"].as_i64().expect("seq"))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let ((token_id, label), read) = tokens(&store.url());
    let r = put_label(fleet.port, &read, seqs[0], "Walking");
    assert_eq!(r.status, 403, "{}", r.body);
    let r = put_label(fleet.port, &label, seqs[0], "Flying");
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.body.contains("Standing, Running, Walking, Badminton"),
        "{}",
        r.body
    );
    let r = put_label(fleet.port, &label, 999_999, "Walking");
    assert_eq!(r.status, 404, "{}", r.body);
    let r = put_label(fleet.port, &label, seqs[0], "Running");
    assert_eq!(r.status, 200, "{}", r.body);
    let r = put_label(fleet.port, &label, seqs[0], "Walking");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["labelled_by"], format!("token {token_id} (alice)"));

    // Bulk: one bad item refuses the whole request, naming it.
    let mut bulk: Vec<Value> = seqs[1..]
        .iter()
        .map(|s| json!({"device": DEVICE, "stream": CAPTURES, "seq": s, "label": "Standing"}))
        .collect();
    bulk[1]["label"] = json!("standing up");
    let r = post_labels(fleet.port, &bulk);
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("labels[1]"), "{}", r.body);
    let labelled = fleet.get_json("/api/v1/captures?labelled=true&limit=1000");
    let before = usize::from(items[0]["seq"].as_i64() != Some(seqs[0])) + 1;
    assert_eq!(labelled["items"].as_array().map(Vec::len), Some(before));
    // A labelling tool's walk: pages of 3 unlabelled captures, each page labelled before the
    // next is fetched. Keyset paging neither skips nor repeats one as they leave the filter.
    let (mut labelled_now, mut cursor) = (0usize, None::<String>);
    loop {
        let path = match &cursor {
            None => "/api/v1/captures?labelled=false&limit=3".to_string(),
            Some(c) => format!("/api/v1/captures?labelled=false&limit=3&cursor={c}"),
        };
        let page = fleet.get_json(&path);
        let batch: Vec<Value> = page["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|c| json!({"device": c["device"], "stream": c["stream"], "seq": c["seq"], "label": "Standing"}))
            .collect();
        if !batch.is_empty() {
            let r = post_labels(fleet.port, &batch);
            assert_eq!(r.status, 200, "{}", r.body);
            labelled_now += batch.len();
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(
        labelled_now,
        seqs.len() - before,
        "the walk missed or repeated captures"
    );
    let unlabelled = fleet.get_json("/api/v1/captures?labelled=false");
    assert_eq!(unlabelled["items"].as_array().map(Vec::len), Some(0));
    let api_labels: BTreeMap<i64, String> = fleet.get_json("/api/v1/captures?limit=1000")["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|c| {
            (
                c["seq"].as_i64().expect("seq"),
                c["label"].as_str().expect("label").to_string(),
            )
        })
        .collect();

    // The lake: every captured window once, every labelling (the page's, 2 by the label
    // token, the bulk), latest labels equal.
    let events = 1 + 2 + labelled_now as i64;
    let mut view = Value::Null;
    let ok = wait_until(WAIT, || {
        view = crate::lake::duckdb(&lake);
        view["captures"].as_array().map(Vec::len) == Some(n as usize)
            && view["label_events"] == events
    });
    assert!(ok, "the lake did not catch up: {view:#}");
    for c in view["captures"].as_array().expect("captures") {
        assert_eq!(c["values"], 600, "{c}");
        assert_eq!(c["stream"], CAPTURES);
    }
    let lake_labels: BTreeMap<i64, String> = view["labels"]
        .as_array()
        .expect("labels")
        .iter()
        .map(|l| {
            (
                l["seq"].as_i64().expect("seq"),
                l["label"].as_str().expect("label").to_string(),
            )
        })
        .collect();
    assert_eq!(lake_labels, api_labels);
    println!(
        "captures: {n} of {} windows captured, {events} labellings, lake and API agree",
        results["received"]
    );
}
