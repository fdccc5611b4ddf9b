//! The REST API: authentication and scopes, pagination and filters, time ranges, errors, the
//! OpenAPI document and response shapes.

use std::collections::BTreeSet;
use std::process::Command;

use ember_testkit::TestBroker;
use serde_json::{Value, json};

use crate::on_both_backends;
use crate::support::mqtt::{Msg, batch, publish, status};
use crate::support::{ADMIN, Kind, Store, TestFleet, fleet_bin};

on_both_backends!(
    tokens_and_scopes_guard_every_route,
    devices_page_and_filter,
    telemetry_and_aggregates_by_time_range,
);

/// Runs `ember-fleet token ...` against the fleet's database; returns stdout.
pub fn token_cli(db_url: &str, args: &[&str]) -> String {
    let mut cmd = Command::new(fleet_bin());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("EMBER_FLEET_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd
        .arg("token")
        .args(args)
        .env("EMBER_FLEET_DATABASE__URL", db_url)
        .output()
        .expect("cannot run ember-fleet");
    assert!(
        out.status.success(),
        "ember-fleet token {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// No token: 401 (with `WWW-Authenticate`); a read token reads but cannot write (403); an
/// admin token writes; a revoked token is refused. Health and the OpenAPI document are open.
fn tokens_and_scopes_guard_every_route(kind: Kind) {
    let broker = TestBroker::start();
    let store = Store::new(kind);
    let fleet = TestFleet::start(&store, broker.port());

    assert_eq!(
        fleet.request("GET", "/api/v1/health", None, None).status,
        200
    );
    assert_eq!(
        fleet.request("GET", "/api/openapi.json", None, None).status,
        200
    );
    let routes = [
        ("GET", "/api/v1/devices"),
        ("GET", "/api/v1/devices/d1"),
        ("GET", "/api/v1/devices/d1/streams"),
        ("GET", "/api/v1/devices/d1/streams/s/telemetry"),
        ("GET", "/api/v1/devices/d1/streams/s/aggregates"),
        ("GET", "/api/v1/devices/d1/ledger"),
        ("GET", "/api/v1/rejects"),
        ("GET", "/api/v1/devices/d1/streams/s.m/inference"),
        ("GET", "/api/v1/devices/d1/streams/s.m/inference/aggregates"),
        ("GET", "/api/v1/anomalies"),
        ("GET", "/api/v1/anomalies/incidents"),
        ("GET", "/api/v1/anomalies/rates"),
        ("GET", "/api/v1/overview"),
        ("GET", "/api/v1/events"),
        ("POST", "/api/v1/devices"),
        ("PUT", "/api/v1/devices/d1/tags"),
    ];
    for (method, path) in routes {
        let r = fleet.request(method, path, None, Some(&json!({})));
        assert_eq!(r.status, 401, "{method} {path} without a token: {}", r.body);
        assert_eq!(r.error_code(), "unauthorized");
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
        let r = fleet.request(method, path, Some("not-a-token"), Some(&json!({})));
        assert_eq!(r.status, 401, "{method} {path} with a bad token");
    }

    let read = token_cli(
        &fleet.db_url,
        &["create", "--scope", "read", "--name", "it-read"],
    );
    assert!(read.starts_with("ef_"), "{read}");
    let r = fleet.request("GET", "/api/v1/devices", Some(&read), None);
    assert_eq!(r.status, 200, "{}", r.body);
    let register = json!({"device_id": "scoped-dev"});
    let r = fleet.request("POST", "/api/v1/devices", Some(&read), Some(&register));
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.error_code(), "forbidden");
    let r = fleet.request("POST", "/api/v1/devices", Some(ADMIN), Some(&register));
    assert_eq!(r.status, 201, "{}", r.body);
    let tags = json!({"tags": {"site": "x"}});
    let r = fleet.request(
        "PUT",
        "/api/v1/devices/scoped-dev/tags",
        Some(&read),
        Some(&tags),
    );
    assert_eq!(r.status, 403, "{}", r.body);
    let r = fleet.request(
        "PUT",
        "/api/v1/devices/scoped-dev/tags",
        Some(ADMIN),
        Some(&tags),
    );
    assert_eq!(r.status, 200, "{}", r.body);

    let admin2 = token_cli(&fleet.db_url, &["create", "--scope", "admin"]);
    let r = fleet.request(
        "PUT",
        "/api/v1/devices/scoped-dev/tags",
        Some(&admin2),
        Some(&tags),
    );
    assert_eq!(r.status, 200, "{}", r.body);

    let list = token_cli(&fleet.db_url, &["list"]);
    let read_id = list
        .lines()
        .find(|l| l.contains("it-read"))
        .and_then(|l| l.split('\t').next())
        .unwrap_or_else(|| panic!("token list lacks it-read: {list}"))
        .to_string();
    assert!(!list.contains(&read), "token list must never show a token");
    token_cli(&fleet.db_url, &["revoke", &read_id]);
    let r = fleet.request("GET", "/api/v1/devices", Some(&read), None);
    assert_eq!(r.status, 401, "a revoked token: {}", r.body);
}

/// Keyset pagination returns every device exactly once; filters by online state, tag
/// (`key=value` and `key`) and case-insensitive id substring; registry errors.
fn devices_page_and_filter(kind: Kind) {
    let broker = TestBroker::start();
    let store = Store::new(kind);
    let fleet = TestFleet::start(&store, broker.port());
    for i in 0..7 {
        let site = if i % 2 == 0 { "north" } else { "south" };
        let body =
            json!({"device_id": format!("Pump-{i:02}"), "tags": {"site": site, "kind": "pump"}});
        let r = fleet.request("POST", "/api/v1/devices", Some(ADMIN), Some(&body));
        assert_eq!(r.status, 201, "{}", r.body);
    }
    // One device that announced itself over MQTT (first contact registers it, online).
    publish(
        broker.port(),
        vec![Msg::status(&status("sensor_9", "imu", 0, 0, &[]))],
    );
    assert!(
        ember_testkit::wait_until(crate::support::WAIT, || {
            fleet.get("/api/v1/devices/sensor_9").status == 200
        }),
        "first contact did not register sensor_9"
    );

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/devices?limit=3&cursor={c}"),
            None => "/api/v1/devices?limit=3".to_string(),
        };
        let v = fleet.get_json(&path);
        pages += 1;
        let items = v["items"].as_array().cloned().unwrap_or_default();
        assert!(items.len() <= 3);
        seen.extend(
            items
                .iter()
                .map(|d| d["device_id"].as_str().unwrap_or("").to_string()),
        );
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let mut expected: Vec<String> = (0..7).map(|i| format!("Pump-{i:02}")).collect();
    expected.push("sensor_9".into());
    assert_eq!(seen, expected, "every device once, in id order");

    let ids = |path: &str| -> Vec<String> {
        fleet.get_json(path)["items"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|d| d["device_id"].as_str().unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(
        ids("/api/v1/devices?tag=site=north"),
        vec!["Pump-00", "Pump-02", "Pump-04", "Pump-06"]
    );
    assert_eq!(ids("/api/v1/devices?tag=kind").len(), 7);
    assert_eq!(ids("/api/v1/devices?tag=site=west"), Vec::<String>::new());
    assert_eq!(ids("/api/v1/devices?search=PUMP-0&limit=2").len(), 2);
    assert_eq!(
        ids("/api/v1/devices?search=p_9"),
        Vec::<String>::new(),
        "_ is literal"
    );
    assert_eq!(ids("/api/v1/devices?search=r_9"), vec!["sensor_9"]);
    assert_eq!(ids("/api/v1/devices?online=true"), vec!["sensor_9"]);
    assert_eq!(ids("/api/v1/devices?online=false&tag=site=south").len(), 3);

    let d = fleet.get_json("/api/v1/devices/Pump-03");
    assert_eq!(d["preregistered"], true);
    assert_eq!(d["online"], false);
    assert_eq!(d["tags"], json!({"kind": "pump", "site": "south"}));
    let r = fleet.request(
        "PUT",
        "/api/v1/devices/Pump-03/tags",
        Some(ADMIN),
        Some(&json!({"tags": {"site": "east"}})),
    );
    assert_eq!(
        r.json()["tags"],
        json!({"site": "east"}),
        "tags are replaced"
    );

    let err = |method: &str, path: &str, body: Option<Value>| {
        let r = fleet.request(method, path, Some(ADMIN), body.as_ref());
        (r.status, r.error_code())
    };
    assert_eq!(
        err("GET", "/api/v1/devices/nobody", None),
        (404, "not_found".into())
    );
    assert_eq!(
        err(
            "POST",
            "/api/v1/devices",
            Some(json!({"device_id": "Pump-01"}))
        ),
        (409, "conflict".into())
    );
    assert_eq!(
        err("POST", "/api/v1/devices", Some(json!({"device_id": "a/b"}))),
        (400, "invalid_request".into())
    );
    assert_eq!(
        err(
            "POST",
            "/api/v1/devices",
            Some(json!({"device_id": "x", "color": 1}))
        ),
        (400, "invalid_request".into())
    );
    assert_eq!(
        err(
            "PUT",
            "/api/v1/devices/Pump-01/tags",
            Some(json!({"tags": {"bad key": "v"}}))
        ),
        (400, "invalid_request".into())
    );
    assert_eq!(
        err(
            "PUT",
            "/api/v1/devices/nobody/tags",
            Some(json!({"tags": {}}))
        ),
        (404, "not_found".into())
    );
    assert_eq!(
        err("GET", "/api/v1/devices?limit=0", None),
        (400, "invalid_request".into())
    );
    assert_eq!(
        err("GET", "/api/v1/devices?online=maybe", None),
        (400, "invalid_request".into())
    );
    assert_eq!(
        ids("/api/v1/devices?cursor=Pump-05"),
        vec!["Pump-06", "sensor_9"],
        "a cursor is a position: any text works"
    );
    assert_eq!(
        err("GET", "/api/v1/nothing-here", None),
        (404, "not_found".into())
    );
    assert_eq!(
        err("DELETE", "/api/v1/devices", None),
        (405, "method_not_allowed".into())
    );
    let r = fleet.request("POST", "/api/v1/devices", Some(ADMIN), None);
    assert_eq!(r.status, 400, "a missing body: {}", r.body);
}

/// Telemetry by time range and page, aggregates per minute rolled up to wider buckets, per
/// channel, and the range errors.
fn telemetry_and_aggregates_by_time_range(kind: Kind) {
    let broker = TestBroker::start();
    let store = Store::new(kind);
    let fleet = TestFleet::start(&store, broker.port());
    // t0 is a multiple of two minutes; record seq is at t0 + (seq - 1) * 20 s, so seqs 1-3
    // fall in the first minute and 4-6 in the second. Values: [seq, -seq].
    let t0: u64 = 1_700_000_040_000_000;
    assert_eq!(t0 % 120_000_000, 0);
    let mut b = ember_proto::TelemetryBatch::new("ts-dev", "imu");
    for seq in 1..=6u64 {
        b.push(
            seq,
            t0 + (seq - 1) * 20_000_000,
            vec![seq as f32, -(seq as f32)],
        );
    }
    publish(broker.port(), vec![Msg::telemetry(&b)]);
    let base = "/api/v1/devices/ts-dev/streams/imu";
    fleet.wait_ledger("ts-dev", "imu", |l| l["received"] == 6);

    let seqs = |path: &str| -> Vec<u64> {
        fleet.get_json(path)["items"]
            .as_array()
            .map(|a| a.iter().map(|r| r["seq"].as_u64().unwrap_or(0)).collect())
            .unwrap_or_default()
    };
    assert_eq!(
        seqs(&format!(
            "{base}/telemetry?from={}&to={}",
            t0 + 20_000_000,
            t0 + 80_000_000
        )),
        vec![2, 3, 4],
        "from inclusive, to exclusive"
    );
    let all = fleet.all_records("ts-dev", "imu", 4);
    assert_eq!(all.len(), 6);
    assert_eq!(all[1]["values"], json!([2.0, -2.0]));
    assert_eq!(all[1]["ts"], t0 + 20_000_000);

    let aggs = fleet.get_json(&format!("{base}/aggregates"));
    let rows: Vec<(u64, u64, u64, f64, f64, f64)> = aggs["items"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| {
                    (
                        i["ts"].as_u64().unwrap_or(0),
                        i["channel"].as_u64().unwrap_or(9),
                        i["count"].as_u64().unwrap_or(0),
                        i["mean"].as_f64().unwrap_or(f64::NAN),
                        i["min"].as_f64().unwrap_or(f64::NAN),
                        i["max"].as_f64().unwrap_or(f64::NAN),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let m1 = t0 + 60_000_000;
    assert_eq!(
        rows,
        vec![
            (t0, 0, 3, 2.0, 1.0, 3.0),
            (t0, 1, 3, -2.0, -3.0, -1.0),
            (m1, 0, 3, 5.0, 4.0, 6.0),
            (m1, 1, 3, -5.0, -6.0, -4.0),
        ]
    );
    let wide = fleet.get_json(&format!("{base}/aggregates?bucket_s=120&channel=0"));
    assert_eq!(
        wide["items"],
        json!([{"ts": t0, "channel": 0, "count": 6, "mean": 3.5, "min": 1.0, "max": 6.0}])
    );
    // Paging through aggregates one row at a time visits each (bucket, channel) once.
    let mut keys = BTreeSet::new();
    let mut cursor = String::new();
    loop {
        let v = fleet.get_json(&format!("{base}/aggregates?limit=1{cursor}"));
        for i in v["items"].as_array().cloned().unwrap_or_default() {
            assert!(keys.insert((i["ts"].as_u64(), i["channel"].as_u64())));
        }
        match v["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(keys.len(), 4);
    let from_second = fleet.get_json(&format!("{base}/aggregates?from={m1}&channel=1"));
    assert_eq!(from_second["items"].as_array().map(Vec::len), Some(1));

    // Duplicates change nothing.
    publish(broker.port(), vec![Msg::telemetry(&b)]);
    fleet.wait_ledger("ts-dev", "imu", |l| l["duplicates"] == 6);
    assert_eq!(fleet.get_json(&format!("{base}/aggregates")), aggs);

    let code = |path: &str| {
        let r = fleet.get(path);
        (r.status, r.error_code())
    };
    assert_eq!(
        fleet.get_json(&format!("{base}/telemetry?from={t0}&to={t0}"))["items"],
        json!([]),
        "an empty range is empty, not an error"
    );
    assert_eq!(
        code(&format!("{base}/aggregates?bucket_s=90")),
        (400, "invalid_request".into())
    );
    assert_eq!(
        code(&format!("{base}/telemetry?cursor=41")),
        (400, "invalid_cursor".into())
    );
    assert_eq!(
        code(&format!("{base}/telemetry?limit=100000")),
        (400, "invalid_request".into())
    );
    assert_eq!(
        code("/api/v1/devices/nobody/streams/imu/telemetry"),
        (404, "not_found".into())
    );
    assert_eq!(
        code("/api/v1/devices/ts-dev/streams/bad%20name/telemetry"),
        (400, "invalid_request".into())
    );
    let streams = fleet.get_json("/api/v1/devices/ts-dev/streams");
    assert_eq!(streams["items"][0]["received"], 6);
    assert_eq!(streams["items"][0]["first_ts"], t0);
}

/// Replaces every time-like value (`*_at`, `*_seen`, `ts`, `status_ts`) so snapshots are
/// stable.
fn normalize(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for (k, val) in m.iter_mut() {
                let timey = k.ends_with("_at") || k.ends_with("_seen") || k.ends_with("ts");
                if timey && val.is_number() {
                    *val = json!("[time]");
                } else {
                    normalize(val);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(normalize),
        _ => {}
    }
}

/// The OpenAPI document is served without a token, is valid JSON, and lists every route with
/// its methods; the shapes of a device, a ledger and an error are pinned by snapshots.
#[test]
fn openapi_document_and_response_shapes() {
    let broker = TestBroker::start();
    let store = Store::new(Kind::Sqlite);
    let fleet = TestFleet::start(&store, broker.port());
    let doc = fleet.request("GET", "/api/openapi.json", None, None);
    assert_eq!(doc.status, 200);
    assert_eq!(doc.header("content-type"), Some("application/json"));
    let doc = doc.json();
    assert!(
        doc["openapi"].as_str().unwrap_or("").starts_with("3."),
        "{}",
        doc["openapi"]
    );
    let mut routes = Vec::new();
    for (path, ops) in doc["paths"].as_object().cloned().unwrap_or_default() {
        for method in ops
            .as_object()
            .map(|o| o.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_default()
        {
            routes.push(format!("{} {path}", method.to_uppercase()));
        }
    }
    routes.sort();
    insta::assert_json_snapshot!("openapi_routes", routes);
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer",
        "bearer auth is declared"
    );
    assert_eq!(
        doc["paths"]["/api/v1/health"]["get"]["security"],
        json!([{}]),
        "health needs no token"
    );
    for schema in [
        "Device",
        "DevicePage",
        "DeviceLedger",
        "StreamLedger",
        "ErrorBody",
        "AggregatePage",
    ] {
        assert!(
            doc["components"]["schemas"][schema].is_object(),
            "schema {schema} is missing"
        );
    }

    // Response shapes.
    let ts = crate::support::now_us();
    publish(
        broker.port(),
        vec![
            Msg::telemetry(&batch("shape-dev", "imu", 1..=3, ts)),
            Msg::status(&status("shape-dev", "imu", 5, 1, &[(4, 4, "age")])),
        ],
    );
    fleet.wait_ledger("shape-dev", "imu", |l| {
        l["captured"] == 5 && l["received"] == 3
    });
    let mut device = fleet.get_json("/api/v1/devices/shape-dev");
    normalize(&mut device);
    insta::assert_json_snapshot!("device", device);
    let mut ledger = fleet.get_json("/api/v1/devices/shape-dev/ledger");
    normalize(&mut ledger);
    insta::assert_json_snapshot!("ledger", ledger);
    let err = fleet.get("/api/v1/devices/nobody").json();
    insta::assert_json_snapshot!("error", err);
}
