//! `ember-fleet demo`: the whole system on one machine, with nothing installed but Rust.
//!
//! Lifecycle, in order:
//! 1. an embedded MQTT broker (rumqttd, plain TCP on a free 127.0.0.1 port, in its own
//!    threads) starts;
//! 2. the fleet service ([`crate::run`]) starts on it with SQLite in `<data_dir>/fleet.db`
//!    and serves the API and dashboard on `listen`;
//! 3. `agents` real `ember-agent` processes start, each replaying the BasicMotions test
//!    recordings (its own rotation of the 40 series) through the committed, signed int8
//!    `activity` and `anomaly` bundles, written with their trusted development key into
//!    `<data_dir>/assets` from copies embedded in this binary;
//! 4. once every agent reports itself online, the dashboard URL is printed;
//! 5. SIGINT/SIGTERM stops the agents (SIGTERM, so they drain), then the fleet; the broker
//!    goes with the process.
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
    /// The `ember-agent` binary; `None` looks beside this executable.
    pub agent_bin: Option<PathBuf>,
    /// Replay speed: 1.0 is the recordings' real 10 Hz; the default 5.0 shows a new window
    /// every two seconds per agent.
    pub speed: f64,
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
    #[error(
        "no ember-agent binary at {0}: build it with `cargo build --release -p ember-agent` (or pass --agent-bin)"
    )]
    AgentMissing(PathBuf),
    #[error("cannot build ember-agent with cargo: {0}")]
    AgentBuild(String),
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
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DemoError + '_ {
    move |source| DemoError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Runs the demo until `shutdown` fires. `ready` receives the dashboard URL once every agent
/// is online.
pub async fn run(
    opts: DemoOptions,
    shutdown: CancellationToken,
    force: CancellationToken,
    ready: impl FnOnce(&str),
) -> Result<(), DemoError> {
    // `ready` gets the URL once, with a fresh read-only API token for the dashboard.
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
        Some(p) => p.clone(),
        None => find_or_build_agent()?,
    };
    if !agent_bin.is_file() {
        return Err(DemoError::AgentMissing(agent_bin));
    }

    let data_dir = &opts.data_dir;
    std::fs::create_dir_all(data_dir).map_err(io(data_dir))?;
    let data_dir = data_dir.canonicalize().map_err(io(data_dir))?;
    let assets = write_assets(&data_dir)?;

    let broker_port = start_broker().await?;
    tracing::info!(
        port = broker_port,
        "Embedded MQTT broker (rumqttd) is up on 127.0.0.1."
    );

    let settings = fleet_settings(&data_dir, opts.listen, broker_port)?;
    let listener = crate::bind(&settings).await?;
    let http = listener.local_addr().map_err(crate::FleetError::Serve)?;
    let db_settings = settings.database.clone();
    let fleet_shutdown = CancellationToken::new();
    let fleet = tokio::spawn(crate::run(
        settings,
        listener,
        fleet_shutdown.clone(),
        force.clone(),
    ));

    let mut agents = Agents::default();
    let started = async {
        for i in 0..opts.agents {
            agents.spawn(&agent_bin, &data_dir, &assets, i, broker_port, opts.speed)?;
        }
        wait_online(&db_settings, &mut agents, &data_dir, &shutdown).await
    };
    let outcome = started.await;
    if let (Ok(token), false) = (&outcome, shutdown.is_cancelled()) {
        // The token rides in the URL's fragment, which browsers never send to the server.
        let url = format!("http://{http}/dashboard/#token={token}");
        ready(&url);
        shutdown.cancelled().await;
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

/// `ember-agent` beside this executable (both are built into the same `target/<profile>`); when
/// it is missing and we run under `cargo run`, build it with the same profile first.
fn find_or_build_agent() -> Result<PathBuf, DemoError> {
    let exe = std::env::current_exe().map_err(|e| DemoError::AgentBuild(e.to_string()))?;
    let dir = exe
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let bin = dir.join(format!("ember-agent{}", std::env::consts::EXE_SUFFIX));
    if bin.is_file() {
        return Ok(bin);
    }
    // `cargo run` tells its child where cargo is; outside cargo, say how to build it.
    let Some(cargo) = std::env::var_os("CARGO") else {
        return Err(DemoError::AgentMissing(bin));
    };
    let release = dir.file_name().is_some_and(|n| n == "release");
    tracing::info!(
        "Building ember-agent once ({} profile); this takes a few minutes the first time.",
        if release { "release" } else { "dev" }
    );
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-p", "ember-agent", "--bin", "ember-agent"]);
    if release {
        cmd.arg("--release");
    }
    let status = cmd
        .status()
        .map_err(|e| DemoError::AgentBuild(e.to_string()))?;
    if !status.success() {
        return Err(DemoError::AgentBuild(format!("cargo exited with {status}")));
    }
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(DemoError::AgentMissing(bin))
    }
}

/// Starts rumqttd on a free 127.0.0.1 port and waits until it accepts connections.
async fn start_broker() -> Result<u16, DemoError> {
    // rumqttd binds by itself, so pick a free port and retry if another process takes it first.
    let mut last = String::new();
    for _ in 0..5 {
        let port = StdListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| DemoError::Broker(e.to_string()))?;
        let config = broker_config(port);
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
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(port);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if last.is_empty() {
            last = format!("port {port} did not accept connections within 10 s");
        }
    }
    Err(DemoError::Broker(last))
}

fn broker_config(port: u16) -> rumqttd::Config {
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 10_000,
        // Above the agents' message_max_bytes (128 KiB) and the fleet's ingest limit.
        max_payload_size: 512 * 1024,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = rumqttd::ServerSettings {
        name: "demo".into(),
        listen: SocketAddr::from(([127, 0, 0, 1], port)),
        tls: None,
        next_connection_delay_ms: 1,
        connections,
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
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Default::default()
    }
}

fn fleet_settings(
    data_dir: &Path,
    listen: SocketAddr,
    broker_port: u16,
) -> Result<Settings, DemoError> {
    let fleet_dir = data_dir.join("fleet");
    let text = format!(
        r#"data_dir = {dir:?}
[http]
listen = "{listen}"
[mqtt]
host = "127.0.0.1"
port = {broker_port}
client_id = "ember-fleet-demo"
share_group = ""
[shutdown]
grace_ms = 5000
"#,
        dir = fleet_dir.display().to_string(),
    );
    Ok(Settings::from_toml(&text, "<demo>", std::iter::empty())?)
}

fn agent_config(
    device: &str,
    dir: &Path,
    recordings: &Path,
    assets: &Assets,
    broker_port: u16,
    speed: f64,
) -> String {
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

[[model]]
bundle = {anomaly:?}
source = "motion"
"#,
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
        bin: &Path,
        data_dir: &Path,
        assets: &Assets,
        index: usize,
        broker_port: u16,
        speed: f64,
    ) -> Result<(), DemoError> {
        let device = format!("demo-{:02}", index + 1);
        let dir = data_dir.join("agents").join(&device);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let recordings = assets.data.join(format!("basicmotions-{device}.ts"));
        std::fs::write(&recordings, rotated_recordings(index * 7)).map_err(io(&recordings))?;
        let config = dir.join("agent.toml");
        let text = agent_config(&device, &dir, &recordings, assets, broker_port, speed);
        std::fs::write(&config, text).map_err(io(&config))?;
        let log = dir.join("agent.log");
        let log_file = std::fs::File::create(&log).map_err(io(&log))?;
        let child = Command::new(bin)
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

/// Waits until the registry shows every demo agent online, then stores and returns a new
/// read-only API token for the dashboard.
async fn wait_online(
    db_settings: &crate::config::DatabaseSettings,
    agents: &mut Agents,
    data_dir: &Path,
    shutdown: &CancellationToken,
) -> Result<String, DemoError> {
    let wanted = agents.children.len();
    let db = Db::connect(db_settings).await?;
    let deadline = Instant::now() + ONLINE_TIMEOUT;
    let mut online = 0;
    let result = loop {
        if shutdown.is_cancelled() {
            break Ok(String::new());
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
                let token = crate::auth::generate()?;
                crate::auth::store(&db, &token, &crate::auth::Scope::Read, "demo dashboard")
                    .await
                    .map_err(crate::FleetError::from)?;
                break Ok(token);
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
    fn generated_fleet_settings_are_valid() {
        let dir = tempfile::tempdir().unwrap();
        let s = fleet_settings(dir.path(), "127.0.0.1:0".parse().unwrap(), 1883).unwrap();
        assert_eq!(s.mqtt.port, 1883);
    }
}
