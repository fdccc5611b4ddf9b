//! Sensor sources: each turns some input into [`Sample`]s on a bounded channel.
//!
//! * `sim`: a deterministic multichannel signal generator (e.g. a 6-axis IMU at 10-1000 Hz).
//! * `replay`: CSV or UEA `.ts` files, looped or once, at a fixed rate.
//! * `socket`: newline-delimited JSON from local processes over a Unix socket or loopback TCP.
//! * `serial`: a sensor node (`firmware/`) on a serial line or a raw TCP serial server:
//!   postcard + COBS + CRC-32C frames (`ember_proto::node`), with a ledger of what the line lost.
//!
//! Every source passes each sample through its stream's [`schema::Guard`] before sending it:
//! a sample of the wrong channel count, with NaN/Inf, or stamped too far back is refused there,
//! counted by reason, and never queued (see `schema`).
//!
//! **Invariant:** bad input never stops a source: a malformed line is rejected, counted in
//! `Metrics::rejected` and logged (rate-limited), and the source carries on.
//! **API boundary:** a source only produces samples; sequence numbers are assigned later by the
//! durable queue, so a sample has none.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::SourceSettings;
use crate::metrics::Metrics;
use schema::{Guard, Schema};

pub mod replay;
pub mod schema;
pub mod serial;
pub mod sim;
pub mod socket;
pub mod ts;

/// One multichannel sample of one stream, before it is queued.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub stream: Arc<str>,
    /// Capture time, microseconds since the Unix epoch.
    pub ts_us: u64,
    pub values: Vec<f32>,
    /// The sample's position in its source's own numbering, when the source resumes from what
    /// is durably queued (the serial source: `boot << 32 | seq` of the node); the queue keeps
    /// the latest one with the stream ([`crate::queue::Queue::durable_origin`]).
    pub origin: Option<u64>,
}

/// What a source may ask of the durable queue: the [`Sample::origin`] of its stream's latest
/// durable record. Implemented by the queue (a layer above sources, so a trait here).
pub trait DurableOrigin: Send + Sync {
    fn durable_origin(&self, stream: &str) -> Option<u64>;
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot open {what}: {source}")]
    Open {
        what: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    BadFile { path: String, message: String },
    #[error("source I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Runs one source until `shutdown` fires, the channel closes, or (for a replay with
/// `loop = false`) the input is exhausted. `recorded` is the channel count the queue holds for
/// the stream (the runtime checked that it agrees with a declared one).
pub async fn run(
    settings: SourceSettings,
    recorded: Option<usize>,
    durable: Arc<dyn DurableOrigin>,
    tx: mpsc::Sender<Sample>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), SourceError> {
    let schema = Schema {
        channels: settings.declared_channels().or(recorded),
        max_backwards_us: settings.max_backwards_ms().saturating_mul(1000),
    };
    let guard = Guard::new(settings.stream().into(), schema, metrics.clone());
    match settings {
        SourceSettings::Sim {
            stream,
            rate_hz,
            channels,
            seed,
            ..
        } => {
            sim::run(
                stream.into(),
                rate_hz,
                channels,
                seed,
                guard,
                tx,
                metrics,
                shutdown,
            )
            .await
        }
        SourceSettings::Replay {
            stream,
            path,
            format,
            rate_hz,
            looped,
            ..
        } => {
            let replay = replay::Replay {
                path,
                format,
                rate_hz,
                looped,
            };
            replay::run(stream.into(), replay, guard, tx, metrics, shutdown).await
        }
        SourceSettings::Socket {
            stream, endpoint, ..
        } => socket::run(stream.into(), endpoint, guard, tx, metrics, shutdown).await,
        SourceSettings::Serial {
            stream,
            device,
            baud,
            timestamps,
            rate_hz,
            ..
        } => {
            let serial = serial::Serial {
                device,
                baud,
                timestamps,
                rate_hz,
            };
            serial::run(stream.into(), serial, guard, durable, tx, metrics, shutdown).await
        }
    }
}

/// Microseconds since the Unix epoch, now.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}
