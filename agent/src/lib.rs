//! `ember-agent`: the edge daemon. See ARCHITECTURE.md for the codemap.
//!
//! The binary (`main.rs`) only parses arguments and calls [`cli::run`], which sets up logging,
//! signals and the runtime and calls [`runtime::run`]; the fleet's demo build runs its agents
//! through [`cli`] too (`ember-fleet agent ARGS`).
//!
//! # Layers
//!
//! The modules form a one-way stack: a module imports only from layers below its own, never
//! from its own layer or above. `tests/it/layers.rs` (`LAYERS`, the one authoritative copy of
//! this table) fails on an import against it.
//!
//! ```text
//! 10 cli               the command line: logging, signals, runtime, exit statuses
//! 9  runtime           wires everything, start-up and shutdown order
//! 8  writer            the one task that appends, commits and maintains the queue
//! 7  uplink            MQTT state machine: reads and acks the queue, feeds OTA
//! 6  ota               desired state -> download -> verify -> shadow -> swap
//! 5  inference         model loading and the model thread
//! 4  tls               rustls client config, certificate reload, SIGHUP
//! 3  queue             the durable queue (generic over its storage `Engine`)
//! 2  source            samples in: sim, replay, socket, serial
//! 1  metrics, config   counters; raw file -> validated `Settings` (every Raw*/…Settings)
//! 0  tls_files, notify host TLS files: loopback, key permissions, PEM, expiry; sd_notify
//!    profile           a managed broker's rules (AWS IoT Core): limits, thing names
//! ```

pub mod cli;
pub mod config;
pub mod inference;
pub mod metrics;
pub mod notify;
pub mod ota;
pub mod profile;
pub mod queue;
pub mod runtime;
pub mod source;
pub mod tls;
pub mod tls_files;
pub mod uplink;
pub mod writer;
