//! The sensor node on mps2-an386: SysTick samples the replayed IMU into the node's ring; the
//! main loop writes frames to UART0 and applies the host's commands. A panic resets the node
//! (the host sees a new boot).
//!
//! Built with the `inference` feature, the main loop also runs the model on every window of
//! samples (outside the interrupt, timed by the SysTick stopwatch) and the node sends results
//! instead of samples (`ember_node::node`'s results mode).
#![no_std]
#![no_main]

use core::cell::RefCell;

use cortex_m::interrupt::Mutex;
use cortex_m_rt::{entry, exception};
use ember_node::link::{FrameReader, MAX_FRAME_BYTES, Pushed};
use ember_node::node::{Config, Effect, Node};
use ember_node::sensor::ReplayImu;
use ember_node_mps2_an386::{MAX_RATE_HZ, MIN_RATE_HZ, boot, clock, uart::Uart0};

/// Samples the node buffers while the line is busy or until the host acknowledges them (≈ 104
/// bytes each: 416 KiB, 4 s at 1 kHz); results in results mode (one per `hop` samples).
const RING: usize = 4096;
const BAUD: u32 = 115_200;

static NODE: Mutex<RefCell<Option<Node<ReplayImu, RING>>>> = Mutex::new(RefCell::new(None));

#[entry]
fn main() -> ! {
    let boot = boot::count_boot();
    #[cfg(feature = "inference")]
    let mut model = model::Runner::load();
    let config = Config {
        rate_hz: 100,
        min_rate_hz: MIN_RATE_HZ,
        max_rate_hz: MAX_RATE_HZ,
        // Every 10 s at 100 Hz: samples, or (results mode) results at one per hop.
        status_every: if cfg!(feature = "inference") {
            20
        } else {
            1000
        },
    };
    let node = Node::new(ReplayImu::new(), boot, config);
    #[cfg(feature = "inference")]
    let node = match &model {
        Some(_) => node.with_model(ember_node::model::NodeModel::info()),
        None => node,
    };
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
        #[cfg(feature = "inference")]
        let busy = model.as_mut().is_some_and(model::Runner::step);
        #[cfg(not(feature = "inference"))]
        let busy = false;
        let len = with_node(|n| n.next_frame(&mut out).map(|f| f.len()));
        match len {
            Some(len) => uart.write_all(&out[..len]),
            // Nothing to send or evaluate: sleep until the next sample.
            None if !busy => cortex_m::asm::wfi(),
            None => {}
        }
    }
}

/// Results mode: windows of the node's samples through the model.
#[cfg(feature = "inference")]
mod model {
    use ember_node::model::{CHANNELS, HOP, NodeModel, WINDOW, WINDOW_LEN};
    use ember_node::window::Windower;
    use ember_node_mps2_an386::{clock::Instant, heap};

    pub struct Runner {
        model: NodeModel,
        windows: Windower<CHANNELS, WINDOW>,
        input: [f32; WINDOW_LEN],
    }

    impl Runner {
        /// The compiled-in model; `None` (the node sends samples) if its weights do not load.
        pub fn load() -> Option<Runner> {
            heap::init();
            Some(Runner {
                model: NodeModel::load().ok()?,
                windows: Windower::new(HOP),
                input: [0.0; WINDOW_LEN],
            })
        }

        /// Takes one sample from the node and evaluates the window it completes; `true` if
        /// there was a sample (more may wait).
        pub fn step(&mut self) -> bool {
            let Some(sample) = super::with_node(|n| n.take_sample()) else {
                return false;
            };
            if let Some(span) = self.windows.push(&sample) {
                self.windows.fill(&mut self.input);
                let start = Instant::now();
                let outputs = self.model.infer(&self.input);
                let cycles = start.cycles_until(Instant::now());
                // A backend that returned another shape gives no result; the next window
                // comes as usual (never observed: the shapes are fixed at build).
                if let Some(outputs) = outputs {
                    super::with_node(|n| n.push_result(span, &outputs, cycles));
                }
            }
            true
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
    clock::on_tick();
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
