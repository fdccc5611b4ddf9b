//! Bad bundles are refused, each with a message naming the problem.

use ember_models::bundle::HEADER_LEN;
use ember_models::{Bundle, BundleError, Device, LoadedModel, ModelError, TrustedKeys};

use crate::{bundle, bundle_bytes, dev_keys, dev_secret_key};

/// Offsets of the manifest, weights and signature trailer in a signed bundle's bytes.
fn sections(bytes: &[u8]) -> (usize, usize, usize) {
    let m = u32::from_le_bytes(bytes[12..16].try_into().expect("header")) as usize;
    let w = u64::from_le_bytes(bytes[16..24].try_into().expect("header")) as usize;
    (HEADER_LEN, HEADER_LEN + m, HEADER_LEN + m + w)
}

fn read_and_verify(bytes: &[u8]) -> Result<(), BundleError> {
    Bundle::read(bytes)?.verify(&dev_keys())
}

fn refused(bytes: &[u8]) -> (BundleError, String) {
    let err = read_and_verify(bytes).expect_err("a bad bundle was accepted");
    let msg = err.to_string();
    (err, msg)
}

#[test]
fn the_original_is_accepted() {
    read_and_verify(&bundle_bytes("activity-f32")).unwrap();
}

#[test]
fn a_flipped_byte_in_the_manifest_breaks_the_signature() {
    let mut bytes = bundle_bytes("activity-f32");
    let (m, _, _) = sections(&bytes);
    // Keep the JSON valid so the change reaches signature verification: "activity" -> "activitz".
    let at = m + find(&bytes[m..], br#""name":"activity""#).unwrap() + br#""name":"activit"#.len();
    bytes[at] ^= 0x03;
    let (err, msg) = refused(&bytes);
    assert!(matches!(err, BundleError::BadSignature { .. }), "{msg}");
    assert!(msg.contains("signature does not verify"), "{msg}");
}

#[test]
fn a_flipped_byte_that_breaks_the_manifest_json_is_named() {
    let mut bytes = bundle_bytes("activity-f32");
    let (m, _, _) = sections(&bytes);
    bytes[m] ^= 0x40; // the opening brace
    let (err, msg) = refused(&bytes);
    assert!(matches!(err, BundleError::ManifestJson { .. }), "{msg}");
    assert!(msg.contains("manifest is not valid JSON"), "{msg}");
}

#[test]
fn a_flipped_byte_in_the_weights_is_a_digest_mismatch() {
    let mut bytes = bundle_bytes("activity-int8");
    let (_, w, s) = sections(&bytes);
    bytes[(w + s) / 2] ^= 0x10;
    let (err, msg) = refused(&bytes);
    assert!(matches!(err, BundleError::WeightsDigest { .. }), "{msg}");
    assert!(
        msg.contains("weights do not match the manifest's sha256"),
        "{msg}"
    );
    // Loading without verifying still refuses the weights.
    let b = Bundle::read(&bytes).unwrap();
    let err = LoadedModel::load(&b, &Device::flex()).unwrap_err();
    assert!(matches!(err, ModelError::WeightsDigest { .. }), "{err}");
}

#[test]
fn a_flipped_byte_in_the_signature_is_refused() {
    let mut bytes = bundle_bytes("anomaly-f32");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    let (err, msg) = refused(&bytes);
    assert!(matches!(err, BundleError::BadSignature { .. }), "{msg}");
}

#[test]
fn a_flipped_byte_in_the_key_id_is_an_untrusted_key() {
    let mut bytes = bundle_bytes("anomaly-f32");
    let (_, _, s) = sections(&bytes);
    bytes[s] ^= 0x01;
    let (err, msg) = refused(&bytes);
    assert!(matches!(err, BundleError::UntrustedKey { .. }), "{msg}");
}

#[test]
fn a_key_that_is_not_trusted_is_refused() {
    let b = bundle("activity-f32");
    let stranger = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]).verifying_key();
    let err = b.verify(&TrustedKeys::new().with(stranger)).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, BundleError::UntrustedKey { .. }), "{msg}");
    let dev_id = b.signature().unwrap().key_id.to_string();
    assert!(
        msg.contains(&dev_id) && msg.contains("not trusted"),
        "{msg}"
    );
    let err = b.verify(&TrustedKeys::new()).unwrap_err().to_string();
    assert!(err.contains("trusted: none"), "{err}");
}

#[test]
fn a_bundle_signed_by_another_key_is_refused() {
    let mut b = bundle("activity-f32");
    b.sign(&ed25519_dalek::SigningKey::from_bytes(&[5u8; 32]));
    let err = Bundle::read(&b.to_bytes())
        .unwrap()
        .verify(&dev_keys())
        .unwrap_err();
    assert!(matches!(err, BundleError::UntrustedKey { .. }), "{err}");
}

#[test]
fn an_unsigned_bundle_is_refused() {
    let signed = bundle("activity-f32");
    let unsigned = Bundle::new(signed.manifest().clone(), signed.weights().to_vec()).unwrap();
    let err = Bundle::read(&unsigned.to_bytes())
        .unwrap()
        .verify(&dev_keys())
        .unwrap_err();
    assert!(matches!(err, BundleError::NotSigned), "{err}");
    assert!(err.to_string().contains("ember-models sign"), "{err}");
}

#[test]
fn clearing_the_signed_flag_is_refused() {
    let mut bytes = bundle_bytes("activity-f32");
    bytes[10] = 0;
    // The trailer is now unexpected bytes after the weights.
    let (err, msg) = refused(&bytes);
    assert!(
        matches!(err, BundleError::TrailingBytes { extra: 72 }),
        "{msg}"
    );
}

#[test]
fn truncated_files_are_refused_at_every_section() {
    let bytes = bundle_bytes("activity-int8");
    let (m, w, s) = sections(&bytes);
    for (cut, what) in [
        (0, "the header"),
        (4, "the header"),
        (HEADER_LEN - 1, "the header"),
        (m + 10, "the manifest"),
        (w + 10, "the weights"),
        (s + 3, "the signature"),
        (bytes.len() - 1, "the signature"),
    ] {
        let err = Bundle::read(&bytes[..cut]).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, BundleError::Truncated { .. }),
            "cut at {cut}: {msg}"
        );
        assert!(
            msg.contains("truncated") && msg.contains(what),
            "cut at {cut}: {msg}"
        );
    }
}

#[test]
fn bad_magic_unknown_version_unknown_flags_and_trailing_bytes() {
    let good = bundle_bytes("activity-f32");

    let mut bytes = good.clone();
    bytes[0] = b'X';
    let err = Bundle::read(&bytes).unwrap_err();
    assert!(matches!(err, BundleError::BadMagic { .. }), "{err}");
    assert!(
        err.to_string().contains("not an Ember model bundle"),
        "{err}"
    );
    let err = Bundle::read(b"PK\x03\x04 a zip file, say").unwrap_err();
    assert!(matches!(err, BundleError::BadMagic { .. }), "{err}");

    let mut bytes = good.clone();
    bytes[8..10].copy_from_slice(&2u16.to_le_bytes());
    let err = Bundle::read(&bytes).unwrap_err();
    assert!(
        matches!(err, BundleError::UnsupportedVersion { found: 2 }),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("format version 2 is not supported"),
        "{err}"
    );

    let mut bytes = good.clone();
    bytes[10] |= 0x80;
    let err = Bundle::read(&bytes).unwrap_err();
    assert!(matches!(err, BundleError::UnknownFlags { .. }), "{err}");

    let mut bytes = good.clone();
    bytes.extend_from_slice(b"junk");
    let err = Bundle::read(&bytes).unwrap_err();
    assert!(
        matches!(err, BundleError::TrailingBytes { extra: 4 }),
        "{err}"
    );

    let mut bytes = good;
    bytes[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    let err = Bundle::read(&bytes).unwrap_err();
    assert!(matches!(err, BundleError::ManifestTooLarge { .. }), "{err}");
}

#[test]
fn golden_vectors_that_fail_are_named_with_their_deviation() {
    let original = bundle("activity-f32");
    let mut manifest = original.manifest().clone();
    manifest.golden.vectors[1].output[2] += 0.01;
    let mut b = Bundle::new(manifest, original.weights().to_vec()).unwrap();
    b.sign(&dev_secret_key());
    // Correctly signed, so verification passes: only running the model catches it.
    let b = Bundle::read(&b.to_bytes()).unwrap();
    b.verify(&dev_keys()).unwrap();
    let model = LoadedModel::load(&b, &Device::flex()).unwrap();
    let err = model.run_golden().unwrap_err();
    let msg = err.to_string();
    match err {
        ModelError::Golden {
            index,
            output,
            max_deviation,
            ..
        } => {
            assert_eq!((index, output), (1, 2));
            assert!((max_deviation - 0.01).abs() < 1e-3, "{msg}");
        }
        other => panic!("expected a golden failure, got {other}"),
    }
    assert!(
        msg.contains("golden vector 1") && msg.contains("max deviation"),
        "{msg}"
    );
}

#[test]
fn an_inconsistent_manifest_is_refused_with_the_field_named() {
    let original = bundle("anomaly-f32");
    let mut manifest = original.manifest().clone();
    manifest.input.normalization.std.pop();
    let err = Bundle::new(manifest, original.weights().to_vec())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("input.normalization.std") && err.contains("5 values for 6 channels"),
        "{err}"
    );

    let mut manifest = original.manifest().clone();
    manifest.version = "1.0".into();
    let err = Bundle::new(manifest, original.weights().to_vec())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`version`") && err.contains("semantic version"),
        "{err}"
    );

    let mut manifest = original.manifest().clone();
    manifest.golden.vectors[0].input.truncate(10);
    let err = Bundle::new(manifest, original.weights().to_vec())
        .unwrap_err()
        .to_string();
    assert!(err.contains("golden.vectors[0].input"), "{err}");
}

#[test]
fn weights_of_another_architecture_are_refused_on_load() {
    let activity = bundle("activity-f32");
    let anomaly = bundle("anomaly-f32");
    // A (correctly hashed) anomaly manifest carrying activity weights.
    let b = Bundle::new(anomaly.manifest().clone(), activity.weights().to_vec()).unwrap();
    let err = LoadedModel::load(&b, &Device::flex()).unwrap_err();
    assert!(matches!(err, ModelError::WeightsMismatch { .. }), "{err}");
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let model = LoadedModel::load(&bundle("activity-f32"), &Device::flex()).unwrap();
    let err = model.infer(&[0.0; 599]).unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::InputLength {
                len: 599,
                per_window: 600,
                ..
            }
        ),
        "{err}"
    );
    let err = model.infer(&[]).unwrap_err();
    assert!(matches!(err, ModelError::InputLength { .. }), "{err}");
    let mut x = vec![0.0; 1200];
    x[600 + 2 * 100 + 7] = f32::NAN;
    let err = model.infer(&x).unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::NonFinite {
                window: 1,
                channel: 2,
                sample: 7,
                ..
            }
        ),
        "{err}"
    );
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
