//! Ed25519 keys for signing and verifying bundles, and the set of keys a device trusts.
//!
//! Key files are text: `#` comment lines, then one line `ed25519-public <64 hex digits>` or
//! `ed25519-secret <64 hex digits>` (the 32-byte seed). A key's id is the first 8 bytes of the
//! SHA-256 of its public key, written as 16 hex digits; a signed bundle names its key by id.

use std::fmt;
use std::path::Path;

use ed25519_dalek::{SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

/// What is wrong with a key or key file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{what}: expected one line `{tag} <64 hex digits>` (after `#` comments){}",
        found.as_ref().map(|f| format!(", found {f:?}")).unwrap_or_default()
    )]
    Format {
        what: String,
        tag: &'static str,
        found: Option<String>,
    },
    #[error(
        "{what}: not a valid ed25519 public key (not a curve point); regenerate it with `ember-models keygen`"
    )]
    InvalidPublicKey { what: String },
}

/// A key id: the first 8 bytes of SHA-256(public key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; 8]);

impl KeyId {
    pub fn of(key: &VerifyingKey) -> KeyId {
        let digest = Sha256::digest(key.as_bytes());
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        KeyId(id)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::hex::encode(&self.0))
    }
}

/// The public keys whose signatures a device accepts.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    keys: Vec<(KeyId, VerifyingKey)>,
}

impl TrustedKeys {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a key (idempotent).
    pub fn insert(&mut self, key: VerifyingKey) -> KeyId {
        let id = KeyId::of(&key);
        if self.get(&id).is_none() {
            self.keys.push((id, key));
        }
        id
    }

    pub fn with(mut self, key: VerifyingKey) -> Self {
        self.insert(key);
        self
    }

    /// Reads public key files (see the module docs for the format).
    pub fn from_files<P: AsRef<Path>>(paths: &[P]) -> Result<Self, KeyError> {
        let mut keys = Self::new();
        for path in paths {
            keys.insert(read_public_key(path.as_ref())?);
        }
        Ok(keys)
    }

    pub fn get(&self, id: &KeyId) -> Option<&VerifyingKey> {
        self.keys.iter().find(|(k, _)| k == id).map(|(_, v)| v)
    }

    pub fn ids(&self) -> impl Iterator<Item = KeyId> + '_ {
        self.keys.iter().map(|(id, _)| *id)
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

const PUBLIC_TAG: &str = "ed25519-public";
const SECRET_TAG: &str = "ed25519-secret";

fn parse_tagged(text: &str, tag: &'static str, what: &str) -> Result<[u8; 32], KeyError> {
    let format_err = |found: Option<&str>| KeyError::Format {
        what: what.to_string(),
        tag,
        found: found.map(|f| f.chars().take(40).collect()),
    };
    let mut lines = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    let line = lines.next().ok_or_else(|| format_err(None))?;
    if lines.next().is_some() {
        return Err(format_err(Some(line)));
    }
    let hex = match line.split_once(char::is_whitespace) {
        Some((t, hex)) if t == tag => hex.trim(),
        _ => return Err(format_err(Some(line))),
    };
    let bytes = crate::hex::decode(hex).ok_or_else(|| format_err(Some(line)))?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| format_err(Some(line)))
}

/// Parses the text of a public key file; `what` names it in errors.
pub fn parse_public_key(text: &str, what: &str) -> Result<VerifyingKey, KeyError> {
    let bytes = parse_tagged(text, PUBLIC_TAG, what)?;
    VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::InvalidPublicKey {
        what: what.to_string(),
    })
}

/// Parses the text of a secret key file; `what` names it in errors.
pub fn parse_signing_key(text: &str, what: &str) -> Result<SigningKey, KeyError> {
    Ok(SigningKey::from_bytes(&parse_tagged(
        text, SECRET_TAG, what,
    )?))
}

fn read_text(path: &Path) -> Result<String, KeyError> {
    std::fs::read_to_string(path).map_err(|source| KeyError::Io {
        path: path.display().to_string(),
        source,
    })
}

pub fn read_public_key(path: &Path) -> Result<VerifyingKey, KeyError> {
    parse_public_key(&read_text(path)?, &path.display().to_string())
}

pub fn read_signing_key(path: &Path) -> Result<SigningKey, KeyError> {
    parse_signing_key(&read_text(path)?, &path.display().to_string())
}

/// The text of a public key file, with `comment` lines (each prefixed with `# `).
pub fn public_key_file(key: &VerifyingKey, comment: &str) -> String {
    format!(
        "{}{PUBLIC_TAG} {}\n",
        comment_lines(comment),
        crate::hex::encode(key.as_bytes())
    )
}

/// The text of a secret key file, with `comment` lines (each prefixed with `# `).
pub fn secret_key_file(key: &SigningKey, comment: &str) -> String {
    format!(
        "{}{SECRET_TAG} {}\n",
        comment_lines(comment),
        crate::hex::encode(key.as_bytes())
    )
}

fn comment_lines(comment: &str) -> String {
    comment.lines().map(|l| format!("# {l}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_round_trip() {
        let secret = SigningKey::from_bytes(&[7u8; 32]);
        let public = secret.verifying_key();
        let s = secret_key_file(&secret, "test key\nsecond line");
        let p = public_key_file(&public, "test key");
        assert_eq!(
            parse_signing_key(&s, "s").unwrap().as_bytes(),
            secret.as_bytes()
        );
        assert_eq!(parse_public_key(&p, "p").unwrap(), public);
        // A secret key is not accepted where a public key is expected.
        let err = parse_public_key(&s, "dev.key").unwrap_err().to_string();
        assert!(err.contains("ed25519-public"), "{err}");
        let err = parse_public_key("ed25519-public abcd", "short")
            .unwrap_err()
            .to_string();
        assert!(err.contains("64 hex digits"), "{err}");
    }

    #[test]
    fn trusted_keys_dedupe() {
        let k = SigningKey::from_bytes(&[1u8; 32]).verifying_key();
        let keys = TrustedKeys::new().with(k).with(k);
        assert_eq!(keys.ids().count(), 1);
        assert!(keys.get(&KeyId::of(&k)).is_some());
    }
}
