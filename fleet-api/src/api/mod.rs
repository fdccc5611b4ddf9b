//! The REST API (axum): `/api/v1/...` (JSON, bearer tokens), `/api/openapi.json` (generated
//! from these handlers by utoipa) and `/metrics` (Prometheus).
//!
//! **API boundary:** every route under `/api/v1` except `/api/v1/health` passes
//! [`require_token`]; write routes also take [`AdminAccess`]. Routes of one device's own
//! resources (`/api/v1/devices/{device_id}/...`, GET) sit behind [`DeviceAccess`], the only
//! guard a `device:<id>` token can pass; every other route refuses device tokens
//! ([`fleet_wide`]). New per-device routes (OTA model downloads) go into `device_routes`. Lists page with `limit` and an
//! opaque `cursor` (keyset pagination: a page is never shifted by rows written meanwhile), and
//! return `{"items": [...], "next_cursor": "..." | null}`.

/// The media type of a signed model bundle (`POST /api/v1/models`); the upload also accepts
/// `application/octet-stream`.
pub const BUNDLE_MEDIA_TYPE: &str = "application/vnd.ember.bundle";

mod captures;
mod dashboard;
mod data;
mod devices;
pub mod error;
mod inference;
mod live;
mod models;
mod monitoring;
mod ops;
mod rollouts;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::Deserialize;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{IntoParams, OpenApi};

use crate::auth::Scope;
use crate::config::Settings;
use crate::db::Db;
use crate::metrics::Metrics;
use crate::server::events::Events;
use crate::server::ingest::IngestState;
pub use error::{AppError, ErrorBody};

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub settings: Arc<Settings>,
    pub metrics: Arc<Metrics>,
    pub ingest: Arc<IngestState>,
    pub events: Arc<Events>,
    pub rollouts: Arc<crate::ota::rollout::service::Service>,
    /// The model registry (bundles and their blobs).
    pub registry: Arc<crate::ota::registry::Registry>,
    /// Model monitoring's latest report.
    pub monitor: Arc<crate::ota::monitor::Monitor>,
    /// Fires when the service shuts down: ends the live event streams.
    pub shutdown: tokio_util::sync::CancellationToken,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Ember fleet API",
        description = "Devices, telemetry, model results, aggregates, the durability ledger and rejects of an Ember fleet. \
                       Times are microseconds since the Unix epoch (UTC). Authenticate with \
                       `Authorization: Bearer <token>` (scopes: read, admin, device:<id>).",
    ),
    paths(
        ops::health,
        devices::list_devices,
        devices::register_device,
        devices::get_device,
        devices::set_tags,
        data::list_streams,
        data::telemetry,
        data::aggregates,
        data::ledger,
        inference::results,
        inference::aggregates,
        inference::anomalies,
        inference::incidents,
        inference::rates,
        monitoring::report,
        monitoring::version,
        captures::list,
        captures::set_label,
        captures::bulk,
        ops::list_rejects,
        live::overview,
        rollouts::create,
        rollouts::list,
        rollouts::show,
        rollouts::events,
        rollouts::command,
        rollouts::desired,
        models::upload,
        models::list,
        models::versions,
        models::get_version,
        models::deprecate,
        models::download,
    ),
    components(schemas(ErrorBody, ops::Reason)),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags(
        (name = "devices", description = "The device registry"),
        (name = "data", description = "Telemetry, aggregates and the durability ledger"),
        (name = "inference", description = "Model results, their aggregates and anomalies"),
        (name = "operations", description = "Health and rejected messages"),
        (name = "rollouts", description = "Staged model rollouts and the desired state of devices"),
        (name = "models", description = "The model registry: signed bundles and their downloads"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The whole HTTP application.
pub fn router(state: AppState) -> Router {
    // Fleet-wide routes and writes: no device tokens.
    let fleet_routes = Router::new()
        .route(
            "/api/v1/devices",
            get(devices::list_devices).post(devices::register_device),
        )
        .route("/api/v1/devices/{device_id}/tags", put(devices::set_tags))
        .route("/api/v1/rejects", get(ops::list_rejects))
        .route("/api/v1/anomalies", get(inference::anomalies))
        .route("/api/v1/anomalies/incidents", get(inference::incidents))
        .route("/api/v1/anomalies/rates", get(inference::rates))
        .route("/api/v1/monitoring", get(monitoring::report))
        .route("/api/v1/captures", get(captures::list))
        .route("/api/v1/captures/labels", post(captures::bulk))
        .route(
            "/api/v1/captures/{device_id}/{stream}/{seq}/label",
            put(captures::set_label),
        )
        .route(
            "/api/v1/monitoring/{model}/{version}",
            get(monitoring::version),
        )
        .route("/api/v1/overview", get(live::overview))
        .route("/api/v1/events", get(live::events))
        .route(
            "/api/v1/rollouts",
            get(rollouts::list).post(rollouts::create),
        )
        .route("/api/v1/rollouts/{rollout_id}", get(rollouts::show))
        .route(
            "/api/v1/rollouts/{rollout_id}/events",
            get(rollouts::events),
        )
        .route(
            "/api/v1/rollouts/{rollout_id}/{command}",
            post(rollouts::command),
        )
        .route_layer(axum::middleware::from_fn(fleet_wide))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ));
    // One device's own resources: readable by read/admin tokens and that device's token.
    let device_routes = Router::new()
        .route("/api/v1/devices/{device_id}", get(devices::get_device))
        .route(
            "/api/v1/devices/{device_id}/streams",
            get(data::list_streams),
        )
        .route(
            "/api/v1/devices/{device_id}/streams/{stream}/telemetry",
            get(data::telemetry),
        )
        .route(
            "/api/v1/devices/{device_id}/streams/{stream}/aggregates",
            get(data::aggregates),
        )
        .route("/api/v1/devices/{device_id}/ledger", get(data::ledger))
        .route(
            "/api/v1/devices/{device_id}/desired",
            get(rollouts::desired),
        )
        .route(
            "/api/v1/devices/{device_id}/streams/{stream}/inference",
            get(inference::results),
        )
        .route(
            "/api/v1/devices/{device_id}/streams/{stream}/inference/aggregates",
            get(inference::aggregates),
        )
        .route_layer(axum::middleware::from_fn(device_guard))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ));
    let protected = fleet_routes
        .merge(device_routes)
        .merge(models::routes(state.clone()));
    Router::new()
        .route("/api/v1/health", get(ops::health))
        .route("/api/openapi.json", get(ops::openapi))
        .route("/metrics", get(ops::metrics))
        .merge(dashboard::routes())
        .merge(protected)
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), observe))
        .layer(axum::middleware::from_fn(catch_panics))
        .with_state(state)
}

/// Checks `Authorization: Bearer <token>` and records the token's scope in the request.
async fn require_token(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Result<Response, AppError> {
    let header = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            AppError::Unauthorized(
                "missing Authorization header: send `Authorization: Bearer <token>`".into(),
            )
        })?;
    let token = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            AppError::Unauthorized("the Authorization header is not `Bearer <token>`".into())
        })?;
    let (scope, who) = crate::auth::lookup_identity(&state.db, token)
        .await?
        .ok_or_else(|| AppError::Unauthorized("unknown or revoked token".into()))?;
    req.extensions_mut().insert(scope);
    req.extensions_mut().insert(who);
    Ok(next.run(req).await)
}

/// Present in handlers that change data: the token must have the `admin` scope.
pub struct AdminAccess;

impl<S: Send + Sync> FromRequestParts<S> for AdminAccess {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, AppError> {
        match parts.extensions.get::<Scope>() {
            Some(Scope::Admin) => Ok(AdminAccess),
            Some(Scope::Read | Scope::Label | Scope::Device(_)) => Err(AppError::Forbidden(
                "this route changes data and needs a token with the admin scope".into(),
            )),
            None => Err(AppError::Unauthorized("no token".into())),
        }
    }
}

/// Present in handlers that label captured windows: a `label` or `admin` token; carries who.
pub struct LabelAccess(pub crate::auth::TokenIdentity);

impl<S: Send + Sync> FromRequestParts<S> for LabelAccess {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, AppError> {
        let who = parts
            .extensions
            .get::<crate::auth::TokenIdentity>()
            .cloned()
            .ok_or_else(|| AppError::Unauthorized("no token".into()))?;
        match parts.extensions.get::<Scope>() {
            Some(Scope::Admin | Scope::Label) => Ok(LabelAccess(who)),
            Some(Scope::Read | Scope::Device(_)) => Err(AppError::Forbidden(
                "labelling captures needs a token with the label or admin scope (ember-fleet token create --scope label)".into(),
            )),
            None => Err(AppError::Unauthorized("no token".into())),
        }
    }
}

/// Access to one device's own resources: the route's `{device_id}` must be readable by the
/// request's token (`read`, `admin`, or `device:<that id>`). Take it as an extractor in any
/// handler that serves a single device's data (e.g. OTA model downloads); `device_routes`
/// also applies it to every route it holds.
#[derive(Debug, Clone)]
pub struct DeviceAccess {
    /// The device the request is about (checked with `check_name`).
    pub device_id: String,
}

impl<S: Send + Sync> FromRequestParts<S> for DeviceAccess {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, AppError> {
        let axum::extract::Path(params) = axum::extract::Path::<
            std::collections::HashMap<String, String>,
        >::from_request_parts(parts, state)
        .await
        .map_err(|_| AppError::invalid("the path has no valid device id"))?;
        let device_id = params
            .get("device_id")
            .cloned()
            .ok_or_else(|| AppError::invalid("the path has no device id"))?;
        check_name("device id", &device_id)?;
        match parts.extensions.get::<Scope>() {
            Some(scope) if scope.may_read_device(&device_id) => Ok(DeviceAccess { device_id }),
            Some(_) => Err(AppError::Forbidden(
                "this token may only read its own device's resources".into(),
            )),
            None => Err(AppError::Unauthorized("no token".into())),
        }
    }
}

/// Applies [`DeviceAccess`] to every route of a router (a route layer).
async fn device_guard(_access: DeviceAccess, req: Request, next: Next) -> Response {
    next.run(req).await
}

/// Refuses device tokens on fleet-wide routes (lists, rejects, writes).
async fn fleet_wide(req: Request, next: Next) -> Result<Response, AppError> {
    match req.extensions().get::<Scope>() {
        Some(Scope::Device(_)) => Err(AppError::Forbidden(
            "a device token may only read its own device's resources".into(),
        )),
        _ => Ok(next.run(req).await),
    }
}

/// A handler that panics (a bug) answers 500 like any internal error instead of dropping the
/// connection; the panic is logged.
async fn catch_panics(req: Request, next: Next) -> Response {
    match tokio::spawn(next.run(req)).await {
        Ok(resp) => resp,
        Err(e) => {
            AppError::Internal(format!("a request handler panicked: {e}").into()).into_response()
        }
    }
}

/// Request metrics and a debug log line per request.
async fn observe(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let t0 = Instant::now();
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let path = req.uri().path().to_string();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    let secs = t0.elapsed().as_secs_f64();
    state.metrics.inc(
        "http_requests_total",
        &[("method", &method), ("route", &route), ("status", &status)],
        1,
    );
    state
        .metrics
        .observe("http_request_seconds", &[("route", &route)], secs);
    tracing::debug!(%method, %path, %status, ms = secs * 1000.0, "HTTP request.");
    resp
}

// ---- pagination ---------------------------------------------------------------------------

/// The page size to use: `limit` if given (1..=max), else the configured default.
pub fn page_limit(settings: &Settings, limit: Option<u32>) -> Result<i64, AppError> {
    let max = settings.http.max_page_limit;
    match limit {
        None => Ok(i64::from(settings.http.default_page_limit)),
        Some(l) if (1..=max).contains(&l) => Ok(i64::from(l)),
        Some(l) => Err(AppError::invalid(format!(
            "limit {l} is out of range: use 1-{max}"
        ))),
    }
}

/// A cursor, or none when absent or empty.
pub fn cursor(c: &Option<String>) -> Option<&str> {
    c.as_deref().filter(|c| !c.is_empty())
}

/// The cursor of a page ordered by two integers (`ts.seq`, `ts.channel`).
pub fn int_cursor(a: i64, b: i64) -> String {
    format!("{a}.{b}")
}

pub fn parse_int_cursor(c: &str) -> Result<(i64, i64), AppError> {
    let bad = || AppError::BadRequest {
        code: "invalid_cursor",
        message: "the cursor is not one this API returned; start again without it".into(),
    };
    let (a, b) = c.split_once('.').ok_or_else(bad)?;
    Ok((a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?))
}

/// Path parameters of the device routes.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct DevicePath {
    /// Device id: 1-64 characters of `A-Z a-z 0-9 - _ .`
    #[param(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    pub device_id: String,
}

/// Path parameters of the stream routes.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct StreamPath {
    /// Device id: 1-64 characters of `A-Z a-z 0-9 - _ .`
    #[param(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    pub device_id: String,
    /// Stream name: 1-64 characters of `A-Z a-z 0-9 - _ .`
    #[param(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    pub stream: String,
}

/// Checks a device id or stream name from a path.
pub fn check_name(kind: &str, name: &str) -> Result<(), AppError> {
    ember_proto::check_name(name)
        .map_err(|why| AppError::invalid(format!("{kind} {name:?} is not valid: {why}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int_cursors_round_trip_and_reject_garbage() {
        assert_eq!(parse_int_cursor(&int_cursor(-5, 7)).unwrap(), (-5, 7));
        assert!(parse_int_cursor("5").is_err());
        assert!(parse_int_cursor("a.b").is_err());
        assert_eq!(cursor(&Some(String::new())), None);
    }
}
