//! AWS's HTTP APIs the fleet calls (Kinesis Data Streams' JSON protocol, the IoT data plane),
//! signed with SigV4, without an AWS SDK: `object_store` (already here for S3 model stores)
//! provides the signer ([`AwsAuthorizer`]), the HTTP client and the credential chain:
//! `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`, IRSA's
//! `AWS_WEB_IDENTITY_TOKEN_FILE` + `AWS_ROLE_ARN` (EKS), then the instance metadata service.
//! The AWS SDK crates would cost minutes of build for the four calls used here.

use std::sync::Arc;

use object_store::aws::{AmazonS3Builder, AwsAuthorizer, AwsCredential};
use object_store::client::{ClientOptions, HttpClient, HttpConnector, ReqwestConnector};
use object_store::{CredentialProvider, StaticCredentialProvider};
use serde_json::Value;

/// What went wrong calling AWS.
#[derive(Debug, thiserror::Error)]
pub enum AwsError {
    #[error("AWS client set-up: {0}")]
    Setup(String),
    #[error(
        "no AWS credentials: {0} (set AWS_* variables, or run with an IAM role for the service account)"
    )]
    Credentials(String),
    #[error("{service} request failed: {detail}")]
    Transport {
        service: &'static str,
        detail: String,
    },
    /// An error answer: `kind` is AWS's error type (`__type`), e.g.
    /// `ProvisionedThroughputExceededException`.
    #[error("{service} answered {status} {kind}: {message}")]
    Api {
        service: &'static str,
        status: u16,
        kind: String,
        message: String,
    },
}

impl AwsError {
    /// Throttling or a server-side problem: worth retrying after a pause.
    pub fn is_retryable(&self) -> bool {
        match self {
            AwsError::Transport { .. } => true,
            AwsError::Api { status, kind, .. } => {
                *status >= 500
                    || kind.contains("Throughput")
                    || kind.contains("Throttl")
                    || kind.contains("LimitExceeded")
            }
            _ => false,
        }
    }
}

/// One region's signed client.
#[derive(Clone)]
pub struct AwsClient {
    http: HttpClient,
    credentials: Arc<dyn CredentialProvider<Credential = AwsCredential>>,
    region: String,
}

impl std::fmt::Debug for AwsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsClient")
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl AwsClient {
    /// A client for `region` with the credential chain from the environment. `allow_http`:
    /// plain-HTTP endpoints (a local emulator) are allowed.
    pub fn from_env(region: &str, allow_http: bool) -> Result<AwsClient, AwsError> {
        // reqwest finds the process-wide rustls provider; install ring (what the rest of the
        // fleet uses) unless someone installed one already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        // AmazonS3Builder is object_store's only public way to its credential chain; the
        // bucket name is required by the builder and never used.
        let s3 = AmazonS3Builder::from_env()
            .with_region(region)
            .with_bucket_name("ember-credentials-only")
            .build()
            .map_err(|e| AwsError::Credentials(e.to_string()))?;
        let options = ClientOptions::new().with_allow_http(allow_http);
        let http = ReqwestConnector::default()
            .connect(&options)
            .map_err(|e| AwsError::Setup(e.to_string()))?;
        Ok(AwsClient {
            http,
            credentials: s3.credentials().clone(),
            region: region.to_string(),
        })
    }

    /// A client with fixed credentials (a local emulator, tests).
    pub fn with_static_credentials(
        region: &str,
        key_id: &str,
        secret_key: &str,
        allow_http: bool,
    ) -> Result<AwsClient, AwsError> {
        // reqwest finds the process-wide rustls provider; install ring (what the rest of the
        // fleet uses) unless someone installed one already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let options = ClientOptions::new().with_allow_http(allow_http);
        let http = ReqwestConnector::default()
            .connect(&options)
            .map_err(|e| AwsError::Setup(e.to_string()))?;
        Ok(AwsClient {
            http,
            credentials: Arc::new(StaticCredentialProvider::new(AwsCredential {
                key_id: key_id.to_string(),
                secret_key: secret_key.to_string(),
                token: None,
            })),
            region: region.to_string(),
        })
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    /// Sends one signed request; returns the status and body of any answer (errors are
    /// answers too: the caller decides).
    pub async fn send(
        &self,
        service: &'static str,
        signing_name: &str,
        method: http::Method,
        url: &str,
        headers: &[(&'static str, &str)],
        body: Vec<u8>,
    ) -> Result<(u16, bytes::Bytes), AwsError> {
        let transport = |detail: String| AwsError::Transport { service, detail };
        let mut b = http::Request::builder().method(method).uri(url);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let mut req = b
            .body(object_store::client::HttpRequestBody::from(body))
            .map_err(|e| transport(e.to_string()))?;
        let cred = self
            .credentials
            .get_credential()
            .await
            .map_err(|e| AwsError::Credentials(e.to_string()))?;
        AwsAuthorizer::new(&cred, signing_name, &self.region)
            .try_authorize(&mut req, None)
            .map_err(|e| transport(format!("cannot sign: {e}")))?;
        let resp = self
            .http
            .execute(req)
            .await
            .map_err(|e| transport(e.to_string()))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .bytes()
            .await
            .map_err(|e| transport(e.to_string()))?;
        Ok((status, body))
    }

    /// One call of an AWS JSON-1.1 API (`X-Amz-Target: <target>`), e.g. Kinesis's
    /// `Kinesis_20131202.GetRecords`.
    pub async fn json_call(
        &self,
        service: &'static str,
        endpoint: &str,
        target: &str,
        body: &Value,
    ) -> Result<Value, AwsError> {
        let payload = serde_json::to_vec(body).map_err(|e| AwsError::Transport {
            service,
            detail: e.to_string(),
        })?;
        let (status, bytes) = self
            .send(
                service,
                service,
                http::Method::POST,
                endpoint,
                &[
                    ("content-type", "application/x-amz-json-1.1"),
                    ("x-amz-target", target),
                ],
                payload,
            )
            .await?;
        let v: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).map_err(|e| AwsError::Transport {
                service,
                detail: format!("undecodable answer ({status}): {e}"),
            })?
        };
        if !(200..300).contains(&status) {
            let kind = v
                .get("__type")
                .and_then(Value::as_str)
                .unwrap_or("Unknown")
                .rsplit('#')
                .next()
                .unwrap_or("Unknown")
                .to_string();
            let message = v
                .get("message")
                .or_else(|| v.get("Message"))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            return Err(AwsError::Api {
                service,
                status,
                kind,
                message,
            });
        }
        Ok(v)
    }
}
