//! TLS for the fleet service: HTTPS for the REST API (`[http.tls]`) and mutual TLS to the
//! broker (`[mqtt.tls]`), both with rustls and the ring provider.
//!
//! * **HTTPS.** With `[http.tls]` the API listener speaks only TLS (1.2 and 1.3). Handshakes
//!   run in their own tasks with a timeout, so a slow or silent client cannot hold up others.
//!   Without it the API is plain HTTP (the embedded development default, on 127.0.0.1); a
//!   non-loopback `http.listen` without TLS gets a WARN at start (a TLS-terminating proxy is
//!   a legitimate set-up).
//! * **MQTT.** With `[mqtt.tls]` the fleet connects to the broker with its own client
//!   certificate (common name `ember:fleet` by default, see `ember_proto::acl`); the broker's
//!   certificate must chain to `ca_file`. Without it, plaintext is allowed only to a loopback
//!   broker, or with `mqtt.insecure = true`.
//! * Private key files MUST NOT be readable by group or others: the configuration is refused
//!   (exit 2) naming the key.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::config::ConfigError;
use crate::error::FleetError;

/// How long a client may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Completed handshakes waiting for the HTTP server to take them.
const ACCEPT_BACKLOG: usize = 64;

/// `[http.tls]` in the file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttpTls {
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// `[http.tls]` resolved: the API's certificate chain and key (PEM).
#[derive(Debug, Clone, Serialize)]
pub struct HttpTlsSettings {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// `[mqtt.tls]` in the file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMqttTls {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub alpn: Option<Vec<String>>,
}

/// `[mqtt.tls]` resolved.
#[derive(Debug, Clone, Serialize)]
pub struct MqttTlsSettings {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// ALPN protocols to offer (e.g. `["x-amzn-mqtt-ca"]`).
    pub alpn: Vec<String>,
}

use ember_host::env::invalid;

use ember_host::tls::{check_key_permissions, check_mqtt_transport, mqtt_ca_file};
use ember_host::tls::{provider, read_certs, read_key};

fn pair(
    section: &str,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
) -> Result<(PathBuf, PathBuf), ConfigError> {
    let cert = cert.ok_or_else(|| {
        invalid(
            format!("{section}.cert_file"),
            "missing: name the PEM certificate (chain) file",
        )
    })?;
    let key = key.ok_or_else(|| {
        invalid(
            format!("{section}.key_file"),
            "missing: name the PEM private key file",
        )
    })?;
    read_certs(&cert).map_err(|m| invalid(format!("{section}.cert_file"), m))?;
    check_key_permissions(&key).map_err(|m| invalid(format!("{section}.key_file"), m))?;
    read_key(&key).map_err(|m| invalid(format!("{section}.key_file"), m))?;
    Ok((cert, key))
}

/// Resolves `[http.tls]`, checking that the files load.
pub fn resolve_http(raw: Option<RawHttpTls>) -> Result<Option<HttpTlsSettings>, ConfigError> {
    let Some(raw) = raw else { return Ok(None) };
    let (cert_file, key_file) = pair("http.tls", raw.cert_file, raw.key_file)?;
    let s = HttpTlsSettings {
        cert_file,
        key_file,
    };
    server_config(&s).map_err(|e| invalid("http.tls", e.to_string()))?;
    Ok(Some(s))
}

/// Resolves `[mqtt.tls]` and `mqtt.insecure` for a broker on `host`.
pub fn resolve_mqtt(
    raw: Option<RawMqttTls>,
    insecure: Option<bool>,
    host: &str,
) -> Result<Option<MqttTlsSettings>, ConfigError> {
    let insecure = insecure.unwrap_or(false);
    check_mqtt_transport(raw.is_some(), insecure, host).map_err(|(k, m)| invalid(k, m))?;
    let Some(raw) = raw else {
        return Ok(None);
    };
    let (ca_file, _) = mqtt_ca_file(raw.ca_file).map_err(|(k, m)| invalid(k, m))?;
    let (cert_file, key_file) = pair("mqtt.tls", raw.cert_file, raw.key_file)?;
    let s = MqttTlsSettings {
        ca_file,
        cert_file,
        key_file,
        alpn: raw.alpn.unwrap_or_default(),
    };
    mqtt_client_config(&s).map_err(|e| invalid("mqtt.tls", e.to_string()))?;
    Ok(Some(s))
}

/// The HTTPS server configuration.
pub fn server_config(s: &HttpTlsSettings) -> Result<Arc<rustls::ServerConfig>, FleetError> {
    let certs = read_certs(&s.cert_file).map_err(FleetError::Tls)?;
    let key = read_key(&s.key_file).map_err(FleetError::Tls)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| FleetError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            FleetError::Tls(format!(
                "http.tls: the key does not fit the certificate: {e}"
            ))
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The rustls client configuration for the fleet's broker connection.
pub fn mqtt_client_config(s: &MqttTlsSettings) -> Result<Arc<rustls::ClientConfig>, FleetError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in read_certs(&s.ca_file).map_err(FleetError::Tls)? {
        roots
            .add(c)
            .map_err(|e| FleetError::Tls(format!("mqtt.tls.ca_file: {e}")))?;
    }
    let certs = read_certs(&s.cert_file).map_err(FleetError::Tls)?;
    let key = read_key(&s.key_file).map_err(FleetError::Tls)?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| FleetError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|e| {
            FleetError::Tls(format!(
                "mqtt.tls: the key does not fit the certificate: {e}"
            ))
        })?;
    config.alpn_protocols = s.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    // A resumed session skips client authentication: always present the current certificate.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// Sets the MQTT transport for `[mqtt.tls]` (plaintext when absent). The broker's certificate
/// must name `mqtt.host`.
pub fn apply_mqtt(
    opts: &mut rumqttc::MqttOptions,
    s: &crate::config::MqttSettings,
) -> Result<(), FleetError> {
    if let Some(t) = &s.tls {
        let config = mqtt_client_config(t)?;
        opts.set_transport(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Rustls(
            config,
        )));
    }
    Ok(())
}

/// [`apply_mqtt`] for an MQTT 5 client (the ingestion reader).
pub fn apply_mqtt_v5(
    opts: &mut rumqttc::v5::MqttOptions,
    s: &crate::config::MqttSettings,
) -> Result<(), FleetError> {
    if let Some(t) = &s.tls {
        let config = mqtt_client_config(t)?;
        opts.set_transport(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Rustls(
            config,
        )));
    }
    Ok(())
}

/// Exports the notAfter of the certificates this process presents
/// (`ember_fleet_tls_cert_expiry_timestamp_seconds{cert="http"|"mqtt"}`), read once at start
/// like the certificates themselves (a rotated file takes effect at the next start, and so
/// does its gauge). A certificate that cannot be read here was already refused by the
/// configuration check, so a failure only leaves the gauge out.
pub fn record_cert_expiry(settings: &crate::config::Settings, metrics: &crate::metrics::Metrics) {
    let http = settings.http.tls.as_ref().map(|t| t.cert_file.as_path());
    let mqtt = settings.mqtt.tls.as_ref().map(|t| t.cert_file.as_path());
    for (cert, file) in [("http", http), ("mqtt", mqtt)] {
        if let Some(not_after) = file.and_then(cert_not_after) {
            metrics.set(
                "tls_cert_expiry_timestamp_seconds",
                &[("cert", cert)],
                not_after as f64,
            );
        }
    }
}

/// The notAfter (Unix seconds) of the first certificate in a PEM file: the leaf of a chain.
fn cert_not_after(file: &std::path::Path) -> Option<i64> {
    read_certs(file)
        .ok()?
        .first()
        .and_then(ember_host::tls::not_after)
}

/// A listener that yields TLS streams: accepts TCP, completes each handshake in its own task.
pub struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    pub fn new(
        listener: TcpListener,
        config: Arc<rustls::ServerConfig>,
        shutdown: CancellationToken,
    ) -> std::io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let (tx, rx) = mpsc::channel(ACCEPT_BACKLOG);
        let acceptor = TlsAcceptor::from(config);
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = listener.accept() => match r {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::warn!(error = %e, "HTTPS listener failed to accept a connection.");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed.")
                        }
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out."),
                    }
                });
            }
        });
        Ok(TlsListener { rx, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept task ended (shutdown): no more connections.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// Serves `app` on `listener`, over TLS when `[http.tls]` is set, until `shutdown`.
pub fn serve(
    listener: TcpListener,
    app: axum::Router,
    settings: &crate::config::Settings,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<std::io::Result<()>>, FleetError> {
    use std::future::IntoFuture;
    match &settings.http.tls {
        Some(t) => {
            let config = server_config(t)?;
            let tls =
                TlsListener::new(listener, config, shutdown.clone()).map_err(FleetError::Serve)?;
            tracing::info!("The API speaks HTTPS only.");
            Ok(tokio::spawn(
                axum::serve(tls, app)
                    .with_graceful_shutdown(shutdown.cancelled_owned())
                    .into_future(),
            ))
        }
        None => {
            if !settings.http.listen.ip().is_loopback() {
                tracing::warn!(listen = %settings.http.listen,
                    "The API is plain HTTP on a non-loopback address: tokens cross the network in clear text unless a TLS proxy is in front (configure [http.tls]).");
            }
            Ok(tokio::spawn(
                axum::serve(listener, app)
                    .with_graceful_shutdown(shutdown.cancelled_owned())
                    .into_future(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_production_example_turns_tls_on() {
        let raw: crate::config::RawConfig =
            toml::from_str(include_str!("../examples/fleet-production.toml")).unwrap();
        assert!(
            raw.http
                .tls
                .is_some_and(|t| t.cert_file.is_some() && t.key_file.is_some())
        );
        assert!(
            raw.mqtt
                .tls
                .is_some_and(|t| t.ca_file.is_some() && t.key_file.is_some())
        );
        assert!(raw.mqtt.insecure.is_none());
    }

    #[test]
    fn a_certificates_not_after_is_read_from_the_leaf() {
        let d = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["fleet".into()]).unwrap();
        params.not_after = time::OffsetDateTime::from_unix_timestamp(2_000_000_000).unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        let file = d.path().join("c.pem");
        std::fs::write(&file, pem).unwrap();
        assert_eq!(cert_not_after(&file), Some(2_000_000_000));
        assert_eq!(cert_not_after(&d.path().join("absent.pem")), None);
    }

    #[test]
    fn plaintext_mqtt_only_to_loopback_unless_insecure() {
        assert!(resolve_mqtt(None, None, "127.0.0.1").unwrap().is_none());
        assert!(resolve_mqtt(None, None, "localhost").unwrap().is_none());
        let e = resolve_mqtt(None, None, "broker.internal")
            .unwrap_err()
            .to_string();
        assert!(e.contains("mqtt.tls"), "{e}");
        assert!(
            resolve_mqtt(None, Some(true), "broker.internal")
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_readable_key_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let key = d.path().join("k.pem");
        std::fs::write(&key, "x").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(
            check_key_permissions(&key)
                .unwrap_err()
                .contains("chmod 600")
        );
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(check_key_permissions(&key).is_ok());
    }
}
