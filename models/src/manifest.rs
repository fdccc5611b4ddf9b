//! The bundle manifest: everything a device needs to know about a model besides its weights.
//!
//! Serialized as JSON inside the bundle (see `docs/model-bundle.md`). Within manifest
//! `format` 1, fields are only added and readers ignore fields they do not know, so an older
//! agent can read a newer manifest of the same format. [`Manifest::validate`] checks every
//! cross-field rule (lengths against the architecture, finite numbers, semver), so code after
//! `Bundle::read` can rely on them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use ember_bundle::Baseline;

use crate::bundle::BundleError;
use crate::model::Architecture;

/// The manifest format this crate writes and reads.
pub const MANIFEST_FORMAT: u32 = 1;

/// A model's manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format; [`MANIFEST_FORMAT`].
    pub format: u32,
    /// Model name: 1-64 characters of `[a-z0-9._-]`, e.g. `activity`.
    pub name: String,
    /// Semantic version of this model, e.g. `1.0.0`.
    pub version: String,
    /// Architecture and sizes: the burn `Config` the weights belong to.
    pub architecture: Architecture,
    pub input: InputSpec,
    pub output: OutputSpec,
    /// Precision of the stored weights.
    pub precision: Precision,
    pub weights: WeightsInfo,
    /// Evaluation results, e.g. `test_accuracy` (fraction, 0-1) or `roc_auc`.
    pub metrics: BTreeMap<String, f64>,
    pub training: TrainingInfo,
    /// Set for int8 bundles: how the weights were quantized and from which f32 weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<QuantizationInfo>,
    /// When the bundle was built, RFC 3339 UTC (`2025-01-31T12:00:00Z`).
    pub created_at: String,
    /// Inputs with their expected outputs: a loaded model must reproduce them.
    pub golden: Golden,
    /// What the model saw and said on its training data: model monitoring's reference
    /// (`ember_bundle::baseline`). Bundles built before it have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Baseline>,
    /// Where the model came from: datasets, lake snapshot, code version, seed (the retraining
    /// pipeline writes it; bundles built by `ember-models train` have the training section only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lineage: Option<Lineage>,
}

/// Where a model came from (`ember-models pipeline` writes it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lineage {
    /// Each dataset file or lake extract used, with its SHA-256.
    pub datasets: Vec<DatasetRef>,
    /// The lake snapshot the field data was read at: the export watermark it covered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lake_snapshot: Option<String>,
    /// The code that trained it: `ember-models <version>` and the git commit when known.
    pub code_version: String,
    pub seed: u64,
    /// The version it was compared with and what the gate measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    #[serde(default)]
    pub evaluation: BTreeMap<String, f64>,
}

/// One input of a training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetRef {
    pub name: String,
    pub sha256: String,
    pub records: u64,
}

/// What the model consumes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InputSpec {
    /// Channels per sample (e.g. 6: accelerometer x, y, z then gyroscope x, y, z).
    pub channels: usize,
    /// Samples per window.
    pub window: usize,
    /// Samples between the starts of consecutive windows when scoring a stream.
    pub hop: usize,
    /// Sampling rate the model was trained at, in Hz.
    pub sample_rate_hz: f64,
    /// One name per channel, in input order.
    pub channel_names: Vec<String>,
    /// Applied by the runner to raw input: `(x - mean[c]) / std[c]`.
    pub normalization: Normalization,
}

/// Per-channel standardization computed on the training data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Normalization {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Normalization {
    /// Standardizes windows laid out `[window][channel][sample]` in place. Does nothing if the
    /// statistics are inconsistent (a validated manifest never is).
    pub fn apply(&self, windows: &mut [f32], window: usize) {
        let channels = self.mean.len();
        if channels == 0 || window == 0 || self.std.len() != channels {
            return;
        }
        // One channel's samples at a time: the statistics are loaded once per row and the
        // inner loop vectorizes (no integer division per value). Same arithmetic, same bits.
        for (row, samples) in windows.chunks_mut(window).enumerate() {
            let c = row % channels;
            let (mean, std) = (self.mean[c], self.std[c]);
            for v in samples {
                *v = (*v - mean) / std;
            }
        }
    }
}

/// What the model produces.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OutputSpec {
    /// Class probabilities, one per label, in this order.
    Classes { labels: Vec<String> },
    /// One score per window: the mean squared reconstruction error (normalized units).
    /// A window whose score exceeds `threshold` is anomalous.
    AnomalyScore {
        threshold: f32,
        /// The activities the autoencoder was trained on (what "normal" means).
        normal_labels: Vec<String>,
    },
}

/// Precision of the stored weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    /// Symmetric 8-bit integers with one f32 scale per tensor (burn `Q8S`, per-tensor).
    Int8,
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Int8 => "int8",
        })
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Precision::F32),
            "int8" => Ok(Precision::Int8),
            other => Err(format!("unknown precision {other:?}: use f32 or int8")),
        }
    }
}

/// The weights section of the bundle.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WeightsInfo {
    /// Always `burnpack` (burn 0.22 `ModuleRecord::into_bytes`).
    pub format: String,
    /// Length in bytes.
    pub len: u64,
    /// SHA-256 of the weights, lowercase hex.
    pub sha256: String,
}

/// How the model was trained: enough to retrain it and get the same result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainingInfo {
    /// e.g. `UEA BasicMotions (sktime 1.2.0), TRAIN split`.
    pub dataset: String,
    pub config: TrainConfig,
    /// Epochs run before early stopping (or `max_epochs`).
    pub epochs_run: usize,
    /// The epoch (1-based) whose weights were kept: lowest validation loss.
    pub best_epoch: usize,
    /// Series used for gradient steps and for validation (early stopping, calibration).
    pub train_series: usize,
    pub val_series: usize,
    /// Wall-clock training time; informative only (not reproducible).
    pub duration_s: f64,
}

/// Training hyper-parameters. Retraining with the same values (and data) reproduces the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Seeds weight initialization (burn's device RNG), the split, shuffling and augmentation.
    pub seed: u64,
    pub max_epochs: usize,
    /// Stop after this many epochs without a validation loss lower by at least `min_delta`.
    pub patience: usize,
    /// Smallest decrease of the validation loss that counts as an improvement.
    pub min_delta: f64,
    pub batch_size: usize,
    pub learning_rate: f64,
    /// Training series per class held out for validation (early stopping, threshold).
    pub val_per_class: usize,
    /// Augmented copies of every training series per epoch.
    pub augment_copies: usize,
    /// Amplitude jitter: each copy is scaled by a factor in `1 ± scale_jitter`.
    pub scale_jitter: f32,
    /// Standard deviation of Gaussian noise added to each copy (normalized units).
    pub noise_std: f32,
    /// Circularly shift each copy by a random number of samples.
    pub random_shift: bool,
    /// Anomaly model only: the activities treated as normal (trained on); others are anomalies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub normal_labels: Vec<String>,
    /// Anomaly model only: threshold = largest validation error × (1 + margin).
    #[serde(default)]
    pub threshold_margin: f32,
    /// Architecture width (`hidden` of the model config).
    pub hidden: usize,
}

/// How an int8 bundle was made.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuantizationInfo {
    /// e.g. `burn Q8S symmetric, per-tensor f32 scale, min-max calibration, native store`.
    pub scheme: String,
    /// SHA-256 of the f32 weights it was quantized from.
    pub source_weights_sha256: String,
}

/// Golden vectors: raw (un-normalized) input windows and the outputs the model must produce.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Golden {
    /// Largest absolute difference allowed between an output and its expected value.
    pub tolerance: f32,
    pub vectors: Vec<GoldenVector>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GoldenVector {
    /// Where the input came from, e.g. `BasicMotions TEST #3 (Walking)`.
    pub note: String,
    /// One window, `[channel][sample]`, raw units.
    pub input: Vec<f32>,
    /// Probabilities in label order, or `[score]`.
    pub output: Vec<f32>,
}

fn invalid(field: &str, problem: impl Into<String>) -> BundleError {
    BundleError::Manifest {
        field: field.to_string(),
        problem: problem.into(),
    }
}

impl Manifest {
    /// Labels of a classifier, `None` for an anomaly model.
    pub fn labels(&self) -> Option<&[String]> {
        match &self.output {
            OutputSpec::Classes { labels } => Some(labels),
            OutputSpec::AnomalyScore { .. } => None,
        }
    }

    /// Floats in one input window (`channels × window`).
    pub fn window_len(&self) -> usize {
        self.input.channels * self.input.window
    }

    /// Checks every rule a reader relies on; the error names the field and what to fix.
    pub fn validate(&self) -> Result<(), BundleError> {
        if self.format != MANIFEST_FORMAT {
            return Err(invalid(
                "format",
                format!(
                    "is {}; this reader understands manifest format {MANIFEST_FORMAT}: upgrade ember-models",
                    self.format
                ),
            ));
        }
        check_name(&self.name).map_err(|p| invalid("name", p))?;
        check_semver(&self.version).map_err(|p| invalid("version", p))?;
        self.architecture
            .check()
            .map_err(|e| invalid("architecture", e.problem))?;
        let input = &self.input;
        if input.channels != self.architecture.channels()
            || input.window != self.architecture.window()
        {
            return Err(invalid(
                "input",
                format!(
                    "declares {} channels × {} samples but the architecture takes {} × {}",
                    input.channels,
                    input.window,
                    self.architecture.channels(),
                    self.architecture.window()
                ),
            ));
        }
        if input.hop == 0 || input.hop > input.window {
            return Err(invalid(
                "input.hop",
                format!("is {}; use 1 to the window ({})", input.hop, input.window),
            ));
        }
        if !(input.sample_rate_hz.is_finite() && input.sample_rate_hz > 0.0) {
            return Err(invalid("input.sample_rate_hz", "must be a positive number"));
        }
        if input.channel_names.len() != input.channels {
            return Err(invalid(
                "input.channel_names",
                format!(
                    "has {} names for {} channels",
                    input.channel_names.len(),
                    input.channels
                ),
            ));
        }
        let norm = &input.normalization;
        for (field, values) in [
            ("input.normalization.mean", &norm.mean),
            ("input.normalization.std", &norm.std),
        ] {
            if values.len() != input.channels {
                return Err(invalid(
                    field,
                    format!(
                        "has {} values for {} channels",
                        values.len(),
                        input.channels
                    ),
                ));
            }
            if values.iter().any(|v| !v.is_finite()) {
                return Err(invalid(field, "holds a value that is not a finite number"));
            }
        }
        if norm.std.iter().any(|s| *s <= 0.0) {
            return Err(invalid(
                "input.normalization.std",
                "holds a value ≤ 0: every std must be positive",
            ));
        }
        match (&self.output, &self.architecture) {
            (OutputSpec::Classes { labels }, Architecture::Activity(c)) => {
                if labels.len() != c.num_classes {
                    return Err(invalid(
                        "output.labels",
                        format!(
                            "has {} labels but the architecture has {} classes",
                            labels.len(),
                            c.num_classes
                        ),
                    ));
                }
            }
            (OutputSpec::AnomalyScore { threshold, .. }, Architecture::Anomaly(_)) => {
                if !(threshold.is_finite() && *threshold > 0.0) {
                    return Err(invalid("output.threshold", "must be a positive number"));
                }
            }
            _ => {
                return Err(invalid(
                    "output",
                    format!(
                        "does not fit a {} architecture (classes go with activity, anomaly_score with anomaly)",
                        self.architecture.kind()
                    ),
                ));
            }
        }
        if self.weights.format != "burnpack" {
            return Err(invalid(
                "weights.format",
                format!(
                    "is {:?}; only \"burnpack\" is supported",
                    self.weights.format
                ),
            ));
        }
        if self.weights.sha256.len() != 64
            || !self
                .weights
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(invalid("weights.sha256", "must be 64 lowercase hex digits"));
        }
        if (self.precision == Precision::Int8) != self.quantization.is_some() {
            return Err(invalid(
                "quantization",
                "must be present exactly when precision is int8",
            ));
        }
        check_timestamp(&self.created_at).map_err(|p| invalid("created_at", p))?;
        let golden = &self.golden;
        if !(golden.tolerance.is_finite() && golden.tolerance >= 0.0) {
            return Err(invalid("golden.tolerance", "must be a finite number ≥ 0"));
        }
        if golden.vectors.is_empty() {
            return Err(invalid(
                "golden.vectors",
                "is empty: include at least one golden vector",
            ));
        }
        let outputs = self.architecture.outputs_per_window();
        for (i, v) in golden.vectors.iter().enumerate() {
            if v.input.len() != self.window_len() {
                return Err(invalid(
                    &format!("golden.vectors[{i}].input"),
                    format!(
                        "has {} values; one window is {} × {} = {}",
                        v.input.len(),
                        input.channels,
                        input.window,
                        self.window_len()
                    ),
                ));
            }
            if v.output.len() != outputs {
                return Err(invalid(
                    &format!("golden.vectors[{i}].output"),
                    format!(
                        "has {} values; the model outputs {outputs} per window",
                        v.output.len()
                    ),
                ));
            }
            if v.input.iter().chain(&v.output).any(|x| !x.is_finite()) {
                return Err(invalid(
                    &format!("golden.vectors[{i}]"),
                    "holds a value that is not a finite number",
                ));
            }
        }
        for (k, v) in &self.metrics {
            if !v.is_finite() {
                return Err(invalid(&format!("metrics.{k}"), "is not a finite number"));
            }
        }
        if let Some(b) = &self.baseline {
            b.check(self.input.channels, self.labels().map(<[String]>::len))
                .map_err(|(field, problem)| invalid(&field, problem))?;
        }
        Ok(())
    }
}

use ember_bundle::check_model_name as check_name;
/// Checks `MAJOR.MINOR.PATCH[-PRERELEASE][+BUILD]` (semver 2.0.0).
pub use ember_bundle::check_semver;

/// Checks `YYYY-MM-DDTHH:MM:SSZ`.
fn check_timestamp(ts: &str) -> Result<(), String> {
    let b = ts.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|s| s.iter().all(u8::is_ascii_digit));
    let ok = b.len() == 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && b[19] == b'Z';
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{ts:?} is not an RFC 3339 UTC time such as 2025-01-31T12:00:00Z"
        ))
    }
}

/// The current time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn now_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format_utc(secs)
}

/// Formats seconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub use ember_bundle::format_utc;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn semver() {
        for ok in [
            "1.0.0",
            "0.1.2",
            "10.20.30",
            "1.0.0-rc.1",
            "1.0.0+build.5",
            "1.0.0-alpha-1+x",
        ] {
            assert!(check_semver(ok).is_ok(), "{ok}");
        }
        for bad in [
            "1.0",
            "1.0.0.0",
            "01.0.0",
            "1.0.0-",
            "1.0.0+",
            "v1.0.0",
            "1..0",
            "1.0.0-a..b",
        ] {
            assert!(check_semver(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn utc_formatting() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_utc(1_735_689_599), "2024-12-31T23:59:59Z");
        assert!(check_timestamp(&now_utc()).is_ok());
        assert!(check_timestamp("2024-12-31 23:59:59").is_err());
    }
}
