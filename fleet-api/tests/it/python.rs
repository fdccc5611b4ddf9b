//! Clients written in Python against the fleet: a paho-mqtt publisher of edge cases, and
//! schemathesis against the OpenAPI document (`fleet-api/tests/python/`).

use std::path::PathBuf;
use std::process::Command;

use ember_testkit::{TestBroker, wait_until};
use serde_json::Value;

use crate::support::mqtt::{Msg, batch, publish, status};
use crate::support::{ADMIN, Kind, Store, TestFleet, WAIT, client_id, now_us};

fn python_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python"))
}

/// Fails (never skips) when python3 or the packages are missing, saying how to install them.
fn require_python() {
    let ok = Command::new("python3")
        .args([
            "-c",
            "import paho.mqtt, schemathesis, openapi_spec_validator",
        ])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "these tests need python3 with paho-mqtt, schemathesis and openapi-spec-validator: run \
         `python3 -m pip install -r fleet-api/tests/python/requirements.txt`"
    );
}

/// The paho client's valid, duplicate, garbage, future-version, oversized, wrong-device and
/// corrupted messages: the fleet reports exactly what the script says it must.
#[test]
fn paho_client_edge_cases() {
    require_python();
    let broker = TestBroker::start();
    let store = Store::new(Kind::Sqlite);
    let fleet = TestFleet::start_with(
        &store,
        broker.port(),
        &client_id(),
        "[ingest]\nmax_payload_bytes = 4096\n",
    );
    let out = Command::new("python3")
        .arg(python_dir().join("mqtt_edge_cases.py"))
        .args(["--port", &broker.port().to_string(), "--device", "py-dev"])
        .args(["--oversize", "4096"])
        .output()
        .expect("cannot run python3");
    assert!(
        out.status.success(),
        "mqtt_edge_cases.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expect: Value = serde_json::from_slice(&out.stdout).expect("the script prints JSON");
    let l = fleet.wait_ledger("py-dev", "imu", |l| {
        l["received"] == expect["received"] && l["captured"] == 10
    });
    assert_eq!(l["duplicates"], expect["duplicates"], "{l}");
    let lost: Vec<[u64; 2]> = l["lost"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    [
                        r["from"].as_u64().unwrap_or(0),
                        r["to"].as_u64().unwrap_or(0),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(serde_json::json!(lost), expect["lost"], "{l}");
    let mut last = Value::Null;
    let counted = wait_until(WAIT, || {
        last = fleet.get_json("/api/v1/rejects?device=py-dev");
        let items = last["items"].as_array().cloned().unwrap_or_default();
        let got: serde_json::Map<String, Value> = items
            .iter()
            .map(|i| {
                (
                    i["reason"].as_str().unwrap_or("").to_string(),
                    i["count"].clone(),
                )
            })
            .collect();
        Value::Object(got) == expect["rejects"]
    });
    assert!(counted, "rejects {last} != {}", expect["rejects"]);
}

/// A fleet trusting the development key, holding a little data, a registered model that
/// devices run (so rollouts can be created) and a directory of further signed bundles for
/// schemathesis' hooks (`tests/python/hooks.py`).
struct ApiFixture {
    _broker: TestBroker,
    _store: Store,
    _data: tempfile::TempDir,
    bundles: tempfile::TempDir,
    fleet: TestFleet,
}

fn api_fixture() -> ApiFixture {
    let broker = TestBroker::start();
    let store = Store::new(Kind::Sqlite);
    let data = tempfile::tempdir().expect("temp dir");
    let fleet = TestFleet::with_dev_registry(&store, broker.port(), data.path());
    let mut running = status("0", "0", 25, 2, &[(21, 22, "age")]);
    running.models = [("activity".to_string(), "1.0.0".to_string())].into();
    publish(
        broker.port(),
        vec![
            Msg::telemetry(&batch("0", "0", 1..=20, now_us())),
            Msg::status(&running),
            Msg::raw("ember/v1/0/telemetry", "not json"),
        ],
    );
    fleet.wait_ledger("0", "0", |l| l["captured"] == 25);
    let up = crate::models::upload(
        &fleet,
        ADMIN,
        &ember_testkit::bundles::committed("activity-int8"),
    );
    assert_eq!(up.status, 201, "{}", up.text());
    let bundles = tempfile::tempdir().expect("temp dir");
    for minor in 0..16 {
        for name in ["activity-int8", "anomaly-int8"] {
            let v = format!("2.{minor}.0");
            let bytes = ember_testkit::bundles::with_version(name, &v);
            std::fs::write(bundles.path().join(format!("{name}-{v}.bundle")), bytes)
                .expect("write a bundle");
        }
    }
    ApiFixture {
        _broker: broker,
        _store: store,
        _data: data,
        bundles,
        fleet,
    }
}

/// The served document is a valid OpenAPI 3.1 document (openapi-spec-validator: structure,
/// schemas, and every `$ref` resolves).
#[test]
fn the_served_document_is_valid_openapi_3_1() {
    require_python();
    let f = api_fixture();
    let doc = f.fleet.get_json("/api/openapi.json");
    assert_eq!(
        doc["openapi"].as_str().map(|v| &v[..4]),
        Some("3.1."),
        "{}",
        doc["openapi"]
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("openapi.json");
    std::fs::write(&path, doc.to_string()).expect("write the document");
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys\n\
             from openapi_spec_validator import OpenAPIV31SpecValidator, validate\n\
             validate(json.load(open(sys.argv[1])), cls=OpenAPIV31SpecValidator)\n\
             print('valid')",
        ])
        .arg(&path)
        .output()
        .expect("cannot run python3");
    assert!(
        out.status.success(),
        "the served document is not valid OpenAPI 3.1:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// schemathesis, every check including the stateful phase and with no exemption, finds nothing
/// wrong with the API described by `/api/openapi.json` (on a fleet holding a little data and a
/// registered model its device runs).
#[test]
fn schemathesis_finds_no_failures() {
    require_python();
    let f = api_fixture();
    let fleet = &f.fleet;
    // A crash inside the tool (not a finding about the API) is retried, at most twice, and
    // only for the signatures below; failures (the FAILURES section) and every other error
    // fail the test at once.
    let mut attempts = 0;
    loop {
        attempts += 1;
        let scratch = tempfile::tempdir().expect("temp dir");
        let out = Command::new("bash")
            .arg(python_dir().join("schemathesis.sh"))
            .arg(format!("http://127.0.0.1:{}", fleet.port))
            .arg(ADMIN)
            .arg("25")
            .env("EMBER_SCHEMATHESIS_BUNDLES", f.bundles.path())
            .current_dir(scratch.path())
            .output()
            .expect("cannot run schemathesis.sh");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            return;
        }
        let crash = tool_crash(&stdout, &stderr);
        assert!(
            crash.is_some() && attempts < 3,
            "schemathesis found problems (attempt {attempts}):\n{stdout}\n{stderr}"
        );
        eprintln!(
            "schemathesis crashed internally ({}); running it again",
            crash.unwrap_or_default()
        );
    }
}

/// Internal errors of schemathesis/hypothesis that say nothing about the API under test.
const TOOL_CRASHES: &[&str] = &[
    // CPython 3.11.7's ast module, reached through hypothesis' lambda descriptions.
    "AST constructor recursion depth mismatch",
];

/// The known tool crash in a failed run, unless the run also reported failures.
fn tool_crash(stdout: &str, stderr: &str) -> Option<&'static str> {
    if stdout.contains("FAILURES") {
        return None;
    }
    TOOL_CRASHES
        .iter()
        .find(|sig| stdout.contains(*sig) || stderr.contains(*sig))
        .copied()
}

#[test]
fn only_known_tool_crashes_are_retried() {
    let crash = "ERRORS\nSystemError: AST constructor recursion depth mismatch (before=1, after=2)";
    assert!(tool_crash(crash, "").is_some());
    assert!(tool_crash(&format!("FAILURES\nServer error\n{crash}"), "").is_none());
    assert!(tool_crash("ERRORS\nConnection refused", "").is_none());
}
