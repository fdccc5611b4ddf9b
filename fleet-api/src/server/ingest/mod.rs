//! Ingestion: MQTT in, database out.
//!
//! ```text
//! broker ──▶ reader (rumqttc event loop) ──bounded channel──▶ writer (batches, 1 tx each)
//!              │ classify: size, topic, decode,                 │ commit, then PUBACK
//!              │ validate, device match                         ▼
//!              └──────────── PUBACKs ◀──────── Acker (same connection only)
//! ```
//!
//! Subscriptions (QoS 1): `$share/<mqtt.share_group>/ember/v1/+/telemetry` and
//! `.../+/inference` (replicas in one group split records and results; `share_group = ""`
//! subscribes plainly), `ember/v1/+/status`
//! (every replica sees every status; applying one is idempotent) and `ember/v1/+/heartbeat`.
//!
//! The reader speaks MQTT 5 (rumqttc's v5 client; Mosquitto 2, EMQX, HiveMQ, VerneMQ and the
//! cloud brokers do), for the Session Expiry Interval: see [`session_options`].
//!
//! Lifecycle and guarantees:
//! * Acknowledgements are manual (`set_manual_acks`): a message is acknowledged by the writer
//!   after it is committed, never on receipt. With the default persistent session
//!   (`mqtt.clean_session = false`) the broker keeps whatever is unacknowledged, and what
//!   arrives while the service is down, for the next connection, for at most
//!   `mqtt.session_expiry_s` after the connection dropped. A replica that dies and never
//!   returns under its client id (SIGKILL, a node lost, a replaced pod) has its session
//!   expire then: the broker removes its subscriptions, so its share of the shared
//!   subscription goes to the live members from then on.
//! * The channel is bounded. When it is full the reader keeps the connection serviced (it
//!   carries the writer's PUBACKs) and holds what still arrives in a backlog, which the broker's
//!   in-flight window bounds: nothing is acknowledged before it is stored, so the broker stops
//!   sending when its window (the Receive Maximum this reader announces,
//!   `ingest.channel_capacity`) is full and queues the rest. QoS 0
//!   heartbeats never wait: they are dropped when the pipeline is full (counted as `dropped`).
//! * A malformed message is a reject, stored and acknowledged like any other message: it can
//!   neither crash the service nor be redelivered forever.
//! * Shutdown (the `shutdown` token): the reader stops taking new messages (they stay
//!   unacknowledged at the broker), closes the channel, keeps the connection up while the
//!   writer stores and acknowledges everything already taken, then disconnects cleanly.
//!   `force` abandons the drain; nothing unstored was acknowledged, so nothing is lost.
//! * Leaving (a replica that stops while other replicas run, [`Membership::should_leave`]):
//!   before the drain, the reader unsubscribes, keeps storing and acknowledging what the broker
//!   still delivers (what it had queued for this session) until every UNSUBACK is in and
//!   nothing arrived for [`LEAVE_QUIET`] with nothing pending, then drains, disconnects and
//!   ends its persistent session (a clean-session connection under the same client id). The
//!   broker then neither routes a share of the telemetry to this session nor keeps any for it:
//!   a replica removed for good (a scale-down) strands nothing. The last replica, and one that
//!   cannot finish leaving within half of `shutdown.grace_ms` or had to leave a message
//!   unacknowledged, keeps its session, so the broker queues for it until it returns under
//!   the same stable client id.

pub mod classify;
pub mod commits;
#[cfg(feature = "cloud")]
pub mod eventhubs;
#[cfg(feature = "cloud")]
pub mod kinesis;
#[cfg(feature = "cloud")]
pub mod pubsub;
pub mod source;
pub mod staging;
pub mod writer;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Filter, Packet, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::db::{Db, now_us};
use crate::metrics::Metrics;
use crate::server::cluster::Membership;
use crate::server::events::Events;
use classify::{Reject, RejectReason, classify};
use writer::{AckToken, Acker, Inbound, Writer};

/// MQTT's largest packet: the reader must accept anything the broker sends, or an oversized
/// message would break the connection and be redelivered forever (and an MQTT 5 broker
/// silently discards what exceeds the Maximum Packet Size a client announces). Size is
/// enforced by `ingest.max_payload_bytes` after reading (cap it at the broker too:
/// `message_size_limit`).
const MAX_MQTT_PACKET: u32 = 268_435_455;
/// At most one reject log line per reason in this interval; the rest are counted.
const REJECT_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// How long a clean disconnect may take at shutdown.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Leaving: how long nothing may arrive (with nothing pending) before the session is drained.
pub const LEAVE_QUIET: Duration = Duration::from_millis(750);
/// How often a leaving reader looks whether it is done.
const LEAVE_CHECK: Duration = Duration::from_millis(50);

/// What the API's health check reads.
#[derive(Debug, Default)]
pub struct IngestState {
    /// Connected to the broker.
    pub connected: AtomicBool,
    /// Connected, and the broker confirmed every subscription.
    pub subscribed: AtomicBool,
}

/// The subscription filters for `share_group`.
pub fn subscriptions(share_group: &str) -> Vec<Filter> {
    let shared = |channel: &str| {
        if share_group.is_empty() {
            format!("ember/v1/+/{channel}")
        } else {
            format!("$share/{share_group}/ember/v1/+/{channel}")
        }
    };
    vec![
        Filter::new(shared("telemetry"), QoS::AtLeastOnce),
        Filter::new(shared("inference"), QoS::AtLeastOnce),
        Filter::new("ember/v1/+/status", QoS::AtLeastOnce),
        Filter::new("ember/v1/+/heartbeat", QoS::AtLeastOnce),
    ]
}

/// Runs a [`source::IngestSource`] other than the broker into a writer until `shutdown`, then
/// lets the writer store everything the source handed over (or stops at `force`). The MQTT
/// reader ([`run`]) keeps its own loop: its connection also carries the writer's PUBACKs and
/// the leave protocol of scale-out, but it keeps the same contract.
#[allow(clippy::too_many_arguments)]
pub async fn drive(
    source: Box<dyn source::IngestSource>,
    settings: Arc<Settings>,
    db: Db,
    metrics: Arc<Metrics>,
    state: Arc<IngestState>,
    events: Arc<Events>,
    rollouts: Arc<crate::ota::rollout::service::Service>,
    shutdown: CancellationToken,
    force: CancellationToken,
) {
    let name = source.name();
    let (tx, rx) = mpsc::channel::<Inbound>(settings.ingest.channel_capacity);
    let writer = tokio::spawn(writer::run(
        rx,
        Writer {
            db,
            metrics,
            settings: settings.ingest.clone(),
            acker: source.acknowledger(),
            events,
            rollouts,
            // Commit watermarks need a way back to the device (MQTT today): agents behind
            // this source settle by their commit timeout instead.
            commits: Arc::new(commits::Commits::default()),
        },
        force,
    ));
    let intake = source::Intake::new(tx, settings.ingest.max_payload_bytes);
    source.run(intake, state.clone(), shutdown).await;
    // Every Intake clone is gone with the source's tasks: the channel closes and the writer
    // returns once all is stored.
    let _ = writer.await;
    state.connected.store(false, Ordering::Release);
    tracing::info!(source = name, "Ingestion stopped.");
}

struct RejectLog {
    last: HashMap<RejectReason, (Instant, u64)>,
}

impl RejectLog {
    fn log(&mut self, r: &Reject) {
        let now = Instant::now();
        match self.last.get_mut(&r.reason) {
            Some((at, suppressed)) if now.duration_since(*at) < REJECT_LOG_INTERVAL => {
                *suppressed += 1;
            }
            slot => {
                let suppressed = slot.map(|(_, s)| *s).unwrap_or(0);
                tracing::warn!(device = %r.device, reason = r.reason.as_str(), topic = %r.topic,
                    detail = %r.detail, suppressed_since_last = suppressed,
                    "Rejected a message.");
                self.last.insert(r.reason, (now, 0));
            }
        }
    }
}

/// Runs ingestion until `shutdown` has drained (or `force` fires).
// Each argument is a distinct shared service handed over by `crate::run`; a struct bundling
// them would only rename the list.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    settings: Arc<Settings>,
    db: Db,
    metrics: Arc<Metrics>,
    state: Arc<IngestState>,
    events: Arc<Events>,
    rollouts: Arc<crate::ota::rollout::service::Service>,
    membership: Arc<Membership>,
    shutdown: CancellationToken,
    force: CancellationToken,
) {
    #[cfg(not(feature = "cloud"))]
    if settings.ingest.source != crate::config::IngestSource::Mqtt {
        // Refused by `Settings::check_build` already, for callers that skip it.
        tracing::error!(
            "This ingest.source needs ember-fleet built with its `cloud` feature; ingestion does not start."
        );
        return;
    }
    #[cfg(feature = "cloud")]
    if let crate::config::IngestSource::EventHubs(e) = &settings.ingest.source {
        let e = e.clone();
        return eventhubs::run(
            settings, e, db, metrics, state, events, rollouts, shutdown, force,
        )
        .await;
    }
    #[cfg(feature = "cloud")]
    if let crate::config::IngestSource::Kinesis(k) = &settings.ingest.source {
        let k = k.clone();
        return kinesis::run(
            settings, k, db, metrics, state, events, rollouts, shutdown, force,
        )
        .await;
    }
    #[cfg(feature = "cloud")]
    if let crate::config::IngestSource::PubSub(p) = &settings.ingest.source {
        let p = p.clone();
        return pubsub::run(
            settings, p, db, metrics, state, events, rollouts, shutdown, force,
        )
        .await;
    }
    let m = &settings.mqtt;
    let mut opts = session_options(m);
    opts.set_manual_acks(true);
    opts.set_max_packet_size(Some(MAX_MQTT_PACKET));
    // The broker's in-flight window towards this reader (MQTT 5 Receive Maximum): it bounds
    // the backlog below, since nothing is acknowledged before it is stored.
    opts.set_receive_maximum(Some(
        u16::try_from(settings.ingest.channel_capacity.max(1)).unwrap_or(u16::MAX),
    ));
    if let Err(e) = crate::tls::apply_mqtt_v5(&mut opts, m) {
        tracing::error!(error = %e, "Cannot set up TLS to the broker; ingestion does not start.");
        return;
    }
    // The writer acks a whole batch at once, without waiting: room for all of them.
    let request_capacity = settings.ingest.channel_capacity + 64;
    opts.set_request_channel_capacity(request_capacity);
    let (client, mut eventloop) = AsyncClient::new(opts, request_capacity);

    let epoch = Arc::new(AtomicU64::new(0));
    // Commit watermarks go out on this connection (retained QoS 0, see `commits::MqttSink`).
    let commits = Arc::new(commits::Commits::default());
    let commits_stop = CancellationToken::new();
    let commit_publisher = tokio::spawn(commits.clone().run(
        db.clone(),
        Arc::new(commits::MqttSink {
            client: client.clone(),
        }),
        metrics.clone(),
        commits_stop.clone(),
    ));
    let (tx, rx) = mpsc::channel::<Inbound>(settings.ingest.channel_capacity);
    let mut writer = tokio::spawn(writer::run(
        rx,
        Writer {
            db,
            metrics: metrics.clone(),
            settings: settings.ingest.clone(),
            acker: Arc::new(Acker {
                client: client.clone(),
                epoch: epoch.clone(),
                state: state.clone(),
            }),
            events,
            rollouts,
            commits,
        },
        force.clone(),
    ));

    let filters = subscriptions(&m.share_group);
    let max_payload = settings.ingest.max_payload_bytes;
    let mut tx = Some(tx);
    // Messages read but not yet in the channel. The event loop is polled even while the
    // channel is full (it carries the writer's PUBACKs out), so messages can arrive meanwhile;
    // their number is bounded by the broker's in-flight window, because nothing is
    // acknowledged before it is stored.
    let mut backlog: VecDeque<Inbound> = VecDeque::new();
    let mut rejects = RejectLog {
        last: HashMap::new(),
    };
    let mut backoff = Duration::from_millis(m.reconnect_min_ms);
    let max_backoff = Duration::from_millis(m.reconnect_max_ms);
    let mut was_connected = false;
    let mut writer_done = false;
    // Leaving the shared subscription (see the module header).
    let mut leave: Option<Leave> = None;
    let mut shutdown_seen = false;
    let leave_max = Duration::from_millis(settings.shutdown.grace_ms / 2);
    let mut leave_check = tokio::time::interval(LEAVE_CHECK);

    loop {
        if let Some(tx) = &tx {
            metrics.set(
                "ingest_pending",
                &[],
                (tx.max_capacity() - tx.capacity() + backlog.len()) as f64,
            );
        }
        let step = tokio::select! {
            biased;
            _ = force.cancelled() => Step::Stop,
            _ = shutdown.cancelled(), if tx.is_some() && !shutdown_seen => {
                shutdown_seen = true;
                if state.connected.load(Ordering::Acquire) && membership.should_leave().await {
                    let mut unsubscribing = 0;
                    for f in &filters {
                        if client.try_unsubscribe(f.path.clone()).is_ok() {
                            unsubscribing += 1;
                        }
                    }
                    tracing::info!(client_id = %m.client_id,
                        "Other replicas run: leaving the shared subscription (storing what the broker still delivers to this session, then ending it).");
                    leave = Some(Leave {
                        started: Instant::now(),
                        last_message: Instant::now(),
                        unsubacks_due: unsubscribing,
                        unacknowledged: false,
                    });
                    Step::Continue
                } else {
                    Step::Drain
                }
            }
            _ = leave_check.tick(), if leave.is_some() && tx.is_some() => {
                let idle = tx.as_ref().is_some_and(|t| t.capacity() == t.max_capacity()) && backlog.is_empty();
                match &leave {
                    Some(l) if l.unsubacks_due == 0 && idle && l.last_message.elapsed() >= LEAVE_QUIET => Step::Drain,
                    Some(l) if l.started.elapsed() >= leave_max => {
                        tracing::warn!("Could not finish leaving the shared subscription within half of shutdown.grace_ms; keeping the MQTT session.");
                        if let Some(l) = leave.as_mut() {
                            l.unacknowledged = true;
                        }
                        Step::Drain
                    }
                    _ => Step::Continue,
                }
            }
            permit = reserve(&tx), if !backlog.is_empty() => {
                match (permit, backlog.pop_front()) {
                    (Some(permit), Some(m)) => {
                        permit.send(m);
                        Step::Continue
                    }
                    _ => {
                        tracing::error!("The database writer stopped; ingestion ends.");
                        Step::Stop
                    }
                }
            }
            res = &mut writer, if tx.is_none() && !writer_done => {
                writer_done = true;
                if let Err(e) = res {
                    tracing::error!(error = %e, "The database writer failed.");
                }
                Step::Stop
            }
            ev = eventloop.poll() => Step::Event(ev),
        };
        let ev = match step {
            Step::Stop => break,
            Step::Continue => continue,
            Step::Drain => {
                tracing::info!(
                    not_taken = backlog.len(),
                    "Shutting down ingestion: storing and acknowledging what was taken; the rest stays with the broker."
                );
                tx = None;
                backlog.clear();
                continue;
            }
            Step::Event(ev) => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                if ack.code != ConnectReturnCode::Success {
                    tracing::error!(code = ?ack.code, "The broker refused the connection.");
                    continue;
                }
                epoch.fetch_add(1, Ordering::AcqRel);
                state.connected.store(true, Ordering::Release);
                metrics.set("mqtt_connected", &[], 1.0);
                metrics.inc("mqtt_connections_total", &[], 1);
                backoff = Duration::from_millis(m.reconnect_min_ms);
                was_connected = true;
                tracing::info!(host = %m.host, port = m.port, client_id = %m.client_id,
                    session_present = ack.session_present,
                    session_expiry_s = session_expiry(m).unwrap_or(0),
                    "Connected to the broker (MQTT 5).");
                if let Err(e) = client.try_subscribe_many(filters.clone()) {
                    tracing::error!(error = %e, "Could not subscribe.");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                {
                    state.subscribed.store(false, Ordering::Release);
                    tracing::error!(codes = ?ack.return_codes,
                        "The broker refused a subscription (does it allow $share subscriptions? set mqtt.share_group = \"\" if not).");
                } else {
                    state.subscribed.store(true, Ordering::Release);
                    tracing::info!("Subscribed.");
                }
            }
            Ok(Event::Incoming(Packet::UnsubAck(_))) => {
                if let Some(l) = leave.as_mut() {
                    l.unsubacks_due = l.unsubacks_due.saturating_sub(1);
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if let Some(l) = leave.as_mut() {
                    l.last_message = Instant::now();
                }
                let Some(sender) = &tx else {
                    // Draining: leave it unacknowledged; the broker delivers it again (to
                    // this session, which therefore must not be ended).
                    if let Some(l) = leave.as_mut() {
                        l.unacknowledged = true;
                    }
                    continue;
                };
                let received_at = now_us();
                metrics.observe("payload_bytes", &[], p.payload.len() as f64);
                // MQTT 5 topics are UTF-8 (the broker checks); a stray byte only makes the
                // topic unmatchable, which `classify` rejects like any unknown topic.
                let topic = String::from_utf8_lossy(&p.topic);
                let item = classify(&topic, &p.payload, max_payload);
                let channel = match &item {
                    Ok(i) => i.channel(),
                    Err(_) => channel_of(&topic),
                };
                match &item {
                    Ok(_) => metrics.inc(
                        "messages_total",
                        &[("channel", channel), ("outcome", "accepted")],
                        1,
                    ),
                    Err(r) => {
                        metrics.inc(
                            "messages_total",
                            &[("channel", channel), ("outcome", "rejected")],
                            1,
                        );
                        metrics.inc("rejects_total", &[("reason", r.reason.as_str())], 1);
                        rejects.log(r);
                    }
                }
                let ack = (p.qos != QoS::AtMostOnce).then(|| AckToken {
                    epoch: epoch.load(Ordering::Acquire),
                    pkid: p.pkid,
                });
                let inbound = Inbound {
                    ack,
                    checkpoint: None,
                    received_at,
                    item,
                };
                if ack.is_none() {
                    // QoS 0 (heartbeats): never queued behind a backlog; dropped when full.
                    if !backlog.is_empty() || sender.try_send(inbound).is_err() {
                        metrics.inc(
                            "messages_total",
                            &[("channel", channel), ("outcome", "dropped")],
                            1,
                        );
                    }
                    continue;
                }
                if backlog.is_empty() {
                    match sender.try_send(inbound) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(m)) => backlog.push_back(m),
                        Err(mpsc::error::TrySendError::Closed(_)) => {
                            tracing::error!("The database writer stopped; ingestion ends.");
                            break;
                        }
                    }
                } else {
                    backlog.push_back(inbound);
                }
            }
            Ok(_) => {}
            Err(e) => {
                if let Some(l) = leave.as_mut() {
                    // A new connection resubscribes: this one cannot leave cleanly any more.
                    l.unacknowledged = true;
                }
                state.connected.store(false, Ordering::Release);
                state.subscribed.store(false, Ordering::Release);
                metrics.set("mqtt_connected", &[], 0.0);
                if was_connected {
                    tracing::warn!(error = %e, "Lost the broker connection; reconnecting.");
                    was_connected = false;
                } else {
                    tracing::debug!(error = %e, retry_in_ms = backoff.as_millis() as u64,
                        "Cannot reach the broker.");
                }
                tokio::select! {
                    _ = force.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(max_backoff);
            }
        }
    }

    if !writer_done {
        if force.is_cancelled() {
            writer.abort();
        } else {
            // The loop ended without a drain (the writer stopped): nothing more to store.
            let _ = (&mut writer).await;
        }
    }
    commits_stop.cancel();
    let _ = commit_publisher.await;
    // Leave cleanly: the acknowledgements queued before this go out first (one channel).
    let connected = state.connected.load(Ordering::Acquire);
    if connected && !force.is_cancelled() {
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(DISCONNECT_TIMEOUT, async {
            loop {
                // The event loop reports an error once the connection is closed.
                if eventloop.poll().await.is_err() {
                    break;
                }
            }
        })
        .await;
    }
    if let Some(l) = &leave
        && connected
        && !l.unacknowledged
        && !force.is_cancelled()
    {
        match end_session(m).await {
            Ok(()) => {
                metrics.inc("mqtt_sessions_ended_total", &[], 1);
                tracing::info!(client_id = %m.client_id, "Left the shared subscription and ended this replica's MQTT session.");
            }
            Err(e) => tracing::warn!(error = %e, client_id = %m.client_id,
                "Could not end this replica's MQTT session; the broker keeps it until it expires or this client id connects again."),
        }
    }
    state.connected.store(false, Ordering::Release);
    state.subscribed.store(false, Ordering::Release);
    metrics.set("mqtt_connected", &[], 0.0);
    tracing::info!("Ingestion stopped.");
}

/// A reader leaving the shared subscription.
struct Leave {
    started: Instant,
    last_message: Instant,
    unsubacks_due: usize,
    /// Something was (or may have been) left unacknowledged: keep the session.
    unacknowledged: bool,
}

/// The Session Expiry Interval this reader asks for: `mqtt.session_expiry_s` with a
/// persistent session, none (the session ends with the connection) with a clean one.
pub fn session_expiry(m: &crate::config::MqttSettings) -> Option<u32> {
    (!m.clean_session).then_some(m.session_expiry_s)
}

/// MQTT 5 options for the reader's session: client id, credentials, keep-alive, and the
/// session's lifetime. A persistent session (`mqtt.clean_session = false`) resumes what the
/// broker kept (Clean Start 0) and lives on for `mqtt.session_expiry_s` after the connection
/// drops (Session Expiry Interval): a replica that dies and never comes back under its id
/// has its session, its subscriptions and its share of the shared subscription removed by
/// the broker when that interval ends.
fn session_options(m: &crate::config::MqttSettings) -> MqttOptions {
    let mut opts = MqttOptions::new(m.client_id.clone(), m.host.clone(), m.ingest_port);
    opts.set_keep_alive(Duration::from_secs(m.keep_alive_s));
    opts.set_clean_start(m.clean_session);
    opts.set_session_expiry_interval(session_expiry(m));
    if let Some(user) = &m.username {
        opts.set_credentials(user.clone(), m.password.clone().unwrap_or_default());
    }
    opts
}

/// Ends the persistent session of `m.client_id` at the broker: a Clean Start connection
/// under the same id, with no Session Expiry Interval, makes the broker discard the old
/// session and its subscriptions and keep nothing after this connection (MQTT 5, 3.1.2.4
/// and 3.1.2.11.2), then disconnects.
async fn end_session(m: &crate::config::MqttSettings) -> Result<(), String> {
    let mut opts = MqttOptions::new(m.client_id.clone(), m.host.clone(), m.ingest_port);
    opts.set_keep_alive(Duration::from_secs(m.keep_alive_s));
    opts.set_clean_start(true);
    if let Some(user) = &m.username {
        opts.set_credentials(user.clone(), m.password.clone().unwrap_or_default());
    }
    crate::tls::apply_mqtt_v5(&mut opts, m).map_err(|e| e.to_string())?;
    let (client, mut el) = AsyncClient::new(opts, 4);
    let done = tokio::time::timeout(DISCONNECT_TIMEOUT * 2, async {
        let mut acked = false;
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    if ack.code != ConnectReturnCode::Success {
                        return Err(format!("the broker refused the connection: {:?}", ack.code));
                    }
                    acked = true;
                    let _ = client.try_disconnect();
                }
                Ok(_) => {}
                // The broker closed the connection after the DISCONNECT: done.
                Err(_) if acked => return Ok(()),
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await;
    match done {
        Ok(r) => r,
        Err(_) => Err("the broker did not answer in time".into()),
    }
}

/// What one turn of the reader's loop does next.
// One value per turn, moved straight into a match: boxing the event would allocate per message.
#[allow(clippy::large_enum_variant)]
enum Step {
    Stop,
    Continue,
    Drain,
    Event(Result<Event, ConnectionError>),
}

/// A permit to send on the channel; pending forever once the channel is gone (draining).
async fn reserve(tx: &Option<mpsc::Sender<Inbound>>) -> Option<mpsc::Permit<'_, Inbound>> {
    match tx {
        Some(tx) => tx.reserve().await.ok(),
        None => std::future::pending().await,
    }
}

fn channel_of(topic: &str) -> &'static str {
    match topic.rsplit('/').next() {
        Some("telemetry") => "telemetry",
        Some("inference") => "inference",
        Some("status") => "status",
        Some("heartbeat") => "heartbeat",
        _ => "other",
    }
}
