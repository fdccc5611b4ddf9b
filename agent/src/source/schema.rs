//! A stream's schema and the check every source runs before a sample leaves it.
//!
//! A stream's schema is its channel count. It is fixed, in this order, by the source's
//! `channels` key (declared), by the queue's record of the stream (`StreamMeta.channels`,
//! written in the same atomic batch as the stream's first sample, so it survives restarts), or
//! else by the first sample the source accepts. Changing it is an explicit act: a new stream
//! name (the agent refuses to start when the declared count contradicts the recorded one).
//!
//! [`Guard::admit`] refuses, before it is queued, a sample that
//! * has another channel count than the schema (`reason="channels"`),
//! * carries NaN or an infinity (`reason="non_finite"`),
//! * is stamped more than the source's `max_backwards_ms` before the latest accepted sample of
//!   the stream (`reason="backwards"`).
//!
//! **Invariant:** a refused sample is counted in `input_rejected_total` under its reason and
//! logged rate-limited; it changes nothing (not the schema, not the latest timestamp), so
//! accepted data is exactly what it would have been without it.

use std::sync::Arc;

use crate::metrics::{Metrics, RejectReason};

use super::Sample;
use super::sim::should_warn;

/// What a source knows of its stream's schema when it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schema {
    /// The channel count, if declared or recorded; `None` until the first sample fixes it.
    pub channels: Option<usize>,
    /// How far (µs) a timestamp may go back behind the latest accepted one.
    pub max_backwards_us: u64,
}

/// Why a sample does not fit its stream. `Display` says what was expected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Misfit {
    #[error(
        "the sample has {got} values but stream {stream:?} has {expected} channels: send {expected} values per sample, or feed a new stream name to change the schema"
    )]
    Channels {
        stream: Arc<str>,
        expected: usize,
        got: usize,
    },
    #[error("value {index} is {value}: every value must be a finite number")]
    NonFinite { index: usize, value: f32 },
    #[error(
        "timestamp {ts_us} goes back {behind_us} µs behind the stream's latest sample ({last_us}); at most {tolerance_us} µs is tolerated: send samples in time order"
    )]
    Backwards {
        ts_us: u64,
        last_us: u64,
        behind_us: u64,
        tolerance_us: u64,
    },
}

impl Misfit {
    pub fn reason(&self) -> RejectReason {
        match self {
            Misfit::Channels { .. } => RejectReason::Channels,
            Misfit::NonFinite { .. } => RejectReason::NonFinite,
            Misfit::Backwards { .. } => RejectReason::Backwards,
        }
    }
}

/// The per-stream check (one per source; the socket source shares it between its clients).
#[derive(Debug)]
pub struct Guard {
    stream: Arc<str>,
    channels: Option<usize>,
    max_backwards_us: u64,
    last_ts: Option<u64>,
    rejected: u64,
    metrics: Arc<Metrics>,
}

impl Guard {
    pub fn new(stream: Arc<str>, schema: Schema, metrics: Arc<Metrics>) -> Guard {
        Guard {
            stream,
            channels: schema.channels,
            max_backwards_us: schema.max_backwards_us,
            last_ts: None,
            rejected: 0,
            metrics,
        }
    }

    /// A guard that fixes nothing in advance and tolerates any step back (unit tests of
    /// sources that test something else).
    #[cfg(test)]
    pub(crate) fn open(metrics: &Arc<Metrics>) -> Guard {
        let schema = Schema {
            channels: None,
            max_backwards_us: u64::MAX,
        };
        Guard::new("test".into(), schema, metrics.clone())
    }

    /// The channel count, once known.
    pub fn channels(&self) -> Option<usize> {
        self.channels
    }

    /// Checks `s` without counting or logging anything and without changing the guard.
    pub fn check(&self, s: &Sample) -> Result<(), Misfit> {
        if let Some(expected) = self.channels
            && s.values.len() != expected
        {
            return Err(Misfit::Channels {
                stream: self.stream.clone(),
                expected,
                got: s.values.len(),
            });
        }
        if let Some((index, value)) = s.values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(Misfit::NonFinite {
                index,
                value: *value,
            });
        }
        if let Some(last) = self.last_ts
            && s.ts_us < last
            && last - s.ts_us > self.max_backwards_us
        {
            return Err(Misfit::Backwards {
                ts_us: s.ts_us,
                last_us: last,
                behind_us: last - s.ts_us,
                tolerance_us: self.max_backwards_us,
            });
        }
        Ok(())
    }

    /// Admits `s` (fixing the schema on the first sample) or refuses it: counted under its
    /// reason and logged rate-limited.
    pub fn admit(&mut self, s: &Sample) -> Result<(), Misfit> {
        if let Err(m) = self.check(s) {
            self.metrics.reject(m.reason());
            self.rejected += 1;
            if should_warn(self.rejected) {
                tracing::warn!(
                    stream = %self.stream, reason = m.reason().as_str(), rejected = self.rejected,
                    "Refused a sample that does not fit its stream: {m}"
                );
            }
            return Err(m);
        }
        if self.channels.is_none() {
            tracing::info!(stream = %self.stream, channels = s.values.len(), "The stream's schema was fixed by its first sample.");
            self.channels = Some(s.values.len());
        }
        self.last_ts = Some(self.last_ts.map_or(s.ts_us, |l| l.max(s.ts_us)));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(ts_us: u64, values: Vec<f32>) -> Sample {
        Sample {
            stream: "imu".into(),
            ts_us,
            values,
            origin: None,
        }
    }

    fn guard(channels: Option<usize>) -> (Guard, Arc<Metrics>) {
        let m = Arc::new(Metrics::default());
        let schema = Schema {
            channels,
            max_backwards_us: 1_000,
        };
        (Guard::new("imu".into(), schema, m.clone()), m)
    }

    #[test]
    fn the_first_sample_fixes_the_schema_and_misfits_are_counted_by_reason() {
        let (mut g, m) = guard(None);
        assert!(g.admit(&sample(10_000, vec![1.0, 2.0, 3.0])).is_ok());
        assert_eq!(g.channels(), Some(3));
        let e = g.admit(&sample(10_001, vec![0.0; 65])).unwrap_err();
        assert_eq!(e.reason(), RejectReason::Channels);
        assert!(e.to_string().contains("has 65 values"), "{e}");
        assert!(e.to_string().contains("has 3 channels"), "{e}");
        let e = g
            .admit(&sample(10_002, vec![1.0, f32::NAN, 3.0]))
            .unwrap_err();
        assert_eq!(e.reason(), RejectReason::NonFinite);
        assert!(
            g.admit(&sample(10_003, vec![f32::INFINITY, 0.0, 0.0]))
                .is_err()
        );
        // Within the tolerance: accepted; beyond it: refused.
        assert!(g.admit(&sample(9_500, vec![1.0, 2.0, 3.0])).is_ok());
        let e = g.admit(&sample(8_999, vec![1.0, 2.0, 3.0])).unwrap_err();
        assert_eq!(e.reason(), RejectReason::Backwards);
        use std::sync::atomic::Ordering::Relaxed;
        assert_eq!(m.rejected_channels.load(Relaxed), 1);
        assert_eq!(m.rejected_non_finite.load(Relaxed), 2);
        assert_eq!(m.rejected_backwards.load(Relaxed), 1);
        assert_eq!(m.rejected.load(Relaxed), 4);
    }

    #[test]
    fn a_declared_schema_refuses_a_different_first_sample() {
        let (mut g, _) = guard(Some(6));
        assert!(g.admit(&sample(1, vec![0.0; 3])).is_err());
        assert!(g.admit(&sample(2, vec![0.0; 6])).is_ok());
    }

    /// A misfit of one of the four kinds, made to not fit a 3-channel stream at time `ts`.
    fn misfit(kind: u8, ts: u64) -> Sample {
        match kind % 4 {
            0 => sample(ts, vec![1.0; 2]),
            1 => sample(ts, vec![1.0; 65]),
            2 => sample(ts, vec![1.0, f32::NAN, f32::NEG_INFINITY]),
            _ => sample(ts.saturating_sub(1_000_000), vec![1.0; 3]),
        }
    }

    proptest! {
        /// Any interleaving of good and misfit samples admits exactly the good ones, in order.
        #[test]
        fn any_interleaving_admits_exactly_the_good_samples(
            plan in proptest::collection::vec(proptest::option::of(any::<u8>()), 1..200),
        ) {
            let (mut g, m) = guard(None);
            let mut admitted = Vec::new();
            let mut good = Vec::new();
            let mut bad = 0u64;
            for (k, step) in plan.iter().enumerate() {
                let ts = 2_000_000 + k as u64 * 100;
                let s = match step {
                    None => {
                        let s = sample(ts, vec![k as f32, 1.0, 2.0]);
                        good.push(s.clone());
                        s
                    }
                    // The first sample fixes the schema, so a misfit first is a misfit only
                    // once a good sample came before it.
                    Some(kind) if !good.is_empty() => {
                        bad += 1;
                        misfit(*kind, ts)
                    }
                    Some(_) => continue,
                };
                if g.admit(&s).is_ok() {
                    admitted.push(s);
                }
            }
            prop_assert_eq!(admitted, good);
            prop_assert_eq!(m.rejected.load(std::sync::atomic::Ordering::Relaxed), bad);
        }
    }
}
