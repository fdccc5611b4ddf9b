//! The tests' HTTP client: a thin layer over the fleet's one REST client
//! ([`ember_host::client::FleetClient`]) with the shape the tests use (a panicking
//! [`request`], the body as text, lower-case header names, any status returned as is, no
//! redirects followed).

use ember_host::client::{Body, FleetClient};
use serde_json::Value;

#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("response is not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The `error.code` of a JSON error body.
    pub fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("not an error body: {}", self.body))
            .to_string()
    }
}

pub fn request(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Resp {
    try_request(port, method, path, token, body)
        .unwrap_or_else(|e| panic!("{method} {path} on port {port} failed: {e}"))
}

/// One request on its own connection (`Connection: close`); a body is sent as is, labelled
/// JSON (malformed JSON included), whatever the method. `Err` when no HTTP answer came back.
pub fn try_request(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> std::io::Result<Resp> {
    let client = FleetClient::local(port);
    let client = match token {
        Some(t) => client.with_token(t),
        None => client,
    };
    let mut headers = vec![("Connection", "close")];
    if body.is_some() {
        headers.push(("Content-Type", "application/json"));
    }
    let r = client
        .send(
            method,
            path,
            &headers,
            body.map(|b| Body::Bytes(b.as_bytes())),
        )
        .map_err(std::io::Error::other)?;
    Ok(Resp {
        status: r.status,
        body: r.text(),
        headers: r.headers,
    })
}
