//! Post-training int8 quantization of the weights, and dequantization at load.
//!
//! burn's CPU backends dequantize a quantized weight to f32 on every use (there is no integer
//! matmul on flex), so int8 weights make the bundle ≈ 3.7× smaller, not inference faster.
//! [`dequantize`] converts them back once, at load, so inference runs at f32 speed.

use burn::module::{ModuleMapper, Param, Quantizer};
use burn::prelude::*;
use burn::tensor::quantization::{Calibration, QuantScheme, QuantStore, QuantValue, ScaleDtype};

use crate::model::Net;

/// Recorded in the manifest of int8 bundles.
pub const INT8_SCHEME: &str = "burn 0.22 Q8S: symmetric int8, one f32 scale per tensor, min-max calibration, native i8 storage";

/// The scheme behind [`INT8_SCHEME`].
pub fn int8_scheme() -> QuantScheme {
    QuantScheme::default()
        .with_value(QuantValue::Q8S)
        .with_store(QuantStore::Native)
        .per_tensor(ScaleDtype::F32)
}

/// Quantizes every float parameter (weights and biases) to int8.
pub fn quantize_int8(net: Net) -> Net {
    let mut quantizer = Quantizer::new(Calibration::MinMax, int8_scheme());
    net.map(&mut quantizer)
}

/// Converts quantized parameters back to f32 (a no-op for f32 parameters).
pub fn dequantize(net: Net) -> Net {
    net.map(&mut Dequantizer)
}

struct Dequantizer;

impl ModuleMapper for Dequantizer {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        param.map(|tensor| tensor.dequantize())
    }
}
