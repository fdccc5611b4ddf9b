//! `ember-bench`: system benchmarks of the agent's data path, each reported as a ratio to a
//! baseline measured in the same run (see `docs/benchmarks.md`).
//!
//! ```text
//! cargo build --release -p ember-agent -p ember-bench
//! target/release/ember-bench e2e        # throughput vs. plain rumqttc and bare sled
//! target/release/ember-bench rss        # agent memory while streaming 1,000 records/s
//! target/release/ember-bench rss --models --smaps [--baseline OLD_AGENT]  # 100 Hz, both int8 models
//! cargo build --release -p ember-fleet -p ember-bench
//! target/release/ember-bench --seconds 30 fleet   # fleet ingest + API latency (see fleet.rs)
//! target/release/ember-bench rollout              # 1,000-device staged rollout (rollout.rs)
//! cargo build --release -p ember-agent -p ember-fleet -p ember-bench
//! target/release/ember-bench --seconds 20 ack     # end-to-end acknowledgement: cost, latency (ack.rs)
//! target/release/ember-bench --seconds 20 bridge  # MQTT to Pub/Sub emulator (bridge.rs)
//! ```
//!
//! Cases are declared in `cases()`: what load, which configuration, what is measured. Every
//! broker is a real Mosquitto on an ephemeral 127.0.0.1 port; every agent is the real binary.

mod ack;
mod bridge;
mod fleet;
mod lake;
mod rollout;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use ember_agent::queue::{Engine, SledEngine};
use ember_proto::{Encoding, TelemetryBatch};
use ember_testkit::{TestAgent, TestAgentBuilder, TestBroker};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

#[derive(Parser)]
struct Cli {
    /// Seconds each case is measured for (after a warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// End-to-end throughput with 1 and 100 records per message, against both ceilings.
    E2e,
    /// Resident memory of the agent streaming 1,000 records/s for the measurement time, or
    /// (`--models`) one 6-channel 100 Hz replay through both committed int8 models.
    Rss(RssArgs),
    /// Fleet ingest throughput (SQLite, PostgreSQL) and API latency under 1,000 devices.
    Fleet(fleet::Args),
    /// A staged rollout to 1,000 simulated devices: create to completed, MQTT bytes each way
    /// (with --include-downloads, every device also downloads and checks the bundle), against
    /// publishing the same number of retained messages.
    Rollout(rollout::Args),
    /// `ember-fleet bridge` (MQTT to Pub/Sub) into the Pub/Sub emulator: messages/s and
    /// records/s, against the broker's plain delivery in the same run.
    Bridge(bridge::Args),
    /// The data lake: Parquet export records/s against inserting the same rows into the
    /// database, and the lake's size per million records against the database's.
    Lake(lake::Args),
    /// End-to-end acknowledgement: throughput with and without it through a real fleet, against
    /// both ceilings, and the sensor-to-database latency at 1,000 records/s per device.
    Ack(ack::Args),
}

/// One end-to-end case: the agent's configuration under an unbounded source.
struct Case {
    name: &'static str,
    records_per_message: usize,
    fsync: &'static str,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "agent, 100 records/message, every_batch",
            records_per_message: 100,
            fsync: "every_batch",
        },
        Case {
            name: "agent, 100 records/message, interval_ms=1000",
            records_per_message: 100,
            fsync: "interval_ms",
        },
        Case {
            name: "agent, 100 records/message, never",
            records_per_message: 100,
            fsync: "never",
        },
        Case {
            name: "agent, 1 record/message, every_batch",
            records_per_message: 1,
            fsync: "every_batch",
        },
    ]
}

const CHANNELS: usize = 6;
const STREAMS: usize = 4;
const IN_FLIGHT: usize = 32;

fn main() -> Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let measure = Duration::from_secs(cli.seconds);
    match cli.cmd {
        Cmd::E2e => rt.block_on(e2e(measure)),
        Cmd::Rss(args) => rt.block_on(rss(args, measure)),
        Cmd::Fleet(args) => rt.block_on(fleet::run(args, measure)),
        Cmd::Rollout(args) => rt.block_on(rollout::run(args)),
        Cmd::Ack(args) => rt.block_on(ack::run(args, measure)),
        Cmd::Bridge(args) => rt.block_on(bridge::run(args, measure)),
        Cmd::Lake(args) => rt.block_on(lake::run(args)),
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cores} cores, {cpu}")
}

async fn e2e(measure: Duration) -> Result<()> {
    println!("machine: {}", machine());
    let broker = TestBroker::start();
    let mut rows: Vec<(String, f64)> = Vec::new();

    let publish_100 = plain_publish(broker.port(), 100, measure).await?;
    rows.push((
        "plain rumqttc QoS1 loop, 100-record messages".into(),
        publish_100,
    ));
    let publish_1 = plain_publish(broker.port(), 1, measure).await?;
    rows.push((
        "plain rumqttc QoS1 loop, 1-record messages".into(),
        publish_1,
    ));
    let storage_100 = bare_storage(100, Deletes::Range, measure)?;
    rows.push((
        "bare sled: append 100 + fsync + range delete".into(),
        storage_100,
    ));
    let storage_1 = bare_storage(1, Deletes::Range, measure)?;
    rows.push((
        "bare sled: append 1 + fsync + range delete".into(),
        storage_1,
    ));
    // For transparency: the same with the point deletes the agent uses (not the ceiling the
    // target is defined against, but the faster way to use sled here).
    let storage_100_points = bare_storage(100, Deletes::Points, measure)?;
    rows.push((
        "bare sled: append 100 + fsync + point deletes (for information)".into(),
        storage_100_points,
    ));

    let mut agent_rows = Vec::new();
    for case in cases() {
        let rate = agent_throughput(broker.port(), &case, measure).await?;
        agent_rows.push((case, rate));
    }

    println!();
    println!("| case | records/s | ratio |");
    println!("|---|---:|---|");
    for (name, rate) in &rows {
        println!("| {name} | {rate:.0} | baseline |");
    }
    for (case, rate) in &agent_rows {
        let (publish, storage) = if case.records_per_message == 100 {
            (publish_100, storage_100)
        } else {
            (publish_1, storage_1)
        };
        let ceiling = publish.min(storage);
        println!(
            "| {} | {rate:.0} | {:.2} of plain publish, {:.2} of bare storage, **{:.2} of the slower ceiling** |",
            case.name,
            rate / publish,
            rate / storage,
            rate / ceiling
        );
    }
    Ok(())
}

/// A telemetry message of `n` records, as the agent would encode it.
fn payload(n: usize) -> Vec<u8> {
    let mut b = TelemetryBatch::new("bench-0", "imu");
    for i in 0..n {
        b.push(
            i as u64 + 1,
            1_800_000_000_000_000 + i as u64 * 1000,
            (0..CHANNELS).map(|c| c as f32 * 0.731 + 0.1).collect(),
        );
    }
    ember_proto::message::encode(&b, Encoding::Json).unwrap_or_default()
}

/// Ceiling 1: a plain rumqttc QoS1 publish loop with the agent's in-flight window and message
/// size. Returns records/s acknowledged.
async fn plain_publish(port: u16, records: usize, measure: Duration) -> Result<f64> {
    let body = payload(records);
    let mut o = MqttOptions::new(format!("bench-plain-{records}"), "127.0.0.1", port);
    o.set_max_packet_size(1 << 20, body.len() + 1024);
    o.set_inflight(IN_FLIGHT as u16);
    o.set_keep_alive(Duration::from_secs(30));
    let (client, mut ev) = AsyncClient::new(o, IN_FLIGHT * 2);
    ev.network_options.set_tcp_nodelay(true);
    let acked = Arc::new(AtomicU64::new(0));
    let in_flight = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let warmup = Duration::from_secs(2);
    let mut t0: Option<(Instant, u64)> = None;
    loop {
        while (in_flight.load(Ordering::Relaxed) as usize) < IN_FLIGHT {
            if client
                .try_publish(
                    "ember/v1/bench-0/telemetry",
                    QoS::AtLeastOnce,
                    false,
                    body.clone(),
                )
                .is_err()
            {
                break;
            }
            in_flight.fetch_add(1, Ordering::Relaxed);
        }
        match ev
            .poll()
            .await
            .context("plain publish loop lost the broker")?
        {
            Event::Incoming(Packet::PubAck(_)) => {
                in_flight.fetch_sub(1, Ordering::Relaxed);
                acked.fetch_add(1, Ordering::Relaxed);
            }
            Event::Outgoing(Outgoing::Publish(_)) | Event::Incoming(_) | Event::Outgoing(_) => {}
        }
        if t0.is_none() && start.elapsed() >= warmup {
            t0 = Some((Instant::now(), acked.load(Ordering::Relaxed)));
        }
        if let Some((t, a)) = t0
            && t.elapsed() >= measure
        {
            let msgs = acked.load(Ordering::Relaxed) - a;
            return Ok(msgs as f64 * records as f64 / t.elapsed().as_secs_f64());
        }
    }
}

/// Ceiling 2: the bare storage engine doing what the queue must per batch: append `batch`
/// records, fsync, and range-delete the previous batch (as an acknowledgement would).
#[derive(Clone, Copy)]
enum Deletes {
    /// One range delete per batch (the ceiling the target is defined against).
    Range,
    /// Point deletes, as the agent's queue does.
    Points,
}

fn bare_storage(batch: usize, deletes: Deletes, measure: Duration) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let engine = SledEngine::open(&dir.path().join("db"), 2 << 20, Some(500))?;
    let value = ember_proto::StoredRecord::encode(b"k", 1, &[0.25; CHANNELS]);
    let key = |seq: u64| {
        let mut k = vec![b'r', 0, 0, 0, 0];
        k.extend_from_slice(&seq.to_be_bytes());
        k
    };
    let mut seq = 0u64;
    let mut done = 0u64;
    let start = Instant::now();
    while start.elapsed() < measure {
        let first = seq + 1;
        let puts = (0..batch)
            .map(|_| {
                seq += 1;
                (key(seq), value.clone())
            })
            .collect();
        engine.apply(puts, Vec::new())?;
        engine.sync()?;
        if first > batch as u64 {
            let (from, to) = (first - batch as u64, first - 1);
            match deletes {
                Deletes::Range => {
                    engine.delete_range(&key(from), &key(to))?;
                }
                Deletes::Points => {
                    let keys: Vec<Vec<u8>> = (from..=to).map(key).collect();
                    let refs: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
                    engine.remove_keys(&refs)?;
                }
            }
        }
        done += batch as u64;
    }
    Ok(done as f64 / start.elapsed().as_secs_f64())
}

fn agent_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .map(|d| d.join("ember-agent"))
        .context("no parent directory")?;
    if !bin.exists() {
        bail!(
            "{} not found: build it first with `cargo build --release -p ember-agent -p ember-bench`",
            bin.display()
        );
    }
    Ok(bin)
}

/// An agent with `streams` simulated sources of `rate` Hz each, logging only warnings.
fn agent(broker: u16, device: &str, streams: usize, rate: f64) -> Result<TestAgentBuilder> {
    let mut b = TestAgent::builder(agent_binary()?)
        .device_id(device)
        .broker_port(broker)
        .set("log", "level", "\"warn\"")
        .set("mqtt", "max_in_flight", &IN_FLIGHT.to_string());
    for i in 0..streams {
        b = b.sim(&format!("s{i}"), rate, CHANNELS);
    }
    Ok(b)
}

/// The agent under a source faster than it can ship: records/s acknowledged by the broker in
/// the measurement window (after a warm-up).
async fn agent_throughput(broker: u16, case: &Case, measure: Duration) -> Result<f64> {
    let mut b = agent(broker, "bench-agent", STREAMS, 100_000.0)?
        .set(
            "mqtt",
            "message_max_records",
            &case.records_per_message.to_string(),
        )
        .set("mqtt", "message_max_delay_ms", "5")
        .set("queue", "fsync", &format!("\"{}\"", case.fsync))
        // Backpressure instead of an ever-growing backlog: the sources run exactly as fast as
        // the whole pipeline (append, fsync, publish, PUBACK, delete) can carry records.
        .set("queue", "full_policy", "\"block\"")
        .set("queue", "max_bytes", "16777216")
        .set("queue", "reclaim_bytes", "1099511627776");
    if case.fsync == "interval_ms" {
        b = b.set("queue", "fsync_interval_ms", "1000");
    }
    let agent = b.start();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let m0 = agent.metrics();
    let t0 = Instant::now();
    tokio::time::sleep(measure).await;
    let m1 = agent.metrics();
    let secs = t0.elapsed().as_secs_f64();
    let rate =
        |k: &str| (m1.get(k).copied().unwrap_or(0.0) - m0.get(k).copied().unwrap_or(0.0)) / secs;
    eprintln!(
        "{}: acked {:.0}/s, enqueued {:.0}/s, captured {:.0}/s, backlog {:.0} records",
        case.name,
        rate("records_acked_total"),
        rate("records_enqueued_total"),
        rate("records_captured_total"),
        m1.get("queue_records").copied().unwrap_or(0.0)
    );
    Ok(rate("records_acked_total"))
}

#[derive(clap::Args)]
struct RssArgs {
    /// One 6-channel 100 Hz replay (BasicMotions, looped) through both committed int8 models
    /// (`activity` and `anomaly`, as the demo's agents run them) instead of the 1,000 records/s
    /// simulated sensor.
    #[arg(long)]
    models: bool,
    /// The agent binary to measure (default: `ember-agent` beside this binary), e.g. a
    /// `device`-profile build: target/device/ember-agent.
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Another agent binary (an older build) to measure the same way in the same run; the
    /// report gives this one's figures as ratios to it.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// Print the resident memory per mapping class (/proc/PID/smaps) at the end.
    #[arg(long)]
    smaps: bool,
}

/// What one agent's memory looked like over a run.
struct Memory {
    /// Median VmRSS over the second half of the measurement (MiB).
    plateau: f64,
    /// VmHWM at the end (MiB).
    peak: f64,
    /// /proc/PID/smaps_rollup at the end: anonymous and file-backed resident MiB.
    anon: f64,
    file: f64,
    threads: u64,
    acked: f64,
    inferences: f64,
    /// CPU seconds (user + system) the agent spent in the measurement window.
    cpu: f64,
    /// Mean time of one model call (µs; both models, the whole run).
    infer_us: f64,
}

/// User + system CPU seconds of a process so far (`/proc/PID/stat` fields 14 and 15, in
/// USER_HZ ticks: 100 per second on every Linux ABI Ember ships for).
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces: count from after its closing parenthesis.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let field = |n: usize| -> f64 {
        rest.split_whitespace()
            .nth(n - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    Ok((field(14) + field(15)) / 100.0)
}

fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel)
}

/// `/proc/PID/<file>` fields of the `Name:   N kB` form, in MiB.
fn kb_field(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

async fn rss(args: RssArgs, measure: Duration) -> Result<()> {
    println!("machine: {}", machine());
    let broker = TestBroker::start();
    let case = if args.models {
        "one 6-channel 100 Hz replay through both int8 models"
    } else {
        "one 6-channel simulated sensor at 1,000 records/s"
    };
    let bin = match args.agent {
        Some(bin) => bin,
        None => agent_binary()?,
    };
    let ours = rss_case(&bin, broker.port(), args.models, args.smaps, measure).await?;
    let base = match &args.baseline {
        Some(bin) => Some(rss_case(bin, broker.port(), args.models, args.smaps, measure).await?),
        None => None,
    };
    println!("agent streaming {case} for {} s:", measure.as_secs());
    let line = |who: &str, m: &Memory| {
        println!(
            "  {who}: RSS plateau {:.1} MiB (anon {:.1}, file {:.1}), peak {:.1} MiB, {} threads; acked {} records, {} inferences ({:.1} µs a model call); CPU {:.2} s ({:.1} % of one core)",
            m.plateau,
            m.anon,
            m.file,
            m.peak,
            m.threads,
            m.acked,
            m.inferences,
            m.infer_us,
            m.cpu,
            100.0 * m.cpu / measure.as_secs_f64()
        );
    };
    line("agent", &ours);
    if let Some(b) = &base {
        line("baseline", b);
        println!(
            "  ratio agent/baseline: plateau {:.3}, peak {:.3}, anon {:.3}, file {:.3}, CPU {:.3}, model call {:.3}",
            ours.plateau / b.plateau,
            ours.peak / b.peak,
            ours.anon / b.anon,
            ours.file / b.file,
            ours.cpu / b.cpu,
            ours.infer_us / b.infer_us
        );
    }
    Ok(())
}

async fn rss_case(
    bin: &std::path::Path,
    broker: u16,
    models: bool,
    smaps: bool,
    measure: Duration,
) -> Result<Memory> {
    let mut b = TestAgent::builder(bin)
        .device_id("bench-rss")
        .broker_port(broker)
        .set("log", "level", "\"warn\"")
        .set("mqtt", "max_in_flight", &IN_FLIGHT.to_string());
    if models {
        let bundle = |name: &str| repo_path(&format!("models/bundles/{name}"));
        let key = repo_path("models/keys/dev/dev.pub");
        b = b
            .replay_ts(
                "motion",
                &repo_path("models/data/BasicMotions_TEST.ts"),
                100.0,
                true,
            )
            .set(
                "inference",
                "trusted_keys",
                &format!("[{:?}]", key.display().to_string()),
            )
            .model(&bundle("activity-int8.bundle"), "motion")
            .model(&bundle("anomaly-int8.bundle"), "motion");
    } else {
        b = b.sim("s0", 1000.0, CHANNELS);
    }
    let agent = b.start();
    let pid = agent.pid().context("the agent is not running")?;
    let mut samples = Vec::new();
    let cpu0 = cpu_seconds(pid)?;
    let t0 = Instant::now();
    while t0.elapsed() < measure || samples.is_empty() {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        samples.push(kb_field(&status, "VmRSS:"));
    }
    let cpu = cpu_seconds(pid)? - cpu0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let mut tail = samples[samples.len() / 2..].to_vec();
    tail.sort_by(f64::total_cmp);
    let rss = kb_field(&rollup, "Rss:");
    let anon = kb_field(&rollup, "Anonymous:");
    if smaps {
        print_smaps(pid, bin)?;
    }
    let m = agent.metrics();
    let total = |prefix: &str| -> f64 {
        m.iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| *v)
            .sum()
    };
    Ok(Memory {
        plateau: tail[tail.len() / 2],
        peak: kb_field(&status, "VmHWM:"),
        anon,
        file: rss - anon,
        threads: status
            .lines()
            .find(|l| l.starts_with("Threads:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        acked: m.get("records_acked_total").copied().unwrap_or(0.0),
        inferences: total("inference_windows_total"),
        cpu,
        infer_us: 1e6 * total("inference_latency_seconds_sum")
            / total("inference_latency_seconds_count"),
    })
}

/// Resident memory per class of mapping: the agent's own binary, shared libraries, the brk
/// heap, anonymous mappings (glibc's per-thread malloc arenas and large allocations; 2 MiB ones
/// are thread stacks), the main stack.
fn print_smaps(pid: u32, bin: &std::path::Path) -> Result<()> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_else(|_| bin.to_path_buf());
    let mut classes: std::collections::BTreeMap<String, (f64, usize)> = Default::default();
    let mut current: Option<String> = None;
    for line in smaps.lines() {
        let mut parts = line.split_whitespace();
        let first = parts.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            let (lo, hi) = first.split_once('-').unwrap_or(("0", "0"));
            let start = u64::from_str_radix(lo, 16).unwrap_or(0);
            let size = u64::from_str_radix(hi, 16)
                .unwrap_or(0)
                .saturating_sub(start);
            let perms = parts.next().unwrap_or("");
            let path = parts.nth(3).unwrap_or("");
            let class = if path == exe.to_string_lossy() {
                format!("binary {perms}")
            } else if path == "[heap]" {
                "[heap] (the main malloc arena)".into()
            } else if path == "[stack]" {
                "[stack] (main thread)".into()
            } else if path.starts_with('[') {
                path.to_string()
            } else if path.is_empty() && (2 << 20..(2 << 20) + (64 << 10)).contains(&size) {
                "anon: thread stacks (2 MiB)".into()
            } else if path.is_empty() && start.is_multiple_of(64 << 20) && perms.starts_with("rw") {
                // glibc's per-thread arenas are 64 MiB-aligned reservations.
                "anon: malloc arenas of other threads".into()
            } else if path.is_empty() {
                "anon: other (large allocations, guard pages)".into()
            } else if path.contains(".so") {
                "shared libraries".into()
            } else {
                "other files".into()
            };
            current = Some(class);
        } else if first == "Rss:"
            && let Some(class) = &current
        {
            let kb: f64 = parts.next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
            let e = classes.entry(class.clone()).or_default();
            e.0 += kb / 1024.0;
            e.1 += 1;
        }
    }
    println!("  resident memory per mapping class ({}):", bin.display());
    for (class, (mib, n)) in &classes {
        println!("    {class:<48} {mib:>6.2} MiB  ({n} mappings)");
    }
    Ok(())
}
