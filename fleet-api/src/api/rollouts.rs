//! Rollouts: create (admin), list, show with per-wave progress and per-device states, history,
//! the operator commands (admin), and a device's desired state.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiJson, ApiPath, ApiQuery, ErrorBody};
use super::{AdminAccess, AppError, AppState, DevicePath, check_name, page_limit};
use crate::db::Sql;
use crate::rollout::{Command, DeviceState, PauseReason, RolloutState, WaveSize};
use crate::rollout_store::{self, Stored};
use crate::rollouts::{CreateRollout, RolloutError, Shadow, check_id};

impl From<RolloutError> for AppError {
    fn from(e: RolloutError) -> AppError {
        match e {
            RolloutError::Invalid(m) => AppError::invalid(m),
            RolloutError::NotFound(m) => AppError::NotFound(m),
            RolloutError::Conflict(m) => AppError::Conflict(m),
            other => AppError::Internal(Box::new(other)),
        }
    }
}

/// One wave's plan and progress.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WaveView {
    pub name: String,
    /// Devices in this wave.
    pub size: usize,
    /// Cumulative planned size: `N%` or a device count.
    pub planned: String,
    pub min_soak_s: u64,
    pub success_threshold: f64,
    pub failure_threshold: f64,
    pub started_at: Option<u64>,
    pub succeeded_at: Option<u64>,
    /// Devices per state (`pending`, `assigned`, `downloading`, `verified`, `shadowing`,
    /// `active`, `failed`, `rolled_back`, `reverted`).
    pub counts: BTreeMap<String, usize>,
}

/// One target device.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeviceView {
    pub device_id: String,
    /// Index of its wave.
    pub wave: usize,
    pub state: String,
    /// Why it failed or rolled back.
    pub reason: Option<String>,
    /// The version it ran before (null: none of this model).
    pub previous_version: Option<String>,
    pub updated_at: u64,
}

/// A rollout.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RolloutView {
    pub id: String,
    pub model: String,
    pub version: String,
    /// `running`, `paused`, `completed`, `aborted` or `rolled_back`.
    pub state: String,
    /// Why it is paused: `operator`, or `failure_threshold` with the wave and counts.
    pub pause_reason: Option<String>,
    pub created_at: u64,
    /// Index of the wave in progress (the last one once completed).
    pub current_wave: usize,
    pub waves: Vec<WaveView>,
    /// Devices per state, all waves.
    pub counts: BTreeMap<String, usize>,
    pub shadow: Option<Shadow>,
    /// Desired-state rows of this rollout not yet acknowledged by the broker.
    pub pending_publish: i64,
    /// Increments with every stored step.
    pub revision: i64,
    /// Every target device (omitted in lists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<DeviceView>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RolloutPage {
    pub items: Vec<RolloutView>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// One entry of a rollout's history.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventView {
    pub seq: i64,
    /// Microseconds since the epoch.
    pub at: i64,
    /// `created`, `wave_started`, `device_failed`, `paused`, `resumed`, `completed`,
    /// `aborted`, `rolled_back`, ...
    pub kind: String,
    pub detail: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EventList {
    pub items: Vec<EventView>,
}

/// The desired state a device is told (as published on `ember/v1/{device}/desired`).
#[derive(Debug, Serialize, ToSchema)]
pub struct DesiredView {
    pub v: u32,
    pub device: String,
    #[schema(value_type = Vec<Object>)]
    pub models: serde_json::Value,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Page size (default 100, at most `http.max_page_limit`).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    #[param(pattern = "^[0-9]{1,18}[.][A-Za-z0-9._-]{1,64}$")]
    pub cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct RolloutPath {
    /// Rollout id (`r-...`).
    #[param(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    pub rollout_id: String,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct CommandPath {
    /// Rollout id (`r-...`).
    #[param(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    pub rollout_id: String,
    /// `pause`, `resume`, `abort` or `rollback`.
    #[param(pattern = "^(pause|resume|abort|rollback)$")]
    pub command: String,
}

fn state_name(s: &DeviceState) -> (&'static str, Option<String>) {
    match s {
        DeviceState::Pending => ("pending", None),
        DeviceState::Assigned => ("assigned", None),
        DeviceState::Downloading => ("downloading", None),
        DeviceState::Verified => ("verified", None),
        DeviceState::Shadowing => ("shadowing", None),
        DeviceState::Active => ("active", None),
        DeviceState::Failed { reason } => ("failed", Some(reason.clone())),
        DeviceState::RolledBack { reason } => ("rolled_back", Some(reason.clone())),
        DeviceState::Reverted => ("reverted", None),
    }
}

fn counts(m: BTreeMap<&'static str, usize>) -> BTreeMap<String, usize> {
    m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// The API view of a stored rollout.
pub fn view(s: &Stored, pending_publish: i64, with_devices: bool) -> RolloutView {
    let r = &s.rollout;
    let waves = r
        .spec
        .waves
        .iter()
        .zip(&r.waves)
        .enumerate()
        .map(|(i, (spec, p))| WaveView {
            name: spec.name.clone(),
            size: p.size,
            planned: match spec.size {
                WaveSize::Count(n) => n.to_string(),
                WaveSize::Percent(x) => format!("{x}%"),
            },
            min_soak_s: spec.min_soak_s,
            success_threshold: spec.success_threshold,
            failure_threshold: spec.failure_threshold,
            started_at: p.started_at,
            succeeded_at: p.succeeded_at,
            counts: counts(r.counts(Some(i))),
        })
        .collect();
    let pause_reason = match &r.state {
        RolloutState::Paused {
            reason: PauseReason::Operator,
        } => Some("paused by an operator".to_string()),
        RolloutState::Paused {
            reason: PauseReason::FailureThreshold { wave, failed, size },
        } => Some(format!(
            "failure threshold: {failed} of {size} devices of wave {} failed",
            wave + 1
        )),
        _ => None,
    };
    let devices = with_devices.then(|| {
        r.devices
            .iter()
            .map(|(id, e)| {
                let (state, reason) = state_name(&e.state);
                DeviceView {
                    device_id: id.clone(),
                    wave: e.wave,
                    state: state.into(),
                    reason,
                    previous_version: e.previous_version.clone(),
                    updated_at: e.updated_at,
                }
            })
            .collect()
    });
    RolloutView {
        id: s.id.clone(),
        model: r.spec.model.clone(),
        version: r.spec.version.clone(),
        state: r.state.name().into(),
        pause_reason,
        created_at: r.created_at,
        current_wave: r.current_wave,
        waves,
        counts: counts(r.counts(None)),
        shadow: r.spec.shadow.map(Shadow::from),
        pending_publish,
        revision: s.revision,
        devices,
    }
}

async fn full_view(state: &AppState, s: &Stored) -> Result<RolloutView, AppError> {
    let pending = state.rollouts.pending_publish(&s.id).await?;
    Ok(view(s, pending, true))
}

/// Start a rollout
///
/// Checks that the version is registered and not deprecated, resolves the target devices
/// (their current version from their last status), plans the waves and assigns the first one.
#[utoipa::path(
    post,
    path = "/api/v1/rollouts",
    tag = "rollouts",
    request_body = CreateRollout,
    responses(
        (status = 201, description = "Created; the first wave is assigned", body = RolloutView),
        (status = 400, description = "Invalid request or plan, or no device matches", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "The token lacks the admin scope", body = ErrorBody),
        (status = 404, description = "The version is not registered, or a listed device is not", body = ErrorBody),
        (status = 409, description = "The version is deprecated, or a device is in another unfinished rollout of the model", body = ErrorBody),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    _admin: AdminAccess,
    ApiJson(req): ApiJson<CreateRollout>,
) -> Result<(StatusCode, Json<RolloutView>), AppError> {
    let stored = state.rollouts.create(&req).await?;
    Ok((StatusCode::CREATED, Json(full_view(&state, &stored).await?)))
}

/// List rollouts
///
/// Newest first, without the per-device states.
#[utoipa::path(
    get,
    path = "/api/v1/rollouts",
    tag = "rollouts",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of rollouts", body = RolloutPage),
        (status = 400, description = "Invalid limit or cursor", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<RolloutPage>, AppError> {
    let limit = page_limit(&state.settings, q.limit)?;
    let mut sql = Sql::new("SELECT rollout_id FROM rollouts");
    if let Some(c) = q.cursor.as_deref() {
        let (at, id) = c
            .split_once('.')
            .filter(|(_, id)| ember_proto::check_name(id).is_ok())
            .and_then(|(a, id)| Some((a.parse::<i64>().ok()?, id)))
            .ok_or_else(|| AppError::BadRequest {
                code: "invalid_cursor",
                message: "the cursor is not one this API returned; start again without it".into(),
            })?;
        let a = sql.param(at);
        let i = sql.param(id);
        sql.push(&format!(
            " WHERE created_at < {a} OR (created_at = {a} AND rollout_id < {i})"
        ));
    }
    sql.push(" ORDER BY created_at DESC, rollout_id DESC LIMIT ")
        .bind(limit + 1);
    let ids: Vec<String> = sql
        .query()
        .fetch_all(state.db.pool())
        .await?
        .iter()
        .map(|r| r.try_get("rollout_id"))
        .collect::<Result<_, _>>()?;
    let mut items = Vec::new();
    let mut next_cursor = None;
    for (i, id) in ids.iter().enumerate() {
        if i as i64 == limit {
            break;
        }
        let Some(s) = rollout_store::load(&state.db, id)
            .await
            .map_err(RolloutError::from)?
        else {
            continue;
        };
        let pending = state.rollouts.pending_publish(id).await?;
        items.push(view(&s, pending, false));
    }
    if ids.len() as i64 > limit
        && let Some(last) = ids.get(limit as usize - 1)
    {
        let mut q = Sql::new("SELECT created_at FROM rollouts WHERE rollout_id = ");
        q.bind(last.as_str());
        let at: i64 = q
            .query()
            .fetch_one(state.db.pool())
            .await?
            .try_get("created_at")?;
        next_cursor = Some(format!("{at}.{last}"));
    }
    Ok(Json(RolloutPage { items, next_cursor }))
}

async fn load(state: &AppState, id: &str) -> Result<Stored, AppError> {
    check_id(id)?;
    rollout_store::load(&state.db, id)
        .await
        .map_err(RolloutError::from)?
        .ok_or_else(|| AppError::NotFound(format!("no rollout {id:?}")))
}

/// Show a rollout
///
/// Its state, per-wave progress and every target device's state.
#[utoipa::path(
    get,
    path = "/api/v1/rollouts/{rollout_id}",
    tag = "rollouts",
    params(RolloutPath),
    responses(
        (status = 200, description = "The rollout", body = RolloutView),
        (status = 400, description = "Invalid rollout id", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such rollout", body = ErrorBody),
    )
)]
pub async fn show(
    State(state): State<AppState>,
    ApiPath(RolloutPath { rollout_id }): ApiPath<RolloutPath>,
) -> Result<Json<RolloutView>, AppError> {
    let s = load(&state, &rollout_id).await?;
    Ok(Json(full_view(&state, &s).await?))
}

/// A rollout's history
///
/// Oldest first: created, waves started, device failures, pauses, commands, completion.
#[utoipa::path(
    get,
    path = "/api/v1/rollouts/{rollout_id}/events",
    tag = "rollouts",
    params(RolloutPath),
    responses(
        (status = 200, description = "The history", body = EventList),
        (status = 400, description = "Invalid rollout id", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 404, description = "No such rollout", body = ErrorBody),
    )
)]
pub async fn events(
    State(state): State<AppState>,
    ApiPath(RolloutPath { rollout_id }): ApiPath<RolloutPath>,
) -> Result<Json<EventList>, AppError> {
    load(&state, &rollout_id).await?;
    let items = rollout_store::events(&state.db, &rollout_id)
        .await
        .map_err(RolloutError::from)?
        .into_iter()
        .map(|e| EventView {
            seq: e.seq,
            at: e.at,
            kind: e.kind,
            detail: e.detail,
        })
        .collect();
    Ok(Json(EventList { items }))
}

/// Pause, resume, abort or roll back a rollout
///
/// `pause` (running), `resume` (paused; acknowledges the failures so far), `abort` (running or
/// paused; devices keep what they have), `rollback` (running, paused or completed; every
/// assigned device is told to return to its previous version).
#[utoipa::path(
    post,
    path = "/api/v1/rollouts/{rollout_id}/{command}",
    tag = "rollouts",
    params(CommandPath),
    responses(
        (status = 200, description = "Applied; the rollout now", body = RolloutView),
        (status = 400, description = "Invalid rollout id", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "The token lacks the admin scope", body = ErrorBody),
        (status = 404, description = "No such rollout or command", body = ErrorBody),
        (status = 409, description = "The command does not apply in the rollout's state", body = ErrorBody),
    )
)]
pub async fn command(
    State(state): State<AppState>,
    _admin: AdminAccess,
    ApiPath(CommandPath {
        rollout_id,
        command,
    }): ApiPath<CommandPath>,
) -> Result<Json<RolloutView>, AppError> {
    let command = match command.as_str() {
        "pause" => Command::Pause,
        "resume" => Command::Resume,
        "abort" => Command::Abort,
        "rollback" => Command::Rollback,
        other => {
            return Err(AppError::NotFound(format!(
                "no rollout command {other:?}: use pause, resume, abort or rollback"
            )));
        }
    };
    check_id(&rollout_id)?;
    let s = state.rollouts.command(&rollout_id, command).await?;
    Ok(Json(full_view(&state, &s).await?))
}

/// A device's desired state
///
/// The models the fleet tells the device to run, exactly as published (retained) on
/// `ember/v1/{device_id}/desired`. Readable by the device's own token.
#[utoipa::path(
    get,
    path = "/api/v1/devices/{device_id}/desired",
    tag = "rollouts",
    params(DevicePath),
    responses(
        (status = 200, description = "The desired state", body = DesiredView),
        (status = 400, description = "Invalid device id", body = ErrorBody),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
        (status = 403, description = "A device token of another device", body = ErrorBody),
        (status = 404, description = "No such device", body = ErrorBody),
    )
)]
pub async fn desired(
    State(state): State<AppState>,
    ApiPath(DevicePath { device_id }): ApiPath<DevicePath>,
) -> Result<Json<DesiredView>, AppError> {
    check_name("device id", &device_id)?;
    let mut q = Sql::new("SELECT device_id FROM devices WHERE device_id = ");
    q.bind(device_id.as_str());
    let known = q.query().fetch_optional(state.db.pool()).await?.is_some();
    let d = state.rollouts.desired_state(&device_id).await?;
    if !known && d.models.is_empty() {
        return Err(AppError::NotFound(format!(
            "device {device_id:?} is not registered"
        )));
    }
    Ok(Json(DesiredView {
        v: d.v,
        device: d.device,
        models: serde_json::to_value(&d.models).map_err(|e| AppError::Internal(Box::new(e)))?,
    }))
}
