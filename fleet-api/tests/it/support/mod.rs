//! Harness for the fleet's system tests: a store (SQLite file or throwaway Postgres), the
//! fleet service in-process on a free port, a tiny HTTP client, a one-shot MQTT publisher and
//! the real `ember-agent` binary.

pub mod eventhubs;
pub mod http;
pub mod mqtt;
pub mod proxy;
pub mod replicas;
pub mod twin;

use std::path::{Path, PathBuf};
use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use ember_fleet::config::Settings;
use ember_testkit::{TestPostgres, wait_until};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

pub use http::Resp;

/// The bootstrap admin token every test fleet starts with.
pub const ADMIN: &str = "test-admin-token-0123456789abcdef";
/// Generous: the machine running the tests may be busy.
pub const WAIT: Duration = Duration::from_secs(60);

/// Which database a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sqlite,
    Postgres,
}

/// A database for one test; deleted (or stopped) when dropped.
pub enum Store {
    Sqlite(tempfile::TempDir),
    Postgres(TestPostgres),
}

impl Store {
    pub fn new(kind: Kind) -> Store {
        match kind {
            Kind::Sqlite => Store::Sqlite(
                tempfile::Builder::new()
                    .prefix("ember-fleet-it-")
                    .tempdir()
                    .expect("cannot create a temp dir"),
            ),
            Kind::Postgres => Store::Postgres(TestPostgres::start()),
        }
    }

    pub fn url(&self) -> String {
        match self {
            Store::Sqlite(dir) => format!("sqlite://{}", dir.path().join("fleet.db").display()),
            Store::Postgres(pg) => pg.url(),
        }
    }
}

/// Test logs go to the test's captured output; `EMBER_FLEET_TEST_LOG=debug` for more.
fn init_logging() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let filter = std::env::var("EMBER_FLEET_TEST_LOG").unwrap_or_else(|_| "warn".into());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .with_ansi(false)
            .try_init();
    });
}

/// The fleet service running in this process, on its own runtime thread.
pub struct TestFleet {
    pub port: u16,
    pub db_url: String,
    shutdown: CancellationToken,
    force: CancellationToken,
    thread: Option<JoinHandle<Result<(), ember_fleet::FleetError>>>,
}

static NEXT_CLIENT: AtomicU64 = AtomicU64::new(1);

/// The data dir of test fleets whose config names none: in the temp dir, one per database URL.
pub fn default_data_dir(db_url: &str) -> PathBuf {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in db_url.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    std::env::temp_dir()
        .join("ember-fleet-it-data")
        .join(format!("{h:016x}"))
}

/// A unique MQTT client id for a fleet replica.
pub fn client_id() -> String {
    format!(
        "fleet-it-{}-{}",
        std::process::id(),
        NEXT_CLIENT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The config a test fleet runs with; `extra` is appended, so it starts with a table header
/// (`"[ingest]\nmax_payload_bytes = 4096"`).
pub fn config(db_url: &str, broker_port: u16, client_id: &str, extra: &str) -> String {
    format!(
        "bootstrap_token = \"{ADMIN}\"\n\
         [log]\nlevel = \"warn\"\n\
         [database]\nurl = \"{db_url}\"\nmax_connections = 4\n\
         [mqtt]\nhost = \"127.0.0.1\"\nport = {broker_port}\nclient_id = \"{client_id}\"\n\
         keep_alive_s = 5\nreconnect_min_ms = 50\nreconnect_max_ms = 500\n\
         {extra}\n"
    )
}

impl TestFleet {
    /// Starts a fleet on `store` against the broker and waits until it is healthy (database
    /// up, subscriptions confirmed).
    pub fn start(store: &Store, broker_port: u16) -> TestFleet {
        Self::start_with(store, broker_port, &client_id(), "")
    }

    /// Like [`TestFleet::start`] with a given client id and extra config (TOML tables such as
    /// `"[ingest]\nmax_payload_bytes = 4096"`).
    pub fn start_with(store: &Store, broker_port: u16, client_id: &str, extra: &str) -> TestFleet {
        let text = config(&store.url(), broker_port, client_id, extra);
        let fleet = Self::spawn(&text);
        fleet.wait_healthy();
        fleet
    }

    /// A fleet on `store` with its data (the model registry's blobs) in `data_dir`, trusting
    /// the development key, so committed and re-signed bundles can be uploaded; healthy when
    /// this returns.
    pub fn with_dev_registry(store: &Store, broker_port: u16, data_dir: &Path) -> TestFleet {
        let extra = format!(
            "[models]\ntrusted_keys = [\"{}\"]",
            ember_testkit::bundles::dev_public_key_path().display()
        );
        let fleet = Self::spawn(&format!(
            "data_dir = \"{}\"\n{}",
            data_dir.display(),
            config(&store.url(), broker_port, &client_id(), &extra)
        ));
        fleet.wait_healthy();
        fleet
    }

    /// Starts a fleet from a full config text, without waiting.
    pub fn spawn(text: &str) -> TestFleet {
        Self::spawn_on(text, 0)
    }

    /// [`TestFleet::spawn`] on a given port (0: any free one), e.g. to restart a fleet where
    /// its clients expect it.
    pub fn spawn_on(text: &str, port: u16) -> TestFleet {
        let settings = Settings::from_toml(text, "test", Vec::new())
            .unwrap_or_else(|e| panic!("test config is invalid: {e}\n{text}"));
        Self::spawn_settings(settings, port)
    }

    /// Starts a fleet from resolved settings (for what a config file cannot say, such as
    /// `models.store_options`), without waiting.
    pub fn spawn_settings(mut settings: Settings, port: u16) -> TestFleet {
        init_logging();
        if settings.data_dir == std::path::Path::new(ember_fleet::config::DEFAULT_DATA_DIR) {
            // Not under the source tree; one directory per database, so the replicas of one
            // test share their `fs` model store like replicas on one shared volume.
            settings.data_dir = default_data_dir(&settings.database.url);
        }
        let listener = std::net::TcpListener::bind(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("cannot bind 127.0.0.1:{port}: {e}"));
        let port = listener.local_addr().expect("bound").port();
        listener
            .set_nonblocking(true)
            .expect("cannot make the listener non-blocking");
        let shutdown = CancellationToken::new();
        let force = CancellationToken::new();
        let db_url = settings.database.url.clone();
        let thread = {
            let (shutdown, force) = (shutdown.clone(), force.clone());
            std::thread::Builder::new()
                .name(format!("fleet-{port}"))
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .enable_all()
                        .build()
                        .expect("cannot build a runtime");
                    rt.block_on(async move {
                        let listener = tokio::net::TcpListener::from_std(listener)
                            .expect("cannot adopt the listener");
                        ember_fleet::run(settings, listener, shutdown, force).await
                    })
                })
                .expect("cannot spawn the fleet thread")
        };
        TestFleet {
            port,
            db_url,
            shutdown,
            force,
            thread: Some(thread),
        }
    }

    /// Waits until `/api/v1/health` answers 200.
    pub fn wait_healthy(&self) {
        let mut last = String::new();
        let ok = wait_until(WAIT, || {
            if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
                return true;
            }
            match http::try_request(self.port, "GET", "/api/v1/health", None, None) {
                Ok(r) => {
                    last = r.body.clone();
                    r.status == 200
                }
                Err(e) => {
                    last = e.to_string();
                    false
                }
            }
        });
        assert!(
            !self.thread.as_ref().is_some_and(|t| t.is_finished()),
            "the fleet stopped while starting (see the test log)"
        );
        assert!(
            ok,
            "the fleet did not become healthy within {WAIT:?}: {last}"
        );
    }

    /// Graceful stop (the SIGTERM path): drains ingestion; returns the service's result.
    pub fn stop(mut self) -> Result<(), ember_fleet::FleetError> {
        self.shutdown.cancel();
        match self.thread.take() {
            Some(t) => t.join().expect("the fleet thread panicked"),
            None => Ok(()),
        }
    }

    /// A request with the admin token.
    pub fn get(&self, path: &str) -> Resp {
        http::request(self.port, "GET", path, Some(ADMIN), None)
    }

    /// GET with the admin token, expecting 200 and JSON.
    pub fn get_json(&self, path: &str) -> Value {
        let r = self.get(path);
        assert_eq!(r.status, 200, "GET {path}: {}", r.body);
        r.json()
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Resp {
        let body = body.map(|b| b.to_string());
        http::request(self.port, method, path, token, body.as_deref())
    }

    /// The ledger of one stream (None until the stream exists).
    pub fn stream_ledger(&self, device: &str, stream: &str) -> Option<Value> {
        stream_ledger(self.port, device, stream)
    }

    /// Polls the ledger of a stream until `pred` holds; panics with the last ledger seen.
    pub fn wait_ledger(&self, device: &str, stream: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let mut last = None;
        let ok = wait_until(WAIT, || {
            last = self.stream_ledger(device, stream);
            last.as_ref().is_some_and(&pred)
        });
        assert!(
            ok,
            "the ledger of {device}/{stream} did not reach the expected state within {WAIT:?}; last: {}",
            last.map(|v| serde_json::to_string_pretty(&v).unwrap_or_default())
                .unwrap_or_else(|| "none".into())
        );
        last.unwrap_or(Value::Null)
    }

    /// Every record of a stream, paging through the telemetry API with `page` records a page.
    pub fn all_records(&self, device: &str, stream: &str, page: u32) -> Vec<Value> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut path =
                format!("/api/v1/devices/{device}/streams/{stream}/telemetry?limit={page}");
            if let Some(c) = &cursor {
                path.push_str(&format!("&cursor={c}"));
            }
            let v = self.get_json(&path);
            out.extend(v["items"].as_array().cloned().unwrap_or_default());
            match v["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => return out,
            }
        }
    }

    /// The fleet's `/metrics`, as `name{labels}` -> value (names without `ember_fleet_`).
    pub fn metrics(&self) -> std::collections::BTreeMap<String, f64> {
        let r = http::request(self.port, "GET", "/metrics", None, None);
        assert_eq!(r.status, 200);
        r.body
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((
                    k.strip_prefix("ember_fleet_").unwrap_or(k).to_string(),
                    v.parse().ok()?,
                ))
            })
            .collect()
    }
}

impl Drop for TestFleet {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.shutdown.cancel();
            self.force.cancel();
            let _ = t.join();
        }
    }
}

/// The ledger of one stream from the fleet API on `port` (None until the stream exists, or
/// while the fleet does not answer).
pub fn stream_ledger(port: u16, device: &str, stream: &str) -> Option<Value> {
    let r = http::try_request(
        port,
        "GET",
        &format!("/api/v1/devices/{device}/ledger"),
        Some(ADMIN),
        None,
    )
    .ok()?;
    if r.status != 200 {
        return None;
    }
    r.json()["streams"]
        .as_array()?
        .iter()
        .find(|s| s["stream"] == stream)
        .cloned()
}

/// A clean ledger: everything captured was received, nothing missing or lost, nothing queued.
pub fn complete(l: &Value) -> bool {
    let captured = l["captured"].as_u64().unwrap_or(0);
    captured > 0
        && l["received"] == captured
        && l["missing_count"] == 0
        && l["lost_count"] == 0
        && l["queued"] == 0
}

/// The `ember-agent` binary of this build (`target/<profile>/ember-agent`, next to this test
/// binary's `deps/` directory).
pub fn agent_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("cannot locate the test binary");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test binary lives in target/<profile>/deps");
    let bin = profile_dir.join("ember-agent");
    assert!(
        bin.is_file(),
        "{} does not exist: run `cargo build -p ember-agent` first (scripts/test.sh builds the workspace before testing)",
        bin.display()
    );
    bin
}

/// The `ember-models` binary of this build (next to `ember-agent`; the models crate's own tests
/// build it).
pub fn models_bin() -> PathBuf {
    let bin = agent_bin().with_file_name("ember-models");
    assert!(
        bin.is_file(),
        "{} does not exist: run `cargo build -p ember-models` first (scripts/test.sh builds the workspace before testing)",
        bin.display()
    );
    bin
}

/// The `ember-fleet` binary built for these tests.
pub fn fleet_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ember-fleet"))
}

/// Microseconds since the epoch, now.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Generates `mod sqlite` and `mod postgres`, each with a `#[test]` per listed function
/// (`fn name(kind: Kind)`), so every storage test runs on both engines.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[test] fn $name() { super::$name($crate::support::Kind::Sqlite) } )*
        }
        mod postgres {
            $( #[test] fn $name() { super::$name($crate::support::Kind::Postgres) } )*
        }
    };
}
