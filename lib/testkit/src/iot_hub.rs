//! Test support, not Azure IoT Hub: a stand-in for IoT Hub's MQTT front door and its device
//! twin, for the agent's `azure-iot-hub` profile.
//!
//! * [`IotHubFront`] terminates TLS (server authentication; the SNI must be the hub's host
//!   name) and checks a device's CONNECT the way IoT Hub documents it: MQTT 3.1.1, client id =
//!   a registered device id, username `{hub}/{device}/?api-version=…`, and either a password
//!   that is a SAS token for `{hub}/devices/{device}` signed with that device's key and not
//!   expired, or (X.509) no password and a client certificate from the test CA whose common
//!   name is the device id. It closes the
//!   connection when the token expires (as IoT Hub does), and refuses what IoT Hub does not
//!   take from a device: a retained PUBLISH or Last Will (IoT Hub keeps nothing), a topic other
//!   than `devices/{device}/messages/events/…` and `$iothub/twin/…`, QoS 2, a message over
//!   256 KB. Then it relays bytes to a Mosquitto started by [`start_broker`]
//!   (`retain_available false`, the per-device topic ACL of [`acl`]).
//! * [`TwinResponder`] answers the documented twin request/response topics (`$iothub/twin/GET`,
//!   `PATCH/properties/reported`, with `$rid` and `$version`) and pushes desired-property
//!   patches (`$iothub/twin/PATCH/properties/desired/?$version=N`), keeping one twin.
//!
//! **Limits of the stand-in:** IoT Hub scopes `$iothub/twin/…` to each connection; through one
//! Mosquitto they are shared by every client, so a test runs one device against the twin
//! responder.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ember_host::sas::{SasKey, url_encode};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};

use crate::iot_core::{Packets, bind, common_name, relay, remaining_length, u16_at};
use crate::tls::TestPki;
use crate::{TestBroker, localhost, wait_until};

/// IoT Hub's largest device-to-cloud message.
pub const MAX_MESSAGE: usize = 256 * 1024;
/// The user the [`TwinResponder`] connects to the broker as (the ACL lets it serve every twin).
pub const TWIN_RESPONDER_USER: &str = "ember-twin-responder";

/// The broker's ACL: a device (its client id) publishes only to its events topic and the twin
/// requests, and reads only its cloud-to-device messages and the twin's answers; anonymous
/// test subscribers read the events; the twin responder serves `$iothub/#`.
pub fn acl() -> String {
    format!(
        "topic read devices/+/messages/events/#\n\
         pattern write devices/%c/messages/events/#\n\
         pattern read devices/%c/messages/devicebound/#\n\
         pattern read $iothub/twin/res/#\n\
         pattern read $iothub/twin/PATCH/properties/desired/#\n\
         pattern write $iothub/twin/GET/#\n\
         pattern write $iothub/twin/PATCH/properties/reported/#\n\
         user {TWIN_RESPONDER_USER}\n\
         topic readwrite $iothub/#\n"
    )
}

/// A Mosquitto configured like IoT Hub's MQTT side: nothing retained, QoS 1 at most, 256 KB
/// messages, the ACL of [`acl`] (written into `dir`, which must outlive the broker).
pub fn start_broker(dir: &Path) -> TestBroker {
    let acl_path = dir.join("iot-hub.acl");
    std::fs::write(&acl_path, acl()).expect("write the ACL");
    TestBroker::start_with_conf(&format!(
        "retain_available false\nmax_qos 1\nmax_packet_size {}\nmax_keepalive 1767\nacl_file {}\n",
        MAX_MESSAGE + 4096,
        acl_path.display()
    ))
}

/// One device connection the front let in.
#[derive(Debug, Clone)]
pub struct HubSession {
    pub device: String,
    pub username: String,
    /// The SAS token's expiry (Unix seconds); `u64::MAX` for an X.509 device.
    pub expiry: u64,
    pub keep_alive_s: u16,
    pub publishes: usize,
    pub opened: Instant,
    pub opened_unix: u64,
    pub closed: Option<Instant>,
    /// Why the front closed it (`None`: the device or the broker did).
    pub closed_by_front: Option<String>,
}

#[derive(Debug, Default)]
struct Log {
    sessions: Vec<HubSession>,
    refused: Vec<String>,
}

struct Shared {
    stop: AtomicBool,
    log: Mutex<Log>,
    hub: String,
    keys: BTreeMap<String, SasKey>,
    upstream: u16,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn refuse(&self, why: String) {
        self.lock().refused.push(why);
    }
}

/// The IoT Hub front door (see the module docs); stops when dropped.
pub struct IotHubFront {
    port: u16,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

impl IotHubFront {
    /// Serves `hub` (the SNI it demands; the test PKI's server certificate is for
    /// `localhost`) for `devices` (device id, base64 symmetric key), relaying to the broker on
    /// `upstream`.
    pub fn start(pki: &TestPki, hub: &str, devices: &[(&str, &str)], upstream: u16) -> IotHubFront {
        let server = pki.server();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(server.cert_pem.as_bytes())
                .map(|c| c.expect("a certificate PEM"))
                .collect();
        let key = PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes()).expect("a key PEM");
        // A client certificate is optional: X.509 devices show one from the test CA, SAS
        // devices none.
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(pki.ca_pem().as_bytes()) {
            roots.add(c.expect("a CA PEM")).expect("a usable CA");
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.into(),
            provider.clone(),
        )
        .allow_unauthenticated()
        .build()
        .expect("a client verifier");
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .expect("the server certificate");
        let config = Arc::new(config);
        let (listener, port) = bind();
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            log: Mutex::new(Log::default()),
            hub: hub.to_string(),
            keys: devices
                .iter()
                .map(|(d, k)| (d.to_string(), SasKey::from_base64(k).expect("a base64 key")))
                .collect(),
            upstream,
        });
        let s = shared.clone();
        let accept = std::thread::spawn(move || {
            while !s.stop.load(SeqCst) {
                match listener.accept() {
                    Ok((tcp, _)) => {
                        let (s, config) = (s.clone(), config.clone());
                        std::thread::spawn(move || serve(tcp, config, s));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        IotHubFront {
            port,
            shared,
            accept: Some(accept),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn sessions(&self) -> Vec<HubSession> {
        self.shared.lock().sessions.clone()
    }

    /// Why connections were refused or closed by the front, oldest first.
    pub fn refused(&self) -> Vec<String> {
        self.shared.lock().refused.clone()
    }
}

impl Drop for IotHubFront {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// What the front reads from CONNECT.
#[derive(Debug, Default, PartialEq, Eq)]
struct Connect {
    level: u8,
    keep_alive: u16,
    client_id: String,
    will_retain: bool,
    username: Option<String>,
    password: Option<String>,
}

fn string_at(p: &[u8], at: &mut usize) -> Option<String> {
    let len = u16_at(p, *at)? as usize;
    let s = p.get(*at + 2..*at + 2 + len)?;
    *at += 2 + len;
    String::from_utf8(s.to_vec()).ok()
}

/// MQTT 3.1.1's CONNECT (IoT Hub takes no other version).
fn parse_connect(p: &[u8]) -> Option<Connect> {
    if p.first()? >> 4 != 1 {
        return None;
    }
    let (_, h) = remaining_length(&p[1..])?;
    let mut at = 1 + h;
    let _name = string_at(p, &mut at)?;
    let level = *p.get(at)?;
    let flags = *p.get(at + 1)?;
    at += 2;
    let keep_alive = u16_at(p, at)?;
    at += 2;
    if level != 4 {
        return Some(Connect {
            level,
            ..Connect::default()
        });
    }
    let client_id = string_at(p, &mut at)?;
    if flags & 0x04 != 0 {
        let _will_topic = string_at(p, &mut at)?;
        let len = u16_at(p, at)? as usize;
        at += 2 + len;
    }
    let username = if flags & 0x80 != 0 {
        Some(string_at(p, &mut at)?)
    } else {
        None
    };
    let password = if flags & 0x40 != 0 {
        Some(string_at(p, &mut at)?)
    } else {
        None
    };
    Some(Connect {
        level,
        keep_alive,
        client_id,
        will_retain: flags & 0x04 != 0 && flags & 0x20 != 0,
        username,
        password,
    })
}

/// PUBLISH's (retain, qos, topic, payload length).
fn parse_publish(p: &[u8]) -> Option<(bool, u8, String, usize)> {
    let retain = p[0] & 1 == 1;
    let qos = (p[0] >> 1) & 3;
    let (remaining, h) = remaining_length(&p[1..])?;
    let mut at = 1 + h;
    let topic = string_at(p, &mut at)?;
    let id = if qos > 0 { 2 } else { 0 };
    let payload = remaining.checked_sub(2 + topic.len() + id)?;
    Some((retain, qos, topic, payload))
}

/// The SAS token's fields (`sr`, `sig`, `se`); `Err` says what is wrong.
fn check_token(s: &Shared, device: &str, password: &str) -> Result<u64, String> {
    let fields = password
        .strip_prefix("SharedAccessSignature ")
        .ok_or("the password is not a SharedAccessSignature")?;
    let get = |k: &str| {
        fields
            .split('&')
            .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
    };
    let resource = format!("{}/devices/{device}", s.hub);
    if get("sr") != Some(url_encode(&resource).as_str()) {
        return Err(format!(
            "the token's sr is {:?}, not {:?}",
            get("sr"),
            url_encode(&resource)
        ));
    }
    let se: u64 = get("se")
        .and_then(|v| v.parse().ok())
        .ok_or("the token has no expiry (se)")?;
    if se <= unix_now() {
        return Err(format!("the token expired at {se}"));
    }
    let key = s.keys.get(device).ok_or("unknown device")?;
    let expected = key
        .token(&resource, se, None)
        .map_err(|e| format!("cannot sign: {e}"))?;
    if expected != password {
        return Err("the token's signature does not match the device key".into());
    }
    Ok(se)
}

/// One device connection: TLS, CONNECT checks, then relay until a side closes, the token
/// expires or the device breaks a rule.
fn serve(tcp: TcpStream, config: Arc<rustls::ServerConfig>, s: Arc<Shared>) {
    let _ = tcp.set_nodelay(true);
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(conn) = rustls::ServerConnection::new(config) else {
        return;
    };
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        if let Err(e) = tls.conn.complete_io(&mut tls.sock) {
            s.refuse(format!("TLS handshake failed: {e}"));
            return;
        }
    }
    let sni = tls.conn.server_name().map(str::to_string);
    let cert_cn = tls
        .conn
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| common_name(c.as_ref()));
    if sni.as_deref() != Some(s.hub.as_str()) {
        s.refuse(format!("SNI {sni:?} is not the hub {:?}", s.hub));
        return;
    }
    let mut reader = Packets::default();
    let connect = loop {
        match reader.next(&mut tls) {
            Ok(Some(p)) => break p,
            Ok(None) => continue,
            Err(e) => {
                s.refuse(format!("no CONNECT: {e}"));
                return;
            }
        }
    };
    let Some(c) = parse_connect(&connect) else {
        s.refuse("the first packet is not a CONNECT".into());
        return;
    };
    let checked = (|| {
        if c.level != 4 {
            return Err(format!(
                "MQTT protocol level {} (IoT Hub takes 3.1.1 only)",
                c.level
            ));
        }
        if !s.keys.contains_key(&c.client_id) {
            return Err(format!(
                "client id {:?} is not a registered device",
                c.client_id
            ));
        }
        let prefix = format!("{}/{}/?api-version=", s.hub, c.client_id);
        match &c.username {
            Some(u) if u.starts_with(&prefix) && u.len() > prefix.len() => {}
            other => {
                return Err(format!("username {other:?} is not {prefix}<version>"));
            }
        }
        if c.will_retain {
            return Err("a retained Last Will (IoT Hub retains nothing)".into());
        }
        // X.509: no password, a certificate from the CA whose common name is the device id.
        if c.password.is_none()
            && let Some(cn) = &cert_cn
        {
            return if *cn == c.client_id {
                Ok(u64::MAX)
            } else {
                Err(format!(
                    "the client certificate is for {cn:?}, not the device {:?}",
                    c.client_id
                ))
            };
        }
        let password = c
            .password
            .as_deref()
            .ok_or("no password (SAS token) and no client certificate")?;
        check_token(&s, &c.client_id, password)
    })();
    let expiry = match checked {
        Ok(e) => e,
        Err(why) => {
            s.refuse(why);
            // CONNACK 5 (not authorized), as IoT Hub answers.
            let _ = tls.write_all(&[0x20, 2, 0, 5]).and_then(|_| tls.flush());
            return;
        }
    };
    let Ok(mut up) = TcpStream::connect(localhost(s.upstream)) else {
        s.refuse("the broker behind the front is down".into());
        return;
    };
    let _ = up.set_nodelay(true);
    let index = {
        let mut log = s.lock();
        log.sessions.push(HubSession {
            device: c.client_id.clone(),
            username: c.username.clone().unwrap_or_default(),
            expiry,
            keep_alive_s: c.keep_alive,
            publishes: 0,
            opened: Instant::now(),
            opened_unix: unix_now(),
            closed: None,
            closed_by_front: None,
        });
        log.sessions.len() - 1
    };
    let close = |s: &Shared, why: Option<String>| {
        let mut log = s.lock();
        if let Some(w) = &why {
            log.refused.push(w.clone());
        }
        let sess = &mut log.sessions[index];
        sess.closed = Some(Instant::now());
        sess.closed_by_front = why;
    };
    if up.write_all(&connect).is_err() {
        close(&s, None);
        return;
    }
    let events = format!("devices/{}/messages/events/", c.client_id);
    let why = relay(
        &mut tls,
        &mut up,
        &mut reader,
        || {
            if s.stop.load(SeqCst) {
                return Err(None);
            }
            if unix_now() >= expiry {
                return Err(Some(format!(
                    "{}: the SAS token expired (se {expiry}); IoT Hub closes the connection",
                    c.client_id
                )));
            }
            Ok(())
        },
        |p| {
            if p[0] >> 4 != 3 {
                return Ok(());
            }
            let (retain, qos, topic, len) =
                parse_publish(p).ok_or_else(|| "a malformed PUBLISH".to_string())?;
            if retain {
                return Err(format!(
                    "a retained PUBLISH to {topic} (IoT Hub retains nothing)"
                ));
            }
            if qos > 1 {
                return Err("a PUBLISH at QoS 2".into());
            }
            if len > MAX_MESSAGE {
                return Err(format!("a PUBLISH of {len} bytes > {MAX_MESSAGE}"));
            }
            if !topic.starts_with(&events) && !topic.starts_with("$iothub/twin/") {
                return Err(format!("a PUBLISH to {topic:?}, not {events}…"));
            }
            s.lock().sessions[index].publishes += 1;
            Ok(())
        },
    );
    close(&s, why);
    let _ = tls.sock.shutdown(std::net::Shutdown::Both);
    let _ = up.shutdown(std::net::Shutdown::Both);
}

/// JSON merge patch (RFC 7386), as IoT Hub applies twin patches: `null` removes a key.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else if v.is_object() && t.get(k).is_some_and(Value::is_object) {
                    merge_patch(t.get_mut(k).expect("present"), v);
                } else {
                    t.insert(k.clone(), v.clone());
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

#[derive(Debug, Default)]
struct Twin {
    desired: Value,
    desired_version: u64,
    reported: Value,
    reported_version: u64,
    reported_patches: Vec<(Instant, Value)>,
    gets: u64,
    subscribed: bool,
}

/// Test support: one device twin served on the IoT Hub twin topics of [`start_broker`]'s
/// Mosquitto (see the module docs).
pub struct TwinResponder {
    twin: Arc<Mutex<Twin>>,
    client: rumqttc::Client,
    stop: Arc<AtomicBool>,
}

impl TwinResponder {
    /// Connects to the broker on `port` and waits until it serves the twin topics.
    pub fn start(port: u16) -> TwinResponder {
        let twin = Arc::new(Mutex::new(Twin {
            desired: json!({}),
            reported: json!({}),
            desired_version: 1,
            ..Twin::default()
        }));
        let mut opts = rumqttc::MqttOptions::new(
            format!("{TWIN_RESPONDER_USER}-{}", fastrand_id()),
            "127.0.0.1",
            port,
        );
        opts.set_credentials(TWIN_RESPONDER_USER, "");
        opts.set_keep_alive(Duration::from_secs(5));
        let (client, mut connection) = rumqttc::Client::new(opts, 100);
        let stop = Arc::new(AtomicBool::new(false));
        let (t, c, st) = (twin.clone(), client.clone(), stop.clone());
        std::thread::spawn(move || {
            for ev in connection.iter() {
                if st.load(SeqCst) {
                    break;
                }
                match ev {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        for f in [
                            "$iothub/twin/GET/#",
                            "$iothub/twin/PATCH/properties/reported/#",
                        ] {
                            let _ = c.try_subscribe(f, rumqttc::QoS::AtLeastOnce);
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        t.lock().unwrap_or_else(|p| p.into_inner()).subscribed = true;
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        answer(&t, &c, &p.topic, &p.payload);
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        let r = TwinResponder { twin, client, stop };
        assert!(
            wait_until(Duration::from_secs(10), || r.lock().subscribed),
            "the twin responder could not subscribe on 127.0.0.1:{port}"
        );
        r
    }

    fn lock(&self) -> MutexGuard<'_, Twin> {
        self.twin.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Patches the desired properties as the service API would, and pushes the patch to the
    /// device with the new `$version`.
    pub fn set_desired(&self, patch: Value) -> u64 {
        let (version, body) = {
            let mut t = self.lock();
            merge_patch(&mut t.desired, &patch);
            t.desired_version += 1;
            let mut body = patch.clone();
            body["$version"] = json!(t.desired_version);
            (t.desired_version, body)
        };
        self.client
            .publish(
                format!("$iothub/twin/PATCH/properties/desired/?$version={version}"),
                rumqttc::QoS::AtLeastOnce,
                false,
                body.to_string(),
            )
            .expect("publish the desired patch");
        version
    }

    /// The reported properties as the device patched them.
    pub fn reported(&self) -> Value {
        self.lock().reported.clone()
    }

    /// When each reported patch arrived, and what it said.
    pub fn reported_patches(&self) -> Vec<(Instant, Value)> {
        self.lock().reported_patches.clone()
    }

    /// How many twin GETs the device made.
    pub fn gets(&self) -> u64 {
        self.lock().gets
    }
}

impl Drop for TwinResponder {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
        let _ = self.client.disconnect();
    }
}

fn fastrand_id() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64
}

fn rid_of(topic: &str) -> Option<&str> {
    topic
        .split_once('?')?
        .1
        .split('&')
        .find_map(|kv| kv.strip_prefix("$rid="))
}

/// Answers one twin request as IoT Hub documents: GET → `res/200` with the whole twin; a
/// reported PATCH → merged, `res/204` with the new `$version`.
fn answer(twin: &Mutex<Twin>, client: &rumqttc::Client, topic: &str, payload: &[u8]) {
    let Some(rid) = rid_of(topic) else { return };
    let (reply, body) = if topic.starts_with("$iothub/twin/GET/") {
        let mut t = twin.lock().unwrap_or_else(|p| p.into_inner());
        t.gets += 1;
        let mut desired = t.desired.clone();
        desired["$version"] = json!(t.desired_version);
        let mut reported = t.reported.clone();
        reported["$version"] = json!(t.reported_version);
        (
            format!("$iothub/twin/res/200/?$rid={rid}"),
            json!({ "desired": desired, "reported": reported }).to_string(),
        )
    } else if topic.starts_with("$iothub/twin/PATCH/properties/reported/") {
        let Ok(patch) = serde_json::from_slice::<Value>(payload) else {
            let _ = client.try_publish(
                format!("$iothub/twin/res/400/?$rid={rid}"),
                rumqttc::QoS::AtLeastOnce,
                false,
                Vec::new(),
            );
            return;
        };
        let mut t = twin.lock().unwrap_or_else(|p| p.into_inner());
        merge_patch(&mut t.reported, &patch);
        t.reported_version += 1;
        t.reported_patches.push((Instant::now(), patch));
        (
            format!(
                "$iothub/twin/res/204/?$rid={rid}&$version={}",
                t.reported_version
            ),
            String::new(),
        )
    } else {
        return;
    };
    let _ = client.try_publish(reply, rumqttc::QoS::AtLeastOnce, false, body);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut t = json!({"a": {"b": 1, "c": 2}, "d": [1, 2]});
        merge_patch(&mut t, &json!({"a": {"b": null, "e": 3}, "d": [3]}));
        assert_eq!(t, json!({"a": {"c": 2, "e": 3}, "d": [3]}));
    }

    #[test]
    fn connect_and_publish_are_parsed() {
        // CONNECT 3.1.1: clean session, will (retained), username, password.
        let mut v = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0b1110_0110, 0, 30];
        for s in ["d1", "w", "x", "hub/d1/?api-version=1", "pw"] {
            v.extend_from_slice(&(s.len() as u16).to_be_bytes());
            v.extend_from_slice(s.as_bytes());
        }
        let mut p = vec![0x10, v.len() as u8];
        p.extend_from_slice(&v);
        let c = parse_connect(&p).expect("a CONNECT");
        assert_eq!(c.client_id, "d1");
        assert_eq!(c.keep_alive, 30);
        assert!(c.will_retain);
        assert_eq!(c.username.as_deref(), Some("hub/d1/?api-version=1"));
        assert_eq!(c.password.as_deref(), Some("pw"));
        // PUBLISH QoS 1, retained, topic "t/x", id 7, payload "abc".
        let p = [0x33, 10, 0, 3, b't', b'/', b'x', 0, 7, b'a', b'b', b'c'];
        assert_eq!(parse_publish(&p), Some((true, 1, "t/x".into(), 3)));
    }
}
