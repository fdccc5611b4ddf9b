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
    pub reconnects: AtomicU64,
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
}

impl RejectReason {
    pub const ALL: [RejectReason; 4] = [
        RejectReason::Malformed,
        RejectReason::Channels,
        RejectReason::NonFinite,
        RejectReason::Backwards,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Malformed => "malformed",
            RejectReason::Channels => "channels",
            RejectReason::NonFinite => "non_finite",
            RejectReason::Backwards => "backwards",
        }
    }
}

impl Metrics {
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
        let counters: [(&str, &str, &str, &str, &AtomicU64); 38] = [
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
                "Input refused by sources before it was queued, by reason (malformed, channels, non_finite, backwards).",
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
                "reconnects_total",
                "counter",
                "Reconnections to the broker after the first connection.",
                "",
                &self.reconnects,
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
