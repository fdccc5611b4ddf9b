//! `ember-fleet` binary: parses arguments, sets up logging and signals, and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use ember_fleet::auth::{self, Scope};
use ember_fleet::config::{LogFormat, Settings};
use ember_fleet::db::Db;

mod rollout_cli;

#[derive(Parser)]
#[command(
    name = "ember-fleet",
    version,
    about = "Ember fleet service: MQTT ingestion, device registry, durability ledger, REST API"
)]
struct Cli {
    /// Configuration file (TOML). EMBER_FLEET_* environment variables override it.
    #[arg(long, short, global = true, env = "EMBER_FLEET_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service (the default).
    Run,
    /// Validate the configuration and print it fully resolved (secrets masked).
    CheckConfig,
    /// Manage API tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Certificates: a CA, the broker's and the fleet's certificates, device certificates
    /// (also from a device's CSR) and a mutual-TLS Mosquitto config.
    #[command(subcommand)]
    Pki(ember_fleet::pki::PkiCommand),
    /// The model registry of a running fleet, over its HTTP API: upload, list, show,
    /// deprecate.
    Model(ember_fleet::model_cli::ModelArgs),
    /// Run the whole system locally: an embedded MQTT broker, this service on SQLite, and
    /// several real agents replaying recorded sensor data through the committed models.
    Demo(DemoArgs),
    /// Staged model rollouts over the fleet's HTTP API: create, list, show, pause, resume,
    /// abort, rollback.
    Rollout(rollout_cli::RolloutArgs),
}

#[derive(clap::Args)]
struct DemoArgs {
    /// How many agent processes to start.
    #[arg(long, default_value_t = 4)]
    agents: usize,
    /// Where the API and dashboard listen.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: std::net::SocketAddr,
    /// The demo's state (database, agent queues, generated configs); kept between runs.
    #[arg(long, default_value = "ember-demo")]
    data_dir: PathBuf,
    /// The ember-agent binary (default: beside this executable, built with cargo if missing).
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// Replay speed relative to the recordings' real 10 Hz.
    #[arg(long, default_value_t = 5.0)]
    speed: f64,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token and print it (it is shown only this once; only its hash is stored).
    Create {
        /// `read` (GET routes), `admin` (also the write routes) or `device:<id>` (only that
        /// device's own resources).
        #[arg(long)]
        scope: String,
        /// A label to recognise it by in `token list`.
        #[arg(long, default_value = "cli")]
        name: String,
    },
    /// List tokens (ids, names, scopes; never the tokens).
    List,
    /// Revoke a token by id.
    Revoke { id: i64 },
    /// Print a random token without storing it (e.g. for EMBER_FLEET_BOOTSTRAP_TOKEN).
    Generate,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The PKI works on files only: no configuration needed.
    if let Some(Command::Pki(cmd)) = cli.command {
        return match ember_fleet::pki::run(cmd) {
            Ok(out) => {
                print!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ember-fleet: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    // Rollouts talk to a running fleet over HTTP: no configuration needed either.
    if let Some(Command::Rollout(args)) = cli.command {
        return match rollout_cli::run(args) {
            Ok(out) => {
                print!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ember-fleet: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    // The model commands talk to a running fleet over HTTP: no configuration needed either.
    if let Some(Command::Model(args)) = cli.command {
        return match ember_fleet::model_cli::run(args) {
            Ok(out) => {
                print!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ember-fleet: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let env = std::env::vars();
    let settings = match Settings::load(cli.config.as_deref(), env) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ember-fleet: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::CheckConfig => {
            print!("{}", settings.to_toml());
            Ok(())
        }
        Command::Run => run(settings),
        Command::Token(cmd) => token(settings, cmd),
        Command::Pki(_) | Command::Rollout(_) | Command::Model(_) => Ok(()),
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

fn init_logging(settings: &Settings) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("EMBER_FLEET_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&settings.log.level));
    // Colour only for a terminal, and never when NO_COLOR is set (https://no-color.org).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match settings.log.format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Pretty => builder.init(),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn run(settings: Settings) -> anyhow::Result<()> {
    init_logging(&settings);
    runtime()?.block_on(async move {
        let listener = ember_fleet::bind(&settings).await?;
        let shutdown = CancellationToken::new();
        let force = CancellationToken::new();
        spawn_signal_handler(shutdown.clone(), force.clone())?;
        ember_fleet::run(settings, listener, shutdown, force).await?;
        Ok(())
    })
}

fn demo(mut settings: Settings, args: DemoArgs) -> anyhow::Result<()> {
    // The embedded broker logs every connection and disconnection (some as errors); its start-up
    // failures still surface as the demo's own error.
    if settings.log.level == "info" {
        settings.log.level = "info,rumqttd=off".into();
    }
    init_logging(&settings);
    let opts = ember_fleet::demo::DemoOptions {
        agents: args.agents,
        listen: args.listen,
        data_dir: args.data_dir,
        agent_bin: args.agent_bin,
        speed: args.speed,
    };
    let agents = opts.agents;
    runtime()?.block_on(async move {
        let shutdown = CancellationToken::new();
        let force = CancellationToken::new();
        spawn_signal_handler(shutdown.clone(), force.clone())?;
        ember_fleet::demo::run(opts, shutdown, force, |url| {
            println!("Ember demo: {agents} agents online. Dashboard: {url}  (Ctrl-C stops)");
        })
        .await?;
        println!("Ember demo stopped.");
        Ok(())
    })
}

fn token(settings: Settings, cmd: TokenCommand) -> anyhow::Result<()> {
    if let TokenCommand::Generate = cmd {
        println!("{}", auth::generate()?);
        return Ok(());
    }
    runtime()?.block_on(async move {
        let db = Db::open(&settings.database).await?;
        match cmd {
            TokenCommand::Create { scope, name } => {
                let scope = Scope::parse(&scope)
                    .context("scope must be read, admin or device:<device id>")?;
                let (id, token) = auth::create(&db, &scope, &name).await?;
                eprintln!(
                    "Created token {id} ({name}, scope {}). It is shown only now:",
                    scope.name()
                );
                println!("{token}");
            }
            TokenCommand::List => {
                for t in auth::list(&db).await? {
                    println!(
                        "{}\t{}\t{}\t{}",
                        t.id,
                        t.scope,
                        t.name,
                        if t.revoked_at.is_some() {
                            "revoked"
                        } else {
                            "active"
                        }
                    );
                }
            }
            TokenCommand::Revoke { id } => {
                if !auth::revoke(&db, id).await? {
                    anyhow::bail!("there is no active token with id {id}");
                }
                eprintln!("Revoked token {id}.");
            }
            TokenCommand::Generate => {}
        }
        db.close().await;
        Ok(())
    })
}

/// First SIGTERM/SIGINT: drain gracefully. Second: exit at once.
fn spawn_signal_handler(
    shutdown: CancellationToken,
    force: CancellationToken,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    tokio::spawn(async move {
        let mut seen = 0;
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            seen += 1;
            if seen == 1 {
                tracing::info!(
                    "Shutdown requested: draining ingestion (send the signal again to exit at once)."
                );
                shutdown.cancel();
            } else {
                tracing::warn!(
                    "Second signal: exiting now; unacknowledged messages stay with the broker."
                );
                force.cancel();
                std::process::exit(130);
            }
        }
    });
    Ok(())
}
