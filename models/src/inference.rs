//! Running a bundle's model: load (and dequantize) once, check the golden vectors, infer.
//!
//! **API boundary:** this is what the agent uses. Input is *raw* sensor values, laid out
//! `[window][channel][sample]` (the `.ts` layout: all samples of channel 0, then channel 1,
//! ...); the runner applies the manifest's normalization itself, so a device never needs to
//! know the training statistics and cannot apply the wrong ones.

use burn::prelude::*;
use burn::store::ModuleRecord;
use burn::tensor::Bytes;

use crate::bundle::Bundle;
use crate::hex;
use crate::manifest::{Golden, InputSpec, OutputSpec, Precision};
use crate::model::{Architecture, ArchitectureError, Net};
use crate::plan::Plan;

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(
        "the weights do not match the manifest's sha256 (manifest {expected}, weights {found}): the bundle is damaged; call Bundle::verify before loading"
    )]
    WeightsDigest { expected: String, found: String },
    #[error("cannot decode the weights as burnpack: {message}")]
    Weights { message: String },
    #[error("the weights do not fit the manifest's architecture: {message}")]
    WeightsMismatch { message: String },
    #[error(transparent)]
    Architecture(#[from] ArchitectureError),
    #[error(
        "input has {len} values, which is not a whole, non-zero number of windows of {channels} channels × {window} samples ({per_window} values each, laid out window, channel, sample)"
    )]
    InputLength {
        len: usize,
        channels: usize,
        window: usize,
        per_window: usize,
    },
    #[error(
        "input window {window}, channel {channel}, sample {sample} is {value}: inputs must be finite numbers"
    )]
    NonFinite {
        window: usize,
        channel: usize,
        sample: usize,
        value: f32,
    },
    #[error(
        "golden vector {index} ({note}) fails: output {output} is {actual}, expected {expected}; max deviation {max_deviation:.3e} exceeds the tolerance {tolerance:.3e}. The weights, the backend or the CPU do not reproduce this model"
    )]
    Golden {
        index: usize,
        note: String,
        output: usize,
        actual: f32,
        expected: f32,
        max_deviation: f32,
        tolerance: f32,
    },
    #[error(
        "int8 weights can stay quantized only on the flex backend, not on {device}: burn 0.22's GPU backends cannot run Q8S weights. Load with `LoadOptions {{ dequantize: true }}` (the default)"
    )]
    KeepQuantized { device: String },
    #[error("the backend failed to return a result: {message}")]
    Backend { message: String },
    #[error(
        "this build runs models only through Ember's inference plan, which cannot run this {architecture} model ({reason}); use a build with burn's modules (the agent's `wgpu` feature, or ember-models' `burn-modules`)"
    )]
    Unplanned {
        architecture: String,
        reason: &'static str,
    },
}

/// How to load a model.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    /// Dequantize int8 weights once at load (default) instead of on every forward pass.
    /// Same outputs; keeping them quantized only saves memory and costs speed on CPU.
    /// Only flex can keep them quantized: on any other device `false` is an error
    /// ([`ModelError::KeepQuantized`]), and int8 weights are always dequantized on the CPU
    /// before they move to the device.
    pub dequantize: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { dequantize: true }
    }
}

/// The model's outputs for a batch of windows.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// `probabilities[w * classes + k]`: probability of label `k` (manifest order) for window `w`.
    Classes {
        classes: usize,
        probabilities: Vec<f32>,
    },
    /// `scores[w]`: mean squared reconstruction error of window `w` (normalized units); the
    /// window is anomalous if its score exceeds `threshold`.
    Anomaly { threshold: f32, scores: Vec<f32> },
}

impl Output {
    /// Values per window (classes, or 1).
    pub fn per_window(&self) -> usize {
        match self {
            Output::Classes { classes, .. } => *classes,
            Output::Anomaly { .. } => 1,
        }
    }

    /// All values, window after window.
    pub fn values(&self) -> &[f32] {
        match self {
            Output::Classes { probabilities, .. } => probabilities,
            Output::Anomaly { scores, .. } => scores,
        }
    }

    pub fn windows(&self) -> usize {
        self.values().len() / self.per_window().max(1)
    }

    /// The values of window `w` (panics if `w >= windows()`).
    pub fn window(&self, w: usize) -> &[f32] {
        let n = self.per_window();
        &self.values()[w * n..(w + 1) * n]
    }

    /// Most probable class per window (`None` for an anomaly model).
    pub fn predicted_classes(&self) -> Option<Vec<usize>> {
        match self {
            Output::Classes {
                classes,
                probabilities,
            } => Some(
                probabilities
                    .chunks(*classes)
                    .map(crate::metrics::argmax)
                    .collect(),
            ),
            Output::Anomaly { .. } => None,
        }
    }

    /// Whether each window is anomalous (`None` for a classifier).
    pub fn anomalous(&self) -> Option<Vec<bool>> {
        match self {
            Output::Anomaly { threshold, scores } => {
                Some(scores.iter().map(|s| s > threshold).collect())
            }
            Output::Classes { .. } => None,
        }
    }
}

/// A model ready to run on one device.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    net: Net,
    /// The network with its weights laid out for inference (`None`: run `net` itself).
    plan: Option<Plan>,
    device: Device,
    architecture: Architecture,
    input: InputSpec,
    output: OutputSpec,
    precision: Precision,
    golden: Golden,
}

impl LoadedModel {
    /// Loads a bundle's weights onto `device`, dequantizing int8 weights once (on the CPU,
    /// before they move, when `device` is not flex).
    ///
    /// Checks the weights' SHA-256 against the manifest, but not the signature: call
    /// [`Bundle::verify`] first.
    pub fn load(bundle: &Bundle, device: &Device) -> Result<LoadedModel, ModelError> {
        Self::load_with(bundle, device, LoadOptions::default())
    }

    pub fn load_with(
        bundle: &Bundle,
        device: &Device,
        options: LoadOptions,
    ) -> Result<LoadedModel, ModelError> {
        let manifest = bundle.manifest();
        let found = hex::sha256(bundle.weights());
        if found != manifest.weights.sha256 {
            return Err(ModelError::WeightsDigest {
                expected: manifest.weights.sha256.clone(),
                found,
            });
        }
        let host = Device::flex();
        let net = if manifest.precision == Precision::F32 || *device == host {
            let net = load_net(&manifest.architecture, bundle.weights(), device)?;
            if options.dequantize {
                crate::quant::dequantize(net)
            } else {
                net
            }
        } else {
            // burn 0.22's GPU (cubecl) backends cannot dequantize Q8S weights stored natively
            // (cubek-quant panics: "Q8S is not supported for native quantization"), so int8
            // weights are decoded and dequantized on the CPU and only f32 weights move to the
            // device: int8 saves bundle size there, and the model computes in f32.
            if !options.dequantize {
                return Err(ModelError::KeepQuantized {
                    device: format!("{device:?}"),
                });
            }
            let net = load_net(&manifest.architecture, bundle.weights(), &host)?;
            crate::quant::dequantize(net).to_device(device)
        };
        // int8 weights kept quantized run through the network as stored (the plan reads f32).
        let plan = (manifest.precision == Precision::F32 || options.dequantize)
            .then(|| Plan::new(&net, manifest.input.channels, manifest.input.window))
            .flatten();
        #[cfg(not(feature = "burn-modules"))]
        if plan.is_none() {
            return Err(ModelError::Unplanned {
                architecture: manifest.architecture.kind().to_string(),
                reason: if manifest.precision == Precision::Int8 && !options.dequantize {
                    "int8 weights kept quantized"
                } else {
                    "its layers or sizes do not chain"
                },
            });
        }
        Ok(LoadedModel {
            net,
            plan,
            device: device.clone(),
            architecture: manifest.architecture.clone(),
            input: manifest.input.clone(),
            output: manifest.output.clone(),
            precision: manifest.precision,
            golden: manifest.golden.clone(),
        })
    }

    /// Wraps a network that is already in memory (training, evaluation); it has no golden
    /// vectors, so [`LoadedModel::run_golden`] passes trivially.
    pub fn from_net(
        net: Net,
        architecture: Architecture,
        input: InputSpec,
        output: OutputSpec,
        precision: Precision,
        device: &Device,
    ) -> LoadedModel {
        LoadedModel {
            plan: Plan::new(&net, input.channels, input.window),
            net,
            device: device.clone(),
            architecture,
            input,
            output,
            precision,
            golden: Golden {
                tolerance: 0.0,
                vectors: Vec::new(),
            },
        }
    }

    pub fn input(&self) -> &InputSpec {
        &self.input
    }

    pub fn output_spec(&self) -> &OutputSpec {
        &self.output
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    pub fn net(&self) -> &Net {
        &self.net
    }

    /// Floats in one input window.
    pub fn window_len(&self) -> usize {
        self.input.channels * self.input.window
    }

    /// Runs a batch of raw windows, `[window][channel][sample]`, normalizing them first.
    pub fn infer(&self, windows: &[f32]) -> Result<Output, ModelError> {
        let mut values = Vec::new();
        self.infer_into(windows, &mut values)?;
        Ok(match &self.output {
            OutputSpec::Classes { labels } => Output::Classes {
                classes: labels.len(),
                probabilities: values,
            },
            OutputSpec::AnomalyScore { threshold, .. } => Output::Anomaly {
                threshold: *threshold,
                scores: values,
            },
        })
    }

    /// [`LoadedModel::infer`]'s values (`[window][class]` probabilities or one score per
    /// window) written into `out` (cleared first). On flex with a [`Plan`] this allocates
    /// nothing once `out` has grown to the batch's size: the agent's steady state.
    pub fn infer_into(&self, windows: &[f32], out: &mut Vec<f32>) -> Result<(), ModelError> {
        out.clear();
        let (channels, window) = (self.input.channels, self.input.window);
        let per_window = self.window_len();
        if windows.is_empty() || !windows.len().is_multiple_of(per_window) {
            return Err(ModelError::InputLength {
                len: windows.len(),
                channels,
                window,
                per_window,
            });
        }
        if let Some(i) = windows.iter().position(|v| !v.is_finite()) {
            return Err(ModelError::NonFinite {
                window: i / per_window,
                channel: (i % per_window) / window,
                sample: i % window,
                value: windows[i],
            });
        }
        if let Some(plan) = &self.plan {
            plan.run_into(windows, &self.input.normalization, out);
            return Ok(());
        }
        self.run_modules(windows, out)
    }

    /// The network through burn's modules (GPU devices, int8 weights kept quantized).
    #[cfg(feature = "burn-modules")]
    fn run_modules(&self, windows: &[f32], out: &mut Vec<f32>) -> Result<(), ModelError> {
        use burn::tensor::TensorData;
        let (channels, window) = (self.input.channels, self.input.window);
        let per_window = self.window_len();
        let batch = windows.len() / per_window;
        let mut x = windows.to_vec();
        self.input.normalization.apply(&mut x, window);
        let values = self
            .net
            .outputs(Tensor::<3>::from_data(
                TensorData::new(x, [batch, channels, window]),
                &self.device,
            ))
            .try_into_vec_as::<f32>()
            .map_err(|e| ModelError::Backend {
                message: e.to_string(),
            })?;
        out.extend_from_slice(&values);
        Ok(())
    }

    /// Never reached: without `burn-modules` every loaded model has a plan (`load_with`
    /// refuses the others) and `from_net` networks are on flex.
    #[cfg(not(feature = "burn-modules"))]
    fn run_modules(&self, _windows: &[f32], _out: &mut Vec<f32>) -> Result<(), ModelError> {
        Err(ModelError::Unplanned {
            architecture: self.architecture.kind().to_string(),
            reason: "the network is not on flex or its sizes do not chain",
        })
    }

    /// Whether this model runs through an inference [`Plan`] (flex, f32 weights) rather than
    /// burn's modules.
    pub fn planned(&self) -> bool {
        self.plan.is_some()
    }

    /// Runs every golden vector (one at a time, as they were recorded) and compares.
    pub fn run_golden(&self) -> Result<(), ModelError> {
        for (index, v) in self.golden.vectors.iter().enumerate() {
            let out = self.infer(&v.input)?;
            // (output index, deviation); a NaN output deviates infinitely.
            let mut worst = (0usize, 0f32);
            for (i, (a, e)) in out.values().iter().zip(&v.output).enumerate() {
                let d = (a - e).abs();
                let d = if d.is_nan() { f32::INFINITY } else { d };
                if d > worst.1 {
                    worst = (i, d);
                }
            }
            let (i, d) = worst;
            if d > self.golden.tolerance {
                return Err(ModelError::Golden {
                    index,
                    note: v.note.clone(),
                    output: i,
                    actual: out.values()[i],
                    expected: v.output[i],
                    max_deviation: d,
                    tolerance: self.golden.tolerance,
                });
            }
        }
        Ok(())
    }

    /// The manifest's golden vectors (none for a model built with [`LoadedModel::from_net`]).
    pub fn golden(&self) -> &Golden {
        &self.golden
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The architecture this model was built from.
    pub fn architecture(&self) -> &Architecture {
        &self.architecture
    }
}

/// Decodes burnpack `weights` into a network of `architecture` on `device` (quantized
/// parameters stay quantized).
pub fn load_net(
    architecture: &Architecture,
    weights: &[u8],
    device: &Device,
) -> Result<Net, ModelError> {
    let record =
        ModuleRecord::from_bytes(Bytes::from_bytes_vec(weights.to_vec())).map_err(|e| {
            ModelError::Weights {
                message: e.to_string(),
            }
        })?;
    architecture
        .init_zeroed(device)?
        .try_load_record(record)
        .map_err(|e| ModelError::WeightsMismatch {
            message: e.to_string(),
        })
}
