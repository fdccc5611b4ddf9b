//! Clients of cloud providers' managed services that the fleet's pluggable parts use: an
//! ingestion source ([`crate::server::ingest::source`]) or a desired-state sink
//! ([`crate::ota::rollout::sink`]) other than the MQTT broker.

pub mod aws;
pub mod azure;
pub mod gcp;
