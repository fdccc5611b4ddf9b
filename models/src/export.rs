//! Exporting a loaded model's architecture and weights for other runtimes.
//!
//! [`export`] gives everything needed to rebuild the model elsewhere: the architecture, the
//! input normalization, every parameter under a stable name with its shape and f32 values
//! (int8 weights as loaded, i.e. dequantized), and the golden vectors to check the rebuild
//! against. `bench/onnx/build_onnx.py` turns it (as JSON) into an ONNX graph, so ONNX Runtime
//! and tract can be compared with burn on the same weights.
//!
//! Layouts are burn's, which are ONNX's too: Conv1d weights `[out, in, kernel]`,
//! ConvTranspose1d weights `[in, out, kernel]`, Linear weights `[in, out]` (ONNX `Gemm` with
//! `transB = 0`).

use burn::module::Param;
use burn::nn::Linear;
use burn::nn::conv::{Conv1d, ConvTranspose1d};
use burn::prelude::*;
use serde::Serialize;

use crate::inference::{LoadedModel, ModelError};
use crate::manifest::{GoldenVector, Normalization, OutputSpec, Precision};
use crate::model::{Architecture, Net};

/// A model as plain data.
#[derive(Debug, Clone, Serialize)]
pub struct ExportedModel {
    pub architecture: Architecture,
    pub precision: Precision,
    /// Applied to raw inputs before the network: `(x - mean[c]) / std[c]`.
    pub normalization: Normalization,
    pub output: OutputSpec,
    /// Parameters in forward order, named `layer.weight` / `layer.bias` after the fields of
    /// [`crate::activity::ActivityCnn`] and [`crate::anomaly::ConvAutoencoder`].
    pub tensors: Vec<ExportedTensor>,
    /// Raw input windows and the outputs burn must (and any rebuild should) produce.
    pub golden: Vec<GoldenVector>,
    pub golden_tolerance: f32,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExportedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// Exports `model` (int8 weights must have been dequantized at load, the default).
pub fn export(model: &LoadedModel) -> Result<ExportedModel, ModelError> {
    let mut tensors = Vec::new();
    match model.net() {
        Net::Activity(m) => {
            conv(&mut tensors, "conv1", &m.conv1)?;
            conv(&mut tensors, "conv2", &m.conv2)?;
            conv(&mut tensors, "conv3", &m.conv3)?;
            linear(&mut tensors, "head", &m.head)?;
        }
        Net::Anomaly(m) => {
            conv(&mut tensors, "enc1", &m.enc1)?;
            conv(&mut tensors, "enc2", &m.enc2)?;
            conv(&mut tensors, "bottleneck", &m.bottleneck)?;
            conv(&mut tensors, "expand", &m.expand)?;
            deconv(&mut tensors, "dec1", &m.dec1)?;
            deconv(&mut tensors, "dec2", &m.dec2)?;
        }
    }
    let golden = model.golden();
    Ok(ExportedModel {
        architecture: model.architecture().clone(),
        precision: model.precision(),
        normalization: model.input().normalization.clone(),
        output: model.output_spec().clone(),
        tensors,
        golden: golden.vectors.clone(),
        golden_tolerance: golden.tolerance,
    })
}

fn conv(out: &mut Vec<ExportedTensor>, name: &str, c: &Conv1d) -> Result<(), ModelError> {
    push(out, name, "weight", &c.weight)?;
    c.bias
        .as_ref()
        .map_or(Ok(()), |b| push(out, name, "bias", b))
}

fn deconv(
    out: &mut Vec<ExportedTensor>,
    name: &str,
    c: &ConvTranspose1d,
) -> Result<(), ModelError> {
    push(out, name, "weight", &c.weight)?;
    c.bias
        .as_ref()
        .map_or(Ok(()), |b| push(out, name, "bias", b))
}

fn linear(out: &mut Vec<ExportedTensor>, name: &str, l: &Linear) -> Result<(), ModelError> {
    push(out, name, "weight", &l.weight)?;
    l.bias
        .as_ref()
        .map_or(Ok(()), |b| push(out, name, "bias", b))
}

fn push<const D: usize>(
    out: &mut Vec<ExportedTensor>,
    layer: &str,
    what: &str,
    param: &Param<Tensor<D>>,
) -> Result<(), ModelError> {
    let t = param.val();
    let shape = t.dims().to_vec();
    let values = t
        .try_into_vec_as::<f32>()
        .map_err(|e| ModelError::Backend {
            message: e.to_string(),
        })?;
    out.push(ExportedTensor {
        name: format!("{layer}.{what}"),
        shape,
        values,
    });
    Ok(())
}
