//! Ember's wire contract, shared by the agent, the fleet and (later) the MCU firmware.
//!
//! * [`topic`]: the MQTT topic scheme `ember/v1/{device_id}/{channel}`.
//! * [`record`]: the record envelope (device, stream, per-stream sequence number, capture
//!   timestamp, CRC32) and the compact binary form the agent stores on disk.
//! * [`acl`]: the broker ACL (per-device topic confinement) the topic scheme implies.
//! * [`commit`]: the fleet's commit watermark (end-to-end acknowledgement) and the delivery
//!   modes.
//! * [`ota`]: the desired-model state the fleet sends and the OTA reports agents return.
//! * `node` (feature `node`): the serial link between a sensor node (`firmware/`) and the
//!   agent's `serial` source: postcard + COBS + CRC-32C frames, no allocation.
//! * [`message`]: versioned messages (telemetry and inference batches, status, heartbeat) and their
//!   JSON / CBOR encodings.
//!
//! The crate is `no_std` without the `std` feature so firmware can share it: everything but
//! `node` needs `alloc` (feature `alloc`); `node` alone needs no allocator, so a sensor node
//! links none.
#![cfg_attr(not(feature = "std"), no_std)]

#[cfg(feature = "alloc")]
extern crate alloc;

#[cfg(feature = "alloc")]
pub mod acl;
#[cfg(feature = "alloc")]
pub mod commit;
#[cfg(feature = "alloc")]
pub mod message;
#[cfg(feature = "node")]
pub mod node;
#[cfg(feature = "alloc")]
pub mod ota;
#[cfg(feature = "alloc")]
pub mod record;
#[cfg(feature = "alloc")]
pub mod topic;

#[cfg(feature = "alloc")]
pub use commit::{Committed, CommittedStream, Delivery};
#[cfg(feature = "alloc")]
pub use message::{
    AgentCounters, CAPTURE_TRIGGERS, Capture, DeviceState, Encoding, EvictedRange, Heartbeat,
    InferenceBatch, InferenceOutput, InferenceRecord, InputStats, Message, QueueGauge,
    SCHEMA_VERSION, Status, StreamStatus, TelemetryBatch, WireRecord,
};
#[cfg(feature = "alloc")]
pub use ota::{DesiredModel, DesiredState, OtaReport, OtaState, ShadowPolicy};
#[cfg(feature = "alloc")]
pub use record::{Record, StoredRecord};
#[cfg(feature = "alloc")]
pub use topic::{Channel, Topic};

#[cfg(feature = "alloc")]
/// Everything that can go wrong decoding or validating Ember data.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ProtoError {
    #[error("invalid device id {id:?}: {why} (use 1-64 characters from A-Z a-z 0-9 - _ .)")]
    InvalidDeviceId {
        id: alloc::string::String,
        why: &'static str,
    },
    #[error("invalid stream name {name:?}: {why} (use 1-64 characters from A-Z a-z 0-9 - _ .)")]
    InvalidStream {
        name: alloc::string::String,
        why: &'static str,
    },
    #[error(
        "topic {topic:?} is not an Ember v1 topic: {why} (expected ember/v1/<device_id>/<channel>)"
    )]
    InvalidTopic {
        topic: alloc::string::String,
        why: &'static str,
    },
    #[error("stored record is truncated: needed {needed} bytes, found {found}")]
    Truncated { needed: usize, found: usize },
    #[error("stored record checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum { stored: u32, computed: u32 },
    #[error(
        "record {seq} of stream {stream:?} has a bad CRC32 (sent {sent:#010x}, computed {computed:#010x})"
    )]
    RecordCrc {
        stream: alloc::string::String,
        seq: u64,
        sent: u32,
        computed: u32,
    },
    #[error("unsupported schema version {found} (this build understands {supported})")]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("malformed {encoding} payload: {detail}")]
    Malformed {
        encoding: &'static str,
        detail: alloc::string::String,
    },
    #[error("payload is empty")]
    Empty,
    #[error("encoding {0} is not compiled into this build")]
    EncodingUnavailable(&'static str),
}

#[cfg(feature = "alloc")]
/// Validates a name used as a device id or stream name: 1-64 bytes of `[A-Za-z0-9._-]`.
///
/// Keeping names out of MQTT's special characters (`/ + #`) is what makes the per-device
/// topic authorization (`ember/v1/%u/...`) sound.
pub fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("it is empty");
    }
    if name.len() > 64 {
        return Err("it is longer than 64 bytes");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err("it contains a character outside A-Z a-z 0-9 - _ .");
    }
    Ok(())
}
