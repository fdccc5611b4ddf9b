//! A private Google Pub/Sub emulator per test (the `google-cloud-cli-pubsub-emulator` package:
//! Java), on an ephemeral 127.0.0.1 port, driven over its REST API.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};

use crate::process::kill_group;
use crate::{free_port, localhost};

/// How long a starting emulator may take to answer HTTP (a JVM start; about 2 s when idle).
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// The project every test uses (the emulator accepts any).
pub const PUBSUB_PROJECT: &str = "ember-test";

/// Where the Debian package and a gcloud SDK install put the emulator's launcher.
const LAUNCHERS: [&str; 2] = [
    "/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator",
    "/usr/share/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator",
];

/// How long a REST call may wait for the emulator's answer, and the start-up probe.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The Pub/Sub emulator, killed (its whole process group: the launcher and the JVM) when
/// dropped. Keeps everything in memory.
pub struct TestPubSub {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

/// A message pulled from a subscription.
#[derive(Debug, Clone)]
pub struct Pulled {
    pub ack_id: String,
    pub data: Vec<u8>,
    pub attributes: BTreeMap<String, String>,
    pub ordering_key: String,
}

fn launcher() -> PathBuf {
    let from_gcloud = Command::new("gcloud")
        .args(["info", "--format=value(installation.sdk_root)"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())
                .join("platform/pubsub-emulator/bin/cloud-pubsub-emulator")
        });
    LAUNCHERS
        .iter()
        .map(PathBuf::from)
        .chain(from_gcloud)
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "this test needs the Pub/Sub emulator (and Java): install the Debian package \
                 google-cloud-cli-pubsub-emulator from Google's apt repository (or \
                 `gcloud components install pubsub-emulator`), see scripts/install-deps.sh"
            )
        })
}

impl TestPubSub {
    /// Starts the emulator and waits until it answers HTTP. Panics, saying what to install,
    /// if the emulator or Java is missing.
    pub fn start() -> TestPubSub {
        let bin = launcher();
        let java = Command::new("java")
            .arg("-version")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            java,
            "the Pub/Sub emulator needs Java 11 or later: `apt-get install openjdk-17-jre-headless`"
        );
        let mut last_err = String::new();
        // The port was free when picked; another process may take it before the JVM binds it.
        for _ in 0..3 {
            let mut e = TestPubSub {
                port: free_port(),
                dir: tempfile::Builder::new()
                    .prefix("ember-pubsub-")
                    .tempdir()
                    .expect("cannot create a temp dir for the Pub/Sub emulator"),
                child: None,
            };
            match e.spawn(&bin) {
                Ok(()) => return e,
                Err(err) => last_err = err,
            }
        }
        panic!("the Pub/Sub emulator did not start: {last_err}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// What `PUBSUB_EMULATOR_HOST` should say.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The emulator's output (for failure messages).
    pub fn log_text(&self) -> String {
        fs::read_to_string(self.dir.path().join("emulator.log")).unwrap_or_default()
    }

    pub fn topic_name(id: &str) -> String {
        format!("projects/{PUBSUB_PROJECT}/topics/{id}")
    }

    pub fn subscription_name(id: &str) -> String {
        format!("projects/{PUBSUB_PROJECT}/subscriptions/{id}")
    }

    pub fn create_topic(&self, id: &str) {
        self.call("PUT", &format!("/v1/{}", Self::topic_name(id)), &json!({}));
    }

    /// A subscription of `topic`, with message ordering on or off and a short ack deadline.
    pub fn create_subscription(&self, id: &str, topic: &str, ordering: bool, ack_deadline_s: u32) {
        self.call(
            "PUT",
            &format!("/v1/{}", Self::subscription_name(id)),
            &json!({
                "topic": Self::topic_name(topic),
                "enableMessageOrdering": ordering,
                "ackDeadlineSeconds": ack_deadline_s,
            }),
        );
    }

    /// Publishes one message; returns its id.
    pub fn publish(
        &self,
        topic: &str,
        data: &[u8],
        attributes: &[(&str, &str)],
        ordering_key: &str,
    ) -> String {
        let attrs: serde_json::Map<String, Value> = attributes
            .iter()
            .map(|(k, v)| (k.to_string(), Value::from(*v)))
            .collect();
        let mut m = json!({ "data": B64.encode(data), "attributes": attrs });
        if !ordering_key.is_empty() {
            m["orderingKey"] = Value::from(ordering_key);
        }
        let v = self.call(
            "POST",
            &format!("/v1/{}:publish", Self::topic_name(topic)),
            &json!({ "messages": [m] }),
        );
        v["messageIds"][0].as_str().unwrap_or_default().to_string()
    }

    /// Pulls up to `max` messages (returns at once when there are none).
    pub fn pull(&self, subscription: &str, max: u32) -> Vec<Pulled> {
        let v = self.call(
            "POST",
            &format!("/v1/{}:pull", Self::subscription_name(subscription)),
            &json!({ "maxMessages": max, "returnImmediately": true }),
        );
        v["receivedMessages"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| Pulled {
                ack_id: r["ackId"].as_str().unwrap_or_default().to_string(),
                data: B64
                    .decode(r["message"]["data"].as_str().unwrap_or_default())
                    .unwrap_or_default(),
                attributes: r["message"]["attributes"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect(),
                ordering_key: r["message"]["orderingKey"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            })
            .collect()
    }

    pub fn ack(&self, subscription: &str, ack_ids: &[String]) {
        if ack_ids.is_empty() {
            return;
        }
        self.call(
            "POST",
            &format!("/v1/{}:acknowledge", Self::subscription_name(subscription)),
            &json!({ "ackIds": ack_ids }),
        );
    }

    /// One REST call; panics with the emulator's answer unless it is 200.
    pub fn call(&self, method: &str, path: &str, body: &Value) -> Value {
        // A JVM starved of CPU (the whole suite in parallel) can take a while to answer.
        match try_call(self.port, method, path, &body.to_string(), CALL_TIMEOUT) {
            Ok((200, v)) => v,
            Ok((status, v)) => panic!("{method} {path}: the emulator answered {status}: {v}"),
            Err(e) => panic!("{method} {path} to the Pub/Sub emulator failed: {e}"),
        }
    }

    fn spawn(&mut self, bin: &PathBuf) -> Result<(), String> {
        let log_path = self.dir.path().join("emulator.log");
        let log = fs::File::create(&log_path)
            .map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
        let err = log
            .try_clone()
            .map_err(|e| format!("cannot share {}: {e}", log_path.display()))?;
        let mut child = Command::new(bin)
            .arg("--host=127.0.0.1")
            .arg(format!("--port={}", self.port))
            // Its own process group: Drop kills the launcher and the JVM together.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "the emulator exited with {status} (port {}); its output:\n{}",
                    self.port,
                    self.log_text()
                ));
            }
            if try_call(self.port, "GET", "/", "", PROBE_TIMEOUT).is_ok_and(|(s, _)| s == 200) {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                kill_group(&mut child);
                return Err(format!(
                    "the emulator did not answer on port {} within {START_TIMEOUT:?}; its output:\n{}",
                    self.port,
                    self.log_text()
                ));
            }
            std::thread::sleep(crate::POLL_INTERVAL * 5);
        }
    }
}

impl Drop for TestPubSub {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_group(&mut child);
        }
    }
}

/// One HTTP/1.1 request on its own connection, read up to its `Content-Length` (the emulator
/// keeps connections open whatever the request says): (status, JSON body or the text as a
/// JSON string).
fn try_call(
    port: u16,
    method: &str,
    path: &str,
    body: &str,
    timeout: Duration,
) -> Result<(u16, Value), String> {
    let mut s = TcpStream::connect_timeout(&localhost(port), Duration::from_secs(2))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n\
         Connection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_string();
            let status: u16 = head
                .lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| format!("no status in {head:?}"))?;
            let length = head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())
                    .flatten()
            });
            let chunked = head
                .to_ascii_lowercase()
                .contains("transfer-encoding: chunked");
            let body_start = end + 4;
            let complete = match length {
                Some(n) => raw.len() >= body_start + n,
                None if chunked => raw.ends_with(b"0\r\n\r\n"),
                None => false,
            };
            if complete {
                let text = match length {
                    Some(n) => raw[body_start..body_start + n].to_vec(),
                    None => dechunk(&raw[body_start..]),
                };
                let v = serde_json::from_slice(&text)
                    .unwrap_or_else(|_| Value::from(String::from_utf8_lossy(&text).to_string()));
                return Ok((status, v));
            }
        }
        let n = s.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!(
                "the connection closed before a complete answer: {:?}",
                String::from_utf8_lossy(&raw)
            ));
        }
        raw.extend_from_slice(&buf[..n]);
    }
}

/// A chunked body's data.
fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = body.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&body[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 || body.len() < eol + 2 + size {
            break;
        }
        out.extend_from_slice(&body[eol + 2..eol + 2 + size]);
        body = &body[(eol + 4 + size).min(body.len())..];
    }
    out
}
