//! Model results of a device's inference streams by time range, their per-minute aggregates,
//! and the fleet's most recent anomalies.

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::any::AnyRow;
use utoipa::{IntoParams, ToSchema};

use super::data::{TimeRange, non_empty_range, require_device};
use super::error::{ApiPath, ApiQuery, ErrorBody};
use super::{
    AppError, AppState, StreamPath, check_name, cursor, int_cursor, page_limit, parse_int_cursor,
};
use crate::db::{Sql, get_bool};
use crate::server::ingest::writer::{BUCKET_US, decode_values};

/// One model result.
#[derive(Debug, Serialize, ToSchema)]
pub struct InferenceResult {
    pub device_id: String,
    pub stream: String,
    pub seq: i64,
    /// Capture time of the window's last sample (device clock).
    pub ts: i64,
    /// Capture time of the window's first sample.
    pub window_start: i64,
    /// Sequence number, in the source stream, of the window's last sample.
    pub source_seq: i64,
    pub model: String,
    pub version: String,
    pub latency_us: i64,
    /// `class` (label, class, probabilities) or `anomaly` (score, threshold, anomalous).
    pub output_kind: String,
    pub label: Option<String>,
    pub class: Option<i64>,
    pub probabilities: Option<Vec<f32>>,
    pub score: Option<f64>,
    pub threshold: Option<f64>,
    pub anomalous: bool,
    pub received_at: i64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InferencePage {
    /// Ordered by `(ts, seq)`.
    pub items: Vec<InferenceResult>,
    pub next_cursor: Option<String>,
}

/// One bucket of one label of an inference stream.
#[derive(Debug, Serialize, ToSchema)]
pub struct InferenceAggregate {
    /// Start of the bucket (device clock), a multiple of `bucket_s`.
    pub ts: i64,
    /// The class label; empty for anomaly results.
    pub label: String,
    pub results: i64,
    /// Results with `anomalous = true`.
    pub anomalies: i64,
    /// Mean and maximum anomaly score (null when the bucket has no anomaly results).
    pub mean_score: Option<f64>,
    pub max_score: Option<f64>,
    pub mean_latency_us: f64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InferenceAggregatePage {
    /// Ordered by `ts`, then `label`.
    pub items: Vec<InferenceAggregate>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct InferenceAggregateQuery {
    /// Inclusive lower bound on the bucket start (µs since the epoch).
    pub from: Option<i64>,
    /// Exclusive upper bound on the bucket start (µs since the epoch).
    pub to: Option<i64>,
    /// Bucket width in seconds: a multiple of 60 (the stored resolution), at most 86400.
    #[param(minimum = 60, maximum = 86400, multiple_of = 60)]
    pub bucket_s: Option<i64>,
    /// Page size (default 100, at most `http.max_page_limit`, 1000 by default).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    #[param(pattern = "^(-?[0-9]{1,18}:.*)?$")]
    pub cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AnomalyQuery {
    /// How many (newest first; default 20, at most 200).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AnomalyList {
    /// Newest first (by `ts`).
    pub items: Vec<InferenceResult>,
}

const RESULT_COLUMNS: &str = "device_id, stream, seq, ts, window_start, source_seq, model, version, \
     latency_us, output_kind, label, class, probabilities, score, threshold, anomalous, received_at";

fn result_of(row: &AnyRow) -> Result<InferenceResult, sqlx::Error> {
    let probabilities: Option<Vec<u8>> = row.try_get("probabilities")?;
    Ok(InferenceResult {
        device_id: row.try_get("device_id")?,
        stream: row.try_get("stream")?,
        seq: row.try_get("seq")?,
        ts: row.try_get("ts")?,
        window_start: row.try_get("window_start")?,
        source_seq: row.try_get("source_seq")?,
        model: row.try_get("model")?,
        version: row.try_get("version")?,
        latency_us: row.try_get("latency_us")?,
        output_kind: row.try_get("output_kind")?,
        label: row.try_get("label")?,
        class: row.try_get("class")?,
        probabilities: probabilities.map(|p| decode_values(&p)),
        score: row.try_get("score")?,
        threshold: row.try_get("threshold")?,
        anomalous: get_bool(row, "anomalous")?,
        received_at: row.try_get("received_at")?,
    })
}

/// Model results of one inference stream by time range
#[utoipa::path(
    get,
    path = "/api/v1/devices/{device_id}/streams/{stream}/inference",
    tag = "inference",
    params(StreamPath, TimeRange),
    responses(
        (status = 200, description = "Results ordered by (ts, seq)", body = InferencePage),
        (status = 400, description = "Invalid range, limit or cursor", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
    )
)]
pub async fn results(
    State(state): State<AppState>,
    ApiPath(StreamPath {
        device_id: device,
        stream,
    }): ApiPath<StreamPath>,
    ApiQuery(r): ApiQuery<TimeRange>,
) -> Result<Json<InferencePage>, AppError> {
    check_name("stream", &stream)?;
    let limit = page_limit(&state.settings, r.limit)?;
    let position = cursor(&r.cursor).map(parse_int_cursor).transpose()?;
    require_device(&state, &device).await?;
    if !non_empty_range(r.from, r.to) {
        return Ok(Json(InferencePage {
            items: Vec::new(),
            next_cursor: None,
        }));
    }
    let mut q = Sql::new(&format!(
        "SELECT {RESULT_COLUMNS} FROM inference WHERE device_id = "
    ));
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
        .map(result_of)
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    let next_cursor = if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items.last().map(|r| int_cursor(r.ts, r.seq))
    } else {
        None
    };
    Ok(Json(InferencePage { items, next_cursor }))
}

fn parse_label_cursor(c: &str) -> Result<(i64, String), AppError> {
    let bad = || AppError::BadRequest {
        code: "invalid_cursor",
        message: "the cursor is not one this API returned; start again without it".into(),
    };
    let (b, label) = c.split_once(':').ok_or_else(bad)?;
    Ok((b.parse().map_err(|_| bad())?, label.to_string()))
}

/// Per-minute aggregates of one inference stream by time range
///
/// Per bucket and label: results, anomalies, mean and maximum anomaly score, mean latency.
/// Stored per minute; `bucket_s` rolls minutes up at query time.
#[utoipa::path(
    get,
    path = "/api/v1/devices/{device_id}/streams/{stream}/inference/aggregates",
    tag = "inference",
    params(StreamPath, InferenceAggregateQuery),
    responses(
        (status = 200, description = "Buckets ordered by (ts, label)", body = InferenceAggregatePage),
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
    ApiQuery(a): ApiQuery<InferenceAggregateQuery>,
) -> Result<Json<InferenceAggregatePage>, AppError> {
    check_name("stream", &stream)?;
    let limit = page_limit(&state.settings, a.limit)?;
    let position = cursor(&a.cursor).map(parse_label_cursor).transpose()?;
    let bucket_s = a.bucket_s.unwrap_or(60);
    if !(60..=86_400).contains(&bucket_s) || bucket_s % 60 != 0 {
        return Err(AppError::invalid(format!(
            "bucket_s {bucket_s} must be a multiple of 60 between 60 and 86400"
        )));
    }
    require_device(&state, &device).await?;
    if !non_empty_range(a.from, a.to) {
        return Ok(Json(InferenceAggregatePage {
            items: Vec::new(),
            next_cursor: None,
        }));
    }
    let width = bucket_s * 1_000_000;
    let mut q = Sql::new("");
    let w = q.param(width);
    let rolled = format!("(bucket - ((bucket % {w}) + {w}) % {w})");
    q.push(&format!(
        "SELECT b, label, n, anomalies, scored, score_sum, score_max, latency_sum FROM (SELECT {rolled} AS b, label, \
         CAST(SUM(results) AS BIGINT) AS n, CAST(SUM(anomalies) AS BIGINT) AS anomalies, \
         CAST(SUM(scored) AS BIGINT) AS scored, SUM(score_sum) AS score_sum, MAX(score_max) AS score_max, \
         CAST(SUM(latency_sum) AS BIGINT) AS latency_sum \
         FROM inference_1m WHERE device_id = "
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
    if let Some((b, _)) = &position {
        q.push(" AND bucket >= ").bind(*b);
    }
    q.push(&format!(" GROUP BY {rolled}, label) AS g WHERE 1 = 1"));
    if let Some(from) = a.from {
        q.push(" AND b >= ").bind(from);
    }
    if let Some((b, label)) = position {
        let b = q.param(b);
        q.push(&format!(" AND (b > {b} OR (b = {b} AND label > "))
            .bind(label)
            .push("))");
    }
    q.push(" ORDER BY b, label LIMIT ").bind(limit + 1);
    let rows = q.query().fetch_all(state.db.pool()).await?;
    let mut items = rows
        .iter()
        .map(|row| {
            let n: i64 = row.try_get("n")?;
            let scored: i64 = row.try_get("scored")?;
            let score_sum: f64 = row.try_get("score_sum")?;
            let latency_sum: i64 = row.try_get("latency_sum")?;
            Ok(InferenceAggregate {
                ts: row.try_get("b")?,
                label: row.try_get("label")?,
                results: n,
                anomalies: row.try_get("anomalies")?,
                mean_score: (scored > 0).then(|| score_sum / scored as f64),
                max_score: row.try_get("score_max")?,
                mean_latency_us: if n > 0 {
                    latency_sum as f64 / n as f64
                } else {
                    0.0
                },
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    let next_cursor = if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items.last().map(|a| format!("{}:{}", a.ts, a.label))
    } else {
        None
    };
    Ok(Json(InferenceAggregatePage { items, next_cursor }))
}

/// The fleet's most recent anomalies
#[utoipa::path(
    get,
    path = "/api/v1/anomalies",
    tag = "inference",
    params(AnomalyQuery),
    responses(
        (status = 200, description = "Anomalous results, newest first", body = AnomalyList),
        (status = 400, description = "Invalid limit", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
    )
)]
pub async fn anomalies(
    State(state): State<AppState>,
    ApiQuery(a): ApiQuery<AnomalyQuery>,
) -> Result<Json<AnomalyList>, AppError> {
    let limit = match a.limit {
        None => 20,
        Some(l) if (1..=200).contains(&l) => i64::from(l),
        Some(l) => {
            return Err(AppError::invalid(format!(
                "limit {l} is out of range: use 1-200"
            )));
        }
    };
    let mut q = Sql::new(&format!(
        "SELECT {RESULT_COLUMNS} FROM inference WHERE anomalous = TRUE ORDER BY ts DESC, device_id, stream, seq LIMIT "
    ));
    q.bind(limit);
    let rows = q.query().fetch_all(state.db.pool()).await?;
    let items = rows
        .iter()
        .map(result_of)
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(Json(AnomalyList { items }))
}
