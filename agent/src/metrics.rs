//! The agent's counters: one set of atomics, read by the status message and by the optional
//! Prometheus endpoint (`metrics.listen`, loopback by convention).
//!
//! The endpoint is a minimal HTTP/1.1 responder on tokio rather than a web framework: it serves
//! one text document, and pulling hyper into a daemon for small devices is not worth that.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use ember_proto::AgentCounters;

#[derive(Debug, Default)]
pub struct Metrics {
    pub captured: AtomicU64,
    pub enqueued: AtomicU64,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub evicted_bytes: AtomicU64,
    pub evicted_age: AtomicU64,
    pub evicted_disk: AtomicU64,
    pub storage_errors: AtomicU64,
    pub corrupt: AtomicU64,
    /// Input refused by sources, all reasons together (the status message's `rejected`);
    /// [`Metrics::reject`] also counts each reason below.
    pub rejected: AtomicU64,
    /// Lines or file rows that do not parse (bad JSON, not a number, unknown field).
    pub rejected_malformed: AtomicU64,
    /// Samples whose channel count differs from the stream's schema.
    pub rejected_channels: AtomicU64,
    /// Samples carrying NaN or an infinity.
    pub rejected_non_finite: AtomicU64,
    /// Samples whose timestamp goes back further than the source's tolerance.
    pub rejected_backwards: AtomicU64,
    /// Serial source: samples a node numbered that arrived damaged (bad CRC or COBS).
    pub rejected_corrupt: AtomicU64,
    /// Serial source: samples a node numbered that never arrived (the node's buffer overran,
    /// the line dropped them, the node reset with them buffered).
    pub rejected_gap: AtomicU64,
    /// Serial source: frames refused whole (bad CRC or COBS, too long, undecodable), whatever
    /// they carried; the samples among them are `rejected_corrupt`.
    pub serial_frames_refused: AtomicU64,
    /// Serial source: node reboots seen (a new boot number, or numbering that restarted).
    pub serial_node_reboots: AtomicU64,
    /// Serial source: times the line was (re)opened after the first.
    pub serial_reopens: AtomicU64,
    pub reconnects: AtomicU64,
    /// Times the uplink held record messages back for `mqtt.max_publish_rate`.
    pub publishes_paced: AtomicU64,
    /// Status messages that carried only part of their streams to fit `message_max_bytes`.
    pub status_trimmed: AtomicU64,
    /// Azure IoT Hub: reconnects to renew the SAS token before it expired.
    pub sas_renewals: AtomicU64,
    /// Azure IoT Hub: patches of the device twin's reported properties.
    pub twin_reports: AtomicU64,
    pub in_flight: AtomicU64,
    pub queue_resets: AtomicU64,
    /// Records sent again because the fleet had not committed them in time.
    pub resent: AtomicU64,
    /// Commit watermarks received from the fleet (end-to-end acknowledgement).
    pub commit_watermarks: AtomicU64,
    /// 1 while records wait for the fleet's commit, 0 while they leave on PUBACK.
    pub delivery_commit: AtomicU64,
    pub queue_records: AtomicU64,
    pub queue_bytes: AtomicU64,
    pub queue_disk_bytes: AtomicU64,
    pub connected: AtomicU64,
    pub messages_sent: AtomicU64,
    pub publish_latency_us_sum: AtomicU64,
    pub fsyncs: AtomicU64,
    /// The client certificate's notAfter (Unix seconds); 0 without one (see `tls`).
    pub tls_cert_not_after: AtomicU64,
    /// Windows evaluated by a model (each produced one result).
    pub inference_windows: AtomicU64,
    /// Model calls (batches) and the time spent in them.
    pub inference_batches: AtomicU64,
    pub inference_latency_us_sum: AtomicU64,
    /// Windows that could not be evaluated (the model failed on them).
    pub inference_errors: AtomicU64,
    /// Windows never formed because the inference thread was behind.
    pub inference_windows_skipped: AtomicU64,
    /// Windows never formed because a sample in them did not fit the model (wrong channel
    /// count, NaN/Inf): the second line of defence behind the sources' schema check.
    pub inference_windows_misfit: AtomicU64,
    /// Samples that bypassed inference because its channel was full.
    pub inference_samples_skipped: AtomicU64,
    /// Windows captured for labelling, by trigger (`[model.capture]`).
    pub captures_anomaly: AtomicU64,
    pub captures_low_confidence: AtomicU64,
    pub captures_sample: AtomicU64,
    /// OTA (`crate::ota`): bundle downloads finished, bytes received, installs that failed,
    /// model switches, crash-loop rollbacks, desired-state messages ignored as invalid.
    pub ota_downloads: AtomicU64,
    pub ota_download_bytes: AtomicU64,
    pub ota_failures: AtomicU64,
    pub ota_switches: AtomicU64,
    pub ota_rollbacks: AtomicU64,
    pub ota_desired_invalid: AtomicU64,
    /// Models serving now: name -> version (also in the status message).
    pub models: std::sync::Mutex<std::collections::BTreeMap<String, String>>,
}

/// Why a source refused input: the `reason` label of `input_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    Malformed,
    Channels,
    NonFinite,
    Backwards,
    Corrupt,
    Gap,
}

impl RejectReason {
    pub const ALL: [RejectReason; 6] = [
        RejectReason::Malformed,
        RejectReason::Channels,
        RejectReason::NonFinite,
        RejectReason::Backwards,
        RejectReason::Corrupt,
        RejectReason::Gap,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Malformed => "malformed",
            RejectReason::Channels => "channels",
            RejectReason::NonFinite => "non_finite",
            RejectReason::Backwards => "backwards",
            RejectReason::Corrupt => "corrupt",
            RejectReason::Gap => "gap",
        }
    }
}

impl Metrics {
    /// Counts one captured window under its trigger.
    pub fn count_capture(&self, trigger: &str) {
        let c = match trigger {
            "anomaly" => &self.captures_anomaly,
            "low_confidence" => &self.captures_low_confidence,
            _ => &self.captures_sample,
        };
        c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Counts one refused input under `reason` (and in the total).
    pub fn reject(&self, reason: RejectReason) {
        self.rejected.fetch_add(1, Relaxed);
        self.rejected_by(reason).fetch_add(1, Relaxed);
    }

    pub fn rejected_by(&self, reason: RejectReason) -> &AtomicU64 {
        match reason {
            RejectReason::Malformed => &self.rejected_malformed,
            RejectReason::Channels => &self.rejected_channels,
            RejectReason::NonFinite => &self.rejected_non_finite,
            RejectReason::Backwards => &self.rejected_backwards,
            RejectReason::Corrupt => &self.rejected_corrupt,
            RejectReason::Gap => &self.rejected_gap,
        }
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub fn snapshot(&self) -> AgentCounters {
        AgentCounters {
            captured: self.captured.load(Relaxed),
            enqueued: self.enqueued.load(Relaxed),
            sent: self.sent.load(Relaxed),
            acked: self.acked.load(Relaxed),
            evicted_bytes: self.evicted_bytes.load(Relaxed),
            evicted_age: self.evicted_age.load(Relaxed),
            evicted_disk: self.evicted_disk.load(Relaxed),
            corrupt: self.corrupt.load(Relaxed),
            rejected: self.rejected.load(Relaxed),
            reconnects: self.reconnects.load(Relaxed),
            in_flight: self.in_flight.load(Relaxed),
            queue_resets: self.queue_resets.load(Relaxed),
            resent: self.resent.load(Relaxed),
        }
    }

    /// Prometheus text exposition format (version 0.0.4).
    pub fn render(&self, device_id: &str) -> String {
        let counters: [(&str, &str, &str, &str, &AtomicU64); 50] = [
            (
                "records_captured_total",
                "counter",
                "Samples produced by sources.",
                "",
                &self.captured,
            ),
            (
                "records_enqueued_total",
                "counter",
                "Records durably appended to the queue.",
                "",
                &self.enqueued,
            ),
            (
                "records_sent_total",
                "counter",
                "Records published to the broker (re-sends count again).",
                "",
                &self.sent,
            ),
            (
                "records_acked_total",
                "counter",
                "Records delivered and deleted from the queue: on the fleet's commit watermark, or on the broker's PUBACK with mqtt.delivery = puback.",
                "",
                &self.acked,
            ),
            (
                "records_evicted_total",
                "counter",
                "Records evicted from the queue, by reason.",
                "reason=\"bytes\"",
                &self.evicted_bytes,
            ),
            (
                "records_evicted_total",
                "counter",
                "",
                "reason=\"age\"",
                &self.evicted_age,
            ),
            (
                "records_evicted_total",
                "counter",
                "",
                "reason=\"disk\"",
                &self.evicted_disk,
            ),
            (
                "storage_errors_total",
                "counter",
                "Queue storage operations that failed (disk full, I/O errors).",
                "",
                &self.storage_errors,
            ),
            (
                "records_corrupt_total",
                "counter",
                "Stored records that failed their CRC and were skipped.",
                "",
                &self.corrupt,
            ),
            (
                "input_rejected_total",
                "counter",
                "Input refused by sources before it was queued, by reason (malformed, channels, non_finite, backwards; corrupt and gap: samples of a serial node that arrived damaged or never arrived).",
                "reason=\"malformed\"",
                &self.rejected_malformed,
            ),
            (
                "input_rejected_total",
                "counter",
                "",
                "reason=\"channels\"",
                &self.rejected_channels,
            ),
            (
                "input_rejected_total",
                "counter",
                "",
                "reason=\"non_finite\"",
                &self.rejected_non_finite,
            ),
            (
                "input_rejected_total",
                "counter",
                "",
                "reason=\"backwards\"",
                &self.rejected_backwards,
            ),
            (
                "input_rejected_total",
                "counter",
                "",
                "reason=\"corrupt\"",
                &self.rejected_corrupt,
            ),
            (
                "input_rejected_total",
                "counter",
                "",
                "reason=\"gap\"",
                &self.rejected_gap,
            ),
            (
                "serial_frames_refused_total",
                "counter",
                "Frames from serial nodes refused whole (bad CRC or COBS, too long, undecodable).",
                "",
                &self.serial_frames_refused,
            ),
            (
                "serial_node_reboots_total",
                "counter",
                "Reboots of serial nodes seen by the agent.",
                "",
                &self.serial_node_reboots,
            ),
            (
                "serial_reopens_total",
                "counter",
                "Times a serial line was reopened after it failed or disappeared.",
                "",
                &self.serial_reopens,
            ),
            (
                "reconnects_total",
                "counter",
                "Reconnections to the broker after the first connection.",
                "",
                &self.reconnects,
            ),
            (
                "publishes_paced_total",
                "counter",
                "Times the uplink held record messages back to stay within mqtt.max_publish_rate (a broker's per-connection publish quota).",
                "",
                &self.publishes_paced,
            ),
            (
                "status_trimmed_total",
                "counter",
                "Status messages that listed only some streams (in turn) to stay within mqtt.message_max_bytes.",
                "",
                &self.status_trimmed,
            ),
            (
                "sas_renewals_total",
                "counter",
                "Azure IoT Hub: reconnects made to renew the SAS token before it expired (mqtt.sas_token_ttl_s).",
                "",
                &self.sas_renewals,
            ),
            (
                "twin_reports_total",
                "counter",
                "Azure IoT Hub: patches of the device twin's reported properties (at most one per mqtt.twin_report_min_interval_s).",
                "",
                &self.twin_reports,
            ),
            (
                "queue_resets_total",
                "counter",
                "Times an unreadable queue database was moved aside and replaced.",
                "",
                &self.queue_resets,
            ),
            (
                "messages_sent_total",
                "counter",
                "MQTT messages published.",
                "",
                &self.messages_sent,
            ),
            (
                "fsyncs_total",
                "counter",
                "fsync calls made by the queue.",
                "",
                &self.fsyncs,
            ),
            (
                "publish_ack_latency_microseconds_sum",
                "counter",
                "Sum of publish-to-PUBACK latencies.",
                "",
                &self.publish_latency_us_sum,
            ),
            (
                "inference_windows_total",
                "counter",
                "Windows evaluated by a model.",
                "",
                &self.inference_windows,
            ),
            (
                "inference_errors_total",
                "counter",
                "Windows that could not be evaluated (the model failed on them).",
                "",
                &self.inference_errors,
            ),
            (
                "inference_windows_skipped_total",
                "counter",
                "Windows never evaluated, by reason: the inference thread was behind, or a sample in them did not fit the model.",
                "reason=\"behind\"",
                &self.inference_windows_skipped,
            ),
            (
                "inference_windows_skipped_total",
                "counter",
                "",
                "reason=\"misfit\"",
                &self.inference_windows_misfit,
            ),
            (
                "inference_samples_skipped_total",
                "counter",
                "Samples that bypassed inference because its channel was full.",
                "",
                &self.inference_samples_skipped,
            ),
            (
                "inference_captures_total",
                "counter",
                "Raw windows captured for labelling (queued on the capture stream), by trigger.",
                "trigger=\"anomaly\"",
                &self.captures_anomaly,
            ),
            (
                "inference_captures_total",
                "counter",
                "",
                "trigger=\"low_confidence\"",
                &self.captures_low_confidence,
            ),
            (
                "inference_captures_total",
                "counter",
                "",
                "trigger=\"sample\"",
                &self.captures_sample,
            ),
            (
                "inference_latency_seconds_count",
                "counter",
                "Model calls (batches); inference_latency_seconds_sum is the time spent in them.",
                "",
                &self.inference_batches,
            ),
            (
                "ota_downloads_total",
                "counter",
                "Model bundle downloads completed (digest checked).",
                "",
                &self.ota_downloads,
            ),
            (
                "ota_download_bytes_total",
                "counter",
                "Bytes of model bundles downloaded.",
                "",
                &self.ota_download_bytes,
            ),
            (
                "ota_failures_total",
                "counter",
                "Model updates refused or failed (hash, signature, golden vectors, shadow, HTTP).",
                "",
                &self.ota_failures,
            ),
            (
                "ota_switches_total",
                "counter",
                "Model switches made by OTA.",
                "",
                &self.ota_switches,
            ),
            (
                "ota_rollbacks_total",
                "counter",
                "Crash-loop rollbacks to the previous model.",
                "",
                &self.ota_rollbacks,
            ),
            (
                "ota_desired_invalid_total",
                "counter",
                "Desired-state messages ignored because they did not decode or validate.",
                "",
                &self.ota_desired_invalid,
            ),
            (
                "records_resent_total",
                "counter",
                "Records sent again because the fleet had not committed them within mqtt.commit_timeout_s.",
                "",
                &self.resent,
            ),
            (
                "commit_watermarks_total",
                "counter",
                "Commit watermarks received from the fleet (end-to-end acknowledgement).",
                "",
                &self.commit_watermarks,
            ),
            (
                "delivery_commit",
                "gauge",
                "1 while records stay queued until the fleet commits them, 0 while they leave on the broker's PUBACK.",
                "",
                &self.delivery_commit,
            ),
            (
                "records_in_flight",
                "gauge",
                "Records published and not yet acknowledged.",
                "",
                &self.in_flight,
            ),
            (
                "queue_records",
                "gauge",
                "Records in the durable queue.",
                "",
                &self.queue_records,
            ),
            (
                "queue_bytes",
                "gauge",
                "Bytes of record data in the durable queue.",
                "",
                &self.queue_bytes,
            ),
            (
                "queue_disk_bytes",
                "gauge",
                "Bytes the queue's files take on disk.",
                "",
                &self.queue_disk_bytes,
            ),
            (
                "connected",
                "gauge",
                "1 while connected to the broker.",
                "",
                &self.connected,
            ),
        ];
        let mut out = String::with_capacity(4096);
        let latency_s = self.inference_latency_us_sum.load(Relaxed) as f64 / 1e6;
        out.push_str(&format!(
            "# HELP ember_agent_inference_latency_seconds_sum Seconds spent in model calls.\n# TYPE ember_agent_inference_latency_seconds_sum counter\nember_agent_inference_latency_seconds_sum{{device=\"{device_id}\"}} {latency_s}\n"
        ));
        let models = self
            .models
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if !models.is_empty() {
            out.push_str("# HELP ember_agent_inference_model_info Models serving now (value 1).\n# TYPE ember_agent_inference_model_info gauge\n");
            for (name, version) in &models {
                out.push_str(&format!(
                    "ember_agent_inference_model_info{{device=\"{device_id}\",model=\"{name}\",version=\"{version}\"}} 1\n"
                ));
            }
        }
        for (name, kind, help, labels, value) in counters {
            // A metric with several label sets carries its HELP/TYPE once, on the first.
            if !help.is_empty() {
                out.push_str(&format!(
                    "# HELP ember_agent_{name} {help}\n# TYPE ember_agent_{name} {kind}\n"
                ));
            }
            let sep = if labels.is_empty() { "" } else { "," };
            out.push_str(&format!(
                "ember_agent_{name}{{device=\"{device_id}\"{sep}{labels}}} {}\n",
                value.load(Relaxed)
            ));
        }
        out.push_str(&render_tls(self, device_id));
        out
    }
}

/// Prometheus lines for the TLS client certificate (none without one; `tls` stores its
/// notAfter in `tls_cert_not_after`).
fn render_tls(metrics: &Metrics, device_id: &str) -> String {
    let not_after = metrics.tls_cert_not_after.load(Relaxed);
    if not_after == 0 {
        return String::new();
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let left = not_after as i64 - now;
    format!(
        "# HELP ember_agent_tls_client_cert_expiry_seconds Seconds until the client certificate expires (negative: expired).\n\
         # TYPE ember_agent_tls_client_cert_expiry_seconds gauge\n\
         ember_agent_tls_client_cert_expiry_seconds{{device=\"{device_id}\"}} {left}\n\
         # HELP ember_agent_tls_client_cert_expiry_timestamp_seconds The client certificate's notAfter (Unix time).\n\
         # TYPE ember_agent_tls_client_cert_expiry_timestamp_seconds gauge\n\
         ember_agent_tls_client_cert_expiry_timestamp_seconds{{device=\"{device_id}\"}} {not_after}\n"
    )
}

/// `ember-agent health`: one `GET /metrics` of a running agent at `addr` (its
/// `metrics.listen`); Ok when it answers 200 within `timeout`. The container image's health
/// check (the image has no shell or HTTP client).
pub fn probe(addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    use std::io::{Read, Write};
    let mut sock = std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| {
        format!("cannot connect to the agent's metrics endpoint {addr}: {e} (is metrics.listen set, and the agent running?)")
    })?;
    let io = |e: std::io::Error| format!("the metrics endpoint {addr} did not answer: {e}");
    sock.set_read_timeout(Some(timeout)).map_err(io)?;
    sock.set_write_timeout(Some(timeout)).map_err(io)?;
    sock.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .map_err(io)?;
    let mut head = [0u8; 32];
    let mut n = 0;
    while n < head.len() {
        match sock.read(&mut head[n..]).map_err(io)? {
            0 => break,
            k => n += k,
        }
    }
    let head = String::from_utf8_lossy(&head[..n]);
    let status = head.lines().next().unwrap_or_default();
    if status.starts_with("HTTP/1.1 200") || status.starts_with("HTTP/1.0 200") {
        Ok(())
    } else {
        Err(format!(
            "the metrics endpoint {addr} answered {status:?}, not 200"
        ))
    }
}

/// Serves `GET /metrics` on `addr` until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    metrics: std::sync::Arc<Metrics>,
    device_id: String,
    shutdown: CancellationToken,
) {
    loop {
        let (mut sock, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "Metrics endpoint failed to accept a connection.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        let device_id = device_id.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let started = Instant::now();
            let mut n = 0;
            // Read until the end of the request head (or give up after a short while).
            while n < buf.len() && started.elapsed() < Duration::from_secs(2) {
                match tokio::time::timeout(Duration::from_secs(2), sock.read(&mut buf[n..])).await {
                    Ok(Ok(0)) | Err(_) | Ok(Err(_)) => break,
                    Ok(Ok(k)) => n += k,
                }
                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let (status, body) =
                if head.starts_with("GET /metrics ") || head.starts_with("GET /metrics?") {
                    ("200 OK", metrics.render(&device_id))
                } else {
                    (
                        "404 Not Found",
                        "not found: the agent serves GET /metrics\n".to_string(),
                    )
                };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

/// Binds the metrics listener (done before the agent starts, so a busy port fails fast).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Labels whose values are data (the device id, model names and versions), listed by name
    /// only; every other label's values are fixed by the code and listed.
    const DATA_LABELS: [&str; 3] = ["device", "model", "version"];

    /// One family as `render` writes it.
    #[derive(Default)]
    struct Family {
        kind: String,
        help: String,
        /// Label name -> values seen, in order of appearance.
        labels: Vec<(String, Vec<String>)>,
    }

    /// Every family `render` can produce (a certificate and a model present, so the optional
    /// ones are there too), in the order it writes them.
    fn families() -> Vec<(String, Family)> {
        let m = Metrics::default();
        m.tls_cert_not_after.store(2_000_000_000, Relaxed);
        m.models
            .lock()
            .unwrap()
            .insert("activity".into(), "1.0.0".into());
        let text = m.render("dev-1");
        let mut order = Vec::new();
        let mut by_name: BTreeMap<String, Family> = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap();
                order.push(name.to_string());
                by_name.entry(name.into()).or_default().help = help.into();
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                by_name.entry(name.into()).or_default().kind = kind.into();
            } else {
                let (name, rest) = line.split_once('{').expect("every series has labels");
                let labels = rest.rsplit_once('}').unwrap().0;
                let family = by_name
                    .get_mut(name)
                    .unwrap_or_else(|| panic!("{name} has no HELP before its first series"));
                for pair in labels.split(',') {
                    let (k, v) = pair.split_once('=').unwrap();
                    let v = v.trim_matches('"').to_string();
                    match family.labels.iter_mut().find(|(n, _)| n == k) {
                        Some((_, values)) if !values.contains(&v) => values.push(v),
                        Some(_) => {}
                        None => family.labels.push((k.into(), vec![v])),
                    }
                }
            }
        }
        order
            .into_iter()
            .map(|n| {
                let f = by_name.remove(&n).unwrap();
                (n, f)
            })
            .collect()
    }

    /// The Markdown table of every metric the agent exports; `docs/operations.md` carries it
    /// between its `ember-agent metrics` markers.
    fn docs_table() -> String {
        let mut out = String::from("| metric | type | labels | meaning |\n|---|---|---|---|\n");
        for (name, f) in families() {
            let labels: Vec<String> = f
                .labels
                .iter()
                .map(|(k, values)| {
                    if DATA_LABELS.contains(&k.as_str()) {
                        format!("`{k}`")
                    } else {
                        let v: Vec<String> = values.iter().map(|v| format!("`{v}`")).collect();
                        format!("`{k}` ({})", v.join(", "))
                    }
                })
                .collect();
            out.push_str(&format!(
                "| `{name}` | {} | {} | {} |\n",
                f.kind,
                labels.join(", "),
                f.help.replace('|', "\\|")
            ));
        }
        out
    }

    #[test]
    fn every_family_has_one_help_one_type_and_a_device_label() {
        let families = families();
        let mut names: Vec<_> = families.iter().map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        let n = names.len();
        names.dedup();
        assert_eq!(names.len(), n, "a family's HELP is written twice");
        for (name, f) in &families {
            assert!(name.starts_with("ember_agent_"), "{name}");
            assert!(
                ["counter", "gauge"].contains(&f.kind.as_str()),
                "{name}: {}",
                f.kind
            );
            assert_eq!(f.labels.first().map(|(k, _)| k.as_str()), Some("device"));
        }
        // Every reject and eviction reason is a label value.
        let text = Metrics::default().render("d");
        for r in RejectReason::ALL {
            assert!(
                text.contains(&format!("reason=\"{}\"", r.as_str())),
                "{text}"
            );
        }
    }

    /// `docs/operations.md` lists exactly what `render` exports; on a difference this fails
    /// with the table to paste, and `EMBER_UPDATE_DOCS=1 cargo test -p ember-agent --lib
    /// metrics::` rewrites it.
    #[test]
    fn the_docs_list_every_metric_as_exported() {
        ember_testkit::docs::check_generated(
            concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/operations.md"),
            "ember-agent metrics",
            &docs_table(),
        );
    }
}
