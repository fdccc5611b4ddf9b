//! BasicMotions (UEA archive): checked loading, and windows as flat `f32` arrays.
//!
//! The two `.ts` files under `models/data/` are the ones shipped in the PyPI package
//! `sktime` 1.2.0; [`load`] refuses files whose SHA-256 differs from [`TRAIN_SHA256`] /
//! [`TEST_SHA256`], so every accuracy in this crate is measured on exactly these bytes.

use std::path::{Path, PathBuf};

use ember_ts::{TsDataset, TsError};

use crate::manifest::Normalization;

/// `models/data/` in this source tree.
pub const DATA_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data");
pub const TRAIN_FILE: &str = "BasicMotions_TRAIN.ts";
pub const TEST_FILE: &str = "BasicMotions_TEST.ts";
pub const TRAIN_SHA256: &str = "8dc43cc6306cb679c888c01e26f91772ac4441a916da43bac8b79734a538b9d6";
pub const TEST_SHA256: &str = "79213102bc6fca1a398ad98ce1185dff0208fa3d1465e687f48288946b0ff8dc";
/// Channels of BasicMotions: accelerometer then gyroscope, x, y, z each.
pub const CHANNEL_NAMES: [&str; 6] = [
    "accel_x", "accel_y", "accel_z", "gyro_x", "gyro_y", "gyro_z",
];
pub const SAMPLE_RATE_HZ: f64 = 10.0;
/// The dataset name recorded in manifests.
pub const DATASET: &str = "UEA BasicMotions (sktime 1.2.0 copy), TRAIN split";

/// Why the data could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {path}: {source}; run models/data/fetch-basicmotions.sh to re-extract it")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} has sha256 {found}, expected {expected}: the file is not the sktime 1.2.0 copy; run models/data/fetch-basicmotions.sh"
    )]
    Checksum {
        path: PathBuf,
        expected: &'static str,
        found: String,
    },
    #[error("{path} is not valid UTF-8 text")]
    NotText { path: PathBuf },
    #[error("{path}: {source}")]
    Parse { path: PathBuf, source: TsError },
    #[error("{path}: {problem}")]
    Shape { path: PathBuf, problem: String },
    #[error("{what}")]
    Labels { what: String },
}

/// Labelled windows of equal shape, `x[(i * channels + c) * window + t]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    pub labels: Vec<String>,
    pub channels: usize,
    pub window: usize,
    pub x: Vec<f32>,
    /// Class index (into `labels`) per window.
    pub y: Vec<usize>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.y.len()
    }

    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// Floats per window.
    pub fn window_len(&self) -> usize {
        self.channels * self.window
    }

    /// Window `i`, `[channel][sample]`.
    pub fn get(&self, i: usize) -> &[f32] {
        let n = self.window_len();
        &self.x[i * n..(i + 1) * n]
    }

    /// The windows at `indices`, in that order.
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let mut x = Vec::with_capacity(indices.len() * self.window_len());
        for &i in indices {
            x.extend_from_slice(self.get(i));
        }
        Dataset {
            labels: self.labels.clone(),
            channels: self.channels,
            window: self.window,
            x,
            y: indices.iter().map(|&i| self.y[i]).collect(),
        }
    }

    /// Indices of windows whose label is in `labels`.
    pub fn indices_of(&self, labels: &[String]) -> Vec<usize> {
        (0..self.len())
            .filter(|&i| labels.contains(&self.labels[self.y[i]]))
            .collect()
    }

    /// Per-channel mean and (population) standard deviation over all windows.
    pub fn normalization(&self) -> Normalization {
        let (c, w) = (self.channels, self.window);
        let mut mean = vec![0f64; c];
        let mut sq = vec![0f64; c];
        for i in 0..self.len() {
            for ch in 0..c {
                for &v in &self.get(i)[ch * w..(ch + 1) * w] {
                    mean[ch] += f64::from(v);
                    sq[ch] += f64::from(v) * f64::from(v);
                }
            }
        }
        let n = (self.len() * w).max(1) as f64;
        let mean: Vec<f64> = mean.iter().map(|m| m / n).collect();
        let std = sq
            .iter()
            .zip(&mean)
            .map(|(s, m)| ((s / n - m * m).max(0.0).sqrt() as f32).max(1e-6))
            .collect();
        Normalization {
            mean: mean.iter().map(|m| *m as f32).collect(),
            std,
        }
    }

    /// Builds a dataset from a parsed `.ts` file with equal-length, labelled series.
    pub fn from_ts(ts: &TsDataset, path: &Path) -> Result<Dataset, DataError> {
        let shape = |problem: String| DataError::Shape {
            path: path.to_path_buf(),
            problem,
        };
        let window = ts.series_length.ok_or_else(|| {
            shape("series have different lengths; windows must all be equal".into())
        })?;
        if ts.class_labels.is_empty() {
            return Err(shape(
                "the file has no class labels (@classLabel true ...)".into(),
            ));
        }
        let mut x = Vec::with_capacity(ts.series.len() * ts.dimensions * window);
        let mut y = Vec::with_capacity(ts.series.len());
        for (i, s) in ts.series.iter().enumerate() {
            let label = s
                .label
                .as_deref()
                .and_then(|l| ts.label_index(l))
                .ok_or_else(|| shape(format!("series {} has no declared class label", i + 1)))?;
            for ch in &s.channels {
                x.extend_from_slice(ch);
            }
            y.push(label);
        }
        Ok(Dataset {
            labels: ts.class_labels.clone(),
            channels: ts.dimensions,
            window,
            x,
            y,
        })
    }
}

/// The train and test splits.
#[derive(Debug, Clone)]
pub struct BasicMotions {
    pub train: Dataset,
    pub test: Dataset,
}

/// Reads one `.ts` file, refusing it unless its SHA-256 is `expected`.
pub fn load_file(path: &Path, expected: &'static str) -> Result<Dataset, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let found = crate::hex::sha256(&bytes);
    if found != expected {
        return Err(DataError::Checksum {
            path: path.to_path_buf(),
            expected,
            found,
        });
    }
    let text = std::str::from_utf8(&bytes).map_err(|_| DataError::NotText {
        path: path.to_path_buf(),
    })?;
    let ts = ember_ts::parse_ts(text).map_err(|source| DataError::Parse {
        path: path.to_path_buf(),
        source,
    })?;
    Dataset::from_ts(&ts, path)
}

/// Loads both splits from `dir` (normally [`DATA_DIR`]), checking their SHA-256.
pub fn load(dir: &Path) -> Result<BasicMotions, DataError> {
    let train = load_file(&dir.join(TRAIN_FILE), TRAIN_SHA256)?;
    let test = load_file(&dir.join(TEST_FILE), TEST_SHA256)?;
    if train.labels != test.labels || train.channels != test.channels || train.window != test.window
    {
        return Err(DataError::Labels {
            what: "the TRAIN and TEST files declare different labels or shapes".into(),
        });
    }
    Ok(BasicMotions { train, test })
}
