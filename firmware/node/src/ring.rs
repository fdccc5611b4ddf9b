//! A fixed-capacity FIFO that never blocks its producer: when full, the oldest entry is dropped
//! and, if it was never sent, counted as an overrun.
//!
//! The producer is the sample clock (an interrupt), the consumer the UART loop. Dropping the
//! oldest keeps the freshest data when the line is slower than the sensor; because a sample's
//! sequence number is assigned before it enters the ring, every drop is visible at the host as a
//! gap, and `overruns` says the node (not the line) lost it.
//!
//! Two ways to consume: [`Ring::pop`] removes the oldest entry; [`Ring::next_unsent`] hands out
//! entries in order but keeps them (the first `sent` entries are sent, kept until
//! [`Ring::release_while`] drops them on the host's acknowledgement), and [`Ring::rewind`] makes
//! every kept entry unsent again (the host asked to resume).

/// A ring of at most `N` entries.
pub struct Ring<T: Copy, const N: usize> {
    buf: [Option<T>; N],
    head: usize,
    len: usize,
    /// The first `sent` entries from `head` were handed out by `next_unsent` (`sent <= len`).
    sent: usize,
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
            sent: 0,
            overruns: 0,
        }
    }

    /// Appends `v`; when full, drops the oldest entry and returns it (counted as an overrun if it
    /// was never sent).
    pub fn push(&mut self, v: T) -> Option<T> {
        let dropped = if self.len == N {
            let old = self.buf[self.head].take();
            self.head = (self.head + 1) % N;
            self.len -= 1;
            if self.sent > 0 {
                self.sent -= 1;
            } else {
                self.overruns = self.overruns.wrapping_add(1);
            }
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
        self.sent = self.sent.saturating_sub(1);
        v
    }

    /// The oldest entry not handed out yet; it stays in the ring (sent) until released.
    pub fn next_unsent(&mut self) -> Option<T> {
        if self.sent == self.len {
            return None;
        }
        let v = self.buf[(self.head + self.sent) % N];
        self.sent += 1;
        v
    }

    /// Drops entries from the oldest on while `done` holds for them (sent or not: the host
    /// holds them); returns how many.
    pub fn release_while(&mut self, mut done: impl FnMut(&T) -> bool) -> usize {
        let mut n = 0;
        while let Some(v) = self.buf[self.head].as_ref() {
            if self.len == 0 || !done(v) {
                break;
            }
            self.pop();
            n += 1;
        }
        n
    }

    /// Every kept entry is unsent again: [`Ring::next_unsent`] starts over at the oldest.
    pub fn rewind(&mut self) {
        self.sent = 0;
    }

    /// The oldest entry, without taking it.
    pub fn front(&self) -> Option<&T> {
        if self.len == 0 {
            return None;
        }
        self.buf[self.head].as_ref()
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

    #[test]
    fn kept_entries_are_resent_after_a_rewind_and_released_on_ack() {
        let mut r = Ring::<u32, 4>::new();
        for i in 0..3 {
            r.push(i);
        }
        assert_eq!((r.next_unsent(), r.next_unsent()), (Some(0), Some(1)));
        assert_eq!(r.len(), 3, "sent entries are kept");
        assert_eq!(r.release_while(|v| *v < 1), 1);
        r.rewind();
        assert_eq!(
            (r.next_unsent(), r.next_unsent(), r.next_unsent()),
            (Some(1), Some(2), None)
        );
        // Full: dropping a sent entry is no overrun, dropping an unsent one is.
        for v in 3..7 {
            r.push(v);
        }
        assert_eq!(r.overruns(), 0, "1 and 2 made room: they were sent");
        r.push(7);
        assert_eq!(r.overruns(), 1, "3 was never sent");
        assert_eq!(r.front(), Some(&4));
    }

    proptest! {
        /// Kept entries: a model of (entry, sent) pairs.
        #[test]
        fn keeps_and_resends_like_a_model(ops in proptest::collection::vec(0u8..5, 0..400)) {
            let mut r = Ring::<u16, 7>::new();
            let mut model: VecDeque<(u16, bool)> = VecDeque::new();
            let (mut next, mut overruns) = (0u16, 0u32);
            for op in ops {
                match op {
                    0 | 1 => {
                        model.push_back((next, false));
                        if model.len() > 7 && !model.pop_front().expect("full").1 {
                            overruns += 1;
                        }
                        r.push(next);
                        next += 1;
                    }
                    2 => {
                        let want = model.iter_mut().find(|e| !e.1).map(|e| { e.1 = true; e.0 });
                        prop_assert_eq!(r.next_unsent(), want);
                    }
                    3 => {
                        let upto = model.front().map_or(0, |e| e.0 + 2);
                        let mut n = 0;
                        while model.front().is_some_and(|e| e.0 < upto) { model.pop_front(); n += 1; }
                        prop_assert_eq!(r.release_while(|v| *v < upto), n);
                    }
                    _ => {
                        r.rewind();
                        model.iter_mut().for_each(|e| e.1 = false);
                    }
                }
                prop_assert_eq!(r.len(), model.len());
                prop_assert_eq!(r.overruns(), overruns);
                prop_assert_eq!(r.front().copied(), model.front().map(|e| e.0));
            }
        }

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
