//! `ember-fleet pki`: a small certificate authority for a fleet, on files (rcgen, ring).
//!
//! # Layout of a PKI directory
//!
//! ```text
//! <dir>/ca.pem  ca.key            the CA (keep ca.key offline in production)
//! <dir>/server.pem  server.key    the broker's certificate (SANs: localhost, 127.0.0.1, ::1, --name ...)
//! <dir>/fleet.pem  fleet.key      the fleet service's MQTT client certificate (CN ember:fleet)
//! <dir>/devices/<id>.pem [.key]   device certificates (CN = device id); .key only when issued here
//! <dir>/mosquitto.conf  acl       a mutual-TLS Mosquitto listener with the per-device ACL
//! <dir>/data/                     the broker's persistence (mosquitto.db; created 0700)
//! <dir>/ember_identity.so         the identity plugin the config loads (built by
//!                                 scripts/build-identity-plugin.sh from deploy/mosquitto/)
//! ```
//!
//! # Guarantees
//!
//! * Private keys are written with mode 0600, through a temporary file and a rename, and a
//!   key is never overwritten except by `device-cert --rotate` (which replaces key and
//!   certificate of that one device).
//! * A device certificate's common name is a valid device id (`ember_proto::check_name`), so
//!   it can never be the fleet identity (which contains `:`) nor carry MQTT wildcards.
//! * `sign-csr` takes only the public key and the common name from a request (after checking
//!   its signature); every other attribute (CA flag, key usages, names, validity) is set here,
//!   so a request cannot ask for more than a device certificate.
//! * Every certificate gets a random 128-bit serial number.
//! * The broker configuration keeps what it accepts across a clean restart (`persistence
//!   true`), queues for an offline fleet sized from a stated offline window and rate, accepts
//!   every packet an agent with the given `mqtt.message_max_bytes` sends, and binds each
//!   device's MQTT client id to its certificate (the `ember_identity` plugin): see
//!   [`mosquitto_conf`] and docs/operations.md, "Broker configuration (Mosquitto)".

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Subcommand;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

use ember_proto::acl::{FLEET_IDENTITY, check_fleet_identity, mosquitto_acl};

/// Mode of every private key file written here.
pub const KEY_MODE: u32 = 0o600;
pub const DEFAULT_CA_DAYS: i64 = 3650;
pub const DEFAULT_SERVER_DAYS: i64 = 825;
pub const DEFAULT_CLIENT_DAYS: i64 = 365;
pub const DEFAULT_MQTTS_PORT: u16 = 8883;

/// The agent's default `mqtt.message_max_bytes` (`DEFAULT_MESSAGE_MAX_BYTES` in
/// agent/src/config.rs; the fleet does not depend on the agent, so the system test
/// `broker_conf::generated_config_accepts_the_agents_largest_message` compares the two).
pub const AGENT_DEFAULT_MESSAGE_MAX_BYTES: u32 = 128 * 1024;
/// Room above the agent's payload limit in the broker's `max_packet_size`: the agent never
/// sends a packet above `message_max_bytes + 1024` (its MQTT client's outgoing limit, in
/// agent/src/uplink.rs); 4 KiB also covers the fixed header, the longest Ember topic (85
/// bytes), the packet id and MQTT 5 properties.
pub const PACKET_HEADROOM_BYTES: u32 = 4096;
/// How long the fleet may stay away (down, deploying, partitioned) while the broker queues
/// its messages: an hour, the default lifetime of a persistent session on AWS IoT Core.
pub const DEFAULT_OFFLINE_WINDOW_S: u32 = 3600;
/// Messages per second the whole fleet publishes to the fleet service. An agent batches up to
/// 100 records or 100 ms of a stream into one message (`mqtt.message_max_records`,
/// `message_max_delay_ms`), so a device streaming at 100 Hz or more sends about 10 messages/s:
/// 20 is two such devices, or some 200 devices sending a message every 10 s.
pub const DEFAULT_EXPECTED_RATE: u32 = 20;
/// Average message size: a full batch of 100 three-channel records is 8,667 bytes in JSON (the
/// agent's default encoding) and 5,244 in CBOR; statuses, heartbeats and batches cut short by
/// the delay are far smaller.
pub const DEFAULT_AVERAGE_MESSAGE_BYTES: u32 = 4096;
/// Seconds between the broker's saves of its in-memory state (see [`mosquitto_conf`]).
pub const DEFAULT_AUTOSAVE_INTERVAL_S: u32 = 60;
/// The fleet's MQTT client ids start with this (its default client id is
/// `ember-fleet-<hostname>`; the desired-state publisher, one for the whole fleet, is
/// `ember-fleet-desired`).
pub const DEFAULT_FLEET_CLIENT_ID_PREFIX: &str = "ember-fleet";
/// The identity plugin's file name in a PKI directory.
pub const IDENTITY_PLUGIN_FILE: &str = "ember_identity.so";
/// Mosquitto 2.0.11 reads `max_queued_messages`, `max_queued_bytes` and `max_packet_size`
/// as a C `int`.
const MOSQUITTO_INT_MAX: u64 = i32::MAX as u64;

#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Create a CA (ca.pem, ca.key) in DIR.
    InitCa {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "Ember fleet CA")]
        cn: String,
        #[arg(long, default_value_t = DEFAULT_CA_DAYS)]
        days: i64,
    },
    /// Issue the broker's certificate (server.pem, server.key): SANs localhost, 127.0.0.1, ::1
    /// and every --name.
    ServerCert {
        #[arg(long)]
        dir: PathBuf,
        /// Extra DNS names or IP addresses the broker is reached by.
        #[arg(long = "name")]
        names: Vec<String>,
        #[arg(long, default_value_t = DEFAULT_SERVER_DAYS)]
        days: i64,
    },
    /// Issue the fleet service's MQTT client certificate (fleet.pem, fleet.key).
    ClientCert {
        #[arg(long)]
        dir: PathBuf,
        /// Its common name = MQTT user name; must contain ':' (never a device id).
        #[arg(long, default_value = FLEET_IDENTITY)]
        cn: String,
        #[arg(long, default_value_t = DEFAULT_CLIENT_DAYS)]
        days: i64,
    },
    /// Issue a key and certificate for a device (devices/<id>.pem, .key). Prefer `sign-csr`:
    /// then the key is generated on the device and never leaves it.
    DeviceCert {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        device_id: String,
        #[arg(long, default_value_t = DEFAULT_CLIENT_DAYS)]
        days: i64,
        /// Replace an existing key and certificate of this device (rotation).
        #[arg(long)]
        rotate: bool,
    },
    /// Sign a device's certificate request (from `ember-agent csr`); its common name must be a
    /// valid device id. Writes devices/<id>.pem (or --out) and prints the path.
    SignCsr {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        csr: PathBuf,
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, default_value_t = DEFAULT_CLIENT_DAYS)]
        days: i64,
    },
    /// Write mosquitto.conf and acl for a mutual-TLS broker using DIR's certificates, and
    /// create DIR/data/ for its persistence.
    MosquittoConf {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = DEFAULT_MQTTS_PORT)]
        port: u16,
        /// Address of the TLS listener.
        #[arg(long, default_value = "127.0.0.1")]
        bind: String,
        /// The fleet's identity (its client certificate's common name).
        #[arg(long, default_value = FLEET_IDENTITY)]
        fleet_cn: String,
        /// The fleet identity may connect only with client ids starting with this; device
        /// ids starting with it are refused.
        #[arg(long, default_value = DEFAULT_FLEET_CLIENT_ID_PREFIX)]
        fleet_client_id_prefix: String,
        /// The ember_identity plugin (default DIR/ember_identity.so; build it with
        /// scripts/build-identity-plugin.sh).
        #[arg(long, value_name = "PATH")]
        identity_plugin: Option<PathBuf>,
        /// Seconds the fleet may be away while the broker queues its messages.
        #[arg(long, default_value_t = DEFAULT_OFFLINE_WINDOW_S)]
        offline_window_s: u32,
        /// Messages per second the whole fleet publishes to the fleet service.
        #[arg(long, default_value_t = DEFAULT_EXPECTED_RATE)]
        expected_rate: u32,
        /// Average size of those messages in bytes.
        #[arg(long, default_value_t = DEFAULT_AVERAGE_MESSAGE_BYTES)]
        average_message_bytes: u32,
        /// Use this max_queued_messages instead of window x rate.
        #[arg(long)]
        max_queued_messages: Option<u64>,
        /// Use this max_queued_bytes instead of messages x average size.
        #[arg(long)]
        max_queued_bytes: Option<u64>,
        /// The agents' largest `mqtt.message_max_bytes`.
        #[arg(long, default_value_t = AGENT_DEFAULT_MESSAGE_MAX_BYTES)]
        agent_message_max_bytes: u32,
        /// Seconds between the broker's saves of its state to DIR/data/mosquitto.db.
        #[arg(long, default_value_t = DEFAULT_AUTOSAVE_INTERVAL_S)]
        autosave_interval_s: u32,
        /// DEVELOPMENT ONLY: also a plaintext, anonymous, unrestricted listener on
        /// 127.0.0.1:PORT.
        #[arg(long, value_name = "PORT")]
        insecure_dev_port: Option<u16>,
    },
}

/// Runs one `pki` command; returns what to print on stdout.
pub fn run(cmd: PkiCommand) -> anyhow::Result<String> {
    match cmd {
        PkiCommand::InitCa { dir, cn, days } => {
            init_ca(&dir, &cn, days)?;
            Ok(format!("{}\n", dir.join("ca.pem").display()))
        }
        PkiCommand::ServerCert { dir, names, days } => {
            let ca = Ca::load(&dir)?;
            let (cert, key) = ca.issue_server(&names, days)?;
            write_cert(&dir.join("server.pem"), &cert)?;
            write_key(&dir.join("server.key"), &key, false)?;
            Ok(format!("{}\n", dir.join("server.pem").display()))
        }
        PkiCommand::ClientCert { dir, cn, days } => {
            check_fleet_identity(&cn).map_err(|why| anyhow::anyhow!("--cn {cn:?}: {why}"))?;
            let ca = Ca::load(&dir)?;
            let key = KeyPair::generate()?;
            let cert = ca.issue_client(&cn, &key, days)?;
            write_key(&dir.join("fleet.key"), &key.serialize_pem(), false)?;
            write_cert(&dir.join("fleet.pem"), &cert)?;
            Ok(format!("{}\n", dir.join("fleet.pem").display()))
        }
        PkiCommand::DeviceCert {
            dir,
            device_id,
            days,
            rotate,
        } => {
            check_device_id(&device_id)?;
            let ca = Ca::load(&dir)?;
            let devices = dir.join("devices");
            fs::create_dir_all(&devices)
                .with_context(|| format!("cannot create {}", devices.display()))?;
            let key_path = devices.join(format!("{device_id}.key"));
            let cert_path = devices.join(format!("{device_id}.pem"));
            if !rotate && (key_path.exists() || cert_path.exists()) {
                bail!(
                    "{device_id} already has a certificate in {}: pass --rotate to issue a new key and certificate",
                    devices.display()
                );
            }
            let key = KeyPair::generate()?;
            let cert = ca.issue_client(&device_id, &key, days)?;
            write_key(&key_path, &key.serialize_pem(), rotate)?;
            write_cert(&cert_path, &cert)?;
            Ok(format!("{}\n", cert_path.display()))
        }
        PkiCommand::SignCsr {
            dir,
            csr,
            out,
            days,
        } => {
            let ca = Ca::load(&dir)?;
            let pem = fs::read_to_string(&csr)
                .with_context(|| format!("cannot read {}", csr.display()))?;
            let (device_id, cert) = ca.sign_csr(&pem, days)?;
            let out = match out {
                Some(o) => o,
                None => {
                    let devices = dir.join("devices");
                    fs::create_dir_all(&devices)
                        .with_context(|| format!("cannot create {}", devices.display()))?;
                    devices.join(format!("{device_id}.pem"))
                }
            };
            write_cert(&out, &cert)?;
            Ok(format!("{}\n", out.display()))
        }
        PkiCommand::MosquittoConf {
            dir,
            port,
            bind,
            fleet_cn,
            fleet_client_id_prefix,
            identity_plugin,
            offline_window_s,
            expected_rate,
            average_message_bytes,
            max_queued_messages,
            max_queued_bytes,
            agent_message_max_bytes,
            autosave_interval_s,
            insecure_dev_port,
        } => {
            check_fleet_identity(&fleet_cn)
                .map_err(|why| anyhow::anyhow!("--fleet-cn {fleet_cn:?}: {why}"))?;
            check_client_id_prefix(&fleet_client_id_prefix)?;
            let queue = QueueLimits::resolve(
                offline_window_s,
                expected_rate,
                average_message_bytes,
                max_queued_messages,
                max_queued_bytes,
            )?;
            let max_packet_size = max_packet_size(agent_message_max_bytes)?;
            if !(1..=86_400).contains(&autosave_interval_s) {
                bail!(
                    "--autosave-interval-s {autosave_interval_s} is out of range: use 1-86400 (0 would save only at a clean stop)"
                );
            }
            let dir =
                fs::canonicalize(&dir).with_context(|| format!("cannot find {}", dir.display()))?;
            let plugin = identity_plugin.unwrap_or_else(|| dir.join(IDENTITY_PLUGIN_FILE));
            let plugin = fs::canonicalize(&plugin).map_err(|_| {
                anyhow::anyhow!(
                    "the identity plugin {} does not exist: build it with `scripts/build-identity-plugin.sh {}` \
                     (needs gcc and Debian's mosquitto-dev, libmosquitto-dev, libssl-dev), or pass --identity-plugin PATH",
                    plugin.display(),
                    plugin.display()
                )
            })?;
            let data = dir.join("data");
            create_private_dir(&data)?;
            let acl = dir.join("acl");
            write_cert(&acl, &mosquitto_acl(&fleet_cn))?;
            let conf = dir.join("mosquitto.conf");
            let broker = BrokerConf {
                dir: &dir,
                bind: &bind,
                port,
                acl: &acl,
                data: &data,
                fleet_cn: &fleet_cn,
                fleet_client_id_prefix: &fleet_client_id_prefix,
                identity_plugin: &plugin,
                queue,
                agent_message_max_bytes,
                max_packet_size,
                autosave_interval_s,
                insecure_dev_port,
            };
            write_cert(&conf, &mosquitto_conf(&broker))?;
            Ok(format!("{}\n", conf.display()))
        }
    }
}

/// Refuses anything but a valid device id as a device certificate's common name.
pub fn check_device_id(id: &str) -> anyhow::Result<()> {
    ember_proto::check_name(id).map_err(|why| {
        anyhow::anyhow!("{id:?} is not a device id: {why} (use 1-64 of A-Z a-z 0-9 - _ .)")
    })
}

/// Everything [`mosquitto_conf`] writes, resolved and checked.
#[derive(Debug, Clone)]
pub struct BrokerConf<'a> {
    /// The PKI directory (absolute): ca.pem, server.pem, server.key.
    pub dir: &'a Path,
    pub bind: &'a str,
    pub port: u16,
    pub acl: &'a Path,
    /// The persistence directory (absolute).
    pub data: &'a Path,
    pub fleet_cn: &'a str,
    pub fleet_client_id_prefix: &'a str,
    pub identity_plugin: &'a Path,
    pub queue: QueueLimits,
    pub agent_message_max_bytes: u32,
    pub max_packet_size: u32,
    pub autosave_interval_s: u32,
    pub insecure_dev_port: Option<u16>,
}

/// Mosquitto's per-client queue limits for offline persistent sessions, and where they came
/// from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    pub offline_window_s: u32,
    pub expected_rate: u32,
    pub average_message_bytes: u32,
    pub max_queued_messages: u64,
    pub max_queued_bytes: u64,
    /// Whether `max_queued_messages` / `max_queued_bytes` were given, not computed.
    pub explicit_messages: bool,
    pub explicit_bytes: bool,
}

impl QueueLimits {
    /// `max_queued_messages = offline window x rate`, `max_queued_bytes = max_queued_messages
    /// x average size`, unless given explicitly; both must fit Mosquitto's `int`.
    pub fn resolve(
        offline_window_s: u32,
        expected_rate: u32,
        average_message_bytes: u32,
        max_queued_messages: Option<u64>,
        max_queued_bytes: Option<u64>,
    ) -> anyhow::Result<QueueLimits> {
        if !(60..=30 * 86_400).contains(&offline_window_s) {
            bail!(
                "--offline-window-s {offline_window_s} is out of range: use 60-2592000 (a minute to 30 days)"
            );
        }
        if expected_rate == 0 {
            bail!(
                "--expected-rate 0: give the messages per second the fleet receives (at least 1)"
            );
        }
        if !(64..=256 * 1024 * 1024).contains(&average_message_bytes) {
            bail!(
                "--average-message-bytes {average_message_bytes} is out of range: use 64-268435456"
            );
        }
        let messages = match max_queued_messages {
            Some(m) => m,
            None => u64::from(offline_window_s) * u64::from(expected_rate),
        };
        let bytes = match max_queued_bytes {
            Some(b) => b,
            None => messages.saturating_mul(u64::from(average_message_bytes)),
        };
        if messages == 0 || bytes == 0 {
            bail!(
                "a queue limit of 0 means no limit to Mosquitto (unbounded memory): give --max-queued-messages and --max-queued-bytes of at least 1"
            );
        }
        if messages > MOSQUITTO_INT_MAX {
            bail!(
                "max_queued_messages {messages} is above Mosquitto's limit of {MOSQUITTO_INT_MAX}: \
                 lower --offline-window-s or --expected-rate, or give --max-queued-messages"
            );
        }
        if bytes > MOSQUITTO_INT_MAX {
            bail!(
                "max_queued_bytes {bytes} ({} MiB) is above Mosquitto's limit of {MOSQUITTO_INT_MAX} (2 GiB): \
                 lower --offline-window-s, --expected-rate or --average-message-bytes, or give --max-queued-bytes",
                bytes / (1024 * 1024)
            );
        }
        Ok(QueueLimits {
            offline_window_s,
            expected_rate,
            average_message_bytes,
            max_queued_messages: messages,
            max_queued_bytes: bytes,
            explicit_messages: max_queued_messages.is_some(),
            explicit_bytes: max_queued_bytes.is_some(),
        })
    }
}

/// The broker's `max_packet_size` for agents whose `mqtt.message_max_bytes` is at most
/// `agent_message_max_bytes`.
pub fn max_packet_size(agent_message_max_bytes: u32) -> anyhow::Result<u32> {
    // The agent's own range (agent/src/config.rs).
    if !(1024..=256 * 1024 * 1024).contains(&agent_message_max_bytes) {
        bail!(
            "--agent-message-max-bytes {agent_message_max_bytes} is out of range: use the agents' mqtt.message_max_bytes (1024-268435456)"
        );
    }
    // MQTT's own ceiling: 256 MiB of remaining length plus a 5-byte fixed header.
    Ok(agent_message_max_bytes
        .saturating_add(PACKET_HEADROOM_BYTES)
        .min(268_435_455 + 5))
}

/// Refuses a fleet client-id prefix Mosquitto's config cannot carry or a client id cannot
/// start with.
fn check_client_id_prefix(prefix: &str) -> anyhow::Result<()> {
    if prefix.is_empty()
        || prefix.len() > 64
        || prefix
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '/' | '+' | '#'))
    {
        bail!(
            "--fleet-client-id-prefix {prefix:?}: use 1-64 characters without spaces, '/', '+' or '#' (the fleet's [mqtt] client_id must start with it)"
        );
    }
    Ok(())
}

/// Creates `dir` (and its parents) and makes it private (0700): the broker's database holds
/// queued telemetry.
fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot make {} private (chmod 700)", dir.display()))
}

/// A Mosquitto configuration: persistence under `data`, queue and packet limits, a
/// mutual-TLS listener on `bind:port` that loads the `ember_identity` plugin (the
/// certificate's common name becomes the user name, a device's client id must be its device
/// id) and applies `acl`; with `insecure_dev_port`, also a plaintext, anonymous listener on
/// 127.0.0.1 for development. Every number is explained in the generated comments.
/// Mosquitto's `persistent_client_expiration` for an offline window: whole hours (its
/// smallest unit), at least one.
pub fn persistent_client_expiration(offline_window_s: u32) -> String {
    format!("{}h", offline_window_s.div_ceil(3600).max(1))
}

pub fn mosquitto_conf(c: &BrokerConf<'_>) -> String {
    let q = &c.queue;
    let messages_from = if q.explicit_messages {
        "given with --max-queued-messages".to_string()
    } else {
        format!(
            "offline window {} s x expected rate {} messages/s",
            q.offline_window_s, q.expected_rate
        )
    };
    let bytes_from = if q.explicit_bytes {
        "given with --max-queued-bytes".to_string()
    } else {
        format!(
            "{} messages x {} bytes on average",
            q.max_queued_messages, q.average_message_bytes
        )
    };
    let mut out = format!(
        "# Generated by `ember-fleet pki mosquitto-conf` (see docs/security.md and docs/operations.md,\n\
         # \"Broker configuration (Mosquitto)\"). Mosquitto 2.0.\n\
         per_listener_settings true\n\
         \n\
         # Persistence: sessions, subscriptions, queued and retained messages are saved to\n\
         # {data}/mosquitto.db (written to a new file, fsynced, renamed) every autosave_interval\n\
         # seconds and at a clean stop (SIGTERM), and reloaded at start. A crash (SIGKILL, power\n\
         # loss) loses what changed since the last save; Mosquitto 2.0.11 does not restore shared\n\
         # subscriptions ($share/...) at all. Agents that keep records until the fleet's commit\n\
         # watermark arrives re-send such losses.\n\
         # autosave_interval {autosave}: at most that many seconds of broker state at risk in a crash.\n\
         # Each save rewrites the whole database (up to max_queued_bytes per offline session), so\n\
         # much shorter intervals cost disk writes while the fleet is away.\n\
         persistence true\n\
         persistence_location {data}\n\
         autosave_interval {autosave}\n\
         \n\
         # Queues of offline persistent sessions (the fleet service while it is away), per client:\n\
         # max_queued_messages {messages} = {messages_from};\n\
         # max_queued_bytes {bytes} = {bytes_from}.\n\
         # Mosquitto holds queued messages in memory: budget max_queued_bytes of RAM for every\n\
         # offline fleet session (one per replica). Beyond either limit it drops QoS 1 messages\n\
         # for that client (agents with end-to-end acknowledgement re-send them).\n\
         max_queued_messages {messages}\n\
         max_queued_bytes {bytes}\n\
         \n\
         # Sessions of clients that never come back: a fleet replica asks for its session's\n\
         # lifetime itself (MQTT 5 Session Expiry Interval, mqtt.session_expiry_s); this bounds\n\
         # the persistent sessions that do not (MQTT 3.1.1 clients, and MQTT 5 clients asking\n\
         # for a session that never expires): {expiry} = the offline window ({window} s), rounded\n\
         # up to hours. A removed session stops taking a share of $share/... subscriptions.\n\
         persistent_client_expiration {expiry}\n\
         \n\
         # Largest packet a client may send: the agents' mqtt.message_max_bytes ({agent}) + {room}\n\
         # bytes for the header, topic and properties (an agent never sends more than\n\
         # message_max_bytes + 1024). A larger packet closes the sender's connection without a\n\
         # PUBACK, so nothing is acknowledged and then dropped (message_size_limit would\n\
         # acknowledge and drop it).\n\
         max_packet_size {packet}\n\
         \n\
         # Mutual TLS: a certificate from this CA is required.\n\
         listener {port} {bind}\n\
         cafile {ca}\n\
         certfile {cert}\n\
         keyfile {key}\n\
         require_certificate true\n\
         tls_version tlsv1.2\n\
         allow_anonymous false\n\
         acl_file {acl}\n\
         # One device, one client id (deploy/mosquitto/ember_identity.c): the certificate's common\n\
         # name becomes the user name (the ACL's %u); a device must connect with its device id as\n\
         # client id, the fleet identity with a client id starting with the prefix below; anything\n\
         # else is refused at CONNECT. use_identity_as_username must stay unset: with it Mosquitto\n\
         # never calls the plugin.\n\
         plugin {plugin}\n\
         plugin_opt_fleet_identity {fleet}\n\
         plugin_opt_fleet_client_id_prefix {prefix}\n",
        data = c.data.display(),
        autosave = c.autosave_interval_s,
        messages = q.max_queued_messages,
        bytes = q.max_queued_bytes,
        window = q.offline_window_s,
        expiry = persistent_client_expiration(q.offline_window_s),
        agent = c.agent_message_max_bytes,
        room = c.max_packet_size.saturating_sub(c.agent_message_max_bytes),
        packet = c.max_packet_size,
        port = c.port,
        bind = c.bind,
        ca = c.dir.join("ca.pem").display(),
        cert = c.dir.join("server.pem").display(),
        key = c.dir.join("server.key").display(),
        acl = c.acl.display(),
        plugin = c.identity_plugin.display(),
        fleet = c.fleet_cn,
        prefix = c.fleet_client_id_prefix,
    );
    if let Some(dev) = c.insecure_dev_port {
        out.push_str(&format!(
            "\n# INSECURE, development only: plaintext, anonymous, no ACL, no client-id rule,\n\
             # loopback only.\n\
             listener {dev} 127.0.0.1\n\
             allow_anonymous true\n"
        ));
    }
    out
}

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn validity(params: &mut CertificateParams, days: i64) -> anyhow::Result<()> {
    if !(1..=36_500).contains(&days) {
        bail!("--days {days} is out of range: use 1-36500");
    }
    let at = |s: i64| time::OffsetDateTime::from_unix_timestamp(s).context("time out of range");
    // An hour of slack for devices whose clock runs a little behind.
    params.not_before = at(now_s() - 3600)?;
    params.not_after = at(now_s() + days * 86_400)?;
    Ok(())
}

fn random_serial() -> anyhow::Result<SerialNumber> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    b[0] &= 0x7f; // positive
    Ok(SerialNumber::from_slice(&b))
}

/// Creates the CA in `dir` (refuses to replace one).
pub fn init_ca(dir: &Path, cn: &str, days: i64) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(random_serial()?);
    validity(&mut params, days)?;
    let cert = params.self_signed(&key)?;
    write_key(&dir.join("ca.key"), &key.serialize_pem(), false)?;
    write_cert(&dir.join("ca.pem"), &cert.pem())?;
    Ok(())
}

/// A CA loaded from a PKI directory.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    pub fn load(dir: &Path) -> anyhow::Result<Ca> {
        let cert = fs::read_to_string(dir.join("ca.pem")).with_context(|| {
            format!(
                "cannot read {}/ca.pem (run `ember-fleet pki init-ca --dir {}` first)",
                dir.display(),
                dir.display()
            )
        })?;
        let key_path = dir.join("ca.key");
        let key = fs::read_to_string(&key_path)
            .with_context(|| format!("cannot read {}", key_path.display()))?;
        let key = KeyPair::from_pem(&key)
            .map_err(|_| anyhow::anyhow!("{} holds no usable key", key_path.display()))?;
        let issuer = Issuer::from_ca_cert_pem(&cert, key)
            .map_err(|e| anyhow::anyhow!("{}/ca.pem is not usable: {e}", dir.display()))?;
        Ok(Ca { issuer })
    }

    /// A broker certificate: (certificate PEM, key PEM).
    pub fn issue_server(&self, names: &[String], days: i64) -> anyhow::Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let cn = names.first().map(String::as_str).unwrap_or("localhost");
        params.distinguished_name.push(DnType::CommonName, cn);
        let mut sans = vec![
            SanType::DnsName("localhost".try_into()?),
            SanType::IpAddress([127, 0, 0, 1].into()),
            SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()),
        ];
        for n in names {
            sans.push(match n.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    n.as_str()
                        .try_into()
                        .map_err(|_| anyhow::anyhow!("--name {n:?} is not a DNS name"))?,
                ),
            });
        }
        params.subject_alt_names = sans;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.serial_number = Some(random_serial()?);
        validity(&mut params, days)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A client certificate for `cn` over `key`'s public key.
    pub fn issue_client(
        &self,
        cn: &str,
        key: &impl rcgen::PublicKeyData,
        days: i64,
    ) -> anyhow::Result<String> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = Some(random_serial()?);
        validity(&mut params, days)?;
        Ok(params.signed_by(key, &self.issuer)?.pem())
    }

    /// Signs a device's CSR: (device id, certificate PEM).
    pub fn sign_csr(&self, csr_pem: &str, days: i64) -> anyhow::Result<(String, String)> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| anyhow::anyhow!("not a valid certificate signing request: {e}"))?;
        let cn = match csr.params.distinguished_name.get(&DnType::CommonName) {
            Some(DnValue::Utf8String(s)) => s.clone(),
            Some(DnValue::PrintableString(s)) => s.as_str().to_string(),
            Some(_) => bail!("the request's common name is not a UTF-8 or printable string"),
            None => bail!("the request has no common name: it must be the device id"),
        };
        check_device_id(&cn)?;
        let cert = self.issue_client(&cn, &csr.public_key, days)?;
        Ok((cn, cert))
    }
}

/// Writes a certificate or config (mode 0644) through a temp file and a rename.
fn write_cert(path: &Path, text: &str) -> anyhow::Result<()> {
    write_atomic(path, text, 0o644, true)
}

/// Writes a private key (mode 0600); `replace` allows replacing an existing key.
fn write_key(path: &Path, text: &str, replace: bool) -> anyhow::Result<()> {
    write_atomic(path, text, KEY_MODE, replace)
}

/// Through `ember_host::fs::Durable`: the mode is set when the file is created, and without
/// `replace` an existing file is never overwritten (the final step fails instead).
fn write_atomic(path: &Path, text: &str, mode: u32, replace: bool) -> anyhow::Result<()> {
    let durable = ember_host::fs::Durable::new().mode(mode);
    let durable = if replace {
        durable
    } else {
        durable.create_new()
    };
    match durable.write(path, text.as_bytes()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => bail!(
            "{} exists and is never overwritten: move it away first",
            path.display()
        ),
        Err(e) => Err(e).with_context(|| format!("cannot write {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn pki_commands_write_keys_0600_and_check_names() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().to_path_buf();
        run(PkiCommand::InitCa {
            dir: dir.clone(),
            cn: "t".into(),
            days: 10,
        })
        .unwrap();
        assert_eq!(mode(&dir.join("ca.key")), 0o600);
        assert!(init_ca(&dir, "t", 10).is_err(), "a CA is never replaced");
        run(PkiCommand::ServerCert {
            dir: dir.clone(),
            names: vec!["broker.example".into(), "10.0.0.5".into()],
            days: 10,
        })
        .unwrap();
        assert_eq!(mode(&dir.join("server.key")), 0o600);
        assert!(
            run(PkiCommand::ClientCert {
                dir: dir.clone(),
                cn: "dev-1".into(),
                days: 10
            })
            .is_err(),
            "the fleet identity must not be a device id"
        );
        run(PkiCommand::ClientCert {
            dir: dir.clone(),
            cn: FLEET_IDENTITY.into(),
            days: 10,
        })
        .unwrap();
        assert_eq!(mode(&dir.join("fleet.key")), 0o600);
        let dev = |id: &str, rotate| PkiCommand::DeviceCert {
            dir: dir.clone(),
            device_id: id.into(),
            days: 10,
            rotate,
        };
        run(dev("dev-1", false)).unwrap();
        assert_eq!(mode(&dir.join("devices/dev-1.key")), 0o600);
        let first = fs::read_to_string(dir.join("devices/dev-1.pem")).unwrap();
        assert!(run(dev("dev-1", false)).is_err(), "no silent re-issue");
        run(dev("dev-1", true)).unwrap();
        assert_ne!(
            fs::read_to_string(dir.join("devices/dev-1.pem")).unwrap(),
            first
        );
        assert!(run(dev("a/b", false)).is_err());
        assert!(run(dev("ember:fleet", false)).is_err());
    }

    #[test]
    fn sign_csr_takes_only_key_and_device_id() {
        let d = tempfile::tempdir().unwrap();
        init_ca(d.path(), "t", 10).unwrap();
        let ca = Ca::load(d.path()).unwrap();
        let csr_for = |cn: &str, ca_flag: bool| {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
            p.distinguished_name.push(DnType::CommonName, cn);
            if ca_flag {
                p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            }
            p.serialize_request(&key).unwrap().pem().unwrap()
        };
        let (id, cert) = ca.sign_csr(&csr_for("dev-7", false), 30).unwrap();
        assert_eq!(id, "dev-7");
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
        for bad in ["ember:fleet", "a+b", "x/#"] {
            assert!(ca.sign_csr(&csr_for(bad, false), 30).is_err(), "{bad}");
        }
        // A request asking to be a CA gets an ordinary device certificate (or is refused).
        if let Ok((_, cert)) = ca.sign_csr(&csr_for("dev-8", true), 30) {
            use rustls::pki_types::pem::PemObject;
            let der = rustls::pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
            let der = der.as_ref();
            // No basicConstraints extension (OID 2.5.29.19) at all, and no requested name.
            let basic_constraints = [0x06, 0x03, 0x55, 0x1d, 0x13];
            assert!(!der.windows(5).any(|w| w == basic_constraints));
            assert!(!der.windows(12).any(|w| w == b"evil.example"));
        }
        assert!(ca.sign_csr("not a csr", 30).is_err());
    }

    fn conf_with(queue: QueueLimits, dev: Option<u16>) -> String {
        mosquitto_conf(&BrokerConf {
            dir: Path::new("/p"),
            bind: "0.0.0.0",
            port: 8883,
            acl: Path::new("/p/acl"),
            data: Path::new("/p/data"),
            fleet_cn: FLEET_IDENTITY,
            fleet_client_id_prefix: DEFAULT_FLEET_CLIENT_ID_PREFIX,
            identity_plugin: Path::new("/p/ember_identity.so"),
            queue,
            agent_message_max_bytes: AGENT_DEFAULT_MESSAGE_MAX_BYTES,
            max_packet_size: max_packet_size(AGENT_DEFAULT_MESSAGE_MAX_BYTES).unwrap(),
            autosave_interval_s: DEFAULT_AUTOSAVE_INTERVAL_S,
            insecure_dev_port: dev,
        })
    }

    fn default_queue() -> QueueLimits {
        QueueLimits::resolve(
            DEFAULT_OFFLINE_WINDOW_S,
            DEFAULT_EXPECTED_RATE,
            DEFAULT_AVERAGE_MESSAGE_BYTES,
            None,
            None,
        )
        .unwrap()
    }

    /// The whole default file: what an operator gets and reads.
    #[test]
    fn mosquitto_conf_default_snapshot() {
        insta::assert_snapshot!(conf_with(default_queue(), None));
    }

    #[test]
    fn mosquitto_conf_requires_certificates_and_binds_client_ids() {
        let conf = conf_with(default_queue(), None);
        assert!(conf.contains("listener 8883 0.0.0.0\n"));
        assert!(conf.contains("require_certificate true\n"));
        assert!(conf.contains("allow_anonymous false\nacl_file /p/acl\n"));
        assert!(!conf.contains("allow_anonymous true"));
        // With use_identity_as_username, Mosquitto 2.0.11 would never call the plugin.
        assert!(!conf.contains("\nuse_identity_as_username"));
        assert!(!conf.contains("\nuse_subject_as_username"));
        assert!(conf.contains(
            "plugin /p/ember_identity.so\n\
             plugin_opt_fleet_identity ember:fleet\n\
             plugin_opt_fleet_client_id_prefix ember-fleet\n"
        ));
        // The plugin belongs to the TLS listener (per_listener_settings true): it comes after it.
        assert!(conf.find("listener 8883").unwrap() < conf.find("plugin /p/").unwrap());
        let dev = conf_with(default_queue(), Some(1883));
        assert!(dev.contains("listener 1883 127.0.0.1\nallow_anonymous true\n"));
        assert!(dev.find("plugin /p/").unwrap() < dev.find("listener 1883").unwrap());
    }

    #[test]
    fn mosquitto_conf_persists_and_explains_its_numbers() {
        let conf = conf_with(default_queue(), None);
        assert!(
            conf.contains("persistence true\npersistence_location /p/data\nautosave_interval 60\n")
        );
        assert!(!conf.contains("persistence false"));
        // 3600 s x 20 messages/s, x 4096 bytes.
        assert!(conf.contains("max_queued_messages 72000\nmax_queued_bytes 294912000\n"));
        assert!(conf.contains("\npersistent_client_expiration 1h\n"));
        assert_eq!(persistent_client_expiration(60), "1h");
        assert_eq!(persistent_client_expiration(3601), "2h");
        assert_eq!(persistent_client_expiration(30 * 86_400), "720h");
        assert!(conf.contains(
            "max_queued_messages 72000 = offline window 3600 s x expected rate 20 messages/s;"
        ));
        assert!(
            conf.contains("max_queued_bytes 294912000 = 72000 messages x 4096 bytes on average.")
        );
        // Every packet an agent with the default message_max_bytes sends fits.
        assert!(conf.contains("max_packet_size 135168\n"));
        const { assert!(135_168 >= AGENT_DEFAULT_MESSAGE_MAX_BYTES + 1024) };
        assert!(!conf.contains("\nmessage_size_limit"));

        let explicit = QueueLimits::resolve(3600, 20, 4096, Some(1000), Some(5_000_000)).unwrap();
        let conf = conf_with(explicit, None);
        assert!(conf.contains("max_queued_messages 1000\nmax_queued_bytes 5000000\n"));
        assert!(conf.contains("max_queued_messages 1000 = given with --max-queued-messages;"));
        assert!(conf.contains("max_queued_bytes 5000000 = given with --max-queued-bytes."));
        // Only the messages given: the bytes follow from them.
        let half = QueueLimits::resolve(3600, 20, 4096, Some(1000), None).unwrap();
        assert_eq!(half.max_queued_bytes, 1000 * 4096);
    }

    #[test]
    fn queue_limits_refuse_what_mosquitto_cannot_hold() {
        let err = |r: anyhow::Result<QueueLimits>| r.unwrap_err().to_string();
        assert!(err(QueueLimits::resolve(10, 50, 2048, None, None)).contains("--offline-window-s"));
        assert!(err(QueueLimits::resolve(3600, 0, 2048, None, None)).contains("--expected-rate"));
        assert!(
            err(QueueLimits::resolve(3600, 50, 1, None, None)).contains("--average-message-bytes")
        );
        // A day at 1000 messages/s of 4 KiB: far above Mosquitto's int.
        let e = err(QueueLimits::resolve(86_400, 1000, 4096, None, None));
        assert!(
            e.contains("max_queued_bytes") && e.contains("2147483647"),
            "{e}"
        );
        let e = err(QueueLimits::resolve(
            3600,
            50,
            2048,
            Some(3_000_000_000),
            None,
        ));
        assert!(e.contains("max_queued_messages"), "{e}");
        // 0 is "no limit" to Mosquitto, never written.
        assert!(err(QueueLimits::resolve(3600, 50, 2048, Some(0), None)).contains("no limit"));
        assert!(max_packet_size(100).is_err());
        assert_eq!(max_packet_size(1024).unwrap(), 1024 + PACKET_HEADROOM_BYTES);
        assert_eq!(max_packet_size(256 * 1024 * 1024).unwrap(), 268_435_460);
        assert!(check_client_id_prefix("ember-fleet").is_ok());
        for bad in ["", "a b", "x/y", "#"] {
            assert!(check_client_id_prefix(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn mosquitto_conf_command_needs_the_plugin_and_creates_a_private_data_dir() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().to_path_buf();
        let cmd = |plugin: Option<PathBuf>| PkiCommand::MosquittoConf {
            dir: dir.clone(),
            port: 8883,
            bind: "127.0.0.1".into(),
            fleet_cn: FLEET_IDENTITY.into(),
            fleet_client_id_prefix: DEFAULT_FLEET_CLIENT_ID_PREFIX.into(),
            identity_plugin: plugin,
            offline_window_s: DEFAULT_OFFLINE_WINDOW_S,
            expected_rate: DEFAULT_EXPECTED_RATE,
            average_message_bytes: DEFAULT_AVERAGE_MESSAGE_BYTES,
            max_queued_messages: None,
            max_queued_bytes: None,
            agent_message_max_bytes: AGENT_DEFAULT_MESSAGE_MAX_BYTES,
            autosave_interval_s: DEFAULT_AUTOSAVE_INTERVAL_S,
            insecure_dev_port: None,
        };
        let e = run(cmd(None)).unwrap_err().to_string();
        assert!(
            e.contains("ember_identity.so does not exist")
                && e.contains("scripts/build-identity-plugin.sh"),
            "{e}"
        );
        assert!(
            !dir.join("mosquitto.conf").exists(),
            "nothing written on error"
        );
        fs::write(dir.join(IDENTITY_PLUGIN_FILE), b"").unwrap();
        let out = run(cmd(None)).unwrap();
        let conf = fs::read_to_string(out.trim()).unwrap();
        let dir = fs::canonicalize(&dir).unwrap();
        assert!(conf.contains(&format!("persistence_location {}/data\n", dir.display())));
        assert!(conf.contains(&format!("plugin {}/ember_identity.so\n", dir.display())));
        let mode = fs::metadata(dir.join("data")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }
}
