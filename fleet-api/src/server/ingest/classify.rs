//! From an MQTT publish to something the writer can store: a validated message, or a reject
//! with a reason. Pure functions, no I/O.
//!
//! Checks, in order: size (before any decoding), topic shape, encoding and schema version
//! (`ember-proto`'s decoders), names, sequence order and record CRCs (`TelemetryBatch::validate`),
//! that the payload's `device` is the topic's device (a device may only speak for itself: the
//! broker's ACL confines a device to its own topics, not its payloads), and that numbers fit the
//! database's signed 64-bit integers.

use ember_proto::message::{decode, decode_inference, decode_status, decode_telemetry};
use ember_proto::{
    Channel, Heartbeat, InferenceBatch, ProtoError, SCHEMA_VERSION, Status, TelemetryBatch, Topic,
};

/// A message that passed every check.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Telemetry(TelemetryBatch),
    Inference(InferenceBatch),
    Status(Status),
    Heartbeat(Heartbeat),
}

impl Item {
    pub fn device(&self) -> &str {
        match self {
            Item::Telemetry(b) => &b.device,
            Item::Inference(b) => &b.device,
            Item::Status(s) => &s.device,
            Item::Heartbeat(h) => &h.device,
        }
    }

    pub fn channel(&self) -> &'static str {
        match self {
            Item::Telemetry(_) => "telemetry",
            Item::Inference(_) => "inference",
            Item::Status(_) => "status",
            Item::Heartbeat(_) => "heartbeat",
        }
    }

    pub fn records(&self) -> usize {
        match self {
            Item::Telemetry(b) => b.records.len(),
            Item::Inference(b) => b.records.len(),
            _ => 0,
        }
    }
}

/// Why a message was refused. The string forms are the `reason` in metrics, the `rejects`
/// table and the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RejectReason {
    /// Larger than `ingest.max_payload_bytes`; not decoded.
    TooLarge,
    /// Not JSON/CBOR, missing fields, wrong types, seqs not increasing.
    Malformed,
    /// A schema version other than this build's.
    UnsupportedVersion,
    /// A record's envelope CRC does not match its contents.
    Crc,
    /// The payload's `device` is not the device in the topic.
    DeviceMismatch,
    /// A device id or stream name outside `[A-Za-z0-9._-]{1,64}`.
    InvalidName,
    /// A number the store cannot hold (seq or timestamp above 2^63-2), or an evicted range
    /// with `from > to` or `from = 0`.
    OutOfRange,
    /// A topic outside `ember/v1/<device>/<channel>`, or a channel the fleet does not ingest.
    BadTopic,
    /// Valid, but the database refused it repeatedly (see the service log).
    Storage,
    /// A telemetry batch whose records disagree with the stream's known channel count (its
    /// schema: from the agent's status, else from the first records stored), or with each
    /// other. Decided by the writer, which knows the stream.
    Schema,
}

impl RejectReason {
    pub const ALL: [RejectReason; 10] = [
        RejectReason::TooLarge,
        RejectReason::Malformed,
        RejectReason::UnsupportedVersion,
        RejectReason::Crc,
        RejectReason::DeviceMismatch,
        RejectReason::InvalidName,
        RejectReason::OutOfRange,
        RejectReason::BadTopic,
        RejectReason::Storage,
        RejectReason::Schema,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::TooLarge => "too_large",
            RejectReason::Malformed => "malformed",
            RejectReason::UnsupportedVersion => "unsupported_version",
            RejectReason::Crc => "crc",
            RejectReason::DeviceMismatch => "device_mismatch",
            RejectReason::InvalidName => "invalid_name",
            RejectReason::OutOfRange => "out_of_range",
            RejectReason::BadTopic => "bad_topic",
            RejectReason::Storage => "storage",
            RejectReason::Schema => "schema",
        }
    }

    pub fn parse(s: &str) -> Option<RejectReason> {
        RejectReason::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// A refused message, attributed to the device named by its topic.
#[derive(Debug, Clone, PartialEq)]
pub struct Reject {
    /// The topic's device id, or `_invalid` when the topic names none.
    pub device: String,
    pub reason: RejectReason,
    pub topic: String,
    /// A sentence for operators (no payload bytes).
    pub detail: String,
    /// The records a refused telemetry or inference message carried, when they can be told
    /// (the payload decodes, names a valid stream and the topic's device): the fleet settles
    /// them as `rejected`, so its commit watermark passes them and the agent stops re-sending
    /// a message that would be refused again (see `commits`).
    pub refused: Option<Box<Refused>>,
}

/// A range of records the fleet refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub stream: String,
    /// `telemetry` or `inference`.
    pub kind: &'static str,
    pub first: u64,
    pub last: u64,
}

/// The records of a telemetry or inference payload that failed validation, read without
/// validating (names and the device checked, seqs in range), or `None`.
fn refused_range(device: &str, channel: Channel, payload: &[u8]) -> Option<Box<Refused>> {
    #[derive(serde::Deserialize)]
    struct Seq {
        seq: u64,
    }
    #[derive(serde::Deserialize)]
    struct Loose {
        device: String,
        stream: String,
        #[serde(default)]
        records: Vec<Seq>,
    }
    let kind = match channel {
        Channel::Telemetry => "telemetry",
        Channel::Inference => "inference",
        _ => return None,
    };
    let (b, _) = decode::<Loose>(payload).ok()?;
    if b.device != device || ember_proto::check_name(&b.stream).is_err() {
        return None;
    }
    let first = b.records.iter().map(|r| r.seq).min()?;
    let last = b.records.iter().map(|r| r.seq).max()?;
    (first >= 1 && last <= I64_MAX).then(|| {
        Box::new(Refused {
            stream: b.stream,
            kind,
            first,
            last,
        })
    })
}

/// The device a reject is filed under when the topic has no valid device id.
pub const INVALID_DEVICE: &str = "_invalid";

/// Longest detail or topic kept for a reject.
const MAX_TEXT: usize = 256;

fn clip(s: &str) -> String {
    let mut out: String = s.chars().filter(|c| *c != '\0').take(MAX_TEXT).collect();
    if s.chars().count() > MAX_TEXT {
        out.push('…');
    }
    out
}

fn reason_for(e: &ProtoError) -> RejectReason {
    match e {
        ProtoError::UnsupportedVersion { .. } => RejectReason::UnsupportedVersion,
        ProtoError::RecordCrc { .. } => RejectReason::Crc,
        ProtoError::InvalidDeviceId { .. } | ProtoError::InvalidStream { .. } => {
            RejectReason::InvalidName
        }
        ProtoError::InvalidTopic { .. } => RejectReason::BadTopic,
        _ => RejectReason::Malformed,
    }
}

/// The largest sequence number or timestamp accepted: the store's signed 64-bit integers, less
/// one so that `seq + 1` (the ledger's sentinel) cannot overflow.
const I64_MAX: u64 = i64::MAX as u64 - 1;

/// Checks one publish. `max_bytes` is `ingest.max_payload_bytes`.
pub fn classify(topic: &str, payload: &[u8], max_bytes: usize) -> Result<Item, Reject> {
    let parsed = Topic::parse(topic);
    let device = match &parsed {
        Ok(t) => t.device_id.clone(),
        Err(_) => INVALID_DEVICE.to_string(),
    };
    let reject = |reason: RejectReason, detail: String| Reject {
        device: device.clone(),
        reason,
        topic: clip(topic),
        detail: clip(&detail),
        refused: None,
    };
    if payload.len() > max_bytes {
        return Err(reject(
            RejectReason::TooLarge,
            format!(
                "payload of {} bytes exceeds ingest.max_payload_bytes ({max_bytes})",
                payload.len()
            ),
        ));
    }
    let topic_parsed = parsed.map_err(|e| reject(RejectReason::BadTopic, e.to_string()))?;
    // A data message that decodes but fails validation (a record's CRC, non-increasing seqs,
    // another schema version) would fail again if sent again: say which records it carried.
    let from_proto = |e: ProtoError| Reject {
        refused: match e {
            ProtoError::RecordCrc { .. }
            | ProtoError::Malformed { .. }
            | ProtoError::UnsupportedVersion { .. } => {
                refused_range(&topic_parsed.device_id, topic_parsed.channel, payload)
            }
            _ => None,
        },
        ..reject(reason_for(&e), e.to_string())
    };
    let mismatch = |claimed: &str| {
        reject(
            RejectReason::DeviceMismatch,
            format!(
                "payload names device {:?} but was published on the topic of {:?}",
                clip(claimed),
                topic_parsed.device_id
            ),
        )
    };
    match topic_parsed.channel {
        Channel::Telemetry => {
            let (batch, _) = decode_telemetry(payload).map_err(from_proto)?;
            if batch.device != topic_parsed.device_id {
                return Err(mismatch(&batch.device));
            }
            if let Some(r) = batch
                .records
                .iter()
                .find(|r| r.seq > I64_MAX || r.ts > I64_MAX)
            {
                return Err(reject(
                    RejectReason::OutOfRange,
                    format!("record seq {} ts {} exceeds 2^63-2", r.seq, r.ts),
                ));
            }
            Ok(Item::Telemetry(batch))
        }
        Channel::Status => {
            let (status, _) = decode_status(payload).map_err(from_proto)?;
            if status.device != topic_parsed.device_id {
                return Err(mismatch(&status.device));
            }
            if status.ts > I64_MAX {
                return Err(reject(
                    RejectReason::OutOfRange,
                    format!("status ts {} exceeds 2^63-2", status.ts),
                ));
            }
            for s in &status.streams {
                if let Err(why) = ember_proto::check_name(&s.stream) {
                    return Err(reject(
                        RejectReason::InvalidName,
                        format!("stream name {:?}: {why}", clip(&s.stream)),
                    ));
                }
                if s.last_seq > I64_MAX || s.queued > I64_MAX {
                    return Err(reject(
                        RejectReason::OutOfRange,
                        format!("stream {:?}: last_seq or queued exceeds 2^63-2", s.stream),
                    ));
                }
                if let Some(r) = s
                    .evicted
                    .iter()
                    .find(|r| r.from == 0 || r.from > r.to || r.to > I64_MAX)
                {
                    return Err(reject(
                        RejectReason::OutOfRange,
                        format!(
                            "stream {:?}: evicted range {}..={} is not a range of sequence numbers",
                            s.stream, r.from, r.to
                        ),
                    ));
                }
            }
            Ok(Item::Status(status))
        }
        Channel::Heartbeat => {
            let (hb, _) = decode::<Heartbeat>(payload).map_err(from_proto)?;
            if hb.v != SCHEMA_VERSION {
                return Err(from_proto(ProtoError::UnsupportedVersion {
                    found: hb.v,
                    supported: SCHEMA_VERSION,
                }));
            }
            if hb.device != topic_parsed.device_id {
                return Err(mismatch(&hb.device));
            }
            if hb.ts > I64_MAX || hb.uptime_s > I64_MAX || hb.queue_records > I64_MAX {
                return Err(reject(
                    RejectReason::OutOfRange,
                    "heartbeat number exceeds 2^63-2".into(),
                ));
            }
            Ok(Item::Heartbeat(hb))
        }
        Channel::Inference => {
            let (batch, _) = decode_inference(payload).map_err(from_proto)?;
            if batch.device != topic_parsed.device_id {
                return Err(mismatch(&batch.device));
            }
            if let Some(r) = batch.records.iter().find(|r| {
                r.seq > I64_MAX
                    || r.ts > I64_MAX
                    || r.window_start > I64_MAX
                    || r.source_seq > I64_MAX
            }) {
                return Err(reject(
                    RejectReason::OutOfRange,
                    format!("result seq {} ts {} exceeds 2^63-2", r.seq, r.ts),
                ));
            }
            if let Some(r) = batch.records.iter().find(|r| {
                r.model.len() > MAX_TEXT
                    || r.version.len() > MAX_TEXT
                    || matches!(&r.output, ember_proto::InferenceOutput::Class { label, .. } if label.len() > MAX_TEXT)
            }) {
                return Err(reject(
                    RejectReason::Malformed,
                    format!("result seq {}: model, version or label longer than {MAX_TEXT} bytes", r.seq),
                ));
            }
            Ok(Item::Inference(batch))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_proto::message::encode;
    use ember_proto::{Encoding, EvictedRange, StreamStatus};

    fn batch(device: &str) -> TelemetryBatch {
        let mut b = TelemetryBatch::new(device, "imu");
        b.push(1, 10, vec![1.0, 2.0]);
        b.push(2, 20, vec![3.0, 4.0]);
        b
    }

    fn reason(topic: &str, payload: &[u8]) -> RejectReason {
        classify(topic, payload, 4096)
            .expect_err("should be rejected")
            .reason
    }

    #[test]
    fn accepts_valid_messages_in_both_encodings() {
        for enc in [Encoding::Json, Encoding::Cbor] {
            let p = encode(&batch("d1"), enc).unwrap();
            assert_eq!(
                classify("ember/v1/d1/telemetry", &p, 4096).unwrap(),
                Item::Telemetry(batch("d1"))
            );
            let s = Status::offline("d1");
            let p = encode(&s, enc).unwrap();
            assert_eq!(
                classify("ember/v1/d1/status", &p, 4096).unwrap(),
                Item::Status(s)
            );
        }
    }

    #[test]
    fn inference_results_are_accepted_or_rejected_with_reasons() {
        let payload = |device: &str, class: u32| {
            format!(
                r#"{{"v":1,"device":"{device}","stream":"imu.activity","source":"imu","records":[
                {{"seq":1,"ts":20,"window_start":10,"source_seq":5,"model":"activity","version":"1.0.0",
                  "latency_us":70,"output":{{"kind":"class","label":"walking","class":{class},"probabilities":[0.1,0.9]}}}},
                {{"seq":2,"ts":30,"window_start":20,"source_seq":9,"model":"anomaly","version":"1.0.0",
                  "latency_us":80,"output":{{"kind":"anomaly","score":0.7,"threshold":0.5,"anomalous":true}}}}]}}"#
            )
        };
        match classify("ember/v1/d1/inference", payload("d1", 1).as_bytes(), 4096) {
            Ok(Item::Inference(b)) => {
                assert_eq!((b.stream.as_str(), b.records.len()), ("imu.activity", 2))
            }
            other => panic!("expected an inference batch, got {other:?}"),
        }
        assert_eq!(
            reason("ember/v1/d2/inference", payload("d1", 1).as_bytes()),
            RejectReason::DeviceMismatch
        );
        assert_eq!(
            reason("ember/v1/d1/inference", payload("d1", 7).as_bytes()),
            RejectReason::Malformed
        );
        let long = payload("d1", 1).replace("\"walking\"", &format!("\"{}\"", "x".repeat(300)));
        assert_eq!(
            reason("ember/v1/d1/inference", long.as_bytes()),
            RejectReason::Malformed
        );
    }

    #[test]
    fn rejects_with_reasons() {
        let ok = encode(&batch("d1"), Encoding::Json).unwrap();
        assert_eq!(
            classify("ember/v1/d1/telemetry", &ok, 10)
                .unwrap_err()
                .reason,
            RejectReason::TooLarge
        );
        assert_eq!(
            reason("ember/v1/d1/telemetry", b"garbage"),
            RejectReason::Malformed
        );
        assert_eq!(
            reason("ember/v1/d1/telemetry", b""),
            RejectReason::Malformed
        );
        assert_eq!(
            reason(
                "ember/v1/d1/telemetry",
                br#"{"v":2,"device":"d1","stream":"s","records":[]}"#
            ),
            RejectReason::UnsupportedVersion
        );
        assert_eq!(
            reason("ember/v1/d2/telemetry", &ok),
            RejectReason::DeviceMismatch
        );
        let mut bad = batch("d1");
        bad.records[0].values[0] = 9.0;
        assert_eq!(
            reason(
                "ember/v1/d1/telemetry",
                &encode(&bad, Encoding::Json).unwrap()
            ),
            RejectReason::Crc
        );
        let r = classify("ember/v1/d1 x/telemetry", &ok, 4096).unwrap_err();
        assert_eq!(
            (r.reason, r.device.as_str()),
            (RejectReason::BadTopic, INVALID_DEVICE)
        );
        let mut big = TelemetryBatch::new("d1", "imu");
        big.push(u64::MAX, 1, vec![]);
        assert_eq!(
            reason(
                "ember/v1/d1/telemetry",
                &encode(&big, Encoding::Json).unwrap()
            ),
            RejectReason::OutOfRange
        );
        let mut st = Status::offline("d1");
        st.ts = 5;
        st.streams.push(StreamStatus {
            head: None,
            channels: None,
            stream: "imu".into(),
            last_seq: 10,
            queued: 0,
            evicted: vec![EvictedRange {
                from: 5,
                to: 4,
                reason: "bytes".into(),
            }],
        });
        assert_eq!(
            reason("ember/v1/d1/status", &encode(&st, Encoding::Json).unwrap()),
            RejectReason::OutOfRange
        );
        assert_eq!(
            reason(
                "ember/v1/d1/heartbeat",
                br#"{"v":3,"device":"d1","ts":1,"uptime_s":1,"queue_records":0}"#
            ),
            RejectReason::UnsupportedVersion
        );
        for r in RejectReason::ALL {
            assert_eq!(RejectReason::parse(r.as_str()), Some(r));
        }
    }
}
