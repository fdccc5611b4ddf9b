//! The smallest program that does what the agent does with a model: read a bundle, verify its
//! signature, load it on an explicitly chosen backend, check the golden vectors and run one
//! window. Used to measure the binary size a backend adds (docs/benchmarks.md):
//!
//! ```text
//! cargo build --release -p ember-models --no-default-features --example run_bundle
//! target/release/examples/run_bundle models/bundles/activity-int8.bundle models/keys/dev/dev.pub flex
//! ```

use std::process::ExitCode;

use ember_models::{Backend, Bundle, LoadedModel, TrustedKeys};

fn run(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let [bundle, key, backend] = args else {
        return Err("usage: run_bundle BUNDLE PUBLIC_KEY flex|wgpu".into());
    };
    let backend: Backend = backend.parse()?;
    let trusted = TrustedKeys::from_files(&[key])?;
    let bundle = Bundle::read(&std::fs::read(bundle)?)?;
    bundle.verify(&trusted)?;
    let model = LoadedModel::load(&bundle, &backend.device()?)?;
    model.run_golden()?;
    let window = vec![0.0f32; model.window_len()];
    println!("{:?}", model.infer(&window)?.values());
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("run_bundle: {e}");
            ExitCode::FAILURE
        }
    }
}
