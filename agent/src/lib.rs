//! `ember-agent`: the edge daemon. See ARCHITECTURE.md for the codemap.
//!
//! The binary (`main.rs`) only parses arguments and calls [`runtime::run`].

pub mod config;
pub mod inference;
pub mod metrics;
pub mod ota;
pub mod queue;
pub mod runtime;
pub mod source;
pub mod tls;
pub mod uplink;
