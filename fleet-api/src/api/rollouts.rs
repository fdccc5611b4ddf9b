//! Rollouts: create (admin), list, show with per-wave progress and per-device states, history,
//! the operator commands (admin), and a device's desired state; the request and response
//! types (`CreateRollout` and its checks, the views) that the rollout service does not see.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use ember_proto::ota::ShadowPolicy;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiJson, ApiPath, ApiQuery, ErrorBody};
use super::{AdminAccess, AppError, AppState, DevicePath, check_name, page_limit};
use crate::db::Sql;
use crate::ota::rollout::machine::{
    Command, DeviceState, PauseReason, RolloutSpec, RolloutState, WaveSize, WaveSpec,
};
use crate::ota::rollout::service::{NewRollout, RolloutError, Selection, check_id, check_version};
use crate::ota::rollout::store::{self as rollout_store, Stored};

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

/// The default waves: one canary device, then 10%, 50% and everything.
pub const DEFAULT_WAVES: &[&str] = &["canary", "10%", "50%", "100%"];
/// Longest soak a wave may ask for (30 days).
pub const MAX_SOAK_S: u64 = 30 * 24 * 3600;
/// Most waves one rollout may have.
pub const MAX_WAVES: usize = 32;

// Requests.

/// Which devices a rollout targets: exactly one of the three.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Targets {
    /// Every registered device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all: Option<bool>,
    /// Devices carrying every one of these tags (`key=value`, or `key` for any value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
    /// These devices (each must be registered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<String>>,
}

/// Shadow-evaluation thresholds sent to every device of the rollout.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Shadow {
    /// Live windows to run both models on (1 to 1,000,000).
    #[schema(minimum = 1, maximum = 1000000)]
    #[serde(deserialize_with = "windows")]
    pub windows: u32,
    /// Least fraction of windows on which both models must agree, in [0, 1].
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub min_agreement: f64,
    /// Largest accepted ratio of the new model's mean latency to the running one's (> 0).
    #[schema(exclusive_minimum = 0.0)]
    pub max_latency_ratio: f64,
}

/// A JSON integer, also written as an integral float (`20.0`), as JSON Schema allows.
fn integer(n: &serde_json::Number) -> Option<u64> {
    n.as_u64().or_else(|| {
        n.as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < u64::MAX as f64)
            .map(|f| f as u64)
    })
}

fn optional_integer<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match Option::<serde_json::Number>::deserialize(d)? {
        None => Ok(None),
        Some(n) => integer(&n)
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom(format!("{n} is not a non-negative integer"))),
    }
}

fn windows<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let n = serde_json::Number::deserialize(d)?;
    integer(&n)
        .filter(|w| (1..=1_000_000).contains(w))
        .map(|w| w as u32)
        .ok_or_else(|| {
            serde::de::Error::custom(format!("shadow.windows {n} is not an integer in 1-1000000"))
        })
}

/// One wave size, exactly as [`parse_wave`] accepts it: `canary`, a percentage in (0, 100]
/// (`10%`, `12.5%`, `100%`) or a device count of 1 to 999,999,999, without leading zeros.
pub const WAVE_PATTERN: &str =
    "^(canary|(100([.]0+)?|[1-9][0-9]?([.][0-9]+)?|0[.][0-9]*[1-9][0-9]*)%|[1-9][0-9]{0,8})$";
/// A device id or tag key ([`ember_proto::check_name`]).
const NAME_PATTERN: &str = "^[A-Za-z0-9._-]{1,64}$";
/// A tag filter: `key` or `key=value` (any value).
const TAG_PATTERN: &str = "^[A-Za-z0-9._-]{1,64}(=[\\s\\S]*)?$";

/// Wave sizes: `canary`, `N%` or a device count `N`, at most [`MAX_WAVES`].
fn waves_schema() -> utoipa::openapi::Array {
    use utoipa::openapi::{ArrayBuilder, ObjectBuilder, Type};
    ArrayBuilder::new()
        .items(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(WAVE_PATTERN)),
        )
        .min_items(Some(1))
        .max_items(Some(MAX_WAVES))
        .build()
}

impl utoipa::PartialSchema for Targets {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::RefOr::T(utoipa::openapi::schema::Schema::OneOf(targets_schema()))
    }
}

impl ToSchema for Targets {}

/// Exactly one of `all: true`, `tags` or `devices`, as the rollout service checks it.
fn targets_schema() -> utoipa::openapi::schema::OneOf {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Type};
    let list = |pattern: &str, what: &str| {
        ArrayBuilder::new()
            .items(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some(pattern)),
            )
            .min_items(Some(1))
            .max_items(Some(crate::ota::rollout::service::MAX_LISTED))
            .description(Some(what))
    };
    let one = |name: &str, schema: utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>| {
        ObjectBuilder::new()
            .property(name, schema)
            .required(name)
            .additional_properties(Some(
                utoipa::openapi::schema::AdditionalProperties::FreeForm(false),
            ))
    };
    OneOfBuilder::new()
        .item(one(
            "all",
            ObjectBuilder::new()
                .schema_type(Type::Boolean)
                .enum_values(Some([true]))
                .description(Some("Every registered device."))
                .into(),
        ))
        .item(one(
            "tags",
            list(
                TAG_PATTERN,
                "Devices carrying every one of these tags (`key=value`, or `key` for any value).",
            )
            .into(),
        ))
        .item(one(
            "devices",
            list(NAME_PATTERN, "These devices (each must be registered).").into(),
        ))
        .description(Some(
            "Which devices a rollout targets: exactly one of the three.",
        ))
        .build()
}

impl From<ShadowPolicy> for Shadow {
    fn from(p: ShadowPolicy) -> Shadow {
        Shadow {
            windows: p.windows,
            min_agreement: p.min_agreement,
            max_latency_ratio: p.max_latency_ratio,
        }
    }
}

/// A request to start a rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRollout {
    /// Registered model name.
    #[schema(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    pub model: String,
    /// Registered, not deprecated version.
    #[schema(pattern = "^[^/\\x00-\\x1f\\x7f-\\x9f]{1,64}$")]
    pub version: String,
    #[schema(inline)]
    pub targets: Targets,
    /// Cumulative wave sizes: `canary` (one device), `N%` or a device count `N`; the last one
    /// must be `100%`. Default `canary, 10%, 50%, 100%`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = waves_schema)]
    pub waves: Option<Vec<String>>,
    /// Seconds each wave must run before the next starts (default 0, at most 30 days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 2592000)]
    #[serde(deserialize_with = "optional_integer")]
    pub min_soak_s: Option<u64>,
    /// Fraction (0, 1] of a wave that must be active to go on (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub success_threshold: Option<f64>,
    /// Fraction [0, 1) of a wave that may fail before the rollout pauses (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0.0, exclusive_maximum = 1.0)]
    pub failure_threshold: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<Shadow>,
}

impl CreateRollout {
    /// The request in the rollout service's terms; the plan's problems, if any, travel with
    /// it and are reported after the version checks.
    pub fn to_new_rollout(&self) -> NewRollout<'_> {
        NewRollout {
            model: &self.model,
            version: &self.version,
            spec: self.to_spec(),
            targets: Selection {
                all: self.targets.all,
                tags: self.targets.tags.as_deref(),
                devices: self.targets.devices.as_deref(),
            },
        }
    }

    /// Checks the request and builds the plan, naming the first problem.
    pub fn to_spec(&self) -> Result<RolloutSpec, RolloutError> {
        let invalid = |m: String| RolloutError::Invalid(m);
        ember_proto::check_name(&self.model)
            .map_err(|why| invalid(format!("model {:?} is not valid: {why}", self.model)))?;
        check_version(&self.version)?;
        let min_soak_s = self.min_soak_s.unwrap_or(0);
        if min_soak_s > MAX_SOAK_S {
            return Err(invalid(format!(
                "min_soak_s {min_soak_s} is more than {MAX_SOAK_S} (30 days)"
            )));
        }
        let success_threshold = self.success_threshold.unwrap_or(1.0);
        let failure_threshold = self.failure_threshold.unwrap_or(0.0);
        let names: Vec<String> = match &self.waves {
            Some(w) => w.clone(),
            None => DEFAULT_WAVES.iter().map(|s| s.to_string()).collect(),
        };
        if names.len() > MAX_WAVES {
            return Err(invalid(format!(
                "{} waves: at most {MAX_WAVES}",
                names.len()
            )));
        }
        if names.is_empty() {
            return Err(invalid("waves must list at least one wave".into()));
        }
        let mut names = names;
        // Every target is covered: a plan that stops short gets a last `100%` wave.
        if parse_wave(names.last().map_or("", String::as_str))? != WaveSize::Percent(100.0) {
            names.push("100%".into());
        }
        let waves = names
            .iter()
            .map(|name| {
                Ok(WaveSpec {
                    name: name.clone(),
                    size: parse_wave(name)?,
                    min_soak_s,
                    success_threshold,
                    failure_threshold,
                })
            })
            .collect::<Result<Vec<_>, RolloutError>>()?;
        if let Some(s) = &self.shadow {
            if s.windows == 0 {
                return Err(invalid("shadow.windows must be at least 1".into()));
            }
            if !(0.0..=1.0).contains(&s.min_agreement) {
                return Err(invalid("shadow.min_agreement must be in [0, 1]".into()));
            }
            if !(s.max_latency_ratio.is_finite() && s.max_latency_ratio > 0.0) {
                return Err(invalid(
                    "shadow.max_latency_ratio must be a positive number".into(),
                ));
            }
        }
        let spec = RolloutSpec {
            model: self.model.clone(),
            version: self.version.clone(),
            waves,
            shadow: self.shadow.map(|s| ShadowPolicy {
                windows: s.windows,
                min_agreement: s.min_agreement,
                max_latency_ratio: s.max_latency_ratio,
            }),
        };
        spec.validate().map_err(|e| invalid(e.to_string()))?;
        Ok(spec)
    }
}

/// `canary` (1 device), `N%` (percent of the targets) or `N` (devices), cumulative.
pub fn parse_wave(s: &str) -> Result<WaveSize, RolloutError> {
    let bad = || {
        RolloutError::Invalid(format!(
            "wave {s:?} is not `canary`, a percentage like `10%` or a device count like `5`"
        ))
    };
    if s == "canary" {
        return Ok(WaveSize::Count(1));
    }
    // The same grammar as the OpenAPI document's `WAVE_PATTERN`: no signs, spaces, exponents
    // or leading zeros, so every size the document allows is accepted and no other.
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    let plain = |t: &str| digits(t) && (t == "0" || !t.starts_with('0'));
    if let Some(p) = s.strip_suffix('%') {
        let well_formed = match p.split_once('.') {
            Some((int, frac)) => plain(int) && digits(frac),
            None => plain(p),
        };
        if !well_formed {
            return Err(bad());
        }
        let p: f64 = p.parse().map_err(|_| bad())?;
        if !(p > 0.0 && p <= 100.0) {
            return Err(RolloutError::Invalid(format!(
                "wave {s:?}: a percentage must be more than 0 and at most 100"
            )));
        }
        return Ok(WaveSize::Percent(p));
    }
    if !plain(s) || s.len() > 9 {
        return Err(bad());
    }
    match s.parse::<u32>() {
        Ok(0) => Err(RolloutError::Invalid(format!(
            "wave {s:?}: a count must be at least 1"
        ))),
        Ok(n) => Ok(WaveSize::Count(n)),
        Err(_) => Err(bad()),
    }
}

// Responses.

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
    let stored = state.rollouts.create(req.to_new_rollout()).await?;
    Ok((StatusCode::CREATED, Json(full_view(&state, &stored).await?)))
}

/// List rollouts
///
/// Newest first, without the per-device states.
#[utoipa::path(
    get,
    path = "/api/v1/rollouts",
    operation_id = "list_rollouts",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waves_parse_and_bad_ones_are_named() {
        assert_eq!(parse_wave("canary").unwrap(), WaveSize::Count(1));
        assert_eq!(parse_wave("10%").unwrap(), WaveSize::Percent(10.0));
        assert_eq!(parse_wave("5").unwrap(), WaveSize::Count(5));
        assert_eq!(parse_wave("12.5%").unwrap(), WaveSize::Percent(12.5));
        assert_eq!(parse_wave("0.5%").unwrap(), WaveSize::Percent(0.5));
        assert_eq!(parse_wave("100.0%").unwrap(), WaveSize::Percent(100.0));
        for bad in [
            "0",
            "0%",
            "101%",
            "148%",
            "x",
            "NaN%",
            "-1",
            "",
            " 5",
            "05",
            "5.%",
            "1e2%",
            "+5",
            "1000000000",
            "inf%",
        ] {
            assert!(parse_wave(bad).is_err(), "{bad}");
        }
        // The document's pattern says the same of every one of them.
        let re = regex_lite::Regex::new(WAVE_PATTERN).unwrap();
        for s in [
            "canary",
            "10%",
            "12.5%",
            "0.5%",
            "100.0%",
            "5",
            "999999999",
            "0",
            "0%",
            "101%",
            "148%",
            " 5",
            "05",
            "5.%",
            "1e2%",
            "+5",
            "1000000000",
            "0.0%",
            "100.5%",
            "99.99%",
        ] {
            assert_eq!(re.is_match(s), parse_wave(s).is_ok(), "{s}");
        }
    }

    #[test]
    fn requests_are_checked() {
        let mut req = CreateRollout {
            model: "activity".into(),
            version: "2.0.0".into(),
            targets: Targets {
                all: Some(true),
                ..Targets::default()
            },
            waves: None,
            min_soak_s: None,
            success_threshold: None,
            failure_threshold: None,
            shadow: None,
        };
        let spec = req.to_spec().unwrap();
        assert_eq!(spec.waves.len(), 4);
        req.min_soak_s = Some(u64::MAX);
        assert!(
            req.to_spec()
                .unwrap_err()
                .to_string()
                .contains("min_soak_s")
        );
        req.min_soak_s = None;
        // A plan that stops short of everyone gets a last `100%` wave.
        req.waves = Some(vec!["canary".into(), "50%".into()]);
        let spec = req.to_spec().unwrap();
        assert_eq!(spec.waves.len(), 3);
        assert_eq!(spec.waves[2].size, WaveSize::Percent(100.0));
        req.waves = Some(vec!["148%".into()]);
        assert!(req.to_spec().unwrap_err().to_string().contains("148%"));
        req.waves = Some(vec![]);
        assert!(
            req.to_spec()
                .unwrap_err()
                .to_string()
                .contains("at least one")
        );
        req.waves = None;
        req.shadow = Some(Shadow {
            windows: 0,
            min_agreement: 0.9,
            max_latency_ratio: 2.0,
        });
        assert!(req.to_spec().unwrap_err().to_string().contains("windows"));
        req.shadow = None;
        req.failure_threshold = Some(1.0);
        assert!(req.to_spec().is_err());
    }
}
