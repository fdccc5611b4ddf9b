//! The socket source end to end: JSON lines over loopback TCP to the subscriber.

use std::io::{BufRead, BufReader, Write};
use std::time::Duration;

use ember_testkit::{ALL_TOPICS, Subscriber, TestBroker, free_port, wait_until};

use crate::common::*;

/// A client writes good and malformed JSON lines to the agent's TCP socket source: the good
/// ones arrive at the subscriber in order, with their values and timestamps; each bad one is
/// answered with an error line and counted in `input_rejected_total` (its 2-value schema is
/// fixed by the first line, so the 1-value lines are refused for their width or earlier);
/// the connection survives.
#[test]
fn socket_source_end_to_end() {
    const GOOD: u64 = 200;
    let broker = TestBroker::start();
    let sub = Subscriber::start_keeping_values(broker.port(), ALL_TOPICS);
    let dev = "sock-1";
    let port = free_port();
    // Lines with and without their own ts mix: the own ones are taken close to now, and the
    // stream tolerates a minute of going back (`max_backwards_ms`), so both kinds pass.
    let agent = agent(dev, broker.port())
        .source(&format!(
            "type = \"socket\"\nstream = \"ext\"\ntcp = \"127.0.0.1:{port}\"\nmax_backwards_ms = 60000"
        ))
        .start();

    let mut conn = connect(port);
    conn.set_read_timeout(Some(SHORT)).expect("timeout");

    let bad = [
        "this is not json",
        "{\"values\":[1.0,2.0]",
        "[1.0,2.0]",
        "{}",
        "{\"values\":[]}",
        "{\"values\":\"1.0\"}",
        "{\"values\":[1.0,\"x\"]}",
        "{\"values\":[1e39]}",
        "{\"values\":[1.0],\"stream\":\"other\"}",
        "{\"values\":[1.0],\"ts\":-5}",
        "{\"values\":[1.0],\"extra\":true}",
    ];
    let ts0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_micros() as u64;
    let mut text = String::new();
    for i in 0..GOOD {
        // A bad line after every 20th good one; odd lines carry their own ts and stream.
        if i % 2 == 0 {
            text.push_str(&format!("{{\"values\":[{i}.0,{}.5]}}\n", i * 2));
        } else {
            text.push_str(&format!(
                "{{\"values\":[{i}.0,{}.5],\"ts\":{},\"stream\":\"ext\"}}\n",
                i * 2,
                ts0 + i
            ));
        }
        if i % 20 == 0 {
            text.push_str(bad[(i / 20) as usize % bad.len()]);
            text.push('\n');
        }
    }
    let bad_sent: Vec<&str> = (0..GOOD)
        .filter(|i| i % 20 == 0)
        .map(|i| bad[(i / 20) as usize % bad.len()])
        .collect();
    // The kinds of bad line not used yet, and a blank line (ignored: no sample, no error).
    let mut all_bad = bad_sent.clone();
    for b in bad.iter().skip(bad_sent.len()) {
        text.push_str(b);
        text.push('\n');
        all_bad.push(b);
    }
    text.push('\n');
    conn.write_all(text.as_bytes()).expect("write lines");

    // Each bad line is answered with one error line naming its line number.
    let mut replies = BufReader::new(conn.try_clone().expect("clone"));
    for _ in 0..all_bad.len() {
        let mut line = String::new();
        replies
            .read_line(&mut line)
            .expect("an error reply per bad line");
        assert!(line.starts_with("{\"error\":\"line "), "reply: {line}");
    }

    let n = all_bad.len() as f64;
    assert!(
        wait_until(SHORT, || rejected_total(&agent.metrics()) >= n),
        "input_rejected_total should reach {n}: {:?}",
        agent.metrics()
    );
    assert!(
        sub.wait_for(|v| v.unique(dev, "ext") >= GOOD, SHORT),
        "{}",
        progress(&sub, dev, "ext")
    );
    // Still connected: one more good line goes through.
    conn.write_all(b"{\"values\":[-1.0,-2.0]}\n")
        .expect("write after errors");
    assert!(
        sub.wait_for(|v| v.unique(dev, "ext") > GOOD, SHORT),
        "{}",
        progress(&sub, dev, "ext")
    );
    drop(conn);

    stop_gracefully(&agent, Duration::from_secs(20));
    let fin = final_status(&sub, dev);
    let c = fin.counters.clone().expect("counters");
    assert_eq!(c.rejected, all_bad.len() as u64, "{c:?}");
    assert_eq!(c.captured, GOOD + 1, "{c:?}");
    assert_eq!(stream_status(&fin, "ext").last_seq, GOOD + 1);
    let view = sub.snapshot();
    assert_clean_delivery(&view);
    let log = view.stream(dev, "ext").expect("ext");
    assert!(log.is_exactly(GOOD + 1));
    for i in 0..GOOD {
        let r = &log.records[&(i + 1)];
        assert_eq!(
            r.values.as_deref(),
            Some([i as f32, (i * 2) as f32 + 0.5].as_slice()),
            "record {}",
            i + 1
        );
        if i % 2 == 1 {
            assert_eq!(r.ts, ts0 + i, "a line's own ts is kept");
        }
    }
    assert_eq!(
        log.records[&(GOOD + 1)].values.as_deref(),
        Some([-1.0f32, -2.0].as_slice())
    );
    assert_no_panic(&agent);
}
