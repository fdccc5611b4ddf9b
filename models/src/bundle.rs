//! The model bundle: one file holding a manifest, the weights and an ed25519 signature.
//!
//! Layout (all integers little-endian; `docs/model-bundle.md` is the full specification):
//!
//! ```text
//! offset      size  field
//! 0           8     magic "EMBRMODL"
//! 8           2     format version (1)
//! 10          2     flags: bit 0 = signed; other bits MUST be 0
//! 12          4     manifest length M (≤ 16 MiB)
//! 16          8     weights length W
//! 24          M     manifest, UTF-8 JSON (see `Manifest`)
//! 24+M        W     weights, burnpack
//! 24+M+W      8     key id (signed bundles only): first 8 bytes of SHA-256(public key)
//! 32+M+W      64    ed25519 signature over bytes [0, 32+M+W) (signed bundles only)
//! ```
//!
//! The file MUST end right after the last field. The signature covers the header (so the
//! signed flag cannot be cleared), the manifest (which holds the weights' SHA-256), the
//! weights and the key id.
//!
//! The container itself ([`RawBundle`]: structure, signature, trusted keys) lives in the
//! burn-free `ember-bundle` crate; [`Bundle`] adds the typed, validated [`Manifest`].
//!
//! **Invariant:** [`Bundle::read`] accepts only structurally valid bundles with a valid
//! manifest ([`Manifest::validate`]); [`Bundle::verify`] additionally proves who built it and
//! that the weights are the ones the manifest names. Load weights only after `verify`.

use ed25519_dalek::SigningKey;

pub use ember_bundle::{
    BundleError, BundleFileError, BundleSignature, FORMAT_VERSION, HEADER_LEN, MAGIC,
    MAX_MANIFEST_LEN, RawBundle,
};

use crate::hex;
use crate::keys::TrustedKeys;
use crate::manifest::Manifest;

/// A parsed bundle: the container and its typed manifest. The manifest bytes are kept exactly
/// as read: the signature covers them.
#[derive(Debug, Clone)]
pub struct Bundle {
    manifest: Manifest,
    raw: RawBundle,
}

impl Bundle {
    /// An unsigned bundle of `manifest` and `weights`. Sets `manifest.weights` (length and
    /// SHA-256) from the weights, then validates the manifest.
    pub fn new(mut manifest: Manifest, weights: Vec<u8>) -> Result<Bundle, BundleError> {
        manifest.weights.len = weights.len() as u64;
        manifest.weights.sha256 = hex::sha256(&weights);
        manifest.validate()?;
        let manifest_bytes = serde_json::to_vec(&manifest).map_err(BundleError::Serialize)?;
        let raw = RawBundle::new(manifest_bytes, weights)?;
        Ok(Bundle { manifest, raw })
    }

    /// Parses a bundle and checks its structure and manifest (not its signature: see
    /// [`Bundle::verify`]).
    pub fn read(bytes: &[u8]) -> Result<Bundle, BundleError> {
        let raw = RawBundle::read(bytes)?;
        let manifest: Manifest = serde_json::from_slice(raw.manifest_bytes())
            .map_err(|source| BundleError::ManifestJson { source })?;
        manifest.validate()?;
        if manifest.weights.len != raw.weights().len() as u64 {
            return Err(BundleError::WeightsLength {
                expected: manifest.weights.len,
                found: raw.weights().len() as u64,
            });
        }
        Ok(Bundle { manifest, raw })
    }

    /// Reads and parses a bundle file (see [`Bundle::read`]).
    pub fn read_file(path: &std::path::Path) -> Result<Bundle, BundleFileError> {
        let bytes = std::fs::read(path).map_err(|source| BundleFileError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Bundle::read(&bytes).map_err(|source| BundleFileError::Bundle {
            path: path.display().to_string(),
            source,
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The container (structure and signature, no typed manifest).
    pub fn raw(&self) -> &RawBundle {
        &self.raw
    }

    /// The manifest exactly as stored (the signed bytes).
    pub fn manifest_bytes(&self) -> &[u8] {
        self.raw.manifest_bytes()
    }

    /// The burnpack weights.
    pub fn weights(&self) -> &[u8] {
        self.raw.weights()
    }

    pub fn signature(&self) -> Option<&BundleSignature> {
        self.raw.signature()
    }

    /// Signs the bundle (replacing any previous signature).
    pub fn sign(&mut self, key: &SigningKey) {
        self.raw.sign(key);
    }

    /// The file bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.raw.to_bytes()
    }

    /// Proves the bundle was signed by a trusted key and that the weights are the ones the
    /// manifest names (see [`RawBundle::verify_digest`] for the order of refusals).
    pub fn verify(&self, trusted: &TrustedKeys) -> Result<(), BundleError> {
        self.raw
            .verify_digest(trusted, &self.manifest.weights.sha256)
    }
}
