//! Connection profiles: what a managed broker demands of a client beyond MQTT itself.
//!
//! `mqtt.profile = "generic"` (the default) is any standards-following broker (Mosquitto,
//! EMQX, HiveMQ): the agent's own limits apply. `mqtt.profile = "aws-iot-core"` applies AWS
//! IoT Core's rules **at config time**, so a device that would be refused or throttled by the
//! service is refused by `ember-agent check` instead, with the rule in the message:
//!
//! * the MQTT client id is the **thing name**, which is the device id; a device id that is not
//!   a valid thing name (`[a-zA-Z0-9:_-]{1,128}`) is refused;
//! * mutual TLS with an X.509 certificate only (no plaintext, no username/password); the
//!   broker's certificate is checked against `ca_file` (Amazon Root CA 1) or the system roots
//!   (`system_roots = true`); the server name sent (SNI) is `mqtt.host`, the ATS endpoint;
//! * port 8883, or 443 with the ALPN protocol `x-amzn-mqtt-ca` (offered automatically on 443);
//! * keep-alive 30-1200 s; payloads at most 128 KiB (`message_max_bytes`, which also bounds
//!   the status message); QoS 0 and 1 only (the agent never uses 2);
//! * at most 100 publishes per second per connection: the uplink paces itself to
//!   `max_publish_rate` (default 90, leaving room for status and heartbeat) in every sliding
//!   second, so catching up after an outage is paced, never throttled by the service;
//! * at most one connect per second per client id: reconnect backoff starts at 1 s.
//!
//! Retained messages (the status and its Last Will, the desired state the fleet publishes)
//! work on IoT Core when the device policy grants `iot:RetainPublish` (docs/deploy-aws.md).
//!
//! `mqtt.profile_file` reads the agent profile `terraform/aws` outputs (`agent_profile_json`,
//! written by `scripts/up.sh aws`): its endpoint and port become `mqtt.host`/`mqtt.port` unless
//! the file sets them, its limits replace the built-in ones, and its topics must be Ember's.

use std::path::Path;

use serde::Deserialize;

/// AWS IoT Core's payload limit (bytes).
pub const AWS_MAX_PAYLOAD_BYTES: usize = 128 * 1024;
/// AWS IoT Core's keep-alive range (seconds).
pub const AWS_KEEP_ALIVE_MIN_S: u64 = 30;
pub const AWS_KEEP_ALIVE_MAX_S: u64 = 1200;
/// AWS IoT Core's publish requests per second per connection.
pub const AWS_PUBLISH_PER_SECOND: u32 = 100;
/// What the agent allows itself by default: a tenth below the quota, for status, heartbeat and
/// commit requests, which are not paced.
pub const AWS_DEFAULT_PUBLISH_RATE: u32 = 90;
/// AWS IoT Core accepts one connect per second per client id.
pub const AWS_MIN_RECONNECT_MS: u64 = 1000;
/// The ALPN protocol IoT Core needs for MQTT over port 443.
pub const AWS_ALPN: &str = "x-amzn-mqtt-ca";
/// A thing name's length limit.
pub const AWS_THING_NAME_MAX: usize = 128;

/// Which broker rules the agent applies (`mqtt.profile`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Profile {
    #[default]
    Generic,
    AwsIotCore,
}

impl Profile {
    pub fn parse(s: &str) -> Result<Profile, String> {
        match s {
            "generic" => Ok(Profile::Generic),
            "aws-iot-core" => Ok(Profile::AwsIotCore),
            other => Err(format!(
                "{other:?} is not a profile: use \"generic\" (Mosquitto, EMQX and other MQTT brokers) or \"aws-iot-core\""
            )),
        }
    }
}

/// Whether `name` is a valid AWS IoT thing name; `Err` says why, with the rule.
pub fn check_thing_name(name: &str) -> Result<(), String> {
    let rule = "a thing name is 1-128 characters of a-z A-Z 0-9 _ - : (no '.', no spaces)";
    if name.is_empty() || name.len() > AWS_THING_NAME_MAX {
        return Err(format!(
            "{name:?} is not a valid AWS IoT thing name: {rule}"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':')))
    {
        return Err(format!(
            "{name:?} is not a valid AWS IoT thing name ({c:?} is not allowed): {rule}"
        ));
    }
    Ok(())
}

/// The limits a profile imposes (AWS's built-in ones, or those of a profile file).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub max_payload_bytes: usize,
    pub keep_alive_min_s: u64,
    pub keep_alive_max_s: u64,
    pub publish_per_second: u32,
    pub max_qos: u8,
    pub thing_name_max_bytes: usize,
}

impl Limits {
    pub const AWS: Limits = Limits {
        max_payload_bytes: AWS_MAX_PAYLOAD_BYTES,
        keep_alive_min_s: AWS_KEEP_ALIVE_MIN_S,
        keep_alive_max_s: AWS_KEEP_ALIVE_MAX_S,
        publish_per_second: AWS_PUBLISH_PER_SECOND,
        max_qos: 1,
        thing_name_max_bytes: AWS_THING_NAME_MAX,
    };
}

/// The agent profile file `terraform/aws` writes (output `agent_profile_json`).
#[derive(Debug, Clone, Deserialize)]
pub struct ProfileFile {
    pub profile: String,
    pub endpoint: String,
    pub port: u16,
    /// The ALPN protocol to offer when connecting on port 443.
    #[serde(default)]
    pub alpn: Option<String>,
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub topics: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default)]
    pub limits: Option<Limits>,
}

/// The topics an Ember agent uses, in the form profile files write them.
const EMBER_TOPICS: &[(&str, &str)] = &[
    ("telemetry", "ember/v1/{device_id}/telemetry"),
    ("inference", "ember/v1/{device_id}/inference"),
    ("status", "ember/v1/{device_id}/status"),
    ("heartbeat", "ember/v1/{device_id}/heartbeat"),
    ("desired", "ember/v1/{device_id}/desired"),
    ("committed", "ember/v1/{device_id}/committed"),
];

/// Reads and checks a profile file. `Err` is a message for `mqtt.profile_file`.
pub fn read_profile_file(path: &Path) -> Result<ProfileFile, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "cannot read {}: {e} (write it with `terraform -chdir=terraform/aws output -json agent_profile`)",
            path.display()
        )
    })?;
    parse_profile_file(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// [`read_profile_file`] on text already read.
pub fn parse_profile_file(text: &str) -> Result<ProfileFile, String> {
    let f: ProfileFile = serde_json::from_str(text).map_err(|e| {
        format!(
            "not an agent profile ({e}); it is the JSON of terraform/aws's output agent_profile"
        )
    })?;
    Profile::parse(&f.profile)?;
    if f.endpoint.trim().is_empty() {
        return Err("endpoint is empty".into());
    }
    if f.port == 0 {
        return Err("port 0 is not a port".into());
    }
    if let Some(id) = &f.client_id
        && id != "{device_id}"
    {
        return Err(format!(
            "client_id is {id:?}: the agent's client id is its device id, so the profile must say \"{{device_id}}\""
        ));
    }
    if let Some(topics) = &f.topics {
        for (name, topic) in topics {
            match EMBER_TOPICS.iter().find(|(n, _)| n == name) {
                Some((_, ours)) if ours == topic => {}
                Some((_, ours)) => {
                    return Err(format!(
                        "topic {name} is {topic:?} but the agent publishes to {ours:?}: the device policy and topic rule must use Ember's topics"
                    ));
                }
                None => return Err(format!("unknown topic {name:?} in topics")),
            }
        }
    }
    if let Some(l) = &f.limits {
        if l.max_qos > 1 {
            return Err(format!(
                "limits.max_qos is {}: the agent publishes at QoS 1 and needs at least that",
                l.max_qos
            ));
        }
        if l.max_qos < 1 {
            return Err(
                "limits.max_qos is 0: the agent needs QoS 1 to know what was delivered".into(),
            );
        }
        if l.max_payload_bytes < 1024
            || l.keep_alive_min_s > l.keep_alive_max_s
            || l.publish_per_second == 0
        {
            return Err(format!("limits are not usable: {l:?}"));
        }
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thing_names() {
        for ok in ["edge-1", "a", "Line_3:press-7", &"x".repeat(128)] {
            assert_eq!(check_thing_name(ok), Ok(()), "{ok}");
        }
        for bad in ["", "edge.1", "with space", "ü", &"x".repeat(129)] {
            let e = check_thing_name(bad).unwrap_err();
            assert!(e.contains("a-z A-Z 0-9 _ - :"), "{e}");
        }
        assert!(check_thing_name("edge.1").unwrap_err().contains("'.'"));
    }

    #[test]
    fn profiles() {
        assert_eq!(Profile::parse("aws-iot-core"), Ok(Profile::AwsIotCore));
        assert_eq!(Profile::parse("generic"), Ok(Profile::Generic));
        assert!(Profile::parse("aws").unwrap_err().contains("aws-iot-core"));
    }

    /// The file `terraform/aws/outputs.tf` writes, as `terraform output -json` prints it.
    const TERRAFORM_OUTPUT: &str = r#"{
      "alpn": "x-amzn-mqtt-ca", "alt_port": 443,
      "ca_url": "https://www.amazontrust.com/repository/AmazonRootCA1.pem",
      "client_id": "{device_id}",
      "endpoint": "a1b2c3-ats.iot.eu-west-1.amazonaws.com",
      "limits": {"keep_alive_max_s": 1200, "keep_alive_min_s": 30, "max_payload_bytes": 131072,
                 "max_qos": 1, "publish_per_second": 100, "thing_name_max_bytes": 128},
      "port": 8883, "profile": "aws-iot-core",
      "sni": "a1b2c3-ats.iot.eu-west-1.amazonaws.com",
      "topics": {"desired": "ember/v1/{device_id}/desired",
                 "heartbeat": "ember/v1/{device_id}/heartbeat",
                 "inference": "ember/v1/{device_id}/inference",
                 "status": "ember/v1/{device_id}/status",
                 "telemetry": "ember/v1/{device_id}/telemetry"}
    }"#;

    #[test]
    fn terraforms_profile_output_parses() {
        let f = parse_profile_file(TERRAFORM_OUTPUT).expect("terraform's output is a profile");
        assert_eq!(f.endpoint, "a1b2c3-ats.iot.eu-west-1.amazonaws.com");
        assert_eq!(f.port, 8883);
        assert_eq!(f.limits, Some(Limits::AWS));
    }

    #[test]
    fn profile_files_with_foreign_topics_or_ids_are_refused() {
        let t = TERRAFORM_OUTPUT.replace(
            "\"ember/v1/{device_id}/status\"",
            "\"things/{device_id}/status\"",
        );
        assert!(parse_profile_file(&t).unwrap_err().contains("topic status"));
        let t = TERRAFORM_OUTPUT.replace("\"client_id\": \"{device_id}\"", "\"client_id\": \"x\"");
        assert!(parse_profile_file(&t).unwrap_err().contains("client_id"));
        let t = TERRAFORM_OUTPUT.replace("\"max_qos\": 1", "\"max_qos\": 0");
        assert!(parse_profile_file(&t).unwrap_err().contains("max_qos"));
        assert!(
            parse_profile_file("{}")
                .unwrap_err()
                .contains("agent_profile")
        );
    }
}
