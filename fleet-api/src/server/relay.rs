//! The live-event relay between replicas (PostgreSQL only): what one replica commits reaches
//! the dashboards connected to every other one, through PostgreSQL `LISTEN/NOTIFY`.
//!
//! ```text
//! Events::publish ─▶ bounded channel ─▶ notifier: pg_notify('ember_events', {"o": origin, "e": [events]})
//!                                                 pg_notify('ember_desired', origin)
//! listener (one connection per replica, LISTEN ember_events, ember_desired)
//!   ─▶ from another origin: Events::deliver_remote (this replica's SSE streams)
//!                           Service::wake_publisher (the leader publishes new desired states now)
//! ```
//!
//! Guarantees: the relay runs after the commit that produced the events (they are published
//! after it), so no replica shows an event whose rows are not committed. Best effort like the
//! local stream: a notification sent while a listener is reconnecting is missed, an event
//! larger than a notification (about 8000 bytes) is not relayed, and both are counted in
//! `events_relay_dropped_total`; the dashboard reloads from the REST API anyway.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::postgres::PgListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::db::Db;
use crate::metrics::Metrics;
use crate::ota::rollout::service::Service as Rollouts;
use crate::server::events::{Events, LiveEvent, Relayed};

/// The channel live events travel on.
pub const CHANNEL_EVENTS: &str = "ember_events";
/// The channel that wakes the desired-state publisher.
pub const CHANNEL_DESIRED: &str = "ember_desired";
/// Largest notification payload sent (PostgreSQL's limit is 8000 bytes).
const MAX_PAYLOAD: usize = 7000;
/// Events read from the channel per round of notifications.
const MAX_PER_ROUND: usize = 256;
/// Wait after a listener error before listening again.
const RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    /// The replica that committed the events.
    o: String,
    e: Vec<LiveEvent>,
}

/// Starts the notifier and the listener; both stop at `shutdown`.
pub fn spawn(
    url: String,
    db: Db,
    events: Arc<Events>,
    rollouts: Arc<Rollouts>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Vec<JoinHandle<()>> {
    let Some(rx) = events.relay_to_replicas() else {
        return Vec::new();
    };
    let origin = origin_id();
    vec![
        tokio::spawn(notify(
            db.clone(),
            rx,
            origin.clone(),
            metrics.clone(),
            shutdown.clone(),
        )),
        tokio::spawn(listen(url, db, origin, events, rollouts, metrics, shutdown)),
    ]
}

fn origin_id() -> String {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        // Only the uniqueness among replicas matters; the time will do.
        b = crate::db::now_us().to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

async fn notify(
    db: Db,
    mut rx: mpsc::Receiver<Relayed>,
    origin: String,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut round = Vec::with_capacity(MAX_PER_ROUND);
    loop {
        round.clear();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            n = rx.recv_many(&mut round, MAX_PER_ROUND) => if n == 0 { return },
        }
        let mut desired = false;
        let mut payloads: Vec<String> = Vec::new();
        let mut batch: Vec<LiveEvent> = Vec::new();
        let mut size = 0;
        for r in round.drain(..) {
            let e = match r {
                Relayed::DesiredChanged => {
                    desired = true;
                    continue;
                }
                Relayed::Event(e) => e,
            };
            let len = serde_json::to_string(&e)
                .map(|t| t.len())
                .unwrap_or(usize::MAX);
            if len > MAX_PAYLOAD - 64 {
                metrics.inc("events_relay_dropped_total", &[("reason", "too_large")], 1);
                continue;
            }
            if size + len + 1 > MAX_PAYLOAD - 64 && !batch.is_empty() {
                payloads.push(envelope(&origin, std::mem::take(&mut batch)));
                size = 0;
            }
            size += len + 1;
            batch.push(e);
        }
        if !batch.is_empty() {
            payloads.push(envelope(&origin, batch));
        }
        for p in payloads {
            send(&db, &metrics, CHANNEL_EVENTS, &p).await;
        }
        if desired {
            send(&db, &metrics, CHANNEL_DESIRED, &origin).await;
        }
    }
}

fn envelope(origin: &str, e: Vec<LiveEvent>) -> String {
    serde_json::to_string(&Envelope {
        o: origin.to_string(),
        e,
    })
    .unwrap_or_default()
}

async fn send(db: &Db, metrics: &Metrics, channel: &str, payload: &str) {
    let r = sqlx::query("SELECT pg_notify($1, $2)")
        .bind(channel)
        .bind(payload)
        .execute(db.pool())
        .await;
    match r {
        Ok(_) => metrics.inc("events_relayed_total", &[("channel", channel)], 1),
        Err(e) => {
            metrics.inc("events_relay_dropped_total", &[("reason", "database")], 1);
            tracing::debug!(error = %e, "Could not relay live events to the other replicas.");
        }
    }
}

async fn listen(
    url: String,
    db: Db,
    origin: String,
    events: Arc<Events>,
    rollouts: Arc<Rollouts>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    'connect: while !shutdown.is_cancelled() {
        let mut listener = match PgListener::connect(&db.connect_url(&url)).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "Cannot listen for other replicas' events; retrying.");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(RETRY) => continue 'connect,
                }
            }
        };
        if let Err(e) = listener.listen_all([CHANNEL_EVENTS, CHANNEL_DESIRED]).await {
            tracing::warn!(error = %e, "Cannot listen for other replicas' events; retrying.");
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(RETRY) => continue 'connect,
            }
        }
        loop {
            let n = tokio::select! {
                _ = shutdown.cancelled() => return,
                n = listener.recv() => n,
            };
            let n = match n {
                Ok(n) => n,
                Err(e) => {
                    // `recv` reconnects on the next call after a lost connection; what was
                    // notified meanwhile is missed (best effort).
                    tracing::warn!(error = %e, "Lost the replica event listener; listening again.");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(RETRY) => continue,
                    }
                }
            };
            match n.channel() {
                CHANNEL_EVENTS => match serde_json::from_str::<Envelope>(n.payload()) {
                    Ok(env) if env.o != origin => {
                        metrics.inc(
                            "events_received_from_replicas_total",
                            &[],
                            env.e.len() as u64,
                        );
                        for e in env.e {
                            events.deliver_remote(e);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!(error = %e, "Ignored an unreadable relayed event."),
                },
                CHANNEL_DESIRED if n.payload() != origin => rollouts.wake_publisher(),
                _ => {}
            }
        }
    }
}
