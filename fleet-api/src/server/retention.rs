//! Retention: a background task that deletes rows older than the configured number of days,
//! per table (`retention.telemetry_days`, `aggregates_days`, `rejects_days`; 0 keeps forever),
//! every `retention.interval_s`. Model results (`inference`) follow `telemetry_days` and their
//! per-minute aggregates (`inference_1m`) `aggregates_days`, by the same rules.
//!
//! Telemetry is deleted per stream as a *prefix of sequence numbers*, never as scattered rows,
//! so the ledger stays exact: for a stream, let S be one less than the lowest seq captured at
//! or after the cut-off (or the highest stored seq if every row is older). Rows with
//! `seq <= S` are deleted, the gaps among them are first copied to `archived_gaps`, and the
//! stream's `pruned_through` becomes S, all in one transaction. A record whose seq is at or
//! below `pruned_through` that arrives later is counted as `expired` and not stored.
//! Deleting a prefix may keep a few rows past their age when a device's clock went backwards;
//! it never deletes a row younger than the cut-off. With the data lake on
//! (`RetentionSettings::keep_unexported`), S is also at most the stream's `lake_through`: a
//! record is never deleted before the lake holds it.

use std::sync::Arc;
use std::time::Duration;

use sqlx::Row;
use tokio_util::sync::CancellationToken;

use crate::config::RetentionSettings;
use crate::db::{Db, Sql, now_us, timed};
use crate::metrics::Metrics;
use crate::server::ledger::{RecordsTable, live_gaps, records_table};

const DAY_US: i64 = 86_400_000_000;

/// What one pass deleted.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pruned {
    pub telemetry: u64,
    pub inference: u64,
    pub aggregates: u64,
    pub inference_aggregates: u64,
    pub rejects: u64,
}

/// Runs a pass now and then every `interval_s` until `shutdown`.
pub async fn run(
    db: Db,
    settings: RetentionSettings,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let interval = Duration::from_secs(settings.interval_s);
    loop {
        match timed(&metrics, "retention", prune(&db, &settings, now_us())).await {
            Ok(p) => {
                metrics.inc(
                    "retention_deleted_total",
                    &[("table", "telemetry")],
                    p.telemetry,
                );
                metrics.inc(
                    "retention_deleted_total",
                    &[("table", "aggregates_1m")],
                    p.aggregates,
                );
                metrics.inc(
                    "retention_deleted_total",
                    &[("table", "inference")],
                    p.inference,
                );
                metrics.inc(
                    "retention_deleted_total",
                    &[("table", "inference_1m")],
                    p.inference_aggregates,
                );
                metrics.inc(
                    "retention_deleted_total",
                    &[("table", "rejects")],
                    p.rejects,
                );
                if p != Pruned::default() {
                    tracing::info!(
                        telemetry = p.telemetry,
                        inference = p.inference,
                        aggregates = p.aggregates,
                        inference_aggregates = p.inference_aggregates,
                        rejects = p.rejects,
                        "Retention deleted old rows."
                    );
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "Retention pass failed; trying again next interval.")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// One retention pass with `now` as the current time (µs).
pub async fn prune(db: &Db, settings: &RetentionSettings, now: i64) -> Result<Pruned, sqlx::Error> {
    let mut out = Pruned::default();
    if settings.telemetry_days > 0 {
        let cutoff = now - i64::from(settings.telemetry_days) * DAY_US;
        let streams =
            sqlx::query("SELECT device_id, stream, kind FROM streams ORDER BY device_id, stream")
                .fetch_all(db.pool())
                .await?;
        for row in streams {
            let device: String = row.try_get("device_id")?;
            let stream: String = row.try_get("stream")?;
            let table = records_table(&row.try_get::<String, _>("kind")?);
            let deleted = prune_stream(
                db,
                table,
                &device,
                &stream,
                cutoff,
                settings.keep_unexported,
            )
            .await?;
            match table {
                RecordsTable::Telemetry => out.telemetry += deleted,
                RecordsTable::Inference => out.inference += deleted,
            }
        }
    }
    if settings.aggregates_days > 0 {
        let cutoff = now - i64::from(settings.aggregates_days) * DAY_US;
        let mut q = Sql::new("DELETE FROM aggregates_1m WHERE bucket < ");
        q.bind(cutoff);
        out.aggregates = q.query().execute(db.pool()).await?.rows_affected();
        let mut q = Sql::new("DELETE FROM inference_1m WHERE bucket < ");
        q.bind(cutoff);
        out.inference_aggregates = q.query().execute(db.pool()).await?.rows_affected();
    }
    if settings.rejects_days > 0 {
        let cutoff = now - i64::from(settings.rejects_days) * DAY_US;
        let mut q = Sql::new("DELETE FROM rejects WHERE last_at < ");
        q.bind(cutoff);
        out.rejects = q.query().execute(db.pool()).await?.rows_affected();
    }
    Ok(out)
}

async fn prune_stream(
    db: &Db,
    table: RecordsTable,
    device: &str,
    stream: &str,
    cutoff: i64,
    keep_unexported: bool,
) -> Result<u64, sqlx::Error> {
    let mut tx = db.pool().begin().await?;
    // A write first: it takes SQLite's write lock (no read-to-write upgrade to fail later) and
    // locks the stream's row in Postgres, so ingestion cannot store into a gap of this stream
    // while its gaps are archived and its rows deleted.
    let mut q = Sql::new("UPDATE streams SET pruned_through = pruned_through WHERE device_id = ");
    q.bind(device).push(" AND stream = ").bind(stream);
    q.push(" RETURNING pruned_through, lake_through");
    let Some(row) = q.query().fetch_optional(&mut *tx).await? else {
        return Ok(0);
    };
    let pruned: i64 = row.try_get("pruned_through")?;
    let lake_through: i64 = row.try_get("lake_through")?;
    let mut q = Sql::new(&format!(
        "SELECT MIN(CASE WHEN ts >= $3 THEN seq END) AS first_recent, MAX(seq) AS last_stored \
         FROM {table} WHERE device_id = $1 AND stream = $2 AND seq > $4"
    ));
    q.param(device);
    q.param(stream);
    q.param(cutoff);
    q.param(pruned);
    let row = q.query().fetch_one(&mut *tx).await?;
    let first_recent: Option<i64> = row.try_get("first_recent")?;
    let last_stored: Option<i64> = row.try_get("last_stored")?;
    let through = match (first_recent, last_stored) {
        (Some(f), _) => f - 1,
        (None, Some(l)) => l,
        (None, None) => return Ok(0),
    };
    // With the lake on, a record leaves the database only once the lake holds it.
    let through = if keep_unexported {
        through.min(lake_through)
    } else {
        through
    };
    if through <= pruned {
        return Ok(0);
    }
    let gaps = live_gaps(&mut *tx, table, device, stream, pruned, through).await?;
    for g in gaps.ranges() {
        let mut q =
            Sql::new("INSERT INTO archived_gaps (device_id, stream, from_seq, to_seq) VALUES (");
        q.bind(device).push(", ").bind(stream).push(", ");
        q.bind(i64::try_from(g.from).unwrap_or(i64::MAX)).push(", ");
        q.bind(i64::try_from(g.to).unwrap_or(i64::MAX)).push(")");
        q.push(" ON CONFLICT (device_id, stream, from_seq) DO UPDATE SET to_seq = excluded.to_seq");
        q.query().execute(&mut *tx).await?;
    }
    let mut q = Sql::new(&format!("DELETE FROM {table} WHERE device_id = "));
    q.bind(device).push(" AND stream = ").bind(stream);
    q.push(" AND seq <= ").bind(through);
    let deleted = q.query().execute(&mut *tx).await?.rows_affected();
    let mut q = Sql::new("UPDATE streams SET pruned_through = ");
    q.bind(through).push(" WHERE device_id = ").bind(device);
    q.push(" AND stream = ").bind(stream);
    q.query().execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(deleted)
}
