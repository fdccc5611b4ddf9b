//! ember-models integration tests: one binary (CONTRIBUTING.md, "Tests"), modules by concern.
//!
//! They use the committed artefacts: `models/data/*.ts`, `models/bundles/*.bundle` and the
//! development key in `models/keys/dev/`.

mod bundles;
mod cli;
mod data;
mod retrain;
mod tamper;

use std::path::PathBuf;
use std::sync::OnceLock;

use ember_models::data::BasicMotions;
use ember_models::{Bundle, TrustedKeys};

pub fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn bundle_path(name: &str) -> PathBuf {
    models_dir().join("bundles").join(format!("{name}.bundle"))
}

pub fn bundle_bytes(name: &str) -> Vec<u8> {
    let path = bundle_path(name);
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; rebuild with models/scripts/build-bundles.sh",
            path.display()
        )
    })
}

pub fn bundle(name: &str) -> Bundle {
    Bundle::read(&bundle_bytes(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

pub fn dev_public_key() -> PathBuf {
    models_dir().join("keys/dev/dev.pub")
}

pub fn dev_secret_key() -> ed25519_dalek::SigningKey {
    ember_models::keys::read_signing_key(&models_dir().join("keys/dev/dev.key"))
        .expect("dev secret key")
}

pub fn dev_keys() -> TrustedKeys {
    TrustedKeys::from_files(&[dev_public_key()]).expect("dev public key")
}

pub fn basic_motions() -> &'static BasicMotions {
    static DATA: OnceLock<BasicMotions> = OnceLock::new();
    DATA.get_or_init(|| {
        ember_models::data::load(&models_dir().join("data")).unwrap_or_else(|e| panic!("{e}"))
    })
}

pub const BUNDLES: [&str; 4] = [
    "activity-f32",
    "activity-int8",
    "anomaly-f32",
    "anomaly-int8",
];
