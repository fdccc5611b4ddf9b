//! `anomaly`: a convolutional autoencoder whose reconstruction error scores a window.
//!
//! Trained only on normal windows, it learns to reconstruct what normal motion looks like;
//! a window it reconstructs badly is unlike anything it was trained on. The score is the mean
//! squared reconstruction error over channels and samples, in normalized units; the bundle's
//! threshold is calibrated on normal windows held out from training (see `train`).

use burn::nn::conv::{Conv1d, Conv1dConfig, ConvTranspose1d, ConvTranspose1dConfig};
use burn::nn::{Initializer, PaddingConfig1d, Relu};
use burn::prelude::*;
use burn::tensor::activation::relu;

use crate::activity::{conv1d_nlc, conv1d_nlc_applies};
use crate::model::ArchitectureError;

/// Architecture of [`ConvAutoencoder`]; saved in the bundle manifest beside the weights.
#[derive(Config, Debug)]
pub struct ConvAutoencoderConfig {
    /// Input channels.
    pub channels: usize,
    /// Samples per window; a multiple of 4 (two stride-2 stages).
    pub window: usize,
    /// Channels after the first encoder stage; the second has twice as many.
    #[config(default = 16)]
    pub hidden: usize,
    /// Channels of the bottleneck (at window / 4 time steps).
    #[config(default = 4)]
    pub latent: usize,
}

/// The autoencoder. `forward` returns the reconstruction of its (normalized) input.
#[derive(Module, Debug)]
pub struct ConvAutoencoder {
    pub(crate) enc1: Conv1d,
    pub(crate) enc2: Conv1d,
    pub(crate) bottleneck: Conv1d,
    pub(crate) expand: Conv1d,
    pub(crate) dec1: ConvTranspose1d,
    pub(crate) dec2: ConvTranspose1d,
    pub(crate) relu: Relu,
}

impl ConvAutoencoderConfig {
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
        if self.window < 4
            || self.window > crate::model::MAX_WINDOW
            || !self.window.is_multiple_of(4)
        {
            return bad(format!(
                "window is {}; use a multiple of 4 from 4 to {}",
                self.window,
                crate::model::MAX_WINDOW
            ));
        }
        let max = crate::model::MAX_HIDDEN;
        if !(1..=max).contains(&self.hidden) || !(1..=max).contains(&self.latent) {
            return bad(format!(
                "hidden is {} and latent {}; use 1 to {max} for each",
                self.hidden, self.latent
            ));
        }
        Ok(())
    }

    /// A randomly initialized model (burn's initializers; seed the device first to reproduce).
    pub fn init(&self, device: &Device) -> ConvAutoencoder {
        self.build(device, None)
    }

    /// A zero-initialized model, to load weights into: draws nothing from the device's RNG.
    pub fn init_zeroed(&self, device: &Device) -> ConvAutoencoder {
        self.build(device, Some(Initializer::Zeros))
    }

    fn build(&self, device: &Device, init: Option<Initializer>) -> ConvAutoencoder {
        let wide = 2 * self.hidden;
        let conv = |config: Conv1dConfig| match &init {
            Some(i) => config.with_initializer(i.clone()).init(device),
            None => config.init(device),
        };
        let deconv = |config: ConvTranspose1dConfig| match &init {
            Some(i) => config.with_initializer(i.clone()).init(device),
            None => config.init(device),
        };
        // Stride-2, kernel-5, padding-2 convolutions halve the length exactly (even lengths);
        // kernel-4, stride-2, padding-1 transposed convolutions double it exactly.
        let down = |c_in, c_out| {
            Conv1dConfig::new(c_in, c_out, 5)
                .with_stride(2)
                .with_padding(PaddingConfig1d::Explicit(2, 2))
        };
        let up = |c_in, c_out| {
            ConvTranspose1dConfig::new([c_in, c_out], 4)
                .with_stride(2)
                .with_padding(1)
        };
        ConvAutoencoder {
            enc1: conv(down(self.channels, self.hidden)),
            enc2: conv(down(self.hidden, wide)),
            bottleneck: conv(
                Conv1dConfig::new(wide, self.latent, 3).with_padding(PaddingConfig1d::Same),
            ),
            expand: conv(
                Conv1dConfig::new(self.latent, wide, 3).with_padding(PaddingConfig1d::Same),
            ),
            dec1: deconv(up(wide, self.hidden)),
            dec2: deconv(up(self.hidden, self.channels)),
            relu: Relu::new(),
        }
    }
}

impl ConvAutoencoder {
    /// The reconstruction of a batch of normalized windows.
    ///
    /// The same math as [`ConvAutoencoder::forward_modules`] (the burn modules' own
    /// `forward`), with the four convolutions computed time-major as one matrix product each
    /// ([`conv1d_nlc`], 1.3–3× faster than flex's conv kernel at these sizes;
    /// docs/benchmarks.md). The transposed convolutions run channel-major, as before. Off flex
    /// ([`crate::backend::is_flex`]) it is `forward_modules`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let convs = [&self.enc1, &self.enc2, &self.bottleneck, &self.expand];
        if !convs.iter().all(|c| conv1d_nlc_applies(c)) || !crate::backend::is_flex(&x.device()) {
            return self.forward_modules(x);
        }
        // x: [batch, channels, window] -> time-major view [batch, window, channels]
        let h = relu(conv1d_nlc(&self.enc1, x.swap_dims(1, 2), true));
        // [batch, window / 2, hidden]
        let h = relu(conv1d_nlc(&self.enc2, h, true));
        // [batch, window / 4, 2 hidden]
        let z = conv1d_nlc(&self.bottleneck, h, true);
        // [batch, window / 4, latent]
        let h = relu(conv1d_nlc(&self.expand, z, true));
        // [batch, window / 4, 2 hidden] -> channel-major view [batch, 2 hidden, window / 4]
        let h = self.relu.forward(self.dec1.forward(h.swap_dims(1, 2)));
        // [batch, hidden, window / 2]
        self.dec2.forward(h)
        // [batch, channels, window]
    }

    /// The reconstruction through the burn modules' own `forward` (channel-major, flex's
    /// conv kernels): the reference [`ConvAutoencoder::forward`] is tested against.
    pub fn forward_modules(&self, x: Tensor<3>) -> Tensor<3> {
        // x: [batch, channels, window]
        let h = self.relu.forward(self.enc1.forward(x));
        // [batch, hidden, window / 2]
        let h = self.relu.forward(self.enc2.forward(h));
        // [batch, 2 hidden, window / 4]
        let z = self.bottleneck.forward(h);
        // [batch, latent, window / 4]
        let h = self.relu.forward(self.expand.forward(z));
        // [batch, 2 hidden, window / 4]
        let h = self.relu.forward(self.dec1.forward(h));
        // [batch, hidden, window / 2]
        self.dec2.forward(h)
        // [batch, channels, window]
    }

    /// Mean squared reconstruction error per window: the anomaly score.
    pub fn score(&self, x: Tensor<3>) -> Tensor<1> {
        // x: [batch, channels, window]
        let recon = self.forward(x.clone());
        let err = (recon - x).square();
        // [batch, channels, window]
        let err: Tensor<2> = err.flatten(1, 2);
        // [batch, channels * window]
        err.mean_dim(1).squeeze_dim(1)
        // [batch]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The time-major `forward` computes what the burn modules do, on random weights and
    /// inputs.
    #[test]
    fn time_major_forward_matches_burn_modules() {
        let device = Device::flex();
        for (channels, window, hidden, latent, batch) in [
            (6usize, 100usize, 16usize, 4usize, 1usize),
            (6, 100, 16, 4, 5),
            (3, 36, 8, 2, 2),
            (1, 4, 2, 1, 3),
        ] {
            let model = ConvAutoencoderConfig::new(channels, window)
                .with_hidden(hidden)
                .with_latent(latent)
                .init(&device);
            let x = Tensor::<3>::random(
                [batch, channels, window],
                burn::tensor::Distribution::Normal(0.0, 2.0),
                &device,
            );
            let fast = model.forward(x.clone()).into_data();
            let reference = model.forward_modules(x.clone()).into_data();
            fast.assert_approx_eq::<f32>(&reference, burn::tensor::Tolerance::absolute(1e-5));
            let fast = model.score(x.clone()).into_data();
            let recon = model.forward_modules(x.clone());
            let err: Tensor<2> = (recon - x).square().flatten(1, 2);
            let reference = err.mean_dim(1).squeeze_dim::<1>(1).into_data();
            fast.assert_approx_eq::<f32>(&reference, burn::tensor::Tolerance::absolute(1e-5));
        }
    }
}
