//! The two architectures behind one type, so bundles, the runner and the CLI handle either.

use burn::module::{Module, ModuleMapper, Param, ParamId};
use burn::prelude::*;
use burn::store::{ModuleRecord, RecordError};
use serde::{Deserialize, Serialize};

use crate::activity::{ActivityCnn, ActivityCnnConfig};
use crate::anomaly::{ConvAutoencoder, ConvAutoencoderConfig};

/// Largest channel count a manifest may declare (a bound on what a bad manifest can allocate).
pub const MAX_CHANNELS: usize = 256;
/// Largest window a manifest may declare, in samples.
pub const MAX_WINDOW: usize = 1 << 16;
/// Largest layer width a manifest may declare (with the other bounds, a model stays under
/// ≈ 10 M parameters however the manifest is written).
pub const MAX_HIDDEN: usize = 256;

/// An architecture whose sizes do not make a model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid architecture: {problem}")]
pub struct ArchitectureError {
    pub problem: String,
}

/// Which model a bundle holds and its sizes (the burn `Config` of that model).
///
/// Serialized as `{"kind": "activity", ...config fields}` or `{"kind": "anomaly", ...}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Architecture {
    Activity(ActivityCnnConfig),
    Anomaly(ConvAutoencoderConfig),
}

impl Architecture {
    /// `"activity"` or `"anomaly"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Architecture::Activity(_) => "activity",
            Architecture::Anomaly(_) => "anomaly",
        }
    }

    pub fn channels(&self) -> usize {
        match self {
            Architecture::Activity(c) => c.channels,
            Architecture::Anomaly(c) => c.channels,
        }
    }

    pub fn window(&self) -> usize {
        match self {
            Architecture::Activity(c) => c.window,
            Architecture::Anomaly(c) => c.window,
        }
    }

    /// Values the model outputs per window: one probability per class, or one score.
    pub fn outputs_per_window(&self) -> usize {
        match self {
            Architecture::Activity(c) => c.num_classes,
            Architecture::Anomaly(_) => 1,
        }
    }

    pub fn check(&self) -> Result<(), ArchitectureError> {
        match self {
            Architecture::Activity(c) => c.check(),
            Architecture::Anomaly(c) => c.check(),
        }
    }

    /// A randomly initialized network (seed the device first to reproduce it).
    pub fn init(&self, device: &Device) -> Result<Net, ArchitectureError> {
        self.check()?;
        Ok(match self {
            Architecture::Activity(c) => Net::Activity(c.init(device)),
            Architecture::Anomaly(c) => Net::Anomaly(c.init(device)),
        })
    }

    /// A zero-initialized network to load weights into.
    pub fn init_zeroed(&self, device: &Device) -> Result<Net, ArchitectureError> {
        self.check()?;
        Ok(match self {
            Architecture::Activity(c) => Net::Activity(c.init_zeroed(device)),
            Architecture::Anomaly(c) => Net::Anomaly(c.init_zeroed(device)),
        })
    }
}

/// A network of either architecture.
// One per loaded model: boxing the larger variant would save a few hundred bytes once.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Net {
    Activity(ActivityCnn),
    Anomaly(ConvAutoencoder),
}

impl Net {
    /// Per-window outputs for a batch of normalized windows: class probabilities
    /// `[batch, classes]`, or the reconstruction error as `[batch, 1]`.
    pub fn outputs(&self, x: Tensor<3>) -> Tensor<2> {
        match self {
            Net::Activity(m) => m.probabilities(x),
            Net::Anomaly(m) => m.score(x).unsqueeze_dim(1),
        }
    }

    /// The weights as a burn record (burnpack bytes via `into_bytes`).
    pub fn into_record(self) -> ModuleRecord {
        match self {
            Net::Activity(m) => m.into_record(),
            Net::Anomaly(m) => m.into_record(),
        }
    }

    /// The weights as burnpack bytes, with parameter ids renumbered 0, 1, 2... so the same
    /// weights always give the same bytes (burn draws ids at random when it creates a module).
    pub fn to_burnpack(self) -> Result<Vec<u8>, RecordError> {
        let net = self.map(&mut Renumber(0));
        Ok(net.into_record().into_bytes()?.to_vec())
    }

    /// Applies a record; a shape mismatch or a missing tensor is an error, not a panic.
    pub fn try_load_record(self, record: ModuleRecord) -> Result<Self, RecordError> {
        Ok(match self {
            Net::Activity(m) => Net::Activity(m.try_load_record(record)?),
            Net::Anomaly(m) => Net::Anomaly(m.try_load_record(record)?),
        })
    }

    /// Applies a module mapper (quantization, dequantization) to every parameter.
    pub fn map<M: burn::module::ModuleMapper>(self, mapper: &mut M) -> Self {
        match self {
            Net::Activity(m) => Net::Activity(m.map(mapper)),
            Net::Anomaly(m) => Net::Anomaly(m.map(mapper)),
        }
    }

    /// Moves every parameter to `device`; across backends (flex to wgpu) the values go
    /// through host memory.
    pub fn to_device(self, device: &Device) -> Self {
        match self {
            Net::Activity(m) => Net::Activity(m.to_device(device)),
            Net::Anomaly(m) => Net::Anomaly(m.to_device(device)),
        }
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        match self {
            Net::Activity(m) => m.head.weight.device(),
            Net::Anomaly(m) => m.enc1.weight.device(),
        }
    }

    pub fn num_params(&self) -> usize {
        match self {
            Net::Activity(m) => m.num_params(),
            Net::Anomaly(m) => m.num_params(),
        }
    }
}

struct Renumber(u64);

impl ModuleMapper for Renumber {
    fn map_float<const D: usize>(&mut self, mut param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        param.id = ParamId::from(self.0);
        self.0 += 1;
        param
    }
}
