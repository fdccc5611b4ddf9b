//! The sensor node on mps2-an386: SysTick samples the replayed IMU into the node's ring; the
//! main loop writes frames to UART0 and applies the host's commands. A panic resets the node
//! (the host sees a new boot).
#![no_std]
#![no_main]

use core::cell::RefCell;

use cortex_m::interrupt::Mutex;
use cortex_m_rt::{entry, exception};
use ember_node::link::{FrameReader, MAX_FRAME_BYTES, Pushed};
use ember_node::node::{Config, Effect, Node};
use ember_node::sensor::ReplayImu;
use ember_node_mps2_an386::{MAX_RATE_HZ, MIN_RATE_HZ, boot, clock, uart::Uart0};

/// Samples the node buffers while the line is busy or until the host acknowledges them (≈ 88
/// bytes each: 352 KiB, 4 s at 1 kHz).
const RING: usize = 4096;
const BAUD: u32 = 115_200;

static NODE: Mutex<RefCell<Option<Node<ReplayImu, RING>>>> = Mutex::new(RefCell::new(None));

#[entry]
fn main() -> ! {
    let boot = boot::count_boot();
    let config = Config {
        rate_hz: 100,
        min_rate_hz: MIN_RATE_HZ,
        max_rate_hz: MAX_RATE_HZ,
        status_every: 1000,
    };
    let node = Node::new(ReplayImu::new(), boot, config);
    let rate = node.rate_hz();
    cortex_m::interrupt::free(|cs| NODE.borrow(cs).replace(Some(node)));
    let Some(mut cp) = cortex_m::Peripherals::take() else {
        reset()
    };
    let Some(mut uart) = Uart0::take(BAUD) else {
        reset()
    };
    clock::start(&mut cp.SYST, rate);

    let mut commands = FrameReader::<32>::new();
    let mut out = [0u8; MAX_FRAME_BYTES];
    loop {
        while let Some(byte) = uart.try_read() {
            let effect = match commands.push(byte) {
                Pushed::More => Effect::None,
                Pushed::TooLong => with_node(|n| {
                    n.bad_command();
                    Effect::None
                }),
                Pushed::Frame(body) => with_node(|n| n.command_frame(body).unwrap_or(Effect::None)),
            };
            if let Effect::Rate(hz) = effect {
                clock::start(&mut cp.SYST, hz);
            }
        }
        let len = with_node(|n| n.next_frame(&mut out).map(|f| f.len()));
        match len {
            Some(len) => uart.write_all(&out[..len]),
            // Nothing to send: sleep until the next sample.
            None => cortex_m::asm::wfi(),
        }
    }
}

fn with_node<R: Default>(f: impl FnOnce(&mut Node<ReplayImu, RING>) -> R) -> R {
    cortex_m::interrupt::free(|cs| {
        NODE.borrow(cs)
            .borrow_mut()
            .as_mut()
            .map(f)
            .unwrap_or_default()
    })
}

#[exception]
fn SysTick() {
    cortex_m::interrupt::free(|cs| {
        if let Some(n) = NODE.borrow(cs).borrow_mut().as_mut() {
            n.tick();
        }
    });
}

fn reset() -> ! {
    cortex_m::peripheral::SCB::sys_reset()
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    reset()
}
