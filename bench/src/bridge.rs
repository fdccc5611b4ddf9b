//! `ember-bench bridge`: throughput of `ember-fleet bridge` (MQTT to Google Pub/Sub) into the
//! Pub/Sub emulator, against the plain MQTT path measured in the same run.
//!
//! What runs (all on 127.0.0.1, ephemeral ports):
//! * the load of `ember-bench fleet` (`--devices` simulated devices over `--connections` MQTT
//!   connections, JSON telemetry of `--records` records × `--channels` values at QoS 1 as fast
//!   as the broker takes it, plus each device's statuses), into a real Mosquitto;
//! * baseline: the broker's delivery of that load to one plain QoS 1 subscriber connection in
//!   a shared subscription (what the fleet's MQTT ingestion reads, without decoding or
//!   storing: its upper bound);
//! * the case: `ember-fleet bridge` (the binary next to this one) with its defaults, publishing
//!   to a topic of the Pub/Sub emulator (`TestPubSub`) that one ordered subscription holds.
//!   Throughput is the bridge's own `bridge_messages_total{outcome="published"}` (messages
//!   Pub/Sub acknowledged and the bridge then PUBACKed) over the window; records are the
//!   telemetry messages among them × `--records`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use ember_testkit::{TestBroker, TestPubSub, free_port};

use crate::fleet::{self, Load};

const WARMUP: Duration = Duration::from_secs(5);

#[derive(clap::Args, Clone)]
pub struct Args {
    /// Simulated devices.
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Records per telemetry message.
    #[arg(long, default_value_t = 10)]
    records: usize,
    /// Values per record.
    #[arg(long, default_value_t = 6)]
    channels: usize,
    /// MQTT connections the devices are multiplexed over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// The bridge's `bridge.max_in_flight`.
    #[arg(long, default_value_t = 1000)]
    max_in_flight: usize,
}

/// The bridge as a child process; killed when dropped.
struct Bridge {
    child: Child,
    port: u16,
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_bridge(
    bin: &Path,
    dir: &Path,
    broker: u16,
    emulator: &TestPubSub,
    args: &Args,
) -> Result<Bridge> {
    let port = free_port();
    let conf = dir.join("bridge.toml");
    std::fs::write(
        &conf,
        format!(
            "data_dir = \"{}\"\n[log]\nlevel = \"warn\"\n[http]\nlisten = \"127.0.0.1:{port}\"\n\
             [mqtt]\nhost = \"127.0.0.1\"\nport = {broker}\nclient_id = \"bench-bridge\"\n\
             [bridge]\ntopic = \"{}\"\nmax_in_flight = {}\n",
            dir.display(),
            TestPubSub::topic_name("bench-ingest"),
            args.max_in_flight
        ),
    )?;
    let child = Command::new(bin)
        .arg("--config")
        .arg(&conf)
        .arg("bridge")
        .env("PUBSUB_EMULATOR_HOST", emulator.host())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("bridge.err"))?)
        .spawn()?;
    let bridge = Bridge { child, port };
    let deadline = Instant::now() + Duration::from_secs(60);
    while fleet::metrics(port)
        .get("mqtt_connected")
        .copied()
        .unwrap_or(0.0)
        < 1.0
    {
        if Instant::now() >= deadline {
            bail!(
                "the bridge did not connect within 60 s; its log:\n{}",
                std::fs::read_to_string(dir.join("bridge.err")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(bridge)
}

/// (messages, telemetry messages) the bridge published so far.
fn published(port: u16) -> (f64, f64) {
    let m = fleet::metrics(port);
    let mut all = 0.0;
    let mut telemetry = 0.0;
    for (k, v) in &m {
        if k.starts_with("bridge_messages_total") && k.contains("outcome=\"published\"") {
            all += v;
            if k.contains("channel=\"telemetry\"") {
                telemetry += v;
            }
        }
    }
    (all, telemetry)
}

pub async fn run(args: Args, measure: Duration) -> Result<()> {
    let bin = fleet::sibling_binary("ember-fleet")?;
    println!("machine: {}", super::machine());
    println!("load at start: {}", fleet::loadavg());
    println!(
        "load: {} devices over {} MQTT connections, {} records x {} channels per message (JSON, QoS 1), as fast as taken; warm-up {} s, window {} s",
        args.devices,
        args.connections,
        args.records,
        args.channels,
        WARMUP.as_secs(),
        measure.as_secs()
    );
    let load_args = fleet::Args::load(args.devices, args.records, args.channels, args.connections);

    let plain = fleet::broker_delivery(&load_args, measure).await?;
    eprintln!("broker delivery to one plain subscriber: {plain:.0} records/s");

    let emulator = TestPubSub::start();
    emulator.create_topic("bench-ingest");
    emulator.create_subscription("bench-fleet", "bench-ingest", true, 60);
    let broker = TestBroker::start();
    let dir = tempfile::Builder::new()
        .prefix("ember-bench-bridge-")
        .tempdir()?;
    let bridge = start_bridge(&bin, dir.path(), broker.port(), &emulator, &args)?;
    let load = Arc::new(Load::default());
    let tasks = fleet::start_load(broker.port(), &load_args, &load);
    // The publishers hold back while too much is published but not taken downstream.
    let feed = {
        let load = load.clone();
        let port = bridge.port;
        let records = args.records as f64;
        tokio::spawn(async move {
            loop {
                let (_, t) = published(port);
                load.downstream
                    .store((t * records) as u64, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    tokio::time::sleep(WARMUP).await;
    let (m0, t0) = published(bridge.port);
    let cpu0 = fleet::proc_cpu(bridge.child.id());
    let start = Instant::now();
    tokio::time::sleep(measure).await;
    let (m1, t1) = published(bridge.port);
    let cpu = (fleet::proc_cpu(bridge.child.id()) - cpu0) / start.elapsed().as_secs_f64();
    let secs = start.elapsed().as_secs_f64();
    feed.abort();
    fleet::stop_load(&load, tasks).await?;
    let metrics = fleet::metrics(bridge.port);
    let errors = metrics
        .get("bridge_publish_errors_total")
        .copied()
        .unwrap_or(0.0);
    drop(bridge);
    println!("load at end: {}", fleet::loadavg());

    let msgs = (m1 - m0) / secs;
    let records = (t1 - t0) * args.records as f64 / secs;
    let plain_msgs = plain / args.records as f64;
    println!();
    println!("| path | messages/s | records/s | of plain MQTT delivery |");
    println!("|---|---:|---:|---:|");
    println!(
        "| Mosquitto → one plain QoS 1 subscriber (shared subscription; the MQTT ingestion path's broker leg) | {plain_msgs:.0} | {plain:.0} | baseline |"
    );
    println!(
        "| Mosquitto → `ember-fleet bridge` → Pub/Sub emulator (ordering key = device, PUBACK after Pub/Sub's ack) | **{msgs:.0}** | **{records:.0}** | **{:.2}** |",
        records / plain
    );
    println!();
    println!(
        "bridge CPU {:.0}% of one core; publish errors {errors:.0}; messages include the devices' statuses",
        cpu * 100.0
    );
    Ok(())
}
