//! The Event Hubs source: reads Azure IoT Hub's built-in Event Hubs-compatible endpoint over
//! AMQP 1.0, as an [`IngestSource`].
//!
//! ```text
//! device ─MQTT─▶ IoT Hub ─route─▶ built-in endpoint (N partitions, consumer group)
//!   devices/{id}/messages/events/      │ AMQP 1.0: one receiver link per leased partition,
//!   ember-channel=telemetry&...        │ filter x-opt-sequence-number > checkpoint
//!                                      ▼
//!                    partition reader ─▶ Intake ─▶ writer (1 tx: rows + checkpoint)
//! ```
//!
//! What an event carries (IoT Hub sets the annotations; the device sets only the properties):
//! * message annotation `iothub-connection-device-id`: the device IoT Hub authenticated. It is
//!   the **only** source of the device id; a payload that names another device is refused by
//!   classification, as for MQTT.
//! * message annotations `x-opt-sequence-number` (the checkpoint) and `x-opt-offset` (logged).
//! * message annotation `iothub-message-source`: `Telemetry`, or `deviceConnectionStateEvents`
//!   (application property `opType` = `deviceConnected` / `deviceDisconnected`), which becomes
//!   presence: an `offline`/`online` status with `ts = 0`, applied to the online flag only.
//!   Other sources (twin change, lifecycle events) are skipped.
//! * application property [`PROP_CHANNEL`] (`ember-channel`): `telemetry`, `inference`,
//!   `status` or `heartbeat`, which the agent's `azure-iot-hub` profile puts in the topic's
//!   property bag (`devices/{id}/messages/events/ember-channel=telemetry&ember-stream=imu`).
//!   [`PROP_STREAM`] and [`PROP_ENCODING`] are informational (the payload names its stream and
//!   classification detects JSON or CBOR).
//! * body: one or more data sections, the bytes the agent published.
//!
//! Guarantees (as for Kinesis, [`super::kinesis`]):
//! * Partitions are leased in `ingest_leases` (source `eventhubs:<host>/<hub>/<consumer group>`,
//!   see [`Leases`]): each replica takes at most its fair share, renews every third of
//!   `lease_s`; a partition whose lease expired (a replica killed) is taken over by another
//!   replica, which resumes after the partition's stored checkpoint.
//! * An event's sequence number is stored in the transaction that stores the event
//!   ([`super::source::save_checkpoints`]); a reader opens its receiver with the filter
//!   `amqp.annotation.x-opt-sequence-number > '<checkpoint>'` (from the start of the retention,
//!   `x-opt-offset > '-1'`, without one) and also drops anything at or below the last sequence
//!   number it handed over, so a crash re-reads from the last committed event: nothing lost,
//!   and the repeats are dropped by the idempotent inserts.
//! * Events the source does not store (skipped sources) move the checkpoint with the next
//!   stored event of their partition; after a crash they are read again and skipped again.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ember_host::sas::SasKey;
use ember_proto::{Channel, DeviceState, Encoding, Status};
use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::definitions::{ReceiverSettleMode, SenderSettleMode};
use fe2o3_amqp::types::messaging::annotations::OwnedKey;
use fe2o3_amqp::types::messaging::{Body, Message, Source};
use fe2o3_amqp::types::primitives::{SimpleValue, Value};
use fe2o3_amqp::{Connection, Receiver, Session};
use serde_amqp::described::Described;
use serde_amqp::descriptor::Descriptor;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::IngestState;
use super::source::{
    Acknowledge, BoxFuture, Checkpoint, IngestSource, Intake, Leases, NoAcks, Settle, SourceMessage,
};
use crate::config::{Backend, EventHubsAuth, EventHubsSettings};
use crate::db::{Db, now_us};
use crate::metrics::Metrics;

/// The application property naming the Ember channel (set by the agent's property bag).
pub const PROP_CHANNEL: &str = "ember-channel";
/// The application property naming the stream (informational).
pub const PROP_STREAM: &str = "ember-stream";
/// The application property naming the payload's encoding, `json` or `cbor` (informational).
pub const PROP_ENCODING: &str = "ember-encoding";
/// IoT Hub's annotation with the authenticated device id.
pub const ANN_DEVICE: &str = "iothub-connection-device-id";
/// IoT Hub's annotation naming what produced the event.
pub const ANN_SOURCE: &str = "iothub-message-source";
const ANN_SEQUENCE: &str = "x-opt-sequence-number";
const ANN_OFFSET: &str = "x-opt-offset";
const SOURCE_CONNECTION_STATE: &str = "deviceConnectionStateEvents";
const SOURCE_TELEMETRY: &str = "Telemetry";
/// The selector filter Event Hubs applies to a receiver's start position.
const SELECTOR_FILTER: &str = "apache.org:selector-filter:string";
/// The AMQP port of Event Hubs (TLS).
const AMQPS_PORT: u16 = 5671;
const AMQP_PORT: u16 = 5672;
/// How long a CBS token lives; a receiver reconnects before (see [`TOKEN_RENEW`]).
const TOKEN_TTL_S: u64 = 3600;
/// A receiver with a CBS token older than this is reopened after the checkpoint.
const TOKEN_RENEW: Duration = Duration::from_secs(TOKEN_TTL_S * 3 / 4);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Why the Event Hubs transport failed; a partition reader logs it and reopens.
#[derive(Debug, thiserror::Error)]
pub enum EventHubsError {
    #[error(
        "cannot read the Event Hubs connection string {path}: {detail} (set ingest.eventhubs.connection_string_file to the file of the Secret ember-iothub)"
    )]
    ConnectionStringFile { path: String, detail: String },
    #[error(
        "the Event Hubs connection string lacks {0} (expected Endpoint=sb://…/;SharedAccessKeyName=…;SharedAccessKey=…;EntityPath=…: IoT Hub's built-in endpoint's \"Event Hub-compatible endpoint\")"
    )]
    ConnectionString(&'static str),
    #[error("the shared access key: {0}")]
    Key(#[from] ember_host::sas::SasError),
    #[error("cannot connect to {endpoint}: {detail}")]
    Connect { endpoint: String, detail: String },
    #[error(
        "the CBS put-token for {audience} was refused: {detail} (check the policy's key and its ServiceConnect right)"
    )]
    Cbs { audience: String, detail: String },
    #[error("cannot open a receiver on {address}: {detail}")]
    Attach { address: String, detail: String },
    #[error("the receiver of partition {partition} failed: {detail}")]
    Receive { partition: String, detail: String },
}

/// One event read from a partition, as the transport delivered it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Event {
    /// `x-opt-sequence-number`: the checkpoint.
    pub sequence: i64,
    /// `x-opt-offset`, for logs.
    pub offset: Option<String>,
    /// Annotation [`ANN_DEVICE`].
    pub device: Option<String>,
    /// Annotation [`ANN_SOURCE`].
    pub message_source: Option<String>,
    /// Application properties with string values.
    pub properties: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

/// **API boundary: the Event Hubs transport.** Opens a receiver on one partition, starting
/// after a sequence number (or at the start of the retention). [`AmqpHub`] is the real one.
pub trait EventHub: Send + Sync + 'static {
    fn open<'a>(
        &'a self,
        partition: &'a str,
        after: Option<i64>,
    ) -> BoxFuture<'a, Result<Box<dyn PartitionReceiver>, EventHubsError>>;
    /// For logs and the lease table's source name.
    fn describe(&self) -> String;
}

/// A receiver of one partition's events, in partition order.
pub trait PartitionReceiver: Send {
    /// The next event; waits for one.
    fn recv(&mut self) -> BoxFuture<'_, Result<Event, EventHubsError>>;
    /// Detaches and closes, best effort.
    fn close(self: Box<Self>) -> BoxFuture<'static, ()>;
}

/// How the AMQP connection authenticates.
#[derive(Clone)]
pub enum AmqpAuth {
    /// SASL ANONYMOUS, then a SAS token for the entity put on the `$cbs` node (Azure's SDKs).
    Cbs { key_name: String, key: SasKey },
    /// SASL PLAIN (Event Hubs: the policy name and key; a plain AMQP broker: its user).
    Plain { username: String, password: String },
}

/// The parts of an Event Hubs-compatible connection string.
#[derive(Clone)]
pub struct EventHubsConnection {
    /// `Endpoint`'s host, e.g. `ihsuprodamres001dednamespace.servicebus.windows.net`.
    pub host: String,
    pub key_name: String,
    /// The key as the string shows it (base64).
    pub key: String,
    /// `EntityPath`: the Event Hub-compatible name.
    pub entity: String,
}

impl EventHubsConnection {
    /// Parses `Endpoint=sb://host/;SharedAccessKeyName=…;SharedAccessKey=…;EntityPath=…`.
    pub fn parse(s: &str) -> Result<EventHubsConnection, EventHubsError> {
        let mut fields = HashMap::new();
        for part in s.trim().split(';').filter(|p| !p.is_empty()) {
            if let Some((k, v)) = part.split_once('=') {
                fields.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let endpoint = fields
            .get("endpoint")
            .ok_or(EventHubsError::ConnectionString("Endpoint"))?;
        let host = endpoint
            .split_once("://")
            .map(|(_, rest)| rest)
            .unwrap_or(endpoint)
            .trim_end_matches('/')
            .to_string();
        let get = |k: &str, name: &'static str| {
            fields
                .get(k)
                .filter(|v| !v.is_empty())
                .cloned()
                .ok_or(EventHubsError::ConnectionString(name))
        };
        if host.is_empty() {
            return Err(EventHubsError::ConnectionString("Endpoint"));
        }
        Ok(EventHubsConnection {
            host,
            key_name: get("sharedaccesskeyname", "SharedAccessKeyName")?,
            key: get("sharedaccesskey", "SharedAccessKey")?,
            entity: get("entitypath", "EntityPath")?,
        })
    }

    pub fn from_file(path: &Path) -> Result<EventHubsConnection, EventHubsError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| EventHubsError::ConnectionStringFile {
                path: path.display().to_string(),
                detail: e.to_string(),
            })?;
        EventHubsConnection::parse(&text)
    }
}

/// The Event Hubs transport over AMQP 1.0 (fe2o3-amqp): one connection, session and receiver
/// link per partition reader.
pub struct AmqpHub {
    /// Where to connect.
    pub host: String,
    pub port: u16,
    /// TLS (rustls, ring, Mozilla's roots) on the TCP stream, without AMQP's TLS header, as
    /// Event Hubs expects on 5671.
    pub tls: bool,
    /// The TLS server name and the host of the CBS audience.
    pub namespace_host: String,
    pub entity: String,
    pub consumer_group: String,
    pub auth: AmqpAuth,
    /// Link credit.
    pub prefetch: u32,
    /// This replica's container id (its `mqtt.client_id`).
    pub container_id: String,
    /// The node address of a partition: `{entity}`, `{consumer_group}` and `{partition}` are
    /// replaced. Event Hubs': [`AmqpHub::EVENT_HUBS_ADDRESS`]; other brokers name queues their
    /// own way (the transport test's RabbitMQ).
    pub address: String,
}

impl AmqpHub {
    pub const EVENT_HUBS_ADDRESS: &'static str =
        "{entity}/ConsumerGroups/{consumer_group}/Partitions/{partition}";

    /// The transport for the configured endpoint.
    pub fn from_settings(
        s: &EventHubsSettings,
        container_id: &str,
    ) -> Result<AmqpHub, EventHubsError> {
        let c = EventHubsConnection::from_file(&s.connection_string_file)?;
        let (tls, host, port) = match &s.endpoint {
            Some(ep) => parse_endpoint(ep)?,
            None => (true, c.host.clone(), AMQPS_PORT),
        };
        let auth = match s.auth {
            EventHubsAuth::Cbs => AmqpAuth::Cbs {
                key_name: c.key_name.clone(),
                key: SasKey::from_base64(&c.key)?,
            },
            EventHubsAuth::Plain => AmqpAuth::Plain {
                username: c.key_name.clone(),
                password: c.key.clone(),
            },
        };
        Ok(AmqpHub {
            host,
            port,
            tls,
            namespace_host: c.host,
            entity: c.entity,
            consumer_group: s.consumer_group.clone(),
            auth,
            prefetch: s.prefetch,
            container_id: container_id.to_string(),
            address: AmqpHub::EVENT_HUBS_ADDRESS.to_string(),
        })
    }

    /// The node address of `partition`.
    pub fn address_of(&self, partition: &str) -> String {
        self.address
            .replace("{entity}", &self.entity)
            .replace("{consumer_group}", &self.consumer_group)
            .replace("{partition}", partition)
    }

    /// The CBS audience of the entity: `sb://<namespace>/<entity>`.
    pub fn audience(&self) -> String {
        format!("sb://{}/{}", self.namespace_host, self.entity)
    }

    async fn connect(
        &self,
    ) -> Result<fe2o3_amqp::connection::ConnectionHandle<()>, EventHubsError> {
        let endpoint = format!("{}:{}", self.host, self.port);
        let err = |detail: String| EventHubsError::Connect {
            endpoint: endpoint.clone(),
            detail,
        };
        let tcp = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| err("timed out".into()))?
        .map_err(|e| err(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let profile = match &self.auth {
            AmqpAuth::Cbs { .. } => SaslProfile::Anonymous,
            AmqpAuth::Plain { username, password } => SaslProfile::Plain {
                username: username.clone(),
                password: password.clone(),
            },
        };
        let builder = Connection::builder()
            .container_id(self.container_id.clone())
            .hostname(self.namespace_host.as_str())
            .scheme("amqp")
            .sasl_profile(profile);
        let open = async {
            if self.tls {
                let mut roots = rustls::RootCertStore::empty();
                roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
                let config =
                    rustls::ClientConfig::builder_with_provider(ember_host::tls::provider())
                        .with_safe_default_protocol_versions()
                        .map_err(|e| err(e.to_string()))?
                        .with_root_certificates(roots)
                        .with_no_client_auth();
                let name = rustls::pki_types::ServerName::try_from(self.namespace_host.clone())
                    .map_err(|e| err(format!("not a TLS server name: {e}")))?;
                let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                    .connect(name, tcp)
                    .await
                    .map_err(|e| err(format!("TLS: {e}")))?;
                builder
                    .open_with_stream(tls)
                    .await
                    .map_err(|e| err(e.to_string()))
            } else {
                builder
                    .open_with_stream(tcp)
                    .await
                    .map_err(|e| err(e.to_string()))
            }
        };
        tokio::time::timeout(CONNECT_TIMEOUT, open)
            .await
            .map_err(|_| err("the AMQP open timed out".into()))?
    }

    async fn put_token(&self, session: &mut SessionHandle<()>) -> Result<(), EventHubsError> {
        let AmqpAuth::Cbs { key_name, key } = &self.auth else {
            return Ok(());
        };
        let audience = self.audience();
        let cbs_err = |detail: String| EventHubsError::Cbs {
            audience: audience.clone(),
            detail,
        };
        let expiry = now_unix_s() + TOKEN_TTL_S;
        let token = key.token(&audience, expiry, Some(key_name))?;
        let mut cbs = fe2o3_amqp_cbs::client::CbsClient::attach(session)
            .await
            .map_err(|e| cbs_err(format!("cannot attach to $cbs: {e}")))?;
        let expires_ms = i64::try_from(expiry)
            .unwrap_or(i64::MAX / 1000)
            .saturating_mul(1000);
        let cbs_token = fe2o3_amqp_cbs::token::CbsToken::new(
            token,
            "servicebus.windows.net:sastoken",
            Some(fe2o3_amqp::types::primitives::Timestamp::from_milliseconds(
                expires_ms,
            )),
        );
        let r = cbs.put_token(audience.clone(), cbs_token).await;
        let _ = cbs.close().await;
        r.map_err(|e| cbs_err(e.to_string()))
    }
}

fn now_unix_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `amqps://host[:port]` or `amqp://host[:port]` → (tls, host, port).
fn parse_endpoint(ep: &str) -> Result<(bool, String, u16), EventHubsError> {
    let bad = |detail: &str| EventHubsError::Connect {
        endpoint: ep.to_string(),
        detail: detail.to_string(),
    };
    let (tls, rest) = if let Some(r) = ep.strip_prefix("amqps://") {
        (true, r)
    } else if let Some(r) = ep.strip_prefix("amqp://") {
        (false, r)
    } else {
        return Err(bad("not an amqp(s):// URL"));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (
            h.to_string(),
            p.parse::<u16>()
                .map_err(|_| bad("the port is not a number"))?,
        ),
        None => (rest.to_string(), if tls { AMQPS_PORT } else { AMQP_PORT }),
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    Ok((tls, host, port))
}

/// The Event Hubs filter that starts a receiver after `after` (or at the start).
pub fn start_filter(after: Option<i64>) -> String {
    match after {
        Some(seq) => format!("amqp.annotation.{ANN_SEQUENCE} > '{seq}'"),
        None => format!("amqp.annotation.{ANN_OFFSET} > '-1'"),
    }
}

struct AmqpReceiver {
    partition: String,
    connection: fe2o3_amqp::connection::ConnectionHandle<()>,
    session: SessionHandle<()>,
    receiver: Receiver,
}

impl EventHub for AmqpHub {
    fn open<'a>(
        &'a self,
        partition: &'a str,
        after: Option<i64>,
    ) -> BoxFuture<'a, Result<Box<dyn PartitionReceiver>, EventHubsError>> {
        Box::pin(async move {
            let mut connection = self.connect().await?;
            let address = self.address_of(partition);
            let attach_err = |detail: String| EventHubsError::Attach {
                address: address.clone(),
                detail,
            };
            let mut session = Session::begin(&mut connection)
                .await
                .map_err(|e| attach_err(format!("cannot begin a session: {e}")))?;
            self.put_token(&mut session).await?;
            let filter = Described {
                descriptor: Descriptor::Name(SELECTOR_FILTER.into()),
                value: Value::String(start_filter(after)),
            };
            let source = Source::builder()
                .address(address.clone())
                .add_to_filter(SELECTOR_FILTER, filter)
                .build();
            let receiver = Receiver::builder()
                .name(format!("{}-p{partition}", self.container_id))
                .source(source)
                .target(self.container_id.clone())
                .credit_mode(CreditMode::Auto(self.prefetch))
                // Event Hubs sends events presettled (its SDKs ask for it too): the
                // checkpoint, not a disposition, is what makes reading resumable.
                .sender_settle_mode(SenderSettleMode::Settled)
                .receiver_settle_mode(ReceiverSettleMode::First)
                .auto_accept(false)
                .attach(&mut session)
                .await
                .map_err(|e| attach_err(e.to_string()))?;
            Ok(Box::new(AmqpReceiver {
                partition: partition.to_string(),
                connection,
                session,
                receiver,
            }) as Box<dyn PartitionReceiver>)
        })
    }

    fn describe(&self) -> String {
        format!(
            "{}/{}/{}",
            self.namespace_host, self.entity, self.consumer_group
        )
    }
}

impl PartitionReceiver for AmqpReceiver {
    fn recv(&mut self) -> BoxFuture<'_, Result<Event, EventHubsError>> {
        Box::pin(async move {
            let delivery =
                self.receiver
                    .recv::<Body<Value>>()
                    .await
                    .map_err(|e| EventHubsError::Receive {
                        partition: self.partition.clone(),
                        detail: e.to_string(),
                    })?;
            // Presettled (Event Hubs) or not (another broker), the disposition is what renews
            // the link credit (fe2o3-amqp's auto credit): settle each event as it is taken.
            // Resuming rests on the checkpoint, never on the broker's bookkeeping.
            self.receiver
                .accept(&delivery)
                .await
                .map_err(|e| EventHubsError::Receive {
                    partition: self.partition.clone(),
                    detail: format!("cannot settle: {e}"),
                })?;
            event_of(delivery.into_message()).ok_or_else(|| EventHubsError::Receive {
                partition: self.partition.clone(),
                detail: format!("an event without the {ANN_SEQUENCE} annotation"),
            })
        })
    }

    fn close(self: Box<Self>) -> BoxFuture<'static, ()> {
        let mut me = *self;
        Box::pin(async move {
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                let _ = me.receiver.close().await;
                let _ = me.session.end().await;
                let _ = me.connection.close().await;
            })
            .await;
        })
    }
}

fn annotation<'a>(m: &'a Message<Body<Value>>, key: &str) -> Option<&'a Value> {
    m.message_annotations.as_ref().and_then(|a| {
        a.0.iter().find_map(|(k, v)| match k {
            OwnedKey::Symbol(s) if s.as_str() == key => Some(v),
            _ => None,
        })
    })
}

fn value_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Symbol(s) => Some(s.as_str().to_string()),
        Value::Long(n) => Some(n.to_string()),
        Value::Ulong(n) => Some(n.to_string()),
        Value::Int(n) => Some(n.to_string()),
        Value::Uint(n) => Some(n.to_string()),
        _ => None,
    }
}

fn value_i64(v: &Value) -> Option<i64> {
    match v {
        Value::Long(n) => Some(*n),
        Value::Int(n) => Some(i64::from(*n)),
        Value::Uint(n) => Some(i64::from(*n)),
        Value::Ulong(n) => i64::try_from(*n).ok(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// The [`Event`] of an AMQP message; `None` without a sequence number.
pub fn event_of(m: Message<Body<Value>>) -> Option<Event> {
    let sequence = annotation(&m, ANN_SEQUENCE).and_then(value_i64)?;
    let offset = annotation(&m, ANN_OFFSET).and_then(value_string);
    let device = annotation(&m, ANN_DEVICE).and_then(value_string);
    let message_source = annotation(&m, ANN_SOURCE).and_then(value_string);
    let mut properties = BTreeMap::new();
    if let Some(p) = &m.application_properties {
        for (k, v) in p.0.iter() {
            let s = match v {
                SimpleValue::String(s) => s.clone(),
                SimpleValue::Symbol(s) => s.as_str().to_string(),
                SimpleValue::Bool(b) => b.to_string(),
                SimpleValue::Long(n) => n.to_string(),
                SimpleValue::Int(n) => n.to_string(),
                _ => continue,
            };
            properties.insert(k.clone(), s);
        }
    }
    let body = match m.body {
        Body::Data(sections) => sections.into_iter().flat_map(|d| d.0.into_vec()).collect(),
        Body::Value(v) => match v.0 {
            Value::Binary(b) => b.into_vec(),
            Value::String(s) => s.into_bytes(),
            _ => Vec::new(),
        },
        _ => Vec::new(),
    };
    Some(Event {
        sequence,
        offset,
        device,
        message_source,
        properties,
        body,
    })
}

/// What an event means for the writer.
#[derive(Debug, PartialEq)]
pub enum Decoded {
    Message {
        device: String,
        channel: Channel,
        payload: Vec<u8>,
    },
    Presence {
        device: String,
        online: bool,
    },
    /// Stored as a reject so that the checkpoint moves on.
    Malformed {
        device: String,
        detail: String,
    },
    /// Not for Ember (twin change, lifecycle events).
    Skip(&'static str),
}

/// Decodes an event; the device id only ever comes from [`ANN_DEVICE`].
pub fn decode(e: &Event) -> Decoded {
    let Some(device) = e.device.clone().filter(|d| !d.is_empty()) else {
        return match e.message_source.as_deref() {
            Some(SOURCE_TELEMETRY) | None => Decoded::Malformed {
                device: String::new(),
                detail: format!("an event without the {ANN_DEVICE} annotation"),
            },
            Some(_) => Decoded::Skip("an event of another source without a device"),
        };
    };
    match e.message_source.as_deref() {
        Some(SOURCE_CONNECTION_STATE) => match e.properties.get("opType").map(String::as_str) {
            Some("deviceConnected") => Decoded::Presence {
                device,
                online: true,
            },
            Some("deviceDisconnected") => Decoded::Presence {
                device,
                online: false,
            },
            _ => Decoded::Malformed {
                device,
                detail: "a connection-state event without opType".into(),
            },
        },
        Some(SOURCE_TELEMETRY) | None => {
            let Some(channel) = e.properties.get(PROP_CHANNEL) else {
                return Decoded::Malformed {
                    device,
                    detail: format!("an event without the {PROP_CHANNEL} property"),
                };
            };
            match channel.parse::<Channel>() {
                Ok(channel) => Decoded::Message {
                    device,
                    channel,
                    payload: e.body.clone(),
                },
                Err(()) => Decoded::Malformed {
                    device,
                    detail: format!("{PROP_CHANNEL} = {channel:?} is not an Ember channel"),
                },
            }
        }
        Some(_) => Decoded::Skip("an IoT Hub event source Ember does not use"),
    }
}

/// Reads an Event Hub, partitions leased among the replicas.
pub struct EventHubsSource {
    pub hub: Arc<dyn EventHub>,
    pub partitions: Vec<String>,
    pub lease_s: u64,
    pub db: Db,
    pub metrics: Arc<Metrics>,
    /// This replica's stable identity (its `mqtt.client_id`): the leases' owner.
    pub owner: String,
}

impl EventHubsSource {
    /// The lease table's name for a hub.
    pub fn source_name(hub: &dyn EventHub) -> String {
        format!("eventhubs:{}", hub.describe())
    }
}

impl IngestSource for EventHubsSource {
    fn name(&self) -> &'static str {
        "eventhubs"
    }

    fn acknowledger(&self) -> Arc<dyn Acknowledge> {
        Arc::new(NoAcks)
    }

    fn run(
        self: Box<Self>,
        intake: Intake,
        state: Arc<IngestState>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async move { self.read(intake, state, shutdown).await })
    }
}

struct Reader {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl EventHubsSource {
    fn leases(&self) -> Leases {
        Leases {
            db: self.db.clone(),
            source: EventHubsSource::source_name(self.hub.as_ref()),
            owner: self.owner.clone(),
            ttl_us: i64::try_from(self.lease_s).unwrap_or(30) * 1_000_000,
        }
    }

    async fn read(self, intake: Intake, state: Arc<IngestState>, shutdown: CancellationToken) {
        let leases = self.leases();
        let tick = Duration::from_millis(self.lease_s * 1000 / 3);
        let mut readers: HashMap<String, Reader> = HashMap::new();
        let mut backoff = BACKOFF_MIN;
        tracing::info!(hub = %self.hub.describe(), partitions = self.partitions.len(),
            owner = %self.owner, "Reading the Event Hub.");
        loop {
            readers.retain(|_, r| !r.task.is_finished());
            let wait = match self.rebalance(&leases, &intake, &mut readers).await {
                Ok(()) => {
                    state.connected.store(true, Ordering::Release);
                    state.subscribed.store(true, Ordering::Release);
                    backoff = BACKOFF_MIN;
                    tick
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64,
                        "Could not balance the Event Hubs partitions; trying again.");
                    state.subscribed.store(false, Ordering::Release);
                    let w = backoff;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    w
                }
            };
            self.metrics
                .set("eventhubs_partitions_leased", &[], readers.len() as f64);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        for r in readers.values() {
            r.stop.cancel();
        }
        for (_, r) in readers.drain() {
            let _ = r.task.await;
        }
        self.metrics.set("eventhubs_partitions_leased", &[], 0.0);
    }

    /// One round: renew what we hold, give up what we lost or hold beyond our share, take
    /// free or expired partitions up to our share.
    async fn rebalance(
        &self,
        leases: &Leases,
        intake: &Intake,
        readers: &mut HashMap<String, Reader>,
    ) -> Result<(), String> {
        let others = match self.db.backend() {
            Backend::Postgres => crate::server::cluster::others_alive(&self.db)
                .await
                .map_err(|e| e.to_string())?,
            Backend::Sqlite => 0,
        };
        let replicas = usize::try_from(others).unwrap_or(0) + 1;
        let share = self.partitions.len().div_ceil(replicas).max(1);

        let held: Vec<String> = readers.keys().cloned().collect();
        for p in held {
            if !leases.renew(&p).await.map_err(|e| e.to_string())? {
                tracing::info!(partition = %p, "Lost the lease of an Event Hubs partition; stopping its reader.");
                if let Some(r) = readers.remove(&p) {
                    r.stop.cancel();
                    let _ = r.task.await;
                }
            }
        }
        if readers.len() > share
            && let Some(p) = readers.keys().next().cloned()
            && let Some(r) = readers.remove(&p)
        {
            r.stop.cancel();
            let _ = r.task.await;
            leases.release(&p).await.map_err(|e| e.to_string())?;
            tracing::info!(partition = %p, share, "Released an Event Hubs partition to another replica.");
        }
        for p in &self.partitions {
            if readers.len() >= share {
                break;
            }
            if readers.contains_key(p) {
                continue;
            }
            if let Some(position) = leases.acquire(p).await.map_err(|e| e.to_string())? {
                let after = match position.as_deref().map(str::parse::<i64>) {
                    None => None,
                    Some(Ok(seq)) => Some(seq),
                    Some(Err(_)) => {
                        tracing::warn!(partition = %p, position = ?position,
                            "The stored checkpoint is not a sequence number; reading the partition from the start (repeats are dropped).");
                        None
                    }
                };
                tracing::info!(partition = %p, after = ?after, "Took the lease of an Event Hubs partition.");
                let stop = CancellationToken::new();
                let task = tokio::spawn(read_partition(
                    self.hub.clone(),
                    intake.clone(),
                    self.metrics.clone(),
                    leases.source.clone(),
                    leases.owner.clone(),
                    p.clone(),
                    after,
                    stop.clone(),
                ));
                readers.insert(p.clone(), Reader { stop, task });
            }
        }
        Ok(())
    }
}

/// Reads one partition from after `after` until `stop` or the writer closing; reopens the
/// receiver (after the last event handed over) when it fails.
#[allow(clippy::too_many_arguments)]
async fn read_partition(
    hub: Arc<dyn EventHub>,
    intake: Intake,
    metrics: Arc<Metrics>,
    source: String,
    owner: String,
    partition: String,
    after: Option<i64>,
    stop: CancellationToken,
) {
    let mut last = after;
    let mut backoff = BACKOFF_MIN;
    loop {
        let opened = tokio::select! {
            _ = stop.cancelled() => return,
            r = hub.open(&partition, last) => r,
        };
        let mut receiver = match opened {
            Ok(r) => r,
            Err(e) => {
                metrics.inc("eventhubs_errors_total", &[("kind", "open")], 1);
                tracing::warn!(%partition, error = %e, retry_in_ms = backoff.as_millis() as u64,
                    "Could not open an Event Hubs receiver; retrying.");
                if pause(&stop, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        let opened_at = tokio::time::Instant::now();
        tracing::debug!(%partition, after = ?last, "Receiving from an Event Hubs partition.");
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => {
                    receiver.close().await;
                    return;
                }
                // A CBS token expires: reopen (with a new one) after the checkpoint.
                _ = tokio::time::sleep_until(opened_at + TOKEN_RENEW) => break,
                r = receiver.recv() => r,
            };
            let event = match next {
                Ok(e) => e,
                Err(e) => {
                    metrics.inc("eventhubs_errors_total", &[("kind", "receive")], 1);
                    tracing::warn!(%partition, error = %e, "An Event Hubs receiver failed; reopening after the last event.");
                    if pause(&stop, backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    break;
                }
            };
            backoff = BACKOFF_MIN;
            if last.is_some_and(|l| event.sequence <= l) {
                metrics.inc("eventhubs_events_total", &[("outcome", "repeat")], 1);
                continue;
            }
            last = Some(event.sequence);
            let checkpoint = Checkpoint {
                source: source.clone(),
                partition: partition.clone(),
                position: event.sequence.to_string(),
                owner: owner.clone(),
            };
            let m = match decode(&event) {
                Decoded::Message {
                    device,
                    channel,
                    payload,
                } => {
                    metrics.inc("eventhubs_events_total", &[("outcome", "message")], 1);
                    SourceMessage {
                        device,
                        channel,
                        payload,
                        received_at: now_us(),
                        ack: Settle::Checkpoint(checkpoint),
                    }
                }
                Decoded::Presence { device, online } => {
                    metrics.inc("eventhubs_events_total", &[("outcome", "presence")], 1);
                    // Presence from the transport (like the broker's Last Will): ts = 0, so
                    // only the online flag changes.
                    let mut s = Status::offline(&device);
                    if online {
                        s.state = DeviceState::Online;
                    }
                    SourceMessage {
                        device,
                        channel: Channel::Status,
                        payload: ember_proto::message::encode(&s, Encoding::Json)
                            .unwrap_or_default(),
                        received_at: now_us(),
                        ack: Settle::Checkpoint(checkpoint),
                    }
                }
                Decoded::Malformed { device, detail } => {
                    metrics.inc("eventhubs_events_total", &[("outcome", "malformed")], 1);
                    tracing::warn!(%partition, sequence = event.sequence, offset = ?event.offset,
                        %device, %detail, "An Event Hubs event is not an Ember message; storing it as a reject.");
                    SourceMessage {
                        device,
                        channel: Channel::Telemetry,
                        payload: detail.into_bytes(),
                        received_at: now_us(),
                        ack: Settle::Checkpoint(checkpoint),
                    }
                }
                Decoded::Skip(why) => {
                    metrics.inc("eventhubs_events_total", &[("outcome", "skipped")], 1);
                    tracing::debug!(%partition, sequence = event.sequence, why, "Skipped an Event Hubs event.");
                    continue;
                }
            };
            if intake.send(m).await.is_err() {
                receiver.close().await;
                return;
            }
        }
        receiver.close().await;
    }
}

/// Waits `d`; true when `stop` fired first.
async fn pause(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

/// Drives the Event Hubs source into a writer until `shutdown`, then drains and releases the
/// leases.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    settings: Arc<crate::config::Settings>,
    e: EventHubsSettings,
    db: Db,
    metrics: Arc<Metrics>,
    state: Arc<IngestState>,
    events: Arc<crate::server::events::Events>,
    rollouts: Arc<crate::ota::rollout::service::Service>,
    shutdown: CancellationToken,
    force: CancellationToken,
) {
    let hub: Arc<dyn EventHub> = match AmqpHub::from_settings(&e, &settings.mqtt.client_id) {
        Ok(h) => Arc::new(h),
        Err(err) => {
            tracing::error!(error = %err, "Cannot set up the Event Hubs source; ingestion does not start.");
            return;
        }
    };
    let source = Box::new(EventHubsSource {
        partitions: (0..e.partitions).map(|p| p.to_string()).collect(),
        lease_s: e.lease_s,
        hub,
        db: db.clone(),
        metrics: metrics.clone(),
        owner: settings.mqtt.client_id.clone(),
    });
    let leases = source.leases();
    super::drive(
        source, settings, db, metrics, state, events, rollouts, shutdown, force,
    )
    .await;
    // Everything handed over is stored: let another replica take the partitions at once.
    if let Err(e) = leases.release_all().await {
        tracing::warn!(error = %e, "Could not release the Event Hubs partition leases; they expire by themselves.");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio::sync::mpsc;

    /// A test double behind the [`EventHub`] trait: one partition of `events` telemetry events
    /// (sequence numbers 0..events); each receiver fails after `fail_after` events, and the
    /// `after` of every open is recorded.
    struct MemoryHub {
        events: i64,
        fail_after: usize,
        opens: Mutex<Vec<Option<i64>>>,
    }

    struct MemoryReceiver {
        next: i64,
        end: i64,
        left: usize,
    }

    impl EventHub for MemoryHub {
        fn open<'a>(
            &'a self,
            _: &'a str,
            after: Option<i64>,
        ) -> BoxFuture<'a, Result<Box<dyn PartitionReceiver>, EventHubsError>> {
            self.opens.lock().expect("lock").push(after);
            // Like Event Hubs' filter, but one event early: the reader must drop the repeat.
            let next = after.map(|a| a.max(0)).unwrap_or(0);
            Box::pin(async move {
                Ok(Box::new(MemoryReceiver {
                    next,
                    end: self.events,
                    left: self.fail_after,
                }) as Box<dyn PartitionReceiver>)
            })
        }

        fn describe(&self) -> String {
            "memory".into()
        }
    }

    impl PartitionReceiver for MemoryReceiver {
        fn recv(&mut self) -> BoxFuture<'_, Result<Event, EventHubsError>> {
            Box::pin(async move {
                if self.left == 0 {
                    return Err(EventHubsError::Receive {
                        partition: "0".into(),
                        detail: "connection lost".into(),
                    });
                }
                if self.next >= self.end {
                    std::future::pending::<()>().await;
                }
                self.left -= 1;
                let seq = self.next;
                self.next += 1;
                let mut e = event(
                    Some("d1"),
                    Some("Telemetry"),
                    &[(PROP_CHANNEL, "telemetry")],
                );
                e.sequence = seq;
                Ok(e)
            })
        }

        fn close(self: Box<Self>) -> BoxFuture<'static, ()> {
            Box::pin(async {})
        }
    }

    /// A reader resumes after its checkpoint, reopens after a failed receiver from the last
    /// event it handed over, drops what the transport repeats, and checkpoints every event.
    #[tokio::test]
    async fn a_partition_reader_resumes_after_its_checkpoint_without_repeats() {
        let hub = Arc::new(MemoryHub {
            events: 40,
            fail_after: 7,
            opens: Mutex::new(Vec::new()),
        });
        let (tx, mut rx) = mpsc::channel(8);
        let stop = CancellationToken::new();
        let task = tokio::spawn(read_partition(
            hub.clone(),
            Intake::new(tx, 1 << 20),
            Arc::new(Metrics::new()),
            "eventhubs:memory".into(),
            "me".into(),
            "0".into(),
            Some(9),
            stop.clone(),
        ));
        let mut positions = Vec::new();
        while positions.len() < 30 {
            let m = rx.recv().await.expect("an event");
            let c = m.checkpoint.expect("a checkpoint");
            assert_eq!((c.partition.as_str(), c.owner.as_str()), ("0", "me"));
            positions.push(c.position.parse::<i64>().expect("a sequence number"));
        }
        assert_eq!(
            positions,
            (10..40).collect::<Vec<_>>(),
            "none lost, none twice"
        );
        stop.cancel();
        task.await.expect("reader");
        let opens = hub.opens.lock().expect("lock").clone();
        assert_eq!(
            opens[0],
            Some(9),
            "the first receiver starts after the checkpoint"
        );
        assert!(
            opens.windows(2).all(|w| w[0] < w[1]),
            "each reopen starts after the last event handed over: {opens:?}"
        );
    }

    fn event(device: Option<&str>, source: Option<&str>, props: &[(&str, &str)]) -> Event {
        Event {
            sequence: 7,
            offset: Some("1024".into()),
            device: device.map(str::to_string),
            message_source: source.map(str::to_string),
            properties: props
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: b"x".to_vec(),
        }
    }

    #[test]
    fn the_device_comes_from_the_annotation_and_the_channel_from_the_property() {
        let e = event(
            Some("d1"),
            Some("Telemetry"),
            &[(PROP_CHANNEL, "telemetry"), ("deviceId", "d2")],
        );
        assert_eq!(
            decode(&e),
            Decoded::Message {
                device: "d1".into(),
                channel: Channel::Telemetry,
                payload: b"x".to_vec()
            }
        );
        assert!(matches!(
            decode(&event(None, None, &[(PROP_CHANNEL, "telemetry")])),
            Decoded::Malformed { .. }
        ));
        assert!(matches!(
            decode(&event(Some("d1"), None, &[])),
            Decoded::Malformed { .. }
        ));
        assert!(matches!(
            decode(&event(Some("d1"), None, &[(PROP_CHANNEL, "desired")])),
            Decoded::Malformed { .. }
        ));
        assert!(matches!(
            decode(&event(Some("d1"), Some("twinChangeEvents"), &[])),
            Decoded::Skip(_)
        ));
    }

    #[test]
    fn connection_state_events_are_presence() {
        let on = event(
            Some("d1"),
            Some(SOURCE_CONNECTION_STATE),
            &[("opType", "deviceConnected")],
        );
        let off = event(
            Some("d1"),
            Some(SOURCE_CONNECTION_STATE),
            &[("opType", "deviceDisconnected")],
        );
        assert_eq!(
            decode(&on),
            Decoded::Presence {
                device: "d1".into(),
                online: true
            }
        );
        assert_eq!(
            decode(&off),
            Decoded::Presence {
                device: "d1".into(),
                online: false
            }
        );
    }

    #[test]
    fn connection_strings_and_endpoints_parse() {
        let c = EventHubsConnection::parse(
            "Endpoint=sb://ihsu.servicebus.windows.net/;SharedAccessKeyName=ember-fleet-service;SharedAccessKey=a2V5;EntityPath=myhub\n",
        )
        .expect("parses");
        assert_eq!(c.host, "ihsu.servicebus.windows.net");
        assert_eq!(c.key_name, "ember-fleet-service");
        assert_eq!(c.entity, "myhub");
        assert!(matches!(
            EventHubsConnection::parse(
                "Endpoint=sb://h/;SharedAccessKeyName=k;SharedAccessKey=a2V5"
            ),
            Err(EventHubsError::ConnectionString("EntityPath"))
        ));
        assert_eq!(
            parse_endpoint("amqp://127.0.0.1:5000").expect("ok"),
            (false, "127.0.0.1".into(), 5000)
        );
        assert_eq!(
            parse_endpoint("amqps://h.servicebus.windows.net").expect("ok"),
            (true, "h.servicebus.windows.net".into(), 5671)
        );
        assert!(parse_endpoint("http://h").is_err());
        assert_eq!(
            start_filter(Some(41)),
            "amqp.annotation.x-opt-sequence-number > '41'"
        );
        assert_eq!(start_filter(None), "amqp.annotation.x-opt-offset > '-1'");
    }
}
