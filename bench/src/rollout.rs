//! `ember-bench rollout`: a staged rollout over 1,000 simulated devices.
//!
//! Declared case: the real fleet (in this process, SQLite in a temp dir), a real Mosquitto, N
//! simulated devices over C MQTT connections. Each device publishes a retained status
//! (`activity 1.0.0`), subscribes to its own `ember/v1/{device}/desired`, and when told to
//! install `2.0.0` answers with three retained statuses (`downloading`, `verified`, `active`).
//! The rollout targets every device in waves (default `1%, 10%, 100%`) with zero soak.
//!
//! Measured: wall time from `POST /api/v1/rollouts` to the rollout's `completed`, per-wave
//! times, and the MQTT payload + topic bytes each way. Baseline, in the same run: publishing
//! N retained QoS 1 desired-state messages of the same size from one client until every PUBACK
//! arrived (the broker's floor for telling every device something once). The bundle download
//! (HTTP, per device) is not part of this case yet: the registry's download route is built
//! separately; `--include-downloads` says so instead of measuring something else.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ember_fleet::config::Settings;
use ember_proto::ota::{OtaReport, OtaState};
use ember_proto::{DeviceState, Encoding, Status};
use ember_testkit::{TestBroker, localhost};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "bench-admin-token-0123456789abcdef";
const MODEL: &str = "activity";
const OLD: &str = "1.0.0";
const NEW: &str = "2.0.0";
const TIMEOUT: Duration = Duration::from_secs(600);

#[derive(clap::Args, Clone)]
pub struct Args {
    /// Simulated devices.
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// MQTT connections the devices are spread over (devices per connection = devices / this).
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Cumulative wave sizes.
    #[arg(long, value_delimiter = ',', default_value = "1%,10%,100%")]
    waves: Vec<String>,
    /// Also download every bundle over HTTP (needs the registry's download route, which is
    /// not in this build: the run stops with that message rather than measure without it).
    #[arg(long)]
    include_downloads: bool,
}

#[derive(Default)]
struct Bytes {
    /// Desired-state messages received by the devices (payload + topic).
    down: AtomicU64,
    down_msgs: AtomicU64,
    /// Statuses published by the devices (payload + topic).
    up: AtomicU64,
    up_msgs: AtomicU64,
}

pub async fn run(args: Args) -> Result<()> {
    if args.include_downloads {
        bail!(
            "--include-downloads needs GET /api/v1/models/{{name}}/{{version}}/bundle, which is not in this build yet; run without it to measure the MQTT path"
        );
    }
    if args.devices == 0 || args.connections == 0 || args.connections > args.devices {
        bail!("--devices and --connections must be at least 1, connections at most devices");
    }
    println!("machine: {}", super::machine());
    println!(
        "case: {} devices over {} MQTT connections, waves {:?}, zero soak, fleet in-process on SQLite, Mosquitto",
        args.devices,
        args.connections,
        args.waves.join(",")
    );
    let broker = TestBroker::start();
    let dir = tempfile::tempdir()?;
    let db_url = format!("sqlite://{}", dir.path().join("fleet.db").display());
    let (http, fleet_stop, fleet_thread) = start_fleet(&db_url, broker.port())?;

    // The devices come online (not measured).
    let bytes = Arc::new(Bytes::default());
    let stop = CancellationToken::new();
    let ids: Vec<String> = (0..args.devices).map(|i| format!("dev-{i:05}")).collect();
    let per = args.devices.div_ceil(args.connections);
    let mut sims = Vec::new();
    for (i, chunk) in ids.chunks(per).enumerate() {
        sims.push(tokio::spawn(simulate(
            broker.port(),
            i,
            chunk.to_vec(),
            bytes.clone(),
            stop.clone(),
        )));
    }
    let t = Instant::now();
    loop {
        let (code, body) = http_call(http, "GET", "/api/v1/overview", None)?;
        let n = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["devices"].as_u64())
            .unwrap_or(0);
        if code == 200 && n as usize >= args.devices {
            break;
        }
        if t.elapsed() > TIMEOUT {
            bail!("only {n} of {} devices registered", args.devices);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "devices online and registered in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    register(&db_url).await?;
    let (up0, down0) = (
        bytes.up.load(Ordering::Relaxed),
        bytes.down.load(Ordering::Relaxed),
    );
    let (upm0, downm0) = (
        bytes.up_msgs.load(Ordering::Relaxed),
        bytes.down_msgs.load(Ordering::Relaxed),
    );

    // Measured: create → completed.
    let t0 = Instant::now();
    let body = json!({"model": MODEL, "version": NEW, "targets": {"all": true},
        "waves": args.waves, "min_soak_s": 0});
    let (code, text) = http_call(http, "POST", "/api/v1/rollouts", Some(&body.to_string()))?;
    if code != 201 {
        bail!("create answered {code}: {text}");
    }
    let id = serde_json::from_str::<Value>(&text)?["id"]
        .as_str()
        .context("no id")?
        .to_string();
    let view = loop {
        let (code, text) = http_call(http, "GET", &format!("/api/v1/rollouts/{id}"), None)?;
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if code == 200 && v["state"] == "completed" {
            break v;
        }
        if code == 200 && v["state"] != "running" {
            bail!("the rollout stopped: {}", v["state"]);
        }
        if t0.elapsed() > TIMEOUT {
            bail!(
                "the rollout did not complete within {TIMEOUT:?}: {}",
                v["counts"]
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let total = t0.elapsed().as_secs_f64();
    let up = bytes.up.load(Ordering::Relaxed) - up0;
    let down = bytes.down.load(Ordering::Relaxed) - down0;
    let upm = bytes.up_msgs.load(Ordering::Relaxed) - upm0;
    let downm = bytes.down_msgs.load(Ordering::Relaxed) - downm0;
    stop.cancel();
    for s in sims {
        let _ = s.await;
    }
    let created = view["created_at"].as_f64().unwrap_or(0.0);
    let mut waves = Vec::new();
    for w in view["waves"].as_array().into_iter().flatten() {
        let (Some(s), Some(e)) = (w["started_at"].as_f64(), w["succeeded_at"].as_f64()) else {
            continue;
        };
        waves.push(format!(
            "{} ({} devices): started +{:.2} s, done +{:.2} s",
            w["name"].as_str().unwrap_or("?"),
            w["size"],
            (s - created) / 1e6,
            (e - created) / 1e6
        ));
    }
    let avg_desired = down.checked_div(downm).unwrap_or(300) as usize;
    fleet_stop.cancel();
    let _ = fleet_thread.join();

    let baseline = baseline(broker.port(), args.devices, avg_desired).await?;
    println!("rollout {id}: created -> completed in {total:.2} s");
    for w in waves {
        println!("  wave {w}");
    }
    println!(
        "MQTT fleet -> devices: {downm} desired-state messages, {down} bytes (payload + topic); devices -> fleet: {upm} statuses, {up} bytes"
    );
    println!(
        "baseline: {} retained QoS 1 messages of {avg_desired} bytes published by one client until every PUBACK: {baseline:.2} s",
        args.devices
    );
    println!(
        "ratio rollout / baseline: {:.1}x (target: rollout < 60 s)",
        total / baseline
    );
    Ok(())
}

fn start_fleet(
    db_url: &str,
    broker: u16,
) -> Result<(u16, CancellationToken, std::thread::JoinHandle<()>)> {
    let text = format!(
        "bootstrap_token = \"{TOKEN}\"\n[log]\nlevel = \"warn\"\n[database]\nurl = \"{db_url}\"\n\
         [mqtt]\nhost = \"127.0.0.1\"\nport = {broker}\nclient_id = \"ember-fleet-bench-rollout\"\n"
    );
    let settings = Settings::from_toml(&text, "bench", Vec::new())
        .map_err(|e| anyhow::anyhow!("fleet config: {e}"))?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    listener.set_nonblocking(true)?;
    let stop = CancellationToken::new();
    let force = CancellationToken::new();
    let s2 = stop.clone();
    let thread = std::thread::spawn(move || {
        let rt = match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("cannot start the fleet's runtime: {e}");
                return;
            }
        };
        rt.block_on(async move {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => {
                    if let Err(e) = ember_fleet::run(settings, l, s2, force).await {
                        eprintln!("the fleet failed: {e}");
                    }
                }
                Err(e) => eprintln!("cannot adopt the listener: {e}"),
            }
        });
    });
    let t = Instant::now();
    while !matches!(http_call(port, "GET", "/api/v1/health", None), Ok((200, _))) {
        if t.elapsed() > Duration::from_secs(60) || thread.is_finished() {
            bail!("the fleet did not become healthy");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((port, stop, thread))
}

/// The registry row of the new version (the upload route is another part's).
async fn register(db_url: &str) -> Result<()> {
    let settings = ember_fleet::config::DatabaseSettings {
        url: db_url.into(),
        backend: ember_fleet::config::Backend::Sqlite,
        max_connections: 1,
    };
    let db = ember_fleet::db::Db::open(&settings).await?;
    let mut q = ember_fleet::db::Sql::new(
        "INSERT INTO models (name, version, kind, precision, sha256, size, key_id, manifest, blob_key, deprecated, created_at) VALUES (",
    );
    q.bind(MODEL)
        .push(", ")
        .bind(NEW)
        .push(", 'activity', 'f32', ")
        .bind("ab".repeat(32))
        .push(", 29711, 'bench-key', '{}', 'bench', FALSE, ")
        .bind(now_us() as i64)
        .push(")");
    q.query().execute(db.pool()).await?;
    db.close().await;
    Ok(())
}

fn status(device: &str, running: &str, ota: Option<(&str, OtaState)>) -> Vec<u8> {
    let mut s = Status::offline(device);
    s.state = DeviceState::Online;
    s.ts = now_us();
    s.agent_version = Some("bench".into());
    s.models.insert(MODEL.into(), running.into());
    if let Some((rollout, state)) = ota {
        s.ota.push(OtaReport {
            model: MODEL.into(),
            version: NEW.into(),
            rollout: Some(rollout.into()),
            state,
            reason: None,
            ts: now_us(),
            agreement: None,
            latency_ratio: None,
        });
    }
    ember_proto::message::encode(&s, Encoding::Json).unwrap_or_default()
}

/// One MQTT connection carrying `devices`: statuses up, desired states down.
async fn simulate(
    port: u16,
    n: usize,
    devices: Vec<String>,
    bytes: Arc<Bytes>,
    stop: CancellationToken,
) {
    let mut opts = MqttOptions::new(format!("bench-sim-{n}"), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let cap = devices.len() * 4 + 16;
    opts.set_request_channel_capacity(cap);
    let (client, mut el) = AsyncClient::new(opts, cap);
    let mut done: HashSet<String> = HashSet::new();
    let up = |topic: String, payload: Vec<u8>| {
        bytes
            .up
            .fetch_add((topic.len() + payload.len()) as u64, Ordering::Relaxed);
        bytes.up_msgs.fetch_add(1, Ordering::Relaxed);
        let _ = client.try_publish(topic, QoS::AtLeastOnce, true, payload);
    };
    let mut started = false;
    loop {
        let ev = tokio::select! {
            _ = stop.cancelled() => return,
            ev = el.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                let filters = devices.iter().map(|d| {
                    rumqttc::SubscribeFilter::new(format!("ember/v1/{d}/desired"), QoS::AtLeastOnce)
                });
                let _ = client.try_subscribe_many(filters);
                if !started {
                    started = true;
                    for d in &devices {
                        up(format!("ember/v1/{d}/status"), status(d, OLD, None));
                    }
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                bytes
                    .down
                    .fetch_add((p.topic.len() + p.payload.len()) as u64, Ordering::Relaxed);
                bytes.down_msgs.fetch_add(1, Ordering::Relaxed);
                let Ok((d, _)) = ember_proto::message::decode_desired(&p.payload) else {
                    continue;
                };
                let Some(m) = d
                    .models
                    .iter()
                    .find(|m| m.name == MODEL && m.version.as_deref() == Some(NEW))
                else {
                    continue;
                };
                let Some(rollout) = m.rollout.clone() else {
                    continue;
                };
                if !done.insert(d.device.clone()) {
                    continue;
                }
                let topic = format!("ember/v1/{}/status", d.device);
                up(
                    topic.clone(),
                    status(&d.device, OLD, Some((&rollout, OtaState::Downloading))),
                );
                up(
                    topic.clone(),
                    status(&d.device, OLD, Some((&rollout, OtaState::Verified))),
                );
                up(
                    topic,
                    status(&d.device, NEW, Some((&rollout, OtaState::Active))),
                );
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
            Ok(_) => {}
            Err(_) => {
                // Reconnects on the next poll (e.g. the broker's listen backlog was full).
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Seconds for one client to publish `n` retained QoS 1 messages of `size` bytes and get
/// every PUBACK.
async fn baseline(port: u16, n: usize, size: usize) -> Result<f64> {
    let mut opts = MqttOptions::new("bench-baseline", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    opts.set_request_channel_capacity(n + 16);
    let (client, mut el) = AsyncClient::new(opts, n + 16);
    let payload = vec![b'x'; size];
    let mut acked = 0;
    let mut t0 = None;
    let deadline = Instant::now() + TIMEOUT;
    while acked < n {
        if Instant::now() > deadline {
            bail!("the baseline did not finish");
        }
        match el.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) if t0.is_none() => {
                t0 = Some(Instant::now());
                for i in 0..n {
                    client.try_publish(
                        format!("ember/v1/base-{i:05}/desired"),
                        QoS::AtLeastOnce,
                        true,
                        payload.clone(),
                    )?;
                }
            }
            Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
            Ok(_) => {}
            Err(e) => bail!("baseline publisher: {e}"),
        }
    }
    Ok(t0.map(|t| t.elapsed().as_secs_f64()).unwrap_or(f64::NAN))
}

fn http_call(port: u16, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&localhost(port), Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n"
    );
    match body {
        Some(b) => req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        )),
        None => req.push_str("\r\n"),
    }
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        super::fleet::dechunk(body)
    } else {
        body.to_string()
    };
    Ok((code, body))
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}
