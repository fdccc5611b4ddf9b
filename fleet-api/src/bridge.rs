//! `ember-fleet bridge`: device messages from the broker to a Google Pub/Sub topic, for a fleet
//! that reads Pub/Sub ([`crate::server::ingest::pubsub`]) on GKE (terraform/gcp, issue 18).
//!
//! ```text
//! broker ──$share/<bridge.share_group>/ember/v1/+/<channel>──▶ bridge (MQTT 5, manual acks)
//!   ▲                                                              │ publish: data = payload,
//!   └────────── PUBACK, in arrival order, once Pub/Sub took it ◀───┘ ordering key = device,
//!                                                                    attrs device/channel/...
//! ```
//!
//! Lifecycle and guarantees:
//! * The device id is the MQTT topic's (`ember/v1/<device>/<channel>`), which the broker's ACL
//!   ties to the device's certificate; it becomes the message's ordering key and `device`
//!   attribute. The payload is forwarded as it is (the fleet classifies it).
//! * At-least-once: a QoS 1 message is PUBACKed only after Pub/Sub acknowledged its publish.
//!   The session is persistent (`mqtt.clean_session = false`, `mqtt.session_expiry_s`), so a
//!   bridge killed at any point leaves what it had not acknowledged with the broker, which
//!   sends it again when the bridge (same `mqtt.client_id`) returns; what was published but not
//!   yet acknowledged is then published twice, and the fleet's idempotent inserts drop the
//!   second copy. Nothing is lost.
//! * Order: the broker delivers one session's messages in order and Pub/Sub keeps the order of
//!   one ordering key's publishes, so one device's messages reach the topic in the order the
//!   device sent them, except around a publish that failed after the client's retries: it is
//!   published again after later messages of its device (counted in
//!   `bridge_publish_errors_total`; the fleet stores both, in arrival order). PUBACKs go out in
//!   arrival order (MQTT requires it), each once its message and all earlier ones are published.
//! * Backpressure: at most `bridge.max_in_flight` QoS 1 messages are unacknowledged (the MQTT 5
//!   Receive Maximum the bridge announces): when Pub/Sub is slow the broker stops sending and
//!   queues for the session. QoS 0 heartbeats are dropped (counted) while the window is full.
//! * Shutdown (SIGTERM): the bridge stops taking messages (what arrives stays unacknowledged at
//!   the broker), waits up to `shutdown.grace_ms` for the publishes in flight and their
//!   PUBACKs, then disconnects. A second signal exits at once; nothing unpublished was
//!   acknowledged.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use gcloud_gax::grpc::Status;
use gcloud_googleapis::pubsub::v1::PubsubMessage;
use gcloud_pubsub::publisher::{Publisher, PublisherConfig};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Filter, Packet, Publish, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cloud::gcp::{self, GcpError};
use crate::config::{BridgeSettings, Settings};
use crate::metrics::Metrics;
use crate::server::ingest::pubsub::{ATTR_CHANNEL, ATTR_DEVICE, ATTR_ENCODING, ATTR_TOPIC};

/// The channels the bridge forwards (every one the fleet ingests).
pub const CHANNELS: [&str; 4] = ["telemetry", "inference", "status", "heartbeat"];
/// See the ingest reader's `MAX_MQTT_PACKET`: anything the broker sends must be readable.
const MAX_MQTT_PACKET: u32 = 268_435_455;
/// Pub/Sub publish requests: messages per request and how long a partial one may wait.
const PUBLISH_BUNDLE: usize = 100;
const PUBLISH_FLUSH: Duration = Duration::from_millis(5);
/// Publisher tasks (each one gRPC request at a time; a device's messages go to one of them).
const PUBLISH_WORKERS: usize = 8;
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(10);
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the bridge cannot start; each says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error(
        "the configuration has no [bridge] table: set bridge.topic (terraform output pubsub.topic) for ember-fleet bridge"
    )]
    NotConfigured,
    #[error(transparent)]
    PubSub(#[from] GcpError),
    #[error("cannot set up TLS to the broker: {0} (check [mqtt.tls])")]
    Tls(String),
    #[error(
        "cannot listen on {addr}: {source} (is another process using the port? set http.listen)"
    )]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// The subscription filters for the bridges' group.
pub fn subscriptions(share_group: &str) -> Vec<Filter> {
    CHANNELS
        .iter()
        .map(|c| {
            let qos = if *c == "heartbeat" {
                QoS::AtMostOnce
            } else {
                QoS::AtLeastOnce
            };
            Filter::new(format!("$share/{share_group}/ember/v1/+/{c}"), qos)
        })
        .collect()
}

/// The Pub/Sub message for a device's MQTT message; None for a topic outside
/// `ember/v1/<device>/<channel>` (the bridge's filters admit none).
pub fn message(topic: &str, payload: &[u8]) -> Option<PubsubMessage> {
    let mut parts = topic.split('/');
    let (Some("ember"), Some("v1"), Some(device), Some(channel), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    if device.is_empty() {
        return None;
    }
    let encoding = match payload.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => "json",
        _ => "cbor",
    };
    let attributes = HashMap::from([
        (ATTR_DEVICE.to_string(), device.to_string()),
        (ATTR_CHANNEL.to_string(), channel.to_string()),
        (ATTR_TOPIC.to_string(), topic.to_string()),
        (ATTR_ENCODING.to_string(), encoding.to_string()),
    ]);
    Some(PubsubMessage {
        data: payload.to_vec(),
        attributes,
        ordering_key: device.to_string(),
        ..Default::default()
    })
}

/// A QoS 1 message taken from the broker, in arrival order, until it is PUBACKed.
struct Flight {
    /// The connection it came on: a PUBACK on another would acknowledge the wrong packet.
    epoch: u64,
    pkid: u16,
    channel: &'static str,
    started: Instant,
    published: bool,
}

/// A publish's outcome: the flight's id (None for QoS 0), the message (for a retry), what
/// Pub/Sub said.
type Published = (Option<u64>, PubsubMessage, Result<String, Status>, Duration);

type PublishFuture = Pin<Box<dyn Future<Output = Published> + Send>>;

fn publish(p: Publisher, id: Option<u64>, m: PubsubMessage, delay: Duration) -> PublishFuture {
    Box::pin(async move {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let r = p.publish(m.clone()).await.get().await;
        (id, m, r, delay)
    })
}

fn channel_of(topic: &str) -> &'static str {
    CHANNELS
        .iter()
        .find(|c| topic.rsplit('/').next() == Some(**c))
        .copied()
        .unwrap_or("other")
}

#[derive(Clone)]
struct Http {
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
}

async fn serve_metrics(State(s): State<Http>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

async fn serve_health(State(s): State<Http>) -> Response {
    if s.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not connected and subscribed to the broker\n",
        )
            .into_response()
    }
}

/// Binds `http.listen` (metrics and health) before anything else, like the service.
pub async fn bind(settings: &Settings) -> Result<TcpListener, BridgeError> {
    let addr = settings.http.listen;
    TcpListener::bind(addr)
        .await
        .map_err(|source| BridgeError::Listen { addr, source })
}

/// Runs the bridge until `shutdown` has drained (or `force` fires).
pub async fn run(
    settings: Arc<Settings>,
    listener: TcpListener,
    shutdown: CancellationToken,
    force: CancellationToken,
) -> Result<(), BridgeError> {
    let b = settings.bridge.clone().ok_or(BridgeError::NotConfigured)?;
    let m = &settings.mqtt;
    let mut opts = MqttOptions::new(m.client_id.clone(), m.host.clone(), m.ingest_port);
    opts.set_keep_alive(Duration::from_secs(m.keep_alive_s));
    opts.set_clean_start(m.clean_session);
    opts.set_session_expiry_interval(crate::server::ingest::session_expiry(m));
    if let Some(user) = &m.username {
        opts.set_credentials(user.clone(), m.password.clone().unwrap_or_default());
    }
    opts.set_manual_acks(true);
    opts.set_max_packet_size(Some(MAX_MQTT_PACKET));
    opts.set_receive_maximum(Some(u16::try_from(b.max_in_flight).unwrap_or(u16::MAX)));
    crate::tls::apply_mqtt_v5(&mut opts, m).map_err(|e| BridgeError::Tls(e.to_string()))?;
    // Every PUBACK of a full window fits, so `try_ack` never finds the channel full.
    let request_capacity = b.max_in_flight + 64;
    opts.set_request_channel_capacity(request_capacity);

    let client = gcp::client(b.project.as_deref(), &b.topic, "topics", "bridge.project").await?;
    let (_, topic_id) = gcp::split_name(&b.topic, "topics");
    let mut publisher = client.topic(topic_id).new_publisher(Some(PublisherConfig {
        workers: PUBLISH_WORKERS,
        flush_interval: PUBLISH_FLUSH,
        bundle_size: PUBLISH_BUNDLE,
        retry_setting: None,
    }));

    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let app = Router::new()
        .route("/metrics", get(serve_metrics))
        .route("/health", get(serve_health))
        .with_state(Http {
            metrics: metrics.clone(),
            ready: ready.clone(),
        });
    let http_stop = CancellationToken::new();
    let http = {
        let stop = http_stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
        })
    };
    tracing::info!(topic = %b.topic, share_group = %b.share_group, max_in_flight = b.max_in_flight,
        "Bridging the broker to Pub/Sub.");

    let (mqtt, eventloop) = AsyncClient::new(opts, request_capacity);
    bridge(
        &settings,
        &b,
        mqtt,
        eventloop,
        &publisher,
        &metrics,
        &ready,
        shutdown,
        force.clone(),
    )
    .await;

    if !force.is_cancelled() {
        publisher.shutdown().await;
    }
    http_stop.cancel();
    let _ = http.await;
    tracing::info!("The bridge stopped.");
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn bridge(
    settings: &Settings,
    b: &BridgeSettings,
    mqtt: AsyncClient,
    mut eventloop: rumqttc::v5::EventLoop,
    publisher: &Publisher,
    metrics: &Metrics,
    ready: &AtomicBool,
    shutdown: CancellationToken,
    force: CancellationToken,
) {
    let m = &settings.mqtt;
    let filters = subscriptions(&b.share_group);
    let mut epoch = 0u64;
    let mut connected = false;
    let mut was_connected = false;
    let mut backoff = Duration::from_millis(m.reconnect_min_ms);
    let max_backoff = Duration::from_millis(m.reconnect_max_ms);
    // QoS 1 messages in arrival order; `front_id` is the id of the first.
    let mut flights: VecDeque<Flight> = VecDeque::new();
    let mut front_id = 0u64;
    let mut publishes: FuturesUnordered<PublishFuture> = FuturesUnordered::new();
    let mut draining: Option<Instant> = None;
    let grace = Duration::from_millis(settings.shutdown.grace_ms);

    loop {
        metrics.set("bridge_in_flight", &[], flights.len() as f64);
        if let Some(since) = draining {
            if flights.is_empty() {
                break;
            }
            if since.elapsed() >= grace {
                tracing::warn!(
                    in_flight = flights.len(),
                    "Shutdown grace over with publishes in flight; they stay unacknowledged at the broker."
                );
                break;
            }
        }
        tokio::select! {
            biased;
            _ = force.cancelled() => return,
            _ = shutdown.cancelled(), if draining.is_none() => {
                tracing::info!(in_flight = flights.len(),
                    "Shutting down the bridge: finishing the publishes in flight; new messages stay with the broker.");
                draining = Some(Instant::now());
            }
            Some((id, msg, res, delay)) = publishes.next(), if !publishes.is_empty() => {
                let Some(id) = id else {
                    // QoS 0: nothing to acknowledge, nothing retried.
                    if res.is_ok() {
                        metrics.inc("bridge_messages_total", &[("channel", "heartbeat"), ("outcome", "published")], 1);
                    }
                    continue;
                };
                let Some(idx) = id.checked_sub(front_id).and_then(|i| usize::try_from(i).ok()) else {
                    continue;
                };
                let Some(f) = flights.get_mut(idx) else { continue };
                match res {
                    Ok(_) => {
                        f.published = true;
                        metrics.observe("bridge_publish_seconds", &[], f.started.elapsed().as_secs_f64());
                    }
                    Err(e) => {
                        metrics.inc("bridge_publish_errors_total", &[], 1);
                        let retry = (delay * 2).clamp(RETRY_MIN, RETRY_MAX);
                        tracing::warn!(error = %e, retry_in_ms = retry.as_millis() as u64,
                            "Pub/Sub did not take a publish; publishing it again (not acknowledged to the broker meanwhile).");
                        publishes.push(publish(publisher.clone(), Some(id), msg, retry));
                        continue;
                    }
                }
                // PUBACK in arrival order, on the connection each message came on.
                while flights.front().is_some_and(|f| f.published) {
                    let Some(f) = flights.pop_front() else { break };
                    front_id += 1;
                    if f.epoch == epoch && connected {
                        let mut p = Publish::new("", QoS::AtLeastOnce, Vec::<u8>::new(), None);
                        p.pkid = f.pkid;
                        if let Err(e) = mqtt.try_ack(&p) {
                            tracing::debug!(error = %e, "Could not queue a PUBACK; the broker sends the message again.");
                        }
                    }
                    metrics.inc("bridge_messages_total", &[("channel", f.channel), ("outcome", "published")], 1);
                }
            }
            ev = eventloop.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    if ack.code != ConnectReturnCode::Success {
                        tracing::error!(code = ?ack.code, "The broker refused the bridge's connection.");
                        continue;
                    }
                    epoch += 1;
                    connected = true;
                    was_connected = true;
                    backoff = Duration::from_millis(m.reconnect_min_ms);
                    metrics.set("mqtt_connected", &[], 1.0);
                    metrics.inc("mqtt_connections_total", &[], 1);
                    tracing::info!(host = %m.host, port = m.ingest_port, client_id = %m.client_id,
                        session_present = ack.session_present, "The bridge connected to the broker (MQTT 5).");
                    if let Err(e) = mqtt.try_subscribe_many(filters.clone()) {
                        tracing::error!(error = %e, "Could not subscribe.");
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if ack.return_codes.iter().any(|c| !matches!(c, SubscribeReasonCode::Success(_))) {
                        ready.store(false, Ordering::Release);
                        tracing::error!(codes = ?ack.return_codes,
                            "The broker refused a subscription (does it allow $share subscriptions and this identity to read ember/v1/+/...?).");
                    } else {
                        ready.store(true, Ordering::Release);
                        tracing::info!("Subscribed.");
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if draining.is_some() {
                        // Left unacknowledged: the broker sends it again.
                        continue;
                    }
                    let topic = String::from_utf8_lossy(&p.topic);
                    let channel = channel_of(&topic);
                    let Some(msg) = message(&topic, &p.payload) else {
                        // Outside the filters: nothing for the fleet; acknowledged so that it
                        // does not come back.
                        tracing::warn!(%topic, "A message outside ember/v1/<device>/<channel>; not forwarded.");
                        if p.qos != QoS::AtMostOnce {
                            let _ = mqtt.try_ack(&p);
                        }
                        continue;
                    };
                    if p.qos == QoS::AtMostOnce {
                        if flights.len() >= b.max_in_flight {
                            metrics.inc("bridge_messages_total", &[("channel", channel), ("outcome", "dropped")], 1);
                        } else {
                            publishes.push(publish(publisher.clone(), None, msg, Duration::ZERO));
                        }
                        continue;
                    }
                    let id = front_id + flights.len() as u64;
                    flights.push_back(Flight {
                        epoch,
                        pkid: p.pkid,
                        channel,
                        started: Instant::now(),
                        published: false,
                    });
                    publishes.push(publish(publisher.clone(), Some(id), msg, Duration::ZERO));
                }
                Ok(_) => {}
                Err(e) => {
                    connected = false;
                    ready.store(false, Ordering::Release);
                    metrics.set("mqtt_connected", &[], 0.0);
                    if was_connected {
                        tracing::warn!(error = %e, "Lost the broker connection; reconnecting.");
                        was_connected = false;
                    } else {
                        tracing::debug!(error = %e, retry_in_ms = backoff.as_millis() as u64,
                            "Cannot reach the broker.");
                    }
                    if draining.is_some() {
                        // Nothing left can be acknowledged on a new connection.
                        break;
                    }
                    tokio::select! {
                        _ = force.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(max_backoff);
                }
            },
        }
    }
    ready.store(false, Ordering::Release);
    if connected {
        let _ = mqtt.try_disconnect();
        let _ = tokio::time::timeout(DISCONNECT_TIMEOUT, async {
            while eventloop.poll().await.is_ok() {}
        })
        .await;
    }
    metrics.set("mqtt_connected", &[], 0.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_carry_the_topics_device_as_ordering_key() {
        let m = message("ember/v1/d-1/telemetry", b"\xa1\x01\x02").expect("message");
        assert_eq!(m.ordering_key, "d-1");
        assert_eq!(m.attributes[ATTR_DEVICE], "d-1");
        assert_eq!(m.attributes[ATTR_CHANNEL], "telemetry");
        assert_eq!(m.attributes[ATTR_ENCODING], "cbor");
        assert_eq!(m.data, b"\xa1\x01\x02");
        let j = message("ember/v1/d-1/status", b" {\"a\":1}").expect("message");
        assert_eq!(j.attributes[ATTR_ENCODING], "json");
        assert!(message("ember/v1//telemetry", b"").is_none());
        assert!(message("other/v1/d/telemetry", b"").is_none());
        assert!(message("ember/v1/d/telemetry/x", b"").is_none());
    }

    #[test]
    fn every_channel_goes_through_the_bridges_group() {
        let f = subscriptions("g");
        assert_eq!(f.len(), 4);
        assert!(f.iter().all(|f| f.path.starts_with("$share/g/ember/v1/+/")));
    }
}
