//! `ember-fleet rollout ...`: the rollout API over HTTP(S), for operators.
//!
//! Needs no configuration file: `--url` (or `EMBER_FLEET_URL`) names the fleet, the token comes
//! from `--token-file` or `EMBER_FLEET_TOKEN`, and `--ca-file` (or `EMBER_FLEET_CA_FILE`) is the
//! CA that signed the fleet's HTTPS certificate (`ember-fleet pki`). Requests go through
//! `ember_host::client::FleetClient`, like `ember-fleet model`.

use std::time::{Duration, Instant};

use anyhow::bail;
use clap::{Args, Subcommand};
use ember_host::client::{Body, FleetClient};
use serde_json::{Value, json};

use super::FleetArgs;

#[derive(Args)]
pub struct RolloutArgs {
    #[command(flatten)]
    fleet: FleetArgs,
    /// Print the API's JSON instead of a summary.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: RolloutCommand,
}

#[derive(Subcommand)]
enum RolloutCommand {
    /// Start a rollout of a registered model version.
    Create(CreateArgs),
    /// List rollouts, newest first.
    List,
    /// Show a rollout: waves, device states and history.
    Show { id: String },
    /// Pause a running rollout.
    Pause(CommandArgs),
    /// Resume a paused rollout (acknowledges the failures so far).
    Resume(CommandArgs),
    /// Stop assigning devices; updated devices keep the new version.
    Abort(CommandArgs),
    /// Tell every assigned device to return to its previous version.
    Rollback(CommandArgs),
}

#[derive(Args)]
struct CommandArgs {
    id: String,
    /// Wait until the broker acknowledged every desired state the command produced.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits, in seconds.
    #[arg(long, default_value_t = 120)]
    wait_s: u64,
}

#[derive(Args)]
struct CreateArgs {
    #[arg(long)]
    model: String,
    #[arg(long)]
    version: String,
    /// Target these devices (comma-separated ids).
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["tags", "all"], required_unless_present_any = ["tags", "all"])]
    devices: Vec<String>,
    /// Target devices carrying every one of these tags (`key=value` or `key`, comma-separated).
    #[arg(long, value_delimiter = ',', conflicts_with = "all")]
    tags: Vec<String>,
    /// Target every registered device.
    #[arg(long)]
    all: bool,
    /// Cumulative wave sizes: `canary`, `N%` or a count (default canary,10%,50%,100%).
    #[arg(long, value_delimiter = ',')]
    waves: Vec<String>,
    /// Seconds each wave runs before the next may start.
    #[arg(long)]
    soak: Option<u64>,
    /// Fraction (0, 1] of a wave that must be active to go on.
    #[arg(long)]
    success_threshold: Option<f64>,
    /// Fraction [0, 1) of a wave that may fail before the rollout pauses.
    #[arg(long)]
    failure_threshold: Option<f64>,
    /// Shadow-evaluate on this many live windows before switching.
    #[arg(long, requires_all = ["min_agreement", "max_latency_ratio"])]
    shadow_windows: Option<u32>,
    /// Least agreement rate in shadow, [0, 1].
    #[arg(long, requires = "shadow_windows")]
    min_agreement: Option<f64>,
    /// Largest latency ratio new/running in shadow.
    #[arg(long, requires = "shadow_windows")]
    max_latency_ratio: Option<f64>,
}

/// Runs one `rollout` subcommand; returns what to print.
pub fn run(args: RolloutArgs) -> anyhow::Result<String> {
    let client = args.fleet.client()?;
    let json_out = args.json;
    let (view, cmd) = match args.command {
        RolloutCommand::Create(c) => {
            let targets = if c.all {
                json!({"all": true})
            } else if !c.tags.is_empty() {
                json!({"tags": c.tags})
            } else {
                json!({"devices": c.devices})
            };
            let mut body = json!({"model": c.model, "version": c.version, "targets": targets});
            if !c.waves.is_empty() {
                body["waves"] = json!(c.waves);
            }
            if let Some(s) = c.soak {
                body["min_soak_s"] = json!(s);
            }
            if let Some(t) = c.success_threshold {
                body["success_threshold"] = json!(t);
            }
            if let Some(t) = c.failure_threshold {
                body["failure_threshold"] = json!(t);
            }
            if let (Some(w), Some(a), Some(r)) =
                (c.shadow_windows, c.min_agreement, c.max_latency_ratio)
            {
                body["shadow"] = json!({"windows": w, "min_agreement": a, "max_latency_ratio": r});
            }
            (
                call(&client, "POST", "/api/v1/rollouts", Some(&body))?,
                None,
            )
        }
        RolloutCommand::List => {
            let v = call(&client, "GET", "/api/v1/rollouts?limit=1000", None)?;
            if json_out {
                return Ok(format!("{v:#}\n"));
            }
            let mut out = String::new();
            for r in v["items"].as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "{}\t{} {}\t{}\twave {}/{}\t{}\n",
                    s(&r["id"]),
                    s(&r["model"]),
                    s(&r["version"]),
                    s(&r["state"]),
                    r["current_wave"].as_u64().unwrap_or(0) + 1,
                    r["waves"].as_array().map_or(0, Vec::len),
                    counts(&r["counts"]),
                ));
            }
            return Ok(out);
        }
        RolloutCommand::Show { id } => (
            call(
                &client,
                "GET",
                &format!("/api/v1/rollouts/{}", path_id(&id)?),
                None,
            )?,
            None,
        ),
        RolloutCommand::Pause(c) => (command(&client, "pause", &c)?, Some(c)),
        RolloutCommand::Resume(c) => (command(&client, "resume", &c)?, Some(c)),
        RolloutCommand::Abort(c) => (command(&client, "abort", &c)?, Some(c)),
        RolloutCommand::Rollback(c) => (command(&client, "rollback", &c)?, Some(c)),
    };
    let mut view = view;
    if let Some(c) = cmd.filter(|c| c.wait) {
        let deadline = Instant::now() + Duration::from_secs(c.wait_s);
        while view["pending_publish"].as_i64().unwrap_or(0) > 0 {
            if Instant::now() > deadline {
                bail!(
                    "{} desired states were still not acknowledged by the broker after {} s",
                    view["pending_publish"],
                    c.wait_s
                );
            }
            std::thread::sleep(Duration::from_millis(200));
            view = call(
                &client,
                "GET",
                &format!("/api/v1/rollouts/{}", path_id(&c.id)?),
                None,
            )?;
        }
    }
    if json_out {
        return Ok(format!("{view:#}\n"));
    }
    let id = s(&view["id"]).to_string();
    let events = call(
        &client,
        "GET",
        &format!("/api/v1/rollouts/{}/events", path_id(&id)?),
        None,
    )?;
    Ok(summary(&view, &events))
}

fn command(client: &FleetClient, name: &str, c: &CommandArgs) -> anyhow::Result<Value> {
    call(
        client,
        "POST",
        &format!("/api/v1/rollouts/{}/{name}", path_id(&c.id)?),
        None,
    )
}

fn path_id(id: &str) -> anyhow::Result<&str> {
    ember_proto::check_name(id).map_err(|why| anyhow::anyhow!("rollout id {id:?}: {why}"))?;
    Ok(id)
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("-")
}

fn counts(v: &Value) -> String {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, n)| format!("{k}={n}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// A human summary: the rollout, a progress bar per wave, devices not yet active, history.
fn summary(v: &Value, events: &Value) -> String {
    let mut out = format!(
        "{}  {} {}  {}{}\n",
        s(&v["id"]),
        s(&v["model"]),
        s(&v["version"]),
        s(&v["state"]),
        v["pause_reason"]
            .as_str()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default()
    );
    for (i, w) in v["waves"].as_array().into_iter().flatten().enumerate() {
        let size = w["size"].as_u64().unwrap_or(0);
        let active = w["counts"]["active"].as_u64().unwrap_or(0);
        let width = 20u64;
        let filled = (active * width).checked_div(size).unwrap_or(width);
        out.push_str(&format!(
            "  wave {} {:<8} [{}{}] {active}/{size} active  {}\n",
            i + 1,
            s(&w["name"]),
            "#".repeat(filled as usize),
            ".".repeat((width - filled) as usize),
            counts(&w["counts"]),
        ));
    }
    for d in v["devices"].as_array().into_iter().flatten() {
        if d["state"] != "active" && d["state"] != "pending" {
            out.push_str(&format!(
                "  {}\t{}{}\n",
                s(&d["device_id"]),
                s(&d["state"]),
                d["reason"]
                    .as_str()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            ));
        }
    }
    if let Some(n) = v["pending_publish"].as_i64().filter(|n| *n > 0) {
        out.push_str(&format!(
            "  {n} desired states not yet acknowledged by the broker\n"
        ));
    }
    for e in events["items"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  #{} {}\t{}\n",
            e["seq"],
            s(&e["kind"]),
            s(&e["detail"])
        ));
    }
    out
}

/// One JSON request; a non-2xx answer is an error carrying the API's message.
fn call(
    client: &FleetClient,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<Value> {
    Ok(client.call(method, path, body.map(Body::Json))?)
}
