//! What the dashboard reads: a fleet overview in one request, and `/api/v1/events`, a
//! server-sent event stream of what ingestion commits (device state changes, new records and
//! results, rejects) plus ingest counters every [`TICK`].
//!
//! The event stream ends when the service shuts down (so the HTTP drain never waits on it) and
//! skips what a slow client missed (a `lagged` event says how many); clients reload state from
//! the REST API when they see one.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use serde::Serialize;
use sqlx::Row;
use tokio::sync::broadcast::error::RecvError;
use utoipa::ToSchema;

use super::error::ErrorBody;
use super::{AppError, AppState};
use crate::db::{Sql, get_bool};
use crate::server::ledger::device_ledger;

/// How often the event stream sends the ingest counters.
pub const TICK: Duration = Duration::from_secs(2);
/// Devices whose ledgers the overview sums (the rest are counted in `ledger_devices_skipped`).
const OVERVIEW_LEDGER_DEVICES: usize = 500;

/// A model version and how many devices run it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelUse {
    pub model: String,
    pub version: String,
    pub devices: i64,
}

/// A device whose ledger has records nothing explains.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeviceLoss {
    pub device_id: String,
    pub lost_count: u64,
}

/// Rejected messages by reason, fleet-wide.
#[derive(Debug, Serialize, ToSchema)]
pub struct RejectCount {
    pub reason: String,
    pub count: i64,
}

/// The fleet at a glance.
#[derive(Debug, Serialize, ToSchema)]
pub struct Overview {
    pub devices: i64,
    pub online: i64,
    pub offline: i64,
    /// Model versions the devices reported in their last status, most used first.
    pub models: Vec<ModelUse>,
    /// Sum of every device's ledger `lost_count`.
    pub lost_records: u64,
    /// Devices with lost records, most first.
    pub devices_with_losses: Vec<DeviceLoss>,
    /// Devices beyond the first 500 whose ledgers were not summed.
    pub ledger_devices_skipped: i64,
    pub rejects: Vec<RejectCount>,
    /// Records and results stored by this instance since it started.
    pub records_stored: f64,
}

/// The fleet overview
///
/// Device counts, model versions in use, lost records (from the durability ledger) and rejects.
#[utoipa::path(
    get,
    path = "/api/v1/overview",
    tag = "operations",
    responses(
        (status = 200, description = "The fleet at a glance", body = Overview),
        (status = 401, description = "Missing or invalid token", body = ErrorBody),
    )
)]
pub async fn overview(State(state): State<AppState>) -> Result<Json<Overview>, AppError> {
    let pool = state.db.pool();
    let rows = sqlx::query("SELECT device_id, online, models FROM devices ORDER BY device_id")
        .fetch_all(pool)
        .await?;
    let (mut online, mut models) = (0i64, BTreeMap::<(String, String), i64>::new());
    let mut ids = Vec::with_capacity(rows.len());
    for row in &rows {
        if get_bool(row, "online")? {
            online += 1;
        }
        ids.push(row.try_get::<String, _>("device_id")?);
        let text: Option<String> = row.try_get("models")?;
        let map: BTreeMap<String, String> = text
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        for (model, version) in map {
            *models.entry((model, version)).or_default() += 1;
        }
    }
    let mut models: Vec<ModelUse> = models
        .into_iter()
        .map(|((model, version), devices)| ModelUse {
            model,
            version,
            devices,
        })
        .collect();
    models.sort_by(|a, b| b.devices.cmp(&a.devices).then(a.model.cmp(&b.model)));
    let mut losses = Vec::new();
    for id in ids.iter().take(OVERVIEW_LEDGER_DEVICES) {
        let lost: u64 = device_ledger(&state.db, id)
            .await?
            .iter()
            .map(|s| s.lost_count)
            .sum();
        if lost > 0 {
            losses.push(DeviceLoss {
                device_id: id.clone(),
                lost_count: lost,
            });
        }
    }
    losses.sort_by_key(|l| std::cmp::Reverse(l.lost_count));
    let rejects = Sql::new(
        "SELECT reason, CAST(SUM(count) AS BIGINT) AS n FROM rejects GROUP BY reason ORDER BY reason",
    )
    .query()
    .fetch_all(pool)
    .await?
    .iter()
    .map(|r| {
        Ok(RejectCount {
            reason: r.try_get("reason")?,
            count: r.try_get("n")?,
        })
    })
    .collect::<Result<Vec<_>, sqlx::Error>>()?;
    let devices = ids.len() as i64;
    Ok(Json(Overview {
        devices,
        online,
        offline: devices - online,
        models,
        lost_records: losses.iter().map(|l| l.lost_count).sum(),
        devices_with_losses: losses,
        ledger_devices_skipped: (ids.len().saturating_sub(OVERVIEW_LEDGER_DEVICES)) as i64,
        rejects,
        records_stored: state
            .metrics
            .value("records_total", &[("outcome", "stored")]),
    }))
}

/// The `ingest` event: counters of this instance and the rate since the previous tick.
#[derive(Debug, Serialize)]
struct IngestTick {
    records_stored: f64,
    records_per_s: f64,
    messages_accepted: f64,
    messages_rejected: f64,
    mqtt_connected: bool,
}

struct Live {
    rx: tokio::sync::broadcast::Receiver<crate::server::events::LiveEvent>,
    tick: tokio::time::Interval,
    last: Option<(Instant, f64)>,
    state: AppState,
}

fn sum_metric(state: &AppState, name: &str, labels: &[&[(&str, &str)]]) -> f64 {
    labels.iter().map(|l| state.metrics.value(name, l)).sum()
}

fn tick_event(live: &mut Live) -> Event {
    let s = &live.state;
    let stored = s.metrics.value("records_total", &[("outcome", "stored")]);
    let now = Instant::now();
    let rate = match live.last {
        Some((at, before)) => {
            let secs = now.duration_since(at).as_secs_f64();
            if secs > 0.0 {
                (stored - before).max(0.0) / secs
            } else {
                0.0
            }
        }
        None => 0.0,
    };
    live.last = Some((now, stored));
    let channels = ["telemetry", "inference", "status", "heartbeat", "other"];
    let accepted: Vec<[(&str, &str); 2]> = channels
        .iter()
        .map(|c| [("channel", *c), ("outcome", "accepted")])
        .collect();
    let rejected: Vec<[(&str, &str); 2]> = channels
        .iter()
        .map(|c| [("channel", *c), ("outcome", "rejected")])
        .collect();
    let tick = IngestTick {
        records_stored: stored,
        records_per_s: rate,
        messages_accepted: sum_metric(
            s,
            "messages_total",
            &accepted.iter().map(|l| &l[..]).collect::<Vec<_>>(),
        ),
        messages_rejected: sum_metric(
            s,
            "messages_total",
            &rejected.iter().map(|l| &l[..]).collect::<Vec<_>>(),
        ),
        mqtt_connected: s
            .ingest
            .connected
            .load(std::sync::atomic::Ordering::Acquire),
    };
    json_event("ingest", &tick)
}

fn json_event<T: Serialize>(name: &str, data: &T) -> Event {
    Event::default()
        .event(name)
        .data(serde_json::to_string(data).unwrap_or_else(|_| "{}".into()))
}

/// `GET /api/v1/events`: server-sent events (`device`, `telemetry`, `inference`, `reject`,
/// `ingest`, `lagged`), each with a JSON `data` line. Not in the OpenAPI document (it never
/// ends); see docs/fleet.md.
pub async fn events(
    State(state): State<AppState>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let live = Live {
        rx: state.events.subscribe(),
        tick,
        last: None,
        state,
    };
    let stream = futures_util::stream::unfold(live, |mut live| async move {
        let shutdown = live.state.shutdown.clone();
        let event = tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = live.tick.tick() => tick_event(&mut live),
            r = live.rx.recv() => match r {
                Ok(e) => json_event(e.name(), &e),
                Err(RecvError::Lagged(n)) => json_event("lagged", &serde_json::json!({ "skipped": n })),
                Err(RecvError::Closed) => return None,
            },
        };
        Some((Ok(event), live))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
