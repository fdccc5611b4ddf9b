//! The `ember-models` command line (feature `train`). `main.rs` only calls [`main`].

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};

use crate::bundle::Bundle;
use crate::data;
use crate::inference::{LoadOptions, LoadedModel};
use crate::keys::{self, KeyId, TrustedKeys};
use crate::manifest::{OutputSpec, Precision};
use crate::package::{BundleOptions, build_bundle};
use crate::train::{self, Kind, Progress, TrainedModel};

#[derive(Parser, Debug)]
#[command(
    name = "ember-models",
    version,
    about = "Train, quantize, bundle, sign and verify Ember's models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum ModelKind {
    Activity,
    Anomaly,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a model on BasicMotions (TRAIN split) and evaluate it on the TEST split.
    Train {
        model: ModelKind,
        /// Output directory: model.json (config, normalization, metrics) and model.bpk (weights).
        #[arg(long)]
        out: PathBuf,
        /// Seed (default: the one the committed bundles use).
        #[arg(long)]
        seed: Option<u64>,
        /// Upper bound on epochs (early stopping usually ends sooner).
        #[arg(long)]
        max_epochs: Option<usize>,
        /// Anomaly model: comma-separated activities treated as normal.
        #[arg(long, value_delimiter = ',')]
        normal: Option<Vec<String>>,
        /// Directory holding the BasicMotions .ts files.
        #[arg(long, default_value = data::DATA_DIR)]
        data: PathBuf,
        /// No progress bar or per-epoch lines.
        #[arg(long)]
        quiet: bool,
    },
    /// Evaluate a bundle or a training run on the TEST split: accuracy and confusion matrix
    /// (activity) or ROC-AUC and detection rates (anomaly).
    Eval {
        /// A bundle file or a training run directory.
        path: PathBuf,
        #[arg(long, default_value = data::DATA_DIR)]
        data: PathBuf,
    },
    /// Build an unsigned bundle from a training run (quantizing for int8).
    Bundle {
        /// Training run directory (from `train`).
        #[arg(long)]
        run: PathBuf,
        #[arg(long, default_value = "f32")]
        precision: Precision,
        /// Model name (default: the architecture, `activity` or `anomaly`).
        #[arg(long)]
        name: Option<String>,
        #[arg(long, default_value = "1.0.0")]
        version: String,
        /// Creation time, RFC 3339 UTC (default: now).
        #[arg(long)]
        created_at: Option<String>,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = data::DATA_DIR)]
        data: PathBuf,
    },
    /// Record (or recompute) a bundle's training baseline, what model monitoring compares the
    /// field with: the model run over the TRAIN split as one stream. Writes an unsigned bundle
    /// unless --key is given (then signed with it). Weights are unchanged.
    Baseline {
        bundle: PathBuf,
        /// Secret key file to sign the result with.
        #[arg(long)]
        key: Option<PathBuf>,
        /// Where to write the bundle (default: in place).
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, default_value = data::DATA_DIR)]
        data: PathBuf,
    },
    /// The retraining loop (docs/retraining.md): labelled captures from the data lake plus
    /// BasicMotions → train → evaluate against the production bundle on BasicMotions TEST and a
    /// field hold-out → gate (exit status 3 when refused, no bundle written) → sign → with
    /// --rollout, upload to the fleet and start a rollout with shadow evaluation. Writes the
    /// bundle, report.md and report.svg to --out.
    Pipeline {
        /// The fleet's lake directory (lake.store), or a synced copy of its bucket.
        #[arg(long)]
        lake: PathBuf,
        /// The bundle in production now (the parent): evaluated beside the candidate.
        #[arg(long)]
        production: PathBuf,
        /// The candidate's version (default: the production version's next patch).
        #[arg(long)]
        version: Option<String>,
        /// Largest accuracy drop against production the gate accepts, on either hold-out.
        #[arg(long, default_value_t = 0.02)]
        margin: f64,
        /// Fraction of the labelled captures held out for evaluation.
        #[arg(long, default_value_t = 0.3)]
        holdout: f64,
        #[arg(long)]
        seed: Option<u64>,
        #[arg(long)]
        max_epochs: Option<usize>,
        /// Secret key file to sign with (default: the key file's text in
        /// EMBER_MODELS_SIGNING_KEY).
        #[arg(long)]
        key: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = data::DATA_DIR)]
        data: PathBuf,
        /// Upload the accepted bundle and start a rollout with shadow evaluation.
        #[arg(long)]
        rollout: bool,
        /// The fleet (default: EMBER_FLEET_URL); token from --token-file or EMBER_FLEET_TOKEN
        /// (an admin token).
        #[arg(long)]
        url: Option<String>,
        #[arg(long)]
        ca_file: Option<PathBuf>,
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Roll out to devices with these tags (`key=value`); default: every device.
        #[arg(long = "tag")]
        tags: Vec<String>,
        #[arg(long, value_delimiter = ',', default_value = "canary,50%,100%")]
        waves: Vec<String>,
        /// Shadow evaluation on each device: windows, and the agreement required.
        #[arg(long, default_value_t = 20)]
        shadow_windows: u32,
        #[arg(long, default_value_t = 0.8)]
        min_agreement: f64,
        #[arg(long)]
        quiet: bool,
    },
    /// Sign a bundle with an ed25519 secret key file (replaces any signature).
    Sign {
        bundle: PathBuf,
        #[arg(long)]
        key: PathBuf,
        /// Where to write the signed bundle (default: in place).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Verify a bundle: structure, signature by a trusted key, weights sha256, golden vectors.
    Verify {
        bundle: PathBuf,
        /// Trusted public key file(s).
        #[arg(long = "trusted", required = true)]
        trusted: Vec<PathBuf>,
    },
    /// Print a bundle's manifest summary (or the whole manifest with --json).
    Inspect {
        bundle: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Generate an ed25519 key pair: PREFIX.key (secret) and PREFIX.pub (public).
    Keygen {
        prefix: PathBuf,
        /// Comment written at the top of both files.
        #[arg(long, default_value = "Ember model-signing key")]
        comment: String,
    },
    /// Measure inference latency (batch 1 and 32); int8 bundles also with weights kept
    /// quantized, to show what dequantizing at load buys.
    Bench {
        bundles: Vec<PathBuf>,
        #[arg(long, default_value_t = 200)]
        iterations: usize,
    },
}

/// Runs the CLI; errors are printed with their causes and exit with status 1.
/// The pipeline's gate refused the candidate (exit status 3).
#[derive(Debug)]
struct GateRefused(Vec<String>);

impl std::fmt::Display for GateRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the gate refused the candidate: {}", self.0.join("; "))
    }
}

impl std::error::Error for GateRefused {}

pub fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<GateRefused>().is_some() => {
            eprintln!("refused: {e:#}");
            ExitCode::from(crate::pipeline::EXIT_REFUSED)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train {
            model,
            out,
            seed,
            max_epochs,
            normal,
            data,
            quiet,
        } => {
            let bm = data::load(&data)?;
            let kind = match model {
                ModelKind::Activity => Kind::Activity,
                ModelKind::Anomaly => Kind::Anomaly,
            };
            let mut cfg = train::default_config(kind);
            if let Some(seed) = seed {
                cfg.seed = seed;
            }
            if let Some(m) = max_epochs {
                cfg.max_epochs = m;
            }
            if let Some(normal) = normal {
                if kind == Kind::Activity {
                    bail!("--normal applies to the anomaly model only");
                }
                cfg.normal_labels = normal;
            }
            let progress = if quiet {
                Progress::hidden()
            } else {
                Progress::bar(cfg.max_epochs)
            };
            let trained = match kind {
                Kind::Activity => train::train_activity(&bm, &cfg, &progress)?,
                Kind::Anomaly => train::train_anomaly(&bm, &cfg, &progress)?,
            };
            trained.save(&out)?;
            println!("metrics: {}", serde_json::to_string(&trained.metrics)?);
            println!("wrote {}", out.display());
            Ok(())
        }
        Command::Eval { path, data } => {
            let bm = data::load(&data)?;
            let device = crate::Device::flex();
            let model = if path.is_dir() {
                TrainedModel::open(&path)?.load(&device)?
            } else {
                let bundle = Bundle::read_file(&path)?;
                let model = LoadedModel::load(&bundle, &device)?;
                model.run_golden()?;
                model
            };
            match model.output_spec() {
                OutputSpec::Classes { .. } => {
                    let (confusion, _) = crate::eval::classify(&model, &bm.test)?;
                    println!(
                        "{} ({}) on BasicMotions TEST: accuracy {:.2}% ({}/{})\n{}",
                        path.display(),
                        model.precision(),
                        100.0 * confusion.accuracy(),
                        confusion.correct(),
                        confusion.total(),
                        confusion.render()
                    );
                }
                OutputSpec::AnomalyScore { .. } => {
                    let report = crate::eval::anomaly(&model, &bm.test)?;
                    println!(
                        "{} ({}) on BasicMotions TEST\n{}",
                        path.display(),
                        model.precision(),
                        report.render()
                    );
                }
            }
            Ok(())
        }
        Command::Bundle {
            run,
            precision,
            name,
            version,
            created_at,
            out,
            data,
        } => {
            let bm = data::load(&data)?;
            let trained = TrainedModel::open(&run)?;
            let opts = BundleOptions {
                name: name.unwrap_or_else(|| trained.architecture.kind().to_string()),
                version,
                precision,
                created_at: created_at.unwrap_or_else(crate::manifest::now_utc),
            };
            let (bundle, report) = build_bundle(&trained, &bm, &opts)?;
            write(&out, &bundle.to_bytes())?;
            print!("{report}");
            println!(
                "wrote {} (unsigned: sign it with `ember-models sign`)",
                out.display()
            );
            Ok(())
        }
        Command::Baseline {
            bundle,
            key,
            out,
            data,
        } => {
            let b = Bundle::read_file(&bundle)?;
            let bm = data::load(&data)?;
            let model = LoadedModel::load(&b, &crate::Device::flex())?;
            let baseline = crate::baseline::compute(&model, &bm.train, "BasicMotions TRAIN split")?;
            let windows = baseline.windows;
            let mut manifest = b.manifest().clone();
            manifest.baseline = Some(baseline);
            let mut nb = Bundle::new(manifest, b.weights().to_vec())?;
            if let Some(key) = key {
                nb.sign(&keys::read_signing_key(&key)?);
            }
            let out = out.unwrap_or(bundle);
            write(&out, &nb.to_bytes())?;
            println!(
                "{}: baseline of {windows} windows recorded ({})",
                out.display(),
                if nb.signature().is_some() {
                    "signed"
                } else {
                    "unsigned"
                }
            );
            Ok(())
        }
        Command::Pipeline {
            lake,
            production,
            version,
            margin,
            holdout,
            seed,
            max_epochs,
            key,
            out,
            data,
            rollout,
            url,
            ca_file,
            token_file,
            tags,
            waves,
            shadow_windows,
            min_agreement,
            quiet,
        } => {
            if !(0.0..=1.0).contains(&margin) {
                bail!("--margin {margin} is out of range: use 0-1 (an accuracy difference)");
            }
            if !(0.0..1.0).contains(&holdout) {
                bail!("--holdout {holdout} is out of range: use 0 to below 1");
            }
            let rollout = if rollout {
                Some(crate::pipeline::RolloutOptions {
                    fleet: ember_host::client::Target::resolve(
                        url,
                        ca_file,
                        token_file.as_deref(),
                    )?,
                    tags,
                    waves,
                    shadow_windows,
                    min_agreement,
                })
            } else {
                None
            };
            let opts = crate::pipeline::Options {
                lake,
                production,
                data,
                out,
                version,
                margin,
                holdout,
                seed,
                max_epochs,
                key,
                quiet,
                rollout,
            };
            match crate::pipeline::run(&opts)? {
                crate::pipeline::Outcome::Accepted {
                    bundle,
                    version,
                    rollout,
                } => {
                    println!("accepted {version}: {}", bundle.display());
                    if let Some(id) = rollout {
                        println!("rollout {id}");
                    }
                    Ok(())
                }
                crate::pipeline::Outcome::Refused { reasons } => Err(GateRefused(reasons).into()),
            }
        }
        Command::Sign { bundle, key, out } => {
            let mut b = Bundle::read_file(&bundle)?;
            let key = keys::read_signing_key(&key)?;
            b.sign(&key);
            let out = out.unwrap_or(bundle);
            write(&out, &b.to_bytes())?;
            println!(
                "signed {} with key {}",
                out.display(),
                KeyId::of(&key.verifying_key())
            );
            Ok(())
        }
        Command::Verify { bundle, trusted } => {
            let trusted = TrustedKeys::from_files(&trusted)?;
            let b = Bundle::read_file(&bundle)?;
            b.verify(&trusted)
                .with_context(|| format!("{} is refused", bundle.display()))?;
            let model = LoadedModel::load(&b, &crate::Device::flex())?;
            model
                .run_golden()
                .with_context(|| format!("{} is refused", bundle.display()))?;
            let m = b.manifest();
            println!(
                "{}: OK — {} {} ({}), signed by trusted key {}, weights sha256 {}, {} golden vectors reproduced",
                bundle.display(),
                m.name,
                m.version,
                m.precision,
                b.signature()
                    .map(|s| s.key_id.to_string())
                    .unwrap_or_default(),
                m.weights.sha256,
                m.golden.vectors.len()
            );
            Ok(())
        }
        Command::Inspect { bundle, json } => {
            let bytes = std::fs::read(&bundle)
                .with_context(|| format!("cannot read {}", bundle.display()))?;
            let b = Bundle::read(&bytes).with_context(|| bundle.display().to_string())?;
            if json {
                let value: serde_json::Value = serde_json::from_slice(b.manifest_bytes())?;
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                print!("{}", inspect(&b, bytes.len()));
            }
            Ok(())
        }
        Command::Keygen { prefix, comment } => keygen(&prefix, &comment),
        Command::Bench {
            bundles,
            iterations,
        } => {
            for path in bundles {
                bench(&path, iterations.max(1))?;
            }
            Ok(())
        }
    }
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // Write beside and rename, so a reader never sees half a bundle.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

fn inspect(b: &Bundle, file_len: usize) -> String {
    let m = b.manifest();
    let mut s = format!(
        "{} {} — {} model, precision {}, {} bytes of burnpack weights\n",
        m.name,
        m.version,
        m.architecture.kind(),
        m.precision,
        m.weights.len
    );
    s += &format!(
        "file: {file_len} bytes; manifest {} bytes\n",
        b.manifest_bytes().len()
    );
    s += &format!(
        "input: {} channels {:?} × {} samples at {} Hz, hop {}\n",
        m.input.channels,
        m.input.channel_names,
        m.input.window,
        m.input.sample_rate_hz,
        m.input.hop
    );
    s += &format!(
        "normalization: mean {:?}\n               std  {:?}\n",
        m.input.normalization.mean, m.input.normalization.std
    );
    match &m.output {
        OutputSpec::Classes { labels } => s += &format!("output: class probabilities {labels:?}\n"),
        OutputSpec::AnomalyScore {
            threshold,
            normal_labels,
        } => {
            s += &format!(
                "output: reconstruction error; anomalous above {threshold} (normal: {normal_labels:?})\n"
            )
        }
    }
    s += &format!("weights sha256: {}\n", m.weights.sha256);
    if let Some(q) = &m.quantization {
        s += &format!(
            "quantization: {} (from f32 weights {})\n",
            q.scheme, q.source_weights_sha256
        );
    }
    s += "metrics:\n";
    for (k, v) in &m.metrics {
        s += &format!("  {k}: {v:.6}\n");
    }
    let t = &m.training;
    s += &format!(
        "training: {}; seed {}, {} epochs (best {}), {} train / {} validation series, {:.1} s\n",
        t.dataset,
        t.config.seed,
        t.epochs_run,
        t.best_epoch,
        t.train_series,
        t.val_series,
        t.duration_s
    );
    s += &format!("created: {}\n", m.created_at);
    s += &format!(
        "golden vectors: {} (tolerance {:.2e})\n",
        m.golden.vectors.len(),
        m.golden.tolerance
    );
    match b.signature() {
        Some(sig) => s += &format!("signed by key {} (run `verify` to check)\n", sig.key_id),
        None => s += "unsigned\n",
    }
    s
}

fn keygen(prefix: &Path, comment: &str) -> Result<()> {
    use std::io::Read;
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .context("cannot read /dev/urandom for a key seed")?;
    let secret = ed25519_dalek::SigningKey::from_bytes(&seed);
    let public = secret.verifying_key();
    let key_path = prefix.with_extension("key");
    let pub_path = prefix.with_extension("pub");
    if key_path.exists() {
        bail!(
            "{} exists: refusing to overwrite a secret key",
            key_path.display()
        );
    }
    let id = KeyId::of(&public);
    let comment = format!("{comment}\nkey id {id}");
    write(
        &key_path,
        keys::secret_key_file(&secret, &comment).as_bytes(),
    )?;
    write(
        &pub_path,
        keys::public_key_file(&public, &comment).as_bytes(),
    )?;
    println!(
        "wrote {} and {} (key id {id})",
        key_path.display(),
        pub_path.display()
    );
    Ok(())
}

fn bench(path: &Path, iterations: usize) -> Result<()> {
    let bundle = Bundle::read_file(path)?;
    let device = crate::Device::flex();
    let window_len = bundle.manifest().window_len();
    let mut variants = vec![("dequantized at load", LoadOptions { dequantize: true })];
    if bundle.manifest().precision == Precision::Int8 {
        variants.push(("kept quantized", LoadOptions { dequantize: false }));
    }
    for (what, options) in variants {
        let model = LoadedModel::load_with(&bundle, &device, options)?;
        for batch in [1usize, 32] {
            let input: Vec<f32> = (0..batch * window_len)
                .map(|i| ((i % 97) as f32 * 0.37).sin())
                .collect();
            for _ in 0..10 {
                model.infer(&input)?;
            }
            let start = Instant::now();
            for _ in 0..iterations {
                model.infer(&input)?;
            }
            let per = start.elapsed().as_secs_f64() / iterations as f64;
            println!(
                "{}: {} {}, batch {batch:2}: {:8.1} µs per call ({:.1} µs per window)",
                path.display(),
                bundle.manifest().precision,
                what,
                per * 1e6,
                per * 1e6 / batch as f64
            );
        }
    }
    Ok(())
}
