//! Evaluation measures: accuracy, confusion matrix, ROC-AUC.

/// `counts[truth][predicted]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confusion {
    pub labels: Vec<String>,
    pub counts: Vec<Vec<usize>>,
}

impl Confusion {
    pub fn new(labels: &[String], truth: &[usize], predicted: &[usize]) -> Confusion {
        let k = labels.len();
        let mut counts = vec![vec![0; k]; k];
        for (&t, &p) in truth.iter().zip(predicted) {
            if t < k && p < k {
                counts[t][p] += 1;
            }
        }
        Confusion {
            labels: labels.to_vec(),
            counts,
        }
    }

    pub fn total(&self) -> usize {
        self.counts.iter().flatten().sum()
    }

    pub fn correct(&self) -> usize {
        (0..self.counts.len()).map(|i| self.counts[i][i]).sum()
    }

    /// Fraction correct, 0-1.
    pub fn accuracy(&self) -> f64 {
        self.correct() as f64 / self.total().max(1) as f64
    }

    /// A text table: rows are true labels, columns predictions.
    pub fn render(&self) -> String {
        let width = self
            .labels
            .iter()
            .map(String::len)
            .max()
            .unwrap_or(5)
            .max(5);
        let mut s = format!("{:>width$} │", "true\\pred");
        for l in &self.labels {
            s += &format!(" {l:>width$}");
        }
        s.push('\n');
        s += &format!(
            "{}─┼{}\n",
            "─".repeat(width.max(9)),
            "─".repeat((width + 1) * self.labels.len())
        );
        for (l, row) in self.labels.iter().zip(&self.counts) {
            s += &format!("{l:>w$} │", w = width.max(9));
            for c in row {
                s += &format!(" {c:>width$}");
            }
            s.push('\n');
        }
        s
    }
}

/// Area under the ROC curve for scores where higher means "positive" (anomalous): the
/// probability that a random positive scores above a random negative, ties counting half.
pub fn roc_auc(negatives: &[f32], positives: &[f32]) -> f64 {
    if negatives.is_empty() || positives.is_empty() {
        return f64::NAN;
    }
    let mut wins = 0f64;
    for p in positives {
        for n in negatives {
            wins += if p > n {
                1.0
            } else if p == n {
                0.5
            } else {
                0.0
            };
        }
    }
    wins / (negatives.len() * positives.len()) as f64
}

/// Index of the largest value (the first on ties); 0 for an empty slice.
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_extremes_and_ties() {
        assert_eq!(roc_auc(&[0.1, 0.2], &[0.3, 0.4]), 1.0);
        assert_eq!(roc_auc(&[0.3, 0.4], &[0.1, 0.2]), 0.0);
        assert_eq!(roc_auc(&[0.5], &[0.5]), 0.5);
        assert_eq!(roc_auc(&[0.1, 0.3], &[0.2]), 0.5);
    }

    #[test]
    fn confusion_counts() {
        let labels = vec!["a".to_string(), "b".to_string()];
        let c = Confusion::new(&labels, &[0, 0, 1, 1], &[0, 1, 1, 1]);
        assert_eq!(c.counts, vec![vec![1, 1], vec![0, 2]]);
        assert_eq!(c.accuracy(), 0.75);
        assert!(c.render().contains("true\\pred"));
    }
}
