//! Training on BasicMotions with burn autodiff on the flex CPU backend (feature `train`).
//!
//! Reproducible: the seed fixes weight initialization (burn's device RNG), the validation split,
//! shuffling and augmentation, and nothing else is random. burn's flex RNG is process-global, so
//! training holds [`TRAINING`] for its whole run: two trainings in one process (parallel tests)
//! cannot interleave their draws.
//!
//! Procedure (both models): hold out `val_per_class` training series per class (stratified,
//! seeded) for validation; standardize with per-channel mean/std of the remaining training
//! series; each epoch, draw `augment_copies` augmented copies of every training series (random
//! circular shift, amplitude jitter, Gaussian noise), shuffle and step Adam; keep the weights
//! of the epoch with the lowest validation loss; stop after `patience` epochs without
//! improvement. The anomaly model trains on `normal_labels` only (a denoising autoencoder: noisy
//! input, clean target) and its threshold is the largest validation reconstruction error times
//! `1 + threshold_margin`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use burn::module::Module;
use burn::nn::loss::{CrossEntropyLossConfig, MseLoss, Reduction};
use burn::optim::{AdamConfig, GradientsParams};
use burn::prelude::*;
use burn::tensor::TensorData;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::activity::ActivityCnnConfig;
use crate::anomaly::ConvAutoencoderConfig;
use crate::data::{self, BasicMotions, Dataset};
use crate::inference::LoadedModel;
use crate::manifest::{InputSpec, Normalization, OutputSpec, Precision, TrainConfig, TrainingInfo};
use crate::model::{Architecture, Net};

/// Held while training: burn's flex RNG is global to the process.
pub static TRAINING: Mutex<()> = Mutex::new(());

/// Samples between window starts recorded in the manifests (half a window: 5 s at 10 Hz).
pub const DEFAULT_HOP: usize = 50;

/// Why training failed.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Data(#[from] data::DataError),
    #[error("invalid training configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Architecture(#[from] crate::model::ArchitectureError),
    #[error(transparent)]
    Eval(#[from] crate::eval::EvalError),
    #[error(transparent)]
    Model(#[from] crate::inference::ModelError),
    #[error("the backend failed: {0}")]
    Backend(String),
    #[error("cannot save or load the training run in {path}: {problem}")]
    Run { path: String, problem: String },
}

/// Which model to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Activity,
    Anomaly,
}

/// The configuration the committed bundles were trained with.
pub fn default_config(kind: Kind) -> TrainConfig {
    match kind {
        Kind::Activity => TrainConfig {
            seed: 42,
            max_epochs: 60,
            patience: 12,
            min_delta: 1e-4,
            batch_size: 16,
            learning_rate: 3e-3,
            val_per_class: 2,
            augment_copies: 4,
            scale_jitter: 0.1,
            noise_std: 0.05,
            random_shift: true,
            normal_labels: Vec::new(),
            threshold_margin: 0.0,
            hidden: 16,
        },
        Kind::Anomaly => TrainConfig {
            seed: 42,
            max_epochs: 300,
            patience: 20,
            min_delta: 1e-4,
            batch_size: 16,
            learning_rate: 3e-3,
            val_per_class: 3,
            augment_copies: 4,
            scale_jitter: 0.1,
            noise_std: 0.05,
            random_shift: true,
            normal_labels: vec!["Standing".into(), "Walking".into()],
            threshold_margin: 1.0,
            hidden: 16,
        },
    }
}

/// One epoch's numbers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochStats {
    pub epoch: usize,
    pub train_loss: f64,
    pub val_loss: f64,
    /// Classifier only.
    pub train_accuracy: Option<f64>,
    pub val_accuracy: Option<f64>,
}

/// A trained f32 model and everything a manifest needs except name, version and golden vectors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainedModel {
    pub architecture: Architecture,
    pub input: InputSpec,
    pub output: OutputSpec,
    pub training: TrainingInfo,
    /// Test-split results (see [`crate::eval`]).
    pub metrics: BTreeMap<String, f64>,
    pub history: Vec<EpochStats>,
    /// f32 burnpack weights.
    #[serde(skip)]
    pub weights: Vec<u8>,
}

impl TrainedModel {
    /// The model, loaded on `device`.
    pub fn load(&self, device: &Device) -> Result<LoadedModel, TrainError> {
        let net = crate::inference::load_net(&self.architecture, &self.weights, device)?;
        Ok(LoadedModel::from_net(
            net,
            self.architecture.clone(),
            self.input.clone(),
            self.output.clone(),
            Precision::F32,
            device,
        ))
    }

    /// Writes `model.json` (architecture, specs, training, metrics) and `model.bpk` (weights).
    pub fn save(&self, dir: &Path) -> Result<(), TrainError> {
        let err = |problem: String| TrainError::Run {
            path: dir.display().to_string(),
            problem,
        };
        std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        let json = serde_json::to_vec_pretty(self).map_err(|e| err(e.to_string()))?;
        std::fs::write(dir.join("model.json"), json).map_err(|e| err(e.to_string()))?;
        std::fs::write(dir.join("model.bpk"), &self.weights).map_err(|e| err(e.to_string()))?;
        Ok(())
    }

    /// Reads what [`TrainedModel::save`] wrote.
    pub fn open(dir: &Path) -> Result<TrainedModel, TrainError> {
        let err = |problem: String| TrainError::Run {
            path: dir.display().to_string(),
            problem,
        };
        let json =
            std::fs::read(dir.join("model.json")).map_err(|e| err(format!("model.json: {e}")))?;
        let mut model: TrainedModel =
            serde_json::from_slice(&json).map_err(|e| err(format!("model.json: {e}")))?;
        model.weights =
            std::fs::read(dir.join("model.bpk")).map_err(|e| err(format!("model.bpk: {e}")))?;
        Ok(model)
    }
}

/// Where progress goes: an indicatif bar with one line per epoch (plain lines when stderr is
/// not a terminal), or nowhere (tests).
pub struct Progress {
    bar: ProgressBar,
    lines: bool,
}

impl Progress {
    pub fn bar(max_epochs: usize) -> Progress {
        let bar = ProgressBar::new(max_epochs as u64);
        let lines = bar.is_hidden();
        bar.set_style(
            ProgressStyle::with_template("[{bar:30}] epoch {pos}/{len} {msg} ({elapsed})")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        Progress { bar, lines }
    }

    pub fn hidden() -> Progress {
        Progress {
            bar: ProgressBar::hidden(),
            lines: false,
        }
    }

    fn epoch(&self, stats: &EpochStats, improved: bool) {
        let acc = |a: Option<f64>| {
            a.map(|a| format!(" acc {:5.1}%", 100.0 * a))
                .unwrap_or_default()
        };
        let line = format!(
            "epoch {:3}  train loss {:.4}{}  val loss {:.4}{}{}",
            stats.epoch,
            stats.train_loss,
            acc(stats.train_accuracy),
            stats.val_loss,
            acc(stats.val_accuracy),
            if improved { "  *" } else { "" }
        );
        if self.lines {
            println!("{line}");
        } else {
            self.bar.println(line);
        }
        self.bar
            .set_message(format!("val loss {:.4}", stats.val_loss));
        self.bar.inc(1);
    }

    fn finish(&self, message: String) {
        self.bar.finish_and_clear();
        if self.lines || !self.bar.is_hidden() {
            println!("{message}");
        }
    }
}

fn check_config(cfg: &TrainConfig) -> Result<(), TrainError> {
    let bad = |m: &str| Err(TrainError::Config(m.to_string()));
    if cfg.max_epochs == 0 || cfg.batch_size == 0 || cfg.augment_copies == 0 || cfg.hidden == 0 {
        return bad("max_epochs, batch_size, augment_copies and hidden must be at least 1");
    }
    if !(cfg.learning_rate.is_finite() && cfg.learning_rate > 0.0) {
        return bad("learning_rate must be a positive number");
    }
    let in_range = (0.0..1.0).contains(&cfg.scale_jitter)
        && cfg.noise_std.is_finite()
        && cfg.noise_std >= 0.0
        && cfg.threshold_margin.is_finite()
        && cfg.threshold_margin >= 0.0;
    if !in_range {
        return bad("scale_jitter must be in [0, 1), noise_std and threshold_margin ≥ 0");
    }
    Ok(())
}

/// Stratified split of `candidates` (indices into `data`): `per_class` of each label go to
/// validation. Returns (train, val), each sorted.
fn split(
    data: &Dataset,
    candidates: &[usize],
    per_class: usize,
    rng: &mut fastrand::Rng,
) -> Result<(Vec<usize>, Vec<usize>), TrainError> {
    let mut train = Vec::new();
    let mut val = Vec::new();
    for k in 0..data.labels.len() {
        let mut own: Vec<usize> = candidates
            .iter()
            .copied()
            .filter(|&i| data.y[i] == k)
            .collect();
        if own.is_empty() {
            continue;
        }
        if own.len() <= per_class {
            return Err(TrainError::Config(format!(
                "label {} has {} series; val_per_class ({per_class}) must leave some for training",
                data.labels[k],
                own.len()
            )));
        }
        rng.shuffle(&mut own);
        val.extend_from_slice(&own[..per_class]);
        train.extend_from_slice(&own[per_class..]);
    }
    train.sort_unstable();
    val.sort_unstable();
    Ok((train, val))
}

/// A standard normal draw (Box-Muller).
fn gaussian(rng: &mut fastrand::Rng) -> f32 {
    let u1 = rng.f32().max(f32::MIN_POSITIVE);
    let u2 = rng.f32();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

/// An augmented copy of a normalized window: (noisy input, clean target).
fn augment(
    src: &[f32],
    window: usize,
    cfg: &TrainConfig,
    rng: &mut fastrand::Rng,
) -> (Vec<f32>, Vec<f32>) {
    let shift = if cfg.random_shift {
        rng.usize(0..window)
    } else {
        0
    };
    let scale = 1.0 + cfg.scale_jitter * (2.0 * rng.f32() - 1.0);
    let mut clean = Vec::with_capacity(src.len());
    for ch in src.chunks(window) {
        for t in 0..window {
            clean.push(ch[(t + shift) % window] * scale);
        }
    }
    let noisy = clean
        .iter()
        .map(|v| v + cfg.noise_std * gaussian(rng))
        .collect();
    (noisy, clean)
}

fn tensor3(x: Vec<f32>, batch: usize, data: &Dataset, device: &Device) -> Tensor<3> {
    Tensor::from_data(
        TensorData::new(x, [batch, data.channels, data.window]),
        device,
    )
}

fn scalar(t: Tensor<1>) -> Result<f64, TrainError> {
    t.try_into_scalar::<f32>()
        .map(f64::from)
        .map_err(|e| TrainError::Backend(e.to_string()))
}

fn input_spec(data: &Dataset, normalization: Normalization) -> InputSpec {
    InputSpec {
        channels: data.channels,
        window: data.window,
        hop: DEFAULT_HOP.min(data.window),
        sample_rate_hz: data::SAMPLE_RATE_HZ,
        channel_names: if data.channels == data::CHANNEL_NAMES.len() {
            data::CHANNEL_NAMES.iter().map(|s| s.to_string()).collect()
        } else {
            (0..data.channels).map(|c| format!("ch{c}")).collect()
        },
        normalization,
    }
}

/// Batches of (indices into the augmented epoch set).
struct Epoch {
    inputs: Vec<Vec<f32>>,
    targets: Vec<Vec<f32>>,
    labels: Vec<usize>,
}

fn epoch_set(data: &Dataset, train: &[usize], cfg: &TrainConfig, rng: &mut fastrand::Rng) -> Epoch {
    let mut order: Vec<usize> = (0..train.len() * cfg.augment_copies)
        .map(|k| train[k % train.len()])
        .collect();
    rng.shuffle(&mut order);
    let mut e = Epoch {
        inputs: Vec::with_capacity(order.len()),
        targets: Vec::with_capacity(order.len()),
        labels: Vec::with_capacity(order.len()),
    };
    for i in order {
        let (noisy, clean) = augment(data.get(i), data.window, cfg, rng);
        e.inputs.push(noisy);
        e.targets.push(clean);
        e.labels.push(data.y[i]);
    }
    e
}

/// Trains the activity classifier on the TRAIN split and evaluates it on the TEST split.
pub fn train_activity(
    bm: &BasicMotions,
    cfg: &TrainConfig,
    progress: &Progress,
) -> Result<TrainedModel, TrainError> {
    check_config(cfg)?;
    let _guard = TRAINING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let started = Instant::now();
    let mut rng = fastrand::Rng::with_seed(cfg.seed);
    let all: Vec<usize> = (0..bm.train.len()).collect();
    let (train_idx, val_idx) = split(&bm.train, &all, cfg.val_per_class, &mut rng)?;
    let normalization = bm.train.subset(&train_idx).normalization();
    let mut train = bm.train.clone();
    normalization.apply(&mut train.x, train.window);
    let val = train.subset(&val_idx);

    let device = Device::flex();
    let ad = device.clone().autodiff();
    ad.seed(cfg.seed);
    let config = ActivityCnnConfig::new(bm.train.channels, bm.train.window, bm.train.labels.len())
        .with_hidden(cfg.hidden);
    config.check()?;
    let mut model = config.init(&ad);
    let mut optim = AdamConfig::new().init();
    let loss_fn = CrossEntropyLossConfig::new().init(&ad);
    let val_loss_fn = CrossEntropyLossConfig::new().init(&device);
    let val_x = tensor3(val.x.clone(), val.len(), &val, &device);
    let val_y = Tensor::<1, Int>::from_data(
        TensorData::new(
            val.y.iter().map(|&y| y as i64).collect::<Vec<_>>(),
            [val.len()],
        ),
        &device,
    );

    let mut history = Vec::new();
    let mut best: Option<(f64, usize, crate::activity::ActivityCnn)> = None;
    for epoch in 1..=cfg.max_epochs {
        let set = epoch_set(&train, &train_idx, cfg, &mut rng);
        let (mut loss_sum, mut correct) = (0.0, 0usize);
        for start in (0..set.inputs.len()).step_by(cfg.batch_size) {
            let end = (start + cfg.batch_size).min(set.inputs.len());
            let batch = end - start;
            let x = tensor3(set.inputs[start..end].concat(), batch, &train, &ad);
            let labels = &set.labels[start..end];
            let y = Tensor::<1, Int>::from_data(
                TensorData::new(
                    labels.iter().map(|&y| y as i64).collect::<Vec<_>>(),
                    [batch],
                ),
                &ad,
            );
            let logits = model.forward(x);
            let predicted = logits
                .clone()
                .argmax(1)
                .try_into_vec_as::<i64>()
                .map_err(|e| TrainError::Backend(e.to_string()))?;
            correct += predicted
                .iter()
                .zip(labels)
                .filter(|(p, y)| **p == **y as i64)
                .count();
            let loss = loss_fn.forward(logits, y);
            loss_sum += scalar(loss.clone())? * batch as f64;
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(cfg.learning_rate, model, grads);
        }
        let valid = model.valid();
        let logits = valid.forward(val_x.clone());
        let predicted = logits
            .clone()
            .argmax(1)
            .try_into_vec_as::<i64>()
            .map_err(|e| TrainError::Backend(e.to_string()))?;
        let val_correct = predicted
            .iter()
            .zip(&val.y)
            .filter(|(p, y)| **p == **y as i64)
            .count();
        let val_loss = scalar(val_loss_fn.forward(logits, val_y.clone()))?;
        let stats = EpochStats {
            epoch,
            train_loss: loss_sum / set.inputs.len() as f64,
            val_loss,
            train_accuracy: Some(correct as f64 / set.inputs.len() as f64),
            val_accuracy: Some(val_correct as f64 / val.len() as f64),
        };
        let improved = best
            .as_ref()
            .is_none_or(|(b, _, _)| val_loss < *b - cfg.min_delta);
        progress.epoch(&stats, improved);
        history.push(stats);
        if improved {
            best = Some((val_loss, epoch, valid));
        } else if best
            .as_ref()
            .is_some_and(|(_, e, _)| epoch - e >= cfg.patience)
        {
            break;
        }
    }
    let (_, best_epoch, net) = best.ok_or_else(|| TrainError::Config("no epoch ran".into()))?;
    let architecture = Architecture::Activity(config);
    let weights = record_bytes(Net::Activity(net))?;
    let mut trained = TrainedModel {
        input: input_spec(&bm.train, normalization),
        output: OutputSpec::Classes {
            labels: bm.train.labels.clone(),
        },
        training: TrainingInfo {
            dataset: data::DATASET.to_string(),
            config: cfg.clone(),
            epochs_run: history.len(),
            best_epoch,
            train_series: train_idx.len(),
            val_series: val_idx.len(),
            duration_s: started.elapsed().as_secs_f64(),
        },
        architecture,
        metrics: BTreeMap::new(),
        history,
        weights,
    };
    let model = trained.load(&device)?;
    let (confusion, _) = crate::eval::classify(&model, &bm.test)?;
    let (train_confusion, _) = crate::eval::classify(&model, &bm.train.subset(&train_idx))?;
    trained
        .metrics
        .insert("test_accuracy".into(), confusion.accuracy());
    trained
        .metrics
        .insert("train_accuracy".into(), train_confusion.accuracy());
    progress.finish(format!(
        "trained activity in {:.1} s: {} epochs, best {}; test accuracy {:.2}%",
        trained.training.duration_s,
        trained.training.epochs_run,
        best_epoch,
        100.0 * confusion.accuracy()
    ));
    Ok(trained)
}

fn record_bytes(net: Net) -> Result<Vec<u8>, TrainError> {
    net.to_burnpack()
        .map_err(|e| TrainError::Backend(e.to_string()))
}

/// Trains the anomaly autoencoder on the normal activities of the TRAIN split; calibrates its
/// threshold on held-out normal series; evaluates on the TEST split (all activities).
pub fn train_anomaly(
    bm: &BasicMotions,
    cfg: &TrainConfig,
    progress: &Progress,
) -> Result<TrainedModel, TrainError> {
    check_config(cfg)?;
    if cfg.normal_labels.is_empty() {
        return Err(TrainError::Config(
            "normal_labels is empty: name the activities that are normal".into(),
        ));
    }
    if let Some(l) = cfg
        .normal_labels
        .iter()
        .find(|l| !bm.train.labels.contains(l))
    {
        return Err(TrainError::Config(format!(
            "normal label {l:?} is not a BasicMotions label ({:?})",
            bm.train.labels
        )));
    }
    let _guard = TRAINING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let started = Instant::now();
    let mut rng = fastrand::Rng::with_seed(cfg.seed);
    let normal = bm.train.indices_of(&cfg.normal_labels);
    let (train_idx, val_idx) = split(&bm.train, &normal, cfg.val_per_class, &mut rng)?;
    let normalization = bm.train.subset(&train_idx).normalization();
    let mut train = bm.train.clone();
    normalization.apply(&mut train.x, train.window);
    let val = train.subset(&val_idx);

    let device = Device::flex();
    let ad = device.clone().autodiff();
    ad.seed(cfg.seed);
    let config =
        ConvAutoencoderConfig::new(bm.train.channels, bm.train.window).with_hidden(cfg.hidden);
    config.check()?;
    let mut model = config.init(&ad);
    let mut optim = AdamConfig::new().init();
    let mse = MseLoss::new();
    let val_x = tensor3(val.x.clone(), val.len(), &val, &device);

    let mut history = Vec::new();
    let mut best: Option<(f64, usize, crate::anomaly::ConvAutoencoder)> = None;
    for epoch in 1..=cfg.max_epochs {
        let set = epoch_set(&train, &train_idx, cfg, &mut rng);
        let mut loss_sum = 0.0;
        for start in (0..set.inputs.len()).step_by(cfg.batch_size) {
            let end = (start + cfg.batch_size).min(set.inputs.len());
            let batch = end - start;
            let x = tensor3(set.inputs[start..end].concat(), batch, &train, &ad);
            let target = tensor3(set.targets[start..end].concat(), batch, &train, &ad);
            let loss = mse.forward(model.forward(x), target, Reduction::Mean);
            loss_sum += scalar(loss.clone())? * batch as f64;
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(cfg.learning_rate, model, grads);
        }
        let valid = model.valid();
        let val_loss = scalar(valid.score(val_x.clone()).mean())?;
        let stats = EpochStats {
            epoch,
            train_loss: loss_sum / set.inputs.len() as f64,
            val_loss,
            train_accuracy: None,
            val_accuracy: None,
        };
        let improved = best
            .as_ref()
            .is_none_or(|(b, _, _)| val_loss < *b - cfg.min_delta);
        progress.epoch(&stats, improved);
        history.push(stats);
        if improved {
            best = Some((val_loss, epoch, valid));
        } else if best
            .as_ref()
            .is_some_and(|(_, e, _)| epoch - e >= cfg.patience)
        {
            break;
        }
    }
    let (_, best_epoch, net) = best.ok_or_else(|| TrainError::Config("no epoch ran".into()))?;
    let val_scores = net
        .score(val_x)
        .try_into_vec_as::<f32>()
        .map_err(|e| TrainError::Backend(e.to_string()))?;
    let max_val = val_scores.iter().copied().fold(0f32, f32::max);
    let threshold = (max_val * (1.0 + cfg.threshold_margin)).max(f32::MIN_POSITIVE);
    let architecture = Architecture::Anomaly(config);
    let weights = record_bytes(Net::Anomaly(net))?;
    let mut trained = TrainedModel {
        input: input_spec(&bm.train, normalization),
        output: OutputSpec::AnomalyScore {
            threshold,
            normal_labels: cfg.normal_labels.clone(),
        },
        training: TrainingInfo {
            dataset: data::DATASET.to_string(),
            config: cfg.clone(),
            epochs_run: history.len(),
            best_epoch,
            train_series: train_idx.len(),
            val_series: val_idx.len(),
            duration_s: started.elapsed().as_secs_f64(),
        },
        architecture,
        metrics: BTreeMap::new(),
        history,
        weights,
    };
    let model = trained.load(&device)?;
    let report = crate::eval::anomaly(&model, &bm.test)?;
    trained.metrics.insert("roc_auc".into(), report.roc_auc);
    trained
        .metrics
        .insert("false_positive_rate".into(), report.false_positive_rate);
    trained
        .metrics
        .insert("detection_rate".into(), report.detection_rate);
    progress.finish(format!(
        "trained anomaly in {:.1} s: {} epochs, best {}; threshold {:.4}; test ROC-AUC {:.4}",
        trained.training.duration_s,
        trained.training.epochs_run,
        best_epoch,
        threshold,
        report.roc_auc
    ));
    Ok(trained)
}
