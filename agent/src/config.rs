//! Configuration: a TOML file plus `EMBER_*` environment overrides, resolved into [`Settings`].
//!
//! Two layers, as the conventions ask: [`RawConfig`] mirrors the file (`deny_unknown_fields`,
//! every field optional), and [`Settings::resolve`] fills in the named defaults below and
//! validates every value. An invalid configuration is refused before any file is written or
//! socket bound, with an error that names the key and says how to fix it.
//!
//! Environment overrides: `EMBER_<KEY>` for a top-level key and `EMBER_<SECTION>__<KEY>` for a
//! key in a table, e.g. `EMBER_DEVICE_ID=dev-7`, `EMBER_MQTT__PORT=8883`,
//! `EMBER_QUEUE__FSYNC=never`, through `ember_host::env::Overlay`. Keys that hold text
//! (`STRING_KEYS`: the device id, hosts, paths) always take the value as a string; other values
//! are parsed as TOML scalars (so `8883` is an integer and `true` a boolean) and fall back to
//! strings. Sources (`[[source]]`) can only be set in the file. Variables starting with
//! `EMBER_FLEET_` belong to the fleet service and are ignored, as are the names in
//! `ember_host::env::RESERVED` (`EMBER_CONFIG`, `EMBER_LOG`, the fault hook, test variables).
//! A key that no setting has is blamed on the variable that set it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ember_host::env::Overlay;
use serde::{Deserialize, Serialize};

use ember_proto::Encoding;

use crate::profile::{self, Limits, Profile};
use crate::tls_files::{self, check_key_permissions, is_loopback};

// ---- named defaults -----------------------------------------------------------------------

pub const DEFAULT_DATA_DIR: &str = "ember-data";
pub const DEFAULT_MQTT_HOST: &str = "127.0.0.1";
pub const DEFAULT_MQTT_PORT: u16 = 1883;
pub const DEFAULT_KEEP_ALIVE_S: u64 = 30;
/// AWS IoT Core caps a message at 128 KiB; Azure IoT Hub at 256 KiB. The smaller is the default.
pub const DEFAULT_MESSAGE_MAX_BYTES: usize = 128 * 1024;
pub const DEFAULT_MESSAGE_MAX_RECORDS: usize = 100;
pub const DEFAULT_MESSAGE_MAX_DELAY_MS: u64 = 100;
pub const DEFAULT_MAX_IN_FLIGHT: usize = 32;
pub const DEFAULT_RECONNECT_MIN_MS: u64 = 250;
pub const DEFAULT_RECONNECT_MAX_MS: u64 = 30_000;
pub const DEFAULT_HEARTBEAT_S: u64 = 30;
pub const DEFAULT_STATUS_INTERVAL_S: u64 = 10;
/// How long sent records may stay uncommitted, while the fleet answers, before the uplink
/// sends them again from the first uncommitted one (`mqtt.commit_timeout_s`).
pub const DEFAULT_COMMIT_TIMEOUT_S: u64 = 10;
/// `delivery = "auto"`: how long PUBACKed records wait for a first commit watermark before
/// the agent treats the fleet as one that sends none (`mqtt.commit_fallback_s`).
pub const DEFAULT_COMMIT_FALLBACK_S: u64 = 60;
pub const DEFAULT_QUEUE_MAX_BYTES: u64 = 256 * 1024 * 1024;
pub const DEFAULT_QUEUE_MAX_AGE_S: u64 = 7 * 24 * 3600;
pub const DEFAULT_FSYNC_INTERVAL_MS: u64 = 1000;
pub const DEFAULT_APPEND_MAX_RECORDS: usize = 1000;
pub const DEFAULT_APPEND_MAX_DELAY_MS: u64 = 20;
pub const DEFAULT_CACHE_BYTES: u64 = 2 * 1024 * 1024;
pub const DEFAULT_RECLAIM_BYTES: u64 = 16 * 1024 * 1024;
/// Free space the queue leaves on its file system; below it the full policy applies.
pub const DEFAULT_MIN_FREE_BYTES: u64 = 16 * 1024 * 1024;
pub const DEFAULT_GRACE_MS: u64 = 5000;
/// How far (ms) a sample's timestamp may go back behind its stream's latest accepted one
/// before the source refuses it (`source[].max_backwards_ms`): a clock step of NTP size passes.
pub const DEFAULT_MAX_BACKWARDS_MS: u64 = 1000;
/// The largest `max_backwards_ms` accepted (one day).
pub const MAX_MAX_BACKWARDS_MS: u64 = 24 * 3600 * 1000;
pub const DEFAULT_SAMPLE_CHANNEL: usize = 8192;
/// Windows per model call, across streams.
pub const DEFAULT_INFERENCE_MAX_BATCH: usize = 32;
/// How long a window may wait for others to fill a batch.
pub const DEFAULT_INFERENCE_MAX_DELAY_MS: u64 = 20;
/// Windows kept before and after an anomalous one with `forward_raw = "anomalies"`.
pub const DEFAULT_ANOMALY_CONTEXT_WINDOWS: usize = 1;
/// Samples waiting for the inference thread; beyond it samples bypass inference (counted).
pub const DEFAULT_INFERENCE_QUEUE_SAMPLES: usize = 16_384;
/// Largest model bundle an OTA download may bring (the desired state's size caps it further).
pub const DEFAULT_OTA_MAX_BUNDLE_BYTES: u64 = 64 * 1024 * 1024;
/// Crash-loop protection: this many starts within the window after a switch roll it back.
pub const DEFAULT_OTA_CRASH_LOOP_RESTARTS: u32 = 3;
pub const DEFAULT_OTA_CRASH_LOOP_WINDOW_S: u64 = 300;
/// Days before expiry from which the agent warns about its client certificate.
pub const DEFAULT_EXPIRY_WARN_DAYS: u64 = 30;

/// What went wrong, and where (one type for both binaries, `ember_host::env::ConfigError`).
pub use ember_host::env::ConfigError;
use ember_host::env::invalid;

// ---- the file layer -----------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub device_id: Option<String>,
    pub data_dir: Option<PathBuf>,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub mqtt: RawMqtt,
    #[serde(default)]
    pub queue: RawQueue,
    #[serde(default)]
    pub metrics: RawMetrics,
    #[serde(default)]
    pub shutdown: RawShutdown,
    #[serde(default, rename = "source")]
    pub sources: Vec<RawSource>,
    #[serde(default)]
    pub inference: RawInference,
    #[serde(default, rename = "model")]
    pub models: Vec<RawModel>,
    #[serde(default)]
    pub ota: RawOta,
}

/// `[ota]`: over-the-air model updates (`crate::ota`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOta {
    pub enabled: Option<bool>,
    pub fleet_url: Option<String>,
    pub insecure: Option<bool>,
    pub token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub max_bundle_bytes: Option<u64>,
    pub crash_loop_restarts: Option<u32>,
    pub crash_loop_window_s: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInference {
    pub backend: Option<String>,
    pub trusted_keys: Option<Vec<PathBuf>>,
    pub max_batch: Option<usize>,
    pub max_delay_ms: Option<u64>,
    pub forward_raw: Option<String>,
    pub anomaly_context_windows: Option<usize>,
    pub queue_samples: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    pub bundle: Option<PathBuf>,
    pub source: Option<String>,
    /// `[model.capture]`: which raw windows to keep for labelling (docs/capture.md).
    pub capture: Option<RawCapture>,
}

/// `[model.capture]` of a `[[model]]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCapture {
    pub anomalies: Option<bool>,
    pub below_confidence: Option<f32>,
    pub sample: Option<f64>,
    pub max_per_minute: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub format: Option<String>,
    pub level: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMqtt {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub client_id: Option<String>,
    pub keep_alive_s: Option<u64>,
    pub encoding: Option<String>,
    pub message_max_records: Option<usize>,
    pub message_max_bytes: Option<usize>,
    pub message_max_delay_ms: Option<u64>,
    pub max_in_flight: Option<usize>,
    pub reconnect_min_ms: Option<u64>,
    pub reconnect_max_ms: Option<u64>,
    pub heartbeat_s: Option<u64>,
    pub status_interval_s: Option<u64>,
    /// `auto` (default), `commit` or `puback`: when a record leaves the queue.
    pub delivery: Option<String>,
    pub commit_timeout_s: Option<u64>,
    pub commit_fallback_s: Option<u64>,
    /// Plaintext to a broker that is not on this machine (development only; see `tls`).
    pub insecure: Option<bool>,
    /// `generic` (default) or `aws-iot-core`: the broker's rules (`crate::profile`).
    pub profile: Option<String>,
    /// An agent profile file (JSON, from `terraform/aws`'s output `agent_profile`).
    pub profile_file: Option<PathBuf>,
    /// Publishes per second per connection the uplink allows itself (0: no limit).
    pub max_publish_rate: Option<u32>,
    /// `azure-iot-hub`: the device's symmetric key (base64, mode 0600) for SAS tokens.
    pub sas_key_file: Option<PathBuf>,
    /// `azure-iot-hub`: how long each SAS token is valid; renewed at 80 % of it.
    pub sas_token_ttl_s: Option<u64>,
    /// `azure-iot-hub`: the twin's reported properties are patched at most this often.
    pub twin_report_min_interval_s: Option<u64>,
    /// `[mqtt.tls]`: see `crate::tls`.
    pub tls: Option<RawTls>,
}

/// `[mqtt.tls]` as written in the file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub ca_file: Option<PathBuf>,
    /// Trust the operating system's CA store instead of `ca_file`.
    pub system_roots: Option<bool>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub alpn: Option<Vec<String>>,
    pub server_name: Option<String>,
    pub expiry_warn_days: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQueue {
    pub max_bytes: Option<u64>,
    pub max_age_s: Option<u64>,
    pub full_policy: Option<String>,
    pub fsync: Option<String>,
    pub fsync_interval_ms: Option<u64>,
    pub append_max_records: Option<usize>,
    pub append_max_delay_ms: Option<u64>,
    pub cache_bytes: Option<u64>,
    pub reclaim_bytes: Option<u64>,
    pub min_free_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    pub listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawShutdown {
    pub grace_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub stream: Option<String>,
    // sim
    pub rate_hz: Option<f64>,
    /// sim: how many it generates; replay, socket: the stream's declared schema.
    pub channels: Option<usize>,
    /// Every source: how far a timestamp may go back before the sample is refused.
    pub max_backwards_ms: Option<u64>,
    pub seed: Option<u64>,
    // replay
    pub path: Option<PathBuf>,
    pub format: Option<String>,
    #[serde(rename = "loop")]
    pub looped: Option<bool>,
    // socket
    pub unix: Option<PathBuf>,
    pub tcp: Option<String>,
    // serial
    /// A tty (`/dev/ttyACM0`) or `tcp:HOST:PORT` (a raw serial server: QEMU, ser2net).
    pub device: Option<String>,
    pub baud: Option<u32>,
    /// `node` (the node's clock, anchored at its first frame each boot) or `agent`.
    pub timestamps: Option<String>,
}

// ---- the resolved layer -------------------------------------------------------------------

#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub device_id: String,
    pub data_dir: PathBuf,
    pub log: LogSettings,
    pub mqtt: MqttSettings,
    pub queue: QueueSettings,
    pub metrics: MetricsSettings,
    pub shutdown: ShutdownSettings,
    pub sources: Vec<SourceSettings>,
    pub inference: InferenceSettings,
    pub models: Vec<ModelSettings>,
    pub ota: OtaSettings,
}

/// Over-the-air model updates (see `crate::ota`).
#[derive(Debug, Clone, Serialize)]
pub struct OtaSettings {
    /// Whether the agent follows `ember/v1/{device}/desired` (default: when `fleet_url` is set).
    pub enabled: bool,
    /// `http(s)://host[:port][/prefix]` without a trailing slash: the base of the relative
    /// download URLs in the desired state.
    pub fleet_url: Option<String>,
    /// Plain HTTP to a fleet that is not on this machine (development only).
    pub insecure: bool,
    /// File holding the device's API token, sent as `Authorization: Bearer` to the fleet only.
    pub token_file: Option<PathBuf>,
    /// PEM CA(s) for HTTPS downloads; `None`: the public web PKI.
    pub ca_file: Option<PathBuf>,
    pub max_bundle_bytes: u64,
    pub crash_loop_restarts: u32,
    pub crash_loop_window_s: u64,
}

/// Which burn backend runs the models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// burn's pure-Rust CPU backend: builds for every target the agent ships on.
    Flex,
    /// GPU through wgpu; only in builds with the agent's `wgpu` feature.
    Wgpu,
}

/// Which raw samples of a source that feeds a model leave the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ForwardRaw {
    /// Every sample (as without a model).
    All,
    /// None: only inference results leave the device.
    None,
    /// The samples of windows around an anomalous result (anomaly models).
    Anomalies,
}

#[derive(Debug, Clone, Serialize)]
pub struct InferenceSettings {
    pub backend: Backend,
    pub trusted_keys: Vec<PathBuf>,
    pub max_batch: usize,
    pub max_delay_ms: u64,
    pub forward_raw: ForwardRaw,
    pub anomaly_context_windows: usize,
    /// Capacity of the channel from the writer to the inference thread, in samples.
    pub queue_samples: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelSettings {
    /// The bundle file; a relative path is relative to the agent's working directory, like
    /// every other path in the config.
    pub bundle: PathBuf,
    /// The source stream whose windows it evaluates.
    pub source: String,
    /// Which raw windows go to the capture stream `{source}.{model}.capture`.
    pub capture: CaptureSettings,
}

/// Which windows a model's capture policy keeps (`[model.capture]`, docs/capture.md); the
/// default keeps none.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CaptureSettings {
    /// Windows an anomaly model calls anomalous.
    pub anomalies: bool,
    /// Windows whose top class probability is below this (classifiers).
    pub below_confidence: Option<f32>,
    /// A random fraction of all windows, 0-1.
    pub sample: f64,
    /// At most this many captures a minute per model (a sliding minute).
    pub max_per_minute: u32,
}

impl CaptureSettings {
    pub fn enabled(&self) -> bool {
        self.anomalies || self.below_confidence.is_some() || self.sample > 0.0
    }
}

/// Captures per model and minute unless `max_per_minute` says otherwise.
pub const DEFAULT_CAPTURE_MAX_PER_MINUTE: u32 = 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Serialize)]
pub struct LogSettings {
    pub format: LogFormat,
    /// A `tracing` filter directive, e.g. `info` or `ember_agent=debug,info`.
    pub level: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct MqttSettings {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub keep_alive_s: u64,
    pub encoding: Encoding,
    pub message_max_records: usize,
    pub message_max_bytes: usize,
    pub message_max_delay_ms: u64,
    pub max_in_flight: usize,
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    pub heartbeat_s: u64,
    pub status_interval_s: u64,
    /// When a record leaves the queue (end-to-end acknowledgement, see `crate::uplink`).
    pub delivery: DeliveryMode,
    /// Sent records uncommitted this long, while the fleet answers, are sent again.
    pub commit_timeout_s: u64,
    /// `delivery = "auto"`: how long PUBACKed records wait for a first commit watermark.
    pub commit_fallback_s: u64,
    /// Plaintext MQTT allowed to a non-loopback broker (no `[mqtt.tls]`).
    pub insecure: bool,
    /// The broker's rules applied at config time (`crate::profile`).
    pub profile: Profile,
    /// Publishes per sliding second the uplink allows itself for records (0: no limit).
    pub max_publish_rate: u32,
    /// The MQTT username (`azure-iot-hub`: `{hub}/{device_id}/?api-version=…`).
    pub username: Option<String>,
    /// `azure-iot-hub` with SAS: the device key file; the password is a SAS token made from it.
    pub sas_key_file: Option<PathBuf>,
    /// Lifetime of each SAS token (seconds); the uplink reconnects with a new one at 80 % of it.
    pub sas_token_ttl_s: u64,
    /// `azure-iot-hub`: least seconds between two patches of the twin's reported properties.
    pub twin_report_min_interval_s: u64,
    /// TLS to the broker; `None` is plaintext (loopback, or `insecure`).
    pub tls: Option<TlsSettings>,
}

/// When the agent deletes a record from its queue (`mqtt.delivery`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryMode {
    /// Keep records until the fleet's commit watermark covers them; if no watermark has ever
    /// come from this fleet and PUBACKed records have waited `commit_fallback_s`, delete on
    /// PUBACK instead (a fleet older than end-to-end acknowledgement), until one comes.
    Auto,
    /// Always keep records until the fleet's commit watermark covers them.
    Commit,
    /// Delete a record when the broker acknowledges the message that carried it.
    Puback,
}

/// `[mqtt.tls]` resolved.
#[derive(Debug, Clone, Serialize)]
pub struct TlsSettings {
    /// The only CA the broker's certificate may chain to (PEM); `None` with `system_roots`.
    pub ca_file: Option<PathBuf>,
    /// The operating system's CA store is trusted instead of `ca_file`.
    pub system_roots: bool,
    /// The client certificate (PEM, leaf first) for mutual TLS.
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM: PKCS#8, SEC1 or PKCS#1), mode 0600 or stricter.
    pub key_file: Option<PathBuf>,
    /// ALPN protocols to offer, e.g. `["x-amzn-mqtt-ca"]` for AWS IoT Core on port 443.
    pub alpn: Vec<String>,
    /// The name the broker's certificate must carry, when it differs from `mqtt.host`.
    pub server_name: Option<String>,
    pub expiry_warn_days: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FullPolicy {
    /// Evict the oldest records to make room (default): capture never stops.
    DropOldest,
    /// Stop accepting new records until the uplink frees space: sources see backpressure.
    Block,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "mode")]
pub enum FsyncPolicy {
    /// fsync after every appended batch, before the append returns.
    EveryBatch,
    /// fsync at most every `ms` milliseconds.
    Interval { ms: u64 },
    /// Never fsync explicitly; sled writes its buffers out every 500 ms.
    Never,
}

#[derive(Debug, Clone, Serialize)]
pub struct QueueSettings {
    pub max_bytes: u64,
    pub max_age_s: u64,
    pub full_policy: FullPolicy,
    pub fsync: FsyncPolicy,
    pub append_max_records: usize,
    pub append_max_delay_ms: u64,
    pub cache_bytes: u64,
    pub reclaim_bytes: u64,
    /// Free space to leave on the queue's file system (the disk's own "byte cap").
    pub min_free_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MetricsSettings {
    /// Where the Prometheus endpoint listens; `None` disables it.
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ShutdownSettings {
    pub grace_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplayFormat {
    /// One sample per line, comma-separated numbers; a header line is skipped.
    Csv,
    /// UEA/sktime `.ts`: one multichannel series per line, channels separated by `:`.
    Ts,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SourceSettings {
    Sim {
        stream: String,
        rate_hz: f64,
        channels: usize,
        seed: u64,
        max_backwards_ms: u64,
    },
    Replay {
        stream: String,
        path: PathBuf,
        format: ReplayFormat,
        rate_hz: f64,
        looped: bool,
        /// The declared channel count; `None`: the recorded one, or the file's.
        channels: Option<usize>,
        max_backwards_ms: u64,
    },
    Socket {
        stream: String,
        endpoint: SocketEndpoint,
        /// The declared channel count; `None`: the recorded one, or the first sample's.
        channels: Option<usize>,
        max_backwards_ms: u64,
    },
    /// A sensor node on a serial line (`source::serial`).
    Serial {
        stream: String,
        device: SerialDevice,
        baud: u32,
        timestamps: SerialTimestamps,
        /// Sent to the node (`SetRate`) each time the line opens; `None`: the node's own rate.
        rate_hz: Option<u16>,
        /// The declared channel count; `None`: the recorded one, or the first sample's.
        channels: Option<usize>,
        max_backwards_ms: u64,
    },
}

/// Where a serial node is attached.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SerialDevice {
    /// A serial device (`/dev/ttyACM0`, `/dev/ttyUSB0`, a pty).
    Tty(PathBuf),
    /// A raw TCP serial server (`host:port`): QEMU's `-serial tcp:...`, ser2net.
    Tcp(String),
}

/// Whose clock stamps a serial node's samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SerialTimestamps {
    /// The node's own capture times (µs since its boot), placed on the agent's clock at the
    /// first frame of each boot: the node's spacing is kept exactly.
    Node,
    /// The agent's clock when the frame arrived.
    Agent,
}

/// The serial source's defaults.
pub const DEFAULT_SERIAL_BAUD: u32 = 115_200;

impl SourceSettings {
    pub fn stream(&self) -> &str {
        match self {
            SourceSettings::Sim { stream, .. }
            | SourceSettings::Replay { stream, .. }
            | SourceSettings::Socket { stream, .. }
            | SourceSettings::Serial { stream, .. } => stream,
        }
    }

    /// The channel count the configuration declares for the stream, if any.
    pub fn declared_channels(&self) -> Option<usize> {
        match self {
            SourceSettings::Sim { channels, .. } => Some(*channels),
            SourceSettings::Replay { channels, .. }
            | SourceSettings::Socket { channels, .. }
            | SourceSettings::Serial { channels, .. } => *channels,
        }
    }

    /// `max_backwards_ms`: how far a sample's timestamp may go back behind the stream's latest.
    pub fn max_backwards_ms(&self) -> u64 {
        match self {
            SourceSettings::Sim {
                max_backwards_ms, ..
            }
            | SourceSettings::Replay {
                max_backwards_ms, ..
            }
            | SourceSettings::Socket {
                max_backwards_ms, ..
            }
            | SourceSettings::Serial {
                max_backwards_ms, ..
            } => *max_backwards_ms,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SocketEndpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl Settings {
    /// Reads `path` (or uses an empty config when `None`), applies `env`, resolves and validates.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        Settings::resolve(ENV.load(path, env)?)
    }

    /// [`Settings::load`] on text already read (`name` is what errors call it).
    pub fn from_toml(
        text: &str,
        name: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        Settings::resolve(ENV.parse(text, name, env)?)
    }

    pub fn resolve(raw: RawConfig) -> Result<Settings, ConfigError> {
        let device_id = raw.device_id.ok_or_else(|| {
            invalid(
                "device_id",
                "missing: set device_id = \"<name>\" in the file or EMBER_DEVICE_ID",
            )
        })?;
        ember_proto::check_name(&device_id).map_err(|why| {
            invalid("device_id", format!("{device_id:?} is not usable as a device id: {why} (use 1-64 of A-Z a-z 0-9 - _ .)"))
        })?;
        let data_dir = raw
            .data_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        if data_dir.as_os_str().is_empty() {
            return Err(invalid(
                "data_dir",
                "is empty: give a directory the agent may write to",
            ));
        }

        let log = LogSettings {
            format: match raw.log.format.as_deref() {
                None | Some("pretty") => LogFormat::Pretty,
                Some("json") => LogFormat::Json,
                Some(other) => {
                    return Err(invalid(
                        "log.format",
                        format!("{other:?} is not a log format: use \"pretty\" or \"json\""),
                    ));
                }
            },
            level: raw.log.level.unwrap_or_else(|| "info".into()),
        };
        if tracing_subscriber::EnvFilter::try_new(&log.level).is_err() {
            return Err(invalid(
                "log.level",
                format!(
                    "{:?} is not a filter: use e.g. \"info\", \"debug\" or \"ember_agent=debug,warn\"",
                    log.level
                ),
            ));
        }

        let mut m = raw.mqtt;
        let profile_file = match &m.profile_file {
            Some(p) => {
                Some(profile::read_profile_file(p).map_err(|e| invalid("mqtt.profile_file", e))?)
            }
            None => None,
        };
        let file_profile = match &profile_file {
            Some(f) => {
                Some(Profile::parse(&f.profile).map_err(|e| invalid("mqtt.profile_file", e))?)
            }
            None => None,
        };
        let profile = match (m.profile.as_deref(), file_profile) {
            (Some(p), fp) => {
                let p = Profile::parse(p).map_err(|e| invalid("mqtt.profile", e))?;
                if fp.is_some_and(|fp| fp != p) {
                    return Err(invalid(
                        "mqtt.profile",
                        "differs from the profile in mqtt.profile_file: remove one of them",
                    ));
                }
                p
            }
            (None, Some(fp)) => fp,
            (None, None) => Profile::Generic,
        };
        let aws = profile == Profile::AwsIotCore;
        let limits = profile_file
            .as_ref()
            .and_then(|f| f.limits.clone())
            .unwrap_or(Limits::AWS);
        if m.host.is_none() {
            m.host = profile_file.as_ref().map(|f| f.endpoint.clone());
        }
        if m.port.is_none() {
            m.port = profile_file.as_ref().map(|f| f.port);
        }
        let azure = profile == Profile::AzureIotHub;
        let port = m.port.unwrap_or(if aws || azure {
            8883
        } else {
            DEFAULT_MQTT_PORT
        });
        if azure {
            if m.tls.is_none() {
                return Err(invalid(
                    "mqtt.tls",
                    "missing: Azure IoT Hub (mqtt.profile = \"azure-iot-hub\") accepts only TLS; add [mqtt.tls] with ca_file (the hub's root CA, DigiCert Global Root G2) or system_roots = true, plus cert_file and key_file for a device that authenticates with X.509",
                ));
            }
            if m.insecure == Some(true) {
                return Err(invalid(
                    "mqtt.insecure",
                    "Azure IoT Hub accepts only TLS: remove mqtt.insecure",
                ));
            }
        } else {
            for (key, set) in [
                ("mqtt.sas_key_file", m.sas_key_file.is_some()),
                ("mqtt.sas_token_ttl_s", m.sas_token_ttl_s.is_some()),
                (
                    "mqtt.twin_report_min_interval_s",
                    m.twin_report_min_interval_s.is_some(),
                ),
            ] {
                if set {
                    return Err(invalid(
                        key,
                        "applies only to Azure IoT Hub: set mqtt.profile = \"azure-iot-hub\" or remove it",
                    ));
                }
            }
        }
        if aws {
            // IoT Core takes MQTT on 443 only from clients that offer its ALPN protocol.
            let alpn = profile_file
                .as_ref()
                .and_then(|f| f.alpn.clone())
                .unwrap_or_else(|| profile::AWS_ALPN.into());
            match m.tls.as_mut() {
                None => {
                    return Err(invalid(
                        "mqtt.tls",
                        "missing: AWS IoT Core (mqtt.profile = \"aws-iot-core\") accepts only mutual TLS; add [mqtt.tls] with cert_file and key_file (the thing's certificate) and ca_file (AmazonRootCA1.pem) or system_roots = true",
                    ));
                }
                Some(t) if port == 443 && t.alpn.is_none() => t.alpn = Some(vec![alpn]),
                Some(_) => {}
            }
            if m.insecure == Some(true) {
                return Err(invalid(
                    "mqtt.insecure",
                    "AWS IoT Core accepts only TLS: remove mqtt.insecure",
                ));
            }
        }
        let host = m.host.as_deref().unwrap_or(DEFAULT_MQTT_HOST);
        let tls = resolve_tls(m.tls, m.insecure, host)?;
        let mqtt = MqttSettings {
            host: m.host.clone().unwrap_or_else(|| DEFAULT_MQTT_HOST.into()),
            port,
            client_id: m.client_id.unwrap_or_else(|| device_id.clone()),
            keep_alive_s: m.keep_alive_s.unwrap_or(DEFAULT_KEEP_ALIVE_S),
            encoding: match m.encoding.as_deref() {
                None | Some("json") => Encoding::Json,
                Some("cbor") => Encoding::Cbor,
                Some(other) => {
                    return Err(invalid(
                        "mqtt.encoding",
                        format!("{other:?} is not an encoding: use \"json\" or \"cbor\""),
                    ));
                }
            },
            message_max_records: m.message_max_records.unwrap_or(DEFAULT_MESSAGE_MAX_RECORDS),
            message_max_bytes: m.message_max_bytes.unwrap_or(if aws {
                DEFAULT_MESSAGE_MAX_BYTES.min(limits.max_payload_bytes)
            } else if azure {
                DEFAULT_MESSAGE_MAX_BYTES.min(profile::azure::MAX_MESSAGE_BYTES)
            } else {
                DEFAULT_MESSAGE_MAX_BYTES
            }),
            message_max_delay_ms: m
                .message_max_delay_ms
                .unwrap_or(DEFAULT_MESSAGE_MAX_DELAY_MS),
            max_in_flight: m.max_in_flight.unwrap_or(DEFAULT_MAX_IN_FLIGHT),
            reconnect_min_ms: m.reconnect_min_ms.unwrap_or(if aws {
                profile::AWS_MIN_RECONNECT_MS
            } else {
                DEFAULT_RECONNECT_MIN_MS
            }),
            reconnect_max_ms: m.reconnect_max_ms.unwrap_or(DEFAULT_RECONNECT_MAX_MS),
            heartbeat_s: m.heartbeat_s.unwrap_or(DEFAULT_HEARTBEAT_S),
            status_interval_s: m.status_interval_s.unwrap_or(DEFAULT_STATUS_INTERVAL_S),
            delivery: match m.delivery.as_deref() {
                // IoT Hub's PUBACK means the hub stored the message; a fleet watermark cannot
                // reach a device there (no topic the fleet can publish to).
                None | Some("auto") | Some("puback") if azure => DeliveryMode::Puback,
                Some("commit") if azure => {
                    return Err(invalid(
                        "mqtt.delivery",
                        "\"commit\" cannot work on Azure IoT Hub: the fleet cannot publish commit watermarks to a device there, and IoT Hub's PUBACK means the hub has durably stored the message; use \"puback\" (or leave it out)",
                    ));
                }
                None | Some("auto") => DeliveryMode::Auto,
                Some("commit") => DeliveryMode::Commit,
                Some("puback") => DeliveryMode::Puback,
                Some(other) => {
                    return Err(invalid(
                        "mqtt.delivery",
                        format!(
                            "{other:?} is not a delivery mode: use \"auto\" (keep records until the fleet commits them, unless the fleet never sends a commit watermark), \"commit\" (always wait for the fleet's commit) or \"puback\" (delete on the broker's PUBACK, for fleets older than end-to-end acknowledgement)"
                        ),
                    ));
                }
            },
            commit_timeout_s: m.commit_timeout_s.unwrap_or(DEFAULT_COMMIT_TIMEOUT_S),
            commit_fallback_s: m.commit_fallback_s.unwrap_or(DEFAULT_COMMIT_FALLBACK_S),
            insecure: m.insecure.unwrap_or(false),
            profile,
            max_publish_rate: m.max_publish_rate.unwrap_or(if aws {
                profile::AWS_DEFAULT_PUBLISH_RATE
                    .min(limits.publish_per_second * 9 / 10)
                    .max(1)
            } else {
                0
            }),
            username: if azure {
                Some(profile::azure::username(
                    m.host.as_deref().unwrap_or(DEFAULT_MQTT_HOST),
                    &device_id,
                ))
            } else {
                None
            },
            sas_key_file: m.sas_key_file,
            sas_token_ttl_s: m
                .sas_token_ttl_s
                .unwrap_or(profile::azure::DEFAULT_SAS_TTL_S),
            twin_report_min_interval_s: m
                .twin_report_min_interval_s
                .unwrap_or(profile::azure::DEFAULT_TWIN_REPORT_MIN_INTERVAL_S),
            tls,
        };
        if mqtt.host.trim().is_empty() {
            return Err(invalid(
                "mqtt.host",
                "is empty: give the broker's host name or address",
            ));
        }
        if mqtt.port == 0 {
            return Err(invalid(
                "mqtt.port",
                "0 is not a port: use 1883 (plain) or 8883 (TLS)",
            ));
        }
        if mqtt.client_id.is_empty() || mqtt.client_id.len() > 128 {
            return Err(invalid("mqtt.client_id", "must be 1-128 bytes"));
        }
        if !(5..=3600).contains(&mqtt.keep_alive_s) {
            return Err(invalid(
                "mqtt.keep_alive_s",
                format!("{} is out of range: use 5-3600 seconds", mqtt.keep_alive_s),
            ));
        }
        if !(1..=10_000).contains(&mqtt.message_max_records) {
            return Err(invalid(
                "mqtt.message_max_records",
                format!("{} is out of range: use 1-10000", mqtt.message_max_records),
            ));
        }
        if !(1024..=256 * 1024 * 1024).contains(&mqtt.message_max_bytes) {
            return Err(invalid(
                "mqtt.message_max_bytes",
                format!(
                    "{} is out of range: use 1024-268435456 (AWS IoT Core allows 131072, Azure IoT Hub 262144)",
                    mqtt.message_max_bytes
                ),
            ));
        }
        if mqtt.message_max_delay_ms > 60_000 {
            return Err(invalid(
                "mqtt.message_max_delay_ms",
                "must be at most 60000",
            ));
        }
        if !(1..=1000).contains(&mqtt.max_in_flight) {
            return Err(invalid(
                "mqtt.max_in_flight",
                format!("{} is out of range: use 1-1000", mqtt.max_in_flight),
            ));
        }
        if mqtt.reconnect_min_ms == 0 || mqtt.reconnect_min_ms > mqtt.reconnect_max_ms {
            return Err(invalid(
                "mqtt.reconnect_min_ms",
                "must be at least 1 and at most mqtt.reconnect_max_ms",
            ));
        }
        if mqtt.heartbeat_s == 0 {
            return Err(invalid("mqtt.heartbeat_s", "must be at least 1 second"));
        }
        if mqtt.status_interval_s == 0 {
            return Err(invalid(
                "mqtt.status_interval_s",
                "must be at least 1 second",
            ));
        }
        if !(1..=3600).contains(&mqtt.commit_timeout_s) {
            return Err(invalid(
                "mqtt.commit_timeout_s",
                format!(
                    "{} is out of range: use 1-3600 seconds",
                    mqtt.commit_timeout_s
                ),
            ));
        }
        if !(1..=86_400).contains(&mqtt.commit_fallback_s) {
            return Err(invalid(
                "mqtt.commit_fallback_s",
                format!(
                    "{} is out of range: use 1-86400 seconds",
                    mqtt.commit_fallback_s
                ),
            ));
        }
        if mqtt.max_publish_rate > 100_000 {
            return Err(invalid(
                "mqtt.max_publish_rate",
                format!(
                    "{} is out of range: use 0 (no limit) to 100000 messages per second",
                    mqtt.max_publish_rate
                ),
            ));
        }
        if aws {
            check_aws(&mqtt, &device_id, &limits)?;
        }
        if azure {
            check_azure(&mqtt, &device_id)?;
        }

        let q = raw.queue;
        let queue = QueueSettings {
            max_bytes: q.max_bytes.unwrap_or(DEFAULT_QUEUE_MAX_BYTES),
            max_age_s: q.max_age_s.unwrap_or(DEFAULT_QUEUE_MAX_AGE_S),
            full_policy: match q.full_policy.as_deref() {
                None | Some("drop_oldest") => FullPolicy::DropOldest,
                Some("block") => FullPolicy::Block,
                Some(other) => {
                    return Err(invalid(
                        "queue.full_policy",
                        format!("{other:?} is not a policy: use \"drop_oldest\" or \"block\""),
                    ));
                }
            },
            fsync: match q.fsync.as_deref() {
                None | Some("every_batch") => FsyncPolicy::EveryBatch,
                Some("interval_ms") | Some("interval") => FsyncPolicy::Interval {
                    ms: q.fsync_interval_ms.unwrap_or(DEFAULT_FSYNC_INTERVAL_MS),
                },
                Some("never") => FsyncPolicy::Never,
                Some(other) => {
                    return Err(invalid(
                        "queue.fsync",
                        format!(
                            "{other:?} is not a policy: use \"every_batch\", \"interval_ms\" or \"never\""
                        ),
                    ));
                }
            },
            append_max_records: q.append_max_records.unwrap_or(DEFAULT_APPEND_MAX_RECORDS),
            append_max_delay_ms: q.append_max_delay_ms.unwrap_or(DEFAULT_APPEND_MAX_DELAY_MS),
            cache_bytes: q.cache_bytes.unwrap_or(DEFAULT_CACHE_BYTES),
            reclaim_bytes: q.reclaim_bytes.unwrap_or(DEFAULT_RECLAIM_BYTES),
            min_free_bytes: q.min_free_bytes.unwrap_or(DEFAULT_MIN_FREE_BYTES),
        };
        if queue.max_bytes < 64 * 1024 {
            return Err(invalid(
                "queue.max_bytes",
                format!("{} is too small: use at least 65536 bytes", queue.max_bytes),
            ));
        }
        if queue.max_age_s == 0 {
            return Err(invalid("queue.max_age_s", "must be at least 1 second"));
        }
        if let FsyncPolicy::Interval { ms } = queue.fsync {
            if !(1..=60_000).contains(&ms) {
                return Err(invalid(
                    "queue.fsync_interval_ms",
                    format!("{ms} is out of range: use 1-60000"),
                ));
            }
        } else if q.fsync_interval_ms.is_some() {
            return Err(invalid(
                "queue.fsync_interval_ms",
                "only applies with queue.fsync = \"interval_ms\": remove it or change queue.fsync",
            ));
        }
        if !(1..=100_000).contains(&queue.append_max_records) {
            return Err(invalid("queue.append_max_records", "must be 1-100000"));
        }
        if queue.append_max_delay_ms > 10_000 {
            return Err(invalid(
                "queue.append_max_delay_ms",
                "must be at most 10000",
            ));
        }
        if queue.cache_bytes < 256 * 1024 {
            return Err(invalid(
                "queue.cache_bytes",
                "must be at least 262144 (256 KiB)",
            ));
        }

        let metrics = MetricsSettings {
            listen: match raw.metrics.listen {
                None => None,
                Some(s) => {
                    let addr: SocketAddr = s.parse().map_err(|_| {
                        invalid(
                            "metrics.listen",
                            format!("{s:?} is not an address: use e.g. \"127.0.0.1:9898\""),
                        )
                    })?;
                    Some(addr)
                }
            },
        };
        let shutdown = ShutdownSettings {
            grace_ms: raw.shutdown.grace_ms.unwrap_or(DEFAULT_GRACE_MS),
        };
        if shutdown.grace_ms > 600_000 {
            return Err(invalid("shutdown.grace_ms", "must be at most 600000"));
        }

        if raw.sources.is_empty() {
            return Err(invalid(
                "source",
                "no [[source]] configured: add at least one, e.g. [[source]] type = \"sim\" stream = \"imu\"",
            ));
        }
        let mut sources = Vec::new();
        let mut streams = BTreeMap::new();
        for (i, s) in raw.sources.into_iter().enumerate() {
            let src = resolve_source(i, s)?;
            if let Some(prev) = streams.insert(src.stream().to_string(), i) {
                return Err(invalid(
                    format!("source[{i}].stream"),
                    format!(
                        "stream {:?} is already produced by source[{prev}]: give each source its own stream",
                        src.stream()
                    ),
                ));
            }
            sources.push(src);
        }
        let (inference, models) = resolve_inference(raw.inference, raw.models, &streams)?;
        let ota = resolve_ota(raw.ota)?;
        Ok(Settings {
            device_id,
            data_dir,
            log,
            mqtt,
            queue,
            metrics,
            shutdown,
            sources,
            inference,
            models,
            ota,
        })
    }

    pub fn grace(&self) -> Duration {
        Duration::from_millis(self.shutdown.grace_ms)
    }

    /// The resolved configuration as TOML, for `check-config`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render settings: {e}"))
    }
}

fn resolve_inference(
    raw: RawInference,
    raw_models: Vec<RawModel>,
    streams: &BTreeMap<String, usize>,
) -> Result<(InferenceSettings, Vec<ModelSettings>), ConfigError> {
    let backend = match raw.backend.as_deref() {
        None | Some("flex") => Backend::Flex,
        Some("wgpu") if cfg!(feature = "wgpu") => Backend::Wgpu,
        Some("wgpu") => {
            return Err(invalid(
                "inference.backend",
                "\"wgpu\" needs an agent built with `--features wgpu`, which this build is not: use \"flex\" or rebuild",
            ));
        }
        Some(other) => {
            return Err(invalid(
                "inference.backend",
                format!("{other:?} is not a backend: use \"flex\" (or \"wgpu\" in a wgpu build)"),
            ));
        }
    };
    let max_batch = raw.max_batch.unwrap_or(DEFAULT_INFERENCE_MAX_BATCH);
    if !(1..=1024).contains(&max_batch) {
        return Err(invalid(
            "inference.max_batch",
            format!("{max_batch} is out of range: use 1-1024 windows"),
        ));
    }
    let max_delay_ms = raw.max_delay_ms.unwrap_or(DEFAULT_INFERENCE_MAX_DELAY_MS);
    if max_delay_ms > 10_000 {
        return Err(invalid(
            "inference.max_delay_ms",
            format!("{max_delay_ms} is out of range: use 0-10000 ms"),
        ));
    }
    let forward_raw = match raw.forward_raw.as_deref() {
        None | Some("all") => ForwardRaw::All,
        Some("none") => ForwardRaw::None,
        Some("anomalies") => ForwardRaw::Anomalies,
        Some(other) => {
            return Err(invalid(
                "inference.forward_raw",
                format!("{other:?} is not a policy: use \"all\", \"none\" or \"anomalies\""),
            ));
        }
    };
    let anomaly_context_windows = raw
        .anomaly_context_windows
        .unwrap_or(DEFAULT_ANOMALY_CONTEXT_WINDOWS);
    if anomaly_context_windows > 16 {
        return Err(invalid(
            "inference.anomaly_context_windows",
            format!("{anomaly_context_windows} is out of range: use 0-16"),
        ));
    }
    let queue_samples = raw.queue_samples.unwrap_or(DEFAULT_INFERENCE_QUEUE_SAMPLES);
    if !(16..=10_000_000).contains(&queue_samples) {
        return Err(invalid(
            "inference.queue_samples",
            format!("{queue_samples} is out of range: use 16-10000000"),
        ));
    }
    let trusted_keys = raw.trusted_keys.unwrap_or_default();
    if !raw_models.is_empty() && trusted_keys.is_empty() {
        return Err(invalid(
            "inference.trusted_keys",
            "missing: [[model]] bundles are only loaded when signed by a trusted key; list public key files, e.g. trusted_keys = [\"/etc/ember/model-keys/release.pub\"]",
        ));
    }
    let mut models = Vec::new();
    for (i, m) in raw_models.into_iter().enumerate() {
        let key = |k: &str| format!("model[{i}].{k}");
        let bundle = m
            .bundle
            .ok_or_else(|| invalid(key("bundle"), "missing: give the model bundle file to load"))?;
        let source = m.source.ok_or_else(|| {
            invalid(
                key("source"),
                "missing: name the source stream the model windows, e.g. source = \"imu\"",
            )
        })?;
        if !streams.contains_key(&source) {
            let known: Vec<&str> = streams.keys().map(String::as_str).collect();
            return Err(invalid(
                key("source"),
                format!(
                    "no [[source]] produces stream {source:?} (configured: {}): use one of them",
                    known.join(", ")
                ),
            ));
        }
        let capture = match m.capture {
            None => CaptureSettings::default(),
            Some(c) => {
                let capture = CaptureSettings {
                    anomalies: c.anomalies.unwrap_or(false),
                    below_confidence: c.below_confidence,
                    sample: c.sample.unwrap_or(0.0),
                    max_per_minute: c.max_per_minute.unwrap_or(DEFAULT_CAPTURE_MAX_PER_MINUTE),
                };
                if let Some(t) = capture.below_confidence
                    && !(t.is_finite() && t > 0.0 && t <= 1.0)
                {
                    return Err(invalid(
                        key("capture.below_confidence"),
                        format!(
                            "{t} is out of range: use a probability above 0 and at most 1, e.g. 0.6"
                        ),
                    ));
                }
                if !(capture.sample.is_finite() && (0.0..=1.0).contains(&capture.sample)) {
                    return Err(invalid(
                        key("capture.sample"),
                        format!(
                            "{} is out of range: use a fraction from 0 to 1, e.g. 0.01 for one window in a hundred",
                            capture.sample
                        ),
                    ));
                }
                if !(1..=6000).contains(&capture.max_per_minute) {
                    return Err(invalid(
                        key("capture.max_per_minute"),
                        format!("{} is out of range: use 1-6000", capture.max_per_minute),
                    ));
                }
                capture
            }
        };
        models.push(ModelSettings {
            bundle,
            source,
            capture,
        });
    }
    Ok((
        InferenceSettings {
            backend,
            trusted_keys,
            max_batch,
            max_delay_ms,
            forward_raw,
            anomaly_context_windows,
            queue_samples,
        },
        models,
    ))
}

/// A URL's scheme and host, for `http(s)://host[:port][/path]`; `None` if it is not one.
pub fn url_origin(url: &str) -> Option<(&'static str, String)> {
    let (scheme, rest) = if let Some(r) = url.strip_prefix("https://") {
        ("https", r)
    } else if let Some(r) = url.strip_prefix("http://") {
        ("http", r)
    } else {
        return None;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.is_empty() || authority.contains('@') || authority.contains(char::is_whitespace) {
        return None;
    }
    let host = if let Some(v6) = authority.strip_prefix('[') {
        format!("[{}]", v6.split(']').next().unwrap_or_default())
    } else {
        authority.split(':').next().unwrap_or_default().to_string()
    };
    if host.is_empty() || host == "[]" {
        return None;
    }
    Some((scheme, host))
}

/// AWS IoT Core's rules (`crate::profile`), on settings otherwise valid.
fn check_aws(mqtt: &MqttSettings, device_id: &str, limits: &Limits) -> Result<(), ConfigError> {
    let aws = "with mqtt.profile = \"aws-iot-core\"";
    profile::check_thing_name(device_id).map_err(|e| {
        invalid(
            "device_id",
            format!("{e}; {aws} the device id is the thing name and the MQTT client id"),
        )
    })?;
    if device_id.len() > limits.thing_name_max_bytes {
        return Err(invalid(
            "device_id",
            format!(
                "{device_id:?} is longer than the profile's {} bytes for a thing name",
                limits.thing_name_max_bytes
            ),
        ));
    }
    if mqtt.client_id != device_id {
        return Err(invalid(
            "mqtt.client_id",
            format!(
                "{:?} differs from the device id {device_id:?}: {aws} the client id must be the thing name, which the device policy checks (iot:Connection.Thing.ThingName); remove mqtt.client_id",
                mqtt.client_id
            ),
        ));
    }
    if !(limits.keep_alive_min_s..=limits.keep_alive_max_s).contains(&mqtt.keep_alive_s) {
        return Err(invalid(
            "mqtt.keep_alive_s",
            format!(
                "{} is out of range {aws}: IoT Core allows {}-{} seconds",
                mqtt.keep_alive_s, limits.keep_alive_min_s, limits.keep_alive_max_s
            ),
        ));
    }
    if mqtt.message_max_bytes > limits.max_payload_bytes {
        return Err(invalid(
            "mqtt.message_max_bytes",
            format!(
                "{} is above IoT Core's payload limit of {} bytes: use at most that",
                mqtt.message_max_bytes, limits.max_payload_bytes
            ),
        ));
    }
    if mqtt.max_publish_rate == 0 || mqtt.max_publish_rate > limits.publish_per_second {
        return Err(invalid(
            "mqtt.max_publish_rate",
            format!(
                "{} is out of range {aws}: IoT Core allows {} publishes per second per connection; use 1-{} (the default, {}, leaves room for status and heartbeat)",
                mqtt.max_publish_rate,
                limits.publish_per_second,
                limits.publish_per_second,
                profile::AWS_DEFAULT_PUBLISH_RATE
            ),
        ));
    }
    if mqtt.reconnect_min_ms < profile::AWS_MIN_RECONNECT_MS {
        return Err(invalid(
            "mqtt.reconnect_min_ms",
            format!(
                "{} is too short {aws}: IoT Core accepts one connect per second per client id; use at least {}",
                mqtt.reconnect_min_ms,
                profile::AWS_MIN_RECONNECT_MS
            ),
        ));
    }
    let Some(tls) = &mqtt.tls else {
        return Err(invalid(
            "mqtt.tls",
            format!("missing: {aws} TLS is required"),
        ));
    };
    if tls.cert_file.is_none() {
        return Err(invalid(
            "mqtt.tls.cert_file",
            format!(
                "missing: {aws} the agent authenticates with the thing's X.509 certificate; set cert_file and key_file"
            ),
        ));
    }
    if mqtt.port == 443 && !tls.alpn.iter().any(|p| p == profile::AWS_ALPN) {
        return Err(invalid(
            "mqtt.tls.alpn",
            format!(
                "IoT Core takes MQTT on port 443 only with the ALPN protocol {:?}: remove mqtt.tls.alpn (it is offered by default) or add it",
                profile::AWS_ALPN
            ),
        ));
    }
    Ok(())
}

/// Azure IoT Hub's rules (`crate::profile::azure`), on settings otherwise valid.
fn check_azure(mqtt: &MqttSettings, device_id: &str) -> Result<(), ConfigError> {
    use crate::profile::azure;
    let azure = "with mqtt.profile = \"azure-iot-hub\"";
    if mqtt.client_id != device_id {
        return Err(invalid(
            "mqtt.client_id",
            format!(
                "{:?} differs from the device id {device_id:?}: {azure} the client id must be the IoT Hub device id; remove mqtt.client_id",
                mqtt.client_id
            ),
        ));
    }
    // IoT Hub takes MQTT on 8883 (the default); other ports are left to gateways and test
    // stand-ins, but 443 is MQTT over WebSockets and 1883 plaintext, which IoT Hub refuses.
    if mqtt.port == 443 || mqtt.port == 1883 {
        return Err(invalid(
            "mqtt.port",
            format!(
                "{} is not IoT Hub's MQTT port: use 8883 (port 443 is MQTT over WebSockets, which the agent does not speak; 1883 is plaintext)",
                mqtt.port
            ),
        ));
    }
    if mqtt.keep_alive_s > azure::KEEP_ALIVE_MAX_S {
        return Err(invalid(
            "mqtt.keep_alive_s",
            format!(
                "{} is too long {azure}: IoT Hub closes connections idle for more than {} seconds",
                mqtt.keep_alive_s,
                azure::KEEP_ALIVE_MAX_S
            ),
        ));
    }
    if mqtt.message_max_bytes > azure::MAX_MESSAGE_BYTES {
        return Err(invalid(
            "mqtt.message_max_bytes",
            format!(
                "{} is above IoT Hub's message limit of {} bytes: use at most that",
                mqtt.message_max_bytes,
                azure::MAX_MESSAGE_BYTES
            ),
        ));
    }
    let x509 = mqtt.tls.as_ref().is_some_and(|t| t.cert_file.is_some());
    match (&mqtt.sas_key_file, x509) {
        (Some(_), true) => {
            return Err(invalid(
                "mqtt.sas_key_file",
                format!(
                    "is set and so is mqtt.tls.cert_file: {azure} a device authenticates with a SAS token or with its X.509 certificate, not both; remove one"
                ),
            ));
        }
        (None, false) => {
            return Err(invalid(
                "mqtt.sas_key_file",
                format!(
                    "missing: {azure} the device authenticates with a SAS token made from its symmetric key (sas_key_file, the key as `az iot hub device-identity show` prints it, mode 0600) or with its X.509 certificate (mqtt.tls.cert_file and key_file)"
                ),
            ));
        }
        (Some(path), false) => {
            check_key_permissions(path).map_err(|m| invalid("mqtt.sas_key_file", m))?;
            read_sas_key(path).map_err(|m| invalid("mqtt.sas_key_file", m))?;
        }
        (None, true) => {}
    }
    if !(azure::SAS_TTL_MIN_S..=azure::SAS_TTL_MAX_S).contains(&mqtt.sas_token_ttl_s) {
        return Err(invalid(
            "mqtt.sas_token_ttl_s",
            format!(
                "{} is out of range: use {}-{} seconds",
                mqtt.sas_token_ttl_s,
                azure::SAS_TTL_MIN_S,
                azure::SAS_TTL_MAX_S
            ),
        ));
    }
    if !(1..=86_400).contains(&mqtt.twin_report_min_interval_s) {
        return Err(invalid(
            "mqtt.twin_report_min_interval_s",
            format!(
                "{} is out of range: use 1-86400 seconds",
                mqtt.twin_report_min_interval_s
            ),
        ));
    }
    Ok(())
}

/// Reads a device's symmetric key file (base64 as Azure shows it). `Err` never quotes the key.
pub fn read_sas_key(path: &Path) -> Result<ember_host::sas::SasKey, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    ember_host::sas::SasKey::from_base64(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Resolves `[mqtt.tls]` and `mqtt.insecure` for a broker on `host`, checking the files: they
/// must be readable PEM, and the key must not be readable by group or others.
pub fn resolve_tls(
    raw: Option<RawTls>,
    insecure: Option<bool>,
    host: &str,
) -> Result<Option<TlsSettings>, ConfigError> {
    let insecure = insecure.unwrap_or(false);
    tls_files::check_mqtt_transport(raw.is_some(), insecure, host)
        .map_err(|(k, m)| invalid(k, m))?;
    let Some(raw) = raw else {
        return Ok(None);
    };
    let system_roots = raw.system_roots.unwrap_or(false);
    let ca_file = match (raw.ca_file, system_roots) {
        (Some(_), true) => {
            return Err(invalid(
                "mqtt.tls.system_roots",
                "is true and ca_file is set: trust either the one CA in ca_file or the system's store, not both",
            ));
        }
        (None, true) => {
            crate::tls_files::system_roots().map_err(|m| invalid("mqtt.tls.system_roots", m))?;
            None
        }
        (ca_file, false) => {
            let (ca_file, ca) = tls_files::mqtt_ca_file(ca_file).map_err(|(k, m)| invalid(k, m))?;
            let mut roots = rustls::RootCertStore::empty();
            for c in ca {
                roots
                    .add(c)
                    .map_err(|e| invalid("mqtt.tls.ca_file", format!("not a usable CA: {e}")))?;
            }
            Some(ca_file)
        }
    };
    match (&raw.cert_file, &raw.key_file) {
        (Some(cert), Some(key)) => {
            check_key_permissions(key).map_err(|m| invalid("mqtt.tls.key_file", m))?;
            tls_files::load_pair(cert, key).map_err(|(k, m)| invalid(k, m))?;
        }
        (Some(_), None) => {
            return Err(invalid(
                "mqtt.tls.key_file",
                "missing: cert_file is set, so give its private key too",
            ));
        }
        (None, Some(_)) => {
            return Err(invalid(
                "mqtt.tls.cert_file",
                "missing: key_file is set, so give its certificate too",
            ));
        }
        (None, None) => {}
    }
    if let Some(name) = &raw.server_name {
        rustls::pki_types::ServerName::try_from(name.as_str()).map_err(|_| {
            invalid(
                "mqtt.tls.server_name",
                format!("{name:?} is not a DNS name or IP address"),
            )
        })?;
    }
    let alpn = raw.alpn.unwrap_or_default();
    if alpn.iter().any(|p| p.is_empty() || p.len() > 255) {
        return Err(invalid(
            "mqtt.tls.alpn",
            "each protocol must be 1-255 bytes, e.g. [\"x-amzn-mqtt-ca\"]",
        ));
    }
    let expiry_warn_days = raw.expiry_warn_days.unwrap_or(DEFAULT_EXPIRY_WARN_DAYS);
    if expiry_warn_days > 3650 {
        return Err(invalid("mqtt.tls.expiry_warn_days", "must be at most 3650"));
    }
    Ok(Some(TlsSettings {
        ca_file,
        system_roots,
        cert_file: raw.cert_file,
        key_file: raw.key_file,
        alpn,
        server_name: raw.server_name,
        expiry_warn_days,
    }))
}

fn resolve_ota(raw: RawOta) -> Result<OtaSettings, ConfigError> {
    let insecure = raw.insecure.unwrap_or(false);
    let fleet_url = match raw.fleet_url {
        None => None,
        Some(u) => {
            let u = u.trim_end_matches('/').to_string();
            let Some((scheme, host)) = url_origin(&u) else {
                return Err(invalid(
                    "ota.fleet_url",
                    format!(
                        "{u:?} is not an http(s) URL: use e.g. \"https://fleet.example.com:8443\""
                    ),
                ));
            };
            if scheme == "http" && !insecure && !is_loopback(&host) {
                return Err(invalid(
                    "ota.fleet_url",
                    format!(
                        "{u:?} is plain HTTP to {host}, which is not this machine: use https:// (or, for development only, set ota.insecure = true)"
                    ),
                ));
            }
            Some(u)
        }
    };
    let enabled = raw.enabled.unwrap_or(fleet_url.is_some());
    if let Some(token) = &raw.token_file {
        check_key_permissions(token)
            .map_err(|m| invalid("ota.token_file", m.replace("private key", "token file")))?;
        let text = std::fs::read_to_string(token).map_err(|e| {
            invalid(
                "ota.token_file",
                format!("cannot read {}: {e}", token.display()),
            )
        })?;
        let t = text.trim();
        if t.is_empty() || t.contains(char::is_whitespace) {
            return Err(invalid(
                "ota.token_file",
                format!("{} must hold one token on one line", token.display()),
            ));
        }
    }
    if let Some(ca) = &raw.ca_file {
        std::fs::metadata(ca)
            .map_err(|e| invalid("ota.ca_file", format!("cannot read {}: {e}", ca.display())))?;
    }
    let max_bundle_bytes = raw.max_bundle_bytes.unwrap_or(DEFAULT_OTA_MAX_BUNDLE_BYTES);
    if !(1024..=16 * 1024 * 1024 * 1024).contains(&max_bundle_bytes) {
        return Err(invalid(
            "ota.max_bundle_bytes",
            format!("{max_bundle_bytes} is out of range: use 1024-17179869184"),
        ));
    }
    let crash_loop_restarts = raw
        .crash_loop_restarts
        .unwrap_or(DEFAULT_OTA_CRASH_LOOP_RESTARTS);
    if !(1..=100).contains(&crash_loop_restarts) {
        return Err(invalid(
            "ota.crash_loop_restarts",
            format!("{crash_loop_restarts} is out of range: use 1-100"),
        ));
    }
    let crash_loop_window_s = raw
        .crash_loop_window_s
        .unwrap_or(DEFAULT_OTA_CRASH_LOOP_WINDOW_S);
    if !(1..=86_400).contains(&crash_loop_window_s) {
        return Err(invalid(
            "ota.crash_loop_window_s",
            format!("{crash_loop_window_s} is out of range: use 1-86400 seconds"),
        ));
    }
    Ok(OtaSettings {
        enabled,
        fleet_url,
        insecure,
        token_file: raw.token_file,
        ca_file: raw.ca_file,
        max_bundle_bytes,
        crash_loop_restarts,
        crash_loop_window_s,
    })
}

fn resolve_source(i: usize, s: RawSource) -> Result<SourceSettings, ConfigError> {
    let key = |k: &str| format!("source[{i}].{k}");
    let kind = s.kind.ok_or_else(|| {
        invalid(
            key("type"),
            "missing: use \"sim\", \"replay\", \"socket\" or \"serial\"",
        )
    })?;
    let stream = s.stream.ok_or_else(|| {
        invalid(
            key("stream"),
            "missing: name the stream, e.g. stream = \"imu\"",
        )
    })?;
    ember_proto::check_name(&stream)
        .map_err(|why| invalid(key("stream"), format!("{stream:?}: {why}")))?;
    let rate = |default: f64| -> Result<f64, ConfigError> {
        let r = s.rate_hz.unwrap_or(default);
        if !(r.is_finite() && r > 0.0 && r <= 100_000.0) {
            return Err(invalid(
                key("rate_hz"),
                format!("{r} is out of range: use a rate in (0, 100000] Hz"),
            ));
        }
        Ok(r)
    };
    let reject = |field: &str, present: bool| -> Result<(), ConfigError> {
        if present {
            Err(invalid(
                key(field),
                format!("does not apply to a {kind:?} source: remove it"),
            ))
        } else {
            Ok(())
        }
    };
    let max_backwards_ms = s.max_backwards_ms.unwrap_or(DEFAULT_MAX_BACKWARDS_MS);
    if max_backwards_ms > MAX_MAX_BACKWARDS_MS {
        return Err(invalid(
            key("max_backwards_ms"),
            format!("{max_backwards_ms} is out of range: use 0-{MAX_MAX_BACKWARDS_MS} (ms)"),
        ));
    }
    let declared = match s.channels {
        Some(c) if !(1..=256).contains(&c) => {
            return Err(invalid(
                key("channels"),
                format!("{c} is out of range: use 1-256"),
            ));
        }
        c => c,
    };
    if kind != "serial" {
        reject("device", s.device.is_some())?;
        reject("baud", s.baud.is_some())?;
        reject("timestamps", s.timestamps.is_some())?;
    }
    match kind.as_str() {
        "sim" => {
            reject("path", s.path.is_some())?;
            reject("format", s.format.is_some())?;
            reject("loop", s.looped.is_some())?;
            reject("unix", s.unix.is_some())?;
            reject("tcp", s.tcp.is_some())?;
            let channels = s.channels.unwrap_or(6);
            if !(1..=256).contains(&channels) {
                return Err(invalid(
                    key("channels"),
                    format!("{channels} is out of range: use 1-256"),
                ));
            }
            Ok(SourceSettings::Sim {
                stream,
                rate_hz: rate(100.0)?,
                channels,
                seed: s.seed.unwrap_or(1),
                max_backwards_ms,
            })
        }
        "replay" => {
            reject("seed", s.seed.is_some())?;
            reject("unix", s.unix.is_some())?;
            reject("tcp", s.tcp.is_some())?;
            let path = s.path.ok_or_else(|| {
                invalid(key("path"), "missing: give the CSV or .ts file to replay")
            })?;
            let format = match s.format.as_deref() {
                Some("csv") => ReplayFormat::Csv,
                Some("ts") => ReplayFormat::Ts,
                Some(other) => {
                    return Err(invalid(
                        key("format"),
                        format!("{other:?} is not a format: use \"csv\" or \"ts\""),
                    ));
                }
                None => match path.extension().and_then(|e| e.to_str()) {
                    Some("csv") => ReplayFormat::Csv,
                    Some("ts") => ReplayFormat::Ts,
                    _ => {
                        return Err(invalid(
                            key("format"),
                            "cannot tell from the file extension: set format = \"csv\" or \"ts\"",
                        ));
                    }
                },
            };
            Ok(SourceSettings::Replay {
                stream,
                path,
                format,
                rate_hz: rate(10.0)?,
                looped: s.looped.unwrap_or(true),
                channels: declared,
                max_backwards_ms,
            })
        }
        "socket" => {
            reject("rate_hz", s.rate_hz.is_some())?;
            reject("seed", s.seed.is_some())?;
            reject("path", s.path.is_some())?;
            reject("format", s.format.is_some())?;
            reject("loop", s.looped.is_some())?;
            let endpoint = match (s.unix, s.tcp) {
                (Some(p), None) => SocketEndpoint::Unix(p),
                (None, Some(t)) => {
                    let addr: SocketAddr = t.parse().map_err(|_| {
                        invalid(
                            key("tcp"),
                            format!("{t:?} is not an address: use e.g. \"127.0.0.1:7070\""),
                        )
                    })?;
                    if !addr.ip().is_loopback() {
                        return Err(invalid(
                            key("tcp"),
                            format!(
                                "{addr} is not a loopback address: the socket source only listens on 127.0.0.1 or ::1 (local processes)"
                            ),
                        ));
                    }
                    SocketEndpoint::Tcp(addr)
                }
                (Some(_), Some(_)) => {
                    return Err(invalid(key("tcp"), "set either unix or tcp, not both"));
                }
                (None, None) => {
                    return Err(invalid(
                        key("unix"),
                        "missing: set unix = \"/path/to.sock\" or tcp = \"127.0.0.1:7070\"",
                    ));
                }
            };
            Ok(SourceSettings::Socket {
                stream,
                endpoint,
                channels: declared,
                max_backwards_ms,
            })
        }
        "serial" => {
            reject("seed", s.seed.is_some())?;
            reject("path", s.path.is_some())?;
            reject("format", s.format.is_some())?;
            reject("loop", s.looped.is_some())?;
            reject("unix", s.unix.is_some())?;
            reject("tcp", s.tcp.is_some())?;
            let device = match s.device.as_deref() {
                None | Some("") => {
                    return Err(invalid(
                        key("device"),
                        "missing: set device = \"/dev/ttyACM0\" (a serial device) or \"tcp:127.0.0.1:5555\" (a raw TCP serial server)",
                    ));
                }
                Some(d) => match d.strip_prefix("tcp:") {
                    Some(addr) => {
                        let ok = addr.rsplit_once(':').is_some_and(|(h, p)| {
                            !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0)
                        });
                        if !ok {
                            return Err(invalid(
                                key("device"),
                                format!(
                                    "{d:?} is not tcp:HOST:PORT: use e.g. \"tcp:127.0.0.1:5555\""
                                ),
                            ));
                        }
                        SerialDevice::Tcp(addr.to_string())
                    }
                    None => SerialDevice::Tty(PathBuf::from(d)),
                },
            };
            let baud = s.baud.unwrap_or(DEFAULT_SERIAL_BAUD);
            if !(300..=4_000_000).contains(&baud) {
                return Err(invalid(
                    key("baud"),
                    format!("{baud} is out of range: use 300-4000000, e.g. 115200"),
                ));
            }
            let timestamps = match s.timestamps.as_deref() {
                None | Some("node") => SerialTimestamps::Node,
                Some("agent") => SerialTimestamps::Agent,
                Some(other) => {
                    return Err(invalid(
                        key("timestamps"),
                        format!("{other:?} is not a clock: use \"node\" or \"agent\""),
                    ));
                }
            };
            let rate_hz = match s.rate_hz {
                None => None,
                Some(r)
                    if r.fract() == 0.0
                        && (1.0..=f64::from(ember_proto::node::MAX_RATE_HZ)).contains(&r) =>
                {
                    Some(r as u16)
                }
                Some(r) => {
                    return Err(invalid(
                        key("rate_hz"),
                        format!(
                            "{r} is not a node rate: use a whole number of Hz in 1-{}",
                            ember_proto::node::MAX_RATE_HZ
                        ),
                    ));
                }
            };
            Ok(SourceSettings::Serial {
                stream,
                device,
                baud,
                timestamps,
                rate_hz,
                channels: declared,
                max_backwards_ms,
            })
        }
        other => Err(invalid(
            key("type"),
            format!(
                "{other:?} is not a source type: use \"sim\", \"replay\", \"socket\" or \"serial\""
            ),
        )),
    }
}

/// The OTA test-only fault hook (`ota`, compiled only with the `fault-injection` feature):
/// `<model>@<version>` aborts the agent shortly after that version serves. Named here, below
/// `ota`, because the name is reserved in every build: a release build ignores it rather than
/// refusing it as an unknown override.
pub const FAULT_CRASH_AFTER_SWITCH_ENV: &str = "EMBER_AGENT_FAULT_CRASH_AFTER_SWITCH";

/// Keys whose values are text even when they look like numbers or booleans
/// (`EMBER_DEVICE_ID=1001` is the device id `"1001"`); `the_string_keys_are_every_text_setting`
/// keeps the list complete.
const STRING_KEYS: &[&str] = &[
    "device_id",
    "data_dir",
    "log.format",
    "log.level",
    "mqtt.host",
    "mqtt.client_id",
    "mqtt.encoding",
    "mqtt.delivery",
    "mqtt.profile",
    "mqtt.profile_file",
    "mqtt.sas_key_file",
    "queue.full_policy",
    "queue.fsync",
    "metrics.listen",
    "inference.backend",
    "inference.forward_raw",
    "ota.fleet_url",
    "ota.token_file",
    "ota.ca_file",
];

/// `EMBER_<KEY>` / `EMBER_<SECTION>__<KEY>`. Names in `ember_host::env::RESERVED` (the config
/// path, the log filter, the fault hook [`FAULT_CRASH_AFTER_SWITCH_ENV`], test variables) and
/// the fleet's `EMBER_FLEET_*` are not overrides.
const ENV: Overlay<'static> = Overlay {
    program: "ember-agent",
    example: "agent/examples/agent.toml",
    prefix: "EMBER_",
    foreign_prefixes: &["EMBER_FLEET_"],
    string_keys: STRING_KEYS,
    file_only: &[("source", "sources can only be configured in the file")],
};

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "device_id = \"d1\"\n[[source]]\ntype = \"sim\"\nstream = \"imu\"\n";

    fn load(text: &str) -> Result<Settings, ConfigError> {
        Settings::from_toml(text, "test.toml", Vec::new())
    }

    /// `EMBER_DEVICE_ID=1001` is the device id "1001" (it was once parsed as an integer and
    /// refused), and the fleet's and the tests' variables are not overrides.
    #[test]
    fn numeric_looking_text_stays_text_and_reserved_names_are_skipped() {
        let env: Vec<(String, String)> = [
            ("EMBER_DEVICE_ID", "1001"),
            ("EMBER_MQTT__HOST", "10.0.0.7"),
            ("EMBER_MQTT__INSECURE", "true"),
            ("EMBER_FLEET_URL", "http://fleet:8080"),
            ("EMBER_TEST_SEED", "7"),
            ("EMBER_LOG", "debug"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let s = Settings::from_toml(MIN, "t", env).unwrap();
        assert_eq!(s.device_id, "1001");
        assert_eq!(s.mqtt.host, "10.0.0.7");
        let e = Settings::from_toml(MIN, "t", vec![("EMBER_REPO".into(), "/src".into())])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("EMBER_REPO") && e.contains("unset the variable"),
            "{e}"
        );
    }

    /// Every setting that holds text is in `STRING_KEYS`.
    #[test]
    fn the_string_keys_are_every_text_setting() {
        let text = include_str!("../examples/agent.toml");
        let s = load(text).unwrap();
        let table: toml::Table = toml::from_str(&s.to_toml()).unwrap();
        for key in ember_host::env::string_keys_of(&table) {
            assert!(
                STRING_KEYS.contains(&key.as_str()),
                "`{key}` holds text: add it to STRING_KEYS"
            );
        }
    }

    fn err(text: &str) -> String {
        load(text)
            .expect_err("config should be rejected")
            .to_string()
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let s = load(MIN).unwrap();
        assert_eq!(s.mqtt.port, DEFAULT_MQTT_PORT);
        assert_eq!(s.mqtt.delivery, DeliveryMode::Auto);
        assert_eq!(s.mqtt.commit_timeout_s, DEFAULT_COMMIT_TIMEOUT_S);
        assert_eq!(s.mqtt.client_id, "d1");
        assert_eq!(s.queue.fsync, FsyncPolicy::EveryBatch);
        assert_eq!(s.queue.full_policy, FullPolicy::DropOldest);
        assert_eq!(
            s.sources,
            vec![SourceSettings::Sim {
                stream: "imu".into(),
                rate_hz: 100.0,
                channels: 6,
                seed: 1,
                max_backwards_ms: DEFAULT_MAX_BACKWARDS_MS,
            }]
        );
        assert!(s.to_toml().contains("device_id = \"d1\""));
    }

    #[test]
    fn env_overrides_file() {
        let env = vec![
            ("EMBER_MQTT__PORT".to_string(), "8883".to_string()),
            ("EMBER_DEVICE_ID".to_string(), "from-env".to_string()),
            ("EMBER_QUEUE__FSYNC".to_string(), "never".to_string()),
            (
                "EMBER_FLEET_DATABASE_URL".to_string(),
                "ignored".to_string(),
            ),
            ("PATH".to_string(), "/bin".to_string()),
        ];
        let s = Settings::from_toml(MIN, "t", env).unwrap();
        assert_eq!(s.mqtt.port, 8883);
        assert_eq!(s.device_id, "from-env");
        assert_eq!(s.queue.fsync, FsyncPolicy::Never);
    }

    #[test]
    fn bad_env_names_the_variable() {
        let e = Settings::from_toml(MIN, "t", vec![("EMBER_MQTT__PROT".into(), "1".into())])
            .unwrap_err()
            .to_string();
        assert!(e.contains("prot"), "{e}");
        let e = Settings::from_toml(MIN, "t", vec![("EMBER_MQTT__PORT".into(), "abc".into())])
            .unwrap_err()
            .to_string();
        assert!(e.contains("port"), "{e}");
    }

    #[test]
    fn capture_policies_resolve_and_name_the_key_when_invalid() {
        let base = format!(
            "{MIN}[inference]\ntrusted_keys = [\"k.pub\"]\n[[model]]\nbundle = \"m.bundle\"\nsource = \"imu\"\n"
        );
        let s = load(&base).unwrap();
        assert_eq!(s.models[0].capture, CaptureSettings::default());
        assert!(!s.models[0].capture.enabled());
        let s = load(&format!(
            "{base}[model.capture]\nanomalies = true\nbelow_confidence = 0.6\nsample = 0.01\n"
        ))
        .unwrap();
        let c = &s.models[0].capture;
        assert!(c.anomalies && c.enabled());
        assert_eq!(c.below_confidence, Some(0.6));
        assert_eq!(c.sample, 0.01);
        assert_eq!(c.max_per_minute, DEFAULT_CAPTURE_MAX_PER_MINUTE);
        for (body, key) in [
            (
                "below_confidence = 1.5",
                "model[0].capture.below_confidence",
            ),
            ("below_confidence = 0", "model[0].capture.below_confidence"),
            ("sample = 2", "model[0].capture.sample"),
            ("sample = -0.1", "model[0].capture.sample"),
            ("max_per_minute = 0", "model[0].capture.max_per_minute"),
        ] {
            let e = err(&format!("{base}[model.capture]\n{body}\n"));
            assert!(e.contains(key), "{body}: {e}");
        }
        let e = err(&format!("{base}[model.capture]\nsampel = 0.1\n"));
        assert!(e.contains("sampel"), "{e}");
    }

    #[test]
    fn inference_keys_resolve_and_name_the_key_when_invalid() {
        let ok = format!(
            "{MIN}[inference]\ntrusted_keys = [\"k.pub\"]\nforward_raw = \"anomalies\"\n[[model]]\nbundle = \"m.bundle\"\nsource = \"imu\"\n"
        );
        let s = load(&ok).unwrap();
        assert_eq!(s.inference.forward_raw, ForwardRaw::Anomalies);
        assert_eq!(s.inference.backend, Backend::Flex);
        assert_eq!(s.inference.max_batch, DEFAULT_INFERENCE_MAX_BATCH);
        assert_eq!(s.models[0].bundle, PathBuf::from("m.bundle"));
        let env = Settings::from_toml(
            &ok,
            "t",
            vec![("EMBER_INFERENCE__MAX_BATCH".into(), "4".into())],
        )
        .unwrap();
        assert_eq!(env.inference.max_batch, 4);
        let model = "[[model]]\nbundle = \"m.bundle\"\nsource = \"imu\"\n";
        let keys = "[inference]\ntrusted_keys = [\"k.pub\"]\n";
        let cases = [
            (format!("{MIN}{model}"), "inference.trusted_keys"),
            (
                format!(
                    "{MIN}[inference]\ntrusted_keys = [\"k\"]\n[[model]]\nbundle = \"m\"\nsource = \"nope\"\n"
                ),
                "model[0].source",
            ),
            (
                format!("{MIN}{keys}[[model]]\nsource = \"imu\"\n"),
                "model[0].bundle",
            ),
            (
                format!("{MIN}[inference]\nforward_raw = \"some\"\n"),
                "inference.forward_raw",
            ),
            (
                format!("{MIN}[inference]\nbackend = \"cuda\"\n"),
                "inference.backend",
            ),
            (
                format!("{MIN}[inference]\nmax_batch = 0\n"),
                "inference.max_batch",
            ),
            (format!("{MIN}[inference]\nbatch = 1\n"), "batch"),
        ];
        for (text, key) in cases {
            let e = err(&text);
            assert!(e.contains(key), "{text}: {e} should name {key}");
        }
    }

    #[test]
    fn the_wgpu_backend_is_accepted_only_by_a_wgpu_build() {
        let text = format!("{MIN}[inference]\nbackend = \"wgpu\"\n");
        if cfg!(feature = "wgpu") {
            assert_eq!(load(&text).unwrap().inference.backend, Backend::Wgpu);
        } else {
            let e = err(&text);
            assert!(
                e.contains("inference.backend") && e.contains("--features wgpu"),
                "{e}"
            );
        }
    }

    #[test]
    fn ota_keys_resolve_and_name_the_key_when_invalid() {
        let s = load(MIN).unwrap();
        assert!(!s.ota.enabled, "no fleet_url: OTA is off by default");
        let s = load(&format!(
            "{MIN}[ota]\nfleet_url = \"https://fleet:8443/\"\n"
        ))
        .unwrap();
        assert!(s.ota.enabled);
        assert_eq!(s.ota.fleet_url.as_deref(), Some("https://fleet:8443"));
        assert_eq!(s.ota.crash_loop_restarts, DEFAULT_OTA_CRASH_LOOP_RESTARTS);
        let s = load(&format!(
            "{MIN}[ota]\nfleet_url = \"http://127.0.0.1:8080\"\n"
        ))
        .unwrap();
        assert!(s.ota.enabled, "plain HTTP to loopback is fine");
        let env = Settings::from_toml(
            MIN,
            "t",
            vec![("EMBER_OTA__CRASH_LOOP_RESTARTS".into(), "5".into())],
        )
        .unwrap();
        assert_eq!(env.ota.crash_loop_restarts, 5);
        let dir = tempfile_dir();
        let token = dir.join("token");
        std::fs::write(&token, "secret-token\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
        let cases = [
            (
                format!("{MIN}[ota]\nfleet_url = \"ftp://x\"\n"),
                "ota.fleet_url",
            ),
            (
                format!("{MIN}[ota]\nfleet_url = \"http://fleet.example.com\"\n"),
                "ota.insecure",
            ),
            (
                format!("{MIN}[ota]\ncrash_loop_restarts = 0\n"),
                "ota.crash_loop_restarts",
            ),
            (
                format!("{MIN}[ota]\ncrash_loop_window_s = 0\n"),
                "ota.crash_loop_window_s",
            ),
            (
                format!("{MIN}[ota]\nmax_bundle_bytes = 5\n"),
                "ota.max_bundle_bytes",
            ),
            (
                format!(
                    "{MIN}[ota]\ntoken_file = {:?}\n",
                    token.display().to_string()
                ),
                "ota.token_file",
            ),
            (format!("{MIN}[ota]\nurl = \"x\"\n"), "url"),
        ];
        for (text, key) in cases {
            let e = err(&text);
            assert!(e.contains(key), "{text}: {e} should name {key}");
        }
        assert!(!err(&cases_token(&token)).contains("secret-token"));
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
        load(&cases_token(&token)).expect("a private token file is accepted");
        let _ = std::fs::remove_dir_all(dir);
    }

    fn cases_token(token: &Path) -> String {
        format!(
            "{MIN}[ota]\ntoken_file = {:?}\n",
            token.display().to_string()
        )
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "ember-config-test-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// The serial source's keys: defaults, both kinds of device, and each bad value refused
    /// naming its key.
    #[test]
    fn serial_sources_resolve_and_bad_keys_are_named() {
        let base = "device_id = \"d1\"\n[[source]]\ntype = \"serial\"\nstream = \"imu\"\n";
        let s = load(&format!("{base}device = \"/dev/ttyACM0\"")).unwrap();
        assert_eq!(
            s.sources,
            vec![SourceSettings::Serial {
                stream: "imu".into(),
                device: SerialDevice::Tty("/dev/ttyACM0".into()),
                baud: DEFAULT_SERIAL_BAUD,
                timestamps: SerialTimestamps::Node,
                rate_hz: None,
                channels: None,
                max_backwards_ms: DEFAULT_MAX_BACKWARDS_MS,
            }]
        );
        let s = load(&format!(
            "{base}device = \"tcp:127.0.0.1:5555\"\nbaud = 921600\ntimestamps = \"agent\"\nrate_hz = 250\nchannels = 6"
        ))
        .unwrap();
        assert!(matches!(
            &s.sources[0],
            SourceSettings::Serial { device: SerialDevice::Tcp(a), baud: 921_600, timestamps: SerialTimestamps::Agent, rate_hz: Some(250), channels: Some(6), .. } if a == "127.0.0.1:5555"
        ));
        for (extra, key) in [
            ("", "source[0].device"),
            ("device = \"tcp:nohost\"", "source[0].device"),
            ("device = \"tcp:127.0.0.1:0\"", "source[0].device"),
            ("device = \"/dev/ttyS0\"\nbaud = 10", "source[0].baud"),
            (
                "device = \"/dev/ttyS0\"\ntimestamps = \"gps\"",
                "source[0].timestamps",
            ),
            (
                "device = \"/dev/ttyS0\"\nrate_hz = 0.5",
                "source[0].rate_hz",
            ),
            (
                "device = \"/dev/ttyS0\"\nrate_hz = 20000",
                "source[0].rate_hz",
            ),
            (
                "device = \"/dev/ttyS0\"\ntcp = \"127.0.0.1:1\"",
                "source[0].tcp",
            ),
        ] {
            let e = err(&format!("{base}{extra}"));
            assert!(e.contains(key), "{extra:?}: {e}");
        }
        let e = err(&format!("{MIN}device = \"/dev/ttyS0\""));
        assert!(
            e.contains("source[0].device") && e.contains("does not apply"),
            "{e}"
        );
    }

    #[test]
    fn invalid_configs_name_the_key() {
        let cases: &[(&str, &str)] = &[
            ("[[source]]\ntype=\"sim\"\nstream=\"a\"", "device_id"),
            (
                "device_id = \"a/b\"\n[[source]]\ntype=\"sim\"\nstream=\"a\"",
                "device_id",
            ),
            ("device_id = \"d\"", "source"),
            (&format!("{MIN}[mqtt]\nprot = 1"), "prot"),
            (&format!("{MIN}[mqtt]\nport = 0"), "mqtt.port"),
            (&format!("{MIN}[mqtt]\nport = 70000"), "port"),
            (&format!("{MIN}[mqtt]\nencoding = \"xml\""), "mqtt.encoding"),
            (
                &format!("{MIN}[mqtt]\ndelivery = \"broker\""),
                "mqtt.delivery",
            ),
            (
                &format!("{MIN}[mqtt]\ncommit_timeout_s = 0"),
                "mqtt.commit_timeout_s",
            ),
            (
                &format!("{MIN}[mqtt]\ncommit_fallback_s = 0"),
                "mqtt.commit_fallback_s",
            ),
            (
                &format!("{MIN}[mqtt]\nmessage_max_bytes = 10"),
                "mqtt.message_max_bytes",
            ),
            (
                &format!("{MIN}[mqtt]\nmax_in_flight = 0"),
                "mqtt.max_in_flight",
            ),
            (
                &format!("{MIN}[queue]\nfsync = \"sometimes\""),
                "queue.fsync",
            ),
            (
                &format!("{MIN}[queue]\nfull_policy = \"panic\""),
                "queue.full_policy",
            ),
            (&format!("{MIN}[queue]\nmax_bytes = 5"), "queue.max_bytes"),
            (
                &format!("{MIN}[queue]\nfsync_interval_ms = 5"),
                "queue.fsync_interval_ms",
            ),
            (&format!("{MIN}[log]\nformat = \"xml\""), "log.format"),
            (
                &format!("{MIN}[metrics]\nlisten = \"nowhere\""),
                "metrics.listen",
            ),
            (
                &format!("{MIN}[[source]]\ntype = \"sim\"\nstream = \"imu\""),
                "source[1].stream",
            ),
            (
                &format!("{MIN}[[source]]\ntype = \"radio\"\nstream = \"x\""),
                "source[1].type",
            ),
            (
                &format!("{MIN}[[source]]\ntype = \"sim\"\nstream = \"x\"\nrate_hz = -1"),
                "source[1].rate_hz",
            ),
            (
                &format!("{MIN}[[source]]\ntype = \"sim\"\nstream = \"x\"\npath = \"a.csv\""),
                "source[1].path",
            ),
            (
                &format!("{MIN}[[source]]\ntype = \"replay\"\nstream = \"x\""),
                "source[1].path",
            ),
            (
                &format!("{MIN}[[source]]\ntype = \"replay\"\nstream = \"x\"\npath = \"a.bin\""),
                "source[1].format",
            ),
            (
                &format!("{MIN}[[source]]\ntype = \"socket\"\nstream = \"x\""),
                "source[1].unix",
            ),
            (
                &format!(
                    "{MIN}[[source]]\ntype = \"socket\"\nstream = \"x\"\ntcp = \"10.0.0.1:1\""
                ),
                "source[1].tcp",
            ),
            ("device_id = ", "line 1"),
        ];
        for (text, key) in cases {
            let e = err(text);
            assert!(
                e.contains(key),
                "error for {text:?} should name {key:?}: {e}"
            );
        }
    }

    #[test]
    fn plaintext_only_to_loopback_unless_insecure() {
        assert!(resolve_tls(None, None, "127.0.0.1").unwrap().is_none());
        let e = resolve_tls(None, None, "broker.example")
            .unwrap_err()
            .to_string();
        assert!(e.contains("mqtt.tls"), "{e}");
        assert!(
            resolve_tls(None, Some(true), "broker.example")
                .unwrap()
                .is_none()
        );
        let e = resolve_tls(Some(RawTls::default()), Some(true), "b")
            .unwrap_err()
            .to_string();
        assert!(e.contains("mqtt.insecure"), "{e}");
    }

    /// A CA, a thing certificate signed by it and its key (0600), for `[mqtt.tls]`.
    fn aws_tls(dir: &Path) -> String {
        use std::os::unix::fs::PermissionsExt;
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "edge-1");
        let cert = p.signed_by(&key, &issuer).unwrap();
        let ca = ca_cert;
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("device.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("device.key"), key.serialize_pem()).unwrap();
        std::fs::set_permissions(
            dir.join("device.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        format!(
            "[mqtt.tls]\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n",
            dir.join("ca.pem"),
            dir.join("device.pem"),
            dir.join("device.key")
        )
    }

    fn aws_config(id: &str, mqtt: &str, tls: &str) -> String {
        format!(
            "device_id = \"{id}\"\n[[source]]\ntype = \"sim\"\nstream = \"imu\"\n[mqtt]\nprofile = \"aws-iot-core\"\nhost = \"a1-ats.iot.eu-west-1.amazonaws.com\"\n{mqtt}\n{tls}"
        )
    }

    #[test]
    fn the_aws_profile_applies_iot_cores_limits_as_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let tls = aws_tls(dir.path());
        let s = load(&aws_config("edge-1", "", &tls)).unwrap();
        assert_eq!(s.mqtt.profile, Profile::AwsIotCore);
        assert_eq!(s.mqtt.port, 8883);
        assert_eq!(s.mqtt.client_id, "edge-1");
        assert_eq!(s.mqtt.message_max_bytes, 131_072);
        assert_eq!(s.mqtt.max_publish_rate, 90);
        assert_eq!(s.mqtt.reconnect_min_ms, 1000);
        assert!(s.mqtt.tls.as_ref().unwrap().alpn.is_empty());
        // Port 443 offers IoT Core's ALPN protocol by itself.
        let s = load(&aws_config("edge-1", "port = 443", &tls)).unwrap();
        assert_eq!(s.mqtt.tls.unwrap().alpn, vec!["x-amzn-mqtt-ca".to_string()]);
        // The generic profile changes nothing.
        let s = load(MIN).unwrap();
        assert_eq!(
            (s.mqtt.profile, s.mqtt.max_publish_rate),
            (Profile::Generic, 0)
        );
    }

    #[test]
    fn the_aws_profile_refuses_what_iot_core_would_refuse_naming_the_rule() {
        let dir = tempfile::tempdir().unwrap();
        let tls = aws_tls(dir.path());
        let cases: &[(&str, &str, &str, &[&str])] = &[
            (
                "edge.1",
                "",
                &tls,
                &["device_id", "thing name", "a-z A-Z 0-9 _ - :"],
            ),
            (
                "edge-1",
                "client_id = \"other\"",
                &tls,
                &["mqtt.client_id", "thing name"],
            ),
            (
                "edge-1",
                "keep_alive_s = 10",
                &tls,
                &["mqtt.keep_alive_s", "30-1200"],
            ),
            (
                "edge-1",
                "keep_alive_s = 1300",
                &tls,
                &["mqtt.keep_alive_s", "30-1200"],
            ),
            (
                "edge-1",
                "message_max_bytes = 200000",
                &tls,
                &["mqtt.message_max_bytes", "131072"],
            ),
            (
                "edge-1",
                "max_publish_rate = 150",
                &tls,
                &["mqtt.max_publish_rate", "100"],
            ),
            (
                "edge-1",
                "max_publish_rate = 0",
                &tls,
                &["mqtt.max_publish_rate", "100"],
            ),
            (
                "edge-1",
                "reconnect_min_ms = 250",
                &tls,
                &["mqtt.reconnect_min_ms", "one connect per second"],
            ),
            ("edge-1", "", "", &["mqtt.tls", "mutual TLS"]),
            ("edge-1", "insecure = true", &tls, &["mqtt.insecure"]),
            (
                "edge-1",
                "profile = \"aws\"",
                &tls,
                &["mqtt.profile", "aws-iot-core"],
            ),
        ];
        for (id, mqtt, tls, want) in cases {
            let mut text = aws_config(id, mqtt, tls);
            if mqtt.starts_with("profile") {
                // The case sets a profile of its own.
                text = text.replacen("profile = \"aws-iot-core\"\n", "", 1);
            }
            let e = err(&text);
            for w in *want {
                assert!(e.contains(w), "{id} / {mqtt}: {e:?} should mention {w:?}");
            }
        }
        // Without a client certificate, and on 443 without IoT Core's ALPN protocol.
        let no_cert = tls
            .lines()
            .filter(|l| !l.starts_with("cert_file") && !l.starts_with("key_file"))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(err(&aws_config("edge-1", "", &no_cert)).contains("mqtt.tls.cert_file"));
        let h2 = format!("{tls}alpn = [\"h2\"]\n");
        assert!(err(&aws_config("edge-1", "port = 443", &h2)).contains("x-amzn-mqtt-ca"));
        let both = format!("{tls}system_roots = true\n");
        assert!(err(&aws_config("edge-1", "", &both)).contains("mqtt.tls.system_roots"));
    }

    /// `[mqtt.tls]` trusting a CA only (server authentication), and a 0600 SAS key file.
    fn azure_files(dir: &Path) -> (String, String) {
        use std::os::unix::fs::PermissionsExt;
        let tls = aws_tls(dir);
        let ca_only = tls
            .lines()
            .filter(|l| !l.starts_with("cert_file") && !l.starts_with("key_file"))
            .collect::<Vec<_>>()
            .join("\n")
            + "\n";
        let key = dir.join("device.sas-key");
        std::fs::write(&key, "c2VjcmV0LWRldmljZS1rZXk=\n").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        (ca_only, format!("sas_key_file = {key:?}"))
    }

    fn azure_config(id: &str, mqtt: &str, tls: &str) -> String {
        format!(
            "device_id = \"{id}\"\n[[source]]\ntype = \"sim\"\nstream = \"imu\"\n[mqtt]\nprofile = \"azure-iot-hub\"\nhost = \"ember-hub.azure-devices.net\"\n{mqtt}\n{tls}"
        )
    }

    #[test]
    fn the_azure_profile_sets_iot_hubs_username_delivery_and_limits() {
        let dir = tempfile::tempdir().unwrap();
        let (tls, sas) = azure_files(dir.path());
        let s = load(&azure_config("edge-1", &sas, &tls)).unwrap();
        assert_eq!(s.mqtt.profile, Profile::AzureIotHub);
        assert_eq!(s.mqtt.port, 8883);
        assert_eq!(s.mqtt.client_id, "edge-1");
        assert_eq!(
            s.mqtt.username.as_deref(),
            Some("ember-hub.azure-devices.net/edge-1/?api-version=2021-04-12")
        );
        assert_eq!(s.mqtt.delivery, DeliveryMode::Puback);
        assert_eq!(s.mqtt.message_max_bytes, 131_072);
        assert_eq!(s.mqtt.sas_token_ttl_s, 3600);
        // X.509 instead of SAS: the full aws_tls has a client certificate.
        let x509 = aws_tls(dir.path());
        let s = load(&azure_config("edge-1", "", &x509)).unwrap();
        assert!(s.mqtt.sas_key_file.is_none());
        assert!(
            s.mqtt.username.is_some(),
            "IoT Hub wants the username with X.509 too"
        );
    }

    #[test]
    fn the_azure_profile_refuses_what_iot_hub_would_refuse_naming_the_rule() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (tls, sas) = azure_files(dir.path());
        let x509 = aws_tls(dir.path());
        let readable = dir.path().join("readable.key");
        std::fs::write(&readable, "c2VjcmV0\n").unwrap();
        std::fs::set_permissions(&readable, std::fs::Permissions::from_mode(0o644)).unwrap();
        let not_b64 = dir.path().join("bad.key");
        std::fs::write(&not_b64, "not base64!\n").unwrap();
        std::fs::set_permissions(&not_b64, std::fs::Permissions::from_mode(0o600)).unwrap();
        let readable = format!("sas_key_file = {readable:?}");
        let not_b64 = format!("sas_key_file = {not_b64:?}");
        let cases: Vec<(String, String, Vec<&str>)> = vec![
            (
                format!("{sas}\nclient_id = \"x\""),
                tls.clone(),
                vec!["mqtt.client_id", "device id"],
            ),
            (
                format!("{sas}\nport = 443"),
                tls.clone(),
                vec!["mqtt.port", "WebSockets"],
            ),
            (
                format!("{sas}\nkeep_alive_s = 1800"),
                tls.clone(),
                vec!["mqtt.keep_alive_s", "1767"],
            ),
            (
                format!("{sas}\nmessage_max_bytes = 300000"),
                tls.clone(),
                vec!["mqtt.message_max_bytes", "262144"],
            ),
            (
                format!("{sas}\ndelivery = \"commit\""),
                tls.clone(),
                vec!["mqtt.delivery", "puback"],
            ),
            (
                format!("{sas}\nsas_token_ttl_s = 5"),
                tls.clone(),
                vec!["mqtt.sas_token_ttl_s"],
            ),
            (sas.clone(), String::new(), vec!["mqtt.tls", "only TLS"]),
            (
                format!("{sas}\ninsecure = true"),
                tls.clone(),
                vec!["mqtt.insecure"],
            ),
            (
                String::new(),
                tls.clone(),
                vec!["mqtt.sas_key_file", "missing", "X.509"],
            ),
            (
                sas.clone(),
                x509.clone(),
                vec!["mqtt.sas_key_file", "not both"],
            ),
            (
                readable,
                tls.clone(),
                vec!["mqtt.sas_key_file", "chmod 600"],
            ),
            (
                not_b64.clone(),
                tls.clone(),
                vec!["mqtt.sas_key_file", "not base64"],
            ),
        ];
        for (mqtt, tls, want) in &cases {
            let e = err(&azure_config("edge-1", mqtt, tls));
            for w in want {
                assert!(e.contains(w), "{mqtt}: {e:?} should mention {w:?}");
            }
            assert!(
                !e.contains("c2VjcmV0"),
                "an error must never quote the key: {e}"
            );
        }
        // SAS settings under another profile are refused, not ignored.
        let generic = format!(
            "device_id = \"d\"\n[[source]]\ntype = \"sim\"\nstream = \"imu\"\n[mqtt]\n{sas}\n"
        );
        assert!(err(&generic).contains("azure-iot-hub"));
    }

    #[test]
    fn a_profile_file_from_terraform_gives_the_endpoint_port_and_limits() {
        let dir = tempfile::tempdir().unwrap();
        let tls = aws_tls(dir.path());
        let file = dir.path().join("agent-profile.json");
        std::fs::write(
            &file,
            r#"{"profile": "aws-iot-core", "endpoint": "x9-ats.iot.us-east-1.amazonaws.com",
                "port": 443, "alpn": "x-amzn-mqtt-ca", "client_id": "{device_id}",
                "limits": {"max_payload_bytes": 65536, "keep_alive_min_s": 30,
                           "keep_alive_max_s": 1200, "publish_per_second": 50, "max_qos": 1,
                           "thing_name_max_bytes": 128}}"#,
        )
        .unwrap();
        let text = format!("{MIN}[mqtt]\nprofile_file = {:?}\n{tls}", file);
        let s = load(&text).unwrap();
        assert_eq!(s.mqtt.profile, Profile::AwsIotCore);
        assert_eq!(s.mqtt.host, "x9-ats.iot.us-east-1.amazonaws.com");
        assert_eq!(s.mqtt.port, 443);
        assert_eq!(s.mqtt.tls.unwrap().alpn, vec!["x-amzn-mqtt-ca".to_string()]);
        assert_eq!(s.mqtt.message_max_bytes, 65_536);
        assert_eq!(s.mqtt.max_publish_rate, 45);
        let e = err(&format!(
            "{MIN}[mqtt]\nprofile_file = \"/nonexistent.json\"\n{tls}"
        ));
        assert!(
            e.contains("mqtt.profile_file") && e.contains("terraform"),
            "{e}"
        );
        let e = err(&format!(
            "{MIN}[mqtt]\nprofile = \"generic\"\nprofile_file = {file:?}\n{tls}"
        ));
        assert!(e.contains("mqtt.profile"), "{e}");
    }
}
