//! Staged model rollouts, in four parts that depend on each other in this order only:
//!
//! ```text
//! machine   (pure: inputs in, Effects out; no I/O)
//!   ▲
//! store     (the machine's value, its history and the desired_models outbox, one
//!   ▲        transaction per step, optimistic locking on a revision)
//! service   (Service: create, command, apply_statuses, the 1 s driver; every step goes
//!   ▲        through Service::step)
//! publisher (outbox → retained QoS 1 ember/v1/{device}/desired → mark_published on PUBACK)
//! ```
//!
//! The request and response types of the REST API live in `crate::api::rollouts`; the
//! `ember-fleet rollout` command in `crate::cli::rollout`.

#[cfg(feature = "cloud")]
pub mod azure_twin;
pub mod machine;
pub mod publisher;
pub mod service;
pub mod sink;
pub mod store;
