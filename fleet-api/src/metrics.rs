//! The service's Prometheus metrics: counters, gauges and histograms keyed by labels, rendered
//! as the text exposition format at `/metrics`.
//!
//! A small registry instead of a metrics crate: every family is declared once in [`FAMILIES`]
//! (name, kind, help), label sets are few and bounded (reasons, channels, operations, routes),
//! and one mutex per update is far below the cost of the database write it accompanies.
//!
//! Device ids are deliberately *not* labels: a fleet has many devices and Prometheus
//! cardinality would grow with it. Per-device numbers (rejects, ledger) live in the database and
//! the REST API.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Counter,
    Gauge,
    Histogram(&'static [f64]),
}

const BATCH_BUCKETS: &[f64] = &[
    1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 10000.0,
];
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Sensor-to-database latency: fine enough around tens of milliseconds to read a p50/p99.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.06, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.4,
    0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0,
];
const BYTES_BUCKETS: &[f64] = &[
    256.0, 1024.0, 4096.0, 16384.0, 65536.0, 131072.0, 262144.0, 1048576.0,
];

/// Every metric family: name (without the `ember_fleet_` prefix), kind, help.
const FAMILIES: &[(&str, Kind, &str)] = &[
    (
        "leader",
        Kind::Gauge,
        "1 while this replica is the leader (runs the rollout driver, retention and the desired-state publisher), else 0.",
    ),
    (
        "leader_elections_total",
        Kind::Counter,
        "Times this replica became the leader.",
    ),
    (
        "events_relayed_total",
        Kind::Counter,
        "Notifications sent to the other replicas (PostgreSQL NOTIFY), by channel: ember_events (live events), ember_desired (wake the publisher).",
    ),
    (
        "events_relay_dropped_total",
        Kind::Counter,
        "Live events not relayed to the other replicas, by reason: too_large, database.",
    ),
    (
        "events_received_from_replicas_total",
        Kind::Counter,
        "Live events committed by other replicas and delivered to this replica's event streams.",
    ),
    (
        "mqtt_sessions_ended_total",
        Kind::Counter,
        "Times this replica left the shared subscription and ended its MQTT session at shutdown (other replicas were running).",
    ),
    (
        "desired_published_total",
        Kind::Counter,
        "Desired-state messages published (retained) and acknowledged by the broker.",
    ),
    (
        "ota_reports_total",
        Kind::Counter,
        "OTA reports from device statuses, by outcome: applied (to an unfinished rollout), ignored.",
    ),
    (
        "rollout_steps_total",
        Kind::Counter,
        "Rollout steps stored, by cause: create, command, report, tick.",
    ),
    (
        "model_uploads_total",
        Kind::Counter,
        "Model bundle uploads, by outcome (registered, invalid, duplicate, too_large).",
    ),
    (
        "model_download_bytes_total",
        Kind::Counter,
        "Bundle bytes served by the model download route (full and partial responses).",
    ),
    (
        "messages_total",
        Kind::Counter,
        "MQTT messages received, by channel and outcome (accepted, rejected, dropped).",
    ),
    (
        "rejects_total",
        Kind::Counter,
        "Messages rejected, by reason (too_large, malformed, unsupported_version, crc, device_mismatch, invalid_name, out_of_range, bad_topic, storage).",
    ),
    (
        "records_total",
        Kind::Counter,
        "Telemetry records, by outcome: stored (new), duplicate (already stored), expired (below the retention watermark).",
    ),
    (
        "payload_bytes",
        Kind::Histogram(BYTES_BUCKETS),
        "Size of MQTT payloads received.",
    ),
    (
        "batch_records",
        Kind::Histogram(BATCH_BUCKETS),
        "Telemetry records per database write batch.",
    ),
    (
        "batch_messages",
        Kind::Histogram(BATCH_BUCKETS),
        "MQTT messages per database write batch.",
    ),
    (
        "db_seconds",
        Kind::Histogram(SECONDS_BUCKETS),
        "Database latency, by operation (flush, query, retention).",
    ),
    (
        "db_errors_total",
        Kind::Counter,
        "Database operations that failed, by operation.",
    ),
    (
        "ingest_pending",
        Kind::Gauge,
        "Messages waiting between the MQTT reader and the database writer.",
    ),
    (
        "mqtt_connected",
        Kind::Gauge,
        "1 while connected to the broker.",
    ),
    (
        "mqtt_connections_total",
        Kind::Counter,
        "Successful connections to the broker.",
    ),
    (
        "acks_skipped_total",
        Kind::Counter,
        "Stored messages not acknowledged because the connection they came on was gone (the broker sends them again; they are deduplicated).",
    ),
    (
        "record_commit_latency_seconds",
        Kind::Histogram(LATENCY_BUCKETS),
        "From a record's capture (the agent's clock) to the commit of the transaction that stored it, per stored record: the sensor-to-database latency (meaningful when the clocks agree).",
    ),
    (
        "record_commit_latency_max_seconds",
        Kind::Gauge,
        "The highest record_commit_latency_seconds observed since the service started.",
    ),
    (
        "commit_watermarks_total",
        Kind::Counter,
        "Commit watermark messages to devices (end-to-end acknowledgement), by outcome: sent, or retried because the connection could not take them.",
    ),
    (
        "retention_deleted_total",
        Kind::Counter,
        "Rows deleted by retention, by table.",
    ),
    (
        "http_requests_total",
        Kind::Counter,
        "HTTP requests, by method, route and status.",
    ),
    (
        "http_request_seconds",
        Kind::Histogram(SECONDS_BUCKETS),
        "HTTP request latency, by route.",
    ),
];

pub const PREFIX: &str = "ember_fleet_";

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

#[derive(Debug, Default)]
struct Families {
    /// name -> rendered labels -> value
    scalars: BTreeMap<&'static str, BTreeMap<String, f64>>,
    histograms: BTreeMap<&'static str, BTreeMap<String, Histogram>>,
}

/// The registry; shared by every task behind an `Arc`.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Families>,
}

fn family(name: &str) -> Option<(&'static str, Kind)> {
    FAMILIES
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(n, k, _)| (*n, *k))
}

fn render_labels(labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let mut out = String::from("{");
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{k}=\"");
        for c in v.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out.push('}');
    out
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Families> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds `by` to a counter. Unknown names are a programming error and are ignored (debug
    /// builds assert).
    pub fn inc(&self, name: &str, labels: &[(&str, &str)], by: u64) {
        let Some((name, kind)) = family(name) else {
            debug_assert!(false, "unknown metric {name}");
            return;
        };
        debug_assert_eq!(kind, Kind::Counter, "{name}");
        *self
            .lock()
            .scalars
            .entry(name)
            .or_default()
            .entry(render_labels(labels))
            .or_default() += by as f64;
    }

    /// Sets a gauge.
    pub fn set(&self, name: &str, labels: &[(&str, &str)], value: f64) {
        let Some((name, kind)) = family(name) else {
            debug_assert!(false, "unknown metric {name}");
            return;
        };
        debug_assert_eq!(kind, Kind::Gauge, "{name}");
        self.lock()
            .scalars
            .entry(name)
            .or_default()
            .insert(render_labels(labels), value);
    }

    /// Records one observation in a histogram.
    pub fn observe(&self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.observe_many(name, labels, &[value]);
    }

    /// Records several observations in a histogram, taking the lock once.
    pub fn observe_many(&self, name: &str, labels: &[(&str, &str)], values: &[f64]) {
        let Some((name, Kind::Histogram(buckets))) = family(name) else {
            debug_assert!(false, "unknown histogram {name}");
            return;
        };
        let mut inner = self.lock();
        let h = inner
            .histograms
            .entry(name)
            .or_default()
            .entry(render_labels(labels))
            .or_insert_with(|| Histogram {
                counts: vec![0; buckets.len()],
                ..Histogram::default()
            });
        for value in values {
            for (i, le) in buckets.iter().enumerate() {
                if value <= le {
                    h.counts[i] += 1;
                }
            }
            h.sum += value;
            h.count += 1;
        }
    }

    /// Raises a gauge to `value` if it is higher.
    pub fn raise(&self, name: &str, labels: &[(&str, &str)], value: f64) {
        let Some((name, kind)) = family(name) else {
            debug_assert!(false, "unknown metric {name}");
            return;
        };
        debug_assert_eq!(kind, Kind::Gauge, "{name}");
        let mut inner = self.lock();
        let v = inner
            .scalars
            .entry(name)
            .or_default()
            .entry(render_labels(labels))
            .or_insert(value);
        if value > *v {
            *v = value;
        }
    }

    /// The current value of a counter or gauge (0 if never set); for tests and health checks.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.lock()
            .scalars
            .get(name)
            .and_then(|m| m.get(&render_labels(labels)))
            .copied()
            .unwrap_or(0.0)
    }

    /// The Prometheus text exposition format.
    pub fn render(&self) -> String {
        let inner = self.lock();
        let mut out = String::new();
        for (name, kind, help) in FAMILIES {
            let full = format!("{PREFIX}{name}");
            let type_name = match kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
                Kind::Histogram(_) => "histogram",
            };
            let _ = writeln!(out, "# HELP {full} {help}");
            let _ = writeln!(out, "# TYPE {full} {type_name}");
            match kind {
                Kind::Counter | Kind::Gauge => {
                    if let Some(series) = inner.scalars.get(name) {
                        for (labels, v) in series {
                            let _ = writeln!(out, "{full}{labels} {v}");
                        }
                    }
                }
                Kind::Histogram(buckets) => {
                    if let Some(series) = inner.histograms.get(name) {
                        for (labels, h) in series {
                            let inner_labels = labels
                                .strip_prefix('{')
                                .and_then(|l| l.strip_suffix('}'))
                                .map(|l| format!("{l},"))
                                .unwrap_or_default();
                            for (le, c) in buckets.iter().zip(&h.counts) {
                                let _ =
                                    writeln!(out, "{full}_bucket{{{inner_labels}le=\"{le}\"}} {c}");
                            }
                            let _ = writeln!(
                                out,
                                "{full}_bucket{{{inner_labels}le=\"+Inf\"}} {}",
                                h.count
                            );
                            let _ = writeln!(out, "{full}_sum{labels} {}", h.sum);
                            let _ = writeln!(out, "{full}_count{labels} {}", h.count);
                        }
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let m = Metrics::new();
        m.inc("rejects_total", &[("reason", "crc")], 2);
        m.inc("rejects_total", &[("reason", "crc")], 1);
        m.observe("db_seconds", &[("op", "flush")], 0.003);
        m.set("mqtt_connected", &[], 1.0);
        let text = m.render();
        assert!(
            text.contains("ember_fleet_rejects_total{reason=\"crc\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("ember_fleet_db_seconds_bucket{op=\"flush\",le=\"0.005\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("ember_fleet_db_seconds_bucket{op=\"flush\",le=\"0.001\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("ember_fleet_db_seconds_count{op=\"flush\"} 1"),
            "{text}"
        );
        assert!(text.contains("ember_fleet_mqtt_connected 1"), "{text}");
        assert_eq!(m.value("rejects_total", &[("reason", "crc")]), 3.0);
    }
}
