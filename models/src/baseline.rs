//! A model's training-time baseline (manifest `baseline`, type `ember_bundle::Baseline`):
//! the data replayed as one stream, as a device sees it (series after series, each channel's
//! samples in order), cut into windows every `input.hop` samples, evaluated by the model.
//! Model monitoring compares the field's distributions with these (docs/monitoring.md).

/// Per-channel window statistics against the normalization (what the agent sends with each
/// result).
pub use ember_bundle::baseline::window_stats;
use ember_bundle::baseline::{
    CONFIDENCE_EDGES, ChannelBaseline, Histogram, MEAN_Z_EDGES, STD_RATIO_EDGES,
};

use crate::data::Dataset;
use crate::inference::{LoadedModel, ModelError, Output};
use crate::manifest::Baseline;

/// Windows evaluated per model call.
const BATCH: usize = 64;

/// The windows of `data` replayed as one stream with the model's window and hop,
/// `[window][channel][sample]`.
pub fn stream_windows(data: &Dataset, window: usize, hop: usize) -> Vec<f32> {
    let (c, len) = (data.channels, data.window);
    let total = data.len() * len;
    let mut out = Vec::new();
    if window == 0 || hop == 0 || total < window {
        return out;
    }
    let mut start = 0;
    while start + window <= total {
        for ch in 0..c {
            for t in start..start + window {
                let (series, s) = (t / len, t % len);
                out.push(data.x[(series * c + ch) * len + s]);
            }
        }
        start += hop;
    }
    out
}

/// Evaluates `model` on `data` as a stream and records what it said.
pub fn compute(model: &LoadedModel, data: &Dataset, what: &str) -> Result<Baseline, ModelError> {
    let input = model.input();
    let windows = stream_windows(data, input.window, input.hop);
    let n = model.window_len();
    let count = windows.len() / n.max(1);
    let norm = &input.normalization;
    let mut mean_z: Vec<Vec<f64>> = vec![Vec::new(); input.channels];
    let mut std_ratio: Vec<Vec<f64>> = vec![Vec::new(); input.channels];
    for w in windows.chunks(n) {
        let (z, r) = window_stats(w, input.window, &norm.mean, &norm.std);
        for c in 0..input.channels {
            mean_z[c].push(f64::from(z[c]));
            std_ratio[c].push(f64::from(r[c]));
        }
    }
    let mut classes: Option<(usize, Vec<u64>, Vec<f64>)> = None;
    let mut scores: Vec<f64> = Vec::new();
    let mut threshold = f32::INFINITY;
    for batch in windows.chunks(n * BATCH) {
        match model.infer(batch)? {
            Output::Classes {
                classes: k,
                probabilities,
            } => {
                let (_, counts, conf) = classes.get_or_insert_with(|| (k, vec![0; k], Vec::new()));
                for p in probabilities.chunks(k) {
                    let top = crate::metrics::argmax(p);
                    counts[top] += 1;
                    conf.push(f64::from(p[top]));
                }
            }
            Output::Anomaly {
                threshold: t,
                scores: s,
            } => {
                threshold = t;
                scores.extend(s.iter().map(|v| f64::from(*v)));
            }
        }
    }
    let input_baseline = (0..input.channels)
        .map(|c| ChannelBaseline {
            mean_z: Histogram::of(&MEAN_Z_EDGES, mean_z[c].iter().copied()),
            std_ratio: Histogram::of(&STD_RATIO_EDGES, std_ratio[c].iter().copied()),
        })
        .collect();
    let (class_distribution, confidence) = match &classes {
        Some((_, counts, conf)) => {
            let total = counts.iter().sum::<u64>().max(1) as f64;
            (
                Some(counts.iter().map(|c| *c as f64 / total).collect()),
                Some(Histogram::of(&CONFIDENCE_EDGES, conf.iter().copied())),
            )
        }
        None => (None, None),
    };
    let (score, anomaly_rate) = if scores.is_empty() {
        (None, None)
    } else {
        let edges = score_edges(&scores);
        let rate = scores.iter().filter(|s| **s > f64::from(threshold)).count() as f64
            / scores.len() as f64;
        (
            Some(Histogram::of(&edges, scores.iter().copied())),
            Some(rate),
        )
    };
    Ok(Baseline {
        dataset: format!(
            "{what} as one stream, window {}, hop {}",
            input.window, input.hop
        ),
        windows: count as u64,
        class_distribution,
        confidence,
        score,
        anomaly_rate,
        input: input_baseline,
    })
}

/// Deciles of the training scores (deduplicated, strictly ascending): ten bins of about a
/// tenth each.
fn score_edges(scores: &[f64]) -> Vec<f64> {
    let mut s: Vec<f64> = scores.iter().copied().filter(|v| v.is_finite()).collect();
    s.sort_by(f64::total_cmp);
    let mut edges: Vec<f64> = Vec::new();
    if s.is_empty() {
        return edges;
    }
    for q in 1..10 {
        let v = s[(q * s.len() / 10).min(s.len() - 1)];
        if edges.last().is_none_or(|l| v > *l) {
            edges.push(v);
        }
    }
    edges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_windows_cross_series_like_a_replay() {
        // Two series of 4 samples, 1 channel: 0 1 2 3 | 10 11 12 13.
        let d = Dataset {
            labels: vec!["a".into()],
            channels: 1,
            window: 4,
            x: vec![0.0, 1.0, 2.0, 3.0, 10.0, 11.0, 12.0, 13.0],
            y: vec![0, 0],
        };
        let w = stream_windows(&d, 4, 2);
        assert_eq!(
            w,
            vec![
                0.0, 1.0, 2.0, 3.0, 2.0, 3.0, 10.0, 11.0, 10.0, 11.0, 12.0, 13.0
            ]
        );
    }

    #[test]
    fn score_edges_are_ascending_deciles() {
        let s: Vec<f64> = (0..100).map(f64::from).collect();
        assert_eq!(
            score_edges(&s),
            vec![10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0]
        );
        assert_eq!(score_edges(&[1.0, 1.0, 1.0]), vec![1.0]);
    }
}
