//! Lowercase hex and SHA-256, for digests and keys (from `ember-bundle`).

pub use ember_bundle::hex::*;
