//! Model monitoring end to end: real agents replay BasicMotions through the committed int8
//! activity bundle (registered in the fleet, baseline included) into a real Mosquitto and an
//! in-process fleet. A control group replays the recording the baseline was computed on; the
//! shifted group replays it with a sensor offset (accelerometer x off by 1.5 of its training
//! standard deviations, a miscalibrated or loose sensor). The drift alert fires for the
//! shifted devices and the model version, never for the control devices, in the REST API and
//! in the Prometheus metrics.

use std::io::Write;
use std::path::{Path, PathBuf};

use ember_testkit::{TestAgent, TestBroker, bundles, wait_until};
use serde_json::Value;

use crate::support::{Kind, Store, TestFleet, WAIT, agent_bin, client_id, config};

const CONTROL: [&str; 2] = ["ctl-1", "ctl-2"];
const SHIFTED: [&str; 2] = ["shift-1", "shift-2"];
/// Results each device must have in the window before the verdicts are read (two passes over
/// the recording).
const RESULTS: u64 = 150;

fn train_ts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/data/BasicMotions_TRAIN.ts")
}

/// The TRAIN recording as a CSV, series after series like the `.ts` replay, with `offset`
/// added to channel 0.
fn shifted_csv(dir: &Path, offset: f32) -> PathBuf {
    let text = std::fs::read_to_string(train_ts()).expect("read BasicMotions TRAIN");
    let ts = ember_ts::parse_ts(&text).expect("parse BasicMotions TRAIN");
    let path = dir.join("shifted.csv");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).expect("create the CSV"));
    writeln!(f, "accel_x,accel_y,accel_z,gyro_x,gyro_y,gyro_z").expect("well-formed test data");
    for series in &ts.series {
        let len = series.channels[0].len();
        for t in 0..len {
            let row: Vec<String> = series
                .channels
                .iter()
                .enumerate()
                .map(|(c, d)| (d[t] + if c == 0 { offset } else { 0.0 }).to_string())
                .collect();
            writeln!(f, "{}", row.join(",")).expect("well-formed test data");
        }
    }
    f.flush().expect("well-formed test data");
    path
}

fn agent(
    device: &str,
    broker: u16,
    source: impl FnOnce(ember_testkit::TestAgentBuilder) -> ember_testkit::TestAgentBuilder,
) -> TestAgent {
    let b = TestAgent::builder(agent_bin())
        .device_id(device)
        .broker_port(broker);
    source(b)
        .model(&bundles::committed_path("activity-int8"), "imu")
        .set(
            "inference",
            "trusted_keys",
            &format!("[\"{}\"]", bundles::dev_public_key_path().display()),
        )
        .start()
}

fn report(fleet: &TestFleet) -> Option<Value> {
    let r = fleet.get("/api/v1/monitoring");
    (r.status == 200).then(|| r.json())
}

#[test]
fn a_sensor_offset_raises_the_drift_alert_for_its_devices_and_version_and_not_for_the_control_group()
 {
    let broker = TestBroker::start();
    let store = Store::new(Kind::Sqlite);
    let data = tempfile::tempdir().expect("temp dir");
    let extra = format!(
        "[models]\ntrusted_keys = [\"{}\"]\n[monitoring]\nwindow_s = 600\ninterval_s = 1\nmin_windows = 100\n",
        bundles::dev_public_key_path().display()
    );
    let fleet = TestFleet::spawn(&format!(
        "data_dir = \"{}\"\n{}",
        data.path().display(),
        config(&store.url(), broker.port(), &client_id(), &extra)
    ));
    fleet.wait_healthy();
    // The version the agents run is registered, baseline included.
    let bundle = bundles::committed("activity-int8");
    assert_eq!(crate::models::upload_to(fleet.port, &bundle), 201);

    let (std0, version) = {
        let b = ember_bundle::RawBundle::read(&bundle).expect("well-formed test data");
        let m: Value = serde_json::from_slice(b.manifest_bytes()).expect("well-formed test data");
        assert!(
            m["baseline"].is_object(),
            "the committed bundle has no baseline"
        );
        (
            m["input"]["normalization"]["std"][0]
                .as_f64()
                .expect("well-formed test data") as f32,
            m["version"]
                .as_str()
                .expect("well-formed test data")
                .to_string(),
        )
    };
    let csv = shifted_csv(data.path(), 1.5 * std0);
    let mut agents = Vec::new();
    for d in CONTROL {
        agents.push(agent(d, broker.port(), |b| {
            b.replay_ts("imu", &train_ts(), 1000.0, true)
        }));
    }
    for d in SHIFTED {
        agents.push(agent(d, broker.port(), |b| {
            b.source(&format!(
                "type = \"replay\"\nstream = \"imu\"\npath = \"{}\"\nformat = \"csv\"\nrate_hz = 1000\nloop = true",
                csv.display()
            ))
        }));
    }

    let mut last = Value::Null;
    let ready = wait_until(WAIT * 2, || {
        let Some(r) = report(&fleet) else {
            return false;
        };
        last = r.clone();
        let Some(v) = r["versions"].as_array().and_then(|a| {
            a.iter()
                .find(|v| v["model"] == "activity" && v["version"] == version)
        }) else {
            return false;
        };
        let devices = v["devices"].as_array().cloned().unwrap_or_default();
        devices.len() == 4
            && devices
                .iter()
                .all(|d| d["results"].as_u64().unwrap_or(0) >= RESULTS)
    });
    assert!(
        ready,
        "the monitoring report never covered all four devices: {last:#}"
    );
    let v = last["versions"]
        .as_array()
        .expect("well-formed test data")
        .iter()
        .find(|v| v["model"] == "activity" && v["version"] == version)
        .expect("well-formed test data")
        .clone();
    assert_eq!(v["baseline"], true);
    let device = |id: &str| {
        v["devices"]
            .as_array()
            .expect("well-formed test data")
            .iter()
            .find(|d| d["device"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("{id} missing: {v:#}"))
    };
    for id in SHIFTED {
        let d = device(id);
        let psi = d["drift"]["input_psi"]
            .as_f64()
            .expect("well-formed test data");
        println!(
            "{id}: input PSI {psi:.3}, class PSI {}, reasons {}",
            d["drift"]["class_psi"], d["drift"]["reasons"]
        );
        assert_eq!(d["drift"]["alert"], true, "{id} should drift: {d:#}");
        assert!(psi > 0.25, "{id}: {psi}");
        // The offset channel is the one that moved.
        let by_channel = d["drift"]["input_psi_by_channel"]
            .as_array()
            .expect("well-formed test data");
        let worst = by_channel
            .iter()
            .enumerate()
            .max_by(|a, b| {
                a.1.as_f64()
                    .expect("well-formed test data")
                    .total_cmp(&b.1.as_f64().expect("well-formed test data"))
            })
            .expect("well-formed test data")
            .0;
        assert_eq!(worst, 0, "{by_channel:?}");
    }
    for id in CONTROL {
        let d = device(id);
        let psi = d["drift"]["input_psi"]
            .as_f64()
            .expect("well-formed test data");
        let class = d["drift"]["class_psi"]
            .as_f64()
            .expect("well-formed test data");
        println!(
            "{id}: input PSI {psi:.3}, class PSI {class:.3}, confidence PSI {}",
            d["drift"]["confidence_psi"]
        );
        assert_eq!(d["drift"]["alert"], false, "{id} should be stable: {d:#}");
        assert!(psi < 0.1 && class < 0.1, "{id}: input {psi}, class {class}");
    }
    assert_eq!(v["drift"]["alert"], true, "the version should drift: {v:#}");
    assert_eq!(v["drifting_devices"], 2);

    // The same verdict in Prometheus's metrics (no device ids in labels).
    let key = |name: &str| format!("{name}{{model=\"activity\",version=\"{version}\"}}");
    let ok = wait_until(WAIT, || {
        let m = fleet.metrics();
        m.get(&key("model_drift_alert")) == Some(&1.0)
            && m.get(&key("model_drifting_devices")) == Some(&2.0)
    });
    assert!(ok, "metrics: {:?}", fleet.metrics());
    let one = fleet.get(&format!("/api/v1/monitoring/activity/{version}"));
    assert_eq!(one.status, 200);
    assert_eq!(one.json()["drifting_devices"], 2);
    assert_eq!(fleet.get("/api/v1/monitoring/activity/9.9.9").status, 404);
    drop(agents);
}
