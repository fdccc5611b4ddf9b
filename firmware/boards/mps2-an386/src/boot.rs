//! The boot counter's home: a `NOLOAD` RAM section (cortex-m-rt's `.uninit`) that neither the
//! loader nor the startup code touches, so it survives a reset (QEMU's `system_reset`, a
//! watchdog, a panic) and is garbage after power-up ([`BootRecord`] tells the two apart).

use core::mem::MaybeUninit;

use ember_node::boot::BootRecord;

#[unsafe(link_section = ".uninit.ember_boot")]
static mut RECORD: MaybeUninit<BootRecord> = MaybeUninit::uninit();

/// Counts this boot; returns its number. Call once, early in `main`.
pub fn count_boot() -> u32 {
    // SAFETY: called from thread mode before interrupts use it; every bit pattern of three u32s
    // is a valid BootRecord, and RAM holds some bit pattern after power-up.
    unsafe {
        let p = (&raw mut RECORD).cast::<BootRecord>();
        let mut r = p.read_volatile();
        let n = r.advance();
        p.write_volatile(r);
        n
    }
}
