//! `ember-inference-bench`: latency, agreement and memory of Ember's models on burn, against
//! the same weights in tract (here) and ONNX Runtime (`bench/onnx/bench_ort.py`).
//!
//! ```text
//! ember-inference-bench export --out DIR           # DIR/<bundle>.json for build_onnx.py
//! ember-inference-bench latency --onnx DIR ...     # burn and tract, JSON lines on stdout
//! ember-inference-bench memory --bundle FILE       # RSS delta of loading one bundle
//! ```
//!
//! Every case runs the models' golden inputs (raw sensor values, as the agent would pass
//! them): batch 1 is the first golden window, batch 32 the golden windows repeated. Before a
//! runtime is timed its outputs are compared with burn's; a mismatch above the tolerance is
//! an error, not a footnote. `bench/onnx/run.sh` drives the whole comparison.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use ember_models::{Backend, Bundle, LoadedModel};
use serde_json::json;
use tract_onnx::prelude::*;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Exports every bundle's architecture, weights and golden vectors as JSON.
    Export {
        #[arg(long, default_value = "models/bundles")]
        bundles: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Times burn (and tract on DIR/<bundle>.onnx) at batch 1 and 32.
    Latency {
        #[arg(long, default_value = "models/bundles")]
        bundles: PathBuf,
        /// Where build_onnx.py wrote the .onnx files.
        #[arg(long)]
        onnx: PathBuf,
        #[arg(long, default_value_t = 2000)]
        iters: usize,
        #[arg(long, default_value_t = 200)]
        warmup: usize,
        /// Largest allowed |tract - burn| before timing.
        #[arg(long, default_value_t = 1e-4)]
        tolerance: f32,
        /// Backends to time burn on (flex, wgpu).
        #[arg(long, value_delimiter = ',', default_value = "flex")]
        backends: Vec<Backend>,
        /// Label copied into every result line (e.g. the round number).
        #[arg(long, default_value = "")]
        round: String,
    },
    /// Resident memory before and after loading one bundle on flex (run one per process).
    Memory {
        #[arg(long)]
        bundle: PathBuf,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Export { bundles, out } => export(&bundles, &out),
        Cmd::Latency {
            bundles,
            onnx,
            iters,
            warmup,
            tolerance,
            backends,
            round,
        } => latency(&bundles, &onnx, iters, warmup, tolerance, &backends, &round),
        Cmd::Memory { bundle } => memory(&bundle),
    }
}

fn bundle_paths(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("{}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "bundle") {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths)
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn read_bundle(path: &Path) -> Result<Bundle> {
    let bytes = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
    Bundle::read(&bytes).with_context(|| format!("{}", path.display()))
}

fn export(bundles: &Path, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out)?;
    let device = Backend::Flex.device()?;
    for path in bundle_paths(bundles)? {
        let model = LoadedModel::load(&read_bundle(&path)?, &device)?;
        let exported = ember_models::export::export(&model)?;
        let target = out.join(format!("{}.json", stem(&path)));
        std::fs::write(&target, serde_json::to_vec(&exported)?)?;
        eprintln!("exported {}", target.display());
    }
    Ok(())
}

/// The benchmark input for `batch` windows: golden inputs, cycled.
fn input(model: &LoadedModel, batch: usize) -> Vec<f32> {
    let vectors = &model.golden().vectors;
    (0..batch)
        .flat_map(|i| vectors[i % vectors.len()].input.iter().copied())
        .collect()
}

struct Timing {
    p50_us: f64,
    p99_us: f64,
    min_us: f64,
    mean_us: f64,
}

fn time(iters: usize, warmup: usize, mut run: impl FnMut() -> Result<()>) -> Result<Timing> {
    for _ in 0..warmup {
        run()?;
    }
    let mut samples = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t0 = Instant::now();
        run()?;
        samples.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    let pct = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    Ok(Timing {
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        min_us: samples[0],
        mean_us: samples.iter().sum::<f64>() / samples.len() as f64,
    })
}

// A plan plus its reusable state: what a long-running tract user keeps between calls.
type Plan = TypedSimpleState;

fn tract_plan(path: &Path, batch: usize, channels: usize, window: usize) -> Result<Plan> {
    let plan = tract_onnx::onnx()
        .model_for_path(path)
        .with_context(|| format!("{}", path.display()))?
        .with_input_fact(0, f32::fact([batch, channels, window]).into())?
        .into_optimized()?
        .into_runnable()?;
    Ok(plan.spawn()?)
}

fn tract_run(
    plan: &mut Plan,
    x: &[f32],
    batch: usize,
    channels: usize,
    window: usize,
) -> Result<Vec<f32>> {
    let t = Tensor::from_shape(&[batch, channels, window], x)?;
    let out = plan.run(tvec!(t.into()))?;
    Ok(out[0].to_plain_array_view::<f32>()?.iter().copied().collect())
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> Result<f32> {
    if a.len() != b.len() {
        bail!("{} outputs vs {}", a.len(), b.len());
    }
    Ok(a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max))
}

#[allow(clippy::too_many_arguments)]
fn emit(round: &str, runtime: &str, name: &str, batch: usize, t: &Timing, max_diff: Option<f32>) {
    println!(
        "{}",
        json!({
            "round": round, "runtime": runtime, "model": name, "batch": batch,
            "p50_us": t.p50_us, "p99_us": t.p99_us, "min_us": t.min_us, "mean_us": t.mean_us,
            "max_abs_diff_vs_burn": max_diff,
        })
    );
}

fn latency(
    bundles: &Path,
    onnx: &Path,
    iters: usize,
    warmup: usize,
    tolerance: f32,
    backends: &[Backend],
    round: &str,
) -> Result<()> {
    // Each backend's device is created once per process (burn's wgpu runtime insists).
    let devices: Vec<(Backend, ember_models::Device)> = backends
        .iter()
        .map(|b| Ok((*b, b.device()?)))
        .collect::<Result<_>>()?;
    // Which adapter a GPU backend got (lavapipe, a discrete GPU, ...), for the record.
    #[cfg(feature = "wgpu")]
    for (backend, device) in &devices {
        let adapter = device.identity().map_or_else(|| "-".to_string(), |i| i.name);
        eprintln!("burn {backend}: device {adapter}");
    }
    for path in bundle_paths(bundles)? {
        let name = stem(&path);
        let bundle = read_bundle(&path)?;
        let flex = LoadedModel::load(&bundle, &Backend::Flex.device()?)?;
        let (c, w) = (flex.input().channels, flex.input().window);
        for batch in [1usize, 32] {
            let x = input(&flex, batch);
            let reference = flex.infer(&x)?.values().to_vec();
            for (backend, device) in &devices {
                let model = LoadedModel::load(&bundle, device)?;
                let diff = max_abs_diff(model.infer(&x)?.values(), &reference)?;
                if diff > tolerance {
                    bail!("{name} batch {batch}: burn {backend} differs from flex by {diff:e}");
                }
                let t = time(iters, warmup, || {
                    model.infer(&x)?;
                    Ok(())
                })?;
                emit(
                    round,
                    &format!("burn-{backend}"),
                    &name,
                    batch,
                    &t,
                    Some(diff),
                );
            }
            let onnx_path = onnx.join(format!("{name}.onnx"));
            let mut plan = tract_plan(&onnx_path, batch, c, w)?;
            // Agreement first: every golden window alone, then the whole batch.
            let mut diff = max_abs_diff(&tract_run(&mut plan, &x, batch, c, w)?, &reference)?;
            if batch == 1 {
                for v in &flex.golden().vectors {
                    let burn = flex.infer(&v.input)?;
                    let tract = tract_run(&mut plan, &v.input, 1, c, w)?;
                    diff = diff.max(max_abs_diff(&tract, burn.values())?);
                }
            }
            if diff > tolerance {
                bail!(
                    "{name} batch {batch}: tract differs from burn by {diff:e} (> {tolerance:e})"
                );
            }
            let t = time(iters, warmup, || {
                tract_run(&mut plan, &x, batch, c, w)?;
                Ok(())
            })?;
            emit(round, "tract", &name, batch, &t, Some(diff));
        }
    }
    Ok(())
}

/// Resident set size in KiB, from /proc/self/statm.
fn rss_kib() -> Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages: u64 = statm.split_whitespace().nth(1).context("statm")?.parse()?;
    Ok(pages * 4)
}

fn memory(path: &Path) -> Result<()> {
    let device = Backend::Flex.device()?;
    let bundle = read_bundle(path)?;
    let before = rss_kib()?;
    let model = LoadedModel::load(&bundle, &device)?;
    let loaded = rss_kib()?;
    let x = input(&model, 1);
    model.infer(&x)?;
    let ran = rss_kib()?;
    let x32 = input(&model, 32);
    model.infer(&x32)?;
    let ran32 = rss_kib()?;
    let params = model.net().num_params();
    println!(
        "{}",
        json!({
            "model": stem(path),
            "weights_file_bytes": bundle.weights().len(),
            "params": params,
            "f32_bytes_in_memory": params * 4,
            "rss_before_load_kib": before,
            "rss_delta_load_kib": loaded as i64 - before as i64,
            "rss_delta_after_batch1_kib": ran as i64 - before as i64,
            "rss_delta_after_batch32_kib": ran32 as i64 - before as i64,
        })
    );
    Ok(())
}
