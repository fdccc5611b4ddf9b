//! The fleet's system tests: one binary (see the workspace conventions).
//!
//! Storage tests run twice, on SQLite (a temp file) and on PostgreSQL (a throwaway cluster
//! from `ember_testkit::TestPostgres`), through `on_both_backends!`. Tests that run agents
//! need `target/<profile>/ember-agent`: build the workspace first (`cargo build`).

mod support;

mod api;
mod broker_conf;
mod browser;
mod captures;
mod cli;
// `ember-fleet demo` exists only with the `demo` feature (scripts/test.sh enables it).
#[cfg(feature = "demo")]
mod demo;
mod e2e_ack;
mod entra;
mod eventhubs;
mod hil;
mod inference;
mod ingest;
mod kinesis;
mod lake;
mod live;
mod models;
mod monitoring;
mod ota;
mod pubsub;
mod python;
mod replicas;
mod rollout_service;
mod rollouts;
mod scale_out;
mod security;
