//! Configuration: a TOML file plus `EMBER_FLEET_*` environment overrides, resolved into
//! [`Settings`].
//!
//! Two layers, like the agent's: [`RawConfig`] mirrors the file (`deny_unknown_fields`, every
//! field optional), and [`Settings::resolve`] fills in the named defaults below and validates
//! every value. An invalid configuration is refused before any port is bound or file written,
//! with an error that names the key and says how to fix it.
//!
//! Environment overrides: `EMBER_FLEET_<KEY>` for a top-level key and
//! `EMBER_FLEET_<SECTION>__<KEY>` for a key in a table, e.g.
//! `EMBER_FLEET_DATABASE__URL=postgres://...`, `EMBER_FLEET_MQTT__PORT=8883`,
//! `EMBER_FLEET_BOOTSTRAP_TOKEN=...`, through `ember_host::env::Overlay`. Values are parsed as
//! TOML scalars (so `8883` is an integer and `true` a boolean) and fall back to strings; keys
//! that hold text (URLs, tokens, hosts) are always taken as strings. The variables listed in
//! `ember_host::env::RESERVED` (`EMBER_FLEET_CONFIG`, `EMBER_FLEET_LOG`, and the CLI's
//! `EMBER_FLEET_URL`, `EMBER_FLEET_TOKEN`, `EMBER_FLEET_CA_FILE`) are not overrides; other
//! `EMBER_*` variables belong to the agent and are ignored. A key that no setting has is blamed
//! on the variable that set it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ember_host::env::Overlay;
use serde::{Deserialize, Serialize};

// ---- named defaults -----------------------------------------------------------------------

pub const DEFAULT_DATA_DIR: &str = "ember-fleet-data";
/// The SQLite file created in the data dir when no `database.url` is given.
pub const DEFAULT_SQLITE_FILE: &str = "fleet.db";
pub const DEFAULT_DB_MAX_CONNECTIONS: u32 = 8;
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_PAGE_LIMIT: u32 = 100;
pub const DEFAULT_MAX_PAGE_LIMIT: u32 = 1000;
pub const DEFAULT_MQTT_HOST: &str = "127.0.0.1";
pub const DEFAULT_MQTT_PORT: u16 = 1883;
pub const DEFAULT_KEEP_ALIVE_S: u64 = 30;
pub const DEFAULT_RECONNECT_MIN_MS: u64 = 250;
pub const DEFAULT_RECONNECT_MAX_MS: u64 = 30_000;
/// The shared-subscription group for telemetry: replicas in one group split the load.
pub const DEFAULT_SHARE_GROUP: &str = "ember-fleet";
/// How long the broker keeps a replica's persistent MQTT session after its connection
/// dropped (MQTT 5 Session Expiry Interval): an hour, longer than a restart or a rolling
/// upgrade, short enough that a replica that never returns stops taking a share of the
/// telemetry within the hour (docs/scale-out.md).
pub const DEFAULT_SESSION_EXPIRY_S: u32 = 3600;
/// Twice the agent's default message cap (128 KiB) and Azure IoT Hub's limit.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 256 * 1024;
pub const DEFAULT_BATCH_MAX_RECORDS: usize = 1000;
pub const DEFAULT_BATCH_MAX_DELAY_MS: u64 = 50;
/// PostgreSQL: a batch with at least this many telemetry records is written with a binary
/// `COPY` into a staging table instead of a multi-row `INSERT` (see
/// `server::ingest::staging`). Off (0) by default: with 1,000-record batches it lost to the
/// multi-row `INSERT` on the 2-core benchmark machine (docs/benchmarks.md, 2026-12-07).
pub const DEFAULT_COPY_MIN_RECORDS: usize = 0;
/// Messages between the MQTT reader and the database writer.
pub const DEFAULT_CHANNEL_CAPACITY: usize = 512;
/// Channels per record that get per-minute aggregates (the rest are stored, not aggregated).
pub const DEFAULT_AGGREGATE_CHANNELS: usize = 16;
pub const DEFAULT_TELEMETRY_DAYS: u32 = 30;
pub const DEFAULT_AGGREGATE_DAYS: u32 = 365;
pub const DEFAULT_REJECT_DAYS: u32 = 30;
pub const DEFAULT_RETENTION_INTERVAL_S: u64 = 3600;
pub const DEFAULT_GRACE_MS: u64 = 10_000;
/// Largest model bundle `POST /api/v1/models` accepts (64 MiB).
pub const DEFAULT_MAX_BUNDLE_BYTES: u64 = 64 << 20;
/// The bundle blob store: files under `<data_dir>/models/`.
pub const DEFAULT_MODEL_STORE: &str = "fs";
/// Shortest accepted bootstrap token: it is an admin credential.
pub const MIN_BOOTSTRAP_TOKEN_LEN: usize = 16;

/// What went wrong, and where (one type for both binaries, `ember_host::env::ConfigError`).
pub use ember_host::env::ConfigError;
use ember_host::env::invalid;

// ---- the file layer -----------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub data_dir: Option<PathBuf>,
    pub bootstrap_token: Option<String>,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub http: RawHttp,
    #[serde(default)]
    pub database: RawDatabase,
    #[serde(default)]
    pub mqtt: RawMqtt,
    #[serde(default)]
    pub ingest: RawIngest,
    #[serde(default)]
    pub desired: RawDesired,
    #[serde(default)]
    pub retention: RawRetention,
    #[serde(default)]
    pub shutdown: RawShutdown,
    #[serde(default)]
    pub models: RawModels,
    /// `[lake]`: the Parquet data lake; absent (or no `store`) means no export.
    #[serde(default)]
    pub lake: RawLake,
    /// `[monitoring]`: model monitoring (drift against the bundles' baselines).
    #[serde(default)]
    pub monitoring: RawMonitoring,
    /// `[bridge]`: `ember-fleet bridge` (MQTT to Google Pub/Sub); ignored by the service.
    pub bridge: Option<RawBridge>,
}

/// `[models]`: the model registry.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModels {
    /// `fs` (files under `<data_dir>/models/`) or an object-storage URL (`s3://bucket/prefix`,
    /// `gs://bucket/prefix`, `az://container/prefix`).
    pub store: Option<String>,
    /// Public key files (`ed25519-public <hex>`) whose signatures uploads must carry: a list,
    /// or one string of comma-separated paths (what `EMBER_FLEET_MODELS__TRUSTED_KEYS` gives).
    pub trusted_keys: Option<PathList>,
    pub max_bundle_bytes: Option<u64>,
}

/// `[monitoring]`: model monitoring (ota/monitor.rs).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMonitoring {
    pub window_s: Option<u64>,
    pub interval_s: Option<u64>,
    pub min_windows: Option<u64>,
    pub psi_threshold: Option<f64>,
    pub input_psi_threshold: Option<f64>,
    pub max_rows: Option<u64>,
}

/// `[lake]`: the data lake (server/lake/).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLake {
    /// A directory (absolute, or relative to the working directory; `file:///abs` also works) or
    /// an object-storage URL (`s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix`).
    pub store: Option<String>,
    pub interval_s: Option<u64>,
    pub max_rows_per_file: Option<u64>,
    pub compact_min_files: Option<u64>,
    pub compact_target_bytes: Option<u64>,
}

/// A list of paths, or one comma-separated string of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PathList {
    List(Vec<PathBuf>),
    Joined(String),
}

impl PathList {
    fn into_paths(self) -> Vec<PathBuf> {
        match self {
            PathList::List(v) => v,
            PathList::Joined(s) => s
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(PathBuf::from)
                .collect(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub format: Option<String>,
    pub level: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttp {
    pub listen: Option<String>,
    pub default_page_limit: Option<u32>,
    pub max_page_limit: Option<u32>,
    /// `[http.tls]`: HTTPS (see `crate::tls`).
    pub tls: Option<crate::tls::RawHttpTls>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDatabase {
    pub url: Option<String>,
    pub max_connections: Option<u32>,
    /// `azure-workload-identity`: the password is an Entra ID token ([`TokenSource`]).
    pub token_source: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMqtt {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub client_id: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub keep_alive_s: Option<u64>,
    pub clean_session: Option<bool>,
    pub session_expiry_s: Option<u32>,
    pub ingest_port: Option<u16>,
    pub share_group: Option<String>,
    pub reconnect_min_ms: Option<u64>,
    pub reconnect_max_ms: Option<u64>,
    /// Plaintext to a non-loopback broker (development only; see `crate::tls`).
    pub insecure: Option<bool>,
    /// `[mqtt.tls]`: mutual TLS to the broker (see `crate::tls`).
    pub tls: Option<crate::tls::RawMqttTls>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIngest {
    pub max_payload_bytes: Option<usize>,
    pub batch_max_records: Option<usize>,
    pub batch_max_delay_ms: Option<u64>,
    pub copy_min_records: Option<usize>,
    pub channel_capacity: Option<usize>,
    pub aggregate_channels: Option<usize>,
    /// `"mqtt"` (default), `"kinesis"`, `"eventhubs"` or `"pubsub"`.
    pub source: Option<String>,
    pub kinesis: Option<RawKinesis>,
    pub eventhubs: Option<RawEventHubs>,
    pub pubsub: Option<RawPubSub>,
}

/// `[desired]`: where desired states go.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDesired {
    /// `"mqtt"` (default: retained on the broker of `[mqtt]`), `"aws-iot-data"` or
    /// `"azure-twin"`.
    pub sink: Option<String>,
    pub aws_iot_data: Option<RawIotData>,
    pub azure_twin: Option<RawAzureTwin>,
}

/// `[desired.aws_iot_data]`: AWS IoT Core's data plane.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIotData {
    /// The ATS endpoint host (terraform output agent_profile.endpoint) or an http(s) URL.
    pub endpoint: Option<String>,
    pub region: Option<String>,
}

/// Where desired states go ([`crate::ota::rollout::sink`]).
#[derive(Debug, Clone, Serialize)]
pub struct DesiredSettings {
    pub sink: DesiredSink,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub enum DesiredSink {
    /// Retained QoS 1 on the broker of `[mqtt]` (AWS IoT Core with the fleet's certificate too).
    Mqtt,
    /// AWS IoT Core's data-plane HTTPS API with the fleet's IAM role.
    AwsIotData { endpoint: String, region: String },
    /// Azure IoT Hub's service REST API: a PATCH of the device twin's desired properties.
    AzureTwin(AzureTwinSettings),
}

/// `[ingest.kinesis]`: the stream an AWS IoT topic rule fills (terraform/aws).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKinesis {
    pub stream: Option<String>,
    pub region: Option<String>,
    /// Another endpoint than `https://kinesis.<region>.amazonaws.com` (a VPC endpoint, a
    /// local emulator).
    pub endpoint: Option<String>,
    pub lease_s: Option<u64>,
    pub poll_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetention {
    pub telemetry_days: Option<u32>,
    pub aggregates_days: Option<u32>,
    pub rejects_days: Option<u32>,
    pub interval_s: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawShutdown {
    pub grace_ms: Option<u64>,
}

// ---- the resolved layer -------------------------------------------------------------------

#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub data_dir: PathBuf,
    /// An admin API token stored (hashed) at start; never printed.
    #[serde(serialize_with = "redact_opt")]
    pub bootstrap_token: Option<String>,
    pub log: LogSettings,
    pub http: HttpSettings,
    pub database: DatabaseSettings,
    pub mqtt: MqttSettings,
    pub ingest: IngestSettings,
    pub desired: DesiredSettings,
    pub retention: RetentionSettings,
    pub shutdown: ShutdownSettings,
    pub models: ModelSettings,
    /// `[lake]`: `None` when no store is configured (no export).
    pub lake: Option<LakeSettings>,
    pub monitoring: MonitoringSettings,
    /// `[bridge]`, for `ember-fleet bridge` only.
    pub bridge: Option<BridgeSettings>,
}

/// Where the registry keeps bundle bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelStore {
    /// Files under `<data_dir>/models/<name>/<version>.bundle`.
    Fs,
    /// Objects `<prefix>/<name>/<version>.bundle` in a bucket (S3, GCS) or container (Azure),
    /// through the `object_store` crate. Credentials, region and endpoint come from the
    /// provider's standard environment variables or instance metadata, never from this file.
    Object {
        /// `s3://`, `gs://` or `az://` (checked: no user info, a bucket, no query).
        url: String,
    },
}

impl Serialize for ModelStore {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ModelStore::Fs => s.serialize_str(DEFAULT_MODEL_STORE),
            ModelStore::Object { url } => s.serialize_str(url),
        }
    }
}

/// The forms `models.store` accepts (for error messages).
pub const MODEL_STORE_FORMS: &str = "\"fs\" (files under <data_dir>/models/), \"s3://bucket/prefix\", \"gs://bucket/prefix\" or \"az://container/prefix\"";

#[derive(Debug, Clone, Serialize)]
pub struct ModelSettings {
    pub store: ModelStore,
    pub trusted_keys: Vec<PathBuf>,
    /// The keys read from `trusted_keys` (checked at start).
    #[serde(skip)]
    pub keys: ember_bundle::TrustedKeys,
    pub max_bundle_bytes: u64,
    /// Extra `object_store` builder options (`aws_endpoint_url`, `aws_allow_http`, ...),
    /// applied over the environment. Never read from the config file and never printed: for
    /// embedders and tests that cannot set process environment variables.
    #[serde(skip)]
    pub store_options: Vec<(String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Serialize)]
pub struct LogSettings {
    pub format: LogFormat,
    /// A `tracing` filter directive, e.g. `info` or `ember_fleet=debug,info`.
    pub level: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct HttpSettings {
    pub listen: SocketAddr,
    pub default_page_limit: u32,
    pub max_page_limit: u32,
    /// HTTPS; `None` is plain HTTP.
    pub tls: Option<crate::tls::HttpTlsSettings>,
}

/// Which database engine a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DatabaseSettings {
    /// The connection URL (`sqlite://...` or `postgres://...`); a password is masked when
    /// printed.
    #[serde(serialize_with = "redact_url")]
    pub url: String,
    pub backend: Backend,
    pub max_connections: u32,
    /// Where the password comes from when it is not in the URL (`None`: the URL).
    pub token_source: Option<TokenSource>,
}

/// `database.token_source`: a short-lived token as the PostgreSQL password, renewed by the
/// fleet ([`crate::db`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TokenSource {
    /// Microsoft Entra ID through AKS workload identity (Azure Database for PostgreSQL with
    /// Entra sign-in; [`crate::cloud::azure`]).
    AzureWorkloadIdentity,
}

#[derive(Debug, Clone, Serialize)]
pub struct MqttSettings {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    /// Broker credentials (MQTT username/password), if the broker wants them.
    pub username: Option<String>,
    #[serde(serialize_with = "redact_opt")]
    pub password: Option<String>,
    pub keep_alive_s: u64,
    /// `false` (default): the broker keeps this client's subscriptions and unacknowledged
    /// messages while the service is down.
    pub clean_session: bool,
    /// Seconds the broker keeps the persistent session after the connection dropped (MQTT 5
    /// Session Expiry Interval); unused with `clean_session`.
    pub session_expiry_s: u32,
    /// The port of the broker's MQTT 5 listener, which the ingest subscriber uses; `port`
    /// unless the broker serves MQTT 5 on a listener of its own (rumqttd, the demo's broker).
    pub ingest_port: u16,
    /// Shared-subscription group for telemetry; empty for a plain subscription.
    pub share_group: String,
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    /// Plaintext MQTT allowed to a non-loopback broker.
    pub insecure: bool,
    /// Mutual TLS to the broker; `None` is plaintext (loopback, or `insecure`).
    pub tls: Option<crate::tls::MqttTlsSettings>,
    /// The environment's `HOSTNAME` when `client_id` was not set and came from it (checked by
    /// [`Settings::check_replica_identity`]).
    #[serde(skip)]
    pub default_from_host: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct IngestSettings {
    pub max_payload_bytes: usize,
    pub batch_max_records: usize,
    pub batch_max_delay_ms: u64,
    /// PostgreSQL: telemetry by `COPY` from this many records in a batch; 0: never.
    pub copy_min_records: usize,
    pub channel_capacity: usize,
    pub aggregate_channels: usize,
    /// Where device messages come from (`ingest.source`).
    pub source: IngestSource,
}

/// Where device messages come from; each is a [`crate::server::ingest::source::IngestSource`].
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum IngestSource {
    /// The broker of `[mqtt]` (shared subscription, PUBACK after commit).
    Mqtt,
    /// An AWS Kinesis Data Stream (shard leases in the database, checkpoint in the batch's
    /// transaction).
    Kinesis(KinesisSettings),
    /// An Azure Event Hub over AMQP 1.0 (IoT Hub's built-in endpoint): partition leases in the
    /// database, checkpoint (sequence number) in the batch's transaction.
    EventHubs(EventHubsSettings),
    /// A Google Pub/Sub subscription that `ember-fleet bridge` fills (acknowledged after the
    /// batch's commit).
    PubSub(PubSubSettings),
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct KinesisSettings {
    pub stream: String,
    pub region: String,
    pub endpoint: String,
    /// A shard lease not renewed for this long may be taken by another replica.
    pub lease_s: u64,
    /// Pause after an empty GetRecords (Kinesis allows 5 calls per second per shard).
    pub poll_ms: u64,
}

/// `[monitoring]`: model monitoring (ota/monitor.rs, docs/monitoring.md).
#[derive(Debug, Clone, Serialize)]
pub struct MonitoringSettings {
    /// Results received in the last `window_s` seconds are compared with the baseline.
    pub window_s: u64,
    /// Seconds between two computations.
    pub interval_s: u64,
    /// Fewer results than this give statistics but no drift verdict.
    pub min_windows: u64,
    /// PSI above which an output distribution (class, confidence, score) drifts.
    pub psi_threshold: f64,
    /// PSI above which an input channel's distribution drifts.
    pub input_psi_threshold: f64,
    /// Most recent results read per computation.
    pub max_rows: u64,
}

/// Where the lake's files go.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub enum LakeStore {
    /// Files under this directory.
    Dir(PathBuf),
    /// An object-storage URL (`s3://`, `gs://`, `az://`).
    Object { url: String },
}

/// `[lake]`: committed records exported as Parquet (server/lake/).
#[derive(Debug, Clone, Serialize)]
pub struct LakeSettings {
    pub store: LakeStore,
    /// Seconds between export passes.
    pub interval_s: u64,
    /// Most records one export of one stream writes (one file per UTC day it spans).
    pub max_rows_per_file: u64,
    /// A partition's stream is compacted once it has this many files smaller than
    /// `compact_target_bytes`.
    pub compact_min_files: u64,
    pub compact_target_bytes: u64,
    /// Object-store client options (lowercase builder keys such as `aws_endpoint_url`) that
    /// override the provider's environment; never read from the config file (tests, embedding).
    #[serde(skip)]
    pub store_options: Vec<(String, String)>,
}

/// Days to keep rows; 0 keeps them forever.
#[derive(Debug, Clone, Serialize)]
pub struct RetentionSettings {
    /// Set when the lake is on: retention never deletes a record the lake does not hold yet.
    pub keep_unexported: bool,
    pub telemetry_days: u32,
    pub aggregates_days: u32,
    pub rejects_days: u32,
    pub interval_s: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ShutdownSettings {
    pub grace_ms: u64,
}

fn redact_opt<S: serde::Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_str("<redacted>"),
        None => s.serialize_none(),
    }
}

fn redact_url<S: serde::Serializer>(v: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&mask_password(v))
}

/// `postgres://user:secret@host/db` -> `postgres://user:***@host/db`.
pub fn mask_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

impl Settings {
    /// Reads `path` (or uses an empty config when `None`), applies `env`, resolves and validates.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let env: Vec<(String, String)> = env.into_iter().collect();
        let host = host_from_env(&env);
        Settings::resolve_on(ENV.load(path, env)?, host)
    }

    /// [`Settings::load`] on text already read (`name` is what errors call it).
    pub fn from_toml(
        text: &str,
        name: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let env: Vec<(String, String)> = env.into_iter().collect();
        let host = host_from_env(&env);
        Settings::resolve_on(ENV.parse(text, name, env)?, host)
    }

    pub fn resolve(raw: RawConfig) -> Result<Settings, ConfigError> {
        Settings::resolve_on(raw, None)
    }

    /// [`Settings::resolve`] on a host whose name the environment gave (`HOSTNAME`, which
    /// container runtimes and Kubernetes set): it names the default `mqtt.client_id`, and a
    /// generated one (a Deployment's pod, a container id) is refused for a persistent session.
    pub fn resolve_on(raw: RawConfig, host_name: Option<String>) -> Result<Settings, ConfigError> {
        let data_dir = raw
            .data_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        if data_dir.as_os_str().is_empty() {
            return Err(invalid(
                "data_dir",
                "is empty: give a directory the service may write to",
            ));
        }
        if let Some(t) = &raw.bootstrap_token
            && (t.len() < MIN_BOOTSTRAP_TOKEN_LEN || t.chars().any(|c| c.is_whitespace()))
        {
            return Err(invalid(
                "bootstrap_token",
                format!(
                    "must be at least {MIN_BOOTSTRAP_TOKEN_LEN} characters without spaces (generate one with `ember-fleet token generate`)"
                ),
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
                    "{:?} is not a filter: use e.g. \"info\", \"debug\" or \"ember_fleet=debug,warn\"",
                    log.level
                ),
            ));
        }

        let listen = raw
            .http
            .listen
            .unwrap_or_else(|| DEFAULT_HTTP_LISTEN.into());
        let http = HttpSettings {
            listen: listen.parse().map_err(|_| {
                invalid(
                    "http.listen",
                    format!("{listen:?} is not an address: use e.g. \"127.0.0.1:8080\""),
                )
            })?,
            default_page_limit: raw.http.default_page_limit.unwrap_or(DEFAULT_PAGE_LIMIT),
            max_page_limit: raw.http.max_page_limit.unwrap_or(DEFAULT_MAX_PAGE_LIMIT),
            tls: crate::tls::resolve_http(raw.http.tls)?,
        };
        if !(1..=100_000).contains(&http.max_page_limit) {
            return Err(invalid("http.max_page_limit", "must be 1-100000"));
        }
        if http.default_page_limit == 0 || http.default_page_limit > http.max_page_limit {
            return Err(invalid(
                "http.default_page_limit",
                "must be at least 1 and at most http.max_page_limit",
            ));
        }

        let url = match raw.database.url {
            Some(u) => u,
            None => {
                let file = data_dir.join(DEFAULT_SQLITE_FILE);
                let file = file.to_str().ok_or_else(|| {
                    invalid(
                        "data_dir",
                        "is not valid UTF-8: choose another path or set database.url",
                    )
                })?;
                format!("sqlite://{file}")
            }
        };
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            return Err(invalid(
                "database.url",
                format!(
                    "{:?} names no supported database: use sqlite://<path> or postgres://user@host/db",
                    mask_password(&url)
                ),
            ));
        };
        let token_source = match raw.database.token_source.as_deref() {
            None => None,
            Some("azure-workload-identity") => {
                if backend != Backend::Postgres {
                    return Err(invalid(
                        "database.token_source",
                        "\"azure-workload-identity\" signs in to PostgreSQL: set database.url to postgres://<identity name>@<server>.postgres.database.azure.com/<db>?sslmode=require",
                    ));
                }
                let userinfo = url
                    .split_once("://")
                    .and_then(|(_, rest)| rest.split_once('@'))
                    .map(|(u, _)| u);
                match userinfo {
                    None | Some("") => {
                        return Err(invalid(
                            "database.url",
                            "names no user: with database.token_source the user is the managed identity's name (postgres://<identity name>@<server>/<db>)",
                        ));
                    }
                    Some(u) if u.contains(':') => {
                        return Err(invalid(
                            "database.url",
                            "has a password, and database.token_source supplies one: remove it from the URL",
                        ));
                    }
                    Some(_) => {}
                }
                Some(TokenSource::AzureWorkloadIdentity)
            }
            Some(other) => {
                return Err(invalid(
                    "database.token_source",
                    format!(
                        "{other:?} is not a token source: use \"azure-workload-identity\" (Entra ID through AKS workload identity) or leave it out (the password, if any, is in database.url)"
                    ),
                ));
            }
        };
        let database = DatabaseSettings {
            url,
            backend,
            max_connections: raw
                .database
                .max_connections
                .unwrap_or(DEFAULT_DB_MAX_CONNECTIONS),
            token_source,
        };
        if !(1..=1000).contains(&database.max_connections) {
            return Err(invalid("database.max_connections", "must be 1-1000"));
        }

        let m = raw.mqtt;
        let host = m.host.as_deref().unwrap_or(DEFAULT_MQTT_HOST);
        let tls = crate::tls::resolve_mqtt(m.tls, m.insecure, host)?;
        let mqtt = MqttSettings {
            host: m.host.unwrap_or_else(|| DEFAULT_MQTT_HOST.into()),
            port: m.port.unwrap_or(DEFAULT_MQTT_PORT),
            client_id: m
                .client_id
                .clone()
                .unwrap_or_else(|| default_client_id(host_name.as_deref())),
            username: m.username,
            password: m.password,
            keep_alive_s: m.keep_alive_s.unwrap_or(DEFAULT_KEEP_ALIVE_S),
            clean_session: m.clean_session.unwrap_or(false),
            session_expiry_s: m.session_expiry_s.unwrap_or(DEFAULT_SESSION_EXPIRY_S),
            ingest_port: m.ingest_port.or(m.port).unwrap_or(DEFAULT_MQTT_PORT),
            share_group: m.share_group.unwrap_or_else(|| DEFAULT_SHARE_GROUP.into()),
            reconnect_min_ms: m.reconnect_min_ms.unwrap_or(DEFAULT_RECONNECT_MIN_MS),
            reconnect_max_ms: m.reconnect_max_ms.unwrap_or(DEFAULT_RECONNECT_MAX_MS),
            insecure: m.insecure.unwrap_or(false),
            tls,
            default_from_host: if m.client_id.is_none() {
                host_name.clone()
            } else {
                None
            },
        };
        if mqtt.host.is_empty() {
            return Err(invalid(
                "mqtt.host",
                "is empty: give the broker's host name",
            ));
        }
        if mqtt.port == 0 {
            return Err(invalid("mqtt.port", "0 is not a port: use 1-65535"));
        }
        if mqtt.client_id.is_empty() || mqtt.client_id.len() > 128 {
            return Err(invalid(
                "mqtt.client_id",
                "must be 1-128 characters, unique per replica",
            ));
        }
        check_client_id(&mqtt.client_id)?;
        if mqtt.password.is_some() && mqtt.username.is_none() {
            return Err(invalid(
                "mqtt.password",
                "is set without mqtt.username: set both or neither",
            ));
        }
        if !(5..=3600).contains(&mqtt.keep_alive_s) {
            return Err(invalid("mqtt.keep_alive_s", "must be 5-3600 seconds"));
        }
        if mqtt.session_expiry_s == 0 || mqtt.session_expiry_s == u32::MAX {
            return Err(invalid(
                "mqtt.session_expiry_s",
                "must be 1-4294967294 seconds: 0 ends the session with every disconnect (use mqtt.clean_session = true for that), and a session that never expires keeps taking a share of the telemetry after its replica is gone",
            ));
        }
        if mqtt
            .share_group
            .chars()
            .any(|c| matches!(c, '/' | '+' | '#') || c.is_whitespace())
        {
            return Err(invalid(
                "mqtt.share_group",
                "must not contain '/', '+', '#' or spaces",
            ));
        }
        if mqtt.reconnect_min_ms == 0 || mqtt.reconnect_min_ms > mqtt.reconnect_max_ms {
            return Err(invalid(
                "mqtt.reconnect_min_ms",
                "must be at least 1 and at most mqtt.reconnect_max_ms",
            ));
        }

        let i = raw.ingest;
        let source = match i.source.as_deref() {
            Some("eventhubs") => {
                if i.kinesis.is_some() || i.pubsub.is_some() {
                    return Err(invalid(
                        "ingest.kinesis",
                        "is set but ingest.source is not \"kinesis\"",
                    ));
                }
                IngestSource::EventHubs(resolve_eventhubs(i.eventhubs.unwrap_or_default())?)
            }
            Some("pubsub") => {
                if i.kinesis.is_some() {
                    return Err(invalid(
                        "ingest.kinesis",
                        "is set but ingest.source is not \"kinesis\"",
                    ));
                }
                if i.eventhubs.is_some() {
                    return Err(invalid(
                        "ingest.eventhubs",
                        "is set but ingest.source is not \"eventhubs\"",
                    ));
                }
                IngestSource::PubSub(resolve_pubsub(i.pubsub)?)
            }
            _ if i.pubsub.is_some() => {
                return Err(invalid(
                    "ingest.pubsub",
                    "is set but ingest.source is not \"pubsub\"",
                ));
            }
            other => {
                if i.eventhubs.is_some() {
                    return Err(invalid(
                        "ingest.eventhubs",
                        "is set but ingest.source is not \"eventhubs\"",
                    ));
                }
                resolve_ingest_source(other, i.kinesis)?
            }
        };
        let ingest = IngestSettings {
            source,
            max_payload_bytes: i.max_payload_bytes.unwrap_or(DEFAULT_MAX_PAYLOAD_BYTES),
            batch_max_records: i.batch_max_records.unwrap_or(DEFAULT_BATCH_MAX_RECORDS),
            batch_max_delay_ms: i.batch_max_delay_ms.unwrap_or(DEFAULT_BATCH_MAX_DELAY_MS),
            copy_min_records: i.copy_min_records.unwrap_or(DEFAULT_COPY_MIN_RECORDS),
            channel_capacity: i.channel_capacity.unwrap_or(DEFAULT_CHANNEL_CAPACITY),
            aggregate_channels: i.aggregate_channels.unwrap_or(DEFAULT_AGGREGATE_CHANNELS),
        };
        if !(256..=256 * 1024 * 1024).contains(&ingest.max_payload_bytes) {
            return Err(invalid(
                "ingest.max_payload_bytes",
                "must be 256 bytes to 256 MiB",
            ));
        }
        if !(1..=100_000).contains(&ingest.batch_max_records) {
            return Err(invalid("ingest.batch_max_records", "must be 1-100000"));
        }
        if !(1..=60_000).contains(&ingest.batch_max_delay_ms) {
            return Err(invalid("ingest.batch_max_delay_ms", "must be 1-60000"));
        }
        if ingest.copy_min_records > 100_000 {
            return Err(invalid("ingest.copy_min_records", "must be 0-100000"));
        }
        if !(1..=65_536).contains(&ingest.channel_capacity) {
            return Err(invalid("ingest.channel_capacity", "must be 1-65536"));
        }
        if ingest.aggregate_channels > 1024 {
            return Err(invalid("ingest.aggregate_channels", "must be 0-1024"));
        }

        let desired = DesiredSettings {
            sink: resolve_desired(raw.desired)?,
        };

        let r = raw.retention;
        let lake = resolve_lake(raw.lake)?;
        let monitoring = resolve_monitoring(raw.monitoring)?;
        let retention = RetentionSettings {
            keep_unexported: lake.is_some(),
            telemetry_days: r.telemetry_days.unwrap_or(DEFAULT_TELEMETRY_DAYS),
            aggregates_days: r.aggregates_days.unwrap_or(DEFAULT_AGGREGATE_DAYS),
            rejects_days: r.rejects_days.unwrap_or(DEFAULT_REJECT_DAYS),
            interval_s: r.interval_s.unwrap_or(DEFAULT_RETENTION_INTERVAL_S),
        };
        for (key, days) in [
            ("retention.telemetry_days", retention.telemetry_days),
            ("retention.aggregates_days", retention.aggregates_days),
            ("retention.rejects_days", retention.rejects_days),
        ] {
            if days > 36_500 {
                return Err(invalid(key, "must be 0 (keep forever) to 36500 days"));
            }
        }
        if !(1..=7 * 86_400).contains(&retention.interval_s) {
            return Err(invalid("retention.interval_s", "must be 1-604800 seconds"));
        }

        let shutdown = ShutdownSettings {
            grace_ms: raw.shutdown.grace_ms.unwrap_or(DEFAULT_GRACE_MS),
        };
        if shutdown.grace_ms > 600_000 {
            return Err(invalid("shutdown.grace_ms", "must be at most 600000"));
        }

        let models = resolve_models(raw.models)?;

        let settings = Settings {
            data_dir,
            bootstrap_token: raw.bootstrap_token,
            log,
            http,
            database,
            mqtt,
            ingest,
            desired,
            retention,
            lake,
            monitoring,
            shutdown,
            models,
            bridge: raw.bridge.map(resolve_bridge).transpose()?,
        };
        settings.check_build()?;
        Ok(settings)
    }

    /// Refuses what this binary was built without: the cloud clients (cargo feature `cloud`:
    /// on by default, in every release build and image; the README's demo build leaves it
    /// out). The error names the key and the build that has it, before any port is bound.
    pub fn check_build(&self) -> Result<(), ConfigError> {
        self.check_features(cfg!(feature = "cloud"))
    }

    /// [`Settings::check_build`] for a build with (`cloud`) or without the cloud clients.
    fn check_features(&self, cloud: bool) -> Result<(), ConfigError> {
        let mut needs_cloud: Vec<(&str, String)> = Vec::new();
        match &self.ingest.source {
            IngestSource::Mqtt => {}
            IngestSource::Kinesis(_) => needs_cloud.push(("ingest.source", "\"kinesis\"".into())),
            IngestSource::EventHubs(_) => {
                needs_cloud.push(("ingest.source", "\"eventhubs\"".into()))
            }
            IngestSource::PubSub(_) => needs_cloud.push(("ingest.source", "\"pubsub\"".into())),
        }
        match &self.desired.sink {
            DesiredSink::Mqtt => {}
            DesiredSink::AwsIotData { .. } => {
                needs_cloud.push(("desired.sink", "AWS IoT Core's data plane".into()))
            }
            DesiredSink::AzureTwin(_) => {
                needs_cloud.push(("desired.sink", "Azure IoT Hub's device twins".into()))
            }
        }
        if self.database.token_source.is_some() {
            needs_cloud.push(("database.token_source", "Entra ID sign-in".into()));
        }
        if let ModelStore::Object { url } = &self.models.store {
            needs_cloud.push(("models.store", format!("the object store {url}")));
        }
        if let Some(LakeStore::Object { url }) = self.lake.as_ref().map(|l| &l.store) {
            needs_cloud.push(("lake.store", format!("the object store {url}")));
        }
        if self.bridge.is_some() {
            needs_cloud.push(("bridge", "the Pub/Sub bridge".into()));
        }
        match needs_cloud.into_iter().next() {
            Some((key, what)) if !cloud => Err(invalid(
                key,
                format!(
                    "{what} needs ember-fleet built with its `cloud` feature, which this binary was built without (it is on by default: `cargo build --release -p ember-fleet`, or the ember-fleet image)"
                ),
            )),
            _ => Ok(()),
        }
    }

    /// The resolved settings as TOML (secrets masked), for `check-config`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render settings: {e}"))
    }
}

/// Default `ingest.kinesis.lease_s`.
pub const DEFAULT_KINESIS_LEASE_S: u64 = 30;
/// Default `ingest.kinesis.poll_ms`: at most 4 of the 5 GetRecords per second a shard allows.
pub const DEFAULT_KINESIS_POLL_MS: u64 = 250;

fn resolve_desired(raw: RawDesired) -> Result<DesiredSink, ConfigError> {
    let sink = raw.sink.as_deref().unwrap_or("mqtt");
    if sink == "azure-twin" {
        if raw.aws_iot_data.is_some() {
            return Err(invalid(
                "desired.aws_iot_data",
                "is set but desired.sink is not \"aws-iot-data\"",
            ));
        }
        return Ok(DesiredSink::AzureTwin(resolve_azure_twin(
            raw.azure_twin.unwrap_or_default(),
        )?));
    }
    if raw.azure_twin.is_some() {
        return Err(invalid(
            "desired.azure_twin",
            "is set but desired.sink is not \"azure-twin\"",
        ));
    }
    match sink {
        "mqtt" => {
            if raw.aws_iot_data.is_some() {
                return Err(invalid(
                    "desired.aws_iot_data",
                    "is set but desired.sink is not \"aws-iot-data\"",
                ));
            }
            Ok(DesiredSink::Mqtt)
        }
        "aws-iot-data" => {
            let d = raw.aws_iot_data.unwrap_or_default();
            let region = d.region.filter(|r| !r.is_empty()).ok_or_else(|| {
                invalid(
                    "desired.aws_iot_data.region",
                    "is required with desired.sink = \"aws-iot-data\"",
                )
            })?;
            let endpoint = d.endpoint.filter(|e| !e.is_empty()).ok_or_else(|| {
                invalid(
                    "desired.aws_iot_data.endpoint",
                    "is required: the ATS endpoint (terraform output agent_profile.endpoint)",
                )
            })?;
            let endpoint = if endpoint.contains("://") {
                endpoint
            } else {
                format!("https://{endpoint}")
            };
            Ok(DesiredSink::AwsIotData { endpoint, region })
        }
        _ => Err(invalid(
            "desired.sink",
            "must be \"mqtt\", \"aws-iot-data\" or \"azure-twin\"",
        )),
    }
}

fn resolve_ingest_source(
    source: Option<&str>,
    kinesis: Option<RawKinesis>,
) -> Result<IngestSource, ConfigError> {
    match source.unwrap_or("mqtt") {
        "mqtt" => {
            if kinesis.is_some() {
                return Err(invalid(
                    "ingest.kinesis",
                    "is set but ingest.source is not \"kinesis\"",
                ));
            }
            Ok(IngestSource::Mqtt)
        }
        "kinesis" => {
            let k = kinesis.unwrap_or_default();
            let stream = k.stream.filter(|s| !s.is_empty()).ok_or_else(|| {
                invalid(
                    "ingest.kinesis.stream",
                    "is required with ingest.source = \"kinesis\"",
                )
            })?;
            let region = k.region.filter(|r| !r.is_empty()).ok_or_else(|| {
                invalid(
                    "ingest.kinesis.region",
                    "is required with ingest.source = \"kinesis\"",
                )
            })?;
            let endpoint = k
                .endpoint
                .unwrap_or_else(|| format!("https://kinesis.{region}.amazonaws.com"));
            if !(endpoint.starts_with("https://") || endpoint.starts_with("http://")) {
                return Err(invalid(
                    "ingest.kinesis.endpoint",
                    "must be an http(s):// URL",
                ));
            }
            let lease_s = k.lease_s.unwrap_or(DEFAULT_KINESIS_LEASE_S);
            if !(3..=600).contains(&lease_s) {
                return Err(invalid("ingest.kinesis.lease_s", "must be 3-600"));
            }
            let poll_ms = k.poll_ms.unwrap_or(DEFAULT_KINESIS_POLL_MS);
            if !(200..=60_000).contains(&poll_ms) {
                return Err(invalid(
                    "ingest.kinesis.poll_ms",
                    "must be 200-60000 (Kinesis allows 5 GetRecords per second per shard)",
                ));
            }
            Ok(IngestSource::Kinesis(KinesisSettings {
                stream,
                region,
                endpoint,
                lease_s,
                poll_ms,
            }))
        }
        _ => Err(invalid(
            "ingest.source",
            "must be \"mqtt\", \"kinesis\", \"eventhubs\" or \"pubsub\"",
        )),
    }
}

/// `[ingest.eventhubs]`: IoT Hub's built-in Event Hubs-compatible endpoint (terraform/azure).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEventHubs {
    /// A file holding the Event Hubs-compatible connection string
    /// (`Endpoint=sb://…/;SharedAccessKeyName=…;SharedAccessKey=…;EntityPath=…`): the Secret
    /// `ember-iothub` that scripts/up.sh creates.
    pub connection_string_file: Option<PathBuf>,
    /// Another AMQP endpoint than the connection string's (`amqps://host:port`, or `amqp://`
    /// on 127.0.0.1 for a local test double).
    pub endpoint: Option<String>,
    pub consumer_group: Option<String>,
    /// The partition count of the endpoint (IoT Hub's `partition_count`; ids 0..n-1).
    pub partitions: Option<u32>,
    /// `"cbs"` (default: SASL ANONYMOUS and a SAS token put on `$cbs`, as Azure's SDKs do) or
    /// `"plain"` (SASL PLAIN with the policy name and key).
    pub auth: Option<String>,
    pub lease_s: Option<u64>,
    /// Link credit per partition receiver (events in flight).
    pub prefetch: Option<u32>,
}

/// Where the Event Hubs source reads ([`crate::server::ingest::eventhubs`]).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EventHubsSettings {
    pub connection_string_file: PathBuf,
    pub endpoint: Option<String>,
    pub consumer_group: String,
    pub partitions: u32,
    pub auth: EventHubsAuth,
    pub lease_s: u64,
    pub prefetch: u32,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum EventHubsAuth {
    Cbs,
    Plain,
}

/// `[desired.azure_twin]`: IoT Hub's service REST API.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAzureTwin {
    /// A file holding the hub's service connection string
    /// (`HostName=….azure-devices.net;SharedAccessKeyName=…;SharedAccessKey=…`).
    pub connection_string_file: Option<PathBuf>,
    /// Another base URL than `https://<HostName>` (a local test double).
    pub endpoint: Option<String>,
    /// Lifetime of the SAS tokens the fleet signs (renewed before they expire).
    pub token_ttl_s: Option<u64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AzureTwinSettings {
    pub connection_string_file: PathBuf,
    pub endpoint: Option<String>,
    pub token_ttl_s: u64,
}

/// Default `ingest.eventhubs.consumer_group`: the one terraform/azure creates.
pub const DEFAULT_EVENTHUBS_CONSUMER_GROUP: &str = "ember-fleet";
/// Default `ingest.eventhubs.partitions`: terraform/azure's `iothub_partitions`.
pub const DEFAULT_EVENTHUBS_PARTITIONS: u32 = 4;
/// Default `ingest.eventhubs.prefetch`.
pub const DEFAULT_EVENTHUBS_PREFETCH: u32 = 300;
/// Default `desired.azure_twin.token_ttl_s`.
pub const DEFAULT_AZURE_TOKEN_TTL_S: u64 = 3600;

fn resolve_eventhubs(e: RawEventHubs) -> Result<EventHubsSettings, ConfigError> {
    let connection_string_file = e.connection_string_file.ok_or_else(|| {
        invalid(
            "ingest.eventhubs.connection_string_file",
            "is required with ingest.source = \"eventhubs\" (the file of the Secret ember-iothub)",
        )
    })?;
    if let Some(ep) = &e.endpoint
        && !(ep.starts_with("amqps://") || ep.starts_with("amqp://"))
    {
        return Err(invalid(
            "ingest.eventhubs.endpoint",
            "must be an amqps:// (or, for a local test double, amqp://) URL",
        ));
    }
    let consumer_group = e
        .consumer_group
        .unwrap_or_else(|| DEFAULT_EVENTHUBS_CONSUMER_GROUP.to_string());
    if consumer_group.is_empty() || consumer_group.contains('/') {
        return Err(invalid(
            "ingest.eventhubs.consumer_group",
            "must be a consumer group name (no '/')",
        ));
    }
    let partitions = e.partitions.unwrap_or(DEFAULT_EVENTHUBS_PARTITIONS);
    if !(1..=1024).contains(&partitions) {
        return Err(invalid("ingest.eventhubs.partitions", "must be 1-1024"));
    }
    let auth = match e.auth.as_deref().unwrap_or("cbs") {
        "cbs" => EventHubsAuth::Cbs,
        "plain" => EventHubsAuth::Plain,
        _ => {
            return Err(invalid(
                "ingest.eventhubs.auth",
                "must be \"cbs\" or \"plain\"",
            ));
        }
    };
    let lease_s = e.lease_s.unwrap_or(DEFAULT_KINESIS_LEASE_S);
    if !(3..=600).contains(&lease_s) {
        return Err(invalid("ingest.eventhubs.lease_s", "must be 3-600"));
    }
    let prefetch = e.prefetch.unwrap_or(DEFAULT_EVENTHUBS_PREFETCH);
    if !(1..=10_000).contains(&prefetch) {
        return Err(invalid("ingest.eventhubs.prefetch", "must be 1-10000"));
    }
    Ok(EventHubsSettings {
        connection_string_file,
        endpoint: e.endpoint,
        consumer_group,
        partitions,
        auth,
        lease_s,
        prefetch,
    })
}

fn resolve_azure_twin(t: RawAzureTwin) -> Result<AzureTwinSettings, ConfigError> {
    let connection_string_file = t.connection_string_file.ok_or_else(|| {
        invalid(
            "desired.azure_twin.connection_string_file",
            "is required with desired.sink = \"azure-twin\" (the hub's service connection string)",
        )
    })?;
    if let Some(ep) = &t.endpoint
        && !(ep.starts_with("https://") || ep.starts_with("http://"))
    {
        return Err(invalid(
            "desired.azure_twin.endpoint",
            "must be an http(s):// URL",
        ));
    }
    let token_ttl_s = t.token_ttl_s.unwrap_or(DEFAULT_AZURE_TOKEN_TTL_S);
    if !(60..=86_400).contains(&token_ttl_s) {
        return Err(invalid(
            "desired.azure_twin.token_ttl_s",
            "must be 60-86400",
        ));
    }
    Ok(AzureTwinSettings {
        connection_string_file,
        endpoint: t.endpoint,
        token_ttl_s,
    })
}

/// `[ingest.pubsub]`: the Google Pub/Sub subscription that `ember-fleet bridge` fills
/// (terraform/gcp creates it with message ordering on).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPubSub {
    /// The subscription: an id in `project`, or `projects/<project>/subscriptions/<id>`.
    pub subscription: Option<String>,
    /// The Google Cloud project (default: from a full name, the metadata server on GKE, or
    /// the emulator's default).
    pub project: Option<String>,
    /// Where messages the fleet refuses go (an id in `project` or `projects/<p>/topics/<id>`),
    /// published by the fleet itself before it acknowledges them; unset: they are only stored
    /// as rejects.
    pub dead_letter_topic: Option<String>,
    /// Messages Pub/Sub may have outstanding at this replica (flow control).
    pub max_outstanding: Option<i64>,
    /// The ack deadline the streaming pull asks for, seconds (10-600).
    pub ack_deadline_s: Option<i32>,
}

/// `[bridge]`: `ember-fleet bridge`, MQTT to Google Pub/Sub.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBridge {
    /// The topic: an id in `project`, or `projects/<project>/topics/<id>`.
    pub topic: Option<String>,
    pub project: Option<String>,
    /// The bridges' shared-subscription group (not the fleet's: they must not split messages
    /// with a fleet that reads the same broker).
    pub share_group: Option<String>,
    /// Device messages taken from the broker and not yet acknowledged by Pub/Sub (the MQTT 5
    /// Receive Maximum the bridge announces, 1-65535).
    pub max_in_flight: Option<usize>,
}

/// Resolved `[ingest.pubsub]`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PubSubSettings {
    pub subscription: String,
    pub project: Option<String>,
    pub dead_letter_topic: Option<String>,
    pub max_outstanding: i64,
    pub ack_deadline_s: i32,
}

/// Resolved `[bridge]`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BridgeSettings {
    pub topic: String,
    pub project: Option<String>,
    pub share_group: String,
    pub max_in_flight: usize,
}

/// Default `ingest.pubsub.max_outstanding`.
pub const DEFAULT_PUBSUB_MAX_OUTSTANDING: i64 = 1000;
/// Default `ingest.pubsub.ack_deadline_s`: far above a batch's commit time.
pub const DEFAULT_PUBSUB_ACK_DEADLINE_S: i32 = 60;
/// Default `bridge.share_group`.
pub const DEFAULT_BRIDGE_SHARE_GROUP: &str = "ember-bridge";
/// Default `bridge.max_in_flight`.
pub const DEFAULT_BRIDGE_MAX_IN_FLIGHT: usize = 1000;

/// Checks a Pub/Sub resource name: an id, or `projects/<project>/<kind>/<id>`.
fn check_pubsub_name(key: &str, name: &str, kind: &str) -> Result<(), ConfigError> {
    let id = match name.strip_prefix("projects/") {
        Some(rest) => {
            let mut parts = rest.split('/');
            match (parts.next(), parts.next(), parts.next(), parts.next()) {
                (Some(p), Some(k), Some(id), None) if !p.is_empty() && k == kind => id,
                _ => {
                    return Err(invalid(
                        key,
                        format!("must be an id or projects/<project>/{kind}/<id>"),
                    ));
                }
            }
        }
        None => name,
    };
    let ok = (3..=255).contains(&id.len())
        && id.starts_with(|c: char| c.is_ascii_alphabetic())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.~+%".contains(c));
    if !ok {
        return Err(invalid(
            key,
            "must be 3-255 characters: a letter first, then letters, digits and - _ . ~ + %",
        ));
    }
    Ok(())
}

fn resolve_pubsub(raw: Option<RawPubSub>) -> Result<PubSubSettings, ConfigError> {
    let p = raw.unwrap_or_default();
    let subscription = p.subscription.filter(|s| !s.is_empty()).ok_or_else(|| {
        invalid(
            "ingest.pubsub.subscription",
            "is required with ingest.source = \"pubsub\" (terraform output pubsub.subscription)",
        )
    })?;
    check_pubsub_name("ingest.pubsub.subscription", &subscription, "subscriptions")?;
    if let Some(t) = &p.dead_letter_topic {
        check_pubsub_name("ingest.pubsub.dead_letter_topic", t, "topics")?;
    }
    let max_outstanding = p.max_outstanding.unwrap_or(DEFAULT_PUBSUB_MAX_OUTSTANDING);
    if !(1..=1_000_000).contains(&max_outstanding) {
        return Err(invalid(
            "ingest.pubsub.max_outstanding",
            "must be 1-1000000",
        ));
    }
    let ack_deadline_s = p.ack_deadline_s.unwrap_or(DEFAULT_PUBSUB_ACK_DEADLINE_S);
    if !(10..=600).contains(&ack_deadline_s) {
        return Err(invalid(
            "ingest.pubsub.ack_deadline_s",
            "must be 10-600 (Pub/Sub's limits)",
        ));
    }
    Ok(PubSubSettings {
        subscription,
        project: p.project.filter(|s| !s.is_empty()),
        dead_letter_topic: p.dead_letter_topic,
        max_outstanding,
        ack_deadline_s,
    })
}

fn resolve_bridge(raw: RawBridge) -> Result<BridgeSettings, ConfigError> {
    let topic = raw.topic.filter(|s| !s.is_empty()).ok_or_else(|| {
        invalid(
            "bridge.topic",
            "is required for ember-fleet bridge (terraform output pubsub.topic)",
        )
    })?;
    check_pubsub_name("bridge.topic", &topic, "topics")?;
    let share_group = raw
        .share_group
        .unwrap_or_else(|| DEFAULT_BRIDGE_SHARE_GROUP.to_string());
    if share_group.is_empty()
        || share_group
            .chars()
            .any(|c| matches!(c, '/' | '+' | '#') || c.is_whitespace())
    {
        return Err(invalid(
            "bridge.share_group",
            "must be non-empty, without '/', '+', '#' or spaces (several bridges split the messages)",
        ));
    }
    let max_in_flight = raw.max_in_flight.unwrap_or(DEFAULT_BRIDGE_MAX_IN_FLIGHT);
    if !(1..=65_535).contains(&max_in_flight) {
        return Err(invalid(
            "bridge.max_in_flight",
            "must be 1-65535 (it is the MQTT 5 Receive Maximum)",
        ));
    }
    Ok(BridgeSettings {
        topic,
        project: raw.project.filter(|s| !s.is_empty()),
        share_group,
        max_in_flight,
    })
}

fn resolve_models(raw: RawModels) -> Result<ModelSettings, ConfigError> {
    let store = parse_model_store(raw.store.as_deref().unwrap_or(DEFAULT_MODEL_STORE))?;
    let trusted_keys = raw
        .trusted_keys
        .map(PathList::into_paths)
        .unwrap_or_default();
    let mut keys = ember_bundle::TrustedKeys::new();
    for (i, path) in trusted_keys.iter().enumerate() {
        let key = ember_bundle::keys::read_public_key(path).map_err(|e| {
            invalid(
                format!("models.trusted_keys[{i}]"),
                format!("{e} (a trusted key is a public key file written by `ember-models keygen`, `<prefix>.pub`)"),
            )
        })?;
        keys.insert(key);
    }
    let max_bundle_bytes = raw.max_bundle_bytes.unwrap_or(DEFAULT_MAX_BUNDLE_BYTES);
    if !(1024..=(4u64 << 30)).contains(&max_bundle_bytes) {
        return Err(invalid(
            "models.max_bundle_bytes",
            "must be 1024 bytes to 4 GiB",
        ));
    }
    Ok(ModelSettings {
        store,
        trusted_keys,
        keys,
        max_bundle_bytes,
        store_options: Vec::new(),
    })
}

fn resolve_monitoring(raw: RawMonitoring) -> Result<MonitoringSettings, ConfigError> {
    let m = MonitoringSettings {
        window_s: raw.window_s.unwrap_or(3600),
        interval_s: raw.interval_s.unwrap_or(30),
        min_windows: raw.min_windows.unwrap_or(200),
        psi_threshold: raw.psi_threshold.unwrap_or(0.25),
        input_psi_threshold: raw.input_psi_threshold.unwrap_or(0.25),
        max_rows: raw.max_rows.unwrap_or(200_000),
    };
    if !(60..=30 * 86_400).contains(&m.window_s) {
        return Err(invalid("monitoring.window_s", "must be 60-2592000 seconds"));
    }
    if !(1..=86_400).contains(&m.interval_s) {
        return Err(invalid("monitoring.interval_s", "must be 1-86400 seconds"));
    }
    if !(1..=10_000_000).contains(&m.min_windows) {
        return Err(invalid("monitoring.min_windows", "must be 1-10000000"));
    }
    for (key, v) in [
        ("monitoring.psi_threshold", m.psi_threshold),
        ("monitoring.input_psi_threshold", m.input_psi_threshold),
    ] {
        if !(v.is_finite() && v > 0.0 && v <= 10.0) {
            return Err(invalid(
                key,
                "must be a number above 0 and at most 10 (0.1: moderate shift, 0.25: major shift)",
            ));
        }
    }
    if !(1_000..=10_000_000).contains(&m.max_rows) {
        return Err(invalid("monitoring.max_rows", "must be 1000-10000000"));
    }
    Ok(m)
}

/// Export every 60 s by default.
pub const DEFAULT_LAKE_INTERVAL_S: u64 = 60;
/// At most 100,000 records per export file.
pub const DEFAULT_LAKE_MAX_ROWS: u64 = 100_000;
/// Compact a partition's stream once it has 16 small files...
pub const DEFAULT_LAKE_COMPACT_MIN_FILES: u64 = 16;
/// ...smaller than 64 MiB each.
pub const DEFAULT_LAKE_COMPACT_TARGET_BYTES: u64 = 64 << 20;

fn resolve_lake(raw: RawLake) -> Result<Option<LakeSettings>, ConfigError> {
    let Some(text) = raw.store.filter(|s| !s.is_empty()) else {
        for (key, set) in [
            ("lake.interval_s", raw.interval_s.is_some()),
            ("lake.max_rows_per_file", raw.max_rows_per_file.is_some()),
            ("lake.compact_min_files", raw.compact_min_files.is_some()),
            (
                "lake.compact_target_bytes",
                raw.compact_target_bytes.is_some(),
            ),
        ] {
            if set {
                return Err(invalid(
                    key,
                    "is set but lake.store is not: set lake.store to a directory or an object-storage URL (s3://bucket/prefix, gs://..., az://...) to export to the lake",
                ));
            }
        }
        return Ok(None);
    };
    let store = if let Some(path) = text.strip_prefix("file://") {
        if !path.starts_with('/') {
            return Err(invalid(
                "lake.store",
                format!(
                    "{text:?} is not a file URL with an absolute path: use file:///path/to/lake or a plain directory path"
                ),
            ));
        }
        LakeStore::Dir(PathBuf::from(path))
    } else if text.contains("://") {
        match parse_model_store(&text) {
            Ok(ModelStore::Object { url }) => LakeStore::Object { url },
            Ok(ModelStore::Fs) => unreachable!("\"fs\" has no ://"),
            Err(ConfigError::Invalid { message, .. }) => {
                return Err(invalid(
                    "lake.store",
                    message.replace("\"fs\" (files under <data_dir>/models/), ", "a directory, "),
                ));
            }
            Err(e) => return Err(e),
        }
    } else {
        LakeStore::Dir(PathBuf::from(text))
    };
    let lake = LakeSettings {
        store,
        interval_s: raw.interval_s.unwrap_or(DEFAULT_LAKE_INTERVAL_S),
        max_rows_per_file: raw.max_rows_per_file.unwrap_or(DEFAULT_LAKE_MAX_ROWS),
        compact_min_files: raw
            .compact_min_files
            .unwrap_or(DEFAULT_LAKE_COMPACT_MIN_FILES),
        compact_target_bytes: raw
            .compact_target_bytes
            .unwrap_or(DEFAULT_LAKE_COMPACT_TARGET_BYTES),
        store_options: Vec::new(),
    };
    if !(1..=86_400).contains(&lake.interval_s) {
        return Err(invalid("lake.interval_s", "must be 1-86400 seconds"));
    }
    if !(1..=10_000_000).contains(&lake.max_rows_per_file) {
        return Err(invalid("lake.max_rows_per_file", "must be 1-10000000"));
    }
    if !(2..=100_000).contains(&lake.compact_min_files) {
        return Err(invalid("lake.compact_min_files", "must be 2-100000"));
    }
    if !(1024..=(16u64 << 30)).contains(&lake.compact_target_bytes) {
        return Err(invalid(
            "lake.compact_target_bytes",
            "must be 1 KiB to 16 GiB",
        ));
    }
    Ok(Some(lake))
}

/// `"fs"` or an object-storage URL; anything else is an error naming `models.store`.
fn parse_model_store(text: &str) -> Result<ModelStore, ConfigError> {
    let bad = |why: &str| {
        invalid(
            "models.store",
            format!("{text:?} {why}: use {MODEL_STORE_FORMS}"),
        )
    };
    if text == "fs" {
        return Ok(ModelStore::Fs);
    }
    let Some((scheme, rest)) = text.split_once("://") else {
        return Err(bad("is not a store"));
    };
    if !matches!(scheme, "s3" | "gs" | "az") {
        return Err(bad("is not a supported object-storage URL"));
    }
    let bucket = rest.split('/').next().unwrap_or_default();
    if bucket.contains('@') {
        // Not echoed: the text holds a secret.
        return Err(invalid(
            "models.store",
            format!(
                "a {scheme}:// URL with credentials in it; credentials come from the provider's environment variables or instance metadata, never from the config: use {MODEL_STORE_FORMS}"
            ),
        ));
    }
    if bucket.contains(':') {
        return Err(bad(
            "names a port; an S3-compatible endpoint goes in AWS_ENDPOINT_URL",
        ));
    }
    if bucket.is_empty()
        || rest.contains(['?', '#'])
        || rest.split('/').skip(1).any(|p| p == "." || p == "..")
    {
        return Err(bad(
            "names no bucket or has a query, fragment or dot segment",
        ));
    }
    Ok(ModelStore::Object {
        url: text.trim_end_matches('/').to_string(),
    })
}

/// `HOSTNAME` from the environment, if set.
fn host_from_env(env: &[(String, String)]) -> Option<String> {
    env.iter()
        .find(|(k, _)| k == "HOSTNAME")
        .map(|(_, v)| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// Refuses client ids that cannot be a replica's stable identity while the broker keeps a
/// persistent session for it: an unexpanded variable, or a default derived from a generated
/// host name. A replica replaced under a new id leaves its old session subscribed to the
/// shared subscription, and the broker keeps handing that session its share of the telemetry,
/// which no one ever receives (docs/scale-out.md).
fn check_client_id(client_id: &str) -> Result<(), ConfigError> {
    if client_id.contains("$(") || client_id.contains("${") {
        return Err(invalid(
            "mqtt.client_id",
            format!(
                "{client_id:?} holds an unexpanded variable: in Kubernetes declare POD_NAME (fieldRef metadata.name) before EMBER_FLEET_MQTT__CLIENT_ID=ember-fleet-$(POD_NAME)"
            ),
        ));
    }
    Ok(())
}

impl Settings {
    /// What `run` (and `check-config`) refuse besides invalid values: a persistent MQTT
    /// session under a client id that changes when the process is replaced, the default taken
    /// from a generated host name. The commands that never connect to the broker (`token`,
    /// `migrate`) do not ask.
    pub fn check_replica_identity(&self) -> Result<(), ConfigError> {
        let m = &self.mqtt;
        match &m.default_from_host {
            Some(host) if !m.clean_session && host_looks_generated(host) => {
                Err(unstable_client_id(host))
            }
            _ => Ok(()),
        }
    }
}

fn unstable_client_id(host: &str) -> ConfigError {
    invalid(
        "mqtt.client_id",
        format!(
            "is not set, and the default would come from the host name {host:?}, which looks generated (a Kubernetes Deployment's pod or a container id) and changes when the process is replaced; with a persistent session (mqtt.clean_session = false) the old name's session keeps its share of the shared subscription and its messages are never received: give each replica a stable mqtt.client_id starting with \"ember-fleet\" (a StatefulSet with EMBER_FLEET_MQTT__CLIENT_ID=ember-fleet-$(POD_NAME)), see docs/scale-out.md"
        ),
    )
}

/// A host name that a container runtime or Kubernetes generated: a container id (12 or 64
/// lowercase hex digits), or a pod name ending in Kubernetes' random 5-character suffix
/// (Deployments, ReplicaSets, DaemonSets; a StatefulSet's `<name>-<ordinal>` is stable).
pub fn host_looks_generated(host: &str) -> bool {
    let hex = |s: &str| {
        s.chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    };
    if (host.len() == 12 || host.len() == 64) && hex(host) {
        return true;
    }
    // k8s.io/apimachinery's rand.String alphabet: no vowels, no 0, 1, 3.
    const ALPHABET: &str = "bcdfghjklmnpqrstvwxz2456789";
    let Some((rest, suffix)) = host.rsplit_once('-') else {
        return false;
    };
    !rest.is_empty()
        && suffix.len() == 5
        && suffix.chars().all(|c| ALPHABET.contains(c))
        && !suffix.chars().all(|c| c.is_ascii_digit())
}

/// `ember-fleet-<hostname>`: unique per machine, stable across restarts (the broker keeps a
/// persistent session under it). `host` is the environment's `HOSTNAME`, if any.
fn default_client_id(host: Option<&str>) -> String {
    let host = host
        .map(str::to_string)
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "local".into());
    let host: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    format!("ember-fleet-{host}")
}

/// Keys whose values are text even when they look like numbers or booleans
/// (`the_string_keys_are_every_text_setting` keeps the list complete).
const STRING_KEYS: &[&str] = &[
    "models.store",
    "lake.store",
    "models.trusted_keys",
    "data_dir",
    "bootstrap_token",
    "database.url",
    "database.token_source",
    "mqtt.host",
    "mqtt.client_id",
    "ingest.source",
    "desired.sink",
    "mqtt.username",
    "mqtt.password",
    "mqtt.share_group",
    "http.listen",
    "log.level",
    "log.format",
    "bridge.topic",
    "bridge.project",
    "bridge.share_group",
];

/// `EMBER_FLEET_<KEY>` / `EMBER_FLEET_<SECTION>__<KEY>` (names in `ember_host::env::RESERVED`,
/// such as `EMBER_FLEET_URL` and `EMBER_FLEET_TOKEN`, are not overrides).
const ENV: Overlay<'static> = Overlay {
    program: "ember-fleet",
    example: "fleet-api/examples/fleet.toml",
    prefix: "EMBER_FLEET_",
    foreign_prefixes: &[],
    string_keys: STRING_KEYS,
    file_only: &[],
};

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Settings, ConfigError> {
        Settings::from_toml(text, "test.toml", Vec::new())
    }

    #[test]
    fn empty_config_gets_defaults() {
        let s = load("").unwrap();
        assert_eq!(s.database.backend, Backend::Sqlite);
        assert_eq!(s.database.url, "sqlite://ember-fleet-data/fleet.db");
        assert_eq!(s.mqtt.port, DEFAULT_MQTT_PORT);
        assert!(!s.mqtt.clean_session);
        assert_eq!(s.mqtt.share_group, "ember-fleet");
        assert!(s.mqtt.client_id.starts_with("ember-fleet-"));
        assert_eq!(s.http.listen.to_string(), DEFAULT_HTTP_LISTEN);
        assert_eq!(s.retention.telemetry_days, DEFAULT_TELEMETRY_DAYS);
    }

    #[test]
    fn the_example_config_is_valid_and_complete() {
        let text = include_str!("../examples/fleet.toml");
        let s = load(text).unwrap();
        assert_eq!(s.http.listen.to_string(), "127.0.0.1:8080");
        // Every key of the resolved settings appears in the example (commented out or not).
        for key in [
            "data_dir",
            "bootstrap_token",
            "format",
            "level",
            "listen",
            "default_page_limit",
            "max_page_limit",
            "url",
            "max_connections",
            "host",
            "port",
            "client_id",
            "username",
            "password",
            "keep_alive_s",
            "clean_session",
            "session_expiry_s",
            "share_group",
            "reconnect_min_ms",
            "reconnect_max_ms",
            "max_payload_bytes",
            "batch_max_records",
            "batch_max_delay_ms",
            "copy_min_records",
            "channel_capacity",
            "aggregate_channels",
            "source",
            "sink",
            "telemetry_days",
            "aggregates_days",
            "rejects_days",
            "interval_s",
            "grace_ms",
            "store",
            "trusted_keys",
            "max_bundle_bytes",
            "connection_string_file",
            "consumer_group",
            "partitions",
            "auth",
            "prefetch",
            "token_ttl_s",
        ] {
            assert!(
                text.contains(&format!("{key} =")),
                "examples/fleet.toml lacks {key}"
            );
        }
    }

    #[test]
    fn env_overrides_file_and_secrets_are_masked() {
        let env = vec![
            ("EMBER_FLEET_MQTT__PORT".to_string(), "8883".to_string()),
            (
                "EMBER_FLEET_DATABASE__URL".to_string(),
                "postgres://fleet:hunter2@db.local/fleet".to_string(),
            ),
            (
                "EMBER_FLEET_BOOTSTRAP_TOKEN".to_string(),
                "12345678901234567890".to_string(),
            ),
            ("EMBER_FLEET_LOG".to_string(), "debug".to_string()),
            (
                "EMBER_FLEET_MQTT__USERNAME".to_string(),
                "fleet".to_string(),
            ),
            (
                "EMBER_FLEET_MQTT__PASSWORD".to_string(),
                "mqtt-secret".to_string(),
            ),
            ("EMBER_DEVICE_ID".to_string(), "agent-only".to_string()),
            ("PATH".to_string(), "/bin".to_string()),
        ];
        let s = Settings::from_toml("[mqtt]\nport = 1\n", "t", env).unwrap();
        assert_eq!(s.mqtt.port, 8883);
        assert_eq!(s.database.backend, Backend::Postgres);
        assert_eq!(
            s.bootstrap_token.as_deref(),
            Some("12345678901234567890"),
            "a numeric-looking token stays text"
        );
        let printed = s.to_toml();
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(!printed.contains("12345678901234567890"), "{printed}");
        assert!(!printed.contains("mqtt-secret"), "{printed}");
        assert_eq!(s.mqtt.password.as_deref(), Some("mqtt-secret"));
        assert!(printed.contains("fleet:***@db.local"), "{printed}");
    }

    /// The CLI's variables (`EMBER_FLEET_URL` for `rollout`/`model`, `EMBER_FLEET_CA_FILE`,
    /// `EMBER_FLEET_TOKEN`) and test variables are not settings: exporting them never stops
    /// `run`, `token` or `demo` from starting.
    #[test]
    fn reserved_variables_are_not_overrides() {
        let env: Vec<(String, String)> = [
            ("EMBER_FLEET_URL", "https://fleet.example:8443"),
            ("EMBER_FLEET_CA_FILE", "/etc/ember/ca.pem"),
            ("EMBER_FLEET_TOKEN", "t"),
            ("EMBER_FLEET_CONFIG", "/etc/ember/fleet.toml"),
            ("EMBER_FLEET_TEST_LOG", "debug"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        Settings::from_toml("", "t", env).unwrap();
    }

    #[test]
    fn an_unknown_variable_is_named_with_the_fix() {
        let env = vec![("EMBER_FLEET_MQTT__PROT".to_string(), "1".to_string())];
        let e = Settings::from_toml("", "t", env).unwrap_err().to_string();
        assert!(
            e.contains("EMBER_FLEET_MQTT__PROT") && e.contains("unset the variable"),
            "{e}"
        );
    }

    /// Every setting that holds text is in `STRING_KEYS`, so a value like `1001` or `true`
    /// given in the environment stays text.
    #[test]
    fn the_string_keys_are_every_text_setting() {
        let text = include_str!("../examples/fleet.toml");
        let s = load(text).unwrap();
        let table: toml::Table = toml::from_str(&s.to_toml()).unwrap();
        // Resolved from other keys, not settable themselves.
        let derived = ["database.backend"];
        for key in ember_host::env::string_keys_of(&table) {
            assert!(
                STRING_KEYS.contains(&key.as_str()) || derived.contains(&key.as_str()),
                "`{key}` holds text: add it to STRING_KEYS"
            );
        }
    }

    /// A build without the `cloud` feature (the README's demo) refuses each option that needs
    /// it, naming the key and the build that has it; the default build takes them all.
    #[test]
    fn a_build_without_the_cloud_clients_refuses_what_needs_them() {
        let cases: &[(&str, &str)] = &[
            (
                "[ingest]\nsource = \"kinesis\"\n[ingest.kinesis]\nstream = \"s\"\nregion = \"eu-west-1\"\n",
                "ingest.source",
            ),
            (
                "[ingest]\nsource = \"eventhubs\"\n[ingest.eventhubs]\nconnection_string_file = \"/x\"\n",
                "ingest.source",
            ),
            (
                "[ingest]\nsource = \"pubsub\"\n[ingest.pubsub]\nsubscription = \"projects/p1/subscriptions/ember-fleet\"\n",
                "ingest.source",
            ),
            (
                "[desired]\nsink = \"aws-iot-data\"\n[desired.aws_iot_data]\nregion = \"eu-west-1\"\nendpoint = \"a-ats.iot.eu-west-1.amazonaws.com\"\n",
                "desired.sink",
            ),
            (
                "[desired]\nsink = \"azure-twin\"\n[desired.azure_twin]\nconnection_string_file = \"/x\"\n",
                "desired.sink",
            ),
            (
                "[database]\nurl = \"postgres://ember-id@h.postgres.database.azure.com/ember\"\ntoken_source = \"azure-workload-identity\"\n",
                "database.token_source",
            ),
            (
                "[models]\nstore = \"s3://bucket/bundles\"\n",
                "models.store",
            ),
            ("[lake]\nstore = \"gs://bucket/lake\"\n", "lake.store"),
            (
                "[bridge]\ntopic = \"projects/p1/topics/ember-ingest\"\n",
                "bridge",
            ),
        ];
        for (toml, key) in cases {
            let s = Settings::from_toml(toml, "test", Vec::new()).unwrap();
            s.check_features(true).unwrap();
            let e = s.check_features(false).expect_err(toml).to_string();
            assert!(
                e.contains(key) && e.contains("`cloud` feature") && e.contains("cargo build"),
                "{toml}: {e}"
            );
        }
        // What the demo configures (SQLite, a lake directory, bundles on disk) needs nothing.
        let s = Settings::from_toml(
            "[lake]\nstore = \"/var/lib/ember/lake\"\n",
            "test",
            Vec::new(),
        )
        .unwrap();
        s.check_features(false).unwrap();
    }

    #[test]
    fn the_pubsub_source_and_the_bridge_resolve() {
        let s = Settings::from_toml(
            "[ingest]\nsource = \"pubsub\"\n[ingest.pubsub]\n\
             subscription = \"projects/p1/subscriptions/ember-fleet\"\n\
             dead_letter_topic = \"ember-dead\"\n\
             [bridge]\ntopic = \"projects/p1/topics/ember-ingest\"\n",
            "test",
            Vec::new(),
        )
        .unwrap();
        let IngestSource::PubSub(p) = &s.ingest.source else {
            panic!("{:?}", s.ingest.source)
        };
        assert_eq!(p.subscription, "projects/p1/subscriptions/ember-fleet");
        assert_eq!(p.dead_letter_topic.as_deref(), Some("ember-dead"));
        assert_eq!(p.max_outstanding, DEFAULT_PUBSUB_MAX_OUTSTANDING);
        assert_eq!(p.ack_deadline_s, DEFAULT_PUBSUB_ACK_DEADLINE_S);
        let b = s.bridge.unwrap();
        assert_eq!(b.topic, "projects/p1/topics/ember-ingest");
        assert_eq!(b.share_group, DEFAULT_BRIDGE_SHARE_GROUP);
        assert_eq!(b.max_in_flight, DEFAULT_BRIDGE_MAX_IN_FLIGHT);
        let env = vec![(
            "EMBER_FLEET_BRIDGE__TOPIC".to_string(),
            "projects/p2/topics/other".to_string(),
        )];
        let s = Settings::from_toml("[bridge]\ntopic = \"abc\"\n", "test", env).unwrap();
        assert_eq!(s.bridge.unwrap().topic, "projects/p2/topics/other");
    }

    /// Finding 8 of issue 16: a persistent session under an id that changes when the process
    /// is replaced (the default from a generated host name, an unexpanded variable) is refused
    /// at start, naming the key and the fix; a StatefulSet's stable name is accepted.
    #[test]
    fn an_unstable_client_id_with_a_persistent_session_is_refused() {
        let env = |host: &str| vec![("HOSTNAME".to_string(), host.to_string())];
        for host in [
            "ember-fleet-7d9f8b6c5-x2kqz",
            "ember-fleet-x2kqz",
            "3f4e5d6c7b8a",
        ] {
            let e = Settings::from_toml("", "t", env(host))
                .unwrap()
                .check_replica_identity()
                .expect_err(host)
                .to_string();
            assert!(
                e.contains("mqtt.client_id") && e.contains("StatefulSet"),
                "{host}: {e}"
            );
            // A clean session, or an explicit id, is fine.
            for ok in [
                "[mqtt]\nclean_session = true\n",
                "[mqtt]\nclient_id = \"ember-fleet-a\"\n",
            ] {
                Settings::from_toml(ok, "t", env(host))
                    .unwrap()
                    .check_replica_identity()
                    .unwrap();
            }
        }
        for host in [
            "ember-fleet-0",
            "ember-fleet-12",
            "fleet1.example.com",
            "vm",
        ] {
            let s = Settings::from_toml("", "t", env(host)).unwrap();
            s.check_replica_identity().unwrap();
            assert_eq!(
                s.mqtt.client_id,
                format!("ember-fleet-{}", host.replace('.', "-"))
            );
        }
        let unexpanded = vec![(
            "EMBER_FLEET_MQTT__CLIENT_ID".to_string(),
            "ember-fleet-$(POD_NAME)".to_string(),
        )];
        let e = Settings::from_toml("", "t", unexpanded)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("mqtt.client_id") && e.contains("POD_NAME"),
            "{e}"
        );
    }

    #[test]
    fn invalid_configs_name_the_key() {
        let cases: &[(&str, &str)] = &[
            ("nope = 1", "nope"),
            ("[mqtt]\nprot = 1", "prot"),
            ("[mqtt]\nport = 0", "mqtt.port"),
            (
                "[ingest]\nsource = \"eventhubs\"",
                "ingest.eventhubs.connection_string_file",
            ),
            (
                "[ingest]\nsource = \"eventhubs\"\n[ingest.eventhubs]\nconnection_string_file = \"/x\"\npartitions = 0",
                "ingest.eventhubs.partitions",
            ),
            (
                "[ingest]\nsource = \"eventhubs\"\n[ingest.eventhubs]\nconnection_string_file = \"/x\"\nauth = \"jwt\"",
                "ingest.eventhubs.auth",
            ),
            (
                "[ingest.eventhubs]\nconnection_string_file = \"/x\"",
                "ingest.eventhubs",
            ),
            (
                "[desired]\nsink = \"azure-twin\"",
                "desired.azure_twin.connection_string_file",
            ),
            (
                "[desired]\nsink = \"azure-twin\"\n[desired.azure_twin]\nconnection_string_file = \"/x\"\nendpoint = \"ftp://h\"",
                "desired.azure_twin.endpoint",
            ),
            ("[mqtt]\nsession_expiry_s = 0", "mqtt.session_expiry_s"),
            (
                "[mqtt]\nsession_expiry_s = 4294967295",
                "mqtt.session_expiry_s",
            ),
            ("[mqtt]\nshare_group = \"a/b\"", "mqtt.share_group"),
            (
                "[ingest]\nsource = \"pubsub\"",
                "ingest.pubsub.subscription",
            ),
            ("[ingest.pubsub]\nsubscription = \"sub1\"", "ingest.pubsub"),
            (
                "[ingest]\nsource = \"pubsub\"\n[ingest.pubsub]\nsubscription = \"projects/p/topics/t12\"",
                "ingest.pubsub.subscription",
            ),
            (
                "[ingest]\nsource = \"pubsub\"\n[ingest.pubsub]\nsubscription = \"sub1\"\nack_deadline_s = 5",
                "ingest.pubsub.ack_deadline_s",
            ),
            ("[bridge]\nmax_in_flight = 10", "bridge.topic"),
            ("[bridge]\ntopic = \"t1\"", "bridge.topic"),
            (
                "[bridge]\ntopic = \"topic1\"\nmax_in_flight = 0",
                "bridge.max_in_flight",
            ),
            (
                "[bridge]\ntopic = \"topic1\"\nshare_group = \"\"",
                "bridge.share_group",
            ),
            ("[mqtt]\npassword = \"p\"", "mqtt.password"),
            ("[database]\nurl = \"mysql://x\"", "database.url"),
            (
                "[database]\nmax_connections = 0",
                "database.max_connections",
            ),
            ("[http]\nlisten = \"nowhere\"", "http.listen"),
            ("[http]\ndefault_page_limit = 0", "http.default_page_limit"),
            (
                "[ingest]\nmax_payload_bytes = 10",
                "ingest.max_payload_bytes",
            ),
            (
                "[ingest]\nbatch_max_records = 0",
                "ingest.batch_max_records",
            ),
            ("[retention]\ninterval_s = 0", "retention.interval_s"),
            (
                "[retention]\ntelemetry_days = 99999",
                "retention.telemetry_days",
            ),
            ("[log]\nformat = \"xml\"", "log.format"),
            ("bootstrap_token = \"short\"", "bootstrap_token"),
            ("data_dir = ", "line 1"),
        ];
        for (text, key) in cases {
            let e = load(text).expect_err(text).to_string();
            assert!(
                e.contains(key),
                "error for {text:?} should name {key:?}: {e}"
            );
        }
        let e = Settings::from_toml("", "t", vec![("EMBER_FLEET_MQTT__X__Y".into(), "1".into())])
            .unwrap_err()
            .to_string();
        assert!(e.contains("EMBER_FLEET_MQTT__X__Y"), "{e}");
    }
}
