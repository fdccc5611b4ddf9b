//! Microsoft Entra ID access tokens through AKS workload identity, for signing in to Azure
//! Database for PostgreSQL without a password (`database.token_source =
//! "azure-workload-identity"`, [`crate::db`]).
//!
//! AKS's workload-identity webhook gives a pod whose service account is federated with a
//! managed identity four variables: `AZURE_CLIENT_ID` (the identity), `AZURE_TENANT_ID`,
//! `AZURE_AUTHORITY_HOST` and `AZURE_FEDERATED_TOKEN_FILE` (the service account's projected
//! token, which the kubelet rotates). The fleet exchanges that token for an Entra access token
//! (OAuth 2.0 client credentials with a JWT client assertion) scoped to PostgreSQL
//! ([`POSTGRES_SCOPE`]); the access token is the PostgreSQL password of the role named after
//! the identity. No key, secret or password is stored anywhere.

use std::path::PathBuf;
use std::time::Duration;

/// The scope of Azure Database for PostgreSQL's Entra sign-in.
pub const POSTGRES_SCOPE: &str = "https://ossrdbms-aad.database.windows.net/.default";
/// Entra ID's public cloud authority, when `AZURE_AUTHORITY_HOST` is not set.
pub const DEFAULT_AUTHORITY: &str = "https://login.microsoftonline.com/";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// What can go wrong getting a token; each says what to check.
#[derive(Debug, thiserror::Error)]
pub enum EntraError {
    #[error(
        "{0} is not set: database.token_source = \"azure-workload-identity\" needs AKS workload identity (the pod's service account annotated with azure.workload.identity/client-id and the pod labelled azure.workload.identity/use: \"true\")"
    )]
    MissingEnv(&'static str),
    #[error(
        "cannot read the federated token {path}: {source} (AZURE_FEDERATED_TOKEN_FILE; the workload-identity webhook projects it into the pod)"
    )]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot reach Entra ID at {url}: {detail}")]
    Http { url: String, detail: String },
    #[error(
        "Entra ID refused the token request ({status}): {detail} (is the managed identity federated with this service account, and is AZURE_CLIENT_ID its client id?)"
    )]
    Refused { status: u16, detail: String },
}

/// A workload identity as AKS describes it to the pod.
#[derive(Debug, Clone)]
pub struct WorkloadIdentity {
    authority: String,
    tenant: String,
    client_id: String,
    token_file: PathBuf,
}

/// An access token and how long Entra says it is valid.
#[derive(Clone)]
pub struct AccessToken {
    pub token: String,
    pub expires_in: Duration,
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessToken")
            .field("token", &"***")
            .field("expires_in", &self.expires_in)
            .finish()
    }
}

impl WorkloadIdentity {
    pub fn new(authority: &str, tenant: &str, client_id: &str, token_file: PathBuf) -> Self {
        let mut authority = authority.to_string();
        if !authority.ends_with('/') {
            authority.push('/');
        }
        WorkloadIdentity {
            authority,
            tenant: tenant.to_string(),
            client_id: client_id.to_string(),
            token_file,
        }
    }

    /// From the variables AKS's workload-identity webhook sets.
    pub fn from_env() -> Result<Self, EntraError> {
        let var = |k: &'static str| {
            std::env::var(k)
                .ok()
                .filter(|v| !v.trim().is_empty())
                .ok_or(EntraError::MissingEnv(k))
        };
        let authority =
            std::env::var("AZURE_AUTHORITY_HOST").unwrap_or_else(|_| DEFAULT_AUTHORITY.into());
        Ok(WorkloadIdentity::new(
            &authority,
            &var("AZURE_TENANT_ID")?,
            &var("AZURE_CLIENT_ID")?,
            PathBuf::from(var("AZURE_FEDERATED_TOKEN_FILE")?),
        ))
    }

    /// The token endpoint of the tenant.
    pub fn token_url(&self) -> String {
        format!("{}{}/oauth2/v2.0/token", self.authority, self.tenant)
    }

    /// An access token for `scope`, exchanging the federated token as it is on disk now.
    pub async fn token(
        &self,
        http: &reqwest::Client,
        scope: &str,
    ) -> Result<AccessToken, EntraError> {
        let assertion = std::fs::read_to_string(&self.token_file)
            .map_err(|source| EntraError::TokenFile {
                path: self.token_file.clone(),
                source,
            })?
            .trim()
            .to_string();
        let url = self.token_url();
        let body = form(&[
            ("grant_type", "client_credentials"),
            ("client_id", &self.client_id),
            ("scope", scope),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", &assertion),
        ]);
        let http_err = |detail: String| EntraError::Http {
            url: url.clone(),
            detail,
        };
        let resp = http
            .post(&url)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .timeout(REQUEST_TIMEOUT)
            .body(body)
            .send()
            .await
            .map_err(|e| http_err(e.to_string()))?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(|e| http_err(e.to_string()))?;
        let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        if status != 200 {
            // Entra's answer names the problem (error, error_description); never the assertion.
            let detail = json["error_description"]
                .as_str()
                .or_else(|| json["error"].as_str())
                .unwrap_or("no error description")
                .to_string();
            return Err(EntraError::Refused { status, detail });
        }
        let token = json["access_token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| EntraError::Refused {
                status,
                detail: "the answer has no access_token".into(),
            })?
            .to_string();
        // `expires_in` is a number (or, from some endpoints, a numeric string).
        let expires_in = json["expires_in"]
            .as_u64()
            .or_else(|| json["expires_in"].as_str().and_then(|s| s.parse().ok()))
            .unwrap_or(3600);
        Ok(AccessToken {
            token,
            expires_in: Duration::from_secs(expires_in),
        })
    }
}

/// `application/x-www-form-urlencoded`.
fn form(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| {
            format!(
                "{}={}",
                ember_host::sas::url_encode(k),
                ember_host::sas::url_encode(v)
            )
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// `url` (`postgres://user@host/db?...`) with `password` as its password, percent-encoded.
pub fn with_password(url: &str, password: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_string();
    };
    let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
    format!(
        "{scheme}://{user}:{}@{host}",
        ember_host::sas::url_encode(password)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;

    /// One HTTP exchange: returns the request (head and body) and answers `status`/`body`.
    fn serve_once(status: u16, body: &'static str) -> (u16, std::thread::JoinHandle<String>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
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
            let mut b = vec![0; len];
            r.read_exact(&mut b).unwrap();
            let mut s = s;
            write!(
                s,
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            head + &String::from_utf8(b).unwrap()
        });
        (port, t)
    }

    fn http() -> reqwest::Client {
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::Client::new()
    }

    fn identity(port: u16, dir: &std::path::Path) -> WorkloadIdentity {
        let file = dir.join("token");
        std::fs::write(&file, "eyJ.federated.jwt\n").unwrap();
        WorkloadIdentity::new(
            &format!("http://127.0.0.1:{port}"),
            "tenant-1",
            "client-1",
            file,
        )
    }

    #[tokio::test]
    async fn the_federated_token_is_exchanged_for_a_postgres_token() {
        let dir = tempfile::tempdir().unwrap();
        let (port, req) = serve_once(
            200,
            r#"{"token_type":"Bearer","expires_in":3599,"access_token":"tok-1"}"#,
        );
        let t = identity(port, dir.path())
            .token(&http(), POSTGRES_SCOPE)
            .await
            .unwrap();
        assert_eq!(t.token, "tok-1");
        assert_eq!(t.expires_in, Duration::from_secs(3599));
        let req = req.join().unwrap();
        assert!(
            req.starts_with("POST /tenant-1/oauth2/v2.0/token "),
            "{req}"
        );
        for part in [
            "grant_type=client_credentials",
            "client_id=client-1",
            "scope=https%3A%2F%2Fossrdbms-aad.database.windows.net%2F.default",
            "client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer",
            "client_assertion=eyJ.federated.jwt",
        ] {
            assert!(req.contains(part), "{part} missing from {req}");
        }
        assert!(
            !format!("{t:?}").contains("tok-1"),
            "Debug never shows the token"
        );
    }

    #[tokio::test]
    async fn a_refusal_names_entras_reason_and_a_missing_file_the_variable() {
        let dir = tempfile::tempdir().unwrap();
        let (port, _req) = serve_once(
            401,
            r#"{"error":"invalid_client","error_description":"AADSTS70021: No matching federated identity record found"}"#,
        );
        let e = identity(port, dir.path())
            .token(&http(), POSTGRES_SCOPE)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("401") && e.contains("AADSTS70021"), "{e}");
        let missing =
            WorkloadIdentity::new("http://127.0.0.1:9", "t", "c", dir.path().join("none"));
        let e = missing
            .token(&http(), POSTGRES_SCOPE)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("AZURE_FEDERATED_TOKEN_FILE"), "{e}");
    }

    #[test]
    fn the_token_becomes_the_urls_password() {
        assert_eq!(
            with_password(
                "postgres://ember-fleet@db.example/ember?sslmode=require",
                "a/b+c"
            ),
            "postgres://ember-fleet:a%2Fb%2Bc@db.example/ember?sslmode=require"
        );
        assert_eq!(
            with_password("postgres://u:old@h/d", "new"),
            "postgres://u:new@h/d"
        );
    }
}
