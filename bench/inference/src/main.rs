//! `ember-inference-bench`: latency, agreement and memory of Ember's models on burn, against
//! the same weights in ONNX Runtime (its C API, through the `ort` crate) and tract.
//!
//! ```text
//! ember-inference-bench export --out DIR                    # DIR/<bundle>.json for build_onnx.py
//! ember-inference-bench latency --onnx DIR --ort-lib SO ... # JSON lines on stdout
//! ember-inference-bench memory --bundle FILE                # RSS delta of loading one bundle
//! ```
//!
//! Every case runs the models' golden inputs (raw sensor values, as the agent would pass
//! them): batch 1 is the first golden window, batch 32 the golden windows repeated. Before a
//! runtime is timed its outputs are compared with burn's; a mismatch above the tolerance is
//! an error, not a footnote. Rounds alternate the runtimes in one process, and every timed
//! loop also counts the process's minor page faults (`/proc/self/stat`) and the Rust heap
//! allocations (a counting global allocator; ONNX Runtime's own C++ allocations are not
//! Rust's, so its count covers only the `ort` wrapper) per call, so an allocation or a heap
//! trim that creeps back into the hot path shows. `bench/onnx/run.sh` drives the comparison.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use ember_models::{Backend, Bundle, LoadedModel};
use serde_json::json;
use tract_onnx::prelude::*;

/// The system allocator, counting allocations (a benchmark-only wrapper: this crate is not part
/// of Ember's workspace, whose lints forbid `unsafe`).
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to `System`, which upholds `GlobalAlloc`'s contract.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Minor page faults of this process so far (`/proc/self/stat`, field 10).
fn minor_faults() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // The command name (field 2) may contain spaces: count from the closing parenthesis.
    let rest = stat.rsplit_once(')').context("/proc/self/stat")?.1;
    Ok(rest
        .split_whitespace()
        .nth(7)
        .context("/proc/self/stat: minflt")?
        .parse()?)
}

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
        /// ONNX Runtime's shared library (`libonnxruntime.so`, e.g. from the `onnxruntime`
        /// wheel); without it ONNX Runtime is not timed.
        #[arg(long)]
        ort_lib: Option<PathBuf>,
        /// Rounds: every runtime is timed once per round, alternating, in this process.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
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
            ort_lib,
            rounds,
        } => {
            let ort = match &ort_lib {
                Some(lib) => Some(
                    ort::init_from(lib)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", lib.display()))?
                        .with_name("ember-inference-bench")
                        .build()
                        .map_err(|e| anyhow::anyhow!("ONNX Runtime environment: {e}"))?,
                ),
                None => None,
            };
            let opts = LatencyOptions {
                iters,
                warmup,
                tolerance,
                ort,
                rounds,
            };
            latency(&bundles, &onnx, &opts, &backends)
        }
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
    /// Per timed call, over the whole timed loop.
    allocations: f64,
    minor_faults: f64,
}

fn time(iters: usize, warmup: usize, mut run: impl FnMut() -> Result<()>) -> Result<Timing> {
    for _ in 0..warmup {
        run()?;
    }
    let mut samples = vec![0f64; iters];
    let (faults0, allocs0) = (minor_faults()?, ALLOCATIONS.load(Ordering::Relaxed));
    for sample in samples.iter_mut() {
        let t0 = Instant::now();
        run()?;
        *sample = t0.elapsed().as_secs_f64() * 1e6;
    }
    let allocations = (ALLOCATIONS.load(Ordering::Relaxed) - allocs0) as f64 / iters as f64;
    let minor_faults = (minor_faults()? - faults0) as f64 / iters as f64;
    samples.sort_by(f64::total_cmp);
    let pct = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    Ok(Timing {
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        min_us: samples[0],
        mean_us: samples.iter().sum::<f64>() / samples.len() as f64,
        allocations,
        minor_faults,
    })
}

/// An ONNX Runtime session as a C or C++ caller would set it up for this comparison: the CPU
/// provider, every graph optimization (`ORT_ENABLE_ALL`), one intra-op and one inter-op
/// thread (burn runs single-threaded).
fn ort_session(env: &ort::environment::Environment, path: &Path) -> Result<ort::session::Session> {
    use ort::session::builder::GraphOptimizationLevel;
    let err = |e: ort::Error<_>| anyhow::anyhow!("ONNX Runtime ({}): {e}", path.display());
    ort::session::Session::builder(env)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(err)?
        .with_intra_threads(1)
        .map_err(err)?
        .with_inter_threads(1)
        .map_err(err)?
        .commit_from_file(path)
        .map_err(|e| anyhow::anyhow!("ONNX Runtime ({}): {e}", path.display()))
}

/// One ONNX Runtime call on `[batch, channels, window]` raw input: the input is borrowed (no
/// copy), the output copied into `out`.
fn ort_run(
    session: &mut ort::session::Session,
    x: &[f32],
    shape: [usize; 3],
    out: &mut Vec<f32>,
) -> Result<()> {
    let input =
        ort::value::TensorRef::from_array_view((shape, x)).map_err(|e| anyhow::anyhow!("{e}"))?;
    let outputs = session
        .run(ort::inputs![input])
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (_, values) = outputs[0]
        .try_extract_tensor::<f32>()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    out.clear();
    out.extend_from_slice(values);
    Ok(())
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
    Ok(out[0]
        .to_plain_array_view::<f32>()?
        .iter()
        .copied()
        .collect())
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
            "rust_allocations_per_call": t.allocations, "minor_faults_per_call": t.minor_faults,
            "max_abs_diff_vs_burn": max_diff,
        })
    );
}

struct LatencyOptions {
    iters: usize,
    warmup: usize,
    tolerance: f32,
    ort: Option<ort::environment::Environment>,
    rounds: usize,
}

/// One timed case: a bundle at a batch size, with every runtime set up and checked.
struct Case {
    name: String,
    batch: usize,
    shape: [usize; 3],
    x: Vec<f32>,
    /// burn on each requested backend, with its agreement with flex.
    burn: Vec<(Backend, LoadedModel, f32)>,
    ort: Option<(ort::session::Session, f32)>,
    tract: (Plan, f32),
}

fn latency(bundles: &Path, onnx: &Path, opts: &LatencyOptions, backends: &[Backend]) -> Result<()> {
    let tolerance = opts.tolerance;
    // Each backend's device is created once per process (burn's wgpu runtime insists).
    let devices: Vec<(Backend, ember_models::Device)> = backends
        .iter()
        .map(|b| Ok((*b, b.device()?)))
        .collect::<Result<_>>()?;
    // Which adapter a GPU backend got (lavapipe, a discrete GPU, ...), for the record.
    #[cfg(feature = "wgpu")]
    for (backend, device) in &devices {
        let adapter = device
            .identity()
            .map_or_else(|| "-".to_string(), |i| i.name);
        eprintln!("burn {backend}: device {adapter}");
    }
    // Set up and check every case first; then time them in alternating rounds.
    let mut cases = Vec::new();
    for path in bundle_paths(bundles)? {
        let name = stem(&path);
        let bundle = read_bundle(&path)?;
        let flex = LoadedModel::load(&bundle, &Backend::Flex.device()?)?;
        let (c, w) = (flex.input().channels, flex.input().window);
        let onnx_path = onnx.join(format!("{name}.onnx"));
        for batch in [1usize, 32] {
            let x = input(&flex, batch);
            let reference = flex.infer(&x)?.values().to_vec();
            let mut burn = Vec::new();
            for (backend, device) in &devices {
                let model = LoadedModel::load(&bundle, device)?;
                let diff = max_abs_diff(model.infer(&x)?.values(), &reference)?;
                if diff > tolerance {
                    bail!("{name} batch {batch}: burn {backend} differs from flex by {diff:e}");
                }
                burn.push((*backend, model, diff));
            }
            // Agreement first: every golden window alone (batch 1), then the whole batch.
            let singles: Vec<(Vec<f32>, Vec<f32>)> = if batch == 1 {
                flex.golden()
                    .vectors
                    .iter()
                    .map(|v| Ok((v.input.clone(), flex.infer(&v.input)?.values().to_vec())))
                    .collect::<Result<_>>()?
            } else {
                Vec::new()
            };
            let ort = if let Some(env) = &opts.ort {
                let mut session = ort_session(env, &onnx_path)?;
                let mut out = Vec::new();
                ort_run(&mut session, &x, [batch, c, w], &mut out)?;
                let mut diff = max_abs_diff(&out, &reference)?;
                for (input, expected) in &singles {
                    ort_run(&mut session, input, [1, c, w], &mut out)?;
                    diff = diff.max(max_abs_diff(&out, expected)?);
                }
                if diff > tolerance {
                    bail!("{name} batch {batch}: ONNX Runtime differs from burn by {diff:e}");
                }
                Some((session, diff))
            } else {
                None
            };
            let mut plan = tract_plan(&onnx_path, batch, c, w)?;
            let mut diff = max_abs_diff(&tract_run(&mut plan, &x, batch, c, w)?, &reference)?;
            if batch == 1 {
                let mut single = tract_plan(&onnx_path, 1, c, w)?;
                for (input, expected) in &singles {
                    let tract = tract_run(&mut single, input, 1, c, w)?;
                    diff = diff.max(max_abs_diff(&tract, expected)?);
                }
            }
            if diff > tolerance {
                bail!(
                    "{name} batch {batch}: tract differs from burn by {diff:e} (> {tolerance:e})"
                );
            }
            cases.push(Case {
                name: name.clone(),
                batch,
                shape: [batch, c, w],
                x,
                burn,
                ort,
                tract: (plan, diff),
            });
        }
    }
    let (iters, warmup) = (opts.iters, opts.warmup);
    for round in 1..=opts.rounds {
        let round = round.to_string();
        for case in &mut cases {
            let (name, batch, x) = (&case.name, case.batch, &case.x);
            for (backend, model, diff) in &case.burn {
                // The agent's steady state: the output buffer is reused between calls.
                let mut out = Vec::new();
                let t = time(iters, warmup, || {
                    model.infer_into(x, &mut out)?;
                    Ok(())
                })?;
                emit(
                    &round,
                    &format!("burn-{backend}"),
                    name,
                    batch,
                    &t,
                    Some(*diff),
                );
            }
            if let Some((session, diff)) = &mut case.ort {
                let mut out = Vec::new();
                let shape = case.shape;
                let t = time(iters, warmup, || ort_run(session, x, shape, &mut out))?;
                emit(&round, "ort-c-1thread", name, batch, &t, Some(*diff));
            }
            let (plan, diff) = &mut case.tract;
            let [b, c, w] = case.shape;
            let t = time(iters, warmup, || {
                tract_run(plan, x, b, c, w)?;
                Ok(())
            })?;
            emit(&round, "tract", name, batch, &t, Some(*diff));
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
