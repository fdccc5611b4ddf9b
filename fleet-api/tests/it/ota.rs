//! Over-the-air model rollout end to end: a real Mosquitto, the fleet (in this process, on
//! SQLite) and real `ember-agent` processes replaying BasicMotions through the committed int8
//! activity bundle (version 1.0.0). New versions are the same bundle re-signed with the dev key
//! under another version, or deliberately broken variants of it (`ember_testkit::bundles`).
//!
//! What each test proves is in its doc comment; together they cover issue 5's list: good model
//! through canary and waves with a gap-free ledger; bad models (golden vectors, shadow
//! disagreement) stopped at the canary with the rollout paused; a tampered artifact refused by
//! every agent; an agent killed mid-download resuming; the fleet restarted mid-rollout; an
//! offline device catching up; crash-loop protection rolling back.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ember_testkit::{TestAgent, TestBroker, wait_until};
use serde_json::{Value, json};

use crate::support::{ADMIN, Kind, Store, TestFleet, WAIT, agent_bin, client_id, config};

const MODEL: &str = "activity";
/// The inference stream the activity model's results go to (`{source}.{model}`).
const RESULTS: &str = "motion.activity";

pub(crate) fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The committed bundle every agent starts with (activity 1.0.0, int8).
const BUNDLE: &str = "activity-int8";

pub(crate) fn bundle_path() -> PathBuf {
    ember_testkit::bundles::committed_path(BUNDLE)
}

pub(crate) fn dev_pub() -> PathBuf {
    repo().join("models/keys/dev/dev.pub")
}

fn device(i: usize) -> String {
    format!("ota-{i:02}")
}

/// The fleet, its broker and store, and the agents.
struct Ota {
    broker: TestBroker,
    store: Store,
    fleet: Option<TestFleet>,
    /// The fleet's data dir (blob store under `models/`) and the agents' token files.
    fleet_dir: tempfile::TempDir,
    client_id: String,
    /// The fleet's HTTP port, kept across restarts (the agents' `ota.fleet_url`).
    port: u16,
    agents: Vec<TestAgent>,
    /// More fleet config (TOML tables), and the agents' `[model.capture]` keys if any.
    extra: String,
    capture: Option<String>,
    /// What the agents replay, relative to the repository (BasicMotions TEST by default).
    recording: &'static str,
}

impl Ota {
    fn start() -> Ota {
        Ota::start_with(|_| (String::new(), None))
    }

    /// A fleet with more config and agents with a capture policy, both given the fleet's
    /// data dir.
    fn start_with(setup: impl FnOnce(&Path) -> (String, Option<String>)) -> Ota {
        let broker = TestBroker::start();
        let store = Store::new(Kind::Sqlite);
        let fleet_dir = tempfile::tempdir().expect("temp dir");
        let client_id = client_id();
        let mut ota = Ota {
            broker,
            store,
            fleet: None,
            fleet_dir,
            client_id,
            port: 0,
            agents: Vec::new(),
            extra: String::new(),
            capture: None,
            recording: "models/data/BasicMotions_TEST.ts",
        };
        (ota.extra, ota.capture) = setup(ota.fleet_dir.path());
        ota.start_fleet();
        ota
    }

    fn config(&self) -> String {
        format!(
            "data_dir = \"{}\"\n{}",
            self.fleet_dir.path().display(),
            config(
                &self.store.url(),
                self.broker.port(),
                &self.client_id,
                &format!(
                    "[models]\ntrusted_keys = [\"{}\"]\n{}",
                    dev_pub().display(),
                    self.extra
                ),
            )
        )
    }

    /// Starts the fleet (on the same port as before after a restart) and waits until healthy.
    fn start_fleet(&mut self) {
        let fleet = TestFleet::spawn_on(&self.config(), self.port);
        fleet.wait_healthy();
        self.port = fleet.port;
        self.fleet = Some(fleet);
    }

    fn fleet(&self) -> &TestFleet {
        self.fleet.as_ref().expect("the fleet is running")
    }

    fn restart_fleet(&mut self) {
        if let Some(f) = self.fleet.take() {
            f.stop().expect("the fleet stops cleanly");
        }
        self.start_fleet();
    }

    /// A device token for `device`, stored straight in the fleet's database.
    fn device_token(&self, device: &str) -> String {
        crate::api::token_cli(
            &self.fleet().db_url,
            &["create", "--scope", &format!("device:{device}")],
        )
    }

    /// Starts `n` agents (ids `ota-00`..) serving the committed 1.0.0 bundle, OTA pointed at
    /// `fleet_url` (the fleet itself unless a test puts a proxy in between).
    fn spawn_agents(&mut self, n: usize, fleet_url: &str, env: &[(&str, &str)]) {
        for i in 0..n {
            let id = device(i);
            let agent = self.agent_builder(&id, fleet_url, env).start();
            self.agents.push(agent);
        }
    }

    fn agent_builder(
        &self,
        id: &str,
        fleet_url: &str,
        env: &[(&str, &str)],
    ) -> ember_testkit::TestAgentBuilder {
        let token = self.device_token(id);
        let token_file = self.fleet_dir.path().join(format!("{id}.token"));
        write_private(&token_file, &token);
        let mut b = TestAgent::builder(agent_bin())
            .device_id(id)
            .broker_port(self.broker.port())
            .replay_ts("motion", &repo().join(self.recording), 100.0, true)
            .set(
                "inference",
                "trusted_keys",
                &format!("[\"{}\"]", dev_pub().display()),
            )
            .set("ota", "fleet_url", &format!("\"{fleet_url}\""))
            .set(
                "ota",
                "token_file",
                &format!("\"{}\"", token_file.display()),
            );
        b = match &self.capture {
            Some(c) => b.model_with_capture(&bundle_path(), "motion", c),
            None => b.model(&bundle_path(), "motion"),
        };
        for (k, v) in env {
            b = b.env(k, v);
        }
        b
    }

    fn fleet_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Waits until every agent's status in the registry shows `activity = version`.
    fn wait_versions(&self, devices: &[String], version: &str) {
        for d in devices {
            let mut last = Value::Null;
            let ok = wait_until(WAIT, || {
                let r = self.fleet().get(&format!("/api/v1/devices/{d}"));
                // 404 until the device's first message registers it.
                last = if r.status == 200 {
                    r.json()
                } else {
                    Value::String(r.body)
                };
                last["models"][MODEL] == version
            });
            assert!(ok, "{d} does not report {MODEL} {version}: {last}");
        }
    }

    /// Uploads a bundle (bytes) and returns the registry entry.
    fn upload(&self, bytes: &[u8]) -> Value {
        let r = crate::models::upload(self.fleet(), ADMIN, bytes);
        assert_eq!(r.status, 201, "upload: {}", r.text());
        r.json()
    }

    fn create_rollout(&self, body: Value) -> String {
        let r = self
            .fleet()
            .request("POST", "/api/v1/rollouts", Some(ADMIN), Some(&body));
        assert_eq!(r.status, 201, "create rollout: {}", r.body);
        r.json()["id"].as_str().expect("rollout id").to_string()
    }

    fn rollout(&self, id: &str) -> Value {
        self.fleet().get_json(&format!("/api/v1/rollouts/{id}"))
    }

    /// Waits until the rollout's `state` is `state`; panics with the rollout and the agents'
    /// logs otherwise.
    fn wait_rollout(&self, id: &str, state: &str) -> Value {
        let mut last = Value::Null;
        let ok = wait_until(WAIT * 2, || {
            last = self.rollout(id);
            last["state"] == state
        });
        assert!(
            ok,
            "rollout {id} did not reach {state}: {}\n{}",
            serde_json::to_string_pretty(&last).unwrap_or_default(),
            self.logs()
        );
        last
    }

    /// The rollout's devices in the given states, with their reasons.
    fn devices_in(&self, r: &Value, states: &[&str]) -> Vec<(String, String)> {
        r["devices"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|d| states.iter().any(|s| d["state"] == *s))
                    .map(|d| {
                        (
                            d["device_id"].as_str().unwrap_or_default().to_string(),
                            d["reason"].as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn logs(&self) -> String {
        self.agents
            .iter()
            .map(|a| {
                format!(
                    "--- {} ---\n{}",
                    a.device_id(),
                    tail(&a.stderr_text(), 4000)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Stops every agent with SIGTERM (drain) and checks the inference ledger of each: every
    /// result 1..=captured stored, nothing missing or lost.
    fn stop_and_check_ledgers(&mut self) {
        // Every agent has produced results (a short test may stop before the first window).
        for a in &self.agents {
            if a.is_running() {
                self.fleet().wait_ledger(a.device_id(), RESULTS, |l| {
                    l["captured"].as_u64().unwrap_or(0) >= 2
                });
            }
        }
        for a in &self.agents {
            if a.is_running() {
                a.sigterm();
            }
        }
        for a in &self.agents {
            assert!(
                a.wait_exit(WAIT).success(),
                "{}",
                tail(&a.stderr_text(), 4000)
            );
        }
        for a in &self.agents {
            let path = format!("/api/v1/devices/{}/ledger", a.device_id());
            let mut last = Value::Null;
            let complete = wait_until(WAIT, || {
                last = self.fleet().get(&path).json();
                last["streams"].as_array().is_some_and(|streams| {
                    streams.iter().any(|l| {
                        l["stream"] == RESULTS
                            && l["captured"].as_u64().unwrap_or(0) > 0
                            && l["received"] == l["captured"]
                            && l["pending_count"] == 0
                    })
                })
            });
            assert!(
                complete,
                "{}: the {RESULTS} ledger is not complete: {last}\n{}",
                a.device_id(),
                tail(&a.stderr_text(), 3000)
            );
            let l = last["streams"]
                .as_array()
                .and_then(|s| s.iter().find(|l| l["stream"] == RESULTS))
                .cloned()
                .unwrap_or_default();
            assert_eq!(l["missing_count"], 0, "{}: {l}", a.device_id());
            assert_eq!(l["lost_count"], 0, "{}: {l}", a.device_id());
        }
    }
}

fn tail(s: &str, n: usize) -> &str {
    let at = s.len().saturating_sub(n);
    let at = (at..s.len())
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(s.len());
    &s[at..]
}

pub(crate) fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .expect("token file");
    f.write_all(text.as_bytes()).expect("write token");
}

/// The committed int8 activity bundle re-signed (development key) as `v`.
pub(crate) fn version(v: &str) -> Vec<u8> {
    ember_testkit::bundles::with_version(BUNDLE, v)
}

const STANDARD_WAVES: [&str; 3] = ["canary", "50%", "100%"];

fn shadow(windows: u32) -> Value {
    json!({"windows": windows, "min_agreement": 0.9, "max_latency_ratio": 50.0})
}

fn devices(n: usize) -> Vec<String> {
    (0..n).map(device).collect()
}

/// A good model goes canary → 50% → everyone on ten agents; every device ends on 1.1.0, and
/// the inference ledger of every device shows every result stored across the switch.
#[test]
fn good_model_reaches_every_device_through_the_waves_with_no_result_lost() {
    let mut ota = Ota::start();
    let url = ota.fleet_url();
    ota.spawn_agents(10, &url, &[]);
    let all = devices(10);
    ota.wait_versions(&all, "1.0.0");
    ota.upload(&version("1.1.0"));
    let id = ota.create_rollout(json!({
        "model": MODEL, "version": "1.1.0", "targets": {"all": true},
        "waves": STANDARD_WAVES, "shadow": shadow(4),
    }));
    let r = ota.wait_rollout(&id, "completed");
    ota.wait_versions(&all, "1.1.0");
    // The canary went first: its assignment event precedes every other device's.
    let events = ota
        .fleet()
        .get_json(&format!("/api/v1/rollouts/{id}/events"));
    let text = events.to_string();
    assert!(text.contains("canary"), "{text}");
    assert_eq!(
        r["devices"].as_array().map(Vec::len),
        Some(10),
        "every device is a target: {r}"
    );
    assert_eq!(ota.devices_in(&r, &["active"]).len(), 10, "{r}");
    ota.stop_and_check_ledgers();
}

/// A model that fails its golden vectors fails on the canary: the rollout pauses itself and no
/// other device is ever told about the version; the canary keeps serving 1.0.0.
#[test]
fn model_failing_golden_vectors_stops_at_the_canary() {
    let mut ota = Ota::start();
    let url = ota.fleet_url();
    ota.spawn_agents(10, &url, &[]);
    let all = devices(10);
    ota.wait_versions(&all, "1.0.0");
    let broken = ember_testkit::bundles::variant(
        BUNDLE,
        |m| {
            m["version"] = json!("1.2.0");
            // Golden outputs nobody can reproduce: the weights are unchanged.
            let out = &mut m["golden"]["vectors"][0]["output"];
            if let Some(a) = out.as_array_mut() {
                for v in a.iter_mut() {
                    *v = json!(0.25);
                }
            }
        },
        |_| {},
    );
    ota.upload(&broken);
    let id = ota.create_rollout(json!({
        "model": MODEL, "version": "1.2.0", "targets": {"all": true},
        "waves": STANDARD_WAVES,
    }));
    let r = ota.wait_rollout(&id, "paused");
    let failed = ota.devices_in(&r, &["failed"]);
    assert_eq!(failed.len(), 1, "only the canary failed: {r}");
    assert!(failed[0].1.contains("golden"), "{failed:?}");
    for d in &all {
        let desired = ota
            .fleet()
            .get_json(&format!("/api/v1/devices/{d}/desired"));
        let told = desired.to_string().contains("1.2.0");
        assert_eq!(told, d == &failed[0].0, "{d}: {desired}");
    }
    ota.wait_versions(&all, "1.0.0");
    ota.stop_and_check_ledgers();
}

/// A model that passes its golden vectors but disagrees with the running one on live windows
/// (its labels are permuted) fails shadow evaluation on the canary; the rollout pauses.
#[test]
fn model_disagreeing_in_shadow_stops_at_the_canary() {
    let mut ota = Ota::start();
    let url = ota.fleet_url();
    ota.spawn_agents(10, &url, &[]);
    let all = devices(10);
    ota.wait_versions(&all, "1.0.0");
    let permuted = ember_testkit::bundles::variant(
        BUNDLE,
        |m| {
            m["version"] = json!("1.3.0");
            m["output"]["labels"] = json!(["Badminton", "Walking", "Running", "Standing"]);
        },
        |_| {},
    );
    ota.upload(&permuted);
    let id = ota.create_rollout(json!({
        "model": MODEL, "version": "1.3.0", "targets": {"all": true},
        "waves": STANDARD_WAVES, "shadow": shadow(6),
    }));
    let r = ota.wait_rollout(&id, "paused");
    let failed = ota.devices_in(&r, &["failed"]);
    assert_eq!(failed.len(), 1, "{r}");
    assert!(failed[0].1.contains("agreement"), "{failed:?}");
    assert_eq!(
        ota.devices_in(&r, &["pending"]).len(),
        9,
        "only the canary was assigned: {r}"
    );
    ota.wait_versions(&all, "1.0.0");
    ota.stop_and_check_ledgers();
}

/// An artifact changed in the fleet's blob store after upload is refused by every agent
/// (sha256 mismatch) and every agent reports it; nobody switches.
#[test]
fn tampered_artifact_is_refused_by_every_agent_and_reported() {
    let mut ota = Ota::start();
    let url = ota.fleet_url();
    ota.spawn_agents(10, &url, &[]);
    let all = devices(10);
    ota.wait_versions(&all, "1.0.0");
    let bundle = version("1.4.0");
    ota.upload(&bundle);
    let blob = ota
        .fleet_dir
        .path()
        .join("models")
        .join(MODEL)
        .join("1.4.0")
        .join(format!("{}.bundle", ember_bundle::hex::sha256(&bundle)));
    let mut bytes = std::fs::read(&blob).expect("the stored blob");
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(&blob, &bytes).expect("tamper");
    // One wave, never pausing: every device gets it.
    let id = ota.create_rollout(json!({
        "model": MODEL, "version": "1.4.0", "targets": {"all": true},
        "waves": ["100%"], "failure_threshold": 0.95,
    }));
    let mut last = Value::Null;
    let ok = wait_until(WAIT * 2, || {
        last = ota.rollout(&id);
        ota.devices_in(&last, &["failed"]).len() == 10
    });
    assert!(
        ok,
        "every device should report failed: {last}\n{}",
        ota.logs()
    );
    for (d, reason) in ota.devices_in(&last, &["failed"]) {
        assert!(
            reason.to_ascii_lowercase().contains("sha-256"),
            "{d}: {reason}"
        );
    }
    ota.wait_versions(&all, "1.0.0");
    ota.stop_and_check_ledgers();
}

/// A TCP proxy that forwards the fleet's responses slowly, so a download takes seconds, and
/// remembers each request's head.
struct SlowProxy {
    port: u16,
    heads: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl SlowProxy {
    fn start(upstream: u16, bytes_per_tick: usize) -> SlowProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (heads, stop) = (heads.clone(), stop.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let Ok(client) = conn else { continue };
                    let heads = heads.clone();
                    std::thread::spawn(move || proxy_one(client, upstream, bytes_per_tick, &heads));
                }
            });
        }
        SlowProxy { port, heads, stop }
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn proxy_one(mut client: TcpStream, upstream: u16, per_tick: usize, heads: &Mutex<Vec<String>>) {
    let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)) else {
        return;
    };
    // The agent sends one request per connection (no body on a GET).
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match client.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    heads
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(String::from_utf8_lossy(&head).to_string());
    if server.write_all(&head).is_err() {
        return;
    }
    let mut chunk = vec![0u8; per_tick];
    loop {
        match server.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if client.write_all(&chunk[..n]).is_err() {
                    return;
                }
                // Throttle: one chunk per tick.
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// An agent SIGKILLed in the middle of a download resumes it with a Range request after it
/// restarts, and completes the update.
#[test]
fn agent_killed_mid_download_resumes_and_completes() {
    let mut ota = Ota::start();
    let proxy = SlowProxy::start(ota.fleet().port, 512);
    let url = format!("http://127.0.0.1:{}", proxy.port);
    ota.spawn_agents(1, &url, &[]);
    let all = devices(1);
    ota.wait_versions(&all, "1.0.0");
    ota.upload(&version("1.5.0"));
    let id = ota.create_rollout(json!({
        "model": MODEL, "version": "1.5.0", "targets": {"all": true},
        "waves": ["100%"],
    }));
    let part = ota.agents[0]
        .data_dir()
        .join("models/staging")
        .join(format!("{MODEL}-1.5.0.part"));
    let ok = wait_until(WAIT, || {
        std::fs::metadata(&part).is_ok_and(|m| m.len() >= 4096)
    });
    assert!(
        ok,
        "no partial download at {}\n{}",
        part.display(),
        ota.logs()
    );
    ota.agents[0].sigkill();
    let kept = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    assert!(kept > 0, "the partial file survives the kill");
    ota.agents[0].restart();
    ota.wait_rollout(&id, "completed");
    ota.wait_versions(&all, "1.5.0");
    let heads = proxy.heads();
    assert!(
        heads
            .iter()
            .any(|h| h.to_ascii_lowercase().contains("range: bytes=")),
        "the restarted agent resumed with a Range request: {heads:?}"
    );
    ota.stop_and_check_ledgers();
}

/// The fleet stopped and started again mid-rollout (canary done, soak running) carries on from
/// its database and completes the rollout.
#[test]
fn fleet_restarted_mid_rollout_carries_on() {
    let mut ota = Ota::start();
    let url = ota.fleet_url();
    ota.spawn_agents(4, &url, &[]);
    let all = devices(4);
    ota.wait_versions(&all, "1.0.0");
    ota.upload(&version("1.6.0"));
    let id = ota.create_rollout(json!({
        "model": MODEL, "version": "1.6.0", "targets": {"all": true},
        "waves": STANDARD_WAVES, "min_soak_s": 3,
    }));
    // Wait for the canary to be active, then restart the fleet during its soak.
    let mut last = Value::Null;
    let ok = wait_until(WAIT, || {
        last = ota.rollout(&id);
        !ota.devices_in(&last, &["active"]).is_empty()
    });
    assert!(ok, "the canary never became active: {last}\n{}", ota.logs());
    // Same port: the agents' `ota.fleet_url` stays right.
    ota.restart_fleet();
    ota.wait_rollout(&id, "completed");
    ota.wait_versions(&all, "1.6.0");
    ota.stop_and_check_ledgers();
}

/// A device that is offline while the rollout runs gets its assignment (retained desired
/// state) when it comes back, and the rollout completes then.
#[test]
fn offline_device_catches_up_when_it_returns() {
    let mut ota = Ota::start();
    let url = ota.fleet_url();
    ota.spawn_agents(3, &url, &[]);
    let all = devices(3);
    ota.wait_versions(&all, "1.0.0");
    let away = &ota.agents[2];
    away.sigterm();
    assert!(away.wait_exit(WAIT).success());
    ota.upload(&version("1.7.0"));
    let id = ota.create_rollout(json!({
        "model": MODEL, "version": "1.7.0", "targets": {"all": true},
        "waves": ["1", "100%"],
    }));
    ota.wait_versions(&all[..2], "1.7.0");
    let r = ota.rollout(&id);
    assert_eq!(r["state"], "running", "waiting for the offline device: {r}");
    ota.agents[2].restart();
    ota.wait_rollout(&id, "completed");
    ota.wait_versions(&all, "1.7.0");
    ota.stop_and_check_ledgers();
}

/// A version that crashes the agent after the switch (the test-only fault hook) makes the
/// agent crash-loop; after N restarts within T it goes back to 1.0.0 by itself, reports
/// `rolled_back`, and the rollout pauses during the canary's soak time, before the other
/// device is touched.
#[test]
fn crash_looping_model_is_rolled_back_by_the_agent() {
    let mut ota = Ota::start();
    let url = ota.fleet_url();
    ota.spawn_agents(
        2,
        &url,
        &[("EMBER_AGENT_FAULT_CRASH_AFTER_SWITCH", "activity@1.8.0")],
    );
    let all = devices(2);
    ota.wait_versions(&all, "1.0.0");
    ota.upload(&version("1.8.0"));
    let id = ota.create_rollout(json!({
        "model": MODEL, "version": "1.8.0", "targets": {"all": true},
        "waves": STANDARD_WAVES, "min_soak_s": 60,
    }));
    // A supervisor (systemd's Restart=always): restart the canary whenever it dies.
    let mut last = Value::Null;
    let mut restarts = 0;
    let ok = wait_until(WAIT * 2, || {
        for a in &ota.agents {
            if !a.is_running() {
                restarts += 1;
                a.restart();
            }
        }
        last = ota.rollout(&id);
        last["state"] == "paused"
    });
    assert!(ok, "the rollout did not pause: {last}\n{}", ota.logs());
    assert!(
        restarts >= 3,
        "the canary crashed and was restarted ({restarts})"
    );
    assert_eq!(ota.devices_in(&last, &["rolled_back"]).len(), 1, "{last}");
    assert_eq!(
        ota.devices_in(&last, &["pending"]).len(),
        1,
        "the second device was never assigned: {last}"
    );
    ota.wait_versions(&all, "1.0.0");
    // Once rolled back it stays up.
    for a in &ota.agents {
        assert!(a.is_running(), "{}", tail(&a.stderr_text(), 4000));
    }
}

/// The BasicMotions TRAIN series (channel-major windows) and their labels: what the agents of
/// the retraining test replay, so the fixed hold-out (TEST) stays unseen.
fn train_series() -> Vec<(Vec<f32>, String)> {
    let text = std::fs::read_to_string(repo().join("models/data/BasicMotions_TRAIN.ts"))
        .expect("read BasicMotions TRAIN");
    let ts = ember_ts::parse_ts(&text).expect("parse");
    ts.series
        .iter()
        .map(|s| {
            (
                s.channels.iter().flatten().copied().collect(),
                s.label.clone().expect("labelled"),
            )
        })
        .collect()
}

/// Runs `ember-models pipeline` against this fleet; its exit status, stderr and wall time.
fn pipeline(ota: &Ota, lake: &Path, out: &Path, extra: &[&str]) -> (Option<i32>, String, f64) {
    let token = ota.fleet_dir.path().join("admin.token");
    write_private(&token, ADMIN);
    let started = std::time::Instant::now();
    let o = std::process::Command::new(crate::support::models_bin())
        .arg("pipeline")
        .arg("--lake")
        .arg(lake)
        .arg("--production")
        .arg(bundle_path())
        .arg("--key")
        .arg(repo().join("models/keys/dev/dev.key"))
        .arg("--out")
        .arg(out)
        .args(["--rollout", "--url", &ota.fleet_url(), "--token-file"])
        .arg(&token)
        .args([
            "--waves",
            "canary,100%",
            "--shadow-windows",
            "10",
            "--quiet",
        ])
        .args(extra)
        .env_remove("EMBER_FLEET_URL")
        .env_remove("EMBER_FLEET_TOKEN")
        .output()
        .expect("run ember-models pipeline");
    (
        o.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        started.elapsed().as_secs_f64(),
    )
}

/// The MLOps loop: three agents capture every window of BasicMotions TRAIN replays (the field;
/// TEST stays the unseen fixed hold-out); the operator labels the captures through
/// the REST API (each window that lies inside one recorded series gets that series' activity);
/// the lake exports windows and labels; `ember-models pipeline` retrains from them. A
/// deliberately worse candidate (one epoch of training) is refused by the gate: no bundle, no
/// upload, no rollout. The real run is accepted, uploaded with its lineage, and rolled out with
/// shadow evaluation until every device serves it.
#[test]
fn labelled_captures_retrain_a_gated_version_that_rolls_out_and_a_worse_one_is_refused() {
    let mut ota = Ota::start_with(|dir| {
        (
            format!(
                "[lake]\nstore = \"{}\"\ninterval_s = 1\n",
                dir.join("lake").display()
            ),
            Some("sample = 1.0\nmax_per_minute = 6000".into()),
        )
    });
    ota.recording = "models/data/BasicMotions_TRAIN.ts";
    let lake = ota.fleet_dir.path().join("lake");
    let url = ota.fleet_url();
    ota.spawn_agents(3, &url, &[]);
    let all = devices(3);
    ota.wait_versions(&all, "1.0.0");

    // Captures accumulate; label those inside one series with its activity.
    let series = train_series();
    let mut labels: Vec<Value> = Vec::new();
    let ok = wait_until(WAIT * 2, || {
        let page = ota
            .fleet()
            .get_json("/api/v1/captures?limit=500&labelled=false");
        for c in page["items"].as_array().cloned().unwrap_or_default() {
            let window: Vec<f32> = c["window"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|v| v.as_f64().unwrap_or(f64::NAN) as f32)
                        .collect()
                })
                .unwrap_or_default();
            if let Some((_, label)) = series.iter().find(|(s, _)| *s == window) {
                labels.push(json!({"device": c["device"], "stream": c["stream"],
                    "seq": c["seq"], "label": label}));
            }
        }
        if !labels.is_empty() {
            let r = ota.fleet().request(
                "POST",
                "/api/v1/captures/labels",
                Some(ADMIN),
                Some(&json!({ "labels": labels })),
            );
            assert_eq!(r.status, 200, "{}", r.body);
        }
        let labelled = ota
            .fleet()
            .get_json("/api/v1/captures?limit=500&labelled=true");
        labels.clear();
        labelled["items"].as_array().map_or(0, Vec::len) >= 40
    });
    assert!(ok, "fewer than 40 labelled captures");
    let labelled = ota
        .fleet()
        .get_json("/api/v1/captures?limit=500&labelled=true")["items"]
        .as_array()
        .map_or(0, Vec::len);
    // The lake has every labelling before the pipeline reads it.
    let ok = wait_until(WAIT, || {
        crate::lake::duckdb(&lake)["labels"]
            .as_array()
            .map_or(0, Vec::len)
            >= labelled
    });
    assert!(ok, "the lake did not export the labels");

    // A deliberately worse candidate: one epoch of training. Refused, nothing uploaded.
    let worse = tempfile::tempdir().expect("temp dir");
    let (code, log, _) = pipeline(&ota, &lake, worse.path(), &["--max-epochs", "1"]);
    assert_eq!(code, Some(3), "the worse candidate was not refused:\n{log}");
    let report = std::fs::read_to_string(worse.path().join("report.md")).expect("report");
    assert!(report.contains("**Refused**"), "{report}");
    println!(
        "worse candidate refused: {}",
        report
            .lines()
            .filter(|l| l.starts_with("| ") || l.starts_with("- "))
            .collect::<Vec<_>>()
            .join(" ")
    );
    assert!(
        !std::fs::read_dir(worse.path())
            .expect("out dir")
            .flatten()
            .any(|e| e.path().extension().is_some_and(|x| x == "bundle")),
        "a refused candidate left a bundle"
    );
    assert_eq!(
        ota.fleet().get("/api/v1/models/activity/1.0.1").status,
        404,
        "a refused candidate was uploaded"
    );

    // The real run: accepted, uploaded with lineage, rolled out with shadow evaluation.
    let good = tempfile::tempdir().expect("temp dir");
    let (code, log, wall) = pipeline(&ota, &lake, good.path(), &[]);
    assert_eq!(code, Some(0), "the pipeline failed:\n{log}");
    let id = log
        .lines()
        .find_map(|l| l.strip_prefix("rollout "))
        .expect("the pipeline printed its rollout")
        .trim()
        .to_string();
    let report = std::fs::read_to_string(good.path().join("report.md")).expect("report");
    assert!(report.contains("**Accepted**"), "{report}");
    let m = ota.fleet().get_json("/api/v1/models/activity/1.0.1");
    let lineage = &m["manifest"]["lineage"];
    assert_eq!(lineage["parent"], "1.0.0", "{m}");
    assert!(
        lineage["datasets"][1]["records"].as_u64().unwrap_or(0) > 0,
        "{lineage}"
    );
    assert!(
        lineage["lake_snapshot"]
            .as_str()
            .is_some_and(|s| s.contains("sha256")),
        "{lineage}"
    );
    assert!(
        m["manifest"]["baseline"].is_object(),
        "the new version has no baseline"
    );
    let r = ota.wait_rollout(&id, "completed");
    assert_eq!(ota.devices_in(&r, &["active"]).len(), 3, "{r}");
    ota.wait_versions(&all, "1.0.1");
    println!(
        "pipeline: {labelled} labelled captures, accepted 1.0.1 in {wall:.1} s; {}",
        report
            .lines()
            .filter(|l| l.starts_with("| "))
            .collect::<Vec<_>>()
            .join(" ")
    );
    ota.stop_and_check_ledgers();
}
