//! Ember's models: train, quantize, bundle, sign, verify and run burn models for IMU windows.
//!
//! Two models, both for 6-channel × 100-sample windows (10 s at 10 Hz) of a wrist IMU,
//! trained on the UEA BasicMotions data set:
//!
//! * `activity` ([`activity::ActivityCnn`]): a 1-D CNN classifying Standing, Running, Walking
//!   or Badminton.
//! * `anomaly` ([`anomaly::ConvAutoencoder`]): a convolutional autoencoder trained on normal
//!   activities only; its reconstruction error, against a calibrated threshold, flags windows
//!   unlike anything it was trained on.
//!
//! A model ships as one signed file, a [`Bundle`] (format: `docs/model-bundle.md`): a JSON
//! [`Manifest`] (architecture, input and output specs, normalization, metrics, golden vectors),
//! burnpack weights (f32 or int8), and an ed25519 signature.
//!
//! # Running a bundle (what the agent does)
//!
//! ```no_run
//! use ember_models::{Bundle, LoadedModel, Output, TrustedKeys};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let trusted = TrustedKeys::from_files(&["/etc/ember/model-keys/release.pub"])?;
//! let bytes = std::fs::read("activity-f32.bundle")?;
//! let bundle = Bundle::read(&bytes)?;  // structure, lengths, manifest
//! bundle.verify(&trusted)?;            // signature by a trusted key, weights sha256
//! let device = ember_models::Backend::Flex.device()?;
//! let model = LoadedModel::load(&bundle, &device)?; // int8 is dequantized once, here
//! model.run_golden()?;                 // this CPU and build reproduce the golden outputs
//! let spec = &bundle.manifest().input; // channels, window, hop, sample rate
//! let window = vec![0.0f32; spec.channels * spec.window]; // raw values, [channel][sample]
//! match model.infer(&window)? {
//!     Output::Classes { probabilities, .. } => println!("{probabilities:?}"),
//!     Output::Anomaly { scores, threshold } => println!("{} > {threshold}?", scores[0]),
//! }
//! # Ok(()) }
//! ```
//!
//! [`LoadedModel::infer`] takes **raw** sensor values (it applies the manifest's per-channel
//! normalization), any number of windows laid out `[window][channel][sample]`, and returns
//! per-window class probabilities (manifest label order) or reconstruction errors.
//!
//! # Features
//!
//! * default `train`: autodiff and optimizers (`burn/optim`), training, packaging, the
//!   progress bar and the `ember-models` CLI.
//! * without it (`default-features = false`, what the agent uses): bundle reading,
//!   verification and inference on burn's flex CPU backend only.
//! * `wgpu`: burn's wgpu backend as well ([`Backend::Wgpu`]); without a GPU it runs on Mesa's
//!   lavapipe software Vulkan driver (a correctness check, ≈ 20× slower than flex).
//!
//! Pick the device with [`Backend::device`], never `Device::default()` (see [`backend`]).
//!
//! # Errors
//!
//! One enum per concern: [`BundleError`] (file structure, manifest, signature),
//! [`keys::KeyError`] (key files), [`ModelError`] (loading and running weights),
//! [`data::DataError`] (data files), [`eval::EvalError`], and with `train`
//! [`train::TrainError`] and [`package::PackageError`].

pub mod activity;
pub mod anomaly;
pub mod backend;
pub mod baseline;
pub mod bundle;
pub mod data;
pub mod eval;
pub mod export;
pub mod hex;
pub mod inference;
pub mod keys;
pub mod manifest;
pub mod metrics;
pub mod model;
pub mod plan;
pub mod quant;

#[cfg(feature = "train")]
pub mod cli;
#[cfg(feature = "train")]
pub mod package;
#[cfg(feature = "train")]
pub mod pipeline;
#[cfg(feature = "train")]
pub mod train;

pub use backend::{Backend, BackendError};
pub use bundle::{Bundle, BundleError};
/// burn's device handle, re-exported so users need no direct burn dependency.
pub use burn::tensor::Device;
pub use inference::{LoadOptions, LoadedModel, ModelError, Output};
pub use keys::{KeyId, TrustedKeys};
pub use manifest::{Manifest, Precision};
pub use model::Architecture;
