//! The one HTTP client of the fleet's REST API (feature `client`): `ember-fleet model …` and
//! `ember-fleet rollout …`, the integration tests and the bench all use it. Blocking (ureq),
//! rustls with the ring provider; an `https://` fleet is verified against a pinned CA file
//! (`--ca-file` / `EMBER_FLEET_CA_FILE`, what `ember-fleet pki` issues) or, without one, the
//! Mozilla roots compiled into ureq.
//!
//! [`Target::resolve`] is how every CLI finds the fleet: flag, else environment variable
//! (`EMBER_FLEET_URL`, `EMBER_FLEET_CA_FILE`, `EMBER_FLEET_TOKEN`), else the default URL.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

/// The fleet a CLI talks to when neither `--url` nor `EMBER_FLEET_URL` says otherwise.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8080";
pub const URL_ENV: &str = "EMBER_FLEET_URL";
pub const CA_FILE_ENV: &str = "EMBER_FLEET_CA_FILE";
pub const TOKEN_ENV: &str = "EMBER_FLEET_TOKEN";
/// The largest answer read into memory (a bundle download in a test is the biggest).
const MAX_BODY: u64 = 256 << 20;

/// What went wrong, said so the user can fix it.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the fleet URL {url:?} {problem}")]
    Url { url: String, problem: &'static str },
    #[error("the CA file: {0}")]
    CaFile(String),
    #[error(
        "no API token: pass --token-file <file> or set {TOKEN_ENV} (create one with `ember-fleet token create --scope admin`)"
    )]
    NoToken,
    #[error("cannot read the token file {path}: {source}")]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot reach the fleet at {url}: {message}")]
    Transport { url: String, message: String },
    #[error("{method} {path}: HTTP {status}: {message}")]
    Api {
        method: String,
        path: String,
        status: u16,
        message: String,
    },
    #[error("{method} {path}: the answer is not JSON: {snippet}")]
    NotJson {
        method: String,
        path: String,
        snippet: String,
    },
}

/// Where the fleet is and how to trust and authenticate to it, before connecting.
#[derive(Debug, Clone, Default)]
pub struct Target {
    pub url: String,
    pub ca_file: Option<PathBuf>,
    pub token: Option<String>,
}

impl Target {
    /// Flags first, then `EMBER_FLEET_URL` / `EMBER_FLEET_CA_FILE` / `EMBER_FLEET_TOKEN`, then
    /// the default URL (no CA pin, no token).
    pub fn resolve(
        url: Option<String>,
        ca_file: Option<PathBuf>,
        token_file: Option<&Path>,
    ) -> Result<Target, ClientError> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let token = match token_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|source| ClientError::TokenFile {
                        path: path.to_path_buf(),
                        source,
                    })?
                    .trim()
                    .to_string(),
            ),
            None => env(TOKEN_ENV).map(|t| t.trim().to_string()),
        }
        .filter(|t| !t.is_empty());
        Ok(Target {
            url: url
                .or_else(|| env(URL_ENV))
                .unwrap_or_else(|| DEFAULT_URL.to_string()),
            ca_file: ca_file.or_else(|| env(CA_FILE_ENV).map(PathBuf::from)),
            token,
        })
    }

    /// The client, refusing a missing token when `need_token`.
    pub fn client(&self, need_token: bool) -> Result<FleetClient, ClientError> {
        if need_token && self.token.is_none() {
            return Err(ClientError::NoToken);
        }
        let c = FleetClient::new(&self.url, self.ca_file.as_deref())?;
        Ok(match &self.token {
            Some(t) => c.with_token(t),
            None => c,
        })
    }
}

/// An answer of any status.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The API's error message (`{"error": {"message": ...}}`), else the start of the body.
    pub fn error_message(&self) -> String {
        self.json()
            .as_ref()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| self.text().chars().take(300).collect())
    }
}

/// A request body and its content type.
#[derive(Debug, Clone, Copy)]
pub enum Body<'a> {
    Json(&'a Value),
    Bytes(&'a [u8]),
}

/// A blocking client of one fleet's REST API.
#[derive(Clone)]
pub struct FleetClient {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
}

impl std::fmt::Debug for FleetClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("FleetClient")
            .field("base", &self.base)
            .finish()
    }
}

impl FleetClient {
    /// A client of the fleet at `base` (`http://host:port` or `https://…`, no path); an
    /// https fleet is verified against `ca_file` when given.
    pub fn new(base: &str, ca_file: Option<&Path>) -> Result<FleetClient, ClientError> {
        let bad = |problem| ClientError::Url {
            url: base.to_string(),
            problem,
        };
        let rest = base
            .strip_prefix("http://")
            .or_else(|| base.strip_prefix("https://"))
            .ok_or_else(|| bad("must start with http:// or https://"))?;
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() {
            return Err(bad("names no host"));
        }
        if authority.contains('/') || authority.contains('?') {
            return Err(bad("must be the fleet's base URL, without a path"));
        }
        let mut tls = ureq::tls::TlsConfig::builder();
        // The CA pin matters only for https:// (a plain URL ignores an exported CA file).
        if let Some(ca) = ca_file.filter(|_| base.starts_with("https://")) {
            let certs = crate::tls::read_certs(ca).map_err(ClientError::CaFile)?;
            let certs: Vec<ureq::tls::Certificate<'static>> = certs
                .iter()
                .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
                .collect();
            tls = tls.root_certs(ureq::tls::RootCerts::Specific(Arc::new(certs)));
        }
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_global(Some(Duration::from_secs(300)))
            .max_redirects(0)
            .tls_config(tls.build())
            .build()
            .new_agent();
        Ok(FleetClient {
            agent,
            base: base.trim_end_matches('/').to_string(),
            token: None,
        })
    }

    /// `http://127.0.0.1:<port>`, for tests and the bench.
    pub fn local(port: u16) -> FleetClient {
        FleetClient::new(&format!("http://127.0.0.1:{port}"), None)
            .expect("a loopback URL is valid")
    }

    /// Sends `Authorization: Bearer <token>` with every request.
    pub fn with_token(mut self, token: &str) -> FleetClient {
        self.token = Some(token.to_string());
        self
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends one request (`path` starts with `/`) and returns the answer whatever its status.
    pub fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Body<'_>>,
    ) -> Result<Response, ClientError> {
        let url = format!("{}{path}", self.base);
        let transport = |message: String| ClientError::Transport {
            url: url.clone(),
            message,
        };
        let mut req = ureq::http::Request::builder().method(method).uri(&url);
        if let Some(t) = &self.token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let bytes: Vec<u8> = match body {
            Some(Body::Json(v)) => {
                req = req.header("Content-Type", "application/json");
                v.to_string().into_bytes()
            }
            Some(Body::Bytes(b)) => {
                if !headers
                    .iter()
                    .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
                {
                    req = req.header("Content-Type", "application/octet-stream");
                }
                b.to_vec()
            }
            None => Vec::new(),
        };
        let req = req.body(bytes).map_err(|e| transport(e.to_string()))?;
        let mut resp = self.agent.run(req).map_err(|e| transport(e.to_string()))?;
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_ascii_lowercase(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let body = if method == "HEAD" {
            Vec::new()
        } else {
            resp.body_mut()
                .with_config()
                .limit(MAX_BODY)
                .read_to_vec()
                .map_err(|e| transport(format!("cannot read the answer: {e}")))?
        };
        Ok(Response {
            status,
            headers,
            body,
        })
    }

    /// Sends one request and returns the JSON of a 2xx answer; any other status is
    /// [`ClientError::Api`] carrying the API's message.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Body<'_>>,
    ) -> Result<Value, ClientError> {
        let resp = self.send(method, path, &[("Accept", "application/json")], body)?;
        if !(200..300).contains(&resp.status) {
            return Err(ClientError::Api {
                method: method.to_string(),
                path: path.to_string(),
                status: resp.status,
                message: resp.error_message(),
            });
        }
        if resp.body.is_empty() {
            return Ok(Value::Null);
        }
        resp.json().ok_or_else(|| ClientError::NotJson {
            method: method.to_string(),
            path: path.to_string(),
            snippet: resp.text().chars().take(200).collect(),
        })
    }

    pub fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.call("GET", path, None)
    }

    pub fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.call("POST", path, Some(Body::Json(body)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;

    #[test]
    fn urls_are_checked() {
        for bad in [
            "ftp://x",
            "127.0.0.1:8080",
            "http://",
            "http://x:80/api",
            "https://x/?a",
        ] {
            assert!(
                matches!(FleetClient::new(bad, None), Err(ClientError::Url { .. })),
                "{bad}"
            );
        }
        assert_eq!(
            FleetClient::new("http://127.0.0.1:8080/", None)
                .unwrap()
                .base(),
            "http://127.0.0.1:8080"
        );
        let e = FleetClient::new("https://x", Some(Path::new("/nonexistent/ca.pem"))).unwrap_err();
        assert!(
            e.to_string().contains("cannot read /nonexistent/ca.pem"),
            "{e}"
        );
    }

    /// One answer from a real socket: status, headers, a chunked JSON body, and the API's
    /// error message on a 4xx.
    #[test]
    fn calls_a_real_server() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for answer in [
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n7\r\n{\"a\":1}\r\n0\r\n\r\n",
                "HTTP/1.1 409 Conflict\r\nContent-Type: application/json\r\nContent-Length: 43\r\n\r\n{\"error\":{\"code\":\"c\",\"message\":\"in use!\"}}\n",
            ] {
                let (mut s, _) = listener.accept().unwrap();
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut head = String::new();
                let mut len = 0;
                loop {
                    let mut line = String::new();
                    r.read_line(&mut line).unwrap();
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                    head.push_str(&line);
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0; len];
                r.read_exact(&mut body).unwrap();
                seen.push((head, String::from_utf8(body).unwrap()));
                s.write_all(answer.as_bytes()).unwrap();
            }
            seen
        });
        let c = FleetClient::local(port).with_token("t0k");
        assert_eq!(c.get("/api/v1/x").unwrap(), serde_json::json!({"a": 1}));
        let e = c
            .post("/api/v1/y", &serde_json::json!({"b": 2}))
            .unwrap_err();
        assert_eq!(e.to_string(), "POST /api/v1/y: HTTP 409: in use!");
        let seen = server.join().unwrap();
        assert!(
            seen[0].0.starts_with("GET /api/v1/x HTTP/1.1\r\n"),
            "{}",
            seen[0].0
        );
        assert!(
            seen[0]
                .0
                .to_ascii_lowercase()
                .contains("authorization: bearer t0k")
        );
        assert_eq!(seen[1].1, "{\"b\":2}");
        assert!(
            seen[1]
                .0
                .to_ascii_lowercase()
                .contains("content-type: application/json")
        );
    }

    #[test]
    fn an_unreachable_fleet_is_named() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = FleetClient::local(port).get("/api/v1/x").unwrap_err();
        assert!(
            e.to_string().starts_with(&format!(
                "cannot reach the fleet at http://127.0.0.1:{port}/api/v1/x"
            )),
            "{e}"
        );
    }

    #[test]
    fn the_debug_form_hides_the_token() {
        let c = FleetClient::local(1).with_token("secret-token");
        assert!(!format!("{c:?}").contains("secret"));
    }
}
