//! The sample clock: SysTick on the core clock, one interrupt per sample.

use cortex_m::peripheral::SYST;
use cortex_m::peripheral::syst::SystClkSource;

/// (Re)starts SysTick so that it fires `rate_hz` times a second (clamped to the board's range).
pub fn start(syst: &mut SYST, rate_hz: u16) {
    let rate = rate_hz.clamp(crate::MIN_RATE_HZ, crate::MAX_RATE_HZ) as u32;
    syst.disable_counter();
    syst.set_clock_source(SystClkSource::Core);
    syst.set_reload(crate::SYSCLK_HZ / rate - 1);
    syst.clear_current();
    syst.enable_interrupt();
    syst.enable_counter();
}

pub fn stop(syst: &mut SYST) {
    syst.disable_interrupt();
    syst.disable_counter();
}
