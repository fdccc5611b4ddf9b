//! An MQTT subscriber that keeps a delivery ledger of everything agents publish.
//!
//! # What it records
//!
//! Per `(device, stream)` ([`StreamLog`]): every sequence number received with its capture
//! time and envelope CRC, the number of duplicates, conflicts and order violations. Per
//! device: the last status message. Globally: decode errors (with the first few reasons), the
//! encodings and first bytes of telemetry payloads, and how many times it (re)subscribed.
//!
//! # Rules
//!
//! Delivery is at least once, so a record can arrive more than once: after a reconnect (the
//! agent re-sends everything not acknowledged, from its queue's head) or a restart. So:
//!
//! * **duplicate**: a seq already received in that stream. Counted, never an error by itself;
//!   `(device, stream, seq)` is the idempotency key that removes it.
//! * **conflict**: a duplicate whose content (capture time, envelope CRC) differs from the
//!   first copy: the agent reused a sequence number. Always a bug.
//! * **order violation**: a seq received for the *first* time that is lower than the highest
//!   seq already received in that stream. "In order per stream" therefore means: re-sends may
//!   repeat any earlier range, but new records appear in increasing order. (The agent sends a
//!   stream strictly in seq order on one connection, and the broker keeps that order, so a new
//!   record below the high-water mark means one was overtaken, or a lower number was assigned
//!   after a higher one.)
//! * **decode error**: a payload `decode_telemetry`, `decode_inference` or `decode_status`
//!   rejects (bad encoding, wrong version, bad CRC, seqs not increasing inside one message).
//!
//! Inference results (`ember/v1/{device}/inference`) get their own ledger per `(device,
//! inference stream)` ([`InferenceLog`]), with the same duplicate/conflict/order rules.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ember_proto::message::{decode_inference, decode_status, decode_telemetry};
use ember_proto::{Channel, Encoding, InferenceRecord, Status, Topic};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// How long `start` waits for the first SUBACK.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between reconnection attempts while the broker is down.
const RECONNECT_DELAY: Duration = Duration::from_millis(20);
/// Decode error reasons kept for failure messages.
const KEPT_ERRORS: usize = 20;

/// One received record, as first seen.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordSeen {
    pub ts: u64,
    pub crc: u32,
    /// Only kept by [`Subscriber::start_keeping_values`].
    pub values: Option<Vec<f32>>,
}

/// The ledger of one `(device, stream)`.
#[derive(Debug, Clone, Default)]
pub struct StreamLog {
    /// Every seq received, first copy.
    pub records: BTreeMap<u64, RecordSeen>,
    pub duplicates: u64,
    pub conflicts: u64,
    pub order_violations: u64,
    /// Telemetry messages for this stream.
    pub messages: u64,
    /// The highest seq received.
    pub highest: u64,
}

impl StreamLog {
    /// Distinct seqs received.
    pub fn unique(&self) -> u64 {
        self.records.len() as u64
    }

    /// Whether exactly the seqs `1..=last` were received (nothing missing, nothing beyond).
    pub fn is_exactly(&self, last: u64) -> bool {
        self.unique() == last && self.records.keys().next_back().copied().unwrap_or(0) == last
    }

    /// Whether every seq of `1..=last` was received.
    pub fn has_all(&self, last: u64) -> bool {
        // Cheap first: `wait_for` predicates run on every message.
        if (self.records.len() as u64) < last {
            return false;
        }
        self.records.range(1..=last).count() as u64 == last
    }

    /// The seqs of `1..=last` not received, as ranges.
    pub fn missing(&self, last: u64) -> Vec<RangeInclusive<u64>> {
        let mut out = Vec::new();
        let mut next = 1u64;
        for &seq in self.records.range(1..=last).map(|(s, _)| s) {
            if seq > next {
                out.push(next..=seq - 1);
            }
            next = seq + 1;
        }
        if next <= last {
            out.push(next..=last);
        }
        out
    }

    /// Seqs received that are greater than `last`.
    pub fn beyond(&self, last: u64) -> u64 {
        self.records.range(last.saturating_add(1)..).count() as u64
    }
}

/// The ledger of one `(device, inference stream)`: every result, first copy, by seq.
#[derive(Debug, Clone, Default)]
pub struct InferenceLog {
    /// The source stream the results are about.
    pub source: String,
    pub records: BTreeMap<u64, InferenceRecord>,
    pub duplicates: u64,
    /// Duplicates whose content differs from the first copy (a reused seq: always a bug).
    pub conflicts: u64,
    pub order_violations: u64,
    pub messages: u64,
}

impl InferenceLog {
    pub fn unique(&self) -> u64 {
        self.records.len() as u64
    }

    /// Whether exactly the seqs `1..=n` were received, `n` being the highest.
    pub fn is_contiguous(&self) -> bool {
        self.records.keys().next_back().copied().unwrap_or(0) == self.unique()
    }
}

/// Everything the subscriber has seen so far.
#[derive(Debug, Clone, Default)]
pub struct SubscriberView {
    /// Keyed by `(device, stream)`.
    pub streams: BTreeMap<(String, String), StreamLog>,
    /// Inference results keyed by `(device, inference stream)`.
    pub inference: BTreeMap<(String, String), InferenceLog>,
    pub inference_messages: u64,
    /// The last status message per device.
    pub statuses: BTreeMap<String, Status>,
    pub status_messages: u64,
    pub telemetry_messages: u64,
    pub heartbeats: u64,
    pub decode_errors: u64,
    /// The first few decode errors, with their topics.
    pub decode_error_samples: Vec<String>,
    /// Telemetry payloads by the encoding they declare.
    pub telemetry_encodings: BTreeMap<&'static str, u64>,
    /// The distinct first three bytes of telemetry payloads.
    pub telemetry_prefixes: BTreeSet<Vec<u8>>,
    /// Status payloads by the encoding they declare.
    pub status_encodings: BTreeMap<&'static str, u64>,
    /// Completed subscriptions (SUBACKs): 1 after start, +1 per reconnection.
    pub subscriptions: u64,
    /// Whether the subscription is currently in place.
    pub subscribed: bool,
}

impl SubscriberView {
    pub fn stream(&self, device: &str, stream: &str) -> Option<&StreamLog> {
        self.streams.get(&(device.to_string(), stream.to_string()))
    }

    /// Distinct seqs received for a stream (0 if none).
    pub fn unique(&self, device: &str, stream: &str) -> u64 {
        self.stream(device, stream).map_or(0, StreamLog::unique)
    }

    pub fn inference(&self, device: &str, stream: &str) -> Option<&InferenceLog> {
        self.inference
            .get(&(device.to_string(), stream.to_string()))
    }

    pub fn status(&self, device: &str) -> Option<&Status> {
        self.statuses.get(device)
    }

    /// The device's last status, if it is the explicit `offline` status of a graceful stop
    /// (not the Last Will, which carries no streams).
    pub fn final_status(&self, device: &str) -> Option<&Status> {
        self.status(device).filter(|s| {
            s.state == ember_proto::DeviceState::Offline && s.ts != 0 && s.counters.is_some()
        })
    }

    pub fn total_duplicates(&self) -> u64 {
        self.streams.values().map(|s| s.duplicates).sum()
    }

    pub fn total_conflicts(&self) -> u64 {
        self.streams.values().map(|s| s.conflicts).sum()
    }

    pub fn total_order_violations(&self) -> u64 {
        self.streams.values().map(|s| s.order_violations).sum()
    }

    fn on_publish(&mut self, topic: &str, payload: &[u8], keep_values: bool) {
        let channel = match Topic::parse(topic) {
            Ok(t) => t.channel,
            Err(e) => match azure_channel(topic) {
                Some(c) => c,
                None => return self.decode_error(topic, &e.to_string()),
            },
        };
        let enc = match Encoding::sniff(payload) {
            Ok(e) => e.as_str(),
            Err(_) => "unknown",
        };
        match channel {
            Channel::Telemetry => {
                self.telemetry_messages += 1;
                *self.telemetry_encodings.entry(enc).or_default() += 1;
                self.telemetry_prefixes
                    .insert(payload.iter().take(3).copied().collect());
                match decode_telemetry(payload) {
                    Ok((batch, _)) => {
                        let log = self
                            .streams
                            .entry((batch.device.clone(), batch.stream.clone()))
                            .or_default();
                        log.messages += 1;
                        for r in batch.records {
                            let seen = RecordSeen {
                                ts: r.ts,
                                crc: r.crc,
                                values: keep_values.then_some(r.values),
                            };
                            match log.records.get(&r.seq) {
                                Some(first) => {
                                    log.duplicates += 1;
                                    if first.ts != seen.ts || first.crc != seen.crc {
                                        log.conflicts += 1;
                                    }
                                }
                                None => {
                                    if r.seq < log.highest {
                                        log.order_violations += 1;
                                    }
                                    log.highest = log.highest.max(r.seq);
                                    log.records.insert(r.seq, seen);
                                }
                            }
                        }
                    }
                    Err(e) => self.decode_error(topic, &e.to_string()),
                }
            }
            Channel::Status => match decode_status(payload) {
                Ok((status, _)) => {
                    *self.status_encodings.entry(enc).or_default() += 1;
                    self.status_messages += 1;
                    self.statuses.insert(status.device.clone(), status);
                }
                Err(e) => self.decode_error(topic, &e.to_string()),
            },
            Channel::Heartbeat => self.heartbeats += 1,
            Channel::Inference => match decode_inference(payload) {
                Ok((batch, _)) => {
                    self.inference_messages += 1;
                    let log = self
                        .inference
                        .entry((batch.device.clone(), batch.stream.clone()))
                        .or_default();
                    log.messages += 1;
                    log.source.clone_from(&batch.source);
                    for r in batch.records {
                        match log.records.get(&r.seq) {
                            Some(first) => {
                                log.duplicates += 1;
                                if *first != r {
                                    log.conflicts += 1;
                                }
                            }
                            None => {
                                if log.records.keys().next_back().is_some_and(|h| r.seq < *h) {
                                    log.order_violations += 1;
                                }
                                log.records.insert(r.seq, r);
                            }
                        }
                    }
                }
                Err(e) => self.decode_error(topic, &e.to_string()),
            },
        }
    }

    fn decode_error(&mut self, topic: &str, why: &str) {
        self.decode_errors += 1;
        if self.decode_error_samples.len() < KEPT_ERRORS {
            self.decode_error_samples.push(format!("{topic}: {why}"));
        }
    }
}

struct Shared {
    view: Mutex<SubscriberView>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, SubscriberView> {
        self.view.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The channel of an Azure IoT Hub events topic
/// (`devices/{id}/messages/events/ember-channel=telemetry&…`, the agent's `azure-iot-hub`
/// profile), from its property bag.
fn azure_channel(topic: &str) -> Option<Channel> {
    let rest = topic.strip_prefix("devices/")?;
    let (_, bag) = rest.split_once("/messages/events/")?;
    bag.split('&')
        .find_map(|kv| kv.strip_prefix("ember-channel="))?
        .parse()
        .ok()
}

/// A QoS1, clean-session MQTT subscriber on its own thread. It reconnects and resubscribes by
/// itself when the broker goes away and comes back. Stopped when dropped.
pub struct Subscriber {
    shared: Arc<Shared>,
    stop: Arc<tokio::sync::Notify>,
    thread: Option<JoinHandle<()>>,
}

impl Subscriber {
    /// Connects to the broker on `127.0.0.1:port`, subscribes to `filter` at QoS1 and returns
    /// once the broker has confirmed the subscription (so nothing published afterwards is
    /// missed). Panics if that does not happen within 10 s.
    pub fn start(port: u16, filter: &str) -> Subscriber {
        Self::spawn(port, filter, false, None)
    }

    /// Like [`Subscriber::start`], also keeping every record's values.
    pub fn start_keeping_values(port: u16, filter: &str) -> Subscriber {
        Self::spawn(port, filter, true, None)
    }

    /// Like [`Subscriber::start`], over TLS with `tls` (e.g. [`crate::tls::client_config`]
    /// with the fleet's certificate, to see what the fleet identity may see).
    pub fn start_tls(port: u16, filter: &str, tls: Arc<rustls::ClientConfig>) -> Subscriber {
        Self::spawn(port, filter, false, Some(tls))
    }

    fn spawn(
        port: u16,
        filter: &str,
        keep_values: bool,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Subscriber {
        let shared = Arc::new(Shared {
            view: Mutex::new(SubscriberView::default()),
            changed: Condvar::new(),
        });
        let stop = Arc::new(tokio::sync::Notify::new());
        let thread = {
            let (shared, stop, filter) = (shared.clone(), stop.clone(), filter.to_string());
            std::thread::Builder::new()
                .name(format!("subscriber-{port}"))
                .spawn(move || run(port, filter, keep_values, tls, shared, stop))
                .expect("cannot spawn the subscriber thread")
        };
        let sub = Subscriber {
            shared,
            stop,
            thread: Some(thread),
        };
        assert!(
            sub.wait_for(|v| v.subscribed, SUBSCRIBE_TIMEOUT),
            "the subscriber could not subscribe to {filter:?} on 127.0.0.1:{port} within {SUBSCRIBE_TIMEOUT:?}"
        );
        sub
    }

    /// Waits until `cond` holds for the current view (true) or `timeout` passes (false). It
    /// re-checks whenever a message arrives (a condition variable, not a sleep), and at least
    /// every 100 ms. `cond` runs on the live view under its lock, so no copy is made; keep it
    /// cheap (check counts before scanning seqs, as [`StreamLog::has_all`] does).
    pub fn wait_for(
        &self,
        mut cond: impl FnMut(&SubscriberView) -> bool,
        timeout: Duration,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        let mut view = self.shared.lock();
        loop {
            if cond(&view) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let wait = (deadline - now).min(Duration::from_millis(100));
            view = self
                .shared
                .changed
                .wait_timeout(view, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Runs `f` on the current view without copying it.
    pub fn with_view<R>(&self, f: impl FnOnce(&SubscriberView) -> R) -> R {
        f(&self.shared.lock())
    }

    /// A copy of the current view.
    pub fn snapshot(&self) -> SubscriberView {
        self.shared.lock().clone()
    }

    /// Completed subscriptions so far (see [`SubscriberView::subscriptions`]).
    pub fn subscriptions(&self) -> u64 {
        self.with_view(|v| v.subscriptions)
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.stop.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(
    port: u16,
    filter: String,
    keep_values: bool,
    tls: Option<Arc<rustls::ClientConfig>>,
    shared: Arc<Shared>,
    stop: Arc<tokio::sync::Notify>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            shared.lock().decode_error(
                "<runtime>",
                &format!("cannot start the subscriber's runtime: {e}"),
            );
            return;
        }
    };
    rt.block_on(async move {
        // Unique per subscriber: the broker disconnects a client whose id another one takes.
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let mut opts = MqttOptions::new(
            format!("ember-testkit-sub-{}-{id}", std::process::id()),
            "127.0.0.1",
            port,
        );
        opts.set_clean_session(true);
        if let Some(tls) = tls {
            opts.set_transport(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Rustls(
                tls,
            )));
        }
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_max_packet_size(64 * 1024 * 1024, 64 * 1024);
        let (client, mut eventloop) = AsyncClient::new(opts, 16);
        loop {
            let ev = tokio::select! {
                _ = stop.notified() => break,
                ev = eventloop.poll() => ev,
            };
            match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if let Err(e) = client.try_subscribe(filter.clone(), QoS::AtLeastOnce) {
                        shared.lock().decode_error("<subscribe>", &e.to_string());
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let mut v = shared.lock();
                    v.subscribed = true;
                    v.subscriptions += 1;
                    shared.changed.notify_all();
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    shared.lock().on_publish(&p.topic, &p.payload, keep_values);
                    shared.changed.notify_all();
                }
                Ok(_) => {}
                Err(_) => {
                    {
                        let mut v = shared.lock();
                        if v.subscribed {
                            v.subscribed = false;
                            shared.changed.notify_all();
                        }
                    }
                    // The broker is away: try again shortly (rumqttc reconnects on the next poll).
                    tokio::select! {
                        _ = stop.notified() => break,
                        _ = tokio::time::sleep(RECONNECT_DELAY) => {}
                    }
                }
            }
        }
        let _ = client.try_disconnect();
    });
}
