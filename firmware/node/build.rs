//! Compiles a few BasicMotions series (models/data, the dataset the models are trained on) into
//! the image: the simulated IMU replays them. One series per class, in the file's order.

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
}
