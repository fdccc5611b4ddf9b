//! From a trained run to a bundle: quantize (int8), evaluate at the bundle's precision, record
//! golden vectors, fill in the manifest (feature `train`).

use std::collections::BTreeMap;

use burn::prelude::*;

use crate::bundle::{Bundle, BundleError};
use crate::data::BasicMotions;
use crate::eval::{self, EvalError};
use crate::hex;
use crate::inference::{LoadedModel, ModelError, load_net};
use crate::manifest::{
    Golden, GoldenVector, MANIFEST_FORMAT, Manifest, Precision, QuantizationInfo, WeightsInfo,
};
use crate::model::Net;
use crate::quant;
use crate::train::TrainedModel;

/// Golden vectors per bundle: the first test window of each of the first labels.
pub const GOLDEN_VECTORS: usize = 3;

/// Why a bundle could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Eval(#[from] EvalError),
    #[error(transparent)]
    Train(#[from] crate::train::TrainError),
    #[error("cannot serialize the weights: {0}")]
    Weights(String),
    #[error("the bundle just built does not pass its own checks: {0}")]
    SelfCheck(String),
}

/// What to put in the manifest besides what training recorded.
#[derive(Debug, Clone)]
pub struct BundleOptions {
    pub name: String,
    pub version: String,
    pub precision: Precision,
    /// RFC 3339 UTC; `manifest::now_utc()` for now.
    pub created_at: String,
}

/// Builds an unsigned bundle and a human-readable report of what was measured.
pub fn build_bundle(
    trained: &TrainedModel,
    bm: &BasicMotions,
    opts: &BundleOptions,
) -> Result<(Bundle, String), PackageError> {
    let device = Device::flex();
    let f32_model = trained.load(&device)?;
    let (weights, quantization) = match opts.precision {
        Precision::F32 => (trained.weights.clone(), None),
        Precision::Int8 => {
            let net =
                quant::quantize_int8(load_net(&trained.architecture, &trained.weights, &device)?);
            let bytes = net
                .to_burnpack()
                .map_err(|e| PackageError::Weights(e.to_string()))?;
            let info = QuantizationInfo {
                scheme: quant::INT8_SCHEME.to_string(),
                source_weights_sha256: hex::sha256(&trained.weights),
            };
            (bytes, Some(info))
        }
    };
    // Evaluate exactly what a device will run: these weights, decoded and dequantized at load.
    let net: Net = quant::dequantize(load_net(&trained.architecture, &weights, &device)?);
    let model = LoadedModel::from_net(
        net,
        trained.architecture.clone(),
        trained.input.clone(),
        trained.output.clone(),
        opts.precision,
        &device,
    );
    // f32 bundles keep what training measured; int8 bundles report only what was measured on
    // the int8 weights (and the f32 numbers they are compared with, prefixed `f32_`).
    let mut metrics: BTreeMap<String, f64> = match opts.precision {
        Precision::F32 => trained.metrics.clone(),
        Precision::Int8 => BTreeMap::new(),
    };
    let mut report = format!(
        "{} {} ({}): weights {} bytes\n",
        opts.name,
        opts.version,
        opts.precision,
        weights.len()
    );
    match model.output_spec() {
        crate::manifest::OutputSpec::Classes { .. } => {
            let (confusion, out) = eval::classify(&model, &bm.test)?;
            metrics.insert("test_accuracy".into(), confusion.accuracy());
            report += &format!(
                "test accuracy {:.2}%\n{}",
                100.0 * confusion.accuracy(),
                confusion.render()
            );
            if opts.precision != Precision::F32 {
                let (f32_confusion, f32_out) = eval::classify(&f32_model, &bm.test)?;
                let agree = out
                    .predicted_classes()
                    .unwrap_or_default()
                    .iter()
                    .zip(f32_out.predicted_classes().unwrap_or_default())
                    .filter(|(a, b)| **a == *b)
                    .count() as f64
                    / bm.test.len().max(1) as f64;
                let (max_d, mean_d) = deltas(out.values(), f32_out.values());
                metrics.insert("f32_test_accuracy".into(), f32_confusion.accuracy());
                metrics.insert("prediction_agreement_vs_f32".into(), agree);
                metrics.insert("max_abs_probability_delta_vs_f32".into(), max_d);
                metrics.insert("mean_abs_probability_delta_vs_f32".into(), mean_d);
                report += &format!(
                    "vs f32: accuracy {:.2}% -> {:.2}%, predictions agree on {:.1}% of windows, probability delta max {max_d:.2e} mean {mean_d:.2e}\n",
                    100.0 * f32_confusion.accuracy(),
                    100.0 * confusion.accuracy(),
                    100.0 * agree
                );
            }
        }
        crate::manifest::OutputSpec::AnomalyScore { .. } => {
            let r = eval::anomaly(&model, &bm.test)?;
            metrics.insert("roc_auc".into(), r.roc_auc);
            metrics.insert("false_positive_rate".into(), r.false_positive_rate);
            metrics.insert("detection_rate".into(), r.detection_rate);
            report += &r.render();
            if opts.precision != Precision::F32 {
                let f = eval::anomaly(&f32_model, &bm.test)?;
                let (max_d, mean_d) = deltas(&r.scores, &f.scores);
                let max_rel = r
                    .scores
                    .iter()
                    .zip(&f.scores)
                    .map(|(a, b)| f64::from((a - b).abs() / b.abs().max(1e-12)))
                    .fold(0.0, f64::max);
                metrics.insert("f32_roc_auc".into(), f.roc_auc);
                metrics.insert("max_abs_score_delta_vs_f32".into(), max_d);
                metrics.insert("mean_abs_score_delta_vs_f32".into(), mean_d);
                metrics.insert("max_rel_score_delta_vs_f32".into(), max_rel);
                report += &format!(
                    "vs f32: ROC-AUC {:.4} -> {:.4}, score delta max {max_d:.2e} (relative {max_rel:.2e}) mean {mean_d:.2e}\n",
                    f.roc_auc, r.roc_auc
                );
            }
        }
    }
    let golden = golden_vectors(&model, bm)?;
    let baseline = crate::baseline::compute(&model, &bm.train, "BasicMotions TRAIN split")?;
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        name: opts.name.clone(),
        version: opts.version.clone(),
        architecture: trained.architecture.clone(),
        input: trained.input.clone(),
        output: trained.output.clone(),
        precision: opts.precision,
        weights: WeightsInfo {
            format: "burnpack".into(),
            len: 0,
            sha256: String::new(),
        },
        metrics,
        training: trained.training.clone(),
        quantization,
        created_at: opts.created_at.clone(),
        golden,
        baseline: Some(baseline),
        lineage: None,
    };
    let bundle = Bundle::new(manifest, weights)?;
    // What a device will do: parse the bytes, load, reproduce the golden vectors.
    let reread =
        Bundle::read(&bundle.to_bytes()).map_err(|e| PackageError::SelfCheck(e.to_string()))?;
    LoadedModel::load(&reread, &device)
        .and_then(|m| m.run_golden())
        .map_err(|e| PackageError::SelfCheck(e.to_string()))?;
    report += &format!("bundle {} bytes (unsigned)\n", bundle.to_bytes().len());
    Ok((bundle, report))
}

fn deltas(a: &[f32], b: &[f32]) -> (f64, f64) {
    let d: Vec<f64> = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from((x - y).abs()))
        .collect();
    let max = d.iter().copied().fold(0.0, f64::max);
    (max, d.iter().sum::<f64>() / d.len().max(1) as f64)
}

fn golden_vectors(model: &LoadedModel, bm: &BasicMotions) -> Result<Golden, PackageError> {
    let test = &bm.test;
    let mut vectors = Vec::new();
    for k in 0..test.labels.len().min(GOLDEN_VECTORS) {
        let Some(i) = (0..test.len()).find(|&i| test.y[i] == k) else {
            continue;
        };
        let input = test.get(i).to_vec();
        let output = model.infer(&input)?.values().to_vec();
        vectors.push(GoldenVector {
            note: format!("BasicMotions TEST series {} ({})", i + 1, test.labels[k]),
            input,
            output,
        });
    }
    let largest = vectors
        .iter()
        .flat_map(|v| v.output.iter())
        .fold(1f32, |m, v| m.max(v.abs()));
    // Same CPU, same build: bit-exact. Other CPUs pick other SIMD kernels; 1e-4 relative
    // to the largest output leaves room for that and none for a wrong weight.
    Ok(Golden {
        tolerance: 1e-4 * largest,
        vectors,
    })
}
