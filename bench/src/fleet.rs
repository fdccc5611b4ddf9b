//! `ember-bench fleet`: ingest throughput of one `ember-fleet` instance under 1,000 simulated
//! devices, and the latency of the dashboard's API calls under that load.
//!
//! What runs (all on 127.0.0.1, ephemeral ports):
//! * a real Mosquitto ([`TestBroker`]) and, per PostgreSQL case, a throwaway PostgreSQL 15
//!   cluster ([`TestPostgres`]; production durability unless the case says otherwise);
//! * the real `ember-fleet` release binary as a child process, so the service runs with its own
//!   runtime exactly as deployed and its CPU time can be read from `/proc`;
//! * the load: `--devices` simulated devices multiplexed over `--connections` MQTT
//!   connections, each message a valid JSON `TelemetryBatch` of `--records` records ×
//!   `--channels` values (envelope CRCs, per-device increasing seqs) on
//!   `ember/v1/<device>/telemetry` at QoS 1, plus an `online` status per device at start,
//!   every 10 s, and a final one with the last seq (so the ledger can prove completeness).
//!   The offered rate is paced to `--rate` records/s (0: as fast as the broker acknowledges);
//!   the publishers also hold back while more than `LAG_CAP` records are published but not
//!   stored, so the broker's queue stays bounded when the fleet is the slower side (the table
//!   says how long they held back);
//! * a dashboard: one thread pages through `GET /api/v1/devices` (100 a page), another opens
//!   device pages (`GET /api/v1/devices/{id}` then `/ledger`), each with 50 ms between calls;
//!   latencies are collected only during the measurement window.
//!
//! Baselines in the same run: the plain delivery rate of the broker to one subscriber
//! connection (same publishers, same messages, a bare rumqttc QoS 1 subscriber that only
//! counts), and per database the raw insert ceiling: one task writing only the telemetry rows,
//! one multi-row `INSERT INTO telemetry ... ON CONFLICT DO NOTHING RETURNING seq` per message,
//! through the fleet's own pool and statement builder, one transaction per `batch_max_records`
//! records, into a second database on the same server (same disk), before and after the fleet.
//!
//! Stored throughput is the fleet's `records_total{outcome="stored"}` (rows actually inserted)
//! over the window; at the end every device's ledger must show `received = captured`, nothing
//! missing or lost, and `COUNT(*)` of the telemetry table must equal what was published.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ember_fleet::config::Settings;
use ember_fleet::db::{Db, Sql};
use ember_host::client::{ClientError, FleetClient};
use ember_proto::{DeviceState, Encoding, Status, StreamStatus, TelemetryBatch};
use ember_testkit::{TestBroker, TestPostgres, free_port, localhost};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use sqlx::Row;

/// The bootstrap admin token of the fleet under test.
const TOKEN: &str = "bench-admin-token-0123456789abcdef";
const STREAM: &str = "imu";
/// Messages one publisher connection keeps unacknowledged.
const WINDOW: u16 = 64;
/// Most records published but not yet stored before publishers hold back.
const LAG_CAP: u64 = 200_000;
/// Each device's status period (the agent's default `mqtt.status_interval_s`).
const STATUS_EVERY: Duration = Duration::from_secs(10);
/// A simulated device samples at this period (50 Hz); only the timestamps depend on it.
const SAMPLE_US: u64 = 20_000;
/// Pause between two calls of one dashboard client.
const THINK: Duration = Duration::from_millis(50);
/// Longest wait for the fleet to store the backlog once publishing stops.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(300);
const WARMUP: Duration = Duration::from_secs(10);
/// With `--ramp`: how long each step after the first runs before its window, so the fleet
/// settles at the new rate (or its backlog starts to show).
const STEP_SETTLE: Duration = Duration::from_secs(5);
/// A ramp step is sustained when the publishers offered at least this share of its rate,
/// the fleet stored at least this share of what was offered, and the unstored backlog grew
/// by less than `1 - SUSTAINED` of the offered rate.
const SUSTAINED: f64 = 0.95;

#[derive(clap::Args, Clone)]
pub struct Args {
    /// Cases to run, in order: sqlite, postgres (fsync and synchronous_commit on),
    /// postgres-nofsync (the test cluster's fsync/synchronous_commit/full_page_writes off).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "sqlite,postgres,postgres-nofsync"
    )]
    db: Vec<DbCase>,
    /// Simulated devices.
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// Records per telemetry message.
    #[arg(long, default_value_t = 100)]
    records: usize,
    /// Values per record.
    #[arg(long, default_value_t = 6)]
    channels: usize,
    /// Offered records/s over all devices (0: as fast as the broker takes them).
    #[arg(long, default_value_t = 50_000.0)]
    rate: f64,
    /// MQTT connections the devices are multiplexed over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Fleet `ingest.batch_max_records` (default: the fleet's).
    #[arg(long)]
    batch_max_records: Option<usize>,
    /// Fleet `ingest.batch_max_delay_ms` (default: the fleet's).
    #[arg(long)]
    batch_max_delay_ms: Option<u64>,
    /// Fleet `ingest.channel_capacity` (default: the fleet's).
    #[arg(long)]
    channel_capacity: Option<usize>,
    /// Fleet `database.max_connections` (default: the fleet's).
    #[arg(long)]
    max_connections: Option<u32>,
    /// The fleet binary to run (default: `ember-fleet` next to this one); for A/B runs.
    #[arg(long)]
    fleet_bin: Option<PathBuf>,
    /// Skip the baselines (broker delivery, database ceiling): for parameter sweeps only.
    #[arg(long)]
    no_baselines: bool,
    /// Replica counts to run per database case, in order (`1,2,3`): that many `ember-fleet`
    /// processes in one shared-subscription group on one database (PostgreSQL only; SQLite
    /// runs one process), each with its own stable client id, on a fresh database each.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    replicas: Vec<usize>,
    /// Ramp the offered load through these rates (records/s, ascending), each step `--seconds`
    /// long after `STEP_SETTLE`, until the fleet falls behind (see [`Step::verdict`]); reports
    /// every step and the maximum sustained rate. Overrides `--rate`.
    #[arg(long, value_delimiter = ',')]
    ramp: Vec<f64>,
    /// Fleet `ingest.copy_min_records` (default: the fleet's); not passed to an `--fleet-bin`
    /// that predates it unless given.
    #[arg(long)]
    copy_min_records: Option<usize>,
}

impl Args {
    /// The load alone (no database case), as fast as the broker takes it: for other benchmarks
    /// that reuse these publishers (`ember-bench bridge`).
    pub(crate) fn load(
        devices: usize,
        records: usize,
        channels: usize,
        connections: usize,
    ) -> Args {
        Args {
            db: Vec::new(),
            devices,
            records,
            channels,
            rate: 0.0,
            connections,
            batch_max_records: None,
            batch_max_delay_ms: None,
            channel_capacity: None,
            max_connections: None,
            fleet_bin: None,
            no_baselines: false,
            replicas: vec![1],
            ramp: Vec::new(),
            copy_min_records: None,
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum DbCase {
    Sqlite,
    Postgres,
    PostgresNofsync,
}

impl DbCase {
    fn label(self) -> &'static str {
        match self {
            DbCase::Sqlite => "SQLite (WAL, synchronous=FULL)",
            DbCase::Postgres => "PostgreSQL 15 (fsync on, synchronous_commit on)",
            DbCase::PostgresNofsync => "PostgreSQL 15 (fsync off, synchronous_commit off)",
        }
    }
}

/// A database for one case, deleted (or stopped) when dropped.
enum Store {
    Sqlite(tempfile::TempDir),
    Postgres(TestPostgres),
}

impl Store {
    fn new(case: DbCase) -> Result<Store> {
        Ok(match case {
            DbCase::Sqlite => Store::Sqlite(
                tempfile::Builder::new()
                    .prefix("ember-bench-fleet-")
                    .tempdir()?,
            ),
            DbCase::Postgres => Store::Postgres(TestPostgres::start_durable()),
            DbCase::PostgresNofsync => Store::Postgres(TestPostgres::start()),
        })
    }

    /// The URL of database `name` (a file in the temp dir, or a database on the server).
    fn url(&self, name: &str) -> String {
        match self {
            Store::Sqlite(dir) => format!(
                "sqlite://{}",
                dir.path().join(format!("{name}.db")).display()
            ),
            Store::Postgres(pg) if name == "postgres" => pg.url(),
            Store::Postgres(pg) => pg.create_database(name),
        }
    }

    /// The PostgreSQL server's postmaster, for its CPU time.
    fn postgres_pid(&self) -> Option<u32> {
        match self {
            Store::Sqlite(_) => None,
            Store::Postgres(pg) => pg.pid(),
        }
    }

    /// The fleet's database for the run with `replicas` replicas (a fresh one per run).
    fn fleet_url(&self, replicas: usize) -> String {
        match (self, replicas) {
            (Store::Sqlite(_), _) => self.url("fleet"),
            (Store::Postgres(_), 1) => self.url("postgres"),
            (Store::Postgres(_), n) => self.url(&format!("fleet_{n}_replicas")),
        }
    }
}

/// One case's numbers.
struct Outcome {
    case: DbCase,
    replicas: usize,
    /// Mean of the ceiling measured before and after the fleet, and the two values.
    ceiling: f64,
    ceiling_range: (f64, f64),
    /// PostgreSQL: the same with binary `COPY` (NaN for SQLite).
    copy_ceiling: f64,
    copy_ceiling_range: (f64, f64),
    /// The step the summary shows: the maximum sustained one of a ramp.
    step: Step,
    steps: Vec<Step>,
    max_sustained: Option<usize>,
    ramp: bool,
    check: String,
}

/// One measurement window at one offered rate.
#[derive(Default, Clone)]
struct Step {
    /// The rate asked of the publishers (0: as fast as the broker takes them).
    target: f64,
    offered: f64,
    stored: f64,
    /// Records/s by which the published-but-unstored backlog grew over the window.
    backlog_growth: f64,
    /// Share of the window the publishers were held back by the backlog cap.
    held_back: f64,
    list: Latencies,
    device: Latencies,
    ledger: Latencies,
    page: Latencies,
    http_errors: u64,
    /// CPU, in cores (1.0 = one core busy): the fleet processes, PostgreSQL (postmaster and
    /// backends), Mosquitto, and this process (load generator, dashboard clients, scraper).
    cpu_fleet: f64,
    cpu_postgres: f64,
    cpu_broker: f64,
    cpu_bench: f64,
    /// Share of all cores busy, and how many there are.
    machine_busy: f64,
    cores: f64,
    flush_ms: f64,
    batch_records: f64,
}

/// What a step reads at its start and end.
struct Sample {
    at: Instant,
    metrics: std::collections::BTreeMap<String, f64>,
    published: u64,
    held_back_us: u64,
    cpu: [f64; 4],
    machine: (f64, f64),
}

/// Where a step's numbers come from.
struct Probe {
    ports: Vec<u16>,
    fleets: Vec<u32>,
    broker: Option<u32>,
    postgres: Option<u32>,
}

impl Probe {
    async fn sample(&self, load: &Load) -> Sample {
        let ports = self.ports.clone();
        let metrics = tokio::task::spawn_blocking(move || metrics_sum(&ports))
            .await
            .unwrap_or_default();
        Sample {
            at: Instant::now(),
            metrics,
            published: load.records.load(Ordering::Relaxed),
            held_back_us: load.held_back_us.load(Ordering::Relaxed),
            cpu: [
                self.fleets.iter().map(|p| proc_cpu(*p)).sum(),
                self.postgres.map_or(0.0, tree_cpu),
                self.broker.map_or(0.0, proc_cpu),
                proc_cpu(std::process::id()),
            ],
            machine: machine_jiffies(),
        }
    }
}

impl Step {
    fn between(target: f64, a: &Sample, b: &Sample, dash: Samples, connections: usize) -> Step {
        let secs = b.at.duration_since(a.at).as_secs_f64();
        let delta = |k: &str| {
            b.metrics.get(k).copied().unwrap_or(0.0) - a.metrics.get(k).copied().unwrap_or(0.0)
        };
        let stored_at = |s: &Sample| s.metrics.get(STORED).copied().unwrap_or(0.0);
        let backlog = |s: &Sample| s.published as f64 - stored_at(s);
        let flushes = delta("db_seconds_count{op=\"flush\"}");
        let cores = std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64);
        let (lists, devices, ledgers, pages, errors) = dash;
        Step {
            target,
            offered: (b.published - a.published) as f64 / secs,
            stored: delta(STORED) / secs,
            backlog_growth: (backlog(b) - backlog(a)) / secs,
            held_back: (b.held_back_us - a.held_back_us) as f64 / 1e6 / secs / connections as f64,
            list: lists,
            device: devices,
            ledger: ledgers,
            page: pages,
            http_errors: errors,
            cpu_fleet: (b.cpu[0] - a.cpu[0]) / secs,
            cpu_postgres: (b.cpu[1] - a.cpu[1]) / secs,
            cpu_broker: (b.cpu[2] - a.cpu[2]) / secs,
            cpu_bench: (b.cpu[3] - a.cpu[3]) / secs,
            machine_busy: (b.machine.0 - a.machine.0) / (b.machine.1 - a.machine.1),
            cores,
            flush_ms: delta("db_seconds_sum{op=\"flush\"}") / flushes * 1e3,
            batch_records: delta("batch_records_sum") / delta("batch_records_count").max(1.0),
        }
    }

    /// Whether the fleet kept up with this step (see [`SUSTAINED`]).
    fn sustained(&self) -> bool {
        self.verdict() == "sustained"
    }

    fn verdict(&self) -> &'static str {
        if self.held_back > 0.01 {
            "behind: publishers held back by the backlog cap"
        } else if self.stored < SUSTAINED * self.offered {
            "behind: stored < 95% of offered"
        } else if self.backlog_growth > (1.0 - SUSTAINED) * self.offered {
            "behind: backlog growing"
        } else if self.target > 0.0 && self.offered < SUSTAINED * self.target {
            "generator limit: offered < 95% of the step, not held back"
        } else {
            "sustained"
        }
    }

    /// CPU of each process group in % of one core, and of the whole machine in %.
    fn cpu(&self) -> String {
        format!(
            "{:.0} / {:.0} / {:.0} / {:.0} / {:.0} of {:.0}",
            self.cpu_fleet * 100.0,
            self.cpu_postgres * 100.0,
            self.cpu_broker * 100.0,
            self.cpu_bench * 100.0,
            self.machine_busy * self.cores * 100.0,
            self.cores * 100.0
        )
    }

    fn line(&self) -> String {
        format!(
            "step {}: offered {:.0}/s, stored {:.0}/s, backlog {:+.0}/s, held back {:.0}%, mean flush {:.1} ms for {:.0} records, list p50/p99 {} ms, page {} ms, CPU % of a core fleet/postgres/mosquitto/bench/machine {}: {}",
            if self.target > 0.0 {
                format!("{:.0}", self.target)
            } else {
                "max".into()
            },
            self.offered,
            self.stored,
            self.backlog_growth,
            self.held_back * 100.0,
            self.flush_ms,
            self.batch_records,
            self.list.show(),
            self.page.show(),
            self.cpu(),
            self.verdict()
        )
    }
}

#[derive(Default, Clone)]
struct Latencies(Vec<f64>);

impl Latencies {
    fn pct(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        let i = ((p / 100.0) * v.len() as f64).ceil() as usize;
        v[i.clamp(1, v.len()) - 1]
    }

    fn show(&self) -> String {
        format!("{:.1} / {:.1}", self.pct(50.0) * 1e3, self.pct(99.0) * 1e3)
    }
}

pub async fn run(args: Args, measure: Duration) -> Result<()> {
    let fleet_bin = match &args.fleet_bin {
        Some(p) => p.clone(),
        None => sibling_binary("ember-fleet")?,
    };
    println!("machine: {}", super::machine());
    println!("load at start: {}", loadavg());
    println!(
        "load: {} devices over {} MQTT connections, {} records x {} channels per message (JSON, QoS 1), offered {} records/s; warm-up {} s, window {} s",
        args.devices,
        args.connections,
        args.records,
        args.channels,
        if args.rate > 0.0 {
            format!("{:.0}", args.rate)
        } else {
            "max".into()
        },
        WARMUP.as_secs(),
        measure.as_secs()
    );

    let delivery = if args.no_baselines {
        f64::NAN
    } else {
        let d = broker_delivery(&args, measure).await?;
        eprintln!("broker delivery to one plain subscriber: {d:.0} records/s");
        d
    };

    let mut outcomes = Vec::new();
    for case in args.db.clone() {
        eprintln!("== {}", case.label());
        let store = Store::new(case)?;
        let batch = args
            .batch_max_records
            .unwrap_or(ember_fleet::config::DEFAULT_BATCH_MAX_RECORDS);
        let pg = case != DbCase::Sqlite;
        // The ceilings are measured before and after the fleet (the machine's load drifts),
        // and their mean is the baseline.
        let (before, copy_before) =
            ceilings(&store, &args, batch, measure, pg, ("before", "a")).await?;
        let mut runs = Vec::new();
        for &replicas in &args.replicas {
            if case == DbCase::Sqlite && replicas != 1 {
                eprintln!("(SQLite runs one process: {replicas} replicas skipped)");
                continue;
            }
            eprintln!("-- {replicas} replica(s)");
            runs.push(fleet_case(&args, case, &store, &fleet_bin, measure, replicas).await?);
        }
        let (after, copy_after) =
            ceilings(&store, &args, batch, measure, pg, ("after", "b")).await?;
        for mut o in runs {
            o.ceiling = (before + after) / 2.0;
            o.ceiling_range = (before.min(after), before.max(after));
            o.copy_ceiling = (copy_before + copy_after) / 2.0;
            o.copy_ceiling_range = (copy_before.min(copy_after), copy_before.max(copy_after));
            outcomes.push(o);
        }
    }
    println!("load at end: {}", loadavg());

    println!();
    println!(
        "| case | replicas | offered rec/s | stored rec/s | of DB ceiling | DB ceiling rec/s (before-after) | device list p50 / p99 ms | device page p50 / p99 ms (device + ledger) | exactly once |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---|");
    println!(
        "| Mosquitto plain delivery, one subscriber connection | | | {delivery:.0} | | | | | baseline |"
    );
    for o in &outcomes {
        let st = &o.step;
        println!(
            "| {}{} | {} | {:.0} | **{:.0}** | **{:.2}** | {:.0} ({:.0}-{:.0}) | {} | {} | {} |",
            o.case.label(),
            if o.ramp {
                ", max sustained ramp step"
            } else {
                ""
            },
            o.replicas,
            st.offered,
            st.stored,
            st.stored / o.ceiling,
            o.ceiling,
            o.ceiling_range.0,
            o.ceiling_range.1,
            st.list.show(),
            st.page.show(),
            o.check
        );
    }
    println!();
    for o in &outcomes {
        let st = &o.step;
        println!(
            "{} x{}: stored/broker delivery {:.2}; publishers held back {:.0}% of the window; GET device p50/p99 {} ms, ledger {} ms, {} list + {} page samples, {} HTTP errors; CPU % of one core fleet/postgres/mosquitto/bench/machine {}; mean flush {:.1} ms for {:.0} records",
            o.case.label(),
            o.replicas,
            st.stored / delivery,
            st.held_back * 100.0,
            st.device.show(),
            st.ledger.show(),
            st.list.0.len(),
            st.page.0.len(),
            st.http_errors,
            st.cpu(),
            st.flush_ms,
            st.batch_records
        );
    }
    for o in outcomes.iter().filter(|o| o.ramp) {
        println!();
        println!(
            "Ramp, {} x{} (DB ceiling INSERT {:.0} ({:.0}-{:.0}), COPY {:.0} ({:.0}-{:.0}) rec/s):",
            o.case.label(),
            o.replicas,
            o.ceiling,
            o.ceiling_range.0,
            o.ceiling_range.1,
            o.copy_ceiling,
            o.copy_ceiling_range.0,
            o.copy_ceiling_range.1
        );
        println!();
        println!(
            "| step rec/s | offered | stored | of INSERT ceiling | of COPY ceiling | backlog rec/s | mean flush ms (records) | list p50 / p99 ms | page p50 / p99 ms | CPU % of a core: fleet / postgres / mosquitto / bench / machine | verdict |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|");
        for st in &o.steps {
            println!(
                "| {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {:+.0} | {:.1} ({:.0}) | {} | {} | {} | {} |",
                st.target,
                st.offered,
                st.stored,
                st.stored / o.ceiling,
                st.stored / o.copy_ceiling,
                st.backlog_growth,
                st.flush_ms,
                st.batch_records,
                st.list.show(),
                st.page.show(),
                st.cpu(),
                st.verdict()
            );
        }
        match o.max_sustained {
            Some(i) => println!(
                "\nmax sustained: {:.0} rec/s stored at the {:.0} rec/s step = {:.2} of the INSERT ceiling, {:.2} of the COPY ceiling; list p50/p99 {} ms, page {} ms; {}",
                o.steps[i].stored,
                o.steps[i].target,
                o.steps[i].stored / o.ceiling,
                o.steps[i].stored / o.copy_ceiling,
                o.steps[i].list.show(),
                o.steps[i].page.show(),
                o.check
            ),
            None => println!("\nno step sustained; {}", o.check),
        }
    }
    Ok(())
}

pub(crate) fn sibling_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .map(|d| d.join(name))
        .context("no parent directory")?;
    if !bin.exists() {
        bail!(
            "{} not found: build it first with `cargo build --release -p ember-fleet -p ember-bench`",
            bin.display()
        );
    }
    Ok(bin)
}

pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

// ---- the load ---------------------------------------------------------------------------

/// Counters shared by the publishers and the harness.
#[derive(Default)]
pub(crate) struct Load {
    /// Telemetry records handed to the MQTT clients (QoS 1).
    records: AtomicU64,
    /// Messages of any kind handed to the clients, and PUBACKs received for them.
    messages: AtomicU64,
    acks: AtomicU64,
    /// Records the downstream (the fleet, or the plain subscriber) has taken.
    pub(crate) downstream: AtomicU64,
    /// Microseconds publishers spent held back by `LAG_CAP`.
    held_back_us: AtomicU64,
    /// Set to stop publishing telemetry (final statuses follow).
    stop: AtomicBool,
    /// The offered rate in records/s (`f64` bits; 0: as fast as the broker takes them); a
    /// ramp raises it while the publishers run.
    rate: AtomicU64,
}

/// Publishes for the devices `first, first + step, ...` on one connection until `load.stop`;
/// returns each of its devices' last seq.
async fn publisher(
    port: u16,
    conn: usize,
    devices: Vec<String>,
    args: Args,
    load: Arc<Load>,
) -> Result<Vec<(String, u64)>> {
    let mut o = MqttOptions::new(
        format!("bench-devices-{conn}-{}", std::process::id()),
        "127.0.0.1",
        port,
    );
    o.set_max_packet_size(1 << 20, 1 << 20);
    o.set_inflight(WINDOW);
    o.set_keep_alive(Duration::from_secs(30));
    let (client, mut ev) = AsyncClient::new(o, 16);
    ev.network_options.set_tcp_nodelay(true);
    let acks = load.clone();
    let poller = tokio::spawn(async move {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    acks.acks.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Event::Incoming(Packet::Disconnect)) => return,
                Ok(_) => {}
                Err(e) => {
                    if !acks.stop.load(Ordering::Relaxed) {
                        eprintln!("publisher connection ended: {e}");
                    }
                    return;
                }
            }
        }
    });

    let base_ts = now_us();
    let mut seqs = vec![0u64; devices.len()];
    let mut last_status = vec![Instant::now(); devices.len()];
    for d in &devices {
        publish(&client, &load, &status_topic(d), status(d, 0), true).await?;
    }
    let mut next = tokio::time::Instant::now();
    let mut i = 0usize;
    while !load.stop.load(Ordering::Relaxed) {
        let rate = f64::from_bits(load.rate.load(Ordering::Relaxed));
        if rate > 0.0 {
            // Seconds per message on this connection, for the share of the offered rate it
            // carries; a publisher that fell behind catches up for at most a second.
            let interval =
                Duration::from_secs_f64(args.records as f64 * args.connections as f64 / rate);
            let now = tokio::time::Instant::now();
            next = (next + interval).max(now.checked_sub(Duration::from_secs(1)).unwrap_or(now));
            tokio::time::sleep_until(next).await;
        }
        // The backlog cap: at least two seconds of the offered rate.
        let cap = LAG_CAP.max((rate * 2.0) as u64);
        let t = Instant::now();
        let mut held = false;
        while load.records.load(Ordering::Relaxed) > load.downstream.load(Ordering::Relaxed) + cap
            && !load.stop.load(Ordering::Relaxed)
        {
            held = true;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if held {
            load.held_back_us
                .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
            next = tokio::time::Instant::now();
        }
        let d = &devices[i];
        if last_status[i].elapsed() >= STATUS_EVERY {
            last_status[i] = Instant::now();
            publish(&client, &load, &status_topic(d), status(d, seqs[i]), true).await?;
        }
        let mut b = TelemetryBatch::new(d, STREAM);
        for _ in 0..args.records {
            seqs[i] += 1;
            let seq = seqs[i];
            let values = (0..args.channels)
                .map(|c| (seq % 1000) as f32 * 0.01 + c as f32)
                .collect();
            b.push(seq, base_ts + seq * SAMPLE_US, values);
        }
        let body = ember_proto::message::encode(&b, Encoding::Json)?;
        publish(
            &client,
            &load,
            &format!("ember/v1/{d}/telemetry"),
            body,
            false,
        )
        .await?;
        load.records
            .fetch_add(args.records as u64, Ordering::Relaxed);
        i = (i + 1) % devices.len();
    }
    for (i, d) in devices.iter().enumerate() {
        publish(&client, &load, &status_topic(d), status(d, seqs[i]), true).await?;
    }
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(30), poller).await;
    Ok(devices.into_iter().zip(seqs).collect())
}

async fn publish(
    client: &AsyncClient,
    load: &Load,
    topic: &str,
    body: Vec<u8>,
    retain: bool,
) -> Result<()> {
    client
        .publish(topic, QoS::AtLeastOnce, retain, body)
        .await
        .context("the publisher's MQTT client stopped")?;
    load.messages.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

fn status_topic(device: &str) -> String {
    format!("ember/v1/{device}/status")
}

/// An `online` status saying records `1..=last_seq` were captured and none is queued.
fn status(device: &str, last_seq: u64) -> Vec<u8> {
    let mut s = Status::offline(device);
    s.state = DeviceState::Online;
    s.ts = now_us();
    s.agent_version = Some("ember-bench".into());
    s.streams.push(StreamStatus {
        head: None,
        channels: None,
        stream: STREAM.into(),
        last_seq,
        queued: 0,
        evicted: Vec::new(),
    });
    ember_proto::message::encode(&s, Encoding::Json).unwrap_or_default()
}

fn device_ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("dev-{i:05}")).collect()
}

/// A publisher task; it returns each of its devices' last seq.
pub(crate) type Publisher = tokio::task::JoinHandle<Result<Vec<(String, u64)>>>;

/// Starts the publishers; each connection carries every `connections`-th device.
pub(crate) fn start_load(port: u16, args: &Args, load: &Arc<Load>) -> Vec<Publisher> {
    let first = args.ramp.first().copied().unwrap_or(args.rate);
    load.rate.store(first.to_bits(), Ordering::Relaxed);
    let ids = device_ids(args.devices);
    (0..args.connections)
        .map(|c| {
            let mine: Vec<String> = ids
                .iter()
                .skip(c)
                .step_by(args.connections)
                .cloned()
                .collect();
            tokio::spawn(publisher(port, c, mine, args.clone(), load.clone()))
        })
        .collect()
}

/// Stops the publishers and waits until they sent their final statuses and every message
/// was acknowledged; returns every device's last seq.
pub(crate) async fn stop_load(load: &Load, tasks: Vec<Publisher>) -> Result<Vec<(String, u64)>> {
    load.stop.store(true, Ordering::Relaxed);
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.extend(t.await??);
    }
    Ok(seqs)
}

// ---- baselines --------------------------------------------------------------------------

/// Records/s the broker delivers to one plain QoS 1 subscriber (shared subscription, automatic
/// acknowledgements, nothing decoded) from the same publishers.
pub(crate) async fn broker_delivery(args: &Args, measure: Duration) -> Result<f64> {
    let broker = TestBroker::start();
    let load = Arc::new(Load::default());
    let mut o = MqttOptions::new("bench-plain-subscriber", "127.0.0.1", broker.port());
    o.set_max_packet_size(1 << 20, 1 << 20);
    o.set_keep_alive(Duration::from_secs(30));
    let (client, mut ev) = AsyncClient::new(o, 64);
    ev.network_options.set_tcp_nodelay(true);
    client
        .subscribe("$share/ember-fleet/ember/v1/+/telemetry", QoS::AtLeastOnce)
        .await?;
    let counter = load.clone();
    let records = args.records as u64;
    let sub = tokio::spawn(async move {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::Publish(_))) => {
                    counter.downstream.fetch_add(records, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut plain = args.clone();
    plain.rate = 0.0;
    plain.ramp = Vec::new();
    let tasks = start_load(broker.port(), &plain, &load);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (t0, d0) = (Instant::now(), load.downstream.load(Ordering::Relaxed));
    tokio::time::sleep(measure).await;
    let rate = (load.downstream.load(Ordering::Relaxed) - d0) as f64 / t0.elapsed().as_secs_f64();
    stop_load(&load, tasks).await?;
    sub.abort();
    Ok(rate)
}

/// The bare database ceilings, INSERT and (PostgreSQL) COPY, into databases named by `tag`
/// (NaN with `--no-baselines`); `when` is for the log line.
async fn ceilings(
    store: &Store,
    args: &Args,
    batch: usize,
    measure: Duration,
    pg: bool,
    (when, tag): (&str, &str),
) -> Result<(f64, f64)> {
    if args.no_baselines {
        return Ok((f64::NAN, f64::NAN));
    }
    let c = db_ceiling(&store.url(&format!("ceiling_{tag}")), args, batch, measure).await?;
    eprintln!("database ceiling (INSERT) {when}: {c:.0} records/s");
    let k = if pg {
        let k = db_copy_ceiling(
            &store.url(&format!("copy_ceiling_{tag}")),
            args,
            batch,
            measure,
        )
        .await?;
        eprintln!("database ceiling (COPY) {when}: {k:.0} records/s");
        k
    } else {
        f64::NAN
    };
    Ok((c, k))
}

/// Records/s of the fleet writer's telemetry statement alone: per transaction, `batch`
/// records as `batch / records` multi-row inserts of one device's stream each.
async fn db_ceiling(url: &str, args: &Args, batch: usize, measure: Duration) -> Result<f64> {
    let settings = Settings::from_toml(
        &format!("[database]\nurl = \"{url}\"\n"),
        "bench",
        Vec::new(),
    )?;
    let db = Db::open(&settings.database).await?;
    let ids = device_ids(args.devices);
    let mut seqs = vec![0u64; ids.len()];
    let per_tx = (batch / args.records).max(1);
    let base_ts = now_us() as i64;
    let mut device = 0usize;
    let mut stored = 0u64;
    let start = Instant::now();
    let mut t0: Option<(Instant, u64)> = None;
    loop {
        let mut tx = db.pool().begin().await?;
        for _ in 0..per_tx {
            let id = &ids[device];
            let mut q = Sql::new(
                "INSERT INTO telemetry (device_id, stream, seq, ts, vals, received_at) VALUES ",
            );
            let d = q.param(id.as_str());
            let s = q.param(STREAM);
            let at = now_us() as i64;
            for i in 0..args.records {
                seqs[device] += 1;
                let seq = seqs[device] as i64;
                if i > 0 {
                    q.push(", ");
                }
                q.push(&format!("({d}, {s}, "));
                let vals: Vec<u8> = (0..args.channels)
                    .flat_map(|c| ((seq % 1000) as f32 * 0.01 + c as f32).to_le_bytes())
                    .collect();
                q.bind(seq)
                    .push(", ")
                    .bind(base_ts + seq * SAMPLE_US as i64);
                q.push(", ").bind(vals).push(", ").bind(at).push(")");
            }
            q.push(" ON CONFLICT (device_id, stream, seq) DO NOTHING RETURNING seq");
            let rows = q.query().fetch_all(&mut *tx).await?;
            stored += rows.len() as u64;
            device = (device + 1) % ids.len();
        }
        tx.commit().await?;
        if t0.is_none() && start.elapsed() >= Duration::from_secs(3) {
            t0 = Some((Instant::now(), stored));
        }
        if let Some((t, s)) = t0
            && t.elapsed() >= measure
        {
            db.close().await;
            return Ok((stored - s) as f64 / t.elapsed().as_secs_f64());
        }
    }
}

/// Records/s of the fleet writer's PostgreSQL `COPY` path alone: per transaction, `batch`
/// records of `batch / records` devices copied in binary into the writer's staging table
/// ([`ember_fleet::server::ingest::staging`]), then moved into `telemetry` by the writer's
/// `INSERT ... SELECT ... ON CONFLICT DO NOTHING RETURNING` in one transaction of the pool.
async fn db_copy_ceiling(url: &str, args: &Args, batch: usize, measure: Duration) -> Result<f64> {
    use ember_fleet::server::ingest::staging::{StagedRow, Staging, encode_binary};
    let settings = Settings::from_toml(
        &format!("[database]\nurl = \"{url}\"\n"),
        "bench",
        Vec::new(),
    )?;
    let db = Db::open(&settings.database).await?;
    let mut staging = Staging::open(&db.own_url()).await?;
    let insert = format!(
        "INSERT INTO telemetry (device_id, stream, seq, ts, vals, received_at) \
         SELECT device_id, stream, seq, ts, vals, received_at FROM {} \
         ORDER BY device_id, stream, seq \
         ON CONFLICT (device_id, stream, seq) DO NOTHING RETURNING seq",
        staging.table()
    );
    let ids = device_ids(args.devices);
    let mut seqs = vec![0u64; ids.len()];
    let per_tx = (batch / args.records).max(1);
    let base_ts = now_us() as i64;
    let mut device = 0usize;
    let mut stored = 0u64;
    let start = Instant::now();
    let mut t0: Option<(Instant, u64)> = None;
    loop {
        let at = now_us() as i64;
        let mut rows: Vec<(usize, i64, Vec<f32>)> = Vec::with_capacity(per_tx * args.records);
        for _ in 0..per_tx {
            for _ in 0..args.records {
                seqs[device] += 1;
                let seq = seqs[device] as i64;
                let vals = (0..args.channels)
                    .map(|c| (seq % 1000) as f32 * 0.01 + c as f32)
                    .collect();
                rows.push((device, seq, vals));
            }
            device = (device + 1) % ids.len();
        }
        let copy = encode_binary(rows.iter().map(|(d, seq, vals)| StagedRow {
            device: &ids[*d],
            stream: STREAM,
            seq: *seq,
            ts: base_ts + seq * SAMPLE_US as i64,
            vals,
            received_at: at,
        }));
        staging.stage(&copy).await?;
        let mut tx = db.pool().begin().await?;
        stored += sqlx::query(&insert).fetch_all(&mut *tx).await?.len() as u64;
        tx.commit().await?;
        if t0.is_none() && start.elapsed() >= Duration::from_secs(3) {
            t0 = Some((Instant::now(), stored));
        }
        if let Some((t, s)) = t0
            && t.elapsed() >= measure
        {
            staging.close().await;
            db.close().await;
            return Ok((stored - s) as f64 / t.elapsed().as_secs_f64());
        }
    }
}

// ---- the fleet --------------------------------------------------------------------------

/// The `ember-fleet` binary as a child process; SIGTERMed (then killed) when dropped.
pub(crate) struct FleetProcess {
    child: Child,
    log: PathBuf,
}

impl FleetProcess {
    pub(crate) fn start(bin: &Path, dir: &Path, config: &str, port: u16) -> Result<FleetProcess> {
        let conf = dir.join("fleet.toml");
        std::fs::write(&conf, config)?;
        let log = dir.join("fleet.log");
        let child = Command::new(bin)
            .arg("--config")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(dir.join("fleet.err"))?)
            .spawn()
            .with_context(|| format!("cannot run {}", bin.display()))?;
        let fleet = FleetProcess {
            child,
            log: dir.join("fleet.err"),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = api_get(port, "/api/v1/health")
                && r.0 == 200
            {
                return Ok(fleet);
            }
            if Instant::now() >= deadline {
                bail!(
                    "the fleet did not become healthy within 60 s; its log:\n{}",
                    std::fs::read_to_string(&fleet.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for FleetProcess {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// utime + stime of a process, in seconds (clock ticks of 1/100 s, Linux's `USER_HZ`).
pub(crate) fn proc_cpu(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / 100.0
}

/// CPU seconds of a process and its children (PostgreSQL: the postmaster and its backends;
/// a backend that exited between two samples is not counted).
fn tree_cpu(pid: u32) -> f64 {
    let mut total = proc_cpu(pid);
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
                continue;
            };
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(pid) {
                total += proc_cpu(child);
            }
        }
    }
    total
}

/// (busy, total) jiffies of the whole machine.
fn machine_jiffies() -> (f64, f64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<f64> = s
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    let total: f64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    (total - idle, total)
}

fn fleet_config(
    args: &Args,
    url: &str,
    broker: u16,
    http: u16,
    dir: &Path,
    client_id: &str,
) -> String {
    let mut c = format!(
        "bootstrap_token = \"{TOKEN}\"\n\
         data_dir = \"{}\"\n\
         [log]\nlevel = \"warn\"\n\
         [http]\nlisten = \"127.0.0.1:{http}\"\n\
         [database]\nurl = \"{url}\"\n",
        dir.display()
    );
    if let Some(n) = args.max_connections {
        c.push_str(&format!("max_connections = {n}\n"));
    }
    c.push_str(&format!(
        "[mqtt]\nhost = \"127.0.0.1\"\nport = {broker}\nclient_id = \"{client_id}\"\n[ingest]\n"
    ));
    if let Some(n) = args.batch_max_records {
        c.push_str(&format!("batch_max_records = {n}\n"));
    }
    if let Some(n) = args.batch_max_delay_ms {
        c.push_str(&format!("batch_max_delay_ms = {n}\n"));
    }
    if let Some(n) = args.channel_capacity {
        c.push_str(&format!("channel_capacity = {n}\n"));
    }
    if let Some(n) = args.copy_min_records {
        c.push_str(&format!("copy_min_records = {n}\n"));
    }
    c
}

/// The fleet's `/metrics` as `name{labels}` -> value (without the `ember_fleet_` prefix).
pub(crate) fn metrics(port: u16) -> std::collections::BTreeMap<String, f64> {
    let Ok((200, body)) = api_get(port, "/metrics") else {
        return Default::default();
    };
    body.lines()
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

/// Every metric summed over the replicas on `ports`.
fn metrics_sum(ports: &[u16]) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    for p in ports {
        for (k, v) in metrics(*p) {
            *out.entry(k).or_insert(0.0) += v;
        }
    }
    out
}

const STORED: &str = "records_total{outcome=\"stored\"}";
const DUPLICATES: &str = "records_total{outcome=\"duplicate\"}";

async fn fleet_case(
    args: &Args,
    case: DbCase,
    store: &Store,
    bin: &Path,
    measure: Duration,
    replicas: usize,
) -> Result<Outcome> {
    let broker = TestBroker::start();
    let dir = tempfile::Builder::new()
        .prefix("ember-bench-fleet-run-")
        .tempdir()?;
    let url = store.fleet_url(replicas);
    // One data dir for all replicas (their `fs` model store, a shared volume); each process
    // its own config and logs.
    let data = dir.path().join("data");
    let mut fleets = Vec::new();
    let mut ports = Vec::new();
    for i in 0..replicas.max(1) {
        let http = free_port();
        let own = dir.path().join(format!("replica-{i}"));
        std::fs::create_dir_all(&own)?;
        let config = fleet_config(
            args,
            &url,
            broker.port(),
            http,
            &data,
            &format!("ember-fleet-bench-{i}"),
        );
        fleets.push(FleetProcess::start(bin, &own, &config, http)?);
        ports.push(http);
    }
    let http = ports[0];
    let load = Arc::new(Load::default());

    // The fleet's stored counter, scraped five times a second, feeds the publishers' lag cap.
    let scraping = Arc::new(AtomicBool::new(true));
    let scraper = {
        let (load, scraping, ports) = (load.clone(), scraping.clone(), ports.clone());
        std::thread::spawn(move || {
            while scraping.load(Ordering::Relaxed) {
                if let Some(v) = metrics_sum(&ports).get(STORED) {
                    load.downstream.store(*v as u64, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };

    let tasks = start_load(broker.port(), args, &load);
    let measuring = Arc::new(AtomicBool::new(false));
    let dash = Dashboard::start(http, args.devices, measuring.clone());
    tokio::time::sleep(WARMUP).await;

    let probe = Probe {
        ports: ports.clone(),
        fleets: fleets.iter().map(|f| f.child.id()).collect(),
        broker: broker.pid(),
        postgres: store.postgres_pid(),
    };
    let rates = if args.ramp.is_empty() {
        vec![args.rate]
    } else {
        args.ramp.clone()
    };
    let mut steps = Vec::new();
    for (k, &rate) in rates.iter().enumerate() {
        if !args.ramp.is_empty() {
            load.rate.store(rate.to_bits(), Ordering::Relaxed);
            if k > 0 {
                tokio::time::sleep(STEP_SETTLE).await;
            }
        }
        let a = probe.sample(&load).await;
        let samples0 = dash.lengths();
        measuring.store(true, Ordering::Relaxed);
        tokio::time::sleep(measure).await;
        measuring.store(false, Ordering::Relaxed);
        let b = probe.sample(&load).await;
        let step = Step::between(rate, &a, &b, dash.since(samples0), args.connections);
        eprintln!("{}", step.line());
        let behind = !step.sustained();
        steps.push(step);
        if !args.ramp.is_empty() && behind {
            break;
        }
    }

    let seqs = stop_load(&load, tasks).await?;
    let (_, _, _, _, errors) = dash.stop();
    let published: u64 = seqs.iter().map(|(_, s)| *s).sum();
    eprintln!("published {published} records; waiting for the fleet to store them all");
    let check = verify(&ports, &url, &seqs, published).await;
    scraping.store(false, Ordering::Relaxed);
    let _ = scraper.join();
    let check = match check {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e:#}");
            format!("FAILED: {e}")
        }
    };
    for fleet in &fleets {
        let fleet_log = std::fs::read_to_string(&fleet.log).unwrap_or_default();
        if !fleet_log.trim().is_empty() {
            eprintln!(
                "fleet log (warnings and errors):\n{}",
                ember_testkit::tail(&fleet_log, 20)
            );
        }
    }
    drop(fleets);
    // The step reported in the main table: the highest sustained one of a ramp (or the last
    // if none was), the only one otherwise.
    let max_sustained = steps.iter().rposition(Step::sustained);
    let shown = max_sustained.unwrap_or(steps.len().saturating_sub(1));
    let mut step = steps.get(shown).cloned().unwrap_or_default();
    // The dashboard's error count covers the whole run.
    step.http_errors = errors;
    Ok(Outcome {
        case,
        replicas,
        ceiling: f64::NAN,
        ceiling_range: (f64::NAN, f64::NAN),
        copy_ceiling: f64::NAN,
        copy_ceiling_range: (f64::NAN, f64::NAN),
        step,
        steps,
        max_sustained,
        ramp: !args.ramp.is_empty(),
        check,
    })
}

/// Waits until everything published is stored, then checks it is stored exactly once: the
/// fleet's stored counter, `COUNT(*)` of the table and every device's ledger.
async fn verify(
    ports: &[u16],
    url: &str,
    seqs: &[(String, u64)],
    published: u64,
) -> Result<String> {
    let http = ports[0];
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    let mut stored = 0.0;
    while Instant::now() < deadline {
        let p = ports.to_vec();
        stored = tokio::task::spawn_blocking(move || metrics_sum(&p).get(STORED).copied())
            .await?
            .unwrap_or(0.0);
        if stored as u64 >= published {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if (stored as u64) < published {
        bail!("after {DRAIN_TIMEOUT:?} the fleet had stored {stored} of {published} records");
    }
    let p = ports.to_vec();
    let duplicates = tokio::task::spawn_blocking(move || metrics_sum(&p).get(DUPLICATES).copied())
        .await?
        .unwrap_or(0.0);

    let settings = Settings::from_toml(
        &format!("[database]\nurl = \"{url}\"\n"),
        "bench",
        Vec::new(),
    )?;
    let db = Db::connect(&settings.database).await?;
    let count: i64 = sqlx::query("SELECT COUNT(*) AS n FROM telemetry")
        .fetch_one(db.pool())
        .await?
        .try_get("n")?;
    db.close().await;
    if count as u64 != published {
        bail!("the telemetry table holds {count} rows, {published} were published");
    }

    // Every device's ledger; the final statuses may still be on their way, so look again.
    let seqs = seqs.to_vec();
    let devices = seqs.len();
    let ledger = tokio::task::spawn_blocking(move || -> Result<(u64, u64)> {
        let mut open: Vec<(String, u64)> = seqs;
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut last = String::new();
        loop {
            let mut still = Vec::new();
            let mut lost = 0;
            for (d, seq) in open {
                let (code, body) = api_get(http, &format!("/api/v1/devices/{d}/ledger"))?;
                let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                let s = v["streams"]
                    .as_array()
                    .and_then(|a| a.iter().find(|s| s["stream"] == STREAM))
                    .cloned()
                    .unwrap_or_default();
                let ok = code == 200
                    && s["captured"] == seq
                    && s["received"] == seq
                    && s["missing_count"] == 0
                    && s["lost_count"] == 0;
                lost += s["lost_count"].as_u64().unwrap_or(0);
                if !ok {
                    last = format!("{d}: expected {seq}, ledger {s}");
                    still.push((d, seq));
                }
            }
            if still.is_empty() {
                return Ok((0, lost));
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} devices' ledgers are incomplete, e.g. {last}",
                    still.len()
                );
            }
            open = still;
            std::thread::sleep(Duration::from_millis(500));
        }
    })
    .await??;
    Ok(format!(
        "yes: {published} published = {count} rows; {devices} ledgers complete, lost {}; {duplicates:.0} duplicates ignored",
        ledger.1
    ))
}

// ---- the dashboard ----------------------------------------------------------------------

type Samples = (Latencies, Latencies, Latencies, Latencies, u64);

/// Two blocking HTTP clients on their own threads (not on the load's runtime, so a busy
/// publisher cannot delay a measurement).
struct Dashboard {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    samples: Arc<Mutex<Samples>>,
}

impl Dashboard {
    fn start(port: u16, devices: usize, measuring: Arc<AtomicBool>) -> Dashboard {
        let stop = Arc::new(AtomicBool::new(false));
        let samples: Arc<Mutex<Samples>> = Arc::default();
        let list = {
            let (stop, measuring, samples) = (stop.clone(), measuring.clone(), samples.clone());
            std::thread::spawn(move || {
                let mut cursor: Option<String> = None;
                while !stop.load(Ordering::Relaxed) {
                    let mut path = "/api/v1/devices?limit=100".to_string();
                    if let Some(c) = &cursor {
                        path.push_str(&format!("&cursor={c}"));
                    }
                    let t = Instant::now();
                    let r = http_get(port, &path);
                    let secs = t.elapsed().as_secs_f64();
                    let ok = matches!(&r, Ok((200, _)));
                    cursor = r.ok().and_then(|(_, b)| {
                        serde_json::from_str::<serde_json::Value>(&b).ok()?["next_cursor"]
                            .as_str()
                            .map(String::from)
                    });
                    if measuring.load(Ordering::Relaxed)
                        && let Ok(mut s) = samples.lock()
                    {
                        if ok {
                            s.0.0.push(secs);
                        } else {
                            s.4 += 1;
                        }
                    }
                    std::thread::sleep(THINK);
                }
            })
        };
        let page = {
            let (stop, samples) = (stop.clone(), samples.clone());
            std::thread::spawn(move || {
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    // A stride coprime with the device count visits every device.
                    i = (i + 7919) % devices.max(1);
                    let id = format!("dev-{i:05}");
                    let t = Instant::now();
                    let a = http_get(port, &format!("/api/v1/devices/{id}"));
                    let da = t.elapsed().as_secs_f64();
                    let t = Instant::now();
                    let b = http_get(port, &format!("/api/v1/devices/{id}/ledger"));
                    let db = t.elapsed().as_secs_f64();
                    let ok = matches!(&a, Ok((200, _))) && matches!(&b, Ok((200, _)));
                    if measuring.load(Ordering::Relaxed)
                        && let Ok(mut s) = samples.lock()
                    {
                        if ok {
                            s.1.0.push(da);
                            s.2.0.push(db);
                            s.3.0.push(da + db);
                        } else {
                            s.4 += 1;
                        }
                    }
                    std::thread::sleep(THINK);
                }
            })
        };
        Dashboard {
            stop,
            threads: vec![list, page],
            samples,
        }
    }

    /// How many samples (and errors) there are so far, for [`Dashboard::since`].
    fn lengths(&self) -> [usize; 5] {
        self.samples.lock().map_or([0; 5], |s| {
            [
                s.0.0.len(),
                s.1.0.len(),
                s.2.0.len(),
                s.3.0.len(),
                s.4 as usize,
            ]
        })
    }

    /// The samples taken since `lengths`.
    fn since(&self, l: [usize; 5]) -> Samples {
        self.samples.lock().map_or_else(
            |_| Samples::default(),
            |s| {
                let tail =
                    |v: &Latencies, from: usize| Latencies(v.0.get(from..).unwrap_or(&[]).to_vec());
                (
                    tail(&s.0, l[0]),
                    tail(&s.1, l[1]),
                    tail(&s.2, l[2]),
                    tail(&s.3, l[3]),
                    s.4.saturating_sub(l[4] as u64),
                )
            },
        )
    }

    fn stop(self) -> Samples {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        self.samples.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// One `GET` with the admin token through the fleet's client, outside any measurement:
/// (status, body).
fn api_get(port: u16, path: &str) -> Result<(u16, String), ClientError> {
    let r = FleetClient::local(port)
        .with_token(TOKEN)
        .send("GET", path, &[], None)?;
    Ok((r.status, r.text()))
}

/// One dashboard `GET` with the admin token on a fresh connection: (status, body). Kept at
/// the socket level on purpose: it is what the dashboard latency measures (connect, one bare
/// request line, read to close), so the numbers stay comparable with earlier runs and carry
/// no client library's own cost; everything outside the measurement uses [`api_get`].
fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&localhost(port), Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_nodelay(true)?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())?;
    read_answer(s)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

/// Reads a `Connection: close` answer: status code and body as text (de-chunked).
fn read_answer(mut s: TcpStream) -> std::io::Result<(u16, String)> {
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
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((code, body))
}
