//! The stored form of the queue: keys, stream metadata and the two record versions (see the
//! module docs of `queue` for the layout). Pure encoding and decoding, no storage.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use ember_proto::{EvictedRange, InferenceRecord, ProtoError, StoredRecord};

use super::StreamId;
use crate::source::Sample;

/// Key tag of a stored record: `'r' stream_id:u32be seq:u64be`.
pub(super) const RECORD_TAG: u8 = b'r';
/// Key tag of a stream's metadata: `'m' stream_id:u32be`.
pub(super) const META_TAG: u8 = b'm';
pub(super) const KEY_LEN: usize = 13;

pub(super) fn record_key(sid: StreamId, seq: u64) -> [u8; KEY_LEN] {
    let mut k = [0u8; KEY_LEN];
    k[0] = RECORD_TAG;
    k[1..5].copy_from_slice(&sid.to_be_bytes());
    k[5..13].copy_from_slice(&seq.to_be_bytes());
    k
}

pub(super) fn parse_record_key(k: &[u8]) -> Option<(StreamId, u64)> {
    if k.len() != KEY_LEN || k[0] != RECORD_TAG {
        return None;
    }
    let sid = u32::from_be_bytes(k[1..5].try_into().ok()?);
    let seq = u64::from_be_bytes(k[5..13].try_into().ok()?);
    Some((sid, seq))
}

pub(super) fn meta_key(sid: StreamId) -> Vec<u8> {
    let mut k = vec![META_TAG];
    k.extend_from_slice(&sid.to_be_bytes());
    k
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct StreamMeta {
    pub(super) name: String,
    pub(super) next_seq: u64,
    #[serde(default)]
    pub(super) evicted: Vec<EvictedRange>,
    /// The stream's schema: the channel count of its first sample (absent for inference
    /// streams and for metadata written before schemas existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) channels: Option<u32>,
    /// The source's position of the stream's latest record ([`Enqueue::origin`]), written in
    /// the same batch as that record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) origin: Option<u64>,
}

pub(super) fn meta_json(m: &StreamMeta) -> Vec<u8> {
    serde_json::to_vec(m).unwrap_or_default()
}

/// Bytes a sample of `channels` values counts against the byte cap (key + value).
pub(super) fn record_size(channels: usize) -> u64 {
    (KEY_LEN + StoredRecord::encoded_len(channels.min(StoredRecord::MAX_VALUES))) as u64
}

/// Records read for sending: `(seq, record)` in increasing `seq` order.
pub type ReadBatch = Vec<(u64, QueuedRecord)>;

/// Version byte of a stored inference result (see the module docs).
pub(super) const INFERENCE_VERSION: u8 = 2;
/// Header of a v2 value: crc, version, ts_us, payload length.
pub(super) const INFERENCE_HEADER: usize = 4 + 1 + 8 + 4;

/// A stored record as read back: a sample (`values`), or an inference result.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedRecord {
    pub ts_us: u64,
    /// A sample's values (empty for an inference result).
    pub values: Vec<f32>,
    pub inference: Option<StoredInference>,
}

/// The payload of a v2 record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredInference {
    /// The sensor stream whose window was evaluated.
    pub source: String,
    pub record: InferenceRecord,
}

/// Something the queue can store: it names its stream and encodes its value under a key.
pub trait Enqueue {
    fn stream(&self) -> &Arc<str>;
    /// The encoded value (with its CRC over `key`).
    fn encode(&self, key: &[u8]) -> Vec<u8>;
    /// Bytes it counts against the byte cap (key + value).
    fn size(&self) -> u64;
    /// A sample's channel count (what fixes its stream's schema); `None` for other records.
    fn channels(&self) -> Option<usize> {
        None
    }
    /// Where the record came from in its source's own numbering (the serial source: the node's
    /// boot and seq), so the source can resume after a crash from what is durably queued.
    fn origin(&self) -> Option<u64> {
        None
    }
}

impl Enqueue for Sample {
    fn stream(&self) -> &Arc<str> {
        &self.stream
    }
    fn encode(&self, key: &[u8]) -> Vec<u8> {
        StoredRecord::encode(key, self.ts_us, &self.values)
    }
    fn size(&self) -> u64 {
        record_size(self.values.len())
    }
    fn channels(&self) -> Option<usize> {
        Some(self.values.len())
    }
    fn origin(&self) -> Option<u64> {
        self.origin
    }
}

/// An inference result on its way into the queue (stream `{source}.{model}`).
#[derive(Debug, Clone, PartialEq)]
pub struct InferenceItem {
    pub stream: Arc<str>,
    pub ts_us: u64,
    /// The JSON of a [`StoredInference`].
    pub payload: Vec<u8>,
}

impl InferenceItem {
    pub fn new(stream: Arc<str>, stored: &StoredInference) -> Result<Self, serde_json::Error> {
        Ok(InferenceItem {
            stream,
            ts_us: stored.record.ts,
            payload: serde_json::to_vec(stored)?,
        })
    }
}

impl Enqueue for InferenceItem {
    fn stream(&self) -> &Arc<str> {
        &self.stream
    }
    fn encode(&self, key: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(INFERENCE_HEADER + self.payload.len());
        out.extend_from_slice(&[0; 4]);
        out.push(INFERENCE_VERSION);
        out.extend_from_slice(&self.ts_us.to_le_bytes());
        // A payload is a few hundred bytes; u32 cannot overflow for anything we produce.
        out.extend_from_slice(&(self.payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.payload);
        let mut h = crc32fast::Hasher::new();
        h.update(key);
        h.update(&out[4..]);
        let crc = h.finalize();
        out[..4].copy_from_slice(&crc.to_le_bytes());
        out
    }
    fn size(&self) -> u64 {
        (KEY_LEN + INFERENCE_HEADER + self.payload.len()) as u64
    }
}

/// Decodes a stored value of either version (see the module docs).
pub fn decode_value(key: &[u8], bytes: &[u8]) -> Result<QueuedRecord, ProtoError> {
    if bytes.get(4) != Some(&INFERENCE_VERSION) {
        return StoredRecord::decode(key, bytes).map(|r| QueuedRecord {
            ts_us: r.ts_us,
            values: r.values,
            inference: None,
        });
    }
    if bytes.len() < INFERENCE_HEADER {
        return Err(ProtoError::Truncated {
            needed: INFERENCE_HEADER,
            found: bytes.len(),
        });
    }
    let stored = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let mut h = crc32fast::Hasher::new();
    h.update(key);
    h.update(&bytes[4..]);
    let computed = h.finalize();
    if stored != computed {
        return Err(ProtoError::Checksum { stored, computed });
    }
    let mut ts = [0u8; 8];
    ts.copy_from_slice(&bytes[5..13]);
    let len = u32::from_le_bytes([bytes[13], bytes[14], bytes[15], bytes[16]]) as usize;
    let needed = INFERENCE_HEADER + len;
    if bytes.len() != needed {
        return Err(ProtoError::Truncated {
            needed,
            found: bytes.len(),
        });
    }
    let inference: StoredInference =
        serde_json::from_slice(&bytes[INFERENCE_HEADER..]).map_err(|e| ProtoError::Malformed {
            encoding: "stored inference",
            detail: e.to_string(),
        })?;
    Ok(QueuedRecord {
        ts_us: u64::from_le_bytes(ts),
        values: Vec::new(),
        inference: Some(inference),
    })
}

/// The lowest sequence number stored for `sid`, if any.
pub(super) fn first_key<E: super::Engine>(
    engine: &E,
    sid: super::StreamId,
) -> Result<Option<u64>, super::QueueError> {
    let head = engine.scan(&record_key(sid, 0), &record_key(sid, u64::MAX), 1)?;
    Ok(head
        .first()
        .and_then(|(k, _)| parse_record_key(k))
        .map(|(_, s)| s))
}
