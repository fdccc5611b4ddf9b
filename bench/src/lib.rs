//! Ember benchmarks; see `bench/README.md`.
