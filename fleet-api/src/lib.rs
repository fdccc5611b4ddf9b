//! `ember-fleet`: the cloud side of Ember, in four rooms and a few cross-cutting modules.
//!
//! Rooms:
//! * [`server`]: the running service's own parts: [`server::ingest`] (MQTT subscriber →
//!   classification → bounded channel → batched, idempotent database writes; PUBACK only
//!   after commit), [`server::events`] (what was committed, fanned out to the live streams),
//!   [`server::ledger`] (per stream: captured, received, missing, evicted, pending, lost) and
//!   [`server::retention`].
//! * [`ota`]: the OTA domain: [`ota::registry`] (verified model bundles: rows in `models`,
//!   bytes in the blob store) and [`ota::rollout`] (the pure staged-rollout state machine,
//!   its store, the service that drives it and the retained desired-state publisher).
//! * [`api`]: the HTTP face: the REST API under `/api/v1` with its request and response
//!   types, its OpenAPI document, `/metrics`, the live event stream (`/api/v1/events`) and
//!   the dashboard (`/dashboard/`).
//! * [`cli`]: the operator's commands behind the binary: `run`, `check-config`, `token`,
//!   `pki`, `model`, `rollout` (and `demo`).
//!
//! Cross-cutting: [`config`] (TOML + `EMBER_FLEET_*` overrides → validated
//! [`config::Settings`]), [`db`] (one sqlx `Any` pool over SQLite or PostgreSQL, and the
//! migrations), [`error`], [`auth`] (hashed API tokens with `read`, `admin` and `device:<id>`
//! scopes), [`tls`] (HTTPS, mutual TLS to the broker), [`metrics`], [`ranges`].
//!
//! `demo` (only with the cargo feature `demo`): `ember-fleet demo`, an embedded broker
//! (rumqttd), the service and real agents running the development-signed bundles. Release
//! builds of the service leave it out.
//!
//! [`run`] wires the rooms together; `main.rs` only parses arguments and calls [`cli::run`].

pub mod api;
pub mod auth;
pub mod blob;
#[cfg(feature = "cloud")]
pub mod bridge;
pub mod cli;
#[cfg(feature = "cloud")]
pub mod cloud;
pub mod config;
pub mod db;
#[cfg(feature = "demo")]
pub mod demo;
pub mod error;
pub mod metrics;
pub mod ota;
pub mod ranges;
pub mod server;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::db::Db;
pub use crate::error::FleetError;
use crate::metrics::Metrics;
use crate::ota::registry::Registry;
use crate::ota::rollout::service::Service as Rollouts;
use crate::server::cluster::{Membership, spawn_singleton};
use crate::server::events::Events;
use crate::server::ingest::{self, IngestState};
use crate::server::{gauges, retention};

/// Runs the service on `listener` until `shutdown` fires and the drain completes (or
/// `shutdown.grace_ms` passes, or `force` fires).
///
/// Order on the way up: database (migrated, or a newer compatible schema checked), bootstrap
/// token (stored only if absent), membership among the replicas (SQLite's one-process lock, or
/// PostgreSQL's identity lock and leader election), the model store, the event relay between
/// replicas (PostgreSQL), ingestion, the singleton work on the leader (rollout driver,
/// desired-state publisher, retention), the database-derived gauges (every replica), HTTP.
/// On the way down: HTTP stops accepting, ingestion stops taking messages (leaving the shared
/// subscription first when other replicas run) and stores and acknowledges what it took, the
/// singleton tasks stop, the replica's locks are released, then the pool closes.
pub async fn run(
    settings: Settings,
    listener: TcpListener,
    shutdown: CancellationToken,
    force: CancellationToken,
) -> Result<(), FleetError> {
    settings.check_replica_identity()?;
    let settings = Arc::new(settings);
    let db = Db::open(&settings.database).await?;
    tracing::info!(backend = settings.database.backend.as_str(),
        url = %config::mask_password(&settings.database.url), "Database ready.");
    if let Some(token) = &settings.bootstrap_token {
        match auth::store_bootstrap(&db, token).await? {
            auth::Bootstrap::Stored => tracing::info!("Stored the bootstrap admin token."),
            auth::Bootstrap::Present => {}
            auth::Bootstrap::Revoked => tracing::warn!(
                "The bootstrap admin token (bootstrap_token) was revoked and stays revoked; unset EMBER_FLEET_BOOTSTRAP_TOKEN."
            ),
        }
    }
    let metrics = Arc::new(Metrics::new());
    let membership = Arc::new(Membership::join(&settings, &db, metrics.clone()).await?);
    let registry = Registry::open(db.clone(), &settings.data_dir, &settings.models)
        .await
        .map_err(|e| match e {
            ota::registry::RegistryError::Misconfigured(m) => FleetError::Misconfigured(m),
            e => FleetError::ModelStore(e.to_string()),
        })?;
    let ingest_state = Arc::new(IngestState::default());
    let events = Arc::new(Events::new());
    let rollouts = Arc::new(Rollouts::new(db.clone(), events.clone(), metrics.clone()));
    let relay = match settings.database.backend {
        config::Backend::Postgres => server::relay::spawn(
            settings.database.url.clone(),
            db.clone(),
            events.clone(),
            rollouts.clone(),
            metrics.clone(),
            shutdown.clone(),
        ),
        config::Backend::Sqlite => Vec::new(),
    };

    let mut ingest = tokio::spawn(ingest::run(
        settings.clone(),
        db.clone(),
        metrics.clone(),
        ingest_state.clone(),
        events.clone(),
        rollouts.clone(),
        membership.clone(),
        shutdown.clone(),
        force.clone(),
    ));
    // Singleton work: on the leader replica only (always this one on SQLite).
    let leader = membership.leader();
    let driver = spawn_singleton("rollout_driver", leader.clone(), shutdown.clone(), {
        let rollouts = rollouts.clone();
        move |stop| rollouts.clone().drive(stop)
    });
    let publisher = spawn_singleton("desired_publisher", leader.clone(), shutdown.clone(), {
        let (rollouts, settings) = (rollouts.clone(), settings.clone());
        move |stop| rollouts.clone().publish(settings.clone(), stop)
    });
    let retention = spawn_singleton("retention", leader, shutdown.clone(), {
        let (db, settings, metrics) = (db.clone(), settings.clone(), metrics.clone());
        move |stop| {
            retention::run(
                db.clone(),
                settings.retention.clone(),
                metrics.clone(),
                stop,
            )
        }
    });
    let lake = match &settings.lake {
        Some(l) => Some(Arc::new(
            server::lake::Lake::open(db.clone(), l)
                .map_err(|e| FleetError::Misconfigured(e.to_string()))?,
        )),
        None => None,
    };
    let lake_task = lake.map(|lake| {
        spawn_singleton("lake", membership.leader(), shutdown.clone(), {
            let metrics = metrics.clone();
            move |stop| server::lake::run(lake.clone(), metrics.clone(), stop)
        })
    });
    let monitor = Arc::new(ota::monitor::Monitor::default());
    let monitoring = tokio::spawn(ota::monitor::run(
        db.clone(),
        settings.monitoring.clone(),
        monitor.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    let gauges = tokio::spawn(gauges::run(db.clone(), metrics.clone(), shutdown.clone()));
    tls::record_cert_expiry(&settings, &metrics);
    let app = api::router(api::AppState {
        db: db.clone(),
        settings: settings.clone(),
        metrics,
        ingest: ingest_state,
        events,
        rollouts,
        registry: Arc::new(registry),
        monitor,
        shutdown: shutdown.clone(),
    });
    let addr = listener.local_addr().map_err(FleetError::Serve)?;
    tracing::info!(%addr, "Serving the API.");
    let mut server = tls::serve(listener, app, &settings, shutdown.clone())?;

    let mut result = Ok(());
    let mut ingest_done = false;
    let mut server_done = false;
    tokio::select! {
        _ = shutdown.cancelled() => {}
        r = &mut server => {
            server_done = true;
            result = flatten(r).map_err(FleetError::Serve);
            shutdown.cancel();
        }
        r = &mut ingest => {
            ingest_done = true;
            if let Err(e) = r {
                result = Err(FleetError::Task(e.to_string()));
            }
            shutdown.cancel();
        }
    }
    tracing::info!(grace_ms = settings.shutdown.grace_ms, "Draining.");
    let grace = tokio::time::sleep(Duration::from_millis(settings.shutdown.grace_ms));
    tokio::pin!(grace);
    while !(ingest_done && server_done) {
        tokio::select! {
            r = &mut ingest, if !ingest_done => {
                ingest_done = true;
                if let Err(e) = r {
                    result = result.and(Err(FleetError::Task(e.to_string())));
                }
            }
            r = &mut server, if !server_done => {
                server_done = true;
                if let Err(e) = flatten(r) {
                    result = result.and(Err(FleetError::Serve(e)));
                }
            }
            _ = &mut grace => {
                tracing::warn!("The drain did not finish within shutdown.grace_ms; stopping now (nothing unstored was acknowledged).");
                force.cancel();
                break;
            }
            _ = force.cancelled() => break,
        }
    }
    if !ingest_done {
        ingest.abort();
    }
    if !server_done {
        server.abort();
    }
    gauges.abort();
    monitoring.abort();
    // The singleton tasks stop on `shutdown`; what the publisher had not got acknowledged
    // stays in the outbox.
    for mut task in [publisher, driver, retention].into_iter().chain(lake_task) {
        if tokio::time::timeout(Duration::from_secs(2), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
    for task in relay {
        task.abort();
    }
    // Another replica takes over the singleton work at once.
    if let Ok(m) = Arc::try_unwrap(membership) {
        m.leave().await;
    }
    db.close().await;
    tracing::info!("Stopped.");
    result
}

fn flatten(r: Result<std::io::Result<()>, tokio::task::JoinError>) -> std::io::Result<()> {
    match r {
        Ok(r) => r,
        Err(e) => Err(std::io::Error::other(e.to_string())),
    }
}

/// Binds the HTTP listener of `settings`.
pub async fn bind(settings: &Settings) -> Result<TcpListener, FleetError> {
    TcpListener::bind(settings.http.listen)
        .await
        .map_err(|source| FleetError::Listen {
            addr: settings.http.listen,
            source,
        })
}
