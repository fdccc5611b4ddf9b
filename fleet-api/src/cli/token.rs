//! `ember-fleet token ...`: API tokens in the fleet's database (only their hashes are stored).

use anyhow::Context;
use clap::Subcommand;

use crate::auth::{self, Scope};
use crate::config::Settings;
use crate::db::Db;

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Create a token and print it (it is shown only this once; only its hash is stored).
    Create {
        /// `read` (GET routes), `label` (GET routes and labelling captures), `admin` (also the
        /// write routes) or `device:<id>` (only that
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

/// Runs one token command against the configured database.
pub fn run(settings: Settings, cmd: TokenCommand) -> anyhow::Result<()> {
    if let TokenCommand::Generate = cmd {
        println!("{}", auth::generate()?);
        return Ok(());
    }
    super::runtime()?.block_on(async move {
        let db = Db::open(&settings.database).await?;
        match cmd {
            TokenCommand::Create { scope, name } => {
                let scope = Scope::parse(&scope)
                    .context("scope must be read, label, admin or device:<device id>")?;
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
