//! Live events for the dashboard: what ingestion just committed, fanned out to every open
//! `/api/v1/events` stream (server-sent events).
//!
//! Guarantees: an event is published only after the transaction holding it committed, so a
//! page never shows a record the API cannot return. Delivery is best effort: the channel is
//! bounded ([`CAPACITY`]); a subscriber that falls behind skips what it missed (the stream says
//! so with a `lagged` event) and never slows ingestion down.

use serde::Serialize;
use tokio::sync::broadcast;

/// Events buffered per subscriber before the slowest one starts skipping.
pub const CAPACITY: usize = 1024;
/// Most result events published per stream and batch (the newest ones).
pub const MAX_RESULTS_PER_STREAM: usize = 32;

/// One thing that happened, as sent to the dashboard (`event:` is `type`, `data:` this JSON).
#[derive(Debug, Clone, PartialEq, Serialize)]
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

/// The fan-out point shared by the writer (publisher) and the API (subscribers).
#[derive(Debug)]
pub struct Events {
    tx: broadcast::Sender<LiveEvent>,
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
        }
    }

    /// Publishes to whoever listens; without listeners the event is dropped.
    pub fn publish(&self, event: LiveEvent) {
        let _ = self.tx.send(event);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<LiveEvent> {
        self.tx.subscribe()
    }
}
