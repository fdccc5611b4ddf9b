//! Helpers shared by the system tests.

use std::io::Write;
use std::path::Path;
use std::process::ExitStatus;
use std::time::Duration;

use ember_proto::{Status, StreamStatus};
use ember_testkit::{StreamLog, Subscriber, SubscriberView, TestAgent, TestAgentBuilder};

/// Connects to the agent's TCP socket source on `port`, waiting for it to listen; replies are
/// read with a [`SHORT`] timeout.
pub fn connect(port: u16) -> std::net::TcpStream {
    let mut conn = None;
    let connected = ember_testkit::wait_until(SHORT, || {
        conn = std::net::TcpStream::connect(ember_testkit::localhost(port)).ok();
        conn.is_some()
    });
    assert!(
        connected,
        "the socket source does not listen on 127.0.0.1:{port}"
    );
    let conn = conn.expect("connected");
    conn.set_read_timeout(Some(SHORT)).expect("timeout");
    conn
}

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_ember-agent");

/// Generous bounds for waits: they only matter when something is broken (then the test fails
/// saying what it waited for), and the machine running the suite may be slow and busy.
pub const SHORT: Duration = Duration::from_secs(20);
pub const LONG: Duration = Duration::from_secs(120);

pub fn agent(device: &str, broker_port: u16) -> TestAgentBuilder {
    TestAgent::builder(BIN)
        .device_id(device)
        .broker_port(broker_port)
}

/// Writes `rows` CSV rows of `channels` columns (with a header); row `i` (0-based) holds
/// [`csv_row`]`(i, channels)`.
pub fn write_csv(path: &Path, rows: u64, channels: usize) {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).expect("create csv"));
    let header: Vec<String> = (0..channels).map(|c| format!("ch{c}")).collect();
    writeln!(out, "{}", header.join(",")).expect("write csv");
    for i in 0..rows {
        let row: Vec<String> = csv_row(i, channels).iter().map(|v| v.to_string()).collect();
        writeln!(out, "{}", row.join(",")).expect("write csv");
    }
    out.flush().expect("flush csv");
}

/// Values of CSV row `i`: exactly representable in f32, different for every row.
pub fn csv_row(i: u64, channels: usize) -> Vec<f32> {
    (0..channels).map(|c| i as f32 + c as f32 * 0.25).collect()
}

/// `input_rejected_total` over every reason.
pub fn rejected_total(metrics: &ember_testkit::Metrics) -> f64 {
    metrics
        .iter()
        .filter(|(k, _)| k.starts_with("input_rejected_total{"))
        .map(|(_, v)| v)
        .sum()
}

/// Sends SIGTERM and waits for a clean exit (status 0).
pub fn stop_gracefully(agent: &TestAgent, timeout: Duration) -> ExitStatus {
    agent.sigterm();
    let status = agent.wait_exit(timeout);
    assert!(
        status.success(),
        "the agent should exit 0 after SIGTERM, got {status}; stderr:\n{}",
        agent.last_run_stderr()
    );
    status
}

/// The explicit `offline` status the agent publishes when it stops gracefully (with counters
/// and per-stream ledger), waiting for it to arrive.
pub fn final_status(sub: &Subscriber, device: &str) -> Status {
    assert!(
        sub.wait_for(|v| v.final_status(device).is_some(), SHORT),
        "no final offline status from {device}; last status: {:?}",
        sub.with_view(|v| v.status(device).cloned())
    );
    sub.with_view(|v| v.final_status(device).cloned())
        .expect("final status present")
}

pub fn stream_status<'a>(status: &'a Status, stream: &str) -> &'a StreamStatus {
    status
        .streams
        .iter()
        .find(|s| s.stream == stream)
        .unwrap_or_else(|| panic!("no stream {stream:?} in status {status:?}"))
}

/// Waits until the subscriber holds every seq of `1..=last` for the stream; on timeout, fails
/// listing what is missing.
pub fn wait_all_delivered(
    sub: &Subscriber,
    device: &str,
    stream: &str,
    last: u64,
    timeout: Duration,
) {
    let ok = sub.wait_for(
        |v| v.stream(device, stream).is_some_and(|l| l.has_all(last)),
        timeout,
    );
    if !ok {
        let missing = sub.with_view(|v| v.stream(device, stream).map(|l| l.missing(last)));
        panic!(
            "{device}/{stream}: seqs 1..={last} not all delivered within {timeout:?}; missing: {}",
            fmt_ranges(missing)
        );
    }
}

/// The checks every test makes of what the subscriber saw: payloads decode, no sequence number
/// was reused for different content, new records arrived in order.
pub fn assert_clean_delivery(view: &SubscriberView) {
    assert_eq!(
        view.decode_errors, 0,
        "decode errors: {:?}",
        view.decode_error_samples
    );
    for ((device, stream), log) in &view.streams {
        assert_eq!(
            log.conflicts, 0,
            "{device}/{stream}: a seq was delivered twice with different content"
        );
        assert_eq!(
            log.order_violations, 0,
            "{device}/{stream}: new records arrived out of seq order"
        );
    }
}

/// Fails if any run of the agent panicked.
pub fn assert_no_panic(agent: &TestAgent) {
    let text = agent.stderr_text();
    assert!(
        !text.contains("panicked"),
        "the agent panicked; stderr:\n{text}"
    );
}

/// A one-line progress summary of a stream, for failure messages.
pub fn progress(sub: &Subscriber, device: &str, stream: &str) -> String {
    sub.with_view(|v| match v.stream(device, stream) {
        Some(l) => format!(
            "{device}/{stream}: {} unique, highest {}, {} duplicates, {} messages",
            l.unique(),
            l.highest,
            l.duplicates,
            l.messages
        ),
        None => format!("{device}/{stream}: nothing received"),
    })
}

pub fn highest(sub: &Subscriber, device: &str, stream: &str) -> u64 {
    sub.with_view(|v| v.stream(device, stream).map_or(0, |l| l.highest))
}

/// Waits until the stream's highest received seq exceeds `above`.
pub fn wait_highest_above(
    sub: &Subscriber,
    device: &str,
    stream: &str,
    above: u64,
    timeout: Duration,
) {
    let ok = sub.wait_for(
        |v| v.stream(device, stream).is_some_and(|l| l.highest > above),
        timeout,
    );
    assert!(
        ok,
        "no record above seq {above} within {timeout:?}; {}",
        progress(sub, device, stream)
    );
}

/// Union of inclusive ranges, merged.
pub fn merge(ranges: impl IntoIterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = ranges.into_iter().collect();
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (a, b) in v {
        match out.last_mut() {
            Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

pub fn missing_ranges(log: &StreamLog, last: u64) -> Vec<(u64, u64)> {
    log.missing(last)
        .into_iter()
        .map(|r| (*r.start(), *r.end()))
        .collect()
}

/// Whether every range of `inner` lies inside the union `outer` (both merged).
pub fn covered(inner: &[(u64, u64)], outer: &[(u64, u64)]) -> bool {
    inner
        .iter()
        .all(|(a, b)| outer.iter().any(|(c, d)| c <= a && b <= d))
}

pub fn fmt_ranges<R: std::fmt::Debug>(r: Option<Vec<R>>) -> String {
    match r {
        None => "the whole stream (nothing received)".into(),
        Some(r) if r.len() > 20 => format!("{:?} ... ({} ranges)", &r[..20], r.len()),
        Some(r) => format!("{r:?}"),
    }
}
