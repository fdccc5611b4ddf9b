//! Re-bundling: a signed variant of an existing bundle with an edited manifest and/or weights.
//!
//! For tests and tooling (e.g. a "1.1.0" of a committed bundle, a variant with wrong golden
//! outputs or permuted labels). The manifest's `weights.len` and `weights.sha256` are set from
//! the edited weights after the edits, so the result is a consistent, validly signed bundle;
//! to make a *tampered* one, change its bytes after this returns. The manifest is re-serialized
//! (`serde_json`, keys sorted), which is fine: the signature covers whatever bytes are stored.

use ed25519_dalek::SigningKey;

use crate::{BundleError, RawBundle, hex};

/// Why a bundle could not be re-bundled.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error("the source bundle is invalid: {0}")]
    Source(BundleError),
    #[error("the source bundle's manifest is not a JSON object: {0}")]
    ManifestJson(serde_json::Error),
    #[error("the edited manifest is refused: {0}")]
    Result(BundleError),
}

/// Re-bundles `source` (bundle file bytes, signed or not; the signature is not checked) with
/// `edit_manifest` applied to its manifest JSON and `edit_weights` to its weights, then signs
/// it with `key`. The result passes [`RawBundle::read`] and [`RawBundle::head`], and
/// [`RawBundle::verify`] for anyone trusting `key`.
///
/// ```
/// # fn demo(src: &[u8], key: &ed25519_dalek::SigningKey) -> Result<(), ember_bundle::EditError> {
/// let v110 = ember_bundle::rebundle(src, key, |m| m["version"] = "1.1.0".into(), |_w| {})?;
/// # Ok(()) }
/// ```
pub fn rebundle(
    source: &[u8],
    key: &SigningKey,
    edit_manifest: impl FnOnce(&mut serde_json::Value),
    edit_weights: impl FnOnce(&mut Vec<u8>),
) -> Result<Vec<u8>, EditError> {
    let raw = RawBundle::read(source).map_err(EditError::Source)?;
    let mut manifest: serde_json::Value =
        serde_json::from_slice(raw.manifest_bytes()).map_err(EditError::ManifestJson)?;
    let mut weights = raw.weights().to_vec();
    edit_manifest(&mut manifest);
    edit_weights(&mut weights);
    if !manifest
        .get("weights")
        .is_some_and(serde_json::Value::is_object)
    {
        return Err(EditError::Result(BundleError::Manifest {
            field: "weights".into(),
            problem: "is missing or not an object after the edit: keep it".into(),
        }));
    }
    manifest["weights"]["len"] = (weights.len() as u64).into();
    manifest["weights"]["sha256"] = hex::sha256(&weights).into();
    let manifest_bytes =
        serde_json::to_vec(&manifest).map_err(|e| EditError::Result(BundleError::Serialize(e)))?;
    let mut out = RawBundle::new(manifest_bytes, weights).map_err(EditError::Result)?;
    out.head().map_err(EditError::Result)?;
    out.sign(key);
    Ok(out.to_bytes())
}
