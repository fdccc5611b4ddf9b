//! The command line: what an `ember-agent` process does with its arguments, its logging, its
//! async runtime (current-thread) and its SIGTERM/SIGINT handling.
//!
//! `main.rs` parses [`Cli`] and calls [`run`]. It lives in the library so that another binary
//! can be an `ember-agent` too: the fleet's demo build runs its agents as `ember-fleet agent
//! ARGS`, which parses `ember-agent ARGS` with [`Cli`] and calls [`run`] (same arguments,
//! logging, signals and exit statuses; `fleet-api/src/demo.rs`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::{LogFormat, Settings};

#[derive(Parser)]
#[command(
    name = "ember-agent",
    version,
    about = "Ember edge agent: sensors -> durable queue -> MQTT"
)]
pub struct Cli {
    /// Configuration file (TOML). EMBER_* environment variables override it.
    #[arg(long, short, global = true, env = "EMBER_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the agent (the default).
    Run,
    /// Validate the configuration and print it fully resolved.
    CheckConfig,
    /// Generate a private key (ECDSA P-256, PEM, mode 0600) on this device; never overwrites.
    Keygen {
        /// Where to write the key, e.g. /etc/ember/device.key
        #[arg(long)]
        out: PathBuf,
    },
    /// Print a certificate signing request for this device's key (the key stays here); have it
    /// signed with `ember-fleet pki sign-csr`.
    Csr {
        /// The device id (the certificate's common name).
        #[arg(long, env = "EMBER_DEVICE_ID")]
        device_id: String,
        /// The private key from `ember-agent keygen`.
        #[arg(long)]
        key: PathBuf,
    },
    /// Ask a running agent's metrics endpoint: exits 0 when it answers (the container
    /// image's health check).
    Health {
        /// The agent's `metrics.listen` address.
        #[arg(long, default_value = "127.0.0.1:9898")]
        addr: std::net::SocketAddr,
    },
}

/// Runs one parsed command line; the process's exit status (2: an invalid configuration or a
/// model that cannot be trusted).
pub fn run(cli: Cli) -> ExitCode {
    // Key material commands need no configuration.
    match &cli.command {
        Some(Command::Keygen { out }) => {
            return report(
                crate::tls::keygen(out).map(|()| {
                    eprintln!("Wrote a new private key to {} (mode 0600).", out.display())
                }),
            );
        }
        Some(Command::Health { addr }) => {
            return report(
                crate::metrics::probe(*addr, std::time::Duration::from_secs(3))
                    .map_err(anyhow::Error::msg),
            );
        }
        Some(Command::Csr { device_id, key }) => {
            return report(crate::tls::csr(device_id, key).map(|pem| print!("{pem}")));
        }
        _ => {}
    }
    let env = std::env::vars().filter(|(k, _)| k != "EMBER_CONFIG");
    let settings = match Settings::load(cli.config.as_deref(), env) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ember-agent: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::CheckConfig => {
            print!("{}", settings.to_toml());
            ExitCode::SUCCESS
        }
        Command::Keygen { .. } | Command::Csr { .. } | Command::Health { .. } => ExitCode::SUCCESS,
        Command::Run => match run_agent(settings) {
            Ok(()) => ExitCode::SUCCESS,
            // A model that cannot be trusted or does not fit, or a schema that contradicts the
            // recorded one, is a configuration problem.
            Err(e)
                if matches!(
                    e.downcast_ref::<crate::runtime::AgentError>(),
                    Some(
                        crate::runtime::AgentError::Model(_)
                            | crate::runtime::AgentError::Schema(_)
                    )
                ) =>
            {
                eprintln!("ember-agent: cannot start: {e:#}");
                ExitCode::from(2)
            }
            Err(e) => {
                eprintln!("ember-agent: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ember-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(settings: &Settings) {
    let format = match settings.log.format {
        LogFormat::Json => ember_host::logging::Format::Json,
        LogFormat::Pretty => ember_host::logging::Format::Pretty,
    };
    ember_host::logging::init("EMBER_LOG", &settings.log.level, format);
}

fn run_agent(settings: Settings) -> anyhow::Result<()> {
    init_logging(&settings);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(4)
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        let force = CancellationToken::new();
        ember_host::signals::spawn_two_stage(shutdown.clone(), force.clone(), SIGNALS)
            .context("cannot install the SIGTERM/SIGINT handlers")?;
        let report = crate::runtime::run(settings, shutdown, force).await?;
        tracing::info!(outcome = ?report.outcome, queued = report.queued_at_exit, "Exiting.");
        Ok(())
    })
}

/// What the two-stage signal handler says: first SIGTERM/SIGINT drains, the second exits.
const SIGNALS: ember_host::signals::Messages = ember_host::signals::Messages {
    draining: "Shutdown requested: draining the queue (send the signal again to exit at once).",
    exiting: "Second signal: exiting now; queued records stay on disk.",
};
