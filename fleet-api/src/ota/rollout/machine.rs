//! The rollout engine: moves a set of devices from their current model version to a new one
//! in staged waves, gated by what the devices report.
//!
//! This module is the pure state machine; it does no I/O. Its owner feeds it inputs (device
//! reports, clock ticks, operator commands) and carries out the [`Effect`]s it returns
//! (publish a device's desired model, record an event), and persists the whole [`Rollout`]
//! (it is plain serde data) after every step, in the same transaction as the effects'
//! bookkeeping. Because every decision is a function of the persisted value and the input, a
//! fleet restarted mid-rollout carries on exactly where it was.
//!
//! # Lifecycle
//!
//! ```text
//!            ┌──────────── pause ───────────┐
//!            ▼                              │
//!  new ──▶ Running ──(last wave succeeds)──▶ Completed
//!   │        │  ▲
//!   │        │  └── resume ── Paused{manual | threshold}
//!   │        └─(failures > threshold)──▶ Paused{threshold}
//!   │
//!   └ Running/Paused ── abort ──▶ Aborted      (devices keep what they have)
//!     Running/Paused/Completed ── rollback ──▶ RolledBack (assigned devices get their previous version)
//! ```
//!
//! * **Waves.** Targets are sorted by device id and cut into waves by cumulative size (a count
//!   or a percentage of the targets; the last wave MUST reach 100%). Only the current wave's
//!   devices are ever assigned; wave `k + 1` starts when wave `k` has at least
//!   `ceil(success_threshold × size)` devices `active` AND has soaked for `min_soak_s` since
//!   it started.
//! * **Failure threshold** (per wave, as in hawkBit): when the failed devices of any started
//!   wave exceed `failure_threshold × size` (not counting failures acknowledged by an earlier
//!   resume), the rollout pauses itself and assigns nothing more. A canary wave of one device
//!   with threshold 0 therefore pauses on its first failure, before any other device is touched.
//! * **Device states** come from the agents: assigned → downloading → verified → shadowing →
//!   active, or failed / rolled back (the agent's own crash-loop protection). A report can
//!   only concern a device this rollout assigned; other reports are ignored.
//!
//! **Invariant:** a device is assigned at most once per rollout, and never before every
//! earlier wave has succeeded. **Invariant:** no assignment is emitted while the rollout is
//! not `Running`. **Invariant:** rollback reverts every device the rollout assigned, exactly
//! once, to the version it had before.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How big a wave is: cumulative, counting every earlier wave too.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaveSize {
    /// This many devices in this wave and the ones before it.
    Count(u32),
    /// This percentage (0-100] of the targets in this wave and the ones before it.
    Percent(f64),
}

/// One stage of a rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WaveSpec {
    pub name: String,
    pub size: WaveSize,
    /// Seconds the wave must run before the next one may start.
    pub min_soak_s: u64,
    /// Fraction (0-1] of the wave's devices that must be `active` to go on.
    pub success_threshold: f64,
    /// Fraction [0-1) of the wave's devices that may fail before the rollout pauses.
    pub failure_threshold: f64,
}

/// What to roll out and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutSpec {
    /// Model name (the bundle manifest's `name`).
    pub model: String,
    /// The version to install.
    pub version: String,
    pub waves: Vec<WaveSpec>,
    /// Shadow-evaluation thresholds sent to every device with its assignment (None: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ember_proto::ota::ShadowPolicy>,
}

impl RolloutSpec {
    /// The usual plan: one canary device, then 10%, 50% and everything.
    pub fn canary_then_percentages(model: &str, version: &str, min_soak_s: u64) -> RolloutSpec {
        let wave = |name: &str, size| WaveSpec {
            name: name.into(),
            size,
            min_soak_s,
            success_threshold: 1.0,
            failure_threshold: 0.0,
        };
        RolloutSpec {
            model: model.into(),
            version: version.into(),
            waves: vec![
                wave("canary", WaveSize::Count(1)),
                wave("10%", WaveSize::Percent(10.0)),
                wave("50%", WaveSize::Percent(50.0)),
                wave("all", WaveSize::Percent(100.0)),
            ],
            shadow: None,
        }
    }

    /// Checks the plan, naming the first problem.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.model.is_empty() || self.version.is_empty() {
            return Err(SpecError("model and version must not be empty".into()));
        }
        let Some(last) = self.waves.last() else {
            return Err(SpecError("a rollout needs at least one wave".into()));
        };
        if last.size != WaveSize::Percent(100.0) {
            return Err(SpecError(format!(
                "the last wave ({}) must be percent 100 so every target is covered",
                last.name
            )));
        }
        // Sizes are cumulative and planning clamps each to the one before, so a wave smaller
        // than an earlier one is valid: it adds no device (and still soaks).
        for (i, w) in self.waves.iter().enumerate() {
            let at = |what: &str| SpecError(format!("wave {} ({}): {what}", i + 1, w.name));
            match w.size {
                WaveSize::Count(0) => return Err(at("count must be at least 1")),
                WaveSize::Count(_) => {}
                WaveSize::Percent(p) => {
                    if !(p > 0.0 && p <= 100.0) {
                        return Err(at("percent must be more than 0 and at most 100"));
                    }
                }
            }
            if !(w.success_threshold > 0.0 && w.success_threshold <= 1.0) {
                return Err(at("success_threshold must be in (0, 1]"));
            }
            if !(0.0..1.0).contains(&w.failure_threshold) {
                return Err(at("failure_threshold must be in [0, 1)"));
            }
        }
        Ok(())
    }
}

/// A plan that cannot run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid rollout: {0}")]
pub struct SpecError(pub String);

/// Where one device is in the rollout, as far as the fleet knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum DeviceState {
    /// In a wave that has not started.
    Pending,
    /// Told to install the version; no answer yet.
    Assigned,
    Downloading,
    Verified,
    Shadowing,
    Active,
    Failed {
        reason: String,
    },
    /// The agent went back to its previous model by itself (crash-loop protection).
    RolledBack {
        reason: String,
    },
    /// The rollout was rolled back and the device told to return to its previous version.
    Reverted,
}

impl DeviceState {
    fn is_failure(&self) -> bool {
        matches!(
            self,
            DeviceState::Failed { .. } | DeviceState::RolledBack { .. }
        )
    }
}

/// One target device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceEntry {
    /// Index of its wave.
    pub wave: usize,
    pub state: DeviceState,
    /// The version it ran before (None: no model of this name).
    pub previous_version: Option<String>,
    /// When its state last changed, microseconds since the epoch.
    pub updated_at: u64,
}

/// Why a rollout is paused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum PauseReason {
    Operator,
    FailureThreshold {
        wave: usize,
        failed: usize,
        size: usize,
    },
}

/// The rollout's overall state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RolloutState {
    Running,
    Paused { reason: PauseReason },
    Completed,
    Aborted,
    RolledBack,
}

impl RolloutState {
    pub fn name(&self) -> &'static str {
        match self {
            RolloutState::Running => "running",
            RolloutState::Paused { .. } => "paused",
            RolloutState::Completed => "completed",
            RolloutState::Aborted => "aborted",
            RolloutState::RolledBack => "rolled_back",
        }
    }
}

/// Per-wave bookkeeping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WaveProgress {
    /// Devices in this wave.
    pub size: usize,
    pub started_at: Option<u64>,
    pub succeeded_at: Option<u64>,
    /// Failures an operator has seen and resumed past; they no longer count to the threshold.
    pub acknowledged_failures: usize,
}

/// An operator's command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    Pause,
    Resume,
    Abort,
    Rollback,
}

/// A command that does not apply in the current state.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("cannot {command:?} a rollout that is {state}")]
pub struct CommandError {
    pub command: Command,
    pub state: &'static str,
}

/// What the owner must do after a step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "effect", rename_all = "snake_case")]
pub enum Effect {
    /// Set the device's desired model to the rollout's version.
    Assign { device: String },
    /// Set the device's desired model back to `to` (None: remove this model).
    Revert { device: String, to: Option<String> },
    /// Append to the rollout's event history.
    Event(Event),
}

/// An entry of the rollout's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub at: u64,
    pub kind: String,
    pub detail: String,
}

/// A rollout and everything needed to continue it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub spec: RolloutSpec,
    pub state: RolloutState,
    /// Index of the wave in progress (the last one once completed).
    pub current_wave: usize,
    pub waves: Vec<WaveProgress>,
    pub devices: BTreeMap<String, DeviceEntry>,
    pub created_at: u64,
}

impl Rollout {
    /// Plans the waves over `targets` (device id → current version of the model) and starts
    /// the first one.
    pub fn start(
        spec: RolloutSpec,
        targets: BTreeMap<String, Option<String>>,
        now: u64,
    ) -> Result<(Rollout, Vec<Effect>), SpecError> {
        spec.validate()?;
        if targets.is_empty() {
            return Err(SpecError("the target selection matches no device".into()));
        }
        let n = targets.len();
        // Cumulative end index of each wave, never past n and never decreasing.
        let mut ends = Vec::with_capacity(spec.waves.len());
        let mut prev = 0usize;
        for w in &spec.waves {
            let end = match w.size {
                WaveSize::Count(c) => c as usize,
                WaveSize::Percent(p) => ((p / 100.0) * n as f64).ceil() as usize,
            }
            .clamp(prev, n);
            ends.push(end);
            prev = end;
        }
        let mut devices = BTreeMap::new();
        let mut wave = 0;
        for (i, (device, previous_version)) in targets.into_iter().enumerate() {
            while i >= ends[wave] {
                wave += 1;
            }
            devices.insert(
                device,
                DeviceEntry {
                    wave,
                    state: DeviceState::Pending,
                    previous_version,
                    updated_at: now,
                },
            );
        }
        let mut starts = vec![0usize];
        starts.extend(ends.iter().take(ends.len() - 1));
        let waves = starts
            .iter()
            .zip(&ends)
            .map(|(s, e)| WaveProgress {
                size: e - s,
                started_at: None,
                succeeded_at: None,
                acknowledged_failures: 0,
            })
            .collect();
        let mut r = Rollout {
            spec,
            state: RolloutState::Running,
            current_wave: 0,
            waves,
            devices,
            created_at: now,
        };
        let mut fx = vec![event(
            now,
            "created",
            format!(
                "{} {} to {} devices in {} waves",
                r.spec.model,
                r.spec.version,
                n,
                r.spec.waves.len()
            ),
        )];
        r.start_wave(0, now, &mut fx);
        r.advance(now, &mut fx);
        Ok((r, fx))
    }

    /// A device's report. Reports from devices this rollout has not assigned are ignored.
    pub fn report(&mut self, device: &str, state: DeviceState, now: u64) -> Vec<Effect> {
        let mut fx = Vec::new();
        let Some(entry) = self.devices.get_mut(device) else {
            return fx;
        };
        if matches!(entry.state, DeviceState::Pending | DeviceState::Reverted)
            || matches!(state, DeviceState::Pending | DeviceState::Reverted)
            || entry.state == state
        {
            return fx;
        }
        if state.is_failure() {
            let reason = match &state {
                DeviceState::Failed { reason } | DeviceState::RolledBack { reason } => {
                    reason.clone()
                }
                _ => String::new(),
            };
            fx.push(event(now, "device_failed", format!("{device}: {reason}")));
        }
        entry.state = state;
        entry.updated_at = now;
        self.advance(now, &mut fx);
        fx
    }

    /// Time passes: soak periods may end.
    pub fn tick(&mut self, now: u64) -> Vec<Effect> {
        let mut fx = Vec::new();
        self.advance(now, &mut fx);
        fx
    }

    /// An operator's pause, resume, abort or rollback.
    pub fn command(&mut self, command: Command, now: u64) -> Result<Vec<Effect>, CommandError> {
        let refuse = |r: &Rollout| CommandError {
            command,
            state: r.state.name(),
        };
        let mut fx = Vec::new();
        match (command, &self.state) {
            (Command::Pause, RolloutState::Running) => {
                self.state = RolloutState::Paused {
                    reason: PauseReason::Operator,
                };
                fx.push(event(now, "paused", "by an operator".into()));
            }
            (Command::Resume, RolloutState::Paused { .. }) => {
                // Failures seen so far are acknowledged: only new ones count from here on.
                for w in 0..self.waves.len() {
                    self.waves[w].acknowledged_failures = self.failed_in(w);
                }
                self.state = RolloutState::Running;
                fx.push(event(now, "resumed", String::new()));
                self.advance(now, &mut fx);
            }
            (Command::Abort, RolloutState::Running | RolloutState::Paused { .. }) => {
                self.state = RolloutState::Aborted;
                fx.push(event(
                    now,
                    "aborted",
                    "no further devices will be assigned; updated devices keep the new version"
                        .into(),
                ));
            }
            (
                Command::Rollback,
                RolloutState::Running | RolloutState::Paused { .. } | RolloutState::Completed,
            ) => {
                self.state = RolloutState::RolledBack;
                let mut n = 0;
                for (device, entry) in &mut self.devices {
                    if matches!(entry.state, DeviceState::Pending | DeviceState::Reverted) {
                        continue;
                    }
                    entry.state = DeviceState::Reverted;
                    entry.updated_at = now;
                    fx.push(Effect::Revert {
                        device: device.clone(),
                        to: entry.previous_version.clone(),
                    });
                    n += 1;
                }
                fx.push(event(
                    now,
                    "rolled_back",
                    format!("{n} devices told to return to their previous version"),
                ));
            }
            _ => return Err(refuse(self)),
        }
        Ok(fx)
    }

    /// Counts per device state, for one wave or (None) all of them.
    pub fn counts(&self, wave: Option<usize>) -> BTreeMap<&'static str, usize> {
        let mut out = BTreeMap::new();
        for e in self.devices.values() {
            if wave.is_some_and(|w| e.wave != w) {
                continue;
            }
            let name = match e.state {
                DeviceState::Pending => "pending",
                DeviceState::Assigned => "assigned",
                DeviceState::Downloading => "downloading",
                DeviceState::Verified => "verified",
                DeviceState::Shadowing => "shadowing",
                DeviceState::Active => "active",
                DeviceState::Failed { .. } => "failed",
                DeviceState::RolledBack { .. } => "rolled_back",
                DeviceState::Reverted => "reverted",
            };
            *out.entry(name).or_insert(0) += 1;
        }
        out
    }

    fn failed_in(&self, wave: usize) -> usize {
        self.devices
            .values()
            .filter(|e| e.wave == wave && e.state.is_failure())
            .count()
    }

    fn active_in(&self, wave: usize) -> usize {
        self.devices
            .values()
            .filter(|e| e.wave == wave && e.state == DeviceState::Active)
            .count()
    }

    fn start_wave(&mut self, wave: usize, now: u64, fx: &mut Vec<Effect>) {
        self.current_wave = wave;
        self.waves[wave].started_at = Some(now);
        fx.push(event(
            now,
            "wave_started",
            format!(
                "wave {} ({}) with {} devices",
                wave + 1,
                self.spec.waves[wave].name,
                self.waves[wave].size
            ),
        ));
        for (device, entry) in &mut self.devices {
            if entry.wave == wave && entry.state == DeviceState::Pending {
                entry.state = DeviceState::Assigned;
                entry.updated_at = now;
                fx.push(Effect::Assign {
                    device: device.clone(),
                });
            }
        }
    }

    /// Applies the thresholds and soak times until nothing changes.
    fn advance(&mut self, now: u64, fx: &mut Vec<Effect>) {
        if self.state != RolloutState::Running {
            return;
        }
        // Failure threshold on every wave that has started.
        for w in 0..=self.current_wave {
            let size = self.waves[w].size;
            let failed = self
                .failed_in(w)
                .saturating_sub(self.waves[w].acknowledged_failures);
            if size > 0 && failed as f64 > self.spec.waves[w].failure_threshold * size as f64 {
                self.state = RolloutState::Paused {
                    reason: PauseReason::FailureThreshold {
                        wave: w,
                        failed,
                        size,
                    },
                };
                fx.push(event(
                    now,
                    "paused",
                    format!(
                        "{failed} of {size} devices of wave {} failed (threshold {})",
                        w + 1,
                        self.spec.waves[w].failure_threshold
                    ),
                ));
                return;
            }
        }
        loop {
            let w = self.current_wave;
            let spec = &self.spec.waves[w];
            let progress = &self.waves[w];
            let needed = (spec.success_threshold * progress.size as f64).ceil() as usize;
            let soaked = progress
                .started_at
                .is_some_and(|t| now.saturating_sub(t) >= spec.min_soak_s * 1_000_000);
            if self.active_in(w) < needed || !soaked {
                return;
            }
            self.waves[w].succeeded_at = Some(now);
            fx.push(event(
                now,
                "wave_succeeded",
                format!("wave {} ({})", w + 1, self.spec.waves[w].name),
            ));
            if w + 1 == self.waves.len() {
                self.state = RolloutState::Completed;
                fx.push(event(
                    now,
                    "completed",
                    format!("{} {} rolled out", self.spec.model, self.spec.version),
                ));
                return;
            }
            self.start_wave(w + 1, now, fx);
        }
    }
}

fn event(at: u64, kind: &str, detail: String) -> Effect {
    Effect::Event(Event {
        at,
        kind: kind.into(),
        detail,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: u64 = 1_000_000;

    fn targets(n: usize) -> BTreeMap<String, Option<String>> {
        (0..n)
            .map(|i| (format!("dev-{i:03}"), Some("1.0.0".to_string())))
            .collect()
    }

    fn assigned(fx: &[Effect]) -> Vec<String> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Assign { device } => Some(device.clone()),
                _ => None,
            })
            .collect()
    }

    fn activate(r: &mut Rollout, devices: &[String], now: u64) -> Vec<Effect> {
        let mut fx = Vec::new();
        for d in devices {
            for s in [
                DeviceState::Downloading,
                DeviceState::Verified,
                DeviceState::Shadowing,
                DeviceState::Active,
            ] {
                fx.extend(r.report(d, s, now));
            }
        }
        fx
    }

    #[test]
    fn waves_cut_canary_ten_fifty_all() {
        let spec = RolloutSpec::canary_then_percentages("activity", "2.0.0", 0);
        let (r, fx) = Rollout::start(spec, targets(100), 0).unwrap();
        let sizes: Vec<usize> = r.waves.iter().map(|w| w.size).collect();
        assert_eq!(sizes, vec![1, 9, 40, 50]);
        assert_eq!(assigned(&fx), vec!["dev-000".to_string()]);
    }

    #[test]
    fn a_good_model_goes_canary_to_all_with_soak_times() {
        let spec = RolloutSpec::canary_then_percentages("activity", "2.0.0", 60);
        let (mut r, fx) = Rollout::start(spec, targets(20), 0).unwrap();
        let mut wave = assigned(&fx);
        let mut now = 0;
        let mut all = wave.clone();
        while r.state == RolloutState::Running {
            let fx = activate(&mut r, &wave, now);
            assert!(assigned(&fx).is_empty(), "no new wave before the soak time");
            now += 60 * S;
            let fx = r.tick(now);
            wave = assigned(&fx);
            all.extend(wave.clone());
        }
        assert_eq!(r.state, RolloutState::Completed);
        assert_eq!(all.len(), 20);
        let mut sorted = all.clone();
        sorted.dedup();
        assert_eq!(sorted.len(), 20, "each device assigned once");
        assert_eq!(r.counts(None).get("active"), Some(&20));
    }

    #[test]
    fn a_failing_canary_pauses_before_any_other_device_is_touched() {
        let spec = RolloutSpec::canary_then_percentages("activity", "2.0.0", 0);
        let (mut r, fx) = Rollout::start(spec, targets(10), 0).unwrap();
        let canary = assigned(&fx);
        let fx = r.report(
            &canary[0],
            DeviceState::Failed {
                reason: "golden vector 0 failed".into(),
            },
            5,
        );
        assert!(assigned(&fx).is_empty());
        assert!(matches!(
            r.state,
            RolloutState::Paused {
                reason: PauseReason::FailureThreshold {
                    wave: 0,
                    failed: 1,
                    size: 1
                }
            }
        ));
        assert_eq!(r.counts(None).get("pending"), Some(&9));
        // Ticks change nothing while paused.
        assert!(assigned(&r.tick(1_000 * S)).is_empty());
    }

    #[test]
    fn resume_acknowledges_failures_and_rollback_reverts_everyone_assigned() {
        let mut spec = RolloutSpec::canary_then_percentages("activity", "2.0.0", 0);
        spec.waves[0].size = WaveSize::Count(2);
        spec.waves[0].success_threshold = 0.5;
        let (mut r, fx) = Rollout::start(spec, targets(10), 0).unwrap();
        let first = assigned(&fx);
        assert_eq!(first.len(), 2);
        r.report(
            &first[0],
            DeviceState::RolledBack {
                reason: "crash loop".into(),
            },
            1,
        );
        assert!(matches!(r.state, RolloutState::Paused { .. }));
        assert!(r.command(Command::Pause, 2).is_err());
        let fx = r.command(Command::Resume, 3).unwrap();
        assert!(assigned(&fx).is_empty());
        let fx = activate(&mut r, &first[1..], 4);
        let second = assigned(&fx);
        // 10% of 10 is within the first two devices, so that wave is empty and passes at once;
        // 50% adds three more.
        assert_eq!(second.len(), 3);
        assert_eq!(r.waves[1].size, 0);
        let fx = r.command(Command::Rollback, 5).unwrap();
        let reverted: Vec<_> = fx
            .iter()
            .filter_map(|e| match e {
                Effect::Revert { device, to } => Some((device.clone(), to.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(reverted.len(), 5);
        assert!(
            reverted
                .iter()
                .all(|(_, to)| to.as_deref() == Some("1.0.0"))
        );
        assert_eq!(r.state, RolloutState::RolledBack);
        assert!(r.command(Command::Resume, 6).is_err());
        assert!(r.command(Command::Rollback, 6).is_err());
    }

    #[test]
    fn invalid_plans_are_refused_with_the_reason() {
        let mut spec = RolloutSpec::canary_then_percentages("a", "1", 0);
        spec.waves.pop();
        assert!(
            spec.validate()
                .unwrap_err()
                .0
                .contains("must be percent 100"),
            "{spec:?}"
        );
        // A wave smaller than an earlier one adds no device; the plan stays valid.
        let mut spec = RolloutSpec::canary_then_percentages("a", "1", 0);
        spec.waves[2].size = WaveSize::Percent(5.0);
        assert!(spec.validate().is_ok());
        let mut spec = RolloutSpec::canary_then_percentages("a", "1", 0);
        spec.waves[1].size = WaveSize::Percent(0.0);
        assert!(spec.validate().unwrap_err().0.contains("more than 0"));
        let spec = RolloutSpec::canary_then_percentages("a", "1", 0);
        assert!(
            Rollout::start(spec, BTreeMap::new(), 0)
                .unwrap_err()
                .0
                .contains("matches no device")
        );
    }

    #[test]
    fn the_state_survives_a_round_trip_through_json() {
        let spec = RolloutSpec::canary_then_percentages("activity", "2.0.0", 0);
        let (mut r, fx) = Rollout::start(spec, targets(5), 0).unwrap();
        activate(&mut r, &assigned(&fx), 1);
        let json = serde_json::to_string(&r).unwrap();
        let back: Rollout = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
    }

    #[derive(Debug, Clone)]
    enum Step {
        Report(usize, u8),
        Tick(u64),
        Cmd(u8),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0usize..30, 0u8..7).prop_map(|(d, s)| Step::Report(d, s)),
            (0u64..120).prop_map(Step::Tick),
            (0u8..4).prop_map(Step::Cmd),
        ]
    }

    proptest! {
        /// Whatever happens: devices are assigned at most once, only while running, never
        /// before the earlier waves succeeded; a rollback reverts each assigned device once.
        #[test]
        fn invariants_hold_under_any_sequence(n in 1usize..30, steps in proptest::collection::vec(step(), 0..80)) {
            let spec = RolloutSpec::canary_then_percentages("m", "2", 10);
            let (mut r, fx) = Rollout::start(spec, targets(n), 0).unwrap();
            let mut ever_assigned: Vec<String> = assigned(&fx);
            let mut reverted: Vec<String> = Vec::new();
            let mut now = 0;
            for s in steps {
                let before = r.clone();
                let fx = match s {
                    Step::Report(d, st) => {
                        let device = format!("dev-{:03}", d % n);
                        let state = match st {
                            0 => DeviceState::Downloading,
                            1 => DeviceState::Verified,
                            2 => DeviceState::Shadowing,
                            3 | 4 => DeviceState::Active,
                            5 => DeviceState::Failed { reason: "x".into() },
                            _ => DeviceState::RolledBack { reason: "y".into() },
                        };
                        r.report(&device, state, now)
                    }
                    Step::Tick(dt) => { now += dt * S; r.tick(now) }
                    Step::Cmd(c) => {
                        let c = [Command::Pause, Command::Resume, Command::Abort, Command::Rollback][c as usize];
                        r.command(c, now).unwrap_or_default()
                    }
                };
                let new = assigned(&fx);
                if !new.is_empty() {
                    prop_assert!(!matches!(before.state, RolloutState::Aborted | RolloutState::Completed | RolloutState::RolledBack));
                    prop_assert_eq!(&r.state, &RolloutState::Running);
                }
                for d in &new {
                    prop_assert!(!ever_assigned.contains(d), "{} assigned twice", d);
                    let w = r.devices[d].wave;
                    for earlier in 0..w {
                        prop_assert!(r.waves[earlier].succeeded_at.is_some());
                    }
                }
                ever_assigned.extend(new);
                for e in &fx {
                    if let Effect::Revert { device, .. } = e {
                        prop_assert!(!reverted.contains(device));
                        reverted.push(device.clone());
                    }
                }
            }
            if r.state == RolloutState::RolledBack {
                let mut a = ever_assigned.clone();
                a.sort();
                let mut b = reverted.clone();
                b.sort();
                prop_assert_eq!(a, b);
            }
        }
    }
}
