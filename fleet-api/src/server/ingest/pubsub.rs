//! The Google Pub/Sub source: reads the subscription that `ember-fleet bridge` ([`crate::bridge`])
//! fills, as an [`IngestSource`].
//!
//! ```text
//! broker ─▶ bridge ─publish (ordering key = device)─▶ topic ─▶ subscription (ordering on)
//!                                                                  │ streaming pull
//!   Pending (token → ack id) ◀── register ── reader ─classify─▶ Intake ─▶ writer (1 tx)
//!        │                                     │ refused: copy to the dead-letter topic first
//!        └── after commit: Acknowledge ─▶ ack batcher ─▶ Acknowledge RPC (many ack ids)
//! ```
//!
//! Message format (written by the bridge, never by a device): `data` is the MQTT payload as
//! the agent published it (JSON or CBOR); attributes `device` (from the MQTT topic, which the
//! broker's ACL binds to the client certificate), `channel`, `mqtt_topic`, `encoding`; the ordering
//! key is the device id. (The BigQuery subscriptions of terraform/gcp read the same attributes.)
//!
//! Guarantees:
//! * A message is acknowledged only after the transaction holding it committed
//!   ([`Settle::After`]; the [`AckToken`]'s `epoch` is the key of the message's ack id in
//!   [`Pending`], `pkid` is unused). A crash before that makes Pub/Sub deliver it again after
//!   its ack deadline (`ingest.pubsub.ack_deadline_s`), to this replica or another; the
//!   idempotent inserts drop what was already stored. Nothing is lost, nothing stored twice.
//! * Order: with message ordering on the subscription (terraform/gcp sets it), Pub/Sub hands
//!   one device's messages to one streaming pull at a time, in publish order, and delivers a
//!   message again together with every later one of its key. The reader hands them to the
//!   writer in the order received and the writer commits batches in that order, so a device's
//!   records are first stored in the order the bridge published them; a redelivered message
//!   repeats records already stored (dropped).
//! * Several replicas on one subscription: Pub/Sub spreads ordering keys over the streaming
//!   pulls; nothing is partitioned or leased by the fleet.
//! * A message the fleet refuses (no trusted `device`/`channel` attribute, or a payload that
//!   classification refuses: it would be refused again, forever) is copied to
//!   `ingest.pubsub.dead_letter_topic` (with the reason as attributes) BEFORE it is handed to
//!   the writer, stored as a reject, and acknowledged after that commit: it is never
//!   redelivered forever. The copy is published by the fleet, so it works on the emulator,
//!   which has no dead-letter policies; a subscription's own dead-letter policy (terraform/gcp)
//!   stays a backstop for messages no replica ever acknowledges.
//! * Backpressure: [`Intake::send_classified`] waits while the writer's channel is full, and
//!   Pub/Sub stops sending once `ingest.pubsub.max_outstanding` messages are unacknowledged.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ember_proto::Channel;
use futures_util::StreamExt;
use gcloud_googleapis::pubsub::v1::PubsubMessage;
use gcloud_pubsub::client::Client;
use gcloud_pubsub::publisher::Publisher;
use gcloud_pubsub::subscriber::{ReceivedMessage, SubscriberConfig};
use gcloud_pubsub::subscription::{SubscribeConfig, Subscription};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::IngestState;
use super::classify::{Reject, RejectReason};
use super::source::{Acknowledge, BoxFuture, IngestSource, Intake, Settle, SourceMessage};
use super::writer::AckToken;
use crate::cloud::gcp::{self, GcpError};
use crate::config::PubSubSettings;
use crate::db::{Db, now_us};
use crate::metrics::Metrics;

/// Ack ids per Acknowledge call (Pub/Sub takes up to 2,500 and 512 KB per request).
const ACK_BATCH: usize = 1000;
/// How long acknowledgements may gather before they are sent.
const ACK_DELAY: Duration = Duration::from_millis(20);
/// How long the acknowledgements of what was stored may take at shutdown.
const ACK_DRAIN: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Attribute names the bridge sets.
pub const ATTR_DEVICE: &str = "device";
pub const ATTR_CHANNEL: &str = "channel";
pub const ATTR_TOPIC: &str = "mqtt_topic";
pub const ATTR_ENCODING: &str = "encoding";
/// Attributes the fleet adds to a dead-lettered copy.
pub const ATTR_REJECT_REASON: &str = "ember_reject_reason";
pub const ATTR_REJECT_DETAIL: &str = "ember_reject_detail";

/// Ack ids of messages handed to the writer, by the token the writer gives back.
#[derive(Default)]
pub struct Pending {
    next: AtomicU64,
    ids: Mutex<HashMap<u64, String>>,
}

impl Pending {
    fn register(&self, ack_id: String) -> AckToken {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        self.ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, ack_id);
        AckToken {
            epoch: key,
            pkid: 0,
        }
    }

    fn take(&self, token: AckToken) -> Option<String> {
        self.ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&token.epoch)
    }
}

/// Hands the ack ids of committed messages to the ack batcher.
struct PubSubAcker {
    pending: Arc<Pending>,
    tx: mpsc::UnboundedSender<String>,
}

impl Acknowledge for PubSubAcker {
    fn ack<'a>(&'a self, token: AckToken, _: &'a Metrics) -> BoxFuture<'a, ()> {
        if let Some(id) = self.pending.take(token) {
            // Closed only once the batcher gave up at shutdown: the message is delivered again.
            let _ = self.tx.send(id);
        }
        Box::pin(async {})
    }
}

/// Reads a Pub/Sub subscription (streaming pull).
pub struct PubSubSource {
    settings: PubSubSettings,
    subscription: Subscription,
    dead_letter: Option<Publisher>,
    metrics: Arc<Metrics>,
    pending: Arc<Pending>,
    acks: mpsc::UnboundedSender<String>,
}

impl IngestSource for PubSubSource {
    fn name(&self) -> &'static str {
        "pubsub"
    }

    fn acknowledger(&self) -> Arc<dyn Acknowledge> {
        Arc::new(PubSubAcker {
            pending: self.pending.clone(),
            tx: self.acks.clone(),
        })
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

/// What a Pub/Sub message is to the fleet.
#[derive(Debug)]
enum Envelope {
    Message {
        device: String,
        channel: Channel,
    },
    /// Not something the bridge wrote: stored as a reject under this device.
    Refused {
        device: String,
        detail: String,
    },
}

/// Reads the bridge's attributes (the payload is classified like an MQTT message's).
fn envelope(attributes: &HashMap<String, String>) -> Envelope {
    let device = attributes.get(ATTR_DEVICE).filter(|d| !d.is_empty());
    let channel = attributes.get(ATTR_CHANNEL);
    match (device, channel) {
        (Some(device), Some(c)) => match Channel::from_str(c) {
            Ok(channel) => Envelope::Message {
                device: device.clone(),
                channel,
            },
            Err(()) => Envelope::Refused {
                device: device.clone(),
                detail: format!("the message's channel attribute {c:?} is not an Ember channel"),
            },
        },
        (device, _) => Envelope::Refused {
            device: device
                .cloned()
                .unwrap_or_else(|| super::classify::INVALID_DEVICE.to_string()),
            detail:
                "the message lacks the device or channel attribute that ember-fleet bridge sets"
                    .to_string(),
        },
    }
}

impl PubSubSource {
    async fn read(self, intake: Intake, state: Arc<IngestState>, shutdown: CancellationToken) {
        let mut backoff = BACKOFF_MIN;
        let config = SubscribeConfig::default()
            .with_channel_capacity(self.settings.max_outstanding.clamp(1, 10_000) as usize)
            .with_subscriber_config(SubscriberConfig {
                stream_ack_deadline_seconds: self.settings.ack_deadline_s,
                max_outstanding_messages: self.settings.max_outstanding,
                ..SubscriberConfig::default()
            });
        'connect: loop {
            let mut stream = tokio::select! {
                _ = shutdown.cancelled() => break 'connect,
                r = self.subscription.subscribe(Some(config.clone())) => match r {
                    Ok(s) => s,
                    Err(e) => {
                        self.metrics.inc("pubsub_errors_total", &[("kind", "subscribe")], 1);
                        tracing::warn!(subscription = %self.settings.subscription, error = %e,
                            "Cannot open the Pub/Sub streaming pull (does the subscription exist, and may this identity subscribe?); retrying.");
                        if pause(&shutdown, backoff).await {
                            break 'connect;
                        }
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        continue 'connect;
                    }
                },
            };
            state.connected.store(true, Ordering::Release);
            state.subscribed.store(true, Ordering::Release);
            tracing::info!(subscription = %self.settings.subscription, "Reading the Pub/Sub subscription.");
            loop {
                let m = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => None,
                    m = stream.next() => m,
                };
                let Some(m) = m else { break };
                backoff = BACKOFF_MIN;
                if !self.handle(&intake, m, &shutdown).await {
                    break;
                }
            }
            // What the client buffered and was not handed over is nacked: delivered again.
            let nacked = stream.dispose().await;
            state.subscribed.store(false, Ordering::Release);
            if shutdown.is_cancelled() || intake.is_closed() {
                tracing::info!(
                    nacked,
                    "Stopped reading the Pub/Sub subscription; what was taken is being stored."
                );
                break 'connect;
            }
            self.metrics
                .inc("pubsub_errors_total", &[("kind", "subscribe")], 1);
            tracing::warn!(subscription = %self.settings.subscription, retry_in_ms = backoff.as_millis() as u64,
                "The Pub/Sub streaming pull ended (does the subscription exist, and may this identity subscribe?); opening it again.");
            if pause(&shutdown, backoff).await {
                break 'connect;
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
        state.subscribed.store(false, Ordering::Release);
    }

    /// One message: refused ones to the dead-letter topic first, then to the writer. False
    /// when reading must stop (shutdown during a dead-letter publish, or the writer gone).
    async fn handle(
        &self,
        intake: &Intake,
        m: ReceivedMessage,
        shutdown: &CancellationToken,
    ) -> bool {
        let received_at = now_us();
        let attributes = &m.message.attributes;
        let (sm, item) = match envelope(attributes) {
            Envelope::Message { device, channel } => {
                let sm = SourceMessage {
                    device,
                    channel,
                    payload: m.message.data.clone(),
                    received_at,
                    ack: Settle::Nothing,
                };
                let item = intake.classify(&sm);
                (sm, item)
            }
            Envelope::Refused { device, detail } => {
                let topic = attributes.get(ATTR_TOPIC).cloned().unwrap_or_default();
                let reject = Reject {
                    device: device.clone(),
                    reason: RejectReason::BadTopic,
                    topic,
                    detail,
                    refused: None,
                };
                let sm = SourceMessage {
                    device,
                    channel: Channel::Telemetry,
                    payload: Vec::new(),
                    received_at,
                    ack: Settle::Nothing,
                };
                (sm, Err(reject))
            }
        };
        match &item {
            Ok(_) => self
                .metrics
                .inc("pubsub_messages_total", &[("outcome", "message")], 1),
            Err(r) => {
                self.metrics
                    .inc("pubsub_messages_total", &[("outcome", "refused")], 1);
                self.metrics
                    .inc("rejects_total", &[("reason", r.reason.as_str())], 1);
                tracing::warn!(device = %r.device, reason = r.reason.as_str(), detail = %r.detail,
                    message_id = %m.message.message_id, "Refused a Pub/Sub message.");
                if let Some(dl) = &self.dead_letter
                    && !self.dead_letter_copy(dl, &m.message, r, shutdown).await
                {
                    // Shutdown while the copy was not yet published: leave the message to
                    // Pub/Sub (nothing acknowledged), it comes back.
                    return false;
                }
            }
        }
        let token = self.pending.register(m.ack_id.clone());
        let sm = SourceMessage {
            ack: Settle::After(token),
            ..sm
        };
        intake.send_classified(sm, item).await.is_ok()
    }

    /// Publishes a copy of a refused message to the dead-letter topic, retrying until Pub/Sub
    /// took it; false if `shutdown` came first.
    async fn dead_letter_copy(
        &self,
        dl: &Publisher,
        original: &PubsubMessage,
        r: &Reject,
        shutdown: &CancellationToken,
    ) -> bool {
        let mut attributes = original.attributes.clone();
        attributes.insert(ATTR_REJECT_REASON.into(), r.reason.as_str().into());
        attributes.insert(ATTR_REJECT_DETAIL.into(), r.detail.clone());
        let copy = PubsubMessage {
            data: original.data.clone(),
            attributes,
            ..Default::default()
        };
        let mut backoff = BACKOFF_MIN;
        loop {
            let sent = tokio::select! {
                _ = shutdown.cancelled() => return false,
                r = async { dl.publish(copy.clone()).await.get().await } => r,
            };
            match sent {
                Ok(_) => {
                    self.metrics
                        .inc("pubsub_messages_total", &[("outcome", "dead_lettered")], 1);
                    return true;
                }
                Err(e) => {
                    self.metrics
                        .inc("pubsub_errors_total", &[("kind", "dead_letter")], 1);
                    tracing::warn!(error = %e, "Cannot publish to the dead-letter topic; retrying.");
                    if pause(shutdown, backoff).await {
                        return false;
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

/// Waits `d`; true when `stop` fired first.
async fn pause(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

/// Sends the ack ids of committed messages in batches until every sender is gone (the writer
/// and the source finished).
async fn ack_batcher(
    subscription: Subscription,
    mut rx: mpsc::UnboundedReceiver<String>,
    metrics: Arc<Metrics>,
) {
    let mut batch: Vec<String> = Vec::new();
    loop {
        let first = match rx.recv().await {
            Some(id) => id,
            None => return,
        };
        batch.push(first);
        let deadline = tokio::time::Instant::now() + ACK_DELAY;
        while batch.len() < ACK_BATCH {
            tokio::select! {
                id = rx.recv() => match id {
                    Some(id) => batch.push(id),
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        let n = batch.len() as u64;
        match subscription.ack(std::mem::take(&mut batch)).await {
            Ok(()) => metrics.inc("pubsub_acks_total", &[("outcome", "acked")], n),
            Err(e) => {
                // Delivered again after the ack deadline and dropped as duplicates.
                metrics.inc("pubsub_acks_total", &[("outcome", "failed")], n);
                metrics.inc("pubsub_errors_total", &[("kind", "ack")], 1);
                tracing::warn!(error = %e, messages = n,
                    "Pub/Sub refused an acknowledgement; those messages come again and are deduplicated.");
            }
        }
    }
}

/// Connects, then drives the source into a writer until `shutdown` and drains (like
/// [`super::kinesis::run`]); the acknowledgements of the drain are sent before it returns.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    settings: Arc<crate::config::Settings>,
    p: PubSubSettings,
    db: Db,
    metrics: Arc<Metrics>,
    state: Arc<IngestState>,
    events: Arc<crate::server::events::Events>,
    rollouts: Arc<crate::ota::rollout::service::Service>,
    shutdown: CancellationToken,
    force: CancellationToken,
) {
    let client = match connect(&p).await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "Cannot set up the Pub/Sub client; ingestion does not start.");
            return;
        }
    };
    let (_, sub_id) = gcp::split_name(&p.subscription, "subscriptions");
    let subscription = client.subscription(sub_id);
    let dead_letter = p.dead_letter_topic.as_deref().map(|t| {
        let (_, id) = gcp::split_name(t, "topics");
        client.topic(id).new_publisher(None)
    });
    let (acks, rx) = mpsc::unbounded_channel();
    let batcher = tokio::spawn(ack_batcher(subscription.clone(), rx, metrics.clone()));
    let source = Box::new(PubSubSource {
        settings: p,
        subscription,
        dead_letter: dead_letter.clone(),
        metrics: metrics.clone(),
        pending: Arc::new(Pending::default()),
        acks,
    });
    super::drive(
        source, settings, db, metrics, state, events, rollouts, shutdown, force,
    )
    .await;
    // The writer and the source are gone: the batcher ends once it sent what is left.
    if tokio::time::timeout(ACK_DRAIN, batcher).await.is_err() {
        tracing::warn!(
            "Could not send every Pub/Sub acknowledgement in time; those messages come again and are deduplicated."
        );
    }
    if let Some(mut dl) = dead_letter {
        dl.shutdown().await;
    }
}

async fn connect(p: &PubSubSettings) -> Result<Client, GcpError> {
    gcp::client(
        p.project.as_deref(),
        &p.subscription,
        "subscriptions",
        "ingest.pubsub.project",
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn envelopes_come_from_the_bridges_attributes() {
        assert!(matches!(
            envelope(&attrs(&[("device", "d1"), ("channel", "telemetry")])),
            Envelope::Message { ref device, channel: Channel::Telemetry } if device == "d1"
        ));
        assert!(matches!(
            envelope(&attrs(&[("device", "d1"), ("channel", "desired")])),
            Envelope::Refused { ref device, .. } if device == "d1"
        ));
        assert!(matches!(
            envelope(&attrs(&[("channel", "telemetry")])),
            Envelope::Refused { ref device, .. } if device == super::super::classify::INVALID_DEVICE
        ));
    }

    #[test]
    fn pending_ack_ids_are_taken_once() {
        let p = Pending::default();
        let a = p.register("a".into());
        let b = p.register("b".into());
        assert_ne!(a, b);
        assert_eq!(p.take(b).as_deref(), Some("b"));
        assert_eq!(p.take(b), None);
        assert_eq!(p.take(a).as_deref(), Some("a"));
    }
}
