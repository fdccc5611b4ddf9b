//! Which burn backend a model runs on, chosen explicitly.
//!
//! **Invariant:** Ember never calls `Device::default()`. burn picks that device by a fixed
//! priority among the backends compiled in, so enabling a feature anywhere in the dependency
//! graph (feature unification) could silently move inference to another backend. Every device
//! comes from [`Backend::device`].

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;

/// A burn backend Ember can run a model on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// burn's pure-Rust CPU backend, single-threaded: always compiled in; what the agent uses.
    Flex,
    /// burn's wgpu backend (Vulkan, Metal, DX12 or WebGPU, whichever the adapter offers), with
    /// the `wgpu` feature. Without a GPU, Mesa's lavapipe (a software Vulkan driver) serves it.
    Wgpu,
}

/// Why a backend's device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("the {0} backend is not compiled in: build ember-models with `--features {0}`")]
    NotCompiled(Backend),
    #[error(
        "no wgpu adapter: {message}. Without a GPU, install Mesa's software Vulkan driver (lavapipe): `apt-get install mesa-vulkan-drivers` on Debian/Ubuntu (scripts/install-deps.sh does it)"
    )]
    NoAdapter { message: String },
    #[error("unknown backend {0:?}: use `flex` or `wgpu`")]
    Unknown(String),
}

impl Backend {
    /// Every backend, compiled in or not.
    pub const ALL: [Backend; 2] = [Backend::Flex, Backend::Wgpu];

    pub fn name(self) -> &'static str {
        match self {
            Backend::Flex => "flex",
            Backend::Wgpu => "wgpu",
        }
    }

    /// Whether this build has the backend.
    pub fn is_compiled(self) -> bool {
        match self {
            Backend::Flex => true,
            Backend::Wgpu => cfg!(feature = "wgpu"),
        }
    }

    /// The backend's device. For wgpu this acquires an adapter now, so a machine without one
    /// fails here, with instructions, rather than at the first tensor operation. Creating
    /// the wgpu device twice in one process is an error in burn: create it once and clone it.
    pub fn device(self) -> Result<Device, BackendError> {
        match self {
            Backend::Flex => Ok(Device::flex()),
            Backend::Wgpu => wgpu_device(),
        }
    }
}

/// Whether `device` is flex (with or without autodiff). The models' time-major convolutions
/// multiply overlapping strided views (`unfold`), which flex's matmul reads as they are but
/// burn's GPU (cubecl) matmul refuses ("non-contiguous matrix layout"), and they exist to beat
/// flex's conv kernel on the CPU: on any other backend the models run burn's own conv modules.
pub fn is_flex(device: &Device) -> bool {
    // Device equality compares the compute resource and ignores autodiff.
    *device == Device::flex()
}

#[cfg(feature = "wgpu")]
fn wgpu_device() -> Result<Device, BackendError> {
    Device::wgpu_options()
        .init()
        .map_err(|e| BackendError::NoAdapter {
            message: e.to_string(),
        })
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_device() -> Result<Device, BackendError> {
    Err(BackendError::NotCompiled(Backend::Wgpu))
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Backend {
    type Err = BackendError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Backend::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| BackendError::Unknown(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_flex_is_always_there() {
        for b in Backend::ALL {
            assert_eq!(b.name().parse::<Backend>().ok(), Some(b));
        }
        assert!("cuda".parse::<Backend>().is_err());
        assert!(Backend::Flex.is_compiled());
        assert!(Backend::Flex.device().is_ok());
    }

    #[cfg(not(feature = "wgpu"))]
    #[test]
    fn wgpu_without_the_feature_says_how_to_get_it() {
        let e = Backend::Wgpu.device().unwrap_err().to_string();
        assert!(e.contains("--features wgpu"), "{e}");
    }
}
