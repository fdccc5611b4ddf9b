//! TLS for system tests: a throwaway PKI generated per test, a Mosquitto with mutual TLS and
//! the Ember per-device ACL, and rustls client settings for test clients.
//!
//! Nothing here is committed: every key and certificate is generated at test time into the
//! PKI's own temp dir (private keys `0600`). The broker's config is built from
//! [`ember_proto::acl::mosquitto_acl`], the same ACL `ember-fleet pki mosquitto-conf` writes,
//! and loads the same `ember_identity` plugin ([`identity_plugin`]): a device's client id must
//! be its certificate's common name. Unlike the shipped config, the test broker lets the
//! fleet identity use any client id (tests name their fleet clients freely).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::broker::TestBroker;

pub use ember_proto::acl::FLEET_IDENTITY;

/// A certificate and its private key, as files and as PEM text.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub cert_pem: String,
    pub key_pem: String,
    /// The certificate's `notAfter`, seconds since the Unix epoch.
    pub not_after: i64,
}

/// A certificate authority for one test, with its files in a temp dir.
pub struct TestPki {
    dir: tempfile::TempDir,
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
    ca_file: PathBuf,
    serial: std::sync::atomic::AtomicU64,
}

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn at(unix_s: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(unix_s).expect("a representable time")
}

/// Writes `text` to `path` with mode `mode` (replacing it atomically: `ember_host::fs`).
pub fn write_file(path: &Path, text: &str, mode: u32) {
    ember_host::fs::Durable::new()
        .mode(mode)
        .write(path, text.as_bytes())
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

impl TestPki {
    /// A new CA named `name` (its common name), valid from an hour ago for ten years.
    pub fn new(name: &str) -> TestPki {
        let dir = tempfile::Builder::new()
            .prefix("ember-pki-")
            .tempdir()
            .expect("cannot create a temp dir for the PKI");
        let key = KeyPair::generate().expect("cannot generate the CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = at(now_s() - 3600);
        params.not_after = at(now_s() + 10 * 365 * 86400);
        let cert = params.self_signed(&key).expect("cannot sign the CA");
        let ca_pem = cert.pem();
        let ca_file = dir.path().join("ca.pem");
        write_file(&ca_file, &ca_pem, 0o644);
        write_file(&dir.path().join("ca.key"), &key.serialize_pem(), 0o600);
        TestPki {
            issuer: Issuer::new(params, key),
            dir,
            ca_pem,
            ca_file,
            serial: std::sync::atomic::AtomicU64::new(2),
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The broker's certificate: SANs `127.0.0.1` and `localhost`, valid for a year.
    pub fn server(&self) -> CertFiles {
        self.issue(
            "server",
            "localhost",
            &["localhost"],
            true,
            now_s() - 3600,
            now_s() + 365 * 86400,
        )
    }

    /// A client certificate with common name `cn`, valid from an hour ago for `days` days.
    pub fn client(&self, file_stem: &str, cn: &str, days: i64) -> CertFiles {
        self.issue(
            file_stem,
            cn,
            &[],
            false,
            now_s() - 3600,
            now_s() + days * 86400,
        )
    }

    /// A client certificate valid in `[not_before, not_after]` (Unix seconds), e.g. expired.
    pub fn client_valid(
        &self,
        file_stem: &str,
        cn: &str,
        not_before: i64,
        not_after: i64,
    ) -> CertFiles {
        self.issue(file_stem, cn, &[], false, not_before, not_after)
    }

    /// The fleet service's client certificate (common name [`FLEET_IDENTITY`]).
    pub fn fleet(&self) -> CertFiles {
        self.client("fleet", FLEET_IDENTITY, 365)
    }

    fn issue(
        &self,
        file_stem: &str,
        cn: &str,
        dns: &[&str],
        server: bool,
        not_before: i64,
        not_after: i64,
    ) -> CertFiles {
        let key = KeyPair::generate().expect("cannot generate a key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        if server {
            params.subject_alt_names = dns
                .iter()
                .map(|d| SanType::DnsName((*d).try_into().expect("a DNS name")))
                .collect();
            params
                .subject_alt_names
                .push(SanType::IpAddress([127, 0, 0, 1].into()));
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        } else {
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = at(not_before);
        params.not_after = at(not_after);
        let serial = self
            .serial
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        params.serial_number = Some(serial.into());
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("cannot sign a certificate");
        let files = CertFiles {
            cert: self.dir.path().join(format!("{file_stem}.pem")),
            key: self.dir.path().join(format!("{file_stem}.key")),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            not_after,
        };
        write_file(&files.cert, &files.cert_pem, 0o644);
        write_file(&files.key, &files.key_pem, 0o600);
        files
    }
}

/// A rustls client configuration trusting `ca_pem`, presenting `client` if given (ring
/// provider, like the agent and the fleet).
pub fn client_config(ca_pem: &str, client: Option<&CertFiles>) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.expect("a CA PEM")).expect("a usable CA");
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots);
    let config = match client {
        Some(c) => {
            let certs: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(c.cert_pem.as_bytes())
                    .collect::<Result<_, _>>()
                    .expect("a certificate PEM");
            let key = PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes()).expect("a key PEM");
            builder
                .with_client_auth_cert(certs, key)
                .expect("a usable client certificate")
        }
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

/// MQTT options for a TLS client of a test broker on `127.0.0.1:port`.
pub fn mqtt_options(client_id: &str, port: u16, tls: Arc<rustls::ClientConfig>) -> MqttOptions {
    let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
    o.set_transport(Transport::Tls(TlsConfiguration::Rustls(tls)));
    o.set_keep_alive(Duration::from_secs(5));
    o
}

/// Connects once with `tls` and returns `Ok` when the broker answers CONNACK success, or the
/// error that ended the attempt (TLS alert, closed connection, refused CONNACK). The client id
/// is the client certificate's common name (the only one the broker accepts from a device),
/// or `ember-testkit-probe` without a certificate.
pub fn try_connect(port: u16, tls: Arc<rustls::ClientConfig>) -> Result<(), String> {
    let id = common_name(&tls).unwrap_or_else(|| "ember-testkit-probe".into());
    try_connect_as(&id, port, tls)
}

/// The common name of the client certificate `tls` presents, if any.
pub fn common_name(tls: &rustls::ClientConfig) -> Option<String> {
    let key = tls.client_auth_cert_resolver.resolve(&[], &[])?;
    let der = key.cert.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// [`try_connect`] with the MQTT client id `client_id`.
pub fn try_connect_as(
    client_id: &str,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async move {
        let (_client, mut el) = AsyncClient::new(mqtt_options(client_id, port, tls), 4);
        let attempt = async {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(a))) => {
                        return if a.code == rumqttc::ConnectReturnCode::Success {
                            Ok(())
                        } else {
                            Err(format!("CONNACK {:?}", a.code))
                        };
                    }
                    Ok(_) => {}
                    Err(e) => return Err(e.to_string()),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), attempt)
            .await
            .unwrap_or_else(|_| Err("no answer within 10 s".into()))
    })
}

/// A message a [`RawClient`] received: `(topic, payload)`.
pub type Received = (String, Vec<u8>);

/// A raw MQTT client over TLS on its own thread, for tests that act as a (misbehaving) device:
/// it publishes and subscribes where it is told and records what it receives.
pub struct RawClient {
    client: AsyncClient,
    received: Arc<std::sync::Mutex<Vec<Received>>>,
    acks: Arc<std::sync::Mutex<Vec<Vec<rumqttc::SubscribeReasonCode>>>>,
    connected: Arc<std::sync::atomic::AtomicBool>,
    stop: Arc<tokio::sync::Notify>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RawClient {
    /// Connects and waits for CONNACK (panics after 10 s).
    pub fn connect(client_id: &str, port: u16, tls: Arc<rustls::ClientConfig>) -> RawClient {
        let (client, mut el) = AsyncClient::new(mqtt_options(client_id, port, tls), 64);
        let received = Arc::new(std::sync::Mutex::new(Vec::new()));
        let acks = Arc::new(std::sync::Mutex::new(Vec::new()));
        let connected = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = Arc::new(tokio::sync::Notify::new());
        let thread = {
            let (received, acks, connected, stop) = (
                received.clone(),
                acks.clone(),
                connected.clone(),
                stop.clone(),
            );
            std::thread::spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                rt.block_on(async move {
                    loop {
                        let ev = tokio::select! {
                            _ = stop.notified() => break,
                            ev = el.poll() => ev,
                        };
                        match ev {
                            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                                connected.store(true, std::sync::atomic::Ordering::SeqCst)
                            }
                            Ok(Event::Incoming(Packet::Publish(p))) => received
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push((p.topic.clone(), p.payload.to_vec())),
                            Ok(Event::Incoming(Packet::SubAck(s))) => acks
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push(s.return_codes),
                            Ok(_) => {}
                            Err(e) => {
                                received
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .push(("<error>".into(), e.to_string().into_bytes()));
                                connected.store(false, std::sync::atomic::Ordering::SeqCst);
                                tokio::select! {
                                    _ = stop.notified() => break,
                                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                                }
                            }
                        }
                    }
                });
            })
        };
        let raw = RawClient {
            client,
            received,
            acks,
            connected,
            stop,
            thread: Some(thread),
        };
        if !crate::wait_until(Duration::from_secs(10), || raw.is_connected()) {
            let last_error = raw
                .received()
                .into_iter()
                .rev()
                .find(|(t, _)| t == "<error>")
                .map(|(_, e)| String::from_utf8_lossy(&e).into_owned());
            panic!(
                "the raw TLS client {client_id} could not connect to 127.0.0.1:{port} (a device's \
                 client id must be its certificate's common name): {last_error:?}"
            );
        }
        raw
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Publishes at QoS1 (the broker acknowledges even a publish its ACL drops).
    pub fn publish(&self, topic: &str, payload: Vec<u8>) {
        self.client
            .try_publish(topic, QoS::AtLeastOnce, false, payload)
            .expect("the request channel has room");
    }

    /// Subscribes at QoS1 and waits for the SUBACK; returns its reason codes.
    pub fn subscribe(&self, filter: &str) -> Vec<rumqttc::SubscribeReasonCode> {
        let before = self.acks.lock().unwrap_or_else(|p| p.into_inner()).len();
        self.client
            .try_subscribe(filter, QoS::AtLeastOnce)
            .expect("the request channel has room");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(codes) = self
                .acks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(before)
            {
                return codes.clone();
            }
            assert!(Instant::now() < deadline, "no SUBACK for {filter:?}");
            std::thread::sleep(crate::POLL_INTERVAL);
        }
    }

    /// Everything received so far: `(topic, payload)`.
    pub fn received(&self) -> Vec<Received> {
        self.received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for RawClient {
    fn drop(&mut self) {
        self.stop.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The `ember_identity` Mosquitto plugin (deploy/mosquitto/ember_identity.c), built once per
/// source version by scripts/build-identity-plugin.sh into the temp dir and shared by every
/// test process. Panics, with the build's own message (which names the missing Debian
/// packages), when it cannot be built.
pub fn identity_plugin() -> PathBuf {
    static PLUGIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PLUGIN.get_or_init(build_identity_plugin).clone()
}

fn build_identity_plugin() -> PathBuf {
    use std::hash::{Hash, Hasher};
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let script = root.join("scripts/build-identity-plugin.sh");
    let source = root.join("deploy/mosquitto/ember_identity.c");
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for f in [&script, &source] {
        fs::read(f)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", f.display()))
            .hash(&mut hasher);
    }
    let out = std::env::temp_dir()
        .join(format!("ember-identity-{:016x}", hasher.finish()))
        .join("ember_identity.so");
    if out.is_file() {
        return out;
    }
    let built = std::process::Command::new("bash")
        .arg(&script)
        .arg(&out)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        built.status.success() && out.is_file(),
        "the TLS test broker needs the ember_identity Mosquitto plugin, and {} failed:\n{}{}",
        script.display(),
        String::from_utf8_lossy(&built.stdout),
        String::from_utf8_lossy(&built.stderr)
    );
    out
}

/// What a TLS test broker needs: its CA, certificate and key, the ACL file and the identity
/// plugin.
#[derive(Debug, Clone)]
pub(crate) struct BrokerTls {
    ca_file: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    acl_file: PathBuf,
    plugin: PathBuf,
}

impl BrokerTls {
    /// The Mosquitto config of a mutual-TLS listener on `127.0.0.1:port` with the Ember ACL
    /// and the identity plugin (no `use_identity_as_username`: with it Mosquitto never calls
    /// the plugin, which sets the user name itself). No fleet client-id prefix: test fleet
    /// clients have assorted ids.
    pub(crate) fn config(&self, port: u16, log: &Path) -> String {
        // Run as root, Mosquitto switches to the `mosquitto` user before it reads the TLS
        // files, which then live in a temp dir only the test's user can read: stay as root.
        let user = if is_root() { "user root\n" } else { "" };
        format!(
            "# Generated by ember-testkit (mutual TLS).\n\
             {user}\
             per_listener_settings false\n\
             listener {port} 127.0.0.1\n\
             cafile {}\n\
             certfile {}\n\
             keyfile {}\n\
             require_certificate true\n\
             allow_anonymous false\n\
             acl_file {}\n\
             plugin {}\n\
             plugin_opt_fleet_identity {FLEET_IDENTITY}\n\
             persistence false\n\
             max_queued_messages 0\n\
             max_queued_bytes 0\n\
             max_inflight_messages 100\n\
             set_tcp_nodelay true\n\
             log_dest file {}\n\
             log_type error\n\
             log_type warning\n\
             log_type notice\n\
             log_type subscribe\n\
             connection_messages true\n\
             log_timestamp_format %H:%M:%S\n",
            self.ca_file.display(),
            self.cert.display(),
            self.key.display(),
            self.acl_file.display(),
            self.plugin.display(),
            log.display()
        )
    }
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

impl TestBroker {
    /// Starts a Mosquitto that only accepts clients with a certificate from `pki`, takes the
    /// user name from the certificate's common name, refuses a device whose client id is not
    /// that name, and applies the Ember per-device ACL.
    pub fn start_tls(pki: &TestPki) -> TestBroker {
        let server = pki.server();
        let acl_file = pki.dir().join("acl");
        write_file(
            &acl_file,
            &ember_proto::acl::mosquitto_acl(FLEET_IDENTITY),
            0o644,
        );
        TestBroker::start_with(Some(BrokerTls {
            ca_file: pki.ca_file().to_path_buf(),
            cert: server.cert,
            key: server.key,
            acl_file,
            plugin: identity_plugin(),
        }))
    }
}

impl crate::TestAgentBuilder {
    /// `[mqtt.tls]` with `ca_file` and the client certificate `client` (mutual TLS).
    pub fn tls(self, ca_file: &Path, client: &CertFiles) -> Self {
        self.set("mqtt.tls", "ca_file", &toml_path(ca_file))
            .set("mqtt.tls", "cert_file", &toml_path(&client.cert))
            .set("mqtt.tls", "key_file", &toml_path(&client.key))
    }
}

/// A path as a TOML literal string (test paths hold no `'`).
fn toml_path(p: &Path) -> String {
    format!("'{}'", p.display())
}
