//! `ember-fleet` binary: parses arguments and hands them to the library ([`ember_fleet::cli`]).
//!
//! A demo build (feature `demo`) is an `ember-agent` too: `ember-fleet agent ARGS` (hidden from
//! `--help`) is exactly `ember-agent ARGS`, which is how the demo starts its agents.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    #[cfg(feature = "demo")]
    if let Some(args) = ember_fleet::demo::agent_args(std::env::args_os()) {
        return ember_agent::cli::run(ember_agent::cli::Cli::parse_from(args));
    }
    ember_fleet::cli::run(ember_fleet::cli::Cli::parse())
}
