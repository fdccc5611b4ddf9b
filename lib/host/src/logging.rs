//! Logging for Ember's binaries: `tracing` to stderr, filtered by an environment variable
//! (`EMBER_LOG`, `EMBER_FLEET_LOG`) or else the configured level, as sentences for a terminal
//! or one JSON object per line for a log shipper.

use tracing_subscriber::EnvFilter;

/// The line format (`log.format` in both configs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Pretty,
    Json,
}

/// Installs the global subscriber. `filter_env` wins over `level` when it is set and valid.
/// Colour only for a terminal, and never when `NO_COLOR` is set (<https://no-color.org>).
pub fn init(filter_env: &str, level: &str, format: Format) {
    let filter = EnvFilter::try_from_env(filter_env).unwrap_or_else(|_| EnvFilter::new(level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        Format::Json => builder.json().flatten_event(true).init(),
        Format::Pretty => builder.init(),
    }
}
