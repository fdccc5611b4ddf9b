//! Stream schemas end to end: samples that do not fit their stream are refused at the source,
//! counted by reason and answered, and never reach the queue or the model; the schema
//! survives restarts and a contradicting declaration refuses the start.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use ember_proto::InferenceOutput;
use ember_testkit::{ALL_TOPICS, Subscriber, TestAgent, TestBroker, free_port};

use crate::common::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn rejected(agent: &TestAgent, reason: &str) -> f64 {
    agent.metric(&format!("input_rejected_total{{reason=\"{reason}\"}}"))
}

/// `b` with the committed int8 activity model on the `motion` stream, trusting the dev key.
fn with_activity_model(b: ember_testkit::TestAgentBuilder) -> ember_testkit::TestAgentBuilder {
    b.model(
        &repo().join("models/bundles/activity-int8.bundle"),
        "motion",
    )
    .set(
        "inference",
        "trusted_keys",
        &format!("[\"{}\"]", repo().join("models/keys/dev/dev.pub").display()),
    )
}

/// A misfit line of kind `k` for a 6-channel stream at time `ts`, and what its reply must say.
fn misfit(k: usize, ts: u64) -> (String, &'static str) {
    let values = |n: usize| vec!["0.5"; n].join(",");
    match k % 6 {
        0 => (
            format!("{{\"values\":[{}],\"ts\":{ts}}}", values(3)),
            "has 3 values but stream \\\"motion\\\" has 6 channels",
        ),
        1 => (
            format!("{{\"values\":[{}],\"ts\":{ts}}}", values(5)),
            "has 5 values but stream \\\"motion\\\" has 6 channels",
        ),
        2 => (
            format!("{{\"values\":[{}],\"ts\":{ts}}}", values(7)),
            "has 7 values but stream \\\"motion\\\" has 6 channels",
        ),
        3 => (
            format!("{{\"values\":[{}],\"ts\":{ts}}}", values(65)),
            "has 65 values but stream \\\"motion\\\" has 6 channels",
        ),
        // JSON cannot carry NaN; a value beyond f32's range is an infinity.
        4 => (
            format!("{{\"values\":[0.5,1e39,0.5,0.5,0.5,0.5],\"ts\":{ts}}}"),
            "value 1 is inf: every value must be a finite number",
        ),
        _ => (
            format!("{{\"values\":[{}],\"ts\":{}}}", values(6), ts - 5_000_000),
            "behind the stream's latest sample",
        ),
    }
}

/// The BasicMotions TEST split goes to the int8 activity model (6 channels, window 100, hop
/// 50) over the socket source, one misfit line (3, 5, 7 or 65 values, an infinity, a timestamp
/// 5 s back) after every 6th good sample. Every misfit is answered with what was expected and
/// counted by reason; the raw stream holds exactly the good samples; the model produces a
/// result for every window of good samples (the windows of the good samples alone), no
/// inference error, and labels as right as on a clean replay.
#[test]
fn misfit_samples_never_reach_the_queue_or_the_model() {
    let text = std::fs::read_to_string(repo().join("models/data/BasicMotions_TEST.ts"))
        .expect("read TEST split");
    let ds = ember_ts::parse_ts(&text).expect("parse TEST split");
    let broker = TestBroker::start();
    let sub = Subscriber::start_keeping_values(broker.port(), ALL_TOPICS);
    let dev = "schema-sock";
    let port = free_port();
    let agent = with_activity_model(agent(dev, broker.port()).socket_tcp("motion", port)).start();
    let mut conn = connect(port);

    let ts0 = 1_700_000_000_000_000u64;
    let mut lines = String::new();
    let mut wants = Vec::new();
    let mut good = 0u64;
    let mut kinds = [0u64; 6];
    for series in &ds.series {
        for t in 0..series.len() {
            let values: Vec<String> = series
                .sample(t)
                .expect("sample")
                .iter()
                .map(|v| format!("{v:?}"))
                .collect();
            let ts = ts0 + good * 100_000;
            lines.push_str(&format!(
                "{{\"values\":[{}],\"ts\":{ts}}}\n",
                values.join(",")
            ));
            good += 1;
            if good.is_multiple_of(6) {
                let k = (good / 6) as usize;
                let (line, want) = misfit(k, ts);
                kinds[k % 6] += 1;
                lines.push_str(&line);
                lines.push('\n');
                wants.push(want);
            }
        }
    }
    let replies = {
        let rd = conn.try_clone().expect("clone");
        let n = wants.len();
        std::thread::spawn(move || {
            let mut rd = BufReader::new(rd);
            (0..n)
                .map(|_| {
                    let mut line = String::new();
                    rd.read_line(&mut line).expect("an error reply per misfit");
                    line
                })
                .collect::<Vec<_>>()
        })
    };
    conn.write_all(lines.as_bytes()).expect("write lines");
    let replies = replies.join().expect("reader");
    for (reply, want) in replies.iter().zip(&wants) {
        assert!(
            reply.starts_with("{\"error\":\"line ") && reply.contains(want),
            "reply {reply:?} should say {want:?}"
        );
    }

    // The windows of the good samples alone: 100 long, one every 50.
    let expected = (good - 100) / 50 + 1;
    assert!(
        sub.wait_for(
            |v| v
                .inference(dev, "motion.activity")
                .is_some_and(|l| l.unique() >= expected),
            LONG
        ),
        "expected {expected} results, got {:?}; inference_windows_skipped_total: {:?}",
        sub.with_view(|v| v.inference(dev, "motion.activity").map(|l| l.unique())),
        agent.metrics()
    );
    wait_all_delivered(&sub, dev, "motion", good, LONG);
    let misfits = wants.len() as u64;
    let channels = kinds[0] + kinds[1] + kinds[2] + kinds[3];
    eprintln!(
        "schema interleaving: {good} good samples, {misfits} misfits ({channels} channels, {} non_finite, {} backwards); windows expected {expected}, produced {}",
        kinds[4],
        kinds[5],
        sub.with_view(|v| v
            .inference(dev, "motion.activity")
            .map_or(0, |l| l.unique()))
    );
    assert_eq!(rejected(&agent, "channels"), channels as f64);
    assert_eq!(rejected(&agent, "non_finite"), kinds[4] as f64);
    assert_eq!(rejected(&agent, "backwards"), kinds[5] as f64);
    assert_eq!(rejected(&agent, "malformed"), 0.0);
    assert_eq!(agent.metric("records_captured_total"), good as f64);
    assert_eq!(agent.metric("inference_errors_total"), 0.0);
    assert_eq!(agent.metric("inference_windows_total"), expected as f64);
    assert_eq!(
        agent.metric("inference_windows_skipped_total{reason=\"misfit\"}"),
        0.0
    );
    stop_gracefully(&agent, SHORT);

    let view = sub.snapshot();
    assert_clean_delivery(&view);
    let raw = view.stream(dev, "motion").expect("raw stream");
    assert!(
        raw.is_exactly(good),
        "the raw stream holds the good samples"
    );
    assert!(
        raw.records.values().all(|r| r
            .values
            .as_ref()
            .is_some_and(|v| v.len() == 6 && v.iter().all(|x| x.is_finite()))),
        "every queued sample fits the schema"
    );
    let log = view.inference(dev, "motion.activity").expect("results");
    assert_eq!(
        log.unique(),
        expected,
        "one result per window of good samples"
    );
    assert!(log.is_contiguous());
    let ends: Vec<u64> = log.records.values().map(|r| r.source_seq).collect();
    let want_ends: Vec<u64> = (0..expected).map(|w| 100 + w * 50).collect();
    assert_eq!(
        ends, want_ends,
        "windows are those of the good samples alone"
    );
    // Windows aligned with a series are labelled as on a clean replay (>= 95% right).
    let mut right = 0;
    for r in log.records.values().filter(|r| r.source_seq % 100 == 0) {
        let InferenceOutput::Class { label, .. } = &r.output else {
            panic!("a classifier result expected, got {:?}", r.output);
        };
        let series = &ds.series[(r.source_seq / 100 - 1) as usize];
        right += usize::from(Some(label) == series.label.as_ref());
    }
    assert!(
        right * 100 >= ds.series.len() * 95,
        "{right}/{} aligned windows labelled right",
        ds.series.len()
    );
    let fin = final_status(&sub, dev);
    assert_eq!(stream_status(&fin, "motion").channels, Some(6));
    assert_eq!(stream_status(&fin, "motion.activity").channels, None);
    assert_eq!(fin.counters.expect("counters").rejected, misfits);
    assert_no_panic(&agent);
}

/// The same split replayed from a CSV file into the activity model, a misfit row (3 or 65
/// columns, `nan`, `inf`) after every 6th good one: the misfit rows are left out and counted
/// by reason, the raw stream holds exactly the good rows, and the model produces the windows
/// of the good rows alone.
#[test]
fn replayed_misfit_rows_never_reach_the_queue_or_the_model() {
    let text = std::fs::read_to_string(repo().join("models/data/BasicMotions_TEST.ts"))
        .expect("read TEST split");
    let ds = ember_ts::parse_ts(&text).expect("parse TEST split");
    let dir = tempfile::tempdir().expect("tempdir");
    let csv = dir.path().join("motion.csv");
    let mut rows = String::from("ax,ay,az,gx,gy,gz\n");
    let mut good = 0u64;
    let (mut channels, mut non_finite) = (0u64, 0u64);
    for series in &ds.series {
        for t in 0..series.len() {
            let values: Vec<String> = series
                .sample(t)
                .expect("sample")
                .iter()
                .map(|v| format!("{v:?}"))
                .collect();
            rows.push_str(&values.join(","));
            rows.push('\n');
            good += 1;
            if good.is_multiple_of(6) {
                match (good / 6) % 4 {
                    0 => rows.push_str("0.5,0.5,0.5\n"),
                    1 => rows.push_str(&format!("{}\n", vec!["0.5"; 65].join(","))),
                    2 => rows.push_str("0.5,nan,0.5,0.5,0.5,0.5\n"),
                    _ => rows.push_str("0.5,0.5,0.5,0.5,0.5,-inf\n"),
                }
                if (good / 6) % 4 < 2 {
                    channels += 1;
                } else {
                    non_finite += 1;
                }
            }
        }
    }
    std::fs::write(&csv, rows).expect("write csv");
    let broker = TestBroker::start();
    let sub = Subscriber::start(broker.port(), ALL_TOPICS);
    let dev = "schema-replay";
    let agent =
        with_activity_model(agent(dev, broker.port()).replay_csv("motion", &csv, 4000.0)).start();
    let expected = (good - 100) / 50 + 1;
    assert!(
        sub.wait_for(
            |v| v
                .inference(dev, "motion.activity")
                .is_some_and(|l| l.unique() >= expected),
            LONG
        ),
        "expected {expected} results, got {:?}",
        sub.with_view(|v| v.inference(dev, "motion.activity").map(|l| l.unique()))
    );
    wait_all_delivered(&sub, dev, "motion", good, LONG);
    eprintln!(
        "schema replay: {good} good rows, {} misfit rows ({channels} channels, {non_finite} non_finite); windows expected {expected}, produced {}",
        channels + non_finite,
        sub.with_view(|v| v
            .inference(dev, "motion.activity")
            .map_or(0, |l| l.unique()))
    );
    assert_eq!(rejected(&agent, "channels"), channels as f64);
    assert_eq!(rejected(&agent, "non_finite"), non_finite as f64);
    assert_eq!(agent.metric("records_captured_total"), good as f64);
    assert_eq!(agent.metric("inference_errors_total"), 0.0);
    stop_gracefully(&agent, SHORT);
    let view = sub.snapshot();
    assert_clean_delivery(&view);
    assert!(view.stream(dev, "motion").expect("raw").is_exactly(good));
    let log = view.inference(dev, "motion.activity").expect("results");
    assert_eq!(log.unique(), expected);
    let ends: Vec<u64> = log.records.values().map(|r| r.source_seq).collect();
    assert_eq!(
        ends,
        (0..expected).map(|w| 100 + w * 50).collect::<Vec<_>>()
    );
    assert_no_panic(&agent);
}

/// A socket stream's schema is fixed by its first sample and recorded in the queue: after a
/// restart a sample of another width is still refused (the reply names the recorded count),
/// and a configuration that declares another count refuses to start (exit 2), naming the key
/// and the fix. A CSV replay into a declared 3-channel stream leaves out rows that do not fit.
#[test]
fn the_schema_survives_restarts_and_a_contradicting_declaration_refuses_the_start() {
    let broker = TestBroker::start();
    let sub = Subscriber::start_keeping_values(broker.port(), ALL_TOPICS);
    let dev = "schema-restart";
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let csv = dir.path().join("rows.csv");
    std::fs::write(&csv, "a,b,c\n1,2,3\n1,2\nnan,2,3\n4,5,6\n1,2,3,4\n7,8,9\n").expect("csv");
    let port = free_port();
    let replay = format!(
        "type = \"replay\"\nstream = \"rows\"\npath = \"{}\"\nrate_hz = 1000.0\nloop = false\nchannels = 3",
        csv.display()
    );
    let agent = agent(dev, broker.port())
        .data_dir(&data)
        .socket_tcp("ext", port)
        .source(&replay)
        .start();
    let mut conn = connect(port);
    conn.write_all(b"{\"values\":[1,2,3]}\n{\"values\":[4,5,6]}\n")
        .expect("write");
    wait_all_delivered(&sub, dev, "ext", 2, SHORT);
    wait_all_delivered(&sub, dev, "rows", 3, SHORT);
    assert_eq!(
        rejected(&agent, "channels"),
        2.0,
        "the CSV's 2- and 4-column rows"
    );
    assert_eq!(rejected(&agent, "non_finite"), 1.0, "the CSV's nan row");
    drop(conn);
    stop_gracefully(&agent, SHORT);
    assert_eq!(
        stream_status(&final_status(&sub, dev), "ext").channels,
        Some(3)
    );

    agent.restart();
    let mut conn = connect(port);
    conn.write_all(b"{\"values\":[1,2,3,4]}\n{\"values\":[7,8,9]}\n")
        .expect("write");
    let mut reply = String::new();
    BufReader::new(conn.try_clone().expect("clone"))
        .read_line(&mut reply)
        .expect("reply");
    assert!(
        reply.contains("line 1: the sample has 4 values but stream \\\"ext\\\" has 3 channels"),
        "{reply}"
    );
    wait_all_delivered(&sub, dev, "ext", 3, SHORT);
    drop(conn);
    stop_gracefully(&agent, SHORT);

    let refused = crate::common::agent(dev, broker.port())
        .data_dir(&data)
        .source(&format!(
            "type = \"socket\"\nstream = \"ext\"\ntcp = \"127.0.0.1:{port}\"\nchannels = 4"
        ))
        .spawn();
    let status = refused.wait_exit(SHORT);
    let stderr = refused.stderr_text();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("source[0].channels")
            && stderr.contains("recorded with 3 channels")
            && stderr.contains("give the source a new stream name"),
        "{stderr}"
    );
    let view = sub.snapshot();
    let ext = view.stream(dev, "ext").expect("ext");
    assert!(ext.is_exactly(3));
    assert!(
        ext.records
            .values()
            .all(|r| r.values.as_ref().is_some_and(|v| v.len() == 3))
    );
    assert_no_panic(&agent);
}
