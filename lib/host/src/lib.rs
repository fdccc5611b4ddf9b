//! `ember-host`: the one home of what Ember's binaries (`ember-agent`, `ember-fleet`), their
//! CLIs, the tests and the bench need on a host operating system, so that each exists once:
//!
//! - [`env`]: the registry of every `EMBER_*` name that is not a configuration override, and
//!   the `EMBER_<SECTION>__<KEY>` overlay both configurations use.
//! - [`tls`]: PEM certificates and keys, the key-permission check, the rustls provider (ring),
//!   certificate validity (x509-parser).
//! - [`fs`]: durable file replace (temp, fsync, rename, fsync the directory), with a crash test.
//! - [`sas`]: Azure shared access signatures (IoT Hub device and service tokens, Event Hubs CBS).
//! - [`signals`]: the two-stage SIGTERM/SIGINT shutdown; [`logging`]: the tracing setup.
//! - [`client`] (feature `client`): the fleet REST client of the CLIs, tests and bench.
//!
//! Everything here is synchronous std code except [`signals`], which needs the caller's tokio
//! runtime. No `unsafe`.

pub mod env;
pub mod fs;
pub mod logging;
pub mod sas;
pub mod signals;
pub mod tls;

#[cfg(feature = "client")]
pub mod client;
