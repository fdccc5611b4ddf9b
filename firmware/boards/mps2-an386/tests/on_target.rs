//! On-target tests: run on the Cortex-M4F itself (QEMU's mps2-an386 in CI through
//! `qemu-run.py`, a bench board through `probe-rs run`), one boot per test.
#![no_std]
#![no_main]

use core::cell::RefCell;
use core::sync::atomic::{AtomicU32, Ordering};

use cortex_m::interrupt::Mutex;
use cortex_m_rt::exception;
use ember_node::node::{Config, Node};
use ember_node::sensor::ReplayImu;
use ember_node_mps2_an386 as _;
use semihosting as _;

type TestNode = Node<ReplayImu, 64>;

static NODE: Mutex<RefCell<Option<TestNode>>> = Mutex::new(RefCell::new(None));
static TICKS: AtomicU32 = AtomicU32::new(0);

#[exception]
fn SysTick() {
    TICKS.fetch_add(1, Ordering::Relaxed);
    cortex_m::interrupt::free(|cs| {
        if let Some(n) = NODE.borrow(cs).borrow_mut().as_mut() {
            n.tick();
        }
    });
}

#[embedded_test::tests(default_timeout = 20)]
mod tests {
    use super::*;
    use ember_node::link::{self, FrameReader, MAX_FRAME_BYTES, NodeFrame, Pushed};
    use ember_node::ring::Ring;
    use ember_node_mps2_an386::{boot, clock, uart::Uart0};

    /// Decodes what the node writes, as the agent does.
    fn frames_of(node: &mut TestNode, out: &mut [NodeFrame; 70]) -> usize {
        let mut reader = FrameReader::<MAX_FRAME_BYTES>::new();
        let mut buf = [0u8; MAX_FRAME_BYTES];
        let mut n = 0;
        while let Some(bytes) = node.next_frame(&mut buf) {
            let mut copy = [0u8; MAX_FRAME_BYTES];
            copy[..bytes.len()].copy_from_slice(bytes);
            for &b in &copy[..bytes.len()] {
                if let Pushed::Frame(body) = reader.push(b) {
                    out[n] = link::decode(body).expect("the node's frame decodes");
                    n += 1;
                }
            }
        }
        n
    }

    #[test]
    fn frames_encode_and_decode_on_the_target() {
        let mut node: TestNode = Node::new(ReplayImu::new(), 9, Config::default());
        for _ in 0..10 {
            node.tick();
        }
        let mut out = [NodeFrame::Status(Default::default()); 70];
        let n = frames_of(&mut node, &mut out);
        assert_eq!(n, 11);
        assert!(matches!(out[0], NodeFrame::Hello(h) if h.boot == 9 && h.channels == 6));
        for (i, f) in out[1..n].iter().enumerate() {
            let NodeFrame::Sample(s) = f else {
                panic!("expected a sample")
            };
            assert_eq!(
                (s.seq, s.ts_us, s.values.as_slice().len()),
                (i as u32, (i as u64 + 1) * 10_000, 6)
            );
        }
    }

    #[test]
    fn the_ring_drops_the_oldest_and_counts_it() {
        let mut r = Ring::<u32, 4>::new();
        for i in 0..10 {
            r.push(i);
        }
        assert_eq!(r.overruns(), 6);
        assert_eq!((r.pop(), r.len()), (Some(6), 3));
    }

    #[test]
    fn the_boot_counter_advances_by_one() {
        let a = boot::count_boot();
        let b = boot::count_boot();
        assert!(a >= 1);
        assert_eq!(b, a + 1);
    }

    /// SysTick drives the sampling: 50 ticks at 1 kHz give 50 consecutive samples 1 ms apart.
    #[test]
    fn systick_samples_at_the_configured_rate() {
        let config = Config {
            rate_hz: 1000,
            status_every: 0,
            ..Config::default()
        };
        cortex_m::interrupt::free(|cs| {
            NODE.borrow(cs)
                .replace(Some(Node::new(ReplayImu::new(), 1, config)))
        });
        let mut cp = cortex_m::Peripherals::take().expect("first take");
        clock::start(&mut cp.SYST, 1000);
        while TICKS.load(Ordering::Relaxed) < 50 {
            cortex_m::asm::wfi();
        }
        clock::stop(&mut cp.SYST);
        let mut node = cortex_m::interrupt::free(|cs| NODE.borrow(cs).take()).expect("node");
        let status = node.status();
        assert_eq!(status.next_seq, TICKS.load(Ordering::Relaxed));
        assert_eq!(status.uptime_us, status.next_seq as u64 * 1000);
        let mut out = [NodeFrame::Status(Default::default()); 70];
        let n = frames_of(&mut node, &mut out);
        assert_eq!(n as u32, 1 + status.next_seq);
    }

    /// UART0 takes a frame (QEMU's line has no reader in tests: it must not block) and is
    /// handed out once.
    #[test]
    fn uart0_writes_frames_and_is_handed_out_once() {
        let mut uart = Uart0::take(115_200).expect("first take");
        assert!(Uart0::take(115_200).is_none());
        let mut node: TestNode = Node::new(ReplayImu::new(), 1, Config::default());
        node.tick();
        let mut buf = [0u8; MAX_FRAME_BYTES];
        while let Some(f) = node.next_frame(&mut buf) {
            uart.write_all(f);
        }
        assert_eq!(uart.try_read(), None, "nothing was sent to the node");
    }
}
