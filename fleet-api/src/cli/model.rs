//! `ember-fleet model ...`: the model registry from the command line, through a running
//! fleet's HTTP API (`--url`), with a token from `--token-file` or `EMBER_FLEET_TOKEN`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;

/// Where the fleet is and how to authenticate.
#[derive(clap::Args)]
pub struct ModelArgs {
    /// The fleet's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// A file holding an API token (admin for upload and deprecate, read for the rest);
    /// default: the EMBER_FLEET_TOKEN environment variable.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
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

/// The environment variable the token is read from when `--token-file` is not given.
pub const TOKEN_ENV: &str = "EMBER_FLEET_TOKEN";

fn token(args: &ModelArgs) -> anyhow::Result<String> {
    let token = match &args.token_file {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the token file {}", path.display()))?,
        None => std::env::var(TOKEN_ENV).unwrap_or_default(),
    };
    let token = token.trim().to_string();
    if token.is_empty() {
        bail!(
            "no API token: pass --token-file <file> or set {TOKEN_ENV} (create one with `ember-fleet token create --scope admin`)"
        );
    }
    Ok(token)
}

struct Client {
    agent: ureq::Agent,
    base: String,
    token: String,
}

impl Client {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base.trim_end_matches('/'))
    }

    /// Sends a request; returns the JSON body of a 2xx answer, or the API's error message.
    fn call(&self, method: &str, path: &str, body: Option<Body<'_>>) -> anyhow::Result<Value> {
        let url = self.url(path);
        let auth = format!("Bearer {}", self.token);
        let result = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("Authorization", &auth).call(),
            (_, Some(Body::Bytes(b))) => self
                .agent
                .post(&url)
                .header("Authorization", &auth)
                .content_type("application/octet-stream")
                .send(b),
            (_, Some(Body::Json(v))) => self
                .agent
                .post(&url)
                .header("Authorization", &auth)
                .content_type("application/json")
                .send(v.to_string().as_bytes()),
            (_, None) => self
                .agent
                .post(&url)
                .header("Authorization", &auth)
                .send_empty(),
        };
        let mut resp = result.with_context(|| format!("cannot reach the fleet at {url}"))?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_string()
            .with_context(|| format!("cannot read the answer from {url}"))?;
        let json: Option<Value> = serde_json::from_str(&text).ok();
        if !(200..300).contains(&status) {
            let message = json
                .as_ref()
                .and_then(|v| v["error"]["message"].as_str())
                .map(str::to_string)
                .unwrap_or_else(|| text.chars().take(300).collect());
            bail!("{method} {path}: HTTP {status}: {message}");
        }
        json.with_context(|| format!("{method} {path}: the answer is not JSON"))
    }
}

enum Body<'a> {
    Bytes(&'a [u8]),
    Json(Value),
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
    if !(args.url.starts_with("http://") || args.url.starts_with("https://")) {
        bail!("--url {:?} is not an http:// or https:// URL", args.url);
    }
    let client = Client {
        agent: ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(300)))
            .build()
            .new_agent(),
        base: args.url.clone(),
        token: token(&args)?,
    };
    let header = "name\tversion\tkind\tprecision\tsize\tsha256\tdeprecated\n";
    match args.command {
        ModelCommand::Upload { file } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let e = client.call("POST", "/api/v1/models", Some(Body::Bytes(&bytes)))?;
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
                let page = client.call("GET", &path, None)?;
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
                let v = client.call("GET", &format!("/api/v1/models/{name}"), None)?;
                let mut out = String::from(header);
                for e in v["versions"].as_array().into_iter().flatten() {
                    out.push_str(&entry_line(e));
                    out.push('\n');
                }
                Ok(out)
            }
            Some(version) => {
                let v = client.call("GET", &format!("/api/v1/models/{name}/{version}"), None)?;
                Ok(format!("{}\n", serde_json::to_string_pretty(&v)?))
            }
        },
        ModelCommand::Deprecate {
            name,
            version,
            undo,
        } => {
            let e = client.call(
                "POST",
                &format!("/api/v1/models/{name}/{version}/deprecate"),
                Some(Body::Json(serde_json::json!({ "deprecated": !undo }))),
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
