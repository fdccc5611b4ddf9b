//! TLS files on this host, for the agent: the generic parts come from `ember_host::tls`
//! (loopback, key permissions, PEM certificates, the ring provider, certificate validity through
//! x509-parser); [`load_pair`] builds the signing key of `[mqtt.tls]` and names the config key
//! in its errors.
//!
//! The lowest layer of the agent (see the layer table in `lib.rs`): `config` uses it to refuse
//! unusable `[mqtt.tls]` files before anything starts, `tls` to load them at each handshake.
//! It imports nothing from the crate. Errors are plain sentences (the caller names the config
//! key), and never quote a key file's contents.

use std::path::Path;
use std::sync::Arc;

use rustls::sign::CertifiedKey;

pub use ember_host::tls::{
    check_key_permissions, check_mqtt_transport, is_loopback, mqtt_ca_file, not_after, provider,
    read_certs,
};

/// Loads a certificate chain and its key, and the chain's `not_after` (Unix seconds). Errors
/// name the config key and never quote the file.
pub fn load_pair(
    cert: &Path,
    key: &Path,
) -> Result<(Arc<CertifiedKey>, i64), (&'static str, String)> {
    let chain = read_certs(cert).map_err(|m| ("mqtt.tls.cert_file", m))?;
    let der = ember_host::tls::read_key(key).map_err(|m| ("mqtt.tls.key_file", m))?;
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

/// The operating system's CA store (`mqtt.tls.system_roots`; on Debian
/// `/etc/ssl/certs`, from the `ca-certificates` package), through rustls-native-certs.
/// `SSL_CERT_FILE` / `SSL_CERT_DIR` point it elsewhere, as for OpenSSL.
pub fn system_roots() -> Result<rustls::RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default();
        return Err(format!(
            "the system's CA store holds no usable certificate{why}: install ca-certificates, or give the broker's CA in ca_file instead"
        ));
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pair_loads_and_a_mismatched_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["d1".to_string()]).unwrap();
        p.not_after = rcgen::date_time_ymd(2031, 5, 17);
        let cert = p.self_signed(&key).unwrap();
        let (c, k, other) = (
            dir.path().join("c.pem"),
            dir.path().join("k.pem"),
            dir.path().join("o.pem"),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        std::fs::write(&other, rcgen::KeyPair::generate().unwrap().serialize_pem()).unwrap();
        let (_, not_after) = load_pair(&c, &k).unwrap();
        assert_eq!(not_after, 1_936_742_400); // 2031-05-17T00:00:00Z
        let (key_name, message) = load_pair(&c, &other).err().unwrap();
        assert_eq!(key_name, "mqtt.tls.key_file");
        assert!(message.contains("is not the private key of"), "{message}");
    }
}
