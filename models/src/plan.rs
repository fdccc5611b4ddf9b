//! Inference plans: a loaded model's weights laid out once, at load, the way its time-major
//! forward pass multiplies them.
//!
//! The modules' own `forward` ([`ActivityCnn::forward`], [`ConvAutoencoder::forward`]) must
//! stay differentiable for training, so every call rearranges each convolution's weights from
//! burn's `[c_out, c_in, kernel]` into the `[kernel × c_in, c_out]` matrix the time-major
//! product needs, and multiplies through a transposed view. A [`Plan`] does that once, on the
//! host, and keeps the result as contiguous tensors on the model's device; the autoencoder's
//! transposed convolutions become one product each as well (polyphase form, below), so its
//! whole network runs time-major. Measured in `docs/benchmarks.md`.
//!
//! **Invariant:** a plan computes what the network's `forward` computes, up to float
//! summation order: unit tests compare them on random weights and inputs, and
//! [`LoadedModel`](crate::LoadedModel) runs the bundle's golden vectors through the plan
//! before serving. A layer the plan does not cover (settings a hand-built module may have)
//! makes [`Plan::new`] return `None`, and the loaded model runs the network itself.
//!
//! Plans are for inference only: their weights are plain tensors, not parameters, so no
//! gradient flows through them.

use burn::nn::conv::{Conv1d, ConvTranspose1d};
use burn::nn::{Linear, PaddingConfig1d};
use burn::prelude::*;
use burn::tensor::TensorData;

use crate::activity::{ActivityCnn, max_pool_nlc, unfold_rows};
use crate::anomaly::ConvAutoencoder;
use crate::model::Net;

/// A network with its weights laid out for inference; see the module documentation.
// One per loaded model: boxing the larger variant would save a few hundred bytes once.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Plan {
    Activity(ActivityPlan),
    Anomaly(AnomalyPlan),
}

impl Plan {
    /// The plan for `net`, or `None` when a layer has settings the plan does not implement
    /// (never for networks built from an [`Architecture`](crate::Architecture)) or when the
    /// network is not on flex ([`crate::backend::is_flex`]: the plan is a CPU formulation). The
    /// weights must be f32 (dequantize int8 first): they are read back to the host once.
    pub fn new(net: &Net) -> Option<Plan> {
        if !crate::backend::is_flex(&net.device()) {
            return None;
        }
        match net {
            Net::Activity(m) => ActivityPlan::new(m).map(Plan::Activity),
            Net::Anomaly(m) => AnomalyPlan::new(m).map(Plan::Anomaly),
        }
    }

    /// What [`Plan::outputs`] computes, as host values (`[batch × classes]` probabilities or
    /// `[batch]` errors), for normalized input `x` whose host copy is `normalized` (laid out
    /// `[window][channel][sample]`). The last, tiny step runs on the host: the softmax over a
    /// few logits, or the mean squared error against the input the caller already holds. On
    /// flex that saves the three to five tensor operations (each an allocation and a kernel
    /// call) that dominate at this size (docs/benchmarks.md); the error is summed in f64.
    pub fn output_values(&self, x: Tensor<3>, normalized: &[f32]) -> Result<Vec<f32>, String> {
        match self {
            Plan::Activity(p) => {
                let [_, classes] = p.head.weight.dims();
                let mut values = p
                    .forward(x)
                    .try_into_vec_as::<f32>()
                    .map_err(|e| e.to_string())?;
                values.chunks_mut(classes.max(1)).for_each(softmax_in_place);
                Ok(values)
            }
            Plan::Anomaly(p) => {
                let [batch, channels, window] = x.dims();
                let recon = p
                    .reconstruct_nlc(x)
                    .try_into_vec_as::<f32>()
                    .map_err(|e| e.to_string())?;
                // recon: [batch][sample][channel]; normalized: [batch][channel][sample]
                let per_window = channels * window;
                if recon.len() != batch * per_window || normalized.len() != recon.len() {
                    return Err(format!(
                        "reconstruction has {} values and the input {}, expected {}",
                        recon.len(),
                        normalized.len(),
                        batch * per_window
                    ));
                }
                Ok((0..batch)
                    .map(|b| {
                        let (r, x) = (&recon[b * per_window..], &normalized[b * per_window..]);
                        let mut sum = 0f64;
                        for t in 0..window {
                            for c in 0..channels {
                                let d = f64::from(r[t * channels + c] - x[c * window + t]);
                                sum += d * d;
                            }
                        }
                        (sum / per_window as f64) as f32
                    })
                    .collect())
            }
        }
    }

    /// What [`Net::outputs`] computes: class probabilities `[batch, classes]` or one
    /// reconstruction error per window `[batch, 1]`, for normalized `[batch, channels,
    /// window]` input.
    pub fn outputs(&self, x: Tensor<3>) -> Tensor<2> {
        match self {
            Plan::Activity(p) => burn::tensor::activation::softmax(p.forward(x), 1),
            Plan::Anomaly(p) => p.score(x).unsqueeze_dim(1),
        }
    }
}

/// [`ActivityCnn`] for inference.
#[derive(Debug, Clone)]
pub struct ActivityPlan {
    conv1: TimeMajorConv,
    conv2: TimeMajorConv,
    conv3: TimeMajorConv,
    pool: usize,
    head: Linear,
}

impl ActivityPlan {
    fn new(m: &ActivityCnn) -> Option<ActivityPlan> {
        let pool = &m.pool;
        let plain_pool = pool.stride == pool.kernel_size
            && pool.dilation == 1
            && !pool.ceil_mode
            && matches!(pool.padding, PaddingConfig1d::Valid);
        Some(ActivityPlan {
            conv1: TimeMajorConv::new(&m.conv1)?,
            conv2: TimeMajorConv::new(&m.conv2)?,
            conv3: TimeMajorConv::new(&m.conv3)?,
            pool: plain_pool.then_some(pool.kernel_size)?,
            head: m.head.clone(),
        })
    }

    /// Logits `[batch, classes]`, as [`ActivityCnn::forward`].
    pub fn forward(&self, x: Tensor<3>) -> Tensor<2> {
        // x: [batch, channels, window] -> time-major view [batch, window, channels]
        let x = x.swap_dims(1, 2);
        // Max pooling first, then bias and ReLU (monotonic per channel: the same values).
        let x = max_pool_nlc(self.conv1.forward(x, false), self.pool);
        let x = self.conv1.bias_relu(x);
        // [batch, window / 2, hidden]
        let x = max_pool_nlc(self.conv2.forward(x, false), self.pool);
        let x = self.conv2.bias_relu(x);
        // [batch, window / 4, 2 hidden]
        let x = burn::tensor::activation::relu(self.conv3.forward(x, true));
        // [batch, window / 4, 2 hidden] -> time mean [batch, 2 hidden]
        let x: Tensor<2> = x.mean_dim(1).flatten(1, 2);
        self.head.forward(x)
        // [batch, num_classes]
    }
}

/// [`ConvAutoencoder`] for inference, time-major from input to reconstruction.
#[derive(Debug, Clone)]
pub struct AnomalyPlan {
    enc1: TimeMajorConv,
    enc2: TimeMajorConv,
    bottleneck: TimeMajorConv,
    expand: TimeMajorConv,
    dec1: TimeMajorConvTranspose,
    dec2: TimeMajorConvTranspose,
}

impl AnomalyPlan {
    fn new(m: &ConvAutoencoder) -> Option<AnomalyPlan> {
        Some(AnomalyPlan {
            enc1: TimeMajorConv::new(&m.enc1)?,
            enc2: TimeMajorConv::new(&m.enc2)?,
            bottleneck: TimeMajorConv::new(&m.bottleneck)?,
            expand: TimeMajorConv::new(&m.expand)?,
            dec1: TimeMajorConvTranspose::new(&m.dec1)?,
            dec2: TimeMajorConvTranspose::new(&m.dec2)?,
        })
    }

    /// The reconstruction, time-major: `[batch, channels, window]` in, `[batch, window,
    /// channels]` out.
    fn reconstruct_nlc(&self, x: Tensor<3>) -> Tensor<3> {
        use burn::tensor::activation::relu;
        // x: [batch, channels, window] -> time-major view [batch, window, channels]
        let h = relu(self.enc1.forward(x.swap_dims(1, 2), true));
        // [batch, window / 2, hidden]
        let h = relu(self.enc2.forward(h, true));
        // [batch, window / 4, 2 hidden]
        let z = self.bottleneck.forward(h, true);
        // [batch, window / 4, latent]
        let h = relu(self.expand.forward(z, true));
        // [batch, window / 4, 2 hidden]
        let h = relu(self.dec1.forward(h));
        // [batch, window / 2, hidden]
        self.dec2.forward(h)
        // [batch, window, channels]
    }

    /// The reconstruction `[batch, channels, window]`, as [`ConvAutoencoder::forward`].
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.reconstruct_nlc(x).swap_dims(1, 2)
    }

    /// Mean squared reconstruction error per window `[batch]`, as
    /// [`ConvAutoencoder::score`]; compared time-major (the mean does not depend on order).
    pub fn score(&self, x: Tensor<3>) -> Tensor<1> {
        let recon = self.reconstruct_nlc(x.clone());
        let err: Tensor<2> = (recon - x.swap_dims(1, 2)).square().flatten(1, 2);
        // [batch, window × channels]
        err.mean_dim(1).squeeze_dim(1)
    }
}

/// Softmax of one window's logits, in place (max subtracted first, as burn's softmax does).
fn softmax_in_place(logits: &mut [f32]) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in logits.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in logits.iter_mut() {
        *v /= sum;
    }
}

/// The host copy of an f32 tensor's values, in logical (row-major) order (`None` for another
/// element type, e.g. weights still quantized).
fn host_values<const D: usize>(t: Tensor<D>) -> Option<Vec<f32>> {
    t.into_data().try_into_vec::<f32>().ok()
}

/// A bias `[c_out]` as the `[1, 1, c_out]` row a time-major map broadcasts against.
fn bias_row(bias: Tensor<1>, device: &Device) -> Option<Tensor<3>> {
    let [c_out] = bias.dims();
    Some(Tensor::from_data(
        TensorData::new(host_values(bias)?, [1, 1, c_out]),
        device,
    ))
}

/// A `Conv1d` as one matrix product on a time-major map; see `activity::conv1d_nlc`, which
/// computes the same with the weights rearranged on every call.
#[derive(Debug, Clone)]
struct TimeMajorConv {
    /// `[1, kernel × c_in, c_out]`, contiguous: row `j · c_in + c` is `weight[:, c, j]`.
    weight: Tensor<3>,
    /// `[1, 1, c_out]`
    bias: Option<Tensor<3>>,
    kernel: usize,
    stride: usize,
    pad: (usize, usize),
    c_in: usize,
}

impl TimeMajorConv {
    fn new(conv: &Conv1d) -> Option<TimeMajorConv> {
        if !crate::activity::conv1d_nlc_applies(conv) {
            return None;
        }
        let pad = crate::activity::conv1d_padding(conv)?;
        let [c_out, c_in, kernel] = conv.weight.dims();
        let device = conv.weight.device();
        let w = host_values(conv.weight.val())?;
        // w[o][c][j] -> rows (j, c), columns o
        let mut rows = vec![0f32; kernel * c_in * c_out];
        for o in 0..c_out {
            for c in 0..c_in {
                for j in 0..kernel {
                    rows[(j * c_in + c) * c_out + o] = w[(o * c_in + c) * kernel + j];
                }
            }
        }
        let weight = Tensor::from_data(TensorData::new(rows, [1, kernel * c_in, c_out]), &device);
        let bias = match &conv.bias {
            Some(b) => Some(bias_row(b.val(), &device)?),
            None => None,
        };
        Some(TimeMajorConv {
            weight,
            bias,
            kernel,
            stride: conv.stride,
            pad,
            c_in,
        })
    }

    /// `[batch, length, c_in]` -> `[batch, out, c_out]`; without the bias when `with_bias` is
    /// false (the caller adds it with [`TimeMajorConv::bias_relu`]).
    fn forward(&self, x: Tensor<3>, with_bias: bool) -> Tensor<3> {
        let rows = unfold_rows(x, self.kernel, self.stride, self.pad, self.c_in);
        // [batch, out, kernel × c_in]
        let y = rows.matmul(self.weight.clone());
        match (&self.bias, with_bias) {
            (Some(b), true) => y + b.clone(),
            _ => y,
        }
    }

    /// `relu(x + bias)` on this layer's time-major output.
    fn bias_relu(&self, x: Tensor<3>) -> Tensor<3> {
        let x = match &self.bias {
            Some(b) => x + b.clone(),
            None => x,
        };
        burn::tensor::activation::relu(x)
    }
}

/// A `ConvTranspose1d` whose output is exactly `stride ×` its input's length, as one matrix
/// product on a time-major map (polyphase form).
///
/// Output step `t = stride · m + r` sums `x[i] · w[:, :, j]` over the `i` with
/// `j = t + padding − stride · i` inside the kernel. For each input step `m` the outputs of
/// all `stride` phases `r` read the same few neighbours `x[m − d]`, `d` in
/// `d_min ..= d_max`: one row of `taps = d_max − d_min + 1` steps × `c_in` values (padded,
/// unfolded, as for a convolution) times a `[taps × c_in, stride × c_out]` matrix (zero where
/// a tap does not reach a phase) gives, per `m`, the `stride` output steps side by side,
/// which a reshape interleaves into time order. For kernel 4, stride 2, padding 1 (the
/// autoencoder's): taps `x[m − 1], x[m], x[m + 1]`; even outputs use kernel taps 3 and 1,
/// odd outputs taps 2 and 0.
#[derive(Debug, Clone)]
struct TimeMajorConvTranspose {
    /// `[1, taps × c_in, stride × c_out]`, contiguous.
    weight: Tensor<3>,
    /// `[1, 1, c_out]`
    bias: Option<Tensor<3>>,
    taps: usize,
    stride: usize,
    pad: (usize, usize),
    c_in: usize,
    c_out: usize,
}

impl TimeMajorConvTranspose {
    fn new(conv: &ConvTranspose1d) -> Option<TimeMajorConvTranspose> {
        let (k, s, p) = (conv.kernel_size, conv.stride, conv.padding);
        // Output length (L − 1)·s − 2p + k + padding_out must be s·L.
        if conv.groups != 1 || conv.dilation != 1 || conv.padding_out != 0 || k != s + 2 * p {
            return None;
        }
        let [c_in, c_out, kernel] = conv.weight.dims();
        if kernel != k || s == 0 {
            return None;
        }
        let (k, s, p) = (k as isize, s as isize, p as isize);
        // The kernel tap that input step m − d contributes to phase r, if any.
        let tap = |r: isize, d: isize| {
            let j = r + p + s * d;
            (0..k).contains(&j).then_some(j as usize)
        };
        let reach = -k..=k;
        let ds: Vec<isize> = reach
            .filter(|&d| (0..s).any(|r| tap(r, d).is_some()))
            .collect();
        let (d_min, d_max) = (*ds.first()?, *ds.last()?);
        // With k = s + 2p every output reads from m − d_max ..= m − d_min, d_min ≤ 0 ≤ d_max.
        if d_min > 0 || d_max < 0 {
            return None;
        }
        let taps = (d_max - d_min + 1) as usize;
        let w = host_values(conv.weight.val())?; // [c_in][c_out][k]
        let cols = s as usize * c_out;
        let mut rows = vec![0f32; taps * c_in * cols];
        for q in 0..taps {
            let d = d_max - q as isize; // row block q reads x[m − d_max + q]
            for r in 0..s {
                let Some(j) = tap(r, d) else { continue };
                for c in 0..c_in {
                    for o in 0..c_out {
                        rows[(q * c_in + c) * cols + r as usize * c_out + o] =
                            w[(c * c_out + o) * kernel + j];
                    }
                }
            }
        }
        let device = conv.weight.device();
        let weight = Tensor::from_data(TensorData::new(rows, [1, taps * c_in, cols]), &device);
        let bias = match &conv.bias {
            Some(b) => Some(bias_row(b.val(), &device)?),
            None => None,
        };
        Some(TimeMajorConvTranspose {
            weight,
            bias,
            taps,
            stride: s as usize,
            pad: (d_max as usize, (-d_min) as usize),
            c_in,
            c_out,
        })
    }

    /// `[batch, length, c_in]` -> `[batch, stride × length, c_out]`.
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [batch, length, _] = x.dims();
        let rows = unfold_rows(x, self.taps, 1, self.pad, self.c_in);
        // [batch, length, taps × c_in]
        let y = rows
            .matmul(self.weight.clone())
            .reshape([batch, length * self.stride, self.c_out]);
        // [batch, stride × length, c_out]: (m, r) -> step stride · m + r
        match &self.bias {
            Some(b) => y + b.clone(),
            None => y,
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::nn::conv::{Conv1dConfig, ConvTranspose1dConfig};
    use burn::tensor::{Distribution, Tolerance};

    use super::*;
    use crate::activity::ActivityCnnConfig;
    use crate::anomaly::ConvAutoencoderConfig;

    fn random(shape: [usize; 3], device: &Device) -> Tensor<3> {
        Tensor::random(shape, Distribution::Normal(0.0, 2.0), device)
    }

    #[test]
    fn a_time_major_conv_matches_the_module() {
        let device = Device::flex();
        for (c_in, c_out, k, stride, padding, length) in [
            (
                6usize,
                16usize,
                5usize,
                1usize,
                PaddingConfig1d::Same,
                100usize,
            ),
            (16, 32, 5, 2, PaddingConfig1d::Explicit(2, 2), 50),
            (3, 4, 3, 1, PaddingConfig1d::Valid, 9),
            (2, 3, 4, 3, PaddingConfig1d::Explicit(1, 0), 11),
        ] {
            let conv = Conv1dConfig::new(c_in, c_out, k)
                .with_stride(stride)
                .with_padding(padding)
                .init(&device);
            let plan = TimeMajorConv::new(&conv).expect("covered");
            let x = random([3, c_in, length], &device);
            let fast = plan
                .forward(x.clone().swap_dims(1, 2), true)
                .swap_dims(1, 2);
            fast.into_data()
                .assert_approx_eq::<f32>(&conv.forward(x).into_data(), Tolerance::absolute(1e-4));
        }
    }

    #[test]
    fn a_polyphase_transposed_conv_matches_the_module() {
        let device = Device::flex();
        // (c_in, c_out, kernel, stride, padding): output length = stride × input length.
        for (c_in, c_out, k, s, p) in [
            (32usize, 16usize, 4usize, 2usize, 1usize),
            (16, 6, 4, 2, 1),
            (3, 5, 2, 2, 0),
            (4, 2, 7, 3, 2),
            (2, 3, 1, 1, 0),
            (2, 2, 5, 1, 2),
        ] {
            let conv = ConvTranspose1dConfig::new([c_in, c_out], k)
                .with_stride(s)
                .with_padding(p)
                .init(&device);
            let plan = TimeMajorConvTranspose::new(&conv).expect("covered");
            for length in [1usize, 2, 25] {
                let x = random([2, c_in, length], &device);
                let reference = conv.forward(x.clone());
                assert_eq!(reference.dims(), [2, c_out, s * length]);
                let fast = plan.forward(x.swap_dims(1, 2)).swap_dims(1, 2);
                fast.into_data()
                    .assert_approx_eq::<f32>(&reference.into_data(), Tolerance::absolute(1e-4));
            }
        }
        // Output lengths other than stride × input are left to the module.
        let odd = ConvTranspose1dConfig::new([2, 2], 3)
            .with_stride(2)
            .with_padding(1);
        assert!(TimeMajorConvTranspose::new(&odd.init(&device)).is_none());
    }

    fn net_outputs_per_window(net: &Net) -> usize {
        match net {
            Net::Activity(m) => m.head.weight.dims()[1],
            Net::Anomaly(_) => 1,
        }
    }

    #[test]
    fn plans_compute_what_the_networks_compute() {
        let device = Device::flex();
        let activity = Net::Activity(ActivityCnnConfig::new(6, 100, 4).init(&device));
        let anomaly = Net::Anomaly(
            ConvAutoencoderConfig::new(6, 100)
                .with_hidden(16)
                .with_latent(4)
                .init(&device),
        );
        for net in [activity, anomaly] {
            let plan = Plan::new(&net).expect("every architecture has a plan");
            for batch in [1usize, 5] {
                let x = random([batch, 6, 100], &device);
                plan.outputs(x.clone()).into_data().assert_approx_eq::<f32>(
                    &net.outputs(x.clone()).into_data(),
                    Tolerance::absolute(1e-5),
                );
                let host = x.clone().into_data().try_into_vec::<f32>().unwrap();
                let values = plan.output_values(x.clone(), &host).unwrap();
                TensorData::new(values, [batch * net_outputs_per_window(&net)])
                    .assert_approx_eq::<f32>(
                        &net.outputs(x.clone()).flatten::<1>(0, 1).into_data(),
                        Tolerance::absolute(1e-5),
                    );
                if let (Net::Anomaly(m), Plan::Anomaly(p)) = (&net, &plan) {
                    p.forward(x.clone()).into_data().assert_approx_eq::<f32>(
                        &m.forward(x).into_data(),
                        Tolerance::absolute(1e-4),
                    );
                }
            }
        }
    }
}
