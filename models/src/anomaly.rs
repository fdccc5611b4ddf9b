//! `anomaly`: a convolutional autoencoder whose reconstruction error scores a window.
//!
//! Trained only on normal windows, it learns to reconstruct what normal motion looks like;
//! a window it reconstructs badly is unlike anything it was trained on. The score is the mean
//! squared reconstruction error over channels and samples, in normalized units; the bundle's
//! threshold is calibrated on normal windows held out from training (see `train`).

use burn::nn::conv::{Conv1d, Conv1dConfig, ConvTranspose1d, ConvTranspose1dConfig};
use burn::nn::{Initializer, PaddingConfig1d, Relu};
use burn::prelude::*;

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
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
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
