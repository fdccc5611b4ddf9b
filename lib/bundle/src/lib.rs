//! The Ember model bundle container, without burn: structure, ed25519 signatures, trusted keys.
//!
//! A bundle is one file: a JSON manifest, the weights and an ed25519 signature over both.
//! Layout (all integers little-endian; `docs/model-bundle.md` is the full specification):
//!
//! ```text
//! offset      size  field
//! 0           8     magic "EMBRMODL"
//! 8           2     format version (1)
//! 10          2     flags: bit 0 = signed; other bits MUST be 0
//! 12          4     manifest length M (≤ 16 MiB)
//! 16          8     weights length W
//! 24          M     manifest, UTF-8 JSON
//! 24+M        W     weights (burnpack; opaque here)
//! 24+M+W      8     key id (signed bundles only): first 8 bytes of SHA-256(public key)
//! 32+M+W      64    ed25519 signature over bytes [0, 32+M+W) (signed bundles only)
//! ```
//!
//! The file MUST end right after the last field. The signature covers the header (so the
//! signed flag cannot be cleared), the manifest bytes exactly as stored (which hold the weights'
//! SHA-256), the weights and the key id.
//!
//! This crate knows the container ([`RawBundle`]) and the few manifest fields every consumer
//! needs ([`ManifestHead`]); `ember-models` adds the typed, fully validated manifest and
//! inference on top. The fleet uses this crate alone to verify uploads.
//!
//! **Invariant:** [`RawBundle::read`] accepts only structurally valid containers;
//! [`RawBundle::verify`] additionally proves that a trusted key signed it and that the weights
//! are the ones its manifest names.

pub mod baseline;
pub mod edit;
mod head;
pub mod hex;
pub mod keys;

pub use baseline::Baseline;
pub use edit::{EditError, rebundle};
pub use head::{ArchitectureHead, MANIFEST_FORMAT, ManifestHead, Version, WeightsHead};
pub use head::{check_model_name, check_semver, format_utc};
pub use keys::{KeyError, KeyId, TrustedKeys};

use ed25519_dalek::Signature;
/// The ed25519 key types, re-exported so users need no direct ed25519-dalek dependency.
pub use ed25519_dalek::{SigningKey, VerifyingKey};

/// First bytes of every bundle.
pub const MAGIC: [u8; 8] = *b"EMBRMODL";
/// The bundle format version this crate reads and writes.
pub const FORMAT_VERSION: u16 = 1;
/// Header bytes before the manifest.
pub const HEADER_LEN: usize = 24;
/// Largest manifest accepted.
pub const MAX_MANIFEST_LEN: usize = 16 << 20;
const FLAG_SIGNED: u16 = 1;
const KEY_ID_LEN: usize = 8;
const SIGNATURE_LEN: usize = 64;

/// Why a bundle was refused. Each message says what is wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("not an Ember model bundle: the file starts with {found:?}, not \"EMBRMODL\"")]
    BadMagic { found: String },
    #[error(
        "bundle format version {found} is not supported (this reader knows version {FORMAT_VERSION}): upgrade ember-models or rebuild the bundle"
    )]
    UnsupportedVersion { found: u16 },
    #[error(
        "bundle header has unknown flags {flags:#06x}: the file is damaged or from a newer ember-models"
    )]
    UnknownFlags { flags: u16 },
    #[error(
        "bundle is truncated: {what} needs {needed} bytes but only {available} remain; the copy is incomplete, fetch the bundle again"
    )]
    Truncated {
        what: &'static str,
        needed: u64,
        available: u64,
    },
    #[error(
        "bundle has {extra} unexpected bytes after its last field: the file is damaged or was appended to"
    )]
    TrailingBytes { extra: u64 },
    #[error(
        "bundle manifest is {len} bytes; the limit is {MAX_MANIFEST_LEN}: the header is damaged"
    )]
    ManifestTooLarge { len: u64 },
    #[error("bundle manifest is not valid JSON for this format: {source}")]
    ManifestJson { source: serde_json::Error },
    #[error("bundle manifest field `{field}` {problem}")]
    Manifest { field: String, problem: String },
    #[error(
        "bundle weights are {found} bytes but the manifest says {expected}: the bundle is damaged"
    )]
    WeightsLength { expected: u64, found: u64 },
    #[error("bundle is not signed: sign it with `ember-models sign --key <secret key> <bundle>`")]
    NotSigned,
    #[error(
        "bundle is signed by key {key_id}, which is not trusted here (trusted: {trusted}): add its public key to the trusted keys only if you trust whoever holds it"
    )]
    UntrustedKey { key_id: KeyId, trusted: String },
    #[error(
        "bundle signature does not verify with trusted key {key_id}: the manifest, weights or signature were changed after signing"
    )]
    BadSignature { key_id: KeyId },
    #[error(
        "bundle weights do not match the manifest's sha256 (manifest {expected}, weights {found}): the weights are damaged or were replaced"
    )]
    WeightsDigest { expected: String, found: String },
    #[error("cannot serialize the manifest: {0}")]
    Serialize(serde_json::Error),
}

/// A bundle file that could not be read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum BundleFileError {
    #[error("cannot read bundle {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Bundle { path: String, source: BundleError },
}

/// A bundle's signature and the id of the key that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleSignature {
    pub key_id: KeyId,
    pub signature: [u8; SIGNATURE_LEN],
}

/// A bundle's container: manifest bytes (exactly as stored: the signature covers them), weights
/// and the optional signature. The manifest is not interpreted beyond [`RawBundle::head`].
#[derive(Debug, Clone)]
pub struct RawBundle {
    manifest_bytes: Vec<u8>,
    weights: Vec<u8>,
    signature: Option<BundleSignature>,
}

fn take<'a>(
    bytes: &'a [u8],
    at: usize,
    len: usize,
    what: &'static str,
) -> Result<&'a [u8], BundleError> {
    let available = bytes.len().saturating_sub(at);
    if len > available {
        return Err(BundleError::Truncated {
            what,
            needed: len as u64,
            available: available as u64,
        });
    }
    Ok(&bytes[at..at + len])
}

fn le_u16(b: &[u8]) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[..2]);
    u16::from_le_bytes(a)
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

impl RawBundle {
    /// An unsigned bundle of `manifest_bytes` (stored as given) and `weights`.
    pub fn new(manifest_bytes: Vec<u8>, weights: Vec<u8>) -> Result<RawBundle, BundleError> {
        if manifest_bytes.len() > MAX_MANIFEST_LEN {
            return Err(BundleError::ManifestTooLarge {
                len: manifest_bytes.len() as u64,
            });
        }
        Ok(RawBundle {
            manifest_bytes,
            weights,
            signature: None,
        })
    }

    /// Parses the container: magic, version, flags, lengths, signature trailer, no trailing
    /// bytes. Does not look into the manifest (see [`RawBundle::head`]) nor check the signature
    /// (see [`RawBundle::verify`]).
    pub fn read(bytes: &[u8]) -> Result<RawBundle, BundleError> {
        let magic_len = bytes.len().min(MAGIC.len());
        if bytes[..magic_len] != MAGIC[..magic_len] {
            return Err(BundleError::BadMagic {
                found: String::from_utf8_lossy(&bytes[..magic_len]).into_owned(),
            });
        }
        let header = take(bytes, 0, HEADER_LEN, "the header")?;
        let version = le_u16(&header[8..]);
        if version != FORMAT_VERSION {
            return Err(BundleError::UnsupportedVersion { found: version });
        }
        let flags = le_u16(&header[10..]);
        if flags & !FLAG_SIGNED != 0 {
            return Err(BundleError::UnknownFlags { flags });
        }
        let manifest_len = le_u32(&header[12..]) as usize;
        if manifest_len > MAX_MANIFEST_LEN {
            return Err(BundleError::ManifestTooLarge {
                len: manifest_len as u64,
            });
        }
        let weights_len = le_u64(&header[16..]);
        let manifest_bytes = take(bytes, HEADER_LEN, manifest_len, "the manifest")?;
        let weights_at = HEADER_LEN + manifest_len;
        let weights_len = usize::try_from(weights_len).map_err(|_| BundleError::Truncated {
            what: "the weights",
            needed: weights_len,
            available: bytes.len().saturating_sub(weights_at) as u64,
        })?;
        let weights = take(bytes, weights_at, weights_len, "the weights")?;
        let mut end = weights_at + weights_len;
        let signature = if flags & FLAG_SIGNED != 0 {
            let trailer = take(bytes, end, KEY_ID_LEN + SIGNATURE_LEN, "the signature")?;
            end += KEY_ID_LEN + SIGNATURE_LEN;
            let mut key_id = [0u8; KEY_ID_LEN];
            key_id.copy_from_slice(&trailer[..KEY_ID_LEN]);
            let mut signature = [0u8; SIGNATURE_LEN];
            signature.copy_from_slice(&trailer[KEY_ID_LEN..]);
            Some(BundleSignature {
                key_id: KeyId(key_id),
                signature,
            })
        } else {
            None
        };
        if bytes.len() > end {
            return Err(BundleError::TrailingBytes {
                extra: (bytes.len() - end) as u64,
            });
        }
        Ok(RawBundle {
            manifest_bytes: manifest_bytes.to_vec(),
            weights: weights.to_vec(),
            signature,
        })
    }

    /// The manifest fields every consumer needs, parsed and checked ([`ManifestHead::check`]),
    /// and the weights' length checked against the manifest.
    pub fn head(&self) -> Result<ManifestHead, BundleError> {
        let head: ManifestHead = serde_json::from_slice(&self.manifest_bytes)
            .map_err(|source| BundleError::ManifestJson { source })?;
        head.check()?;
        if head.weights.len != self.weights.len() as u64 {
            return Err(BundleError::WeightsLength {
                expected: head.weights.len,
                found: self.weights.len() as u64,
            });
        }
        Ok(head)
    }

    /// The manifest exactly as stored (the signed bytes).
    pub fn manifest_bytes(&self) -> &[u8] {
        &self.manifest_bytes
    }

    /// The weights (burnpack; opaque to this crate).
    pub fn weights(&self) -> &[u8] {
        &self.weights
    }

    pub fn signature(&self) -> Option<&BundleSignature> {
        self.signature.as_ref()
    }

    fn header(&self, flags: u16) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..8].copy_from_slice(&MAGIC);
        h[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        h[10..12].copy_from_slice(&flags.to_le_bytes());
        h[12..16].copy_from_slice(&(self.manifest_bytes.len() as u32).to_le_bytes());
        h[16..24].copy_from_slice(&(self.weights.len() as u64).to_le_bytes());
        h
    }

    /// The bytes a signature by `key_id` covers.
    fn signed_bytes(&self, key_id: &KeyId) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            HEADER_LEN + self.manifest_bytes.len() + self.weights.len() + KEY_ID_LEN,
        );
        out.extend_from_slice(&self.header(FLAG_SIGNED));
        out.extend_from_slice(&self.manifest_bytes);
        out.extend_from_slice(&self.weights);
        out.extend_from_slice(&key_id.0);
        out
    }

    /// Signs the bundle (replacing any previous signature).
    pub fn sign(&mut self, key: &SigningKey) {
        use ed25519_dalek::Signer;
        let key_id = KeyId::of(&key.verifying_key());
        let signature = key.sign(&self.signed_bytes(&key_id)).to_bytes();
        self.signature = Some(BundleSignature { key_id, signature });
    }

    /// The file bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        match &self.signature {
            Some(sig) => {
                let mut out = self.signed_bytes(&sig.key_id);
                out.extend_from_slice(&sig.signature);
                out
            }
            None => {
                let mut out =
                    Vec::with_capacity(HEADER_LEN + self.manifest_bytes.len() + self.weights.len());
                out.extend_from_slice(&self.header(0));
                out.extend_from_slice(&self.manifest_bytes);
                out.extend_from_slice(&self.weights);
                out
            }
        }
    }

    /// Proves the bundle was signed by a trusted key and that the weights are the ones the
    /// manifest names (its `weights.sha256`). Returns the checked [`ManifestHead`].
    pub fn verify(&self, trusted: &TrustedKeys) -> Result<ManifestHead, BundleError> {
        let head = self.head()?;
        self.verify_digest(trusted, &head.weights.sha256)?;
        Ok(head)
    }

    /// [`RawBundle::verify`] with the weights' expected SHA-256 (lowercase hex) taken from a
    /// manifest the caller already parsed. Refuses, in this order: unsigned (`NotSigned`),
    /// untrusted key (`UntrustedKey`), a signature that does not verify (`WeightsDigest` if the
    /// weights no longer match `expected_sha256`, else `BadSignature`), weights that do not
    /// match `expected_sha256` (`WeightsDigest`).
    pub fn verify_digest(
        &self,
        trusted: &TrustedKeys,
        expected_sha256: &str,
    ) -> Result<(), BundleError> {
        let sig = self.signature.as_ref().ok_or(BundleError::NotSigned)?;
        let key = trusted
            .get(&sig.key_id)
            .ok_or_else(|| BundleError::UntrustedKey {
                key_id: sig.key_id,
                trusted: if trusted.is_empty() {
                    "none".to_string()
                } else {
                    trusted
                        .ids()
                        .map(|id| id.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            })?;
        let digest = hex::sha256(&self.weights);
        let digest_error = || BundleError::WeightsDigest {
            expected: expected_sha256.to_string(),
            found: digest.clone(),
        };
        let signature = Signature::from_bytes(&sig.signature);
        if key
            .verify_strict(&self.signed_bytes(&sig.key_id), &signature)
            .is_err()
        {
            // Name the most specific problem: changed weights show as a digest mismatch.
            if digest != expected_sha256 {
                return Err(digest_error());
            }
            return Err(BundleError::BadSignature { key_id: sig.key_id });
        }
        if digest != expected_sha256 {
            return Err(digest_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
