//! Evaluating a model on labelled data: accuracy and confusion for the classifier, ROC-AUC
//! and detection rates for the anomaly model.
//!
//! Anomaly evaluation: the autoencoder is trained on some activities only (the manifest's
//! `normal_labels`); on the test split, windows of those activities are negatives and windows of
//! the held-out activities are positives. ROC-AUC is threshold-free; the false-positive and
//! detection rates are at the bundle's calibrated threshold.

use crate::data::Dataset;
use crate::inference::{LoadedModel, ModelError, Output};
use crate::manifest::OutputSpec;
use crate::metrics::{Confusion, roc_auc};

/// Why an evaluation could not run.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("the data and the model disagree: {problem}")]
    Mismatch { problem: String },
}

/// Runs the model over every window of `data`, in batches.
pub fn outputs(model: &LoadedModel, data: &Dataset) -> Result<Output, EvalError> {
    if data.channels != model.input().channels || data.window != model.input().window {
        return Err(EvalError::Mismatch {
            problem: format!(
                "data windows are {} × {}, the model takes {} × {}",
                data.channels,
                data.window,
                model.input().channels,
                model.input().window
            ),
        });
    }
    const BATCH: usize = 64;
    let mut values = Vec::new();
    let mut last = None;
    for chunk in data.x.chunks(BATCH * data.window_len()) {
        let out = model.infer(chunk)?;
        values.extend_from_slice(out.values());
        last = Some(out);
    }
    Ok(match last {
        Some(Output::Classes { classes, .. }) => Output::Classes {
            classes,
            probabilities: values,
        },
        Some(Output::Anomaly { threshold, .. }) => Output::Anomaly {
            threshold,
            scores: values,
        },
        None => {
            return Err(EvalError::Mismatch {
                problem: "the data set is empty".into(),
            });
        }
    })
}

/// Accuracy and confusion matrix of a classifier on `data`.
pub fn classify(model: &LoadedModel, data: &Dataset) -> Result<(Confusion, Output), EvalError> {
    let OutputSpec::Classes { labels } = model.output_spec() else {
        return Err(EvalError::Mismatch {
            problem: "the model is not a classifier".into(),
        });
    };
    // The model's class k must be the data's class k.
    if labels != &data.labels {
        return Err(EvalError::Mismatch {
            problem: format!(
                "model labels {labels:?} differ from data labels {:?}",
                data.labels
            ),
        });
    }
    let out = outputs(model, data)?;
    let predicted = out.predicted_classes().unwrap_or_default();
    Ok((Confusion::new(labels, &data.y, &predicted), out))
}

/// Anomaly-detection quality on labelled data.
#[derive(Debug, Clone)]
pub struct AnomalyReport {
    pub threshold: f32,
    pub normal_labels: Vec<String>,
    /// Threshold-free: P(score of an anomalous window > score of a normal one).
    pub roc_auc: f64,
    /// Normal windows above the threshold.
    pub false_positive_rate: f64,
    /// Anomalous windows above the threshold.
    pub detection_rate: f64,
    /// Per label: windows, windows flagged, mean score.
    pub per_label: Vec<(String, usize, usize, f64)>,
    pub scores: Vec<f32>,
}

impl AnomalyReport {
    pub fn render(&self) -> String {
        let mut s = format!(
            "normal = {:?}; threshold {:.4}\nROC-AUC (held-out activities as anomalies): {:.4}\nfalse-positive rate (normal flagged): {:.1}%\ndetection rate (anomalies flagged): {:.1}%\n",
            self.normal_labels,
            self.threshold,
            self.roc_auc,
            100.0 * self.false_positive_rate,
            100.0 * self.detection_rate
        );
        s += &format!(
            "{:>10} │ {:>7} {:>7} {:>10}\n",
            "label", "windows", "flagged", "mean score"
        );
        for (label, n, flagged, mean) in &self.per_label {
            s += &format!("{label:>10} │ {n:>7} {flagged:>7} {mean:>10.4}\n");
        }
        s
    }
}

/// Scores every window of `data`; windows of the model's normal labels are negatives.
pub fn anomaly(model: &LoadedModel, data: &Dataset) -> Result<AnomalyReport, EvalError> {
    let OutputSpec::AnomalyScore {
        threshold,
        normal_labels,
    } = model.output_spec()
    else {
        return Err(EvalError::Mismatch {
            problem: "the model is not an anomaly model".into(),
        });
    };
    let out = outputs(model, data)?;
    let scores = out.values().to_vec();
    let is_normal = |i: usize| normal_labels.contains(&data.labels[data.y[i]]);
    let (mut neg, mut pos) = (Vec::new(), Vec::new());
    for (i, s) in scores.iter().enumerate() {
        if is_normal(i) {
            neg.push(*s)
        } else {
            pos.push(*s)
        }
    }
    let rate =
        |v: &[f32]| v.iter().filter(|s| **s > *threshold).count() as f64 / v.len().max(1) as f64;
    let per_label = data
        .labels
        .iter()
        .enumerate()
        .map(|(k, label)| {
            let own: Vec<f32> = (0..data.len())
                .filter(|&i| data.y[i] == k)
                .map(|i| scores[i])
                .collect();
            let flagged = own.iter().filter(|s| **s > *threshold).count();
            let mean = own.iter().map(|s| f64::from(*s)).sum::<f64>() / own.len().max(1) as f64;
            (label.clone(), own.len(), flagged, mean)
        })
        .collect();
    Ok(AnomalyReport {
        threshold: *threshold,
        normal_labels: normal_labels.clone(),
        roc_auc: roc_auc(&neg, &pos),
        false_positive_rate: rate(&neg),
        detection_rate: rate(&pos),
        per_label,
        scores,
    })
}
