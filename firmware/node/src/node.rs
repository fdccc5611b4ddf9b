//! The sensor node: takes a sample on every tick of the board's clock, buffers it, and hands the
//! board the next frame to write; applies the host's commands.
//!
//! Lifecycle: `Node::new(boot)` at reset → a [`NodeFrame::Hello`] is the first frame → on every
//! tick one sample gets the next `seq` (from 0 each boot) and enters the [`Ring`] → the board's
//! UART loop takes frames with [`Node::next_frame`]: a status when one is due or asked for,
//! else the oldest sample.
//!
//! Acknowledgements (`ember_proto::node`, link version 2): once the host sent an `Ack` or a
//! `Resume` this boot, a sample written to the line stays in the ring until the host
//! acknowledges it; `Resume` makes every kept sample from the host's position on go out again,
//! after a `Resumed` frame that says where the node starts. A host that never acknowledges gets
//! version 1's behaviour: a written sample leaves the ring.
//!
//! Guarantees (what the host's ledger relies on):
//! - `seq` MUST count every sample taken this boot, written or dropped: the samples the host
//!   never sees are exactly the gaps in `seq`, and the drops the node made are `overruns`.
//! - A sample the host has not acknowledged MUST NOT leave the ring in acknowledged mode other
//!   than by an overrun (the ring full): what a crashed host had not stored comes again.
//! - A command the node cannot decode or accept is counted in `bad_commands` and changes nothing.
//! - No call blocks or allocates; [`Node::tick`] is short enough for an interrupt handler.
//!
//! # Results instead of samples (link version 3)
//! A node built with a model ([`Node::with_model`]) sends one [`NodeFrame::Result`] per window
//! instead of the window's samples: [`Node::tick`] puts each sample on a short queue, the
//! board's main loop takes them ([`Node::take_sample`]) into a [`crate::window::Windower`],
//! runs the model on each full window outside the interrupt, and hands the outputs back
//! ([`Node::push_result`]). Then `seq` numbers results, and the ring, acknowledgements and
//! `Resume` work on results exactly as they do on samples. A [`NodeFrame::Model`] follows every
//! hello. Samples the main loop fell behind on (the short queue full) are counted in `overruns`
//! and restart the window (see `window`).

use ember_proto::node::{
    self as link, FrameError, Hello, HostCommand, LINK_VERSION, MAX_CHANNELS, MAX_FRAME_BYTES,
    ModelInfo, NodeFrame, NodeStatus, ResultFrame, Resumed, SampleFrame, Values,
};

use crate::ring::Ring;
use crate::sensor::Sensor;

/// Samples that wait for the main loop between the sample clock and the model (results mode):
/// 64 are 640 ms at 100 Hz, longer than one inference on the boards measured (docs/hil.md).
pub const PENDING_SAMPLES: usize = 64;

/// What the ring keeps until the host has it: samples, or (results mode) results.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kept {
    Sample(SampleFrame),
    Result(ResultFrame),
}

impl Kept {
    pub fn seq(&self) -> u32 {
        match self {
            Kept::Sample(s) => s.seq,
            Kept::Result(r) => r.seq,
        }
    }

    fn frame(self) -> NodeFrame {
        match self {
            Kept::Sample(s) => NodeFrame::Sample(s),
            Kept::Result(r) => NodeFrame::Result(r),
        }
    }
}

/// One sample taken in results mode, on its way to the model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Taken {
    /// The sample's number this boot (0, 1, ...; results mode numbers results with `seq`).
    pub n: u32,
    pub ts_us: u64,
    pub values: Values,
}

/// A full window, as [`crate::window::Windower`] reports it: enough to number its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSpan {
    pub start_us: u64,
    pub end_us: u64,
    /// Samples taken this boot up to and including the window's last one.
    pub samples: u32,
}

/// What a command asks the board to change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Effect {
    #[default]
    None,
    /// Reprogram the sample clock to tick at this rate.
    Rate(u16),
}

/// Board limits and defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    pub rate_hz: u16,
    pub min_rate_hz: u16,
    pub max_rate_hz: u16,
    /// A status frame follows every this many samples (0: only when asked).
    pub status_every: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            rate_hz: 100,
            min_rate_hz: 1,
            max_rate_hz: link::MAX_RATE_HZ,
            status_every: 1000,
        }
    }
}

/// The node; `N` is the ring's capacity in samples.
pub struct Node<S: Sensor, const N: usize> {
    sensor: S,
    config: Config,
    boot: u32,
    next_seq: u32,
    rate_hz: u16,
    /// Time since boot, advanced by one period per tick.
    now_us: u64,
    /// Sub-microsecond remainder of the period, so that rates like 3 Hz keep exact time.
    now_frac: u64,
    ring: Ring<Kept, N>,
    /// Results mode: the model's identity (sent after every hello) and the samples on their way
    /// to it.
    model: Option<ModelInfo>,
    model_pending: bool,
    pending: Ring<Taken, PENDING_SAMPLES>,
    /// Results mode: samples taken this boot (`next_seq` numbers results there).
    samples: u32,
    frames: u32,
    commands: u32,
    bad_commands: u32,
    sensor_errors: u32,
    hello_pending: bool,
    status_pending: bool,
    /// A `Resumed` answer waits to be sent (before any sample).
    resumed_pending: Option<Resumed>,
    /// The host acknowledges this boot's samples: written samples stay until acknowledged.
    acked_mode: bool,
    since_status: u32,
}

/// `a` comes before `b` in a boot's numbering (which starts at 0 and does not wrap in practice:
/// 2^32 samples at 10 kHz are 5 days; a wrap compares as serial numbers do).
fn seq_before(a: u32, b: u32) -> bool {
    (b.wrapping_sub(a) as i32) > 0
}

impl<S: Sensor, const N: usize> Node<S, N> {
    pub fn new(sensor: S, boot: u32, config: Config) -> Self {
        let rate_hz = config
            .rate_hz
            .clamp(config.min_rate_hz.max(1), config.max_rate_hz);
        Node {
            sensor,
            config,
            boot,
            next_seq: 0,
            rate_hz,
            now_us: 0,
            now_frac: 0,
            ring: Ring::new(),
            model: None,
            model_pending: false,
            pending: Ring::new(),
            samples: 0,
            frames: 0,
            commands: 0,
            bad_commands: 0,
            sensor_errors: 0,
            hello_pending: true,
            status_pending: false,
            resumed_pending: None,
            acked_mode: false,
            since_status: 0,
        }
    }

    /// Results mode: the node evaluates `model` on the node and sends its results instead of
    /// samples (see the module comment).
    pub fn with_model(mut self, model: ModelInfo) -> Self {
        self.model = Some(model);
        self.model_pending = true;
        self
    }

    pub fn boot(&self) -> u32 {
        self.boot
    }

    pub fn rate_hz(&self) -> u16 {
        self.rate_hz
    }

    /// Samples in the ring: waiting for the line, or sent and not acknowledged yet.
    pub fn buffered(&self) -> usize {
        self.ring.len()
    }

    /// One tick of the sample clock: time moves on by one period and one sample is taken.
    pub fn tick(&mut self) {
        self.now_frac += 1_000_000;
        let whole = self.now_frac / self.rate_hz as u64;
        self.now_frac %= self.rate_hz as u64;
        self.now_us += whole;
        let mut buf = [0.0f32; MAX_CHANNELS];
        if self.sensor.read(&mut buf).is_err() {
            // No sample was taken, so no seq is used: nothing is missing at the host.
            self.sensor_errors = self.sensor_errors.wrapping_add(1);
            return;
        }
        let channels = self.sensor.channels().min(MAX_CHANNELS);
        let Some(values) = Values::from_slice(&buf[..channels]) else {
            return; // unreachable: `channels` is capped at MAX_CHANNELS above
        };
        if self.model.is_some() {
            self.pending.push(Taken {
                n: self.samples,
                ts_us: self.now_us,
                values,
            });
            self.samples = self.samples.wrapping_add(1);
            // A status follows every `status_every` results, not samples (`push_result`).
            return;
        }
        self.ring.push(Kept::Sample(SampleFrame {
            boot: self.boot,
            seq: self.next_seq,
            ts_us: self.now_us,
            values,
        }));
        self.next_seq = self.next_seq.wrapping_add(1);
        self.count_for_status();
    }

    fn count_for_status(&mut self) {
        if self.config.status_every > 0 {
            self.since_status += 1;
            if self.since_status >= self.config.status_every {
                self.since_status = 0;
                self.status_pending = true;
            }
        }
    }

    /// Results mode: the oldest sample the main loop has not taken yet.
    pub fn take_sample(&mut self) -> Option<Taken> {
        self.pending.pop()
    }

    /// Results mode: the model's `outputs` for the window `span`, which took `cycles`; numbered
    /// with the next `seq` and kept like a sample. Ignored in samples mode.
    pub fn push_result(&mut self, span: WindowSpan, outputs: &[f32], cycles: u32) {
        if self.model.is_none() {
            return;
        }
        let Some(outputs) = Values::from_slice(outputs) else {
            return; // a model has at most MAX_CHANNELS outputs (checked when it is built)
        };
        self.ring.push(Kept::Result(ResultFrame {
            boot: self.boot,
            seq: self.next_seq,
            window_start_us: span.start_us,
            ts_us: span.end_us,
            samples: span.samples,
            cycles,
            outputs,
        }));
        self.next_seq = self.next_seq.wrapping_add(1);
        self.count_for_status();
    }

    pub fn status(&self) -> NodeStatus {
        NodeStatus {
            boot: self.boot,
            next_seq: self.next_seq,
            rate_hz: self.rate_hz,
            overruns: self.ring.overruns().wrapping_add(self.pending.overruns()),
            frames: self.frames,
            commands: self.commands,
            bad_commands: self.bad_commands,
            uptime_us: self.now_us,
            sensor_errors: self.sensor_errors,
        }
    }

    /// The next frame to write, encoded (delimiter included) into `buf`; `None` when there is
    /// nothing to send.
    pub fn next_frame<'b>(&mut self, buf: &'b mut [u8; MAX_FRAME_BYTES]) -> Option<&'b [u8]> {
        let frame = if self.hello_pending {
            self.hello_pending = false;
            NodeFrame::Hello(Hello {
                version: LINK_VERSION,
                boot: self.boot,
                rate_hz: self.rate_hz,
                channels: self.sensor.channels() as u8,
            })
        } else if let Some(m) = self.model.filter(|_| self.model_pending) {
            self.model_pending = false;
            NodeFrame::Model(m)
        } else if let Some(r) = self.resumed_pending.take() {
            NodeFrame::Resumed(r)
        } else if self.status_pending {
            self.status_pending = false;
            NodeFrame::Status(self.status())
        } else if self.acked_mode {
            self.ring.next_unsent()?.frame()
        } else {
            self.ring.pop()?.frame()
        };
        self.frames = self.frames.wrapping_add(1);
        // MAX_FRAME_BYTES bounds every NodeFrame (ember-proto's tests hold it to that).
        match link::encode(&frame, buf) {
            Ok(bytes) => Some(bytes),
            Err(_) => None,
        }
    }

    /// Applies one decoded command.
    pub fn command(&mut self, cmd: HostCommand) -> Effect {
        match cmd {
            HostCommand::SetRate { hz }
                if (self.config.min_rate_hz..=self.config.max_rate_hz).contains(&hz) && hz > 0 =>
            {
                self.commands = self.commands.wrapping_add(1);
                self.rate_hz = hz;
                self.now_frac = 0;
                self.status_pending = true;
                Effect::Rate(hz)
            }
            HostCommand::SetRate { .. } => {
                self.bad_commands = self.bad_commands.wrapping_add(1);
                Effect::None
            }
            HostCommand::RequestStatus => {
                self.commands = self.commands.wrapping_add(1);
                self.status_pending = true;
                Effect::None
            }
            HostCommand::ResetCounters => {
                self.commands = 0;
                self.bad_commands = 0;
                self.frames = 0;
                self.sensor_errors = 0;
                self.ring.reset_overruns();
                self.pending.reset_overruns();
                self.status_pending = true;
                Effect::None
            }
            HostCommand::Ack { boot, next_seq } => {
                self.commands = self.commands.wrapping_add(1);
                self.acked_mode = true;
                self.release(boot, next_seq);
                Effect::None
            }
            HostCommand::Resume { boot, next_seq } => {
                self.commands = self.commands.wrapping_add(1);
                self.acked_mode = true;
                // Another boot's position (the node reset since): this boot is all unacknowledged.
                self.release(boot, next_seq);
                self.ring.rewind();
                let from_seq = self.ring.front().map_or(self.next_seq, Kept::seq);
                self.resumed_pending = Some(Resumed {
                    boot: self.boot,
                    from_seq,
                });
                Effect::None
            }
        }
    }

    /// Forgets this boot's samples below `next_seq` (the host holds them).
    fn release(&mut self, boot: u32, next_seq: u32) {
        if boot == self.boot {
            self.ring.release_while(|k| seq_before(k.seq(), next_seq));
        }
    }

    /// Decodes and applies one command frame body (as [`link::FrameReader`] yields it).
    pub fn command_frame(&mut self, body: &mut [u8]) -> Result<Effect, FrameError> {
        match link::decode::<HostCommand>(body) {
            Ok(cmd) => Ok(self.command(cmd)),
            Err(e) => {
                self.bad_commands = self.bad_commands.wrapping_add(1);
                Err(e)
            }
        }
    }

    /// Counts a command frame that was refused before decoding (too long for the reader).
    pub fn bad_command(&mut self) {
        self.bad_commands = self.bad_commands.wrapping_add(1);
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::sensor::{ReplayImu, SensorError};
    use link::{FrameReader, Pushed};
    use std::vec::Vec;

    type TestNode = Node<ReplayImu, 8>;

    fn node() -> TestNode {
        Node::new(
            ReplayImu::new(),
            5,
            Config {
                rate_hz: 100,
                status_every: 0,
                ..Config::default()
            },
        )
    }

    /// Drains every frame the node has, decoding them as the host would.
    fn drain<S: Sensor, const N: usize>(n: &mut Node<S, N>) -> Vec<NodeFrame> {
        let mut line = Vec::new();
        let mut buf = [0u8; MAX_FRAME_BYTES];
        while let Some(f) = n.next_frame(&mut buf) {
            line.extend_from_slice(f);
        }
        let mut reader = FrameReader::<MAX_FRAME_BYTES>::new();
        let mut out = Vec::new();
        for b in line {
            if let Pushed::Frame(body) = reader.push(b) {
                out.push(link::decode::<NodeFrame>(body).expect("a good frame"));
            }
        }
        out
    }

    fn seqs(frames: &[NodeFrame]) -> Vec<u32> {
        frames
            .iter()
            .filter_map(|f| match f {
                NodeFrame::Sample(s) => Some(s.seq),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn hello_first_then_samples_in_order_with_node_time() {
        let mut n = node();
        for _ in 0..3 {
            n.tick();
        }
        let frames = drain(&mut n);
        assert!(matches!(
            frames[0],
            NodeFrame::Hello(Hello {
                version: LINK_VERSION,
                boot: 5,
                rate_hz: 100,
                channels: 6
            })
        ));
        let samples: Vec<(u32, u64)> = frames[1..]
            .iter()
            .map(|f| match f {
                NodeFrame::Sample(s) => (s.seq, s.ts_us),
                other => panic!("expected a sample, got {other:?}"),
            })
            .collect();
        assert_eq!(samples, [(0, 10_000), (1, 20_000), (2, 30_000)]);
        assert_eq!(n.status().frames, 4);
    }

    #[test]
    fn a_slow_line_shows_as_gaps_that_equal_the_overruns() {
        let mut n = node();
        for _ in 0..20 {
            n.tick();
        }
        let frames = drain(&mut n);
        // 20 taken, 8 kept: seq 12..20 arrive, 0..12 are the overruns.
        assert_eq!(seqs(&frames), (12..20).collect::<Vec<_>>());
        assert_eq!(n.status().overruns, 12);
        assert_eq!(n.status().next_seq, 20);
    }

    #[test]
    fn rates_keep_exact_time_and_bad_rates_are_refused() {
        let mut n: Node<ReplayImu, 8> = Node::new(
            ReplayImu::new(),
            1,
            Config {
                rate_hz: 3,
                status_every: 0,
                ..Config::default()
            },
        );
        for _ in 0..3 {
            n.tick();
        }
        assert_eq!(
            n.status().uptime_us,
            1_000_000,
            "3 ticks at 3 Hz are one second"
        );
        assert_eq!(n.command(HostCommand::SetRate { hz: 0 }), Effect::None);
        assert_eq!(
            n.command(HostCommand::SetRate {
                hz: link::MAX_RATE_HZ + 1
            }),
            Effect::None
        );
        assert_eq!(n.status().bad_commands, 2);
        assert_eq!(
            n.command(HostCommand::SetRate { hz: 250 }),
            Effect::Rate(250)
        );
        n.tick();
        assert_eq!(n.status().uptime_us, 1_004_000);
        assert_eq!((n.status().rate_hz, n.status().commands), (250, 1));
    }

    #[test]
    fn commands_arrive_as_frames_and_damaged_ones_are_counted() {
        let mut n = node();
        drain(&mut n);
        let mut buf = [0u8; 16];
        let cmd = link::encode(&HostCommand::RequestStatus, &mut buf)
            .expect("fits")
            .to_vec();
        let mut damaged = cmd.clone();
        damaged[1] ^= 0x10;
        let mut reader = FrameReader::<16>::new();
        let mut results = Vec::new();
        for b in damaged.into_iter().chain(cmd) {
            if let Pushed::Frame(body) = reader.push(b) {
                results.push(n.command_frame(body));
            }
        }
        assert!(results[0].is_err());
        assert_eq!(results[1], Ok(Effect::None));
        let frames = drain(&mut n);
        let NodeFrame::Status(s) = frames[0] else {
            panic!("expected a status, got {frames:?}")
        };
        assert_eq!((s.commands, s.bad_commands, s.boot), (1, 1, 5));
    }

    #[test]
    fn periodic_status_and_reset_counters() {
        let mut n: Node<ReplayImu, 64> = Node::new(
            ReplayImu::new(),
            2,
            Config {
                status_every: 10,
                ..Config::default()
            },
        );
        for _ in 0..25 {
            n.tick();
        }
        let frames = drain(&mut n);
        let statuses = frames
            .iter()
            .filter(|f| matches!(f, NodeFrame::Status(_)))
            .count();
        assert_eq!(
            statuses, 1,
            "the pending status is sent once, before the buffered samples: {frames:?}"
        );
        assert_eq!(seqs(&frames), (0..25).collect::<Vec<_>>());
        for _ in 0..70 {
            n.tick();
        }
        n.command(HostCommand::ResetCounters);
        let s = n.status();
        assert_eq!(
            (s.overruns, s.frames, s.next_seq),
            (0, 0, 95),
            "seq is never reset"
        );
    }

    fn ack(n: &mut TestNode, cmd: HostCommand) {
        assert_eq!(n.command(cmd), Effect::None);
    }

    #[test]
    fn acknowledged_mode_keeps_written_samples_until_acked_and_resends_on_resume() {
        let mut n = node();
        ack(
            &mut n,
            HostCommand::Ack {
                boot: 5,
                next_seq: 0,
            },
        );
        for _ in 0..6 {
            n.tick();
        }
        assert_eq!(seqs(&drain(&mut n)), [0, 1, 2, 3, 4, 5]);
        assert_eq!(n.buffered(), 6, "written, not acknowledged: kept");
        ack(
            &mut n,
            HostCommand::Ack {
                boot: 5,
                next_seq: 2,
            },
        );
        assert_eq!(n.buffered(), 4);
        // Another boot's ack changes nothing.
        ack(
            &mut n,
            HostCommand::Ack {
                boot: 4,
                next_seq: 6,
            },
        );
        assert_eq!(n.buffered(), 4);
        // The host crashed having stored 0..=3: it resumes at 4.
        ack(
            &mut n,
            HostCommand::Resume {
                boot: 5,
                next_seq: 4,
            },
        );
        n.tick();
        let frames = drain(&mut n);
        assert_eq!(
            frames[0],
            NodeFrame::Resumed(Resumed {
                boot: 5,
                from_seq: 4
            }),
            "{frames:?}"
        );
        assert_eq!(seqs(&frames), [4, 5, 6]);
        // Overrun while kept: the ring (8) holds 4..=6 sent and 7.. new; the oldest sent go
        // first (not overruns), then unsent ones (overruns).
        for _ in 0..10 {
            n.tick();
        }
        assert_eq!(
            n.status().overruns,
            2,
            "5 free slots, then 3 sent ones made room without an overrun, then 2 unsent went"
        );
        assert_eq!(seqs(&drain(&mut n)), (9..17).collect::<Vec<_>>());
    }

    #[test]
    fn a_resume_for_another_boot_resends_everything_kept() {
        let mut n = node();
        for _ in 0..3 {
            n.tick();
        }
        ack(
            &mut n,
            HostCommand::Resume {
                boot: 4,
                next_seq: 100,
            },
        );
        let frames = drain(&mut n);
        assert!(matches!(frames[0], NodeFrame::Hello(_)));
        assert_eq!(
            frames[1],
            NodeFrame::Resumed(Resumed {
                boot: 5,
                from_seq: 0
            })
        );
        assert_eq!(seqs(&frames), [0, 1, 2]);
        // Nothing kept and nothing new: resumes at the next seq.
        ack(
            &mut n,
            HostCommand::Ack {
                boot: 5,
                next_seq: 3,
            },
        );
        ack(
            &mut n,
            HostCommand::Resume {
                boot: 5,
                next_seq: 3,
            },
        );
        assert_eq!(
            drain(&mut n),
            [NodeFrame::Resumed(Resumed {
                boot: 5,
                from_seq: 3
            })]
        );
    }

    fn info() -> ModelInfo {
        ModelInfo {
            weights_sha256: 0x0d17_37de_4d3a_1a5c,
            window: 4,
            hop: 2,
            outputs: 2,
        }
    }

    #[test]
    fn results_mode_numbers_results_keeps_them_and_announces_the_model() {
        use crate::window::Windower;
        let mut n = node().with_model(info());
        let mut w = Windower::<6, 4>::new(2);
        ack(
            &mut n,
            HostCommand::Ack {
                boot: 5,
                next_seq: 0,
            },
        );
        for _ in 0..8 {
            n.tick();
            let s = n.take_sample().expect("each tick queues one sample");
            if let Some(span) = w.push(&s) {
                n.push_result(span, &[s.n as f32, 0.5], 1234);
            }
        }
        assert_eq!(n.take_sample(), None);
        let frames = drain(&mut n);
        assert!(matches!(frames[0], NodeFrame::Hello(_)));
        assert_eq!(frames[1], NodeFrame::Model(info()));
        let results: Vec<ResultFrame> = frames[2..]
            .iter()
            .map(|f| match f {
                NodeFrame::Result(r) => *r,
                other => panic!("expected a result, got {other:?}"),
            })
            .collect();
        // Windows end at samples 3, 5, 7 (numbered from 0): results 0, 1, 2.
        assert_eq!(
            results
                .iter()
                .map(|r| (r.seq, r.samples, r.outputs.as_slice()[0]))
                .collect::<Vec<_>>(),
            [(0, 4, 3.0), (1, 6, 5.0), (2, 8, 7.0)]
        );
        assert_eq!(
            (
                results[0].window_start_us,
                results[0].ts_us,
                results[0].cycles
            ),
            (10_000, 40_000, 1234)
        );
        assert_eq!(n.status().next_seq, 3, "seq numbers results");
        // Kept until acknowledged, resent on Resume, like samples.
        assert_eq!(n.buffered(), 3);
        ack(
            &mut n,
            HostCommand::Resume {
                boot: 5,
                next_seq: 1,
            },
        );
        let again = drain(&mut n);
        assert_eq!(
            again[0],
            NodeFrame::Resumed(Resumed {
                boot: 5,
                from_seq: 1
            })
        );
        assert_eq!(
            again[1..],
            [NodeFrame::Result(results[1]), NodeFrame::Result(results[2])]
        );
    }

    #[test]
    fn results_mode_counts_samples_the_main_loop_fell_behind_on() {
        let mut n = node().with_model(info());
        for _ in 0..(PENDING_SAMPLES + 5) {
            n.tick();
        }
        assert_eq!(n.status().overruns, 5);
        assert_eq!(
            n.take_sample().map(|s| s.n),
            Some(5),
            "the oldest were dropped"
        );
        // A node without a model ignores results.
        let mut plain = node();
        plain.push_result(
            WindowSpan {
                start_us: 0,
                end_us: 0,
                samples: 1,
            },
            &[1.0],
            1,
        );
        assert_eq!((plain.status().next_seq, plain.buffered()), (0, 0));
    }

    struct Flaky(u32);
    impl Sensor for Flaky {
        fn channels(&self) -> usize {
            2
        }
        fn read(&mut self, out: &mut [f32; MAX_CHANNELS]) -> Result<(), SensorError> {
            self.0 += 1;
            out[0] = self.0 as f32;
            if self.0.is_multiple_of(3) {
                Err(SensorError)
            } else {
                Ok(())
            }
        }
    }

    #[test]
    fn a_failed_read_takes_no_sequence_number() {
        let mut n: Node<Flaky, 16> = Node::new(Flaky(0), 1, Config::default());
        for _ in 0..9 {
            n.tick();
        }
        let frames = drain(&mut n);
        assert_eq!(seqs(&frames), (0..6).collect::<Vec<_>>());
        assert_eq!(n.status().sensor_errors, 3);
    }
}
