//! The `ember-models` binary: verify and inspect exit codes and messages.

use std::process::Command;

use crate::{bundle_bytes, bundle_path, dev_public_key};

fn ember_models(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ember-models"))
        .args(args)
        .output()
        .expect("run ember-models");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn verify_accepts_the_committed_bundles_and_refuses_a_tampered_one() {
    let key = dev_public_key();
    let key = key.to_str().unwrap();
    for name in crate::BUNDLES {
        let path = bundle_path(name);
        let (ok, stdout, stderr) =
            ember_models(&["verify", path.to_str().unwrap(), "--trusted", key]);
        assert!(ok, "{name}: {stderr}");
        assert!(
            stdout.contains("OK") && stdout.contains("golden vectors reproduced"),
            "{stdout}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let tampered = dir.path().join("tampered.bundle");
    let mut bytes = bundle_bytes("activity-f32");
    let last = bytes.len() - 10;
    bytes[last] ^= 0x20;
    std::fs::write(&tampered, bytes).unwrap();
    let (ok, _, stderr) = ember_models(&["verify", tampered.to_str().unwrap(), "--trusted", key]);
    assert!(!ok);
    assert!(
        stderr.contains("refused") && stderr.contains("signature does not verify"),
        "{stderr}"
    );
}

#[test]
fn inspect_prints_the_manifest_summary() {
    let path = bundle_path("anomaly-int8");
    let (ok, stdout, stderr) = ember_models(&["inspect", path.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    for needle in [
        "anomaly 1.0.0",
        "precision int8",
        "hop 50",
        "roc_auc",
        "signed by key",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in\n{stdout}");
    }
    let (ok, stdout, _) = ember_models(&["inspect", "--json", path.to_str().unwrap()]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["precision"], "int8");
}
