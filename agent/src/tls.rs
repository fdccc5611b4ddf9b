//! TLS to the broker: rustls (ring provider) through rumqttc, with a pinned CA, a client
//! certificate for mutual TLS, and certificate rotation without a restart.
//!
//! # Configuration (`[mqtt.tls]`)
//!
//! TLS is on when the `[mqtt.tls]` table is present. Without it the agent speaks plaintext MQTT
//! only to a loopback broker (`127.0.0.1`, `::1`, `localhost`: development, tests, a local
//! bridge), with a WARN at start; any other broker needs `mqtt.insecure = true` to go without
//! TLS. See docs/security.md for why.
//!
//! # Guarantees
//!
//! * The private key file MUST NOT be readable by group or others: the configuration is
//!   refused (exit status 2, naming `mqtt.tls.key_file`) before anything else starts.
//! * The broker's certificate MUST chain to `ca_file` (only that CA is trusted; the system
//!   roots are not) and name the broker (`host`, or `server_name` when set).
//! * The client certificate and key are read again, if their files changed, at every TLS
//!   handshake, i.e. on every (re)connection. SIGHUP makes the uplink reconnect at once, so a
//!   rotated certificate is in use within one reconnect, and nothing queued is lost (records
//!   are deleted only on PUBACK). A pair that does not load (half-written, key not matching the
//!   certificate) is refused with an ERROR and the previous pair stays in use.
//! * The certificate's expiry is a metric (`ember_agent_tls_client_cert_expiry_seconds`,
//!   seconds left, and `..._expiry_timestamp_seconds`) and a WARN when fewer than
//!   `expiry_warn_days` days are left (at load and at most hourly at handshakes).
//! * Private key material never reaches a log line or an error message.

use std::net::IpAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::{Deserialize, Serialize};

use crate::config::ConfigError;
use crate::metrics::Metrics;

/// Days before expiry from which the agent warns about its client certificate.
pub const DEFAULT_EXPIRY_WARN_DAYS: u64 = 30;
/// How often a handshake may repeat the expiry warning.
const WARN_EVERY: Duration = Duration::from_secs(3600);

/// `[mqtt.tls]` as written in the file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub alpn: Option<Vec<String>>,
    pub server_name: Option<String>,
    pub expiry_warn_days: Option<u64>,
}

/// `[mqtt.tls]` resolved.
#[derive(Debug, Clone, Serialize)]
pub struct TlsSettings {
    /// The only CA the broker's certificate may chain to (PEM).
    pub ca_file: PathBuf,
    /// The client certificate (PEM, leaf first) for mutual TLS.
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM: PKCS#8, SEC1 or PKCS#1), mode 0600 or stricter.
    pub key_file: Option<PathBuf>,
    /// ALPN protocols to offer, e.g. `["x-amzn-mqtt-ca"]` for AWS IoT Core on port 443.
    pub alpn: Vec<String>,
    /// The name the broker's certificate must carry, when it differs from `mqtt.host`.
    pub server_name: Option<String>,
    pub expiry_warn_days: u64,
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

/// Whether `host` names this machine (plaintext is tolerated there).
pub fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

/// Resolves `[mqtt.tls]` and `mqtt.insecure` for a broker on `host`, checking the files: they
/// must be readable PEM, and the key must not be readable by group or others.
pub fn resolve(
    raw: Option<RawTls>,
    insecure: Option<bool>,
    host: &str,
) -> Result<Option<TlsSettings>, ConfigError> {
    let insecure = insecure.unwrap_or(false);
    let Some(raw) = raw else {
        if !insecure && !is_loopback(host) {
            return Err(invalid(
                "mqtt.tls",
                format!(
                    "missing: the broker {host:?} is not on this machine, so the connection must use TLS: \
                     add [mqtt.tls] with ca_file, cert_file and key_file (or, for development only, set mqtt.insecure = true)"
                ),
            ));
        }
        return Ok(None);
    };
    if insecure {
        return Err(invalid(
            "mqtt.insecure",
            "cannot be true together with [mqtt.tls]: remove one of them",
        ));
    }
    let ca_file = raw.ca_file.ok_or_else(|| {
        invalid(
            "mqtt.tls.ca_file",
            "missing: name the PEM file of the CA that signed the broker's certificate",
        )
    })?;
    let ca = read_certs(&ca_file).map_err(|m| invalid("mqtt.tls.ca_file", m))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in ca {
        roots
            .add(c)
            .map_err(|e| invalid("mqtt.tls.ca_file", format!("not a usable CA: {e}")))?;
    }
    match (&raw.cert_file, &raw.key_file) {
        (Some(cert), Some(key)) => {
            check_key_permissions(key).map_err(|m| invalid("mqtt.tls.key_file", m))?;
            load_pair(cert, key).map_err(|(k, m)| invalid(k, m))?;
        }
        (Some(_), None) => {
            return Err(invalid(
                "mqtt.tls.key_file",
                "missing: cert_file is set, so give its private key too",
            ));
        }
        (None, Some(_)) => {
            return Err(invalid(
                "mqtt.tls.cert_file",
                "missing: key_file is set, so give its certificate too",
            ));
        }
        (None, None) => {}
    }
    if let Some(name) = &raw.server_name {
        ServerName::try_from(name.as_str()).map_err(|_| {
            invalid(
                "mqtt.tls.server_name",
                format!("{name:?} is not a DNS name or IP address"),
            )
        })?;
    }
    let alpn = raw.alpn.unwrap_or_default();
    if alpn.iter().any(|p| p.is_empty() || p.len() > 255) {
        return Err(invalid(
            "mqtt.tls.alpn",
            "each protocol must be 1-255 bytes, e.g. [\"x-amzn-mqtt-ca\"]",
        ));
    }
    let expiry_warn_days = raw.expiry_warn_days.unwrap_or(DEFAULT_EXPIRY_WARN_DAYS);
    if expiry_warn_days > 3650 {
        return Err(invalid("mqtt.tls.expiry_warn_days", "must be at most 3650"));
    }
    Ok(Some(TlsSettings {
        ca_file,
        cert_file: raw.cert_file,
        key_file: raw.key_file,
        alpn,
        server_name: raw.server_name,
        expiry_warn_days,
    }))
}

/// Refuses a key file that group or others may read (or write).
pub fn check_key_permissions(key: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(key).map_err(|e| format!("cannot read {}: {e}", key.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "the private key {} is accessible to group or others (mode {mode:04o}): run `chmod 600 {}`",
            key.display(),
            key.display()
        ));
    }
    Ok(())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|_| format!("{} is not a PEM certificate file", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

/// Loads a certificate chain and its key. Errors name the config key and never quote the file.
fn load_pair(cert: &Path, key: &Path) -> Result<(Arc<CertifiedKey>, i64), (&'static str, String)> {
    let chain = read_certs(cert).map_err(|m| ("mqtt.tls.cert_file", m))?;
    let bytes = std::fs::read(key).map_err(|e| {
        (
            "mqtt.tls.key_file",
            format!("cannot read {}: {e}", key.display()),
        )
    })?;
    let der = PrivateKeyDer::from_pem_slice(&bytes).map_err(|_| {
        (
            "mqtt.tls.key_file",
            format!(
                "{} holds no PEM private key (PKCS#8, SEC1 or PKCS#1)",
                key.display()
            ),
        )
    })?;
    let signer = provider().key_provider.load_private_key(der).map_err(|_| {
        (
            "mqtt.tls.key_file",
            format!("{} holds a key type rustls cannot use", key.display()),
        )
    })?;
    let not_after = not_after(&chain[0]).ok_or_else(|| {
        (
            "mqtt.tls.cert_file",
            format!("cannot read the validity of {}", cert.display()),
        )
    })?;
    let ck = CertifiedKey::new(chain, signer);
    ck.keys_match().map_err(|_| {
        (
            "mqtt.tls.key_file",
            format!(
                "{} is not the private key of {}",
                key.display(),
                cert.display()
            ),
        )
    })?;
    Ok((Arc::new(ck), not_after))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

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
    let mut roots = rustls::RootCertStore::empty();
    for c in read_certs(&tls.ca_file).map_err(|m| invalid("mqtt.tls.ca_file", m))? {
        roots
            .add(c)
            .map_err(|e| invalid("mqtt.tls.ca_file", format!("not a usable CA: {e}")))?;
    }
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

/// Prometheus lines for the client certificate (none without one).
pub fn render_metrics(metrics: &Metrics, device_id: &str) -> String {
    let not_after = metrics.tls_cert_not_after.load(Relaxed);
    if not_after == 0 {
        return String::new();
    }
    let left = not_after as i64 - now_s();
    format!(
        "# HELP ember_agent_tls_client_cert_expiry_seconds Seconds until the client certificate expires (negative: expired).\n\
         # TYPE ember_agent_tls_client_cert_expiry_seconds gauge\n\
         ember_agent_tls_client_cert_expiry_seconds{{device=\"{device_id}\"}} {left}\n\
         # HELP ember_agent_tls_client_cert_expiry_timestamp_seconds The client certificate's notAfter (Unix time).\n\
         # TYPE ember_agent_tls_client_cert_expiry_timestamp_seconds gauge\n\
         ember_agent_tls_client_cert_expiry_timestamp_seconds{{device=\"{device_id}\"}} {not_after}\n"
    )
}

// ---- the validity of an X.509 certificate, from its DER -------------------------------------

/// One DER element: (tag, contents, rest).
fn der_next(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&len0, rest) = rest.split_first()?;
    let (len, rest) = if len0 < 0x80 {
        (len0 as usize, rest)
    } else {
        let n = (len0 & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |a, b| (a << 8) | *b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// `notAfter` of a certificate, in seconds since the Unix epoch.
pub fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    const SEQUENCE: u8 = 0x30;
    let (tag, certificate, _) = der_next(cert.as_ref())?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, tbs, _) = der_next(certificate)?;
    if tag != SEQUENCE {
        return None;
    }
    let mut rest = tbs;
    // [0] EXPLICIT version is optional.
    if rest.first() == Some(&0xa0) {
        rest = der_next(rest)?.2;
    }
    // serialNumber, signature, issuer, then validity.
    for _ in 0..3 {
        rest = der_next(rest)?.2;
    }
    let (tag, validity, _) = der_next(rest)?;
    if tag != SEQUENCE {
        return None;
    }
    let (_, _, validity) = der_next(validity)?; // notBefore
    let (tag, time, _) = der_next(validity)?;
    let text = std::str::from_utf8(time).ok()?;
    let (year, rest) = match tag {
        0x17 => {
            let yy: i64 = text.get(0..2)?.parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, text.get(2..)?)
        }
        0x18 => (text.get(0..4)?.parse().ok()?, text.get(4..)?),
        _ => return None,
    };
    let field = |i: usize| -> Option<i64> { rest.get(i..i + 2)?.parse().ok() };
    let (month, day, h, m, s) = (field(0)?, field(2)?, field(4)?, field(6)?, field(8)?);
    if rest.get(10..) != Some("Z") || !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + s)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
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

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot create {}: {e} (it is never overwritten)",
                path.display()
            )
        })?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

/// The uplink's client configuration (None: plaintext, after a WARN that says so).
pub fn setup(
    settings: &crate::config::Settings,
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
    use super::*;

    #[test]
    fn reads_not_after_of_generated_certificates() {
        for (y, m, d) in [(2031, 5, 17), (2049, 12, 31), (2051, 1, 2)] {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut p = rcgen::CertificateParams::new(vec!["x".to_string()]).unwrap();
            p.not_after = rcgen::date_time_ymd(y, m, d);
            let cert = p.self_signed(&key).unwrap();
            let expect = days_from_civil(y as i64, m as i64, d as i64) * 86_400;
            assert_eq!(not_after(cert.der()), Some(expect), "{y}-{m}-{d}");
        }
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(not_after(&CertificateDer::from(vec![0x30, 0x01])), None);
    }

    #[test]
    fn plaintext_only_to_loopback_unless_insecure() {
        assert!(is_loopback("127.0.0.1") && is_loopback("::1") && is_loopback("[::1]"));
        assert!(is_loopback("localhost") && !is_loopback("broker.example"));
        assert!(resolve(None, None, "127.0.0.1").unwrap().is_none());
        let e = resolve(None, None, "broker.example")
            .unwrap_err()
            .to_string();
        assert!(e.contains("mqtt.tls"), "{e}");
        assert!(
            resolve(None, Some(true), "broker.example")
                .unwrap()
                .is_none()
        );
        let e = resolve(Some(RawTls::default()), Some(true), "b")
            .unwrap_err()
            .to_string();
        assert!(e.contains("mqtt.insecure"), "{e}");
    }

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
