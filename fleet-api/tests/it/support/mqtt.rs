//! A one-shot MQTT publisher: connect, publish at QoS 1, wait for every PUBACK, disconnect.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ember_proto::message::encode;
use ember_proto::{Encoding, Status, TelemetryBatch};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

/// One message to publish.
pub struct Msg {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

impl Msg {
    pub fn raw(topic: &str, payload: impl Into<Vec<u8>>) -> Msg {
        Msg {
            topic: topic.to_string(),
            payload: payload.into(),
            retain: false,
        }
    }

    /// A telemetry batch on the topic of its own device.
    pub fn telemetry(b: &TelemetryBatch) -> Msg {
        Msg::raw(
            &format!("ember/v1/{}/telemetry", b.device),
            encode(b, Encoding::Json).expect("encodes"),
        )
    }

    /// A retained status on the topic of its own device.
    pub fn status(s: &Status) -> Msg {
        Msg {
            retain: true,
            ..Msg::raw(
                &format!("ember/v1/{}/status", s.device),
                encode(s, Encoding::Json).expect("encodes"),
            )
        }
    }
}

/// One hand-built model result for [`inference_batch`]: `(seq, ts, output)` where output is
/// `Class(label, class, probabilities)` or `Anomaly(score, threshold)`.
pub enum Out<'a> {
    Class(&'a str, u32, &'a [f32]),
    Anomaly(f32, f32),
}

/// A hand-written `InferenceBatch` (JSON, as docs/protocol.md shows it) for `{source}.{model}`;
/// each result's window is the 100 ms before its `ts`, latency 70 µs.
pub fn inference_batch(
    device: &str,
    source: &str,
    model: &str,
    version: &str,
    results: &[(u64, u64, Out<'_>)],
) -> Msg {
    let records: Vec<serde_json::Value> = results
        .iter()
        .map(|(seq, ts, out)| {
            let output = match out {
                Out::Class(label, class, p) => serde_json::json!({
                    "kind": "class", "label": label, "class": class, "probabilities": p
                }),
                Out::Anomaly(score, threshold) => serde_json::json!({
                    "kind": "anomaly", "score": score, "threshold": threshold,
                    "anomalous": score > threshold
                }),
            };
            serde_json::json!({
                "seq": seq, "ts": ts, "window_start": ts - 100_000, "source_seq": seq * 10,
                "model": model, "version": version, "latency_us": 70, "output": output
            })
        })
        .collect();
    let payload = serde_json::json!({
        "v": 1, "device": device, "stream": format!("{source}.{model}"), "source": source,
        "records": records
    });
    Msg::raw(
        &format!("ember/v1/{device}/inference"),
        payload.to_string().into_bytes(),
    )
}

/// A batch of `stream` with records `seqs`, values `[seq, seq/2]`, `ts = base_ts + seq ms`.
pub fn batch(
    device: &str,
    stream: &str,
    seqs: impl IntoIterator<Item = u64>,
    base_ts: u64,
) -> TelemetryBatch {
    let mut b = TelemetryBatch::new(device, stream);
    for seq in seqs {
        b.push(
            seq,
            base_ts + seq * 1000,
            vec![seq as f32, seq as f32 / 2.0],
        );
    }
    b
}

/// An online status with one stream.
pub fn status(
    device: &str,
    stream: &str,
    last_seq: u64,
    queued: u64,
    evicted: &[(u64, u64, &str)],
) -> Status {
    let mut s = Status::offline(device);
    s.state = ember_proto::DeviceState::Online;
    s.ts = super::now_us();
    s.agent_version = Some("test".into());
    s.streams.push(ember_proto::StreamStatus {
        head: None,
        channels: None,
        stream: stream.into(),
        last_seq,
        queued,
        evicted: evicted
            .iter()
            .map(|(from, to, reason)| ember_proto::EvictedRange {
                from: *from,
                to: *to,
                reason: (*reason).into(),
            })
            .collect(),
    });
    s
}

/// Publishes `msgs` in order at QoS 1 and returns once the broker acknowledged all of them.
pub fn publish(port: u16, msgs: Vec<Msg>) {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let id = format!(
        "it-pub-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_max_packet_size(16 * 1024 * 1024, 16 * 1024 * 1024);
        let (client, mut el) = AsyncClient::new(opts, msgs.len() + 10);
        let total = msgs.len();
        let mut acked = 0;
        let mut sent = false;
        let work = async {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) if !sent => {
                        sent = true;
                        for m in &msgs {
                            client
                                .try_publish(
                                    m.topic.clone(),
                                    QoS::AtLeastOnce,
                                    m.retain,
                                    m.payload.clone(),
                                )
                                .expect("queue publish");
                        }
                        if total == 0 {
                            return;
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        acked += 1;
                        if acked == total {
                            let _ = client.try_disconnect();
                        }
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                    Ok(_) => {}
                    Err(e) => panic!("publisher: {e} (after {acked}/{total} acks)"),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(30), work)
            .await
            .expect("publishing timed out");
    });
}
