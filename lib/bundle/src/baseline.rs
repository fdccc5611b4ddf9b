//! The training-time baseline a bundle carries (manifest field `baseline`), what model
//! monitoring compares field results with: the distribution of predicted classes, of the top
//! class's confidence, of anomaly scores, and of each input channel's window statistics, plus
//! the Population Stability Index ([`psi`]) that measures how far a field distribution moved.
//!
//! Histograms have fixed edges written in the bundle, so the fleet bins field values exactly
//! as training did. A histogram over `edges` (ascending, `n` values) has `n + 1` bins: below the
//! first edge, between consecutive edges (lower edge inclusive), and from the last edge up.

use serde::{Deserialize, Serialize};

/// Edges of the top-class confidence histogram (probability of the predicted class).
pub const CONFIDENCE_EDGES: [f64; 7] = [0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95];
/// Edges of a channel's window-mean histogram, in the model's normalized units
/// (`(mean - norm.mean) / norm.std`).
pub const MEAN_Z_EDGES: [f64; 8] = [-1.5, -1.0, -0.5, -0.25, 0.25, 0.5, 1.0, 1.5];
/// Edges of a channel's window standard deviation over the normalization's std.
pub const STD_RATIO_EDGES: [f64; 6] = [0.1, 0.25, 0.5, 1.0, 1.5, 2.5];
/// Smallest fraction a bin counts with in [`psi`] (an empty bin would make it infinite).
pub const PSI_FLOOR: f64 = 1e-4;

/// A histogram: `edges` ascending, `fractions` one per bin (`edges.len() + 1`), summing to 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    pub edges: Vec<f64>,
    pub fractions: Vec<f64>,
}

impl Histogram {
    /// Counts `values` into bins over `edges` and normalizes (all zero when `values` is empty).
    pub fn of(edges: &[f64], values: impl IntoIterator<Item = f64>) -> Histogram {
        let mut counts = vec![0u64; edges.len() + 1];
        for v in values {
            counts[bin(edges, v)] += 1;
        }
        Histogram::from_counts(edges, &counts)
    }

    /// Normalizes per-bin counts.
    pub fn from_counts(edges: &[f64], counts: &[u64]) -> Histogram {
        let total: u64 = counts.iter().sum();
        Histogram {
            edges: edges.to_vec(),
            fractions: counts
                .iter()
                .map(|c| {
                    if total == 0 {
                        0.0
                    } else {
                        *c as f64 / total as f64
                    }
                })
                .collect(),
        }
    }

    /// Checks the shape: ascending finite edges, one fraction per bin, fractions in 0..=1
    /// summing to 1 (± 1e-6).
    pub fn check(&self) -> Result<(), String> {
        if self.edges.iter().any(|e| !e.is_finite()) || self.edges.windows(2).any(|w| w[0] >= w[1])
        {
            return Err("edges must be finite and strictly ascending".into());
        }
        if self.fractions.len() != self.edges.len() + 1 {
            return Err(format!(
                "has {} fractions for {} edges; a histogram has one more bin than edges",
                self.fractions.len(),
                self.edges.len()
            ));
        }
        if self
            .fractions
            .iter()
            .any(|f| !f.is_finite() || !(0.0..=1.0).contains(f))
        {
            return Err("fractions must be numbers from 0 to 1".into());
        }
        let sum: f64 = self.fractions.iter().sum();
        if (sum - 1.0).abs() > 1e-6 {
            return Err(format!("fractions sum to {sum}, not 1"));
        }
        Ok(())
    }
}

/// The bin of `v` over `edges` (NaN falls in the first bin).
pub fn bin(edges: &[f64], v: f64) -> usize {
    edges.partition_point(|e| *e <= v)
}

/// Population Stability Index of `actual` against `expected` (fractions over the same bins):
/// `Σ (a - e) ln(a / e)`, each fraction floored at [`PSI_FLOOR`]. 0 means the same
/// distribution; by convention < 0.1 is stable, 0.1-0.25 a moderate shift, > 0.25 a major one.
pub fn psi(expected: &[f64], actual: &[f64]) -> f64 {
    expected
        .iter()
        .zip(actual)
        .map(|(e, a)| {
            let (e, a) = (e.max(PSI_FLOOR), a.max(PSI_FLOOR));
            (a - e) * (a / e).ln()
        })
        .sum()
}

/// One input channel's baseline: the distribution of its per-window mean (normalized units,
/// over [`MEAN_Z_EDGES`]) and of its per-window standard deviation over the normalization's
/// (over [`STD_RATIO_EDGES`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChannelBaseline {
    pub mean_z: Histogram,
    pub std_ratio: Histogram,
}

/// What the model saw and said on its training data, recorded when the bundle was built.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    /// What it was computed on, e.g. `BasicMotions TRAIN split as one stream, hop 50`.
    pub dataset: String,
    /// Windows evaluated.
    pub windows: u64,
    /// Classifiers: the fraction of windows per predicted class, in label order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_distribution: Option<Vec<f64>>,
    /// Classifiers: the top class's probability over [`CONFIDENCE_EDGES`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confidence: Option<Histogram>,
    /// Anomaly models: the score's distribution (edges: quantiles of the training scores).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<Histogram>,
    /// Anomaly models: the fraction of windows above the threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anomaly_rate: Option<f64>,
    /// One per input channel, in input order.
    pub input: Vec<ChannelBaseline>,
}

impl Baseline {
    /// Checks every histogram and fraction; `channels` and `classes` are the manifest's.
    pub fn check(&self, channels: usize, classes: Option<usize>) -> Result<(), (String, String)> {
        let bad = |field: &str, p: String| (format!("baseline.{field}"), p);
        if self.windows == 0 {
            return Err(bad("windows", "must be at least 1".into()));
        }
        if self.input.len() != channels {
            return Err(bad(
                "input",
                format!(
                    "has {} channels; the model has {channels}",
                    self.input.len()
                ),
            ));
        }
        for (c, ch) in self.input.iter().enumerate() {
            ch.mean_z
                .check()
                .map_err(|p| bad(&format!("input[{c}].mean_z"), p))?;
            ch.std_ratio
                .check()
                .map_err(|p| bad(&format!("input[{c}].std_ratio"), p))?;
        }
        if let Some(d) = &self.class_distribution {
            if Some(d.len()) != classes {
                return Err(bad(
                    "class_distribution",
                    format!("has {} classes; the model has {classes:?}", d.len()),
                ));
            }
            let sum: f64 = d.iter().sum();
            if d.iter().any(|f| !f.is_finite() || *f < 0.0) || (sum - 1.0).abs() > 1e-6 {
                return Err(bad(
                    "class_distribution",
                    "must be fractions summing to 1".into(),
                ));
            }
        }
        for (field, h) in [("confidence", &self.confidence), ("score", &self.score)] {
            if let Some(h) = h {
                h.check().map_err(|p| bad(field, p))?;
            }
        }
        if let Some(r) = self.anomaly_rate
            && !(r.is_finite() && (0.0..=1.0).contains(&r))
        {
            return Err(bad("anomaly_rate", "must be a fraction from 0 to 1".into()));
        }
        Ok(())
    }
}

/// Per-channel statistics of one raw window laid out `[channel][sample]`: for each channel
/// `(mean - norm_mean) / norm_std` and `std / norm_std` (population std). What the agent sends
/// with each result and what [`Baseline::input`] is built from.
pub fn window_stats(
    window: &[f32],
    samples: usize,
    norm_mean: &[f32],
    norm_std: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let mut mean_z = Vec::with_capacity(norm_mean.len());
    let mut std_ratio = Vec::with_capacity(norm_mean.len());
    for (c, row) in window.chunks(samples.max(1)).enumerate() {
        let (Some(m0), Some(s0)) = (norm_mean.get(c), norm_std.get(c)) else {
            break;
        };
        let n = row.len().max(1) as f64;
        let mean = row.iter().map(|v| f64::from(*v)).sum::<f64>() / n;
        let var = row
            .iter()
            .map(|v| (f64::from(*v) - mean).powi(2))
            .sum::<f64>()
            / n;
        let s0 = f64::from(*s0).max(f64::MIN_POSITIVE);
        mean_z.push(((mean - f64::from(*m0)) / s0) as f32);
        std_ratio.push((var.sqrt() / s0) as f32);
    }
    (mean_z, std_ratio)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_are_lower_inclusive_with_open_ends() {
        let e = [0.0, 1.0, 2.0];
        assert_eq!(bin(&e, -5.0), 0);
        assert_eq!(bin(&e, 0.0), 1);
        assert_eq!(bin(&e, 1.5), 2);
        assert_eq!(bin(&e, 2.0), 3);
        assert_eq!(bin(&e, 9.0), 3);
        let h = Histogram::of(&e, [0.5, 0.5, 3.0, -1.0]);
        assert_eq!(h.fractions, vec![0.25, 0.5, 0.0, 0.25]);
        h.check().unwrap();
    }

    #[test]
    fn psi_is_zero_for_the_same_distribution_and_grows_with_the_shift() {
        let base = [0.25, 0.25, 0.25, 0.25];
        assert!(psi(&base, &base).abs() < 1e-12);
        let small = psi(&base, &[0.3, 0.2, 0.25, 0.25]);
        let large = psi(&base, &[0.7, 0.1, 0.1, 0.1]);
        assert!(small > 0.0 && small < 0.1, "{small}");
        assert!(large > 0.25, "{large}");
        // An emptied bin is finite.
        assert!(psi(&base, &[0.0, 0.0, 0.5, 0.5]).is_finite());
    }

    #[test]
    fn window_stats_standardize_mean_and_std() {
        // Two channels, four samples: [1,1,3,3] and [0,0,0,0].
        let w = [1.0, 1.0, 3.0, 3.0, 0.0, 0.0, 0.0, 0.0];
        let (z, r) = window_stats(&w, 4, &[2.0, 1.0], &[1.0, 2.0]);
        assert_eq!(z, vec![0.0, -0.5]);
        assert_eq!(r, vec![1.0, 0.0]);
    }

    #[test]
    fn a_bad_histogram_is_named() {
        let h = Histogram {
            edges: vec![1.0, 0.0],
            fractions: vec![0.5, 0.5, 0.0],
        };
        assert!(h.check().unwrap_err().contains("ascending"));
        let b = Baseline {
            dataset: "x".into(),
            windows: 1,
            class_distribution: Some(vec![0.5, 0.5]),
            confidence: None,
            score: None,
            anomaly_rate: None,
            input: vec![],
        };
        assert_eq!(b.check(1, Some(2)).unwrap_err().0, "baseline.input");
        assert_eq!(
            b.check(0, Some(3)).unwrap_err().0,
            "baseline.class_distribution"
        );
    }
}
