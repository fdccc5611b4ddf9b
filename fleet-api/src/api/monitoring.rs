//! Model monitoring (`ota::monitor`): per model version and per device, the results of the
//! monitoring window against the bundle's training baseline, and the drift verdict.

use axum::Json;
use axum::extract::State;

use super::error::ApiPath;
use super::error::ErrorBody;
use super::{AppError, AppState};
use crate::ota::monitor::{Report, VersionReport};

/// Model monitoring: every model version
///
/// Per model version with results in the last `monitoring.window_s` seconds: class, confidence,
/// score and input statistics, their Population Stability Index against the bundle's training
/// baseline, and whether the version (and which of its devices) drifts. Recomputed every
/// `monitoring.interval_s`; 503 until the first computation finished.
#[utoipa::path(
    get,
    path = "/api/v1/monitoring",
    tag = "inference",
    responses(
        (status = 200, description = "The latest report", body = Report),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 503, description = "Not computed yet", body = ErrorBody),
    )
)]
pub async fn report(State(state): State<AppState>) -> Result<Json<Report>, AppError> {
    let r = state.monitor.latest().ok_or_else(|| {
        AppError::Unavailable("model monitoring has not run yet; try again in a few seconds".into())
    })?;
    Ok(Json((*r).clone()))
}

/// Model monitoring: one model version
///
/// The report of one model version, with each device running it.
#[utoipa::path(
    get,
    path = "/api/v1/monitoring/{model}/{version}",
    tag = "inference",
    params(
        ("model" = String, Path, description = "Model name"),
        ("version" = String, Path, description = "Semantic version"),
    ),
    responses(
        (status = 200, description = "The version's report", body = VersionReport),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No results of this version in the window", body = ErrorBody),
        (status = 503, description = "Not computed yet", body = ErrorBody),
    )
)]
pub async fn version(
    State(state): State<AppState>,
    ApiPath((model, version)): ApiPath<(String, String)>,
) -> Result<Json<VersionReport>, AppError> {
    let r = state.monitor.latest().ok_or_else(|| {
        AppError::Unavailable("model monitoring has not run yet; try again in a few seconds".into())
    })?;
    r.versions
        .iter()
        .find(|v| v.model == model && v.version == version)
        .cloned()
        .map(Json)
        .ok_or_else(|| {
            AppError::NotFound(format!(
                "no results of {model} {version} in the last {} s",
                r.window_s
            ))
        })
}
