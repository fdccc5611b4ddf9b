//! Test support: [`TestEventHub`], an AMQP 1.0 **test double** of the Event Hubs endpoint of an
//! IoT Hub (fe2o3-amqp's acceptor, in the test process, on an ephemeral 127.0.0.1 port).
//!
//! No broker one can install here implements Event Hubs' partitions, broker-stamped sequence
//! numbers and selector filters, so this double does, and only that: partitions are in-memory
//! logs that keep everything (retention is forever); a receiver link attaches to
//! `{hub}/ConsumerGroups/{group}/Partitions/{n}` with the filter
//! `apache.org:selector-filter:string` = `amqp.annotation.x-opt-sequence-number > 'N'` or
//! `amqp.annotation.x-opt-offset > 'N'` and gets the partition's events after that position,
//! presettled (as Event Hubs sends them), then new ones as they are published. Events carry
//! what IoT Hub puts on them: the annotations `x-opt-sequence-number`, `x-opt-offset`,
//! `x-opt-enqueued-time`, `iothub-connection-device-id`, `iothub-message-source`, and the
//! device's properties as application properties. SASL PLAIN with one user.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fe2o3_amqp::acceptor::{
    ConnectionAcceptor, LinkAcceptor, LinkEndpoint, SaslPlainMechanism, SessionAcceptor,
};
use fe2o3_amqp::link::delivery::Sendable;
use fe2o3_amqp::types::messaging::annotations::OwnedKey;
use fe2o3_amqp::types::messaging::{
    ApplicationProperties, Body, Data, Message, MessageAnnotations,
};
use fe2o3_amqp::types::primitives::{Binary, SimpleValue, Symbol, Value};
use tokio::sync::Notify;

pub const USER: &str = "ember-fleet-service";
/// The policy key in the connection string (base64, like Azure's).
pub const KEY: &str = "ZW1iZXItdGVzdC1rZXk=";

/// One event as IoT Hub would route it.
#[derive(Clone, Debug)]
pub struct HubEvent {
    pub device: Option<String>,
    pub message_source: Option<String>,
    pub properties: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HubEvent {
    /// Device telemetry: `devices/{device}/messages/events/ember-channel={channel}&...`.
    pub fn telemetry(device: &str, channel: &str, body: Vec<u8>) -> HubEvent {
        HubEvent {
            device: Some(device.to_string()),
            message_source: Some("Telemetry".into()),
            properties: vec![
                ("ember-channel".into(), channel.into()),
                ("ember-stream".into(), "imu".into()),
                ("ember-encoding".into(), "cbor".into()),
            ],
            body,
        }
    }

    /// IoT Hub's connection-state event.
    pub fn connection_state(device: &str, connected: bool) -> HubEvent {
        let op = if connected {
            "deviceConnected"
        } else {
            "deviceDisconnected"
        };
        HubEvent {
            device: Some(device.to_string()),
            message_source: Some("deviceConnectionStateEvents".into()),
            properties: vec![
                ("hubName".into(), "ember-test".into()),
                ("deviceId".into(), device.into()),
                ("opType".into(), op.into()),
                (
                    "iothub-message-schema".into(),
                    "deviceConnectionStateNotification".into(),
                ),
            ],
            body: br#"{"sequenceNumber":"000000000000000001D7F744182052190000000C000000000000000000000001"}"#
                .to_vec(),
        }
    }

    /// The AMQP message, with the broker-stamped annotations when `position` is given.
    pub fn message(&self, position: Option<(i64, i64)>) -> Message<Body<Value>> {
        let mut ann = MessageAnnotations::builder();
        if let Some((seq, offset)) = position {
            ann = ann
                .insert(
                    OwnedKey::from(Symbol::from("x-opt-sequence-number")),
                    Value::Long(seq),
                )
                .insert(
                    OwnedKey::from(Symbol::from("x-opt-offset")),
                    Value::String(offset.to_string()),
                );
        }
        if let Some(d) = &self.device {
            ann = ann.insert(
                OwnedKey::from(Symbol::from("iothub-connection-device-id")),
                Value::String(d.clone()),
            );
        }
        if let Some(s) = &self.message_source {
            ann = ann.insert(
                OwnedKey::from(Symbol::from("iothub-message-source")),
                Value::String(s.clone()),
            );
        }
        let mut props = ApplicationProperties::builder();
        for (k, v) in &self.properties {
            props = props.insert(k.clone(), SimpleValue::String(v.clone()));
        }
        Message::builder()
            .message_annotations(ann.build())
            .application_properties(props.build())
            .body(Body::Data(
                vec![Data(Binary::from(self.body.clone()))].into(),
            ))
            .build()
    }
}

struct Stored {
    seq: i64,
    offset: i64,
    event: HubEvent,
}

#[derive(Default)]
struct Hub {
    partitions: Mutex<Vec<Vec<Stored>>>,
    /// The filters receivers attached with, per partition, in order.
    filters: Mutex<Vec<(usize, String)>>,
    grew: Notify,
}

/// The Event Hubs double; stops with its runtime when dropped.
pub struct TestEventHub {
    pub port: u16,
    pub entity: String,
    hub: Arc<Hub>,
    _rt: tokio::runtime::Runtime,
}

impl TestEventHub {
    pub fn start(entity: &str, partitions: usize) -> TestEventHub {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let hub = Arc::new(Hub::default());
        *hub.partitions.lock().expect("lock") = (0..partitions).map(|_| Vec::new()).collect();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("addr").port();
        let h = hub.clone();
        let prefix = format!("{entity}/ConsumerGroups/");
        rt.spawn(async move {
            let acceptor = ConnectionAcceptor::builder()
                .container_id("ember-test-eventhub")
                .sasl_acceptor(SaslPlainMechanism::new(USER, KEY))
                .build();
            let acceptor = Arc::new(acceptor);
            while let Ok((stream, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let h = h.clone();
                let prefix = prefix.clone();
                tokio::spawn(async move {
                    let Ok(mut conn) = acceptor.accept(stream).await else {
                        return;
                    };
                    while let Ok(mut session) = SessionAcceptor::new().accept(&mut conn).await {
                        let h = h.clone();
                        let prefix = prefix.clone();
                        tokio::spawn(async move {
                            while let Some(attach) = session.next_incoming_attach().await {
                                let source = attach.source.clone();
                                let Ok(LinkEndpoint::Sender(sender)) = LinkAcceptor::new()
                                    .accept_incoming_attach(attach, &mut session)
                                    .await
                                else {
                                    continue;
                                };
                                let address = source
                                    .as_ref()
                                    .and_then(|s| s.address.clone())
                                    .unwrap_or_default();
                                let partition = address
                                    .strip_prefix(&prefix)
                                    .and_then(|rest| rest.rsplit('/').next())
                                    .and_then(|p| p.parse::<usize>().ok());
                                let filter = source
                                    .as_ref()
                                    .and_then(|s| s.filter.as_ref())
                                    .and_then(|f| {
                                        f.iter().find_map(|(k, v)| {
                                            (k.as_str() == "apache.org:selector-filter:string")
                                                .then(|| match v {
                                                    Value::Described(d) => match &d.value {
                                                        Value::String(s) => Some(s.clone()),
                                                        _ => None,
                                                    },
                                                    Value::String(s) => Some(s.clone()),
                                                    _ => None,
                                                })
                                                .flatten()
                                        })
                                    })
                                    .unwrap_or_default();
                                if let Some(p) = partition {
                                    h.filters.lock().expect("lock").push((p, filter.clone()));
                                    tokio::spawn(serve(h.clone(), sender, p, filter));
                                }
                            }
                        });
                    }
                });
            }
        });
        TestEventHub {
            port,
            entity: entity.to_string(),
            hub,
            _rt: rt,
        }
    }

    /// `amqp://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("amqp://127.0.0.1:{}", self.port)
    }

    /// The Event Hubs-compatible connection string of this double.
    pub fn connection_string(&self) -> String {
        format!(
            "Endpoint=sb://127.0.0.1/;SharedAccessKeyName={USER};SharedAccessKey={KEY};EntityPath={}",
            self.entity
        )
    }

    /// Appends `event` to `partition`; returns its sequence number.
    pub fn publish(&self, partition: usize, event: HubEvent) -> i64 {
        let seq = {
            let mut parts = self.hub.partitions.lock().expect("lock");
            let log = &mut parts[partition];
            let seq = log.len() as i64;
            let offset = log
                .last()
                .map(|s| s.offset + s.event.body.len() as i64 + 64)
                .unwrap_or(0);
            log.push(Stored { seq, offset, event });
            seq
        };
        self.hub.grew.notify_waiters();
        seq
    }

    /// The last sequence number of each partition (None: empty).
    pub fn last_sequences(&self) -> Vec<Option<i64>> {
        self.hub
            .partitions
            .lock()
            .expect("lock")
            .iter()
            .map(|l| l.last().map(|s| s.seq))
            .collect()
    }

    /// The (partition, filter) of every receiver that attached, in order.
    pub fn filters(&self) -> Vec<(usize, String)> {
        self.hub.filters.lock().expect("lock").clone()
    }
}

/// Where a filter starts: the first sequence number to send.
fn first_of(hub: &Hub, partition: usize, filter: &str) -> i64 {
    let value = filter
        .split('\'')
        .nth(1)
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(-1);
    if filter.contains("x-opt-sequence-number") {
        return value + 1;
    }
    // An offset filter: the first event whose offset is greater.
    let parts = hub.partitions.lock().expect("lock");
    parts[partition]
        .iter()
        .find(|s| s.offset > value)
        .map(|s| s.seq)
        .unwrap_or(parts[partition].len() as i64)
}

async fn serve(hub: Arc<Hub>, mut sender: fe2o3_amqp::Sender, partition: usize, filter: String) {
    let mut next = first_of(&hub, partition, &filter);
    loop {
        let grew = hub.grew.notified();
        let batch: Vec<(i64, i64, HubEvent)> = {
            let parts = hub.partitions.lock().expect("lock");
            parts[partition]
                .iter()
                .filter(|s| s.seq >= next)
                .take(100)
                .map(|s| (s.seq, s.offset, s.event.clone()))
                .collect()
        };
        if batch.is_empty() {
            // Published meanwhile, or nothing yet: look again soon either way.
            let _ = tokio::time::timeout(Duration::from_millis(100), grew).await;
            continue;
        }
        for (seq, offset, event) in batch {
            let sendable = Sendable::builder()
                .message(event.message(Some((seq, offset))))
                .settled(true)
                .build();
            if sender.send(sendable).await.is_err() {
                return;
            }
            next = seq + 1;
        }
    }
}
