//! The committed bundles reproduce their golden vectors on burn's wgpu backend.
//!
//! On Linux it requires a Vulkan adapter; on a machine without a GPU, Mesa's lavapipe software
//! driver is one (what CI uses). Vulkan is pinned because `Backend::Wgpu`'s automatic choice
//! falls back to OpenGL (Mesa's llvmpipe through EGL) when the Vulkan loader finds no driver,
//! and CI would then pass without having run the Vulkan path. Elsewhere (Metal on macOS, DX12)
//! it takes `Backend::Wgpu`'s automatic choice. No adapter is a failure, never a skip.
//!
//! int8 bundles are dequantized on the CPU before their weights move to the device (burn 0.22's
//! GPU backends cannot run Q8S weights): on wgpu they compute in f32, like f32 bundles.

use std::path::PathBuf;

use ember_models::{Bundle, Device, LoadOptions, LoadedModel, ModelError, Precision, TrustedKeys};

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

#[cfg(target_os = "linux")]
fn wgpu_device() -> Device {
    use burn::tensor::wgpu::WgpuBackend;
    Device::wgpu_options()
        .graphics_api(WgpuBackend::Vulkan)
        .init()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run the wgpu golden test: no Vulkan adapter ({e}). Without a GPU, install Mesa's software Vulkan driver (lavapipe) and the loader: `apt-get install mesa-vulkan-drivers libvulkan1` (scripts/install-deps.sh does it); `VK_LOADER_DEBUG=driver` shows where the loader looked for a driver"
            )
        })
}

#[cfg(not(target_os = "linux"))]
fn wgpu_device() -> Device {
    ember_models::Backend::Wgpu
        .device()
        .unwrap_or_else(|e| panic!("cannot run the wgpu golden test: {e}"))
}

// One test: burn's wgpu runtime is initialized once per process.
#[test]
fn every_committed_bundle_reproduces_its_golden_vectors_on_wgpu() {
    let device = wgpu_device();
    let adapter = device
        .identity()
        .map_or_else(|| "?".to_string(), |i| i.name);
    eprintln!("wgpu adapter: {adapter}");
    let keys_path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("keys/dev/dev.pub");
    let keys = TrustedKeys::from_files(&[keys_path]).expect("dev public key");
    let paths = bundles();
    assert!(
        paths.len() >= 4,
        "expected the 4 committed bundles, found {paths:?}"
    );
    let mut int8 = 0;
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
        if bundle.manifest().precision == Precision::Int8 {
            int8 += 1;
            // Quantized weights cannot run on wgpu: asking to keep them is an error, not a
            // panic inside burn at the first forward pass.
            let kept = LoadedModel::load_with(&bundle, &device, LoadOptions { dequantize: false });
            assert!(
                matches!(kept, Err(ModelError::KeepQuantized { .. })),
                "{name}: keeping int8 weights quantized on wgpu must be refused, got {kept:?}"
            );
        }
    }
    assert!(
        int8 >= 2,
        "expected the 2 committed int8 bundles, found {int8}"
    );
}
