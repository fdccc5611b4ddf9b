//! The `ember-agent` binary as a child process under test.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::broker::signal;
use crate::{POLL_INTERVAL, free_port, localhost};

/// Metrics as read from `/metrics`: see [`parse_prometheus`] for the keys.
pub type Metrics = BTreeMap<String, f64>;

/// How long `wait_ready` waits by default for the metrics endpoint.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Builds an agent's config file; [`TestAgentBuilder::spawn`] starts it.
///
/// Defaults suited to tests: the broker on 127.0.0.1, reconnects every 50-500 ms, a status
/// message every second, a 5 s drain on SIGTERM, metrics on a free port, logs at `info`, and
/// `mqtt.delivery = "puback"`: records leave the queue on the broker's PUBACK, because the
/// testkit's [`crate::Subscriber`] is a plain MQTT subscriber that sends no commit watermarks
/// (like a fleet older than end-to-end acknowledgement). Tests against a real `ember-fleet`
/// choose `"auto"` or `"commit"` with [`TestAgentBuilder::delivery`].
#[derive(Debug, Clone)]
pub struct TestAgentBuilder {
    bin: PathBuf,
    device_id: String,
    broker_port: Option<u16>,
    data_dir: Option<PathBuf>,
    sources: Vec<String>,
    models: Vec<String>,
    sections: BTreeMap<&'static str, BTreeMap<String, String>>,
    envs: Vec<(String, String)>,
}

impl TestAgentBuilder {
    pub fn device_id(mut self, id: &str) -> Self {
        self.device_id = id.to_string();
        self
    }

    pub fn broker_port(mut self, port: u16) -> Self {
        self.broker_port = Some(port);
        self
    }

    /// Uses `dir` as the data dir (default: `data/` in the agent's own temp dir).
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// An environment variable for every run of the agent (e.g. a fault-injection hook).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.envs.push((key.to_string(), value.to_string()));
        self
    }

    /// A simulated source: `channels` values per sample at `rate_hz`.
    pub fn sim(mut self, stream: &str, rate_hz: f64, channels: usize) -> Self {
        self.sources.push(format!(
            "type = \"sim\"\nstream = {}\nrate_hz = {}\nchannels = {channels}\n",
            quote(stream),
            float(rate_hz)
        ));
        self
    }

    /// Replays a CSV file once (`loop = false`) at `rate_hz`.
    pub fn replay_csv(mut self, stream: &str, path: &Path, rate_hz: f64) -> Self {
        self.sources.push(format!(
            "type = \"replay\"\nstream = {}\npath = {}\nformat = \"csv\"\nrate_hz = {}\nloop = false\n",
            quote(stream),
            quote(&path.display().to_string()),
            float(rate_hz)
        ));
        self
    }

    /// Replays a UEA `.ts` file (series after series) at `rate_hz`, once or looped.
    pub fn replay_ts(mut self, stream: &str, path: &Path, rate_hz: f64, looped: bool) -> Self {
        self.sources.push(format!(
            "type = \"replay\"\nstream = {}\npath = {}\nformat = \"ts\"\nrate_hz = {}\nloop = {looped}\n",
            quote(stream),
            quote(&path.display().to_string()),
            float(rate_hz)
        ));
        self
    }

    /// A `[[model]]`: the bundle file, windowing the `source` stream. Set `[inference]` keys
    /// (`trusted_keys`, `forward_raw`, ...) with [`TestAgentBuilder::set`].
    pub fn model(mut self, bundle: &Path, source: &str) -> Self {
        self.models.push(format!(
            "bundle = {}\nsource = {}\n",
            quote(&bundle.display().to_string()),
            quote(source)
        ));
        self
    }

    /// [`Self::model`] with a capture policy: `capture` holds the `[model.capture]` keys
    /// (`below_confidence = 0.9`, `sample = 0.2`, ...), one per line.
    pub fn model_with_capture(mut self, bundle: &Path, source: &str, capture: &str) -> Self {
        self = self.model(bundle, source);
        if let Some(m) = self.models.last_mut() {
            m.push_str(&format!("[model.capture]\n{}\n", capture.trim_end()));
        }
        self
    }

    /// A `[[source]]` table written as given (keys and values in TOML, one per line), for
    /// settings the other helpers do not cover (`channels`, `max_backwards_ms`, ...).
    pub fn source(mut self, toml: &str) -> Self {
        self.sources.push(format!("{}\n", toml.trim_end()));
        self
    }

    /// A socket source listening on `127.0.0.1:port`.
    pub fn socket_tcp(mut self, stream: &str, port: u16) -> Self {
        self.sources.push(format!(
            "type = \"socket\"\nstream = {}\ntcp = \"127.0.0.1:{port}\"\n",
            quote(stream)
        ));
        self
    }

    /// `queue.max_bytes`.
    pub fn max_bytes(self, bytes: u64) -> Self {
        self.queue("max_bytes", &bytes.to_string())
    }

    /// `queue.fsync`: `"every_batch"`, `"never"`, or `"interval_ms"` (see [`Self::fsync_interval`]).
    pub fn fsync(self, policy: &str) -> Self {
        self.queue("fsync", &quote(policy))
    }

    /// `queue.fsync = "interval_ms"` with the given interval.
    pub fn fsync_interval(self, ms: u64) -> Self {
        self.queue("fsync", "\"interval_ms\"")
            .queue("fsync_interval_ms", &ms.to_string())
    }

    /// `queue.full_policy`: `"drop_oldest"` or `"block"`.
    pub fn full_policy(self, policy: &str) -> Self {
        self.queue("full_policy", &quote(policy))
    }

    /// `mqtt.encoding`: `"json"` or `"cbor"`.
    pub fn encoding(self, encoding: &str) -> Self {
        self.mqtt("encoding", &quote(encoding))
    }

    /// `shutdown.grace_ms`.
    pub fn grace_ms(self, ms: u64) -> Self {
        self.set("shutdown", "grace_ms", &ms.to_string())
    }

    /// Any `[queue]` key; `value` is TOML (strings quoted).
    pub fn queue(self, key: &str, value: &str) -> Self {
        self.set("queue", key, value)
    }

    /// `mqtt.delivery`: `"auto"`, `"commit"` or `"puback"` (the testkit's default).
    pub fn delivery(self, mode: &str) -> Self {
        self.mqtt("delivery", &quote(mode))
    }

    /// Any `[mqtt]` key; `value` is TOML (strings quoted).
    pub fn mqtt(self, key: &str, value: &str) -> Self {
        self.set("mqtt", key, value)
    }

    /// Any key of a table (`log`, `mqtt`, `queue`, `metrics`, `shutdown`, `inference`);
    /// `value` is TOML.
    pub fn set(mut self, section: &'static str, key: &str, value: &str) -> Self {
        self.sections
            .entry(section)
            .or_default()
            .insert(key.to_string(), value.to_string());
        self
    }

    /// Writes the config and starts the agent (without waiting for it to be ready).
    pub fn spawn(self) -> TestAgent {
        let dir = tempfile::Builder::new()
            .prefix("ember-agent-")
            .tempdir()
            .expect("cannot create a temp dir for the agent");
        let data_dir = self
            .data_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("data"));
        let metrics_port = free_port();
        let config_path = dir.path().join("agent.toml");
        fs::write(&config_path, self.render(&data_dir, metrics_port))
            .expect("cannot write the agent's config");
        let agent = TestAgent {
            bin: self.bin,
            device_id: self.device_id,
            config_path,
            data_dir,
            metrics_port,
            stderr_path: dir.path().join("stderr.log"),
            dir,
            child: Mutex::new(None),
            runs: Mutex::new(Vec::new()),
            envs: self.envs,
        };
        agent.restart();
        agent
    }

    /// [`Self::spawn`], then waits until the agent serves metrics.
    pub fn start(self) -> TestAgent {
        let agent = self.spawn();
        agent.wait_ready(READY_TIMEOUT);
        agent
    }

    fn render(&self, data_dir: &Path, metrics_port: u16) -> String {
        let mut sections = self.sections.clone();
        let mut defaults = |section: &'static str, key: &str, value: String| {
            sections
                .entry(section)
                .or_default()
                .entry(key.to_string())
                .or_insert(value);
        };
        defaults("mqtt", "host", quote("127.0.0.1"));
        if let Some(port) = self.broker_port {
            defaults("mqtt", "port", port.to_string());
        }
        defaults("mqtt", "reconnect_min_ms", "50".into());
        defaults("mqtt", "reconnect_max_ms", "500".into());
        defaults("mqtt", "status_interval_s", "1".into());
        defaults("mqtt", "delivery", quote("puback"));
        defaults(
            "metrics",
            "listen",
            quote(&format!("127.0.0.1:{metrics_port}")),
        );
        defaults("log", "level", quote("info"));
        let mut out = String::from("# Generated by ember-testkit.\n");
        let _ = writeln!(out, "device_id = {}", quote(&self.device_id));
        let _ = writeln!(out, "data_dir = {}", quote(&data_dir.display().to_string()));
        for (section, keys) in &sections {
            let _ = writeln!(out, "\n[{section}]");
            for (k, v) in keys {
                let _ = writeln!(out, "{k} = {v}");
            }
        }
        for s in &self.sources {
            let _ = write!(out, "\n[[source]]\n{s}");
        }
        for m in &self.models {
            let _ = write!(out, "\n[[model]]\n{m}");
        }
        out
    }
}

/// A running (or stopped) `ember-agent` process with its own temp dir, which holds the config
/// (`agent.toml`), stderr of every run (`stderr.log`) and, by default, the data dir. Killed
/// when dropped.
pub struct TestAgent {
    bin: PathBuf,
    device_id: String,
    config_path: PathBuf,
    data_dir: PathBuf,
    metrics_port: u16,
    stderr_path: PathBuf,
    dir: tempfile::TempDir,
    child: Mutex<Option<Child>>,
    /// Byte offset in `stderr.log` where each run starts.
    runs: Mutex<Vec<u64>>,
    envs: Vec<(String, String)>,
}

impl TestAgent {
    /// A builder for an agent run from `bin` (in the agent's own tests:
    /// `env!("CARGO_BIN_EXE_ember-agent")`).
    pub fn builder(bin: impl Into<PathBuf>) -> TestAgentBuilder {
        TestAgentBuilder {
            bin: bin.into(),
            device_id: "test-device".into(),
            broker_port: None,
            data_dir: None,
            sources: Vec::new(),
            models: Vec::new(),
            sections: BTreeMap::new(),
            envs: Vec::new(),
        }
    }

    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The agent's temp dir (config, logs, default data dir).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn metrics_port(&self) -> u16 {
        self.metrics_port
    }

    /// The current process id, if one was started.
    pub fn pid(&self) -> Option<u32> {
        self.child
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(Child::id)
    }

    /// Starts the agent again with the same config and data dir. Panics if it is still
    /// running (stop it first: `sigterm` + `wait_exit`, or `sigkill`).
    pub fn restart(&self) {
        let mut slot = self.child.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = slot.as_mut() {
            assert!(
                !matches!(c.try_wait(), Ok(None)),
                "restart: the agent (pid {}) is still running",
                c.id()
            );
        }
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_path)
            .expect("cannot open stderr.log");
        let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(log, "===== ember-testkit: run {} =====", runs.len() + 1);
        runs.push(log.metadata().map(|m| m.len()).unwrap_or(0));
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--config").arg(&self.config_path).arg("run");
        // The agent reads EMBER_* overrides: the test's own environment must not leak in.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("EMBER_") {
                cmd.env_remove(k);
            }
        }
        // Plain log lines: tests search stderr for sentences.
        cmd.env("NO_COLOR", "1");
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.display()));
        *slot = Some(child);
    }

    /// Whether the process is running.
    pub fn is_running(&self) -> bool {
        let mut slot = self.child.lock().unwrap_or_else(|p| p.into_inner());
        matches!(slot.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// The exit status, if the process has exited.
    pub fn try_exit_status(&self) -> Option<ExitStatus> {
        let mut slot = self.child.lock().unwrap_or_else(|p| p.into_inner());
        slot.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits until the metrics endpoint answers. Panics (with the agent's stderr) if the process
    /// exits or `timeout` passes first.
    pub fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.try_metrics().is_ok() {
                return;
            }
            if let Some(status) = self.try_exit_status() {
                panic!(
                    "the agent exited ({status}) before it was ready; its stderr:\n{}",
                    self.last_run_stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not serve metrics within {timeout:?}; its stderr:\n{}",
                self.last_run_stderr()
            );
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// GET /metrics, parsed (see [`parse_prometheus`]).
    pub fn try_metrics(&self) -> std::io::Result<Metrics> {
        let mut s =
            TcpStream::connect_timeout(&localhost(self.metrics_port), Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        let (head, body) = resp.split_once("\r\n\r\n").ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "no end of HTTP head")
        })?;
        if !head.starts_with("HTTP/1.1 200") {
            return Err(std::io::Error::other(format!(
                "metrics endpoint answered: {head}"
            )));
        }
        Ok(parse_prometheus(body))
    }

    /// GET /metrics, parsed; panics (with the agent's stderr) if the endpoint does not answer.
    pub fn metrics(&self) -> Metrics {
        self.try_metrics().unwrap_or_else(|e| {
            panic!(
                "cannot read the agent's metrics: {e}; its stderr:\n{}",
                self.last_run_stderr()
            )
        })
    }

    /// One metric (0 if absent); panics if the endpoint does not answer.
    pub fn metric(&self, key: &str) -> f64 {
        self.metrics().get(key).copied().unwrap_or(0.0)
    }

    /// Polls `/metrics` until `pred(value of key)` holds, and returns that value; `None` if
    /// `timeout` passes first. A metric that is absent reads as 0. Panics (with stderr) if the
    /// agent exits meanwhile.
    pub fn wait_metric(
        &self,
        key: &str,
        mut pred: impl FnMut(f64) -> bool,
        timeout: Duration,
    ) -> Option<f64> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(m) = self.try_metrics() {
                let v = m.get(key).copied().unwrap_or(0.0);
                if pred(v) {
                    return Some(v);
                }
            } else if let Some(status) = self.try_exit_status() {
                panic!(
                    "the agent exited ({status}) while waiting for {key}; its stderr:\n{}",
                    self.last_run_stderr()
                );
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// [`Self::wait_metric`], panicking on timeout with the last value seen and the agent's
    /// stderr.
    pub fn expect_metric(
        &self,
        key: &str,
        pred: impl FnMut(f64) -> bool,
        timeout: Duration,
    ) -> f64 {
        match self.wait_metric(key, pred, timeout) {
            Some(v) => v,
            None => panic!(
                "metric {key} did not reach the expected value within {timeout:?} (now {:?}); stderr:\n{}",
                self.try_metrics().ok().and_then(|m| m.get(key).copied()),
                tail(&self.last_run_stderr(), 60)
            ),
        }
    }

    /// SIGTERM (the first starts a graceful drain, a second exits at once).
    pub fn sigterm(&self) {
        if let Some(pid) = self.pid() {
            signal(pid, "TERM");
        }
    }

    /// SIGHUP (the agent reconnects, picking up rotated TLS credentials).
    pub fn sighup(&self) {
        if let Some(pid) = self.pid() {
            signal(pid, "HUP");
        }
    }

    /// SIGKILL, and reaps the process.
    pub fn sigkill(&self) {
        let mut slot = self.child.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = slot.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP: freezes the process (see [`crate::restart_broker`]).
    pub fn pause(&self) {
        if let Some(pid) = self.pid() {
            signal(pid, "STOP");
        }
    }

    /// SIGCONT: resumes a paused process.
    pub fn resume(&self) {
        if let Some(pid) = self.pid() {
            signal(pid, "CONT");
        }
    }

    /// Waits for the process to exit; panics (killing it, with its stderr) after `timeout`.
    pub fn wait_exit(&self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status() {
                return status;
            }
            if Instant::now() >= deadline {
                self.sigkill();
                panic!(
                    "the agent did not exit within {timeout:?}; its stderr:\n{}",
                    self.last_run_stderr()
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// stderr of every run so far, each run after a `===== ember-testkit: run N =====` line.
    pub fn stderr_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(&self.stderr_path) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// stderr of the current (or last) run only.
    pub fn last_run_stderr(&self) -> String {
        let all = self.stderr_text();
        let from = self
            .runs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last()
            .copied()
            .unwrap_or(0) as usize;
        all.get(from.min(all.len())..)
            .unwrap_or_default()
            .to_string()
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        let slot = self.child.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = slot.as_mut() {
            // SIGKILL also ends a paused (SIGSTOPped) process.
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Parses the Prometheus text format into `key -> value`.
///
/// The key is the metric name without the agent's `ember_agent_` prefix, followed by its
/// labels other than `device` in the order they appear, `{k="v",...}`; a metric with no other
/// labels is just its name. So `ember_agent_records_evicted_total{device="d",reason="bytes"} 3`
/// becomes `records_evicted_total{reason="bytes"}` = 3 and
/// `ember_agent_queue_records{device="d"} 7` becomes `queue_records` = 7. Comment lines and
/// lines that do not parse are skipped.
pub fn parse_prometheus(text: &str) -> Metrics {
    let mut out = Metrics::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(p) => p,
            None => continue,
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.strip_suffix('}').unwrap_or(rest)),
            None => (series, ""),
        };
        let name = name.strip_prefix("ember_agent_").unwrap_or(name);
        let kept: Vec<String> = split_labels(labels)
            .into_iter()
            .filter(|(k, _)| k != "device")
            .map(|(k, v)| format!("{k}=\"{v}\""))
            .collect();
        let key = if kept.is_empty() {
            name.to_string()
        } else {
            format!("{name}{{{}}}", kept.join(","))
        };
        out.insert(key, value);
    }
    out
}

/// `a="x",b="y\"z"` -> `[(a, x), (b, y"z)]`.
fn split_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        let key: String = chars
            .by_ref()
            .take_while(|c| *c != '=')
            .collect::<String>()
            .trim_start_matches(',')
            .trim()
            .to_string();
        if key.is_empty() || chars.next() != Some('"') {
            break;
        }
        let mut val = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    if let Some(n) = chars.next() {
                        val.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => break,
                c => val.push(c),
            }
        }
        out.push((key, val));
    }
    out
}

/// A TOML basic string.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A TOML float (always with a decimal point or exponent).
fn float(x: f64) -> String {
    let s = format!("{x:?}");
    if s.contains(['.', 'e', 'E']) || s.contains("inf") || s.contains("NaN") {
        s
    } else {
        format!("{s}.0")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_keys_drop_prefix_and_device() {
        let m = parse_prometheus(
            "# HELP ember_agent_records_evicted_total x\n\
             # TYPE ember_agent_records_evicted_total counter\n\
             ember_agent_records_evicted_total{device=\"d1\",reason=\"bytes\"} 5\n\
             ember_agent_records_evicted_total{device=\"d1\",reason=\"age\"} 0\n\
             ember_agent_queue_records{device=\"d1\"} 7\n\
             other_metric 1.5\n",
        );
        assert_eq!(m.get("records_evicted_total{reason=\"bytes\"}"), Some(&5.0));
        assert_eq!(m.get("records_evicted_total{reason=\"age\"}"), Some(&0.0));
        assert_eq!(m.get("queue_records"), Some(&7.0));
        assert_eq!(m.get("other_metric"), Some(&1.5));
        assert_eq!(m.len(), 4);
    }

    #[test]
    fn config_renders_sources_and_defaults() {
        let b = TestAgent::builder("/bin/false")
            .device_id("d1")
            .broker_port(1234)
            .sim("imu", 100.0, 3)
            .max_bytes(65536);
        let text = b.render(Path::new("/tmp/x \"y\""), 999);
        assert!(text.contains("device_id = \"d1\""), "{text}");
        assert!(text.contains("data_dir = \"/tmp/x \\\"y\\\"\""), "{text}");
        assert!(
            text.contains("[mqtt]\ndelivery = \"puback\"\nhost = \"127.0.0.1\"\nport = 1234\n"),
            "{text}"
        );
        assert!(text.contains("listen = \"127.0.0.1:999\""), "{text}");
        assert!(text.contains("max_bytes = 65536"), "{text}");
        assert!(
            text.contains(
                "[[source]]\ntype = \"sim\"\nstream = \"imu\"\nrate_hz = 100.0\nchannels = 3\n"
            ),
            "{text}"
        );
    }
}
