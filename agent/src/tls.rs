//! TLS to the broker: rustls (ring provider) through rumqttc, with a pinned CA, a client
//! certificate for mutual TLS, and certificate rotation without a restart.
//!
//! # Configuration (`[mqtt.tls]`)
//!
//! TLS is on when the `[mqtt.tls]` table is present. Without it the agent speaks plaintext MQTT
//! only to a loopback broker (`127.0.0.1`, `::1`, `localhost`: development, tests, a local
//! bridge), with a WARN at start; any other broker needs `mqtt.insecure = true` to go without
//! TLS. See docs/security.md for why. The table is resolved and its files checked in
//! `config` (`RawTls` → `TlsSettings`, with the file checks of `tls_files`); this module builds
//! the connection from the result.
//!
//! # Guarantees
//!
//! * The private key file MUST NOT be readable by group or others: the configuration is
//!   refused (exit status 2, naming `mqtt.tls.key_file`) before anything else starts.
//! * The broker's certificate MUST chain to `ca_file` (only that CA is trusted; the system
//!   roots are not), or, with `system_roots = true` instead of `ca_file` (a public broker
//!   such as AWS IoT Core's ATS endpoints), to the operating system's CA store; and it MUST
//!   name the broker (`host`, or `server_name` when set). The server name sent (SNI) is
//!   `host`.
//! * The client certificate and key are read again, if their files changed, at every TLS
//!   handshake, i.e. on every (re)connection. SIGHUP makes the uplink reconnect at once, so a
//!   rotated certificate is in use within one reconnect, and nothing queued is lost (records
//!   are deleted only on PUBACK). A pair that does not load (half-written, key not matching the
//!   certificate) is refused with an ERROR and the previous pair stays in use.
//! * The certificate's expiry is a metric (`ember_agent_tls_client_cert_expiry_seconds`,
//!   seconds left, and `..._expiry_timestamp_seconds`) and a WARN when fewer than
//!   `expiry_warn_days` days are left (at load and at most hourly at handshakes).
//! * Private key material never reaches a log line or an error message.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::config::{ConfigError, Settings, TlsSettings};
use crate::metrics::Metrics;
use crate::tls_files::{check_key_permissions, load_pair, provider, read_certs, system_roots};

use ember_host::env::invalid;

/// How often a handshake may repeat the expiry warning.
const WARN_EVERY: Duration = Duration::from_secs(3600);

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The rustls client configuration for `tls`, with a client certificate resolver that reloads
/// changed files at each handshake and reports expiry into `metrics`.
pub fn client_config(
    tls: &TlsSettings,
    metrics: Arc<Metrics>,
) -> Result<Arc<rustls::ClientConfig>, ConfigError> {
    let provider = provider();
    let roots = match &tls.ca_file {
        Some(ca_file) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in read_certs(ca_file).map_err(|m| invalid("mqtt.tls.ca_file", m))? {
                roots
                    .add(c)
                    .map_err(|e| invalid("mqtt.tls.ca_file", format!("not a usable CA: {e}")))?;
            }
            roots
        }
        None => system_roots().map_err(|m| invalid("mqtt.tls.system_roots", m))?,
    };
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| invalid("mqtt.tls.ca_file", format!("not a usable CA: {e}")))?;
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("mqtt.tls", e.to_string()))?;
    let builder = match &tls.server_name {
        Some(name) => {
            let name = ServerName::try_from(name.clone())
                .map_err(|_| invalid("mqtt.tls.server_name", "not a DNS name or IP address"))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedName {
                    inner: webpki,
                    name,
                }))
        }
        None => builder.with_webpki_verifier(webpki),
    };
    let mut config = match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => {
            let resolver =
                FileCertResolver::load(cert.clone(), key.clone(), tls.expiry_warn_days, metrics)
                    .map_err(|(k, m)| invalid(k, m))?;
            builder.with_client_cert_resolver(Arc::new(resolver))
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = tls.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    // No session resumption: a resumed session skips client authentication, so the broker
    // would keep the old certificate's identity after a rotation. A full handshake per
    // (re)connection costs little next to the agent's reconnect backoff.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// Verifies the broker's certificate against a configured name instead of `mqtt.host` (for a
/// broker reached by address, or through a tunnel). Chain and signature checks are webpki's.
#[derive(Debug)]
struct PinnedName {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for PinnedName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Identity of a file's current contents for change detection: inode, size, modification time.
type Stamp = (u64, u64, i64, i64);

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.ino(), m.len(), m.mtime(), m.mtime_nsec()))
}

struct Loaded {
    key: Arc<CertifiedKey>,
    stamps: (Option<Stamp>, Option<Stamp>),
    last_warn: Option<Instant>,
}

/// Hands rustls the client certificate, re-reading the files when they changed.
struct FileCertResolver {
    cert: PathBuf,
    key: PathBuf,
    warn_days: u64,
    metrics: Arc<Metrics>,
    current: Mutex<Loaded>,
}

impl std::fmt::Debug for FileCertResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileCertResolver")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl FileCertResolver {
    fn load(
        cert: PathBuf,
        key: PathBuf,
        warn_days: u64,
        metrics: Arc<Metrics>,
    ) -> Result<Self, (&'static str, String)> {
        let stamps = (stamp(&cert), stamp(&key));
        let (ck, not_after) = load_pair(&cert, &key)?;
        let r = FileCertResolver {
            cert,
            key,
            warn_days,
            metrics,
            current: Mutex::new(Loaded {
                key: ck,
                stamps,
                last_warn: None,
            }),
        };
        r.note_expiry(not_after, &mut r.lock(), true);
        Ok(r)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Loaded> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn note_expiry(&self, not_after: i64, loaded: &mut Loaded, force: bool) {
        self.metrics
            .tls_cert_not_after
            .store(not_after.max(0) as u64, Relaxed);
        let left = not_after - now_s();
        let due = force || loaded.last_warn.is_none_or(|t| t.elapsed() >= WARN_EVERY);
        if left < self.warn_days as i64 * 86_400 && due {
            loaded.last_warn = Some(Instant::now());
            if left <= 0 {
                tracing::error!(cert = %self.cert.display(), expired_s_ago = -left,
                    "The client certificate has expired: the broker will refuse the agent. Issue a new one and send SIGHUP.");
            } else {
                tracing::warn!(cert = %self.cert.display(), days_left = left / 86_400,
                    "The client certificate expires soon: issue a new one, replace the files and send SIGHUP.");
            }
        }
    }

    /// The pair to present now, reloaded first if either file changed.
    fn current(&self) -> Arc<CertifiedKey> {
        let mut loaded = self.lock();
        let stamps = (stamp(&self.cert), stamp(&self.key));
        if stamps != loaded.stamps {
            match load_pair(&self.cert, &self.key) {
                Ok((ck, not_after)) => {
                    if let Err(why) = check_key_permissions(&self.key) {
                        tracing::warn!(reason = %why, "The new private key file is too permissive.");
                    }
                    loaded.key = ck;
                    loaded.stamps = stamps;
                    tracing::info!(cert = %self.cert.display(), not_after,
                        "Loaded a new client certificate.");
                    self.note_expiry(not_after, &mut loaded, true);
                }
                Err((_, why)) => {
                    tracing::error!(reason = %why,
                        "The client certificate files changed but do not load; still using the previous certificate.");
                }
            }
        } else {
            let not_after = self.metrics.tls_cert_not_after.load(Relaxed) as i64;
            self.note_expiry(not_after, &mut loaded, false);
        }
        loaded.key.clone()
    }
}

impl ResolvesClientCert for FileCertResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        let ck = self.current();
        ck.key.choose_scheme(sigschemes).map(|_| ck)
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A sentence for a connection error caused by TLS, for the log (None for other errors).
pub fn describe_failure(e: &rumqttc::ConnectionError) -> Option<String> {
    match e {
        rumqttc::ConnectionError::Tls(tls) => Some(
            find_rustls(tls)
                .map(describe_rustls)
                .unwrap_or_else(|| format!("TLS failed: {tls}")),
        ),
        rumqttc::ConnectionError::Io(io) => find_rustls(io).map(describe_rustls),
        _ => None,
    }
}

/// The rustls error behind `e`, looking through `io::Error` wrappers and sources.
fn find_rustls<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(r) = e.downcast_ref::<rustls::Error>() {
        return Some(r);
    }
    if let Some(inner) = e
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
        && let Some(r) = find_rustls(inner)
    {
        return Some(r);
    }
    e.source().and_then(find_rustls)
}

fn describe_rustls(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(why) => format!(
            "the broker's certificate was refused ({why:?}): it must chain to mqtt.tls.ca_file and name the broker"
        ),
        rustls::Error::AlertReceived(alert) => format!(
            "the broker refused the TLS handshake ({alert:?}): is the client certificate valid and issued by the broker's CA?"
        ),
        other => format!("TLS failed: {other}"),
    }
}

/// Private key files are written with this mode.
pub const KEY_FILE_MODE: u32 = 0o600;

/// `ember-agent keygen`: a new ECDSA P-256 key in `out` (mode 0600); never overwrites.
pub fn keygen(out: &Path) -> anyhow::Result<()> {
    let key = rcgen::KeyPair::generate()?;
    write_new(out, key.serialize_pem().as_bytes(), KEY_FILE_MODE)
}

/// `ember-agent csr`: a certificate signing request for `device_id` from the key in `key`.
/// The key stays on the device; only the CSR (public key + device id) is handed to the fleet's
/// `ember-fleet pki sign-csr`.
pub fn csr(device_id: &str, key: &Path) -> anyhow::Result<String> {
    ember_proto::check_name(device_id)
        .map_err(|why| anyhow::anyhow!("{device_id:?} is not a device id: {why}"))?;
    check_key_permissions(key).map_err(anyhow::Error::msg)?;
    let pem = std::fs::read_to_string(key)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", key.display()))?;
    let key = rcgen::KeyPair::from_pem(&pem)
        .map_err(|_| anyhow::anyhow!("{} holds no usable private key", key.display()))?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, device_id);
    Ok(params.serialize_request(&key)?.pem()?)
}

/// A new file, never replacing one (`ember_host::fs::Durable::create_new`), durable and with
/// `mode` from its creation.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    ember_host::fs::Durable::new()
        .mode(mode)
        .create_new()
        .write(path, bytes)
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot create {}: {e} (it is never overwritten)",
                path.display()
            )
        })
}

/// The uplink's client configuration (None: plaintext, after a WARN that says so).
pub fn setup(
    settings: &Settings,
    metrics: &Arc<Metrics>,
) -> Result<Option<Arc<rustls::ClientConfig>>, String> {
    match &settings.mqtt.tls {
        Some(t) => client_config(t, metrics.clone())
            .map(Some)
            .map_err(|e| e.to_string()),
        None => {
            tracing::warn!(host = %settings.mqtt.host, insecure = settings.mqtt.insecure,
                "MQTT without TLS: the broker connection is neither encrypted nor authenticated (configure [mqtt.tls] in production).");
            Ok(None)
        }
    }
}

/// SIGHUP as a stream; never fires if the handler cannot be installed.
pub struct Hangup(Option<tokio::signal::unix::Signal>);

impl Hangup {
    pub fn install() -> Hangup {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::hangup()) {
            Ok(s) => Hangup(Some(s)),
            Err(e) => {
                tracing::warn!(error = %e, "Cannot install the SIGHUP handler; rotated certificates are picked up at the next reconnect.");
                Hangup(None)
            }
        }
    }

    pub async fn recv(&mut self) {
        match &mut self.0 {
            Some(s) => {
                if s.recv().await.is_none() {
                    self.0 = None;
                    std::future::pending::<()>().await
                }
            }
            None => std::future::pending::<()>().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn keygen_writes_0600_and_csr_names_the_device() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k.pem");
        keygen(&key).unwrap();
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(keygen(&key).is_err(), "keygen must never overwrite a key");
        let request = csr("dev-1", &key).unwrap();
        assert!(
            request.starts_with("-----BEGIN CERTIFICATE REQUEST-----"),
            "{request}"
        );
        assert!(csr("a/b", &key).is_err());
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = csr("dev-1", &key).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
    }
}
