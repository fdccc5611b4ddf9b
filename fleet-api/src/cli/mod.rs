//! The operator's commands: what the `ember-fleet` binary does with its arguments.
//!
//! `main.rs` parses [`Cli`] and calls [`run`]. Commands that talk to a running fleet over
//! HTTP (`model`, `rollout`) or work on files only (`pki`) need no configuration; the others
//! (`run`, `check-config`, `migrate`, `token`, `demo`) load it first, and an invalid configuration exits
//! with status 2 before anything is bound or written.
//!
//! * [`token`]: API tokens in the database.
//! * [`pki`]: the fleet's certificate authority, on files.
//! * [`model`]: the model registry of a running fleet, over its HTTP API.
//! * [`rollout`]: staged rollouts of a running fleet, over its HTTP API.
//!
//! `demo` is compiled only with the cargo feature `demo`; without it the subcommand still
//! parses and exits non-zero saying how to get it ([`DEMO_MISSING`]).

pub mod model;
pub mod pki;
pub mod rollout;
pub mod token;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::{LogFormat, Settings};

/// What `ember-fleet demo` says in a build without the `demo` feature.
pub const DEMO_MISSING: &str = "this ember-fleet was built without the demo (the cargo feature `demo`); \
     run it with `cargo run --release -p ember-fleet --no-default-features --features demo -- demo`";

#[derive(Parser)]
#[command(
    name = "ember-fleet",
    version,
    about = "Ember fleet service: MQTT ingestion, device registry, durability ledger, REST API"
)]
pub struct Cli {
    /// Configuration file (TOML). EMBER_FLEET_* environment variables override it.
    #[arg(long, short, global = true, env = "EMBER_FLEET_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the service (the default).
    Run,
    /// Validate the configuration and print it fully resolved (secrets masked).
    CheckConfig,
    /// Apply the database migrations this build knows, then exit: run it once per upgrade
    /// (e.g. as a Kubernetes Job) before the new replicas start. Against a newer schema it
    /// applies nothing and checks that this build can run on it.
    Migrate,
    /// Manage API tokens.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Certificates: a CA, the broker's and the fleet's certificates, device certificates
    /// (also from a device's CSR) and a mutual-TLS Mosquitto config.
    #[command(subcommand)]
    Pki(pki::PkiCommand),
    /// The model registry of a running fleet, over its HTTP API: upload, list, show,
    /// deprecate.
    Model(model::ModelArgs),
    /// Run the whole system locally: an embedded MQTT broker, this service on SQLite, and
    /// several real agents replaying recorded sensor data through the committed models.
    Demo(DemoArgs),
    /// Staged model rollouts over the fleet's HTTP API: create, list, show, pause, resume,
    /// abort, rollback.
    Rollout(rollout::RolloutArgs),
    /// Forward the devices' messages from the broker to a Google Pub/Sub topic (`[bridge]`,
    /// `[mqtt]`; metrics and health on `http.listen`), for a fleet with
    /// `ingest.source = "pubsub"` (GKE, terraform/gcp).
    Bridge,
    /// Ask a running fleet's /api/v1/health (no token): exits 0 when it answers 200 (database
    /// answers, broker subscribed), 1 otherwise. The container images' health check.
    Health(HealthArgs),
}

/// Where `ember-fleet health` finds the fleet.
#[derive(clap::Args)]
pub struct HealthArgs {
    /// The fleet's base URL.
    #[arg(long, env = "EMBER_FLEET_URL", default_value = ember_host::client::DEFAULT_URL)]
    pub url: String,
    /// PEM CA certificate that signed the fleet's HTTPS certificate.
    #[arg(long, env = "EMBER_FLEET_CA_FILE")]
    pub ca_file: Option<PathBuf>,
}

/// `ember-fleet health`: one GET of /api/v1/health; what it answered, or why it failed.
fn health(args: HealthArgs) -> anyhow::Result<String> {
    let client = ember_host::client::FleetClient::new(&args.url, args.ca_file.as_deref())?;
    let resp = client.send(
        "GET",
        "/api/v1/health",
        &[("Accept", "application/json")],
        None,
    )?;
    if resp.status != 200 {
        anyhow::bail!(
            "{}/api/v1/health answered {}: {}",
            args.url,
            resp.status,
            resp.text().trim()
        );
    }
    Ok(format!("{}\n", resp.text().trim()))
}

/// Where the fleet of an HTTP command (`model`, `rollout`) is and how to trust and
/// authenticate to it (`ember_host::client::Target`).
#[derive(clap::Args)]
pub struct FleetArgs {
    /// The fleet's base URL.
    #[arg(long, global = true, env = "EMBER_FLEET_URL", default_value = ember_host::client::DEFAULT_URL)]
    pub url: String,
    /// PEM CA certificate that signed the fleet's HTTPS certificate (`ember-fleet pki`);
    /// without it an https:// fleet must have a publicly trusted certificate.
    #[arg(long, global = true, env = "EMBER_FLEET_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// A file holding an API token (admin for writes, read for the rest); default: the
    /// EMBER_FLEET_TOKEN environment variable.
    #[arg(long, global = true)]
    pub token_file: Option<PathBuf>,
}

impl FleetArgs {
    /// The client of that fleet; refuses to go on without a token.
    pub fn client(&self) -> anyhow::Result<ember_host::client::FleetClient> {
        let target = ember_host::client::Target::resolve(
            Some(self.url.clone()),
            self.ca_file.clone(),
            self.token_file.as_deref(),
        )?;
        Ok(target.client(true)?)
    }
}

#[derive(clap::Args)]
pub struct DemoArgs {
    /// How many agent processes to start.
    #[arg(long, default_value_t = 4)]
    pub agents: usize,
    /// Where the API and dashboard listen.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,
    /// The demo's state (database, agent queues, generated configs); kept between runs.
    #[arg(long, default_value = "ember-demo")]
    pub data_dir: PathBuf,
    /// An ember-agent binary to run the agents with (default: this executable, whose demo
    /// build embeds the agent: `ember-fleet agent ARGS` is `ember-agent ARGS`).
    #[arg(long)]
    pub agent_bin: Option<PathBuf>,
    /// Replay speed relative to the recordings' real 10 Hz.
    #[arg(long, default_value_t = 5.0)]
    pub speed: f64,
    /// Do not start the staged rollout of activity 1.1.0 once the agents are online.
    #[arg(long)]
    pub no_rollout: bool,
}

/// Runs one parsed command line; the binary's exit status.
pub fn run(cli: Cli) -> ExitCode {
    // The PKI works on files only: no configuration needed.
    if let Some(Command::Pki(cmd)) = cli.command {
        return print_result(pki::run(cmd));
    }
    // Rollouts talk to a running fleet over HTTP: no configuration needed either.
    if let Some(Command::Rollout(args)) = cli.command {
        return print_result(rollout::run(args));
    }
    if let Some(Command::Health(args)) = cli.command {
        return print_result(health(args));
    }
    // The model commands talk to a running fleet over HTTP: no configuration needed either.
    if let Some(Command::Model(args)) = cli.command {
        return print_result(model::run(args));
    }
    // A build without the demo says so whatever the configuration.
    if cfg!(not(feature = "demo")) && matches!(cli.command, Some(Command::Demo(_))) {
        eprintln!("ember-fleet: {DEMO_MISSING}");
        return ExitCode::FAILURE;
    }
    let env = std::env::vars();
    let settings = match Settings::load(cli.config.as_deref(), env) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ember-fleet: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let command = cli.command.unwrap_or(Command::Run);
    if matches!(command, Command::Run | Command::CheckConfig)
        && let Err(e) = settings.check_replica_identity()
    {
        eprintln!("ember-fleet: invalid configuration: {e}");
        return ExitCode::from(2);
    }
    let result = match command {
        Command::CheckConfig => {
            print!("{}", settings.to_toml());
            Ok(())
        }
        Command::Run => serve(settings),
        Command::Bridge => bridge(settings),
        Command::Migrate => migrate(settings),
        Command::Token(cmd) => token::run(settings, cmd),
        Command::Pki(_) | Command::Rollout(_) | Command::Model(_) | Command::Health(_) => Ok(()),
        Command::Demo(args) => demo(settings, args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ember-fleet: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Prints what a configuration-free command produced, or its error.
fn print_result(result: anyhow::Result<String>) -> ExitCode {
    match result {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ember-fleet: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(settings: &Settings) {
    let format = match settings.log.format {
        LogFormat::Json => ember_host::logging::Format::Json,
        LogFormat::Pretty => ember_host::logging::Format::Pretty,
    };
    ember_host::logging::init("EMBER_FLEET_LOG", &settings.log.level, format);
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// `ember-fleet run`: the service until SIGTERM/SIGINT and its drain.
fn serve(settings: Settings) -> anyhow::Result<()> {
    init_logging(&settings);
    runtime()?.block_on(async move {
        let listener = crate::bind(&settings).await?;
        let shutdown = CancellationToken::new();
        let force = CancellationToken::new();
        ember_host::signals::spawn_two_stage(shutdown.clone(), force.clone(), SIGNALS)
            .context("cannot install the SIGTERM/SIGINT handlers")?;
        crate::run(settings, listener, shutdown, force).await?;
        Ok(())
    })
}

/// `ember-fleet bridge`: the broker to Pub/Sub until a signal (see [`crate::bridge`]).
#[cfg(feature = "cloud")]
fn bridge(settings: Settings) -> anyhow::Result<()> {
    if settings.bridge.is_none() {
        return Err(crate::bridge::BridgeError::NotConfigured.into());
    }
    init_logging(&settings);
    runtime()?.block_on(async move {
        let listener = crate::bridge::bind(&settings).await?;
        let shutdown = CancellationToken::new();
        let force = CancellationToken::new();
        ember_host::signals::spawn_two_stage(shutdown.clone(), force.clone(), SIGNALS)
            .context("cannot install the SIGTERM/SIGINT handlers")?;
        crate::bridge::run(std::sync::Arc::new(settings), listener, shutdown, force).await?;
        Ok(())
    })
}

/// `ember-fleet bridge` in a build without the cloud clients.
#[cfg(not(feature = "cloud"))]
fn bridge(_settings: Settings) -> anyhow::Result<()> {
    anyhow::bail!(
        "ember-fleet bridge needs ember-fleet built with its `cloud` feature, which this binary was built without (it is on by default: `cargo build --release -p ember-fleet`, or the ember-fleet image)"
    )
}

/// `ember-fleet migrate`: the schema brought to this build's version, once.
fn migrate(settings: Settings) -> anyhow::Result<()> {
    init_logging(&settings);
    runtime()?.block_on(async move {
        let db = crate::db::Db::connect(&settings.database).await?;
        let m = db.migrate().await;
        db.close().await;
        let m = m?;
        if m.before > m.build {
            println!(
                "The database schema is at version {}, newer than this build's {} and compatible with it; nothing to apply.",
                m.before, m.build
            );
        } else if m.before == m.after {
            println!("The database schema is up to date (version {}).", m.after);
        } else {
            println!(
                "Migrated the database schema from version {} to {}.",
                m.before, m.after
            );
        }
        Ok(())
    })
}

#[cfg(not(feature = "demo"))]
fn demo(_settings: Settings, _args: DemoArgs) -> anyhow::Result<()> {
    anyhow::bail!("{DEMO_MISSING}")
}

#[cfg(feature = "demo")]
fn demo(mut settings: Settings, args: DemoArgs) -> anyhow::Result<()> {
    // The embedded broker logs every connection and disconnection (some as errors); its start-up
    // failures still surface as the demo's own error.
    if settings.log.level == "info" {
        settings.log.level = "info,rumqttd=off".into();
    }
    init_logging(&settings);
    let opts = crate::demo::DemoOptions {
        agents: args.agents,
        listen: args.listen,
        data_dir: args.data_dir,
        agent_bin: args.agent_bin,
        speed: args.speed,
        rollout: !args.no_rollout,
    };
    let agents = opts.agents;
    runtime()?.block_on(async move {
        let shutdown = CancellationToken::new();
        let force = CancellationToken::new();
        ember_host::signals::spawn_two_stage(shutdown.clone(), force.clone(), SIGNALS)
            .context("cannot install the SIGTERM/SIGINT handlers")?;
        crate::demo::run(opts, shutdown, force, move |event| match event {
            crate::demo::DemoEvent::Ready { url } => {
                println!("Ember demo: {agents} agents online. Dashboard: {url}  (Ctrl-C stops)");
            }
            crate::demo::DemoEvent::Rollout {
                id,
                started,
                fleet_url,
                token_file,
            } => {
                let what = if started { "started" } else { "already exists" };
                let (model, from, to) = (
                    crate::demo::ROLLOUT_MODEL,
                    crate::demo::ROLLOUT_FROM,
                    crate::demo::ROLLOUT_TO,
                );
                let tf = token_file.display();
                println!(
                    "Ember demo: rollout {id} {what}: {model} {from} -> {to}, canary -> 50% -> 100% \
                     with shadow evaluation (dashboard: {fleet_url}/dashboard/#/rollout/{id}).\n\
                     \x20 Control it: ember-fleet rollout pause|resume|rollback|show {id} \
                     --url {fleet_url} --token-file {tf}"
                );
            }
        })
        .await?;
        println!("Ember demo stopped.");
        Ok(())
    })
}

/// What the two-stage signal handler says: first SIGTERM/SIGINT drains, the second exits.
const SIGNALS: ember_host::signals::Messages = ember_host::signals::Messages {
    draining: "Shutdown requested: draining ingestion (send the signal again to exit at once).",
    exiting: "Second signal: exiting now; unacknowledged messages stay with the broker.",
};
