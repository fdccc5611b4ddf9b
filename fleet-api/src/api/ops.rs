//! Health, rejected messages, the OpenAPI document, metrics and the JSON fallbacks.

use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::{IntoParams, OpenApi, ToSchema};

use super::error::{ApiQuery, ErrorBody};
use super::{ApiDoc, AppError, AppState, check_name, cursor, page_limit};
use crate::db::Sql;
use crate::server::ingest::classify::{INVALID_DEVICE, RejectReason};

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok` when the database answers and the broker connection is up, else `degraded`.
    pub status: String,
    /// `ok` or `error`.
    pub database: String,
    /// `subscribed` (connected, subscriptions confirmed), `connected` or `disconnected`.
    pub mqtt: String,
    pub version: String,
}

/// Service health
///
/// Needs no token: for load balancers and orchestrators.
#[utoipa::path(
    get,
    path = "/api/v1/health",
    tag = "operations",
    security(()),
    responses(
        (status = 200, description = "Database answers, broker connected and subscribed", body = Health),
        (status = 503, description = "Database or broker unreachable", body = Health),
    )
)]
pub async fn health(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    let db_ok = match state.db.ping().await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "Health check: the database does not answer.");
            false
        }
    };
    let connected = state.ingest.connected.load(Ordering::Acquire);
    let subscribed = connected && state.ingest.subscribed.load(Ordering::Acquire);
    let ok = db_ok && subscribed;
    (
        if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        Json(Health {
            status: if ok { "ok" } else { "degraded" }.into(),
            database: if db_ok { "ok" } else { "error" }.into(),
            mqtt: if subscribed {
                "subscribed"
            } else if connected {
                "connected"
            } else {
                "disconnected"
            }
            .into(),
            version: env!("CARGO_PKG_VERSION").into(),
        }),
    )
}

/// Rejected messages of one device for one reason.
#[derive(Debug, Serialize, ToSchema)]
pub struct RejectView {
    /// The device named by the topic (`_invalid` if the topic named none).
    pub device_id: String,
    /// `too_large`, `malformed`, `unsupported_version`, `crc`, `device_mismatch`,
    /// `invalid_name`, `out_of_range`, `bad_topic` or `storage`.
    pub reason: String,
    pub count: i64,
    pub first_at: i64,
    pub last_at: i64,
    pub last_topic: String,
    /// Why the last one was rejected.
    pub last_detail: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RejectPage {
    pub items: Vec<RejectView>,
    pub next_cursor: Option<String>,
}

/// A reject reason in a query string.
#[derive(Debug, Clone, Copy)]
pub struct Reason(RejectReason);

impl<'de> Deserialize<'de> for Reason {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Reason, D::Error> {
        let s = String::deserialize(d)?;
        RejectReason::parse(&s).map(Reason).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown reason {s:?}: use one of {}",
                RejectReason::ALL.map(RejectReason::as_str).join(", ")
            ))
        })
    }
}

impl utoipa::PartialSchema for Reason {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::Type::String)
            .enum_values(Some(RejectReason::ALL.map(RejectReason::as_str)))
            .into()
    }
}

impl ToSchema for Reason {}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RejectFilter {
    /// Only this device.
    #[param(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    pub device: Option<String>,
    /// Only this reason.
    pub reason: Option<Reason>,
    /// Page size (default 100, at most `http.max_page_limit`, 1000 by default).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// Rejected messages, counted per device and reason
#[utoipa::path(
    get,
    path = "/api/v1/rejects",
    tag = "operations",
    params(RejectFilter),
    responses(
        (status = 200, description = "Reject counters ordered by (device, reason)", body = RejectPage),
        (status = 400, description = "Invalid filter, limit or cursor", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
    )
)]
pub async fn list_rejects(
    State(state): State<AppState>,
    ApiQuery(f): ApiQuery<RejectFilter>,
) -> Result<Json<RejectPage>, AppError> {
    let limit = page_limit(&state.settings, f.limit)?;
    let mut q = Sql::new(
        "SELECT device_id, reason, count, first_at, last_at, last_topic, last_detail \
         FROM rejects WHERE 1 = 1",
    );
    if let Some(d) = f.device.as_deref() {
        if d != INVALID_DEVICE {
            check_name("device id", d)?;
        }
        q.push(" AND device_id = ").bind(d);
    }
    if let Some(r) = f.reason {
        q.push(" AND reason = ").bind(r.0.as_str());
    }
    if let Some(c) = cursor(&f.cursor) {
        // `device:reason` of the last row; any text is a valid position.
        let (d, r) = c.rsplit_once(':').unwrap_or((c, ""));
        let d = q.param(d);
        q.push(&format!(
            " AND (device_id > {d} OR (device_id = {d} AND reason > "
        ))
        .bind(r)
        .push("))");
    }
    q.push(" ORDER BY device_id, reason LIMIT ").bind(limit + 1);
    let rows = q.query().fetch_all(state.db.pool()).await?;
    let mut items = rows
        .iter()
        .map(|r| {
            Ok(RejectView {
                device_id: r.try_get("device_id")?,
                reason: r.try_get("reason")?,
                count: r.try_get("count")?,
                first_at: r.try_get("first_at")?,
                last_at: r.try_get("last_at")?,
                last_topic: r.try_get("last_topic")?,
                last_detail: r.try_get("last_detail")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    let next_cursor = if items.len() as i64 > limit {
        items.truncate(limit as usize);
        items
            .last()
            .map(|r| format!("{}:{}", r.device_id, r.reason))
    } else {
        None
    };
    Ok(Json(RejectPage { items, next_cursor }))
}

/// The OpenAPI 3.1 document of this API.
pub async fn openapi() -> Response {
    match ApiDoc::openapi().to_pretty_json() {
        Ok(text) => ([(header::CONTENT_TYPE, "application/json")], text).into_response(),
        Err(e) => AppError::Internal(Box::new(e)).into_response(),
    }
}

/// Prometheus text format.
pub async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

pub async fn not_found() -> AppError {
    AppError::NotFound("no such route; the API is described at /api/openapi.json".into())
}

pub async fn method_not_allowed() -> AppError {
    AppError::MethodNotAllowed
}
