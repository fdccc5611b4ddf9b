//! Unit tests against the committed bundles in `models/bundles/` (signed by the development key).

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use ed25519_dalek::SigningKey;

use super::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn bytes(name: &str) -> Vec<u8> {
    std::fs::read(repo().join(format!("models/bundles/{name}.bundle"))).unwrap()
}

fn dev_key() -> SigningKey {
    keys::read_signing_key(&repo().join("models/keys/dev/dev.key")).unwrap()
}

fn dev_trusted() -> TrustedKeys {
    TrustedKeys::from_files(&[repo().join("models/keys/dev/dev.pub")]).unwrap()
}

fn check(b: &[u8]) -> Result<ManifestHead, BundleError> {
    RawBundle::read(b)?.verify(&dev_trusted())
}

#[test]
fn committed_bundles_verify_and_round_trip() {
    for name in [
        "activity-f32",
        "activity-int8",
        "anomaly-f32",
        "anomaly-int8",
    ] {
        let b = bytes(name);
        let head = check(&b).unwrap();
        assert_eq!(head.version, "1.0.0");
        assert_eq!(
            format!("{}-{}", head.architecture.kind, head.precision),
            name
        );
        assert_eq!(RawBundle::read(&b).unwrap().to_bytes(), b, "{name}");
    }
}

#[test]
fn a_flipped_weight_byte_is_a_digest_mismatch() {
    let mut b = bytes("activity-int8");
    let at = b.len() - 200;
    b[at] ^= 0x10;
    let err = check(&b).unwrap_err();
    assert!(matches!(err, BundleError::WeightsDigest { .. }), "{err}");
    assert!(err.to_string().contains("weights do not match"), "{err}");
}

#[test]
fn a_flipped_signature_byte_is_a_bad_signature() {
    let mut b = bytes("anomaly-f32");
    let last = b.len() - 1;
    b[last] ^= 1;
    let err = check(&b).unwrap_err();
    assert!(matches!(err, BundleError::BadSignature { .. }), "{err}");
}

#[test]
fn truncation_names_the_section() {
    let b = bytes("activity-f32");
    let err = RawBundle::read(&b[..b.len() - 10]).unwrap_err();
    assert!(
        err.to_string()
            .contains("truncated: the signature needs 72 bytes"),
        "{err}"
    );
    let err = RawBundle::read(&b[..10]).unwrap_err();
    assert!(err.to_string().contains("the header"), "{err}");
    let err = RawBundle::read(&b[..100]).unwrap_err();
    assert!(err.to_string().contains("the manifest"), "{err}");
    let err = RawBundle::read(b"not a bundle").unwrap_err();
    assert!(matches!(err, BundleError::BadMagic { .. }), "{err}");
    let err = RawBundle::read(b"").unwrap_err();
    assert!(matches!(err, BundleError::Truncated { .. }), "{err}");
}

#[test]
fn trailing_bytes_are_refused() {
    let mut b = bytes("activity-f32");
    b.extend_from_slice(b"xyz");
    let err = RawBundle::read(&b).unwrap_err();
    assert!(
        matches!(err, BundleError::TrailingBytes { extra: 3 }),
        "{err}"
    );
}

#[test]
fn an_untrusted_key_is_named() {
    let b = bytes("activity-f32");
    let other = TrustedKeys::new().with(SigningKey::from_bytes(&[9u8; 32]).verifying_key());
    let err = RawBundle::read(&b).unwrap().verify(&other).unwrap_err();
    assert!(matches!(err, BundleError::UntrustedKey { .. }), "{err}");
    assert!(err.to_string().contains("not trusted here"), "{err}");
    let err = RawBundle::read(&b)
        .unwrap()
        .verify(&TrustedKeys::new())
        .unwrap_err();
    assert!(err.to_string().contains("(trusted: none)"), "{err}");
}

#[test]
fn unsigned_is_refused_and_resigning_round_trips() {
    let raw = RawBundle::read(&bytes("anomaly-int8")).unwrap();
    let unsigned = RawBundle::new(raw.manifest_bytes().to_vec(), raw.weights().to_vec()).unwrap();
    let err = RawBundle::read(&unsigned.to_bytes())
        .unwrap()
        .verify(&dev_trusted())
        .unwrap_err();
    assert!(matches!(err, BundleError::NotSigned), "{err}");
    let mut signed = unsigned;
    signed.sign(&dev_key());
    // ed25519 is deterministic: the same key and bytes give the committed file.
    assert_eq!(signed.to_bytes(), bytes("anomaly-int8"));
}

#[test]
fn rebundle_makes_a_signed_variant() {
    let src = bytes("activity-f32");
    let out = rebundle(
        &src,
        &dev_key(),
        |m| m["version"] = "1.1.0".into(),
        |w| w.push(0),
    )
    .unwrap();
    let head = check(&out).unwrap();
    assert_eq!(head.version, "1.1.0");
    assert_eq!(
        head.weights.len as usize,
        RawBundle::read(&src).unwrap().weights().len() + 1
    );
    let err = rebundle(&src, &dev_key(), |m| m["version"] = "1.1".into(), |_| {}).unwrap_err();
    assert!(err.to_string().contains("not a semantic version"), "{err}");
    let err = rebundle(&src, &dev_key(), |m| *m = serde_json::json!([]), |_| {}).unwrap_err();
    assert!(err.to_string().contains("`weights`"), "{err}");
}

#[test]
fn versions_sort_by_semver_precedence() {
    let mut v: Vec<Version> = [
        "1.10.0",
        "1.2.0",
        "1.2.0-rc.1",
        "1.2.0-alpha",
        "0.9.9",
        "1.2.0-rc.10",
    ]
    .iter()
    .map(|s| Version::parse(s).unwrap())
    .collect();
    v.sort();
    let got: Vec<&str> = v.iter().map(Version::as_str).collect();
    assert_eq!(
        got,
        [
            "0.9.9",
            "1.2.0-alpha",
            "1.2.0-rc.1",
            "1.2.0-rc.10",
            "1.2.0",
            "1.10.0"
        ]
    );
    for bad in [
        "1.0",
        "01.0.0",
        "1.0.0-",
        "x",
        "1.0.0+",
        "99999999999999999999999.0.0",
    ] {
        assert!(Version::parse(bad).is_err(), "{bad}");
    }
}
