//! The sample clock: SysTick on the core clock, one interrupt per sample; with the periods
//! counted ([`on_tick`]) it is also the board's stopwatch ([`Instant`]).

use core::sync::atomic::{AtomicU32, Ordering};

use cortex_m::peripheral::syst::SystClkSource;
use cortex_m::peripheral::{SCB, SYST};

/// (Re)starts SysTick so that it fires `rate_hz` times a second (clamped to the board's range).
pub fn start(syst: &mut SYST, rate_hz: u16) {
    let rate = rate_hz.clamp(crate::MIN_RATE_HZ, crate::MAX_RATE_HZ) as u32;
    syst.disable_counter();
    syst.set_clock_source(SystClkSource::Core);
    syst.set_reload(crate::SYSCLK_HZ / rate - 1);
    syst.clear_current();
    PERIODS.store(0, Ordering::Relaxed);
    syst.enable_interrupt();
    syst.enable_counter();
    // The cleared counter reads 0 until its first reload: wait for that, so the first
    // `Instant::now` does not take it for the end of a period.
    while SYST::get_current() == 0 {
        core::hint::spin_loop();
    }
}

pub fn stop(syst: &mut SYST) {
    syst.disable_interrupt();
    syst.disable_counter();
}

/// SysTick periods since the clock started (the board's SysTick handler calls [`on_tick`]).
static PERIODS: AtomicU32 = AtomicU32::new(0);

/// Counts one SysTick period: call first thing in the SysTick handler.
pub fn on_tick() {
    PERIODS.fetch_add(1, Ordering::Relaxed);
}

/// A point in time, in core clock cycles since the clock started (wraps after 2^32 cycles, 171 s
/// at 25 MHz: measure shorter spans).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Instant(u32);

impl Instant {
    /// Now, from the periods counted and SysTick's down-counter. Retries while a period ended
    /// but its interrupt has not been taken yet, so the two readings agree.
    pub fn now() -> Instant {
        loop {
            let periods = PERIODS.load(Ordering::Relaxed);
            let current = SYST::get_current();
            if !SCB::is_pendst_pending() && PERIODS.load(Ordering::Relaxed) == periods {
                let period = SYST::get_reload() + 1;
                return Instant(
                    periods
                        .wrapping_mul(period)
                        .wrapping_add(period - 1 - current),
                );
            }
        }
    }

    /// Core clock cycles from `self` to `later` (the clock must not have been restarted at
    /// another rate in between).
    pub fn cycles_until(self, later: Instant) -> u32 {
        later.0.wrapping_sub(self.0)
    }
}

/// Guest instructions per core clock cycle under QEMU's `-icount shift=0` (one instruction per
/// nanosecond of guest time; SysTick counts at [`crate::SYSCLK_HZ`]): what a cycle count
/// measured in QEMU stands for (docs/hil.md).
pub const QEMU_INSTRUCTIONS_PER_CYCLE: u32 = 1_000_000_000 / crate::SYSCLK_HZ;
