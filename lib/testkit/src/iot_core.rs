//! Test support: a stand-in for AWS IoT Core's front door, for the agent's `aws-iot-core`
//! profile. It is NOT IoT Core: it checks, per connection, what IoT Core checks before a
//! device's MQTT reaches the broker, then relays the bytes to a Mosquitto configured with IoT
//! Core's limits ([`IOT_CORE_LIMITS`], [`TestBroker::start_with_conf`]):
//!
//! * mutual TLS with a client certificate from the account's CA (here the test PKI's);
//! * the server name (SNI) is the endpoint; the ALPN protocol is `x-amzn-mqtt-ca` when the
//!   front stands for port 443;
//! * the MQTT client id of CONNECT is the thing the certificate belongs to (here: the
//!   certificate's common name; IoT Core checks `iot:Connection.Thing.ThingName` and that the
//!   certificate is attached to that thing);
//! * no PUBLISH above 128 KiB of payload and none at QoS 2 (IoT Core drops the connection).
//!
//! It records every connection (SNI, ALPN, thing, client id, keep-alive) and the arrival time
//! of every PUBLISH, so a test can measure the publish rate per connection over any second
//! ([`Session::max_per_second`]). [`IotCoreFront::set_down`] makes it unreachable (connections
//! dropped and refused), like a network outage. Threads and blocking sockets: it serves a few
//! connections at test rates.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::tls::TestPki;
use crate::{TestBroker, free_port, localhost};

/// IoT Core's payload limit.
pub const MAX_PAYLOAD: usize = 128 * 1024;
/// IoT Core's per-connection publish quota (per second).
pub const PUBLISH_PER_SECOND: usize = 100;
/// The ALPN protocol for MQTT on port 443.
pub const ALPN: &str = "x-amzn-mqtt-ca";

/// Mosquitto settings that apply IoT Core's limits to what the front relays: keep-alive at
/// most 1200 s (a v3.1.1 client asking for more is refused), QoS at most 1, packets at most
/// 128 KiB of payload plus the topic and headers, retained messages available.
pub const IOT_CORE_LIMITS: &str =
    "max_keepalive 1200\nmax_qos 1\nmax_packet_size 132096\nretain_available true\n";

/// One accepted connection.
#[derive(Debug, Clone)]
pub struct Session {
    pub sni: Option<String>,
    pub alpn: Option<String>,
    /// The client certificate's common name.
    pub thing: String,
    pub client_id: String,
    pub keep_alive_s: u16,
    /// When each PUBLISH from the device arrived.
    pub publishes: Vec<Instant>,
    pub opened: Instant,
    pub closed: Option<Instant>,
}

impl Session {
    /// The most PUBLISH packets that arrived within any one second.
    pub fn max_per_second(&self) -> usize {
        let t = &self.publishes;
        let mut best = 0;
        let mut j = 0;
        for i in 0..t.len() {
            while t[i].duration_since(t[j]) >= Duration::from_secs(1) {
                j += 1;
            }
            best = best.max(i - j + 1);
        }
        best
    }
}

#[derive(Debug, Default)]
struct Log {
    sessions: Vec<Session>,
    refused: Vec<String>,
}

struct Shared {
    down: AtomicBool,
    stop: AtomicBool,
    log: Mutex<Log>,
    endpoint: String,
    require_alpn: bool,
    upstream: u16,
}

/// The front, on an ephemeral 127.0.0.1 port. Stopped when dropped.
pub struct IotCoreFront {
    port: u16,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl IotCoreFront {
    /// A front for `endpoint` (the SNI it demands) with the server certificate of `pki`
    /// (valid for `localhost`), trusting client certificates of `pki`, relaying to the
    /// broker on `upstream`. `require_alpn`: the front stands for port 443.
    pub fn start(pki: &TestPki, endpoint: &str, require_alpn: bool, upstream: u16) -> IotCoreFront {
        let server = pki.server();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(pki.ca_pem().as_bytes()) {
            roots.add(c.expect("a CA PEM")).expect("a usable CA");
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.into(),
            provider.clone(),
        )
        .build()
        .expect("a client verifier");
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(server.cert_pem.as_bytes())
                .map(|c| c.expect("a certificate PEM"))
                .collect();
        let key = PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes()).expect("a key PEM");
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .expect("the server certificate");
        config.alpn_protocols = vec![ALPN.as_bytes().to_vec()];
        let config = Arc::new(config);

        let (listener, port) = bind();
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let shared = Arc::new(Shared {
            down: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            log: Mutex::new(Log::default()),
            endpoint: endpoint.to_string(),
            require_alpn,
            upstream,
        });
        let s = shared.clone();
        let accept = std::thread::spawn(move || {
            while !s.stop.load(SeqCst) {
                match listener.accept() {
                    Ok((tcp, _)) => {
                        if s.down.load(SeqCst) {
                            drop(tcp);
                            continue;
                        }
                        let (s, config) = (s.clone(), config.clone());
                        std::thread::spawn(move || serve(tcp, config, s));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        IotCoreFront {
            port,
            shared,
            accept: Some(accept),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Unreachable (`true`: open connections are dropped, new ones refused) or back.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, SeqCst);
    }

    /// Every connection accepted so far.
    pub fn sessions(&self) -> Vec<Session> {
        self.lock().sessions.clone()
    }

    /// Why connections were refused, in order.
    pub fn refused(&self) -> Vec<String> {
        self.lock().refused.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Log> {
        self.shared.log.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for IotCoreFront {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

pub(crate) fn bind() -> (TcpListener, u16) {
    for _ in 0..20 {
        let port = free_port();
        if let Ok(l) = TcpListener::bind(localhost(port)) {
            return (l, port);
        }
    }
    panic!("cannot bind a port for the IoT Core front");
}

fn refuse(s: &Shared, why: String) {
    s.log
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .refused
        .push(why);
}

/// One device connection: handshake and checks, then relay until either side closes, the
/// front goes down or a PUBLISH breaks IoT Core's rules.
fn serve(tcp: TcpStream, config: Arc<rustls::ServerConfig>, s: Arc<Shared>) {
    let _ = tcp.set_nodelay(true);
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(conn) = rustls::ServerConnection::new(config) else {
        return;
    };
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        if let Err(e) = tls.conn.complete_io(&mut tls.sock) {
            refuse(&s, format!("TLS handshake failed: {e}"));
            return;
        }
    }
    let sni = tls.conn.server_name().map(str::to_string);
    let alpn = tls
        .conn
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned());
    if sni.as_deref() != Some(s.endpoint.as_str()) {
        refuse(
            &s,
            format!("SNI {sni:?} is not the endpoint {:?}", s.endpoint),
        );
        return;
    }
    if s.require_alpn && alpn.as_deref() != Some(ALPN) {
        refuse(&s, format!("ALPN {alpn:?} is not {ALPN:?} (port 443)"));
        return;
    }
    let Some(thing) = tls
        .conn
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| common_name(c.as_ref()))
    else {
        refuse(&s, "no client certificate with a common name".into());
        return;
    };
    // The first packet must be CONNECT.
    let mut reader = Packets::default();
    let connect = loop {
        match reader.next(&mut tls) {
            Ok(Some(p)) => break p,
            Ok(None) => continue,
            Err(e) => {
                refuse(&s, format!("no CONNECT: {e}"));
                return;
            }
        }
    };
    let Some((client_id, keep_alive_s)) = parse_connect(&connect) else {
        refuse(&s, "the first packet is not a CONNECT".into());
        return;
    };
    if client_id != thing {
        refuse(
            &s,
            format!("client id {client_id:?} is not the certificate's thing {thing:?}"),
        );
        return;
    }
    let Ok(mut up) = TcpStream::connect(localhost(s.upstream)) else {
        refuse(&s, "the broker behind the front is down".into());
        return;
    };
    let _ = up.set_nodelay(true);
    let index = {
        let mut log = s.log.lock().unwrap_or_else(|p| p.into_inner());
        log.sessions.push(Session {
            sni,
            alpn,
            thing,
            client_id,
            keep_alive_s,
            publishes: Vec::new(),
            opened: Instant::now(),
            closed: None,
        });
        log.sessions.len() - 1
    };
    let closed = |s: &Shared| {
        s.log.lock().unwrap_or_else(|p| p.into_inner()).sessions[index].closed =
            Some(Instant::now());
    };
    if up.write_all(&connect).is_err() {
        closed(&s);
        return;
    }
    let why = relay(
        &mut tls,
        &mut up,
        &mut reader,
        || match s.down.load(SeqCst) || s.stop.load(SeqCst) {
            true => Err(None),
            false => Ok(()),
        },
        |p| {
            if p[0] >> 4 == 3 {
                let qos = (p[0] >> 1) & 3;
                let payload = publish_payload_len(p).unwrap_or(usize::MAX);
                if qos > 1 {
                    return Err("PUBLISH at QoS 2".into());
                }
                if payload > MAX_PAYLOAD {
                    return Err(format!("PUBLISH of {payload} bytes > {MAX_PAYLOAD}"));
                }
                s.log.lock().unwrap_or_else(|p| p.into_inner()).sessions[index]
                    .publishes
                    .push(Instant::now());
            }
            Ok(())
        },
    );
    if let Some(why) = why {
        refuse(&s, why);
    }
    closed(&s);
    let _ = tls.sock.shutdown(std::net::Shutdown::Both);
    let _ = up.shutdown(std::net::Shutdown::Both);
}

/// A device's TLS connection relayed to the broker's TCP connection and back, until either
/// side closes, `stop` says so (`Err(reason)`, the reason optional) or `check`, called with
/// each whole device → broker packet before it is forwarded, refuses it. Returns why the front
/// ended it (`None`: a side closed, or `stop` gave no reason).
pub(crate) fn relay(
    tls: &mut rustls::StreamOwned<rustls::ServerConnection, TcpStream>,
    up: &mut TcpStream,
    reader: &mut Packets,
    mut stop: impl FnMut() -> Result<(), Option<String>>,
    mut check: impl FnMut(&[u8]) -> Result<(), String>,
) -> Option<String> {
    let poll = Duration::from_millis(2);
    let _ = tls.sock.set_read_timeout(Some(poll));
    let _ = up.set_read_timeout(Some(poll));
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if let Err(why) = stop() {
            return why;
        }
        // Device -> broker, packet by packet (to check and time them).
        match reader.next(tls) {
            Ok(Some(p)) => {
                if let Err(why) = check(&p) {
                    return Some(why);
                }
                if up.write_all(&p).is_err() {
                    return None;
                }
                continue;
            }
            Ok(None) => {}
            Err(_) => return None,
        }
        // Broker -> device.
        match up.read(&mut buf) {
            Ok(0) => return None,
            Ok(n) => {
                if tls.write_all(&buf[..n]).and_then(|_| tls.flush()).is_err() {
                    return None;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return None,
        }
    }
}

/// Splits an MQTT byte stream into whole packets.
#[derive(Default)]
pub(crate) struct Packets {
    buf: Vec<u8>,
}

impl Packets {
    /// The next whole packet: `Ok(None)` when none is complete yet (read timed out).
    pub(crate) fn next(&mut self, r: &mut impl Read) -> std::io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(len) = packet_len(&self.buf) {
                return Ok(Some(self.buf.drain(..len).collect()));
            }
            let mut chunk = [0u8; 16 * 1024];
            match r.read(&mut chunk) {
                Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Ok(None);
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// The length of the whole packet at the start of `b`, if it is all there.
fn packet_len(b: &[u8]) -> Option<usize> {
    let (remaining, header) = remaining_length(b.get(1..)?)?;
    let len = 1 + header + remaining;
    (b.len() >= len).then_some(len)
}

/// MQTT's variable-length integer: (value, bytes used).
pub(crate) fn remaining_length(b: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for (i, byte) in b.iter().take(4).enumerate() {
        value |= ((byte & 0x7f) as usize) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

pub(crate) fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// CONNECT's client id and keep-alive (MQTT 3.1.1 and 5).
fn parse_connect(p: &[u8]) -> Option<(String, u16)> {
    if p.first()? >> 4 != 1 {
        return None;
    }
    let (_, h) = remaining_length(&p[1..])?;
    let mut at = 1 + h;
    let name_len = u16_at(p, at)? as usize;
    at += 2 + name_len;
    let level = *p.get(at)?;
    at += 2; // level, flags
    let keep_alive = u16_at(p, at)?;
    at += 2;
    if level == 5 {
        let (props, n) = remaining_length(p.get(at..)?)?;
        at += n + props;
    }
    let id_len = u16_at(p, at)? as usize;
    let id = p.get(at + 2..at + 2 + id_len)?;
    Some((String::from_utf8(id.to_vec()).ok()?, keep_alive))
}

/// A PUBLISH's payload length (MQTT 3.1.1).
fn publish_payload_len(p: &[u8]) -> Option<usize> {
    let qos = (p[0] >> 1) & 3;
    let (remaining, h) = remaining_length(&p[1..])?;
    let topic = u16_at(p, 1 + h)? as usize;
    let id = if qos > 0 { 2 } else { 0 };
    remaining.checked_sub(2 + topic + id)
}

pub(crate) fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

impl TestBroker {
    /// A plaintext broker (anonymous, loopback) with `extra` appended to its configuration,
    /// e.g. [`IOT_CORE_LIMITS`].
    pub fn start_with_conf(extra: &str) -> TestBroker {
        TestBroker::start_extra(extra)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_over_any_second() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let s = Session {
            sni: None,
            alpn: None,
            thing: String::new(),
            client_id: String::new(),
            keep_alive_s: 30,
            publishes: vec![
                at(0),
                at(100),
                at(999),
                at(1000),
                at(1001),
                at(1500),
                at(3000),
            ],
            opened: t0,
            closed: None,
        };
        // 100, 999, 1000 and 1001 lie within one second (so do 999 to 1500); 0 and 1000 do
        // not (a full second apart).
        assert_eq!(s.max_per_second(), 4);
    }

    #[test]
    fn connect_and_publish_are_parsed() {
        // CONNECT, MQTT 3.1.1, clean session, keep-alive 30, client id "edge-1".
        let mut c = vec![0x10, 0];
        c.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 30, 0, 6]);
        c.extend_from_slice(b"edge-1");
        c[1] = (c.len() - 2) as u8;
        assert_eq!(packet_len(&c), Some(c.len()));
        assert_eq!(parse_connect(&c), Some(("edge-1".into(), 30)));
        // PUBLISH QoS 1, topic "a/b", packet id 7, payload "xyz".
        let p = [0x32, 10, 0, 3, b'a', b'/', b'b', 0, 7, b'x', b'y', b'z'];
        assert_eq!(packet_len(&p), Some(p.len()));
        assert_eq!(publish_payload_len(&p), Some(3));
        assert_eq!(packet_len(&p[..5]), None);
    }
}
