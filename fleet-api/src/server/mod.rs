//! The running service's own parts: what `ember-fleet run` does between the broker and the
//! database, apart from the HTTP face ([`crate::api`]) and the OTA domain ([`crate::ota`]).
//!
//! * [`ingest`]: MQTT subscriber (rumqttc) → [`ingest::classify`] → bounded channel →
//!   [`ingest::writer`] (batched, idempotent database writes; PUBACK only after commit).
//! * [`events`]: what ingestion and the rollout service committed, fanned out to the live
//!   event streams.
//! * [`gauges`]: devices by state and the ledger's lost records as metrics, refreshed from
//!   the database.
//! * [`ledger`]: per device and stream: captured, received, missing, evicted, pending, lost.
//! * [`retention`]: deletes old telemetry and results (as a prefix of sequence numbers,
//!   archiving the gaps), aggregates and rejects.
//! * [`cluster`]: replicas on one database: a replica's identity, the leader that runs the
//!   singleton work (rollout driver, retention, desired-state publisher), SQLite's
//!   one-process lock.
//! * [`lake`]: committed records exported exactly once as Parquet files (hive-partitioned) to
//!   a directory or object storage, compacted; leader only.
//! * [`relay`]: live events between replicas over PostgreSQL `LISTEN/NOTIFY`.

pub mod cluster;
pub mod events;
pub mod gauges;
pub mod ingest;
pub mod lake;
pub mod ledger;
pub mod relay;
pub mod retention;
