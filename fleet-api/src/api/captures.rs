//! Captured windows and their labels (docs/capture.md): what agents captured under their
//! `[model.capture]` policy, with the model's answer, for operators and labelling tools.
//!
//! Labelling needs a `label` or `admin` token; every labelling is recorded with who and when
//! (`captures.label*` holds the current one, `capture_labels` every one in commit order, which
//! the lake exports).

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiJson, ApiPath, ApiQuery, ErrorBody};
use super::{AppError, AppState, LabelAccess, cursor, page_limit};
use crate::db::{Db, Sql, get_bool, now_us};
use crate::server::ingest::writer::decode_values;

/// Most labels one bulk request sets.
pub const MAX_BULK_LABELS: usize = 1000;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CaptureQuery {
    /// Only this device's captures.
    pub device: Option<String>,
    /// Only this model's (name).
    pub model: Option<String>,
    /// Only this version's.
    pub version: Option<String>,
    /// Only this trigger: `anomaly`, `low_confidence`, `sample`.
    #[param(pattern = "^(anomaly|low_confidence|sample)$")]
    pub trigger: Option<String>,
    /// `true`: only labelled captures; `false`: only unlabelled ones.
    pub labelled: Option<bool>,
    /// Page size (default `http.default_page_limit`, at most `http.max_page_limit`).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page. Pages are keyed by the last item, so captures
    /// stored or labelled while a client pages (a labelling tool walking `labelled=false`)
    /// neither shift nor hide the ones it has not seen.
    #[param(pattern = "^([0-9]{1,18}~[0-9]{1,18}~[A-Za-z0-9._-]{1,64}~[A-Za-z0-9._-]{1,64})?$")]
    pub cursor: Option<String>,
}

/// The model's answer about the window.
#[derive(Debug, Serialize, ToSchema)]
pub struct CaptureOutput {
    /// `class` or `anomaly`.
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probabilities: Option<Vec<f32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    pub anomalous: bool,
}

/// One captured window.
#[derive(Debug, Serialize, ToSchema)]
pub struct CaptureView {
    pub device: String,
    /// The capture stream, `{source}.{model}.capture`.
    pub stream: String,
    pub seq: i64,
    /// Capture time of the window's last and first sample (µs).
    pub ts: i64,
    pub window_start: i64,
    /// Sequence number, in the source stream, of the window's last sample.
    pub source_seq: i64,
    /// When the fleet stored it (µs).
    pub received_at: i64,
    pub model: String,
    pub version: String,
    /// Why it was captured: `anomaly`, `low_confidence`, `sample`.
    pub trigger: String,
    pub channels: i64,
    pub samples: i64,
    /// The raw window, `[channel][sample]`.
    pub window: Vec<f32>,
    pub output: CaptureOutput,
    pub label: Option<String>,
    /// Who labelled it (`token <id> (<name>)`) and when (µs).
    pub labelled_by: Option<String>,
    pub labelled_at: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CapturePage {
    pub items: Vec<CaptureView>,
    pub next_cursor: Option<String>,
}

/// Captured windows
///
/// Newest first (by the time the fleet stored them), with the model's answer and the current
/// label.
#[utoipa::path(
    get,
    path = "/api/v1/captures",
    tag = "inference",
    params(CaptureQuery),
    responses(
        (status = 200, description = "A page of captures", body = CapturePage),
        (status = 400, description = "Invalid parameter", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<CaptureQuery>,
) -> Result<Json<CapturePage>, AppError> {
    let limit = page_limit(&state.settings, q.limit)?;
    let after = cursor(&q.cursor).map(parse_cursor).transpose()?;
    if let Some(t) = &q.trigger
        && !ember_proto::CAPTURE_TRIGGERS.contains(&t.as_str())
    {
        return Err(AppError::invalid(format!(
            "trigger must be one of {}",
            ember_proto::CAPTURE_TRIGGERS.join(", ")
        )));
    }
    let mut sql = select_sql();
    sql.push(" WHERE 1 = 1");
    if let Some(d) = &q.device {
        sql.push(" AND c.device_id = ").bind(d.as_str());
    }
    if let Some(m) = &q.model {
        sql.push(" AND i.model = ").bind(m.as_str());
    }
    if let Some(v) = &q.version {
        sql.push(" AND i.version = ").bind(v.as_str());
    }
    if let Some(t) = &q.trigger {
        sql.push(" AND c.trigger_kind = ").bind(t.as_str());
    }
    match q.labelled {
        Some(true) => {
            sql.push(" AND c.label IS NOT NULL");
        }
        Some(false) => {
            sql.push(" AND c.label IS NULL");
        }
        None => {}
    }
    if let Some((at, seq, device, stream)) = &after {
        sql.push(" AND (i.received_at, c.device_id, c.stream, c.seq) < (");
        sql.bind(*at).push(", ").bind(device.as_str()).push(", ");
        sql.bind(stream.as_str()).push(", ").bind(*seq).push(")");
    }
    sql.push(" ORDER BY i.received_at DESC, c.device_id DESC, c.stream DESC, c.seq DESC LIMIT ");
    sql.bind(limit + 1);
    let rows = sql.query().fetch_all(state.db.pool()).await?;
    let more = rows.len() as i64 > limit;
    let items = rows
        .iter()
        .take(limit as usize)
        .map(view)
        .collect::<Result<Vec<_>, _>>()?;
    let next_cursor = match (more, items.last()) {
        (true, Some(last)) => Some(format!(
            "{}~{}~{}~{}",
            last.received_at, last.seq, last.device, last.stream
        )),
        _ => None,
    };
    Ok(Json(CapturePage { items, next_cursor }))
}

/// `received_at~seq~device~stream` of the last item of the previous page (`~` is in no name).
fn parse_cursor(c: &str) -> Result<(i64, i64, String, String), AppError> {
    let bad = || AppError::BadRequest {
        code: "invalid_cursor",
        message: "the cursor is not one this API returned; start again without it".into(),
    };
    let mut parts = c.split('~');
    let (Some(at), Some(seq), Some(device), Some(stream), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(bad());
    };
    Ok((
        at.parse().map_err(|_| bad())?,
        seq.parse().map_err(|_| bad())?,
        device.to_string(),
        stream.to_string(),
    ))
}

fn select_sql() -> Sql {
    Sql::new(
        "SELECT c.device_id, c.stream, c.seq, c.trigger_kind, c.channels, c.window_vals, c.label, \
         c.labelled_by, c.labelled_at, i.ts, i.window_start, i.source_seq, i.received_at, i.model, i.version, i.output_kind, \
         i.label AS out_label, i.class, i.probabilities, i.score, i.threshold, i.anomalous \
         FROM captures c JOIN inference i ON i.device_id = c.device_id AND i.stream = c.stream \
         AND i.seq = c.seq",
    )
}

fn view(r: &sqlx::any::AnyRow) -> Result<CaptureView, sqlx::Error> {
    let window = decode_values(&r.try_get::<Vec<u8>, _>("window_vals")?);
    let channels: i64 = r.try_get("channels")?;
    Ok(CaptureView {
        device: r.try_get("device_id")?,
        stream: r.try_get("stream")?,
        seq: r.try_get("seq")?,
        ts: r.try_get("ts")?,
        window_start: r.try_get("window_start")?,
        source_seq: r.try_get("source_seq")?,
        received_at: r.try_get("received_at")?,
        model: r.try_get("model")?,
        version: r.try_get("version")?,
        trigger: r.try_get("trigger_kind")?,
        channels,
        samples: window.len() as i64 / channels.max(1),
        window,
        output: CaptureOutput {
            kind: r.try_get("output_kind")?,
            label: r.try_get("out_label")?,
            class: r.try_get("class")?,
            probabilities: r
                .try_get::<Option<Vec<u8>>, _>("probabilities")?
                .map(|b| decode_values(&b)),
            score: r.try_get("score")?,
            threshold: r.try_get("threshold")?,
            anomalous: get_bool(r, "anomalous")?,
        },
        label: r.try_get("label")?,
        labelled_by: r.try_get("labelled_by")?,
        labelled_at: r.try_get("labelled_at")?,
    })
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetLabel {
    /// For a classifier, one of its manifest's labels; for an anomaly model `normal` or
    /// `anomaly`; 1-64 characters of letters, digits, space, `.`, `_` or `-`.
    #[schema(pattern = "^[A-Za-z0-9 ._-]{1,64}$", min_length = 1, max_length = 64)]
    pub label: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkLabel {
    pub device: String,
    pub stream: String,
    pub seq: i64,
    #[schema(pattern = "^[A-Za-z0-9 ._-]{1,64}$", min_length = 1, max_length = 64)]
    pub label: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkLabels {
    /// 1-1000 labels, applied together or not at all.
    #[schema(min_items = 1, max_items = 1000)]
    pub labels: Vec<BulkLabel>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Labelled {
    pub labelled: u64,
    /// Who labelled them (`token <id> (<name>)`) and when (µs).
    pub labelled_by: String,
    pub labelled_at: i64,
}

#[derive(Debug, Deserialize)]
pub struct CapturePath {
    pub device_id: String,
    pub stream: String,
    pub seq: i64,
}

/// Label one capture
///
/// Sets the capture's label (replacing an earlier one); recorded with who and when.
#[utoipa::path(
    put,
    path = "/api/v1/captures/{device_id}/{stream}/{seq}/label",
    tag = "inference",
    params(
        ("device_id" = String, Path, description = "Device id"),
        ("stream" = String, Path, description = "The capture stream"),
        ("seq" = i64, Path, description = "Sequence number in the capture stream"),
    ),
    request_body = SetLabel,
    responses(
        (status = 200, description = "Labelled", body = Labelled),
        (status = 400, description = "Invalid label", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "The token has neither the label nor the admin scope", body = ErrorBody),
        (status = 404, description = "No such capture", body = ErrorBody),
    )
)]
pub async fn set_label(
    State(state): State<AppState>,
    LabelAccess(who): LabelAccess,
    ApiPath(p): ApiPath<CapturePath>,
    ApiJson(body): ApiJson<SetLabel>,
) -> Result<Json<Labelled>, AppError> {
    let item = BulkLabel {
        device: p.device_id,
        stream: p.stream,
        seq: p.seq,
        label: body.label,
    };
    apply(&state.db, &[item], &who.to_string(), false)
        .await
        .map(Json)
}

/// Label many captures
///
/// Sets up to 1,000 labels in one transaction: all of them, or none when one is invalid (400)
/// or names a capture that does not exist (404); the error names its index.
#[utoipa::path(
    post,
    path = "/api/v1/captures/labels",
    tag = "inference",
    request_body = BulkLabels,
    responses(
        (status = 200, description = "All labelled", body = Labelled),
        (status = 400, description = "An invalid item (none applied)", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "The token has neither the label nor the admin scope", body = ErrorBody),
        (status = 404, description = "An item names no capture (none applied)", body = ErrorBody),
    )
)]
pub async fn bulk(
    State(state): State<AppState>,
    LabelAccess(who): LabelAccess,
    ApiJson(body): ApiJson<BulkLabels>,
) -> Result<Json<Labelled>, AppError> {
    if body.labels.is_empty() || body.labels.len() > MAX_BULK_LABELS {
        return Err(AppError::invalid(format!(
            "labels must hold 1-{MAX_BULK_LABELS} items"
        )));
    }
    apply(&state.db, &body.labels, &who.to_string(), true)
        .await
        .map(Json)
}

fn check_label_text(label: &str) -> Result<(), String> {
    if label.is_empty()
        || label.len() > 64
        || !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b' ' | b'.' | b'_' | b'-'))
    {
        return Err(format!(
            "{label:?} is not a label: use 1-64 letters, digits, spaces, '.', '_' or '-'"
        ));
    }
    Ok(())
}

/// The labels a capture of `model` `version` may take (None: any well-formed label, the
/// version is not registered).
async fn allowed_labels(
    db: &Db,
    model: &str,
    version: &str,
) -> Result<Option<Vec<String>>, AppError> {
    let Some(text) = crate::ota::registry::manifest(db, model, version)
        .await
        .map_err(|e| AppError::Internal(e.to_string().into()))?
    else {
        return Ok(None);
    };
    let m: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| AppError::Internal(e.to_string().into()))?;
    Ok(match m["output"]["kind"].as_str() {
        Some("classes") => serde_json::from_value(m["output"]["labels"].clone()).ok(),
        Some("anomaly_score") => Some(vec!["normal".into(), "anomaly".into()]),
        _ => None,
    })
}

/// Checks every item, then applies them all in one transaction (retried when a concurrent
/// labelling took the same `capture_labels` id).
async fn apply(db: &Db, items: &[BulkLabel], who: &str, bulk: bool) -> Result<Labelled, AppError> {
    let at_item = |i: usize, msg: String| {
        if bulk {
            format!("labels[{i}]: {msg}")
        } else {
            msg
        }
    };
    for (i, it) in items.iter().enumerate() {
        check_label_text(&it.label).map_err(|m| AppError::invalid(at_item(i, m)))?;
        let mut q = Sql::new(
            "SELECT i.model, i.version FROM captures c JOIN inference i ON i.device_id = c.device_id \
             AND i.stream = c.stream AND i.seq = c.seq WHERE c.device_id = ",
        );
        q.bind(it.device.as_str())
            .push(" AND c.stream = ")
            .bind(it.stream.as_str());
        q.push(" AND c.seq = ").bind(it.seq);
        let Some(row) = q.query().fetch_optional(db.pool()).await? else {
            let msg = format!(
                "no capture {}/{}/{} (list them with GET /api/v1/captures)",
                it.device, it.stream, it.seq
            );
            return Err(AppError::NotFound(at_item(i, msg)));
        };
        let (model, version): (String, String) = (row.try_get("model")?, row.try_get("version")?);
        if let Some(allowed) = allowed_labels(db, &model, &version).await?
            && !allowed.contains(&it.label)
        {
            return Err(AppError::invalid(at_item(
                i,
                format!(
                    "{:?} is not a label of {model} {version}: use one of {}",
                    it.label,
                    allowed.join(", ")
                ),
            )));
        }
    }
    let now = now_us();
    let mut attempt = 0;
    loop {
        attempt += 1;
        match write(db, items, who, now).await {
            Ok(()) => break,
            Err(e) if attempt < 5 && is_conflict(&e) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Labelled {
        labelled: items.len() as u64,
        labelled_by: who.to_string(),
        labelled_at: now,
    })
}

async fn write(db: &Db, items: &[BulkLabel], who: &str, now: i64) -> Result<(), sqlx::Error> {
    let mut tx = db.pool().begin().await?;
    for it in items {
        let mut q = Sql::new("UPDATE captures SET label = ");
        q.bind(it.label.as_str()).push(", labelled_by = ").bind(who);
        q.push(", labelled_at = ")
            .bind(now)
            .push(" WHERE device_id = ");
        q.bind(it.device.as_str())
            .push(" AND stream = ")
            .bind(it.stream.as_str());
        q.push(" AND seq = ").bind(it.seq);
        q.query().execute(&mut *tx).await?;
        let mut q = Sql::new(
            "INSERT INTO capture_labels (id, device_id, stream, seq, label, labelled_by, labelled_at) \
             SELECT COALESCE(MAX(id), 0) + 1, ",
        );
        q.bind(it.device.as_str())
            .push(", ")
            .bind(it.stream.as_str())
            .push(", ");
        q.bind(it.seq)
            .push(", ")
            .bind(it.label.as_str())
            .push(", ")
            .bind(who);
        q.push(", ").bind(now).push(" FROM capture_labels");
        q.query().execute(&mut *tx).await?;
    }
    tx.commit().await
}

/// A unique violation on `capture_labels.id` (a concurrent labelling took it) or a
/// serialization failure: worth trying again.
fn is_conflict(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => {
            let code = d.code().map(|c| c.to_string()).unwrap_or_default();
            code == "23505"
                || code == "40001"
                || code == "40P01"
                || code == "1555"
                || code == "2067"
                || code == "5"
        }
        _ => false,
    }
}
