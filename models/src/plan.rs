//! Inference plans: a loaded model's network compiled, at load, into a fixed sequence of
//! matrix products on host buffers that are also sized at load.
//!
//! The modules' own `forward` ([`ActivityCnn::forward`], [`ConvAutoencoder::forward`]) must
//! stay differentiable for training; run through flex, each of their ~15 tensor operations
//! allocates its result and dispatches a kernel, and glibc returns the freed memory to the
//! kernel between calls (at batch 32, ~224 minor page faults per call: docs/benchmarks.md).
//! A [`Plan`] instead runs one window at a time through buffers it owns:
//!
//! - **Layout.** Every map is time-major (`[step][channel]`), stored with the zero padding
//!   its consumer needs around it, so a convolution's receptive field for output step `t`
//!   (kernel steps × all channels) is one contiguous row of the padded buffer starting at
//!   step `t · stride`: the convolution is one product of those overlapping rows with the
//!   weights laid out once as `[kernel × c_in, c_out]` (no im2col copy). The autoencoder's
//!   transposed convolutions are products too, in polyphase form ([`Stage::transposed`]).
//! - **Kernel.** The products run in a register-tiled kernel written with `pulp`, which
//!   picks AVX2+FMA, NEON or scalar code at run time without `unsafe` in Ember
//!   ([`matmul_rows`]); the layer's epilogue (max pooling, bias, ReLU) writes straight into
//!   the next layer's padded buffer, and the last step (time mean + dense head + softmax, or
//!   the mean squared reconstruction error) runs on the same buffers.
//! - **Memory.** The buffers for one window ([`Scratch`], a few tens of KiB) are allocated
//!   when the plan is built and reused for every window of every call: a call allocates
//!   nothing but the output values it returns ([`Plan::run_into`] not even those). A batch
//!   is a loop over its windows, so memory does not grow with the batch size.
//!
//! **Invariant:** a plan computes what the network's `forward` computes, up to float
//! summation order: unit tests compare every layer and both networks with the burn modules
//! on random weights and inputs, and [`LoadedModel`](crate::LoadedModel) runs the bundle's
//! golden vectors through the plan before serving. A layer the plan does not cover (settings a
//! hand-built module may have) makes [`Plan::new`] return `None`, and the loaded model runs
//! the network itself with burn.
//!
//! **Concurrency:** one [`Scratch`] per plan behind a mutex; a call that finds it busy
//! (another thread running the same model) works on a scratch of its own instead of waiting.

use std::sync::Mutex;

use burn::nn::PaddingConfig1d;
use burn::nn::conv::{Conv1d, ConvTranspose1d};
use burn::prelude::*;
use pulp::{Arch, Simd, WithSimd};

use crate::activity::ActivityCnn;
use crate::anomaly::ConvAutoencoder;
use crate::manifest::Normalization;
use crate::model::Net;

/// Columns of every weight matrix and product row are padded to a multiple of this (the
/// widest SIMD vector pulp uses, 16 × f32), so the kernel never handles a partial vector.
const COLUMN_ALIGN: usize = 16;

/// A network laid out for inference on the host; see the module documentation.
#[derive(Debug)]
pub struct Plan {
    stages: Vec<Stage>,
    finish: Finish,
    /// Input channels and samples per window.
    channels: usize,
    window: usize,
    arch: Arch,
    scratch: Mutex<Scratch>,
}

impl Clone for Plan {
    fn clone(&self) -> Plan {
        Plan {
            stages: self.stages.clone(),
            finish: self.finish.clone(),
            channels: self.channels,
            window: self.window,
            arch: self.arch,
            scratch: Mutex::new(Scratch::new(&self.stages)),
        }
    }
}

/// What follows the last stage.
#[derive(Debug, Clone)]
enum Finish {
    /// Mean over time of the last map, then a dense layer (`weight`: `[features][classes]`,
    /// burn's `Linear` layout) and a softmax: class probabilities.
    MeanHead {
        weight: Vec<f32>,
        bias: Vec<f32>,
        classes: usize,
    },
    /// The last map is the reconstruction of the normalized input: its mean squared error
    /// (summed in f64).
    Reconstruction,
}

/// Buffers for one window: `inputs[i]` is stage `i`'s padded input (its padding rows are
/// zero and never written), `product` the widest stage's product, `last` the last stage's
/// output.
#[derive(Debug)]
struct Scratch {
    inputs: Vec<Vec<f32>>,
    product: Vec<f32>,
    last: Vec<f32>,
}

impl Scratch {
    fn new(stages: &[Stage]) -> Scratch {
        Scratch {
            inputs: stages
                .iter()
                .map(|s| vec![0f32; (s.pad.0 + s.len_in + s.pad.1) * s.c_in])
                .collect(),
            product: vec![0f32; stages.iter().map(|s| s.rows * s.n_pad).max().unwrap_or(0)],
            last: vec![0f32; stages.last().map_or(0, |s| s.len_out * s.c_out)],
        }
    }
}

impl Plan {
    /// The plan for `net` on windows of `channels` × `window` samples, or `None` when a layer has settings
    /// the plan does not implement (never for networks built from an
    /// [`Architecture`](crate::Architecture)), when the sizes do not chain, or when the
    /// network is not on flex ([`crate::backend::is_flex`]: GPU devices run burn's modules).
    /// The weights must be f32 (dequantize int8 first): they are read back to the host once.
    pub fn new(net: &Net, channels: usize, window: usize) -> Option<Plan> {
        if !crate::backend::is_flex(&net.device()) {
            return None;
        }
        let (stages, finish, net_channels) = match net {
            Net::Activity(m) => activity(m, window)?,
            Net::Anomaly(m) => anomaly(m, window)?,
        };
        // Each stage reads what the previous one wrote.
        let chained = stages
            .windows(2)
            .all(|w| w[0].c_out == w[1].c_in && w[0].len_out == w[1].len_in);
        let first = stages.first()?;
        let last = stages.last()?;
        let finish_fits = match &finish {
            Finish::MeanHead {
                weight,
                bias,
                classes,
            } => *classes > 0 && bias.len() == *classes && weight.len() == last.c_out * classes,
            Finish::Reconstruction => last.c_out == channels && last.len_out == window,
        };
        if !chained
            || !finish_fits
            || net_channels != channels
            || first.c_in != channels
            || first.len_in != window
        {
            return None;
        }
        let scratch = Mutex::new(Scratch::new(&stages));
        Some(Plan {
            stages,
            finish,
            channels,
            window,
            arch: Arch::new(),
            scratch,
        })
    }

    /// Values per window: class probabilities or one score.
    pub fn outputs_per_window(&self) -> usize {
        match &self.finish {
            Finish::MeanHead { classes, .. } => *classes,
            Finish::Reconstruction => 1,
        }
    }

    /// Runs raw windows (`[window][channel][sample]`, finite; their count a whole number of
    /// windows) through `normalization` and the network, and appends the outputs
    /// (`[window][class]` probabilities or one reconstruction error per window) to `out`.
    /// Allocates nothing when `out` has room and no other thread is using this plan.
    pub fn run_into(&self, windows: &[f32], normalization: &Normalization, out: &mut Vec<f32>) {
        let per_window = self.channels * self.window;
        if per_window == 0 {
            return;
        }
        out.reserve(windows.len() / per_window * self.outputs_per_window());
        let mut own;
        let mut guard = self.scratch.try_lock();
        let scratch = match guard.as_deref_mut() {
            Ok(s) => s,
            // Busy (or poisoned by a panic mid-call: the buffers hold no state between
            // windows, but take a fresh set rather than reason about it).
            Err(_) => {
                own = Scratch::new(&self.stages);
                &mut own
            }
        };
        self.arch.dispatch(Run {
            plan: self,
            windows,
            normalization,
            scratch,
            out,
        });
    }
}

/// One call's work, run by `pulp` with the best instruction set the CPU has.
struct Run<'a> {
    plan: &'a Plan,
    windows: &'a [f32],
    normalization: &'a Normalization,
    scratch: &'a mut Scratch,
    out: &'a mut Vec<f32>,
}

impl WithSimd for Run<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Run {
            plan,
            windows,
            normalization,
            scratch,
            out,
        } = self;
        let (channels, window) = (plan.channels, plan.window);
        let Some(first) = plan.stages.first() else {
            return;
        };
        for raw in windows.chunks_exact(channels * window) {
            // Normalize into stage 0's padded, time-major buffer: [step][channel].
            let x0 = &mut scratch.inputs[0][first.pad.0 * channels..][..window * channels];
            for (c, samples) in raw.chunks_exact(window).enumerate() {
                let (mean, std) = match (normalization.mean.get(c), normalization.std.get(c)) {
                    (Some(m), Some(s)) if normalization.mean.len() == channels => (*m, *s),
                    _ => (0.0, 1.0),
                };
                // A multiplication per value, not a division (≈ 1 µs of a 13 µs window).
                let scale = 1.0 / std;
                for (t, v) in samples.iter().enumerate() {
                    x0[t * channels + c] = (v - mean) * scale;
                }
            }
            let n = plan.stages.len();
            for i in 0..n {
                let stage = &plan.stages[i];
                let product = &mut scratch.product[..stage.rows * stage.n_pad];
                let step = stage.step * stage.c_in;
                matmul_rows(
                    simd,
                    &scratch.inputs[i],
                    step,
                    stage.taps * stage.c_in,
                    stage.rows,
                    &stage.weight,
                    stage.n_pad,
                    product,
                );
                let dst = if i + 1 < n {
                    let next = &plan.stages[i + 1];
                    &mut scratch.inputs[i + 1][next.pad.0 * next.c_in..][..next.len_in * next.c_in]
                } else {
                    &mut scratch.last[..]
                };
                stage.epilogue(product, dst);
            }
            let last_stage = &plan.stages[n - 1];
            match &plan.finish {
                Finish::MeanHead {
                    weight,
                    bias,
                    classes,
                } => {
                    let features = last_stage.c_out;
                    let start = out.len();
                    out.extend_from_slice(bias);
                    let logits = &mut out[start..];
                    // mean over time, then features × [features][classes]
                    let scale = 1.0 / last_stage.len_out as f32;
                    for f in 0..features {
                        let mut sum = 0f32;
                        for t in 0..last_stage.len_out {
                            sum += scratch.last[t * features + f];
                        }
                        let mean = sum * scale;
                        let row = &weight[f * classes..][..*classes];
                        for (l, w) in logits.iter_mut().zip(row) {
                            *l += mean * w;
                        }
                    }
                    softmax_in_place(logits);
                }
                Finish::Reconstruction => {
                    let x = &scratch.inputs[0][first.pad.0 * channels..][..window * channels];
                    let mut sum = 0f64;
                    for (r, v) in scratch.last.iter().zip(x) {
                        let d = f64::from(r - v);
                        sum += d * d;
                    }
                    out.push((sum / (window * channels) as f64) as f32);
                }
            }
        }
    }
}

/// `dst[r][..] = Σ_i a[r · step + i] · w[i][..]` for `r < rows`, `i < k`: the overlapping
/// rows of a padded time-major map times a `[k][n_pad]` weight matrix, `n_pad` a multiple of
/// [`COLUMN_ALIGN`]. Tiles of up to 12 vectors (8 rows × 1 to 3 rows × 4) stay in registers
/// while `i` runs.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn matmul_rows<S: Simd>(
    simd: S,
    a: &[f32],
    step: usize,
    k: usize,
    rows: usize,
    w: &[f32],
    n_pad: usize,
    dst: &mut [f32],
) {
    let lanes = S::F32_LANES;
    let vectors = n_pad / lanes;
    let mut col = 0;
    while col < vectors {
        let v = (vectors - col).min(4);
        let mut r = 0;
        while r < rows {
            let left = rows - r;
            let args = Tile {
                a,
                step,
                k,
                w,
                n_pad,
                row0: r,
                col0: col * lanes,
            };
            // At most 12 accumulators: with the weight vectors and the broadcast value they
            // fit AVX2's 16 registers (NEON has 32).
            let done = match (v, left) {
                (1, 8..) => args.run::<S, 8, 1>(simd, dst),
                (2, 6..) => args.run::<S, 6, 2>(simd, dst),
                (3, 4..) => args.run::<S, 4, 3>(simd, dst),
                (4, 3..) => args.run::<S, 3, 4>(simd, dst),
                (1, 4..) => args.run::<S, 4, 1>(simd, dst),
                (2, 3..) => args.run::<S, 3, 2>(simd, dst),
                (1, _) => args.run::<S, 1, 1>(simd, dst),
                (2, _) => args.run::<S, 1, 2>(simd, dst),
                (3, _) => args.run::<S, 1, 3>(simd, dst),
                _ => args.run::<S, 1, 4>(simd, dst),
            };
            r += done;
        }
        col += v;
    }
}

/// One register tile of [`matmul_rows`].
struct Tile<'a> {
    a: &'a [f32],
    step: usize,
    k: usize,
    w: &'a [f32],
    n_pad: usize,
    row0: usize,
    col0: usize,
}

impl Tile<'_> {
    /// `R` rows × `V` vectors of columns; returns `R`.
    #[inline(always)]
    fn run<S: Simd, const R: usize, const V: usize>(&self, simd: S, dst: &mut [f32]) -> usize {
        let lanes = S::F32_LANES;
        let width = V * lanes;
        let rows: [&[f32]; R] =
            core::array::from_fn(|r| &self.a[(self.row0 + r) * self.step..][..self.k]);
        let mut acc = [[simd.splat_f32s(0.0); V]; R];
        for (i, w_row) in self.w.chunks_exact(self.n_pad).take(self.k).enumerate() {
            let (w_vecs, _) = S::as_simd_f32s(&w_row[self.col0..self.col0 + width]);
            for r in 0..R {
                let x = simd.splat_f32s(rows[r][i]);
                for v in 0..V {
                    acc[r][v] = simd.mul_add_e_f32s(x, w_vecs[v], acc[r][v]);
                }
            }
        }
        for (r, acc_row) in acc.iter().enumerate() {
            let start = (self.row0 + r) * self.n_pad + self.col0;
            let (out, _) = S::as_mut_simd_f32s(&mut dst[start..start + width]);
            out[..V].copy_from_slice(acc_row);
        }
        R
    }
}

/// One layer as a product of overlapping input rows and a weight matrix, and what follows it.
///
/// Output row `r` reads padded input steps `r · step .. r · step + taps` (all `c_in`
/// channels) and yields `phases` output steps of `c_out` channels side by side, so output
/// step `s` is product row `s / phases`, columns `(s % phases) · c_out ..`. A convolution has
/// `taps = kernel`, `step = stride`, one phase; a transposed convolution `step = 1` and
/// `phases = stride`.
#[derive(Debug, Clone)]
struct Stage {
    c_in: usize,
    c_out: usize,
    taps: usize,
    step: usize,
    phases: usize,
    /// Zero steps before and after the input.
    pad: (usize, usize),
    /// Input steps (unpadded), product rows, output steps (after pooling).
    len_in: usize,
    rows: usize,
    len_out: usize,
    /// Max pooling over this many output steps (1: none), before bias and ReLU (both
    /// monotonic per channel: the same values as pooling after them).
    pool: usize,
    relu: bool,
    /// `[taps × c_in][n_pad]`, row `j · c_in + c`; columns past `phases × c_out` are zero.
    weight: Vec<f32>,
    n_pad: usize,
    /// `[c_out]` (zeros for a layer without bias).
    bias: Vec<f32>,
}

impl Stage {
    fn new(
        c_in: usize,
        c_out: usize,
        (taps, step, phases): (usize, usize, usize),
        pad: (usize, usize),
        len_in: usize,
        weight: impl Fn(usize, usize, usize) -> f32,
        bias: Vec<f32>,
    ) -> Option<Stage> {
        let padded = pad.0 + len_in + pad.1;
        if taps == 0 || step == 0 || phases == 0 || padded < taps || bias.len() != c_out {
            return None;
        }
        let rows = (padded - taps) / step + 1;
        let cols = phases * c_out;
        let n_pad = cols.div_ceil(COLUMN_ALIGN) * COLUMN_ALIGN;
        let mut w = vec![0f32; taps * c_in * n_pad];
        for j in 0..taps {
            for c in 0..c_in {
                for col in 0..cols {
                    w[(j * c_in + c) * n_pad + col] = weight(j, c, col);
                }
            }
        }
        Some(Stage {
            c_in,
            c_out,
            taps,
            step,
            phases,
            pad,
            len_in,
            rows,
            len_out: rows * phases,
            pool: 1,
            relu: false,
            weight: w,
            n_pad,
            bias,
        })
    }

    /// A `Conv1d` (ungrouped, undilated, padding known without the input length).
    fn conv(conv: &Conv1d, len_in: usize) -> Option<Stage> {
        if conv.groups != 1 || conv.dilation != 1 {
            return None;
        }
        let pad = conv_padding(conv)?;
        let [c_out, c_in, kernel] = conv.weight.dims();
        let w = host_values(conv.weight.val())?; // [c_out][c_in][kernel]
        Stage::new(
            c_in,
            c_out,
            (kernel, conv.stride, 1),
            pad,
            len_in,
            |j, c, o| w[(o * c_in + c) * kernel + j],
            bias_values(conv.bias.as_ref().map(|b| b.val()), c_out)?,
        )
    }

    /// A `ConvTranspose1d` whose output is exactly `stride ×` its input's length, in
    /// polyphase form.
    ///
    /// Output step `t = stride · m + r` sums `x[i] · w[:, :, j]` over the `i` with
    /// `j = t + padding − stride · i` inside the kernel. For each input step `m` the outputs
    /// of all `stride` phases `r` read the same few neighbours `x[m − d]`, `d` in
    /// `d_min ..= d_max`: one row of `taps = d_max − d_min + 1` steps × `c_in` values times a
    /// `[taps × c_in, stride × c_out]` matrix (zero where a tap does not reach a phase) gives,
    /// per `m`, the `stride` output steps side by side. For kernel 4, stride 2, padding 1 (the
    /// autoencoder's): taps `x[m − 1], x[m], x[m + 1]`; even outputs use kernel taps 3 and 1,
    /// odd outputs taps 2 and 0.
    fn transposed(conv: &ConvTranspose1d, len_in: usize) -> Option<Stage> {
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
        let ds: Vec<isize> = (-k..=k)
            .filter(|&d| (0..s).any(|r| tap(r, d).is_some()))
            .collect();
        let (d_min, d_max) = (*ds.first()?, *ds.last()?);
        // With k = s + 2p every output reads from m − d_max ..= m − d_min, d_min ≤ 0 ≤ d_max.
        if d_min > 0 || d_max < 0 {
            return None;
        }
        let taps = (d_max - d_min + 1) as usize;
        let w = host_values(conv.weight.val())?; // [c_in][c_out][k]
        let stage = Stage::new(
            c_in,
            c_out,
            (taps, 1, s as usize),
            (d_max as usize, (-d_min) as usize),
            len_in,
            |q, c, col| {
                // row block q reads x[m − d_max + q]; column col = phase r, channel o
                let (r, o) = ((col / c_out) as isize, col % c_out);
                match tap(r, d_max - q as isize) {
                    Some(j) => w[(c * c_out + o) * kernel + j],
                    None => 0.0,
                }
            },
            bias_values(conv.bias.as_ref().map(|b| b.val()), c_out)?,
        )?;
        (stage.rows == len_in).then_some(stage)
    }

    fn with_pool(mut self, pool: usize) -> Option<Stage> {
        if pool == 0 {
            return None;
        }
        self.pool = pool;
        // A trailing partial window is dropped, as `MaxPool1d` does.
        self.len_out = self.rows * self.phases / pool;
        Some(self)
    }

    fn with_relu(mut self) -> Stage {
        self.relu = true;
        self
    }

    /// Pooling, bias and ReLU from the product rows into `dst` (`[len_out][c_out]`).
    #[inline(always)]
    fn epilogue(&self, product: &[f32], dst: &mut [f32]) {
        let c_out = self.c_out;
        for (t, out) in dst.chunks_exact_mut(c_out).take(self.len_out).enumerate() {
            let at = |s: usize| {
                let start = (s / self.phases) * self.n_pad + (s % self.phases) * c_out;
                &product[start..start + c_out]
            };
            out.copy_from_slice(at(t * self.pool));
            for q in 1..self.pool {
                for (o, v) in out.iter_mut().zip(at(t * self.pool + q)) {
                    *o = o.max(*v);
                }
            }
            for (o, b) in out.iter_mut().zip(&self.bias) {
                *o += b;
            }
            if self.relu {
                for o in out.iter_mut() {
                    *o = o.max(0.0);
                }
            }
        }
    }
}

/// The activity CNN: conv → pool → ReLU, twice, conv → ReLU, time mean, dense head, softmax.
type Parts = (Vec<Stage>, Finish, usize);

fn activity(m: &ActivityCnn, window: usize) -> Option<Parts> {
    let pool = &m.pool;
    let plain_pool = pool.stride == pool.kernel_size
        && pool.dilation == 1
        && !pool.ceil_mode
        && matches!(pool.padding, PaddingConfig1d::Valid);
    if !plain_pool {
        return None;
    }
    let conv1 = Stage::conv(&m.conv1, window)?
        .with_pool(pool.kernel_size)?
        .with_relu();
    let conv2 = Stage::conv(&m.conv2, conv1.len_out)?
        .with_pool(pool.kernel_size)?
        .with_relu();
    let conv3 = Stage::conv(&m.conv3, conv2.len_out)?.with_relu();
    let [features, classes] = m.head.weight.dims();
    if features != conv3.c_out || conv3.len_out == 0 {
        return None;
    }
    let weight = host_values(m.head.weight.val())?; // [features][classes]
    let bias = bias_values(m.head.bias.as_ref().map(|b| b.val()), classes)?;
    let channels = conv1.c_in;
    Some((
        vec![conv1, conv2, conv3],
        Finish::MeanHead {
            weight,
            bias,
            classes,
        },
        channels,
    ))
}

/// The autoencoder: four convolutions (ReLU after all but the bottleneck), two transposed
/// convolutions (ReLU between them), then the reconstruction error.
fn anomaly(m: &ConvAutoencoder, window: usize) -> Option<Parts> {
    let enc1 = Stage::conv(&m.enc1, window)?.with_relu();
    let enc2 = Stage::conv(&m.enc2, enc1.len_out)?.with_relu();
    let bottleneck = Stage::conv(&m.bottleneck, enc2.len_out)?;
    let expand = Stage::conv(&m.expand, bottleneck.len_out)?.with_relu();
    let dec1 = Stage::transposed(&m.dec1, expand.len_out)?.with_relu();
    let dec2 = Stage::transposed(&m.dec2, dec1.len_out)?;
    let channels = enc1.c_in;
    Some((
        vec![enc1, enc2, bottleneck, expand, dec1, dec2],
        Finish::Reconstruction,
        channels,
    ))
}

fn conv_padding(conv: &Conv1d) -> Option<(usize, usize)> {
    crate::activity::conv1d_padding(conv)
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

/// A layer's bias as `len` host values (zeros without one).
fn bias_values(bias: Option<Tensor<1>>, len: usize) -> Option<Vec<f32>> {
    match bias {
        Some(b) => host_values(b).filter(|v| v.len() == len),
        None => Some(vec![0f32; len]),
    }
}

#[cfg(test)]
mod tests {
    use burn::nn::conv::{Conv1dConfig, ConvTranspose1dConfig};
    use burn::tensor::{Distribution, TensorData, Tolerance};

    use super::*;
    use crate::activity::ActivityCnnConfig;
    use crate::anomaly::ConvAutoencoderConfig;

    fn random(shape: [usize; 3], device: &Device) -> Tensor<3> {
        Tensor::random(shape, Distribution::Normal(0.0, 2.0), device)
    }

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().try_into_vec::<f32>().expect("f32")
    }

    /// One stage on one time-major window `[len_in][c_in]`: `[len_out][c_out]`.
    fn stage_forward<S: Simd>(simd: S, stage: &Stage, x: &[f32]) -> Vec<f32> {
        let mut input = vec![0f32; (stage.pad.0 + stage.len_in + stage.pad.1) * stage.c_in];
        input[stage.pad.0 * stage.c_in..][..x.len()].copy_from_slice(x);
        let mut product = vec![f32::NAN; stage.rows * stage.n_pad];
        matmul_rows(
            simd,
            &input,
            stage.step * stage.c_in,
            stage.taps * stage.c_in,
            stage.rows,
            &stage.weight,
            stage.n_pad,
            &mut product,
        );
        let mut out = vec![0f32; stage.len_out * stage.c_out];
        stage.epilogue(&product, &mut out);
        out
    }

    /// `[c][t]` values of a `[1, c, t]` tensor, as the plan's `[t][c]`.
    fn time_major(x: Tensor<3>) -> Vec<f32> {
        values(x.swap_dims(1, 2))
    }

    #[test]
    fn the_kernel_multiplies_overlapping_rows_on_every_instruction_set() {
        // Every tile shape and remainder: 1–17 rows, 1–5 vectors of 16 columns, odd k, steps.
        let mut seed = 7u32;
        let mut next = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        for (rows, n_pad, k, step) in [
            (1usize, 16usize, 1usize, 1usize),
            (7, 16, 30, 6),
            (5, 32, 80, 16),
            (6, 48, 13, 2),
            (9, 64, 5, 5),
            (3, 80, 7, 3),
            (13, 16, 9, 1),
            (11, 32, 4, 2),
            (17, 48, 6, 6),
        ] {
            let a: Vec<f32> = (0..(rows - 1) * step + k).map(|_| next()).collect();
            let w: Vec<f32> = (0..k * n_pad).map(|_| next()).collect();
            let mut expected = vec![0f32; rows * n_pad];
            for r in 0..rows {
                for col in 0..n_pad {
                    expected[r * n_pad + col] =
                        (0..k).map(|i| a[r * step + i] * w[i * n_pad + col]).sum();
                }
            }
            let check = |got: &[f32], what: &str| {
                for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
                    assert!(
                        (g - e).abs() < 1e-4,
                        "{what}: rows {rows} n {n_pad} k {k}: [{i}] {g} vs {e}"
                    );
                }
            };
            let mut got = vec![f32::NAN; rows * n_pad];
            matmul_rows(pulp::Scalar::new(), &a, step, k, rows, &w, n_pad, &mut got);
            check(&got, "scalar");
            struct Best<'a>(
                &'a [f32],
                usize,
                usize,
                usize,
                &'a [f32],
                usize,
                &'a mut [f32],
            );
            impl WithSimd for Best<'_> {
                type Output = ();
                fn with_simd<S: Simd>(self, simd: S) {
                    let Best(a, step, k, rows, w, n_pad, dst) = self;
                    matmul_rows(simd, a, step, k, rows, w, n_pad, dst);
                }
            }
            let mut got = vec![f32::NAN; rows * n_pad];
            Arch::new().dispatch(Best(&a, step, k, rows, &w, n_pad, &mut got));
            check(&got, "best");
        }
    }

    #[test]
    fn a_conv_stage_matches_the_module() {
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
            (32, 40, 5, 1, PaddingConfig1d::Same, 25),
        ] {
            let conv = Conv1dConfig::new(c_in, c_out, k)
                .with_stride(stride)
                .with_padding(padding)
                .init(&device);
            let stage = Stage::conv(&conv, length).expect("covered");
            let x = random([1, c_in, length], &device);
            let reference = time_major(conv.forward(x.clone()));
            let got = stage_forward(pulp::Scalar::new(), &stage, &time_major(x));
            TensorData::new(got, [reference.len()]).assert_approx_eq::<f32>(
                &TensorData::new(reference, [stage.len_out * c_out]),
                Tolerance::absolute(1e-4),
            );
        }
    }

    #[test]
    fn a_polyphase_transposed_stage_matches_the_module() {
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
            for length in [1usize, 2, 25] {
                let stage = Stage::transposed(&conv, length).expect("covered");
                let x = random([1, c_in, length], &device);
                let reference = conv.forward(x.clone());
                assert_eq!(reference.dims(), [1, c_out, s * length]);
                let reference = time_major(reference);
                let got = stage_forward(pulp::Scalar::new(), &stage, &time_major(x));
                TensorData::new(got, [reference.len()]).assert_approx_eq::<f32>(
                    &TensorData::new(reference, [s * length * c_out]),
                    Tolerance::absolute(1e-4),
                );
            }
        }
        // Output lengths other than stride × input are left to the module.
        let odd = ConvTranspose1dConfig::new([2, 2], 3)
            .with_stride(2)
            .with_padding(1);
        assert!(Stage::transposed(&odd.init(&device), 5).is_none());
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
        // Normalization by the plan itself: compare with the network on normalized input.
        let normalization = Normalization {
            mean: vec![0.5, -1.0, 0.0, 2.0, 0.25, -0.5],
            std: vec![1.0, 2.0, 0.5, 4.0, 1.5, 0.75],
        };
        for net in [activity, anomaly] {
            let plan = Plan::new(&net, 6, 100).expect("every architecture has a plan");
            assert!(
                Plan::new(&net, 6, 96).is_some(),
                "other window lengths plan too"
            );
            assert!(
                Plan::new(&net, 5, 100).is_none(),
                "the channel count must match"
            );
            for batch in [1usize, 5] {
                let raw = random([batch, 6, 100], &device);
                let mut normalized = values(raw.clone());
                normalization.apply(&mut normalized, 100);
                let normalized =
                    Tensor::<3>::from_data(TensorData::new(normalized, [batch, 6, 100]), &device);
                let expected = values(net.outputs(normalized));
                let mut got = vec![42.0];
                plan.run_into(&values(raw.clone()), &normalization, &mut got);
                assert_eq!(got.remove(0), 42.0, "run_into appends");
                assert_eq!(got.len(), batch * plan.outputs_per_window());
                TensorData::new(got.clone(), [got.len()]).assert_approx_eq::<f32>(
                    &TensorData::new(expected, [got.len()]),
                    Tolerance::absolute(1e-5),
                );
                // A second call on the same buffers, and a clone, give the same bits.
                let mut again = Vec::new();
                plan.run_into(&values(raw.clone()), &normalization, &mut again);
                assert_eq!(again, got);
                let mut cloned = Vec::new();
                plan.clone()
                    .run_into(&values(raw), &normalization, &mut cloned);
                assert_eq!(cloned, got);
            }
        }
    }

    #[test]
    fn threads_sharing_a_plan_each_get_their_own_answers() {
        let device = Device::flex();
        let net = Net::Activity(ActivityCnnConfig::new(6, 100, 4).init(&device));
        let plan = Plan::new(&net, 6, 100).expect("plan");
        let identity = Normalization {
            mean: vec![0.0; 6],
            std: vec![1.0; 6],
        };
        let inputs: Vec<Vec<f32>> = (0..4)
            .map(|_| values(random([3, 6, 100], &device)))
            .collect();
        let expected: Vec<Vec<f32>> = inputs
            .iter()
            .map(|x| {
                let mut out = Vec::new();
                plan.run_into(x, &identity, &mut out);
                out
            })
            .collect();
        std::thread::scope(|scope| {
            for (x, want) in inputs.iter().zip(&expected) {
                let (plan, identity) = (&plan, &identity);
                scope.spawn(move || {
                    for _ in 0..200 {
                        let mut out = Vec::new();
                        plan.run_into(x, identity, &mut out);
                        assert_eq!(&out, want);
                    }
                });
            }
        });
    }
}
