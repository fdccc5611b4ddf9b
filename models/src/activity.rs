//! `activity`: a small 1-D CNN that classifies a window of IMU samples into an activity.
//!
//! Three same-padded convolutions (two followed by max pooling) extract local motion patterns,
//! global average pooling makes the features independent of where in the window they occur,
//! and a linear head gives one logit per class. Global pooling is why a model trained on whole
//! 10 s BasicMotions series also applies to any window of the same length cut from a stream.

use burn::nn::conv::{Conv1d, Conv1dConfig};
use burn::nn::pool::{AdaptiveAvgPool1d, AdaptiveAvgPool1dConfig, MaxPool1d, MaxPool1dConfig};
use burn::nn::{Initializer, Linear, LinearConfig, PaddingConfig1d, Relu};
use burn::prelude::*;

use crate::model::ArchitectureError;

/// Architecture of [`ActivityCnn`]; saved in the bundle manifest beside the weights.
#[derive(Config, Debug)]
pub struct ActivityCnnConfig {
    /// Input channels (6 for a 3-axis accelerometer plus a 3-axis gyroscope).
    pub channels: usize,
    /// Samples per window.
    pub window: usize,
    /// Number of classes (the length of the manifest's label list).
    pub num_classes: usize,
    /// Channels of the first convolution; the next two have twice as many.
    #[config(default = 16)]
    pub hidden: usize,
    /// Kernel size of the convolutions (odd, so "same" padding is symmetric).
    #[config(default = 5)]
    pub kernel_size: usize,
}

/// The activity classifier. `forward` returns logits; apply softmax for probabilities.
#[derive(Module, Debug)]
pub struct ActivityCnn {
    pub(crate) conv1: Conv1d,
    pub(crate) conv2: Conv1d,
    pub(crate) conv3: Conv1d,
    pub(crate) pool: MaxPool1d,
    pub(crate) gap: AdaptiveAvgPool1d,
    pub(crate) head: Linear,
    pub(crate) relu: Relu,
}

impl ActivityCnnConfig {
    /// Checks the sizes before any tensor is allocated, so a bad manifest is an error, not a panic.
    pub fn check(&self) -> Result<(), ArchitectureError> {
        let bad = |problem: String| Err(ArchitectureError { problem });
        if !(1..=crate::model::MAX_CHANNELS).contains(&self.channels) {
            return bad(format!(
                "channels is {}; use 1 to {}",
                self.channels,
                crate::model::MAX_CHANNELS
            ));
        }
        if self.window < 4 || self.window > crate::model::MAX_WINDOW {
            return bad(format!(
                "window is {}; use 4 to {}",
                self.window,
                crate::model::MAX_WINDOW
            ));
        }
        if !(2..=1024).contains(&self.num_classes) {
            return bad(format!(
                "num_classes is {}; use 2 to 1024",
                self.num_classes
            ));
        }
        if !(1..=crate::model::MAX_HIDDEN).contains(&self.hidden) {
            return bad(format!(
                "hidden is {}; use 1 to {}",
                self.hidden,
                crate::model::MAX_HIDDEN
            ));
        }
        if self.kernel_size.is_multiple_of(2)
            || self.kernel_size > 31
            || self.kernel_size > self.window
        {
            return bad(format!(
                "kernel_size is {}; use an odd size up to 31 and no larger than the window",
                self.kernel_size
            ));
        }
        Ok(())
    }

    /// A randomly initialized model (burn's initializers; seed the device first to reproduce).
    pub fn init(&self, device: &Device) -> ActivityCnn {
        self.build(device, None)
    }

    /// A zero-initialized model, to load weights into: draws nothing from the device's RNG.
    pub fn init_zeroed(&self, device: &Device) -> ActivityCnn {
        self.build(device, Some(Initializer::Zeros))
    }

    fn build(&self, device: &Device, init: Option<Initializer>) -> ActivityCnn {
        let conv = |c_in: usize, c_out: usize| {
            let config = Conv1dConfig::new(c_in, c_out, self.kernel_size)
                .with_padding(PaddingConfig1d::Same);
            match &init {
                Some(i) => config.with_initializer(i.clone()).init(device),
                None => config.init(device),
            }
        };
        let wide = 2 * self.hidden;
        let head = LinearConfig::new(wide, self.num_classes);
        let head = match &init {
            Some(i) => head.with_initializer(i.clone()).init(device),
            None => head.init(device),
        };
        ActivityCnn {
            conv1: conv(self.channels, self.hidden),
            conv2: conv(self.hidden, wide),
            conv3: conv(wide, wide),
            pool: MaxPool1dConfig::new(2).init(),
            gap: AdaptiveAvgPool1dConfig::new(1).init(),
            head,
            relu: Relu::new(),
        }
    }
}

impl ActivityCnn {
    /// Logits for a batch of normalized windows.
    ///
    /// The same math as [`ActivityCnn::forward_modules`] (the burn modules' own `forward`),
    /// computed time-major ([`conv1d_nlc`]): each convolution is one matrix product over
    /// sliding windows, which flex runs 1.1–2.6× faster than its conv kernel at these sizes
    /// (docs/benchmarks.md). Results agree to float rounding (summation order). Off flex
    /// ([`crate::backend::is_flex`]) it is `forward_modules`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<2> {
        if !self.nlc_applies() || !crate::backend::is_flex(&x.device()) {
            return self.forward_modules(x);
        }
        // x: [batch, channels, window] -> time-major view [batch, window, channels]
        let x = x.swap_dims(1, 2);
        // Max pooling commutes with the (per-channel, monotonic) bias add and ReLU, bit for
        // bit, so it runs first, on twice as many values but before two elementwise passes
        // over them.
        let x = self.max_pool_nlc(conv1d_nlc(&self.conv1, x, false));
        let x = bias_relu_nlc(&self.conv1, x);
        // [batch, window / 2, hidden]
        let x = self.max_pool_nlc(conv1d_nlc(&self.conv2, x, false));
        let x = bias_relu_nlc(&self.conv2, x);
        // [batch, window / 4, 2 hidden]
        let x = self.relu.forward(conv1d_nlc(&self.conv3, x, true));
        // [batch, window / 4, 2 hidden]
        // Global average pooling over time: what `self.gap` (AdaptiveAvgPool1d to 1) computes.
        let x: Tensor<2> = x.mean_dim(1).flatten(1, 2);
        // [batch, 2 hidden]
        self.head.forward(x)
        // [batch, num_classes]
    }

    /// Logits through the burn modules' own `forward` (channel-major, flex's conv kernel):
    /// the reference [`ActivityCnn::forward`] is tested against, and the path for layer
    /// settings the time-major formulation does not cover.
    pub fn forward_modules(&self, x: Tensor<3>) -> Tensor<2> {
        // x: [batch, channels, window]
        let x = self.max_pool(self.relu.forward(self.conv1.forward(x)));
        // [batch, hidden, window / 2]
        let x = self.max_pool(self.relu.forward(self.conv2.forward(x)));
        // [batch, 2 hidden, window / 4]
        let x = self.relu.forward(self.conv3.forward(x));
        // [batch, 2 hidden, window / 4]
        // Global average pooling: what `self.gap` (AdaptiveAvgPool1d to 1) computes, as a
        // mean over the time axis, which flex runs ≈ 5× faster (docs/benchmarks.md).
        let x: Tensor<2> = x.mean_dim(2).flatten(1, 2);
        // [batch, 2 hidden]
        self.head.forward(x)
        // [batch, num_classes]
    }

    /// Whether every layer has the settings `forward`'s time-major path implements (always,
    /// for models built by [`ActivityCnnConfig`]; checked so a hand-built module stays right).
    fn nlc_applies(&self) -> bool {
        let pool = &self.pool;
        [&self.conv1, &self.conv2, &self.conv3]
            .iter()
            .all(|c| conv1d_nlc_applies(c))
            && pool.stride == pool.kernel_size
            && pool.dilation == 1
            && !pool.ceil_mode
            && matches!(pool.padding, PaddingConfig1d::Valid)
    }

    /// `self.pool` on a time-major map: the maximum over each window of `kernel_size` steps.
    fn max_pool_nlc(&self, x: Tensor<3>) -> Tensor<3> {
        max_pool_nlc(x, self.pool.kernel_size)
    }

    /// `self.pool` (MaxPool1d): for non-overlapping windows without padding or dilation, the
    /// maximum over each window as a reshape + `max_dim`, which flex runs ≈ 5–10× faster than
    /// its pooling kernel (docs/benchmarks.md). Same values (and the same gradient: to the
    /// maximum of each window); a trailing partial window is dropped, as the pool does.
    fn max_pool(&self, x: Tensor<3>) -> Tensor<3> {
        let pool = &self.pool;
        let k = pool.kernel_size;
        if pool.stride != k
            || pool.dilation != 1
            || pool.ceil_mode
            || !matches!(pool.padding, PaddingConfig1d::Valid)
        {
            return pool.forward(x);
        }
        let [batch, channels, length] = x.dims();
        let out = length / k;
        let x = if out * k == length {
            x
        } else {
            x.narrow(2, 0, out * k)
        };
        x.reshape([batch, channels, out, k])
            .max_dim(3)
            .reshape([batch, channels, out])
    }

    /// Class probabilities (softmax over the logits).
    pub fn probabilities(&self, x: Tensor<3>) -> Tensor<2> {
        burn::tensor::activation::softmax(self.forward(x), 1)
    }
}

/// Whether [`conv1d_nlc`] computes what `conv.forward` does: ungrouped, undilated, and padding
/// known without the input length ("same" padding only at stride 1, odd kernel).
pub fn conv1d_nlc_applies(conv: &Conv1d) -> bool {
    conv.groups == 1 && conv.dilation == 1 && conv1d_padding(conv).is_some()
}

pub(crate) fn conv1d_padding(conv: &Conv1d) -> Option<(usize, usize)> {
    match conv.padding {
        PaddingConfig1d::Valid => Some((0, 0)),
        PaddingConfig1d::Explicit(left, right) => Some((left, right)),
        PaddingConfig1d::Same if conv.stride == 1 && conv.kernel_size % 2 == 1 => {
            let p = (conv.kernel_size - 1) / 2;
            Some((p, p))
        }
        _ => None,
    }
}

/// `conv.forward` on a time-major map ([batch, length, channels] in and out), as one matrix
/// product: zero-pad the time axis, view each output step's receptive field (kernel_size
/// consecutive steps × all channels, contiguous in time-major layout) as a row with `unfold`
/// (a strided view, no copy), and multiply by the weights arranged [kernel × c_in, c_out].
/// flex's own conv kernel instead converts the input to channels-last and re-flattens the
/// weights on every call, then gathers an im2col buffer; this does one small weight copy and
/// one GEMM on the padded input directly. With `with_bias` false the caller adds the bias
/// ([`bias_relu_nlc`]). Callers check [`conv1d_nlc_applies`] first.
pub fn conv1d_nlc(conv: &Conv1d, x: Tensor<3>, with_bias: bool) -> Tensor<3> {
    // x: [batch, length, c_in]
    let [_, _, c_in] = x.dims();
    let [c_out, _, k] = conv.weight.dims();
    let pad = conv1d_padding(conv).unwrap_or((0, 0));
    let rows = unfold_rows(x, k, conv.stride, pad, c_in);
    // [batch, out, k × c_in]: row t = padded steps t·stride .. t·stride + k, all channels
    // The weights as [k × c_in, c_out], row (j, c) = weight[:, c, j]: a transposed view of
    // the [c_out, k, c_in] copy, which flex makes with its batched 2-D transpose (a direct
    // permute to [k, c_in, c_out] takes its element-by-element path, ≈ 10× slower).
    let weight = conv
        .weight
        .val()
        .swap_dims(1, 2)
        .reshape([c_out, k * c_in])
        .transpose()
        .unsqueeze_dim::<3>(0);
    // [1, k × c_in, c_out]
    let y = rows.matmul(weight);
    // [batch, out, c_out]
    match (&conv.bias, with_bias) {
        (Some(bias), true) => y + bias.val().reshape([1, 1, c_out]),
        _ => y,
    }
}

/// Max pooling over non-overlapping windows of `k` steps on a time-major map (a trailing
/// partial window is dropped, as `MaxPool1d` does).
pub(crate) fn max_pool_nlc(x: Tensor<3>, k: usize) -> Tensor<3> {
    // x: [batch, length, channels]
    let [batch, length, channels] = x.dims();
    let out = length / k;
    let x = if out * k == length {
        x
    } else {
        x.narrow(1, 0, out * k)
    };
    x.reshape([batch, out, k, channels])
        .max_dim(2)
        .reshape([batch, out, channels])
    // [batch, length / k, channels]
}

/// Each output step's receptive field as one row: zero-pad the time axis, then view windows
/// of `kernel` steps × all channels (contiguous in time-major layout) with `unfold`, a
/// strided view (overlapping rows, no copy).
pub(crate) fn unfold_rows(
    x: Tensor<3>,
    kernel: usize,
    stride: usize,
    (left, right): (usize, usize),
    c_in: usize,
) -> Tensor<3> {
    // x: [batch, length, c_in]
    let [batch, length, _] = x.dims();
    let x = if left + right > 0 {
        x.pad([(left, right), (0, 0)], 0.0f32)
    } else {
        x
    };
    let padded = length + left + right;
    x.reshape([batch, padded * c_in])
        .unfold(1, kernel * c_in, stride * c_in)
    // [batch, out, kernel × c_in]
}

/// `relu(x + conv.bias)` on a time-major map ([batch, length, c_out]).
fn bias_relu_nlc(conv: &Conv1d, x: Tensor<3>) -> Tensor<3> {
    let x = match &conv.bias {
        Some(bias) => {
            let [_, _, c_out] = x.dims();
            x + bias.val().reshape([1, 1, c_out])
        }
        None => x,
    };
    burn::tensor::activation::relu(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fast formulations in `forward` compute what the modules they stand in for do.
    #[test]
    fn pooling_rewrites_match_burn_modules() {
        let device = Device::flex();
        let model = ActivityCnnConfig::new(6, 100, 4).init(&device);
        for length in [100usize, 50, 25, 7] {
            let x =
                Tensor::<3>::random([3, 8, length], burn::tensor::Distribution::Default, &device);
            let fast = model.max_pool(x.clone()).into_data();
            let reference = model.pool.forward(x.clone()).into_data();
            fast.assert_eq(&reference, true);
            let fast = x.clone().mean_dim(2).into_data();
            let reference = model.gap.forward(x).into_data();
            fast.assert_approx_eq::<f32>(&reference, burn::tensor::Tolerance::absolute(1e-6));
        }
    }

    /// The time-major `forward` computes what the burn modules do, on random weights and
    /// inputs, for even and odd lengths (a trailing partial pooling window) and batches.
    #[test]
    fn time_major_forward_matches_burn_modules() {
        let device = Device::flex();
        for (channels, window, hidden, kernel, batch) in [
            (6usize, 100usize, 16usize, 5usize, 1usize),
            (6, 100, 16, 5, 4),
            (3, 37, 8, 3, 2),
            (1, 9, 4, 7, 3),
        ] {
            let model = ActivityCnnConfig::new(channels, window, 5)
                .with_hidden(hidden)
                .with_kernel_size(kernel)
                .init(&device);
            assert!(model.nlc_applies());
            let x = Tensor::<3>::random(
                [batch, channels, window],
                burn::tensor::Distribution::Normal(0.0, 2.0),
                &device,
            );
            let fast = model.forward(x.clone()).into_data();
            let reference = model.forward_modules(x).into_data();
            fast.assert_approx_eq::<f32>(&reference, burn::tensor::Tolerance::absolute(1e-5));
        }
    }
}
