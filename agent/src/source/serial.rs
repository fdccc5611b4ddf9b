//! A sensor node on a serial line: frames of `ember_proto::node` (postcard + COBS + CRC-32C)
//! from a tty (`/dev/ttyACM0`, a pty) or a raw TCP serial server (`tcp:HOST:PORT`: QEMU's
//! `-serial tcp:...`, ser2net), turned into samples of one stream.
//!
//! Two parts: [`Link`], the pure accounting of what arrives (no I/O, unit-tested byte by byte),
//! and [`run`], which opens the line, feeds the link, sends the node its commands and reopens
//! the line when it fails or disappears.
//!
//! # The ledger
//! The node numbers every sample it takes (`seq`, from 0 each boot; see `ember_proto::node`).
//! For every sample numbered after the first one this source saw, exactly one of these holds:
//! it was passed on (then the stream's [`Guard`] admits it, or refuses and counts it as any
//! source's sample), or it is counted in `input_rejected_total` as
//! - `corrupt`: it arrived damaged: a frame refused whole (bad CRC or COBS, too long) stood in
//!   its place. Damaged frames are counted in `serial_frames_refused_total` as they arrive and
//!   resolved into samples when the next good sample shows how many were skipped;
//! - `gap`: it never arrived (the node's buffer overran, the line dropped it, or the node reset
//!   with it buffered: the last status of the old boot says how many it had numbered).
//!
//! So `captured + rejected` equals the samples the node numbered, which the fleet's ledger
//! reconciles (the counters travel in the agent's status). A sample numbered before the first
//! one this source saw (the agent started while the node was running) is not counted: it is
//! another run's (see docs/hil.md for what that means after an agent crash).
//!
//! # Reboots
//! A new `boot` (in a hello, status or sample), or a `seq` that goes back within the same boot
//! (a node whose boot counter was lost), starts a new numbering from 0; it is counted in
//! `serial_node_reboots_total` and logged. Nothing of the old boot is counted twice: its tail is
//! settled from its last status before the new numbering starts.
//!
//! # Acknowledgements: nothing acknowledged is lost
//! Each sample carries its node position (`boot << 32 | seq`) as [`Sample::origin`]; the queue
//! stores the latest one with the stream in the same atomic batch as the record
//! ([`DurableOrigin`]). Every [`ACK_EVERY`] the source sends the node `Ack` for what is durable,
//! and the node (link version 2) keeps every sample it sent until then. When the line opens the
//! source sends `Resume` with its position (at start: the queue's durable one, so after a crash
//! or SIGKILL it is exactly what was stored); the node answers `Resumed` and sends again what
//! it kept. Until the answer comes, samples are not passed on (they come again); a `Resume`
//! that stays unanswered is sent again every [`RESUME_RETRY`]. So the ledger stays exact
//! across agent restarts: a sample is stored once, or the node no longer had it (a gap).
//!
//! # Timestamps
//! `timestamps = "node"` (default): the node's capture time (µs since its boot) placed on the
//! agent's clock at the first frame of each boot, so the node's spacing is exact (the two
//! clocks drift apart by the node's crystal error). `"agent"`: the agent's clock on arrival.
//!
//! # Results from a node's own model (link version 3)
//! A node built with a model (firmware feature `inference`) sends one result per window instead
//! of samples, numbered as samples are. The source passes each result on as a sample of its
//! stream whose values are the model's outputs (class probabilities in the model's label order,
//! or `[score]`), stamped with the window's last sample, with the same ledger, acknowledgements
//! and `Resume` as samples: the stream then holds the node's results exactly once each. The
//! node names its model's weights (`Model`, after every hello); the source logs it.
//!
//! **Invariant:** malformed input never stops the source: a damaged frame is counted and the
//! reader resynchronizes at the next COBS delimiter; a line that fails is reopened with
//! backoff until shutdown.

use std::io::{self, Read as _, Write as _};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use ember_proto::node::{
    self as link, FrameError, FrameReader, HostCommand, LINK_VERSION, MAX_FRAME_BYTES,
    MIN_LINK_VERSION, ModelInfo, NodeFrame, Pushed, ResultFrame, Resumed, SampleFrame,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::schema::Guard;
use super::sim::{send, should_warn};
use super::{DurableOrigin, Sample, SourceError, now_us};
use crate::config::{SerialDevice, SerialTimestamps};
use crate::metrics::Metrics;

/// The first wait before reopening a failed line; doubled up to [`MAX_REOPEN_BACKOFF`].
pub const REOPEN_BACKOFF: Duration = Duration::from_millis(100);
pub const MAX_REOPEN_BACKOFF: Duration = Duration::from_secs(5);
/// How often the source tells the node what is durably queued.
pub const ACK_EVERY: Duration = Duration::from_millis(50);
/// A `Resume` the node has not answered within this long is sent again (lost on the line).
pub const RESUME_RETRY: Duration = Duration::from_secs(1);
/// After this many unanswered `Resume`s the node is taken for one that does not resume (link
/// version 1): samples flow again, and what was held back counts as gaps.
pub const RESUME_TRIES: u32 = 3;
/// How long a blocking tty read waits before it looks at shutdown again.
const TTY_POLL: Duration = Duration::from_millis(100);

/// What the link knows of the node's current boot.
#[derive(Debug, Clone, Copy)]
struct Boot {
    id: u32,
    /// The next `seq` expected; `None` until the first sample of this boot this source saw.
    expected: Option<u32>,
    /// The node's own `next_seq` from its latest status this boot.
    numbered: Option<u32>,
    /// (node µs, agent µs) at the first frame of this boot: the node-clock anchor.
    anchor: Option<(u64, u64)>,
}

/// The pure accounting of one serial link (see the module comment for the ledger).
pub struct Link {
    stream: Arc<str>,
    timestamps: SerialTimestamps,
    metrics: Arc<Metrics>,
    reader: FrameReader<MAX_FRAME_BYTES>,
    boot: Option<Boot>,
    /// Frames refused since the last good sample: the samples among them are resolved at the
    /// next good sample.
    refused_pending: u64,
    refused: u64,
    /// A node on another link version is reported once.
    version_warned: bool,
    /// The model a results-sending node announced last (logged when it changes).
    model: Option<ModelInfo>,
    /// The latest timestamp handed out: a new boot's clock is anchored no earlier, so the
    /// stream's time never goes back at a reboot.
    last_ts: u64,
    /// A `Resume` is unanswered: samples are held back (the node sends them again).
    resuming: bool,
    /// After a repeated `Resume`, the node resends samples already passed on: those of this
    /// boot below this seq are duplicates and are dropped.
    skip_below: Option<(u32, u32)>,
}

/// A sample's node position as a [`Sample::origin`].
pub fn origin(boot: u32, seq: u32) -> u64 {
    (u64::from(boot) << 32) | u64::from(seq)
}

/// (boot, seq) of a [`Sample::origin`].
pub fn position(origin: u64) -> (u32, u32) {
    ((origin >> 32) as u32, origin as u32)
}

/// `a` comes before `b` in one boot's numbering (serial-number order).
fn seq_before(a: u32, b: u32) -> bool {
    (b.wrapping_sub(a) as i32) > 0
}

impl Link {
    pub fn new(stream: Arc<str>, timestamps: SerialTimestamps, metrics: Arc<Metrics>) -> Link {
        Link {
            stream,
            timestamps,
            metrics,
            reader: FrameReader::new(),
            boot: None,
            refused_pending: 0,
            refused: 0,
            version_warned: false,
            model: None,
            last_ts: 0,
            resuming: false,
            skip_below: None,
        }
    }

    /// Starts from a durably queued position (`origin` of the stream's latest stored sample):
    /// the next sample expected is the one after it.
    pub fn restore(&mut self, origin: u64) {
        let (id, seq) = position(origin);
        tracing::info!(stream = %self.stream, boot = id, seq, "Resuming the serial node's stream after its last stored sample.");
        self.boot = Some(Boot {
            id,
            expected: Some(seq.wrapping_add(1)),
            numbered: None,
            anchor: None,
        });
    }

    /// The `Resume` to send when the line opens (none before the first sample ever seen); from
    /// then on samples wait for the node's `Resumed`.
    pub fn resume(&mut self) -> Option<HostCommand> {
        let b = self.boot?;
        let next_seq = b.expected?;
        self.resuming = true;
        Some(HostCommand::Resume {
            boot: b.id,
            next_seq,
        })
    }

    /// Whether a `Resume` is still unanswered.
    pub fn is_resuming(&self) -> bool {
        self.resuming
    }

    /// Stops waiting for `Resumed` (a node that does not resume).
    pub fn give_up_resume(&mut self) {
        if self.resuming {
            self.resuming = false;
            tracing::warn!(stream = %self.stream, "The serial node does not answer Resume (link version 1 firmware?): taking its samples as they come; what it does not send again counts as gaps.");
        }
    }

    /// The line was reopened: a partial frame from before is worthless (it counts as one
    /// refused frame if it was part of one), the node's numbering carries on.
    pub fn reopened(&mut self) {
        if self.reader.is_mid_frame() {
            self.refuse(FrameError::Cobs);
        }
        self.reader.clear();
    }

    /// Feeds bytes from the line; good samples go to `out` (stamped at `now_us` as needed).
    pub fn push(&mut self, bytes: &[u8], now_us: u64, out: &mut Vec<Sample>) {
        for &b in bytes {
            match self.reader.push(b) {
                Pushed::More => {}
                Pushed::TooLong => self.refuse(FrameError::TooLong),
                Pushed::Frame(body) => match link::decode::<NodeFrame>(body) {
                    Ok(frame) => self.frame(frame, now_us, out),
                    Err(e) => self.refuse(e),
                },
            }
        }
    }

    fn refuse(&mut self, e: FrameError) {
        self.metrics.serial_frames_refused.fetch_add(1, Relaxed);
        self.refused_pending += 1;
        self.refused += 1;
        if should_warn(self.refused) {
            tracing::warn!(stream = %self.stream, reason = e.as_str(), refused = self.refused, "Refused a frame from the serial node: {e}.");
        }
    }

    fn frame(&mut self, frame: NodeFrame, now_us: u64, out: &mut Vec<Sample>) {
        match frame {
            NodeFrame::Hello(h) => {
                if !(MIN_LINK_VERSION..=LINK_VERSION).contains(&h.version) && !self.version_warned {
                    self.version_warned = true;
                    tracing::error!(stream = %self.stream, node = h.version, agent = LINK_VERSION, oldest = MIN_LINK_VERSION, "The serial node speaks another link version: update the node's firmware or the agent.");
                }
                // A hello is the first frame of a boot: its numbering starts at 0.
                self.enter_boot(h.boot, now_us, Some(0), 0);
            }
            NodeFrame::Status(s) => {
                self.enter_boot(s.boot, now_us, None, s.uptime_us);
                if let Some(b) = self.boot.as_mut() {
                    b.numbered = Some(b.numbered.map_or(s.next_seq, |n| n.max(s.next_seq)));
                }
            }
            NodeFrame::Sample(s) => self.sample(s, now_us, out),
            NodeFrame::Resumed(r) => self.resumed(r, now_us),
            NodeFrame::Result(r) => self.sample(result_as_sample(r), now_us, out),
            NodeFrame::Model(m) => {
                if self.model != Some(m) {
                    self.model = Some(m);
                    tracing::info!(stream = %self.stream, weights_sha256 = %format!("{:016x}", m.weights_sha256), window = m.window, hop = m.hop, outputs = m.outputs, "The serial node runs a model: its stream carries one result per window.");
                }
            }
        }
    }

    /// The node's answer to `Resume`: it sends again from `from_seq` of `boot`.
    fn resumed(&mut self, r: Resumed, now_us: u64) {
        self.resuming = false;
        match self.boot {
            Some(b) if b.id == r.boot => {
                if let Some(e) = b.expected
                    && seq_before(r.from_seq, e)
                {
                    // An answer to a repeated Resume: what comes until `e` was passed on.
                    self.skip_below = Some((r.boot, e));
                }
                // from_seq after `e`: the node no longer holds e..from_seq; the next sample
                // counts them as gaps.
            }
            _ => {
                // The node reset since the position resumed from: a new numbering from 0.
                self.enter_boot(r.boot, now_us, Some(0), 0);
                if let Some(b) = self.boot.as_mut() {
                    b.anchor = None;
                }
            }
        }
        tracing::info!(stream = %self.stream, boot = r.boot, from_seq = r.from_seq, "The serial node resumed its stream.");
    }

    /// Makes `id` the current boot. `start`: the seq its numbering is known to start at (a
    /// hello says 0); `node_us`: the node's clock now, for the timestamp anchor.
    fn enter_boot(&mut self, id: u32, now_us: u64, start: Option<u32>, node_us: u64) {
        match self.boot {
            Some(b) if b.id == id => {}
            Some(old) => {
                self.settle_tail(&old);
                self.metrics.serial_node_reboots.fetch_add(1, Relaxed);
                tracing::info!(stream = %self.stream, old_boot = old.id, boot = id, "The serial node rebooted.");
                self.boot = Some(Boot {
                    id,
                    expected: Some(start.unwrap_or(0)),
                    numbered: None,
                    anchor: Some((node_us, now_us.max(self.last_ts))),
                });
            }
            None => {
                tracing::info!(stream = %self.stream, boot = id, "Receiving from the serial node.");
                self.boot = Some(Boot {
                    id,
                    expected: start,
                    numbered: None,
                    anchor: Some((node_us, now_us)),
                });
            }
        }
    }

    /// The old boot's samples numbered after the last one that arrived never will: gaps.
    fn settle_tail(&mut self, old: &Boot) {
        if let (Some(expected), Some(numbered)) = (old.expected, old.numbered)
            && numbered > expected
        {
            self.lost(u64::from(numbered - expected));
        }
        self.refused_pending = 0;
    }

    /// Counts `n` samples that did not arrive: as many as the refused frames could have
    /// carried are `corrupt`, the rest `gap`.
    fn lost(&mut self, n: u64) {
        let corrupt = n.min(self.refused_pending);
        Metrics::add(&self.metrics.rejected_corrupt, corrupt);
        Metrics::add(&self.metrics.rejected_gap, n - corrupt);
        Metrics::add(&self.metrics.rejected, n);
        if n > 0 {
            tracing::debug!(stream = %self.stream, missing = n, corrupt, "Samples of the serial node are missing.");
        }
    }

    fn sample(&mut self, s: SampleFrame, now_us: u64, out: &mut Vec<Sample>) {
        if self.resuming {
            return;
        }
        if let Some((boot, below)) = self.skip_below {
            if boot == s.boot && seq_before(s.seq, below) {
                tracing::debug!(stream = %self.stream, seq = s.seq, "Dropped a sample the serial node sent again.");
                return;
            }
            self.skip_below = None;
        }
        // A seq behind the expected one in the same boot: the node restarted its numbering
        // without a new boot number (its RAM was lost).
        let restarted =
            matches!(self.boot, Some(b) if b.id == s.boot && b.expected.is_some_and(|e| s.seq < e));
        if restarted {
            tracing::warn!(stream = %self.stream, boot = s.boot, seq = s.seq, "The serial node's numbering went back without a new boot number: treating it as a reboot.");
            if let Some(old) = self.boot.take() {
                self.settle_tail(&old);
            }
            self.metrics.serial_node_reboots.fetch_add(1, Relaxed);
            self.boot = Some(Boot {
                id: s.boot,
                expected: Some(0),
                numbered: None,
                anchor: Some((s.ts_us, now_us.max(self.last_ts))),
            });
        } else {
            self.enter_boot(s.boot, now_us, None, s.ts_us);
        }
        let Some(boot) = self.boot.as_mut() else {
            return;
        };
        let missing = boot.expected.map_or(0, |e| s.seq.saturating_sub(e));
        boot.expected = Some(s.seq.wrapping_add(1));
        let anchor = *boot.anchor.get_or_insert((s.ts_us, now_us));
        self.lost(u64::from(missing));
        self.refused_pending = 0;
        let ts_us = match self.timestamps {
            SerialTimestamps::Agent => now_us,
            SerialTimestamps::Node => anchor.1.saturating_add(s.ts_us.saturating_sub(anchor.0)),
        };
        self.last_ts = self.last_ts.max(ts_us);
        out.push(Sample {
            stream: self.stream.clone(),
            ts_us,
            values: s.values.as_slice().to_vec(),
            origin: Some(origin(s.boot, s.seq)),
        });
    }
}

/// A result passes through the ledger as a sample of its position whose values are the
/// model's outputs, stamped with the window's last sample.
fn result_as_sample(r: ResultFrame) -> SampleFrame {
    SampleFrame {
        boot: r.boot,
        seq: r.seq,
        ts_us: r.ts_us,
        values: r.outputs,
    }
}

/// An open line to the node.
enum Line {
    /// A tty read by a blocking thread (serialport reads with a timeout), handing chunks over
    /// a bounded channel; writes go through a second handle of the same port.
    Tty {
        chunks: mpsc::Receiver<io::Result<Vec<u8>>>,
        writer: Box<dyn serialport::SerialPort>,
        stop: Arc<AtomicBool>,
    },
    Tcp(TcpStream),
}

impl Drop for Line {
    fn drop(&mut self) {
        if let Line::Tty { stop, .. } = self {
            stop.store(true, Relaxed);
        }
    }
}

impl Line {
    async fn open(device: &SerialDevice, baud: u32) -> io::Result<Line> {
        match device {
            SerialDevice::Tcp(addr) => {
                let s = TcpStream::connect(addr.as_str()).await?;
                s.set_nodelay(true)?;
                Ok(Line::Tcp(s))
            }
            SerialDevice::Tty(path) => {
                let path = path.clone();
                let (reader, writer) = tokio::task::spawn_blocking(move || open_tty(&path, baud))
                    .await
                    .map_err(io::Error::other)??;
                let (tx, chunks) = mpsc::channel(64);
                let stop = Arc::new(AtomicBool::new(false));
                let flag = stop.clone();
                std::thread::Builder::new()
                    .name("ember-serial".into())
                    .spawn(move || read_tty(reader, tx, flag))?;
                Ok(Line::Tty {
                    chunks,
                    writer,
                    stop,
                })
            }
        }
    }

    /// The next bytes; an error or `Ok(empty)` (end of stream) means the line is gone.
    async fn read(&mut self, buf: &mut Vec<u8>) -> io::Result<()> {
        buf.clear();
        match self {
            Line::Tcp(s) => {
                buf.resize(4096, 0);
                let n = s.read(buf).await?;
                buf.truncate(n);
                Ok(())
            }
            Line::Tty { chunks, .. } => match chunks.recv().await {
                Some(Ok(chunk)) => {
                    *buf = chunk;
                    Ok(())
                }
                Some(Err(e)) => Err(e),
                None => Ok(()),
            },
        }
    }

    async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Line::Tcp(s) => s.write_all(bytes).await,
            Line::Tty { writer, .. } => {
                // Commands are a few bytes: the tty takes them without blocking for long.
                writer.write_all(bytes)?;
                writer.flush()
            }
        }
    }
}

fn open_tty(
    path: &std::path::Path,
    baud: u32,
) -> io::Result<(
    Box<dyn serialport::SerialPort>,
    Box<dyn serialport::SerialPort>,
)> {
    let name = path.to_string_lossy();
    let port = serialport::new(name.as_ref(), baud)
        .timeout(TTY_POLL)
        .open()
        .map_err(io::Error::from)?;
    let writer = port.try_clone().map_err(io::Error::from)?;
    Ok((port, writer))
}

fn read_tty(
    mut port: Box<dyn serialport::SerialPort>,
    tx: mpsc::Sender<io::Result<Vec<u8>>>,
    stop: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 4096];
    while !stop.load(Relaxed) {
        match port.read(&mut buf) {
            Ok(0) => {
                let _ = tx.blocking_send(Ok(Vec::new()));
                return;
            }
            Ok(n) => {
                if tx.blocking_send(Ok(buf[..n].to_vec())).is_err() {
                    return;
                }
            }
            Err(e)
                if e.kind() == io::ErrorKind::TimedOut
                    || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        }
    }
}

/// The serial source's settings (from `SourceSettings::Serial`).
#[derive(Debug, Clone)]
pub struct Serial {
    pub device: SerialDevice,
    pub baud: u32,
    pub timestamps: SerialTimestamps,
    pub rate_hz: Option<u16>,
}

impl Serial {
    fn describe(&self) -> String {
        match &self.device {
            SerialDevice::Tty(p) => p.display().to_string(),
            SerialDevice::Tcp(a) => format!("tcp:{a}"),
        }
    }
}

/// Reads the node until `shutdown` fires or the receiver closes, reopening the line whenever
/// it fails (with backoff: [`REOPEN_BACKOFF`] doubling to [`MAX_REOPEN_BACKOFF`]).
pub async fn run(
    stream: Arc<str>,
    serial: Serial,
    mut guard: Guard,
    durable: Arc<dyn DurableOrigin>,
    tx: mpsc::Sender<Sample>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), SourceError> {
    let device = serial.describe();
    let span = tracing::info_span!("source", kind = "serial", stream = %stream, device = %device);
    async move {
        let mut link = Link::new(stream.clone(), serial.timestamps, metrics.clone());
        if let Some(o) = durable.durable_origin(&stream) {
            link.restore(o);
        }
        let mut acked = None;
        let mut backoff = REOPEN_BACKOFF;
        let mut opened_before = false;
        let mut failures = 0u64;
        let mut buf = Vec::with_capacity(4096);
        let mut samples = Vec::new();
        loop {
            let opened = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = tx.closed() => break,
                o = Line::open(&serial.device, serial.baud) => o,
            };
            let mut line = match opened {
                Ok(line) => line,
                Err(e) => {
                    failures += 1;
                    if should_warn(failures) {
                        tracing::warn!(error = %e, retry_ms = backoff.as_millis() as u64, "Cannot open the serial line; retrying.");
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_REOPEN_BACKOFF);
                    continue;
                }
            };
            if opened_before {
                metrics.serial_reopens.fetch_add(1, Relaxed);
            }
            opened_before = true;
            link.reopened();
            tracing::info!("Serial line open.");
            let resume = link.resume();
            if let Err(e) = greet(&mut line, serial.rate_hz, resume).await {
                tracing::warn!(error = %e, "Could not send the serial node its commands; reopening.");
                continue;
            }
            let mut resume_sent = (tokio::time::Instant::now(), 1u32);
            let mut tick = tokio::time::interval(ACK_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // Read until the line fails; a good read resets the backoff.
            let ended = loop {
                let read = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break None,
                    _ = tick.tick() => {
                        match acknowledge(&mut line, &mut link, &*durable, &stream, &mut acked, &mut resume_sent).await {
                            Ok(()) => continue,
                            Err(e) => break Some(e.to_string()),
                        }
                    }
                    r = line.read(&mut buf) => r,
                };
                match read {
                    Ok(()) if buf.is_empty() => break Some("the line closed".to_string()),
                    Ok(()) => {
                        backoff = REOPEN_BACKOFF;
                        link.push(&buf, now_us(), &mut samples);
                        for sample in samples.drain(..) {
                            if guard.admit(&sample).is_err() {
                                continue;
                            }
                            if !send(&tx, sample, &shutdown).await {
                                return Ok(());
                            }
                            metrics.captured.fetch_add(1, Relaxed);
                        }
                    }
                    Err(e) => break Some(e.to_string()),
                }
            };
            let Some(why) = ended else { break };
            tracing::warn!(reason = %why, retry_ms = backoff.as_millis() as u64, "The serial line failed; reopening.");
            drop(line);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_REOPEN_BACKOFF);
        }
        tracing::info!("Serial source stopped.");
        Ok(())
    }
    .instrument(span)
    .await
}

/// On every open: the configured rate, the position to resume from (if any), then a status
/// request (its answer tells the link how far the node's numbering has gone).
async fn greet(
    line: &mut Line,
    rate_hz: Option<u16>,
    resume: Option<HostCommand>,
) -> io::Result<()> {
    let mut buf = [0u8; 32];
    // A delimiter first ends whatever partial frame the node's reader holds.
    line.write_all(&[0]).await?;
    if let Some(hz) = rate_hz {
        line.write_all(encode_command(HostCommand::SetRate { hz }, &mut buf)?)
            .await?;
    }
    if let Some(cmd) = resume {
        line.write_all(encode_command(cmd, &mut buf)?).await?;
    }
    line.write_all(encode_command(HostCommand::RequestStatus, &mut buf)?)
        .await
}

/// On every [`ACK_EVERY`]: `Ack` what became durable since the last one; `Resume` again if the
/// node has not answered the last one within [`RESUME_RETRY`] (up to [`RESUME_TRIES`] times).
async fn acknowledge(
    line: &mut Line,
    link: &mut Link,
    durable: &dyn DurableOrigin,
    stream: &str,
    acked: &mut Option<u64>,
    resume_sent: &mut (tokio::time::Instant, u32),
) -> io::Result<()> {
    let mut buf = [0u8; 32];
    if let Some(o) = durable.durable_origin(stream)
        && *acked != Some(o)
    {
        let (boot, seq) = position(o);
        let cmd = HostCommand::Ack {
            boot,
            next_seq: seq.wrapping_add(1),
        };
        line.write_all(encode_command(cmd, &mut buf)?).await?;
        *acked = Some(o);
    }
    if link.is_resuming() && resume_sent.0.elapsed() >= RESUME_RETRY {
        if resume_sent.1 >= RESUME_TRIES {
            link.give_up_resume();
        } else if let Some(b) = link.boot
            && let Some(next_seq) = b.expected
        {
            let cmd = HostCommand::Resume {
                boot: b.id,
                next_seq,
            };
            line.write_all(encode_command(cmd, &mut buf)?).await?;
        }
        *resume_sent = (tokio::time::Instant::now(), resume_sent.1 + 1);
    }
    Ok(())
}

fn encode_command(cmd: HostCommand, buf: &mut [u8; 32]) -> io::Result<&[u8]> {
    link::encode(&cmd, buf)
        .map(|b| &*b)
        .map_err(|e| io::Error::other(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_proto::node::{Hello, NodeStatus, Values};
    use proptest::prelude::*;
    use std::sync::atomic::Ordering::Relaxed;

    fn metrics() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    fn link(m: &Arc<Metrics>, ts: SerialTimestamps) -> Link {
        Link::new("imu".into(), ts, m.clone())
    }

    fn sample(boot: u32, seq: u32) -> NodeFrame {
        NodeFrame::Sample(SampleFrame {
            boot,
            seq,
            ts_us: 10_000 * (seq as u64 + 1),
            values: Values::from_slice(&[seq as f32, 1.0, 2.0]).expect("fits"),
        })
    }

    fn hello(boot: u32) -> NodeFrame {
        NodeFrame::Hello(Hello {
            version: LINK_VERSION,
            boot,
            rate_hz: 100,
            channels: 3,
        })
    }

    fn status(boot: u32, next_seq: u32) -> NodeFrame {
        NodeFrame::Status(NodeStatus {
            boot,
            next_seq,
            rate_hz: 100,
            uptime_us: 10_000 * next_seq as u64,
            ..NodeStatus::default()
        })
    }

    fn bytes(frames: &[NodeFrame]) -> Vec<u8> {
        let mut out = Vec::new();
        for f in frames {
            let mut buf = [0u8; MAX_FRAME_BYTES];
            out.extend_from_slice(link::encode(f, &mut buf).expect("fits"));
        }
        out
    }

    fn seqs(samples: &[Sample]) -> Vec<u32> {
        samples.iter().map(|s| s.values[0] as u32).collect()
    }

    fn rejected(m: &Metrics) -> (u64, u64, u64) {
        (
            m.rejected_corrupt.load(Relaxed),
            m.rejected_gap.load(Relaxed),
            m.rejected.load(Relaxed),
        )
    }

    #[test]
    fn a_clean_line_gives_every_sample_on_the_node_clock() {
        let m = metrics();
        let mut l = link(&m, SerialTimestamps::Node);
        let mut frames = vec![hello(3)];
        frames.extend((0..50).map(|i| sample(3, i)));
        let line = bytes(&frames);
        let mut out = Vec::new();
        // Fed in awkward pieces, as a tty delivers them.
        for (k, chunk) in line.chunks(7).enumerate() {
            l.push(chunk, 5_000_000 + k as u64, &mut out);
        }
        assert_eq!(seqs(&out), (0..50).collect::<Vec<_>>());
        let first = out[0].ts_us;
        assert!(
            out.windows(2).all(|w| w[1].ts_us - w[0].ts_us == 10_000),
            "the node's spacing is kept"
        );
        // The hello (node time 0) anchored the clock: the first sample was taken 10 ms later.
        assert!((5_010_000..5_010_100).contains(&first), "{first}");
        assert_eq!(rejected(&m), (0, 0, 0));
        assert_eq!(out[0].values, vec![0.0, 1.0, 2.0]);
    }

    #[test]
    fn agent_timestamps_use_the_arrival_time() {
        let m = metrics();
        let mut l = link(&m, SerialTimestamps::Agent);
        let mut out = Vec::new();
        l.push(&bytes(&[sample(1, 0)]), 42, &mut out);
        l.push(&bytes(&[sample(1, 1)]), 43, &mut out);
        assert_eq!(out.iter().map(|s| s.ts_us).collect::<Vec<_>>(), [42, 43]);
    }

    #[test]
    fn damaged_frames_are_corrupt_samples_and_missing_ones_are_gaps() {
        let m = metrics();
        let mut l = link(&m, SerialTimestamps::Node);
        let mut line = bytes(&[hello(1), sample(1, 0), sample(1, 1)]);
        // Sample 2 damaged on the line, 3 and 4 never sent (node overrun), 5 arrives.
        let mut damaged = bytes(&[sample(1, 2)]);
        damaged[3] ^= 0x40;
        line.extend(damaged);
        line.extend(bytes(&[sample(1, 5)]));
        let mut out = Vec::new();
        l.push(&line, 1, &mut out);
        assert_eq!(seqs(&out), [0, 1, 5]);
        assert_eq!(rejected(&m), (1, 2, 3));
        assert_eq!(m.serial_frames_refused.load(Relaxed), 1);
    }

    #[test]
    fn a_damaged_status_is_not_a_sample() {
        let m = metrics();
        let mut l = link(&m, SerialTimestamps::Node);
        let mut line = bytes(&[sample(1, 0)]);
        let mut damaged = bytes(&[status(1, 1)]);
        damaged[2] ^= 0x01;
        line.extend(damaged);
        line.extend(bytes(&[sample(1, 1)]));
        let mut out = Vec::new();
        l.push(&line, 1, &mut out);
        assert_eq!(seqs(&out), [0, 1]);
        assert_eq!(rejected(&m), (0, 0, 0));
        // (A flipped bit can also split a frame in two: both halves are refused.)
        assert!(m.serial_frames_refused.load(Relaxed) >= 1);
    }

    #[test]
    fn a_reboot_settles_the_old_boots_tail_and_restarts_the_numbering() {
        let m = metrics();
        let mut l = link(&m, SerialTimestamps::Node);
        let mut frames = vec![hello(4)];
        frames.extend((0..10).map(|i| sample(4, i)));
        // The node had numbered 12 when it reset: 10 and 11 died in its buffer.
        frames.push(status(4, 12));
        frames.push(hello(5));
        frames.extend((0..5).map(|i| sample(5, i)));
        let mut out = Vec::new();
        l.push(&bytes(&frames), 9_000_000, &mut out);
        assert_eq!(out.len(), 15);
        assert_eq!(rejected(&m), (0, 2, 2));
        assert_eq!(m.serial_node_reboots.load(Relaxed), 1);
        // The new boot's samples are stamped from its own anchor, never before the old ones.
        assert!(out[10].ts_us >= 9_000_000);
    }

    #[test]
    fn a_lost_hello_still_counts_the_new_boots_first_samples() {
        let m = metrics();
        let mut l = link(&m, SerialTimestamps::Node);
        let mut out = Vec::new();
        l.push(&bytes(&[hello(1), sample(1, 0), sample(1, 1)]), 1, &mut out);
        // Boot 2's hello and samples 0-2 were lost; 3 is the first to arrive.
        l.push(&bytes(&[sample(2, 3), sample(2, 4)]), 2, &mut out);
        assert_eq!(seqs(&out), [0, 1, 3, 4]);
        assert_eq!(rejected(&m), (0, 3, 3));
    }

    #[test]
    fn numbering_that_goes_back_in_one_boot_is_a_reboot() {
        let m = metrics();
        let mut l = link(&m, SerialTimestamps::Node);
        let mut out = Vec::new();
        l.push(
            &bytes(&[sample(1, 7), sample(1, 8), sample(1, 0), sample(1, 1)]),
            1,
            &mut out,
        );
        assert_eq!(seqs(&out), [7, 8, 0, 1]);
        assert_eq!(
            rejected(&m),
            (0, 0, 0),
            "the source joined at 7: nothing before it is counted"
        );
        assert_eq!(m.serial_node_reboots.load(Relaxed), 1);
    }

    fn result(boot: u32, seq: u32) -> NodeFrame {
        NodeFrame::Result(ResultFrame {
            boot,
            seq,
            window_start_us: 500_000 * seq as u64,
            ts_us: 500_000 * seq as u64 + 990_000,
            samples: 100 + 50 * seq,
            cycles: 1_000,
            outputs: Values::from_slice(&[seq as f32, 0.25, 0.5, 0.25]).expect("fits"),
        })
    }

    #[test]
    fn a_results_node_s_results_are_the_stream_with_the_same_ledger() {
        let m = metrics();
        let mut l = link(&m, SerialTimestamps::Node);
        let model = NodeFrame::Model(ModelInfo {
            weights_sha256: 0x0d17_37de_4d3a_1a5c,
            window: 100,
            hop: 50,
            outputs: 4,
        });
        let mut line = bytes(&[hello(2), model, result(2, 0), result(2, 1)]);
        // Result 2 damaged on the line, 3 dropped by the node, 4 arrives.
        let mut damaged = bytes(&[result(2, 2)]);
        damaged[4] ^= 0x20;
        line.extend(damaged);
        line.extend(bytes(&[result(2, 4)]));
        let mut out = Vec::new();
        l.push(&line, 7_000_000, &mut out);
        assert_eq!(seqs(&out), [0, 1, 4]);
        assert_eq!(out[0].values, vec![0.0, 0.25, 0.5, 0.25]);
        assert_eq!(out[1].origin, Some(origin(2, 1)));
        assert_eq!(
            out[1].ts_us - out[0].ts_us,
            500_000,
            "stamped by the node's clock"
        );
        assert_eq!(rejected(&m), (1, 1, 2));
        // After a restart the source resumes at the result after the last one stored.
        l.restore(origin(2, 4));
        assert_eq!(
            l.resume(),
            Some(HostCommand::Resume {
                boot: 2,
                next_seq: 5
            })
        );
    }

    /// No durable position: a source that starts fresh.
    struct NoOrigin;
    impl DurableOrigin for NoOrigin {
        fn durable_origin(&self, _: &str) -> Option<u64> {
            None
        }
    }

    fn resumed(boot: u32, from_seq: u32) -> NodeFrame {
        NodeFrame::Resumed(Resumed { boot, from_seq })
    }

    #[test]
    fn after_a_restart_it_resumes_from_the_stored_position_exactly() {
        let m = metrics();
        let mut l = link(&m, SerialTimestamps::Node);
        assert_eq!(l.resume(), None, "nothing to resume before any sample");
        // The queue durably holds boot 3 up to seq 9.
        l.restore(origin(3, 9));
        assert_eq!(
            l.resume(),
            Some(HostCommand::Resume {
                boot: 3,
                next_seq: 10
            })
        );
        let mut out = Vec::new();
        // Before the answer the node still sends from where it was (14, 15): held back.
        l.push(
            &bytes(&[sample(3, 14), sample(3, 15), status(3, 16), resumed(3, 10)]),
            1,
            &mut out,
        );
        assert!(out.is_empty());
        l.push(
            &bytes(&(10..16).map(|i| sample(3, i)).collect::<Vec<_>>()),
            2,
            &mut out,
        );
        assert_eq!(seqs(&out), (10..16).collect::<Vec<_>>());
        assert_eq!(rejected(&m), (0, 0, 0));
        assert_eq!(out[0].origin, Some(origin(3, 10)));
        // A repeated Resume's answer rewinds the node: what was passed on is not again.
        l.push(
            &bytes(&[resumed(3, 12), sample(3, 12), sample(3, 15), sample(3, 16)]),
            3,
            &mut out,
        );
        assert_eq!(seqs(&out[6..]), [16]);
        assert_eq!(rejected(&m), (0, 0, 0));
    }

    #[test]
    fn what_the_node_no_longer_holds_is_a_gap_and_a_reset_node_starts_over() {
        let m = metrics();
        let mut l = link(&m, SerialTimestamps::Node);
        l.restore(origin(3, 9));
        l.resume();
        let mut out = Vec::new();
        // The node's ring overran while the agent was down: it holds 13.. only.
        l.push(&bytes(&[resumed(3, 13), sample(3, 13)]), 1, &mut out);
        assert_eq!(seqs(&out), [13]);
        assert_eq!(rejected(&m), (0, 3, 3));
        // The node reset while the line was down: its new boot's kept samples start at 2.
        l.resume();
        l.push(&bytes(&[resumed(4, 2), sample(4, 2)]), 2, &mut out);
        assert_eq!(seqs(&out), [13, 2]);
        assert_eq!(rejected(&m), (0, 5, 5), "4/0 and 4/1 are gone");
        assert_eq!(m.serial_node_reboots.load(Relaxed), 1);
    }

    #[test]
    fn a_partial_frame_at_reopen_is_refused_and_the_next_frame_decodes() {
        let m = metrics();
        let mut l = link(&m, SerialTimestamps::Node);
        let mut out = Vec::new();
        let line = bytes(&[sample(1, 0), sample(1, 1)]);
        let cut = line.iter().position(|b| *b == 0).expect("delimiter") + 5;
        l.push(&line[..cut], 1, &mut out);
        l.reopened();
        // The node went on; sample 1's frame is lost with the old line, 2 arrives whole.
        l.push(&bytes(&[sample(1, 2)]), 2, &mut out);
        assert_eq!(seqs(&out), [0, 2]);
        assert_eq!(rejected(&m), (1, 0, 1));
    }

    /// The whole source over TCP (as QEMU's `-serial tcp:` or ser2net serve a node): it
    /// greets the node (rate, status request), passes samples on, and when the node's end goes
    /// away it reopens the line and carries on with the same numbering.
    #[tokio::test(flavor = "current_thread")]
    async fn over_tcp_it_greets_the_node_and_reopens_a_lost_line() {
        use tokio::io::AsyncReadExt as _;
        let node = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = node.local_addr().expect("addr");
        let m = metrics();
        let (tx, mut rx) = mpsc::channel(16);
        let shutdown = CancellationToken::new();
        let serial = Serial {
            device: SerialDevice::Tcp(addr.to_string()),
            baud: 115_200,
            timestamps: SerialTimestamps::Node,
            rate_hz: Some(250),
        };
        let task = tokio::spawn(run(
            "imu".into(),
            serial,
            Guard::open(&m),
            Arc::new(NoOrigin),
            tx,
            m.clone(),
            shutdown.clone(),
        ));

        let wait = Duration::from_secs(20);
        let (mut conn, _) = tokio::time::timeout(wait, node.accept())
            .await
            .expect("connects")
            .expect("accept");
        // The greeting: a delimiter, SetRate, RequestStatus.
        let mut commands = Vec::new();
        let mut reader = FrameReader::<32>::new();
        while commands.len() < 2 {
            let b = tokio::time::timeout(wait, conn.read_u8())
                .await
                .expect("greeting")
                .expect("read");
            if let Pushed::Frame(body) = reader.push(b) {
                commands.push(link::decode::<HostCommand>(body).expect("a command"));
            }
        }
        assert_eq!(
            commands,
            [HostCommand::SetRate { hz: 250 }, HostCommand::RequestStatus]
        );
        let mut first = vec![hello(2)];
        first.extend((0..5).map(|i| sample(2, i)));
        conn.write_all(&bytes(&first)).await.expect("write");
        for i in 0..5 {
            let s = tokio::time::timeout(wait, rx.recv())
                .await
                .expect("sample")
                .expect("open");
            assert_eq!(s.values[0] as u32, i);
        }
        // The node's end goes away mid-frame (sample 5 cut short); the source reopens and
        // resumes at 5, which the node (keeping what is not acknowledged) sends again.
        let partial = bytes(&[sample(2, 5)]);
        conn.write_all(&partial[..4]).await.expect("write");
        drop(conn);
        let (mut conn, _) = tokio::time::timeout(wait, node.accept())
            .await
            .expect("reconnects")
            .expect("accept");
        let mut commands = Vec::new();
        let mut reader = FrameReader::<32>::new();
        while commands.len() < 3 {
            let b = tokio::time::timeout(wait, conn.read_u8())
                .await
                .expect("greeting")
                .expect("read");
            if let Pushed::Frame(body) = reader.push(b) {
                commands.push(link::decode::<HostCommand>(body).expect("a command"));
            }
        }
        assert_eq!(
            commands,
            [
                HostCommand::SetRate { hz: 250 },
                HostCommand::Resume {
                    boot: 2,
                    next_seq: 5
                },
                HostCommand::RequestStatus
            ]
        );
        // Still sending 8 when the Resume arrived: held back, then the answer and 5.. again.
        conn.write_all(&bytes(&[
            sample(2, 8),
            resumed(2, 5),
            sample(2, 5),
            sample(2, 6),
            sample(2, 7),
        ]))
        .await
        .expect("write");
        for i in [5, 6, 7] {
            let s = tokio::time::timeout(wait, rx.recv())
                .await
                .expect("sample")
                .expect("open");
            assert_eq!(s.values[0] as u32, i);
        }
        assert_eq!(
            rejected(&m),
            (0, 0, 0),
            "the cut frame came again: nothing missing"
        );
        assert_eq!(m.serial_frames_refused.load(Relaxed), 1);
        assert_eq!(m.serial_reopens.load(Relaxed), 1);
        assert_eq!(m.captured.load(Relaxed), 8);
        shutdown.cancel();
        tokio::time::timeout(wait, task)
            .await
            .expect("stops")
            .expect("no panic")
            .expect("ok");
    }

    /// A real tty (a pty pair: the node holds the master, the agent opens the slave by its
    /// path, as it would /dev/ttyACM0); the device disappearing is a failed line, and the
    /// source keeps retrying without stopping until shutdown.
    ///
    /// Not built for aarch64-linux-gnu: `scripts/test.sh` runs that target's tests under
    /// qemu-user, whose emulation of the pty ioctls (termios on a pty slave) does not deliver
    /// the bytes, so the test would measure qemu, not the source. It runs in the host tests.
    #[cfg(not(all(target_arch = "aarch64", target_os = "linux", target_env = "gnu")))]
    #[tokio::test(flavor = "current_thread")]
    async fn over_a_tty_it_reads_frames_and_survives_the_device_vanishing() {
        use serialport::SerialPort as _;
        let (mut master, slave) =
            serialport::TTYPort::pair().expect("a pty pair (is /dev/ptmx available?)");
        let path = slave.name().expect("the pty has a name");
        let m = metrics();
        let (tx, mut rx) = mpsc::channel(64);
        let shutdown = CancellationToken::new();
        let serial = Serial {
            device: SerialDevice::Tty(path.into()),
            baud: 115_200,
            timestamps: SerialTimestamps::Agent,
            rate_hz: None,
        };
        let task = tokio::spawn(run(
            "imu".into(),
            serial,
            Guard::open(&m),
            Arc::new(NoOrigin),
            tx,
            m.clone(),
            shutdown.clone(),
        ));
        let mut frames = vec![hello(1)];
        frames.extend((0..40).map(|i| sample(1, i)));
        let line = bytes(&frames);
        let writer = std::thread::spawn(move || {
            // Until the agent has opened the slave, bytes may sit in the pty: that is fine.
            std::io::Write::write_all(&mut master, &line).expect("write to the pty");
            master
        });
        let wait = Duration::from_secs(20);
        for i in 0..40 {
            let s = tokio::time::timeout(wait, rx.recv())
                .await
                .expect("sample")
                .expect("open");
            assert_eq!(s.values[0] as u32, i);
        }
        let master = writer.join().expect("writer");
        // The device vanishes (the node's end of the pty closes): the source notices and
        // keeps trying to reopen; shutdown still stops it promptly.
        drop(master);
        drop(slave);
        // Let the source run into the failed line and its retries, then stop it.
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        assert!(
            !task.is_finished(),
            "a vanished device must not stop the source"
        );
        shutdown.cancel();
        tokio::time::timeout(wait, task)
            .await
            .expect("stops")
            .expect("no panic")
            .expect("ok");
        assert_eq!(m.captured.load(Relaxed), 40);
        assert_eq!(rejected(&m), (0, 0, 0));
    }

    proptest! {
        /// Whatever the line does to the bytes (flipped bits, dropped or inserted bytes),
        /// the ledger holds: samples passed on + rejected = the node's numbering from the first
        /// sample seen to the last, as long as the last frames arrive whole.
        #[test]
        fn the_ledger_holds_whatever_the_line_does(
            n in 5u32..120,
            damage in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..3, any::<u8>()), 0..40),
        ) {
            let m = metrics();
            let mut l = link(&m, SerialTimestamps::Node);
            let mut line = bytes(&[hello(1), sample(1, 0)]);
            let mut body = bytes(&(1..n).map(|i| sample(1, i)).collect::<Vec<_>>());
            for (at, kind, byte) in damage {
                if body.is_empty() { break; }
                let i = at.index(body.len());
                match kind {
                    0 => body[i] ^= byte | 1,
                    1 => { body.remove(i); }
                    _ => body.insert(i, byte),
                }
            }
            line.extend(body);
            // A delimiter ends any damaged frame; then the last sample arrives whole.
            line.push(0);
            line.extend(bytes(&[sample(1, n)]));
            let mut out = Vec::new();
            l.push(&line, 1, &mut out);
            let got = seqs(&out);
            prop_assert_eq!(got.first().copied(), Some(0));
            prop_assert_eq!(got.last().copied(), Some(n));
            prop_assert!(got.windows(2).all(|w| w[0] < w[1]), "in order, no duplicates: {:?}", got);
            let (_, _, total) = rejected(&m);
            prop_assert_eq!(out.len() as u64 + total, u64::from(n) + 1);
        }
    }
}
