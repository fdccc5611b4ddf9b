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

/// Capture streams (`{source}.{model}.capture`, docs/capture.md) repeat results of their
/// inference stream for the windows they captured: fleet-wide anomaly lists, incidents and
/// rates leave them out, or they would count those windows twice.
const NOT_CAPTURE: &str = "stream NOT LIKE '%.capture'";

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
    operation_id = "inference_aggregates",
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
        "SELECT {RESULT_COLUMNS} FROM inference WHERE anomalous = TRUE AND {NOT_CAPTURE} \
         ORDER BY ts DESC, device_id, stream, seq LIMIT "
    ));
    q.bind(limit);
    let rows = q.query().fetch_all(state.db.pool()).await?;
    let items = rows
        .iter()
        .map(result_of)
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(Json(AnomalyList { items }))
}

/// Most incidents per request.
const MAX_INCIDENTS: u32 = 200;
/// The default look-back of incidents and anomaly rates: one hour.
const DEFAULT_WINDOW_S: i64 = 3_600;
/// The longest look-back: seven days.
const MAX_WINDOW_S: i64 = 7 * 86_400;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct IncidentQuery {
    /// Look back this many seconds from now (default 3600, at most 604800), by capture time.
    #[param(minimum = 1, maximum = 604800)]
    pub window_s: Option<i64>,
    /// How many incidents (most recent end first; default 20, at most 200).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<u32>,
}

/// What the classifiers of the same source said during an incident.
#[derive(Debug, Serialize, ToSchema)]
pub struct IncidentLabel {
    pub label: String,
    /// Windows of the incident the label was given to.
    pub windows: i64,
}

/// A run of consecutive anomalous windows of one anomaly stream of one device: every result
/// with a sequence number from `first_seq` to `last_seq` was anomalous.
#[derive(Debug, Serialize, ToSchema)]
pub struct AnomalyIncident {
    pub device_id: String,
    /// The anomaly model's inference stream (`{source}.{model}`).
    pub stream: String,
    pub model: String,
    pub version: String,
    /// Capture time of the first anomalous window's last sample.
    pub start: i64,
    /// Capture time of the last anomalous window's last sample.
    pub end: i64,
    pub first_seq: i64,
    pub last_seq: i64,
    /// Anomalous windows in the run (`last_seq - first_seq + 1`).
    pub windows: i64,
    pub peak_score: f64,
    pub threshold: f64,
    /// True while the stream's newest stored result is this incident's last window.
    pub ongoing: bool,
    /// Labels the source's classifiers gave the same windows, most frequent first (empty when
    /// the device runs no classifier on that source).
    pub labels: Vec<IncidentLabel>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct IncidentList {
    /// Start of the look-back (capture time, µs).
    pub from: i64,
    /// Most recent `end` first.
    pub items: Vec<AnomalyIncident>,
}

fn window_from(window_s: Option<i64>) -> Result<i64, AppError> {
    let w = window_s.unwrap_or(DEFAULT_WINDOW_S);
    if !(1..=MAX_WINDOW_S).contains(&w) {
        return Err(AppError::invalid(format!(
            "window_s {w} is out of range: use 1-{MAX_WINDOW_S} seconds"
        )));
    }
    Ok(crate::db::now_us() - w * 1_000_000)
}

/// The source stream of an inference stream `{source}.{model}`.
fn source_of(stream: &str) -> &str {
    stream.rsplit_once('.').map_or(stream, |(s, _)| s)
}

/// Anomaly incidents: consecutive anomalous windows grouped
///
/// Consecutive anomalous results of one device's anomaly stream form one incident (a normal
/// result, or a result never stored, ends it), with its start, end, peak score, window count
/// and the labels the device's classifiers of the same source gave those windows.
#[utoipa::path(
    get,
    path = "/api/v1/anomalies/incidents",
    tag = "inference",
    params(IncidentQuery),
    responses(
        (status = 200, description = "Incidents, most recent end first", body = IncidentList),
        (status = 400, description = "Invalid window or limit", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
    )
)]
pub async fn incidents(
    State(state): State<AppState>,
    ApiQuery(a): ApiQuery<IncidentQuery>,
) -> Result<Json<IncidentList>, AppError> {
    let limit = match a.limit {
        None => 20,
        Some(l) if (1..=MAX_INCIDENTS).contains(&l) => i64::from(l),
        Some(l) => {
            return Err(AppError::invalid(format!(
                "limit {l} is out of range: use 1-{MAX_INCIDENTS}"
            )));
        }
    };
    let from = window_from(a.window_s)?;
    // Gaps and islands: among the anomalous rows, `seq - row_number` is constant along a run
    // of consecutive sequence numbers. The (anomalous, ts) index bounds the scan.
    let mut q = Sql::new(
        "SELECT i.device_id, i.stream, MIN(i.model) AS model, MAX(i.version) AS version, \
         MIN(i.ts) AS start_ts, MAX(i.ts) AS end_ts, MIN(i.seq) AS first_seq, MAX(i.seq) AS last_seq, \
         CAST(COUNT(*) AS BIGINT) AS windows, MAX(i.score) AS peak, MAX(i.threshold) AS threshold, \
         MAX(s.max_seq) AS stream_max \
         FROM (SELECT device_id, stream, model, version, ts, seq, score, threshold, \
               seq - ROW_NUMBER() OVER (PARTITION BY device_id, stream ORDER BY seq) AS island \
               FROM inference WHERE anomalous = TRUE AND stream NOT LIKE '%.capture' AND ts >= ",
    );
    q.bind(from);
    q.push(
        ") i LEFT JOIN streams s ON s.device_id = i.device_id AND s.stream = i.stream \
         GROUP BY i.device_id, i.stream, i.island \
         ORDER BY end_ts DESC, i.device_id, i.stream LIMIT ",
    );
    q.bind(limit);
    let rows = q.query().fetch_all(state.db.pool()).await?;
    let mut items = Vec::with_capacity(rows.len());
    for row in &rows {
        let last_seq: i64 = row.try_get("last_seq")?;
        let stream_max: Option<i64> = row.try_get("stream_max")?;
        items.push(AnomalyIncident {
            device_id: row.try_get("device_id")?,
            stream: row.try_get("stream")?,
            model: row.try_get("model")?,
            version: row.try_get("version")?,
            start: row.try_get("start_ts")?,
            end: row.try_get("end_ts")?,
            first_seq: row.try_get("first_seq")?,
            last_seq,
            windows: row.try_get("windows")?,
            peak_score: row.try_get::<Option<f64>, _>("peak")?.unwrap_or(0.0),
            threshold: row.try_get::<Option<f64>, _>("threshold")?.unwrap_or(0.0),
            ongoing: stream_max == Some(last_seq),
            labels: Vec::new(),
        });
    }
    // What the classifiers of the same source said about those windows: one small indexed
    // query per incident (at most `limit`).
    for inc in &mut items {
        let source = source_of(&inc.stream).to_string();
        let mut q = Sql::new(
            "SELECT c.label AS label, CAST(COUNT(*) AS BIGINT) AS n FROM inference a \
             JOIN inference c ON c.device_id = a.device_id AND c.output_kind = 'class' \
             AND c.stream NOT LIKE '%.capture' \
             AND c.source_seq = a.source_seq AND c.window_start = a.window_start \
             AND c.stream > ",
        );
        // `{source}.` < every `{source}.{model}` < `{source}/` ('/' follows '.').
        q.bind(format!("{source}."))
            .push(" AND c.stream < ")
            .bind(format!("{source}/"))
            .push(" WHERE a.device_id = ")
            .bind(inc.device_id.as_str())
            .push(" AND a.stream = ")
            .bind(inc.stream.as_str())
            .push(" AND a.seq >= ")
            .bind(inc.first_seq)
            .push(" AND a.seq <= ")
            .bind(inc.last_seq)
            .push(" GROUP BY c.label ORDER BY n DESC, c.label");
        let rows = q.query().fetch_all(state.db.pool()).await?;
        inc.labels = rows
            .iter()
            .map(|r| {
                Ok(IncidentLabel {
                    label: r.try_get::<Option<String>, _>("label")?.unwrap_or_default(),
                    windows: r.try_get("n")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()?;
    }
    Ok(Json(IncidentList { from, items }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RateQuery {
    /// Look back this many seconds from now (default 3600, at most 604800), by capture time,
    /// in whole minutes (the stored resolution).
    #[param(minimum = 1, maximum = 604800)]
    pub window_s: Option<i64>,
}

/// The share of anomalous windows of one anomaly stream of one device.
#[derive(Debug, Serialize, ToSchema)]
pub struct AnomalyRate {
    pub device_id: String,
    pub stream: String,
    /// Anomaly results in the look-back.
    pub windows: i64,
    pub anomalies: i64,
    /// `anomalies / windows`, 0 to 1.
    pub rate: f64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AnomalyRateList {
    /// Start of the look-back: the minute bucket it falls in (capture time, µs).
    pub from: i64,
    /// Highest rate first.
    pub items: Vec<AnomalyRate>,
}

/// Anomaly rate per device and anomaly stream
///
/// From the per-minute aggregates: anomalous windows over all anomaly results in the look-back.
#[utoipa::path(
    get,
    path = "/api/v1/anomalies/rates",
    tag = "inference",
    params(RateQuery),
    responses(
        (status = 200, description = "Rates, highest first", body = AnomalyRateList),
        (status = 400, description = "Invalid window", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
    )
)]
pub async fn rates(
    State(state): State<AppState>,
    ApiQuery(a): ApiQuery<RateQuery>,
) -> Result<Json<AnomalyRateList>, AppError> {
    let from = window_from(a.window_s)?;
    let from = from - from.rem_euclid(BUCKET_US);
    let mut q = Sql::new(
        "SELECT device_id, stream, CAST(SUM(scored) AS BIGINT) AS n, \
         CAST(SUM(anomalies) AS BIGINT) AS anomalies FROM inference_1m WHERE bucket >= ",
    );
    q.bind(from)
        .push(" AND scored > 0 AND stream NOT LIKE '%.capture' GROUP BY device_id, stream ORDER BY device_id, stream");
    let rows = q.query().fetch_all(state.db.pool()).await?;
    let mut items = rows
        .iter()
        .map(|r| {
            let windows: i64 = r.try_get("n")?;
            let anomalies: i64 = r.try_get("anomalies")?;
            Ok(AnomalyRate {
                device_id: r.try_get("device_id")?,
                stream: r.try_get("stream")?,
                windows,
                anomalies,
                rate: if windows > 0 {
                    anomalies as f64 / windows as f64
                } else {
                    0.0
                },
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    items.sort_by(|a, b| b.rate.total_cmp(&a.rate));
    Ok(Json(AnomalyRateList { from, items }))
}
