//! The serial link between a sensor node (`firmware/`) and the agent's `serial` source.
//!
//! Compiled with the `node` feature; `no_std` without allocation, so the firmware shares it.
//!
//! # Wire format
//! Every message is one frame: `COBS(postcard(message) ++ crc32c(postcard(message)) as LE u32)`
//! followed by a single `0x00` delimiter. COBS guarantees the body holds no zero byte, so a
//! reader that lost its place (line noise, a node reset mid-frame, an agent that connected late)
//! resynchronizes at the next `0x00`. The CRC-32C (Castagnoli) covers the postcard bytes; a frame
//! whose CRC does not match is refused whole.
//!
//! The node sends [`NodeFrame`]s, the host sends [`HostCommand`]s. Both are postcard enums:
//! a new variant MUST only be appended, so older readers refuse it as unknown instead of
//! misreading it.
//!
//! # Sequence numbers and boots
//! - A node MUST assign `seq` when it takes a sample (before it is buffered), starting at 0 on
//!   each boot and counting up by one, so that every sample the node dropped (ring-buffer
//!   overrun) or the line lost shows up at the host as a gap in `seq`.
//! - `boot` MUST change on every reset of the node (a counter kept across resets); the host
//!   treats a new `boot` as a new numbering of `seq`.
//! - A [`NodeStatus`] reports the node's own counters, so the host can tell the node's drops
//!   (`overruns`) from the line's.
//!
//! # Acknowledgements (link version 2)
//! A host that stores samples durably acknowledges them: [`HostCommand::Ack`] says it holds
//! every sample of `boot` numbered below `next_seq`. From the first `Ack` or `Resume` of a
//! boot on, the node MUST keep every sample it sent until one acknowledges it (in its ring
//! buffer; when the ring is full the oldest is dropped and, if it was never sent, counted in
//! `overruns`). When a host (re)opens the line it sends [`HostCommand::Resume`] with the
//! position it durably holds; the node forgets what lies below it, answers
//! [`NodeFrame::Resumed`] with the seq it sends next, and sends its kept samples from there
//! again. So a host that crashed loses nothing it acknowledged, and gets again what it had not:
//! every sample between `next_seq` and `from_seq` that the node no longer holds is a gap.
//!
//! # Results instead of samples (link version 3)
//! A node that runs a model itself (firmware feature `inference`) sends one
//! [`NodeFrame::Result`] per evaluated window instead of the window's samples. Its `seq`
//! numbers results the way it numbers samples otherwise: from 0 each boot, one per window the
//! node evaluated (sent or dropped), so every rule above (gaps, overruns, `Ack`, `Resume`,
//! `NodeStatus::next_seq`) applies to results unchanged. A node MUST NOT send both kinds in
//! one boot. Before its first result it sends a [`NodeFrame::Model`] (after every `Hello`) that
//! names the model's weights, so the host can check it knows the labels the outputs are in.
//! A version 2 node never sends either frame; a host accepts versions [`MIN_LINK_VERSION`]
//! to [`LINK_VERSION`].

use serde::de::{Error as _, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The most channels one sample frame carries.
pub const MAX_CHANNELS: usize = 16;
/// The version the node announces in [`Hello`].
pub const LINK_VERSION: u8 = 3;
/// The oldest version a host still reads (version 2 nodes send no results); the host refuses a
/// node outside `MIN_LINK_VERSION..=LINK_VERSION`.
pub const MIN_LINK_VERSION: u8 = 2;
/// An upper bound of one encoded frame, delimiter included: postcard's worst case for the
/// largest message, its CRC, COBS's overhead (one byte per 254) and the delimiter.
pub const MAX_FRAME_BYTES: usize = 128;

/// The CRC the link uses (CRC-32C, Castagnoli).
pub const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// A message from the node to the host.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum NodeFrame {
    /// Sent once after every boot, before any sample.
    Hello(Hello),
    /// One multichannel sample.
    Sample(SampleFrame),
    /// The node's counters: sent periodically and when the host asks.
    Status(NodeStatus),
    /// The answer to [`HostCommand::Resume`], before any sample it makes the node send again.
    Resumed(Resumed),
    /// One window evaluated by the node's own model (link version 3): sent instead of the
    /// window's samples, numbered like them.
    Result(ResultFrame),
    /// The model the node's results come from (link version 3): after every `Hello` of a node
    /// that sends results.
    Model(ModelInfo),
}

/// The output of the node's model for one window of samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ResultFrame {
    pub boot: u32,
    /// Per-boot result number (see the module comment: results are numbered as samples are).
    pub seq: u32,
    /// Node time of the window's first and last sample, microseconds since the node booted.
    pub window_start_us: u64,
    pub ts_us: u64,
    /// How many samples the node had taken this boot when the window ended (its last sample's
    /// own number plus one).
    pub samples: u32,
    /// Time the model took for this window, in cycles of the node's clock (on QEMU with
    /// `-icount shift=0` these are the board's clock ticks of guest time, see docs/hil.md).
    pub cycles: u32,
    /// Class probabilities in the model's label order, or `[score]` for an anomaly model.
    pub outputs: Values,
}

/// Which model a node runs: enough for the host to find the labels its outputs are in.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// The first 8 bytes of the SHA-256 of the model's weights (the bundle manifest's
    /// `weights.sha256`), big-endian: the same weights the host holds in the bundle.
    pub weights_sha256: u64,
    /// Samples per window and between window starts.
    pub window: u16,
    pub hop: u16,
    /// Values in every result's `outputs`.
    pub outputs: u8,
}

/// Where a node resumes: the next sample it sends is `from_seq` of `boot` (or a later one of
/// that boot, if the ring overran in between: a gap the host counts).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Resumed {
    pub boot: u32,
    pub from_seq: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u8,
    pub boot: u32,
    pub rate_hz: u16,
    pub channels: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SampleFrame {
    pub boot: u32,
    /// Per-boot sequence number, assigned when the sample was taken.
    pub seq: u32,
    /// Capture time, microseconds since the node booted.
    pub ts_us: u64,
    pub values: Values,
}

#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct NodeStatus {
    pub boot: u32,
    /// The `seq` the next sample will get: every sample below it was taken this boot.
    pub next_seq: u32,
    pub rate_hz: u16,
    /// Samples dropped by the node because its buffer was full (since boot or the last reset
    /// of the counters).
    pub overruns: u32,
    /// Frames written to the line.
    pub frames: u32,
    /// Host commands received (valid ones) and refused (bad CRC, malformed, out of range).
    pub commands: u32,
    pub bad_commands: u32,
    pub uptime_us: u64,
    /// Sensor reads that failed (no sample taken, so no `seq` used).
    pub sensor_errors: u32,
}

/// A command from the host to the node.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum HostCommand {
    /// Sample at `hz` (1..=[`MAX_RATE_HZ`]) from the next tick on.
    SetRate { hz: u16 },
    /// Answer with a [`NodeStatus`] frame.
    RequestStatus,
    /// Zero the node's counters (`overruns`, `frames`, `commands`, `bad_commands`); `seq` and
    /// `boot` are never reset.
    ResetCounters,
    /// The host durably holds every sample of `boot` below `next_seq`: the node may forget them.
    Ack { boot: u32, next_seq: u32 },
    /// The host (re)opened the line holding every sample of `boot` below `next_seq`: the node
    /// forgets those, answers [`NodeFrame::Resumed`] and sends what it kept from there on.
    Resume { boot: u32, next_seq: u32 },
}

/// The highest sample rate a node accepts.
pub const MAX_RATE_HZ: u16 = 10_000;

/// Up to [`MAX_CHANNELS`] values, without allocation. On the wire a postcard sequence
/// (length, then each `f32`).
#[derive(Clone, Copy, PartialEq)]
pub struct Values {
    len: u8,
    buf: [f32; MAX_CHANNELS],
}

impl Values {
    /// `None` when `values` has more than [`MAX_CHANNELS`] entries.
    pub fn from_slice(values: &[f32]) -> Option<Values> {
        if values.len() > MAX_CHANNELS {
            return None;
        }
        let mut buf = [0.0; MAX_CHANNELS];
        buf[..values.len()].copy_from_slice(values);
        Some(Values {
            len: values.len() as u8,
            buf,
        })
    }

    pub fn as_slice(&self) -> &[f32] {
        &self.buf[..self.len as usize]
    }
}

impl core::fmt::Debug for Values {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

impl Serialize for Values {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.as_slice())
    }
}

impl<'de> Deserialize<'de> for Values {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Values, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Values;
            fn expecting(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                write!(f, "at most {MAX_CHANNELS} numbers")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Values, A::Error> {
                let mut out = Values {
                    len: 0,
                    buf: [0.0; MAX_CHANNELS],
                };
                while let Some(v) = seq.next_element::<f32>()? {
                    if out.len as usize == MAX_CHANNELS {
                        return Err(A::Error::invalid_length(MAX_CHANNELS + 1, &self));
                    }
                    out.buf[out.len as usize] = v;
                    out.len += 1;
                }
                Ok(out)
            }
        }
        d.deserialize_seq(V)
    }
}

/// Why a frame was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// The bytes between two delimiters are not valid COBS.
    Cobs,
    /// The CRC-32C does not match: the frame was damaged on the line.
    Crc,
    /// The CRC matched but the message does not decode (an unknown variant from a newer node,
    /// or a node bug).
    Malformed,
    /// The frame is longer than [`MAX_FRAME_BYTES`] (it was discarded as it arrived).
    TooLong,
    /// The output buffer is too small to encode into.
    BufferFull,
}

impl FrameError {
    /// A short label (metrics, logs).
    pub fn as_str(self) -> &'static str {
        match self {
            FrameError::Cobs => "cobs",
            FrameError::Crc => "crc",
            FrameError::Malformed => "malformed",
            FrameError::TooLong => "too_long",
            FrameError::BufferFull => "buffer_full",
        }
    }
}

impl core::fmt::Display for FrameError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            FrameError::Cobs => "the frame is not valid COBS (bytes lost or damaged on the line)",
            FrameError::Crc => "the frame's CRC-32C does not match (damaged on the line)",
            FrameError::Malformed => {
                "the frame's CRC matches but its message does not decode (a newer node firmware?)"
            }
            FrameError::TooLong => "the frame is longer than the link allows and was discarded",
            FrameError::BufferFull => "the output buffer is too small for the frame",
        })
    }
}

/// Encodes `msg` as one frame, delimiter included, into `buf`; returns the used part.
pub fn encode<'a, T: Serialize>(msg: &T, buf: &'a mut [u8]) -> Result<&'a mut [u8], FrameError> {
    use postcard::ser_flavors::{Cobs, Slice, crc::CrcModifier};
    let cobs = Cobs::try_new(Slice::new(buf)).map_err(|_| FrameError::BufferFull)?;
    postcard::serialize_with_flavor(msg, CrcModifier::new(cobs, CRC.digest()))
        .map_err(|_| FrameError::BufferFull)
}

/// Decodes one frame body (the bytes between two delimiters, without them) in place.
pub fn decode<'a, T: Deserialize<'a>>(body: &'a mut [u8]) -> Result<T, FrameError> {
    let n = cobs_decode_in_place(body)?;
    let raw: &'a [u8] = &body[..n];
    // The CRC is checked before decoding: a damaged frame is a CRC failure whatever its bytes
    // happen to decode to.
    let Some((msg, crc)) = raw.split_last_chunk::<4>() else {
        return Err(FrameError::Crc);
    };
    if CRC.checksum(msg) != u32::from_le_bytes(*crc) {
        return Err(FrameError::Crc);
    }
    postcard::from_bytes(msg).map_err(|_| FrameError::Malformed)
}

/// Decodes COBS in place; returns the decoded length.
fn cobs_decode_in_place(buf: &mut [u8]) -> Result<usize, FrameError> {
    let (mut read, mut write) = (0usize, 0usize);
    while read < buf.len() {
        let code = buf[read] as usize;
        if code == 0 || read + code > buf.len() {
            return Err(FrameError::Cobs);
        }
        read += 1;
        for _ in 1..code {
            let b = buf[read];
            if b == 0 {
                return Err(FrameError::Cobs);
            }
            buf[write] = b;
            write += 1;
            read += 1;
        }
        // A block shorter than 254 bytes stood for a zero, unless it was the last one.
        if code != 0xFF && read < buf.len() {
            buf[write] = 0;
            write += 1;
        }
    }
    Ok(write)
}

/// What [`FrameReader::push`] found.
#[derive(Debug, PartialEq)]
pub enum Pushed<'a> {
    /// The byte was taken; no frame is complete yet.
    More,
    /// A frame body is complete (decode it with [`decode`]).
    Frame(&'a mut [u8]),
    /// A frame longer than `N` bytes ended here; it was discarded.
    TooLong,
}

/// Splits a byte stream into frame bodies at `0x00` delimiters, with a fixed buffer of `N`
/// bytes: a longer frame is discarded as it arrives (and reported once it ends), so the
/// reader's memory is bounded whatever the line delivers. Empty frames (two delimiters in a
/// row, as a sender may use to flush the line) are skipped.
pub struct FrameReader<const N: usize> {
    buf: [u8; N],
    len: usize,
    overflow: bool,
}

impl<const N: usize> Default for FrameReader<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> FrameReader<N> {
    pub const fn new() -> Self {
        FrameReader {
            buf: [0; N],
            len: 0,
            overflow: false,
        }
    }

    /// Forgets a partial frame (after the line was reopened).
    pub fn clear(&mut self) {
        self.len = 0;
        self.overflow = false;
    }

    /// Whether bytes of an unfinished frame are held.
    pub fn is_mid_frame(&self) -> bool {
        self.len > 0 || self.overflow
    }

    pub fn push(&mut self, byte: u8) -> Pushed<'_> {
        if byte == 0 {
            let (len, overflow) = (self.len, self.overflow);
            self.clear();
            return if overflow {
                Pushed::TooLong
            } else if len == 0 {
                Pushed::More
            } else {
                Pushed::Frame(&mut self.buf[..len])
            };
        }
        if self.overflow {
            return Pushed::More;
        }
        if self.len == N {
            self.overflow = true;
            self.len = 0;
            return Pushed::More;
        }
        self.buf[self.len] = byte;
        self.len += 1;
        Pushed::More
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;
    use proptest::prelude::*;

    fn sample(seq: u32, values: &[f32]) -> NodeFrame {
        NodeFrame::Sample(SampleFrame {
            boot: 7,
            seq,
            ts_us: 1_000 * seq as u64,
            values: Values::from_slice(values).expect("fits"),
        })
    }

    fn frames_of(bytes: &[u8]) -> Vec<Result<NodeFrame, FrameError>> {
        let mut r = FrameReader::<MAX_FRAME_BYTES>::new();
        let mut out = Vec::new();
        for &b in bytes {
            match r.push(b) {
                Pushed::More => {}
                Pushed::TooLong => out.push(Err(FrameError::TooLong)),
                Pushed::Frame(body) => out.push(decode::<NodeFrame>(body)),
            }
        }
        out
    }

    #[test]
    fn round_trips_every_message_kind() {
        let msgs = [
            NodeFrame::Hello(Hello {
                version: LINK_VERSION,
                boot: 3,
                rate_hz: 100,
                channels: 6,
            }),
            sample(0, &[]),
            sample(1, &[1.5, -2.0, 0.0, f32::MAX, f32::MIN_POSITIVE, 9.81]),
            sample(u32::MAX, &[0.0; MAX_CHANNELS]),
            NodeFrame::Resumed(Resumed {
                boot: u32::MAX,
                from_seq: u32::MAX,
            }),
            NodeFrame::Result(ResultFrame {
                boot: u32::MAX,
                seq: u32::MAX,
                window_start_us: u64::MAX,
                ts_us: u64::MAX,
                samples: u32::MAX,
                cycles: u32::MAX,
                outputs: Values::from_slice(&[f32::MIN_POSITIVE; MAX_CHANNELS]).expect("fits"),
            }),
            NodeFrame::Model(ModelInfo {
                weights_sha256: u64::MAX,
                window: u16::MAX,
                hop: u16::MAX,
                outputs: u8::MAX,
            }),
            NodeFrame::Status(NodeStatus {
                boot: u32::MAX,
                next_seq: u32::MAX,
                rate_hz: u16::MAX,
                overruns: u32::MAX,
                frames: u32::MAX,
                commands: u32::MAX,
                bad_commands: u32::MAX,
                uptime_us: u64::MAX,
                sensor_errors: u32::MAX,
            }),
        ];
        for m in msgs {
            let mut buf = [0u8; MAX_FRAME_BYTES];
            let n = encode(&m, &mut buf).expect("fits").len();
            assert!(n <= MAX_FRAME_BYTES);
            assert_eq!(buf[n - 1], 0, "ends with the delimiter");
            assert!(!buf[..n - 1].contains(&0), "no zero inside a frame");
            assert_eq!(frames_of(&buf[..n]), [Ok(m)]);
        }
        for c in [
            HostCommand::SetRate { hz: 250 },
            HostCommand::RequestStatus,
            HostCommand::ResetCounters,
            HostCommand::Ack {
                boot: u32::MAX,
                next_seq: u32::MAX,
            },
            HostCommand::Resume {
                boot: 1,
                next_seq: 0,
            },
        ] {
            let mut buf = [0u8; 32];
            let n = encode(&c, &mut buf).expect("fits").len();
            assert_eq!(decode::<HostCommand>(&mut buf[..n - 1]), Ok(c));
        }
    }

    #[test]
    fn a_flipped_bit_is_a_crc_or_cobs_failure_and_the_next_frame_decodes() {
        let mut line = Vec::new();
        for seq in 0..3 {
            let mut buf = [0u8; MAX_FRAME_BYTES];
            line.extend_from_slice(encode(&sample(seq, &[1.0, 2.0, 3.0]), &mut buf).expect("fits"));
        }
        let first_len = line.iter().position(|b| *b == 0).expect("delimiter") + 1;
        for bit in 0..(first_len - 1) * 8 {
            let mut damaged = line.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            let got = frames_of(&damaged);
            // The damage stays inside the first frame (a byte turned into a zero splits it in
            // two: both halves fail); the two frames after it always decode.
            assert!(got.len() >= 3, "bit {bit}: {got:?}");
            let (bad, good) = got.split_at(got.len() - 2);
            assert!(
                bad.iter()
                    .all(|r| matches!(r, Err(FrameError::Crc | FrameError::Cobs))),
                "bit {bit}: {got:?}"
            );
            assert_eq!(
                good,
                [
                    Ok(sample(1, &[1.0, 2.0, 3.0])),
                    Ok(sample(2, &[1.0, 2.0, 3.0]))
                ]
            );
        }
    }

    #[test]
    fn overlong_frames_are_reported_once_and_the_reader_recovers() {
        let mut line = [0x42u8; 300].to_vec();
        line.push(0);
        let mut buf = [0u8; MAX_FRAME_BYTES];
        line.extend_from_slice(encode(&sample(9, &[4.0]), &mut buf).expect("fits"));
        assert_eq!(
            frames_of(&line),
            [Err(FrameError::TooLong), Ok(sample(9, &[4.0]))]
        );
    }

    #[test]
    fn too_many_values_are_refused() {
        assert!(Values::from_slice(&[0.0; MAX_CHANNELS + 1]).is_none());
        // A sequence of 17 floats on the wire (a node built with a larger limit).
        let raw: Vec<f32> = (0..MAX_CHANNELS as u32 + 1).map(|i| i as f32).collect();
        let mut buf = [0u8; 256];
        let n = encode(&raw, &mut buf).expect("fits").len();
        assert!(decode::<Values>(&mut buf[..n - 1]).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_reader(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = frames_of(&bytes);
        }

        #[test]
        fn cobs_matches_a_plain_encoder(raw in proptest::collection::vec(any::<u8>(), 0..600)) {
            // Reference encoder, written from the COBS paper's definition.
            let mut enc = alloc::vec![0u8];
            let (mut code_at, mut code) = (0usize, 1u8);
            for &b in &raw {
                if b != 0 {
                    enc.push(b);
                    code += 1;
                }
                if b == 0 || code == 0xFF {
                    enc[code_at] = code;
                    code_at = enc.len();
                    enc.push(0);
                    code = 1;
                }
            }
            enc[code_at] = code;
            let n = cobs_decode_in_place(&mut enc).expect("valid cobs");
            prop_assert_eq!(&enc[..n], &raw[..]);
        }
    }
}
