//! A device's streams, their telemetry and per-minute aggregates by time range, and the
//! durability ledger.

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::{IntoParams, ToSchema};

use super::devices::fetch_device;
use super::error::{ApiPath, ApiQuery, ErrorBody};
use super::{
    AppError, AppState, DevicePath, StreamPath, check_name, cursor, int_cursor, page_limit,
    parse_int_cursor,
};
use crate::db::Sql;
use crate::server::ingest::writer::{BUCKET_US, decode_values};
use crate::server::ledger::{StreamLedger, device_ledger};

/// What the fleet knows about one stream of a device.
#[derive(Debug, Serialize, ToSchema)]
pub struct StreamView {
    pub stream: String,
    /// The agent's `last_seq` (records captured).
    pub captured: i64,
    /// Distinct records stored (ever).
    pub received: i64,
    pub duplicates: i64,
    /// Records still queued on the device at its last status.
    pub queued: i64,
    /// Highest sequence number stored.
    pub max_seq: i64,
    /// Capture time of the oldest and newest record stored (device clock).
    pub first_ts: Option<i64>,
    pub last_ts: Option<i64>,
    /// The stream's schema: values per record (from the agent's status, else from the first
    /// records stored). Telemetry that disagrees is rejected with reason `schema`.
    pub channels: Option<i64>,
    pub last_received_at: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StreamList {
    pub items: Vec<StreamView>,
}

/// One stored record.
#[derive(Debug, Serialize, ToSchema)]
pub struct TelemetryRecord {
    pub seq: i64,
    /// Capture time (device clock).
    pub ts: i64,
    /// The sample's channels; `null` for a value that is not a finite number.
    pub values: Vec<Option<f32>>,
    pub received_at: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TelemetryPage {
    pub items: Vec<TelemetryRecord>,
    pub next_cursor: Option<String>,
}

/// Statistics of one channel over one bucket.
#[derive(Debug, Serialize, ToSchema)]
pub struct Aggregate {
    /// Start of the bucket (device clock), a multiple of `bucket_s`.
    pub ts: i64,
    pub channel: i64,
    /// Finite values in the bucket.
    pub count: i64,
    pub mean: f64,
    pub min: f64,
    pub max: f64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AggregatePage {
    /// Ordered by `ts`, then `channel`.
    pub items: Vec<Aggregate>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeviceLedger {
    pub device_id: String,
    /// `ts` (device clock) of the last status applied: `captured`, `queued` and `pending` are
    /// as of that status, while `received` counts what is stored now, so between two statuses
    /// `received` can run ahead of `captured`. Null before the first status.
    pub status_ts: Option<i64>,
    /// Sum of the streams' `lost_count`: 0 means every record is stored or explained.
    pub lost_count: u64,
    pub streams: Vec<StreamLedger>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TimeRange {
    /// Inclusive lower bound on `ts` (µs since the epoch).
    pub from: Option<i64>,
    /// Exclusive upper bound on `ts` (µs since the epoch).
    pub to: Option<i64>,
    /// Page size (default 100, at most `http.max_page_limit`, 1000 by default).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    #[param(pattern = "^(-?[0-9]{1,18}\\.[0-9]{1,18})?$")]
    pub cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AggregateQuery {
    /// Inclusive lower bound on the bucket start (µs since the epoch).
    pub from: Option<i64>,
    /// Exclusive upper bound on the bucket start (µs since the epoch).
    pub to: Option<i64>,
    /// Bucket width in seconds: a multiple of 60 (the stored resolution), at most 86400.
    #[param(minimum = 60, maximum = 86400, multiple_of = 60)]
    pub bucket_s: Option<i64>,
    /// Only this channel (0-based).
    #[param(minimum = 0, maximum = 65535)]
    pub channel: Option<i64>,
    /// Page size (default 100, at most `http.max_page_limit`, 1000 by default).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    #[param(pattern = "^(-?[0-9]{1,18}\\.[0-9]{1,18})?$")]
    pub cursor: Option<String>,
}

/// Whether `[from, to)` can hold anything (an empty range is not an error: it has no rows).
pub(super) fn non_empty_range(from: Option<i64>, to: Option<i64>) -> bool {
    !matches!((from, to), (Some(f), Some(t)) if f >= t)
}

/// 404 unless the device is registered.
pub(super) async fn require_device(state: &AppState, device: &str) -> Result<(), AppError> {
    check_name("device id", device)?;
    let mut q = Sql::new("SELECT 1 AS one FROM devices WHERE device_id = ");
    q.bind(device);
    match q.query().fetch_optional(state.db.pool()).await? {
        Some(_) => Ok(()),
        None => Err(AppError::NotFound(format!(
            "device {device:?} is not registered"
        ))),
    }
}

/// List a device's streams
#[utoipa::path(
    get,
    path = "/api/v1/devices/{device_id}/streams",
    tag = "data",
    params(DevicePath),
    responses(
        (status = 200, description = "The device's streams, by name", body = StreamList),
        (status = 400, description = "Invalid device id", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
    )
)]
pub async fn list_streams(
    State(state): State<AppState>,
    ApiPath(DevicePath { device_id: device }): ApiPath<DevicePath>,
) -> Result<Json<StreamList>, AppError> {
    require_device(&state, &device).await?;
    let mut q = Sql::new(
        "SELECT stream, last_seq, received, duplicates, queued, max_seq, first_ts, last_ts, \
         channels, last_received_at FROM streams WHERE device_id = ",
    );
    q.bind(device.as_str()).push(" ORDER BY stream");
    let rows = q.query().fetch_all(state.db.pool()).await?;
    let items = rows
        .iter()
        .map(|r| {
            Ok(StreamView {
                stream: r.try_get("stream")?,
                captured: r.try_get("last_seq")?,
                received: r.try_get("received")?,
                duplicates: r.try_get("duplicates")?,
                queued: r.try_get("queued")?,
                max_seq: r.try_get("max_seq")?,
                first_ts: r.try_get("first_ts")?,
                last_ts: r.try_get("last_ts")?,
                channels: r.try_get("channels")?,
                last_received_at: r.try_get("last_received_at")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(Json(StreamList { items }))
}

/// Telemetry of one stream by time range
#[utoipa::path(
    get,
    path = "/api/v1/devices/{device_id}/streams/{stream}/telemetry",
    tag = "data",
    params(StreamPath, TimeRange),
    responses(
        (status = 200, description = "Records ordered by (ts, seq)", body = TelemetryPage),
        (status = 400, description = "Invalid range, limit or cursor", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
    )
)]
pub async fn telemetry(
    State(state): State<AppState>,
    ApiPath(StreamPath {
        device_id: device,
        stream,
    }): ApiPath<StreamPath>,
    ApiQuery(r): ApiQuery<TimeRange>,
) -> Result<Json<TelemetryPage>, AppError> {
    check_name("stream", &stream)?;
    let limit = page_limit(&state.settings, r.limit)?;
    let position = cursor(&r.cursor).map(parse_int_cursor).transpose()?;
    require_device(&state, &device).await?;
    if !non_empty_range(r.from, r.to) {
        return Ok(Json(TelemetryPage {
            items: Vec::new(),
            next_cursor: None,
        }));
    }
    let mut q = Sql::new("SELECT seq, ts, vals, received_at FROM telemetry WHERE device_id = ");
    q.bind(device.as_str())
        .push(" AND stream = ")
        .bind(stream.as_str());
    if let Some(from) = r.from {
        q.push(" AND ts >= ").bind(from);
    }
    if let Some(to) = r.to {
        q.push(" AND ts < ").bind(to);
    }
    if let Some((ts, seq)) = position {
        let ts = q.param(ts);
        q.push(&format!(" AND (ts > {ts} OR (ts = {ts} AND seq > "))
            .bind(seq)
            .push("))");
    }
    q.push(" ORDER BY ts, seq LIMIT ").bind(limit + 1);
    let rows = q.query().fetch_all(state.db.pool()).await?;
    let mut items = rows
        .iter()
        .map(|row| {
            let vals: Vec<u8> = row.try_get("vals")?;
            Ok(TelemetryRecord {
                seq: row.try_get("seq")?,
                ts: row.try_get("ts")?,
                values: decode_values(&vals)
                    .into_iter()
                    .map(|v| v.is_finite().then_some(v))
                    .collect(),
                received_at: row.try_get("received_at")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    let next_cursor = if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items.last().map(|r| int_cursor(r.ts, r.seq))
    } else {
        None
    };
    Ok(Json(TelemetryPage { items, next_cursor }))
}

/// Per-channel aggregates of one stream by time range
///
/// Stored per minute (count, sum, min, max of every channel up to
/// `ingest.aggregate_channels`, non-finite values skipped); `bucket_s` rolls minutes up into
/// wider buckets at query time.
#[utoipa::path(
    get,
    path = "/api/v1/devices/{device_id}/streams/{stream}/aggregates",
    operation_id = "telemetry_aggregates",
    tag = "data",
    params(StreamPath, AggregateQuery),
    responses(
        (status = 200, description = "Buckets ordered by (ts, channel)", body = AggregatePage),
        (status = 400, description = "Invalid range, bucket, limit or cursor", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
    )
)]
pub async fn aggregates(
    State(state): State<AppState>,
    ApiPath(StreamPath {
        device_id: device,
        stream,
    }): ApiPath<StreamPath>,
    ApiQuery(a): ApiQuery<AggregateQuery>,
) -> Result<Json<AggregatePage>, AppError> {
    check_name("stream", &stream)?;
    let limit = page_limit(&state.settings, a.limit)?;
    let position = cursor(&a.cursor).map(parse_int_cursor).transpose()?;
    let bucket_s = a.bucket_s.unwrap_or(60);
    if !(60..=86_400).contains(&bucket_s) || bucket_s % 60 != 0 {
        return Err(AppError::invalid(format!(
            "bucket_s {bucket_s} must be a multiple of 60 between 60 and 86400"
        )));
    }
    if a.channel.is_some_and(|c| !(0..=65_535).contains(&c)) {
        return Err(AppError::invalid("channel must be 0-65535"));
    }
    require_device(&state, &device).await?;
    if !non_empty_range(a.from, a.to) {
        return Ok(Json(AggregatePage {
            items: Vec::new(),
            next_cursor: None,
        }));
    }
    let width = bucket_s * 1_000_000;
    let mut q = Sql::new("");
    let w = q.param(width);
    // Floor division that is also right for buckets before 1970 (negative timestamps).
    let rolled = format!("(bucket - ((bucket % {w}) + {w}) % {w})");
    q.push(&format!(
        "SELECT b, channel, n, total, lo, hi FROM (SELECT {rolled} AS b, channel, \
         CAST(SUM(samples) AS BIGINT) AS n, SUM(sum_v) AS total, MIN(min_v) AS lo, MAX(max_v) AS hi \
         FROM aggregates_1m WHERE device_id = "
    ));
    q.bind(device.as_str())
        .push(" AND stream = ")
        .bind(stream.as_str());
    if let Some(from) = a.from {
        q.push(" AND bucket >= ")
            .bind(from.saturating_sub(from.rem_euclid(BUCKET_US)));
    }
    if let Some(to) = a.to {
        q.push(" AND bucket < ").bind(to);
    }
    if let Some(ch) = a.channel {
        q.push(" AND channel = ").bind(ch);
    }
    if let Some((b, _)) = position {
        q.push(" AND bucket >= ").bind(b);
    }
    q.push(&format!(" GROUP BY {rolled}, channel) AS g WHERE 1 = 1"));
    if let Some(from) = a.from {
        q.push(" AND b >= ").bind(from);
    }
    if let Some((b, ch)) = position {
        let b = q.param(b);
        q.push(&format!(" AND (b > {b} OR (b = {b} AND channel > "))
            .bind(ch)
            .push("))");
    }
    q.push(" ORDER BY b, channel LIMIT ").bind(limit + 1);
    let rows = q.query().fetch_all(state.db.pool()).await?;
    let mut items = rows
        .iter()
        .map(|row| {
            let n: i64 = row.try_get("n")?;
            let total: f64 = row.try_get("total")?;
            Ok(Aggregate {
                ts: row.try_get("b")?,
                channel: row.try_get("channel")?,
                count: n,
                mean: if n > 0 { total / n as f64 } else { 0.0 },
                min: row.try_get("lo")?,
                max: row.try_get("hi")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    let next_cursor = if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items.last().map(|a| int_cursor(a.ts, a.channel))
    } else {
        None
    };
    Ok(Json(AggregatePage { items, next_cursor }))
}

/// The durability ledger of a device
///
/// Per stream: captured (the agent's last_seq), received, missing ranges, evicted ranges
/// (reported by the agent), pending (still queued on the device) and lost = missing − evicted
/// − pending.
#[utoipa::path(
    get,
    path = "/api/v1/devices/{device_id}/ledger",
    tag = "data",
    params(DevicePath),
    responses(
        (status = 200, description = "The ledger of every stream", body = DeviceLedger),
        (status = 400, description = "Invalid device id", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
    )
)]
pub async fn ledger(
    State(state): State<AppState>,
    ApiPath(DevicePath { device_id: device }): ApiPath<DevicePath>,
) -> Result<Json<DeviceLedger>, AppError> {
    check_name("device id", &device)?;
    let d = fetch_device(&state, &device).await?;
    let t0 = std::time::Instant::now();
    let streams = device_ledger(&state.db, &device).await?;
    state.metrics.observe(
        "db_seconds",
        &[("op", "ledger")],
        t0.elapsed().as_secs_f64(),
    );
    Ok(Json(DeviceLedger {
        device_id: d.device_id,
        status_ts: d.status_ts,
        lost_count: streams.iter().map(|s| s.lost_count).sum(),
        streams,
    }))
}
