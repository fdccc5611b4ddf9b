//! Compiles a few BasicMotions series (models/data, the dataset the models are trained on) into
//! the image: the simulated IMU replays them. One series per class, in the file's order.
//!
//! With the `inference` feature it also compiles a model bundle in (`model.rs` in OUT_DIR: the
//! burnpack weights, the architecture's sizes, the normalization, the labels and the golden
//! vectors from its manifest). `EMBER_NODE_BUNDLE` names the bundle (default
//! `models/bundles/activity-int8.bundle`); only `activity` bundles fit the node's network.

use std::fmt::Write as _;
use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let data = manifest.join("../../models/data/BasicMotions_TEST.ts");
    println!("cargo::rerun-if-changed={}", data.display());
    let text = std::fs::read_to_string(&data).unwrap_or_else(|e| {
        panic!("cannot read {}: {e} (the firmware replays BasicMotions from models/data; check out the whole repository)", data.display())
    });
    let mut rows: Vec<[f32; 6]> = Vec::new();
    let mut labels: Vec<String> = Vec::new();
    let mut in_data = false;
    for line in text.lines() {
        let line = line.trim();
        if line.eq_ignore_ascii_case("@data") {
            in_data = true;
            continue;
        }
        if !in_data || line.is_empty() || line.starts_with('#') {
            continue;
        }
        let parts: Vec<&str> = line.split(':').collect();
        assert_eq!(
            parts.len(),
            7,
            "{}: a BasicMotions case has 6 dimensions and a label",
            data.display()
        );
        let label = parts[6].to_string();
        if labels.contains(&label) {
            continue;
        }
        let dims: Vec<Vec<f32>> = parts[..6]
            .iter()
            .map(|d| {
                d.split(',')
                    .map(|v| v.parse::<f32>().expect("a number"))
                    .collect()
            })
            .collect();
        let steps = dims[0].len();
        assert!(
            dims.iter().all(|d| d.len() == steps),
            "{}: dimensions of unequal length",
            data.display()
        );
        rows.extend((0..steps).map(|t| -> [f32; 6] { core::array::from_fn(|d| dims[d][t]) }));
        labels.push(label);
    }
    assert_eq!(
        labels.len(),
        4,
        "{}: expected the 4 BasicMotions classes",
        data.display()
    );
    let mut out = String::new();
    writeln!(
        out,
        "/// Time steps of {} series (one per class: {}), 6 channels each.",
        labels.len(),
        labels.join(", ")
    )
    .ok();
    writeln!(
        out,
        "pub static BASIC_MOTIONS: [[f32; 6]; {}] = [",
        rows.len()
    )
    .ok();
    for r in &rows {
        writeln!(
            out,
            "    [{:?}, {:?}, {:?}, {:?}, {:?}, {:?}],",
            r[0], r[1], r[2], r[3], r[4], r[5]
        )
        .ok();
    }
    writeln!(out, "];").ok();
    let dest =
        PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it")).join("basic_motions.rs");
    std::fs::write(&dest, out).unwrap_or_else(|e| panic!("cannot write {}: {e}", dest.display()));
    #[cfg(feature = "inference")]
    model::generate(&manifest);
}

#[cfg(feature = "inference")]
mod model {
    use std::fmt::Write as _;
    use std::path::{Path, PathBuf};

    use serde_json::Value;

    fn fail(bundle: &Path, what: &str) -> ! {
        panic!("model bundle {}: {what}", bundle.display())
    }

    fn floats(bundle: &Path, v: &Value, what: &str) -> Vec<f32> {
        v.as_array()
            .unwrap_or_else(|| fail(bundle, &format!("{what} is not an array")))
            .iter()
            .map(|x| {
                x.as_f64()
                    .unwrap_or_else(|| fail(bundle, &format!("{what} holds a non-number")))
                    as f32
            })
            .collect()
    }

    fn usize_of(bundle: &Path, v: &Value, what: &str) -> usize {
        v.as_u64()
            .unwrap_or_else(|| fail(bundle, &format!("{what} is not a whole number")))
            as usize
    }

    /// An f32 literal that reads back to the same bits (`{:?}` of f32 round-trips).
    fn lit(v: f32) -> String {
        if v.is_finite() {
            format!("{v:?}")
        } else {
            "f32::NAN".into()
        }
    }

    pub fn generate(manifest_dir: &Path) {
        println!("cargo::rerun-if-env-changed=EMBER_NODE_BUNDLE");
        let bundle = std::env::var_os("EMBER_NODE_BUNDLE")
            .map(PathBuf::from)
            .unwrap_or_else(|| manifest_dir.join("../../models/bundles/activity-int8.bundle"));
        println!("cargo::rerun-if-changed={}", bundle.display());
        let bytes = std::fs::read(&bundle)
            .unwrap_or_else(|e| fail(&bundle, &format!("cannot read it: {e}")));
        // The container (docs/model-bundle.md): magic, version, flags, manifest and weights
        // lengths, manifest, weights, optional key id and signature.
        if bytes.len() < 24 || &bytes[..8] != b"EMBRMODL" {
            fail(&bundle, "not a model bundle (no EMBRMODL header)");
        }
        let m = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")) as usize;
        let w = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes")) as usize;
        if bytes.len() < 24 + m + w {
            fail(&bundle, "truncated");
        }
        let manifest: Value = serde_json::from_slice(&bytes[24..24 + m])
            .unwrap_or_else(|e| fail(&bundle, &format!("manifest is not JSON: {e}")));
        let weights = &bytes[24 + m..24 + m + w];
        let arch = &manifest["architecture"];
        if arch["kind"] != "activity" {
            fail(&bundle, "the node runs `activity` models only");
        }
        let channels = usize_of(&bundle, &arch["channels"], "architecture.channels");
        let window = usize_of(&bundle, &arch["window"], "architecture.window");
        let classes = usize_of(&bundle, &arch["num_classes"], "architecture.num_classes");
        let hidden = usize_of(&bundle, &arch["hidden"], "architecture.hidden");
        let kernel = usize_of(&bundle, &arch["kernel_size"], "architecture.kernel_size");
        let hop = usize_of(&bundle, &manifest["input"]["hop"], "input.hop");
        if classes > 16 {
            fail(&bundle, "more than 16 classes do not fit a result frame");
        }
        let norm = &manifest["input"]["normalization"];
        let mean = floats(&bundle, &norm["mean"], "input.normalization.mean");
        let std = floats(&bundle, &norm["std"], "input.normalization.std");
        if mean.len() != channels || std.len() != channels {
            fail(&bundle, "normalization does not have one value per channel");
        }
        let labels: Vec<String> = manifest["output"]["labels"]
            .as_array()
            .unwrap_or_else(|| fail(&bundle, "output.labels is not an array"))
            .iter()
            .map(|l| l.as_str().unwrap_or("?").to_string())
            .collect();
        let sha = manifest["weights"]["sha256"].as_str().unwrap_or("");
        let prefix = u64::from_str_radix(sha.get(..16).unwrap_or(""), 16)
            .unwrap_or_else(|_| fail(&bundle, "weights.sha256 is not hex"));
        let golden = &manifest["golden"];
        let vectors = golden["vectors"].as_array().cloned().unwrap_or_default();
        let tolerance = golden["tolerance"].as_f64().unwrap_or(0.0) as f32;

        let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it"));
        std::fs::write(out_dir.join("weights.bpk"), weights).expect("write the weights");
        let str_of = |k: &str| manifest[k].as_str().unwrap_or("?").to_string();
        let mut o = String::new();
        let _ = writeln!(o, "// From {} (generated by build.rs).", bundle.display());
        let _ = writeln!(o, "pub const NAME: &str = {:?};", str_of("name"));
        let _ = writeln!(o, "pub const VERSION: &str = {:?};", str_of("version"));
        let _ = writeln!(o, "pub const PRECISION: &str = {:?};", str_of("precision"));
        let _ = writeln!(o, "pub const CHANNELS: usize = {channels};");
        let _ = writeln!(o, "pub const WINDOW: usize = {window};");
        let _ = writeln!(o, "pub const HOP: usize = {hop};");
        let _ = writeln!(o, "pub const OUTPUTS: usize = {classes};");
        let _ = writeln!(o, "pub const HIDDEN: usize = {hidden};");
        let _ = writeln!(o, "pub const KERNEL_SIZE: usize = {kernel};");
        let _ = writeln!(o, "pub const WEIGHTS_SHA256_PREFIX: u64 = {prefix:#018x};");
        let join = |v: &[f32]| v.iter().map(|x| lit(*x)).collect::<Vec<_>>().join(", ");
        let _ = writeln!(o, "pub const MEAN: [f32; {channels}] = [{}];", join(&mean));
        let _ = writeln!(o, "pub const STD: [f32; {channels}] = [{}];", join(&std));
        let _ = writeln!(o, "pub const LABELS: [&str; {classes}] = {labels:?};");
        let _ = writeln!(
            o,
            "pub static WEIGHTS: &[u8] = include_bytes!(concat!(env!(\"OUT_DIR\"), \"/weights.bpk\"));"
        );
        let _ = writeln!(o, "pub const GOLDEN_TOLERANCE: f32 = {};", lit(tolerance));
        let n = vectors.len();
        let mut notes = Vec::new();
        let _ = writeln!(
            o,
            "pub static GOLDEN_INPUTS: [[f32; {}]; {n}] = [",
            channels * window
        );
        let mut outputs = String::new();
        for (i, v) in vectors.iter().enumerate() {
            let input = floats(&bundle, &v["input"], &format!("golden.vectors[{i}].input"));
            let output = floats(
                &bundle,
                &v["output"],
                &format!("golden.vectors[{i}].output"),
            );
            if input.len() != channels * window || output.len() != classes {
                fail(&bundle, &format!("golden.vectors[{i}] has the wrong size"));
            }
            let _ = writeln!(o, "    [{}],", join(&input));
            let _ = writeln!(outputs, "    [{}],", join(&output));
            notes.push(v["note"].as_str().unwrap_or("").to_string());
        }
        let _ = writeln!(o, "];");
        let _ = writeln!(
            o,
            "pub static GOLDEN_OUTPUTS: [[f32; {classes}]; {n}] = [\n{outputs}];"
        );
        let _ = writeln!(o, "pub static GOLDEN_NOTES: [&str; {n}] = {notes:?};");
        std::fs::write(out_dir.join("model.rs"), o).expect("write model.rs");
    }
}
