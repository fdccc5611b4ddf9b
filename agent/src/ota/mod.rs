//! Over-the-air model updates (issue 5, in progress; design in docs/ota.md).
//!
//! Built so far: [`download`], the resumable, size-capped, hash-checked bundle download.

pub mod download;
