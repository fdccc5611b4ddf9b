//! Test support: [`TestTwinService`], an HTTP **test double** of IoT Hub's twin service API
//! (`PATCH /twins/{deviceId}?api-version=2021-04-12`) on an ephemeral 127.0.0.1 port. It checks
//! every request's `Authorization: SharedAccessSignature …` against the policy key (signature,
//! resource = the hub's host name, `skn`, not expired), records the accepted PATCHes, and can
//! be told to answer the next requests with 429 (with `Retry-After`) or 503 first.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use ember_host::sas::SasKey;

/// The hub the double pretends to be.
pub const HUB: &str = "ember-test.azure-devices.net";
pub const POLICY: &str = "ember-fleet-service";
pub const POLICY_KEY: &str = "c2VydmljZS1wb2xpY3kta2V5LWZvci10ZXN0cw==";

/// A request the double saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub status: u16,
    pub body: Vec<u8>,
}

#[derive(Default)]
struct State {
    seen: Vec<Seen>,
    /// Answers to give before the normal ones: (status, Retry-After).
    script: VecDeque<(u16, Option<u64>)>,
}

pub struct TestTwinService {
    pub port: u16,
    state: Arc<Mutex<State>>,
}

impl TestTwinService {
    pub fn start() -> TestTwinService {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("addr").port();
        let state = Arc::new(Mutex::new(State::default()));
        let s = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let s = s.clone();
                std::thread::spawn(move || serve(stream, &s));
            }
        });
        TestTwinService { port, state }
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The service connection string of the double's policy.
    pub fn connection_string(&self) -> String {
        format!("HostName={HUB};SharedAccessKeyName={POLICY};SharedAccessKey={POLICY_KEY}")
    }

    /// Answer the next requests with these statuses first (429 with a `Retry-After`).
    pub fn script(&self, answers: &[(u16, Option<u64>)]) {
        self.state
            .lock()
            .expect("lock")
            .script
            .extend(answers.iter().copied());
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().expect("lock").seen.clone()
    }

    /// The accepted PATCHes' bodies, as JSON, by device.
    pub fn patches(&self) -> Vec<(String, serde_json::Value)> {
        self.seen()
            .into_iter()
            .filter(|s| s.method == "PATCH" && s.status == 200)
            .filter_map(|s| {
                let device = s
                    .path
                    .strip_prefix("/twins/")?
                    .split('?')
                    .next()?
                    .to_string();
                Some((device, serde_json::from_slice(&s.body).ok()?))
            })
            .collect()
    }
}

/// Checks a SAS token: the double's policy, resource = the hub, a valid signature, not expired.
pub fn check_sas(header: &str) -> Result<(), String> {
    let rest = header
        .strip_prefix("SharedAccessSignature ")
        .ok_or("not a SharedAccessSignature")?;
    let mut sr = None;
    let mut se = None;
    let mut skn = None;
    let mut sig = None;
    for f in rest.split('&') {
        let (k, v) = f.split_once('=').ok_or("a field without '='")?;
        match k {
            "sr" => sr = Some(v),
            "se" => se = Some(v),
            "skn" => skn = Some(v),
            "sig" => sig = Some(v),
            _ => return Err(format!("an unknown field {k}")),
        }
    }
    let (sr, se, skn, sig) = (
        sr.ok_or("no sr")?,
        se.ok_or("no se")?,
        skn.ok_or("no skn")?,
        sig.ok_or("no sig")?,
    );
    if sr != ember_host::sas::url_encode(HUB) {
        return Err(format!("sr is {sr}, not the hub {HUB}"));
    }
    if skn != POLICY {
        return Err(format!("skn is {skn}, not {POLICY}"));
    }
    let expiry: u64 = se.parse().map_err(|_| "se is not a number")?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    if expiry <= now {
        return Err("the token expired".into());
    }
    let expected = SasKey::from_base64(POLICY_KEY)
        .expect("key")
        .token(HUB, expiry, Some(POLICY))
        .expect("token");
    if !expected.contains(&format!("&sig={sig}&")) {
        return Err("the signature does not match the policy key".into());
    }
    Ok(())
}

fn serve(stream: TcpStream, state: &Mutex<State>) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut out = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_string();
        let path = parts.next().unwrap_or_default().to_string();
        let mut length = 0usize;
        let mut auth = String::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                match k.trim().to_ascii_lowercase().as_str() {
                    "content-length" => length = v.trim().parse().unwrap_or(0),
                    "authorization" => auth = v.trim().to_string(),
                    _ => {}
                }
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let (status, retry_after, answer) = {
            let mut st = state.lock().expect("lock");
            let (status, retry_after, answer) = if let Err(e) = check_sas(&auth) {
                (401, None, format!(r#"{{"Message":"{e}"}}"#))
            } else if method != "PATCH"
                || !path.starts_with("/twins/")
                || !path.ends_with("?api-version=2021-04-12")
            {
                (404, None, r#"{"Message":"not a twin PATCH"}"#.to_string())
            } else if let Some((s, r)) = st.script.pop_front() {
                (s, r, r#"{"Message":"scripted"}"#.to_string())
            } else {
                (
                    200,
                    None,
                    r#"{"properties":{"desired":{"$version":2}}}"#.to_string(),
                )
            };
            st.seen.push(Seen {
                method: method.clone(),
                path: path.clone(),
                status,
                body: body.clone(),
            });
            (status, retry_after, answer)
        };
        let retry = retry_after
            .map(|r| format!("Retry-After: {r}\r\n"))
            .unwrap_or_default();
        let resp = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n{retry}Content-Length: {}\r\n\r\n{answer}",
            answer.len()
        );
        if out.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}
