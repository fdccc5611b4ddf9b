//! `ember-fleet model ...`: the model registry from the command line, through a running
//! fleet's HTTP API (`--url`/`EMBER_FLEET_URL`, `--ca-file`/`EMBER_FLEET_CA_FILE`), with a token
//! from `--token-file` or `EMBER_FLEET_TOKEN`, through `ember_host::client::FleetClient`.

use std::path::PathBuf;

use anyhow::Context;
use ember_host::client::{Body, FleetClient};
use serde_json::Value;

use super::FleetArgs;

/// Where the fleet is and how to authenticate.
#[derive(clap::Args)]
pub struct ModelArgs {
    #[command(flatten)]
    pub fleet: FleetArgs,
    #[command(subcommand)]
    pub command: ModelCommand,
}

#[derive(clap::Subcommand)]
pub enum ModelCommand {
    /// Upload a signed bundle file; the fleet verifies it against its trusted keys.
    Upload { file: PathBuf },
    /// List every registered version.
    List,
    /// A model's versions, or one version with its manifest.
    Show {
        name: String,
        version: Option<String>,
    },
    /// Deprecate a version (no new rollouts; devices may still download it).
    Deprecate {
        name: String,
        version: String,
        /// Undeprecate instead.
        #[arg(long)]
        undo: bool,
    },
}

fn call(
    client: &FleetClient,
    method: &str,
    path: &str,
    body: Option<Body<'_>>,
) -> anyhow::Result<Value> {
    Ok(client.call(method, path, body)?)
}

fn entry_line(e: &Value) -> String {
    format!(
        "{}\t{}\t{}\t{}\t{}\t{}\t{}",
        e["name"].as_str().unwrap_or("?"),
        e["version"].as_str().unwrap_or("?"),
        e["kind"].as_str().unwrap_or("?"),
        e["precision"].as_str().unwrap_or("?"),
        e["size"],
        e["sha256"].as_str().unwrap_or("?"),
        if e["deprecated"].as_bool().unwrap_or(false) {
            "deprecated"
        } else {
            "-"
        }
    )
}

/// Runs a `model` command; returns what to print on stdout.
pub fn run(args: ModelArgs) -> anyhow::Result<String> {
    let client = args.fleet.client()?;
    let header = "name\tversion\tkind\tprecision\tsize\tsha256\tdeprecated\n";
    match args.command {
        ModelCommand::Upload { file } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let e = call(&client, "POST", "/api/v1/models", Some(Body::Bytes(&bytes)))?;
            Ok(format!(
                "Registered {} {} ({} {}, {} bytes, sha256 {}, signed by {}).\n",
                e["name"].as_str().unwrap_or("?"),
                e["version"].as_str().unwrap_or("?"),
                e["kind"].as_str().unwrap_or("?"),
                e["precision"].as_str().unwrap_or("?"),
                e["size"],
                e["sha256"].as_str().unwrap_or("?"),
                e["key_id"].as_str().unwrap_or("?"),
            ))
        }
        ModelCommand::List => {
            let mut out = String::from(header);
            let mut cursor: Option<String> = None;
            loop {
                let path = match &cursor {
                    Some(c) => format!("/api/v1/models?cursor={c}"),
                    None => "/api/v1/models".to_string(),
                };
                let page = call(&client, "GET", &path, None)?;
                for e in page["items"].as_array().into_iter().flatten() {
                    out.push_str(&entry_line(e));
                    out.push('\n');
                }
                match page["next_cursor"].as_str() {
                    Some(c) => cursor = Some(c.to_string()),
                    None => return Ok(out),
                }
            }
        }
        ModelCommand::Show { name, version } => match version {
            None => {
                let v = call(&client, "GET", &format!("/api/v1/models/{name}"), None)?;
                let mut out = String::from(header);
                for e in v["versions"].as_array().into_iter().flatten() {
                    out.push_str(&entry_line(e));
                    out.push('\n');
                }
                Ok(out)
            }
            Some(version) => {
                let v = call(
                    &client,
                    "GET",
                    &format!("/api/v1/models/{name}/{version}"),
                    None,
                )?;
                Ok(format!("{}\n", serde_json::to_string_pretty(&v)?))
            }
        },
        ModelCommand::Deprecate {
            name,
            version,
            undo,
        } => {
            let e = call(
                &client,
                "POST",
                &format!("/api/v1/models/{name}/{version}/deprecate"),
                Some(Body::Json(&serde_json::json!({ "deprecated": !undo }))),
            )?;
            Ok(format!(
                "{} {} is {}.\n",
                e["name"].as_str().unwrap_or("?"),
                e["version"].as_str().unwrap_or("?"),
                if e["deprecated"].as_bool().unwrap_or(false) {
                    "deprecated"
                } else {
                    "no longer deprecated"
                }
            ))
        }
    }
}
