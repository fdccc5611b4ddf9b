//! The committed bundles reproduce their golden vectors on burn's wgpu backend.
//!
//! Runs wherever a Vulkan (or Metal, DX12) adapter exists; on a machine without a GPU, Mesa's
//! lavapipe software driver is one. No adapter is a failure, never a skip: CI must not pass
//! without having run the models on wgpu.

use std::path::PathBuf;

use ember_models::{Backend, Bundle, LoadedModel, TrustedKeys};

fn bundles() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bundles");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "bundle"))
        .collect();
    paths.sort();
    paths
}

// One test: burn's wgpu runtime is initialized once per process.
#[test]
fn every_committed_bundle_reproduces_its_golden_vectors_on_wgpu() {
    let device = Backend::Wgpu.device().unwrap_or_else(|e| {
        panic!("cannot run the wgpu golden test: {e}");
    });
    let keys_path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("keys/dev/dev.pub");
    let keys = TrustedKeys::from_files(&[keys_path]).expect("dev public key");
    let paths = bundles();
    assert!(
        paths.len() >= 4,
        "expected the 4 committed bundles, found {paths:?}"
    );
    for path in &paths {
        let name = path.display();
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{name}: {e}"));
        let bundle = Bundle::read(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        bundle
            .verify(&keys)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let model = LoadedModel::load(&bundle, &device).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            !bundle.manifest().golden.vectors.is_empty(),
            "{name} has no golden vectors"
        );
        model
            .run_golden()
            .unwrap_or_else(|e| panic!("{name} on wgpu: {e}"));
        eprintln!(
            "{name}: {} golden vectors match on wgpu",
            bundle.manifest().golden.vectors.len()
        );
    }
}
