//! Sets of sequence numbers as sorted, disjoint, non-adjacent inclusive ranges: the arithmetic
//! of the durability ledger (missing − evicted − pending = lost).

use serde::Serialize;
use utoipa::ToSchema;

/// An inclusive range of sequence numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, ToSchema)]
pub struct SeqRange {
    pub from: u64,
    pub to: u64,
}

impl SeqRange {
    pub fn new(from: u64, to: u64) -> SeqRange {
        SeqRange { from, to }
    }

    /// How many sequence numbers it holds (at least one).
    pub fn count(&self) -> u64 {
        self.to - self.from + 1
    }
}

/// A normalized set of ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    ranges: Vec<SeqRange>,
}

impl RangeSet {
    /// Normalizes arbitrary ranges (any order, overlapping, adjacent); ranges with
    /// `from > to` are ignored.
    pub fn from_ranges(ranges: impl IntoIterator<Item = SeqRange>) -> RangeSet {
        let mut v: Vec<SeqRange> = ranges.into_iter().filter(|r| r.from <= r.to).collect();
        v.sort();
        let mut out: Vec<SeqRange> = Vec::with_capacity(v.len());
        for r in v {
            match out.last_mut() {
                Some(last) if r.from <= last.to.saturating_add(1) => {
                    last.to = last.to.max(r.to);
                }
                _ => out.push(r),
            }
        }
        RangeSet { ranges: out }
    }

    pub fn ranges(&self) -> &[SeqRange] {
        &self.ranges
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// How many sequence numbers the set holds.
    pub fn count(&self) -> u64 {
        self.ranges.iter().map(SeqRange::count).sum()
    }

    /// The part of the set inside `1..=max`.
    pub fn clamp(&self, max: u64) -> RangeSet {
        RangeSet {
            ranges: self
                .ranges
                .iter()
                .filter(|r| r.from <= max)
                .map(|r| SeqRange::new(r.from, r.to.min(max)))
                .collect(),
        }
    }

    /// `self − other`.
    pub fn subtract(&self, other: &RangeSet) -> RangeSet {
        let mut out = Vec::new();
        let mut j = 0;
        for r in &self.ranges {
            let mut from = r.from;
            let to = r.to;
            // Skip holes that end before this range.
            while j < other.ranges.len() && other.ranges[j].to < from {
                j += 1;
            }
            let mut k = j;
            while from <= to {
                match other.ranges.get(k) {
                    Some(h) if h.from <= to => {
                        if h.from > from {
                            out.push(SeqRange::new(from, h.from - 1));
                        }
                        if h.to >= to {
                            break;
                        } else {
                            from = h.to + 1;
                            k += 1;
                        }
                    }
                    _ => {
                        out.push(SeqRange::new(from, to));
                        break;
                    }
                }
            }
        }
        RangeSet { ranges: out }
    }

    /// `self ∩ other`.
    pub fn intersect(&self, other: &RangeSet) -> RangeSet {
        let mut out = Vec::new();
        let (mut i, mut j) = (0, 0);
        while i < self.ranges.len() && j < other.ranges.len() {
            let (a, b) = (self.ranges[i], other.ranges[j]);
            let from = a.from.max(b.from);
            let to = a.to.min(b.to);
            if from <= to {
                out.push(SeqRange::new(from, to));
            }
            if a.to < b.to {
                i += 1;
            } else {
                j += 1;
            }
        }
        RangeSet { ranges: out }
    }

    pub fn union(&self, other: &RangeSet) -> RangeSet {
        RangeSet::from_ranges(self.ranges.iter().chain(&other.ranges).copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn set(v: &[(u64, u64)]) -> RangeSet {
        RangeSet::from_ranges(v.iter().map(|&(a, b)| SeqRange::new(a, b)))
    }

    fn members(s: &RangeSet) -> BTreeSet<u64> {
        s.ranges().iter().flat_map(|r| r.from..=r.to).collect()
    }

    #[test]
    fn normalizes_and_subtracts() {
        let a = set(&[(5, 9), (1, 2), (3, 3), (20, 25)]);
        assert_eq!(
            a.ranges(),
            &[
                SeqRange::new(1, 3),
                SeqRange::new(5, 9),
                SeqRange::new(20, 25)
            ]
        );
        let b = set(&[(2, 4), (8, 21)]);
        assert_eq!(
            a.subtract(&b).ranges(),
            &[
                SeqRange::new(1, 1),
                SeqRange::new(5, 7),
                SeqRange::new(22, 25)
            ]
        );
        assert_eq!(a.count(), 14);
        assert_eq!(
            a.clamp(6).ranges(),
            &[SeqRange::new(1, 3), SeqRange::new(5, 6)]
        );
        assert_eq!(
            a.intersect(&b).ranges(),
            &[
                SeqRange::new(2, 3),
                SeqRange::new(8, 9),
                SeqRange::new(20, 21)
            ]
        );
    }

    fn arb_set() -> impl Strategy<Value = Vec<(u64, u64)>> {
        proptest::collection::vec((1u64..80, 0u64..8), 0..8)
            .prop_map(|v| v.into_iter().map(|(a, l)| (a, a + l)).collect())
    }

    proptest! {
        #[test]
        fn matches_a_set_model(a in arb_set(), b in arb_set()) {
            let (sa, sb) = (set(&a), set(&b));
            let (ma, mb) = (members(&sa), members(&sb));
            prop_assert_eq!(members(&sa.subtract(&sb)), &ma - &mb);
            prop_assert_eq!(members(&sa.intersect(&sb)), &ma & &mb);
            prop_assert_eq!(members(&sa.union(&sb)), &ma | &mb);
            prop_assert_eq!(sa.count(), ma.len() as u64);
            // Normalized: sorted, disjoint and not adjacent.
            for w in sa.ranges().windows(2) {
                prop_assert!(w[0].to + 1 < w[1].from);
            }
        }
    }
}
