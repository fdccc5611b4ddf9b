//! Windows of consecutive samples for a model on the node (results mode, see `node`).
//!
//! A window is `W` consecutive samples of `C` channels; one ends every `hop` samples once the
//! first is full. Guarantees: a window MUST hold only consecutive samples of one boot, so a
//! sample missing from the numbering (the main loop fell behind and the short queue dropped it)
//! or of another channel count restarts the windowing: the next window ends `W` samples after
//! the gap, as the agent's own windowing restarts after a gap.

use crate::node::{Taken, WindowSpan};

/// The last `W` samples of `C` channels, time-major in a circular buffer.
pub struct Windower<const C: usize, const W: usize> {
    samples: [[f32; C]; W],
    ts_us: [u64; W],
    /// Where the next sample goes.
    next: usize,
    /// Consecutive samples since the last restart.
    run: u32,
    /// The number the next sample must have to continue the run.
    expected: Option<u32>,
    hop: u32,
}

impl<const C: usize, const W: usize> Windower<C, W> {
    /// `hop` is clamped to `1..=W`.
    pub const fn new(hop: usize) -> Self {
        assert!(W > 0 && C > 0, "a window has samples and channels");
        let hop = if hop == 0 {
            1
        } else if hop > W {
            W
        } else {
            hop
        };
        Windower {
            samples: [[0.0; C]; W],
            ts_us: [0; W],
            next: 0,
            run: 0,
            expected: None,
            hop: hop as u32,
        }
    }

    /// Takes one sample; returns the span of the window it completes, if any (read the window
    /// with [`Windower::fill`] before the next `push`).
    pub fn push(&mut self, s: &Taken) -> Option<WindowSpan> {
        let values = s.values.as_slice();
        if values.len() != C {
            self.run = 0;
            self.expected = None;
            return None;
        }
        if self.expected != Some(s.n) {
            self.run = 0;
        }
        self.expected = Some(s.n.wrapping_add(1));
        self.samples[self.next].copy_from_slice(values);
        self.ts_us[self.next] = s.ts_us;
        self.next = (self.next + 1) % W;
        self.run = self.run.saturating_add(1);
        let w = W as u32;
        if self.run < w || !(self.run - w).is_multiple_of(self.hop) {
            return None;
        }
        Some(WindowSpan {
            // `next` is now the oldest sample of the window.
            start_us: self.ts_us[self.next],
            end_us: s.ts_us,
            samples: s.n.wrapping_add(1),
        })
    }

    /// The current window, laid out `[channel][sample]` (oldest sample first), as the models
    /// take it: `out` must hold `C × W` values.
    pub fn fill(&self, out: &mut [f32]) {
        for (c, channel) in out.chunks_exact_mut(W).take(C).enumerate() {
            for (t, v) in channel.iter_mut().enumerate() {
                *v = self.samples[(self.next + t) % W][c];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use ember_proto::node::Values;
    use std::vec::Vec;

    fn taken(n: u32) -> Taken {
        Taken {
            n,
            ts_us: 1000 * u64::from(n),
            values: Values::from_slice(&[n as f32, -(n as f32)]).expect("fits"),
        }
    }

    #[test]
    fn windows_end_every_hop_and_hold_the_last_samples_channel_major() {
        let mut w = Windower::<2, 4>::new(2);
        let spans: Vec<(u32, WindowSpan)> = (0..10)
            .filter_map(|n| w.push(&taken(n)).map(|s| (n, s)))
            .collect();
        let ends: Vec<u32> = spans.iter().map(|(n, _)| *n).collect();
        assert_eq!(ends, [3, 5, 7, 9]);
        assert_eq!(
            spans[1].1,
            WindowSpan {
                start_us: 2000,
                end_us: 5000,
                samples: 6
            }
        );
        let mut out = [0.0; 8];
        w.fill(&mut out);
        assert_eq!(out, [6.0, 7.0, 8.0, 9.0, -6.0, -7.0, -8.0, -9.0]);
    }

    #[test]
    fn a_missing_sample_restarts_the_window() {
        let mut w = Windower::<2, 4>::new(4);
        let ends: Vec<u32> = [0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 11]
            .into_iter()
            .filter_map(|n| w.push(&taken(n)).map(|_| n))
            .collect();
        assert_eq!(ends, [7, 11], "3 was dropped: the first window is 4..=7");
        let mut out = [0.0; 8];
        w.fill(&mut out);
        assert_eq!(&out[..4], [8.0, 9.0, 10.0, 11.0]);
    }

    #[test]
    fn a_sample_of_another_width_restarts_the_window() {
        let mut w = Windower::<2, 2>::new(1);
        assert!(w.push(&taken(0)).is_none());
        let odd = Taken {
            n: 1,
            ts_us: 0,
            values: Values::from_slice(&[1.0]).expect("fits"),
        };
        assert!(w.push(&odd).is_none());
        assert!(w.push(&taken(2)).is_none());
        assert!(w.push(&taken(3)).is_some());
    }
}
