//! TLS files as both binaries and the CLIs read them: PEM certificates and keys, the key-file
//! permission check, the rustls crypto provider (ring, always explicit), a root store from a CA
//! file, and certificate validity through `x509-parser`.
//!
//! **Invariant:** no error built here quotes a key file's content; errors name the path and the
//! fix.

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Whether `host` names this machine (`localhost`, `127.0.0.0/8`, `::1`, bracketed or not).
pub fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

/// Refuses a private key file that group or others may read or write.
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

/// The PEM certificates of a file (at least one).
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    certs_from_pem(&bytes).map_err(|m| format!("{} {m}", path.display()))
}

/// The PEM certificates in `pem` (at least one); the error completes "<file> ...".
pub fn certs_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|_| "is not a PEM certificate file".to_string())?;
    if certs.is_empty() {
        return Err("holds no PEM certificate".into());
    }
    Ok(certs)
}

/// Reads a PEM private key (PKCS#8, SEC1 or PKCS#1); the error never quotes the file.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|_| {
        format!(
            "{} holds no PEM private key (PKCS#8, SEC1 or PKCS#1)",
            path.display()
        )
    })
}

/// The rustls crypto provider every Ember TLS config is built with (ring: it cross-compiles
/// with Debian's gcc toolchains, where aws-lc-rs needs cmake and clang).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A root store holding every certificate of a PEM CA file.
pub fn root_store(ca_file: &Path) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(ca_file)? {
        roots.add(cert).map_err(|e| {
            format!(
                "{} holds an unusable CA certificate: {e}",
                ca_file.display()
            )
        })?;
    }
    Ok(roots)
}

/// The rule both programs apply to `[mqtt.tls]` and `mqtt.insecure` for a broker on `host`:
/// plaintext only to this machine unless `insecure` (development), and never `insecure`
/// together with TLS. The error is the config key and what to do.
pub fn check_mqtt_transport(
    tls: bool,
    insecure: bool,
    host: &str,
) -> Result<(), (&'static str, String)> {
    match (tls, insecure) {
        (false, false) if !is_loopback(host) => Err((
            "mqtt.tls",
            format!(
                "missing: the broker {host:?} is not on this machine, so the connection must use TLS: \
                 add [mqtt.tls] with ca_file, cert_file and key_file (or, for development only, set mqtt.insecure = true)"
            ),
        )),
        (true, true) => Err((
            "mqtt.insecure",
            "cannot be true together with [mqtt.tls]: remove one of them".into(),
        )),
        _ => Ok(()),
    }
}

/// `mqtt.tls.ca_file`: present and holding PEM certificates; the path and the certificates.
pub fn mqtt_ca_file(
    ca_file: Option<PathBuf>,
) -> Result<(PathBuf, Vec<CertificateDer<'static>>), (&'static str, String)> {
    let ca_file = ca_file.ok_or((
        "mqtt.tls.ca_file",
        "missing: name the PEM file of the CA that signed the broker's certificate".to_string(),
    ))?;
    let certs = read_certs(&ca_file).map_err(|m| ("mqtt.tls.ca_file", m))?;
    Ok((ca_file, certs))
}

/// The end of a certificate's validity, in seconds since the Unix epoch; `None` when the DER is
/// not an X.509 certificate.
pub fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(parsed.validity().not_after.timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for h in [
            "localhost",
            "LOCALHOST",
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "[::1]",
        ] {
            assert!(is_loopback(h), "{h}");
        }
        for h in ["example.com", "10.0.0.1", "::2", "[fe80::1]", ""] {
            assert!(!is_loopback(h), "{h}");
        }
    }

    #[test]
    fn mqtt_transport_rule() {
        assert!(check_mqtt_transport(false, false, "127.0.0.1").is_ok());
        assert!(check_mqtt_transport(false, true, "broker.example").is_ok());
        assert!(check_mqtt_transport(true, false, "broker.example").is_ok());
        let (key, m) = check_mqtt_transport(false, false, "broker.example").unwrap_err();
        assert_eq!(key, "mqtt.tls");
        assert!(
            m.contains("must use TLS") && m.contains("mqtt.insecure = true"),
            "{m}"
        );
        assert_eq!(
            check_mqtt_transport(true, true, "h").unwrap_err().0,
            "mqtt.insecure"
        );
        assert_eq!(mqtt_ca_file(None).unwrap_err().0, "mqtt.tls.ca_file");
    }

    #[test]
    fn key_permissions_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k.pem");
        std::fs::write(&key, "x").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = check_key_permissions(&key).unwrap_err();
        assert!(e.contains("chmod 600") && e.contains("0644"), "{e}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        check_key_permissions(&key).unwrap();
        assert!(check_key_permissions(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn pem_files_and_validity() {
        let dir = tempfile::tempdir().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["ember.test".into()]).unwrap();
        params.not_after = rcgen::date_time_ymd(2031, 5, 17);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let cert_path = dir.path().join("c.pem");
        let key_path = dir.path().join("k.pem");
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        let certs = read_certs(&cert_path).unwrap();
        assert_eq!(certs.len(), 1);
        // 2031-05-17T00:00:00Z
        assert_eq!(not_after(&certs[0]), Some(1_936_742_400));
        read_key(&key_path).unwrap();
        assert_eq!(root_store(&cert_path).unwrap().len(), 1);
        // A key file is not a certificate file, and the error does not quote it.
        let e = read_certs(&key_path).unwrap_err();
        assert!(
            e.contains("holds no PEM certificate") && !e.contains("BEGIN"),
            "{e}"
        );
        let e = read_key(&cert_path).unwrap_err();
        assert!(e.contains("holds no PEM private key"), "{e}");
        assert_eq!(not_after(&CertificateDer::from(vec![0x30, 0x00])), None);
    }
}
