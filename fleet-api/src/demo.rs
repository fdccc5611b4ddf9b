//! `ember-fleet demo`: the whole system on one machine, with nothing installed but Rust.
//!
//! Lifecycle, in order:
//! 1. an embedded MQTT broker (rumqttd, plain TCP on a free 127.0.0.1 port, in its own
//!    threads) starts;
//! 2. the fleet service ([`crate::run`]) starts on it with SQLite in `<data_dir>/fleet.db`
//!    and serves the API and dashboard on `listen`;
//! 3. `agents` real agent processes start (this executable run as `ember-fleet agent ARGS`,
//!    which is `ember-agent ARGS`: [`agent_args`]; or the binary `--agent-bin` names), each
//!    replaying the BasicMotions test
//!    recordings (its own rotation of the 40 series) through the committed, signed int8
//!    `activity` and `anomaly` bundles, written with their trusted development key into
//!    `<data_dir>/assets` from copies embedded in this binary;
//! 4. the demo registers its signed bundles in the fleet's model registry through the REST API
//!    (`activity` 1.0.0 and `anomaly` 1.0.0, what the agents start with, and `activity` 1.1.0:
//!    the same training run's full-precision weights, re-signed with the development key);
//! 5. once every agent reports itself online, the dashboard URL is printed;
//! 6. unless `--no-rollout`, [`ROLLOUT_DELAY`] later the demo starts a staged rollout of
//!    `activity` 1.1.0 to every agent with shadow evaluation (canary → 50 % → 100 %, a short
//!    soak per wave) and prints how to pause, resume or roll it back with `ember-fleet rollout`
//!    (the admin token is in `<data_dir>/admin.token`); a restarted demo whose fleet already
//!    has a rollout of that model starts none;
//! 7. SIGINT/SIGTERM stops the agents (SIGTERM, so they drain), then the fleet; the broker
//!    goes with the process.
//!
//! The agents start with an empty environment (and only `PATH`), so unrelated `EMBER_*`
//! variables of the user's shell never reach their configuration overlay.
//!
//! The demo's state lives in `data_dir` and survives a restart (agents keep their queues, the
//! fleet its database), so stopping and starting it again shows the durability ledger at work.
//!
//! **Not for production:** the broker has no TLS and no authentication, and binds only to
//! 127.0.0.1.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::db::Db;

/// The committed demo assets, embedded so the demo needs no checkout at run time.
const ACTIVITY_BUNDLE: &[u8] = include_bytes!("../../models/bundles/activity-int8.bundle");
const ANOMALY_BUNDLE: &[u8] = include_bytes!("../../models/bundles/anomaly-int8.bundle");
const DEV_PUBLIC_KEY: &[u8] = include_bytes!("../../models/keys/dev/dev.pub");
const BASIC_MOTIONS_TEST: &str = include_str!("../../models/data/BasicMotions_TEST.ts");
/// The source of the demo's second `activity` version: full-precision weights.
const ACTIVITY_F32_BUNDLE: &[u8] = include_bytes!("../../models/bundles/activity-f32.bundle");
/// The development signing key, committed on purpose (`models/keys/dev/README.md`): it signs
/// the demo's 1.1.0 at run time. Never trusted outside demos and tests.
const DEV_SIGNING_KEY: &str = include_str!("../../models/keys/dev/dev.key");

/// The model the demo rolls out, from the version the agents start with to the new one.
pub const ROLLOUT_MODEL: &str = "activity";
pub const ROLLOUT_FROM: &str = "1.0.0";
pub const ROLLOUT_TO: &str = "1.1.0";
/// How long after every agent is online the demo starts its rollout.
pub const ROLLOUT_DELAY: Duration = Duration::from_secs(10);
/// Each wave's soak before the next starts.
const ROLLOUT_SOAK_S: u64 = 10;
/// Windows each device evaluates 1.1.0 on, beside 1.0.0, before switching.
const SHADOW_WINDOWS: u32 = 5;

/// How long the agents may take to come online before the demo gives up.
const ONLINE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long agents get to drain after SIGTERM before they are killed.
const AGENT_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// What `ember-fleet demo` was asked for.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Number of agent processes.
    pub agents: usize,
    /// Where the API and dashboard listen.
    pub listen: SocketAddr,
    /// The demo's state: database, agent queues, generated configs and assets.
    pub data_dir: PathBuf,
    /// An `ember-agent` binary to run the agents with; `None` runs this executable as
    /// `ember-fleet agent` (the agent the demo build embeds).
    pub agent_bin: Option<PathBuf>,
    /// Replay speed: 1.0 is the recordings' real 10 Hz; the default 5.0 shows a new window
    /// every two seconds per agent.
    pub speed: f64,
    /// Start the staged rollout of `activity` 1.1.0 once the agents are online.
    pub rollout: bool,
}

/// What the demo tells its caller, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DemoEvent {
    /// Every agent is online: the dashboard URL (with a read token in its fragment).
    Ready { url: String },
    /// The rollout started (`id`), or one of the model already existed.
    Rollout {
        id: String,
        started: bool,
        /// The fleet's base URL and the admin token file, for `ember-fleet rollout`.
        fleet_url: String,
        token_file: PathBuf,
    },
}

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot prepare the demo directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the embedded MQTT broker did not start: {0}")]
    Broker(String),
    #[error("no ember-agent binary at {0} (--agent-bin)")]
    AgentMissing(PathBuf),
    #[error("cannot find this executable to run the agents with: {0}")]
    CurrentExe(std::io::Error),
    #[error("cannot start agent {device}: {source}")]
    AgentSpawn {
        device: String,
        source: std::io::Error,
    },
    #[error("agent {device} exited during start-up ({status}); its log is {log}")]
    AgentExited {
        device: String,
        status: String,
        log: PathBuf,
    },
    #[error(
        "only {online} of {wanted} agents came online within {timeout:?}; their logs are in {dir}"
    )]
    NotOnline {
        online: usize,
        wanted: usize,
        timeout: Duration,
        dir: PathBuf,
    },
    #[error("invalid demo fleet configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Fleet(#[from] crate::FleetError),
    #[error("options: {0}")]
    Options(String),
    #[error("the demo could not {what} through the fleet's API: {message}")]
    Api { what: String, message: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DemoError + '_ {
    move |source| DemoError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Runs the demo until `shutdown` fires. `on_event` hears when every agent is online (the
/// dashboard URL) and when the rollout starts.
pub async fn run(
    opts: DemoOptions,
    shutdown: CancellationToken,
    force: CancellationToken,
    on_event: impl Fn(DemoEvent) + Send + Sync + 'static,
) -> Result<(), DemoError> {
    if opts.agents == 0 || opts.agents > 100 {
        return Err(DemoError::Options(format!(
            "--agents must be between 1 and 100, not {}",
            opts.agents
        )));
    }
    if !(opts.speed.is_finite() && opts.speed > 0.0 && opts.speed <= 100.0) {
        return Err(DemoError::Options(format!(
            "--speed must be more than 0 and at most 100, not {}",
            opts.speed
        )));
    }
    let agent_bin = match &opts.agent_bin {
        Some(p) if p.is_file() => AgentProgram::External(p.clone()),
        Some(p) => return Err(DemoError::AgentMissing(p.clone())),
        None => AgentProgram::Embedded(std::env::current_exe().map_err(DemoError::CurrentExe)?),
    };

    let data_dir = &opts.data_dir;
    std::fs::create_dir_all(data_dir).map_err(io(data_dir))?;
    let data_dir = data_dir.canonicalize().map_err(io(data_dir))?;
    let assets = write_assets(&data_dir)?;

    let (broker_port, v5_port) = start_broker().await?;
    tracing::info!(
        port = broker_port,
        mqtt5_port = v5_port,
        "Embedded MQTT broker (rumqttd) is up on 127.0.0.1."
    );

    let settings = fleet_settings(&data_dir, opts.listen, broker_port, v5_port, &assets.key)?;
    let listener = crate::bind(&settings).await?;
    let http = listener.local_addr().map_err(crate::FleetError::Serve)?;
    // The agents, the demo's own requests and the printed URL reach the fleet on loopback
    // when it listens on every address (agents send tokens over plain HTTP only to loopback).
    let reach = match http.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::from(([127, 0, 0, 1], http.port()))
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, http.port()))
        }
        _ => http,
    };
    let fleet_url = format!("http://{reach}");
    let db_settings = settings.database.clone();
    let fleet_shutdown = CancellationToken::new();
    let fleet = tokio::spawn(crate::run(
        settings,
        listener,
        fleet_shutdown.clone(),
        force.clone(),
    ));

    let on_event = std::sync::Arc::new(on_event);
    let mut agents = Agents::default();
    let mut rollout_task = None;
    let started = async {
        let db = wait_schema(&db_settings, &shutdown).await?;
        let tokens = Tokens::prepare(&db, &data_dir, opts.agents).await;
        db.close().await;
        let tokens = tokens?;
        let admin = tokens.admin.clone();
        let url = fleet_url.clone();
        blocking(move || register_bundles(&url, &admin)).await?;
        for i in 0..opts.agents {
            let run = AgentRun {
                broker_port,
                speed: opts.speed,
                fleet_url: &fleet_url,
                token_file: &tokens.devices[i],
            };
            agents.spawn(&agent_bin, &data_dir, &assets, i, &run)?;
        }
        wait_online(&db_settings, &mut agents, &data_dir, &shutdown).await?;
        Ok::<_, DemoError>(tokens)
    };
    let outcome = started.await;
    if let (Ok(tokens), false) = (&outcome, shutdown.is_cancelled()) {
        // The token rides in the URL's fragment, which browsers never send to the server.
        let url = format!("{fleet_url}/dashboard/#token={}", tokens.read);
        on_event(DemoEvent::Ready { url });
        if opts.rollout {
            let (url, admin, file) = (
                fleet_url.clone(),
                tokens.admin.clone(),
                tokens.admin_file.clone(),
            );
            let devices: Vec<String> = (0..opts.agents).map(device_id).collect();
            let (on_event, stop) = (on_event.clone(), shutdown.clone());
            rollout_task = Some(tokio::spawn(async move {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(ROLLOUT_DELAY) => {}
                }
                let fleet_url = url.clone();
                match blocking(move || start_rollout(&url, &admin, &devices)).await {
                    Ok((id, started)) => on_event(DemoEvent::Rollout {
                        id,
                        started,
                        fleet_url,
                        token_file: file,
                    }),
                    Err(e) => tracing::warn!(error = %e, "The demo's rollout did not start."),
                }
            }));
        }
        shutdown.cancelled().await;
    }
    if let Some(t) = rollout_task {
        t.abort();
    }
    tracing::info!("Stopping the demo: agents first (they drain their queues), then the fleet.");
    agents.stop_all().await;
    fleet_shutdown.cancel();
    match fleet.await {
        Ok(r) => r?,
        Err(e) => return Err(crate::FleetError::Task(e.to_string()).into()),
    }
    outcome.map(|_| ())
}

/// Runs blocking HTTP calls (the CLI's client) off the runtime's worker threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, DemoError> + Send + 'static,
) -> Result<T, DemoError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| DemoError::Api {
            what: "run a request".into(),
            message: e.to_string(),
        })?
}

/// Waits until the fleet has created its schema (it migrates as it starts).
async fn wait_schema(
    db_settings: &crate::config::DatabaseSettings,
    shutdown: &CancellationToken,
) -> Result<Db, DemoError> {
    let db = Db::connect(db_settings).await?;
    let deadline = Instant::now() + ONLINE_TIMEOUT;
    loop {
        let ready: Result<(i64,), sqlx::Error> = sqlx::query_as("SELECT COUNT(*) FROM api_tokens")
            .fetch_one(db.pool())
            .await;
        if ready.is_ok() || shutdown.is_cancelled() {
            return Ok(db);
        }
        if Instant::now() >= deadline {
            db.close().await;
            return Err(DemoError::Options(format!(
                "the fleet did not create its database schema within {ONLINE_TIMEOUT:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The demo's API tokens, each kept in a file of its own (mode 0600) under `data_dir` and
/// reused by the next run while the fleet's database still accepts it.
struct Tokens {
    /// Read-only: the dashboard URL's.
    read: String,
    /// Admin: registers bundles, starts the rollout; `ember-fleet rollout` uses its file.
    admin: String,
    admin_file: PathBuf,
    /// One `device:<id>` token file per agent: OTA downloads.
    devices: Vec<PathBuf>,
}

impl Tokens {
    async fn prepare(db: &Db, data_dir: &Path, agents: usize) -> Result<Tokens, DemoError> {
        use crate::auth::Scope;
        let read = token_file(
            db,
            &data_dir.join("read.token"),
            Scope::Read,
            "demo dashboard",
        )
        .await?;
        let admin_file = data_dir.join("admin.token");
        let admin = token_file(db, &admin_file, Scope::Admin, "demo admin").await?;
        let mut devices = Vec::with_capacity(agents);
        for i in 0..agents {
            let device = device_id(i);
            let dir = data_dir.join("agents").join(&device);
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
            let path = dir.join("device.token");
            let name = format!("demo agent {device}");
            token_file(db, &path, Scope::Device(device), &name).await?;
            devices.push(path);
        }
        Ok(Tokens {
            read,
            admin,
            admin_file,
            devices,
        })
    }
}

/// The token in `path` when the fleet still accepts it with `scope`; otherwise a new one,
/// stored in the fleet and written to `path` (mode 0600: agents refuse readable token files).
async fn token_file(
    db: &Db,
    path: &Path,
    scope: crate::auth::Scope,
    name: &str,
) -> Result<String, DemoError> {
    if let Ok(text) = std::fs::read_to_string(path) {
        let token = text.trim().to_string();
        if crate::auth::lookup(db, &token)
            .await
            .map_err(crate::FleetError::from)?
            == Some(scope.clone())
        {
            return Ok(token);
        }
    }
    let (_, token) = crate::auth::create(db, &scope, name).await?;
    ember_host::fs::Durable::new()
        .mode(0o600)
        .write(path, format!("{token}\n").as_bytes())
        .map_err(io(path))?;
    Ok(token)
}

fn device_id(index: usize) -> String {
    format!("demo-{:02}", index + 1)
}

/// `activity` 1.1.0: the full-precision bundle of the same training run, re-signed under the
/// new version with the development key.
fn activity_1_1_0() -> Result<Vec<u8>, DemoError> {
    let api = |message: String| DemoError::Api {
        what: "build activity 1.1.0".into(),
        message,
    };
    let key = ember_bundle::keys::parse_signing_key(DEV_SIGNING_KEY, "the development key")
        .map_err(|e| api(e.to_string()))?;
    ember_bundle::rebundle(
        ACTIVITY_F32_BUNDLE,
        &key,
        |m| m["version"] = ROLLOUT_TO.into(),
        |_| {},
    )
    .map_err(|e| api(e.to_string()))
}

/// Uploads the demo's bundles (POST /api/v1/models); one already registered (a restarted
/// demo) is fine.
fn register_bundles(fleet_url: &str, admin: &str) -> Result<(), DemoError> {
    let client = client(fleet_url, admin)?;
    for (what, bytes) in [
        ("activity 1.0.0", ACTIVITY_BUNDLE.to_vec()),
        ("anomaly 1.0.0", ANOMALY_BUNDLE.to_vec()),
        ("activity 1.1.0", activity_1_1_0()?),
    ] {
        let resp = client
            .send(
                "POST",
                "/api/v1/models",
                &[("Content-Type", crate::api::BUNDLE_MEDIA_TYPE)],
                Some(ember_host::client::Body::Bytes(&bytes)),
            )
            .map_err(|e| DemoError::Api {
                what: format!("register {what}"),
                message: e.to_string(),
            })?;
        match resp.status {
            201 => tracing::info!(model = what, "Registered a demo bundle."),
            409 => {}
            _ => {
                return Err(DemoError::Api {
                    what: format!("register {what}"),
                    message: resp.error_message(),
                });
            }
        }
    }
    Ok(())
}

/// The staged rollout of `activity` 1.1.0 to this run's agents; the id of the one that
/// already exists when a restarted demo finds it (then `false`).
fn start_rollout(
    fleet_url: &str,
    admin: &str,
    devices: &[String],
) -> Result<(String, bool), DemoError> {
    let client = client(fleet_url, admin)?;
    let fail = |message: String| DemoError::Api {
        what: "start the rollout".into(),
        message,
    };
    let list = client
        .send("GET", "/api/v1/rollouts?limit=100", &[], None)
        .map_err(|e| fail(e.to_string()))?;
    let existing = list.json().and_then(|v| {
        v["items"].as_array().and_then(|items| {
            items
                .iter()
                .find(|r| r["model"] == ROLLOUT_MODEL)
                .and_then(|r| r["id"].as_str().map(str::to_string))
        })
    });
    if let Some(id) = existing {
        return Ok((id, false));
    }
    let body = serde_json::json!({
        "model": ROLLOUT_MODEL,
        "version": ROLLOUT_TO,
        "targets": {"devices": devices},
        "waves": ["canary", "50%", "100%"],
        "min_soak_s": ROLLOUT_SOAK_S,
        "shadow": {"windows": SHADOW_WINDOWS, "min_agreement": 0.8, "max_latency_ratio": 10.0},
    });
    let resp = client
        .send(
            "POST",
            "/api/v1/rollouts",
            &[],
            Some(ember_host::client::Body::Json(&body)),
        )
        .map_err(|e| fail(e.to_string()))?;
    if resp.status != 201 {
        return Err(fail(resp.error_message()));
    }
    let id = resp
        .json()
        .and_then(|v| v["id"].as_str().map(str::to_string))
        .ok_or_else(|| fail("the answer names no rollout id".into()))?;
    tracing::info!(rollout = %id, "Started the demo's rollout.");
    Ok((id, true))
}

fn client(fleet_url: &str, token: &str) -> Result<ember_host::client::FleetClient, DemoError> {
    ember_host::client::FleetClient::new(fleet_url, None)
        .map(|c| c.with_token(token))
        .map_err(|e| DemoError::Api {
            what: "reach the fleet".into(),
            message: e.to_string(),
        })
}

/// Files every agent needs, written once into `<data_dir>/assets`.
struct Assets {
    activity: PathBuf,
    anomaly: PathBuf,
    key: PathBuf,
    data: PathBuf,
}

fn write_assets(data_dir: &Path) -> Result<Assets, DemoError> {
    let dir = data_dir.join("assets");
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let write = |name: &str, bytes: &[u8]| -> Result<PathBuf, DemoError> {
        let path = dir.join(name);
        std::fs::write(&path, bytes).map_err(io(&path))?;
        Ok(path)
    };
    Ok(Assets {
        activity: write("activity-int8.bundle", ACTIVITY_BUNDLE)?,
        anomaly: write("anomaly-int8.bundle", ANOMALY_BUNDLE)?,
        key: write("dev.pub", DEV_PUBLIC_KEY)?,
        data: dir.clone(),
    })
}

/// The test recordings with their series rotated by `by`, so each agent tells a different
/// story. Header lines (`#`, `@`) stay first; each data line is one series.
fn rotated_recordings(by: usize) -> String {
    let mut header = Vec::new();
    let mut series = Vec::new();
    let mut in_data = false;
    for line in BASIC_MOTIONS_TEST.lines() {
        if in_data {
            if !line.trim().is_empty() {
                series.push(line);
            }
        } else {
            header.push(line);
            if line.trim().eq_ignore_ascii_case("@data") {
                in_data = true;
            }
        }
    }
    if !series.is_empty() {
        let n = by % series.len();
        series.rotate_left(n);
    }
    let mut out = header.join("\n");
    out.push('\n');
    out.push_str(&series.join("\n"));
    out.push('\n');
    out
}

/// The hidden subcommand that makes a demo build of `ember-fleet` an `ember-agent`.
pub const AGENT_SUBCOMMAND: &str = "agent";

/// `ember-fleet agent ARGS` → `Some(["ember-agent", ARGS..])`, the command line to parse with
/// `ember_agent::cli::Cli` (so usage, errors and `--version` read as `ember-agent`'s); any
/// other command line → `None`. `main.rs` checks this before parsing its own arguments, so
/// the agent's flags and `EMBER_*` environment never meet the fleet's parser.
pub fn agent_args(
    args: impl IntoIterator<Item = std::ffi::OsString>,
) -> Option<Vec<std::ffi::OsString>> {
    let mut args = args.into_iter();
    let _program = args.next()?;
    let first = args.next()?;
    if first != AGENT_SUBCOMMAND {
        return None;
    }
    Some(std::iter::once("ember-agent".into()).chain(args).collect())
}

/// What the demo runs its agents with. One `cargo run` builds the fleet and the agent library
/// together (the `demo` feature depends on `ember-agent`), so no second cargo build is needed
/// before the agents start; they stay separate processes (each its own queue, signals, exit).
#[derive(Debug, Clone)]
enum AgentProgram {
    /// This executable, run as `ember-fleet agent ARGS`.
    Embedded(PathBuf),
    /// A separately built `ember-agent` (`--agent-bin`).
    External(PathBuf),
}

impl AgentProgram {
    /// The command, before the agent's own arguments.
    fn command(&self) -> Command {
        match self {
            Self::Embedded(exe) => {
                let mut cmd = Command::new(exe);
                cmd.arg(AGENT_SUBCOMMAND);
                cmd
            }
            Self::External(bin) => Command::new(bin),
        }
    }
}

/// Starts rumqttd on two free 127.0.0.1 ports, MQTT 3.1.1 (the agents, the desired-state
/// publisher) and MQTT 5 (the fleet's ingest subscriber: rumqttd serves each protocol on a
/// listener of its own), and waits until both accept connections.
async fn start_broker() -> Result<(u16, u16), DemoError> {
    // rumqttd binds by itself, so pick a free port and retry if another process takes it first.
    let mut last = String::new();
    for _ in 0..5 {
        let free = || {
            StdListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .map_err(|e| DemoError::Broker(e.to_string()))
        };
        let (port, v5_port) = (free()?, free()?);
        if port == v5_port {
            continue;
        }
        let config = broker_config(port, v5_port);
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::Builder::new()
            .name("rumqttd".into())
            .spawn(move || {
                let mut broker = rumqttd::Broker::new(config);
                if let Err(e) = broker.start() {
                    let _ = tx.send(e.to_string());
                }
            })
            .map_err(|e| DemoError::Broker(e.to_string()))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(msg) = rx.try_recv() {
                last = msg;
                break;
            }
            let up = |p: u16| {
                let addr = SocketAddr::from(([127, 0, 0, 1], p));
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            };
            if up(port) && up(v5_port) {
                return Ok((port, v5_port));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if last.is_empty() {
            last = format!("port {port} did not accept connections within 10 s");
        }
    }
    Err(DemoError::Broker(last))
}

fn broker_config(port: u16, v5_port: u16) -> rumqttd::Config {
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 10_000,
        // Above the agents' message_max_bytes (128 KiB) and the fleet's ingest limit.
        max_payload_size: 512 * 1024,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = |name: &str, port: u16| rumqttd::ServerSettings {
        name: name.into(),
        listen: SocketAddr::from(([127, 0, 0, 1], port)),
        tls: None,
        next_connection_delay_ms: 1,
        connections: connections.clone(),
    };
    rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 1_000,
            max_outgoing_packet_count: 200,
            max_segment_size: 16 * 1024 * 1024,
            max_segment_count: 4,
            ..Default::default()
        },
        v4: Some(HashMap::from([("1".to_string(), server("demo", port))])),
        v5: Some(HashMap::from([(
            "1".to_string(),
            server("demo-v5", v5_port),
        )])),
        ..Default::default()
    }
}

fn fleet_settings(
    data_dir: &Path,
    listen: SocketAddr,
    broker_port: u16,
    v5_port: u16,
    trusted_key: &Path,
) -> Result<Settings, DemoError> {
    let fleet_dir = data_dir.join("fleet");
    let text = format!(
        r#"data_dir = {dir:?}
[http]
listen = "{listen}"
[mqtt]
host = "127.0.0.1"
port = {broker_port}
ingest_port = {v5_port}
client_id = "ember-fleet-demo"
share_group = ""
[shutdown]
grace_ms = 5000
[models]
trusted_keys = [{key:?}]
[lake]
store = {lake:?}
interval_s = 10
[monitoring]
interval_s = 5
window_s = 600
min_windows = 50
# The demo replays BasicMotions' TEST split; its inputs read a PSI of about 0.23 against the
# TRAIN split's baseline with nothing wrong (docs/monitoring.md), too close to the default.
input_psi_threshold = 0.5
"#,
        dir = fleet_dir.display().to_string(),
        lake = fleet_dir.join("lake").display().to_string(),
        key = trusted_key.display().to_string(),
    );
    Ok(Settings::from_toml(&text, "<demo>", std::iter::empty())?)
}

/// How an agent runs: its broker, replay speed, and where it downloads new model versions
/// from, with which token.
struct AgentRun<'a> {
    broker_port: u16,
    speed: f64,
    fleet_url: &'a str,
    token_file: &'a Path,
}

fn agent_config(
    device: &str,
    dir: &Path,
    recordings: &Path,
    assets: &Assets,
    run: &AgentRun<'_>,
) -> String {
    let (broker_port, speed) = (run.broker_port, run.speed);
    // Paths are written as TOML strings through Debug, which escapes them correctly.
    format!(
        r#"# Generated by `ember-fleet demo`.
device_id = "{device}"
data_dir = {data:?}

[log]
format = "json"
level = "info"

[mqtt]
host = "127.0.0.1"
port = {broker_port}
heartbeat_s = 5
status_interval_s = 2

[queue]
max_bytes = 67108864

[shutdown]
grace_ms = 3000

[[source]]
type = "replay"
stream = "motion"
path = {recordings:?}
rate_hz = {rate}
loop = true

[inference]
trusted_keys = [{key:?}]
forward_raw = "all"

[[model]]
bundle = {activity:?}
source = "motion"

[model.capture]
below_confidence = 0.8
sample = 0.02

[[model]]
bundle = {anomaly:?}
source = "motion"

[model.capture]
anomalies = true
max_per_minute = 6

[ota]
enabled = true
fleet_url = {fleet_url:?}
token_file = {token_file:?}
"#,
        fleet_url = run.fleet_url,
        token_file = run.token_file.display().to_string(),
        data = dir.join("queue").display().to_string(),
        recordings = recordings.display().to_string(),
        rate = 10.0 * speed,
        key = assets.key.display().to_string(),
        activity = assets.activity.display().to_string(),
        anomaly = assets.anomaly.display().to_string(),
    )
}

/// The agent processes, stopped with SIGTERM on the way out.
#[derive(Default)]
struct Agents {
    children: Vec<(String, Child, PathBuf)>,
}

impl Agents {
    fn spawn(
        &mut self,
        program: &AgentProgram,
        data_dir: &Path,
        assets: &Assets,
        index: usize,
        run: &AgentRun<'_>,
    ) -> Result<(), DemoError> {
        let device = device_id(index);
        let dir = data_dir.join("agents").join(&device);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let recordings = assets.data.join(format!("basicmotions-{device}.ts"));
        std::fs::write(&recordings, rotated_recordings(index * 7)).map_err(io(&recordings))?;
        let config = dir.join("agent.toml");
        let text = agent_config(&device, &dir, &recordings, assets, run);
        std::fs::write(&config, text).map_err(io(&config))?;
        let log = dir.join("agent.log");
        let log_file = std::fs::File::create(&log).map_err(io(&log))?;
        // A clean environment: the user's unrelated `EMBER_*` variables (EMBER_REPO, ...)
        // would reach the agent's configuration overlay, which refuses unknown keys.
        let mut cmd = program.command();
        cmd.env_clear();
        if let Some(path) = std::env::var_os("PATH") {
            cmd.env("PATH", path);
        }
        let child = cmd
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|source| DemoError::AgentSpawn {
                device: device.clone(),
                source,
            })?;
        tracing::info!(%device, pid = child.id(), log = %log.display(), "Started an agent.");
        self.children.push((device, child, log));
        Ok(())
    }

    /// The first agent that has exited, if any.
    fn exited(&mut self) -> Option<DemoError> {
        for (device, child, log) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(DemoError::AgentExited {
                    device: device.clone(),
                    status: status.to_string(),
                    log: log.clone(),
                });
            }
        }
        None
    }

    async fn stop_all(&mut self) {
        for (_, child, _) in &self.children {
            // std has no SIGTERM and the workspace forbids `unsafe`; kill(1) is everywhere.
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let deadline = Instant::now() + AGENT_STOP_TIMEOUT;
        for (device, child, _) in &mut self.children {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        tracing::warn!(%device, "The agent did not stop in time; killing it.");
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }
        self.children.clear();
    }
}

/// Waits until the registry shows every demo agent online.
async fn wait_online(
    db_settings: &crate::config::DatabaseSettings,
    agents: &mut Agents,
    data_dir: &Path,
    shutdown: &CancellationToken,
) -> Result<(), DemoError> {
    let wanted = agents.children.len();
    let db = Db::connect(db_settings).await?;
    let deadline = Instant::now() + ONLINE_TIMEOUT;
    let mut online = 0;
    let result = loop {
        if shutdown.is_cancelled() {
            break Ok(());
        }
        if let Some(e) = agents.exited() {
            break Err(e);
        }
        let row: Result<(i64,), sqlx::Error> = sqlx::query_as(
            "SELECT COUNT(*) FROM devices WHERE online = 1 AND device_id LIKE 'demo-%'",
        )
        .fetch_one(db.pool())
        .await;
        // The fleet creates the schema as it starts; until then the query fails.
        if let Ok((n,)) = row {
            online = usize::try_from(n).unwrap_or(0);
            if online >= wanted {
                break Ok(());
            }
        }
        if Instant::now() >= deadline {
            break Err(DemoError::NotOnline {
                online,
                wanted,
                timeout: ONLINE_TIMEOUT,
                dir: data_dir.join("agents"),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    db.close().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_the_header_and_every_series() {
        let original = rotated_recordings(0);
        let rotated = rotated_recordings(7);
        let data = |s: &str| -> Vec<String> {
            s.lines()
                .skip_while(|l| !l.eq_ignore_ascii_case("@data"))
                .skip(1)
                .map(str::to_string)
                .collect()
        };
        let (a, b) = (data(&original), data(&rotated));
        assert_eq!(a.len(), 40);
        assert_eq!(b.len(), 40);
        assert_eq!(a[7], b[0]);
        let mut sa = a.clone();
        let mut sb = b.clone();
        sa.sort();
        sb.sort();
        assert_eq!(sa, sb);
        let parsed = ember_ts::parse_ts(&rotated).expect("rotated file parses");
        assert_eq!(parsed.series.len(), 40);
    }

    #[test]
    fn the_second_activity_version_is_signed_by_the_development_key() {
        let bytes = activity_1_1_0().unwrap();
        let raw = ember_bundle::RawBundle::read(&bytes).unwrap();
        let key = ember_bundle::keys::parse_public_key(
            std::str::from_utf8(DEV_PUBLIC_KEY).unwrap(),
            "dev.pub",
        )
        .unwrap();
        let head = raw
            .verify(&ember_bundle::TrustedKeys::new().with(key))
            .unwrap();
        assert_eq!(
            (head.name.as_str(), head.version.as_str()),
            (ROLLOUT_MODEL, ROLLOUT_TO)
        );
        let from = ember_bundle::RawBundle::read(ACTIVITY_BUNDLE)
            .unwrap()
            .head()
            .unwrap();
        assert_eq!(from.version, ROLLOUT_FROM);
    }

    #[test]
    fn generated_fleet_settings_are_valid() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("dev.pub");
        std::fs::write(&key, DEV_PUBLIC_KEY).unwrap();
        let s =
            fleet_settings(dir.path(), "127.0.0.1:0".parse().unwrap(), 1883, 1884, &key).unwrap();
        assert_eq!(s.mqtt.port, 1883);
    }
}
