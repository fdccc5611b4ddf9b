//! The data lake: committed telemetry and model results exported as Parquet files to a
//! directory or an object store (`[lake]`, `docs/data-lake.md`), partitioned hive-style:
//!
//! ```text
//! <root>/kind=telemetry/date=YYYY-MM-DD/device=<id>/<stream>-<from>-<to>.parquet
//! <root>/kind=inference/date=YYYY-MM-DD/device=<id>/<stream>-<from>-<to>.parquet
//! <root>/kind=.../date=.../device=.../<stream>-c<compaction id>.parquet   (compacted)
//! ```
//!
//! **Exactly once per (device, stream, seq).** A stream is exported only up to its commit
//! watermark (`streams.committed_through`): below it no record can arrive any more, so what
//! is exported is final. One export of a stream is a range `from..=to` recorded in
//! `lake_exports` *before* any file is written; its files are named after the range and the
//! day, so writing them again writes the same names with the same bytes (the writer is
//! deterministic). The transaction that records the files (`lake_files`) also raises
//! `streams.lake_through` to `to` and marks the export done. A fleet killed anywhere in
//! between finds the export pending at its next pass and finishes it with the very same range:
//! no record is written twice, none is skipped. Only the leader exports (singleton work); if
//! two replicas ever raced, the second's range insert conflicts and it finishes the first's
//! range, writing the same files.
//!
//! **Compaction.** Once a (kind, day, device, stream) has `compact_min_files` files smaller than
//! `compact_target_bytes`, they are merged: a `lake_compactions` row claims the inputs
//! (`lake_files.compaction_id`), the merged file is written, one transaction replaces the
//! inputs' rows with the output's (`written_at`), then the input objects are deleted
//! (`done_at`). A crash at any point is finished by the next pass. A reader listing the
//! directory between the output's write and the inputs' deletion (milliseconds) sees both;
//! `docs/data-lake.md` says how to read a consistent view from `lake_files`.
//!
//! **Retention.** With the lake on, retention never deletes a row above `lake_through`, so
//! the database can keep fewer days than the lake.

pub mod format;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::Row;
use tokio_util::sync::CancellationToken;

#[cfg(feature = "cloud")]
use crate::blob::ObjStore;
use crate::blob::{BlobError, BlobStore, FsStore};
use crate::config::{LakeSettings, LakeStore};
use crate::db::{Db, Sql, get_bool, now_us};
use crate::metrics::Metrics;
use crate::server::ingest::writer::decode_values;
use format::{InferenceRow, Kind, Rows, TelemetryRow};

/// Why a lake pass failed (the next pass tries again).
#[derive(Debug, thiserror::Error)]
pub enum LakeError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("lake store: {0}")]
    Store(#[from] BlobError),
    #[error(transparent)]
    Format(#[from] format::FormatError),
    #[error("lake: {0}")]
    Invalid(String),
}

/// The lake: where files go and how big they get.
pub struct Lake {
    db: Db,
    store: BlobStore,
    settings: LakeSettings,
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pass {
    pub exports: u64,
    pub records: BTreeMap<&'static str, u64>,
    pub files: u64,
    pub bytes: u64,
    pub compactions: u64,
}

impl Lake {
    /// Opens the configured store (an object store is first reached by the first write).
    pub fn open(db: Db, settings: &LakeSettings) -> Result<Lake, LakeError> {
        let store = match &settings.store {
            LakeStore::Dir(dir) => BlobStore::Fs(FsStore::new(dir.clone())),
            #[cfg(feature = "cloud")]
            LakeStore::Object { url } => {
                BlobStore::Object(ObjStore::open(url, &settings.store_options)?)
            }
            // Refused by `Settings::check_build` already, for callers that skip it.
            #[cfg(not(feature = "cloud"))]
            LakeStore::Object { url } => {
                return Err(BlobError(format!(
                    "lake.store = {url:?} needs ember-fleet built with its `cloud` feature"
                ))
                .into());
            }
        };
        Ok(Lake {
            db,
            store,
            settings: settings.clone(),
        })
    }

    /// Exports every stream up to its commit watermark, then compacts; returns what it did.
    pub async fn pass(&self) -> Result<Pass, LakeError> {
        let mut out = Pass::default();
        // Pending exports first (a previous run died mid-export), in the order they began.
        let pending = sqlx::query(
            "SELECT id, device_id, stream, kind, from_seq, to_seq FROM lake_exports \
             WHERE done_at IS NULL ORDER BY id",
        )
        .fetch_all(self.db.pool())
        .await?;
        for row in pending {
            self.finish_export(Export::from_row(&row)?, &mut out)
                .await?;
        }
        loop {
            let due = sqlx::query(
                "SELECT device_id, stream, kind, lake_through, committed_through FROM streams \
                 WHERE committed_through > lake_through ORDER BY device_id, stream",
            )
            .fetch_all(self.db.pool())
            .await?;
            if due.is_empty() {
                break;
            }
            for row in due {
                let device: String = row.try_get("device_id")?;
                let stream: String = row.try_get("stream")?;
                let Some(kind) = Kind::parse(&row.try_get::<String, _>("kind")?) else {
                    continue;
                };
                let through: i64 = row.try_get("lake_through")?;
                let committed: i64 = row.try_get("committed_through")?;
                let max = i64::try_from(self.settings.max_rows_per_file).unwrap_or(i64::MAX);
                let to = committed.min(through.saturating_add(max));
                let export = self
                    .begin_export(&device, &stream, kind, through + 1, to)
                    .await?;
                self.finish_export(export, &mut out).await?;
            }
        }
        self.export_labels(&mut out).await?;
        self.compact(&mut out).await?;
        Ok(out)
    }

    /// Labels given since the last export, by `capture_labels.id` (ids are committed in
    /// increasing order, so nothing can appear below the watermark later).
    async fn export_labels(&self, out: &mut Pass) -> Result<(), LakeError> {
        loop {
            let through = labels_through(&self.db).await?;
            let max: Option<i64> = sqlx::query("SELECT MAX(id) AS m FROM capture_labels")
                .fetch_one(self.db.pool())
                .await?
                .try_get("m")?;
            let Some(max) = max.filter(|m| *m > through) else {
                return Ok(());
            };
            let limit = i64::try_from(self.settings.max_rows_per_file).unwrap_or(i64::MAX);
            let to = max.min(through.saturating_add(limit));
            let e = self
                .begin_export(LABELS_DEVICE, LABELS_STREAM, Kind::Label, through + 1, to)
                .await?;
            self.finish_export(e, out).await?;
        }
    }

    /// Records the range, or finds the one a racing or crashed exporter recorded first.
    async fn begin_export(
        &self,
        device: &str,
        stream: &str,
        kind: Kind,
        from: i64,
        to: i64,
    ) -> Result<Export, LakeError> {
        let mut q = Sql::new(
            "INSERT INTO lake_exports (device_id, stream, kind, from_seq, to_seq, created_at) VALUES (",
        );
        q.bind(device)
            .push(", ")
            .bind(stream)
            .push(", ")
            .bind(kind.as_str());
        q.push(", ")
            .bind(from)
            .push(", ")
            .bind(to)
            .push(", ")
            .bind(now_us());
        q.push(") ON CONFLICT (device_id, stream, from_seq) DO NOTHING");
        q.query().execute(self.db.pool()).await?;
        let mut q = Sql::new(
            "SELECT id, device_id, stream, kind, from_seq, to_seq FROM lake_exports WHERE device_id = ",
        );
        q.bind(device).push(" AND stream = ").bind(stream);
        q.push(" AND from_seq = ").bind(from);
        Export::from_row(&q.query().fetch_one(self.db.pool()).await?)
    }

    /// Writes the export's files (again, if a crash interrupted it) and commits them with the
    /// stream's new `lake_through` (labels: the `lake.labels_through` fact).
    async fn finish_export(&self, e: Export, out: &mut Pass) -> Result<(), LakeError> {
        let rows = self.read_rows(&e).await?;
        let total = rows.len() as u64;
        let mut files = Vec::new();
        for (day, rows) in rows.split_by_day() {
            for (device, rows) in rows.split_by_device(&e.device) {
                let keys = rows.keys();
                let (min, max) = (keys[0].0, keys[keys.len() - 1].0);
                let path = format!(
                    "{}/{}-{:012}-{:012}.parquet",
                    partition(e.kind, &day, &device),
                    e.stream,
                    e.from,
                    e.to
                );
                let bytes = format::write(&rows, &device)?;
                let len = bytes.len() as u64;
                self.store.put(&path, bytes).await?;
                files.push(File {
                    path,
                    day: day.clone(),
                    device,
                    min,
                    max,
                    rows: rows.len() as i64,
                    bytes: len,
                });
            }
        }
        fault::crash_at("export");
        let mut tx = self.db.pool().begin().await?;
        let mut q = Sql::new("UPDATE lake_exports SET done_at = ");
        q.bind(now_us()).push(", rows_out = ").bind(total as i64);
        q.push(" WHERE id = ")
            .bind(e.id)
            .push(" AND done_at IS NULL");
        if q.query().execute(&mut *tx).await?.rows_affected() == 0 {
            // Someone else finished it meanwhile: same files, nothing to record.
            return Ok(());
        }
        let now = now_us();
        for f in &files {
            let mut q = Sql::new(
                "INSERT INTO lake_files (path, kind, day, device_id, stream, min_seq, max_seq, rows_in, bytes, created_at) VALUES (",
            );
            q.bind(f.path.as_str())
                .push(", ")
                .bind(e.kind.as_str())
                .push(", ");
            q.bind(f.day.as_str())
                .push(", ")
                .bind(f.device.as_str())
                .push(", ");
            q.bind(e.stream.as_str())
                .push(", ")
                .bind(f.min)
                .push(", ")
                .bind(f.max);
            q.push(", ").bind(f.rows).push(", ").bind(f.bytes as i64);
            q.push(", ")
                .bind(now)
                .push(") ON CONFLICT (path) DO NOTHING");
            q.query().execute(&mut *tx).await?;
        }
        if e.kind == Kind::Label {
            let mut q = Sql::new("INSERT INTO fleet_facts (name, value) VALUES (");
            q.bind(LABELS_FACT).push(", ").bind(e.to.to_string());
            q.push(") ON CONFLICT (name) DO UPDATE SET value = excluded.value");
            q.query().execute(&mut *tx).await?;
        } else {
            let mut q = Sql::new("UPDATE streams SET lake_through = ");
            q.bind(e.to)
                .push(" WHERE device_id = ")
                .bind(e.device.as_str());
            q.push(" AND stream = ").bind(e.stream.as_str());
            q.push(" AND lake_through < ").bind(e.to);
            q.query().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        out.exports += 1;
        *out.records.entry(e.kind.as_str()).or_default() += total;
        out.files += files.len() as u64;
        out.bytes += files.iter().map(|f| f.bytes).sum::<u64>();
        Ok(())
    }

    async fn read_rows(&self, e: &Export) -> Result<Rows, LakeError> {
        let mut q = match e.kind {
            Kind::Telemetry => {
                let mut q = Sql::new(
                    "SELECT t.seq, t.ts, t.vals, t.received_at FROM telemetry t WHERE t.device_id = ",
                );
                q.bind(e.device.as_str());
                q
            }
            Kind::Inference => {
                let mut q = Sql::new(
                    "SELECT t.seq, t.ts, t.window_start, t.source_seq, t.model, t.version, \
                     t.latency_us, t.output_kind, t.label, t.class, t.probabilities, t.score, \
                     t.threshold, t.anomalous, t.received_at, t.input_mean_z, t.input_std_ratio, \
                     c.trigger_kind, c.window_vals FROM inference t LEFT JOIN captures c \
                     ON c.device_id = t.device_id AND c.stream = t.stream AND c.seq = t.seq \
                     WHERE t.device_id = ",
                );
                q.bind(e.device.as_str());
                q
            }
            Kind::Label => {
                let mut q = Sql::new(
                    "SELECT id, device_id, stream, seq, label, labelled_by, labelled_at \
                     FROM capture_labels WHERE id >= ",
                );
                q.bind(e.from)
                    .push(" AND id <= ")
                    .bind(e.to)
                    .push(" ORDER BY id");
                let mut out = Vec::new();
                for r in q.query().fetch_all(self.db.pool()).await? {
                    out.push(format::LabelRow {
                        id: r.try_get("id")?,
                        device: r.try_get("device_id")?,
                        stream: r.try_get("stream")?,
                        seq: r.try_get("seq")?,
                        label: r.try_get("label")?,
                        labelled_by: r.try_get("labelled_by")?,
                        labelled_at: r.try_get("labelled_at")?,
                    });
                }
                return Ok(Rows::Label(out));
            }
        };
        q.push(" AND t.stream = ").bind(e.stream.as_str());
        q.push(" AND t.seq >= ")
            .bind(e.from)
            .push(" AND t.seq <= ")
            .bind(e.to);
        q.push(" ORDER BY t.seq");
        let rows = q.query().fetch_all(self.db.pool()).await?;
        let mut out = Rows::empty(e.kind);
        for r in rows {
            match &mut out {
                Rows::Telemetry(v) => v.push(TelemetryRow {
                    stream: e.stream.clone(),
                    seq: r.try_get("seq")?,
                    ts: r.try_get("ts")?,
                    values: decode_values(&r.try_get::<Vec<u8>, _>("vals")?),
                    received_at: r.try_get("received_at")?,
                }),
                Rows::Inference(v) => v.push(InferenceRow {
                    stream: e.stream.clone(),
                    seq: r.try_get("seq")?,
                    ts: r.try_get("ts")?,
                    window_start: r.try_get("window_start")?,
                    source_seq: r.try_get("source_seq")?,
                    model: r.try_get("model")?,
                    version: r.try_get("version")?,
                    latency_us: r.try_get("latency_us")?,
                    output_kind: r.try_get("output_kind")?,
                    label: r.try_get("label")?,
                    class: r
                        .try_get::<Option<i64>, _>("class")?
                        .map(|c| i32::try_from(c).unwrap_or(i32::MAX)),
                    probabilities: blob_floats(&r, "probabilities")?,
                    score: r.try_get("score")?,
                    threshold: r.try_get("threshold")?,
                    anomalous: get_bool(&r, "anomalous")?,
                    received_at: r.try_get("received_at")?,
                    input_mean_z: blob_floats(&r, "input_mean_z")?,
                    input_std_ratio: blob_floats(&r, "input_std_ratio")?,
                    capture_trigger: r.try_get("trigger_kind")?,
                    capture_window: blob_floats(&r, "window_vals")?,
                }),
                Rows::Label(_) => {}
            }
        }
        Ok(out)
    }

    /// Merges the small files of every partition's stream that has enough of them, and
    /// finishes compactions a crash interrupted.
    async fn compact(&self, out: &mut Pass) -> Result<(), LakeError> {
        let pending = sqlx::query(
            "SELECT id, output, written_at FROM lake_compactions WHERE done_at IS NULL ORDER BY id",
        )
        .fetch_all(self.db.pool())
        .await?;
        for row in pending {
            let id: i64 = row.try_get("id")?;
            let written: Option<i64> = row.try_get("written_at")?;
            if written.is_some() {
                self.delete_inputs(id).await?;
            } else {
                self.merge(id, row.try_get("output")?, out).await?;
            }
        }
        let mut q = Sql::new(
            "SELECT kind, day, device_id, stream, COUNT(*) AS n FROM lake_files \
             WHERE compaction_id IS NULL AND bytes < ",
        );
        q.bind(self.settings.compact_target_bytes as i64);
        q.push(" GROUP BY kind, day, device_id, stream HAVING COUNT(*) >= ");
        q.bind(self.settings.compact_min_files as i64);
        let due = q.query().fetch_all(self.db.pool()).await?;
        for row in due {
            let kind: String = row.try_get("kind")?;
            let day: String = row.try_get("day")?;
            let device: String = row.try_get("device_id")?;
            let stream: String = row.try_get("stream")?;
            let Some(k) = Kind::parse(&kind) else {
                continue;
            };
            // Claim the inputs and name the output in one transaction.
            let mut tx = self.db.pool().begin().await?;
            let mut q = Sql::new(
                "INSERT INTO lake_compactions (kind, day, device_id, stream, output, inputs, created_at) VALUES (",
            );
            q.bind(kind.as_str())
                .push(", ")
                .bind(day.as_str())
                .push(", ");
            q.bind(device.as_str()).push(", ").bind(stream.as_str());
            q.push(", '', '', ").bind(now_us()).push(") RETURNING id");
            let id: i64 = q.query().fetch_one(&mut *tx).await?.try_get("id")?;
            let output = format!("{}/{stream}-c{id:012}.parquet", partition(k, &day, &device));
            let mut q = Sql::new("UPDATE lake_files SET compaction_id = ");
            q.bind(id)
                .push(" WHERE compaction_id IS NULL AND kind = ")
                .bind(kind.as_str());
            q.push(" AND day = ")
                .bind(day.as_str())
                .push(" AND device_id = ");
            q.bind(device.as_str())
                .push(" AND stream = ")
                .bind(stream.as_str());
            q.push(" AND bytes < ")
                .bind(self.settings.compact_target_bytes as i64);
            let claimed = q.query().execute(&mut *tx).await?.rows_affected();
            let mut q = Sql::new("UPDATE lake_compactions SET output = ");
            q.bind(output.as_str())
                .push(", inputs = ")
                .bind(claimed.to_string());
            q.push(" WHERE id = ").bind(id);
            q.query().execute(&mut *tx).await?;
            tx.commit().await?;
            self.merge(id, output, out).await?;
        }
        Ok(())
    }

    /// Writes the merge of compaction `id`'s inputs as `output`, replaces their rows with the
    /// output's, then deletes the input objects.
    async fn merge(&self, id: i64, output: String, out: &mut Pass) -> Result<(), LakeError> {
        let mut q = Sql::new(
            "SELECT path, kind, day, device_id, stream, bytes FROM lake_files WHERE compaction_id = ",
        );
        q.bind(id).push(" ORDER BY min_seq");
        let inputs = q.query().fetch_all(self.db.pool()).await?;
        let Some(first) = inputs.first() else {
            // Nothing claimed (another exporter took them): close it.
            let mut q = Sql::new("UPDATE lake_compactions SET written_at = ");
            q.bind(now_us()).push(", done_at = ").bind(now_us());
            q.push(" WHERE id = ").bind(id);
            q.query().execute(self.db.pool()).await?;
            return Ok(());
        };
        let kind = Kind::parse(&first.try_get::<String, _>("kind")?)
            .ok_or_else(|| LakeError::Invalid(format!("compaction {id}: unknown kind")))?;
        let day: String = first.try_get("day")?;
        let device: String = first.try_get("device_id")?;
        let stream: String = first.try_get("stream")?;
        let mut rows = Rows::empty(kind);
        for input in &inputs {
            let path: String = input.try_get("path")?;
            let len: i64 = input.try_get("bytes")?;
            let bytes = self.store.read_range(&path, 0, len as u64).await?;
            rows.extend(format::read(bytes)?);
        }
        rows.sort_dedup();
        let keys = rows.keys();
        let (min, max) = match (keys.first(), keys.last()) {
            (Some(a), Some(b)) => (a.0, b.0),
            _ => (0, 0),
        };
        let bytes = format::write(&rows, &device)?;
        let len = bytes.len() as i64;
        self.store.put(&output, bytes).await?;
        let mut tx = self.db.pool().begin().await?;
        let mut q = Sql::new("DELETE FROM lake_files WHERE compaction_id = ");
        q.bind(id);
        q.query().execute(&mut *tx).await?;
        let mut q = Sql::new(
            "INSERT INTO lake_files (path, kind, day, device_id, stream, min_seq, max_seq, rows_in, bytes, created_at) VALUES (",
        );
        q.bind(output.as_str())
            .push(", ")
            .bind(kind.as_str())
            .push(", ");
        q.bind(day.as_str())
            .push(", ")
            .bind(device.as_str())
            .push(", ");
        q.bind(stream.as_str())
            .push(", ")
            .bind(min)
            .push(", ")
            .bind(max)
            .push(", ");
        q.bind(rows.len() as i64)
            .push(", ")
            .bind(len)
            .push(", ")
            .bind(now_us());
        q.push(") ON CONFLICT (path) DO NOTHING");
        q.query().execute(&mut *tx).await?;
        let paths: Vec<String> = inputs
            .iter()
            .map(|r| r.try_get::<String, _>("path"))
            .collect::<Result<_, _>>()?;
        let mut q = Sql::new("UPDATE lake_compactions SET written_at = ");
        q.bind(now_us()).push(", inputs = ").bind(paths.join("\n"));
        q.push(" WHERE id = ").bind(id);
        q.query().execute(&mut *tx).await?;
        tx.commit().await?;
        out.compactions += 1;
        fault::crash_at("compaction");
        self.delete_inputs(id).await
    }

    async fn delete_inputs(&self, id: i64) -> Result<(), LakeError> {
        let mut q = Sql::new("SELECT output, inputs FROM lake_compactions WHERE id = ");
        q.bind(id);
        let row = q.query().fetch_one(self.db.pool()).await?;
        let output: String = row.try_get("output")?;
        let inputs: String = row.try_get("inputs")?;
        for path in inputs.lines().filter(|p| !p.is_empty() && *p != output) {
            self.store.delete(path).await?;
        }
        let mut q = Sql::new("UPDATE lake_compactions SET done_at = ");
        q.bind(now_us()).push(" WHERE id = ").bind(id);
        q.query().execute(self.db.pool()).await?;
        Ok(())
    }

    /// Records committed but not yet in the lake, and the age of the oldest of them (seconds;
    /// 0 when the lake is up to date).
    pub async fn lag(&self) -> Result<(i64, f64), LakeError> {
        let rows = sqlx::query(
            "SELECT device_id, stream, kind, lake_through, committed_through FROM streams \
             WHERE committed_through > lake_through",
        )
        .fetch_all(self.db.pool())
        .await?;
        let (mut records, mut oldest) = (0i64, None::<i64>);
        for r in rows {
            let through: i64 = r.try_get("lake_through")?;
            records += r.try_get::<i64, _>("committed_through")? - through;
            let Some(kind) = Kind::parse(&r.try_get::<String, _>("kind")?) else {
                continue;
            };
            let mut q = Sql::new(&format!(
                "SELECT MIN(received_at) AS at FROM {} WHERE device_id = ",
                kind.as_str()
            ));
            q.bind(r.try_get::<String, _>("device_id")?)
                .push(" AND stream = ");
            q.bind(r.try_get::<String, _>("stream")?)
                .push(" AND seq > ")
                .bind(through);
            let at: Option<i64> = q.query().fetch_one(self.db.pool()).await?.try_get("at")?;
            if let Some(at) = at {
                oldest = Some(oldest.map_or(at, |o| o.min(at)));
            }
        }
        let age = oldest.map_or(0.0, |at| (now_us() - at).max(0) as f64 / 1e6);
        Ok((records, age))
    }
}

/// The test-only crash hook `EMBER_FLEET_FAULT_LAKE_CRASH` (`export:N`, `compaction:N`): the
/// lake task stops at that point and logs it, and the test kills the process with SIGKILL.
/// Compiled only with the cargo feature `fault-injection`.
mod fault {
    #[cfg(feature = "fault-injection")]
    pub fn crash_at(point: &str) {
        use std::sync::Mutex;
        use std::sync::OnceLock;
        const NAME: &str = "EMBER_FLEET_FAULT_LAKE_CRASH";
        static AT: OnceLock<Option<(String, u64)>> = OnceLock::new();
        static SEEN: Mutex<u64> = Mutex::new(0);
        let Some((at_point, n)) = AT.get_or_init(|| {
            let v = std::env::var(NAME).ok()?;
            let (p, n) = v.split_once(':')?;
            Some((p.to_string(), n.parse().ok()?))
        }) else {
            return;
        };
        if at_point != point {
            return;
        }
        let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
        *seen += 1;
        if *seen == *n {
            // Stop here (this task only) and say so; the test SIGKILLs the process.
            tracing::warn!(
                "Fault hook {NAME}: stopped at {point} {n}, waiting for SIGKILL (test only)."
            );
            loop {
                std::thread::park();
            }
        }
    }

    #[cfg(not(feature = "fault-injection"))]
    pub fn crash_at(_: &str) {}
}

/// One file an export wrote.
struct File {
    path: String,
    day: String,
    device: String,
    min: i64,
    max: i64,
    rows: i64,
    bytes: u64,
}

/// A nullable column of little-endian f32s.
fn blob_floats(r: &sqlx::any::AnyRow, col: &str) -> Result<Option<Vec<f32>>, sqlx::Error> {
    Ok(r.try_get::<Option<Vec<u8>>, _>(col)?
        .map(|b| decode_values(&b)))
}

/// The pseudo-stream label exports are recorded under in `lake_exports`.
const LABELS_DEVICE: &str = "";
const LABELS_STREAM: &str = "labels";
/// `fleet_facts` name of the label export watermark (`capture_labels.id`).
const LABELS_FACT: &str = "lake.labels_through";

async fn labels_through(db: &Db) -> Result<i64, LakeError> {
    let mut q = Sql::new("SELECT value FROM fleet_facts WHERE name = ");
    q.bind(LABELS_FACT);
    Ok(match q.query().fetch_optional(db.pool()).await? {
        Some(r) => r.try_get::<String, _>("value")?.parse().unwrap_or(0),
        None => 0,
    })
}

/// `kind=<kind>/date=<day>/device=<id>`.
fn partition(kind: Kind, day: &str, device: &str) -> String {
    format!("kind={}/date={day}/device={device}", kind.as_str())
}

/// A recorded export range.
#[derive(Debug, Clone)]
struct Export {
    id: i64,
    device: String,
    stream: String,
    kind: Kind,
    from: i64,
    to: i64,
}

impl Export {
    fn from_row(row: &sqlx::any::AnyRow) -> Result<Export, LakeError> {
        let kind: String = row.try_get("kind")?;
        Ok(Export {
            id: row.try_get("id")?,
            device: row.try_get("device_id")?,
            stream: row.try_get("stream")?,
            kind: Kind::parse(&kind)
                .ok_or_else(|| LakeError::Invalid(format!("unknown kind {kind:?}")))?,
            from: row.try_get("from_seq")?,
            to: row.try_get("to_seq")?,
        })
    }
}

/// Runs a pass now and then every `lake.interval_s` until `shutdown` (leader only).
pub async fn run(lake: Arc<Lake>, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let interval = Duration::from_secs(lake.settings.interval_s);
    loop {
        let started = Instant::now();
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = lake.pass() => r,
        };
        match result {
            Ok(p) => {
                for (kind, n) in &p.records {
                    metrics.inc("lake_exported_records_total", &[("kind", kind)], *n);
                }
                metrics.inc("lake_files_written_total", &[], p.files);
                metrics.inc("lake_bytes_written_total", &[], p.bytes);
                metrics.inc("lake_compactions_total", &[], p.compactions);
                metrics.observe("lake_pass_seconds", &[], started.elapsed().as_secs_f64());
                if p.exports > 0 {
                    tracing::debug!(
                        exports = p.exports,
                        files = p.files,
                        bytes = p.bytes,
                        compactions = p.compactions,
                        "Lake pass done."
                    );
                }
            }
            Err(e) => {
                metrics.inc("lake_errors_total", &[], 1);
                tracing::warn!(error = %e, "Lake export failed; trying again next interval (nothing is lost: the export resumes where it stopped).")
            }
        }
        match lake.lag().await {
            Ok((records, age)) => {
                metrics.set("lake_export_lag_records", &[], records as f64);
                metrics.set("lake_export_lag_seconds", &[], age);
            }
            Err(e) => tracing::warn!(error = %e, "Could not measure the lake's export lag."),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
