//! `ember-models pipeline` (feature `train`, docs/retraining.md): the MLOps loop in one
//! command. Export → train → evaluate → gate → sign → upload → rollout with shadow evaluation.
//!
//! 1. **Export**: the labelled captures of the model, read from the fleet's data lake (a
//!    directory: the lake itself, or a synced copy of a bucket) with the Parquet reader: the
//!    capture streams' windows (`kind=inference`, `capture_window`) joined with the latest
//!    labelling of each (`kind=label`). The snapshot read is named by the hash of the files and
//!    the largest label id.
//! 2. **Split**: each capture goes to training or to the field hold-out by a hash of its key and
//!    the seed (stable across runs: a capture never moves between the two).
//! 3. **Train** on BasicMotions TRAIN plus the field training windows, seeded.
//! 4. **Evaluate** the candidate and the production bundle on the fixed hold-out (BasicMotions
//!    TEST) and on the field hold-out.
//! 5. **Gate**: the candidate is refused (no bundle is written, exit status 3) when its accuracy
//!    is below production's by more than `--margin` on either.
//! 6. **Bundle and sign**: at production's precision, with `lineage` (datasets and their
//!    hashes, lake snapshot, code version, seed, parent version, what the gate measured) in the
//!    manifest; the key comes from `--key` or `EMBER_MODELS_SIGNING_KEY` (the key file's text),
//!    never from the repository.
//! 7. **Upload and roll out** (with `--rollout`): the bundle to the fleet's registry, then a
//!    staged rollout with shadow evaluation.
//!
//! Every step prints its progress; training shows a progress bar. `report.md` (and
//! `report.svg`, per-class accuracy of both models on both hold-outs) in `--out` say what was
//! measured and decided.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::{Field, Row, RowAccessor};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::bundle::Bundle;
use crate::data::{self, Dataset};
use crate::eval;
use crate::inference::LoadedModel;
use crate::manifest::{DatasetRef, Lineage, OutputSpec};
use crate::metrics::Confusion;
use crate::package::{BundleOptions, build_bundle};
use crate::train::{self, Kind, Progress};

/// The variable holding a signing key file's text, for CI systems that keep secrets there.
pub const SIGNING_KEY_ENV: &str = "EMBER_MODELS_SIGNING_KEY";
/// Exit status of a candidate the gate refused.
pub const EXIT_REFUSED: u8 = 3;

/// What `ember-models pipeline` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    pub lake: PathBuf,
    pub production: PathBuf,
    pub data: PathBuf,
    pub out: PathBuf,
    /// Default: production's version with the patch number raised.
    pub version: Option<String>,
    pub margin: f64,
    pub holdout: f64,
    pub seed: Option<u64>,
    pub max_epochs: Option<usize>,
    pub key: Option<PathBuf>,
    pub quiet: bool,
    /// Upload and start a rollout (needs the fleet target).
    pub rollout: Option<RolloutOptions>,
}

#[derive(Debug, Clone)]
pub struct RolloutOptions {
    pub fleet: ember_host::client::Target,
    /// Devices carrying these tags; empty: every device.
    pub tags: Vec<String>,
    pub waves: Vec<String>,
    pub shadow_windows: u32,
    pub min_agreement: f64,
}

/// One labelled capture read from the lake.
#[derive(Debug, Clone)]
pub struct LabelledCapture {
    pub device: String,
    pub stream: String,
    pub seq: i64,
    pub version: String,
    pub label: String,
    pub window: Vec<f32>,
}

/// What the run decided.
#[derive(Debug)]
pub enum Outcome {
    /// The bundle written (and, with a rollout, the version uploaded and the rollout id).
    Accepted {
        bundle: PathBuf,
        version: String,
        rollout: Option<String>,
    },
    Refused {
        reasons: Vec<String>,
    },
}

fn step(quiet: bool, n: usize, what: &str) {
    if !quiet {
        eprintln!("[{n}/7] {what}");
    }
}

/// Runs the loop; `Outcome::Refused` when the gate said no (the report says why).
pub fn run(opts: &Options) -> Result<Outcome> {
    let started = Instant::now();
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("cannot create {}", opts.out.display()))?;
    // The key is checked first: a run that cannot sign should not train for minutes.
    let key = signing_key(opts.key.as_deref())?;
    let production = Bundle::read_file(&opts.production).with_context(|| {
        format!(
            "cannot read the production bundle {}",
            opts.production.display()
        )
    })?;
    let pm = production.manifest().clone();
    let OutputSpec::Classes { labels } = &pm.output else {
        bail!(
            "{} is an anomaly model: the pipeline retrains classifiers from labelled captures (labels are classes)",
            opts.production.display()
        );
    };
    let bm = data::load(&opts.data)?;
    if &bm.train.labels != labels {
        bail!(
            "the production model's labels {labels:?} differ from the dataset's {:?}",
            bm.train.labels
        );
    }

    step(opts.quiet, 1, "export: labelled captures from the lake");
    let (captures, snapshot) = read_lake(&opts.lake, &pm.name)?;
    let known: Vec<LabelledCapture> = captures
        .into_iter()
        .filter(|c| labels.contains(&c.label) && c.window.len() == bm.train.window_len())
        .collect();
    if known.is_empty() {
        bail!(
            "the lake at {} holds no labelled captures of {} (label some: dashboard Captures page or PUT /api/v1/captures/.../label, then wait for the lake export)",
            opts.lake.display(),
            pm.name
        );
    }
    let field_sha = field_hash(&known);
    if !opts.quiet {
        eprintln!("      {} labelled captures ({snapshot})", known.len());
    }

    step(opts.quiet, 2, "split: field training and hold-out");
    let mut cfg = train::default_config(Kind::Activity);
    if let Some(seed) = opts.seed {
        cfg.seed = seed;
    }
    if let Some(m) = opts.max_epochs {
        cfg.max_epochs = m;
    }
    let (field_train, field_holdout): (Vec<&LabelledCapture>, Vec<&LabelledCapture>) = known
        .iter()
        .partition(|c| !in_holdout(c, cfg.seed, opts.holdout));
    let field_test = to_dataset(&field_holdout, &bm.train);
    let mut augmented = bm.clone();
    for c in &field_train {
        augmented.train.x.extend_from_slice(&c.window);
        augmented
            .train
            .y
            .push(labels.iter().position(|l| *l == c.label).unwrap_or(0));
    }
    if !opts.quiet {
        eprintln!(
            "      {} field windows for training, {} held out",
            field_train.len(),
            field_holdout.len()
        );
    }

    step(opts.quiet, 3, "train");
    let progress = if opts.quiet {
        Progress::hidden()
    } else {
        Progress::bar(cfg.max_epochs)
    };
    let trained = train::train_activity(&augmented, &cfg, &progress)?;

    step(
        opts.quiet,
        4,
        "evaluate: candidate and production on both hold-outs",
    );
    let version = match &opts.version {
        Some(v) => v.clone(),
        None => next_patch(&pm.version)?,
    };
    let (candidate, build_report) = build_bundle(
        &trained,
        &bm,
        &BundleOptions {
            name: pm.name.clone(),
            version: version.clone(),
            precision: pm.precision,
            created_at: crate::manifest::now_utc(),
        },
    )?;
    let device = crate::Device::flex();
    let prod_model = LoadedModel::load(&production, &device)?;
    let cand_model = LoadedModel::load(&candidate, &device)?;
    let (prod_test, _) = eval::classify(&prod_model, &bm.test)?;
    let (cand_test, _) = eval::classify(&cand_model, &bm.test)?;
    let field = if field_test.is_empty() {
        None
    } else {
        Some((
            eval::classify(&prod_model, &field_test)?.0,
            eval::classify(&cand_model, &field_test)?.0,
        ))
    };

    step(opts.quiet, 5, "gate");
    let mut reasons = Vec::new();
    let mut evaluation = BTreeMap::new();
    evaluation.insert("test_accuracy".to_string(), cand_test.accuracy());
    evaluation.insert("parent_test_accuracy".to_string(), prod_test.accuracy());
    if cand_test.accuracy() < prod_test.accuracy() - opts.margin {
        reasons.push(format!(
            "BasicMotions TEST accuracy {:.4} is below production's {:.4} by more than the margin {}",
            cand_test.accuracy(),
            prod_test.accuracy(),
            opts.margin
        ));
    }
    if let Some((p, c)) = &field {
        evaluation.insert("field_holdout_accuracy".to_string(), c.accuracy());
        evaluation.insert("parent_field_holdout_accuracy".to_string(), p.accuracy());
        if c.accuracy() < p.accuracy() - opts.margin {
            reasons.push(format!(
                "field hold-out accuracy {:.4} is below production's {:.4} by more than the margin {}",
                c.accuracy(),
                p.accuracy(),
                opts.margin
            ));
        }
    } else {
        reasons.push(
            "no field hold-out: too few labelled captures to hold any out (label more, or raise --holdout)"
                .to_string(),
        );
    }
    evaluation.insert(
        "field_holdout_windows".to_string(),
        field_holdout.len() as f64,
    );
    evaluation.insert(
        "field_training_windows".to_string(),
        field_train.len() as f64,
    );
    let accepted = reasons.is_empty();
    write_report(
        opts,
        &pm.name,
        &pm.version,
        &version,
        &prod_test,
        &cand_test,
        field.as_ref(),
        &reasons,
        &snapshot,
        &build_report,
        started,
    )?;
    if !accepted {
        return Ok(Outcome::Refused { reasons });
    }

    step(opts.quiet, 6, "bundle and sign");
    let mut manifest = candidate.manifest().clone();
    manifest.lineage = Some(Lineage {
        datasets: vec![
            DatasetRef {
                name: "BasicMotions TRAIN (sktime 1.2.0 copy)".into(),
                sha256: data::TRAIN_SHA256.to_string(),
                records: bm.train.len() as u64,
            },
            DatasetRef {
                name: format!("field captures of {} (training part)", pm.name),
                sha256: field_sha,
                records: field_train.len() as u64,
            },
        ],
        lake_snapshot: Some(snapshot.clone()),
        code_version: code_version(),
        seed: cfg.seed,
        parent: Some(pm.version.clone()),
        evaluation,
    });
    let mut bundle = Bundle::new(manifest, candidate.weights().to_vec())?;
    bundle.sign(&key);
    let path = opts.out.join(format!("{}-{version}.bundle", pm.name));
    std::fs::write(&path, bundle.to_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    if !opts.quiet {
        eprintln!("      wrote {}", path.display());
    }

    let rollout = match &opts.rollout {
        None => {
            step(opts.quiet, 7, "upload and roll out: skipped (no --rollout)");
            None
        }
        Some(r) => {
            step(opts.quiet, 7, "upload and roll out");
            let client = r.fleet.client(true)?;
            let resp = client.send(
                "POST",
                "/api/v1/models",
                &[("Content-Type", "application/octet-stream")],
                Some(ember_host::client::Body::Bytes(&bundle.to_bytes())),
            )?;
            if resp.status != 201 {
                bail!(
                    "the fleet refused the upload ({}): {}",
                    resp.status,
                    resp.error_message()
                );
            }
            let targets = if r.tags.is_empty() {
                json!({"all": true})
            } else {
                json!({"tags": r.tags})
            };
            let created = client.post(
                "/api/v1/rollouts",
                &json!({
                    "model": pm.name, "version": version, "targets": targets, "waves": r.waves,
                    "shadow": {"windows": r.shadow_windows, "min_agreement": r.min_agreement,
                               "max_latency_ratio": 50.0},
                }),
            )?;
            let id = created["id"].as_str().unwrap_or_default().to_string();
            if !opts.quiet {
                eprintln!("      uploaded {} {version}; rollout {id} started", pm.name);
            }
            Some(id)
        }
    };
    if !opts.quiet {
        eprintln!("done in {:.1} s", started.elapsed().as_secs_f64());
    }
    Ok(Outcome::Accepted {
        bundle: path,
        version,
        rollout,
    })
}

fn signing_key(path: Option<&Path>) -> Result<ed25519_dalek::SigningKey> {
    match path {
        Some(p) => Ok(crate::keys::read_signing_key(p)?),
        None => {
            let text = std::env::var(SIGNING_KEY_ENV).map_err(|_| {
                anyhow::anyhow!(
                    "no signing key: pass --key <secret key file> or set {SIGNING_KEY_ENV} to the key file's text (never commit a key)"
                )
            })?;
            Ok(crate::keys::parse_signing_key(&text, SIGNING_KEY_ENV)?)
        }
    }
}

/// `1.2.3` → `1.2.4` (pre-release and build parts dropped).
fn next_patch(v: &str) -> Result<String> {
    let core = v.split(['-', '+']).next().unwrap_or(v);
    let parts: Vec<u64> = core
        .split('.')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("production version {v:?} is not semver"))?;
    let [a, b, c] = parts[..] else {
        bail!("production version {v:?} is not MAJOR.MINOR.PATCH");
    };
    Ok(format!("{a}.{b}.{}", c + 1))
}

fn code_version() -> String {
    let git = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match git {
        Some(rev) if !rev.is_empty() => {
            format!("ember-models {} (git {rev})", env!("CARGO_PKG_VERSION"))
        }
        _ => format!("ember-models {}", env!("CARGO_PKG_VERSION")),
    }
}

fn in_holdout(c: &LabelledCapture, seed: u64, fraction: f64) -> bool {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(c.device.as_bytes());
    h.update([0]);
    h.update(c.stream.as_bytes());
    h.update(c.seq.to_le_bytes());
    let d = h.finalize();
    let v = u64::from_le_bytes(d[..8].try_into().unwrap_or_default());
    (v as f64 / u64::MAX as f64) < fraction
}

fn to_dataset(captures: &[&LabelledCapture], like: &Dataset) -> Dataset {
    let mut d = Dataset {
        labels: like.labels.clone(),
        channels: like.channels,
        window: like.window,
        x: Vec::new(),
        y: Vec::new(),
    };
    for c in captures {
        d.x.extend_from_slice(&c.window);
        d.y.push(like.labels.iter().position(|l| *l == c.label).unwrap_or(0));
    }
    d
}

/// The SHA-256 of the labelled captures, in key order (device, stream, seq, label, window).
fn field_hash(captures: &[LabelledCapture]) -> String {
    let mut sorted: Vec<&LabelledCapture> = captures.iter().collect();
    sorted.sort_by(|a, b| (&a.device, &a.stream, a.seq).cmp(&(&b.device, &b.stream, b.seq)));
    let mut h = Sha256::new();
    for c in sorted {
        h.update(c.device.as_bytes());
        h.update([0]);
        h.update(c.stream.as_bytes());
        h.update([0]);
        h.update(c.seq.to_le_bytes());
        h.update(c.label.as_bytes());
        h.update([0]);
        for v in &c.window {
            h.update(v.to_le_bytes());
        }
    }
    crate::hex::encode(&h.finalize())
}

/// Every `*.parquet` under `dir`, sorted.
fn parquet_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The `device=` partition of a lake path.
fn device_of(path: &Path) -> Option<String> {
    path.components().find_map(|c| {
        c.as_os_str()
            .to_str()
            .and_then(|s| s.strip_prefix("device="))
            .map(str::to_string)
    })
}

fn column(row: &Row, name: &str) -> Option<usize> {
    row.get_column_iter().position(|(n, _)| n == name)
}

/// The labelled captures of `model` in the lake at `root`, and a name for the snapshot read.
/// A live lake is compacted by the fleet: a file listed can be replaced by its compacted
/// successor (the same rows) before it is read. The snapshot is then read again, from a fresh
/// listing, up to five times.
pub fn read_lake(root: &Path, model: &str) -> Result<(Vec<LabelledCapture>, String)> {
    let mut attempt = 1;
    loop {
        match read_lake_once(root, model) {
            Err(e)
                if attempt < 5
                    && e.downcast_ref::<std::io::Error>()
                        .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound) =>
            {
                attempt += 1;
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            r => return r,
        }
    }
}

fn read_lake_once(root: &Path, model: &str) -> Result<(Vec<LabelledCapture>, String)> {
    if !root.is_dir() {
        bail!(
            "{} is not a directory: point --lake at the fleet's lake directory (lake.store), or sync a bucket's copy first (aws s3 sync, gsutil rsync, azcopy sync)",
            root.display()
        );
    }
    let mut snapshot = Sha256::new();
    let mut windows: BTreeMap<(String, String, i64), (String, Vec<f32>)> = BTreeMap::new();
    let mut labels: BTreeMap<(String, String, i64), (i64, String)> = BTreeMap::new();
    let mut files = 0usize;
    let mut max_label_id = 0i64;
    for kind in ["inference", "label"] {
        for path in parquet_files(&root.join(format!("kind={kind}"))) {
            let Some(device) = device_of(&path) else {
                continue;
            };
            let bytes =
                std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            snapshot.update(
                path.strip_prefix(root)
                    .unwrap_or(&path)
                    .to_string_lossy()
                    .as_bytes(),
            );
            snapshot.update((bytes.len() as u64).to_le_bytes());
            files += 1;
            let reader = SerializedFileReader::new(bytes::Bytes::from(bytes))
                .with_context(|| format!("{} is not a Parquet file", path.display()))?;
            for row in reader.get_row_iter(None)? {
                let row = row?;
                if kind == "label" {
                    let (Some(id), Some(stream), Some(seq), Some(label)) = (
                        column(&row, "id"),
                        column(&row, "stream"),
                        column(&row, "seq"),
                        column(&row, "label"),
                    ) else {
                        bail!(
                            "{} lacks the label columns of lake schema 1",
                            path.display()
                        );
                    };
                    let id = row.get_long(id)?;
                    max_label_id = max_label_id.max(id);
                    let key = (
                        device.clone(),
                        row.get_string(stream)?.clone(),
                        row.get_long(seq)?,
                    );
                    let label = row.get_string(label)?.clone();
                    let e = labels.entry(key).or_insert((id, label.clone()));
                    if id >= e.0 {
                        *e = (id, label);
                    }
                    continue;
                }
                let (Some(stream), Some(seq), Some(m), Some(version), Some(window)) = (
                    column(&row, "stream"),
                    column(&row, "seq"),
                    column(&row, "model"),
                    column(&row, "version"),
                    column(&row, "capture_window"),
                ) else {
                    continue;
                };
                if row.get_string(m)? != model || row.is_null(window)? {
                    continue;
                }
                let values = row
                    .get_list(window)?
                    .elements()
                    .iter()
                    .map(|f| match f {
                        Field::Float(v) => Ok(*v),
                        other => Err(anyhow::anyhow!("capture_window holds {other:?}")),
                    })
                    .collect::<Result<Vec<f32>>>()?;
                windows.insert(
                    (
                        device.clone(),
                        row.get_string(stream)?.clone(),
                        row.get_long(seq)?,
                    ),
                    (row.get_string(version)?.clone(), values),
                );
            }
        }
    }
    let captures = windows
        .into_iter()
        .filter_map(|((device, stream, seq), (version, window))| {
            let (_, label) = labels.get(&(device.clone(), stream.clone(), seq))?;
            Some(LabelledCapture {
                device,
                stream,
                seq,
                version,
                label: label.clone(),
                window,
            })
        })
        .collect();
    let name = format!(
        "{files} files, labels through id {max_label_id}, sha256 {}",
        crate::hex::encode(&snapshot.finalize())
    );
    Ok((captures, name))
}

#[allow(clippy::too_many_arguments)]
fn write_report(
    opts: &Options,
    model: &str,
    parent: &str,
    version: &str,
    prod_test: &Confusion,
    cand_test: &Confusion,
    field: Option<&(Confusion, Confusion)>,
    reasons: &[String],
    snapshot: &str,
    build_report: &str,
    started: Instant,
) -> Result<()> {
    let verdict = if reasons.is_empty() {
        format!(
            "**Accepted**: {model} {version} is within {} of {parent} on both hold-outs.",
            opts.margin
        )
    } else {
        format!(
            "**Refused**: no bundle was written.\n\n{}",
            reasons
                .iter()
                .map(|r| format!("- {r}"))
                .collect::<Vec<_>>()
                .join("\n")
        )
    };
    let mut md = format!(
        "# Retraining report: {model} {version} (parent {parent})\n\n{verdict}\n\n\
         | hold-out | production {parent} | candidate {version} |\n|---|---|---|\n\
         | BasicMotions TEST ({} windows) | {:.2}% | {:.2}% |\n",
        prod_test.counts.iter().flatten().sum::<usize>(),
        100.0 * prod_test.accuracy(),
        100.0 * cand_test.accuracy()
    );
    if let Some((p, c)) = field {
        md += &format!(
            "| field captures ({} windows) | {:.2}% | {:.2}% |\n",
            p.counts.iter().flatten().sum::<usize>(),
            100.0 * p.accuracy(),
            100.0 * c.accuracy()
        );
    }
    md += "\n![per-class accuracy](report.svg)\n\n";
    md += &format!(
        "Lake snapshot: {snapshot}.\n\nGate margin: {}; field hold-out fraction: {}.\n\n",
        opts.margin, opts.holdout
    );
    md += "## Candidate on BasicMotions TEST\n\n```text\n";
    md += &cand_test.render();
    md += "```\n\n## Production on BasicMotions TEST\n\n```text\n";
    md += &prod_test.render();
    md += "```\n";
    if let Some((p, c)) = field {
        md += "\n## Candidate on the field hold-out\n\n```text\n";
        md += &c.render();
        md += "```\n\n## Production on the field hold-out\n\n```text\n";
        md += &p.render();
        md += "```\n";
    }
    md += &format!(
        "\n## Candidate bundle\n\n```text\n{build_report}```\n\nWall time so far: {:.1} s.\n",
        started.elapsed().as_secs_f64()
    );
    std::fs::write(opts.out.join("report.md"), md)?;
    std::fs::write(
        opts.out.join("report.svg"),
        svg(prod_test, cand_test, field),
    )?;
    Ok(())
}

fn per_class(c: &Confusion) -> Vec<f64> {
    c.counts
        .iter()
        .enumerate()
        .map(|(i, row)| {
            let total: usize = row.iter().sum();
            if total == 0 {
                0.0
            } else {
                row[i] as f64 / total as f64
            }
        })
        .collect()
}

/// Per-class accuracy bars: production and candidate, on each hold-out.
fn svg(
    prod_test: &Confusion,
    cand_test: &Confusion,
    field: Option<&(Confusion, Confusion)>,
) -> String {
    let mut groups: Vec<(String, Vec<f64>, Vec<f64>)> =
        vec![("TEST".into(), per_class(prod_test), per_class(cand_test))];
    if let Some((p, c)) = field {
        groups.push(("field".into(), per_class(p), per_class(c)));
    }
    let labels = &prod_test.labels;
    let (bar, gap, h) = (14.0, 30.0, 160.0);
    let width = 60.0 + groups.len() as f64 * labels.len() as f64 * (2.0 * bar + gap);
    let mut out = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{}" font-family="sans-serif" font-size="11">
<text x="10" y="14">per-class accuracy: production (grey), candidate (blue)</text>
"##,
        h + 60.0
    );
    let mut x = 40.0;
    for (name, p, c) in &groups {
        for (i, l) in labels.iter().enumerate() {
            for (j, (v, color)) in [(p[i], "#8c959f"), (c[i], "#2f6fde")].iter().enumerate() {
                let bh = v * h;
                out += &format!(
                    r#"<rect x="{:.1}" y="{:.1}" width="{bar}" height="{bh:.1}" fill="{color}"/>"#,
                    x + j as f64 * bar,
                    30.0 + h - bh
                );
            }
            out += &format!(
                r#"<text x="{:.1}" y="{:.1}">{name} {l}</text>"#,
                x - 4.0,
                h + 48.0
            );
            x += 2.0 * bar + gap;
        }
    }
    out += "</svg>\n";
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_patch_raises_the_patch() {
        assert_eq!(next_patch("1.0.0").unwrap(), "1.0.1");
        assert_eq!(next_patch("2.3.9-rc.1+b").unwrap(), "2.3.10");
        assert!(next_patch("one").is_err());
    }

    #[test]
    fn the_holdout_is_stable_and_about_the_fraction() {
        let cap = |seq| LabelledCapture {
            device: "d".into(),
            stream: "s".into(),
            seq,
            version: "1.0.0".into(),
            label: "x".into(),
            window: vec![],
        };
        let held = (0..1000).filter(|s| in_holdout(&cap(*s), 7, 0.3)).count();
        assert!((250..350).contains(&held), "{held}");
        assert_eq!(in_holdout(&cap(5), 7, 0.3), in_holdout(&cap(5), 7, 0.3));
    }
}
