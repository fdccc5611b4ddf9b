//! The Azure IoT Hub desired-state sink: each device's desired state becomes its device
//! twin's desired property [`TWIN_PROPERTY`] through IoT Hub's service REST API:
//!
//! ```text
//! PATCH https://{hub}.azure-devices.net/twins/{deviceId}?api-version=2021-04-12
//! Authorization: SharedAccessSignature sr={hub}&sig=…&se=…&skn={policy}
//! If-Match: *
//! {"properties":{"desired":{"ember":{"v":1,"device":"…","models":[…]}}}}
//! ```
//!
//! Contract (see [`super::sink`]): `deliver` returns `Ok` only on a 2xx answer, which is IoT
//! Hub's confirmation that the twin now holds this state; that replaces the MQTT PUBACK in the
//! outbox bookkeeping. A twin PATCH merges objects key by key but replaces arrays and values
//! whole, and `DesiredState`'s fields are a number, a string and an array, so each PATCH
//! replaces the previous state entirely (the agent orders them by the twin's `$version`).
//!
//! Retries inside one delivery: 429 (IoT Hub throttles twin updates per unit) waits the
//! answer's `Retry-After` (capped at [`MAX_RETRY_AFTER`]); 5xx, 408 and transport errors back
//! off exponentially from [`BACKOFF_MIN`]; 401 renews the token once. After [`ATTEMPTS`] the
//! delivery fails and the publisher tries again later (the row stays unpublished). Other 4xx
//! fail at once (a device IoT Hub does not know: 404).
//!
//! Authentication: a SAS token of a shared access policy with ServiceConnect rights, signed
//! for the hub's host name and renewed when less than a fifth of its lifetime is left.

use std::sync::Arc;
use std::time::Duration;

use ember_host::sas::SasKey;
use tokio::sync::Mutex;

use super::sink::{BoxFuture, DesiredStateSink, SinkError};
use crate::config::AzureTwinSettings;
use crate::metrics::Metrics;

/// The twin's desired property that holds Ember's desired state.
pub const TWIN_PROPERTY: &str = "ember";
/// IoT Hub's service API version.
pub const API_VERSION: &str = "2021-04-12";
const ATTEMPTS: u32 = 6;
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The longest `Retry-After` honoured in one delivery (a longer one fails the delivery, which
/// the publisher retries later).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the sink cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum TwinSinkError {
    #[error(
        "cannot read the IoT Hub connection string {path}: {detail} (set desired.azure_twin.connection_string_file)"
    )]
    File { path: String, detail: String },
    #[error(
        "the IoT Hub connection string lacks {0} (expected HostName=….azure-devices.net;SharedAccessKeyName=…;SharedAccessKey=…: a shared access policy with ServiceConnect)"
    )]
    Field(&'static str),
    #[error("the IoT Hub policy key: {0}")]
    Key(#[from] ember_host::sas::SasError),
    #[error("cannot build the HTTP client: {0}")]
    Http(String),
}

/// The parts of an IoT Hub service connection string.
#[derive(Clone)]
pub struct IotHubConnection {
    pub host: String,
    pub key_name: String,
    pub key: String,
}

impl IotHubConnection {
    /// Parses `HostName=…;SharedAccessKeyName=…;SharedAccessKey=…`.
    pub fn parse(s: &str) -> Result<IotHubConnection, TwinSinkError> {
        let mut host = None;
        let mut key_name = None;
        let mut key = None;
        for part in s.trim().split(';') {
            if let Some((k, v)) = part.split_once('=') {
                let v = v.trim().to_string();
                match k.trim().to_ascii_lowercase().as_str() {
                    "hostname" => host = Some(v),
                    "sharedaccesskeyname" => key_name = Some(v),
                    "sharedaccesskey" => key = Some(v),
                    _ => {}
                }
            }
        }
        let need = |v: Option<String>, name| {
            v.filter(|v| !v.is_empty())
                .ok_or(TwinSinkError::Field(name))
        };
        Ok(IotHubConnection {
            host: need(host, "HostName")?,
            key_name: need(key_name, "SharedAccessKeyName")?,
            key: need(key, "SharedAccessKey")?,
        })
    }
}

/// PATCHes device twins' desired properties.
pub struct AzureTwinSink {
    http: reqwest::Client,
    /// `https://<host>` or a test double's URL.
    base: String,
    /// The SAS resource: the hub's host name.
    host: String,
    key_name: String,
    key: SasKey,
    ttl_s: u64,
    token: Mutex<Option<(String, u64)>>,
    metrics: Arc<Metrics>,
}

impl AzureTwinSink {
    pub fn new(
        c: &IotHubConnection,
        base: Option<&str>,
        ttl_s: u64,
        metrics: Arc<Metrics>,
    ) -> Result<AzureTwinSink, TwinSinkError> {
        // reqwest finds the process-wide rustls provider; install ring (what the rest of the
        // fleet uses) unless someone installed one already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| TwinSinkError::Http(e.to_string()))?;
        Ok(AzureTwinSink {
            http,
            base: base
                .map(|b| b.trim_end_matches('/').to_string())
                .unwrap_or_else(|| format!("https://{}", c.host)),
            host: c.host.clone(),
            key_name: c.key_name.clone(),
            key: SasKey::from_base64(&c.key)?,
            ttl_s,
            token: Mutex::new(None),
            metrics,
        })
    }

    pub fn from_settings(
        s: &AzureTwinSettings,
        metrics: Arc<Metrics>,
    ) -> Result<AzureTwinSink, TwinSinkError> {
        let text = std::fs::read_to_string(&s.connection_string_file).map_err(|e| {
            TwinSinkError::File {
                path: s.connection_string_file.display().to_string(),
                detail: e.to_string(),
            }
        })?;
        AzureTwinSink::new(
            &IotHubConnection::parse(&text)?,
            s.endpoint.as_deref(),
            s.token_ttl_s,
            metrics,
        )
    }

    /// A valid token, renewed when less than a fifth of its lifetime is left (or `renew`).
    async fn token(&self, renew: bool) -> Result<String, SinkError> {
        let now = unix_now();
        let mut t = self.token.lock().await;
        match &*t {
            Some((tok, exp)) if !renew && *exp > now + self.ttl_s / 5 => Ok(tok.clone()),
            _ => {
                let exp = now + self.ttl_s;
                let tok = self
                    .key
                    .token(&self.host, exp, Some(&self.key_name))
                    .map_err(|e| SinkError(e.to_string()))?;
                *t = Some((tok.clone(), exp));
                Ok(tok)
            }
        }
    }

    /// The request body for `payload` (the device's JSON `DesiredState`).
    pub fn patch_body(payload: &[u8]) -> Result<Vec<u8>, SinkError> {
        let state: serde_json::Value = serde_json::from_slice(payload)
            .map_err(|e| SinkError(format!("the desired state is not JSON: {e}")))?;
        serde_json::to_vec(&serde_json::json!({
            "properties": { "desired": { TWIN_PROPERTY: state } }
        }))
        .map_err(|e| SinkError(e.to_string()))
    }

    async fn patch(&self, device: &str, body: &[u8]) -> Result<(), SinkError> {
        let url = format!(
            "{}/twins/{}?api-version={API_VERSION}",
            self.base,
            ember_host::sas::url_encode(device)
        );
        let mut backoff = BACKOFF_MIN;
        let mut renewed = false;
        let mut last = String::new();
        for attempt in 1..=ATTEMPTS {
            let token = self.token(false).await?;
            let sent = self
                .http
                .patch(&url)
                .header("authorization", token)
                .header("content-type", "application/json")
                .header("if-match", "*")
                .body(body.to_vec())
                .send()
                .await;
            let wait = match sent {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let retry_after = resp
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let text = resp.text().await.unwrap_or_default();
                    match status {
                        200..=299 => {
                            self.metrics
                                .inc("desired_twin_patches_total", &[("outcome", "ok")], 1);
                            return Ok(());
                        }
                        429 => {
                            self.metrics.inc(
                                "desired_twin_patches_total",
                                &[("outcome", "throttled")],
                                1,
                            );
                            let wait = retry_after.unwrap_or(backoff);
                            if wait > MAX_RETRY_AFTER {
                                return Err(SinkError(format!(
                                    "IoT Hub throttles twin updates (429) for {}s; the publisher tries again later",
                                    wait.as_secs()
                                )));
                            }
                            last = format!("429: {text}");
                            wait
                        }
                        401 if !renewed => {
                            renewed = true;
                            self.token(true).await?;
                            last = format!("401: {text}");
                            Duration::ZERO
                        }
                        408 | 500..=599 => {
                            self.metrics.inc(
                                "desired_twin_patches_total",
                                &[("outcome", "retry")],
                                1,
                            );
                            last = format!("{status}: {text}");
                            backoff
                        }
                        _ => {
                            self.metrics.inc(
                                "desired_twin_patches_total",
                                &[("outcome", "error")],
                                1,
                            );
                            return Err(SinkError(format!(
                                "IoT Hub refused the twin update of {device} ({status}): {text}"
                            )));
                        }
                    }
                }
                Err(e) => {
                    self.metrics
                        .inc("desired_twin_patches_total", &[("outcome", "retry")], 1);
                    last = e.to_string();
                    backoff
                }
            };
            if attempt < ATTEMPTS {
                tracing::debug!(%device, attempt, wait_ms = wait.as_millis() as u64, detail = %last,
                    "Retrying a twin update.");
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
        Err(SinkError(format!(
            "the twin update of {device} failed {ATTEMPTS} times, last: {last}"
        )))
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl DesiredStateSink for AzureTwinSink {
    fn name(&self) -> &'static str {
        "azure-twin"
    }

    fn deliver<'a>(
        &'a self,
        device: &'a str,
        payload: &'a [u8],
    ) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let body = AzureTwinSink::patch_body(payload)?;
            self.patch(device, &body).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_strings_parse_and_name_what_is_missing() {
        let c = IotHubConnection::parse(
            "HostName=h.azure-devices.net;SharedAccessKeyName=service;SharedAccessKey=a2V5\n",
        )
        .expect("parses");
        assert_eq!(c.host, "h.azure-devices.net");
        assert_eq!(c.key_name, "service");
        assert!(matches!(
            IotHubConnection::parse("HostName=h;SharedAccessKey=a2V5"),
            Err(TwinSinkError::Field("SharedAccessKeyName"))
        ));
    }

    #[test]
    fn the_desired_state_goes_under_the_ember_property() {
        let body = AzureTwinSink::patch_body(br#"{"v":1,"device":"d","models":[]}"#).expect("body");
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["properties"]["desired"]["ember"]["device"], "d");
        assert!(AzureTwinSink::patch_body(b"\xa1").is_err());
    }
}
