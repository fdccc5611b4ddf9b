//! Signed variants of the committed model bundles (`models/bundles/*.bundle`), for tests.
//!
//! Everything here signs with the **development** key `models/keys/dev/dev.key`, whose secret
//! half is committed on purpose (see `models/keys/dev/README.md`): anyone can sign anything
//! with it, so it must never be trusted outside tests and demos.

use std::path::PathBuf;

/// The repository root (this crate lives in `<root>/lib/testkit`).
fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A committed bundle, e.g. `committed("activity-f32")` → `models/bundles/activity-f32.bundle`.
pub fn committed_path(name: &str) -> PathBuf {
    repo_root()
        .join("models/bundles")
        .join(format!("{name}.bundle"))
}

/// The bytes of a committed bundle (see [`committed_path`]).
pub fn committed(name: &str) -> Vec<u8> {
    let path = committed_path(name);
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; the committed bundles are rebuilt by models/scripts/build-bundles.sh",
            path.display()
        )
    })
}

/// The development public key file (`models/keys/dev/dev.pub`), to configure as trusted.
pub fn dev_public_key_path() -> PathBuf {
    repo_root().join("models/keys/dev/dev.pub")
}

/// The development signing key (`models/keys/dev/dev.key`). Development only.
pub fn dev_signing_key() -> ember_bundle::SigningKey {
    ember_bundle::keys::read_signing_key(&repo_root().join("models/keys/dev/dev.key"))
        .unwrap_or_else(|e| panic!("the development key: {e}"))
}

/// A variant of the committed bundle `name` (e.g. `"activity-f32"`): `edit_manifest` changes
/// its manifest JSON (e.g. `m["version"] = "1.1.0".into()`), `edit_weights` its weights; the
/// manifest's weights length and digest are updated, and the result is signed with the
/// development key (see [`ember_bundle::rebundle`]).
pub fn variant(
    name: &str,
    edit_manifest: impl FnOnce(&mut serde_json::Value),
    edit_weights: impl FnOnce(&mut Vec<u8>),
) -> Vec<u8> {
    ember_bundle::rebundle(
        &committed(name),
        &dev_signing_key(),
        edit_manifest,
        edit_weights,
    )
    .unwrap_or_else(|e| panic!("cannot make a variant of {name}: {e}"))
}

/// The committed bundle `name` as version `version`, otherwise unchanged, signed with the
/// development key.
pub fn with_version(name: &str, version: &str) -> Vec<u8> {
    variant(name, |m| m["version"] = version.into(), |_| {})
}
