//! Over-the-air model updates: the agent's side of `docs/ota.md`.
//!
//! ```text
//!  uplink ──desired (retained, QoS1)──▶ [mailbox: latest wins] ──▶ OTA thread
//!     ▲                                                              │ download ─ verify ─ slot
//!     └──── status.ota[] republished on every change ◀── reports ◀──┤ shadow ─ swap ─ persist
//!                                                                    ▼
//!                                              InferenceHandle::{shadow, swap} (between batches)
//! ```
//!
//! # On-disk layout
//!
//! ```text
//! <data_dir>/models/staging/<name>-<version>.part   a download in progress (Range-resumed)
//! <data_dir>/models/staging/<name>-<version>        a complete download, sha256 checked
//! <data_dir>/models/<name>/slot-a.bundle            A/B slots: verified bundles
//! <data_dir>/models/<name>/slot-b.bundle
//! <data_dir>/models/<name>/state.json               active/previous slot, slot contents,
//!                                                   switch time, starts since the switch,
//!                                                   the refused version (slots::ModelState)
//! ```
//!
//! # Lifecycle
//!
//! At start ([`startup`], before any model is loaded) each configured model's `state.json` is
//! read. If a slot is active and was switched to less than `ota.crash_loop_window_s` ago, the
//! start is counted; the `ota.crash_loop_restarts`-th such start rolls back to the previous
//! slot (or the configured bundle) and records the version as refused (`rolled_back`). The
//! active slot is then verified again (signature, weights, golden vectors) and served instead
//! of the configured bundle; one that no longer verifies is dropped for the configured bundle.
//!
//! Then one OS thread ([`spawn`]) follows the desired state. Per model named there:
//! the version serving → `active`; a version this device holds (the configured bundle, or
//! either slot) → switch without download; otherwise `downloading` (into the staging
//! directory, resumed with `Range` after a crash, capped by the desired size and
//! `ota.max_bundle_bytes`, sha256 checked) → `verified` (signature with
//! `inference.trusted_keys`, weights hash, name, version, input spec, golden vectors) → moved
//! into the inactive slot → `shadowing` (when the desired state has a shadow policy: K live
//! windows through both models) → swap → `active`.
//!
//! # Guarantees
//!
//! * The agent MUST NOT serve a bundle whose file sha256, signature, weights hash or golden
//!   vectors did not check out on this device; a refused update MUST leave the serving model
//!   untouched.
//! * A switch happens between two batches (`InferenceHandle::swap`): no window is dropped,
//!   duplicated or reordered, and the results keep gap-free seqs on `{source}.{model}`.
//! * `state.json` and the slot files are replaced with fsync + rename: a crash (kill -9,
//!   power loss) leaves the previous or the new state, and the agent starts on a verified
//!   bundle either way.
//! * A refused or rolled-back `(version, sha256)` MUST NOT be tried again until the desired
//!   state names something else for that model (this survives restarts). Network errors and
//!   HTTP 5xx are retried with exponential backoff; HTTP 4xx, size, digest, signature, golden
//!   and shadow failures are final.
//! * The device token is sent only to `ota.fleet_url`'s origin, never logged.
//! * Every report change is handed to the uplink at once, which republishes the retained
//!   status (the fleet drives the rollout from it).
//!
//! # Fault injection (tests only)
//!
//! Built with the `fault-injection` cargo feature only (the test build; never a release),
//! `EMBER_AGENT_FAULT_CRASH_AFTER_SWITCH=<model>@<version>` (`config::FAULT_CRASH_AFTER_SWITCH_ENV`)
//! makes the agent abort about 1.5 s after that version starts serving, both right after a
//! switch and at a start that serves it ([`FaultHook`], `fault.rs`). It exists for the
//! crash-loop tests; it cannot be set from the config file or over MQTT.

pub mod download;
mod fault;
pub mod slots;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use ember_models::manifest::OutputSpec;
use ember_models::{Bundle, Device, TrustedKeys};
use ember_proto::{DesiredModel, DesiredState, OtaReport, OtaState};

use crate::config::Settings;
use crate::inference::{self, InferenceHandle};
use crate::metrics::Metrics;
use crate::source::now_us;
use download::{DownloadError, Downloader, Request, TlsFiles};
pub use fault::FaultHook;
use slots::{ModelDir, ModelState, Refusal, Slot, SlotInfo, StartCheck};

const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// How often a long wait (shadow evaluation) looks for a newer desired state.
const POLL: Duration = Duration::from_millis(200);

/// What the uplink and the OTA thread share: the latest desired state (a one-slot mailbox:
/// a newer message replaces one not yet taken) and the reports for `status.ota`.
pub struct OtaShared {
    mail: Mutex<Mailbox>,
    mail_cond: Condvar,
    reports: Mutex<BTreeMap<String, OtaReport>>,
    changed: tokio::sync::Notify,
}

#[derive(Default)]
struct Mailbox {
    desired: Option<DesiredState>,
    closed: bool,
}

enum Take {
    New(DesiredState),
    Timeout,
    Closed,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl OtaShared {
    pub fn new(initial: Vec<OtaReport>) -> Arc<OtaShared> {
        Arc::new(OtaShared {
            mail: Mutex::new(Mailbox::default()),
            mail_cond: Condvar::new(),
            reports: Mutex::new(initial.into_iter().map(|r| (r.model.clone(), r)).collect()),
            changed: tokio::sync::Notify::new(),
        })
    }

    /// Hands a desired state to the OTA thread (replacing one it has not taken yet).
    pub fn offer(&self, d: DesiredState) {
        lock(&self.mail).desired = Some(d);
        self.mail_cond.notify_all();
    }

    /// Stops the OTA thread at its next wait.
    pub fn close(&self) {
        lock(&self.mail).closed = true;
        self.mail_cond.notify_all();
    }

    /// The latest report per model, for `status.ota`.
    pub fn reports(&self) -> Vec<OtaReport> {
        lock(&self.reports).values().cloned().collect()
    }

    /// Fires when a report changed (the uplink republishes the status).
    pub fn changed(&self) -> &tokio::sync::Notify {
        &self.changed
    }

    fn set_report(&self, r: OtaReport) {
        let mut reports = lock(&self.reports);
        let same = reports.get(&r.model).is_some_and(|old| {
            (&old.version, old.state, &old.reason, &old.rollout)
                == (&r.version, r.state, &r.reason, &r.rollout)
        });
        if !same {
            reports.insert(r.model.clone(), r);
            drop(reports);
            self.changed.notify_one();
        }
    }

    fn keep_reports(&self, names: &[&str]) {
        let mut reports = lock(&self.reports);
        let before = reports.len();
        reports.retain(|k, _| names.contains(&k.as_str()));
        if reports.len() != before {
            drop(reports);
            self.changed.notify_one();
        }
    }

    fn take(&self, timeout: Duration) -> Take {
        let guard = lock(&self.mail);
        let (mut m, _) = self
            .mail_cond
            .wait_timeout_while(guard, timeout, |m| m.desired.is_none() && !m.closed)
            .unwrap_or_else(|p| p.into_inner());
        if m.closed {
            Take::Closed
        } else {
            m.desired.take().map_or(Take::Timeout, Take::New)
        }
    }

    /// Waits up to `timeout`; true if a newer desired state arrived (or OTA is stopping).
    fn interrupted_within(&self, timeout: Duration) -> bool {
        let guard = lock(&self.mail);
        let (m, _) = self
            .mail_cond
            .wait_timeout_while(guard, timeout, |m| m.desired.is_none() && !m.closed)
            .unwrap_or_else(|p| p.into_inner());
        m.desired.is_some() || m.closed
    }
}

/// One configured model under OTA management.
struct Managed {
    name: String,
    /// The inference stream `{source}.{name}`.
    stream: String,
    factory: PathBuf,
    factory_version: String,
    /// The configured bundle's input (channels, window, hop) and output kind: every version
    /// must keep them.
    input: (usize, usize, usize),
    anomaly: bool,
    dir: ModelDir,
    state: ModelState,
}

/// What [`startup`] decided, for [`spawn`].
pub struct Startup {
    managed: Vec<Managed>,
    reports: Vec<OtaReport>,
}

impl Startup {
    pub fn reports(&self) -> Vec<OtaReport> {
        self.reports.clone()
    }

    /// `(model, version)` of what each managed model will serve at this start.
    pub fn serving(&self) -> Vec<(String, String)> {
        self.managed
            .iter()
            .map(|m| {
                let v = m
                    .state
                    .active_info()
                    .map_or(m.factory_version.clone(), |i| i.version.clone());
                (m.name.clone(), v)
            })
            .collect()
    }
}

/// Applies the persisted slot state before the models load (see the module docs): counts
/// this start for crash-loop protection, rolls back when the limit is reached, and points
/// each model's bundle at its verified active slot.
pub fn startup(settings: &mut Settings, metrics: &Metrics) -> Startup {
    let mut out = Startup {
        managed: Vec::new(),
        reports: Vec::new(),
    };
    // A model whose configured bundle cannot be read is left to `load_models` to refuse.
    let trusted = inference::trusted_keys(&settings.inference).ok();
    let device = inference::device(settings.inference.backend).ok();
    let now = now_us();
    for i in 0..settings.models.len() {
        let factory = settings.models[i].bundle.clone();
        let Ok(bundle) = Bundle::read_file(&factory) else {
            continue;
        };
        let manifest = bundle.manifest();
        let name = manifest.name.clone();
        let dir = ModelDir::new(&settings.data_dir, &name);
        let mut state = dir.load();
        let before = state.clone();
        match slots::check_start(
            &mut state,
            &name,
            now,
            settings.ota.crash_loop_restarts,
            settings.ota.crash_loop_window_s,
        ) {
            StartCheck::Settled => {}
            StartCheck::Counted(n) => tracing::warn!(
                model = %name, starts = n, limit = settings.ota.crash_loop_restarts,
                "Started again soon after an OTA switch; counting towards crash-loop rollback."
            ),
            StartCheck::RolledBack { version, reason } => {
                metrics.ota_rollbacks.fetch_add(1, Relaxed);
                tracing::error!(model = %name, %version, %reason,
                    "Crash-loop protection: rolled back to the previous model.");
            }
        }
        // Without usable keys or device `load_models` refuses the start anyway: leave the
        // state as it is for the next start.
        if let (Some(slot), Some(_), Some(_)) = (state.active, &trusted, &device) {
            let path = dir.slot_path(slot);
            let expected = state.active_info().map(|i| i.version.clone());
            let checked = match (&trusted, &device) {
                (Some(t), Some(d)) => inference::prepare_bundle(&path, t, d)
                    .map_err(|e| e.to_string())
                    .and_then(|(b, _)| {
                        let m = b.manifest();
                        if Some(&m.version) != expected.as_ref() || m.name != name {
                            Err(format!(
                                "it holds {} {}, the slot state says {name} {}",
                                m.name,
                                m.version,
                                expected.clone().unwrap_or_default()
                            ))
                        } else {
                            Ok(())
                        }
                    }),
                _ => Err("the trusted keys or the inference device are not usable".into()),
            };
            match checked {
                Ok(()) => settings.models[i].bundle = path,
                Err(why) => {
                    tracing::error!(model = %name, slot = %path.display(), error = %why,
                        "The active OTA slot no longer verifies; serving the configured bundle.");
                    state.active = None;
                    state.previous = None;
                    state.switched_at_us = None;
                    state.starts_since_switch = 0;
                }
            }
        }
        if let Some(r) = &state.refused
            && r.state == OtaState::RolledBack
        {
            out.reports.push(report_of(&name, r));
        }
        if state != before
            && let Err(e) = dir.save(&state)
        {
            tracing::error!(model = %name, error = %e, "Cannot persist the OTA slot state.");
        }
        let source = settings.models[i].source.clone();
        let input = (
            manifest.input.channels,
            manifest.input.window,
            manifest.input.hop,
        );
        out.managed.push(Managed {
            stream: format!("{source}.{name}"),
            name,
            factory,
            factory_version: manifest.version.clone(),
            input,
            anomaly: matches!(manifest.output, OutputSpec::AnomalyScore { .. }),
            dir,
            state,
        });
    }
    out
}

fn report_of(name: &str, r: &Refusal) -> OtaReport {
    OtaReport {
        model: name.to_string(),
        version: r.version.clone(),
        rollout: r.rollout.clone(),
        state: r.state,
        reason: Some(r.reason.clone()),
        ts: r.ts,
        agreement: r.agreement,
        latency_ratio: r.latency_ratio,
    }
}

/// Starts the OTA thread. It stops when [`OtaShared::close`] is called.
pub fn spawn(
    settings: Arc<Settings>,
    startup: Startup,
    handle: Option<InferenceHandle>,
    shared: Arc<OtaShared>,
    metrics: Arc<Metrics>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let handle = handle.map(|mut h| {
        // This clone only swaps; it must not keep the inference thread alive.
        h.close_taps();
        h
    });
    let downloader = Downloader::new(&TlsFiles {
        ca: settings.ota.ca_file.clone(),
        client_cert: None,
    })
    .map_err(|e| e.to_string());
    if let Err(e) = &downloader {
        tracing::error!(error = %e, "OTA downloads are not possible until this is fixed.");
    }
    let token = settings
        .ota
        .token_file
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .map(|t| t.trim().to_string());
    let trusted = inference::trusted_keys(&settings.inference).map_err(|e| e.to_string());
    let device = inference::device(settings.inference.backend).map_err(|e| e.to_string());
    let ota = Ota {
        settings,
        shared,
        metrics,
        handle,
        managed: startup.managed,
        downloader,
        token,
        trusted,
        device,
        fault: FaultHook::from_env(),
    };
    std::thread::Builder::new()
        .name("ota".into())
        .spawn(move || ota.run())
}

struct Ota {
    settings: Arc<Settings>,
    shared: Arc<OtaShared>,
    metrics: Arc<Metrics>,
    handle: Option<InferenceHandle>,
    managed: Vec<Managed>,
    downloader: Result<Downloader, String>,
    /// The device's API token: never logged.
    token: Option<String>,
    trusted: Result<TrustedKeys, String>,
    device: Result<Device, String>,
    fault: FaultHook,
}

/// Whether a step finished or a newer desired state (or shutdown) cut it short.
enum Flow {
    Done,
    Interrupted,
}

/// How an install attempt failed: final (reported and remembered) or cut short.
enum Stop {
    Failed {
        reason: String,
        agreement: Option<f64>,
        latency_ratio: Option<f64>,
    },
    Interrupted,
}

impl From<String> for Stop {
    fn from(reason: String) -> Stop {
        Stop::Failed {
            reason,
            agreement: None,
            latency_ratio: None,
        }
    }
}

/// What the desired entry asks for, resolved.
struct Target<'a> {
    idx: usize,
    want: &'a DesiredModel,
    version: String,
}

impl Ota {
    fn run(mut self) {
        tracing::info!(
            models = self.managed.len(),
            fleet_url = self.settings.ota.fleet_url.as_deref().unwrap_or("(none)"),
            "OTA client running; waiting for the desired state."
        );
        loop {
            match self.shared.take(self.settle_in()) {
                Take::Closed => return,
                Take::Timeout => self.settle(),
                Take::New(d) => {
                    self.settle();
                    self.apply(&d);
                }
            }
        }
    }

    /// Time until the next switch leaves its crash-loop window.
    fn settle_in(&self) -> Duration {
        let window = self.settings.ota.crash_loop_window_s * 1_000_000;
        let now = now_us();
        self.managed
            .iter()
            .filter_map(|m| m.state.switched_at_us)
            .map(|at| Duration::from_micros((at + window).saturating_sub(now)))
            .min()
            .unwrap_or(Duration::from_secs(3600))
            .max(Duration::from_millis(10))
    }

    /// A clean run past the crash-loop window after a switch resets the start counter.
    fn settle(&mut self) {
        let window = self.settings.ota.crash_loop_window_s * 1_000_000;
        let now = now_us();
        for m in &mut self.managed {
            if m.state.switched_at_us.is_some_and(|at| now >= at + window) {
                m.state.switched_at_us = None;
                m.state.starts_since_switch = 0;
                save(m);
                tracing::info!(model = %m.name, "Ran cleanly past the crash-loop window since the switch.");
            }
        }
    }

    fn apply(&mut self, d: &DesiredState) {
        if d.device != self.settings.device_id {
            tracing::warn!(device = %d.device, "Ignoring a desired state addressed to another device.");
            return;
        }
        let names: Vec<&str> = d.models.iter().map(|m| m.name.as_str()).collect();
        self.shared.keep_reports(&names);
        for want in &d.models {
            if let Flow::Interrupted = self.one(want) {
                return;
            }
        }
    }

    fn report(
        &self,
        model: &str,
        version: &str,
        rollout: Option<&String>,
        state: OtaState,
        reason: Option<String>,
    ) {
        self.report_full(model, version, rollout, state, reason, None, None);
    }

    #[allow(clippy::too_many_arguments)]
    fn report_full(
        &self,
        model: &str,
        version: &str,
        rollout: Option<&String>,
        state: OtaState,
        reason: Option<String>,
        agreement: Option<f64>,
        latency_ratio: Option<f64>,
    ) {
        tracing::info!(%model, %version, state = state.as_str(), reason = reason.as_deref().unwrap_or(""), "OTA state changed.");
        self.shared.set_report(OtaReport {
            model: model.to_string(),
            version: version.to_string(),
            rollout: rollout.cloned(),
            state,
            reason,
            ts: now_us(),
            agreement,
            latency_ratio,
        });
    }

    fn serving_version(&self, idx: usize) -> String {
        let m = &self.managed[idx];
        self.handle
            .as_ref()
            .and_then(|h| h.active().into_iter().find(|(s, _, _)| *s == m.stream))
            .map(|(_, _, v)| v)
            .unwrap_or_else(|| {
                m.state
                    .active_info()
                    .map_or(m.factory_version.clone(), |i| i.version.clone())
            })
    }

    /// Brings one model to its desired version.
    fn one(&mut self, want: &DesiredModel) -> Flow {
        let Some(idx) = self.managed.iter().position(|m| m.name == want.name) else {
            let known: Vec<&str> = self.managed.iter().map(|m| m.name.as_str()).collect();
            let reason = format!(
                "model {:?} is not configured on this device (its [[model]] bundles: {})",
                want.name,
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            );
            self.metrics.ota_failures.fetch_add(1, Relaxed);
            let v = want.version.clone().unwrap_or_default();
            self.report(
                &want.name,
                &v,
                want.rollout.as_ref(),
                OtaState::Failed,
                Some(reason),
            );
            return Flow::Done;
        };
        let version = want
            .version
            .clone()
            .unwrap_or_else(|| self.managed[idx].factory_version.clone());
        let sha = want.sha256.as_deref();
        let m = &mut self.managed[idx];
        if let Some(r) = &m.state.refused {
            let same = r.version == version
                && (sha.is_none() || r.sha256.is_none() || r.sha256.as_deref() == sha);
            if same {
                let rep = report_of(&m.name, r);
                self.shared.set_report(rep);
                return Flow::Done;
            }
            // The desired state names something else: the refusal is over.
            m.state.refused = None;
            save(m);
        }
        if self.serving_version(idx) == version {
            let name = self.managed[idx].name.clone();
            self.report(
                &name,
                &version,
                want.rollout.as_ref(),
                OtaState::Active,
                None,
            );
            return Flow::Done;
        }
        let t = Target { idx, want, version };
        match self.install(&t) {
            Ok(()) => Flow::Done,
            Err(Stop::Interrupted) => Flow::Interrupted,
            Err(Stop::Failed {
                reason,
                agreement,
                latency_ratio,
            }) => {
                self.fail(&t, reason, agreement, latency_ratio);
                Flow::Done
            }
        }
    }

    fn fail(
        &mut self,
        t: &Target<'_>,
        reason: String,
        agreement: Option<f64>,
        latency_ratio: Option<f64>,
    ) {
        self.metrics.ota_failures.fetch_add(1, Relaxed);
        let m = &mut self.managed[t.idx];
        tracing::warn!(model = %m.name, version = %t.version, %reason,
            "OTA update refused; the current model keeps serving.");
        let r = Refusal {
            version: t.version.clone(),
            sha256: t.want.sha256.clone(),
            state: OtaState::Failed,
            reason,
            rollout: t.want.rollout.clone(),
            ts: now_us(),
            agreement,
            latency_ratio,
        };
        let rep = report_of(&m.name, &r);
        m.state.refused = Some(r);
        save(m);
        self.shared.set_report(rep);
    }

    fn install(&mut self, t: &Target<'_>) -> Result<(), Stop> {
        let m = &self.managed[t.idx];
        let sha = t.want.sha256.as_deref();
        // Held locally: the configured bundle, or a slot.
        if t.version == m.factory_version {
            return self.switch(t, None, None);
        }
        if let Some(slot) = m.state.holding(&t.version, sha) {
            let path = m.dir.slot_path(slot);
            self.verify(t, &path)?;
            let shadow = self.shadow(t, &path)?;
            return self.switch(t, Some(slot), shadow);
        }
        let staged = self.download(t)?;
        if let Err(reason) = self.verify(t, &staged) {
            let _ = std::fs::remove_file(&staged);
            return Err(reason.into());
        }
        let file_sha = slots::sha256_file(&staged).map_err(|e| e.to_string())?;
        let m = &mut self.managed[t.idx];
        let slot = m.state.inactive();
        // Forget the slot's old content before replacing it, so the state never describes a
        // file that is not there.
        m.state.set_slot(slot, None);
        save(m);
        let path = m.dir.install(&staged, slot).map_err(|e| {
            format!(
                "cannot move the bundle into {}: {e}",
                m.dir.slot_path(slot).display()
            )
        })?;
        m.state.set_slot(
            slot,
            Some(SlotInfo {
                version: t.version.clone(),
                sha256: file_sha,
                rollout: t.want.rollout.clone(),
            }),
        );
        save(m);
        let name = m.name.clone();
        self.report(
            &name,
            &t.version,
            t.want.rollout.as_ref(),
            OtaState::Verified,
            None,
        );
        let shadow = self.shadow(t, &path)?;
        self.switch(t, Some(slot), shadow)
    }

    /// Downloads the desired bundle into the staging directory, retrying network errors.
    fn download(&mut self, t: &Target<'_>) -> Result<PathBuf, Stop> {
        let name = self.managed[t.idx].name.clone();
        let want = t.want;
        let (Some(url), Some(sha), Some(size)) = (&want.url, &want.sha256, want.size) else {
            return Err(format!(
                "version {} is not on this device and the desired state gives no url, sha256 and size to download it",
                t.version
            )
            .into());
        };
        let max = self.settings.ota.max_bundle_bytes;
        if size > max {
            return Err(format!(
                "the bundle is {size} bytes, more than ota.max_bundle_bytes ({max})"
            )
            .into());
        }
        let (full, bearer) = self.resolve_url(url)?;
        let downloader = self.downloader.as_ref().map_err(|e| e.clone())?;
        let staging = self.settings.data_dir.join("models").join("staging");
        std::fs::create_dir_all(&staging)
            .map_err(|e| format!("cannot create {}: {e}", staging.display()))?;
        let dest = staging.join(format!("{name}-{}", t.version));
        self.clean_staging(&staging, &name, &dest);
        self.report(
            &name,
            &t.version,
            want.rollout.as_ref(),
            OtaState::Downloading,
            None,
        );
        let mut delay = RETRY_MIN;
        loop {
            let req = Request {
                url: &full,
                dest: &dest,
                max_bytes: size,
                sha256: sha,
                bearer: if bearer { self.token.as_deref() } else { None },
            };
            match downloader.fetch(&req) {
                Ok(f) => {
                    self.metrics.ota_downloads.fetch_add(1, Relaxed);
                    self.metrics
                        .ota_download_bytes
                        .fetch_add(f.bytes.saturating_sub(f.resumed_from), Relaxed);
                    tracing::info!(model = %name, version = %t.version, bytes = f.bytes,
                        resumed_from = f.resumed_from, "Model bundle downloaded.");
                    return Ok(f.path);
                }
                Err(e) if retryable(&e) => {
                    let wait = Duration::from_millis(fastrand::u64(
                        delay.as_millis() as u64 / 2..=delay.as_millis() as u64,
                    ));
                    tracing::warn!(model = %name, version = %t.version, error = %e,
                        retry_in_ms = wait.as_millis() as u64, "Model download failed; retrying.");
                    self.report(
                        &name,
                        &t.version,
                        want.rollout.as_ref(),
                        OtaState::Downloading,
                        Some(format!("retrying in {} s: {e}", wait.as_secs().max(1))),
                    );
                    if self.shared.interrupted_within(wait) {
                        return Err(Stop::Interrupted);
                    }
                    delay = (delay * 2).min(RETRY_MAX);
                }
                Err(e) => return Err(e.to_string().into()),
            }
        }
    }

    /// Removes this model's staged files of other versions (a download the desired state
    /// moved away from), so staging holds at most one download per model.
    fn clean_staging(&self, staging: &Path, name: &str, dest: &Path) {
        let keep = [dest.to_path_buf(), download::part_path(dest)];
        let prefix = format!("{name}-");
        // Another model whose name extends this one (`activity-v2`) owns its own files.
        let longer: Vec<String> = self
            .managed
            .iter()
            .filter(|m| m.name != name && m.name.starts_with(&prefix))
            .map(|m| format!("{}-", m.name))
            .collect();
        let Ok(entries) = std::fs::read_dir(staging) else {
            return;
        };
        for e in entries.flatten() {
            let file = e.file_name().to_string_lossy().to_string();
            if file.starts_with(&prefix)
                && !longer.iter().any(|l| file.starts_with(l))
                && !keep.contains(&e.path())
            {
                tracing::info!(file = %e.path().display(), "Removing a stale staged download.");
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// The download URL and whether the device token may go with it (fleet origin only).
    fn resolve_url(&self, url: &str) -> Result<(String, bool), String> {
        let fleet = self.settings.ota.fleet_url.as_deref();
        if url.starts_with('/') {
            let base = fleet.ok_or_else(|| {
                format!("the desired state gives the relative url {url:?} but ota.fleet_url is not set on this device")
            })?;
            return Ok((format!("{base}{url}"), true));
        }
        let (scheme, host) = crate::config::url_origin(url)
            .ok_or_else(|| format!("{url:?} is not an http(s) URL"))?;
        if scheme == "http" && !self.settings.ota.insecure && !crate::tls_files::is_loopback(&host)
        {
            return Err(format!(
                "refusing the plain-HTTP download URL {url:?} (set ota.insecure = true for development)"
            ));
        }
        let same_origin = fleet.is_some_and(|f| url.starts_with(&format!("{f}/")));
        Ok((url.to_string(), same_origin))
    }

    /// Checks a bundle file against what this model must be (see the module docs).
    fn verify(&self, t: &Target<'_>, path: &Path) -> Result<(), String> {
        let m = &self.managed[t.idx];
        let trusted = self.trusted.as_ref().map_err(|e| e.clone())?;
        let device = self.device.as_ref().map_err(|e| e.clone())?;
        let (b, model) =
            inference::prepare_bundle(path, trusted, device).map_err(|e| e.to_string())?;
        let manifest = b.manifest();
        if manifest.name != m.name {
            return Err(format!(
                "the bundle is model {:?}, not {:?}",
                manifest.name, m.name
            ));
        }
        if manifest.version != t.version {
            return Err(format!(
                "the bundle is version {}, the desired state asks for {}",
                manifest.version, t.version
            ));
        }
        let i = model.input();
        if (i.channels, i.window, i.hop) != m.input {
            return Err(format!(
                "incompatible spec: the bundle takes {} channels, window {}, hop {}; the running model takes {} channels, window {}, hop {}",
                i.channels, i.window, i.hop, m.input.0, m.input.1, m.input.2
            ));
        }
        let anomaly = matches!(model.output_spec(), OutputSpec::AnomalyScore { .. });
        if anomaly != m.anomaly {
            return Err(format!(
                "incompatible spec: the bundle is {}, the running model {}",
                kind(anomaly),
                kind(m.anomaly)
            ));
        }
        Ok(())
    }

    /// Runs the shadow evaluation if the desired state asks for one. Returns the agreement and
    /// latency ratio when it passed.
    fn shadow(&mut self, t: &Target<'_>, path: &Path) -> Result<Option<(f64, f64)>, Stop> {
        let Some(policy) = t.want.shadow else {
            return Ok(None);
        };
        let m = &self.managed[t.idx];
        let (name, stream) = (m.name.clone(), m.stream.clone());
        let handle = self
            .handle
            .as_ref()
            .ok_or_else(|| "inference is not running".to_string())?;
        let rx = handle
            .shadow(&stream, path, policy.windows)
            .map_err(|e| e.to_string())?;
        self.report(
            &name,
            &t.version,
            t.want.rollout.as_ref(),
            OtaState::Shadowing,
            None,
        );
        let outcome = loop {
            match rx.recv_timeout(POLL) {
                Ok(o) => break o,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if self.shared.interrupted_within(Duration::ZERO) {
                        handle.cancel_shadow(&stream);
                        return Err(Stop::Interrupted);
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err("the shadow evaluation stopped before it finished"
                        .to_string()
                        .into());
                }
            }
        };
        let (agreement, ratio) = (outcome.agreement(), outcome.latency_ratio());
        let failed = |reason: String| Stop::Failed {
            reason,
            agreement: Some(agreement),
            latency_ratio: Some(ratio),
        };
        if let Some(e) = outcome.error {
            return Err(failed(format!(
                "the new model failed on live windows in shadow: {e}"
            )));
        }
        if agreement < policy.min_agreement {
            return Err(failed(format!(
                "shadow agreement {agreement:.2} < {:.2} over {} windows",
                policy.min_agreement, outcome.windows
            )));
        }
        if ratio > policy.max_latency_ratio {
            return Err(failed(format!(
                "shadow latency ratio {ratio:.2} > {:.2} over {} windows",
                policy.max_latency_ratio, outcome.windows
            )));
        }
        tracing::info!(model = %name, version = %t.version, agreement, latency_ratio = ratio,
            windows = outcome.windows, "Shadow evaluation passed.");
        Ok(Some((agreement, ratio)))
    }

    /// Swaps the serving model to `slot` (`None`: the configured bundle) and persists it.
    fn switch(
        &mut self,
        t: &Target<'_>,
        slot: Option<Slot>,
        shadow: Option<(f64, f64)>,
    ) -> Result<(), Stop> {
        let m = &self.managed[t.idx];
        let path = slot.map_or(m.factory.clone(), |s| m.dir.slot_path(s));
        let handle = self
            .handle
            .as_ref()
            .ok_or_else(|| "inference is not running".to_string())?;
        handle.swap(&m.stream, &path).map_err(|e| e.to_string())?;
        let m = &mut self.managed[t.idx];
        m.state.previous = m.state.active;
        m.state.active = slot;
        m.state.switched_at_us = slot.map(|_| now_us());
        m.state.starts_since_switch = 0;
        save(m);
        self.metrics.ota_switches.fetch_add(1, Relaxed);
        let name = m.name.clone();
        tracing::info!(model = %name, version = %t.version, bundle = %path.display(), "OTA switch done; serving the new version.");
        self.report_full(
            &name,
            &t.version,
            t.want.rollout.as_ref(),
            OtaState::Active,
            None,
            shadow.map(|s| s.0),
            shadow.map(|s| s.1),
        );
        self.fault.arm(&name, &t.version);
        Ok(())
    }
}

fn kind(anomaly: bool) -> &'static str {
    if anomaly {
        "an anomaly model"
    } else {
        "a classifier"
    }
}

fn save(m: &Managed) {
    if let Err(e) = m.dir.save(&m.state) {
        tracing::error!(model = %m.name, error = %e, "Cannot persist the OTA slot state.");
    }
}

/// Network trouble is retried; what the server or the bytes said is final.
fn retryable(e: &DownloadError) -> bool {
    match e {
        DownloadError::Transport { .. }
        | DownloadError::Protocol { .. }
        | DownloadError::Io { .. } => true,
        DownloadError::Status { status, .. } => *status >= 500 || *status == 408 || *status == 429,
        DownloadError::TooLarge { .. }
        | DownloadError::Digest { .. }
        | DownloadError::Tls { .. } => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired(version: &str) -> DesiredState {
        let mut d = DesiredState::new("dev-1");
        d.models.push(DesiredModel {
            name: "activity".into(),
            version: Some(version.into()),
            sha256: None,
            size: None,
            url: None,
            rollout: None,
            shadow: None,
        });
        d
    }

    #[test]
    fn the_mailbox_keeps_the_latest_desired_state() {
        let shared = OtaShared::new(Vec::new());
        assert!(matches!(shared.take(Duration::ZERO), Take::Timeout));
        shared.offer(desired("1.1.0"));
        shared.offer(desired("1.2.0"));
        assert!(shared.interrupted_within(Duration::ZERO));
        match shared.take(Duration::ZERO) {
            Take::New(d) => assert_eq!(d.models[0].version.as_deref(), Some("1.2.0")),
            _ => panic!("a desired state was offered"),
        }
        assert!(matches!(shared.take(Duration::ZERO), Take::Timeout));
        shared.close();
        assert!(matches!(shared.take(Duration::from_secs(5)), Take::Closed));
    }

    #[test]
    fn reports_change_only_when_their_content_does() {
        let shared = OtaShared::new(Vec::new());
        let r = OtaReport {
            model: "activity".into(),
            version: "1.1.0".into(),
            rollout: None,
            state: OtaState::Downloading,
            reason: None,
            ts: 1,
            agreement: None,
            latency_ratio: None,
        };
        shared.set_report(r.clone());
        shared.set_report(OtaReport { ts: 2, ..r.clone() });
        assert_eq!(shared.reports()[0].ts, 1, "same state: no new report");
        shared.set_report(OtaReport {
            state: OtaState::Verified,
            ts: 3,
            ..r
        });
        assert_eq!(shared.reports()[0].state, OtaState::Verified);
        shared.keep_reports(&[]);
        assert!(shared.reports().is_empty());
    }

    #[test]
    fn network_errors_are_retried_and_refusals_are_final() {
        let status = |s| DownloadError::Status {
            url: "u".into(),
            status: s,
            body: String::new(),
        };
        assert!(retryable(&status(503)));
        assert!(retryable(&DownloadError::Transport {
            url: "u".into(),
            message: "refused".into()
        }));
        assert!(!retryable(&status(404)));
        assert!(!retryable(&status(403)));
        assert!(!retryable(&DownloadError::Digest {
            url: "u".into(),
            expected: "a".into(),
            found: "b".into()
        }));
    }
}
