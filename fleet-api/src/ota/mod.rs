//! The OTA domain: which model versions the fleet knows, and how a version reaches the
//! devices.
//!
//! * [`registry`]: verified, signed model bundles (rows in `models`, bytes in the blob store).
//! * [`rollout`]: staged rollouts: the pure state machine ([`rollout::machine`]), its
//!   persistence ([`rollout::store`]), the service that drives it in the running fleet
//!   ([`rollout::service`]) and the retained desired-state publisher
//!   ([`rollout::publisher`]).
//! * [`monitor`]: model monitoring: each version's results against its bundle's training
//!   baseline (drift).

pub mod monitor;
pub mod registry;
pub mod rollout;
