//! ARM CMSDK APB UART0 at 0x4000_4000 (QEMU wires it to the first `-serial`). Polled: the node
//! writes frames from its main loop and reads commands between them.

use core::sync::atomic::{AtomicBool, Ordering};

const BASE: usize = 0x4000_4000;
const DATA: usize = 0x000;
const STATE: usize = 0x004;
const CTRL: usize = 0x008;
const BAUDDIV: usize = 0x010;
const STATE_TX_FULL: u32 = 1 << 0;
const STATE_RX_FULL: u32 = 1 << 1;
const CTRL_TX_EN: u32 = 1 << 0;
const CTRL_RX_EN: u32 = 1 << 1;

static TAKEN: AtomicBool = AtomicBool::new(false);

/// The one handle to UART0.
pub struct Uart0(());

fn reg(off: usize) -> *mut u32 {
    (BASE + off) as *mut u32
}

impl Uart0 {
    /// Enables UART0 at `baud` (the only handle: `None` if already taken).
    pub fn take(baud: u32) -> Option<Uart0> {
        if TAKEN.swap(true, Ordering::AcqRel) {
            return None;
        }
        // SAFETY: fixed MMIO registers of this board's UART0; this is the only handle.
        unsafe {
            reg(BAUDDIV).write_volatile((crate::SYSCLK_HZ / baud).max(16));
            reg(CTRL).write_volatile(CTRL_TX_EN | CTRL_RX_EN);
        }
        Some(Uart0(()))
    }

    fn state(&self) -> u32 {
        // SAFETY: reading UART0's status register has no side effect.
        unsafe { reg(STATE).read_volatile() }
    }

    /// Writes `bytes`, waiting while the transmitter is full (the line's backpressure).
    pub fn write_all(&mut self, bytes: &[u8]) {
        for &b in bytes {
            while self.state() & STATE_TX_FULL != 0 {
                core::hint::spin_loop();
            }
            // SAFETY: the transmitter has room; writing DATA sends one byte.
            unsafe { reg(DATA).write_volatile(b as u32) };
        }
    }

    /// One received byte, if any.
    pub fn try_read(&mut self) -> Option<u8> {
        if self.state() & STATE_RX_FULL == 0 {
            return None;
        }
        // SAFETY: a byte is waiting; reading DATA takes it.
        Some(unsafe { reg(DATA).read_volatile() } as u8)
    }
}
