//! Newline-delimited JSON from local processes, over a Unix socket or a loopback TCP port.
//!
//! Each client sends one JSON object per line:
//!
//! ```text
//! {"values":[0.1,9.8,0.0]}
//! {"values":[0.2,9.7,0.1],"ts":1718000000000000,"stream":"imu"}
//! ```
//!
//! `values` (1 to [`MAX_VALUES`] numbers, each a finite 32-bit float) is required; `ts`
//! (microseconds since the Unix epoch) defaults to the time the line was read; `stream`, if
//! present, must name this source's stream. A good line produces a sample and no reply. A line
//! that does not parse (`reason="malformed"`) or whose sample does not fit the stream's schema
//! (see `schema`: channel count, a value that overflows to an infinity, a timestamp too far
//! back; one [`Guard`] shared by every client) is rejected (counted in
//! `input_rejected_total` under its reason, logged rate-limited) and answered with one line
//! `{"error":"line N: ..."}` that says what was expected; the connection stays open. Lines longer than
//! [`MAX_LINE_BYTES`] are discarded as they arrive, so a client cannot make the agent buffer
//! without bound.
//!
//! Lifecycle: the Unix socket file is created on start (a stale one left by a crashed agent is
//! removed first; a live one, or a file that is not a socket, is an error) and removed on exit.
//! Clients are served concurrently, up to [`MAX_CLIENTS`]; on shutdown every client is
//! disconnected before `run` returns. The TCP listener only binds loopback addresses.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::schema::Guard;
use super::sim::{send, should_warn};
use super::{Sample, SourceError, now_us};
use crate::config::SocketEndpoint;
use crate::metrics::{Metrics, RejectReason};

/// The most values one sample may carry (from any source).
pub const MAX_VALUES: usize = 256;
/// The longest accepted line, in bytes, without its newline.
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// Connections beyond this many are told so and closed.
pub const MAX_CLIENTS: usize = 1024;
/// How long an error reply may take before the agent stops replying to that client.
const REPLY_TIMEOUT: Duration = Duration::from_secs(1);

/// Binds `endpoint` and serves it until `shutdown` fires or the receiver closes.
pub async fn run(
    stream: Arc<str>,
    endpoint: SocketEndpoint,
    guard: Guard,
    tx: mpsc::Sender<Sample>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), SourceError> {
    let listener = Listener::bind(&endpoint).await?;
    serve(listener, stream, guard, tx, metrics, shutdown).await
}

/// A bound socket source endpoint.
#[derive(Debug)]
pub enum Listener {
    Unix {
        listener: UnixListener,
        file: SocketFile,
    },
    Tcp(TcpListener),
}

impl Listener {
    /// Binds a Unix socket (replacing a stale socket file) or a loopback TCP address.
    pub async fn bind(endpoint: &SocketEndpoint) -> Result<Listener, SourceError> {
        match endpoint {
            SocketEndpoint::Unix(path) => {
                let what = format!("unix socket {}", path.display());
                let open = |source: io::Error| SourceError::Open {
                    what: what.clone(),
                    source,
                };
                remove_stale_socket(path).await.map_err(open)?;
                let listener = UnixListener::bind(path).map_err(open)?;
                let file = SocketFile::new(path.clone()).map_err(open)?;
                Ok(Listener::Unix { listener, file })
            }
            SocketEndpoint::Tcp(addr) => {
                let what = format!("tcp listener {addr}");
                if !addr.ip().is_loopback() {
                    return Err(SourceError::Open {
                        what,
                        source: io::Error::new(
                            io::ErrorKind::InvalidInput,
                            "not a loopback address: the socket source only listens on 127.0.0.1 or ::1",
                        ),
                    });
                }
                TcpListener::bind(addr)
                    .await
                    .map(Listener::Tcp)
                    .map_err(|source| SourceError::Open { what, source })
            }
        }
    }

    /// The bound TCP address (useful after binding port 0); `None` for a Unix socket.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix { .. } => None,
        }
    }

    async fn accept(&self) -> io::Result<(Conn, String)> {
        match self {
            Listener::Unix { listener, .. } => listener
                .accept()
                .await
                .map(|(s, _)| (Conn::Unix(s), "unix".to_string())),
            Listener::Tcp(listener) => listener
                .accept()
                .await
                .map(|(s, peer)| (Conn::Tcp(s), peer.to_string())),
        }
    }
}

/// Removes the socket file on drop, if it is still the one this agent created.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    id: (u64, u64),
}

impl SocketFile {
    fn new(path: PathBuf) -> io::Result<SocketFile> {
        let meta = std::fs::symlink_metadata(&path)?;
        Ok(SocketFile {
            path,
            id: (meta.dev(), meta.ino()),
        })
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        // Another agent may have replaced the file since; leave theirs alone.
        if let Ok(meta) = std::fs::symlink_metadata(&self.path)
            && (meta.dev(), meta.ino()) == self.id
            && let Err(e) = std::fs::remove_file(&self.path)
        {
            tracing::warn!(path = %self.path.display(), error = %e, "Could not remove the socket file.");
        }
    }
}

/// Removes a socket file that nobody listens on (left by a crash). Refuses to touch a file
/// that is not a socket, or a socket that another process still serves.
async fn remove_stale_socket(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the path exists and is not a socket; the agent will not delete it: remove it or choose another path",
        ));
    }
    match tokio::net::UnixStream::connect(path).await {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "another process is listening on this socket: stop it or choose another path",
        )),
        Err(_) => {
            tracing::info!(path = %path.display(), "Removing a stale socket file.");
            std::fs::remove_file(path)
        }
    }
}

enum Conn {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

/// What every client task shares.
struct Shared {
    stream: Arc<str>,
    /// The stream's schema check, shared by all clients (held only for the check).
    guard: std::sync::Mutex<Guard>,
    tx: mpsc::Sender<Sample>,
    metrics: Arc<Metrics>,
    /// Rejections by this source, for rate-limiting the warnings.
    rejected: AtomicU64,
    shutdown: CancellationToken,
}

/// Serves an already bound listener until `shutdown` fires or the receiver closes.
pub async fn serve(
    listener: Listener,
    stream: Arc<str>,
    guard: Guard,
    tx: mpsc::Sender<Sample>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), SourceError> {
    let span = tracing::info_span!("source", kind = "socket", stream = %stream);
    async move {
        match &listener {
            Listener::Unix { file, .. } => tracing::info!(path = %file.path.display(), "Socket source listening."),
            Listener::Tcp(l) => tracing::info!(addr = ?l.local_addr().ok(), "Socket source listening."),
        }
        let shared = Arc::new(Shared { stream, guard: std::sync::Mutex::new(guard), tx, metrics, rejected: AtomicU64::new(0), shutdown: shutdown.child_token() });
        let mut clients = JoinSet::new();
        let mut next_id = 0u64;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = shared.tx.closed() => break,
                Some(done) = clients.join_next(), if !clients.is_empty() => {
                    if let Err(e) = done {
                        tracing::error!(error = %e, "A socket client task failed.");
                    }
                }
                accepted = listener.accept() => match accepted {
                    Ok((conn, peer)) => {
                        next_id += 1;
                        let span = tracing::debug_span!("client", id = next_id, peer = %peer);
                        if clients.len() >= MAX_CLIENTS {
                            tracing::warn!(parent: &span, max = MAX_CLIENTS, "Refused a socket client: too many connected.");
                            clients.spawn(refuse(conn).instrument(span));
                            continue;
                        }
                        tracing::debug!(parent: &span, "Socket client connected.");
                        let shared = shared.clone();
                        match conn {
                            Conn::Unix(s) => clients.spawn(client(s, shared).instrument(span)),
                            Conn::Tcp(s) => clients.spawn(client(s, shared).instrument(span)),
                        };
                    }
                    Err(e) => {
                        // Usually out of file descriptors: back off instead of spinning.
                        tracing::warn!(error = %e, "Socket source failed to accept a connection.");
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        }
                    }
                },
            }
        }
        shared.shutdown.cancel();
        clients.shutdown().await;
        tracing::info!("Socket source stopped.");
        Ok(())
    }
    .instrument(span)
    .await
}

async fn refuse(conn: Conn) {
    let msg = format!(
        "{}\n",
        serde_json::json!({ "error": format!("too many clients (at most {MAX_CLIENTS}): try again later") })
    );
    let write = async {
        match conn {
            Conn::Unix(mut s) => s.write_all(msg.as_bytes()).await,
            Conn::Tcp(mut s) => s.write_all(msg.as_bytes()).await,
        }
    };
    let _ = tokio::time::timeout(REPLY_TIMEOUT, write).await;
}

/// Serves one client until it disconnects, the source stops, or the receiver closes.
async fn client<S: AsyncRead + AsyncWrite + Send + 'static>(sock: S, shared: Arc<Shared>) {
    let (rd, mut wr) = tokio::io::split(sock);
    let mut rd = BufReader::new(rd);
    let mut buf = Vec::with_capacity(1024);
    let mut line_no = 0u64;
    let mut replying = true;
    loop {
        let read = tokio::select! {
            biased;
            _ = shared.shutdown.cancelled() => return,
            read = read_line_bounded(&mut rd, &mut buf, MAX_LINE_BYTES) => read,
        };
        let parsed = match read {
            Ok(Line::Eof) => {
                tracing::debug!("Socket client disconnected.");
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "Socket client connection failed.");
                return;
            }
            Ok(Line::TooLong) => Err(format!(
                "line is longer than {MAX_LINE_BYTES} bytes and was discarded: send one sample per line"
            )),
            Ok(Line::Complete) => parse_line(&buf, &shared.stream, now_us),
        };
        line_no += 1;
        let refused = match parsed {
            Ok(None) => None,
            Ok(Some(sample)) => {
                // The guard counts and logs its own refusals.
                let fit = shared
                    .guard
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .admit(&sample);
                match fit {
                    Ok(()) => {
                        if !send(&shared.tx, sample, &shared.shutdown).await {
                            return;
                        }
                        shared.metrics.captured.fetch_add(1, Relaxed);
                        None
                    }
                    Err(misfit) => Some(format!("line {line_no}: {misfit}")),
                }
            }
            Err(reason) => {
                let message = format!("line {line_no}: {reason}");
                shared.metrics.reject(RejectReason::Malformed);
                let n = shared.rejected.fetch_add(1, Relaxed) + 1;
                if should_warn(n) {
                    tracing::warn!(reason = %message, rejected = n, "Rejected a line from a socket client.");
                }
                Some(message)
            }
        };
        if let Some(message) = refused
            && replying
        {
            let reply = format!("{}\n", serde_json::json!({ "error": message }));
            let written = tokio::select! {
                biased;
                _ = shared.shutdown.cancelled() => return,
                w = tokio::time::timeout(REPLY_TIMEOUT, wr.write_all(reply.as_bytes())) => w,
            };
            if !matches!(written, Ok(Ok(()))) {
                // The client does not read its replies; keep taking its samples anyway.
                tracing::debug!("Socket client does not read error replies; no longer replying.");
                replying = false;
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// `buf` holds a line, without its newline (the last line may lack one).
    Complete,
    /// The line exceeded the limit; it has been consumed and dropped.
    TooLong,
    Eof,
}

/// Reads one line into `buf`, holding at most `max` bytes of it: the rest of a longer line is
/// read and thrown away.
async fn read_line_bounded<R: AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> io::Result<Line> {
    buf.clear();
    let mut too_long = false;
    let mut any = false;
    loop {
        let available = r.fill_buf().await?;
        if available.is_empty() {
            return Ok(match (any, too_long) {
                (false, _) => Line::Eof,
                (true, true) => Line::TooLong,
                (true, false) => Line::Complete,
            });
        }
        any = true;
        let (chunk, used, done) = match available.iter().position(|b| *b == b'\n') {
            Some(i) => (&available[..i], i + 1, true),
            None => (available, available.len(), false),
        };
        if !too_long {
            if buf.len() + chunk.len() > max {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(chunk);
            }
        }
        r.consume(used);
        if done {
            return Ok(if too_long {
                Line::TooLong
            } else {
                Line::Complete
            });
        }
    }
}

/// Turns one line into a sample; `Ok(None)` for a blank line, `Err` with the reason to reject.
fn parse_line(
    line: &[u8],
    stream: &str,
    now: impl FnOnce() -> u64,
) -> Result<Option<Sample>, String> {
    let line = std::str::from_utf8(line).map_err(|_| "line is not valid UTF-8".to_string())?;
    let line = line.trim();
    if line.is_empty() {
        return Ok(None);
    }
    let value: Value = serde_json::from_str(line).map_err(|e| {
        format!("not valid JSON ({e}): send one object per line, like {{\"values\":[1.0,2.0]}}")
    })?;
    let Value::Object(map) = value else {
        return Err("expected a JSON object like {\"values\":[1.0,2.0]}".to_string());
    };
    if let Some(unknown) = map
        .keys()
        .find(|k| !matches!(k.as_str(), "values" | "ts" | "stream"))
    {
        return Err(format!(
            "unknown field {unknown:?}: the allowed fields are values, ts and stream"
        ));
    }
    if let Some(s) = map.get("stream") {
        match s.as_str() {
            Some(s) if s == stream => {}
            Some(s) => {
                return Err(format!(
                    "field stream is {s:?} but this socket feeds stream {stream:?}: leave the field out or use the right socket"
                ));
            }
            None => return Err("field stream must be a string".to_string()),
        }
    }
    let Some(values) = map.get("values") else {
        return Err("field values is missing: send {\"values\":[1.0,2.0]}".to_string());
    };
    let Value::Array(items) = values else {
        return Err("field values must be an array of numbers".to_string());
    };
    if items.is_empty() {
        return Err("field values is empty: send at least one number".to_string());
    }
    if items.len() > MAX_VALUES {
        return Err(format!(
            "field values has {} numbers; at most {MAX_VALUES} are allowed",
            items.len()
        ));
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let Some(x) = item.as_f64() else {
            return Err(format!(
                "field values must be an array of numbers (item {i} is {})",
                kind(item)
            ));
        };
        // A value beyond f32's range becomes an infinity, which the stream's guard refuses
        // (`reason="non_finite"`); JSON itself cannot carry NaN or Inf.
        out.push(x as f32);
    }
    let ts_us = match map.get("ts") {
        None => now(),
        Some(ts) => ts.as_u64().ok_or_else(|| {
            format!("field ts must be a non-negative integer (microseconds since the Unix epoch), not {ts}")
        })?,
    };
    Ok(Some(Sample {
        stream: stream.into(),
        ts_us,
        values: out,
        origin: None,
    }))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::schema::Schema;
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpStream, UnixStream};

    const WAIT: Duration = Duration::from_secs(10);

    fn parse(line: &str) -> Result<Option<Sample>, String> {
        parse_line(line.as_bytes(), "imu", || 42)
    }

    fn rejected(line: &str) -> String {
        parse(line).expect_err("line should be rejected")
    }

    struct Harness {
        rx: mpsc::Receiver<Sample>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<Result<(), SourceError>>,
    }

    impl Harness {
        fn start(listener: Listener, capacity: usize) -> Harness {
            Harness::start_with(listener, capacity, None)
        }

        /// With a schema: `None` tolerates anything (fixes the width by the first sample).
        fn start_with(listener: Listener, capacity: usize, schema: Option<Schema>) -> Harness {
            let (tx, rx) = mpsc::channel(capacity);
            let metrics = Arc::new(Metrics::default());
            let shutdown = CancellationToken::new();
            let guard = match schema {
                Some(schema) => Guard::new("imu".into(), schema, metrics.clone()),
                None => Guard::open(&metrics),
            };
            let task = tokio::spawn(serve(
                listener,
                "imu".into(),
                guard,
                tx,
                metrics.clone(),
                shutdown.clone(),
            ));
            Harness {
                rx,
                metrics,
                shutdown,
                task,
            }
        }

        async fn tcp(capacity: usize) -> (Harness, SocketAddr) {
            let listener = Listener::bind(&SocketEndpoint::Tcp(loopback()))
                .await
                .expect("bind loopback");
            let addr = listener.local_addr().expect("tcp address");
            (Harness::start(listener, capacity), addr)
        }

        async fn recv(&mut self) -> Sample {
            tokio::time::timeout(WAIT, self.rx.recv())
                .await
                .expect("timed out waiting for a sample")
                .expect("channel closed")
        }

        async fn stop(self) -> Arc<Metrics> {
            self.shutdown.cancel();
            tokio::time::timeout(WAIT, self.task)
                .await
                .expect("socket source did not stop in time")
                .expect("task panicked")
                .expect("socket source failed");
            self.metrics
        }
    }

    fn loopback() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    async fn wait_until(what: &str, cond: impl Fn() -> bool) {
        tokio::time::timeout(WAIT, async {
            while !cond() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out waiting until {what}"));
    }

    async fn read_reply<R: AsyncBufRead + Unpin>(r: &mut R) -> serde_json::Value {
        let mut line = String::new();
        tokio::time::timeout(WAIT, r.read_line(&mut line))
            .await
            .expect("timed out waiting for a reply")
            .expect("read reply");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply {line:?} is not JSON: {e}"))
    }

    #[test]
    fn good_lines_become_samples() {
        let s = parse(r#"{"values":[1.5,-2,3e2]}"#)
            .expect("valid")
            .expect("a sample");
        assert_eq!(
            s,
            Sample {
                stream: "imu".into(),
                ts_us: 42,
                values: vec![1.5, -2.0, 300.0],
                origin: None,
            }
        );
        let s = parse(r#" {"values":[0],"ts":1718000000000000,"stream":"imu"} "#)
            .expect("valid")
            .expect("a sample");
        assert_eq!(s.ts_us, 1_718_000_000_000_000);
        assert_eq!(parse("   "), Ok(None));
        assert_eq!(parse(""), Ok(None));
        let max: Vec<String> = (0..MAX_VALUES).map(|i| i.to_string()).collect();
        let s = parse(&format!("{{\"values\":[{}]}}", max.join(",")))
            .expect("valid")
            .expect("a sample");
        assert_eq!(s.values.len(), MAX_VALUES);
    }

    #[test]
    fn bad_lines_are_rejected_with_a_reason() {
        let too_many: Vec<&str> = vec!["1"; MAX_VALUES + 1];
        let cases: Vec<(String, &str)> = vec![
            ("{\"values\":[1,2]".into(), "not valid JSON"),
            ("values: 1,2".into(), "not valid JSON"),
            ("[1,2]".into(), "expected a JSON object"),
            ("{}".into(), "field values is missing"),
            ("{\"ts\":5}".into(), "field values is missing"),
            ("{\"values\":[]}".into(), "field values is empty"),
            (
                "{\"values\":\"1,2\"}".into(),
                "field values must be an array of numbers",
            ),
            (
                "{\"values\":[1,\"2\"]}".into(),
                "field values must be an array of numbers (item 1 is a string)",
            ),
            (
                "{\"values\":[1,null]}".into(),
                "field values must be an array of numbers (item 1 is null)",
            ),
            ("{\"values\":[1e400]}".into(), "not valid JSON"),
            ("{\"values\":[NaN]}".into(), "not valid JSON"),
            (
                format!("{{\"values\":[{}]}}", too_many.join(",")),
                "field values has 257 numbers; at most 256 are allowed",
            ),
            (
                "{\"values\":[1],\"extra\":true}".into(),
                "unknown field \"extra\"",
            ),
            (
                "{\"values\":[1],\"stream\":\"gps\"}".into(),
                "field stream is \"gps\" but this socket feeds stream \"imu\"",
            ),
            (
                "{\"values\":[1],\"stream\":7}".into(),
                "field stream must be a string",
            ),
            (
                "{\"values\":[1],\"ts\":-1}".into(),
                "field ts must be a non-negative integer",
            ),
            (
                "{\"values\":[1],\"ts\":1.5}".into(),
                "field ts must be a non-negative integer",
            ),
            (
                "{\"values\":[1],\"ts\":\"now\"}".into(),
                "field ts must be a non-negative integer",
            ),
        ];
        for (line, want) in cases {
            let got = rejected(&line);
            assert!(
                got.starts_with(want),
                "for {line:?}: got {got:?}, want it to start with {want:?}"
            );
        }
        assert_eq!(
            parse_line(b"{\"values\":[1]}\xff", "imu", || 0),
            Err("line is not valid UTF-8".to_string())
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn bounded_reader_splits_lines_and_discards_long_ones() {
        let input = format!("short\n{}\n\nlast-without-newline", "x".repeat(100));
        // A tiny buffer, so lines arrive in many pieces.
        let mut r = BufReader::with_capacity(7, input.as_bytes());
        let mut buf = Vec::new();
        assert_eq!(
            read_line_bounded(&mut r, &mut buf, 50).await.expect("read"),
            Line::Complete
        );
        assert_eq!(buf, b"short");
        assert_eq!(
            read_line_bounded(&mut r, &mut buf, 50).await.expect("read"),
            Line::TooLong
        );
        assert!(buf.is_empty(), "a discarded line is not kept");
        assert_eq!(
            read_line_bounded(&mut r, &mut buf, 50).await.expect("read"),
            Line::Complete
        );
        assert_eq!(buf, b"");
        assert_eq!(
            read_line_bounded(&mut r, &mut buf, 50).await.expect("read"),
            Line::Complete
        );
        assert_eq!(buf, b"last-without-newline");
        assert_eq!(
            read_line_bounded(&mut r, &mut buf, 50).await.expect("read"),
            Line::Eof
        );

        // Exactly at the limit is fine; one byte more is not.
        let input = format!("{}\n{}\n", "a".repeat(50), "b".repeat(51));
        let mut r = BufReader::with_capacity(8, input.as_bytes());
        assert_eq!(
            read_line_bounded(&mut r, &mut buf, 50).await.expect("read"),
            Line::Complete
        );
        assert_eq!(buf.len(), 50);
        assert_eq!(
            read_line_bounded(&mut r, &mut buf, 50).await.expect("read"),
            Line::TooLong
        );
        assert_eq!(
            read_line_bounded(&mut r, &mut buf, 50).await.expect("read"),
            Line::Eof
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn unix_socket_accepts_samples_and_removes_its_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ember.sock");
        let listener = Listener::bind(&SocketEndpoint::Unix(path.clone()))
            .await
            .expect("bind");
        assert!(listener.local_addr().is_none());
        let mut h = Harness::start(listener, 64);

        let mut c = UnixStream::connect(&path).await.expect("connect");
        c.write_all(
            b"{\"values\":[1,2,3],\"ts\":1000}\n{\"values\":[4.5,0,0],\"stream\":\"imu\"}\n",
        )
        .await
        .expect("write");
        let a = h.recv().await;
        let b = h.recv().await;
        assert_eq!(
            (a.values, a.ts_us, &*a.stream),
            (vec![1.0, 2.0, 3.0], 1000, "imu")
        );
        assert_eq!(b.values, vec![4.5, 0.0, 0.0]);
        assert!(
            b.ts_us.abs_diff(now_us()) < 60_000_000,
            "default ts is the arrival time"
        );

        // The last line of a client that disconnects without a newline still counts.
        c.write_all(b"{\"values\":[9,0,0]}").await.expect("write");
        drop(c);
        assert_eq!(h.recv().await.values, vec![9.0, 0.0, 0.0]);

        let metrics = h.stop().await;
        assert_eq!(metrics.captured.load(Relaxed), 3);
        assert_eq!(metrics.rejected.load(Relaxed), 0);
        assert!(!path.exists(), "the socket file is removed on exit");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn tcp_rejections_are_answered_and_the_connection_continues() {
        let (mut h, addr) = Harness::tcp(64).await;
        let c = TcpStream::connect(addr).await.expect("connect");
        let (rd, mut wr) = c.into_split();
        let mut rd = tokio::io::BufReader::new(rd);

        let bad = [
            ("not json", "not valid JSON"),
            (
                "{\"values\":\"x\"}",
                "field values must be an array of numbers",
            ),
            ("{\"values\":[]}", "field values is empty"),
            ("{\"values\":[1],\"extra\":1}", "unknown field"),
            (
                "{\"values\":[1],\"stream\":\"gps\"}",
                "field stream is \"gps\"",
            ),
        ];
        let mut line = 0;
        for (text, want) in bad {
            line += 1;
            wr.write_all(format!("{text}\n").as_bytes())
                .await
                .expect("write");
            let reply = read_reply(&mut rd).await;
            let msg = reply["error"].as_str().expect("error reply");
            assert!(
                msg.starts_with(&format!("line {line}: {want}")),
                "reply {msg:?} for {text:?}"
            );
            // A blank line counts as a line but is neither a sample nor an error.
            wr.write_all(b"\n").await.expect("write");
            line += 1;
        }
        wr.write_all(b"{\"values\":[7,8]}\n").await.expect("write");
        assert_eq!(h.recv().await.values, vec![7.0, 8.0]);
        assert_eq!(h.metrics.rejected.load(Relaxed), 5);

        let metrics = h.stop().await;
        assert_eq!(metrics.captured.load(Relaxed), 1);
        assert_eq!(metrics.rejected.load(Relaxed), 5);
    }

    /// Good and misfit samples interleaved on a 3-channel stream: every good one passes, in
    /// order; each misfit is answered with what was expected and counted under its reason.
    #[tokio::test(flavor = "current_thread")]
    async fn misfit_samples_are_refused_by_reason_and_answered_with_the_schema() {
        let listener = Listener::bind(&SocketEndpoint::Tcp(loopback()))
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("tcp address");
        let schema = Schema {
            channels: Some(3),
            max_backwards_us: 1_000,
        };
        let mut h = Harness::start_with(listener, 256, Some(schema));
        let c = TcpStream::connect(addr).await.expect("connect");
        let (rd, mut wr) = c.into_split();
        let mut rd = tokio::io::BufReader::new(rd);
        let sixty_five = vec!["1"; 65].join(",");
        let misfits = [
            (
                r#"{"values":[1,2],"ts":TS}"#.to_string(),
                "the sample has 2 values but stream \"imu\" has 3 channels",
            ),
            (
                format!(r#"{{"values":[{sixty_five}],"ts":TS}}"#),
                "the sample has 65 values but stream \"imu\" has 3 channels",
            ),
            (
                r#"{"values":[1,1e39,3],"ts":TS}"#.to_string(),
                "value 1 is inf: every value must be a finite number",
            ),
            (
                r#"{"values":[1,2,3],"ts":BACK}"#.to_string(),
                "goes back 999900 µs",
            ),
        ];
        let mut good = Vec::new();
        let mut line = 0;
        for k in 0..40u64 {
            let ts = 10_000_000 + k * 100;
            line += 1;
            if k % 3 == 2 {
                let (text, want) = &misfits[(k as usize / 3) % misfits.len()];
                let text = text
                    .replace("TS", &ts.to_string())
                    .replace("BACK", &(ts - 1_000_000).to_string());
                wr.write_all(format!("{text}\n").as_bytes())
                    .await
                    .expect("write");
                let reply = read_reply(&mut rd).await;
                let msg = reply["error"].as_str().expect("error reply");
                assert!(
                    msg.starts_with(&format!("line {line}: ")) && msg.contains(want),
                    "reply {msg:?} for {text:?}"
                );
            } else {
                wr.write_all(format!("{{\"values\":[{k},0,1],\"ts\":{ts}}}\n").as_bytes())
                    .await
                    .expect("write");
                good.push((ts, vec![k as f32, 0.0, 1.0]));
            }
        }
        let mut got = Vec::new();
        for _ in 0..good.len() {
            let s = h.recv().await;
            got.push((s.ts_us, s.values));
        }
        assert_eq!(got, good);
        let metrics = h.stop().await;
        assert_eq!(metrics.captured.load(Relaxed), 27);
        assert_eq!(metrics.rejected_channels.load(Relaxed), 7);
        assert_eq!(metrics.rejected_non_finite.load(Relaxed), 3);
        assert_eq!(metrics.rejected_backwards.load(Relaxed), 3);
        assert_eq!(metrics.rejected_malformed.load(Relaxed), 0);
        assert_eq!(metrics.rejected.load(Relaxed), 13);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn overlong_lines_are_discarded_without_breaking_the_stream() {
        let (mut h, addr) = Harness::tcp(64).await;
        let c = TcpStream::connect(addr).await.expect("connect");
        let (rd, mut wr) = c.into_split();
        let mut rd = tokio::io::BufReader::new(rd);

        // A valid-looking line, just too long, written in pieces.
        let long = format!("{{\"values\":[{}1]}}\n", "1,".repeat(MAX_LINE_BYTES));
        for chunk in long.as_bytes().chunks(10_000) {
            wr.write_all(chunk).await.expect("write");
        }
        wr.write_all(b"{\"values\":[3]}\n").await.expect("write");
        let reply = read_reply(&mut rd).await;
        let msg = reply["error"].as_str().expect("error reply");
        assert!(
            msg.starts_with("line 1: line is longer than 65536 bytes"),
            "{msg}"
        );
        let s = h.recv().await;
        assert_eq!(s.values, vec![3.0]);

        let metrics = h.stop().await;
        assert_eq!(
            (
                metrics.captured.load(Relaxed),
                metrics.rejected.load(Relaxed)
            ),
            (1, 1)
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn serves_many_clients_concurrently() {
        const CLIENTS: usize = 16;
        const LINES: usize = 50;
        let (mut h, addr) = Harness::tcp(16).await;
        let mut writers = JoinSet::new();
        for c in 0..CLIENTS {
            writers.spawn(async move {
                let mut s = TcpStream::connect(addr).await.expect("connect");
                for i in 0..LINES {
                    s.write_all(format!("{{\"values\":[{c},{i}]}}\n").as_bytes())
                        .await
                        .expect("write");
                }
                // Hold the connection until the server has everything, then close it.
                s.shutdown().await.expect("shutdown");
                let mut rest = Vec::new();
                s.read_to_end(&mut rest).await.expect("read");
                assert!(
                    rest.is_empty(),
                    "no replies for good lines: {:?}",
                    String::from_utf8_lossy(&rest)
                );
            });
        }
        let mut next = [0usize; CLIENTS];
        for _ in 0..CLIENTS * LINES {
            let s = h.recv().await;
            let (c, i) = (s.values[0] as usize, s.values[1] as usize);
            assert_eq!(i, next[c], "client {c}'s lines arrive in order");
            next[c] += 1;
        }
        assert!(next.iter().all(|n| *n == LINES));
        let metrics = h.stop().await;
        assert_eq!(metrics.captured.load(Relaxed), (CLIENTS * LINES) as u64);
        // Clients were disconnected by the server's shutdown at the latest.
        while let Some(done) = writers.join_next().await {
            done.expect("client task");
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn backpressure_loses_nothing_and_shutdown_still_stops() {
        let (mut h, addr) = Harness::tcp(1).await;
        let mut c = TcpStream::connect(addr).await.expect("connect");
        let mut text = String::new();
        for i in 0..200 {
            text.push_str(&format!("{{\"values\":[{i}]}}\n"));
        }
        c.write_all(text.as_bytes()).await.expect("write");
        for i in 0..100 {
            assert_eq!(h.recv().await.values, vec![i as f32]);
        }
        // Stop reading: the client task blocks on the full channel; shutdown must still work.
        let metrics = h.metrics.clone();
        wait_until("the channel is full again", || {
            metrics.captured.load(Relaxed) >= 101
        })
        .await;
        let metrics = h.stop().await;
        let captured = metrics.captured.load(Relaxed);
        assert!((101..=102).contains(&captured), "captured {captured}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn stops_when_the_receiver_is_dropped() {
        let (h, addr) = Harness::tcp(4).await;
        let _idle = TcpStream::connect(addr).await.expect("connect");
        drop(h.rx);
        tokio::time::timeout(WAIT, h.task)
            .await
            .expect("did not stop")
            .expect("panicked")
            .expect("failed");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn stale_socket_files_are_replaced_but_live_ones_and_other_files_are_not() {
        let dir = tempfile::tempdir().expect("tempdir");

        // A socket file left behind by a dead process.
        let stale = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
        assert!(stale.exists());
        let mut h = Harness::start(
            Listener::bind(&SocketEndpoint::Unix(stale.clone()))
                .await
                .expect("rebind stale"),
            4,
        );

        // A second listener on the same path must not steal it.
        let err = Listener::bind(&SocketEndpoint::Unix(stale.clone()))
            .await
            .expect_err("path is in use");
        assert!(
            err.to_string().contains("another process is listening"),
            "{err}"
        );
        let mut c = UnixStream::connect(&stale).await.expect("connect");
        c.write_all(b"{\"values\":[1]}\n").await.expect("write");
        assert_eq!(h.recv().await.values, vec![1.0]);
        h.stop().await;
        assert!(!stale.exists());

        // A regular file is never deleted.
        let file = dir.path().join("data.csv");
        std::fs::write(&file, "keep me").expect("write");
        let err = Listener::bind(&SocketEndpoint::Unix(file.clone()))
            .await
            .expect_err("not a socket");
        assert!(matches!(err, SourceError::Open { .. }), "{err}");
        assert!(err.to_string().contains("is not a socket"), "{err}");
        assert_eq!(std::fs::read_to_string(&file).expect("read"), "keep me");

        // A directory that does not exist is an open error naming the path.
        let missing = dir.path().join("no/such/dir.sock");
        let err = Listener::bind(&SocketEndpoint::Unix(missing))
            .await
            .expect_err("no directory");
        assert!(err.to_string().contains("dir.sock"), "{err}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn refuses_non_loopback_tcp_addresses() {
        let err = Listener::bind(&SocketEndpoint::Tcp(SocketAddr::from(([0, 0, 0, 0], 0))))
            .await
            .expect_err("only loopback");
        assert!(err.to_string().contains("not a loopback address"), "{err}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn run_serves_a_unix_endpoint() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("run.sock");
        let (tx, mut rx) = mpsc::channel(4);
        let metrics = Arc::new(Metrics::default());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(
            "imu".into(),
            SocketEndpoint::Unix(path.clone()),
            Guard::open(&metrics),
            tx,
            metrics.clone(),
            shutdown.clone(),
        ));
        // The listener appears asynchronously: retry connecting until it is there.
        let mut c = tokio::time::timeout(WAIT, async {
            loop {
                match UnixStream::connect(&path).await {
                    Ok(c) => break c,
                    Err(_) => tokio::task::yield_now().await,
                }
            }
        })
        .await
        .expect("listener never appeared");
        c.write_all(b"{\"values\":[5,6]}\n").await.expect("write");
        let s = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("timeout")
            .expect("sample");
        assert_eq!(s.values, vec![5.0, 6.0]);
        shutdown.cancel();
        tokio::time::timeout(WAIT, task)
            .await
            .expect("did not stop")
            .expect("panicked")
            .expect("failed");
        assert!(!path.exists());
        assert_eq!(metrics.captured.load(Relaxed), 1);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn parse_line_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
                let _ = parse_line(&bytes, "imu", || 0);
            }

            /// The bounded reader splits exactly like `split('\n')`, whatever the buffer size,
            /// and reports over-long lines instead of returning them.
            #[test]
            fn bounded_reader_matches_a_plain_split(
                text in "[ab\n]{0,120}",
                capacity in 1usize..16,
                max in 0usize..12,
            ) {
                let mut expected: Vec<Option<String>> = text
                    .split('\n')
                    .map(|l| (l.len() <= max).then(|| l.to_string()))
                    .collect();
                // A trailing newline does not start another line.
                if text.is_empty() || text.ends_with('\n') {
                    expected.pop();
                }
                let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
                let got = rt.block_on(async {
                    let mut r = BufReader::with_capacity(capacity, text.as_bytes());
                    let mut buf = Vec::new();
                    let mut got = Vec::new();
                    loop {
                        match read_line_bounded(&mut r, &mut buf, max).await.expect("read") {
                            Line::Eof => break got,
                            Line::TooLong => got.push(None),
                            Line::Complete => got.push(Some(String::from_utf8(buf.clone()).expect("utf8"))),
                        }
                    }
                });
                prop_assert_eq!(got, expected);
            }
        }
    }
}
