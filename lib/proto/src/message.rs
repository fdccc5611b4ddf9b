//! Versioned messages and their encodings.
//!
//! Every message carries `v` (the schema version, [`SCHEMA_VERSION`]). Within one version,
//! fields are only ever added (decoders ignore unknown fields); a breaking change bumps `v`
//! and the topic prefix together.
//!
//! Two encodings exist, and every payload declares its own:
//! * **JSON** (default): what cloud rule engines (AWS IoT rules, Azure IoT Hub routing) parse.
//!   A JSON payload starts with `{`.
//! * **CBOR** (compact, ~40% smaller for float arrays): the payload starts with the CBOR
//!   self-describe tag 55799 (bytes `d9 d9 f7`, RFC 8949 §3.4.6), which no JSON text can.
//!
//! [`Encoding::sniff`] tells them apart, so a subscriber never needs out-of-band configuration.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

use crate::ProtoError;
use crate::record::Record;

/// The schema version this build writes and understands.
pub const SCHEMA_VERSION: u32 = 1;

/// The CBOR self-describe tag that prefixes every CBOR payload.
pub const CBOR_MAGIC: [u8; 3] = [0xd9, 0xd9, 0xf7];

/// One record inside a [`TelemetryBatch`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireRecord {
    pub seq: u64,
    /// Capture time, microseconds since the Unix epoch.
    pub ts: u64,
    pub values: Vec<f32>,
    /// Envelope CRC32, see [`Record::crc32`].
    pub crc: u32,
}

/// Records of one stream, in increasing `seq` order, published on `ember/v1/{device}/telemetry`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TelemetryBatch {
    pub v: u32,
    pub device: String,
    pub stream: String,
    pub records: Vec<WireRecord>,
}

impl TelemetryBatch {
    pub fn new(device: &str, stream: &str) -> Self {
        TelemetryBatch {
            v: SCHEMA_VERSION,
            device: device.into(),
            stream: stream.into(),
            records: Vec::new(),
        }
    }

    pub fn push(&mut self, seq: u64, ts: u64, values: Vec<f32>) {
        let crc = crate::record::envelope_crc(&self.device, &self.stream, seq, ts, &values);
        self.records.push(WireRecord {
            seq,
            ts,
            values,
            crc,
        });
    }

    /// Checks the schema version, names, ordering and every record's CRC.
    pub fn validate(&self) -> Result<(), ProtoError> {
        check_version(self.v)?;
        crate::check_name(&self.device).map_err(|why| ProtoError::InvalidDeviceId {
            id: self.device.clone(),
            why,
        })?;
        crate::check_name(&self.stream).map_err(|why| ProtoError::InvalidStream {
            name: self.stream.clone(),
            why,
        })?;
        let mut last = 0u64;
        for r in &self.records {
            if r.seq <= last {
                return Err(ProtoError::Malformed {
                    encoding: "telemetry",
                    detail: alloc::format!("seq {} follows {} (must increase)", r.seq, last),
                });
            }
            last = r.seq;
            let computed =
                crate::record::envelope_crc(&self.device, &self.stream, r.seq, r.ts, &r.values);
            if computed != r.crc {
                return Err(ProtoError::RecordCrc {
                    stream: self.stream.clone(),
                    seq: r.seq,
                    sent: r.crc,
                    computed,
                });
            }
        }
        Ok(())
    }

    pub fn into_records(self) -> impl Iterator<Item = Record> {
        let stream = self.stream;
        self.records.into_iter().map(move |r| Record {
            stream: stream.clone(),
            seq: r.seq,
            ts_us: r.ts,
            values: r.values,
        })
    }
}

/// What a model said about one window.
///
/// Internally tagged: `{"kind":"class",...}` or `{"kind":"anomaly",...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum InferenceOutput {
    /// A classifier's answer: the winning label, its index, and every class's probability
    /// (in the order of the model manifest's labels).
    Class {
        label: String,
        class: u32,
        probabilities: Vec<f32>,
    },
    /// An anomaly detector's answer: the score, the threshold it was compared with, and the
    /// verdict (`score > threshold`).
    Anomaly {
        score: f32,
        threshold: f32,
        anomalous: bool,
    },
}

/// One model result inside an [`InferenceBatch`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferenceRecord {
    /// Sequence number in the *inference* stream (its own 1, 2, 3, ... so the fleet's
    /// durability ledger covers results exactly as it covers telemetry).
    pub seq: u64,
    /// Capture time of the window's last sample, microseconds since the Unix epoch.
    pub ts: u64,
    /// Capture time of the window's first sample.
    pub window_start: u64,
    /// Sequence number, in the source stream, of the window's last sample.
    pub source_seq: u64,
    /// The model that produced it (name and semver version from its bundle manifest).
    pub model: String,
    pub version: String,
    /// Time spent in the model for this window's batch, microseconds.
    pub latency_us: u32,
    pub output: InferenceOutput,
    /// Per-channel statistics of the window's raw input against the model's normalization
    /// (model monitoring's input drift). Absent from agents that predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<InputStats>,
    /// Set on the records of a capture stream (`{source}.{model}.capture`): the raw window the
    /// result is about, kept for labelling and retraining (docs/capture.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<Capture>,
}

/// Why a window was captured (`Capture::trigger`).
pub const CAPTURE_TRIGGERS: [&str; 3] = ["anomaly", "low_confidence", "sample"];

/// A captured window: what the model saw, raw (before normalization), `[channel][sample]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Capture {
    /// One of [`CAPTURE_TRIGGERS`].
    pub trigger: String,
    pub channels: u32,
    /// `channels × samples` values.
    pub window: Vec<f32>,
}

/// One window's input, per channel, in the model's normalized units: `mean_z[c] = (mean of
/// channel c - normalization.mean[c]) / normalization.std[c]` and `std_ratio[c] = (population
/// std of channel c) / normalization.std[c]` (`ember_bundle::baseline::window_stats`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputStats {
    pub mean_z: Vec<f32>,
    pub std_ratio: Vec<f32>,
}

/// Results of one inference stream, in increasing `seq` order, published on
/// `ember/v1/{device}/inference`.
///
/// An inference stream is named `{source}.{model}` (for example `imu.activity`): one per
/// source stream and model name, so its sequence survives model version changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferenceBatch {
    pub v: u32,
    pub device: String,
    /// The inference stream (`{source}.{model}`).
    pub stream: String,
    /// The sensor stream whose windows were evaluated.
    pub source: String,
    pub records: Vec<InferenceRecord>,
}

impl InferenceBatch {
    /// Checks the schema version, names, ordering and that every number is usable.
    pub fn validate(&self) -> Result<(), ProtoError> {
        check_version(self.v)?;
        crate::check_name(&self.device).map_err(|why| ProtoError::InvalidDeviceId {
            id: self.device.clone(),
            why,
        })?;
        for name in [&self.stream, &self.source] {
            crate::check_name(name).map_err(|why| ProtoError::InvalidStream {
                name: name.clone(),
                why,
            })?;
        }
        let bad = |detail: String| ProtoError::Malformed {
            encoding: "inference",
            detail,
        };
        let mut last = 0u64;
        for r in &self.records {
            if r.seq <= last {
                return Err(bad(alloc::format!(
                    "seq {} follows {} (must increase)",
                    r.seq,
                    last
                )));
            }
            last = r.seq;
            if r.window_start > r.ts {
                return Err(bad(alloc::format!(
                    "seq {}: window_start {} is after ts {}",
                    r.seq,
                    r.window_start,
                    r.ts
                )));
            }
            if r.model.is_empty() || r.version.is_empty() {
                return Err(bad(alloc::format!(
                    "seq {}: model name and version must not be empty",
                    r.seq
                )));
            }
            if let Some(i) = &r.input
                && (i.mean_z.len() != i.std_ratio.len()
                    || i.mean_z.iter().chain(&i.std_ratio).any(|v| !v.is_finite()))
            {
                return Err(bad(alloc::format!(
                    "seq {}: input statistics must be finite, one mean_z and std_ratio per channel",
                    r.seq
                )));
            }
            if let Some(c) = &r.capture {
                let channels = c.channels as usize;
                if !CAPTURE_TRIGGERS.contains(&c.trigger.as_str())
                    || channels == 0
                    || c.window.is_empty()
                    || c.window.len() % channels != 0
                    || c.window.len() > 1 << 20
                    || c.window.iter().any(|v| !v.is_finite())
                {
                    return Err(bad(alloc::format!(
                        "seq {}: a capture needs a trigger (anomaly, low_confidence, sample) and a window of channels × samples finite values",
                        r.seq
                    )));
                }
            }
            match &r.output {
                InferenceOutput::Class {
                    class,
                    probabilities,
                    ..
                } => {
                    if (*class as usize) >= probabilities.len() {
                        return Err(bad(alloc::format!(
                            "seq {}: class {} but only {} probabilities",
                            r.seq,
                            class,
                            probabilities.len()
                        )));
                    }
                    if probabilities.iter().any(|p| !p.is_finite()) {
                        return Err(bad(alloc::format!(
                            "seq {}: probabilities must be finite",
                            r.seq
                        )));
                    }
                }
                InferenceOutput::Anomaly {
                    score, threshold, ..
                } => {
                    if !score.is_finite() || !threshold.is_finite() {
                        return Err(bad(alloc::format!(
                            "seq {}: score and threshold must be finite",
                            r.seq
                        )));
                    }
                }
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceState {
    Online,
    Offline,
}

/// Size of the agent's durable queue.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QueueGauge {
    pub records: u64,
    /// Bytes of record data (keys + values) counted against the byte cap.
    pub bytes: u64,
    /// Bytes the queue's files take on disk.
    pub disk_bytes: u64,
}

/// Counters since the agent started (they reset on restart; the ledger uses per-stream
/// sequence numbers, which do not).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentCounters {
    /// Samples produced by sources.
    pub captured: u64,
    /// Records durably appended to the queue.
    pub enqueued: u64,
    /// Records published (a record re-sent after a reconnect counts again).
    pub sent: u64,
    /// Records delivered and deleted from the queue: covered by the fleet's commit watermark
    /// (end-to-end acknowledgement), or acknowledged by the broker (QoS1 PUBACK) when the
    /// agent deletes on PUBACK.
    pub acked: u64,
    /// Records evicted because the queue reached its byte cap.
    pub evicted_bytes: u64,
    /// Records evicted because they exceeded the maximum age.
    pub evicted_age: u64,
    /// Records evicted because the disk's free space fell below the queue's reserve.
    #[serde(default)]
    pub evicted_disk: u64,
    /// Stored records that failed their CRC and were skipped.
    pub corrupt: u64,
    /// Input lines or samples rejected by sources (malformed, wrong shape).
    pub rejected: u64,
    /// Successful (re)connections to the broker after the first.
    pub reconnects: u64,
    /// Records published but not yet acknowledged.
    pub in_flight: u64,
    /// Times the queue database could not be opened and was replaced by an empty one.
    pub queue_resets: u64,
    /// Records sent again because the fleet had not committed them in time.
    #[serde(default)]
    pub resent: u64,
}

/// A contiguous range of sequence numbers the agent evicted on purpose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvictedRange {
    pub from: u64,
    pub to: u64,
    /// `bytes` (byte cap), `age` (max age), `disk` (free-space reserve), `corrupt` (failed CRC)
    /// or `reset` (queue replaced).
    pub reason: String,
}

/// Per-stream view, the agent's side of the fleet's durability ledger.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamStatus {
    pub stream: String,
    /// The last sequence number assigned (0 when none yet): records 1..=last_seq were captured.
    pub last_seq: u64,
    /// Records of this stream still queued.
    pub queued: u64,
    /// The most recent ranges evicted on purpose (oldest first, bounded).
    #[serde(default)]
    pub evicted: Vec<EvictedRange>,
    /// The lowest sequence number still queued (absent when nothing is, and from agents that
    /// predate end-to-end acknowledgement). Everything below it has left the agent for good
    /// (delivered, evicted or corrupt) and can never be sent again, so the fleet's commit
    /// watermark may pass it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<u64>,
    /// The stream's schema: its channel count, fixed by the source's configuration or by the
    /// stream's first sample (absent for inference streams, for a stream with no sample yet,
    /// and from agents that predate stream schemas). Every record of the stream has exactly
    /// this many values; the fleet refuses telemetry that disagrees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<u32>,
}

/// Retained on `ember/v1/{device}/status`; the Last Will publishes the `offline` form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub v: u32,
    pub device: String,
    pub state: DeviceState,
    /// When this status was produced, microseconds since the epoch (0 in the Last Will,
    /// whose time is when the broker published it).
    pub ts: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// Active model name -> version.
    #[serde(default)]
    pub models: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueGauge>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counters: Option<AgentCounters>,
    #[serde(default)]
    pub streams: Vec<StreamStatus>,
    /// Over-the-air installs the fleet asked for, one entry per model (the latest desired
    /// version), see [`crate::ota`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ota: Vec<crate::ota::OtaReport>,
    /// When this agent deletes a record from its queue (see [`crate::commit`]). Absent from
    /// agents older than end-to-end acknowledgement, which delete on PUBACK.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<crate::commit::Delivery>,
}

impl Status {
    /// The Last Will: the broker publishes it, retained, when the agent vanishes.
    pub fn offline(device: &str) -> Self {
        Status {
            v: SCHEMA_VERSION,
            device: device.into(),
            state: DeviceState::Offline,
            ts: 0,
            agent_version: None,
            models: BTreeMap::new(),
            queue: None,
            counters: None,
            streams: Vec::new(),
            ota: Vec::new(),
            delivery: None,
        }
    }
}

/// Periodic liveness beacon on `ember/v1/{device}/heartbeat` (QoS0, not retained).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub v: u32,
    pub device: String,
    pub ts: u64,
    pub uptime_s: u64,
    pub queue_records: u64,
}

/// Any message, for subscribers that dispatch on the topic's channel.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Telemetry(TelemetryBatch),
    Inference(InferenceBatch),
    Status(Status),
    Heartbeat(Heartbeat),
}

fn check_version(v: u32) -> Result<(), ProtoError> {
    if v == SCHEMA_VERSION {
        Ok(())
    } else {
        Err(ProtoError::UnsupportedVersion {
            found: v,
            supported: SCHEMA_VERSION,
        })
    }
}

/// A payload encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    Json,
    Cbor,
}

impl Encoding {
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Json => "json",
            Encoding::Cbor => "cbor",
        }
    }

    /// Which encoding a payload declares: the CBOR self-describe tag, or a JSON object.
    pub fn sniff(payload: &[u8]) -> Result<Encoding, ProtoError> {
        if payload.is_empty() {
            return Err(ProtoError::Empty);
        }
        if payload.starts_with(&CBOR_MAGIC) {
            return Ok(Encoding::Cbor);
        }
        match payload.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{') => Ok(Encoding::Json),
            _ => Err(ProtoError::Malformed {
                encoding: "unknown",
                detail:
                    "payload is neither a JSON object nor CBOR with the self-describe tag d9d9f7"
                        .into(),
            }),
        }
    }
}

#[cfg(feature = "std")]
mod codec {
    use super::*;
    use serde::de::DeserializeOwned;

    #[derive(Deserialize)]
    struct VersionProbe {
        v: Option<u32>,
    }

    /// Encodes a message in the given encoding.
    pub fn encode<T: Serialize>(msg: &T, encoding: Encoding) -> Result<Vec<u8>, ProtoError> {
        match encoding {
            #[cfg(feature = "json")]
            Encoding::Json => serde_json::to_vec(msg).map_err(|e| ProtoError::Malformed {
                encoding: "json",
                detail: e.to_string(),
            }),
            #[cfg(feature = "cbor")]
            Encoding::Cbor => {
                let mut out = CBOR_MAGIC.to_vec();
                ciborium::ser::into_writer(msg, &mut out).map_err(|e| ProtoError::Malformed {
                    encoding: "cbor",
                    detail: e.to_string(),
                })?;
                Ok(out)
            }
            #[allow(unreachable_patterns)]
            other => Err(ProtoError::EncodingUnavailable(other.as_str())),
        }
    }

    fn decode_raw<T: DeserializeOwned>(payload: &[u8], enc: Encoding) -> Result<T, ProtoError> {
        match enc {
            #[cfg(feature = "json")]
            Encoding::Json => serde_json::from_slice(payload).map_err(|e| ProtoError::Malformed {
                encoding: "json",
                detail: e.to_string(),
            }),
            #[cfg(feature = "cbor")]
            Encoding::Cbor => {
                ciborium::de::from_reader(&payload[CBOR_MAGIC.len()..]).map_err(|e| {
                    ProtoError::Malformed {
                        encoding: "cbor",
                        detail: e.to_string(),
                    }
                })
            }
            #[allow(unreachable_patterns)]
            other => Err(ProtoError::EncodingUnavailable(other.as_str())),
        }
    }

    /// Decodes a payload whose encoding it sniffs. A payload from another schema version is
    /// reported as [`ProtoError::UnsupportedVersion`], not as malformed.
    pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<(T, Encoding), ProtoError> {
        let enc = Encoding::sniff(payload)?;
        match decode_raw::<T>(payload, enc) {
            Ok(v) => Ok((v, enc)),
            Err(e) => match decode_raw::<VersionProbe>(payload, enc) {
                Ok(VersionProbe { v: Some(v) }) if v != SCHEMA_VERSION => {
                    Err(ProtoError::UnsupportedVersion {
                        found: v,
                        supported: SCHEMA_VERSION,
                    })
                }
                _ => Err(e),
            },
        }
    }

    /// Decodes and validates a telemetry batch (version, names, seq order, CRCs).
    pub fn decode_telemetry(payload: &[u8]) -> Result<(TelemetryBatch, Encoding), ProtoError> {
        let (b, enc) = decode::<TelemetryBatch>(payload)?;
        b.validate()?;
        Ok((b, enc))
    }

    /// Decodes and validates an inference batch (version, names, seq order, numbers).
    pub fn decode_inference(payload: &[u8]) -> Result<(InferenceBatch, Encoding), ProtoError> {
        let (b, enc) = decode::<InferenceBatch>(payload)?;
        b.validate()?;
        Ok((b, enc))
    }

    /// Decodes a heartbeat and checks its version.
    pub fn decode_heartbeat(payload: &[u8]) -> Result<(Heartbeat, Encoding), ProtoError> {
        let (h, enc) = decode::<Heartbeat>(payload)?;
        check_version(h.v)?;
        Ok((h, enc))
    }

    /// Decodes and validates a desired state (version, names, digests, thresholds).
    pub fn decode_desired(
        payload: &[u8],
    ) -> Result<(crate::ota::DesiredState, Encoding), ProtoError> {
        let (d, enc) = decode::<crate::ota::DesiredState>(payload)?;
        check_version(d.v)?;
        d.validate()?;
        Ok((d, enc))
    }

    /// Decodes and validates a commit watermark (version, device id, stream names).
    pub fn decode_committed(
        payload: &[u8],
    ) -> Result<(crate::commit::Committed, Encoding), ProtoError> {
        let (c, enc) = decode::<crate::commit::Committed>(payload)?;
        check_version(c.v)?;
        c.validate()?;
        Ok((c, enc))
    }

    /// Decodes a status message and checks its version.
    pub fn decode_status(payload: &[u8]) -> Result<(Status, Encoding), ProtoError> {
        let (s, enc) = decode::<Status>(payload)?;
        check_version(s.v)?;
        Ok((s, enc))
    }
}

#[cfg(feature = "std")]
pub use codec::{
    decode, decode_committed, decode_desired, decode_heartbeat, decode_inference, decode_status,
    decode_telemetry, encode,
};

#[cfg(all(test, feature = "json", feature = "cbor"))]
mod tests {
    use super::*;

    fn batch() -> TelemetryBatch {
        let mut b = TelemetryBatch::new("dev-1", "imu");
        b.push(1, 1_700_000_000_000_000, alloc::vec![0.1, -2.5, 3.0]);
        b.push(2, 1_700_000_000_010_000, alloc::vec![0.2, -2.4, 3.1]);
        b
    }

    fn inference() -> InferenceBatch {
        InferenceBatch {
            v: SCHEMA_VERSION,
            device: "dev-1".into(),
            stream: "imu.activity".into(),
            source: "imu".into(),
            records: alloc::vec![
                InferenceRecord {
                    seq: 1,
                    ts: 1_700_000_010_000_000,
                    window_start: 1_700_000_000_100_000,
                    source_seq: 100,
                    model: "activity".into(),
                    version: "1.0.0".into(),
                    latency_us: 70,
                    output: InferenceOutput::Class {
                        label: "walking".into(),
                        class: 3,
                        probabilities: alloc::vec![0.01, 0.02, 0.03, 0.94],
                    },
                    input: Some(InputStats {
                        mean_z: alloc::vec![0.5, -1.25],
                        std_ratio: alloc::vec![1.0, 0.75],
                    }),
                    capture: Some(Capture {
                        trigger: "low_confidence".into(),
                        channels: 2,
                        window: alloc::vec![1.0, 2.0, 3.0, 4.0],
                    }),
                },
                InferenceRecord {
                    seq: 2,
                    ts: 1_700_000_020_000_000,
                    window_start: 1_700_000_010_100_000,
                    source_seq: 200,
                    model: "anomaly".into(),
                    version: "1.0.0".into(),
                    latency_us: 80,
                    output: InferenceOutput::Anomaly {
                        score: 0.7,
                        threshold: 0.5,
                        anomalous: true,
                    },
                    input: None,
                    capture: None,
                },
            ],
        }
    }

    #[test]
    fn inference_batches_round_trip_in_both_encodings() {
        for enc in [Encoding::Json, Encoding::Cbor] {
            let bytes = encode(&inference(), enc).unwrap();
            let (back, got) = decode_inference(&bytes).unwrap();
            assert_eq!(got, enc);
            assert_eq!(back, inference());
        }
        let json = String::from_utf8(encode(&inference(), Encoding::Json).unwrap()).unwrap();
        assert!(
            json.contains(r#""output":{"kind":"class","label":"walking""#),
            "{json}"
        );
        assert!(json.contains(r#""kind":"anomaly""#), "{json}");
    }

    #[test]
    fn inference_validation_names_the_problem() {
        let mut b = inference();
        b.records[1].seq = 1;
        let e = decode_inference(&encode(&b, Encoding::Json).unwrap()).unwrap_err();
        assert!(e.to_string().contains("seq 1 follows 1"), "{e}");

        let mut b = inference();
        if let InferenceOutput::Class { class, .. } = &mut b.records[0].output {
            *class = 9;
        }
        let e = decode_inference(&encode(&b, Encoding::Json).unwrap()).unwrap_err();
        assert!(e.to_string().contains("class 9 but only 4"), "{e}");

        let mut b = inference();
        b.stream = "a/b".into();
        assert!(matches!(
            decode_inference(&encode(&b, Encoding::Json).unwrap()),
            Err(ProtoError::InvalidStream { .. })
        ));

        let mut b = inference();
        b.v = 2;
        assert!(matches!(
            decode_inference(&encode(&b, Encoding::Json).unwrap()),
            Err(ProtoError::UnsupportedVersion { found: 2, .. })
        ));
    }

    #[test]
    fn heartbeats_decode_with_a_version_check() {
        let hb = Heartbeat {
            v: SCHEMA_VERSION,
            device: "dev-1".into(),
            ts: 1,
            uptime_s: 2,
            queue_records: 3,
        };
        let (back, _) = decode_heartbeat(&encode(&hb, Encoding::Cbor).unwrap()).unwrap();
        assert_eq!(back, hb);
        let old = Heartbeat { v: 7, ..hb };
        assert!(matches!(
            decode_heartbeat(&encode(&old, Encoding::Json).unwrap()),
            Err(ProtoError::UnsupportedVersion { found: 7, .. })
        ));
    }

    #[test]
    fn both_encodings_round_trip_and_declare_themselves() {
        for enc in [Encoding::Json, Encoding::Cbor] {
            let bytes = encode(&batch(), enc).unwrap();
            assert_eq!(Encoding::sniff(&bytes).unwrap(), enc);
            let (back, got) = decode_telemetry(&bytes).unwrap();
            assert_eq!(got, enc);
            assert_eq!(back, batch());
        }
        let json = encode(&batch(), Encoding::Json).unwrap();
        let cbor = encode(&batch(), Encoding::Cbor).unwrap();
        assert!(cbor.len() < json.len());
    }

    #[test]
    fn json_shape_is_stable() {
        let mut b = TelemetryBatch::new("d", "s");
        b.push(1, 2, alloc::vec![0.5]);
        let s = String::from_utf8(encode(&b, Encoding::Json).unwrap()).unwrap();
        assert_eq!(
            s,
            format!(
                r#"{{"v":1,"device":"d","stream":"s","records":[{{"seq":1,"ts":2,"values":[0.5],"crc":{}}}]}}"#,
                b.records[0].crc
            )
        );
        let st = String::from_utf8(encode(&Status::offline("d"), Encoding::Json).unwrap()).unwrap();
        assert_eq!(
            st,
            r#"{"v":1,"device":"d","state":"offline","ts":0,"models":{},"streams":[]}"#
        );
    }

    /// `StreamStatus.channels` (stream schemas) is an added field: absent when unknown, so a
    /// status from an older agent decodes to `None` and a new one round-trips in both encodings.
    #[test]
    fn stream_status_channels_is_optional_and_round_trips() {
        let old = br#"{"v":1,"device":"d","state":"online","ts":5,"models":{},"streams":[{"stream":"imu","last_seq":3,"queued":1}]}"#;
        let st: Status = decode(old).unwrap().0;
        assert_eq!(st.streams[0].channels, None);
        let mut st = st;
        st.streams[0].channels = Some(6);
        for enc in [Encoding::Json, Encoding::Cbor] {
            let bytes = encode(&st, enc).unwrap();
            let back: Status = decode(&bytes).unwrap().0;
            assert_eq!(back, st);
        }
        let json = String::from_utf8(encode(&st, Encoding::Json).unwrap()).unwrap();
        assert!(json.contains(r#""evicted":[],"channels":6}"#), "{json}");
        st.streams[0].channels = None;
        let json = String::from_utf8(encode(&st, Encoding::Json).unwrap()).unwrap();
        assert!(!json.contains("channels"), "{json}");
    }

    #[test]
    fn rejects_bad_payloads_with_reasons() {
        assert_eq!(decode_telemetry(b""), Err(ProtoError::Empty));
        assert!(matches!(
            decode_telemetry(b"garbage"),
            Err(ProtoError::Malformed { .. })
        ));
        assert!(matches!(
            decode_telemetry(b"{\"v\":1}"),
            Err(ProtoError::Malformed { .. })
        ));
        let v2 = br#"{"v":2,"device":"d","stream":"s","records":[],"new":true}"#;
        assert_eq!(
            decode_telemetry(v2),
            Err(ProtoError::UnsupportedVersion {
                found: 2,
                supported: 1
            })
        );
        let v2_other_shape = br#"{"v":2,"payload":"x"}"#;
        assert_eq!(
            decode_telemetry(v2_other_shape),
            Err(ProtoError::UnsupportedVersion {
                found: 2,
                supported: 1
            })
        );
        let mut bad = batch();
        bad.records[1].values[0] = 9.0;
        let bytes = encode(&bad, Encoding::Json).unwrap();
        assert!(matches!(
            decode_telemetry(&bytes),
            Err(ProtoError::RecordCrc { seq: 2, .. })
        ));
        let mut unordered = batch();
        unordered.records.swap(0, 1);
        assert!(matches!(
            unordered.validate(),
            Err(ProtoError::Malformed { .. })
        ));
        let mut bad_dev = batch();
        bad_dev.device = "a/b".into();
        assert!(matches!(
            bad_dev.validate(),
            Err(ProtoError::InvalidDeviceId { .. })
        ));
    }
}
