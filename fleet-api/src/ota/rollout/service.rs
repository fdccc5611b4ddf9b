//! The rollout service: drives [`Rollout`]s in the running fleet.
//!
//! ```text
//!  API create/command ──┐
//!  ingest (status.ota) ─┼─▶ step: load → Rollout::{start,command,report,tick} → store::save
//!  driver (every 1 s) ──┘         │ (state, history and desired_models outbox in one transaction)
//!                                 ▼ Notify
//!                       publisher (super::publisher): outbox → retained desired states
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
//! * Report ingestion is idempotent: a report equal to the device's recorded state, a report
//!   older than it (a lower stage), one for another version, or one for a finished or unknown
//!   rollout changes nothing. Reports are applied after the status is stored and before it is
//!   acknowledged, so a crash in between redelivers them.
//! * The driver SHOULD tick every [`DRIVER_TICK`] so soak times elapse without reports.
//! * Creating a rollout MUST fail, with a specific error, when the version is not registered
//!   or deprecated, when the selection matches no registered device, or when a target device
//!   is already in an unfinished rollout of the same model.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use ember_proto::Status;
use ember_proto::ota::{OtaReport, OtaState};
use sqlx::Row;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::machine::{
    Command, DeviceState, Effect, PauseReason, Rollout, RolloutSpec, RolloutState,
};
use super::store::{self as rollout_store, StoreError, Stored};
use crate::db::{Db, Sql, now_us};
use crate::metrics::Metrics;
use crate::ota::registry::{self, RegistryError};
use crate::server::events::{Events, LiveEvent};

/// How often the driver ticks unfinished rollouts (soak periods end between reports).
pub const DRIVER_TICK: Duration = Duration::from_secs(1);
/// Attempts at a step that keeps losing the optimistic-locking race.
const STEP_ATTEMPTS: usize = 16;
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

/// Checks a version string from a request.
pub fn check_version(v: &str) -> Result<(), RolloutError> {
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

/// A rollout to start, in the domain's terms (the API builds it from its `CreateRollout`).
#[derive(Debug)]
pub struct NewRollout<'a> {
    pub model: &'a str,
    pub version: &'a str,
    /// The checked plan, or why the request does not make one. [`Service::create`] reports
    /// it only after the version checks, so an unknown or deprecated version is named first.
    pub spec: Result<RolloutSpec, RolloutError>,
    pub targets: Selection<'a>,
}

/// Which devices a rollout targets: exactly one of the three MUST be given (checked by
/// [`Service::create`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Selection<'a> {
    /// Every registered device (`Some(true)`).
    pub all: Option<bool>,
    /// Devices carrying every one of these tags (`key=value`, or `key` for any value).
    pub tags: Option<&'a [String]>,
    /// These devices (each must be registered).
    pub devices: Option<&'a [String]>,
}

/// The rollout service, shared by the API, ingestion, the driver and the publisher.
pub struct Service {
    pub(super) db: Db,
    events: Arc<Events>,
    pub(super) metrics: Arc<Metrics>,
    /// Wakes the publisher after a step wrote desired rows.
    pub(super) wake: Notify,
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

    /// Wakes the desired-state publisher (another replica wrote desired rows).
    pub fn wake_publisher(&self) {
        self.wake.notify_one();
    }

    /// Starts a rollout; returns it as stored.
    pub async fn create(&self, req: NewRollout<'_>) -> Result<Stored, RolloutError> {
        // The version must exist before anything else about the plan matters.
        ember_proto::check_name(req.model).map_err(|why| {
            RolloutError::Invalid(format!("model {:?} is not valid: {why}", req.model))
        })?;
        check_version(req.version)?;
        let entry = registry::lookup(&self.db, req.model, req.version)
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
        let spec = req.spec?;
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
        targets: &Selection<'_>,
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
        } else if let Some(tags) = targets.tags {
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
            let devices = targets.devices.unwrap_or_default();
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
            // Well-formed, but nothing to roll out to: like an unknown device, not found.
            return Err(RolloutError::NotFound(
                "the target selection matches no registered device".into(),
            ));
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
            // The publisher runs on the leader, which may be another replica.
            self.wake.notify_one();
            self.events.desired_changed();
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

    /// Ticks every unfinished rollout once (soak periods end), and sets the rollout gauges
    /// from the states it loaded (one tick stale at most).
    pub async fn tick_all(&self) -> Result<(), RolloutError> {
        let t = now();
        let unfinished = rollout_store::list_unfinished(&self.db).await?;
        self.set_gauges(unfinished.iter().map(|s| &s.rollout.state));
        for stored in unfinished {
            let mut probe = stored.rollout.clone();
            if probe.tick(t).is_empty() && probe == stored.rollout {
                continue;
            }
            self.step(&stored.id, "tick", |r, now| Ok(r.tick(now)))
                .await?;
        }
        Ok(())
    }

    /// `rollouts_running` and `rollouts_paused{by}` (every `by` set, 0 included, so an alert
    /// on the failure threshold has a series to watch from the start).
    fn set_gauges<'a>(&self, states: impl Iterator<Item = &'a RolloutState>) {
        let (mut running, mut by_operator, mut by_failures) = (0u32, 0u32, 0u32);
        for state in states {
            match state {
                RolloutState::Running => running += 1,
                RolloutState::Paused {
                    reason: PauseReason::Operator,
                } => by_operator += 1,
                RolloutState::Paused {
                    reason: PauseReason::FailureThreshold { .. },
                } => by_failures += 1,
                RolloutState::Completed | RolloutState::Aborted | RolloutState::RolledBack => {}
            }
        }
        self.metrics.set("rollouts_running", &[], running.into());
        self.metrics
            .set("rollouts_paused", &[("by", "operator")], by_operator.into());
        self.metrics.set(
            "rollouts_paused",
            &[("by", "failure_threshold")],
            by_failures.into(),
        );
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
}

fn new_id() -> Result<String, RolloutError> {
    let mut b = [0u8; 5];
    getrandom::fill(&mut b)
        .map_err(|e| RolloutError::Invalid(format!("no randomness for a rollout id: {e}")))?;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!("r-{hex}"))
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[tokio::test]
    async fn the_rollout_gauges_count_running_and_paused_by_cause() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&crate::config::DatabaseSettings {
            url: format!("sqlite://{}", dir.path().join("t.db").display()),
            backend: crate::config::Backend::Sqlite,
            max_connections: 2,
            token_source: None,
        })
        .await
        .unwrap();
        let metrics = Arc::new(Metrics::new());
        let service = Service::new(db, Arc::new(Events::new()), metrics.clone());
        // No rollout yet: the series exist, at 0.
        service.tick_all().await.unwrap();
        let text = metrics.render();
        assert!(
            text.contains("ember_fleet_rollouts_paused{by=\"failure_threshold\"} 0\n"),
            "{text}"
        );
        assert!(text.contains("ember_fleet_rollouts_running 0\n"), "{text}");

        let threshold = RolloutState::Paused {
            reason: PauseReason::FailureThreshold {
                wave: 0,
                failed: 1,
                size: 1,
            },
        };
        let operator = RolloutState::Paused {
            reason: PauseReason::Operator,
        };
        let states = [
            RolloutState::Running,
            threshold.clone(),
            threshold,
            operator,
            RolloutState::Completed,
        ];
        service.set_gauges(states.iter());
        assert_eq!(metrics.value("rollouts_running", &[]), 1.0);
        assert_eq!(metrics.value("rollouts_paused", &[("by", "operator")]), 1.0);
        assert_eq!(
            metrics.value("rollouts_paused", &[("by", "failure_threshold")]),
            2.0
        );
    }
}
