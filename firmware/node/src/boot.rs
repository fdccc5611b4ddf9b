//! The boot counter: a record in RAM that a reset does not clear (the board places it in a
//! `NOLOAD` section), so each boot gets a new number without flash writes.
//!
//! Guarantees: a record that passes its check MUST be advanced by exactly one per boot; a record
//! that does not (first power-up, RAM lost its contents) MUST restart at 1. The host MUST NOT
//! rely on the numbers being monotonic across power loss: it treats any change of `boot` as a
//! reboot (see `ember_proto::node`).

/// The record as it sits in RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct BootRecord {
    pub magic: u32,
    pub count: u32,
    pub check: u32,
}

const MAGIC: u32 = 0x454D_4252; // "EMBR"

impl BootRecord {
    fn check_of(count: u32) -> u32 {
        !count ^ MAGIC.rotate_left(7)
    }

    pub fn is_valid(&self) -> bool {
        self.magic == MAGIC && self.check == Self::check_of(self.count)
    }

    /// Counts this boot; returns its number (1 on first power-up).
    pub fn advance(&mut self) -> u32 {
        let count = if self.is_valid() {
            self.count.wrapping_add(1).max(1)
        } else {
            1
        };
        *self = BootRecord {
            magic: MAGIC,
            count,
            check: Self::check_of(count),
        };
        count
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn counts_boots_from_one() {
        let mut r = BootRecord {
            magic: 0,
            count: 0,
            check: 0,
        };
        assert_eq!((r.advance(), r.advance(), r.advance()), (1, 2, 3));
        r.count = u32::MAX;
        r.check = BootRecord::check_of(u32::MAX);
        assert_eq!(r.advance(), 1, "wraps past 0");
    }

    proptest! {
        /// Random RAM contents (power-up) restart at 1 unless they happen to be a valid record.
        #[test]
        fn garbage_restarts_at_one(magic: u32, count: u32, check: u32) {
            let mut r = BootRecord { magic, count, check };
            let valid = r.is_valid();
            let n = r.advance();
            prop_assert!(valid || n == 1);
            prop_assert!(r.is_valid());
        }

        /// A single flipped bit in a valid record never passes as valid.
        #[test]
        fn one_flipped_bit_is_detected(count: u32, bit in 0u32..96) {
            let mut r = BootRecord { magic: MAGIC, count, check: BootRecord::check_of(count) };
            match bit / 32 {
                0 => r.magic ^= 1 << (bit % 32),
                1 => r.count ^= 1 << (bit % 32),
                _ => r.check ^= 1 << (bit % 32),
            }
            prop_assert!(!r.is_valid());
        }
    }
}
