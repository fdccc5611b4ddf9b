//! `ember-fleet` binary: parses arguments and hands them to the library ([`ember_fleet::cli`]).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    ember_fleet::cli::run(ember_fleet::cli::Cli::parse())
}
