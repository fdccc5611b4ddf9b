//! Live events for the dashboard: what ingestion just committed, fanned out to every open
//! `/api/v1/events` stream (server-sent events), on every replica.
//!
//! ```text
//! writer / rollouts ──publish──▶ local broadcast ──▶ this replica's SSE streams
//!        │ PostgreSQL only
//!        └──▶ relay (bounded) ──pg_notify('ember_events', {origin, events})──▶ LISTEN on every
//!             replica ──▶ its local broadcast, unless it is the origin
//! ```
//!
//! Guarantees: an event is published only after the transaction holding it committed, so a
//! page never shows a record the API cannot return. With PostgreSQL a dashboard connected to
//! any replica sees what every replica committed ([`crate::server::relay`]); SQLite runs one
//! replica, which sees everything locally. Delivery is best effort: the channels are bounded
//! ([`CAPACITY`], [`RELAY_CAPACITY`]); a subscriber that falls behind skips what it missed (the
//! stream says so with a `lagged` event) and neither a slow subscriber nor a slow database
//! ever slows ingestion down (events the relay cannot take are counted and dropped).

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};

/// Events buffered per subscriber before the slowest one starts skipping.
pub const CAPACITY: usize = 1024;
/// Most result events published per stream and batch (the newest ones).
pub const MAX_RESULTS_PER_STREAM: usize = 32;
/// Events waiting for the relay to other replicas before new ones are dropped.
pub const RELAY_CAPACITY: usize = 4096;

/// One thing that happened, as sent to the dashboard (`event:` is `type`, `data:` this JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LiveEvent {
    /// A status (or the Last Will) was applied: the device's online state now.
    Device { device_id: String, online: bool },
    /// The newest record of a telemetry stream stored by one batch.
    Telemetry {
        device_id: String,
        stream: String,
        seq: i64,
        ts: i64,
        values: Vec<Option<f32>>,
    },
    /// A model result stored (the newest [`MAX_RESULTS_PER_STREAM`] per stream and batch).
    Inference {
        device_id: String,
        stream: String,
        seq: i64,
        ts: i64,
        model: String,
        version: String,
        latency_us: i64,
        /// `class` or `anomaly`.
        output_kind: String,
        label: Option<String>,
        /// The winning class's index and every class's probability (class results), as the
        /// REST API returns them, so a live row reads like a loaded one.
        class: Option<i64>,
        probabilities: Option<Vec<f32>>,
        score: Option<f64>,
        threshold: Option<f64>,
        anomalous: bool,
    },
    /// A rollout changed (created, commanded, a device reported, a wave started): reload it.
    Rollout {
        rollout_id: String,
        state: String,
        current_wave: usize,
        active: usize,
        failed: usize,
        devices: usize,
    },
    /// Messages from a device were rejected.
    Reject {
        device_id: String,
        reason: String,
        count: i64,
    },
}

impl LiveEvent {
    /// The SSE event name.
    pub fn name(&self) -> &'static str {
        match self {
            LiveEvent::Device { .. } => "device",
            LiveEvent::Telemetry { .. } => "telemetry",
            LiveEvent::Inference { .. } => "inference",
            LiveEvent::Reject { .. } => "reject",
            LiveEvent::Rollout { .. } => "rollout",
        }
    }
}

/// What goes to the other replicas.
// Nearly every value is an `Event`: boxing it would allocate for the common case to save
// space in the rare one.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Relayed {
    Event(LiveEvent),
    /// Desired-state rows changed: wake the publisher (on whichever replica leads).
    DesiredChanged,
}

/// The fan-out point shared by the writer (publisher) and the API (subscribers).
#[derive(Debug)]
pub struct Events {
    tx: broadcast::Sender<LiveEvent>,
    relay: std::sync::OnceLock<mpsc::Sender<Relayed>>,
    dropped: std::sync::atomic::AtomicU64,
}

impl Default for Events {
    fn default() -> Self {
        Events::new()
    }
}

impl Events {
    pub fn new() -> Events {
        Events {
            tx: broadcast::channel(CAPACITY).0,
            relay: std::sync::OnceLock::new(),
            dropped: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Sends what is published from now on to the other replicas too (`server::relay`);
    /// returns the receiving end. Only the first call takes effect.
    pub fn relay_to_replicas(&self) -> Option<mpsc::Receiver<Relayed>> {
        let (tx, rx) = mpsc::channel(RELAY_CAPACITY);
        self.relay.set(tx).ok().map(|()| rx)
    }

    /// Publishes to whoever listens, here and (with a relay) on the other replicas; without
    /// listeners the event is dropped.
    pub fn publish(&self, event: LiveEvent) {
        if let Some(relay) = self.relay.get() {
            self.relay(relay, Relayed::Event(event.clone()));
        }
        let _ = self.tx.send(event);
    }

    /// Tells the other replicas that desired-state rows changed (no-op without a relay).
    pub fn desired_changed(&self) {
        if let Some(relay) = self.relay.get() {
            self.relay(relay, Relayed::DesiredChanged);
        }
    }

    fn relay(&self, relay: &mpsc::Sender<Relayed>, r: Relayed) {
        if relay.try_send(r).is_err() {
            self.dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Events the relay could not take (full or stopped).
    pub fn relay_dropped(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// An event another replica committed: to this replica's subscribers only.
    pub fn deliver_remote(&self, event: LiveEvent) {
        let _ = self.tx.send(event);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<LiveEvent> {
        self.tx.subscribe()
    }
}
