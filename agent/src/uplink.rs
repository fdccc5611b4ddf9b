//! The uplink: moves durable records from the queue to the MQTT broker, and deletes them when
//! the broker acknowledges them.
//!
//! # State machine
//!
//! ```text
//!            connect ok                 backlog <= 2 messages/stream
//!  Offline ─────────────▶ CatchingUp ─────────────────────────────▶ Online
//!     ▲   ◀── error ────────┘  ▲                                      │
//!     └──────── error ─────────┼──────────────────────────────────────┘
//!                              └──── backlog grows (e.g. a burst) ────┘
//!  any state ── shutdown ──▶ Draining ── queue empty or grace over ──▶ (exit)
//! ```
//!
//! * **Offline:** reconnect with exponential backoff (`reconnect_min_ms` doubling up to
//!   `reconnect_max_ms`) and full jitter, so a fleet does not reconnect in lockstep after a
//!   broker restart. Records keep accumulating in the durable queue.
//! * **CatchingUp / Online:** streams are served round-robin, one message each per turn, so a
//!   stream with a large backlog cannot starve a stream with live data; status and heartbeat
//!   never wait behind telemetry. While catching up, full messages go out back to back; once
//!   caught up, a partial message waits at most `message_max_delay_ms` for more records.
//!   Per stream, records are sent in sequence order (the fleet's ledger depends on it), so a
//!   stream's own live records follow its backlog.
//! * **Draining:** after SIGTERM the uplink keeps sending until every durable record is
//!   acknowledged or the grace period ends, then publishes its `offline` status and
//!   disconnects cleanly.
//!
//! # Desired state (OTA)
//!
//! With `[ota]` enabled the uplink subscribes (QoS1) to `ember/v1/{device}/desired` after
//! every CONNACK (the session is clean, so after every reconnect; the retained message arrives
//! right away) and hands each valid desired state to the OTA thread (`crate::ota`). A payload
//! that does not decode or validate is logged, counted in `ota_desired_invalid_total` and
//! ignored. Whenever an OTA report changes, the retained status is republished at once.
//!
//! # Delivery
//!
//! Telemetry is published at QoS1. rumqttc reports each QoS1 publish's packet id in order
//! (`Outgoing::Publish(pkid)`), which is how a PUBACK is matched to its records. The session
//! is clean: on reconnect rumqttc forgets unacknowledged publishes, and so does the uplink,
//! re-reading them from the queue (the fleet deduplicates on `(device, stream, seq)`).
//!
//! # End-to-end acknowledgement (`mqtt.delivery`, `docs/protocol.md`)
//!
//! A broker is a buffer, not a store of record: it can lose what it acknowledged (a restart
//! between autosaves, a shared subscription it does not restore, a queue limit). So with
//! `delivery = "commit"` (and `"auto"` once the fleet has sent one watermark) a PUBACK deletes
//! nothing: the uplink subscribes to `ember/v1/{device}/committed`, where the fleet publishes,
//! after its database transaction, per stream the highest sequence number up to which it holds
//! every record, and the queue deletes up to there ([`Queue::trim`]). A stream whose sent
//! records stay uncommitted for `commit_timeout_s` while the fleet keeps answering (a
//! watermark arrived after the last progress) is sent again from its first queued record; if
//! the fleet is silent, the uplink asks with a status message (the fleet answers every status
//! with a watermark) instead of flooding a broker that is holding messages for a fleet that is
//! down. Reconnecting re-sends only what the broker had not acknowledged.
//!
//! `"auto"` (the default) starts like `"commit"`. If no watermark has ever come from the fleet
//! (remembered in `<data_dir>/fleet-commits` once one has) and PUBACKed records have waited
//! `commit_fallback_s`, the fleet is taken to be one without end-to-end acknowledgement: what
//! the broker acknowledged is deleted and the uplink deletes on PUBACK, until a watermark
//! arrives. `"puback"` deletes on PUBACK and does not subscribe. The mode in force is in the
//! status message (`delivery`) and the `delivery_commit` gauge.
//!
//! # Azure IoT Hub (`mqtt.profile = "azure-iot-hub"`, `crate::profile::azure`)
//!
//! * **Credentials.** The username is `{hub}/{device_id}/?api-version=2021-04-12`. With
//!   `mqtt.sas_key_file` the password is a SAS token for `{hub}/devices/{device_id}`, made from
//!   the key file before every connect (a rotated key is read again) and valid
//!   `sas_token_ttl_s`; at 80 % of that the uplink disconnects and connects again with a new
//!   token (`sas_renewals_total`), before IoT Hub would close the connection. What was in
//!   flight is sent again from the queue, as after any reconnect: nothing is lost, and the
//!   fleet drops the repeats. With X.509 (`mqtt.tls.cert_file`) there is no password.
//! * **Topics.** Every message (records, status, heartbeat and the Last Will) goes to
//!   `devices/{device_id}/messages/events/` with the property bag `ember-channel=…`,
//!   `ember-stream=…` (records) and `ember-encoding=…`, never retained. Delivery is on PUBACK
//!   (the hub has stored the message; no watermark can reach a device there).
//! * **Device twin.** After every CONNACK the uplink subscribes to `$iothub/twin/res/#` and,
//!   with OTA, `$iothub/twin/PATCH/properties/desired/#`, and GETs the whole twin. The desired
//!   property `ember` (written by the fleet's `azure-twin` sink) is the desired state; a
//!   document whose `$version` is not newer than the one applied is dropped, so a patch that
//!   overtook the GET's answer is not undone by it. The status also goes to the reported
//!   property `ember`, at most once per `twin_report_min_interval_s` (changes in between are
//!   coalesced; a throttled patch, 429, is sent again), trimmed to 24 KB like the status
//!   message (`twin_reports_total`).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS,
};
use tokio_util::sync::CancellationToken;

use ember_proto::{
    Channel, Delivery, DeviceState, Heartbeat, InferenceBatch, QueueGauge, SCHEMA_VERSION, Status,
    TelemetryBatch, Topic,
};

use crate::config::{DeliveryMode, Settings};
use crate::metrics::Metrics;
use crate::profile::{Profile, azure};
use crate::queue::{Queue, StreamId};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UplinkState {
    Offline,
    CatchingUp,
    Online,
    Draining,
}

#[derive(Debug)]
enum Pending {
    Data {
        sid: StreamId,
        first: u64,
        last: u64,
        count: u64,
        sent_at: Instant,
    },
    Control,
}

/// When records leave the queue now (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// On the fleet's commit watermark.
    Commit,
    /// `delivery = "auto"` before any watermark: records are kept after PUBACK; `since` is when
    /// the first PUBACK came that no watermark has followed.
    Awaiting { since: Option<Instant> },
    /// On the broker's PUBACK.
    Puback,
}

/// What the uplink knows of one stream's commit watermark.
#[derive(Debug, Clone, Copy, Default)]
struct StreamCommit {
    /// The highest watermark received in this process.
    upto: u64,
    /// Since when sent records have waited without the watermark advancing (`None`: nothing
    /// sent is waiting).
    waiting_since: Option<Instant>,
}

/// The file that remembers that this device's fleet sends commit watermarks (`"auto"`).
pub const FLEET_COMMITS_FILE: &str = "fleet-commits";
/// How often the commit timers are checked.
const COMMIT_CHECK: Duration = Duration::from_secs(1);

/// Why `run` returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Every durable record was acknowledged.
    Drained,
    /// The grace period ended with records still queued (they stay in the queue).
    GraceExpired,
}

pub struct Uplink {
    settings: Arc<Settings>,
    queue: Arc<Queue>,
    metrics: Arc<Metrics>,
    topics: Topics,
    started: Instant,
    state: UplinkState,
    connected: bool,
    ever_connected: bool,
    /// Next sequence number to send, per stream; 0 = from the queue's head.
    cursors: Vec<u64>,
    /// When each stream first had a partial message waiting.
    waiting_since: Vec<Option<Instant>>,
    rr: usize,
    /// QoS1 publishes handed to rumqttc whose packet id is not known yet, in order.
    awaiting_pkid: VecDeque<Pending>,
    by_pkid: HashMap<u16, Pending>,
    in_flight_records: u64,
    backoff: Duration,
    failures: u64,
    /// TLS to the broker (`crate::tls`); `None` is plaintext.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// The OTA client's mailbox and reports; `None` when OTA is off.
    ota: Option<Arc<crate::ota::OtaShared>>,
    /// When records leave the queue (end-to-end acknowledgement).
    mode: Mode,
    /// Per stream, indexed like `cursors`.
    commits: Vec<StreamCommit>,
    /// When the last valid watermark arrived: the fleet is answering.
    last_watermark_at: Option<Instant>,
    /// When the uplink last asked for a watermark (with a status message).
    solicited_at: Option<Instant>,
    warned_ahead: bool,
    /// `mqtt.max_publish_rate` (AWS IoT Core's per-connection quota, `crate::profile`).
    pacer: Pacer,
    /// Where the next status too large for one message starts its list of streams.
    status_offset: usize,
    warned_status_size: bool,
    /// Azure IoT Hub's dialect (`mqtt.profile = "azure-iot-hub"`); `None` for MQTT brokers.
    azure: Option<AzureLink>,
}

/// What the uplink keeps for Azure IoT Hub (see the module docs, "Azure IoT Hub").
struct AzureLink {
    /// The device's symmetric key file (SAS); `None`: the device authenticates with X.509.
    sas_key_file: Option<std::path::PathBuf>,
    /// When the token of the current connection is renewed (80 % of its lifetime).
    renew_at: Option<tokio::time::Instant>,
    next_rid: u64,
    /// The twin GET in flight (request id), or due (`get_due`) after a refusal.
    get_rid: Option<u64>,
    get_due: bool,
    /// The desired `$version` last handed to OTA.
    desired_version: Option<u64>,
    /// The reported properties need a patch (coalesced), and when the last one went out.
    report_due: bool,
    last_report: Option<Instant>,
}

impl AzureLink {
    fn rid(&mut self) -> u64 {
        self.next_rid += 1;
        self.next_rid
    }
}

struct Topics {
    telemetry: String,
    inference: String,
    status: String,
    heartbeat: String,
    desired: String,
    committed: String,
}

impl Uplink {
    pub fn new(settings: Arc<Settings>, queue: Arc<Queue>, metrics: Arc<Metrics>) -> Self {
        let topic = |c| {
            Topic {
                device_id: settings.device_id.clone(),
                channel: c,
            }
            .render()
        };
        let topics = Topics {
            telemetry: topic(Channel::Telemetry),
            inference: topic(Channel::Inference),
            status: topic(Channel::Status),
            heartbeat: topic(Channel::Heartbeat),
            desired: format!(
                "{}/{}/{}",
                ember_proto::topic::PREFIX,
                settings.device_id,
                ember_proto::acl::DESIRED
            ),
            committed: format!(
                "{}/{}/{}",
                ember_proto::topic::PREFIX,
                settings.device_id,
                ember_proto::commit::COMMITTED
            ),
        };
        let mode = match settings.mqtt.delivery {
            DeliveryMode::Commit => Mode::Commit,
            DeliveryMode::Puback => Mode::Puback,
            DeliveryMode::Auto if settings.data_dir.join(FLEET_COMMITS_FILE).exists() => {
                Mode::Commit
            }
            DeliveryMode::Auto => Mode::Awaiting { since: None },
        };
        queue.set_evict_sent(mode != Mode::Puback);
        metrics
            .delivery_commit
            .store(u64::from(mode != Mode::Puback), Relaxed);
        let backoff = Duration::from_millis(settings.mqtt.reconnect_min_ms);
        let pacer = Pacer::new(settings.mqtt.max_publish_rate);
        let azure = (settings.mqtt.profile == Profile::AzureIotHub).then(|| AzureLink {
            sas_key_file: settings.mqtt.sas_key_file.clone(),
            renew_at: None,
            next_rid: 0,
            get_rid: None,
            get_due: false,
            desired_version: None,
            report_due: false,
            last_report: None,
        });
        let topics = if azure.is_some() {
            let events = |c| {
                azure::events_topic(
                    &settings.device_id,
                    c,
                    None,
                    settings.mqtt.encoding.as_str(),
                )
            };
            Topics {
                telemetry: events(Channel::Telemetry),
                inference: events(Channel::Inference),
                status: events(Channel::Status),
                heartbeat: events(Channel::Heartbeat),
                desired: azure::TWIN_DESIRED_PATCHES.into(),
                committed: String::new(),
            }
        } else {
            topics
        };
        Uplink {
            settings,
            queue,
            metrics,
            topics,
            started: Instant::now(),
            state: UplinkState::Offline,
            connected: false,
            ever_connected: false,
            cursors: Vec::new(),
            waiting_since: Vec::new(),
            rr: 0,
            awaiting_pkid: VecDeque::new(),
            by_pkid: HashMap::new(),
            in_flight_records: 0,
            backoff,
            failures: 0,
            tls: None,
            ota: None,
            mode,
            commits: Vec::new(),
            last_watermark_at: None,
            solicited_at: None,
            warned_ahead: false,
            pacer,
            status_offset: 0,
            warned_status_size: false,
            azure,
        }
    }

    /// Follows the desired state for the OTA client and publishes its reports.
    pub fn with_ota(mut self, ota: Option<Arc<crate::ota::OtaShared>>) -> Self {
        self.ota = ota;
        self
    }

    /// Connects over TLS with `tls` (see `crate::tls::client_config`).
    pub fn with_tls(mut self, tls: Option<Arc<rustls::ClientConfig>>) -> Self {
        self.tls = tls;
        self
    }

    fn mqtt_options(&self) -> MqttOptions {
        let m = &self.settings.mqtt;
        let mut o = MqttOptions::new(m.client_id.clone(), m.host.clone(), m.port);
        o.set_keep_alive(Duration::from_secs(m.keep_alive_s));
        o.set_clean_session(true);
        // Room for the largest message plus MQTT's own header and the topic.
        o.set_max_packet_size(1024 * 1024, m.message_max_bytes + 1024);
        o.set_inflight((m.max_in_flight + 4).min(u16::MAX as usize) as u16);
        let will =
            ember_proto::message::encode(&Status::offline(&self.settings.device_id), m.encoding)
                .unwrap_or_default();
        // IoT Hub retains nothing: its Last Will is an event like any other status.
        o.set_last_will(LastWill::new(
            self.topics.status.clone(),
            will,
            QoS::AtLeastOnce,
            self.azure.is_none(),
        ));
        if let Some(user) = &m.username {
            o.set_credentials(user.clone(), String::new());
        }
        if let Some(tls) = &self.tls {
            o.set_transport(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Rustls(
                tls.clone(),
            )));
        }
        o
    }

    fn set_state(&mut self, next: UplinkState) {
        if self.state != next {
            tracing::info!(from = ?self.state, to = ?next, "Uplink state changed.");
            self.state = next;
        }
    }

    /// Runs until `shutdown` fires and the queue is drained (or `grace` passes), or until
    /// `force` fires. `writer_done` fires when no more records will be appended.
    pub async fn run(
        mut self,
        shutdown: CancellationToken,
        writer_done: CancellationToken,
        force: CancellationToken,
    ) -> DrainOutcome {
        let (client, mut eventloop) =
            AsyncClient::new(self.mqtt_options(), self.settings.mqtt.max_in_flight + 16);
        // Small QoS1 messages and their PUBACKs should not wait for Nagle's algorithm.
        eventloop.network_options.set_tcp_nodelay(true);
        // One `poll` stays in flight across loop iterations. Dropping it whenever another branch
        // wins (a batch became durable, a timer fired) would abort a connection attempt half-way
        // (TCP connect, CONNECT, CONNACK), so while records keep arriving the agent could
        // never get back online after an outage.
        self.refresh_credentials(&mut eventloop.mqtt_options);
        let mut polling = poll_owned(eventloop);
        let mut heartbeat =
            tokio::time::interval(Duration::from_secs(self.settings.mqtt.heartbeat_s));
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut status_tick =
            tokio::time::interval(Duration::from_secs(self.settings.mqtt.status_interval_s));
        status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut commit_tick = tokio::time::interval(COMMIT_CHECK);
        commit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut drain_deadline: Option<tokio::time::Instant> = None;
        let mut retry_at: Option<tokio::time::Instant> = None;
        let linger = Duration::from_millis(self.settings.mqtt.message_max_delay_ms);
        let queue = self.queue.clone();
        let mut writer_seen_done = false;
        let ota = self.ota.clone();
        // SIGHUP: reconnect now, so rotated TLS credentials are picked up (crate::tls).
        let mut hangup = crate::tls::Hangup::install();

        let outcome = loop {
            if self.connected {
                self.fill_window(&client, drain_deadline.is_some());
            }
            if drain_deadline.is_some() && writer_done.is_cancelled() && self.fully_drained() {
                break DrainOutcome::Drained;
            }
            // Offline, nothing can be sent: a lingering partial message must not wake the loop
            // (its deadline has passed, so it would spin).
            let next_linger = if self.connected {
                self.next_linger_deadline(linger)
            } else {
                None
            };
            // The rate limit held a message back: wake when the window has room again.
            let next_pace = if self.connected {
                self.pacer
                    .next_free(Instant::now())
                    .map(tokio::time::Instant::from_std)
            } else {
                None
            };
            // Azure with SAS: when the connection's token must be replaced.
            let renew_at = if self.connected {
                self.renew_at()
            } else {
                None
            };
            tokio::select! {
                biased;
                _ = force.cancelled() => break DrainOutcome::GraceExpired,
                _ = async { tokio::time::sleep_until(drain_deadline.unwrap_or_else(far_future)).await }, if drain_deadline.is_some() => {
                    break DrainOutcome::GraceExpired;
                }
                _ = shutdown.cancelled(), if drain_deadline.is_none() => {
                    drain_deadline = Some(tokio::time::Instant::now() + self.settings.grace());
                    self.set_state(UplinkState::Draining);
                }
                _ = async { tokio::time::sleep_until(retry_at.unwrap_or_else(far_future)).await }, if retry_at.is_some() => {
                    retry_at = None;
                }
                (mut el, ev) = &mut polling, if retry_at.is_none() => {
                    if ev.is_err() {
                        // The next poll connects again: with a fresh SAS token (Azure).
                        self.refresh_credentials(&mut el.mqtt_options);
                    }
                    polling = poll_owned(el);
                    match ev {
                        Ok(ev) => self.on_event(ev, &client),
                        Err(e) => {
                            let delay = self.on_disconnect(&e);
                            retry_at = Some(tokio::time::Instant::now() + delay);
                        }
                    }
                }
                _ = queue.records_ready().notified() => {}
                _ = async { tokio::time::sleep_until(renew_at.unwrap_or_else(far_future)).await }, if renew_at.is_some() => {
                    // IoT Hub closes a connection whose token expires: reconnect before that
                    // with a new one (what is in flight is sent again from the queue).
                    tracing::info!("Renewing the SAS token: reconnecting to Azure IoT Hub.");
                    if let Some(a) = self.azure.as_mut() {
                        a.renew_at = None;
                    }
                    self.metrics.sas_renewals.fetch_add(1, Relaxed);
                    let _ = client.try_disconnect();
                }
                _ = hangup.recv() => {
                    if self.connected {
                        tracing::info!("SIGHUP: reconnecting to pick up the TLS credentials on disk.");
                        let _ = client.try_disconnect();
                    }
                }
                _ = writer_done.cancelled(), if drain_deadline.is_some() && !writer_seen_done => {
                    writer_seen_done = true;
                }
                _ = async { tokio::time::sleep_until(next_linger.unwrap_or_else(far_future)).await }, if next_linger.is_some() => {}
                _ = async { tokio::time::sleep_until(next_pace.unwrap_or_else(far_future)).await }, if next_pace.is_some() => {}
                _ = heartbeat.tick() => {
                    if self.connected {
                        self.publish_heartbeat(&client);
                    }
                }
                _ = async {
                    match &ota {
                        Some(o) => o.changed().notified().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if self.connected {
                        self.publish_status(&client, DeviceState::Online);
                    }
                }
                _ = status_tick.tick() => {
                    if self.connected {
                        self.publish_status(&client, DeviceState::Online);
                    }
                }
                _ = commit_tick.tick() => {
                    if self.connected && self.azure.is_some() {
                        self.twin_tick(&client);
                    } else if self.connected {
                        self.check_commits(&client);
                    }
                }
            }
        };

        // Leave cleanly: an explicit retained `offline` (a clean disconnect suppresses the Last
        // Will), then DISCONNECT, polling briefly so both actually leave the socket.
        if self.connected && !force.is_cancelled() {
            self.publish_status(&client, DeviceState::Offline);
            let _ = client.try_disconnect();
            let bye = async {
                loop {
                    let (el, ev) = (&mut polling).await;
                    polling = poll_owned(el);
                    match ev {
                        Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                        Ok(ev) => self.on_event(ev, &client),
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(2), bye).await;
        }
        self.metrics.connected.store(0, Relaxed);
        outcome
    }

    fn fully_drained(&self) -> bool {
        self.by_pkid.is_empty() && self.awaiting_pkid.is_empty() && self.queue.is_empty()
    }

    fn on_event(&mut self, ev: Event, client: &AsyncClient) {
        match ev {
            Event::Incoming(Packet::ConnAck(ack)) => {
                if ack.code != rumqttc::ConnectReturnCode::Success {
                    tracing::error!(code = ?ack.code, "The broker refused the connection.");
                    return;
                }
                if self.ever_connected {
                    self.metrics.reconnects.fetch_add(1, Relaxed);
                }
                tracing::info!(
                    host = %self.settings.mqtt.host, port = self.settings.mqtt.port, failures = self.failures,
                    "Connected to the MQTT broker."
                );
                self.ever_connected = true;
                self.connected = true;
                self.failures = 0;
                self.backoff = Duration::from_millis(self.settings.mqtt.reconnect_min_ms);
                self.metrics.connected.store(1, Relaxed);
                self.forget_in_flight();
                if self.state != UplinkState::Draining {
                    self.set_state(UplinkState::CatchingUp);
                }
                self.publish_status(client, DeviceState::Online);
                if self.azure.is_some() {
                    self.on_azure_connack(client);
                    return;
                }
                if self.ota.is_some()
                    && let Err(e) =
                        client.try_subscribe(self.topics.desired.clone(), QoS::AtLeastOnce)
                {
                    tracing::error!(error = %e, "Cannot subscribe to the desired state; OTA waits for the next connection.");
                }
                if self.settings.mqtt.delivery != DeliveryMode::Puback
                    && let Err(e) =
                        client.try_subscribe(self.topics.committed.clone(), QoS::AtLeastOnce)
                {
                    tracing::error!(error = %e, "Cannot subscribe to the fleet's commit watermark; records stay queued until the next connection.");
                }
            }
            Event::Incoming(Packet::Publish(p)) if self.azure.is_some() => {
                self.on_twin_message(&p.topic, &p.payload);
            }
            Event::Incoming(Packet::Publish(p)) if p.topic == self.topics.desired => {
                self.on_desired(&p.payload);
            }
            Event::Incoming(Packet::Publish(p)) if p.topic == self.topics.committed => {
                self.on_committed(&p.payload);
            }
            Event::Outgoing(Outgoing::Publish(pkid)) if pkid != 0 => {
                if let Some(p) = self.awaiting_pkid.pop_front() {
                    self.by_pkid.insert(pkid, p);
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => match self.by_pkid.remove(&ack.pkid) {
                Some(Pending::Data {
                    sid,
                    first,
                    last,
                    count,
                    sent_at,
                }) => {
                    self.in_flight_records = self.in_flight_records.saturating_sub(count);
                    self.metrics
                        .in_flight
                        .store(self.in_flight_records, Relaxed);
                    self.metrics
                        .publish_latency_us_sum
                        .fetch_add(sent_at.elapsed().as_micros() as u64, Relaxed);
                    match &mut self.mode {
                        Mode::Puback => {
                            if let Err(e) = self.queue.ack(sid, first, last) {
                                tracing::error!(error = %e, "Could not delete acknowledged records; they will be sent again.");
                            }
                        }
                        // Kept until the fleet's commit watermark covers them.
                        Mode::Awaiting { since } => {
                            since.get_or_insert_with(Instant::now);
                        }
                        Mode::Commit => {}
                    }
                }
                Some(Pending::Control) => {}
                None => tracing::debug!(
                    pkid = ack.pkid,
                    "PUBACK for an unknown packet id (from before a reconnect)."
                ),
            },
            _ => {}
        }
    }

    fn on_desired(&mut self, payload: &[u8]) {
        let Some(ota) = &self.ota else {
            return;
        };
        if payload.is_empty() {
            // A cleared retained message: nothing is desired any more; models stay as they are.
            tracing::info!("The desired state was cleared.");
            return;
        }
        match ember_proto::message::decode_desired(payload) {
            Ok((d, _)) if d.device == self.settings.device_id => {
                tracing::info!(models = d.models.len(), "Received the desired state.");
                ota.offer(d);
            }
            Ok((d, _)) => {
                self.metrics.ota_desired_invalid.fetch_add(1, Relaxed);
                tracing::warn!(device = %d.device, "Ignoring a desired state addressed to another device.");
            }
            Err(e) => {
                self.metrics.ota_desired_invalid.fetch_add(1, Relaxed);
                tracing::warn!(error = %e, bytes = payload.len(),
                    "Ignoring a desired-state message that does not decode or validate.");
            }
        }
    }

    fn on_disconnect(&mut self, e: &rumqttc::ConnectionError) -> Duration {
        if let Some(why) = crate::tls::describe_failure(e) {
            tracing::error!(reason = %why, host = %self.settings.mqtt.host, "TLS connection to the MQTT broker failed.");
        }
        if self.connected {
            tracing::warn!(error = %e, "Lost the connection to the MQTT broker; buffering in the queue.");
        } else if self.failures == 0 || self.failures.is_multiple_of(20) {
            tracing::warn!(
                error = %e, host = %self.settings.mqtt.host, port = self.settings.mqtt.port, failures = self.failures,
                "Cannot reach the MQTT broker; buffering in the queue and retrying."
            );
        }
        self.failures += 1;
        self.connected = false;
        self.metrics.connected.store(0, Relaxed);
        self.forget_in_flight();
        if self.state != UplinkState::Draining {
            self.set_state(UplinkState::Offline);
        }
        // Full jitter: a uniformly random delay up to the current backoff.
        let max = self.backoff.as_millis() as u64;
        let delay = Duration::from_millis(fastrand::u64(max / 2..=max.max(1)));
        self.backoff =
            (self.backoff * 2).min(Duration::from_millis(self.settings.mqtt.reconnect_max_ms));
        delay
    }

    /// Unacknowledged publishes are gone with the session: re-read them from the queue. On
    /// PUBACK the queue's head is the first unacknowledged record; waiting for the fleet's
    /// commit, each stream resumes at its first unacknowledged record instead, so what the
    /// broker already acknowledged is not sent again on every reconnect (the commit timer
    /// re-sends it if the broker lost it).
    fn forget_in_flight(&mut self) {
        if self.mode == Mode::Puback {
            for c in &mut self.cursors {
                *c = 0;
            }
        } else {
            for p in self.awaiting_pkid.iter().chain(self.by_pkid.values()) {
                if let Pending::Data { sid, first, .. } = p
                    && let Some(c) = self.cursors.get_mut(*sid as usize)
                    && (*c == 0 || *c > *first)
                {
                    *c = *first;
                }
            }
        }
        self.awaiting_pkid.clear();
        self.by_pkid.clear();
        self.in_flight_records = 0;
        self.metrics.in_flight.store(0, Relaxed);
    }

    /// A commit watermark from the fleet: delete what it covers (see the module docs).
    fn on_committed(&mut self, payload: &[u8]) {
        if payload.is_empty() {
            return;
        }
        let c = match ember_proto::message::decode_committed(payload) {
            Ok((c, _)) => c,
            Err(e) => {
                tracing::warn!(error = %e, bytes = payload.len(),
                    "Ignoring a commit watermark that does not decode or validate.");
                return;
            }
        };
        if c.device != self.settings.device_id {
            tracing::warn!(device = %c.device, "Ignoring a commit watermark addressed to another device.");
            return;
        }
        let now = Instant::now();
        self.metrics.commit_watermarks.fetch_add(1, Relaxed);
        self.last_watermark_at = Some(now);
        if self.mode != Mode::Commit && self.settings.mqtt.delivery != DeliveryMode::Puback {
            tracing::info!(
                "The fleet sends commit watermarks: records now stay queued until the fleet has committed them."
            );
            self.mode = Mode::Commit;
            self.queue.set_evict_sent(true);
            self.metrics.delivery_commit.store(1, Relaxed);
            let marker = self.settings.data_dir.join(FLEET_COMMITS_FILE);
            if let Err(e) = ember_host::fs::replace(&marker, b"1\n") {
                tracing::warn!(error = %e, path = %marker.display(), "Cannot remember that the fleet sends commit watermarks; after a restart the agent waits for one again.");
            }
        }
        let streams = self.queue.stream_names();
        self.grow(streams.len());
        for s in &c.streams {
            let Some((sid, _)) = streams.iter().find(|(_, n)| **n == *s.stream) else {
                continue;
            };
            let idx = *sid as usize;
            let last = self.queue.last_seq(*sid);
            if s.upto > last && !self.warned_ahead {
                self.warned_ahead = true;
                tracing::warn!(stream = %s.stream, committed = s.upto, last_seq = last,
                    "The fleet says it committed records this device never wrote: was this device's data_dir reset? Records above its last sequence number are kept.");
            }
            let sc = &mut self.commits[idx];
            if s.upto <= sc.upto {
                continue;
            }
            sc.upto = s.upto;
            sc.waiting_since = None;
            if let Err(e) = self.queue.trim(*sid, s.upto) {
                tracing::error!(error = %e, "Could not delete committed records; they stay queued until the next watermark.");
            }
            let cursor = &mut self.cursors[idx];
            if *cursor != 0 && *cursor <= s.upto {
                *cursor = s.upto + 1;
            }
        }
    }

    /// Every [`COMMIT_CHECK`] while connected: the `"auto"` fallback, and re-sending what the
    /// fleet has not committed in time (see the module docs).
    fn check_commits(&mut self, client: &AsyncClient) {
        let now = Instant::now();
        match self.mode {
            Mode::Puback => return,
            Mode::Awaiting { since: Some(t) }
                if now.duration_since(t).as_secs() >= self.settings.mqtt.commit_fallback_s =>
            {
                self.fall_back_to_puback();
                return;
            }
            Mode::Awaiting { .. } => return,
            Mode::Commit => {}
        }
        let timeout = Duration::from_secs(self.settings.mqtt.commit_timeout_s);
        let streams = self.queue.stream_names();
        self.grow(streams.len());
        let mut ask = false;
        for (sid, name) in &streams {
            let idx = *sid as usize;
            let cursor = self.cursors[idx];
            let head = match self.queue.first_seq(*sid) {
                Ok(Some(h)) if cursor != 0 && h < cursor => h,
                // Nothing sent is still queued: everything sent was committed.
                Ok(_) => {
                    self.commits[idx].waiting_since = None;
                    continue;
                }
                Err(_) => continue,
            };
            let since = *self.commits[idx].waiting_since.get_or_insert(now);
            if now.duration_since(since) < timeout {
                continue;
            }
            if self.last_watermark_at.is_some_and(|w| w > since) {
                let n = cursor - head;
                tracing::info!(stream = %name, from = head, records = n, committed = self.commits[idx].upto,
                    "The fleet has not committed records sent {}s ago and is answering: sending them again.", timeout.as_secs());
                self.metrics.resent.fetch_add(n, Relaxed);
                self.cursors[idx] = 0;
                self.commits[idx].waiting_since = Some(now);
            } else {
                ask = true;
            }
        }
        if ask
            && self
                .solicited_at
                .is_none_or(|t| now.duration_since(t) >= timeout)
        {
            tracing::debug!("Asking the fleet for its commit watermark.");
            self.solicited_at = Some(now);
            self.publish_status(client, DeviceState::Online);
        }
    }

    /// `"auto"` without any watermark: the fleet does not send them. Deletes what the broker
    /// acknowledged and deletes on PUBACK from now on.
    fn fall_back_to_puback(&mut self) {
        tracing::warn!(
            waited_s = self.settings.mqtt.commit_fallback_s,
            "No commit watermark came from the fleet while the broker acknowledged records: the fleet predates end-to-end acknowledgement, or the broker ACL does not let this device read its `committed` topic. Records now leave the queue on the broker's PUBACK, as the broker's guarantee allows (set mqtt.delivery = \"commit\" to keep waiting for the fleet, or \"puback\" to choose this)."
        );
        let streams = self.queue.stream_names();
        self.grow(streams.len());
        let mut upto: Vec<u64> = self.cursors.iter().map(|c| c.saturating_sub(1)).collect();
        for p in self.awaiting_pkid.iter().chain(self.by_pkid.values()) {
            if let Pending::Data { sid, first, .. } = p
                && let Some(u) = upto.get_mut(*sid as usize)
            {
                *u = (*u).min(first - 1);
            }
        }
        self.mode = Mode::Puback;
        self.queue.set_evict_sent(false);
        self.metrics.delivery_commit.store(0, Relaxed);
        for (sid, _) in &streams {
            let u = upto[*sid as usize];
            if u > 0
                && let Err(e) = self.queue.trim(*sid, u)
            {
                tracing::error!(error = %e, "Could not delete acknowledged records; they will be sent again.");
            }
        }
    }

    /// Per-stream state for `n` streams.
    fn grow(&mut self, n: usize) {
        if self.cursors.len() < n {
            self.cursors.resize(n, 0);
            self.waiting_since.resize(n, None);
        }
        if self.commits.len() < n {
            self.commits.resize(n, StreamCommit::default());
        }
    }

    fn in_flight_messages(&self) -> usize {
        self.awaiting_pkid.len() + self.by_pkid.len()
    }

    fn next_linger_deadline(&self, linger: Duration) -> Option<tokio::time::Instant> {
        self.waiting_since
            .iter()
            .flatten()
            .min()
            .map(|t| tokio::time::Instant::from_std(*t + linger))
    }

    /// Publishes as many messages as the in-flight window allows, round-robin over streams.
    fn fill_window(&mut self, client: &AsyncClient, draining: bool) {
        let m = &self.settings.mqtt;
        let (max_records, linger, window) = (
            m.message_max_records,
            Duration::from_millis(m.message_max_delay_ms),
            m.max_in_flight,
        );
        let streams = self.queue.stream_names();
        self.grow(streams.len());
        let mut backlog_messages = 0u64;
        let mut idle_rounds = 0;
        while self.in_flight_messages() < window && idle_rounds < streams.len() {
            if !self.pacer.ready(Instant::now()) {
                self.metrics.publishes_paced.fetch_add(1, Relaxed);
                break;
            }
            let i = self.rr % streams.len().max(1);
            self.rr = self.rr.wrapping_add(1);
            let Some((sid, _)) = streams.get(i).cloned() else {
                break;
            };
            let sent = self.send_one(client, sid, max_records, linger, draining);
            if sent {
                idle_rounds = 0
            } else {
                idle_rounds += 1
            }
        }
        for (sid, _) in &streams {
            let durable = self.queue.durable_upto(*sid);
            let cursor = self.cursors[*sid as usize];
            if durable >= cursor && cursor > 0 {
                backlog_messages += (durable - cursor + 1) / max_records as u64;
            }
        }
        if self.state != UplinkState::Draining && self.connected {
            let caught_up = backlog_messages <= 2 * streams.len() as u64;
            self.set_state(if caught_up {
                UplinkState::Online
            } else {
                UplinkState::CatchingUp
            });
        }
    }

    /// Sends the next message of one stream if one is due. Returns whether it sent.
    fn send_one(
        &mut self,
        client: &AsyncClient,
        sid: StreamId,
        max_records: usize,
        linger: Duration,
        draining: bool,
    ) -> bool {
        let idx = sid as usize;
        let durable = self.queue.durable_upto(sid);
        if self.cursors[idx] == 0 {
            match self.queue.first_seq(sid) {
                Ok(Some(first)) => self.cursors[idx] = first,
                Ok(None) => {
                    // Nothing queued: continue after the last durable record.
                    self.cursors[idx] = durable + 1;
                    self.waiting_since[idx] = None;
                    return false;
                }
                Err(e) => {
                    tracing::error!(error = %e, "Cannot read the queue.");
                    return false;
                }
            }
        }
        let cursor = self.cursors[idx];
        if cursor > durable {
            self.waiting_since[idx] = None;
            return false;
        }
        let available = durable - cursor + 1;
        if available < max_records as u64 && !draining && self.state == UplinkState::Online {
            let since = *self.waiting_since[idx].get_or_insert_with(Instant::now);
            if since.elapsed() < linger {
                return false;
            }
        }
        let records = match self.queue.read(sid, cursor, max_records) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "Cannot read the queue.");
                return false;
            }
        };
        let Some((last_seq, _)) = records.last() else {
            // Everything up to the durable mark was evicted or corrupt.
            self.cursors[idx] = durable + 1;
            return false;
        };
        let last_seq = *last_seq;
        let stream = self
            .queue
            .stream_names()
            .get(idx)
            .map(|(_, n)| n.clone())
            .unwrap_or_else(|| "unknown".into());
        let mut take = records.len();
        // A stream holds one kind of record: inference streams go to their own topic.
        let inference = records[0].1.inference.is_some();
        let payload = loop {
            let encoded = if inference {
                let mut batch = InferenceBatch {
                    v: SCHEMA_VERSION,
                    device: self.settings.device_id.clone(),
                    stream: stream.to_string(),
                    source: String::new(),
                    records: Vec::with_capacity(take),
                };
                for (seq, r) in records.iter().take(take) {
                    if let Some(i) = &r.inference {
                        batch.source.clone_from(&i.source);
                        let mut rec = i.record.clone();
                        rec.seq = *seq;
                        batch.records.push(rec);
                    }
                }
                ember_proto::message::encode(&batch, self.settings.mqtt.encoding)
            } else {
                let mut batch = TelemetryBatch::new(&self.settings.device_id, &stream);
                for (seq, r) in records.iter().take(take) {
                    batch.push(*seq, r.ts_us, r.values.clone());
                }
                ember_proto::message::encode(&batch, self.settings.mqtt.encoding)
            };
            match encoded {
                Ok(p) if p.len() <= self.settings.mqtt.message_max_bytes || take == 1 => break p,
                Ok(_) => take = take.div_ceil(2),
                Err(e) => {
                    tracing::error!(error = %e, "Cannot encode a telemetry message.");
                    return false;
                }
            }
        };
        let first = records[0].0;
        let last = records[take - 1].0;
        let _ = last_seq;
        let topic = match (&self.azure, inference) {
            (Some(_), _) => azure::events_topic(
                &self.settings.device_id,
                if inference {
                    Channel::Inference
                } else {
                    Channel::Telemetry
                },
                Some(&stream),
                self.settings.mqtt.encoding.as_str(),
            ),
            (None, true) => self.topics.inference.clone(),
            (None, false) => self.topics.telemetry.clone(),
        };
        match client.try_publish(topic, QoS::AtLeastOnce, false, payload) {
            Ok(()) => {
                self.awaiting_pkid.push_back(Pending::Data {
                    sid,
                    first,
                    last,
                    count: take as u64,
                    sent_at: Instant::now(),
                });
                self.cursors[idx] = last + 1;
                self.waiting_since[idx] = None;
                self.in_flight_records += take as u64;
                self.metrics
                    .in_flight
                    .store(self.in_flight_records, Relaxed);
                self.metrics.sent.fetch_add(take as u64, Relaxed);
                self.metrics.messages_sent.fetch_add(1, Relaxed);
                self.pacer.note(Instant::now());
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "The MQTT request channel is full; retrying shortly.");
                false
            }
        }
    }

    fn status(&self, state: DeviceState) -> Status {
        let (records, bytes) = self.queue.len();
        Status {
            v: SCHEMA_VERSION,
            device: self.settings.device_id.clone(),
            state,
            ts: crate::source::now_us(),
            agent_version: Some(env!("CARGO_PKG_VERSION").to_string()),
            models: self
                .metrics
                .models
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            queue: Some(QueueGauge {
                records,
                bytes,
                disk_bytes: self.metrics.queue_disk_bytes.load(Relaxed),
            }),
            counters: Some(self.metrics.snapshot()),
            streams: self.queue.stream_status(),
            ota: self.ota.as_ref().map(|o| o.reports()).unwrap_or_default(),
            delivery: Some(match self.mode {
                Mode::Puback => Delivery::Puback,
                Mode::Commit | Mode::Awaiting { .. } => Delivery::Commit,
            }),
        }
    }

    fn publish_status(&mut self, client: &AsyncClient, state: DeviceState) {
        let status = self.status(state);
        let limit = self.settings.mqtt.message_max_bytes;
        match fit_status(
            status,
            self.settings.mqtt.encoding,
            limit,
            self.status_offset,
        ) {
            Ok(fitted) => {
                if fitted.streams_total > fitted.streams_sent {
                    self.metrics.status_trimmed.fetch_add(1, Relaxed);
                    self.status_offset = fitted.next_offset;
                    if !self.warned_status_size {
                        self.warned_status_size = true;
                        tracing::warn!(
                            limit,
                            streams = fitted.streams_total,
                            per_status = fitted.streams_sent,
                            "The status message is larger than mqtt.message_max_bytes: each status carries the streams that fit, in turn (counted in status_trimmed_total)."
                        );
                    }
                }
                // Azure: an event (IoT Hub retains nothing), and the twin's reported
                // properties at their own pace (`twin_tick`).
                if let Some(a) = self.azure.as_mut() {
                    a.report_due = true;
                }
                if client
                    .try_publish(
                        self.topics.status.clone(),
                        QoS::AtLeastOnce,
                        self.azure.is_none(),
                        fitted.payload,
                    )
                    .is_ok()
                {
                    self.awaiting_pkid.push_back(Pending::Control);
                    self.pacer.note(Instant::now());
                }
            }
            Err(e) => tracing::error!(error = %e, "Cannot send the status message."),
        }
    }

    fn publish_heartbeat(&mut self, client: &AsyncClient) {
        let hb = Heartbeat {
            v: SCHEMA_VERSION,
            device: self.settings.device_id.clone(),
            ts: crate::source::now_us(),
            uptime_s: self.started.elapsed().as_secs(),
            queue_records: self.queue.len().0,
        };
        if let Ok(payload) = ember_proto::message::encode(&hb, self.settings.mqtt.encoding)
            && payload.len() <= self.settings.mqtt.message_max_bytes
            && client
                .try_publish(
                    self.topics.heartbeat.clone(),
                    QoS::AtMostOnce,
                    false,
                    payload,
                )
                .is_ok()
        {
            self.pacer.note(Instant::now());
        }
    }

    pub fn state(&self) -> UplinkState {
        self.state
    }

    /// When the current SAS token must be replaced (Azure with SAS, connected).
    fn renew_at(&self) -> Option<tokio::time::Instant> {
        self.azure.as_ref().and_then(|a| a.renew_at)
    }

    /// Azure with SAS: a new token as the MQTT password for the next CONNECT, made from the
    /// key file as it is now (a rotated key is picked up), and when to renew it. Other
    /// profiles: nothing to do.
    fn refresh_credentials(&mut self, o: &mut MqttOptions) {
        let Some(a) = self.azure.as_mut() else {
            return;
        };
        let Some(path) = &a.sas_key_file else {
            return;
        };
        let m = &self.settings.mqtt;
        let user = m.username.clone().unwrap_or_default();
        let ttl = m.sas_token_ttl_s;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let resource = azure::sas_resource(&m.host, &self.settings.device_id);
        match crate::config::read_sas_key(path).and_then(|k| {
            k.token(&resource, now + ttl, None)
                .map_err(|e| e.to_string())
        }) {
            Ok(token) => {
                o.set_credentials(user, token);
                a.renew_at =
                    Some(tokio::time::Instant::now() + Duration::from_millis(ttl * 1000 * 8 / 10));
            }
            Err(e) => {
                tracing::error!(error = %e, "Cannot make a SAS token (mqtt.sas_key_file); IoT Hub will refuse the connection.");
                o.set_credentials(user, String::new());
                a.renew_at = None;
            }
        }
    }

    /// Azure, connected: the twin's response and desired-patch topics, then the whole twin
    /// (its desired properties are the desired state); the status goes to the twin too.
    fn on_azure_connack(&mut self, client: &AsyncClient) {
        let ota = self.ota.is_some();
        let Some(a) = self.azure.as_mut() else {
            return;
        };
        a.report_due = true;
        let mut topics = vec![azure::TWIN_RESPONSES];
        if ota {
            topics.push(azure::TWIN_DESIRED_PATCHES);
        }
        for t in topics {
            if let Err(e) = client.try_subscribe(t, QoS::AtLeastOnce) {
                tracing::error!(error = %e, topic = t, "Cannot subscribe to the device twin's topics; retrying at the next connection.");
            }
        }
        if ota {
            self.request_twin(client);
        }
    }

    fn request_twin(&mut self, client: &AsyncClient) {
        let Some(a) = self.azure.as_mut() else {
            return;
        };
        let rid = a.rid();
        match client.try_publish(azure::twin_get(rid), QoS::AtMostOnce, false, Vec::new()) {
            Ok(()) => {
                a.get_rid = Some(rid);
                a.get_due = false;
            }
            Err(e) => {
                tracing::debug!(error = %e, "Cannot request the device twin now; retrying.");
                a.get_due = true;
            }
        }
    }

    /// Every second while connected to IoT Hub: a twin GET that is due again, and the reported
    /// properties when they changed and the last patch is old enough.
    fn twin_tick(&mut self, client: &AsyncClient) {
        let min = Duration::from_secs(self.settings.mqtt.twin_report_min_interval_s);
        let (get_due, report_now) = match &self.azure {
            Some(a) => (
                a.get_due,
                a.report_due && a.last_report.is_none_or(|t| t.elapsed() >= min),
            ),
            None => return,
        };
        if get_due && self.ota.is_some() {
            self.request_twin(client);
        }
        if report_now {
            self.report_to_twin(client);
        }
    }

    /// Patches the twin's reported property `ember` with the status (as JSON; trimmed like
    /// the status message to fit the twin's 32 KB limit on reported properties).
    fn report_to_twin(&mut self, client: &AsyncClient) {
        let status = self.status(DeviceState::Online);
        let Ok(fitted) = fit_status(
            status,
            ember_proto::Encoding::Json,
            TWIN_REPORT_MAX_BYTES,
            self.status_offset,
        ) else {
            return;
        };
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(&fitted.payload) else {
            return;
        };
        let body = serde_json::json!({ azure::TWIN_PROPERTY: value });
        let Some(a) = self.azure.as_mut() else {
            return;
        };
        let rid = a.rid();
        if client
            .try_publish(
                azure::twin_patch_reported(rid),
                QoS::AtLeastOnce,
                false,
                body.to_string().into_bytes(),
            )
            .is_ok()
        {
            a.report_due = false;
            a.last_report = Some(Instant::now());
            self.awaiting_pkid.push_back(Pending::Control);
            self.pacer.note(Instant::now());
            self.metrics.twin_reports.fetch_add(1, Relaxed);
        }
    }

    /// A message on the twin's topics: the GET's answer, a reported patch's answer, or a
    /// desired-properties patch. A desired state older than (or as old as) the one applied
    /// (`$version`) is dropped.
    fn on_twin_message(&mut self, topic: &str, payload: &[u8]) {
        let Some(a) = self.azure.as_mut() else {
            return;
        };
        let desired = match azure::parse_twin_topic(topic) {
            Some(azure::TwinTopic::Response { status, rid, .. }) if Some(rid) == a.get_rid => {
                a.get_rid = None;
                if status != 200 {
                    tracing::warn!(
                        status,
                        "IoT Hub refused the twin request; asking again in a second."
                    );
                    a.get_due = true;
                    return;
                }
                match serde_json::from_slice::<serde_json::Value>(payload) {
                    Ok(twin) => twin.get("desired").cloned().unwrap_or_default(),
                    Err(e) => {
                        tracing::warn!(error = %e, "The device twin is not JSON; ignoring it.");
                        self.metrics.ota_desired_invalid.fetch_add(1, Relaxed);
                        return;
                    }
                }
            }
            Some(azure::TwinTopic::Response { status, .. }) => {
                if status == 429 {
                    // Throttled: the next tick after the interval patches again.
                    a.report_due = true;
                }
                if !(200..300).contains(&status) {
                    tracing::warn!(
                        status,
                        "IoT Hub refused a twin update of the reported properties."
                    );
                }
                return;
            }
            Some(azure::TwinTopic::DesiredPatch { .. }) => {
                match serde_json::from_slice::<serde_json::Value>(payload) {
                    Ok(patch) => patch,
                    Err(e) => {
                        tracing::warn!(error = %e, "A desired-properties patch is not JSON; ignoring it.");
                        self.metrics.ota_desired_invalid.fetch_add(1, Relaxed);
                        return;
                    }
                }
            }
            None => {
                tracing::debug!(
                    topic,
                    "Ignoring a message on a topic the agent does not use."
                );
                return;
            }
        };
        let (state, version) = match azure::desired_from_twin(&desired) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "Ignoring the twin's desired properties.");
                self.metrics.ota_desired_invalid.fetch_add(1, Relaxed);
                return;
            }
        };
        if let (Some(v), Some(applied)) = (version, a.desired_version)
            && v <= applied
        {
            tracing::debug!(
                version = v,
                applied,
                "Dropping a twin desired state no newer than the one applied."
            );
            return;
        }
        if version.is_some() {
            a.desired_version = version;
        }
        match state {
            Some(state) => {
                let bytes = state.to_string().into_bytes();
                self.on_desired(&bytes);
            }
            None => tracing::info!("The twin holds no desired state for Ember."),
        }
    }
}

/// The twin's reported properties may hold 32 KB; Ember's property stays below that with room
/// for IoT Hub's metadata.
const TWIN_REPORT_MAX_BYTES: usize = 24 * 1024;

type PollFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = (EventLoop, Result<Event, ConnectionError>)> + Send>,
>;

/// One `EventLoop::poll` that owns the event loop and hands it back with the event, so the
/// future can outlive a `select!` round (see `Uplink::run`).
fn poll_owned(mut eventloop: EventLoop) -> PollFuture {
    Box::pin(async move {
        let ev = eventloop.poll().await;
        if ev.is_err() {
            // Events rumqttc queued for the connection that just failed (e.g. the
            // `Outgoing::Publish` of a packet whose write failed) would be reported after the
            // next CONNACK, and the uplink would pair the new connection's packet ids with the
            // wrong messages: a PUBACK would then delete records of a message not yet
            // acknowledged. The uplink forgets that connection's in-flight state anyway.
            eventloop.state.events.clear();
        }
        (eventloop, ev)
    })
}

fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86_400 * 365)
}

/// Paces publishes to at most `limit` in any sliding second (`mqtt.max_publish_rate`; AWS IoT
/// Core allows 100 per connection and throttles beyond, see `crate::profile`), evenly spaced.
/// Record messages wait for room ([`Pacer::ready`]); status, heartbeat and commit requests are
/// never held back but take their place ([`Pacer::note`]), so with the default of 90 the total
/// stays under the quota. The uplink is paced, not the service: catching up after an outage
/// goes out at the limit instead of being throttled (or disconnected) by the broker.
///
/// Two rules together: a sliding window (never more than `limit` in any second, counted at
/// the sender) and even spacing (one message per `1/limit` s, with a burst of `limit/20`).
/// The window alone would send a whole second's worth at once and then wait: bursts that a
/// receiver, seeing them a little late or early, counts partly in the same second (measured:
/// 122 in one second at the IoT Core stand-in with a limit of 90).
#[derive(Debug, Clone)]
struct Pacer {
    /// 0: no limit.
    limit: usize,
    /// When each publish of the last second went out, oldest first.
    sent: VecDeque<Instant>,
    /// Even spacing (GCRA): the theoretical time of the next message, its interval and the
    /// burst tolerance.
    tat: Option<Instant>,
    interval: Duration,
    tolerance: Duration,
}

/// The pacing window.
const PACE_WINDOW: Duration = Duration::from_secs(1);

impl Pacer {
    fn new(limit: u32) -> Pacer {
        let interval = if limit == 0 {
            Duration::ZERO
        } else {
            PACE_WINDOW / limit
        };
        Pacer {
            limit: limit as usize,
            sent: VecDeque::new(),
            tat: None,
            interval,
            tolerance: interval * (limit / 20).max(1),
        }
    }

    fn prune(&mut self, now: Instant) {
        while self
            .sent
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= PACE_WINDOW)
        {
            self.sent.pop_front();
        }
    }

    /// When spacing allows the next message.
    fn spaced_at(&self) -> Option<Instant> {
        self.tat.map(|t| t.checked_sub(self.tolerance).unwrap_or(t))
    }

    /// Whether one more message may go out at `now`.
    fn ready(&mut self, now: Instant) -> bool {
        if self.limit == 0 {
            return true;
        }
        self.prune(now);
        self.sent.len() < self.limit && self.spaced_at().is_none_or(|t| t <= now)
    }

    /// A publish went out at `now`.
    fn note(&mut self, now: Instant) {
        if self.limit > 0 {
            self.sent.push_back(now);
            self.tat = Some(self.tat.map_or(now, |t| t.max(now)) + self.interval);
        }
    }

    /// When there is room again, if there is none at `now`.
    fn next_free(&mut self, now: Instant) -> Option<Instant> {
        if self.ready(now) {
            return None;
        }
        // The later of: the publish that fills the window leaving it, and the spacing.
        let window = (self.sent.len() >= self.limit)
            .then(|| self.sent[self.sent.len() - self.limit] + PACE_WINDOW);
        let spaced = self.spaced_at().filter(|t| *t > now);
        window.max(spaced)
    }
}

/// A status message that fits the broker's payload limit.
#[derive(Debug)]
struct FittedStatus {
    payload: Vec<u8>,
    streams_total: usize,
    streams_sent: usize,
    /// Where the next status's list of streams starts.
    next_offset: usize,
}

/// Encodes `status` within `limit` bytes. A status too large (many streams) carries as many
/// streams as fit, starting at `offset` and wrapping around, so successive statuses report
/// every stream in turn; if even no stream at all does not fit, the status is refused with
/// the reason (the broker would refuse it, or drop the connection).
fn fit_status(
    mut status: Status,
    encoding: ember_proto::Encoding,
    limit: usize,
    offset: usize,
) -> Result<FittedStatus, String> {
    let encode = |s: &Status| {
        ember_proto::message::encode(s, encoding).map_err(|e| format!("cannot encode: {e}"))
    };
    let total = status.streams.len();
    let payload = encode(&status)?;
    if payload.len() <= limit {
        return Ok(FittedStatus {
            payload,
            streams_total: total,
            streams_sent: total,
            next_offset: 0,
        });
    }
    let start = if total == 0 { 0 } else { offset % total };
    let mut all = std::mem::take(&mut status.streams);
    all.rotate_left(start);
    // The most streams that fit: binary search over the count.
    let (mut lo, mut hi) = (0usize, total);
    let mut best: Option<Vec<u8>> = None;
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        status.streams = all[..mid].to_vec();
        let p = encode(&status)?;
        if p.len() <= limit {
            lo = mid;
            best = Some(p);
        } else {
            hi = mid - 1;
        }
    }
    let payload = match best {
        Some(p) => p,
        None => {
            status.streams = Vec::new();
            let p = encode(&status)?;
            if p.len() > limit {
                return Err(format!(
                    "the status is {} bytes even without its streams, above mqtt.message_max_bytes ({limit})",
                    p.len()
                ));
            }
            p
        }
    };
    Ok(FittedStatus {
        payload,
        streams_total: total,
        streams_sent: lo,
        next_offset: if total == 0 { 0 } else { (start + lo) % total },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever the pattern of attempts: no sliding second holds more than `limit`
        /// publishes, no 100 ms more than a tenth of it plus the burst (even spacing), a
        /// message held back gets room at the time promised, and a pacer that keeps being
        /// asked sends at its full rate.
        #[test]
        fn the_pacer_never_exceeds_its_limit_in_any_second_and_spaces_messages(
            limit in 1u32..200,
            gaps_ms in proptest::collection::vec(0u64..300, 1..400),
        ) {
            let t0 = Instant::now();
            let mut p = Pacer::new(limit);
            let mut now = t0;
            let mut sent: Vec<Instant> = Vec::new();
            for gap in &gaps_ms {
                now += Duration::from_millis(*gap);
                let in_window = sent.iter().filter(|t| now.duration_since(**t) < PACE_WINDOW).count();
                if p.ready(now) {
                    prop_assert!(in_window < limit as usize);
                    p.note(now);
                    sent.push(now);
                } else {
                    let free = p.next_free(now).expect("held back, so room comes later");
                    prop_assert!(free > now);
                    prop_assert!(p.clone().ready(free), "room at the promised time");
                }
            }
            // A backlog: ask again as soon as allowed, for three seconds; after the first (what
            // went before may still fill it) the full rate goes out.
            let start = now;
            let end = now + Duration::from_secs(3);
            while now < end {
                if p.ready(now) {
                    p.note(now);
                    sent.push(now);
                } else {
                    now = p.next_free(now).expect("room comes");
                }
            }
            let burst = (limit / 20).max(1) as usize;
            let steady = sent
                .iter()
                .filter(|t| **t >= start + PACE_WINDOW && **t < end)
                .count();
            prop_assert!(
                steady + burst + 1 >= 2 * limit as usize,
                "{} sent in the last 2 s of a backlog at {}/s", steady, limit
            );
            for (i, t) in sent.iter().enumerate() {
                let n = sent[i..].iter().filter(|u| u.duration_since(*t) < PACE_WINDOW).count();
                prop_assert!(n <= limit as usize, "{} publishes in the second from #{}", n, i);
                let tenth = sent[i..]
                    .iter()
                    .filter(|u| u.duration_since(*t) < PACE_WINDOW / 10)
                    .count();
                prop_assert!(
                    tenth <= limit as usize / 10 + burst + 1,
                    "{} publishes in 100 ms from #{} at {}/s", tenth, i, limit
                );
            }
        }
    }

    /// Control messages are never held back, but the records wait for them.
    #[test]
    fn control_messages_take_their_place_in_the_window() {
        let mut p = Pacer::new(10);
        let now = Instant::now();
        for _ in 0..10 {
            p.note(now);
        }
        assert!(!p.ready(now));
        assert!(p.next_free(now).unwrap() >= now + Duration::from_millis(900));
    }

    #[test]
    fn an_unlimited_pacer_never_waits() {
        let mut p = Pacer::new(0);
        let now = Instant::now();
        for _ in 0..10_000 {
            assert!(p.ready(now));
            p.note(now);
        }
        assert_eq!(p.next_free(now), None);
    }

    fn status_with(streams: usize) -> Status {
        let mut s = Status::offline("edge-1");
        s.state = DeviceState::Online;
        s.streams = (0..streams)
            .map(|i| ember_proto::StreamStatus {
                stream: format!("stream-{i:04}"),
                ..Default::default()
            })
            .collect();
        s
    }

    #[test]
    fn a_status_that_fits_goes_whole() {
        let f = fit_status(status_with(3), ember_proto::Encoding::Json, 128 * 1024, 0).unwrap();
        assert_eq!((f.streams_sent, f.streams_total), (3, 3));
    }

    /// A device with more streams than one 128 KiB status can list reports them in turn, each
    /// status within the limit, every stream within a few statuses.
    #[test]
    fn a_status_too_large_carries_the_streams_that_fit_in_turn() {
        let limit = 128 * 1024;
        for encoding in [ember_proto::Encoding::Json, ember_proto::Encoding::Cbor] {
            let total = 4000;
            let mut offset = 0;
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..20 {
                let f = fit_status(status_with(total), encoding, limit, offset).unwrap();
                assert!(f.payload.len() <= limit, "{} > {limit}", f.payload.len());
                assert!(f.streams_sent > 0 && f.streams_sent < total);
                let (back, _) = ember_proto::message::decode_status(&f.payload).unwrap();
                assert_eq!(back.streams.len(), f.streams_sent);
                seen.extend(back.streams.into_iter().map(|s| s.stream));
                offset = f.next_offset;
            }
            assert_eq!(
                seen.len(),
                total,
                "every stream reported within 20 statuses"
            );
        }
    }

    #[test]
    fn a_status_that_cannot_fit_at_all_is_refused_with_the_reason() {
        let e = fit_status(status_with(1), ember_proto::Encoding::Json, 10, 0).unwrap_err();
        assert!(e.contains("mqtt.message_max_bytes"), "{e}");
    }
}
