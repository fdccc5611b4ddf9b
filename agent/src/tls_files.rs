//! TLS files on this host: whether a host is this machine, private-key permissions, PEM
//! certificates and key pairs, the rustls crypto provider, and a certificate's expiry.
//!
//! The lowest layer of the agent (see the layer table in `lib.rs`): `config` uses it to refuse
//! unusable `[mqtt.tls]` files before anything starts, `tls` to load them at each handshake.
//! It imports nothing from the crate. Errors are plain sentences (the caller names the config
//! key), and never quote a key file's contents.

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

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

/// The certificates of a PEM file (at least one).
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
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
pub fn load_pair(
    cert: &Path,
    key: &Path,
) -> Result<(Arc<CertifiedKey>, i64), (&'static str, String)> {
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

/// The crypto provider every rustls configuration of the agent uses (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
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
    fn loopback_hosts() {
        assert!(is_loopback("127.0.0.1") && is_loopback("::1") && is_loopback("[::1]"));
        assert!(is_loopback("localhost") && !is_loopback("broker.example"));
    }
}
