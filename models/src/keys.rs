//! Ed25519 keys for signing and verifying bundles, and the set of keys a device trusts
//! (defined in `ember-bundle`, which has no burn dependency; re-exported here).

pub use ember_bundle::keys::*;
