//! The topic scheme: `ember/v1/{device_id}/{channel}`.
//!
//! **Invariant:** a device only ever publishes under its own `{device_id}`; brokers enforce this
//! with a pattern ACL (`ember/v1/%u/#`), which is why device ids may not contain `/ + #`.

use alloc::format;
use alloc::string::{String, ToString};
use core::fmt;
use core::str::FromStr;

use crate::{ProtoError, check_name};

/// Topic prefix, including the protocol version.
pub const PREFIX: &str = "ember/v1";

/// What a topic carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Channel {
    /// Batches of sensor records ([`crate::TelemetryBatch`]), QoS1.
    Telemetry,
    /// Batches of inference results, QoS1.
    Inference,
    /// Retained device status ([`crate::Status`]); also the Last Will.
    Status,
    /// Periodic liveness beacon ([`crate::Heartbeat`]), QoS0.
    Heartbeat,
}

impl Channel {
    pub const ALL: [Channel; 4] = [
        Channel::Telemetry,
        Channel::Inference,
        Channel::Status,
        Channel::Heartbeat,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Telemetry => "telemetry",
            Channel::Inference => "inference",
            Channel::Status => "status",
            Channel::Heartbeat => "heartbeat",
        }
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Channel {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        Channel::ALL.into_iter().find(|c| c.as_str() == s).ok_or(())
    }
}

/// A parsed, validated Ember topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topic {
    pub device_id: String,
    pub channel: Channel,
}

impl Topic {
    pub fn new(device_id: &str, channel: Channel) -> Result<Self, ProtoError> {
        check_name(device_id).map_err(|why| ProtoError::InvalidDeviceId {
            id: device_id.to_string(),
            why,
        })?;
        Ok(Topic {
            device_id: device_id.to_string(),
            channel,
        })
    }

    /// Renders the topic string. Infallible because the device id was validated.
    pub fn render(&self) -> String {
        format!("{PREFIX}/{}/{}", self.device_id, self.channel)
    }

    /// The subscription filter that matches one channel of every device.
    pub fn filter_all(channel: Channel) -> String {
        format!("{PREFIX}/+/{channel}")
    }

    pub fn parse(topic: &str) -> Result<Self, ProtoError> {
        let bad = |why| ProtoError::InvalidTopic {
            topic: topic.to_string(),
            why,
        };
        let rest = topic
            .strip_prefix(PREFIX)
            .ok_or_else(|| bad("it does not start with ember/v1"))?;
        let rest = rest
            .strip_prefix('/')
            .ok_or_else(|| bad("it does not start with ember/v1/"))?;
        let (device, channel) = rest
            .split_once('/')
            .ok_or_else(|| bad("it has no channel segment"))?;
        let channel = Channel::from_str(channel).map_err(|_| bad("unknown channel"))?;
        check_name(device).map_err(|_| bad("the device id segment is invalid"))?;
        Ok(Topic {
            device_id: device.to_string(),
            channel,
        })
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}/{}/{}", self.device_id, self.channel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for ch in Channel::ALL {
            let t = Topic::new("dev-01.a_b", ch).unwrap();
            assert_eq!(Topic::parse(&t.render()).unwrap(), t);
        }
        assert_eq!(
            Topic::new("d1", Channel::Telemetry).unwrap().render(),
            "ember/v1/d1/telemetry"
        );
        assert_eq!(Topic::filter_all(Channel::Status), "ember/v1/+/status");
    }

    #[test]
    fn rejects_wildcards_and_bad_shapes() {
        assert!(Topic::new("a/b", Channel::Status).is_err());
        assert!(Topic::new("+", Channel::Status).is_err());
        assert!(Topic::new("#", Channel::Status).is_err());
        assert!(Topic::new("", Channel::Status).is_err());
        assert!(Topic::new(&"x".repeat(65), Channel::Status).is_err());
        for bad in [
            "ember/v2/d/status",
            "ember/v1/d",
            "ember/v1/d/nope",
            "ember/v1/d+x/status",
            "x",
        ] {
            assert!(Topic::parse(bad).is_err(), "{bad}");
        }
    }
}
