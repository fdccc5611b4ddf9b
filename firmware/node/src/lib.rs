//! Ember's sensor-node core: everything a node does that is not tied to one board, `no_std`
//! and unit-tested on the host (`cargo test -p ember-node --target x86_64-unknown-linux-gnu`).
//!
//! * [`sensor`]: the driver trait a real accelerometer implements, and [`sensor::ReplayImu`],
//!   a simulated IMU replaying BasicMotions series compiled into the image.
//! * [`ring`]: the bounded sample buffer between the sample clock's interrupt and the line,
//!   counting what it had to drop.
//! * [`boot`]: the boot counter kept in RAM that survives a reset.
//! * [`node`]: the node itself: sampling with per-boot sequence numbers, the frames it writes
//!   (`ember_proto::node`: postcard + COBS + CRC-32C) and the host's commands.
//! * [`window`]: windows of consecutive samples for a model on the node.
//! * `model` (feature `inference`): the activity model of `models/` on burn's `no_std` flex
//!   backend; the node then sends results instead of samples.
//!
//! A board crate (`boards/*`) supplies the clock that calls [`node::Node::tick`], the UART
//! that carries [`node::Node::next_frame`] out and commands in, and the memory that holds the
//! [`boot::BootRecord`].
#![no_std]
#![forbid(unsafe_code)]

pub mod boot;
#[cfg(feature = "inference")]
pub mod model;
pub mod node;
pub mod ring;
pub mod sensor;
pub mod window;

pub use ember_proto::node as link;
