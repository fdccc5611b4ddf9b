//! The mps2-an386 board (QEMU's model of ARM's AN386: a Cortex-M4F at 25 MHz): the only
//! board-specific parts of the node are here: the CMSDK UART0 driver, the SysTick sample clock
//! (which also times the model), the RAM that keeps the boot counter across resets, and (feature
//! `inference`) the heap. `main.rs` wires them to
//! `ember_node::node::Node`.
//!
//! A real board replaces this crate (its UART, its timer, its memory map); the node core and the
//! link stay the same (docs/hil.md).
#![no_std]

pub mod boot;
pub mod clock;
#[cfg(feature = "inference")]
pub mod heap;
pub mod uart;

/// The core and peripheral clock of the AN386 (QEMU's `sysclk_frq` for this board).
pub const SYSCLK_HZ: u32 = 25_000_000;
/// The slowest rate the 24-bit SysTick reload reaches at [`SYSCLK_HZ`].
pub const MIN_RATE_HZ: u16 = (SYSCLK_HZ / 0x0100_0000 + 1) as u16;
/// The fastest sample rate this board accepts.
pub const MAX_RATE_HZ: u16 = 10_000;
