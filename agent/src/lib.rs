//! `ember-agent`: the edge daemon. See ARCHITECTURE.md for the codemap.

pub mod config;
pub mod metrics;
pub mod source;
