//! The record envelope and its stored (on-disk) binary form.
//!
//! A [`Record`] is one multichannel sample of one stream: `(stream, seq, ts_us, values)`.
//! Together with the device id it forms the envelope whose CRC32 travels on the wire
//! ([`Record::crc32`]); the fleet recomputes it to detect corruption anywhere between the
//! agent's queue and its database.
//!
//! **Invariant:** `seq` is assigned by the agent's durable queue, starts at 1 and increases by
//! exactly one per record within a stream, across restarts. A gap therefore means a record was
//! evicted or lost, and `(device_id, stream, seq)` identifies a record uniquely (idempotency key).

use alloc::vec::Vec;

use crate::ProtoError;

/// One sample of a stream.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    pub stream: alloc::string::String,
    pub seq: u64,
    /// Capture time, microseconds since the Unix epoch (UTC).
    pub ts_us: u64,
    pub values: Vec<f32>,
}

impl Record {
    /// CRC32 (IEEE) of the envelope, computed over
    /// `device_id 0x00 stream 0x00 seq:u64le ts_us:u64le values:f32le*`.
    pub fn crc32(&self, device_id: &str) -> u32 {
        envelope_crc(device_id, &self.stream, self.seq, self.ts_us, &self.values)
    }
}

/// The envelope CRC for the given fields; see [`Record::crc32`].
pub fn envelope_crc(device_id: &str, stream: &str, seq: u64, ts_us: u64, values: &[f32]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(device_id.as_bytes());
    h.update(&[0]);
    h.update(stream.as_bytes());
    h.update(&[0]);
    h.update(&seq.to_le_bytes());
    h.update(&ts_us.to_le_bytes());
    for v in values {
        h.update(&v.to_le_bytes());
    }
    h.finalize()
}

/// The value the agent's queue stores for one record, keyed elsewhere by (stream, seq).
///
/// Layout (little-endian): `crc32:u32 | version:u8 = 1 | ts_us:u64 | n:u16 | n × f32`.
/// The CRC covers the storage key followed by everything after the CRC field, so a record
/// that is damaged, truncated, or found under the wrong key fails [`StoredRecord::decode`].
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRecord {
    pub ts_us: u64,
    pub values: Vec<f32>,
}

const STORED_VERSION: u8 = 1;
const HEADER: usize = 4 + 1 + 8 + 2;

impl StoredRecord {
    /// Maximum channels per record (the `n` field is a u16).
    pub const MAX_VALUES: usize = u16::MAX as usize;

    /// Size of the encoded value for `n` channels.
    pub fn encoded_len(n: usize) -> usize {
        HEADER + 4 * n
    }

    pub fn encode(key: &[u8], ts_us: u64, values: &[f32]) -> Vec<u8> {
        let n = values.len().min(Self::MAX_VALUES);
        let mut out = Vec::with_capacity(Self::encoded_len(n));
        out.extend_from_slice(&[0; 4]);
        out.push(STORED_VERSION);
        out.extend_from_slice(&ts_us.to_le_bytes());
        out.extend_from_slice(&(n as u16).to_le_bytes());
        for v in &values[..n] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        let crc = stored_crc(key, &out[4..]);
        out[..4].copy_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn decode(key: &[u8], bytes: &[u8]) -> Result<Self, ProtoError> {
        if bytes.len() < HEADER {
            return Err(ProtoError::Truncated {
                needed: HEADER,
                found: bytes.len(),
            });
        }
        let stored = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let computed = stored_crc(key, &bytes[4..]);
        if stored != computed {
            return Err(ProtoError::Checksum { stored, computed });
        }
        if bytes[4] != STORED_VERSION {
            return Err(ProtoError::UnsupportedVersion {
                found: u32::from(bytes[4]),
                supported: 1,
            });
        }
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&bytes[5..13]);
        let n = usize::from(u16::from_le_bytes([bytes[13], bytes[14]]));
        let needed = HEADER + 4 * n;
        if bytes.len() != needed {
            return Err(ProtoError::Truncated {
                needed,
                found: bytes.len(),
            });
        }
        let values = bytes[HEADER..]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(StoredRecord {
            ts_us: u64::from_le_bytes(ts),
            values,
        })
    }
}

fn stored_crc(key: &[u8], body: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(key);
    h.update(body);
    h.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn stored_round_trip(key in proptest::collection::vec(any::<u8>(), 0..16), ts in any::<u64>(),
                             values in proptest::collection::vec(-1e6f32..1e6, 0..64)) {
            let enc = StoredRecord::encode(&key, ts, &values);
            prop_assert_eq!(enc.len(), StoredRecord::encoded_len(values.len()));
            let dec = StoredRecord::decode(&key, &enc).unwrap();
            prop_assert_eq!(dec, StoredRecord { ts_us: ts, values });
        }

        #[test]
        fn any_single_bit_flip_is_detected(values in proptest::collection::vec(-1e3f32..1e3, 1..16),
                                           bit in any::<prop::sample::Index>()) {
            let key = b"k";
            let mut enc = StoredRecord::encode(key, 42, &values);
            let i = bit.index(enc.len() * 8);
            enc[i / 8] ^= 1 << (i % 8);
            prop_assert!(StoredRecord::decode(key, &enc).is_err());
        }
    }

    #[test]
    fn truncation_and_wrong_key_are_detected() {
        let enc = StoredRecord::encode(b"a", 1, &[1.0, 2.0]);
        assert!(matches!(
            StoredRecord::decode(b"a", &enc[..enc.len() - 1]),
            Err(ProtoError::Checksum { .. })
        ));
        assert!(matches!(
            StoredRecord::decode(b"a", &enc[..3]),
            Err(ProtoError::Truncated { .. })
        ));
        assert!(matches!(
            StoredRecord::decode(b"b", &enc),
            Err(ProtoError::Checksum { .. })
        ));
    }

    #[test]
    fn envelope_crc_is_stable() {
        // Pinned so that the fleet, the agent and the firmware never silently diverge.
        let r = Record {
            stream: "imu".into(),
            seq: 7,
            ts_us: 1_700_000_000_000_000,
            values: alloc::vec![0.5, -1.0],
        };
        assert_eq!(
            r.crc32("dev-1"),
            envelope_crc("dev-1", "imu", 7, 1_700_000_000_000_000, &[0.5, -1.0])
        );
        let other = Record {
            seq: 8,
            ..r.clone()
        };
        assert_ne!(r.crc32("dev-1"), other.crc32("dev-1"));
        assert_ne!(r.crc32("dev-1"), r.crc32("dev-2"));
    }
}
