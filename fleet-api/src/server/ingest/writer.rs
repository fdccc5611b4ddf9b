//! The database writer: takes classified messages from the bounded channel, groups them into
//! batches (at most `ingest.batch_max_records` records or `ingest.batch_max_delay_ms` after the
//! first message), writes each batch in ONE transaction, and only then acknowledges its
//! messages to the broker.
//!
//! Guarantees:
//! * A message MUST NOT be acknowledged before the transaction holding it commits, so a crash
//!   at any point loses nothing: the broker (persistent session) delivers unacknowledged
//!   messages again, to this replica or another.
//! * Storing is idempotent on `(device, stream, seq)`, for telemetry and model results alike:
//!   `INSERT ... ON CONFLICT DO NOTHING RETURNING device_id, stream, seq` tells which records
//!   are new, and only those update the stream's `received` counter and the per-minute
//!   aggregates (`aggregates_1m`, `inference_1m`), so redelivery never double-counts.
//! * A batch costs one multi-row statement per kind of row (devices, streams, telemetry,
//!   inference, stream counters, aggregates), not one per device or stream, each listing its
//!   keys in sorted order so that concurrent replicas lock rows in the same order. SQLite gets
//!   smaller record statements than PostgreSQL (see the constants below).
//! * On PostgreSQL with `ingest.copy_min_records` set (off by default: measured slower at
//!   1,000-record batches), a batch with at least that many telemetry rows sends them
//!   by binary `COPY` into the writer's staging table ([`super::staging`], on a connection of
//!   its own) and moves them with ONE `INSERT INTO telemetry SELECT ... FROM <staging> ORDER BY
//!   key ON CONFLICT DO NOTHING RETURNING ...` inside the batch's transaction: the same rows,
//!   the same key order and the same `RETURNING` as the multi-row statement, so idempotency,
//!   the counters and the ledger do not depend on the path. The staging table is scratch: a
//!   failure anywhere before the commit leaves nothing in `telemetry`, and a retry copies the
//!   batch again (a broken copy connection is reopened; a server that refuses the staging
//!   table turns the path off and the multi-row `INSERT` is used).
//! * Live events (`Outcome.events`) describe only rows that were inserted, and are published
//!   after the transaction commits, just before the acknowledgements.
//! * A batch the database refuses for a reason that retrying cannot fix (a constraint, a value
//!   it will not take) MUST NOT stall ingestion: after a few attempts the batch is written
//!   message by message, and a message that still fails is recorded as a `storage` reject and
//!   acknowledged. Connection problems are retried, with backoff, until they clear or the
//!   service is forced down.
//! * Each stream's commit watermark (`streams.committed_through`, [`super::commits`]) is
//!   raised in the same transaction as the rows it covers, and the devices of the batch are
//!   handed to the watermark publisher only after the commit.
//! * Acknowledgements go out in the order messages arrived (MQTT requires it for QoS 1), and
//!   never on a connection other than the one a message came on (packet ids are per
//!   connection); a message from an older connection is stored but left to be redelivered.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ember_proto::{
    DeviceState, Heartbeat, InferenceBatch, InferenceOutput, InferenceRecord, Status,
    TelemetryBatch,
};
use rumqttc::v5::AsyncClient;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Publish;
use sqlx::Row;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::classify::{Item, Refused, Reject, RejectReason};
use crate::config::{Backend, IngestSettings};
use crate::db::{Db, Sql, timed};
use crate::metrics::Metrics;
use crate::server::events::{Events, LiveEvent, MAX_RESULTS_PER_STREAM};
use crate::server::ledger::RecordsTable;

/// Width of an aggregate bucket: one minute, in microseconds.
pub const BUCKET_US: i64 = 60_000_000;
/// Rows per multi-row telemetry INSERT (4 values a row, plus 2 per stream), far below
/// Postgres's 65535 bind parameters: a default batch (1,000 records) is one statement, one
/// round trip.
const TELEMETRY_ROWS_PER_INSERT: usize = 1000;
/// The same for SQLite, which has no round trips to save: 1,000-row statements halved its
/// throughput (`ember-bench fleet`), presumably because it resolves each `$N` placeholder by a
/// linear search through those already seen when it prepares a statement.
const SQLITE_TELEMETRY_ROWS_PER_INSERT: usize = 100;
/// Rows per multi-row upsert of devices and streams (at most 10 values a row).
const KEY_ROWS_PER_STATEMENT: usize = 200;
const AGGREGATE_ROWS_PER_INSERT: usize = 250;
/// Rows per multi-row inference INSERT: at most 12 values a row (plus 2 per stream), so a
/// default batch is one statement on PostgreSQL too.
const INFERENCE_ROWS_PER_INSERT: usize = 1000;
/// The same for SQLite, for the reason above: about as many placeholders as a 100-row
/// telemetry statement (not measured separately).
const SQLITE_INFERENCE_ROWS_PER_INSERT: usize = 32;
const INFERENCE_AGGREGATE_ROWS_PER_INSERT: usize = 200;
/// Attempts at a whole batch before it is split into single messages.
const BATCH_ATTEMPTS: u32 = 3;
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// How to acknowledge one QoS 1 message once it is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckToken {
    /// The connection it arrived on (see [`Acker`]).
    pub epoch: u64,
    pub pkid: u16,
}

/// One message on its way to the database.
#[derive(Debug)]
pub struct Inbound {
    pub ack: Option<AckToken>,
    /// Stored in the batch's transaction ([`super::source::Checkpoint`]).
    pub checkpoint: Option<super::source::Checkpoint>,
    /// Fleet clock, microseconds.
    pub received_at: i64,
    pub item: Result<Item, Reject>,
}

/// Sends PUBACKs through the MQTT client, but only on the connection a message came on.
#[derive(Clone)]
pub struct Acker {
    pub client: AsyncClient,
    /// Incremented on every CONNACK by the reader.
    pub epoch: Arc<AtomicU64>,
    pub state: Arc<super::IngestState>,
}

impl super::source::Acknowledge for Acker {
    fn ack<'a>(
        &'a self,
        token: AckToken,
        metrics: &'a Metrics,
    ) -> super::source::BoxFuture<'a, ()> {
        Box::pin(self.puback(token, metrics))
    }
}

impl Acker {
    async fn puback(&self, token: AckToken, metrics: &Metrics) {
        if token.epoch != self.epoch.load(Ordering::Acquire)
            || !self.state.connected.load(Ordering::Acquire)
        {
            metrics.inc("acks_skipped_total", &[], 1);
            return;
        }
        let mut p = Publish::new("", QoS::AtLeastOnce, Vec::<u8>::new(), None);
        p.pkid = token.pkid;
        // Waits for room in the request channel: the reader polls the event loop at all times,
        // so it drains. An error means the event loop is gone; the broker redelivers.
        if let Err(e) = self.client.ack(&p).await {
            tracing::debug!(error = %e, pkid = token.pkid, "Could not queue an acknowledgement.");
            metrics.inc("acks_skipped_total", &[], 1);
        }
    }
}

pub struct Writer {
    pub db: Db,
    pub metrics: Arc<Metrics>,
    pub settings: IngestSettings,
    /// The source's post-commit acknowledgements (MQTT: [`Acker`]).
    pub acker: Arc<dyn super::source::Acknowledge>,
    pub events: Arc<Events>,
    /// Where the OTA reports of stored statuses go (after commit, before the PUBACK).
    pub rollouts: Arc<crate::ota::rollout::service::Service>,
    /// Devices due a commit watermark (after commit).
    pub commits: Arc<super::commits::Commits>,
}

/// Receives until the channel closes (shutdown), writing batch after batch. Returns when every
/// received message is stored and acknowledged, or when `force` fires.
pub async fn run(mut rx: mpsc::Receiver<Inbound>, w: Writer, force: CancellationToken) {
    let max_records = w.settings.batch_max_records;
    let max_messages = w.settings.channel_capacity;
    let delay = Duration::from_millis(w.settings.batch_max_delay_ms);
    let mut copy = if w.db.backend() == Backend::Postgres && w.settings.copy_min_records > 0 {
        CopyPath::Closed
    } else {
        CopyPath::Off
    };
    loop {
        let first = tokio::select! {
            biased;
            _ = force.cancelled() => return,
            m = rx.recv() => match m {
                Some(m) => m,
                None => {
                    if let CopyPath::Open(s) = copy {
                        s.close().await;
                    }
                    return;
                }
            },
        };
        let mut records = first.item.as_ref().map_or(0, Item::records);
        let mut batch = vec![first];
        let deadline = Instant::now() + delay;
        while records < max_records && batch.len() < max_messages {
            tokio::select! {
                biased;
                m = rx.recv() => match m {
                    Some(m) => {
                        records += m.item.as_ref().map_or(0, Item::records);
                        batch.push(m);
                    }
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        if !w.flush(batch, &force, &mut copy).await {
            return;
        }
    }
}

impl Writer {
    /// Stores and acknowledges one batch. False if `force` fired first (nothing acknowledged).
    async fn flush(
        &self,
        batch: Vec<Inbound>,
        force: &CancellationToken,
        copy: &mut CopyPath,
    ) -> bool {
        let mut attempt = 0u32;
        let mut backoff = RETRY_MIN;
        loop {
            let res = timed(
                &self.metrics,
                "flush",
                write_batch(&self.db, &self.settings, &batch, copy),
            )
            .await;
            match res {
                Ok(outcome) => {
                    tracing::debug!(
                        messages = batch.len(),
                        records = outcome.records,
                        stored = outcome.stored,
                        duplicates = outcome.duplicates,
                        expired = outcome.expired,
                        "Stored a batch."
                    );
                    self.record(&batch, &outcome);
                    self.apply_ota(&batch).await;
                    fault::crash_before_watermark(&outcome);
                    self.commits
                        .touch(outcome.devices.iter().map(String::as_str));
                    self.ack_all(&batch).await;
                    return true;
                }
                Err(e) => {
                    attempt += 1;
                    let transient = is_transient(&e);
                    if !transient && attempt >= BATCH_ATTEMPTS {
                        tracing::error!(error = %e, messages = batch.len(),
                            "The database refused a batch repeatedly; writing its messages one by one.");
                        return self.flush_one_by_one(batch, force, copy).await;
                    }
                    tracing::warn!(error = %e, attempt, retry_in_ms = backoff.as_millis() as u64,
                        "Could not write a batch; retrying (nothing was acknowledged).");
                    tokio::select! {
                        _ = force.cancelled() => return false,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
        }
    }

    async fn flush_one_by_one(
        &self,
        batch: Vec<Inbound>,
        force: &CancellationToken,
        copy: &mut CopyPath,
    ) -> bool {
        for m in batch {
            let one = [m];
            let mut backoff = RETRY_MIN;
            let mut attempt = 0;
            loop {
                match timed(
                    &self.metrics,
                    "flush",
                    write_batch(&self.db, &self.settings, &one, copy),
                )
                .await
                {
                    Ok(outcome) => {
                        self.record(&one, &outcome);
                        self.apply_ota(&one).await;
                        self.commits
                            .touch(outcome.devices.iter().map(String::as_str));
                        break;
                    }
                    Err(e) if is_transient(&e) || attempt + 1 < BATCH_ATTEMPTS => {
                        attempt += 1;
                        tokio::select! {
                            _ = force.cancelled() => return false,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(RETRY_MAX);
                    }
                    Err(e) => {
                        let device = match &one[0].item {
                            Ok(item) => item.device().to_string(),
                            Err(r) => r.device.clone(),
                        };
                        tracing::error!(%device, error = %e,
                            "The database refused a message; it is counted as a storage reject and acknowledged.");
                        let reject = Inbound {
                            ack: None,
                            // The reject is stored in its place: the position moves on.
                            checkpoint: one[0].checkpoint.clone(),
                            received_at: one[0].received_at,
                            item: Err(Reject {
                                device,
                                reason: RejectReason::Storage,
                                topic: String::new(),
                                detail: "the database refused this message (see the service log)"
                                    .into(),
                                // Not settled: the agent keeps the records and sends them
                                // again, in case the database takes them later.
                                refused: None,
                            }),
                        };
                        let stored = [reject];
                        match write_batch(&self.db, &self.settings, &stored, copy).await {
                            Ok(outcome) => self.record(&stored, &outcome),
                            Err(e) => {
                                tracing::error!(error = %e, "Could not record the storage reject either.")
                            }
                        }
                        break;
                    }
                }
            }
            if let Some(token) = one[0].ack {
                self.acker.ack(token, &self.metrics).await;
            }
        }
        true
    }

    /// Feeds the OTA reports of the batch's statuses to their rollouts. Runs after the commit
    /// and before the acknowledgements: a crash in between redelivers the statuses.
    async fn apply_ota(&self, batch: &[Inbound]) {
        let statuses: Vec<&Status> = batch
            .iter()
            .filter_map(|m| match &m.item {
                Ok(Item::Status(s)) if !s.ota.is_empty() && !is_last_will(s) => Some(s),
                _ => None,
            })
            .collect();
        if !statuses.is_empty() {
            self.rollouts.apply_statuses(&statuses).await;
        }
    }

    async fn ack_all(&self, batch: &[Inbound]) {
        for m in batch {
            if let Some(token) = m.ack {
                self.acker.ack(token, &self.metrics).await;
            }
        }
    }

    fn record(&self, batch: &[Inbound], o: &Outcome) {
        if !o.captured_at.is_empty() {
            let now = crate::db::now_us();
            let latencies: Vec<f64> = o
                .captured_at
                .iter()
                .map(|ts| (now - ts).max(0) as f64 / 1e6)
                .collect();
            let max = latencies.iter().copied().fold(0.0, f64::max);
            self.metrics
                .observe_many("record_commit_latency_seconds", &[], &latencies);
            self.metrics
                .raise("record_commit_latency_max_seconds", &[], max);
        }
        for e in &o.events {
            self.events.publish(e.clone());
        }
        let m = &self.metrics;
        m.observe("batch_messages", &[], batch.len() as f64);
        m.observe("batch_records", &[], o.records as f64);
        m.inc("records_total", &[("outcome", "stored")], o.stored);
        m.inc("records_total", &[("outcome", "duplicate")], o.duplicates);
        m.inc("records_total", &[("outcome", "expired")], o.expired);
        if o.copied > 0 {
            m.inc("records_copied_total", &[], o.copied);
        }
        for msg in batch {
            if let Err(r) = &msg.item
                && r.reason == RejectReason::Storage
            {
                m.inc("rejects_total", &[("reason", r.reason.as_str())], 1);
            }
        }
        if o.schema_rejects > 0 {
            m.inc(
                "rejects_total",
                &[("reason", RejectReason::Schema.as_str())],
                o.schema_rejects,
            );
        }
    }
}

/// The test-only fault hook between a commit and its watermark (and PUBACKs): compiled only
/// with the `fault-injection` feature, which release builds never enable.
mod fault {
    #[cfg(feature = "fault-injection")]
    pub fn crash_before_watermark(outcome: &super::Outcome) {
        use std::sync::OnceLock;
        use std::sync::atomic::{AtomicU64, Ordering};
        const NAME: &str = "EMBER_FLEET_FAULT_CRASH_BEFORE_WATERMARK";
        static AT: OnceLock<Option<u64>> = OnceLock::new();
        static BATCHES: AtomicU64 = AtomicU64::new(0);
        let Some(at) = *AT.get_or_init(|| std::env::var(NAME).ok().and_then(|v| v.parse().ok()))
        else {
            return;
        };
        if outcome.stored > 0 && BATCHES.fetch_add(1, Ordering::Relaxed) + 1 == at {
            tracing::warn!(
                "Fault hook {NAME}: aborting after commit {at}, before its watermark and PUBACKs (test only)."
            );
            std::process::abort();
        }
    }

    #[cfg(not(feature = "fault-injection"))]
    pub fn crash_before_watermark(_: &super::Outcome) {}
}

/// Errors worth retrying as they are: the connection, the pool, locks and serialization.
fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.to_string()).unwrap_or_default();
            // SQLite: BUSY (5), LOCKED (6) and their extended codes. Postgres: serialization
            // failure, deadlock, connection exceptions (08xxx), shutdown (57P0x).
            code == "5"
                || code == "6"
                || code
                    .parse::<i64>()
                    .is_ok_and(|c| c & 0xff == 5 || c & 0xff == 6)
                || code == "40001"
                || code == "40P01"
                || code.starts_with("08")
                || code.starts_with("57P0")
        }
        _ => false,
    }
}

/// What one batch did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Outcome {
    pub records: u64,
    pub stored: u64,
    pub duplicates: u64,
    pub expired: u64,
    /// For the live view, published after the commit.
    pub events: Vec<LiveEvent>,
    /// Devices whose records or status the batch stored: each is due a commit watermark.
    pub devices: BTreeSet<String>,
    /// Capture times (agent clock, µs) of the records the batch inserted, for the
    /// sensor-to-database latency measured at commit.
    pub captured_at: Vec<i64>,
    /// Telemetry messages refused because their records disagree with the stream's schema.
    pub schema_rejects: u64,
    /// Telemetry records sent by `COPY` ([`super::staging`]), new or not.
    pub copied: u64,
}

/// A record as stored: capture time, values, receive time.
type Rec = (i64, Vec<f32>, i64);

#[derive(Default)]
struct StreamRecords {
    /// seq -> record, first copy in the batch.
    records: BTreeMap<u64, Rec>,
    in_batch_duplicates: u64,
}

/// The results of one inference stream in a batch: seq -> (result, receive time), first copy.
#[derive(Default)]
struct InferenceRecords<'a> {
    records: BTreeMap<u64, (&'a InferenceRecord, i64)>,
    in_batch_duplicates: u64,
}

/// One minute of one inference stream and label (`""` for anomaly results).
#[derive(Default)]
struct InferenceAgg {
    results: i64,
    anomalies: i64,
    scored: i64,
    score_sum: f64,
    score_max: Option<f64>,
    latency_sum: i64,
}

#[derive(Default)]
struct Agg {
    samples: i64,
    sum: f64,
    min: f64,
    max: f64,
}

struct RejectAgg {
    count: i64,
    first_at: i64,
    last_at: i64,
    topic: String,
    detail: String,
}

fn encode_values(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Decodes a stored `vals` column (little-endian f32s).
pub fn decode_values(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn to_i64(v: u64) -> i64 {
    // classify() refused everything above i64::MAX.
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The writer's PostgreSQL `COPY` path ([`super::staging`]).
enum CopyPath {
    /// SQLite, `ingest.copy_min_records = 0`, or the server refused the staging table.
    Off,
    /// Not connected (yet, or again after a failure).
    Closed,
    Open(super::staging::Staging),
}

impl CopyPath {
    /// Copies the rows of `lives` into the staging table; its name, or None when the batch is
    /// to use the multi-row `INSERT` (the path is off). A connection problem is returned (the
    /// batch is retried and the connection opened again).
    async fn stage(
        &mut self,
        db: &Db,
        lives: &[Live<'_, &Rec>],
    ) -> Result<Option<String>, sqlx::Error> {
        if let CopyPath::Closed = self {
            match super::staging::Staging::open(&db.own_url()).await {
                Ok(s) => *self = CopyPath::Open(s),
                Err(e) if is_transient(&e) => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e,
                        "Could not set up the COPY staging table; telemetry is written with INSERT statements.");
                    *self = CopyPath::Off;
                }
            }
        }
        let CopyPath::Open(staging) = self else {
            return Ok(None);
        };
        let copy = super::staging::encode_binary(lives.iter().flat_map(|l| {
            l.rows.iter().map(|(seq, r)| super::staging::StagedRow {
                device: l.device,
                stream: l.stream,
                seq: *seq,
                ts: r.0,
                vals: &r.1,
                received_at: r.2,
            })
        }));
        match staging.stage(&copy).await {
            Ok(_) => Ok(Some(staging.table().to_string())),
            Err(e) => {
                // A fresh connection next time: this one may be mid-COPY or broken.
                *self = CopyPath::Closed;
                Err(e)
            }
        }
    }
}

/// A transaction of the pool.
type Tx = sqlx::Transaction<'static, sqlx::Any>;

/// A stream: (device, stream).
type Key<'a> = (&'a str, &'a str);

/// A batch grouped by kind of row. Every map is a BTreeMap, so each statement lists its keys
/// in sorted order and concurrent replicas lock rows in the same order.
#[derive(Default)]
struct Grouped<'a> {
    /// Device -> the latest receive time of a message from it (not counting Last Wills).
    contacts: BTreeMap<&'a str, i64>,
    /// Devices whose Last Will is in the batch.
    wills: BTreeSet<&'a str>,
    telemetry: BTreeMap<Key<'a>, StreamRecords>,
    inference: BTreeMap<Key<'a>, InferenceRecords<'a>>,
    statuses: Vec<(&'a Status, i64)>,
    heartbeats: Vec<(&'a Heartbeat, i64)>,
    rejects: BTreeMap<(&'a str, &'static str), RejectAgg>,
    /// Records of refused messages, per device (see `classify::Refused`).
    refused: Vec<(&'a str, Refused)>,
}

/// Writes one batch in one transaction: the batch is grouped first, so that the transaction
/// is short and touches rows in a fixed order (replicas writing the same stream concurrently
/// then cannot deadlock each other); then one step per kind of row, always in this order:
/// devices, streams (locked, with their retention watermarks), telemetry, inference results,
/// stream counters, `inference_1m`, `aggregates_1m`, statuses, heartbeats, rejects.
async fn write_batch(
    db: &Db,
    settings: &IngestSettings,
    batch: &[Inbound],
    copy: &mut CopyPath,
) -> Result<Outcome, sqlx::Error> {
    let mut outcome = Outcome::default();
    let sqlite = matches!(db.backend(), Backend::Sqlite);

    let mut tx = db.pool().begin().await?;
    // The schemas of the batch's telemetry streams, so that `group` can refuse a message whose
    // records do not fit (reason `schema`) before any row is written.
    let schemas = known_channels(&mut tx, batch).await?;
    let g = group(batch, &schemas, &mut outcome);
    // One statement per kind of row for the whole batch, not one per device or stream: on
    // PostgreSQL each statement is a round trip, and with 100-record messages a batch spans
    // ~10 devices, so per-stream statements cost more than the rows (see docs/benchmarks.md).
    // Every multi-row statement lists its keys in sorted order (the maps are BTreeMaps), so
    // rows are still locked in a fixed order.
    upsert_devices(&mut tx, &g.contacts, &g.wills).await?;
    let watermarks = upsert_streams(&mut tx, &g.telemetry, &g.inference).await?;
    let telemetry = insert_telemetry(
        &mut tx,
        &g.telemetry,
        &watermarks,
        sqlite,
        (db, settings.copy_min_records, copy),
        &mut outcome.copied,
    )
    .await?;
    let results = insert_inference(&mut tx, &g.inference, &watermarks, sqlite).await?;

    // Counters, aggregates and live events from the inserted rows only.
    let mut counters: BTreeMap<Key, StreamUpdate> = BTreeMap::new();
    let aggregates = telemetry_effects(
        &telemetry,
        settings.aggregate_channels,
        &mut counters,
        &mut outcome,
    );
    let inference_aggregates = inference_effects(&results, &mut counters, &mut outcome);
    // Commit watermarks over every row now stored, new or not.
    for (table, key, seqs) in telemetry
        .iter()
        .map(|l| {
            (
                RecordsTable::Telemetry,
                (l.device, l.stream),
                row_seqs(&l.rows),
            )
        })
        .chain(results.iter().map(|l| {
            (
                RecordsTable::Inference,
                (l.device, l.stream),
                row_seqs(&l.rows),
            )
        }))
    {
        let from = watermarks.committed_from(&key)?;
        // Only a batch that holds the next record can raise the watermark.
        if seqs.binary_search(&(from + 1)).is_err() {
            continue;
        }
        let c = super::commits::advance(
            &mut tx,
            table,
            key,
            from,
            &seqs,
            watermarks.max_seq(&key)?,
            false,
        )
        .await?;
        if let Some(u) = counters.get_mut(&key) {
            u.committed = u.committed.max(c);
        }
    }
    outcome.devices.extend(
        g.telemetry
            .keys()
            .chain(g.inference.keys())
            .map(|(d, _)| d.to_string()),
    );
    upsert_stream_counters(&mut tx, counters).await?;
    upsert_inference_aggregates(&mut tx, inference_aggregates).await?;
    upsert_aggregates(&mut tx, aggregates).await?;

    write_statuses(&mut tx, &g.statuses, &mut outcome).await?;
    for (status, _) in &g.statuses {
        if !is_last_will(status) {
            super::commits::advance_from_status(&mut tx, status).await?;
            outcome.devices.insert(status.device.clone());
        }
    }
    write_heartbeats(&mut tx, &g.heartbeats).await?;
    write_rejects(&mut tx, &g.rejects, &mut outcome).await?;
    for (device, r) in &g.refused {
        super::commits::settle_refused(&mut tx, device, r, received_at_of(batch)).await?;
        outcome.devices.insert(device.to_string());
    }
    super::source::save_checkpoints(&mut tx, batch).await?;

    tx.commit().await?;
    Ok(outcome)
}

/// The channel count each telemetry stream of the batch is known to have (`streams.channels`:
/// from the agent's status, else from its first stored records); streams not listed have none
/// yet.
async fn known_channels<'a>(
    tx: &mut Tx,
    batch: &'a [Inbound],
) -> Result<BTreeMap<Key<'a>, i64>, sqlx::Error> {
    let keys: BTreeSet<Key<'a>> = batch
        .iter()
        .filter_map(|m| match &m.item {
            Ok(Item::Telemetry(b)) => Some((b.device.as_str(), b.stream.as_str())),
            _ => None,
        })
        .collect();
    let keys: Vec<Key<'a>> = keys.into_iter().collect();
    let mut known = BTreeMap::new();
    for chunk in keys.chunks(KEY_ROWS_PER_STATEMENT) {
        let mut q = Sql::new(
            "SELECT device_id, stream, channels FROM streams WHERE channels IS NOT NULL AND (",
        );
        for (i, (device, stream)) in chunk.iter().enumerate() {
            if i > 0 {
                q.push(" OR ");
            }
            q.push("(device_id = ")
                .bind(*device)
                .push(" AND stream = ")
                .bind(*stream)
                .push(")");
        }
        q.push(")");
        for row in q.query().fetch_all(&mut **tx).await? {
            let device: String = row.try_get("device_id")?;
            let stream: String = row.try_get("stream")?;
            let channels: i64 = row.try_get("channels")?;
            if let Some(key) = chunk
                .iter()
                .find(|(d, s)| *d == device.as_str() && *s == stream.as_str())
            {
                known.insert(*key, channels);
            }
        }
    }
    Ok(known)
}

/// Why a telemetry batch does not fit its stream's schema (`known`, else the first record's
/// width, which then becomes the schema for the rest of the write batch).
fn misfit(b: &TelemetryBatch, known: Option<i64>) -> Option<String> {
    let expected = known.or_else(|| b.records.first().map(|r| r.values.len() as i64))?;
    let r = b
        .records
        .iter()
        .find(|r| r.values.len() as i64 != expected)?;
    Some(format!(
        "record {} of stream {:?} has {} values but the stream has {expected} channels: a stream's channel count does not change; send it as a new stream",
        r.seq,
        b.stream,
        r.values.len()
    ))
}

/// When the batch's last message arrived (fleet clock): the time its refused ranges are
/// reported at.
fn received_at_of(batch: &[Inbound]) -> i64 {
    batch.iter().map(|m| m.received_at).max().unwrap_or(0)
}

/// Groups a batch by kind of row; counts its records into `outcome`. A telemetry message
/// whose records do not fit the stream's schema (`schemas`) is turned into a `schema` reject.
fn group<'a>(
    batch: &'a [Inbound],
    schemas: &BTreeMap<Key<'a>, i64>,
    outcome: &mut Outcome,
) -> Grouped<'a> {
    let mut g = Grouped::default();
    let mut schemas = schemas.clone();
    for m in batch {
        if let Ok(Item::Telemetry(b)) = &m.item {
            let key = (b.device.as_str(), b.stream.as_str());
            if let Some(detail) = misfit(b, schemas.get(&key).copied()) {
                outcome.schema_rejects += 1;
                if let (Some(first), Some(last)) = (b.records.first(), b.records.last()) {
                    g.refused.push((
                        key.0,
                        Refused {
                            stream: b.stream.clone(),
                            kind: "telemetry",
                            first: first.seq.min(last.seq),
                            last: first.seq.max(last.seq),
                        },
                    ));
                }
                let topic = format!("ember/v1/{}/telemetry", b.device);
                add_reject(
                    &mut g,
                    key.0,
                    RejectReason::Schema,
                    topic,
                    detail,
                    m.received_at,
                );
                continue;
            }
            if let Some(r) = b.records.first() {
                schemas.entry(key).or_insert(r.values.len() as i64);
            }
        }
        match &m.item {
            Ok(item) => {
                let is_will = matches!(item, Item::Status(s) if is_last_will(s));
                if is_will {
                    g.wills.insert(item.device());
                } else {
                    let seen = g.contacts.entry(item.device()).or_insert(m.received_at);
                    *seen = (*seen).max(m.received_at);
                }
                match item {
                    Item::Telemetry(b) => {
                        group_telemetry(b, m.received_at, &mut g.telemetry, outcome)
                    }
                    Item::Inference(b) => {
                        group_inference(b, m.received_at, &mut g.inference, outcome)
                    }
                    Item::Status(s) => g.statuses.push((s, m.received_at)),
                    Item::Heartbeat(h) => g.heartbeats.push((h, m.received_at)),
                }
            }
            Err(r) => {
                if let Some(refused) = &r.refused {
                    g.refused.push((r.device.as_str(), (**refused).clone()));
                }
                add_reject(
                    &mut g,
                    r.device.as_str(),
                    r.reason,
                    r.topic.clone(),
                    r.detail.clone(),
                    m.received_at,
                )
            }
        }
    }
    g
}

fn add_reject<'a>(
    g: &mut Grouped<'a>,
    device: &'a str,
    reason: RejectReason,
    topic: String,
    detail: String,
    at: i64,
) {
    let agg = g
        .rejects
        .entry((device, reason.as_str()))
        .or_insert(RejectAgg {
            count: 0,
            first_at: at,
            last_at: at,
            topic: String::new(),
            detail: String::new(),
        });
    agg.count += 1;
    agg.last_at = at;
    agg.topic = topic;
    agg.detail = detail;
}

/// Registers every device the batch heard from (first and last seen), and the devices whose
/// Last Will is all the batch has of them.
async fn upsert_devices(
    tx: &mut Tx,
    contacts: &BTreeMap<&str, i64>,
    wills: &BTreeSet<&str>,
) -> Result<(), sqlx::Error> {
    let contacts: Vec<(&str, i64)> = contacts.iter().map(|(d, seen)| (*d, *seen)).collect();
    for chunk in contacts.chunks(KEY_ROWS_PER_STATEMENT) {
        let mut q = Sql::new(
            "INSERT INTO devices (device_id, registered_at, first_seen, last_seen) VALUES ",
        );
        for (i, (device, seen)) in chunk.iter().enumerate() {
            if i > 0 {
                q.push(", ");
            }
            q.push("(").bind(*device).push(", ");
            let seen = q.param(*seen);
            q.push(&format!("{seen}, {seen}, {seen})"));
        }
        q.push(
            " ON CONFLICT (device_id) DO UPDATE SET \
             first_seen = COALESCE(devices.first_seen, excluded.first_seen), \
             last_seen = CASE WHEN devices.last_seen IS NULL OR devices.last_seen < excluded.last_seen \
                              THEN excluded.last_seen ELSE devices.last_seen END",
        );
        q.query().execute(&mut **tx).await?;
    }
    for device in wills
        .iter()
        .filter(|d| contacts.binary_search_by(|(c, _)| c.cmp(d)).is_err())
    {
        let mut q = Sql::new("INSERT INTO devices (device_id, registered_at) VALUES (");
        q.bind(*device).push(", ").bind(crate::db::now_us());
        q.push(") ON CONFLICT (device_id) DO NOTHING");
        q.query().execute(&mut **tx).await?;
    }
    Ok(())
}

/// Each stream's retention watermark (`streams.pruned_through`), commit watermark and highest
/// stored seq before this batch, by key.
struct Watermarks<'a> {
    index: BTreeMap<Key<'a>, usize>,
    pruned: Vec<Option<(i64, i64, i64)>>,
}

impl Watermarks<'_> {
    fn get(&self, key: &Key) -> Result<(i64, i64, i64), sqlx::Error> {
        self.index
            .get(key)
            .and_then(|i| self.pruned[*i])
            .ok_or(sqlx::Error::RowNotFound)
    }

    fn pruned_through(&self, key: &Key) -> Result<i64, sqlx::Error> {
        Ok(self.get(key)?.0)
    }

    /// Where the commit watermark stands: nothing at or below it is needed again.
    fn committed_from(&self, key: &Key) -> Result<i64, sqlx::Error> {
        let (pruned, committed, _) = self.get(key)?;
        Ok(pruned.max(committed))
    }

    fn max_seq(&self, key: &Key) -> Result<i64, sqlx::Error> {
        Ok(self.get(key)?.2)
    }
}

/// The sequence numbers of a stream's rows in the batch, ascending.
fn row_seqs<R>(rows: &[(i64, R)]) -> Vec<i64> {
    rows.iter().map(|(s, _)| *s).collect()
}

/// Creates the stream rows (telemetry and inference streams in one statement, in key order)
/// if needed and locks them (Postgres) for this transaction, so retention cannot prune a
/// stream between this read and the inserts below.
async fn upsert_streams<'a>(
    tx: &mut Tx,
    telemetry: &BTreeMap<Key<'a>, StreamRecords>,
    inference: &BTreeMap<Key<'a>, InferenceRecords<'_>>,
) -> Result<Watermarks<'a>, sqlx::Error> {
    let mut kinds: BTreeMap<(&str, &str), &'static str> = BTreeMap::new();
    for key in telemetry.keys() {
        kinds.insert(*key, "telemetry");
    }
    for key in inference.keys() {
        // A device must not use one name for both kinds; if it does, the later kind wins, as
        // it does in the counters below.
        kinds.insert(*key, "inference");
    }
    let keys: Vec<((&str, &str), &str)> = kinds.into_iter().collect();
    let index: BTreeMap<(&str, &str), usize> =
        keys.iter().enumerate().map(|(i, (k, _))| (*k, i)).collect();
    let mut pruned: Vec<Option<(i64, i64, i64)>> = vec![None; keys.len()];
    for chunk in keys.chunks(KEY_ROWS_PER_STATEMENT) {
        let mut q = Sql::new("INSERT INTO streams (device_id, stream, kind) VALUES ");
        for (i, ((device, stream), kind)) in chunk.iter().enumerate() {
            if i > 0 {
                q.push(", ");
            }
            q.push("(").bind(*device).push(", ").bind(*stream);
            q.push(&format!(", '{kind}')"));
        }
        q.push(
            " ON CONFLICT (device_id, stream) DO UPDATE SET pruned_through = streams.pruned_through \
             RETURNING device_id, stream, pruned_through, committed_through, max_seq",
        );
        for row in q.query().fetch_all(&mut **tx).await? {
            let device: String = row.try_get("device_id")?;
            let stream: String = row.try_get("stream")?;
            if let Some(i) = index.get(&(device.as_str(), stream.as_str())) {
                pruned[*i] = Some((
                    row.try_get("pruned_through")?,
                    row.try_get("committed_through")?,
                    row.try_get("max_seq")?,
                ));
            }
        }
    }
    Ok(Watermarks { index, pruned })
}

/// Per stream: the records above its retention watermark, and which of them were new.
struct Live<'a, R> {
    device: &'a str,
    stream: &'a str,
    rows: Vec<(i64, R)>,
    in_batch_duplicates: u64,
    last_received: Option<i64>,
    expired: u64,
    inserted: BTreeSet<i64>,
}

/// A stream's records split at its watermark `pruned`: those at or below it are expired.
fn live<'a, R: Copy>(
    (device, stream): (&'a str, &'a str),
    records: impl Iterator<Item = (u64, R)>,
    pruned: i64,
    in_batch_duplicates: u64,
    last_received: Option<i64>,
) -> Live<'a, R> {
    let mut expired = 0u64;
    let rows = records
        .filter_map(|(seq, r)| {
            let seq = to_i64(seq);
            if seq <= pruned {
                expired += 1;
                None
            } else {
                Some((seq, r))
            }
        })
        .collect();
    Live {
        device,
        stream,
        rows,
        in_batch_duplicates,
        last_received,
        expired,
        inserted: BTreeSet::new(),
    }
}

/// Every row of every stream, in key and then sequence order: `(stream, row)` indices.
fn all_rows<R>(lives: &[Live<'_, R>]) -> Vec<(usize, usize)> {
    lives
        .iter()
        .enumerate()
        .flat_map(|(l, live)| (0..live.rows.len()).map(move |r| (l, r)))
        .collect()
}

/// Records which rows a `RETURNING device_id, stream, seq` statement inserted.
fn mark_inserted<R>(
    lives: &mut [Live<'_, R>],
    index: &BTreeMap<(&str, &str), usize>,
    rows: Vec<sqlx::any::AnyRow>,
) -> Result<(), sqlx::Error> {
    for row in rows {
        let device: String = row.try_get("device_id")?;
        let stream: String = row.try_get("stream")?;
        if let Some(i) = index.get(&(device.as_str(), stream.as_str())) {
            lives[*i].inserted.insert(row.try_get::<i64, _>("seq")?);
        }
    }
    Ok(())
}

/// Inserts the telemetry records above their stream's watermark; `Live::inserted` tells
/// which were new.
async fn insert_telemetry<'a>(
    tx: &mut Tx,
    streams: &'a BTreeMap<Key<'a>, StreamRecords>,
    watermarks: &Watermarks<'_>,
    sqlite: bool,
    copy: (&Db, usize, &mut CopyPath),
    copied: &mut u64,
) -> Result<Vec<Live<'a, &'a Rec>>, sqlx::Error> {
    let mut lives: Vec<Live<&Rec>> = Vec::with_capacity(streams.len());
    for (key, recs) in streams {
        lives.push(live(
            *key,
            recs.records.iter().map(|(seq, r)| (*seq, r)),
            watermarks.pruned_through(key)?,
            recs.in_batch_duplicates,
            recs.records.values().map(|r| r.2).max(),
        ));
    }
    let telemetry_index: BTreeMap<(&str, &str), usize> =
        streams.keys().enumerate().map(|(i, k)| (*k, i)).collect();
    let (db, copy_min, copy) = copy;
    let rows: usize = lives.iter().map(|l| l.rows.len()).sum();
    if rows > 0
        && rows >= copy_min
        && let Some(table) = copy.stage(db, &lives).await?
    {
        // Key and then sequence order, as the multi-row statement lists them.
        let q = Sql::new(&format!(
            "INSERT INTO telemetry (device_id, stream, seq, ts, vals, received_at) \
             SELECT device_id, stream, seq, ts, vals, received_at FROM {table} \
             ORDER BY device_id, stream, seq \
             ON CONFLICT (device_id, stream, seq) DO NOTHING RETURNING device_id, stream, seq"
        ));
        let inserted = q.query().fetch_all(&mut **tx).await?;
        mark_inserted(&mut lives, &telemetry_index, inserted)?;
        *copied = rows as u64;
        return Ok(lives);
    }
    let rows_per_insert = if sqlite {
        SQLITE_TELEMETRY_ROWS_PER_INSERT
    } else {
        TELEMETRY_ROWS_PER_INSERT
    };
    for chunk in all_rows(&lives).chunks(rows_per_insert) {
        let mut q = Sql::new(
            "INSERT INTO telemetry (device_id, stream, seq, ts, vals, received_at) VALUES ",
        );
        // The device and stream are bound once per stream in the statement.
        let (mut current, mut d, mut s) = (usize::MAX, String::new(), String::new());
        for (i, (l, r)) in chunk.iter().enumerate() {
            let live = &lives[*l];
            if *l != current {
                current = *l;
                d = q.param(live.device);
                s = q.param(live.stream);
            }
            let (seq, (ts, values, at)) = live.rows[*r];
            if i > 0 {
                q.push(", ");
            }
            q.push(&format!("({d}, {s}, "));
            q.bind(seq).push(", ").bind(*ts).push(", ");
            q.bind(encode_values(values)).push(", ").bind(*at).push(")");
        }
        q.push(" ON CONFLICT (device_id, stream, seq) DO NOTHING RETURNING device_id, stream, seq");
        let rows = q.query().fetch_all(&mut **tx).await?;
        mark_inserted(&mut lives, &telemetry_index, rows)?;
    }

    Ok(lives)
}

/// Inserts the model results above their stream's watermark; `Live::inserted` tells which
/// were new.
async fn insert_inference<'a>(
    tx: &mut Tx,
    inference: &'a BTreeMap<Key<'a>, InferenceRecords<'a>>,
    watermarks: &Watermarks<'_>,
    sqlite: bool,
) -> Result<Vec<Live<'a, (&'a InferenceRecord, i64)>>, sqlx::Error> {
    let mut results: Vec<Live<(&InferenceRecord, i64)>> = Vec::with_capacity(inference.len());
    for (key, recs) in inference {
        results.push(live(
            *key,
            recs.records.iter().map(|(seq, r)| (*seq, *r)),
            watermarks.pruned_through(key)?,
            recs.in_batch_duplicates,
            recs.records.values().map(|r| r.1).max(),
        ));
    }
    let inference_index: BTreeMap<(&str, &str), usize> =
        inference.keys().enumerate().map(|(i, k)| (*k, i)).collect();
    let rows_per_insert = if sqlite {
        SQLITE_INFERENCE_ROWS_PER_INSERT
    } else {
        INFERENCE_ROWS_PER_INSERT
    };
    for chunk in all_rows(&results).chunks(rows_per_insert) {
        let mut q = Sql::new(
            "INSERT INTO inference (device_id, stream, seq, ts, window_start, source_seq, model, \
             version, latency_us, output_kind, label, class, probabilities, score, threshold, \
             anomalous, received_at, confidence, input_mean_z, input_std_ratio) VALUES ",
        );
        let (mut current, mut d, mut s) = (usize::MAX, String::new(), String::new());
        for (i, (l, n)) in chunk.iter().enumerate() {
            let live = &results[*l];
            if *l != current {
                current = *l;
                d = q.param(live.device);
                s = q.param(live.stream);
            }
            let (seq, (r, at)) = live.rows[*n];
            if i > 0 {
                q.push(", ");
            }
            q.push(&format!("({d}, {s}, "));
            q.bind(seq).push(", ").bind(to_i64(r.ts)).push(", ");
            q.bind(to_i64(r.window_start)).push(", ");
            q.bind(to_i64(r.source_seq)).push(", ");
            q.bind(text(&r.model)).push(", ").bind(text(&r.version));
            q.push(", ").bind(i64::from(r.latency_us)).push(", ");
            match &r.output {
                InferenceOutput::Class {
                    label,
                    class,
                    probabilities,
                } => {
                    q.push("'class', ").bind(text(label)).push(", ");
                    q.bind(i64::from(*class)).push(", ");
                    q.bind(encode_values(probabilities));
                    q.push(", NULL, NULL, ").bind(false);
                }
                InferenceOutput::Anomaly {
                    score,
                    threshold,
                    anomalous,
                } => {
                    q.push("'anomaly', NULL, NULL, NULL, ");
                    q.bind(f64::from(*score))
                        .push(", ")
                        .bind(f64::from(*threshold));
                    q.push(", ").bind(*anomalous);
                }
            }
            q.push(", ").bind(at).push(", ");
            let confidence = match &r.output {
                InferenceOutput::Class { probabilities, .. } => probabilities
                    .iter()
                    .copied()
                    .fold(None, |m: Option<f32>, p| Some(m.map_or(p, |m| m.max(p))))
                    .map(f64::from),
                InferenceOutput::Anomaly { .. } => None,
            };
            match confidence {
                Some(c) => q.bind(c),
                None => q.push("NULL"),
            };
            match &r.input {
                Some(i) => {
                    q.push(", ").bind(encode_values(&i.mean_z)).push(", ");
                    q.bind(encode_values(&i.std_ratio)).push(")");
                }
                None => {
                    q.push(", NULL, NULL)");
                }
            }
        }
        q.push(" ON CONFLICT (device_id, stream, seq) DO NOTHING RETURNING device_id, stream, seq");
        let rows = q.query().fetch_all(&mut **tx).await?;
        mark_inserted(&mut results, &inference_index, rows)?;
    }
    // The raw windows of capture records, for the rows that were new.
    for live in &results {
        for (seq, (r, _)) in &live.rows {
            let Some(c) = &r.capture else { continue };
            if !live.inserted.contains(seq) {
                continue;
            }
            let mut q = Sql::new(
                "INSERT INTO captures (device_id, stream, seq, trigger_kind, channels, window_vals) VALUES (",
            );
            q.bind(live.device)
                .push(", ")
                .bind(live.stream)
                .push(", ")
                .bind(*seq);
            q.push(", ")
                .bind(text(&c.trigger))
                .push(", ")
                .bind(i64::from(c.channels));
            q.push(", ").bind(encode_values(&c.window));
            q.push(") ON CONFLICT (device_id, stream, seq) DO NOTHING");
            q.query().execute(&mut **tx).await?;
        }
    }

    Ok(results)
}

/// The counters, per-minute aggregates (returned) and live events of the telemetry rows that
/// were inserted.
fn telemetry_effects<'a>(
    lives: &[Live<'a, &Rec>],
    aggregate_channels: usize,
    counters: &mut BTreeMap<Key<'a>, StreamUpdate>,
    outcome: &mut Outcome,
) -> BTreeMap<(&'a str, &'a str, i64, i64), Agg> {
    let mut aggregates: BTreeMap<(&str, &str, i64, i64), Agg> = BTreeMap::new();
    for live in lives {
        let (device, stream, inserted) = (live.device, live.stream, &live.inserted);
        let stored = inserted.len() as u64;
        let duplicates = live.rows.len() as u64 - stored + live.in_batch_duplicates;
        outcome.stored += stored;
        outcome.duplicates += duplicates;
        outcome.expired += live.expired;

        let (mut first_ts, mut last_ts, mut max_seq, mut channels) =
            (None::<i64>, None::<i64>, 0i64, None::<i64>);
        for (seq, (ts, values, _)) in live.rows.iter().filter(|(s, _)| inserted.contains(s)) {
            outcome.captured_at.push(*ts);
            first_ts = Some(first_ts.map_or(*ts, |f| f.min(*ts)));
            last_ts = Some(last_ts.map_or(*ts, |l| l.max(*ts)));
            max_seq = max_seq.max(*seq);
            channels = Some(values.len() as i64);
            let bucket = ts - ts.rem_euclid(BUCKET_US);
            for (ch, v) in values.iter().take(aggregate_channels).enumerate() {
                if !v.is_finite() {
                    continue;
                }
                let v = f64::from(*v);
                let a = aggregates
                    .entry((device, stream, bucket, ch as i64))
                    .or_insert(Agg {
                        samples: 0,
                        sum: 0.0,
                        min: v,
                        max: v,
                    });
                a.samples += 1;
                a.sum += v;
                a.min = a.min.min(v);
                a.max = a.max.max(v);
            }
        }
        counters.insert(
            (device, stream),
            StreamUpdate {
                kind: "telemetry",
                stored,
                duplicates,
                expired: live.expired,
                max_seq,
                first_ts,
                last_ts,
                channels,
                last_received: live.last_received,
                committed: 0,
            },
        );
        if let Some((seq, (ts, values, _))) =
            live.rows.iter().rev().find(|(s, _)| inserted.contains(s))
        {
            outcome.events.push(LiveEvent::Telemetry {
                device_id: device.to_string(),
                stream: stream.to_string(),
                seq: *seq,
                ts: *ts,
                values: values.iter().map(|v| v.is_finite().then_some(*v)).collect(),
            });
        }
    }

    aggregates
}

/// The counters (merged into the telemetry ones), per-minute aggregates (returned) and live
/// events of the model results that were inserted.
fn inference_effects<'a>(
    results: &[Live<'a, (&InferenceRecord, i64)>],
    counters: &mut BTreeMap<Key<'a>, StreamUpdate>,
    outcome: &mut Outcome,
) -> BTreeMap<(&'a str, &'a str, i64, String), InferenceAgg> {
    let mut inference_aggregates: BTreeMap<(&str, &str, i64, String), InferenceAgg> =
        BTreeMap::new();
    for live in results {
        let (device, stream, inserted) = (live.device, live.stream, &live.inserted);
        let stored = inserted.len() as u64;
        let duplicates = live.rows.len() as u64 - stored + live.in_batch_duplicates;
        outcome.stored += stored;
        outcome.duplicates += duplicates;
        outcome.expired += live.expired;

        let (mut first_ts, mut last_ts, mut max_seq) = (None::<i64>, None::<i64>, 0i64);
        let new: Vec<(i64, &InferenceRecord)> = live
            .rows
            .iter()
            .filter(|(s, _)| inserted.contains(s))
            .map(|(s, (r, _))| (*s, *r))
            .collect();
        for (seq, r) in &new {
            let ts = to_i64(r.ts);
            outcome.captured_at.push(ts);
            first_ts = Some(first_ts.map_or(ts, |f| f.min(ts)));
            last_ts = Some(last_ts.map_or(ts, |l| l.max(ts)));
            max_seq = max_seq.max(*seq);
            let bucket = ts - ts.rem_euclid(BUCKET_US);
            let label = match &r.output {
                InferenceOutput::Class { label, .. } => text(label),
                InferenceOutput::Anomaly { .. } => String::new(),
            };
            let a = inference_aggregates
                .entry((device, stream, bucket, label))
                .or_default();
            a.results += 1;
            a.latency_sum += i64::from(r.latency_us);
            if let InferenceOutput::Anomaly {
                score, anomalous, ..
            } = &r.output
            {
                let score = f64::from(*score);
                a.scored += 1;
                a.score_sum += score;
                a.score_max = Some(a.score_max.map_or(score, |m| m.max(score)));
                if *anomalous {
                    a.anomalies += 1;
                }
            }
        }
        let update = StreamUpdate {
            kind: "inference",
            stored,
            duplicates,
            expired: live.expired,
            max_seq,
            first_ts,
            last_ts,
            channels: None,
            last_received: live.last_received,
            committed: 0,
        };
        match counters.entry((device, stream)) {
            std::collections::btree_map::Entry::Occupied(mut e) => e.get_mut().merge(update),
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(update);
            }
        }
        let skip = new.len().saturating_sub(MAX_RESULTS_PER_STREAM);
        for (seq, r) in new.iter().skip(skip) {
            let (output_kind, label, class, probabilities, score, threshold, anomalous) =
                match &r.output {
                    InferenceOutput::Class {
                        label,
                        class,
                        probabilities,
                    } => (
                        "class",
                        Some(text(label)),
                        Some(i64::from(*class)),
                        Some(probabilities.clone()),
                        None,
                        None,
                        false,
                    ),
                    InferenceOutput::Anomaly {
                        score,
                        threshold,
                        anomalous,
                    } => (
                        "anomaly",
                        None,
                        None,
                        None,
                        Some(f64::from(*score)),
                        Some(f64::from(*threshold)),
                        *anomalous,
                    ),
                };
            outcome.events.push(LiveEvent::Inference {
                device_id: device.to_string(),
                stream: stream.to_string(),
                seq: *seq,
                ts: to_i64(r.ts),
                model: text(&r.model),
                version: text(&r.version),
                latency_us: i64::from(r.latency_us),
                output_kind: output_kind.into(),
                label,
                class,
                probabilities,
                score,
                threshold,
                anomalous,
            });
        }
    }

    inference_aggregates
}

/// Adds the batch's counters to each stream row (one upsert touches each stream once).
async fn upsert_stream_counters(
    tx: &mut Tx,
    counters: BTreeMap<Key<'_>, StreamUpdate>,
) -> Result<(), sqlx::Error> {
    let counters: Vec<_> = counters.into_iter().collect();
    for chunk in counters.chunks(KEY_ROWS_PER_STATEMENT) {
        let mut q = Sql::new(
            "INSERT INTO streams (device_id, stream, kind, received, duplicates, expired, max_seq, \
             first_ts, last_ts, channels, last_received_at, committed_through) VALUES ",
        );
        for (i, ((device, stream), u)) in chunk.iter().enumerate() {
            if i > 0 {
                q.push(", ");
            }
            q.push("(").bind(*device).push(", ").bind(*stream);
            q.push(&format!(", '{}', ", u.kind));
            q.bind(u.stored as i64)
                .push(", ")
                .bind(u.duplicates as i64)
                .push(", ");
            q.bind(u.expired as i64)
                .push(", ")
                .bind(u.max_seq)
                .push(", ");
            q.bind(u.first_ts).push(", ").bind(u.last_ts).push(", ");
            q.bind(u.channels)
                .push(", ")
                .bind(u.last_received)
                .push(", ")
                .bind(u.committed)
                .push(")");
        }
        q.push(
            " ON CONFLICT (device_id, stream) DO UPDATE SET \
             kind = excluded.kind, \
             received = streams.received + excluded.received, \
             duplicates = streams.duplicates + excluded.duplicates, \
             expired = streams.expired + excluded.expired, \
             max_seq = CASE WHEN excluded.max_seq > streams.max_seq THEN excluded.max_seq ELSE streams.max_seq END, \
             first_ts = CASE WHEN excluded.first_ts IS NOT NULL AND (streams.first_ts IS NULL OR excluded.first_ts < streams.first_ts) \
                             THEN excluded.first_ts ELSE streams.first_ts END, \
             last_ts = CASE WHEN excluded.last_ts IS NOT NULL AND (streams.last_ts IS NULL OR excluded.last_ts > streams.last_ts) \
                            THEN excluded.last_ts ELSE streams.last_ts END, \
             channels = COALESCE(streams.channels, excluded.channels), \
             last_received_at = COALESCE(excluded.last_received_at, streams.last_received_at), \
             committed_through = CASE WHEN excluded.committed_through > streams.committed_through \
                                      THEN excluded.committed_through ELSE streams.committed_through END",
        );
        q.query().execute(&mut **tx).await?;
    }
    Ok(())
}

/// Adds the results' per-minute aggregates to `inference_1m`.
async fn upsert_inference_aggregates(
    tx: &mut Tx,
    inference_aggregates: BTreeMap<(&str, &str, i64, String), InferenceAgg>,
) -> Result<(), sqlx::Error> {
    let inference_aggregates: Vec<_> = inference_aggregates.into_iter().collect();
    for chunk in inference_aggregates.chunks(INFERENCE_AGGREGATE_ROWS_PER_INSERT) {
        let mut q = Sql::new(
            "INSERT INTO inference_1m (device_id, stream, bucket, label, results, anomalies, scored, \
             score_sum, score_max, latency_sum) VALUES ",
        );
        for (i, ((device, stream, bucket, label), a)) in chunk.iter().enumerate() {
            if i > 0 {
                q.push(", ");
            }
            q.push("(")
                .bind(*device)
                .push(", ")
                .bind(*stream)
                .push(", ");
            q.bind(*bucket).push(", ").bind(label.as_str()).push(", ");
            q.bind(a.results).push(", ").bind(a.anomalies).push(", ");
            q.bind(a.scored).push(", ").bind(a.score_sum).push(", ");
            match a.score_max {
                Some(m) => q.bind(m),
                None => q.push("NULL"),
            };
            q.push(", ").bind(a.latency_sum).push(")");
        }
        q.push(
            " ON CONFLICT (device_id, stream, bucket, label) DO UPDATE SET \
             results = inference_1m.results + excluded.results, \
             anomalies = inference_1m.anomalies + excluded.anomalies, \
             scored = inference_1m.scored + excluded.scored, \
             score_sum = inference_1m.score_sum + excluded.score_sum, \
             score_max = CASE WHEN inference_1m.score_max IS NULL OR excluded.score_max > inference_1m.score_max \
                              THEN excluded.score_max ELSE inference_1m.score_max END, \
             latency_sum = inference_1m.latency_sum + excluded.latency_sum",
        );
        q.query().execute(&mut **tx).await?;
    }
    Ok(())
}

/// Adds the telemetry's per-minute, per-channel aggregates to `aggregates_1m`.
async fn upsert_aggregates(
    tx: &mut Tx,
    aggregates: BTreeMap<(&str, &str, i64, i64), Agg>,
) -> Result<(), sqlx::Error> {
    let aggregates: Vec<_> = aggregates.into_iter().collect();
    for chunk in aggregates.chunks(AGGREGATE_ROWS_PER_INSERT) {
        let mut q = Sql::new(
            "INSERT INTO aggregates_1m (device_id, stream, bucket, channel, samples, sum_v, min_v, max_v) VALUES ",
        );
        for (i, ((device, stream, bucket, channel), a)) in chunk.iter().enumerate() {
            if i > 0 {
                q.push(", ");
            }
            q.push("(")
                .bind(*device)
                .push(", ")
                .bind(*stream)
                .push(", ");
            q.bind(*bucket).push(", ").bind(*channel).push(", ");
            q.bind(a.samples).push(", ").bind(a.sum).push(", ");
            q.bind(a.min).push(", ").bind(a.max).push(")");
        }
        q.push(
            " ON CONFLICT (device_id, stream, bucket, channel) DO UPDATE SET \
             samples = aggregates_1m.samples + excluded.samples, \
             sum_v = aggregates_1m.sum_v + excluded.sum_v, \
             min_v = CASE WHEN excluded.min_v < aggregates_1m.min_v THEN excluded.min_v ELSE aggregates_1m.min_v END, \
             max_v = CASE WHEN excluded.max_v > aggregates_1m.max_v THEN excluded.max_v ELSE aggregates_1m.max_v END",
        );
        q.query().execute(&mut **tx).await?;
    }
    Ok(())
}

/// Applies the statuses in arrival order (see [`apply_status`]).
async fn write_statuses(
    tx: &mut Tx,
    statuses: &[(&Status, i64)],
    outcome: &mut Outcome,
) -> Result<(), sqlx::Error> {
    for (status, received_at) in statuses {
        apply_status(tx, status, *received_at).await?;
        outcome.events.push(LiveEvent::Device {
            device_id: status.device.clone(),
            online: status.state == DeviceState::Online,
        });
    }

    Ok(())
}

/// Records each heartbeat's uptime and queue size on its device.
async fn write_heartbeats(
    tx: &mut Tx,
    heartbeats: &[(&Heartbeat, i64)],
) -> Result<(), sqlx::Error> {
    for (hb, received_at) in heartbeats {
        let mut q = Sql::new("UPDATE devices SET uptime_s = ");
        q.bind(to_i64(hb.uptime_s));
        q.push(", queue_records = ").bind(to_i64(hb.queue_records));
        q.push(", heartbeat_at = ").bind(*received_at);
        q.push(" WHERE device_id = ").bind(hb.device.as_str());
        q.query().execute(&mut **tx).await?;
    }
    Ok(())
}

/// Adds the batch's rejects to the per-device, per-reason counts.
async fn write_rejects(
    tx: &mut Tx,
    rejects: &BTreeMap<(&str, &'static str), RejectAgg>,
    outcome: &mut Outcome,
) -> Result<(), sqlx::Error> {
    for ((device, reason), r) in rejects {
        let mut q = Sql::new(
            "INSERT INTO rejects (device_id, reason, count, first_at, last_at, last_topic, last_detail) VALUES (",
        );
        q.bind(*device)
            .push(", ")
            .bind(*reason)
            .push(", ")
            .bind(r.count);
        q.push(", ")
            .bind(r.first_at)
            .push(", ")
            .bind(r.last_at)
            .push(", ");
        q.bind(r.topic.as_str())
            .push(", ")
            .bind(r.detail.as_str())
            .push(")");
        q.push(
            " ON CONFLICT (device_id, reason) DO UPDATE SET count = rejects.count + excluded.count, \
             last_at = excluded.last_at, last_topic = excluded.last_topic, last_detail = excluded.last_detail",
        );
        q.query().execute(&mut **tx).await?;
        outcome.events.push(LiveEvent::Reject {
            device_id: device.to_string(),
            reason: reason.to_string(),
            count: r.count,
        });
    }

    Ok(())
}

fn group_telemetry<'a>(
    b: &'a TelemetryBatch,
    received_at: i64,
    streams: &mut BTreeMap<(&'a str, &'a str), StreamRecords>,
    outcome: &mut Outcome,
) {
    let entry = streams
        .entry((b.device.as_str(), b.stream.as_str()))
        .or_default();
    for r in &b.records {
        outcome.records += 1;
        match entry.records.entry(r.seq) {
            std::collections::btree_map::Entry::Occupied(_) => entry.in_batch_duplicates += 1,
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert((to_i64(r.ts), r.values.clone(), received_at));
            }
        }
    }
}

fn group_inference<'a>(
    b: &'a InferenceBatch,
    received_at: i64,
    streams: &mut BTreeMap<(&'a str, &'a str), InferenceRecords<'a>>,
    outcome: &mut Outcome,
) {
    let entry = streams
        .entry((b.device.as_str(), b.stream.as_str()))
        .or_default();
    for r in &b.records {
        outcome.records += 1;
        match entry.records.entry(r.seq) {
            std::collections::btree_map::Entry::Occupied(_) => entry.in_batch_duplicates += 1,
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert((r, received_at));
            }
        }
    }
}

/// Postgres refuses NUL in text; the protocol does not forbid it.
fn text(s: &str) -> String {
    s.replace('\0', "")
}

/// Counters of one stream after its records were inserted.
struct StreamUpdate {
    kind: &'static str,
    stored: u64,
    duplicates: u64,
    expired: u64,
    max_seq: i64,
    first_ts: Option<i64>,
    last_ts: Option<i64>,
    channels: Option<i64>,
    last_received: Option<i64>,
    /// The raised commit watermark (0: unchanged).
    committed: i64,
}

impl StreamUpdate {
    /// Folds in the other kind's counters for the same stream name (which a device must not
    /// use for both kinds), so that the multi-row upsert touches each stream row once.
    fn merge(&mut self, o: StreamUpdate) {
        let min = |a: Option<i64>, b: Option<i64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.kind = o.kind;
        self.stored += o.stored;
        self.duplicates += o.duplicates;
        self.expired += o.expired;
        self.max_seq = self.max_seq.max(o.max_seq);
        self.first_ts = min(self.first_ts, o.first_ts);
        self.last_ts = self.last_ts.max(o.last_ts);
        self.channels = o.channels.or(self.channels);
        self.last_received = self.last_received.max(o.last_received);
        self.committed = self.committed.max(o.committed);
    }
}

/// The broker's Last Will: `offline` with `ts = 0` (a clean shutdown's `offline` has a time).
pub fn is_last_will(s: &Status) -> bool {
    s.state == DeviceState::Offline && s.ts == 0
}

/// Longest `agent_version` and serialized `models`/`counters` kept.
const MAX_STATUS_TEXT: usize = 4096;

fn bounded(s: String) -> String {
    if s.len() <= MAX_STATUS_TEXT {
        s.replace('\0', "")
    } else {
        let mut end = MAX_STATUS_TEXT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s[..end].replace('\0', "")
    }
}

/// Applies one status: the registry row (unless an older status overtook it), the per-stream
/// `last_seq` (only ever raised) and the union of evicted ranges.
async fn apply_status(tx: &mut Tx, status: &Status, received_at: i64) -> Result<(), sqlx::Error> {
    let device = status.device.as_str();
    if is_last_will(status) {
        let mut q = Sql::new("UPDATE devices SET online_changed_at = CASE WHEN online THEN ");
        q.bind(received_at);
        q.push(" ELSE online_changed_at END, online = FALSE WHERE device_id = ");
        q.bind(device);
        q.query().execute(&mut **tx).await?;
        return Ok(());
    }
    if status.ts == 0 {
        // Presence the transport reports (IoT Hub's deviceConnected event): the online flag
        // only; the agent's own status (with its time) carries the rest.
        let mut q = Sql::new(
            "UPDATE devices SET online_changed_at = CASE WHEN online THEN online_changed_at ELSE ",
        );
        q.bind(received_at);
        q.push(" END, online = TRUE WHERE device_id = ");
        q.bind(device);
        q.query().execute(&mut **tx).await?;
        return Ok(());
    }
    let online = status.state == DeviceState::Online;
    let models = serde_json::to_string(&status.models).unwrap_or_else(|_| "{}".into());
    let counters = status
        .counters
        .as_ref()
        .and_then(|c| serde_json::to_string(c).ok());
    let mut q = Sql::new("UPDATE devices SET online_changed_at = CASE WHEN online = ");
    let online_p = q.param(online);
    let at = q.param(received_at);
    q.push(&format!(
        "{online_p} THEN online_changed_at ELSE {at} END, online = {online_p}, status_at = {at}, status_ts = "
    ));
    let ts = q.param(to_i64(status.ts));
    q.push(&ts);
    q.push(", agent_version = ")
        .bind(status.agent_version.clone().map(bounded));
    q.push(", models = ").bind(bounded(models));
    q.push(", counters = ").bind(counters.map(bounded));
    // Agents that predate end-to-end acknowledgement send no `delivery`: they delete on PUBACK.
    q.push(", delivery = ").bind(
        status
            .delivery
            .unwrap_or(ember_proto::Delivery::Puback)
            .as_str(),
    );
    let queue = status.queue.as_ref();
    q.push(", queue_records = ")
        .bind(queue.map(|g| to_i64(g.records)));
    q.push(", queue_bytes = ")
        .bind(queue.map(|g| to_i64(g.bytes)));
    q.push(", queue_disk_bytes = ")
        .bind(queue.map(|g| to_i64(g.disk_bytes)));
    q.push(" WHERE device_id = ").bind(device);
    // Skip a status older than the one applied, unless that one is stale by the fleet's clock
    // (an agent whose clock jumped back must not freeze its registry entry).
    q.push(&format!(
        " AND (status_ts IS NULL OR status_ts <= {ts} OR status_at < "
    ));
    q.bind(received_at - STALE_STATUS_US).push(")");
    // Whether this is the newest status applied: an older one (a transport without order,
    // such as an unordered Pub/Sub subscription, delivers them in any order) must not set the
    // streams' `queued` back either.
    let newest = q.query().execute(&mut **tx).await?.rows_affected() > 0;

    for s in &status.streams {
        let mut q = Sql::new(
            "INSERT INTO streams (device_id, stream, last_seq, queued, channels) VALUES (",
        );
        q.bind(device).push(", ").bind(s.stream.as_str()).push(", ");
        q.bind(to_i64(s.last_seq))
            .push(", ")
            .bind(to_i64(s.queued))
            .push(", ")
            .bind(s.channels.map(i64::from))
            .push(")");
        // The schema the agent reports is the stream's from then on (an earlier one stays:
        // a stream's channel count does not change). `queued` follows the newest `last_seq`,
        // and at an equal one the newest status.
        let queued_from = if newest { ">=" } else { ">" };
        q.push(&format!(
            " ON CONFLICT (device_id, stream) DO UPDATE SET \
             channels = COALESCE(streams.channels, excluded.channels), \
             queued = CASE WHEN excluded.last_seq {queued_from} streams.last_seq THEN excluded.queued ELSE streams.queued END, \
             last_seq = CASE WHEN excluded.last_seq > streams.last_seq THEN excluded.last_seq ELSE streams.last_seq END",
        ));
        q.query().execute(&mut **tx).await?;
        if s.evicted.is_empty() {
            continue;
        }
        let mut q = Sql::new(
            "INSERT INTO evicted_ranges (device_id, stream, from_seq, to_seq, reason, reported_at) VALUES ",
        );
        let d = q.param(device);
        let st = q.param(s.stream.as_str());
        let at = q.param(received_at);
        for (i, r) in s.evicted.iter().enumerate() {
            if i > 0 {
                q.push(", ");
            }
            q.push(&format!("({d}, {st}, "));
            q.bind(to_i64(r.from))
                .push(", ")
                .bind(to_i64(r.to))
                .push(", ");
            let reason: String = r.reason.chars().filter(|c| *c != '\0').take(32).collect();
            q.bind(reason).push(&format!(", {at})"));
        }
        q.push(" ON CONFLICT (device_id, stream, from_seq, to_seq, reason) DO NOTHING");
        q.query().execute(&mut **tx).await?;
    }
    Ok(())
}

/// A stored status older than this (fleet clock) is replaced by any newer message.
const STALE_STATUS_US: i64 = 60_000_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_including_non_finite() {
        let v = vec![1.5, -0.0, f32::NAN, f32::INFINITY];
        let back = decode_values(&encode_values(&v));
        assert_eq!(back.len(), 4);
        assert_eq!(back[0], 1.5);
        assert!(back[2].is_nan());
        assert_eq!(back[3], f32::INFINITY);
    }

    #[test]
    fn status_text_is_bounded_and_nul_free() {
        assert_eq!(bounded("a\0b".into()), "ab");
        let long = "é".repeat(5000);
        assert!(bounded(long).len() <= MAX_STATUS_TEXT);
    }
}
