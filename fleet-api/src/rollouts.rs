//! The rollout service: drives [`crate::rollout::Rollout`]s in the running fleet.
//!
//! ```text
//!  API create/command ──┐
//!  ingest (status.ota) ─┼─▶ step: load → Rollout::{start,command,report,tick} → rollout_store::save
//!  driver (every 1 s) ──┘         │ (state, history and desired_models outbox in one transaction)
//!                                 ▼ Notify
//!                       publisher: outbox → DesiredState → retained QoS1 ember/v1/{device}/desired
//!                                 └─ PUBACK → rollout_store::mark_published
//! ```
//!
//! Storage: everything lives in the tables of `rollout_store` (`rollouts`, `rollout_events`,
//! `desired_models`); this module keeps no state of its own, so a restarted fleet resumes
//! from the database alone.
//!
//! Guarantees:
//! * Every step MUST go through [`Service::step`]: it loads the stored rollout, applies the
//!   input, and saves conditionally on the revision it loaded, retrying on
//!   `StoreError::Conflict`. Concurrent steps (an operator's command, a report, the driver's
//!   tick, another replica) therefore never overwrite each other.
//! * A desired row is marked published only after the broker acknowledged (PUBACK) the
//!   retained message that carried it; a crash before that republishes it (retained messages
//!   are idempotent on the device side: it compares versions).
//! * Report ingestion is idempotent: a report equal to the device's recorded state, a report
//!   older than it (a lower stage), one for another version, or one for a finished or unknown
//!   rollout changes nothing. Reports are applied after the status is stored and before it is
//!   acknowledged, so a crash in between redelivers them.
//! * The driver SHOULD tick every [`DRIVER_TICK`] so soak times elapse without reports.
//! * Creating a rollout MUST fail, with a specific error, when the version is not registered
//!   or deprecated, when the selection matches no registered device, or when a target device
//!   is already in an unfinished rollout of the same model.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use ember_proto::Status;
use ember_proto::ota::{DesiredModel, DesiredState, OtaReport, OtaState, ShadowPolicy};
use rumqttc::{AsyncClient, ConnectReturnCode, Event, MqttOptions, Outgoing, Packet, QoS};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::db::{Db, Sql, now_us};
use crate::events::{Events, LiveEvent};
use crate::metrics::Metrics;
use crate::registry::{self, ModelEntry, RegistryError};
use crate::rollout::{
    Command, DeviceState, Effect, Rollout, RolloutSpec, RolloutState, WaveSize, WaveSpec,
};
use crate::rollout_store::{self, StoreError, Stored};

/// How often the driver ticks unfinished rollouts (soak periods end between reports).
pub const DRIVER_TICK: Duration = Duration::from_secs(1);
/// How often the publisher looks at the outbox without being woken.
pub const PUBLISH_INTERVAL: Duration = Duration::from_secs(5);
/// Outbox rows read per publisher pass.
const PUBLISH_BATCH: i64 = 2000;
/// Desired-state messages awaiting their PUBACK at once.
const MAX_IN_FLIGHT: usize = 256;
/// Attempts at a step that keeps losing the optimistic-locking race.
const STEP_ATTEMPTS: usize = 16;
/// The default waves: one canary device, then 10%, 50% and everything.
pub const DEFAULT_WAVES: &[&str] = &["canary", "10%", "50%", "100%"];
/// Longest soak a wave may ask for (30 days).
pub const MAX_SOAK_S: u64 = 30 * 24 * 3600;
/// Most waves one rollout may have.
pub const MAX_WAVES: usize = 32;
/// Most devices or tags one request may list.
pub const MAX_LISTED: usize = 10_000;

/// Why a rollout request or step failed.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    /// The request is malformed or the plan cannot run (400).
    #[error("{0}")]
    Invalid(String),
    /// The rollout, model version or device does not exist (404).
    #[error("{0}")]
    NotFound(String),
    /// The request is valid but conflicts with the current state (409).
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Which devices a rollout targets: exactly one of the three.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
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

/// Wave sizes: `canary`, `N%` or a device count `N`, at most [`MAX_WAVES`].
fn waves_schema() -> utoipa::openapi::Array {
    use utoipa::openapi::{ArrayBuilder, ObjectBuilder, Type};
    ArrayBuilder::new()
        .items(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some("^(canary|[0-9]{1,3}([.][0-9]+)?%|[0-9]{1,9})$")),
        )
        .max_items(Some(MAX_WAVES))
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
    if let Some(p) = s.strip_suffix('%') {
        let p: f64 = p.trim().parse().map_err(|_| bad())?;
        if !(p > 0.0 && p <= 100.0) {
            return Err(RolloutError::Invalid(format!(
                "wave {s:?}: a percentage must be more than 0 and at most 100"
            )));
        }
        return Ok(WaveSize::Percent(p));
    }
    match s.trim().parse::<u32>() {
        Ok(0) => Err(RolloutError::Invalid(format!(
            "wave {s:?}: a count must be at least 1"
        ))),
        Ok(n) => Ok(WaveSize::Count(n)),
        Err(_) => Err(bad()),
    }
}

fn check_version(v: &str) -> Result<(), RolloutError> {
    if v.is_empty() || v.chars().count() > 64 || v.chars().any(|c| c.is_control() || c == '/') {
        return Err(RolloutError::Invalid(format!(
            "version {v:?} must be 1-64 printable characters without `/`"
        )));
    }
    Ok(())
}

/// Checks a rollout id from a path or a report.
pub fn check_id(id: &str) -> Result<(), RolloutError> {
    ember_proto::check_name(id)
        .map_err(|why| RolloutError::Invalid(format!("rollout id {id:?} is not valid: {why}")))
}

/// The fleet's view of an agent's OTA state.
pub fn device_state(r: &OtaReport) -> DeviceState {
    let reason = || r.reason.clone().unwrap_or_else(|| "no reason given".into());
    match r.state {
        OtaState::Downloading => DeviceState::Downloading,
        OtaState::Verified => DeviceState::Verified,
        OtaState::Shadowing => DeviceState::Shadowing,
        OtaState::Active => DeviceState::Active,
        OtaState::Failed => DeviceState::Failed { reason: reason() },
        OtaState::RolledBack => DeviceState::RolledBack { reason: reason() },
    }
}

/// How far along an install a state is; a report never moves a device back.
fn stage(s: &DeviceState) -> u8 {
    match s {
        DeviceState::Pending | DeviceState::Assigned => 0,
        DeviceState::Downloading => 1,
        DeviceState::Verified => 2,
        DeviceState::Shadowing => 3,
        DeviceState::Active
        | DeviceState::Failed { .. }
        | DeviceState::RolledBack { .. }
        | DeviceState::Reverted => 4,
    }
}

fn now() -> u64 {
    u64::try_from(now_us()).unwrap_or(0)
}

/// The rollout service, shared by the API, ingestion, the driver and the publisher.
pub struct Service {
    db: Db,
    events: Arc<Events>,
    metrics: Arc<Metrics>,
    /// Wakes the publisher after a step wrote desired rows.
    wake: Notify,
}

impl Service {
    pub fn new(db: Db, events: Arc<Events>, metrics: Arc<Metrics>) -> Service {
        Service {
            db,
            events,
            metrics,
            wake: Notify::new(),
        }
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Starts a rollout; returns it as stored.
    pub async fn create(&self, req: &CreateRollout) -> Result<Stored, RolloutError> {
        // The version must exist before anything else about the plan matters.
        ember_proto::check_name(&req.model).map_err(|why| {
            RolloutError::Invalid(format!("model {:?} is not valid: {why}", req.model))
        })?;
        check_version(&req.version)?;
        let entry = registry::lookup(&self.db, &req.model, &req.version)
            .await?
            .ok_or_else(|| {
                RolloutError::NotFound(format!(
                    "model {} version {} is not registered: upload the bundle first",
                    req.model, req.version
                ))
            })?;
        if entry.deprecated {
            return Err(RolloutError::Conflict(format!(
                "model {} version {} is deprecated and cannot start a rollout",
                req.model, req.version
            )));
        }
        let spec = req.to_spec()?;
        let targets = self.resolve(&req.targets, &spec.model).await?;
        for other in rollout_store::list_unfinished(&self.db).await? {
            if other.rollout.spec.model != spec.model {
                continue;
            }
            if let Some(d) = targets
                .keys()
                .find(|d| other.rollout.devices.contains_key(*d))
            {
                return Err(RolloutError::Conflict(format!(
                    "device {d} is already in rollout {} of model {} ({}); finish, abort or roll it back first",
                    other.id,
                    spec.model,
                    other.rollout.state.name()
                )));
            }
        }
        let (rollout, fx) = Rollout::start(spec, targets, now())
            .map_err(|e| RolloutError::Invalid(e.to_string()))?;
        let id = new_id()?;
        let stored = rollout_store::create(&self.db, &id, &rollout, &fx).await?;
        tracing::info!(rollout = %id, model = %rollout.spec.model, version = %rollout.spec.version,
            devices = rollout.devices.len(), waves = rollout.waves.len(), "Created a rollout.");
        self.after_step(&id, &rollout, &fx, "create");
        Ok(stored)
    }

    /// Device id → the version of `model` it reported last (None: not running it).
    async fn resolve(
        &self,
        targets: &Targets,
        model: &str,
    ) -> Result<BTreeMap<String, Option<String>>, RolloutError> {
        let invalid = |m: &str| RolloutError::Invalid(m.to_string());
        let chosen = [
            targets.all.is_some(),
            targets.tags.is_some(),
            targets.devices.is_some(),
        ]
        .iter()
        .filter(|x| **x)
        .count();
        if chosen != 1 {
            return Err(invalid(
                "targets must name exactly one of `all: true`, `tags: [...]` or `devices: [...]`",
            ));
        }
        let rows = sqlx::query("SELECT device_id, models FROM devices ORDER BY device_id")
            .fetch_all(self.db.pool())
            .await?;
        let mut known: BTreeMap<String, Option<String>> = BTreeMap::new();
        for row in &rows {
            let id: String = row.try_get("device_id")?;
            let text: Option<String> = row.try_get("models")?;
            let models: BTreeMap<String, String> = text
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or_default();
            known.insert(id, models.get(model).cloned());
        }
        let selected = if let Some(all) = targets.all {
            if !all {
                return Err(invalid("targets.all must be true when given"));
            }
            known
        } else if let Some(tags) = &targets.tags {
            if tags.is_empty() || tags.len() > MAX_LISTED {
                return Err(invalid("targets.tags must list 1-10000 tags"));
            }
            let mut matching: Option<BTreeSet<String>> = None;
            for tag in tags {
                let (key, value) = match tag.split_once('=') {
                    Some((k, v)) => (k, Some(v)),
                    None => (tag.as_str(), None),
                };
                ember_proto::check_name(key).map_err(|why| {
                    RolloutError::Invalid(format!("tag {tag:?}: key {key:?} is not valid: {why}"))
                })?;
                let mut q = Sql::new("SELECT device_id FROM device_tags WHERE tag = ");
                q.bind(key);
                if let Some(v) = value {
                    q.push(" AND value = ").bind(v);
                }
                let ids: BTreeSet<String> = q
                    .query()
                    .fetch_all(self.db.pool())
                    .await?
                    .iter()
                    .map(|r| r.try_get("device_id"))
                    .collect::<Result<_, _>>()?;
                matching = Some(match matching {
                    None => ids,
                    Some(m) => m.intersection(&ids).cloned().collect(),
                });
            }
            let matching = matching.unwrap_or_default();
            known
                .into_iter()
                .filter(|(d, _)| matching.contains(d))
                .collect()
        } else {
            let devices = targets.devices.as_deref().unwrap_or_default();
            if devices.is_empty() || devices.len() > MAX_LISTED {
                return Err(invalid("targets.devices must list 1-10000 device ids"));
            }
            let mut out = BTreeMap::new();
            for d in devices {
                ember_proto::check_name(d).map_err(|why| {
                    RolloutError::Invalid(format!("device id {d:?} is not valid: {why}"))
                })?;
                match known.get(d) {
                    Some(v) => {
                        out.insert(d.clone(), v.clone());
                    }
                    None => {
                        return Err(RolloutError::NotFound(format!(
                            "device {d:?} is not registered"
                        )));
                    }
                }
            }
            out
        };
        if selected.is_empty() {
            return Err(invalid("the target selection matches no registered device"));
        }
        Ok(selected)
    }

    /// An operator's command.
    pub async fn command(&self, id: &str, command: Command) -> Result<Stored, RolloutError> {
        check_id(id)?;
        self.step(id, "command", |r, now| {
            r.command(command, now)
                .map_err(|e| RolloutError::Conflict(e.to_string()))
        })
        .await
    }

    /// Loads `id`, applies `f`, saves conditionally; retries when another step won the race.
    /// Unchanged rollouts are not written.
    pub async fn step<F>(&self, id: &str, cause: &str, mut f: F) -> Result<Stored, RolloutError>
    where
        F: FnMut(&mut Rollout, u64) -> Result<Vec<Effect>, RolloutError>,
    {
        for _ in 0..STEP_ATTEMPTS {
            let stored = rollout_store::load(&self.db, id)
                .await?
                .ok_or_else(|| RolloutError::NotFound(format!("no rollout {id:?}")))?;
            let mut r = stored.rollout.clone();
            let fx = f(&mut r, now())?;
            if fx.is_empty() && r == stored.rollout {
                return Ok(stored);
            }
            match rollout_store::save(&self.db, &stored, &r, &fx).await {
                Ok(revision) => {
                    self.after_step(id, &r, &fx, cause);
                    return Ok(Stored {
                        id: id.to_string(),
                        revision,
                        rollout: r,
                    });
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(RolloutError::Conflict(format!(
            "rollout {id} kept changing while this step was applied; try again"
        )))
    }

    fn after_step(&self, id: &str, r: &Rollout, fx: &[Effect], cause: &str) {
        self.metrics
            .inc("rollout_steps_total", &[("cause", cause)], 1);
        for e in fx {
            if let Effect::Event(e) = e {
                tracing::info!(rollout = %id, kind = %e.kind, detail = %e.detail, "Rollout event.");
            }
        }
        if fx
            .iter()
            .any(|e| matches!(e, Effect::Assign { .. } | Effect::Revert { .. }))
        {
            self.wake.notify_one();
        }
        let counts = r.counts(None);
        self.events.publish(LiveEvent::Rollout {
            rollout_id: id.to_string(),
            state: r.state.name().to_string(),
            current_wave: r.current_wave,
            active: counts.get("active").copied().unwrap_or(0),
            failed: counts.get("failed").copied().unwrap_or(0)
                + counts.get("rolled_back").copied().unwrap_or(0),
            devices: r.devices.len(),
        });
    }

    /// Applies the OTA reports of stored statuses to their rollouts (one step per rollout).
    /// Errors are logged: the statuses are retained and come back on the next connection.
    pub async fn apply_statuses(&self, statuses: &[&Status]) {
        let mut by_rollout: BTreeMap<&str, Vec<(&str, &OtaReport)>> = BTreeMap::new();
        for s in statuses {
            for r in &s.ota {
                match r.rollout.as_deref() {
                    Some(id) if ember_proto::check_name(id).is_ok() => by_rollout
                        .entry(id)
                        .or_default()
                        .push((s.device.as_str(), r)),
                    _ => self
                        .metrics
                        .inc("ota_reports_total", &[("outcome", "ignored")], 1),
                }
            }
        }
        for (id, reports) in by_rollout {
            let mut applied = 0u64;
            let res = self
                .step(id, "report", |r, now| {
                    applied = 0;
                    let mut fx = Vec::new();
                    if !matches!(r.state, RolloutState::Running | RolloutState::Paused { .. }) {
                        return Ok(fx);
                    }
                    for (device, report) in &reports {
                        if report.model != r.spec.model || report.version != r.spec.version {
                            continue;
                        }
                        let state = device_state(report);
                        let Some(entry) = r.devices.get(*device) else {
                            continue;
                        };
                        if stage(&state) < stage(&entry.state) {
                            continue;
                        }
                        applied += 1;
                        fx.extend(r.report(device, state, now));
                    }
                    Ok(fx)
                })
                .await;
            let total = reports.len() as u64;
            match res {
                Ok(_) | Err(RolloutError::NotFound(_)) => {}
                Err(e) => {
                    tracing::warn!(rollout = %id, error = %e,
                        "Could not apply OTA reports; they are applied again when the statuses are redelivered.");
                    applied = 0;
                }
            }
            self.metrics
                .inc("ota_reports_total", &[("outcome", "applied")], applied);
            self.metrics.inc(
                "ota_reports_total",
                &[("outcome", "ignored")],
                total - applied.min(total),
            );
        }
    }

    /// Ticks every unfinished rollout once (soak periods end).
    pub async fn tick_all(&self) -> Result<(), RolloutError> {
        let t = now();
        for stored in rollout_store::list_unfinished(&self.db).await? {
            let mut probe = stored.rollout.clone();
            if probe.tick(t).is_empty() && probe == stored.rollout {
                continue;
            }
            self.step(&stored.id, "tick", |r, now| Ok(r.tick(now)))
                .await?;
        }
        Ok(())
    }

    /// The driver: ticks unfinished rollouts every [`DRIVER_TICK`] until `shutdown`.
    pub async fn drive(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(DRIVER_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.tick_all().await {
                tracing::warn!(error = %e, "Could not tick the unfinished rollouts; trying again.");
            }
        }
    }

    /// The desired state of one device as published (all its models).
    pub async fn desired_state(&self, device: &str) -> Result<DesiredState, RolloutError> {
        let mut cache = Cache::default();
        Ok(self.build_desired(device, &mut cache).await?.0)
    }

    async fn build_desired(
        &self,
        device: &str,
        cache: &mut Cache,
    ) -> Result<(DesiredState, Vec<(String, i64)>), RolloutError> {
        let rows = rollout_store::desired_for(&self.db, device).await?;
        let mut d = DesiredState::new(device);
        let mut revisions = Vec::with_capacity(rows.len());
        for row in rows {
            revisions.push((row.model.clone(), row.revision));
            let entry = match &row.version {
                Some(v) => cache.entry(&self.db, &row.model, v).await?,
                None => None,
            };
            let shadow = match (&row.rollout_id, &row.version) {
                (Some(id), Some(_)) => cache.shadow(&self.db, id).await?,
                _ => None,
            };
            d.models.push(DesiredModel {
                name: row.model.clone(),
                version: row.version.clone(),
                sha256: entry.as_ref().map(|e| e.sha256.clone()),
                size: entry.as_ref().map(|e| u64::try_from(e.size).unwrap_or(0)),
                url: entry
                    .as_ref()
                    .map(|e| registry::download_path(&e.name, &e.version)),
                rollout: row.rollout_id.clone(),
                shadow,
            });
        }
        Ok((d, revisions))
    }

    /// Desired-model rows of a rollout not yet published.
    pub async fn pending_publish(&self, id: &str) -> Result<i64, RolloutError> {
        let mut q = Sql::new(
            "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM desired_models WHERE published_revision < revision AND rollout_id = ",
        );
        q.bind(id);
        Ok(q.query().fetch_one(self.db.pool()).await?.try_get("n")?)
    }

    /// The publisher: keeps every device's retained desired state in step with the outbox
    /// until `shutdown`. Its own MQTT connection (`<client_id>-desired`, clean session) with
    /// the fleet's broker settings and TLS.
    pub async fn publish(self: Arc<Self>, settings: Arc<Settings>, shutdown: CancellationToken) {
        let m = &settings.mqtt;
        let min_backoff = Duration::from_millis(m.reconnect_min_ms);
        let mut backoff = min_backoff;
        'connection: while !shutdown.is_cancelled() {
            let mut opts = MqttOptions::new(format!("{}-desired", m.client_id), &m.host, m.port);
            opts.set_keep_alive(Duration::from_secs(m.keep_alive_s));
            opts.set_clean_session(true);
            if let Some(user) = &m.username {
                opts.set_credentials(user.clone(), m.password.clone().unwrap_or_default());
            }
            if let Err(e) = crate::tls::apply_mqtt(&mut opts, m) {
                tracing::error!(error = %e, "Cannot set up TLS to the broker; desired states are not published.");
                return;
            }
            opts.set_request_channel_capacity(MAX_IN_FLIGHT * 2);
            let (client, mut el) = AsyncClient::new(opts, MAX_IN_FLIGHT * 2);
            let mut p = Publishing::default();
            let mut connected = false;
            let mut dirty = true;
            let mut interval = tokio::time::interval(PUBLISH_INTERVAL);
            loop {
                if connected {
                    while p.sent.len() + p.in_flight.len() < MAX_IN_FLIGHT {
                        let Some(msg) = p.queue.pop_front() else {
                            break;
                        };
                        let topic = format!("ember/v1/{}/desired", msg.device);
                        if let Err(e) =
                            client.try_publish(topic, QoS::AtLeastOnce, true, msg.payload.clone())
                        {
                            tracing::warn!(error = %e, "Could not queue a desired state; reconnecting.");
                            continue 'connection;
                        }
                        p.sent.push_back(msg);
                    }
                    if dirty && p.queue.is_empty() {
                        dirty = false;
                        match self.load_outbox(&p.busy()).await {
                            Ok(msgs) if !msgs.is_empty() => {
                                p.queue.extend(msgs);
                                continue;
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "Could not read the desired-state outbox; trying again.");
                            }
                        }
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break 'connection,
                    _ = self.wake.notified() => dirty = true,
                    _ = interval.tick() => dirty = true,
                    ev = el.poll() => match ev {
                        Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                            if ack.code == ConnectReturnCode::Success {
                                connected = true;
                                dirty = true;
                                backoff = min_backoff;
                                tracing::info!("The desired-state publisher is connected.");
                            } else {
                                tracing::error!(code = ?ack.code, "The broker refused the desired-state publisher.");
                            }
                        }
                        Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                            if let Some(msg) = p.sent.pop_front() {
                                p.in_flight.insert(pkid, msg);
                            }
                        }
                        Ok(Event::Incoming(Packet::PubAck(ack))) => {
                            if let Some(msg) = p.in_flight.remove(&ack.pkid) {
                                self.published(&msg).await;
                                if p.is_idle() {
                                    // Rows skipped because their device was in flight.
                                    dirty = true;
                                }
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64,
                                "The desired-state publisher lost the broker; what was not acknowledged is published again.");
                            tokio::select! {
                                _ = shutdown.cancelled() => break 'connection,
                                _ = tokio::time::sleep(backoff) => {}
                            }
                            backoff = (backoff * 2).min(Duration::from_millis(m.reconnect_max_ms));
                            continue 'connection;
                        }
                    }
                }
            }
        }
        tracing::info!("The desired-state publisher stopped.");
    }

    async fn load_outbox(&self, busy: &HashSet<String>) -> Result<Vec<OutMsg>, RolloutError> {
        let rows = rollout_store::unpublished(&self.db, PUBLISH_BATCH).await?;
        let mut devices: Vec<String> = Vec::new();
        let mut seen = HashSet::new();
        for r in rows {
            if !busy.contains(&r.device_id) && seen.insert(r.device_id.clone()) {
                devices.push(r.device_id);
            }
        }
        let mut cache = Cache::default();
        let mut out = Vec::with_capacity(devices.len());
        for device in devices {
            let (state, revisions) = self.build_desired(&device, &mut cache).await?;
            let payload = ember_proto::message::encode(&state, ember_proto::Encoding::Json)
                .map_err(|e| RolloutError::Invalid(format!("desired state of {device}: {e}")))?;
            out.push(OutMsg {
                device,
                payload,
                revisions,
            });
        }
        Ok(out)
    }

    async fn published(&self, msg: &OutMsg) {
        self.metrics.inc("desired_published_total", &[], 1);
        for (model, revision) in &msg.revisions {
            if let Err(e) =
                rollout_store::mark_published(&self.db, &msg.device, model, *revision).await
            {
                tracing::warn!(device = %msg.device, error = %e,
                    "Could not record a published desired state; it is published again.");
            }
        }
    }
}

fn new_id() -> Result<String, RolloutError> {
    let mut b = [0u8; 5];
    getrandom::fill(&mut b)
        .map_err(|e| RolloutError::Invalid(format!("no randomness for a rollout id: {e}")))?;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!("r-{hex}"))
}

/// One retained message on its way.
struct OutMsg {
    device: String,
    payload: Vec<u8>,
    /// (model, revision) of each desired row it carries.
    revisions: Vec<(String, i64)>,
}

#[derive(Default)]
struct Publishing {
    queue: VecDeque<OutMsg>,
    /// Handed to the client, packet id not known yet (the client sends in order).
    sent: VecDeque<OutMsg>,
    in_flight: HashMap<u16, OutMsg>,
}

impl Publishing {
    fn busy(&self) -> HashSet<String> {
        self.queue
            .iter()
            .chain(self.sent.iter())
            .chain(self.in_flight.values())
            .map(|m| m.device.clone())
            .collect()
    }

    fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.sent.is_empty() && self.in_flight.is_empty()
    }
}

/// Registry entries and shadow policies read during one publisher pass.
#[derive(Default)]
struct Cache {
    entries: HashMap<(String, String), Option<ModelEntry>>,
    shadows: HashMap<String, Option<ShadowPolicy>>,
}

impl Cache {
    async fn entry(
        &mut self,
        db: &Db,
        model: &str,
        version: &str,
    ) -> Result<Option<ModelEntry>, RolloutError> {
        let key = (model.to_string(), version.to_string());
        if let Some(e) = self.entries.get(&key) {
            return Ok(e.clone());
        }
        let e = registry::lookup(db, model, version).await?;
        self.entries.insert(key, e.clone());
        Ok(e)
    }

    async fn shadow(&mut self, db: &Db, id: &str) -> Result<Option<ShadowPolicy>, RolloutError> {
        if let Some(s) = self.shadows.get(id) {
            return Ok(*s);
        }
        let s = rollout_store::load(db, id)
            .await?
            .and_then(|s| s.rollout.spec.shadow);
        self.shadows.insert(id.to_string(), s);
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waves_parse_and_bad_ones_are_named() {
        assert_eq!(parse_wave("canary").unwrap(), WaveSize::Count(1));
        assert_eq!(parse_wave("10%").unwrap(), WaveSize::Percent(10.0));
        assert_eq!(parse_wave("5").unwrap(), WaveSize::Count(5));
        for bad in ["0", "0%", "101%", "x", "NaN%", "-1", ""] {
            assert!(parse_wave(bad).is_err(), "{bad}");
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
        req.waves = Some(vec!["canary".into(), "50%".into()]);
        assert!(req.to_spec().unwrap_err().to_string().contains("100"));
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

    #[test]
    fn ota_states_map_and_stages_only_move_forward() {
        let r = OtaReport {
            model: "m".into(),
            version: "1".into(),
            rollout: None,
            state: OtaState::Failed,
            reason: Some("hash mismatch".into()),
            ts: 0,
            agreement: None,
            latency_ratio: None,
        };
        assert_eq!(
            device_state(&r),
            DeviceState::Failed {
                reason: "hash mismatch".into()
            }
        );
        assert!(stage(&DeviceState::Downloading) < stage(&DeviceState::Active));
    }
}
