//! `ember-bench ack`: what end-to-end acknowledgement costs and how fast records reach the
//! database.
//!
//! 1. **Throughput** (one agent, 4 unbounded 6-channel sources, 100 records/message,
//!    `fsync = every_batch`, `full_policy = block`, a 16 MiB queue, as in `ember-bench e2e`),
//!    through a real Mosquitto into a real `ember-fleet` (release binary, SQLite), once with
//!    `mqtt.delivery = "puback"` (records leave on the broker's PUBACK) and once with
//!    `"commit"` (records leave on the fleet's commit watermark). Reported: records/s leaving
//!    the agent's queue and stored by the fleet, and the queue's size at the end of the window;
//!    against the two ceilings of `ember-bench e2e` (plain publish, bare storage) measured in
//!    the same run. In `puback` mode the broker buffers what the fleet has not stored yet, so
//!    the fleet's stored rate there is what the fleet can ingest (a third ceiling).
//! 2. **Sensor-to-database latency** at 1,000 records/s per device for 10 and 100 devices
//!    (real agents, default configuration): the fleet's `record_commit_latency_seconds`
//!    histogram (capture time on the agent to the commit of the transaction that stored the
//!    record; one machine, one clock) over the measurement window: p50, p99 and the highest
//!    bucket reached, interpolated within buckets.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use ember_testkit::{TestAgent, TestBroker, free_port};

use crate::fleet::{FleetProcess, metrics, sibling_binary};
use crate::{CHANNELS, IN_FLIGHT, STREAMS, agent_binary, bare_storage, machine, plain_publish};

#[derive(clap::Args, Clone)]
pub struct Args {
    /// Device counts for the latency part, each at 1,000 records/s.
    #[arg(long, value_delimiter = ',', default_value = "10,100")]
    devices: Vec<usize>,
    /// Records/s per device in the latency part.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// `mqtt.delivery` of the agents in the latency part (`puback` gives the queue baseline).
    #[arg(long, default_value = "auto")]
    delivery: String,
    /// Skip the throughput part.
    #[arg(long)]
    latency_only: bool,
}

const WARMUP: Duration = Duration::from_secs(5);

pub async fn run(args: Args, measure: Duration) -> Result<()> {
    println!("machine: {}", machine());
    let fleet_bin = sibling_binary("ember-fleet")?;
    if !args.latency_only {
        throughput(&fleet_bin, measure).await?;
    }
    println!();
    println!(
        "| devices × records/s, delivery | offered rec/s | stored rec/s | p50 | p99 | max (bucket) | agent queue (mean records, mean MiB on disk) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---|");
    for n in &args.devices {
        let row = latency(&fleet_bin, *n, &args, measure).await?;
        println!("{row}");
    }
    Ok(())
}

fn fleet_config(dir: &Path, broker: u16, http: u16) -> String {
    format!(
        "bootstrap_token = \"bench-admin-token-0123456789abcdef\"\n\
         data_dir = \"{d}\"\n\
         [log]\nlevel = \"warn\"\n\
         [http]\nlisten = \"127.0.0.1:{http}\"\n\
         [database]\nurl = \"sqlite://{d}/fleet.db\"\n\
         [mqtt]\nhost = \"127.0.0.1\"\nport = {broker}\nclient_id = \"ember-fleet-bench\"\n",
        d = dir.display()
    )
}

/// A fresh Mosquitto and a fresh fleet (SQLite in a temp dir, kept while the `TempDir` lives)
/// with its HTTP port.
fn broker_and_fleet(
    fleet_bin: &Path,
) -> Result<(TestBroker, tempfile::TempDir, u16, FleetProcess)> {
    let broker = TestBroker::start();
    let dir = tempfile::Builder::new()
        .prefix("ember-bench-ack-")
        .tempdir()?;
    let http = free_port();
    let fleet = FleetProcess::start(
        fleet_bin,
        dir.path(),
        &fleet_config(dir.path(), broker.port(), http),
        http,
    )?;
    Ok((broker, dir, http, fleet))
}

struct Mode {
    delivery: &'static str,
    agent_rate: f64,
    stored_rate: f64,
    queue_records: f64,
    queue_disk_bytes: f64,
    resent: f64,
}

async fn throughput(fleet_bin: &Path, measure: Duration) -> Result<()> {
    let broker = TestBroker::start();
    let publish = plain_publish(broker.port(), 100, measure).await?;
    let storage = bare_storage(100, crate::Deletes::Range, measure)?;
    drop(broker);
    let mut modes = Vec::new();
    for delivery in ["puback", "commit"] {
        modes.push(mode(fleet_bin, delivery, measure).await?);
    }
    let fleet_ceiling = modes
        .iter()
        .find(|m| m.delivery == "puback")
        .map_or(f64::NAN, |m| m.stored_rate);
    let ceiling = publish.min(storage);
    println!();
    println!(
        "| case | records/s leaving the agent | stored by the fleet rec/s | ratio | queue at the end |"
    );
    println!("|---|---:|---:|---|---|");
    println!("| plain rumqttc QoS1 loop, 100-record messages | {publish:.0} | | baseline | |");
    println!("| bare sled: append 100 + fsync + range delete | {storage:.0} | | baseline | |");
    for m in &modes {
        println!(
            "| agent → Mosquitto → ember-fleet (SQLite), delivery = {} | {:.0} | {:.0} | {:.2} of the slower ceiling, {:.2} of the fleet's ingest rate | {:.0} records, {:.1} MiB on disk, {:.0} re-sent |",
            m.delivery,
            m.agent_rate,
            m.stored_rate,
            m.agent_rate / ceiling,
            m.agent_rate / fleet_ceiling,
            m.queue_records,
            m.queue_disk_bytes / 1048576.0,
            m.resent
        );
    }
    Ok(())
}

async fn mode(fleet_bin: &Path, delivery: &'static str, measure: Duration) -> Result<Mode> {
    let (broker, _dir, http, fleet) = broker_and_fleet(fleet_bin)?;
    let mut b = TestAgent::builder(agent_binary()?)
        .device_id("bench-ack")
        .broker_port(broker.port())
        .delivery(delivery)
        .set("log", "level", "\"warn\"")
        .set("mqtt", "max_in_flight", &IN_FLIGHT.to_string())
        .set("mqtt", "message_max_records", "100")
        .set("mqtt", "message_max_delay_ms", "5")
        .set("queue", "fsync", "\"every_batch\"")
        .set("queue", "full_policy", "\"block\"")
        .set("queue", "max_bytes", "16777216")
        .set("queue", "reclaim_bytes", "1099511627776");
    for i in 0..STREAMS {
        b = b.sim(&format!("s{i}"), 100_000.0, CHANNELS);
    }
    let agent = b.start();
    tokio::time::sleep(WARMUP).await;
    let (a0, f0) = (agent.metrics(), metrics(http));
    let t0 = Instant::now();
    tokio::time::sleep(measure).await;
    let (a1, f1) = (agent.metrics(), metrics(http));
    let secs = t0.elapsed().as_secs_f64();
    let delta =
        |m1: &std::collections::BTreeMap<String, f64>,
         m0: &std::collections::BTreeMap<String, f64>,
         k: &str| { m1.get(k).copied().unwrap_or(0.0) - m0.get(k).copied().unwrap_or(0.0) };
    let stored = "records_total{outcome=\"stored\"}";
    let m = Mode {
        delivery,
        agent_rate: delta(&a1, &a0, "records_acked_total") / secs,
        stored_rate: delta(&f1, &f0, stored) / secs,
        queue_records: a1.get("queue_records").copied().unwrap_or(0.0),
        queue_disk_bytes: a1.get("queue_disk_bytes").copied().unwrap_or(0.0),
        resent: a1.get("records_resent_total").copied().unwrap_or(0.0),
    };
    eprintln!(
        "delivery = {delivery}: agent {:.0}/s, fleet stored {:.0}/s, captured {:.0}/s, queue {:.0} records",
        m.agent_rate,
        m.stored_rate,
        delta(&a1, &a0, "records_captured_total") / secs,
        m.queue_records
    );
    drop(agent);
    drop(fleet);
    Ok(m)
}

/// The latency histogram's cumulative bucket counts: `(le, count)`, ascending.
fn buckets(m: &std::collections::BTreeMap<String, f64>) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = m
        .iter()
        .filter_map(|(k, v)| {
            let le = k
                .strip_prefix("record_commit_latency_seconds_bucket{le=\"")?
                .strip_suffix("\"}")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, *v))
        })
        .collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// The `q` quantile of a window's cumulative histogram, interpolated within its bucket.
fn quantile(window: &[(f64, f64)], q: f64) -> f64 {
    let total = window.last().map_or(0.0, |b| b.1);
    if total == 0.0 {
        return f64::NAN;
    }
    let want = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, n) in window {
        if n >= want {
            if !le.is_finite() {
                return prev.0;
            }
            let span = (n - prev.1).max(1.0);
            return prev.0 + (le - prev.0) * ((want - prev.1) / span);
        }
        prev = (le, n);
    }
    prev.0
}

fn ms(s: f64) -> String {
    if s.is_nan() {
        "n/a".into()
    } else {
        format!("{:.0} ms", s * 1000.0)
    }
}

async fn latency(
    fleet_bin: &Path,
    devices: usize,
    args: &Args,
    measure: Duration,
) -> Result<String> {
    let (broker, _dir, http, fleet) = broker_and_fleet(fleet_bin)?;
    let bin = agent_binary()?;
    let mut agents = Vec::with_capacity(devices);
    for i in 0..devices {
        agents.push(
            TestAgent::builder(&bin)
                .device_id(&format!("lat-{i:03}"))
                .broker_port(broker.port())
                .delivery(&args.delivery)
                .set("log", "level", "\"warn\"")
                .sim("imu", f64::from(args.rate), 3)
                .spawn(),
        );
    }
    for a in &agents {
        a.wait_ready(Duration::from_secs(60));
    }
    tokio::time::sleep(WARMUP).await;
    let m0 = metrics(http);
    let t0 = Instant::now();
    tokio::time::sleep(measure).await;
    let m1 = metrics(http);
    let secs = t0.elapsed().as_secs_f64();
    let (b0, b1) = (buckets(&m0), buckets(&m1));
    let window: Vec<(f64, f64)> = b1
        .iter()
        .map(|(le, n)| {
            let before = b0.iter().find(|(l, _)| l == le).map_or(0.0, |(_, c)| *c);
            (*le, n - before)
        })
        .collect();
    let total = window.last().map_or(0.0, |b| b.1);
    let max_bucket = window
        .iter()
        .find(|(_, n)| *n >= total && total > 0.0)
        .map_or(f64::NAN, |(le, _)| *le);
    let stored = "records_total{outcome=\"stored\"}";
    let stored_rate =
        (m1.get(stored).copied().unwrap_or(0.0) - m0.get(stored).copied().unwrap_or(0.0)) / secs;
    let committed_mode = agents
        .iter()
        .filter(|a| a.metric("delivery_commit") == 1.0)
        .count();
    let mean = |k: &str| agents.iter().map(|a| a.metric(k)).sum::<f64>() / devices as f64;
    let (queue_records, queue_disk) = (mean("queue_records"), mean("queue_disk_bytes"));
    eprintln!(
        "{devices} devices: {committed_mode} in commit mode, {total:.0} records in the window, max since start {:.3} s",
        m1.get("record_commit_latency_max_seconds")
            .copied()
            .unwrap_or(f64::NAN)
    );
    drop(agents);
    drop(fleet);
    Ok(format!(
        "| {devices} × {}, {} | {} | {stored_rate:.0} | {} | {} | ≤ {} | {queue_records:.0}, {:.2} |",
        args.rate,
        args.delivery,
        devices * args.rate as usize,
        ms(quantile(&window, 0.5)),
        ms(quantile(&window, 0.99)),
        ms(max_bucket),
        queue_disk / 1048576.0
    ))
}
