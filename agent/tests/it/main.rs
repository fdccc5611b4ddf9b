//! System tests of the `ember-agent` binary against real Mosquitto brokers, through
//! `ember-testkit`. One test binary for the crate (CONTRIBUTING.md, "Tests"); each test starts
//! its own broker, subscriber and agent on ephemeral 127.0.0.1 ports and waits on conditions,
//! never on the clock. They check correctness only: no test asserts how fast something happened.
//!
//! Needs `mosquitto` (`apt-get install mosquitto`); without it every broker test fails saying so.

mod aws_iot;
mod azure_iot;
mod common;
mod config;
mod crash;
mod damage;
mod delivery;
mod disk;
mod disk_full;
mod eviction;
mod hil;
mod inference;
mod layers;
mod ota;
mod schema;
mod socket;
mod systemd;
mod tls;
