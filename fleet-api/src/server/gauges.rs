//! Gauges that only the database knows: devices by state and the durability ledger's lost
//! records, refreshed by a background task every [`REFRESH`] so Prometheus can alert on them
//! (`deploy/prometheus/ember-fleet.rules.yml`).
//!
//! They are fleet-wide sums, never per device: device ids are not metric labels (see
//! [`crate::metrics`]); which device lost what is in the ledger API. Every replica refreshes
//! the same numbers from the same database, so alert rules take `max` across instances.
//!
//! Cost: the ledger part is the overview's computation (`server::ledger::device_ledger`) for
//! every device, once a refresh; [`REFRESH`] is long enough that it stays far below what
//! ingestion writes.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::Row;
use tokio_util::sync::CancellationToken;

use crate::db::{Db, get_bool};
use crate::metrics::Metrics;
use crate::server::ledger::device_ledger;

/// How often the gauges are recomputed. The alerts built on them wait 10 minutes or more, so
/// a minute's staleness costs nothing and keeps the ledger queries rare.
pub const REFRESH: Duration = Duration::from_secs(60);

/// What one refresh found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FleetGauges {
    pub online: u64,
    pub offline: u64,
    pub lost_records: u64,
    pub devices_with_losses: u64,
}

/// Computes the gauges from the database.
pub async fn compute(db: &Db) -> Result<FleetGauges, sqlx::Error> {
    let rows = sqlx::query("SELECT device_id, online FROM devices ORDER BY device_id")
        .fetch_all(db.pool())
        .await?;
    let mut g = FleetGauges::default();
    for row in &rows {
        if get_bool(row, "online")? {
            g.online += 1;
        } else {
            g.offline += 1;
        }
        let id: String = row.try_get("device_id")?;
        let lost: u64 = device_ledger(db, &id)
            .await?
            .iter()
            .map(|s| s.lost_count)
            .sum();
        if lost > 0 {
            g.lost_records += lost;
            g.devices_with_losses += 1;
        }
    }
    Ok(g)
}

/// Computes the gauges and sets them in `metrics`.
pub async fn refresh(db: &Db, metrics: &Metrics) -> Result<FleetGauges, sqlx::Error> {
    let g = compute(db).await?;
    metrics.set("devices", &[("state", "online")], g.online as f64);
    metrics.set("devices", &[("state", "offline")], g.offline as f64);
    metrics.set("ledger_lost_records", &[], g.lost_records as f64);
    metrics.set(
        "ledger_devices_with_losses",
        &[],
        g.devices_with_losses as f64,
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    metrics.set("gauge_refresh_timestamp_seconds", &[], now);
    Ok(g)
}

/// Refreshes now and then every [`REFRESH`] until `shutdown`. A failed refresh keeps the last
/// values (their age shows in `gauge_refresh_timestamp_seconds`) and is tried again.
pub async fn run(db: Db, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = refresh(&db, &metrics).await {
            tracing::warn!(error = %e, "Could not refresh the device and ledger gauges; trying again.");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Backend, DatabaseSettings};

    #[tokio::test]
    async fn devices_by_state_and_unexplained_gaps_become_gauges() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&DatabaseSettings {
            url: format!("sqlite://{}", dir.path().join("t.db").display()),
            backend: Backend::Sqlite,
            max_connections: 2,
            token_source: None,
        })
        .await
        .unwrap();
        let metrics = Metrics::new();
        assert_eq!(
            refresh(&db, &metrics).await.unwrap(),
            FleetGauges::default()
        );
        assert_eq!(metrics.value("devices", &[("state", "offline")]), 0.0);

        for (id, online) in [("a", 1), ("b", 0), ("c", 1)] {
            sqlx::query(&format!(
                "INSERT INTO devices (device_id, registered_at, online) VALUES ('{id}', 0, {online})"
            ))
            .execute(db.pool())
            .await
            .unwrap();
        }
        // Device a's status says it captured 1..=10 and still queues 2 of them (9, 10); the
        // fleet stored 1..=5: 6..=8 are lost. Device c captured nothing yet.
        sqlx::query(
            "INSERT INTO streams (device_id, stream, last_seq, queued, received) \
             VALUES ('a', 'imu', 10, 2, 5), ('c', 'imu', 0, 0, 0)",
        )
        .execute(db.pool())
        .await
        .unwrap();
        for seq in 1..=5 {
            sqlx::query(&format!(
                "INSERT INTO telemetry (device_id, stream, seq, ts, vals, received_at) \
                 VALUES ('a', 'imu', {seq}, {seq}, x'00', 0)"
            ))
            .execute(db.pool())
            .await
            .unwrap();
        }

        let g = refresh(&db, &metrics).await.unwrap();
        assert_eq!(
            g,
            FleetGauges {
                online: 2,
                offline: 1,
                lost_records: 3,
                devices_with_losses: 1,
            }
        );
        assert_eq!(metrics.value("devices", &[("state", "online")]), 2.0);
        assert_eq!(metrics.value("devices", &[("state", "offline")]), 1.0);
        assert_eq!(metrics.value("ledger_lost_records", &[]), 3.0);
        assert_eq!(metrics.value("ledger_devices_with_losses", &[]), 1.0);
        assert!(metrics.value("gauge_refresh_timestamp_seconds", &[]) > 1.7e9);
        let text = metrics.render();
        assert!(
            text.contains("ember_fleet_devices{state=\"offline\"} 1\n"),
            "{text}"
        );
    }
}
