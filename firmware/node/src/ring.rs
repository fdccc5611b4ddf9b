//! A fixed-capacity FIFO that never blocks its producer: when full, the oldest entry is dropped
//! and counted as an overrun.
//!
//! The producer is the sample clock (an interrupt), the consumer the UART loop. Dropping the
//! oldest keeps the freshest data when the line is slower than the sensor; because a sample's
//! sequence number is assigned before it enters the ring, every drop is visible at the host as a
//! gap, and `overruns` says the node (not the line) lost it.

/// A ring of at most `N` entries.
pub struct Ring<T: Copy, const N: usize> {
    buf: [Option<T>; N],
    head: usize,
    len: usize,
    overruns: u32,
}

impl<T: Copy, const N: usize> Default for Ring<T, N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Copy, const N: usize> Ring<T, N> {
    pub const fn new() -> Self {
        assert!(N > 0, "a ring needs room for one entry");
        Ring {
            buf: [None; N],
            head: 0,
            len: 0,
            overruns: 0,
        }
    }

    /// Appends `v`; when full, drops the oldest entry (counted) and returns it.
    pub fn push(&mut self, v: T) -> Option<T> {
        let dropped = if self.len == N {
            let old = self.buf[self.head].take();
            self.head = (self.head + 1) % N;
            self.len -= 1;
            self.overruns = self.overruns.wrapping_add(1);
            old
        } else {
            None
        };
        self.buf[(self.head + self.len) % N] = Some(v);
        self.len += 1;
        dropped
    }

    /// Removes and returns the oldest entry.
    pub fn pop(&mut self) -> Option<T> {
        if self.len == 0 {
            return None;
        }
        let v = self.buf[self.head].take();
        self.head = (self.head + 1) % N;
        self.len -= 1;
        v
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub const fn capacity(&self) -> usize {
        N
    }

    /// Entries dropped because the ring was full, since creation or [`Ring::reset_overruns`].
    pub fn overruns(&self) -> u32 {
        self.overruns
    }

    pub fn reset_overruns(&mut self) {
        self.overruns = 0;
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;
    use std::vec::Vec;

    #[test]
    fn drops_the_oldest_when_full_and_counts_it() {
        let mut r = Ring::<u32, 3>::new();
        for i in 0..5 {
            r.push(i);
        }
        assert_eq!(r.overruns(), 2);
        assert_eq!(
            (r.pop(), r.pop(), r.pop(), r.pop()),
            (Some(2), Some(3), Some(4), None)
        );
        r.reset_overruns();
        assert_eq!(r.overruns(), 0);
    }

    proptest! {
        /// Against a model: a `VecDeque` trimmed to `N` from the front.
        #[test]
        fn behaves_like_a_bounded_deque(ops in proptest::collection::vec(any::<Option<u16>>(), 0..400)) {
            let mut r = Ring::<u16, 7>::new();
            let mut model = VecDeque::new();
            let mut dropped = 0u32;
            for op in ops {
                match op {
                    Some(v) => {
                        model.push_back(v);
                        let want = if model.len() > 7 { dropped += 1; model.pop_front() } else { None };
                        prop_assert_eq!(r.push(v), want);
                    }
                    None => prop_assert_eq!(r.pop(), model.pop_front()),
                }
                prop_assert_eq!(r.len(), model.len());
                prop_assert_eq!(r.overruns(), dropped);
            }
            let rest: Vec<u16> = core::iter::from_fn(|| r.pop()).collect();
            prop_assert_eq!(rest, model.into_iter().collect::<Vec<_>>());
        }
    }
}
