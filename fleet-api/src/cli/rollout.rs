//! `ember-fleet rollout ...`: the rollout API over HTTP(S), for operators.
//!
//! Needs no configuration file: `--url` (or `EMBER_FLEET_URL`) names the fleet, the token comes
//! from `--token-file` or `EMBER_FLEET_TOKEN`, and `--ca-file` the CA that signed the fleet's
//! HTTPS certificate (`ember-fleet pki`). One request per connection, blocking.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Args)]
pub struct RolloutArgs {
    /// The fleet's base URL.
    #[arg(long, env = "EMBER_FLEET_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// A file holding an API token (admin for create and commands). Else EMBER_FLEET_TOKEN.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// PEM CA certificate that signed the fleet's HTTPS certificate (https URLs).
    #[arg(long)]
    ca_file: Option<PathBuf>,
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
    let token = match &args.token_file {
        Some(f) => std::fs::read_to_string(f)
            .with_context(|| format!("cannot read the token file {}", f.display()))?
            .trim()
            .to_string(),
        None => std::env::var("EMBER_FLEET_TOKEN").map_err(|_| {
            anyhow::anyhow!("no API token: pass --token-file or set EMBER_FLEET_TOKEN")
        })?,
    };
    let client = Client::new(&args.url, token, args.ca_file.as_deref())?;
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
            (client.call("POST", "/api/v1/rollouts", Some(&body))?, None)
        }
        RolloutCommand::List => {
            let v = client.call("GET", "/api/v1/rollouts?limit=1000", None)?;
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
            client.call("GET", &format!("/api/v1/rollouts/{}", path_id(&id)?), None)?,
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
            view = client.call(
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
    let events = client.call(
        "GET",
        &format!("/api/v1/rollouts/{}/events", path_id(&id)?),
        None,
    )?;
    Ok(summary(&view, &events))
}

fn command(client: &Client, name: &str, c: &CommandArgs) -> anyhow::Result<Value> {
    client.call(
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

/// A minimal HTTP/1.1 client: one request per connection, JSON in and out.
struct Client {
    host: String,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
    token: String,
}

impl Client {
    fn new(url: &str, token: String, ca: Option<&std::path::Path>) -> anyhow::Result<Client> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            bail!("--url {url:?} must start with http:// or https://");
        };
        let authority = rest.trim_end_matches('/');
        if authority.contains('/') {
            bail!("--url {url:?} must be the fleet's base URL, without a path");
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h.trim_matches(|c| c == '[' || c == ']').to_string(),
                p.parse()
                    .with_context(|| format!("--url {url:?}: port {p:?} is not a number"))?,
            ),
            _ => (authority.to_string(), if tls { 443 } else { 80 }),
        };
        let tls = if tls {
            let ca = ca.context(
                "an https URL needs --ca-file (the CA that signed the fleet's certificate)",
            )?;
            let pem = std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_pemfile_certs(&pem)? {
                roots
                    .add(cert)
                    .context("the CA file holds an unusable certificate")?;
            }
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .context("no TLS protocol versions")?
            .with_root_certificates(roots)
            .with_no_client_auth();
            Some(Arc::new(config))
        } else {
            None
        };
        Ok(Client {
            host,
            port,
            tls,
            token,
        })
    }

    /// Sends a request; a non-2xx answer is an error carrying the API's message.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        let body = body.map(Value::to_string);
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nAuthorization: Bearer {}\r\nAccept: application/json\r\n",
            self.host, self.token
        );
        match &body {
            Some(b) => req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                b.len()
            )),
            None => req.push_str("Content-Length: 0\r\n\r\n"),
        }
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .with_context(|| format!("cannot connect to {}:{}", self.host, self.port))?;
        tcp.set_read_timeout(Some(TIMEOUT))?;
        tcp.set_write_timeout(Some(TIMEOUT))?;
        let mut raw = Vec::new();
        match &self.tls {
            Some(config) => {
                let name = rustls::pki_types::ServerName::try_from(self.host.clone())
                    .context("the URL's host is not a valid TLS server name")?;
                let conn = rustls::ClientConnection::new(config.clone(), name)?;
                let mut stream = rustls::StreamOwned::new(conn, tcp);
                stream.write_all(req.as_bytes())?;
                read_all(&mut stream, &mut raw)?;
            }
            None => {
                let mut stream = tcp;
                stream.write_all(req.as_bytes())?;
                read_all(&mut stream, &mut raw)?;
            }
        }
        let (status, body) = parse_response(&raw)?;
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::String(body.clone()));
        if !(200..300).contains(&status) {
            let msg = v["error"]["message"].as_str().unwrap_or(body.as_str());
            bail!("{method} {path}: HTTP {status}: {msg}");
        }
        Ok(v)
    }
}

fn read_all(r: &mut impl Read, out: &mut Vec<u8>) -> anyhow::Result<()> {
    match r.read_to_end(out) {
        Ok(_) => Ok(()),
        // A server that closes without close_notify after a complete response.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !out.is_empty() => Ok(()),
        Err(e) => Err(e).context("cannot read the response"),
    }
}

fn rustls_pemfile_certs(
    pem: &[u8],
) -> anyhow::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject;
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .context("the CA file is not PEM certificates")?;
    if certs.is_empty() {
        bail!("the CA file holds no certificate");
    }
    Ok(certs)
}

fn parse_response(raw: &[u8]) -> anyhow::Result<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .context("the fleet's answer is not HTTP")?;
    let status: u16 = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .context("the fleet's answer has no status")?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        let mut out = String::new();
        let mut s = rest;
        while let Some((size, after)) = s.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 || after.len() < n {
                break;
            }
            out.push_str(&after[..n]);
            s = after[n..].trim_start_matches("\r\n");
        }
        out
    } else {
        rest.to_string()
    };
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        assert!(Client::new("ftp://x", String::new(), None).is_err());
        assert!(Client::new("http://x:80/api", String::new(), None).is_err());
        assert!(Client::new("https://x", String::new(), None).is_err());
        let c = Client::new("http://127.0.0.1:8080/", String::new(), None).unwrap();
        assert_eq!((c.host.as_str(), c.port), ("127.0.0.1", 8080));
    }

    #[test]
    fn responses_parse_plain_and_chunked() {
        let (s, b) = parse_response(b"HTTP/1.1 201 Created\r\nA: b\r\n\r\n{}").unwrap();
        assert_eq!((s, b.as_str()), (201, "{}"));
        let (_, b) = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(b, "{}");
    }
}
