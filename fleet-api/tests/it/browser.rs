//! The dashboard in a real browser: Debian's Chromium driven by the Python `playwright` package
//! (`fleet-api/tests/browser/dashboard.py`; the wheel is pinned in
//! `fleet-api/tests/python/requirements.txt` and brings its own driver, no npm), against a
//! fleet holding a realistic state built through the real Mosquitto.
//!
//! The script signs in, checks the overview, the device list's filters and a device page,
//! fails on any console error, page error, failed request or HTTP error, and asks this test
//! (`READY <step>` on its stdout) to publish records that must then appear on the open page
//! without a reload. Screenshots go to a temp dir (the documentation's come from the demo:
//! `tests/it/demo.rs`).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ember_proto::{DeviceState, Status, StreamStatus, TelemetryBatch};
use ember_testkit::TestBroker;
use serde_json::json;

use crate::support::mqtt::{Msg, Out, inference_batch, publish, status};
use crate::support::{ADMIN, Kind, Store, TestFleet, now_us};

/// The whole browser run (launch, three pages, two live steps, screenshots).
const BROWSER_TIMEOUT: Duration = Duration::from_secs(180);

pub(crate) fn browser_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser"))
}

/// Fails (never skips) when Chromium or Python's playwright is missing, saying how to fix it.
pub(crate) fn require_browser() {
    assert!(
        Path::new("/usr/bin/chromium").is_file(),
        "this test needs Debian's chromium: run scripts/install-deps.sh (apt-get install chromium)"
    );
    let playwright = Command::new("python3")
        .args(["-c", "import playwright.sync_api"])
        .output();
    assert!(
        playwright.map(|o| o.status.success()).unwrap_or(false),
        "this test needs Python's playwright package: run scripts/install-deps.sh \
         (pip install -r fleet-api/tests/python/requirements.txt; never `playwright install`, \
         the tests drive /usr/bin/chromium)"
    );
}

/// The command that runs one of the browser scripts (`dashboard.py`, `rollouts.py`).
pub(crate) fn browser_script(name: &str, cfg: &serde_json::Value) -> Command {
    let mut cmd = Command::new("python3");
    cmd.arg("-u")
        .arg(browser_dir().join(name))
        .arg(cfg.to_string())
        .current_dir(browser_dir());
    cmd
}

fn stream_status(stream: &str, last_seq: u64) -> StreamStatus {
    StreamStatus {
        head: None,
        channels: None,
        stream: stream.into(),
        last_seq,
        queued: 0,
        evicted: vec![],
    }
}

/// A status with the given state, models and streams.
fn device_status(
    device: &str,
    online: bool,
    models: &[(&str, &str)],
    streams: &[(&str, u64)],
) -> Status {
    let mut s = status(device, streams[0].0, streams[0].1, 0, &[]);
    s.streams = streams
        .iter()
        .map(|(name, last)| stream_status(name, *last))
        .collect();
    if !online {
        s.state = DeviceState::Offline;
    }
    s.agent_version = Some("0.1.0".into());
    s.queue = Some(ember_proto::QueueGauge {
        records: if online { 3 } else { 0 },
        bytes: if online { 412 } else { 0 },
        disk_bytes: 1 << 20,
    });
    for (m, v) in models {
        s.models.insert((*m).into(), (*v).into());
    }
    s
}

/// IMU-like telemetry: three channels, one record every `step_us`.
fn imu(device: &str, seqs: std::ops::RangeInclusive<u64>, start: u64, step_us: u64) -> Msg {
    let mut b = TelemetryBatch::new(device, "imu");
    for seq in seqs {
        let t = seq as f32 / 8.0;
        b.push(
            seq,
            start + seq * step_us,
            vec![t.sin() * 1.5, (t * 0.7).cos(), 9.81 + (t * 1.3).sin() * 0.3],
        );
    }
    Msg::telemetry(&b)
}

const LABELS: [&str; 3] = ["walking", "running", "idle"];

fn activity(
    device: &str,
    version: &str,
    seqs: std::ops::RangeInclusive<u64>,
    start: u64,
    step_us: u64,
) -> Msg {
    let probs: Vec<[f32; 3]> = (0..3)
        .map(|c| {
            let mut p = [0.05f32; 3];
            p[c] = 0.9;
            p
        })
        .collect();
    let results: Vec<(u64, u64, Out<'_>)> = seqs
        .map(|seq| {
            let c = match seq % 12 {
                0..=6 => 0,
                7..=9 => 1,
                _ => 2,
            };
            (
                seq,
                start + seq * step_us,
                Out::Class(LABELS[c], c as u32, &probs[c]),
            )
        })
        .collect();
    inference_batch(device, "imu", "activity", version, &results)
}

fn anomaly(
    device: &str,
    version: &str,
    seqs: std::ops::RangeInclusive<u64>,
    start: u64,
    step_us: u64,
) -> Msg {
    let results: Vec<(u64, u64, Out<'_>)> = seqs
        .map(|seq| {
            let score = if seq % 17 == 0 {
                0.72 + (seq % 5) as f32 * 0.04
            } else {
                0.12 + ((seq as f32) * 0.9).sin().abs() * 0.15
            };
            (seq, start + seq * step_us, Out::Anomaly(score, 0.5))
        })
        .collect();
    inference_batch(device, "imu", "anomaly", version, &results)
}

/// Six devices, two offline, three model versions, telemetry, results with anomalies, a
/// ledger gap (lost records) and a reject; registered with tags first.
fn populate(fleet: &TestFleet, broker: u16) {
    let tags = [
        ("edge-01", "north"),
        ("edge-02", "north"),
        ("edge-03", "south"),
        ("edge-04", "south"),
        ("edge-05", "west"),
        ("edge-06", "west"),
    ];
    for (device, site) in tags {
        let r = fleet.request(
            "POST",
            "/api/v1/devices",
            Some(ADMIN),
            Some(&json!({"device_id": device, "tags": {"site": site, "line": "a"}})),
        );
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let now = now_us();
    let start = now - 10 * 60_000_000;
    let mut msgs = vec![
        imu("edge-01", 1..=240, start, 2_500_000),
        activity("edge-01", "1.1.0", 1..=60, start, 10_000_000),
        anomaly("edge-01", "2.0.0", 1..=60, start, 10_000_000),
        imu("edge-02", 1..=100, start, 6_000_000),
        activity("edge-02", "1.0.0", 1..=20, start, 30_000_000),
        anomaly("edge-02", "2.0.0", 1..=20, start, 30_000_000),
        imu("edge-03", 1..=100, start, 6_000_000),
        activity("edge-03", "1.1.0", 1..=20, start, 30_000_000),
        // edge-04 lost 51..=60: nothing explains the gap.
        imu("edge-04", 1..=50, start, 6_000_000),
        imu("edge-04", 61..=80, start, 6_000_000),
        activity("edge-04", "1.0.0", 1..=10, start, 30_000_000),
        imu("edge-05", 1..=30, start, 6_000_000),
        anomaly("edge-06", "2.0.0", 1..=20, start, 30_000_000),
        Msg::raw("ember/v1/edge-05/telemetry", "not json"),
    ];
    msgs.extend([
        Msg::status(&device_status(
            "edge-01",
            true,
            &[("activity", "1.1.0"), ("anomaly", "2.0.0")],
            &[("imu", 240), ("imu.activity", 60), ("imu.anomaly", 60)],
        )),
        Msg::status(&device_status(
            "edge-02",
            true,
            &[("activity", "1.0.0"), ("anomaly", "2.0.0")],
            &[("imu", 100), ("imu.activity", 20), ("imu.anomaly", 20)],
        )),
        Msg::status(&device_status(
            "edge-03",
            true,
            &[("activity", "1.1.0")],
            &[("imu", 100), ("imu.activity", 20)],
        )),
        Msg::status(&device_status(
            "edge-04",
            false,
            &[("activity", "1.0.0")],
            &[("imu", 80), ("imu.activity", 10)],
        )),
        Msg::status(&device_status("edge-05", false, &[], &[("imu", 30)])),
        Msg::status(&device_status(
            "edge-06",
            true,
            &[("anomaly", "2.0.0")],
            &[("imu.anomaly", 20)],
        )),
    ]);
    publish(broker, msgs);
    fleet.wait_ledger("edge-04", "imu", |l| {
        l["captured"] == 80 && l["lost_count"] == 10
    });
    fleet.wait_ledger("edge-01", "imu.anomaly", |l| l["received"] == 60);
    fleet.wait_ledger("edge-01", "imu", |l| l["received"] == 240);
    fleet.wait_ledger("edge-06", "imu.anomaly", |l| l["captured"] == 20);
}

/// Every dashboard page loads without console errors or failed requests, a record and a
/// result published to Mosquitto appear on the open pages without a reload, and the
/// screenshots are written.
#[test]
fn dashboard_pages_load_and_update_live_in_chromium() {
    require_browser();
    let broker = TestBroker::start();
    let store = Store::new(Kind::Sqlite);
    // A data dir for the model registry and the development key trusted (the Models page
    // uploads a committed bundle).
    let data = tempfile::tempdir().expect("temp dir");
    let fleet = TestFleet::with_dev_registry(&store, broker.port(), data.path());
    populate(&fleet, broker.port());

    // docs/screenshots/ comes from the demo itself (demo.rs); these stay in a temp dir.
    let shots = tempfile::tempdir().expect("temp dir");
    let shot_dir = shots.path().to_path_buf();
    let cfg = json!({
        "base": format!("http://127.0.0.1:{}", fleet.port),
        "token": ADMIN,
        "device": "edge-01",
        "screenshots": shot_dir,
        "online_count": 4,
        "device_count": 6,
        "offline": ["edge-04", "edge-05"],
        "tag": "site=north",
        "tagged": ["edge-01", "edge-02"],
        "model": "activity 1.1.0",
        "with_model": ["edge-01", "edge-03"],
        "anomaly_text": "0.987",
        "telemetry_text": "2.468",
        "label_text": "jumping",
        "bundle": ember_testkit::bundles::committed_path("anomaly-f32"),
        "bundle_version": "1.0.0",
    });
    let started = Instant::now();
    let mut child = browser_script("dashboard.py", &cfg)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run python3");
    let mut stdin = child.stdin.take().expect("piped stdin");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let now = now_us();
    let mut ok = None;
    let mut transcript = Vec::new();
    while ok.is_none() {
        let left = BROWSER_TIMEOUT.saturating_sub(started.elapsed());
        let Ok(line) = rx.recv_timeout(left) else {
            break;
        };
        transcript.push(line.clone());
        match line.as_str() {
            "READY overview" => {
                publish(
                    broker.port(),
                    vec![
                        inference_batch(
                            "edge-02",
                            "imu",
                            "anomaly",
                            "2.0.0",
                            &[(21, now, Out::Anomaly(0.987, 0.5))],
                        ),
                        imu("edge-03", 101..=160, now - 60_000_000, 1_000_000),
                    ],
                );
                writeln!(stdin, "GO").expect("the browser script's stdin");
            }
            "READY device" => {
                let mut b = TelemetryBatch::new("edge-01", "imu");
                b.push(241, now, vec![2.468, 0.5, 9.8]);
                publish(
                    broker.port(),
                    vec![
                        Msg::telemetry(&b),
                        inference_batch(
                            "edge-01",
                            "imu",
                            "activity",
                            "1.1.0",
                            &[(61, now, Out::Class("jumping", 1, &[0.1, 0.8, 0.1]))],
                        ),
                    ],
                );
                writeln!(stdin, "GO").expect("the browser script's stdin");
            }
            l if l.starts_with("OK ") => ok = Some(l[3..].to_string()),
            _ => {}
        }
    }
    drop(stdin);
    if ok.is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("the browser script ran");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && ok.is_some(),
        "the browser test failed after {:?} (status {:?}):\n{stderr}\nstdout: {transcript:?}",
        started.elapsed(),
        out.status
    );
    eprintln!(
        "browser run took {:?}: {}",
        started.elapsed(),
        ok.unwrap_or_default()
    );
    for name in ["overview.png", "device.png", "models.png"] {
        let bytes = std::fs::read(shot_dir.join(name)).unwrap_or_default();
        assert!(
            bytes.len() > 10_000 && bytes.starts_with(b"\x89PNG"),
            "{name} was not written as a PNG"
        );
    }
}
