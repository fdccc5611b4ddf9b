//! On-device inference: the committed bundles on replayed BasicMotions data, bad bundles,
//! raw forwarding policies, and model swaps under load.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ember_agent::config::{Backend, ForwardRaw, InferenceSettings};
use ember_agent::inference::{self, ModelSlot, Produced, Tap};
use ember_agent::metrics::Metrics;
use ember_models::{Bundle, TrustedKeys};
use ember_proto::{InferenceOutput, InferenceRecord};
use ember_testkit::{ALL_TOPICS, InferenceLog, Subscriber, TestBroker, free_port};

use crate::common::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn bundle(name: &str) -> PathBuf {
    repo().join("models/bundles").join(name)
}

fn dev_pub() -> PathBuf {
    repo().join("models/keys/dev/dev.pub")
}

fn test_data() -> PathBuf {
    repo().join("models/data/BasicMotions_TEST.ts")
}

/// Ground truth: the label of each series of the TEST split, in file order.
fn truth() -> Vec<String> {
    let text = std::fs::read_to_string(test_data()).expect("read TEST split");
    let ds = ember_ts::parse_ts(&text).expect("parse TEST split");
    ds.series
        .iter()
        .map(|s| s.label.clone().expect("labelled series"))
        .collect()
}

const WINDOW: u64 = 100;
const HOP: u64 = 50;

/// Windows in `n` series of 100 samples, cut 100 long every 50.
fn windows_in(series: usize) -> u64 {
    (series as u64 * WINDOW - WINDOW) / HOP + 1
}

/// The series a window lies in exactly, if it is aligned with one (`source_seq` is the seq of
/// its last sample; the replay starts at seq 1).
fn aligned_series(r: &InferenceRecord) -> Option<usize> {
    r.source_seq
        .is_multiple_of(WINDOW)
        .then(|| (r.source_seq / WINDOW - 1) as usize)
}

/// A signing key made up for the test, with its public key file in `dir`.
fn test_key(dir: &Path) -> (ed25519_dalek::SigningKey, PathBuf) {
    let key = ed25519_dalek::SigningKey::from_bytes(&[42u8; 32]);
    let path = dir.join("test.pub");
    std::fs::write(
        &path,
        ember_models::keys::public_key_file(&key.verifying_key(), "test key"),
    )
    .expect("write test key");
    (key, path)
}

/// A copy of a committed bundle, changed by `edit` and signed by `key`.
fn resigned(
    from: &str,
    to: &Path,
    key: &ed25519_dalek::SigningKey,
    edit: impl FnOnce(&mut ember_models::Manifest),
) -> PathBuf {
    let b = Bundle::read(&std::fs::read(bundle(from)).expect("read bundle")).expect("parse");
    let mut manifest = b.manifest().clone();
    edit(&mut manifest);
    let mut nb = Bundle::new(manifest, b.weights().to_vec()).expect("rebuild bundle");
    nb.sign(key);
    std::fs::write(to, nb.to_bytes()).expect("write bundle");
    to.to_path_buf()
}

fn toml_list(paths: &[&Path]) -> String {
    let items: Vec<String> = paths
        .iter()
        .map(|p| format!("{:?}", p.display().to_string()))
        .collect();
    format!("[{}]", items.join(", "))
}

fn wait_results(sub: &Subscriber, dev: &str, stream: &str, n: u64) -> InferenceLog {
    assert!(
        sub.wait_for(
            |v| v.inference(dev, stream).is_some_and(|l| l.unique() >= n),
            LONG
        ),
        "expected {n} results on {stream}, got {:?}",
        sub.with_view(|v| v.inference(dev, stream).map(InferenceLog::unique))
    );
    sub.with_view(|v| v.inference(dev, stream).cloned())
        .expect("results")
}

/// The agent replays the BasicMotions TEST split through the committed int8 activity bundle
/// into a real broker: one result per window, contiguous inference seqs, labels right for
/// at least 95% of the series, the raw stream delivered too, the model in the status.
#[test]
fn activity_int8_labels_replayed_basicmotions() {
    let truth = truth();
    let expected = windows_in(truth.len());
    let broker = TestBroker::start();
    let sub = Subscriber::start(broker.port(), ALL_TOPICS);
    let dev = "infer-e2e";
    let agent = agent(dev, broker.port())
        .replay_ts("motion", &test_data(), 4000.0, false)
        .model(&bundle("activity-int8.bundle"), "motion")
        .set("inference", "trusted_keys", &toml_list(&[&dev_pub()]))
        .start();
    let log = wait_results(&sub, dev, "motion.activity", expected);
    assert_eq!(log.unique(), expected, "one result per window");
    assert!(log.is_contiguous(), "inference seqs must be 1..={expected}");
    assert_eq!((log.conflicts, log.order_violations), (0, 0));
    assert_eq!(log.source, "motion");
    let mut right = 0;
    let mut aligned = 0;
    let mut last_source_seq = 0;
    for r in log.records.values() {
        assert!(r.source_seq > last_source_seq, "results follow the stream");
        last_source_seq = r.source_seq;
        assert_eq!(
            (r.model.as_str(), r.version.as_str()),
            ("activity", "1.0.0")
        );
        let InferenceOutput::Class { label, .. } = &r.output else {
            panic!("a classifier result expected, got {:?}", r.output);
        };
        if let Some(i) = aligned_series(r) {
            aligned += 1;
            right += usize::from(*label == truth[i]);
        }
    }
    assert_eq!(aligned, truth.len(), "one aligned window per series");
    let accuracy = right as f64 / aligned as f64;
    eprintln!("activity-int8 accuracy on replayed TEST series: {right}/{aligned} = {accuracy:.3}");
    assert!(accuracy >= 0.95, "accuracy {accuracy:.3} is below 0.95");

    // Raw data still flows (forward_raw = "all"), and the status names the model.
    let samples = truth.len() as u64 * WINDOW;
    wait_all_delivered(&sub, dev, "motion", samples, LONG);
    assert!(
        sub.wait_for(
            |v| v
                .status(dev)
                .is_some_and(|s| s.models.get("activity").map(String::as_str) == Some("1.0.0")),
            SHORT
        ),
        "status should list the activity model"
    );
    assert_eq!(agent.metric("inference_windows_total"), expected as f64);
    assert_eq!(agent.metric("inference_errors_total"), 0.0);
    stop_gracefully(&agent, SHORT);
    assert_clean_delivery(&sub.snapshot());
}

/// Every kind of bad bundle refuses the start with exit code 2 and a message naming the
/// bundle and the problem.
#[test]
fn bad_bundles_refuse_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (key, key_pub) = test_key(dir.path());
    let good = std::fs::read(bundle("activity-int8.bundle")).expect("read bundle");

    let flipped = dir.path().join("flipped.bundle");
    let mut bytes = good.clone();
    // Inside the weights (the last 72 bytes are the key id and the signature).
    let i = bytes.len() - 200;
    bytes[i] ^= 0x01;
    std::fs::write(&flipped, bytes).expect("write");

    let truncated = dir.path().join("truncated.bundle");
    std::fs::write(&truncated, &good[..good.len() / 2]).expect("write");

    let golden = resigned(
        "activity-int8.bundle",
        &dir.path().join("golden.bundle"),
        &key,
        |m| m.golden.vectors[0].output[0] += 0.5,
    );

    let good_path = bundle("activity-int8.bundle");
    let dev = dev_pub();
    // (bundle, trusted key, sim source channels, what stderr must say)
    let cases: [(&Path, &Path, usize, &str); 5] = [
        (&flipped, &dev, 6, "sha256"),
        (&truncated, &dev, 6, "truncated"),
        (&good_path, &key_pub, 6, "not trusted"),
        (
            &good_path,
            &dev,
            3,
            "the model takes 6 channels, the source produces 3",
        ),
        (&golden, &key_pub, 6, "golden vector 0"),
    ];
    for (bundle_path, trusted, channels, want) in cases {
        let agent = agent("infer-bad", free_port())
            .sim("motion", 10.0, channels)
            .model(bundle_path, "motion")
            .set("inference", "trusted_keys", &toml_list(&[trusted]))
            .spawn();
        let status = agent.wait_exit(SHORT);
        let stderr = agent.stderr_text();
        assert_eq!(
            status.code(),
            Some(2),
            "{}: expected exit 2; stderr:\n{stderr}",
            bundle_path.display()
        );
        assert!(
            stderr.contains(want) && stderr.contains(&bundle_path.display().to_string()),
            "{}: stderr should name the bundle and say {want:?}:\n{stderr}",
            bundle_path.display()
        );
        assert!(
            !agent.data_dir().join("queue").exists(),
            "nothing may be written before the models are checked"
        );
    }
}

/// With `forward_raw = "none"` only results leave the device.
#[test]
fn forward_raw_none_sends_only_results() {
    let series = truth().len();
    let expected = windows_in(series);
    let broker = TestBroker::start();
    let sub = Subscriber::start(broker.port(), ALL_TOPICS);
    let dev = "infer-none";
    let agent = agent(dev, broker.port())
        .replay_ts("motion", &test_data(), 4000.0, false)
        .sim("other", 50.0, 2)
        .model(&bundle("activity-f32.bundle"), "motion")
        .set("inference", "trusted_keys", &toml_list(&[&dev_pub()]))
        .set("inference", "forward_raw", "\"none\"")
        .start();
    let log = wait_results(&sub, dev, "motion.activity", expected);
    assert!(log.is_contiguous());
    // source_seq counts captured samples when raw data is not queued.
    assert_eq!(
        log.records.values().last().map(|r| r.source_seq),
        Some(series as u64 * WINDOW)
    );
    stop_gracefully(&agent, SHORT);
    let view = sub.snapshot();
    assert!(view.stream(dev, "motion").is_none(), "no raw motion data");
    assert!(
        view.unique(dev, "other") > 0,
        "other sources are unaffected"
    );
    let fin = final_status(&sub, dev);
    assert!(
        fin.streams.iter().all(|s| s.stream != "motion"),
        "the raw stream never entered the queue"
    );
}

/// With `forward_raw = "anomalies"` the anomaly model's flagged windows (Running and
/// Badminton, which it never saw in training) and one window either side leave the device
/// as raw data, gap-free; the rest stays.
#[test]
fn forward_raw_anomalies_sends_windows_around_anomalies() {
    let truth = truth();
    let expected = windows_in(truth.len());
    let broker = TestBroker::start();
    let sub = Subscriber::start(broker.port(), ALL_TOPICS);
    let dev = "infer-anom";
    let agent = agent(dev, broker.port())
        .replay_ts("motion", &test_data(), 4000.0, false)
        .model(&bundle("anomaly-int8.bundle"), "motion")
        .set("inference", "trusted_keys", &toml_list(&[&dev_pub()]))
        .set("inference", "forward_raw", "\"anomalies\"")
        .set("inference", "anomaly_context_windows", "1")
        .start();
    let log = wait_results(&sub, dev, "motion.anomaly", expected);
    assert!(log.is_contiguous());
    let (mut flagged_abnormal, mut abnormal, mut flagged_normal, mut normal) = (0, 0, 0, 0);
    let mut anomalous_spans = Vec::new();
    for r in log.records.values() {
        let InferenceOutput::Anomaly { anomalous, .. } = r.output else {
            panic!("an anomaly result expected");
        };
        if anomalous {
            anomalous_spans.push((r.window_start, r.ts));
        }
        if let Some(i) = aligned_series(r) {
            if matches!(truth[i].as_str(), "Running" | "Badminton") {
                abnormal += 1;
                flagged_abnormal += usize::from(anomalous);
            } else {
                normal += 1;
                flagged_normal += usize::from(anomalous);
            }
        }
    }
    eprintln!(
        "anomaly-int8: {flagged_abnormal}/{abnormal} Running/Badminton and {flagged_normal}/{normal} Standing/Walking series flagged"
    );
    assert!(flagged_abnormal as f64 >= 0.9 * abnormal as f64);
    assert!((flagged_normal as f64) <= 0.3 * normal as f64);
    assert!(!anomalous_spans.is_empty());

    stop_gracefully(&agent, SHORT);
    let fin = final_status(&sub, dev);
    let raw_last = stream_status(&fin, "motion").last_seq;
    let total = truth.len() as u64 * WINDOW;
    assert!(
        raw_last > 0 && raw_last < total,
        "some, not all, raw samples are forwarded: {raw_last} of {total}"
    );
    wait_all_delivered(&sub, dev, "motion", raw_last, SHORT);
    let view = sub.snapshot();
    let raw = view.stream(dev, "motion").expect("raw samples");
    assert!(raw.is_exactly(raw_last), "the raw stream has no gaps");
    // Every sample of every anomalous window was forwarded.
    let times: std::collections::BTreeSet<u64> = raw.records.values().map(|r| r.ts).collect();
    for (start, end) in anomalous_spans {
        let n = times.range(start..=end).count() as u64;
        assert_eq!(
            n, WINDOW,
            "anomalous window {start}..={end}: {n} raw samples"
        );
    }
}

fn slot(path: &Path, trusted: &TrustedKeys) -> ModelSlot {
    let device = inference::device(Backend::Flex).expect("the flex device");
    let (b, model) = inference::prepare_bundle(path, trusted, &device).expect("bundle");
    ModelSlot {
        name: b.manifest().name.clone(),
        version: b.manifest().version.clone(),
        source: "motion".into(),
        stream: "motion.activity".into(),
        bundle: path.to_path_buf(),
        model,
        capture: Default::default(),
    }
}

/// The BasicMotions TEST samples, series after series, as taps of stream "motion".
fn taps() -> Vec<Tap> {
    let text = std::fs::read_to_string(test_data()).expect("read TEST split");
    let ds = ember_ts::parse_ts(&text).expect("parse");
    let mut out = Vec::new();
    for s in &ds.series {
        for t in 0..s.len() {
            let seq = out.len() as u64 + 1;
            out.push(Tap {
                stream: "motion".into(),
                seq,
                ts_us: seq * 100_000,
                values: s.sample(t).expect("sample"),
            });
        }
    }
    out
}

/// A model swap while windows stream in: a bad bundle is refused and the old model keeps
/// serving; a good one (the same model re-signed as 1.1.0) takes over at a batch boundary.
/// Every window gets exactly one result, in order, and the version changes exactly once.
#[test]
fn swap_under_load_is_atomic_and_refuses_bad_bundles() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (key, key_pub) = test_key(dir.path());
    let v2 = resigned(
        "activity-int8.bundle",
        &dir.path().join("v2.bundle"),
        &key,
        |m| m.version = "1.1.0".into(),
    );
    let flipped = dir.path().join("flipped.bundle");
    let mut bytes = std::fs::read(&v2).expect("read");
    let i = bytes.len() - 200;
    bytes[i] ^= 0x40;
    std::fs::write(&flipped, bytes).expect("write");

    let settings = InferenceSettings {
        backend: Backend::Flex,
        trusted_keys: vec![dev_pub(), key_pub],
        max_batch: 8,
        max_delay_ms: 5,
        forward_raw: ForwardRaw::All,
        anomaly_context_windows: 0,
        queue_samples: 1 << 20,
    };
    let trusted = TrustedKeys::from_files(&settings.trusted_keys).expect("keys");
    let metrics = Arc::new(Metrics::default());
    let (out_tx, mut out_rx) = tokio::sync::mpsc::channel(1 << 16);
    let (mut handle, thread) = inference::spawn(
        vec![slot(&bundle("activity-f32.bundle"), &trusted)],
        &settings,
        metrics.clone(),
        out_tx,
    )
    .expect("spawn");
    let taps = taps();
    let half = taps.len() / 2;
    let mut results: Vec<InferenceRecord> = Vec::new();
    let mut recv_until = |results: &mut Vec<InferenceRecord>, n: usize| {
        while results.len() < n {
            match out_rx.blocking_recv() {
                Some(Produced::Result(item)) => {
                    let stored: ember_agent::queue::StoredInference =
                        serde_json::from_slice(&item.payload).expect("payload");
                    results.push(stored.record);
                }
                Some(Produced::Raw(_)) => panic!("no raw forwarding with \"all\""),
                None => break,
            }
        }
    };
    for t in &taps[..half] {
        assert!(handle.tap(t.clone()), "the channel is large enough");
    }
    // A few results are out, more windows are waiting: swap now.
    recv_until(&mut results, 5);
    let err = handle
        .swap("motion.activity", &flipped)
        .expect_err("a damaged bundle must be refused");
    assert!(err.to_string().contains("sha256"), "{err}");
    assert_eq!(handle.active()[0].2, "1.0.0", "the old model keeps serving");
    handle.swap("motion.activity", &v2).expect("swap to 1.1.0");
    assert_eq!(handle.active()[0].2, "1.1.0");
    for t in &taps[half..] {
        assert!(handle.tap(t.clone()));
    }
    handle.close_taps();
    let expected = windows_in(taps.len() / WINDOW as usize) as usize;
    recv_until(&mut results, expected);
    thread.join().expect("inference thread");
    assert_eq!(results.len(), expected, "one result per window");
    for (i, r) in results.iter().enumerate() {
        assert_eq!(
            r.source_seq,
            WINDOW + i as u64 * HOP,
            "result {i}: windows in order, none missing or repeated"
        );
    }
    let versions: Vec<&str> = results.iter().map(|r| r.version.as_str()).collect();
    let changes = versions.windows(2).filter(|w| w[0] != w[1]).count();
    assert_eq!(changes, 1, "the version changes exactly once: {versions:?}");
    assert_eq!(versions.first(), Some(&"1.0.0"));
    assert_eq!(versions.last(), Some(&"1.1.0"));
    let first_new = versions.iter().position(|v| *v == "1.1.0").expect("new");
    assert!(first_new >= 5, "results already out kept the old version");
    assert_eq!(
        metrics
            .models
            .lock()
            .expect("models")
            .get("activity")
            .cloned(),
        Some("1.1.0".to_string())
    );
}
