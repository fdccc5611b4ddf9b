//! The model on the node (feature `inference`): the activity classifier of `models/` run with
//! burn's `no_std` flex backend, from the bundle compiled into the image (`build.rs`:
//! `EMBER_NODE_BUNDLE`, default `models/bundles/activity-int8.bundle`).
//!
//! The network is the one `ember_models::activity::ActivityCnn` defines (the same module
//! names, so the bundle's burnpack record loads into it; the same math as its
//! `forward_modules`), the input is normalized with the manifest's statistics and the output
//! is the softmax over the logits, as `ember_models::LoadedModel::infer` computes on the host.
//! int8 weights are dequantized once at load, as the agent does. [`golden`] holds the
//! manifest's golden vectors: the on-target tests hold the node to them.
//!
//! Memory: every tensor lives on the heap (the board's global allocator); the measured peak is
//! in docs/hil.md.

extern crate alloc;

use alloc::string::{String, ToString};
use alloc::vec::Vec;

use burn::module::{Module, ModuleMapper, Param};
use burn::nn::conv::{Conv1d, Conv1dConfig};
use burn::nn::pool::{AdaptiveAvgPool1d, AdaptiveAvgPool1dConfig, MaxPool1d, MaxPool1dConfig};
use burn::nn::{Initializer, Linear, LinearConfig, PaddingConfig1d, Relu};
use burn::store::ModuleRecord;
use burn::tensor::{Bytes, Device, Tensor, TensorData};
use ember_proto::node::ModelInfo;

mod generated {
    include!(concat!(env!("OUT_DIR"), "/model.rs"));
}

pub use generated::{CHANNELS, HOP, LABELS, NAME, OUTPUTS, PRECISION, VERSION, WINDOW};

/// Values in one input window (`[channel][sample]`).
pub const WINDOW_LEN: usize = CHANNELS * WINDOW;

/// The manifest's golden vectors: raw input windows and the outputs the model must give.
pub mod golden {
    pub use super::generated::{
        GOLDEN_INPUTS as INPUTS, GOLDEN_NOTES as NOTES, GOLDEN_OUTPUTS as OUTPUTS,
        GOLDEN_TOLERANCE as TOLERANCE,
    };
}

/// Why the model could not be loaded.
#[derive(Debug)]
pub enum ModelError {
    /// The compiled-in weights are not a burnpack record.
    Weights(String),
    /// They do not fit the architecture (a bundle of another shape).
    Mismatch(String),
}

/// The activity classifier (`ember_models::activity::ActivityCnn`'s modules, same names).
#[derive(Module, Debug)]
pub struct ActivityCnn {
    conv1: Conv1d,
    conv2: Conv1d,
    conv3: Conv1d,
    pool: MaxPool1d,
    gap: AdaptiveAvgPool1d,
    head: Linear,
    relu: Relu,
}

impl ActivityCnn {
    /// A zero-initialized network of the bundle's architecture, to load the weights into.
    fn zeroed(device: &Device) -> ActivityCnn {
        let conv = |c_in: usize, c_out: usize| {
            Conv1dConfig::new(c_in, c_out, generated::KERNEL_SIZE)
                .with_padding(PaddingConfig1d::Same)
                .with_initializer(Initializer::Zeros)
                .init(device)
        };
        let hidden = generated::HIDDEN;
        ActivityCnn {
            conv1: conv(CHANNELS, hidden),
            conv2: conv(hidden, 2 * hidden),
            conv3: conv(2 * hidden, 2 * hidden),
            pool: MaxPool1dConfig::new(2).init(),
            gap: AdaptiveAvgPool1dConfig::new(1).init(),
            head: LinearConfig::new(2 * hidden, OUTPUTS)
                .with_initializer(Initializer::Zeros)
                .init(device),
            relu: Relu::new(),
        }
    }

    /// Class probabilities for a batch of normalized windows.
    fn probabilities(&self, x: Tensor<3>) -> Tensor<2> {
        // x: [batch, channels, window]
        let x = max_pool2(self.relu.forward(self.conv1.forward(x)));
        // [batch, hidden, window / 2]
        let x = max_pool2(self.relu.forward(self.conv2.forward(x)));
        // [batch, 2 hidden, window / 4]
        let x = self.relu.forward(self.conv3.forward(x));
        // Global average pooling over time (what `self.gap` computes), as the host runs it.
        let x: Tensor<2> = x.mean_dim(2).flatten(1, 2);
        // [batch, 2 hidden]
        burn::tensor::activation::softmax(self.head.forward(x), 1)
        // [batch, classes]
    }
}

/// `MaxPool1d(2)` as a reshape and `max_dim`, as `ember_models` runs it (same values; a
/// trailing odd step is dropped, as the pool does).
fn max_pool2(x: Tensor<3>) -> Tensor<3> {
    let [batch, channels, length] = x.dims();
    let out = length / 2;
    let x = if out * 2 == length {
        x
    } else {
        x.narrow(2, 0, out * 2)
    };
    x.reshape([batch, channels, out, 2])
        .max_dim(3)
        .reshape([batch, channels, out])
}

struct Dequantizer;

impl ModuleMapper for Dequantizer {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        param.map(|tensor| tensor.dequantize())
    }
}

/// The loaded model.
pub struct NodeModel {
    net: ActivityCnn,
    device: Device,
}

impl NodeModel {
    /// Decodes the compiled-in weights (int8 dequantized once, here).
    pub fn load() -> Result<NodeModel, ModelError> {
        let device = Device::flex();
        let record = ModuleRecord::from_bytes(Bytes::from_bytes_vec(generated::WEIGHTS.to_vec()))
            .map_err(|e| ModelError::Weights(e.to_string()))?;
        let net = ActivityCnn::zeroed(&device)
            .try_load_record(record)
            .map_err(|e| ModelError::Mismatch(e.to_string()))?
            .map(&mut Dequantizer);
        Ok(NodeModel { net, device })
    }

    /// What the node announces about its model ([`ember_proto::node::NodeFrame::Model`]).
    pub fn info() -> ModelInfo {
        ModelInfo {
            weights_sha256: generated::WEIGHTS_SHA256_PREFIX,
            window: WINDOW as u16,
            hop: HOP as u16,
            outputs: OUTPUTS as u8,
        }
    }

    /// The model's outputs for one raw window (`[channel][sample]`, [`WINDOW_LEN`] values):
    /// normalized with the manifest's statistics, then the network; `None` if the backend
    /// returned something other than [`OUTPUTS`] numbers.
    pub fn infer(&self, window: &[f32; WINDOW_LEN]) -> Option<[f32; OUTPUTS]> {
        let mut x: Vec<f32> = window.to_vec();
        for (c, channel) in x.chunks_exact_mut(WINDOW).enumerate() {
            let (mean, std) = (generated::MEAN[c], generated::STD[c]);
            for v in channel {
                *v = (*v - mean) / std;
            }
        }
        let x = Tensor::<3>::from_data(TensorData::new(x, [1, CHANNELS, WINDOW]), &self.device);
        let values = self
            .net
            .probabilities(x)
            .into_data()
            .try_into_vec::<f32>()
            .ok()?;
        values.try_into().ok()
    }
}

/// The index of the largest output (the predicted class), as the host's argmax picks it.
pub fn argmax(outputs: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in outputs.iter().enumerate() {
        if *v > outputs[best] {
            best = i;
        }
    }
    best
}
