//! On-target tests of the model on the node (feature `inference`): burn's no_std flex backend
//! on the Cortex-M4F itself, held to the bundle's golden vectors (the outputs the host's
//! `ember_models::LoadedModel` gives for the same windows). One boot per test.
//!
//! Run with `--nocapture` to see the figures docs/hil.md reports (heap peak, cycles per
//! window): `cargo test -p ember-node-mps2-an386 --features inference --test model_on_target
//! -- --nocapture`.
#![no_std]
#![no_main]

use cortex_m_rt::exception;
use ember_node_mps2_an386 as _;
use semihosting as _;

#[exception]
fn SysTick() {
    ember_node_mps2_an386::clock::on_tick();
}

#[embedded_test::tests(default_timeout = 60)]
mod tests {
    use ember_node::link::{self, FrameReader, MAX_FRAME_BYTES, NodeFrame, Pushed};
    use ember_node::model::{self, CHANNELS, HOP, NodeModel, OUTPUTS, WINDOW, WINDOW_LEN, golden};
    use ember_node::node::{Config, Node};
    use ember_node::sensor::ReplayImu;
    use ember_node::window::Windower;
    use ember_node_mps2_an386::clock::{self, Instant, QEMU_INSTRUCTIONS_PER_CYCLE};
    use ember_node_mps2_an386::heap;

    fn max_deviation(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| {
                let d = (x - y).abs();
                if d.is_nan() { f32::INFINITY } else { d }
            })
            .fold(0.0, f32::max)
    }

    /// The golden vectors of the bundle: the node computes what the host computed.
    #[test]
    fn the_model_reproduces_the_golden_vectors_on_the_target() {
        heap::init();
        let model = NodeModel::load().expect("the compiled-in weights load");
        assert!(!golden::INPUTS.is_empty());
        for (i, input) in golden::INPUTS.iter().enumerate() {
            let out = model.infer(input).expect("four probabilities");
            let d = max_deviation(&out, &golden::OUTPUTS[i]);
            semihosting::println!(
                "golden {i} ({}): {:?} expected {:?} max deviation {d:e}",
                golden::NOTES[i],
                out,
                golden::OUTPUTS[i]
            );
            assert!(d <= golden::TOLERANCE, "golden vector {i}: deviation {d:e}");
            assert_eq!(model::argmax(&out), model::argmax(&golden::OUTPUTS[i]));
        }
    }

    /// The node in results mode: 400 replayed samples (the four BasicMotions series) make
    /// windows every `HOP` samples; the windows that are exactly one series are classified as
    /// that series' activity, and the frames on the line are Hello, Model, then results
    /// numbered 0, 1, 2, ... The heap and the time per window are measured on the way.
    #[test]
    fn results_mode_classifies_the_replayed_series_and_numbers_the_results() {
        heap::init();
        let before = heap::used();
        heap::reset_peak();
        let model = NodeModel::load().expect("the compiled-in weights load");
        let loaded = heap::used();
        let load_peak = heap::peak();
        let mut cp = cortex_m::Peripherals::take().expect("first take");
        // The stopwatch runs on SysTick; 10 Hz keeps the interrupts rare.
        clock::start(&mut cp.SYST, 10);
        let config = Config {
            status_every: 0,
            ..Config::default()
        };
        let mut node: Node<ReplayImu, 16> =
            Node::new(ReplayImu::new(), 3, config).with_model(NodeModel::info());
        let mut windows = Windower::<CHANNELS, WINDOW>::new(HOP);
        let mut input = [0.0f32; WINDOW_LEN];
        let (mut min, mut max, mut total, mut n) = (u32::MAX, 0u32, 0u64, 0u32);
        heap::reset_peak();
        let mut classes = [usize::MAX; 8];
        for _ in 0..400 {
            node.tick();
            let sample = node.take_sample().expect("one sample per tick");
            if let Some(span) = windows.push(&sample) {
                windows.fill(&mut input);
                let t0 = Instant::now();
                let out: [f32; OUTPUTS] = model.infer(&input).expect("outputs");
                let cycles = t0.cycles_until(Instant::now());
                (min, max, total, n) = (
                    min.min(cycles),
                    max.max(cycles),
                    total + cycles as u64,
                    n + 1,
                );
                classes[n as usize - 1] = model::argmax(&out);
                node.push_result(span, &out, cycles);
            }
        }
        clock::stop(&mut cp.SYST);
        let infer_peak = heap::peak();
        // Windows end at samples 100, 150, ..., 400: the 1st, 3rd, 5th and 7th are whole series.
        assert_eq!(n, 7);
        assert_eq!(
            [classes[0], classes[2], classes[4], classes[6]],
            [0, 1, 2, 3]
        );
        let q = QEMU_INSTRUCTIONS_PER_CYCLE;
        semihosting::println!(
            "model {} {} ({}): heap before load {before} B, after load {loaded} B, peak during load {load_peak} B, peak during inference {infer_peak} B (arena {} B)",
            model::NAME,
            model::VERSION,
            model::PRECISION,
            heap::HEAP_BYTES
        );
        semihosting::println!(
            "per window ({n} windows): SysTick cycles min {min} mean {} max {max}; QEMU guest instructions (x{q}) min {} mean {} max {}",
            total / n as u64,
            min as u64 * q as u64,
            total / n as u64 * q as u64,
            max as u64 * q as u64
        );

        // The line: Hello, Model, then the seven results in order.
        let mut reader = FrameReader::<MAX_FRAME_BYTES>::new();
        let mut buf = [0u8; MAX_FRAME_BYTES];
        let mut kinds = [0u8; 9];
        let mut k = 0;
        while let Some(bytes) = node.next_frame(&mut buf) {
            let mut copy = [0u8; MAX_FRAME_BYTES];
            copy[..bytes.len()].copy_from_slice(bytes);
            for &b in &copy[..bytes.len()] {
                if let Pushed::Frame(body) = reader.push(b) {
                    kinds[k] = match link::decode::<NodeFrame>(body).expect("decodes") {
                        NodeFrame::Hello(_) => b'h',
                        NodeFrame::Model(m) => {
                            assert_eq!((m.window, m.hop, m.outputs), (100, 50, 4));
                            b'm'
                        }
                        NodeFrame::Result(r) => {
                            assert_eq!(r.seq as usize, k - 2);
                            assert_eq!(r.samples, 100 + 50 * r.seq);
                            assert_eq!(r.outputs.as_slice().len(), OUTPUTS);
                            b'r'
                        }
                        _ => b'?',
                    };
                    k += 1;
                }
            }
        }
        assert_eq!(&kinds, b"hmrrrrrrr");
        assert_eq!(node.status().next_seq, 7);
    }

    /// The stopwatch counts core clock cycles: under QEMU's `-icount shift=0` a loop of a
    /// known number of instructions takes that many instructions / QEMU_INSTRUCTIONS_PER_CYCLE
    /// cycles (this is what makes the figures above instruction counts).
    #[test]
    fn the_stopwatch_counts_guest_instructions_under_icount() {
        let mut cp = cortex_m::Peripherals::take().expect("first take");
        clock::start(&mut cp.SYST, 10);
        let t0 = Instant::now();
        // 4,000,000 iterations of `subs` + `bne`: 8,000,000 instructions.
        let mut n: u32 = 4_000_000;
        // SAFETY: a register-only countdown loop; it touches no memory and no stack.
        unsafe {
            core::arch::asm!("1:", "subs {0}, #1", "bne 1b", inout(reg) n, options(nomem, nostack));
        }
        assert_eq!(n, 0);
        let cycles = t0.cycles_until(Instant::now());
        clock::stop(&mut cp.SYST);
        let instructions = cycles as u64 * QEMU_INSTRUCTIONS_PER_CYCLE as u64;
        semihosting::println!(
            "8,000,000-instruction loop: {cycles} cycles = {instructions} instructions"
        );
        // Within the timer's resolution (40 instructions) and the few around the loop.
        assert!(
            (7_999_000..8_001_000).contains(&instructions),
            "{instructions} instructions"
        );
    }
}
