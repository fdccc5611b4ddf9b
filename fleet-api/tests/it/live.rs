//! `/api/v1/events` (server-sent events) and the dashboard's static files, over plain HTTP.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use ember_testkit::TestBroker;

use crate::support::mqtt::{Msg, Out, batch, inference_batch, publish, status};
use crate::support::{ADMIN, Kind, Store, TestFleet, WAIT, now_us};

/// Reads from `s` until `pred` holds for everything read so far; panics with it otherwise.
pub(crate) fn read_until(s: &mut TcpStream, seen: &mut String, pred: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + WAIT;
    let mut buf = [0u8; 4096];
    while !pred(seen) {
        assert!(
            Instant::now() < deadline,
            "the event stream did not deliver the expected events; read:\n{seen}"
        );
        match s.read(&mut buf) {
            Ok(0) => panic!("the event stream ended; read:\n{seen}"),
            Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("reading the event stream: {e}"),
        }
    }
}

/// A client of the event stream sees ingest counters, a device coming online, a stored
/// telemetry record, a stored result and a reject, each after its commit; the stream ends
/// when the fleet shuts down, so the drain does not wait on it.
#[test]
fn events_stream_what_ingestion_commits() {
    let broker = TestBroker::start();
    let store = Store::new(Kind::Sqlite);
    let fleet = TestFleet::start(&store, broker.port());
    let mut s = TcpStream::connect(("127.0.0.1", fleet.port)).expect("connects");
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    write!(
        s,
        "GET /api/v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\nAccept: text/event-stream\r\n\r\n"
    )
    .expect("writes");
    let mut seen = String::new();
    read_until(&mut s, &mut seen, |t| t.contains("event: ingest"));
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    assert!(
        seen.to_ascii_lowercase()
            .contains("content-type: text/event-stream"),
        "{seen}"
    );

    publish(
        broker.port(),
        vec![
            Msg::telemetry(&batch("sse-dev", "imu", 1..=3, now_us())),
            inference_batch(
                "sse-dev",
                "imu",
                "anomaly",
                "1.0.0",
                &[(1, now_us(), Out::Anomaly(0.75, 0.5))],
            ),
            Msg::status(&status("sse-dev", "imu", 3, 0, &[])),
            Msg::raw("ember/v1/sse-dev/inference", "nope"),
        ],
    );
    read_until(&mut s, &mut seen, |t| {
        t.contains("event: telemetry")
            && t.contains("event: inference")
            && t.contains("event: device")
            && t.contains("event: reject")
    });
    let data = |event: &str| -> serde_json::Value {
        let at = seen.find(&format!("event: {event}\n")).expect("event");
        let line = seen[at..]
            .lines()
            .find(|l| l.starts_with("data: "))
            .expect("a data line");
        serde_json::from_str(&line["data: ".len()..]).expect("JSON data")
    };
    let t = data("telemetry");
    assert_eq!(
        (&t["device_id"], &t["seq"]),
        (&"sse-dev".into(), &3.into()),
        "{t}"
    );
    let i = data("inference");
    assert_eq!(
        (&i["stream"], &i["anomalous"], &i["model"]),
        (&"imu.anomaly".into(), &true.into(), &"anomaly".into()),
        "{i}"
    );
    let d = data("device");
    assert_eq!(d["online"], true, "{d}");
    let r = data("reject");
    assert_eq!(r["reason"], "malformed", "{r}");

    // Shutdown ends the stream (the drain would otherwise wait for this client).
    let t0 = Instant::now();
    fleet.stop().expect("stops cleanly");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "the drain waited on the event stream"
    );
}

/// The dashboard is three embedded files with a strict Content-Security-Policy; `/` leads to it.
#[test]
fn dashboard_files_are_served_with_a_strict_policy() {
    let broker = TestBroker::start();
    let store = Store::new(Kind::Sqlite);
    let fleet = TestFleet::start(&store, broker.port());
    for (path, ty) in [
        ("/dashboard/", "text/html"),
        ("/dashboard/app.js", "text/javascript"),
        ("/dashboard/rollouts.js", "text/javascript"),
        ("/dashboard/app.css", "text/css"),
    ] {
        let r = fleet.request("GET", path, None, None);
        assert_eq!(r.status, 200, "{path}");
        assert!(
            r.header("content-type").is_some_and(|c| c.starts_with(ty)),
            "{path}"
        );
        let csp = r.header("content-security-policy").unwrap_or_default();
        assert!(
            csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"),
            "{csp}"
        );
    }
    let r = fleet.request("GET", "/", None, None);
    assert_eq!((r.status, r.header("location")), (303, Some("/dashboard/")));
}
