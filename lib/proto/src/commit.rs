//! End-to-end acknowledgement: the fleet tells each device which of its records are committed
//! to the fleet's database (`docs/protocol.md`, "End-to-end acknowledgement").
//!
//! * [`Committed`]: the commit watermark, retained on `ember/v1/{device}/committed`, written
//!   only by the fleet identity (the broker ACL lets a device read its own `committed` topic
//!   and write none of the fleet's). Per stream, `upto` is the highest sequence number such
//!   that every record `1..=upto` is committed to the fleet's database, or was reported
//!   evicted by the agent, or lies below the fleet's retention floor: nothing the agent still
//!   holds at or below it can ever be needed again.
//! * [`Delivery`]: how a device decides that a record may be deleted from its queue, reported
//!   in its [`crate::Status`] (`status.delivery`), so the fleet knows which mode each device
//!   uses.
//!
//! **Invariant:** a watermark never decreases for a (device, stream) as long as the fleet's
//! database is not restored from an older backup; an agent therefore treats a lower value as
//! stale and keeps what it has (it never re-creates deleted records, it only keeps more).

use alloc::string::String;
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

use crate::{ProtoError, SCHEMA_VERSION, check_name};

/// The channel on which the fleet publishes a device's commit watermark.
pub const COMMITTED: &str = "committed";

/// Largest number of streams one watermark message may name.
pub const MAX_COMMITTED_STREAMS: usize = 4096;

/// When a device deletes a record from its queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Delivery {
    /// When the broker acknowledges (PUBACK) the message that carried it: the broker is
    /// trusted to keep it until the fleet has it (agents before end-to-end acknowledgement).
    Puback,
    /// When the fleet's commit watermark covers it ([`Committed`]).
    Commit,
}

impl Delivery {
    pub fn as_str(self) -> &'static str {
        match self {
            Delivery::Puback => "puback",
            Delivery::Commit => "commit",
        }
    }
}

/// The fleet's commit watermark for one device. Retained, on `ember/v1/{device}/committed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Committed {
    pub v: u32,
    pub device: String,
    /// When the fleet produced it, microseconds since the epoch (the fleet's clock).
    pub ts: u64,
    /// One entry per stream the fleet knows for this device.
    #[serde(default)]
    pub streams: Vec<CommittedStream>,
}

/// The watermark of one stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommittedStream {
    pub stream: String,
    /// Every record `1..=upto` of this stream is committed (or explained, see the module).
    pub upto: u64,
}

impl Committed {
    pub fn new(device: &str, ts: u64) -> Self {
        Committed {
            v: SCHEMA_VERSION,
            device: device.into(),
            ts,
            streams: Vec::new(),
        }
    }

    /// Checks the device id, the stream names and that no stream is named twice.
    pub fn validate(&self) -> Result<(), ProtoError> {
        check_name(&self.device).map_err(|why| ProtoError::InvalidDeviceId {
            id: self.device.clone(),
            why,
        })?;
        if self.streams.len() > MAX_COMMITTED_STREAMS {
            return Err(bad(alloc::format!(
                "names {} streams; at most {MAX_COMMITTED_STREAMS}",
                self.streams.len()
            )));
        }
        for (i, s) in self.streams.iter().enumerate() {
            check_name(&s.stream).map_err(|why| ProtoError::InvalidStream {
                name: s.stream.clone(),
                why,
            })?;
            if self.streams[..i].iter().any(|o| o.stream == s.stream) {
                return Err(bad(alloc::format!("stream {:?} is named twice", s.stream)));
            }
        }
        Ok(())
    }

    /// The watermark of `stream`, if the message names it.
    pub fn upto(&self, stream: &str) -> Option<u64> {
        self.streams
            .iter()
            .find(|s| s.stream == stream)
            .map(|s| s.upto)
    }
}

fn bad(detail: String) -> ProtoError {
    ProtoError::Malformed {
        encoding: "commit watermark",
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_unique() {
        let mut c = Committed::new("dev-1", 1);
        c.streams.push(CommittedStream {
            stream: "imu".into(),
            upto: 10,
        });
        assert!(c.validate().is_ok());
        assert_eq!(c.upto("imu"), Some(10));
        assert_eq!(c.upto("other"), None);
        c.streams.push(c.streams[0].clone());
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("named twice")
        );
        c.streams.pop();
        c.streams[0].stream = "a/b".into();
        assert!(matches!(
            c.validate(),
            Err(ProtoError::InvalidStream { .. })
        ));
        let c = Committed::new("dev/+", 1);
        assert!(matches!(
            c.validate(),
            Err(ProtoError::InvalidDeviceId { .. })
        ));
    }
}
