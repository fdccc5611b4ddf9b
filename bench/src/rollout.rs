//! `ember-bench rollout`: a staged rollout over 1,000 (or `--devices`) simulated devices,
//! through the fleet in this process or through 1..N replica processes (`--replicas 1,3`).
//!
//! Declared case: the real fleet (in this process, SQLite in a temp dir; or with `--replicas`
//! that many `ember-fleet` processes on one PostgreSQL, one shared-subscription group, the
//! rollout created and polled through the first, downloads spread over all), a real
//! Mosquitto, N simulated devices over C MQTT connections. Each device publishes a retained status
//! (`activity 1.0.0`), subscribes to its own `ember/v1/{device}/desired`, and when told to
//! install `2.0.0` answers with three retained statuses (`downloading`, `verified`, `active`).
//! The rollout targets every device in waves (default `1%, 10%, 100%`) with zero soak.
//!
//! Measured: wall time from `POST /api/v1/rollouts` to the rollout's `completed`, per-wave
//! times, and the MQTT payload + topic bytes each way. Baseline, in the same run: publishing
//! N retained QoS 1 desired-state messages of the same size from one client until every PUBACK
//! arrived (the broker's floor for telling every device something once).
//!
//! The new version is a real bundle (`models/bundles/activity-int8.bundle` re-signed as
//! `2.0.0` with the development key) uploaded through `POST /api/v1/models` to a registry that
//! trusts the development key, so the desired states carry its real sha256, size and URL.
//! With `--include-downloads` every device also gets its own device-scoped token (created
//! during setup, not timed) and, between `downloading` and `verified`, fetches the bundle from
//! the desired state's `url` with the agent's own downloader
//! (`ember_agent::ota::download::Downloader`: HTTP/1.1 via ureq, `.part` file, size cap,
//! sha256 against the desired state's `sha256`, fsync, rename), at most `--download-concurrency`
//! at a time across all devices.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ember_agent::ota::download::{Downloader, Request, TlsFiles};
use ember_fleet::auth::Scope;
use ember_fleet::config::{Backend, Settings};
use ember_host::client::{Body, FleetClient};
use ember_proto::ota::{OtaReport, OtaState};
use ember_proto::{DeviceState, Encoding, Status};
use ember_testkit::{TestBroker, TestPostgres};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "bench-admin-token-0123456789abcdef";
const MODEL: &str = "activity";
const OLD: &str = "1.0.0";
const NEW: &str = "2.0.0";
const TIMEOUT: Duration = Duration::from_secs(600);
/// The committed bundle re-signed as `NEW` (its manifest's model name is `activity`).
const BUNDLE: &str = "activity-int8";

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
    /// Also download every bundle over HTTP from the registry, one device token per device,
    /// sha256-checked against the desired state before reporting `verified`.
    #[arg(long)]
    include_downloads: bool,
    /// Downloads in flight at once, across all devices (with --include-downloads).
    #[arg(long, default_value_t = 32)]
    download_concurrency: usize,
    /// Replica counts to run, in order (`1,3`): that many `ember-fleet` processes (the binary
    /// next to this one; one shared-subscription group, each with its own stable client id)
    /// on one PostgreSQL (fsync and synchronous_commit on), a fresh database and broker per
    /// count; devices download from the replicas in turn. Without it: the fleet in this
    /// process on SQLite.
    #[arg(long, value_delimiter = ',')]
    replicas: Vec<usize>,
}

/// Where the fleet runs for one case.
enum Setup<'a> {
    /// In this process, on SQLite in a temp dir.
    InProcess,
    /// `n` `ember-fleet` processes on a fresh database of `pg`.
    Replicas {
        n: usize,
        pg: &'a TestPostgres,
        bin: &'a Path,
    },
}

/// The running fleet of one case; stopped by [`Fleet::stop`] (or when dropped).
enum Fleet {
    InProcess {
        stop: CancellationToken,
        thread: std::thread::JoinHandle<()>,
    },
    Replicas(Vec<crate::fleet::FleetProcess>),
}

impl Fleet {
    fn stop(self) {
        match self {
            Fleet::InProcess { stop, thread } => {
                stop.cancel();
                let _ = thread.join();
            }
            // SIGTERM and the drain, one after another.
            Fleet::Replicas(procs) => drop(procs),
        }
    }
}

/// One case's numbers.
struct Outcome {
    replicas: usize,
    total: f64,
    waves: Vec<String>,
    baseline: f64,
}

#[derive(Default)]
struct Bytes {
    /// Desired-state messages received by the devices (payload + topic).
    down: AtomicU64,
    down_msgs: AtomicU64,
    /// Statuses published by the devices (payload + topic).
    up: AtomicU64,
    up_msgs: AtomicU64,
    /// Bundle bytes downloaded over HTTP (body bytes).
    bundle: AtomicU64,
    downloads: AtomicU64,
    download_failures: AtomicU64,
}

/// What a simulated device needs to download its bundle.
struct Downloads {
    /// The replicas' HTTP ports: device `dev-<i>` downloads from `ports[i % len]`.
    ports: Vec<u16>,
    dir: PathBuf,
    tokens: HashMap<String, String>,
    permits: Semaphore,
    client: Downloader,
}

pub async fn run(args: Args) -> Result<()> {
    if args.devices == 0 || args.connections == 0 || args.connections > args.devices {
        bail!("--devices and --connections must be at least 1, connections at most devices");
    }
    if args.download_concurrency == 0 {
        bail!("--download-concurrency must be at least 1");
    }
    if args.replicas.contains(&0) {
        bail!("--replicas takes counts of at least 1 (for example 1,3)");
    }
    println!("machine: {}", super::machine());
    println!(
        "case: {} devices over {} MQTT connections, waves {:?}, zero soak, {}, Mosquitto, {}",
        args.devices,
        args.connections,
        args.waves.join(","),
        if args.replicas.is_empty() {
            "fleet in-process on SQLite"
        } else {
            "fleet replicas on PostgreSQL"
        },
        if args.include_downloads {
            format!(
                "bundle downloads over HTTP (device tokens, sha256 checked, at most {} at once)",
                args.download_concurrency
            )
        } else {
            "no bundle downloads".to_string()
        }
    );
    let mut outcomes = Vec::new();
    if args.replicas.is_empty() {
        outcomes.push(case(&args, Setup::InProcess).await?);
    } else {
        let bin = crate::fleet::sibling_binary("ember-fleet")?;
        let pg = TestPostgres::start_durable();
        println!(
            "fleet: {:?} replicas as `ember-fleet` processes on PostgreSQL (fsync on, synchronous_commit on), a fresh database and broker each",
            args.replicas
        );
        for &n in &args.replicas {
            println!("-- {n} replica(s)");
            outcomes.push(
                case(
                    &args,
                    Setup::Replicas {
                        n,
                        pg: &pg,
                        bin: &bin,
                    },
                )
                .await?,
            );
        }
    }
    if outcomes.len() > 1 {
        let first = outcomes[0].total;
        println!();
        println!(
            "| replicas | devices | create -> completed | vs {} replica(s) | waves done | baseline | rollout / baseline |",
            outcomes[0].replicas
        );
        println!("|---:|---:|---:|---:|---|---:|---:|");
        for o in &outcomes {
            println!(
                "| {} | {} | {:.2} s | {:.2}x | {} | {:.2} s | {:.1}x |",
                o.replicas,
                args.devices,
                o.total,
                o.total / first,
                o.waves.join("; "),
                o.baseline,
                o.total / o.baseline
            );
        }
    }
    Ok(())
}

/// One rollout over `args.devices` devices with the fleet of `setup`.
async fn case(args: &Args, setup: Setup<'_>) -> Result<Outcome> {
    let broker = TestBroker::start();
    let dir = tempfile::tempdir()?;
    let (db_url, backend, ports, fleet) = match setup {
        Setup::InProcess => {
            let url = format!("sqlite://{}", dir.path().join("fleet.db").display());
            let (http, stop, thread) = start_fleet(&url, dir.path(), broker.port())?;
            (
                url,
                Backend::Sqlite,
                vec![http],
                Fleet::InProcess { stop, thread },
            )
        }
        Setup::Replicas { n, pg, bin } => {
            let url = pg.create_database(&format!("rollout_{n}_replicas"));
            // One data dir for all replicas: their `fs` model store is one shared volume.
            let data = dir.path().join("data");
            std::fs::create_dir_all(&data)?;
            let mut procs = Vec::new();
            let mut ports = Vec::new();
            for i in 0..n {
                let http = ember_testkit::free_port();
                let own = dir.path().join(format!("replica-{i}"));
                std::fs::create_dir_all(&own)?;
                let config = replica_config(&url, broker.port(), http, &data, i);
                procs.push(crate::fleet::FleetProcess::start(bin, &own, &config, http)?);
                ports.push(http);
            }
            (url, Backend::Postgres, ports, Fleet::Replicas(procs))
        }
    };
    let replicas = ports.len();
    let http = ports[0];
    let uploaded = upload(http)?;
    println!(
        "uploaded {MODEL} {NEW} ({BUNDLE} re-signed): {} bytes, sha256 {}",
        uploaded["size"],
        uploaded["sha256"].as_str().unwrap_or("?")
    );
    let ids: Vec<String> = (0..args.devices).map(|i| format!("dev-{i:05}")).collect();
    let downloads = if args.include_downloads {
        let t = Instant::now();
        let tokens = device_tokens(&db_url, backend, &ids).await?;
        println!(
            "{} device tokens created in {:.1} s (setup, not timed)",
            tokens.len(),
            t.elapsed().as_secs_f64()
        );
        let dl_dir = dir.path().join("downloads");
        std::fs::create_dir_all(&dl_dir)?;
        Some(Arc::new(Downloads {
            ports: ports.clone(),
            dir: dl_dir,
            tokens,
            permits: Semaphore::new(args.download_concurrency),
            client: Downloader::new(&TlsFiles::default())
                .map_err(|e| anyhow::anyhow!("the downloader: {e}"))?,
        }))
    } else {
        None
    };

    // The devices come online (not measured).
    let bytes = Arc::new(Bytes::default());
    let stop = CancellationToken::new();
    let per = args.devices.div_ceil(args.connections);
    let mut sims = Vec::new();
    for (i, chunk) in ids.chunks(per).enumerate() {
        sims.push(tokio::spawn(simulate(
            broker.port(),
            i,
            chunk.to_vec(),
            bytes.clone(),
            downloads.clone(),
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
    let (code, text) = http_call(http, "POST", "/api/v1/rollouts", Some(&body))?;
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
    let bundle = bytes.bundle.load(Ordering::Relaxed);
    let fetched = bytes.downloads.load(Ordering::Relaxed);
    let failed = bytes.download_failures.load(Ordering::Relaxed);
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
    fleet.stop();

    let baseline = baseline(broker.port(), args.devices, avg_desired).await?;
    println!("rollout {id} through {replicas} replica(s): created -> completed in {total:.2} s");
    for w in &waves {
        println!("  wave {w}");
    }
    println!(
        "MQTT fleet -> devices: {downm} desired-state messages, {down} bytes (payload + topic); devices -> fleet: {upm} statuses, {up} bytes"
    );
    if args.include_downloads {
        println!(
            "HTTP bundle downloads: {fetched} verified, {failed} failed, {bundle} bytes (body), at most {} at once",
            args.download_concurrency
        );
    } else {
        println!("HTTP bundle downloads: none (run with --include-downloads)");
    }
    println!(
        "baseline: {} retained QoS 1 messages of {avg_desired} bytes published by one client until every PUBACK: {baseline:.2} s",
        args.devices
    );
    println!(
        "ratio rollout / baseline: {:.1}x (target: rollout < 60 s)",
        total / baseline
    );
    Ok(Outcome {
        replicas,
        total,
        waves: waves
            .iter()
            .map(|w| {
                w.split(": ").next().unwrap_or("?").to_string()
                    + " "
                    + w.rsplit("done ").next().unwrap_or("?")
            })
            .collect(),
        baseline,
    })
}

/// The configuration of replica `i` of a [`Setup::Replicas`] case.
fn replica_config(db_url: &str, broker: u16, http: u16, data_dir: &Path, i: usize) -> String {
    format!(
        "bootstrap_token = \"{TOKEN}\"\ndata_dir = \"{}\"\n[log]\nlevel = \"warn\"\n\
         [http]\nlisten = \"127.0.0.1:{http}\"\n[database]\nurl = \"{db_url}\"\n\
         [mqtt]\nhost = \"127.0.0.1\"\nport = {broker}\nclient_id = \"ember-fleet-bench-rollout-{i}\"\n\
         [models]\ntrusted_keys = [\"{}\"]\n",
        data_dir.display(),
        ember_testkit::bundles::dev_public_key_path().display()
    )
}

fn start_fleet(
    db_url: &str,
    data_dir: &Path,
    broker: u16,
) -> Result<(u16, CancellationToken, std::thread::JoinHandle<()>)> {
    let text = format!(
        "bootstrap_token = \"{TOKEN}\"\ndata_dir = \"{}\"\n[log]\nlevel = \"warn\"\n[database]\nurl = \"{db_url}\"\n\
         [mqtt]\nhost = \"127.0.0.1\"\nport = {broker}\nclient_id = \"ember-fleet-bench-rollout\"\n\
         [models]\ntrusted_keys = [\"{}\"]\n",
        data_dir.display(),
        ember_testkit::bundles::dev_public_key_path().display()
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

/// Uploads the new version through the registry's route (admin token); returns its entry.
fn upload(http: u16) -> Result<Value> {
    let bundle = ember_testkit::bundles::with_version(BUNDLE, NEW);
    let r = FleetClient::local(http).with_token(TOKEN).send(
        "POST",
        "/api/v1/models",
        &[],
        Some(Body::Bytes(&bundle)),
    )?;
    if r.status != 201 {
        bail!("the upload answered {}: {}", r.status, r.text());
    }
    let entry: Value = serde_json::from_slice(&r.body)?;
    let local = file_sha256(&bundle);
    if entry["sha256"].as_str() != Some(local.as_str()) {
        bail!(
            "the registry stored sha256 {}, the bundle has {local}",
            entry["sha256"]
        );
    }
    Ok(entry)
}

/// sha256 of the uploaded bytes, computed the agent's way (through a file), to cross-check
/// the registry's entry.
fn file_sha256(bytes: &[u8]) -> String {
    let Ok(dir) = tempfile::tempdir() else {
        return String::new();
    };
    let path = dir.path().join("bundle");
    if std::fs::write(&path, bytes).is_err() {
        return String::new();
    }
    ember_agent::ota::slots::sha256_file(&path).unwrap_or_default()
}

/// One device-scoped token per device (what a provisioned agent holds), stored directly.
async fn device_tokens(
    db_url: &str,
    backend: Backend,
    ids: &[String],
) -> Result<HashMap<String, String>> {
    let settings = ember_fleet::config::DatabaseSettings {
        url: db_url.into(),
        backend,
        max_connections: 1,
        token_source: None,
    };
    let db = ember_fleet::db::Db::open(&settings).await?;
    let mut tokens = HashMap::with_capacity(ids.len());
    for id in ids {
        let (_, token) =
            ember_fleet::auth::create(&db, &Scope::Device(id.clone()), &format!("bench {id}"))
                .await
                .map_err(|e| anyhow::anyhow!("device token for {id}: {e}"))?;
        tokens.insert(id.clone(), token);
    }
    db.close().await;
    Ok(tokens)
}

/// Fetches a device's bundle with its own token, at most `permits` at once; the file is
/// verified (size cap, sha256) by the agent's downloader, then deleted. Returns the bytes.
async fn download(
    dl: Arc<Downloads>,
    device: String,
    url: String,
    sha256: String,
    size: u64,
) -> Result<u64, String> {
    let _permit = dl.permits.acquire().await.map_err(|e| e.to_string())?;
    let dl2 = dl.clone();
    tokio::task::spawn_blocking(move || {
        let token = dl2.tokens.get(&device).ok_or("no token for the device")?;
        let dest = dl2.dir.join(format!("{device}.bundle"));
        let index: usize = device.trim_start_matches("dev-").parse().unwrap_or(0);
        let port = dl2.ports[index % dl2.ports.len()];
        let full = format!("http://127.0.0.1:{port}{url}");
        let got = dl2
            .client
            .fetch(&Request {
                url: &full,
                dest: &dest,
                max_bytes: size,
                sha256: &sha256,
                bearer: Some(token),
            })
            .map_err(|e| e.to_string())?;
        let _ = std::fs::remove_file(&got.path);
        Ok::<u64, String>(got.bytes)
    })
    .await
    .map_err(|e| e.to_string())?
}

fn status(device: &str, running: &str, ota: Option<(&str, OtaState, Option<String>)>) -> Vec<u8> {
    let mut s = Status::offline(device);
    s.state = DeviceState::Online;
    s.ts = now_us();
    s.agent_version = Some("bench".into());
    s.models.insert(MODEL.into(), running.into());
    if let Some((rollout, state, reason)) = ota {
        s.ota.push(OtaReport {
            model: MODEL.into(),
            version: NEW.into(),
            rollout: Some(rollout.into()),
            state,
            reason,
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
    downloads: Option<Arc<Downloads>>,
    stop: CancellationToken,
) {
    let mut opts = MqttOptions::new(format!("bench-sim-{n}"), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let cap = devices.len() * 4 + 16;
    opts.set_request_channel_capacity(cap);
    let (client, mut el) = AsyncClient::new(opts, cap);
    let mut done: HashSet<String> = HashSet::new();
    let up = |topic: String, payload: Vec<u8>| publish_up(&client, &bytes, topic, payload);
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
                    status(
                        &d.device,
                        OLD,
                        Some((&rollout, OtaState::Downloading, None)),
                    ),
                );
                let Some(dl) = downloads.clone() else {
                    finish(&client, &bytes, &d.device, &rollout, Ok(0));
                    continue;
                };
                let (client, bytes) = (client.clone(), bytes.clone());
                let (url, sha256, size) = (
                    m.url.clone().unwrap_or_default(),
                    m.sha256.clone().unwrap_or_default(),
                    m.size.unwrap_or(0),
                );
                let device = d.device.clone();
                tokio::spawn(async move {
                    let got = download(dl, device.clone(), url, sha256, size).await;
                    finish(&client, &bytes, &device, &rollout, got);
                });
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

fn publish_up(client: &AsyncClient, bytes: &Bytes, topic: String, payload: Vec<u8>) {
    bytes
        .up
        .fetch_add((topic.len() + payload.len()) as u64, Ordering::Relaxed);
    bytes.up_msgs.fetch_add(1, Ordering::Relaxed);
    let _ = client.try_publish(topic, QoS::AtLeastOnce, true, payload);
}

/// After the download (or none): `verified` then `active`, or `failed` with the reason.
fn finish(
    client: &AsyncClient,
    bytes: &Bytes,
    device: &str,
    rollout: &str,
    got: Result<u64, String>,
) {
    let topic = format!("ember/v1/{device}/status");
    match got {
        Ok(n) => {
            if n > 0 {
                bytes.bundle.fetch_add(n, Ordering::Relaxed);
                bytes.downloads.fetch_add(1, Ordering::Relaxed);
            }
            publish_up(
                client,
                bytes,
                topic.clone(),
                status(device, OLD, Some((rollout, OtaState::Verified, None))),
            );
            publish_up(
                client,
                bytes,
                topic,
                status(device, NEW, Some((rollout, OtaState::Active, None))),
            );
        }
        Err(e) => {
            eprintln!("{device}: download failed: {e}");
            bytes.download_failures.fetch_add(1, Ordering::Relaxed);
            publish_up(
                client,
                bytes,
                topic,
                status(device, OLD, Some((rollout, OtaState::Failed, Some(e)))),
            );
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

/// One call to the fleet's API with the admin token: (status, body).
fn http_call(port: u16, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, String)> {
    let r =
        FleetClient::local(port)
            .with_token(TOKEN)
            .send(method, path, &[], body.map(Body::Json))?;
    Ok((r.status, r.text()))
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}
