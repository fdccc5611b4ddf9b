//! Azure shared access signatures (SAS), as IoT Hub and Event Hubs accept them: a device's
//! MQTT password (the agent's `azure-iot-hub` profile), the fleet's `Authorization` header on
//! IoT Hub's service REST API and its CBS put-token on the Event Hubs endpoint.
//!
//! ```text
//! SharedAccessSignature sr={enc(uri)}&sig={enc(base64(HMAC-SHA256(key, enc(uri) + "\n" + se)))}&se={se}[&skn={enc(policy)}]
//! ```
//!
//! `enc` is percent-encoding of everything but RFC 3986's unreserved characters
//! (`A-Z a-z 0-9 - _ . ~`), with upper-case hex; `key` is the base64 key of a device or a
//! shared access policy, decoded; `se` is the expiry in seconds since the Unix epoch.
//!
//! **Invariant:** no error built here quotes the key; errors say which input to fix.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// Why a token cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SasError {
    #[error(
        "the shared access key is not base64 ({0}): use the device's or the policy's primary key as Azure shows it (e.g. `az iot hub device-identity show` or `az iot hub policy show`)"
    )]
    KeyNotBase64(String),
    #[error("the shared access key is empty: set the device's or the policy's primary key")]
    EmptyKey,
    #[error(
        "the resource URI is empty: name the hub, e.g. `myhub.azure-devices.net/devices/dev-1`"
    )]
    EmptyResource,
}

/// A decoded shared access key (a device's symmetric key or a policy's key).
#[derive(Clone)]
pub struct SasKey {
    key: Vec<u8>,
}

impl std::fmt::Debug for SasKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SasKey(..)")
    }
}

impl SasKey {
    /// Decodes `key` as Azure shows it (standard base64, padded); surrounding whitespace (a
    /// key file's newline) is ignored.
    pub fn from_base64(key: &str) -> Result<SasKey, SasError> {
        let key = key.trim();
        if key.is_empty() {
            return Err(SasError::EmptyKey);
        }
        let key = B64
            .decode(key)
            .map_err(|e| SasError::KeyNotBase64(e.to_string()))?;
        if key.is_empty() {
            return Err(SasError::EmptyKey);
        }
        Ok(SasKey { key })
    }

    /// The token for `resource_uri` (e.g. `myhub.azure-devices.net/devices/dev-1`, or the
    /// hub's host name for a service policy), valid until `expiry` (Unix seconds), naming
    /// `policy` (`skn`) when the key is a shared access policy's.
    pub fn token(
        &self,
        resource_uri: &str,
        expiry: u64,
        policy: Option<&str>,
    ) -> Result<String, SasError> {
        if resource_uri.is_empty() {
            return Err(SasError::EmptyResource);
        }
        let sr = url_encode(resource_uri);
        let mut mac =
            <Hmac<Sha256> as KeyInit>::new_from_slice(&self.key).map_err(|_| SasError::EmptyKey)?;
        mac.update(format!("{sr}\n{expiry}").as_bytes());
        let sig = B64.encode(mac.finalize().into_bytes());
        let mut token = format!(
            "SharedAccessSignature sr={sr}&sig={}&se={expiry}",
            url_encode(&sig)
        );
        if let Some(p) = policy.filter(|p| !p.is_empty()) {
            token.push_str("&skn=");
            token.push_str(&url_encode(p));
        }
        Ok(token)
    }
}

/// A token valid for `ttl_s` seconds from `now_unix_s`, and its expiry (renew before it).
pub fn token_for(
    resource_uri: &str,
    key: &str,
    policy: Option<&str>,
    now_unix_s: u64,
    ttl_s: u64,
) -> Result<(String, u64), SasError> {
    let expiry = now_unix_s.saturating_add(ttl_s);
    let token = SasKey::from_base64(key)?.token(resource_uri, expiry, policy)?;
    Ok((token, expiry))
}

/// Percent-encodes all but RFC 3986's unreserved characters, upper-case hex.
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn b64(s: &[u8]) -> String {
        B64.encode(s)
    }

    /// Microsoft's own test vector: Azure/azure-iot-sdk-node, `common/core/test/
    /// _shared_access_signature_test.js` ("does not include the skn segment if the skn property
    /// wasn't defined"): key base64("password"), resource `uri`, expiry 12345.
    #[test]
    fn matches_the_azure_iot_sdk_vector_exactly() {
        let key = SasKey::from_base64(&b64(b"password")).expect("key");
        assert_eq!(
            key.token("uri", 12345, None).expect("token"),
            "SharedAccessSignature sr=uri&sig=kcWxXAK2OAaAoq2oCkaGzX2NMqDB8nCyNuq2fPYCDhk%3D&se=12345"
        );
    }

    /// The same file's vector with a key name `encode('Me')`: the same signature, the name
    /// percent-encoded as `encode%28%27Me%27%29` (that SDK puts `skn` before `se`; the order
    /// of the fields is free, IoT Hub's docs put `skn` last).
    #[test]
    fn the_policy_name_is_encoded_like_the_sdk_does() {
        let key = SasKey::from_base64(&b64(b"password")).expect("key");
        assert_eq!(
            key.token("uri", 12345, Some("encode('Me')"))
                .expect("token"),
            "SharedAccessSignature sr=uri&sig=kcWxXAK2OAaAoq2oCkaGzX2NMqDB8nCyNuq2fPYCDhk%3D&se=12345&skn=encode%28%27Me%27%29"
        );
    }

    #[test]
    fn a_device_uri_is_encoded_before_it_is_signed() {
        let (t, se) = token_for(
            "myhub.azure-devices.net/devices/dev 1",
            &b64(b"k"),
            None,
            1000,
            3600,
        )
        .expect("token");
        assert_eq!(se, 4600);
        assert!(
            t.starts_with(
                "SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices%2Fdev%201&sig="
            ),
            "{t}"
        );
        // The signed string is the encoded URI: recompute it independently.
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(b"k").expect("mac");
        mac.update(b"myhub.azure-devices.net%2Fdevices%2Fdev%201\n4600");
        let sig = url_encode(&B64.encode(mac.finalize().into_bytes()));
        assert!(t.contains(&format!("&sig={sig}&se=4600")), "{t}");
    }

    #[test]
    fn bad_keys_and_resources_are_refused_with_what_to_fix() {
        let e = SasKey::from_base64("not base64!").expect_err("refused");
        assert!(matches!(e, SasError::KeyNotBase64(_)));
        assert!(e.to_string().contains("not base64"), "{e}");
        assert_eq!(
            SasKey::from_base64("  \n").expect_err("empty"),
            SasError::EmptyKey
        );
        assert_eq!(
            SasKey::from_base64("").expect_err("empty"),
            SasError::EmptyKey
        );
        let key = SasKey::from_base64(&format!("{}\n", b64(b"k"))).expect("newline ignored");
        assert_eq!(
            key.token("", 1, None).expect_err("no resource"),
            SasError::EmptyResource
        );
        assert_eq!(
            format!("{key:?}"),
            "SasKey(..)",
            "Debug never shows the key"
        );
    }

    proptest! {
        #[test]
        fn encoding_is_reversible_and_only_unreserved_stay(s in "\\PC{0,40}") {
            let e = url_encode(&s);
            prop_assert!(e.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.~%".contains(&b)));
            let mut back = Vec::new();
            let bytes = e.as_bytes();
            let mut i = 0;
            while i < bytes.len() {
                if bytes[i] == b'%' {
                    let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).expect("hex");
                    back.push(u8::from_str_radix(hex, 16).expect("hex"));
                    i += 3;
                } else {
                    back.push(bytes[i]);
                    i += 1;
                }
            }
            prop_assert_eq!(String::from_utf8(back).expect("utf8"), s);
        }

        #[test]
        fn tokens_have_the_documented_shape(
            key in proptest::collection::vec(any::<u8>(), 1..64),
            uri in "[a-z0-9.-]{1,20}/devices/[A-Za-z0-9:_-]{1,20}",
            expiry in 0u64..u64::MAX,
            policy in proptest::option::of("[a-z]{1,12}"),
        ) {
            let t = SasKey::from_base64(&B64.encode(&key)).expect("key")
                .token(&uri, expiry, policy.as_deref()).expect("token");
            let rest = t.strip_prefix("SharedAccessSignature ").expect("prefix");
            let fields: Vec<(&str, &str)> = rest.split('&')
                .map(|f| f.split_once('=').expect("name=value")).collect();
            let sr = url_encode(&uri);
            let se = expiry.to_string();
            prop_assert_eq!(fields[0], ("sr", sr.as_str()));
            prop_assert_eq!(fields[1].0, "sig");
            prop_assert_eq!(fields[2], ("se", se.as_str()));
            match &policy {
                Some(p) => prop_assert_eq!(fields[3], ("skn", p.as_str())),
                None => prop_assert_eq!(fields.len(), 3),
            }
            // The signature is 32 bytes of base64, percent-encoded: no raw '+', '/' or '='.
            prop_assert!(!fields[1].1.contains(['+', '/', '=']));
        }
    }
}
