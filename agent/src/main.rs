//! `ember-agent` binary: parses arguments and hands them to the library ([`ember_agent::cli`]).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    ember_agent::cli::run(ember_agent::cli::Cli::parse())
}
