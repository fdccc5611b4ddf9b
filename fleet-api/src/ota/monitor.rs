//! Model monitoring: per model version (and per device running it), what the results of the
//! last `monitoring.window_s` say, against the baseline the bundle recorded at training time
//! (manifest `baseline`, `ember_bundle::baseline`).
//!
//! Compared, each with the Population Stability Index over the baseline's own bins:
//! * classifiers: the distribution of predicted classes (`class`) and of the top class's
//!   probability (`confidence`);
//! * anomaly models: the score's distribution (`score`); the anomaly rate is reported beside;
//! * every model: each input channel's window mean and window std (normalized units, sent by
//!   the agent with each result; `input`, the largest PSI over channels and both statistics).
//!
//! A version (or one device) is *drifting* when it has at least `monitoring.min_windows`
//! results in the window and a PSI above `monitoring.psi_threshold` (outputs) or
//! `monitoring.input_psi_threshold` (inputs). A version without a registered bundle, or whose
//! bundle has no baseline, is reported with its statistics and no drift verdict.
//!
//! Capture streams (`{source}.{model}.capture`) repeat results for the windows they captured,
//! a biased sample (low confidence, anomalies), so they are left out.
//!
//! Every replica computes the report every `monitoring.interval_s` from the database (reads
//! only) into a [`Monitor`] the API serves (`/api/v1/monitoring`) and the metrics export
//! (`model_drift_psi`, `model_drift_alert`, `model_drifting_devices`; device ids are never
//! labels).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ember_bundle::baseline::{Histogram, bin, psi};
use ember_bundle::{Baseline, ManifestHead};
use serde::Serialize;
use sqlx::Row;
use tokio_util::sync::CancellationToken;

use crate::config::MonitoringSettings;
use crate::db::{Db, Sql, get_bool, now_us};
use crate::metrics::Metrics;
use crate::server::ingest::writer::decode_values;

/// The latest report, shared with the API.
#[derive(Default)]
pub struct Monitor {
    report: RwLock<Option<Arc<Report>>>,
}

impl Monitor {
    pub fn latest(&self) -> Option<Arc<Report>> {
        self.report
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set(&self, r: Report) {
        *self.report.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(r));
    }
}

/// Model monitoring over the last `window_s` seconds.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Report {
    /// When it was computed, µs since the epoch (the fleet's clock).
    pub computed_at: i64,
    pub window_s: u64,
    pub psi_threshold: f64,
    pub input_psi_threshold: f64,
    pub min_windows: u64,
    /// One per model version with results in the window, by name then version.
    pub versions: Vec<VersionReport>,
}

/// One model version: all its devices together, then each device.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct VersionReport {
    pub model: String,
    pub version: String,
    /// Whether the registered bundle carries a training baseline.
    pub baseline: bool,
    #[serde(flatten)]
    pub summary: Summary,
    /// Devices whose own results drift.
    pub drifting_devices: u64,
    pub devices: Vec<DeviceReport>,
}

/// One device's results of one model version.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DeviceReport {
    pub device: String,
    #[serde(flatten)]
    pub summary: Summary,
}

/// Statistics of a set of results and their drift from the baseline.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct Summary {
    pub results: u64,
    /// Classifiers: the fraction of results per label (the manifest's labels, else class
    /// indices).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class_distribution: Option<BTreeMap<String, f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean_confidence: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anomaly_rate: Option<f64>,
    /// The baseline's anomaly rate, for comparison.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_anomaly_rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean_score: Option<f64>,
    pub latency_us_mean: f64,
    pub latency_us_p95: f64,
    /// Per input channel: the mean of the windows' normalized means.
    pub input_mean_z: Vec<f64>,
    pub drift: Drift,
}

/// PSI of each compared distribution (absent: not applicable or no baseline) and the verdict.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct Drift {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class_psi: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confidence_psi: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score_psi: Option<f64>,
    /// The largest PSI over the input channels' window mean and std distributions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_psi: Option<f64>,
    /// Per channel: the larger of its mean and std PSI.
    pub input_psi_by_channel: Vec<f64>,
    /// Drifting: enough results and a PSI above its threshold.
    pub alert: bool,
    /// What crossed its threshold, e.g. `input_psi 1.83 > 0.25`; or why there is no verdict.
    pub reasons: Vec<String>,
}

/// The results of one (version, device) or one version, accumulated.
#[derive(Default)]
struct Acc {
    results: u64,
    class_counts: BTreeMap<i64, u64>,
    confidences: Vec<f64>,
    scores: Vec<f64>,
    anomalies: u64,
    latencies: Vec<f64>,
    mean_z: Vec<Vec<f64>>,
    std_ratio: Vec<Vec<f64>>,
}

impl Acc {
    fn add(&mut self, r: &ResultRow) {
        self.results += 1;
        if let Some(c) = r.class {
            *self.class_counts.entry(c).or_default() += 1;
        }
        if let Some(c) = r.confidence {
            self.confidences.push(c);
        }
        if let Some(s) = r.score {
            self.scores.push(s);
            self.anomalies += u64::from(r.anomalous);
        }
        self.latencies.push(r.latency_us);
        if let (Some(z), Some(s)) = (&r.mean_z, &r.std_ratio) {
            if self.mean_z.len() < z.len() {
                self.mean_z.resize(z.len(), Vec::new());
                self.std_ratio.resize(z.len(), Vec::new());
            }
            for (c, v) in z.iter().enumerate() {
                self.mean_z[c].push(f64::from(*v));
            }
            for (c, v) in s.iter().enumerate() {
                self.std_ratio[c].push(f64::from(*v));
            }
        }
    }

    fn summarize(
        &self,
        base: Option<&Baseline>,
        labels: &[String],
        s: &MonitoringSettings,
    ) -> Summary {
        let n = self.results.max(1) as f64;
        let mut lat = self.latencies.clone();
        lat.sort_by(f64::total_cmp);
        let p95 = lat
            .get(((lat.len() as f64 * 0.95).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or(0.0);
        let mut out = Summary {
            results: self.results,
            latency_us_mean: lat.iter().sum::<f64>() / lat.len().max(1) as f64,
            latency_us_p95: p95,
            input_mean_z: self
                .mean_z
                .iter()
                .map(|v| v.iter().sum::<f64>() / v.len().max(1) as f64)
                .collect(),
            ..Summary::default()
        };
        if !self.class_counts.is_empty() || !self.confidences.is_empty() {
            out.class_distribution = Some(
                self.class_counts
                    .iter()
                    .map(|(c, k)| {
                        let name = usize::try_from(*c)
                            .ok()
                            .and_then(|i| labels.get(i).cloned())
                            .unwrap_or_else(|| c.to_string());
                        (name, *k as f64 / n)
                    })
                    .collect(),
            );
            out.mean_confidence =
                Some(self.confidences.iter().sum::<f64>() / self.confidences.len().max(1) as f64);
        }
        if !self.scores.is_empty() {
            out.anomaly_rate = Some(self.anomalies as f64 / self.scores.len() as f64);
            out.mean_score = Some(self.scores.iter().sum::<f64>() / self.scores.len() as f64);
        }
        let d = &mut out.drift;
        let Some(base) = base else {
            d.reasons.push("no baseline: the version is not in the registry, or its bundle predates baselines (ember-models baseline adds one)".into());
            return out;
        };
        out.baseline_anomaly_rate = base.anomaly_rate;
        if let Some(expected) = &base.class_distribution
            && !self.class_counts.is_empty()
        {
            let mut counts = vec![0u64; expected.len()];
            for (c, k) in &self.class_counts {
                if let Some(slot) = usize::try_from(*c).ok().and_then(|i| counts.get_mut(i)) {
                    *slot += k;
                }
            }
            let total: u64 = counts.iter().sum::<u64>().max(1);
            let actual: Vec<f64> = counts.iter().map(|k| *k as f64 / total as f64).collect();
            d.class_psi = Some(psi(expected, &actual));
        }
        if let Some(h) = &base.confidence
            && !self.confidences.is_empty()
        {
            d.confidence_psi = Some(compare(h, &self.confidences));
        }
        if let Some(h) = &base.score
            && !self.scores.is_empty()
        {
            d.score_psi = Some(compare(h, &self.scores));
        }
        if !self.mean_z.is_empty() {
            d.input_psi_by_channel = base
                .input
                .iter()
                .enumerate()
                .map(|(c, ch)| {
                    let z = self.mean_z.get(c).map_or(0.0, |v| compare(&ch.mean_z, v));
                    let r = self
                        .std_ratio
                        .get(c)
                        .map_or(0.0, |v| compare(&ch.std_ratio, v));
                    z.max(r)
                })
                .collect();
            d.input_psi = d.input_psi_by_channel.iter().copied().reduce(f64::max);
        }
        if self.results < s.min_windows {
            d.reasons.push(format!(
                "{} results, fewer than monitoring.min_windows ({}): no verdict yet",
                self.results, s.min_windows
            ));
            return out;
        }
        for (name, v, limit) in [
            ("class_psi", d.class_psi, s.psi_threshold),
            ("confidence_psi", d.confidence_psi, s.psi_threshold),
            ("score_psi", d.score_psi, s.psi_threshold),
            ("input_psi", d.input_psi, s.input_psi_threshold),
        ] {
            if let Some(v) = v
                && v > limit
            {
                d.alert = true;
                d.reasons.push(format!("{name} {v:.3} > {limit}"));
            }
        }
        out
    }
}

/// PSI of `values` binned over `h`'s edges against `h`.
fn compare(h: &Histogram, values: &[f64]) -> f64 {
    let mut counts = vec![0u64; h.edges.len() + 1];
    for v in values {
        counts[bin(&h.edges, *v)] += 1;
    }
    psi(
        &h.fractions,
        &Histogram::from_counts(&h.edges, &counts).fractions,
    )
}

/// One result row.
struct ResultRow {
    class: Option<i64>,
    confidence: Option<f64>,
    score: Option<f64>,
    anomalous: bool,
    latency_us: f64,
    mean_z: Option<Vec<f32>>,
    std_ratio: Option<Vec<f32>>,
}

/// Computes the report for the results received in `[now - window_s, now]`.
pub async fn compute(db: &Db, s: &MonitoringSettings, now: i64) -> Result<Report, sqlx::Error> {
    let cutoff = now - i64::try_from(s.window_s).unwrap_or(i64::MAX / 2) * 1_000_000;
    let mut q = Sql::new(
        "SELECT device_id, model, version, class, confidence, score, anomalous, latency_us, \
         input_mean_z, input_std_ratio FROM inference WHERE stream NOT LIKE '%.capture' \
         AND received_at >= ",
    );
    q.bind(cutoff);
    q.push(" ORDER BY received_at DESC LIMIT ")
        .bind(i64::try_from(s.max_rows).unwrap_or(i64::MAX));
    let rows = q.query().fetch_all(db.pool()).await?;
    let mut versions: BTreeMap<(String, String), (Acc, BTreeMap<String, Acc>)> = BTreeMap::new();
    for r in rows {
        let res = ResultRow {
            class: r.try_get("class")?,
            confidence: r.try_get("confidence")?,
            score: r.try_get("score")?,
            anomalous: get_bool(&r, "anomalous")?,
            latency_us: r.try_get::<i64, _>("latency_us")? as f64,
            mean_z: r
                .try_get::<Option<Vec<u8>>, _>("input_mean_z")?
                .map(|b| decode_values(&b)),
            std_ratio: r
                .try_get::<Option<Vec<u8>>, _>("input_std_ratio")?
                .map(|b| decode_values(&b)),
        };
        let key = (r.try_get("model")?, r.try_get("version")?);
        let (all, devices) = versions.entry(key).or_default();
        all.add(&res);
        devices
            .entry(r.try_get("device_id")?)
            .or_default()
            .add(&res);
    }
    let mut manifests: HashMap<(String, String), Option<ManifestHead>> = HashMap::new();
    let mut out = Vec::new();
    for ((model, version), (all, devices)) in versions {
        let head = match manifests.get(&(model.clone(), version.clone())) {
            Some(h) => h.clone(),
            None => {
                let h = crate::ota::registry::manifest(db, &model, &version)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|text| serde_json::from_str::<ManifestHead>(&text).ok());
                manifests.insert((model.clone(), version.clone()), h.clone());
                h
            }
        };
        let base = head.as_ref().and_then(|h| h.baseline.as_ref());
        let labels: Vec<String> = head
            .as_ref()
            .and_then(|h| h.output.as_ref())
            .and_then(|o| o.get("labels"))
            .and_then(|l| serde_json::from_value(l.clone()).ok())
            .unwrap_or_default();
        let devices: Vec<DeviceReport> = devices
            .into_iter()
            .map(|(device, acc)| DeviceReport {
                device,
                summary: acc.summarize(base, &labels, s),
            })
            .collect();
        out.push(VersionReport {
            baseline: base.is_some(),
            summary: all.summarize(base, &labels, s),
            drifting_devices: devices.iter().filter(|d| d.summary.drift.alert).count() as u64,
            devices,
            model,
            version,
        });
    }
    Ok(Report {
        computed_at: now,
        window_s: s.window_s,
        psi_threshold: s.psi_threshold,
        input_psi_threshold: s.input_psi_threshold,
        min_windows: s.min_windows,
        versions: out,
    })
}

/// Recomputes the report every `interval_s` (every replica) and exports its metrics.
pub async fn run(
    db: Db,
    settings: MonitoringSettings,
    monitor: Arc<Monitor>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let interval = Duration::from_secs(settings.interval_s);
    let mut exported: Vec<(String, String)> = Vec::new();
    loop {
        match compute(&db, &settings, now_us()).await {
            Ok(report) => {
                let mut now_exported = Vec::new();
                for v in &report.versions {
                    let (m, ver) = (v.model.as_str(), v.version.as_str());
                    let d = &v.summary.drift;
                    for (stat, value) in [
                        ("class", d.class_psi),
                        ("confidence", d.confidence_psi),
                        ("score", d.score_psi),
                        ("input", d.input_psi),
                    ] {
                        if let Some(value) = value {
                            metrics.set(
                                "model_drift_psi",
                                &[("model", m), ("version", ver), ("statistic", stat)],
                                value,
                            );
                        }
                    }
                    metrics.set(
                        "model_drift_alert",
                        &[("model", m), ("version", ver)],
                        f64::from(u8::from(d.alert)),
                    );
                    metrics.set(
                        "model_drifting_devices",
                        &[("model", m), ("version", ver)],
                        v.drifting_devices as f64,
                    );
                    metrics.set(
                        "model_results_in_window",
                        &[("model", m), ("version", ver)],
                        v.summary.results as f64,
                    );
                    now_exported.push((m.to_string(), ver.to_string()));
                }
                // A version without results in the window any more reads 0, not its last alert.
                for (m, ver) in exported.iter().filter(|k| !now_exported.contains(k)) {
                    let l = [("model", m.as_str()), ("version", ver.as_str())];
                    metrics.set("model_drift_alert", &l, 0.0);
                    metrics.set("model_drifting_devices", &l, 0.0);
                    metrics.set("model_results_in_window", &l, 0.0);
                }
                exported = now_exported;
                monitor.set(report);
            }
            Err(e) => {
                tracing::warn!(error = %e, "Model monitoring could not read the results; trying again next interval.")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
