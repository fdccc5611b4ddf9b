//! `ember-fleet pki`: a small certificate authority for a fleet, on files (rcgen, ring).
//!
//! # Layout of a PKI directory
//!
//! ```text
//! <dir>/ca.pem  ca.key            the CA (keep ca.key offline in production)
//! <dir>/server.pem  server.key    the broker's certificate (SANs: localhost, 127.0.0.1, ::1, --name ...)
//! <dir>/fleet.pem  fleet.key      the fleet service's MQTT client certificate (CN ember:fleet)
//! <dir>/devices/<id>.pem [.key]   device certificates (CN = device id); .key only when issued here
//! <dir>/mosquitto.conf  acl       a mutual-TLS Mosquitto listener with the per-device ACL
//! ```
//!
//! # Guarantees
//!
//! * Private keys are written with mode 0600, through a temporary file and a rename, and a
//!   key is never overwritten except by `device-cert --rotate` (which replaces key and
//!   certificate of that one device).
//! * A device certificate's common name is a valid device id (`ember_proto::check_name`), so
//!   it can never be the fleet identity (which contains `:`) nor carry MQTT wildcards.
//! * `sign-csr` takes only the public key and the common name from a request (after checking
//!   its signature); every other attribute (CA flag, key usages, names, validity) is set here,
//!   so a request cannot ask for more than a device certificate.
//! * Every certificate gets a random 128-bit serial number.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Subcommand;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

use ember_proto::acl::{FLEET_IDENTITY, check_fleet_identity, mosquitto_acl};

/// Mode of every private key file written here.
pub const KEY_MODE: u32 = 0o600;
pub const DEFAULT_CA_DAYS: i64 = 3650;
pub const DEFAULT_SERVER_DAYS: i64 = 825;
pub const DEFAULT_CLIENT_DAYS: i64 = 365;
pub const DEFAULT_MQTTS_PORT: u16 = 8883;

#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Create a CA (ca.pem, ca.key) in DIR.
    InitCa {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "Ember fleet CA")]
        cn: String,
        #[arg(long, default_value_t = DEFAULT_CA_DAYS)]
        days: i64,
    },
    /// Issue the broker's certificate (server.pem, server.key): SANs localhost, 127.0.0.1, ::1
    /// and every --name.
    ServerCert {
        #[arg(long)]
        dir: PathBuf,
        /// Extra DNS names or IP addresses the broker is reached by.
        #[arg(long = "name")]
        names: Vec<String>,
        #[arg(long, default_value_t = DEFAULT_SERVER_DAYS)]
        days: i64,
    },
    /// Issue the fleet service's MQTT client certificate (fleet.pem, fleet.key).
    ClientCert {
        #[arg(long)]
        dir: PathBuf,
        /// Its common name = MQTT user name; must contain ':' (never a device id).
        #[arg(long, default_value = FLEET_IDENTITY)]
        cn: String,
        #[arg(long, default_value_t = DEFAULT_CLIENT_DAYS)]
        days: i64,
    },
    /// Issue a key and certificate for a device (devices/<id>.pem, .key). Prefer `sign-csr`:
    /// then the key is generated on the device and never leaves it.
    DeviceCert {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        device_id: String,
        #[arg(long, default_value_t = DEFAULT_CLIENT_DAYS)]
        days: i64,
        /// Replace an existing key and certificate of this device (rotation).
        #[arg(long)]
        rotate: bool,
    },
    /// Sign a device's certificate request (from `ember-agent csr`); its common name must be a
    /// valid device id. Writes devices/<id>.pem (or --out) and prints the path.
    SignCsr {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        csr: PathBuf,
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, default_value_t = DEFAULT_CLIENT_DAYS)]
        days: i64,
    },
    /// Write mosquitto.conf and acl for a mutual-TLS broker using DIR's certificates.
    MosquittoConf {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = DEFAULT_MQTTS_PORT)]
        port: u16,
        /// Address of the TLS listener.
        #[arg(long, default_value = "127.0.0.1")]
        bind: String,
        /// The fleet's identity (its client certificate's common name).
        #[arg(long, default_value = FLEET_IDENTITY)]
        fleet_cn: String,
        /// DEVELOPMENT ONLY: also a plaintext, anonymous, unrestricted listener on
        /// 127.0.0.1:PORT.
        #[arg(long, value_name = "PORT")]
        insecure_dev_port: Option<u16>,
    },
}

/// Runs one `pki` command; returns what to print on stdout.
pub fn run(cmd: PkiCommand) -> anyhow::Result<String> {
    match cmd {
        PkiCommand::InitCa { dir, cn, days } => {
            init_ca(&dir, &cn, days)?;
            Ok(format!("{}\n", dir.join("ca.pem").display()))
        }
        PkiCommand::ServerCert { dir, names, days } => {
            let ca = Ca::load(&dir)?;
            let (cert, key) = ca.issue_server(&names, days)?;
            write_cert(&dir.join("server.pem"), &cert)?;
            write_key(&dir.join("server.key"), &key, false)?;
            Ok(format!("{}\n", dir.join("server.pem").display()))
        }
        PkiCommand::ClientCert { dir, cn, days } => {
            check_fleet_identity(&cn).map_err(|why| anyhow::anyhow!("--cn {cn:?}: {why}"))?;
            let ca = Ca::load(&dir)?;
            let key = KeyPair::generate()?;
            let cert = ca.issue_client(&cn, &key, days)?;
            write_key(&dir.join("fleet.key"), &key.serialize_pem(), false)?;
            write_cert(&dir.join("fleet.pem"), &cert)?;
            Ok(format!("{}\n", dir.join("fleet.pem").display()))
        }
        PkiCommand::DeviceCert {
            dir,
            device_id,
            days,
            rotate,
        } => {
            check_device_id(&device_id)?;
            let ca = Ca::load(&dir)?;
            let devices = dir.join("devices");
            fs::create_dir_all(&devices)
                .with_context(|| format!("cannot create {}", devices.display()))?;
            let key_path = devices.join(format!("{device_id}.key"));
            let cert_path = devices.join(format!("{device_id}.pem"));
            if !rotate && (key_path.exists() || cert_path.exists()) {
                bail!(
                    "{device_id} already has a certificate in {}: pass --rotate to issue a new key and certificate",
                    devices.display()
                );
            }
            let key = KeyPair::generate()?;
            let cert = ca.issue_client(&device_id, &key, days)?;
            write_key(&key_path, &key.serialize_pem(), rotate)?;
            write_cert(&cert_path, &cert)?;
            Ok(format!("{}\n", cert_path.display()))
        }
        PkiCommand::SignCsr {
            dir,
            csr,
            out,
            days,
        } => {
            let ca = Ca::load(&dir)?;
            let pem = fs::read_to_string(&csr)
                .with_context(|| format!("cannot read {}", csr.display()))?;
            let (device_id, cert) = ca.sign_csr(&pem, days)?;
            let out = match out {
                Some(o) => o,
                None => {
                    let devices = dir.join("devices");
                    fs::create_dir_all(&devices)
                        .with_context(|| format!("cannot create {}", devices.display()))?;
                    devices.join(format!("{device_id}.pem"))
                }
            };
            write_cert(&out, &cert)?;
            Ok(format!("{}\n", out.display()))
        }
        PkiCommand::MosquittoConf {
            dir,
            port,
            bind,
            fleet_cn,
            insecure_dev_port,
        } => {
            check_fleet_identity(&fleet_cn)
                .map_err(|why| anyhow::anyhow!("--fleet-cn {fleet_cn:?}: {why}"))?;
            let dir =
                fs::canonicalize(&dir).with_context(|| format!("cannot find {}", dir.display()))?;
            let acl = dir.join("acl");
            write_cert(&acl, &mosquitto_acl(&fleet_cn))?;
            let conf = dir.join("mosquitto.conf");
            write_cert(
                &conf,
                &mosquitto_conf(&dir, &bind, port, &acl, insecure_dev_port),
            )?;
            Ok(format!("{}\n", conf.display()))
        }
    }
}

/// Refuses anything but a valid device id as a device certificate's common name.
pub fn check_device_id(id: &str) -> anyhow::Result<()> {
    ember_proto::check_name(id).map_err(|why| {
        anyhow::anyhow!("{id:?} is not a device id: {why} (use 1-64 of A-Z a-z 0-9 - _ .)")
    })
}

/// A Mosquitto configuration: a mutual-TLS listener on `bind:port` that takes the user name
/// from the client certificate and applies `acl`; with `insecure_dev_port`, also a plaintext,
/// anonymous listener on 127.0.0.1 for development.
pub fn mosquitto_conf(
    dir: &Path,
    bind: &str,
    port: u16,
    acl: &Path,
    insecure_dev_port: Option<u16>,
) -> String {
    let mut out = format!(
        "# Generated by `ember-fleet pki mosquitto-conf` (see docs/security.md).\n\
         per_listener_settings true\n\
         persistence false\n\n\
         # Mutual TLS: a certificate from this CA is required; its common name is the user name.\n\
         listener {port} {bind}\n\
         cafile {ca}\n\
         certfile {cert}\n\
         keyfile {key}\n\
         require_certificate true\n\
         use_identity_as_username true\n\
         tls_version tlsv1.2\n\
         allow_anonymous false\n\
         acl_file {acl}\n",
        ca = dir.join("ca.pem").display(),
        cert = dir.join("server.pem").display(),
        key = dir.join("server.key").display(),
        acl = acl.display(),
    );
    if let Some(dev) = insecure_dev_port {
        out.push_str(&format!(
            "\n# INSECURE, development only: plaintext, anonymous, no ACL, loopback only.\n\
             listener {dev} 127.0.0.1\n\
             allow_anonymous true\n"
        ));
    }
    out
}

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn validity(params: &mut CertificateParams, days: i64) -> anyhow::Result<()> {
    if !(1..=36_500).contains(&days) {
        bail!("--days {days} is out of range: use 1-36500");
    }
    let at = |s: i64| time::OffsetDateTime::from_unix_timestamp(s).context("time out of range");
    // An hour of slack for devices whose clock runs a little behind.
    params.not_before = at(now_s() - 3600)?;
    params.not_after = at(now_s() + days * 86_400)?;
    Ok(())
}

fn random_serial() -> anyhow::Result<SerialNumber> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    b[0] &= 0x7f; // positive
    Ok(SerialNumber::from_slice(&b))
}

/// Creates the CA in `dir` (refuses to replace one).
pub fn init_ca(dir: &Path, cn: &str, days: i64) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(random_serial()?);
    validity(&mut params, days)?;
    let cert = params.self_signed(&key)?;
    write_key(&dir.join("ca.key"), &key.serialize_pem(), false)?;
    write_cert(&dir.join("ca.pem"), &cert.pem())?;
    Ok(())
}

/// A CA loaded from a PKI directory.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    pub fn load(dir: &Path) -> anyhow::Result<Ca> {
        let cert = fs::read_to_string(dir.join("ca.pem")).with_context(|| {
            format!(
                "cannot read {}/ca.pem (run `ember-fleet pki init-ca --dir {}` first)",
                dir.display(),
                dir.display()
            )
        })?;
        let key_path = dir.join("ca.key");
        let key = fs::read_to_string(&key_path)
            .with_context(|| format!("cannot read {}", key_path.display()))?;
        let key = KeyPair::from_pem(&key)
            .map_err(|_| anyhow::anyhow!("{} holds no usable key", key_path.display()))?;
        let issuer = Issuer::from_ca_cert_pem(&cert, key)
            .map_err(|e| anyhow::anyhow!("{}/ca.pem is not usable: {e}", dir.display()))?;
        Ok(Ca { issuer })
    }

    /// A broker certificate: (certificate PEM, key PEM).
    pub fn issue_server(&self, names: &[String], days: i64) -> anyhow::Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let cn = names.first().map(String::as_str).unwrap_or("localhost");
        params.distinguished_name.push(DnType::CommonName, cn);
        let mut sans = vec![
            SanType::DnsName("localhost".try_into()?),
            SanType::IpAddress([127, 0, 0, 1].into()),
            SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()),
        ];
        for n in names {
            sans.push(match n.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    n.as_str()
                        .try_into()
                        .map_err(|_| anyhow::anyhow!("--name {n:?} is not a DNS name"))?,
                ),
            });
        }
        params.subject_alt_names = sans;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.serial_number = Some(random_serial()?);
        validity(&mut params, days)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A client certificate for `cn` over `key`'s public key.
    pub fn issue_client(
        &self,
        cn: &str,
        key: &impl rcgen::PublicKeyData,
        days: i64,
    ) -> anyhow::Result<String> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = Some(random_serial()?);
        validity(&mut params, days)?;
        Ok(params.signed_by(key, &self.issuer)?.pem())
    }

    /// Signs a device's CSR: (device id, certificate PEM).
    pub fn sign_csr(&self, csr_pem: &str, days: i64) -> anyhow::Result<(String, String)> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| anyhow::anyhow!("not a valid certificate signing request: {e}"))?;
        let cn = match csr.params.distinguished_name.get(&DnType::CommonName) {
            Some(DnValue::Utf8String(s)) => s.clone(),
            Some(DnValue::PrintableString(s)) => s.as_str().to_string(),
            Some(_) => bail!("the request's common name is not a UTF-8 or printable string"),
            None => bail!("the request has no common name: it must be the device id"),
        };
        check_device_id(&cn)?;
        let cert = self.issue_client(&cn, &csr.public_key, days)?;
        Ok((cn, cert))
    }
}

/// Writes a certificate or config (mode 0644) through a temp file and a rename.
fn write_cert(path: &Path, text: &str) -> anyhow::Result<()> {
    write_atomic(path, text, 0o644, true)
}

/// Writes a private key (mode 0600); `replace` allows replacing an existing key.
fn write_key(path: &Path, text: &str, replace: bool) -> anyhow::Result<()> {
    write_atomic(path, text, KEY_MODE, replace)
}

/// Through `ember_host::fs::Durable`: the mode is set when the file is created, and without
/// `replace` an existing file is never overwritten (the final step fails instead).
fn write_atomic(path: &Path, text: &str, mode: u32, replace: bool) -> anyhow::Result<()> {
    let durable = ember_host::fs::Durable::new().mode(mode);
    let durable = if replace {
        durable
    } else {
        durable.create_new()
    };
    match durable.write(path, text.as_bytes()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => bail!(
            "{} exists and is never overwritten: move it away first",
            path.display()
        ),
        Err(e) => Err(e).with_context(|| format!("cannot write {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn pki_commands_write_keys_0600_and_check_names() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().to_path_buf();
        run(PkiCommand::InitCa {
            dir: dir.clone(),
            cn: "t".into(),
            days: 10,
        })
        .unwrap();
        assert_eq!(mode(&dir.join("ca.key")), 0o600);
        assert!(init_ca(&dir, "t", 10).is_err(), "a CA is never replaced");
        run(PkiCommand::ServerCert {
            dir: dir.clone(),
            names: vec!["broker.example".into(), "10.0.0.5".into()],
            days: 10,
        })
        .unwrap();
        assert_eq!(mode(&dir.join("server.key")), 0o600);
        assert!(
            run(PkiCommand::ClientCert {
                dir: dir.clone(),
                cn: "dev-1".into(),
                days: 10
            })
            .is_err(),
            "the fleet identity must not be a device id"
        );
        run(PkiCommand::ClientCert {
            dir: dir.clone(),
            cn: FLEET_IDENTITY.into(),
            days: 10,
        })
        .unwrap();
        assert_eq!(mode(&dir.join("fleet.key")), 0o600);
        let dev = |id: &str, rotate| PkiCommand::DeviceCert {
            dir: dir.clone(),
            device_id: id.into(),
            days: 10,
            rotate,
        };
        run(dev("dev-1", false)).unwrap();
        assert_eq!(mode(&dir.join("devices/dev-1.key")), 0o600);
        let first = fs::read_to_string(dir.join("devices/dev-1.pem")).unwrap();
        assert!(run(dev("dev-1", false)).is_err(), "no silent re-issue");
        run(dev("dev-1", true)).unwrap();
        assert_ne!(
            fs::read_to_string(dir.join("devices/dev-1.pem")).unwrap(),
            first
        );
        assert!(run(dev("a/b", false)).is_err());
        assert!(run(dev("ember:fleet", false)).is_err());
    }

    #[test]
    fn sign_csr_takes_only_key_and_device_id() {
        let d = tempfile::tempdir().unwrap();
        init_ca(d.path(), "t", 10).unwrap();
        let ca = Ca::load(d.path()).unwrap();
        let csr_for = |cn: &str, ca_flag: bool| {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
            p.distinguished_name.push(DnType::CommonName, cn);
            if ca_flag {
                p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            }
            p.serialize_request(&key).unwrap().pem().unwrap()
        };
        let (id, cert) = ca.sign_csr(&csr_for("dev-7", false), 30).unwrap();
        assert_eq!(id, "dev-7");
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
        for bad in ["ember:fleet", "a+b", "x/#"] {
            assert!(ca.sign_csr(&csr_for(bad, false), 30).is_err(), "{bad}");
        }
        // A request asking to be a CA gets an ordinary device certificate (or is refused).
        if let Ok((_, cert)) = ca.sign_csr(&csr_for("dev-8", true), 30) {
            use rustls::pki_types::pem::PemObject;
            let der = rustls::pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
            let der = der.as_ref();
            // No basicConstraints extension (OID 2.5.29.19) at all, and no requested name.
            let basic_constraints = [0x06, 0x03, 0x55, 0x1d, 0x13];
            assert!(!der.windows(5).any(|w| w == basic_constraints));
            assert!(!der.windows(12).any(|w| w == b"evil.example"));
        }
        assert!(ca.sign_csr("not a csr", 30).is_err());
    }

    #[test]
    fn mosquitto_conf_requires_certificates() {
        let conf = mosquitto_conf(Path::new("/p"), "0.0.0.0", 8883, Path::new("/p/acl"), None);
        assert!(conf.contains("listener 8883 0.0.0.0\n"));
        assert!(conf.contains("require_certificate true\nuse_identity_as_username true\n"));
        assert!(conf.contains("allow_anonymous false\nacl_file /p/acl\n"));
        assert!(!conf.contains("allow_anonymous true"));
        let dev = mosquitto_conf(
            Path::new("/p"),
            "0.0.0.0",
            8883,
            Path::new("/p/acl"),
            Some(1883),
        );
        assert!(dev.contains("listener 1883 127.0.0.1\nallow_anonymous true\n"));
    }
}
