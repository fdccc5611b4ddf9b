//! Replays a recorded file as a stream of samples, once or in a loop, at a fixed rate.
//!
//! The whole file is loaded and checked before the first sample is sent, so a file that cannot
//! be used at all fails at start with a clear error ([`SourceError::Open`] if it cannot be
//! read, [`SourceError::BadFile`] if it holds no usable samples).
//!
//! * CSV: one sample per line, comma-separated numbers. The first non-blank line is skipped
//!   as a header if any of its fields is not a number; blank lines and `#` comment lines are
//!   skipped. A line that does not fit is rejected: counted in `input_rejected_total` once,
//!   when the file is loaded, under its reason (`malformed`: a field that is not a number,
//!   more than [`MAX_VALUES`] columns, invalid UTF-8; `non_finite`: NaN or an infinity;
//!   `channels`: a column count other than the stream's schema, which is the declared or
//!   recorded channel count, else the first data row's), logged (rate-limited) with its line
//!   number, and left out. It never stops the replay.
//! * `.ts` (UEA/sktime, see [`super::ts`]): series after series, each as `len` consecutive
//!   samples, sample `t` holding value `t` of every channel. Any error in the file is fatal:
//!   a training set with a broken series should be fixed, not half-replayed; so is a file
//!   whose `@dimensions` differ from the stream's schema.
//!
//! Every sample then passes the stream's [`Guard`] before it is sent (see `schema`).
//!
//! Samples are paced like the simulator's (see [`super::sim`]): sample `k` is due `k / rate_hz`
//! after the start and stamped with that time, so timestamps stay evenly spaced across loops.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::schema::Guard;
use super::sim::{Pacer, check_rate, send, should_warn};
use super::socket::MAX_VALUES;
use super::{Sample, SourceError};
use crate::config::ReplayFormat;
use crate::metrics::{Metrics, RejectReason};

/// What to replay and how.
#[derive(Debug, Clone)]
pub struct Replay {
    pub path: PathBuf,
    pub format: ReplayFormat,
    pub rate_hz: f64,
    pub looped: bool,
}

/// Replays `path` at `rate_hz`, from the start again after the end if `looped`.
pub async fn run(
    stream: Arc<str>,
    replay: Replay,
    mut guard: Guard,
    tx: mpsc::Sender<Sample>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), SourceError> {
    let Replay {
        path,
        format,
        rate_hz,
        looped,
    } = replay;
    check_rate(rate_hz)?;
    let span = tracing::info_span!("source", kind = "replay", stream = %stream);
    async move {
        let rows = load(&path, format, guard.channels(), &stream, &metrics).await?;
        tracing::info!(
            path = %path.display(),
            samples = rows.len(),
            channels = rows.width,
            rate_hz,
            looped,
            "Replay source started."
        );
        let n = rows.len() as u64;
        let mut pacer = Pacer::new(rate_hz);
        loop {
            let now = Instant::now();
            pacer.catch_up(now);
            let due = pacer.due(now);
            while pacer.next < due && (looped || pacer.next < n) {
                let i = (pacer.next % n) as usize;
                if i == 0 && pacer.next > 0 {
                    tracing::debug!("Replay reached the end of the file; starting again.");
                }
                let values = rows.row(i).map(<[f32]>::to_vec).unwrap_or_default();
                let sample = Sample {
                    stream: stream.clone(),
                    ts_us: pacer.ts_us(pacer.next),
                    values,
                    origin: None,
                };
                pacer.next += 1;
                if guard.admit(&sample).is_err() {
                    continue;
                }
                if !send(&tx, sample, &shutdown).await {
                    tracing::info!("Replay source stopped.");
                    return Ok(());
                }
                metrics.captured.fetch_add(1, Relaxed);
            }
            if !looped && pacer.next >= n {
                tracing::info!(
                    samples = n,
                    "Replay finished: every sample of the file was sent once."
                );
                return Ok(());
            }
            if !pacer.sleep(now, &tx, &shutdown).await {
                tracing::info!("Replay source stopped.");
                return Ok(());
            }
        }
    }
    .instrument(span)
    .await
}

/// Samples of equal width, stored flat: row `i` is `values[i * width..(i + 1) * width]`.
#[derive(Debug, Clone, PartialEq)]
struct Rows {
    width: usize,
    values: Vec<f32>,
}

impl Rows {
    fn len(&self) -> usize {
        self.values.len().checked_div(self.width).unwrap_or(0)
    }

    fn row(&self, i: usize) -> Option<&[f32]> {
        self.values.get(i * self.width..(i + 1) * self.width)
    }
}

/// Reads and checks the whole file against the stream's channel count, if known; counts and
/// logs rejected CSV lines.
async fn load(
    path: &Path,
    format: ReplayFormat,
    channels: Option<usize>,
    stream: &str,
    metrics: &Metrics,
) -> Result<Rows, SourceError> {
    let bytes = tokio::fs::read(path)
        .await
        .map_err(|source| SourceError::Open {
            what: format!("replay file {}", path.display()),
            source,
        })?;
    let mut rejected = 0u64;
    let rows = match format {
        ReplayFormat::Csv => parse_csv(&bytes, channels, |why, reason| {
            rejected += 1;
            metrics.reject(why);
            if should_warn(rejected) {
                tracing::warn!(path = %path.display(), reason = %reason, rejected, "Rejected a malformed CSV line; skipping it.");
            }
        }),
        ReplayFormat::Ts => parse_ts_rows(&bytes).and_then(|rows| match channels {
            Some(c) if c != rows.width => Err(format!(
                "the file's series have {} channels but stream {stream:?} has {c}: replay it into a new stream, or a file of {c} channels",
                rows.width
            )),
            _ => Ok(rows),
        }),
    };
    let bad = |message: String| SourceError::BadFile {
        path: path.display().to_string(),
        message,
    };
    let rows = rows.map_err(bad)?;
    // The parsers never return an empty set; the replay loop relies on that (it indexes modulo the length).
    if rows.len() == 0 {
        return Err(bad("no samples in the file".to_string()));
    }
    Ok(rows)
}

/// Parses CSV text into rows of `channels` values (else the first data row's count); `reject`
/// is called with the reason for each line left out.
fn parse_csv(
    bytes: &[u8],
    channels: Option<usize>,
    mut reject: impl FnMut(RejectReason, String),
) -> Result<Rows, String> {
    // (width, the line that set it: 0 for the stream's schema)
    let mut width: Option<(usize, usize)> = channels.map(|c| (c, 0));
    let mut values = Vec::new();
    let mut seen_content = false;
    let mut rejected = 0usize;
    let mut reject = |why: RejectReason, reason: String| {
        rejected += 1;
        reject(why, reason);
    };
    for (idx, raw) in bytes.split(|b| *b == b'\n').enumerate() {
        let line_no = idx + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let Ok(line) = std::str::from_utf8(raw) else {
            reject(
                RejectReason::Malformed,
                format!("line {line_no}: is not valid UTF-8"),
            );
            seen_content = true;
            continue;
        };
        let line = if idx == 0 {
            line.strip_prefix('\u{feff}').unwrap_or(line)
        } else {
            line
        };
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if !seen_content {
            seen_content = true;
            if fields.iter().any(|f| f.parse::<f32>().is_err()) {
                tracing::info!(line = line_no, header = %truncate(line, 200), "Skipping the CSV header line.");
                continue;
            }
        }
        let row = match parse_row(&fields) {
            Ok(row) => row,
            Err((why, reason)) => {
                reject(why, format!("line {line_no}: {reason}"));
                continue;
            }
        };
        if row.len() > MAX_VALUES {
            reject(
                RejectReason::Malformed,
                format!(
                    "line {line_no}: has {} columns; at most {MAX_VALUES} are allowed",
                    row.len()
                ),
            );
            continue;
        }
        match width {
            None => width = Some((row.len(), line_no)),
            Some((w, 0)) if w != row.len() => {
                reject(
                    RejectReason::Channels,
                    format!(
                        "line {line_no}: has {} columns but the stream has {w} channels",
                        row.len()
                    ),
                );
                continue;
            }
            Some((w, first)) if w != row.len() => {
                reject(
                    RejectReason::Channels,
                    format!(
                        "line {line_no}: has {} columns but the first data row (line {first}) has {w}",
                        row.len()
                    ),
                );
                continue;
            }
            Some(_) => {}
        }
        values.extend_from_slice(&row);
    }
    match width {
        Some((width, _)) if !values.is_empty() => Ok(Rows { width, values }),
        _ => Err(format!(
            "no data rows: every line is blank, a header or malformed ({rejected} rejected); write one sample per line, e.g. `0.1,9.8,0.0`"
        )),
    }
}

fn parse_row(fields: &[&str]) -> Result<Vec<f32>, (RejectReason, String)> {
    fields
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let column = i + 1;
            if f.is_empty() {
                return Err((RejectReason::Malformed, format!("field {column} is empty")));
            }
            match f.parse::<f32>() {
                Ok(x) if x.is_finite() => Ok(x),
                Ok(_) => Err((
                    RejectReason::NonFinite,
                    format!("field {column} ({f:?}) is not a finite 32-bit number"),
                )),
                Err(_) => Err((
                    RejectReason::Malformed,
                    format!("field {column} ({f:?}) is not a number"),
                )),
            }
        })
        .collect()
}

fn truncate(s: &str, max_chars: usize) -> &str {
    s.char_indices().nth(max_chars).map_or(s, |(i, _)| &s[..i])
}

/// Flattens a `.ts` file into samples: series after series, time step after time step.
fn parse_ts_rows(bytes: &[u8]) -> Result<Rows, String> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| format!("not valid UTF-8 ({e}): a .ts file must be UTF-8 text"))?;
    let dataset = super::ts::parse_ts(text).map_err(|e| e.to_string())?;
    if dataset.dimensions > MAX_VALUES {
        return Err(format!(
            "@dimensions is {}: a sample may carry at most {MAX_VALUES} channels",
            dataset.dimensions
        ));
    }
    let total: usize = dataset
        .series
        .iter()
        .map(|s| s.len() * s.channels.len())
        .sum();
    let mut values = Vec::with_capacity(total);
    for series in &dataset.series {
        for t in 0..series.len() {
            values.extend(series.channels.iter().filter_map(|c| c.get(t)));
        }
    }
    Ok(Rows {
        width: dataset.dimensions,
        values,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::schema::Schema;
    use std::io::Write;
    use std::time::Duration;

    const WAIT: Duration = Duration::from_secs(10);

    fn file(contents: &[u8], suffix: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new()
            .suffix(suffix)
            .tempfile()
            .expect("temp file");
        f.write_all(contents).expect("write temp file");
        f
    }

    /// Replays `contents` once at a high rate and returns every sample and the metrics.
    async fn replay_once(
        contents: &[u8],
        format: ReplayFormat,
    ) -> Result<(Vec<Sample>, Arc<Metrics>), SourceError> {
        let f = file(
            contents,
            if format == ReplayFormat::Csv {
                ".csv"
            } else {
                ".ts"
            },
        );
        let (tx, mut rx) = mpsc::channel(100_000);
        let metrics = Arc::new(Metrics::default());
        let run = run(
            "rec".into(),
            Replay {
                path: f.path().to_path_buf(),
                format,
                rate_hz: 20_000.0,
                looped: false,
            },
            Guard::open(&Arc::default()),
            tx,
            metrics.clone(),
            CancellationToken::new(),
        );
        tokio::time::timeout(WAIT, run)
            .await
            .expect("replay did not finish")?;
        let mut out = Vec::new();
        while let Ok(s) = rx.try_recv() {
            out.push(s);
        }
        Ok((out, metrics))
    }

    fn values(samples: &[Sample]) -> Vec<Vec<f32>> {
        samples.iter().map(|s| s.values.clone()).collect()
    }

    fn assert_evenly_spaced(samples: &[Sample], step_us: u64) {
        for (k, s) in samples.iter().enumerate() {
            assert_eq!(s.ts_us - samples[0].ts_us, k as u64 * step_us, "sample {k}");
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn csv_rows_are_replayed_in_order_with_even_timestamps() {
        let csv = b"ax, ay ,az\n0.1,0.2,9.8\n1,2,3\n\n-4e-2,5,6\n";
        let (samples, metrics) = replay_once(csv, ReplayFormat::Csv).await.expect("replay");
        assert_eq!(
            values(&samples),
            vec![
                vec![0.1, 0.2, 9.8],
                vec![1.0, 2.0, 3.0],
                vec![-0.04, 5.0, 6.0]
            ]
        );
        assert!(samples.iter().all(|s| &*s.stream == "rec"));
        assert_evenly_spaced(&samples, 50);
        assert_eq!(metrics.captured.load(Relaxed), 3);
        assert_eq!(metrics.rejected.load(Relaxed), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn csv_without_header_with_crlf_bom_and_comments() {
        let csv = b"\xef\xbb\xbf1,2\r\n# a comment\r\n3,4\r\n";
        let (samples, metrics) = replay_once(csv, ReplayFormat::Csv).await.expect("replay");
        assert_eq!(values(&samples), vec![vec![1.0, 2.0], vec![3.0, 4.0]]);
        assert_eq!(metrics.rejected.load(Relaxed), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn malformed_csv_lines_are_rejected_and_skipped() {
        let mut csv = b"t,x,y\n1,2,3\n4,abc,6\n7,8\n\nnan,1,2\n1,2,3,4\n1,,3\n".to_vec();
        csv.extend_from_slice(b"\xff\xfe,1,2\n");
        csv.extend_from_slice(format!("{}\n", vec!["1"; MAX_VALUES + 1].join(",")).as_bytes());
        csv.extend_from_slice(b"10,11,12");
        let (samples, metrics) = replay_once(&csv, ReplayFormat::Csv).await.expect("replay");
        assert_eq!(
            values(&samples),
            vec![vec![1.0, 2.0, 3.0], vec![10.0, 11.0, 12.0]]
        );
        assert_eq!(metrics.rejected.load(Relaxed), 7);
        assert_eq!(metrics.captured.load(Relaxed), 2);
    }

    /// Rows that do not fit a 3-channel stream (2 or 65 columns, NaN, inf) are left out and
    /// counted by reason; the rest replay in order. A `.ts` file of another width is refused.
    #[tokio::test(flavor = "current_thread")]
    async fn rows_that_do_not_fit_the_streams_schema_are_refused_by_reason() {
        let mut csv = String::from("x,y,z\n");
        let mut good = Vec::new();
        for k in 0..30 {
            match k % 5 {
                1 => csv.push_str("1,2\n"),
                2 => csv.push_str(&format!("{}\n", vec!["1"; 65].join(","))),
                3 => csv.push_str(if k % 2 == 0 { "1,nan,3\n" } else { "inf,2,3\n" }),
                _ => {
                    csv.push_str(&format!("{k},0,1\n"));
                    good.push(vec![k as f32, 0.0, 1.0]);
                }
            }
        }
        let f = file(csv.as_bytes(), ".csv");
        let (tx, mut rx) = mpsc::channel(1000);
        let metrics = Arc::new(Metrics::default());
        let schema = Schema {
            channels: Some(3),
            max_backwards_us: 0,
        };
        let guard = Guard::new("rec".into(), schema, metrics.clone());
        let replay = Replay {
            path: f.path().to_path_buf(),
            format: ReplayFormat::Csv,
            rate_hz: 20_000.0,
            looped: false,
        };
        tokio::time::timeout(
            WAIT,
            run(
                "rec".into(),
                replay,
                guard,
                tx,
                metrics.clone(),
                CancellationToken::new(),
            ),
        )
        .await
        .expect("replay did not finish")
        .expect("replay");
        let mut got = Vec::new();
        while let Ok(s) = rx.try_recv() {
            got.push(s.values);
        }
        assert_eq!(got, good);
        assert_eq!(metrics.captured.load(Relaxed), 12);
        assert_eq!(metrics.rejected_channels.load(Relaxed), 12);
        assert_eq!(metrics.rejected_non_finite.load(Relaxed), 6);
        assert_eq!(metrics.rejected_malformed.load(Relaxed), 0);

        let ts = file(b"@dimensions 2\n@data\n1,2,3:4,5,6\n", ".ts");
        let (tx, _rx) = mpsc::channel(10);
        let guard = Guard::new("rec".into(), schema, metrics.clone());
        let replay = Replay {
            path: ts.path().to_path_buf(),
            format: ReplayFormat::Ts,
            rate_hz: 10.0,
            looped: false,
        };
        let err = run(
            "rec".into(),
            replay,
            guard,
            tx,
            metrics,
            CancellationToken::new(),
        )
        .await
        .expect_err("a 2-channel file on a 3-channel stream");
        assert!(
            err.to_string()
                .contains("the file's series have 2 channels but stream \"rec\" has 3"),
            "{err}"
        );
    }

    #[test]
    fn csv_rejections_name_the_line_and_the_problem() {
        let mut reasons = Vec::new();
        let rows = parse_csv(b"a,b\n1,2\n1,x\n1\n1,inf\n,2\n", None, |_, r| {
            reasons.push(r)
        })
        .expect("rows");
        assert_eq!(
            rows,
            Rows {
                width: 2,
                values: vec![1.0, 2.0]
            }
        );
        assert_eq!(
            reasons,
            vec![
                "line 3: field 2 (\"x\") is not a number",
                "line 4: has 1 columns but the first data row (line 2) has 2",
                "line 5: field 2 (\"inf\") is not a finite 32-bit number",
                "line 6: field 1 is empty",
            ]
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn ts_series_are_replayed_sample_by_sample() {
        let ts = b"@problemName t\n@dimensions 2\n@equalLength false\n@classLabel true a b\n@data\n1,2,3:10,20,30:a\n4,5:40,50:b\n";
        let (samples, metrics) = replay_once(ts, ReplayFormat::Ts).await.expect("replay");
        assert_eq!(
            values(&samples),
            vec![
                vec![1.0, 10.0],
                vec![2.0, 20.0],
                vec![3.0, 30.0],
                vec![4.0, 40.0],
                vec![5.0, 50.0]
            ]
        );
        assert_evenly_spaced(&samples, 50);
        assert_eq!(metrics.captured.load(Relaxed), 5);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn looped_replay_restarts_and_keeps_timestamps_even() {
        let f = file(b"1\n2\n3\n", ".csv");
        let (tx, mut rx) = mpsc::channel(64);
        let metrics = Arc::new(Metrics::default());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(
            "rec".into(),
            Replay {
                path: f.path().to_path_buf(),
                format: ReplayFormat::Csv,
                rate_hz: 10_000.0,
                looped: true,
            },
            Guard::open(&Arc::default()),
            tx,
            metrics.clone(),
            shutdown.clone(),
        ));
        let mut got = Vec::new();
        for _ in 0..8 {
            got.push(
                tokio::time::timeout(WAIT, rx.recv())
                    .await
                    .expect("timeout")
                    .expect("sample"),
            );
        }
        shutdown.cancel();
        tokio::time::timeout(WAIT, task)
            .await
            .expect("did not stop")
            .expect("panicked")
            .expect("failed");
        let firsts: Vec<f32> = got.iter().map(|s| s.values[0]).collect();
        assert_eq!(firsts, vec![1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 1.0, 2.0]);
        assert_evenly_spaced(&got, 100);
        assert!(metrics.captured.load(Relaxed) >= 8);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn shutdown_stops_a_replay_blocked_on_a_full_channel() {
        let f = file(b"1,2\n3,4\n", ".csv");
        let (tx, _rx) = mpsc::channel(1);
        let metrics = Arc::new(Metrics::default());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(
            "rec".into(),
            Replay {
                path: f.path().to_path_buf(),
                format: ReplayFormat::Csv,
                rate_hz: 10_000.0,
                looped: true,
            },
            Guard::open(&Arc::default()),
            tx,
            metrics.clone(),
            shutdown.clone(),
        ));
        tokio::time::timeout(WAIT, async {
            while metrics.captured.load(Relaxed) < 1 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("replay never sent");
        shutdown.cancel();
        tokio::time::timeout(WAIT, task)
            .await
            .expect("did not stop")
            .expect("panicked")
            .expect("failed");
        assert_eq!(metrics.captured.load(Relaxed), 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn stops_when_the_receiver_is_dropped() {
        let f = file(b"1\n", ".csv");
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let run = run(
            "rec".into(),
            Replay {
                path: f.path().to_path_buf(),
                format: ReplayFormat::Csv,
                rate_hz: 1.0,
                looped: true,
            },
            Guard::open(&Arc::default()),
            tx,
            Arc::default(),
            CancellationToken::new(),
        );
        tokio::time::timeout(WAIT, run)
            .await
            .expect("did not stop")
            .expect("failed");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn unusable_files_fail_at_start_with_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("nope.csv");
        let (tx, _rx) = mpsc::channel(1);
        let err = run(
            "rec".into(),
            Replay {
                path: missing,
                format: ReplayFormat::Csv,
                rate_hz: 10.0,
                looped: false,
            },
            Guard::open(&Arc::default()),
            tx,
            Arc::default(),
            CancellationToken::new(),
        )
        .await
        .expect_err("missing file");
        assert!(matches!(err, SourceError::Open { .. }), "{err}");
        assert!(err.to_string().contains("nope.csv"), "{err}");

        let cases: &[(&[u8], ReplayFormat, &str)] = &[
            (b"", ReplayFormat::Csv, "no data rows"),
            (b"a,b,c\n\n", ReplayFormat::Csv, "no data rows"),
            (
                b"x,y\n1,z\n",
                ReplayFormat::Csv,
                "no data rows: every line is blank, a header or malformed (1 rejected)",
            ),
            (
                b"@dimensions 2\n@data\n1,2:3\n",
                ReplayFormat::Ts,
                "line 3: channel 2 has 1 values but channel 1 has 2",
            ),
            (b"@dimensions 2\n", ReplayFormat::Ts, "missing @data"),
            (b"@data\n\xff\n", ReplayFormat::Ts, "not valid UTF-8"),
        ];
        for (contents, format, want) in cases {
            let err = replay_once(contents, *format).await.expect_err("bad file");
            assert!(matches!(err, SourceError::BadFile { .. }), "{err}");
            assert!(
                err.to_string().contains(want),
                "for {contents:?}: {err} should contain {want:?}"
            );
        }
        let wide = format!(
            "@dimensions {}\n@data\n{}\n",
            MAX_VALUES + 1,
            vec!["1"; MAX_VALUES + 1].join(":")
        );
        let err = replay_once(wide.as_bytes(), ReplayFormat::Ts)
            .await
            .expect_err("too wide");
        assert!(err.to_string().contains("at most 256 channels"), "{err}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn impossible_rates_are_refused() {
        let f = file(b"1\n", ".csv");
        let (tx, _rx) = mpsc::channel(1);
        let err = run(
            "rec".into(),
            Replay {
                path: f.path().to_path_buf(),
                format: ReplayFormat::Csv,
                rate_hz: 0.0,
                looped: false,
            },
            Guard::open(&Arc::default()),
            tx,
            Arc::default(),
            CancellationToken::new(),
        )
        .await
        .expect_err("zero rate");
        assert!(err.to_string().contains("rate_hz"), "{err}");
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "hé");
        assert_eq!(truncate("hi", 5), "hi");
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Every line is a row, a skipped line, or exactly one rejection.
            #[test]
            fn csv_lines_are_rows_or_rejections(text in "([0-9a,.e -]{0,10}\n){0,20}") {
                let mut rejected = 0usize;
                match parse_csv(text.as_bytes(), None, |_, _| rejected += 1) {
                    Ok(rows) => {
                        prop_assert!(rows.width >= 1);
                        prop_assert_eq!(rows.values.len() % rows.width, 0);
                        prop_assert!(rows.values.iter().all(|v| v.is_finite()));
                        prop_assert!(rows.len() + rejected <= text.lines().count());
                    }
                    Err(message) => prop_assert!(message.starts_with("no data rows")),
                }
            }
        }
    }
}
