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
//! `mqtt.profile = "azure-iot-hub"` speaks Azure IoT Hub's MQTT dialect (see [`azure`]): the
//! client id is the device id, the username `{hub}/{device_id}/?api-version=2021-04-12`, the
//! password a SAS token made from the device key in `mqtt.sas_key_file` (renewed before it
//! expires) unless the device authenticates with its X.509 certificate; every message goes to
//! `devices/{device_id}/messages/events/` with Ember's properties in the topic's property bag,
//! never retained; the status also goes to the device twin's reported properties, and the
//! desired state comes from the twin's desired properties.
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
    AzureIotHub,
}

impl Profile {
    pub fn parse(s: &str) -> Result<Profile, String> {
        match s {
            "generic" => Ok(Profile::Generic),
            "aws-iot-core" => Ok(Profile::AwsIotCore),
            "azure-iot-hub" => Ok(Profile::AzureIotHub),
            other => Err(format!(
                "{other:?} is not a profile: use \"generic\" (Mosquitto, EMQX and other MQTT brokers), \"aws-iot-core\" or \"azure-iot-hub\""
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

/// Azure IoT Hub's MQTT dialect: its fixed topics, the username, the property bag and the
/// device twin's request/response topics.
pub mod azure {
    use ember_host::sas::url_encode;
    use ember_proto::Channel;

    /// The API version the username names (the twin topics and property bags below are this
    /// version's).
    pub const API_VERSION: &str = "2021-04-12";
    /// IoT Hub's largest device-to-cloud message (bytes).
    pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;
    /// IoT Hub's longest keep-alive (29.45 minutes); it closes connections idle longer.
    pub const KEEP_ALIVE_MAX_S: u64 = 1767;
    /// The SAS token lifetime when `mqtt.sas_token_ttl_s` is not set.
    pub const DEFAULT_SAS_TTL_S: u64 = 3600;
    /// Shortest and longest token lifetimes the agent accepts.
    pub const SAS_TTL_MIN_S: u64 = 30;
    pub const SAS_TTL_MAX_S: u64 = 365 * 24 * 3600;
    /// The twin's reported properties are patched at most this often (IoT Hub throttles twin
    /// updates per hub unit); changes in between are coalesced into the next patch.
    pub const DEFAULT_TWIN_REPORT_MIN_INTERVAL_S: u64 = 60;
    /// The twin property (desired and reported) that holds Ember's state; the fleet's
    /// `azure-twin` desired-state sink writes the desired one.
    pub const TWIN_PROPERTY: &str = "ember";
    /// Properties of every device-to-cloud message (the fleet's Event Hubs source reads them).
    pub const PROP_CHANNEL: &str = "ember-channel";
    pub const PROP_STREAM: &str = "ember-stream";
    pub const PROP_ENCODING: &str = "ember-encoding";
    /// Responses to the device's twin requests (`$rid` in the topic).
    pub const TWIN_RESPONSES: &str = "$iothub/twin/res/#";
    /// Desired-property changes IoT Hub pushes (`$version` in the topic).
    pub const TWIN_DESIRED_PATCHES: &str = "$iothub/twin/PATCH/properties/desired/#";
    const TWIN_DESIRED_PATCH_PREFIX: &str = "$iothub/twin/PATCH/properties/desired/";
    const TWIN_RESPONSE_PREFIX: &str = "$iothub/twin/res/";

    /// The MQTT username IoT Hub requires, for SAS and X.509 alike.
    pub fn username(hub: &str, device_id: &str) -> String {
        format!("{hub}/{device_id}/?api-version={API_VERSION}")
    }

    /// The resource a device's SAS token is for.
    pub fn sas_resource(hub: &str, device_id: &str) -> String {
        format!("{hub}/devices/{device_id}")
    }

    /// The events topic of one message: `devices/{id}/messages/events/` and a property bag with
    /// the channel, the stream (when the message has one) and the encoding, URL-encoded.
    pub fn events_topic(
        device_id: &str,
        channel: Channel,
        stream: Option<&str>,
        encoding: &str,
    ) -> String {
        let mut t = format!(
            "devices/{device_id}/messages/events/{PROP_CHANNEL}={}",
            channel.as_str()
        );
        if let Some(s) = stream {
            t.push_str(&format!("&{PROP_STREAM}={}", url_encode(s)));
        }
        t.push_str(&format!("&{PROP_ENCODING}={encoding}"));
        t
    }

    /// The twin GET request with request id `rid`.
    pub fn twin_get(rid: u64) -> String {
        format!("$iothub/twin/GET/?$rid={rid}")
    }

    /// The reported-properties PATCH request with request id `rid`.
    pub fn twin_patch_reported(rid: u64) -> String {
        format!("$iothub/twin/PATCH/properties/reported/?$rid={rid}")
    }

    /// A message on the twin topics, as the agent understands it.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum TwinTopic {
        /// A response: HTTP-like status, the request id, the twin's new version (on PATCHes).
        Response {
            status: u16,
            rid: u64,
            version: Option<u64>,
        },
        /// A desired-properties patch pushed by IoT Hub, with the desired version.
        DesiredPatch { version: Option<u64> },
    }

    /// Parses a twin topic; `None` for any other topic.
    pub fn parse_twin_topic(topic: &str) -> Option<TwinTopic> {
        if let Some(rest) = topic.strip_prefix(TWIN_RESPONSE_PREFIX) {
            let (status, query) = rest.split_once('/').unwrap_or((rest, ""));
            let status = status.parse().ok()?;
            let rid = query_value(query, "$rid")?.parse().ok()?;
            let version = query_value(query, "$version").and_then(|v| v.parse().ok());
            return Some(TwinTopic::Response {
                status,
                rid,
                version,
            });
        }
        let query = topic.strip_prefix(TWIN_DESIRED_PATCH_PREFIX)?;
        Some(TwinTopic::DesiredPatch {
            version: query_value(query, "$version").and_then(|v| v.parse().ok()),
        })
    }

    fn query_value<'a>(query: &'a str, key: &str) -> Option<&'a str> {
        query
            .trim_start_matches('?')
            .split('&')
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
    }

    /// Ember's desired state in a twin document: `(state, $version)`. `doc` is the desired
    /// section (a GET response's `desired`, or a PATCH's body). `Ok(None)` when the twin holds
    /// no Ember state (or it was removed: `"ember": null`).
    pub fn desired_from_twin(
        doc: &serde_json::Value,
    ) -> Result<(Option<serde_json::Value>, Option<u64>), String> {
        let obj = doc
            .as_object()
            .ok_or("the twin's desired properties are not a JSON object")?;
        let version = obj.get("$version").and_then(serde_json::Value::as_u64);
        match obj.get(TWIN_PROPERTY) {
            None | Some(serde_json::Value::Null) => Ok((None, version)),
            Some(v) if v.is_object() => Ok((Some(v.clone()), version)),
            Some(_) => Err(format!(
                "the twin's desired property {TWIN_PROPERTY:?} is not an object"
            )),
        }
    }
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
        assert_eq!(Profile::parse("azure-iot-hub"), Ok(Profile::AzureIotHub));
        assert!(Profile::parse("aws").unwrap_err().contains("aws-iot-core"));
        assert!(
            Profile::parse("azure")
                .unwrap_err()
                .contains("azure-iot-hub")
        );
    }

    #[test]
    fn azure_topics_and_twin_messages() {
        use ember_proto::Channel;
        assert_eq!(
            azure::username("h.azure-devices.net", "d-1"),
            "h.azure-devices.net/d-1/?api-version=2021-04-12"
        );
        assert_eq!(
            azure::events_topic("d-1", Channel::Telemetry, Some("imu a"), "cbor"),
            "devices/d-1/messages/events/ember-channel=telemetry&ember-stream=imu%20a&ember-encoding=cbor"
        );
        assert_eq!(
            azure::events_topic("d-1", Channel::Status, None, "json"),
            "devices/d-1/messages/events/ember-channel=status&ember-encoding=json"
        );
        assert_eq!(
            azure::parse_twin_topic("$iothub/twin/res/200/?$rid=7"),
            Some(azure::TwinTopic::Response {
                status: 200,
                rid: 7,
                version: None
            })
        );
        assert_eq!(
            azure::parse_twin_topic("$iothub/twin/res/204/?$rid=8&$version=12"),
            Some(azure::TwinTopic::Response {
                status: 204,
                rid: 8,
                version: Some(12)
            })
        );
        assert_eq!(
            azure::parse_twin_topic("$iothub/twin/PATCH/properties/desired/?$version=5"),
            Some(azure::TwinTopic::DesiredPatch { version: Some(5) })
        );
        assert_eq!(
            azure::parse_twin_topic("devices/d/messages/devicebound/x"),
            None
        );
        let doc = serde_json::json!({"ember": {"v": 1}, "$version": 4});
        assert_eq!(
            azure::desired_from_twin(&doc),
            Ok((Some(serde_json::json!({"v": 1})), Some(4)))
        );
        let cleared = serde_json::json!({"ember": null, "$version": 5});
        assert_eq!(azure::desired_from_twin(&cleared), Ok((None, Some(5))));
        assert!(azure::desired_from_twin(&serde_json::json!({"ember": 3})).is_err());
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
