//! The service's Prometheus metrics: counters, gauges and histograms keyed by labels, rendered
//! as the text exposition format at `/metrics`.
//!
//! A small registry instead of a metrics crate: every family is declared once in [`FAMILIES`]
//! (name, kind, label names, help), label sets are few and bounded (reasons, channels,
//! operations, routes), and one mutex per update is far below the cost of the database write
//! it accompanies. The metric table of `docs/fleet.md` is generated from [`FAMILIES`]
//! ([`docs_table`]; a unit test compares them), so the docs list exactly what is exported.
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

impl Kind {
    fn type_name(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram(_) => "histogram",
        }
    }
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

/// One metric family: its name (without [`PREFIX`]), kind, label names (in the order every
/// update passes them; debug builds assert it) and help text. The docs' metric tables are
/// generated from this list (`docs_table`), so a family is documented exactly as declared.
#[derive(Debug)]
struct Family {
    name: &'static str,
    kind: Kind,
    labels: &'static [&'static str],
    help: &'static str,
}

/// Every metric family.
const FAMILIES: &[Family] = &[
    Family {
        name: "leader",
        kind: Kind::Gauge,
        labels: &[],
        help: "1 while this replica is the leader (runs the rollout driver, retention and the desired-state publisher), else 0.",
    },
    Family {
        name: "leader_elections_total",
        kind: Kind::Counter,
        labels: &[],
        help: "Times this replica became the leader.",
    },
    Family {
        name: "events_relayed_total",
        kind: Kind::Counter,
        labels: &["channel"],
        help: "Notifications sent to the other replicas (PostgreSQL NOTIFY), by channel: ember_events (live events), ember_desired (wake the publisher).",
    },
    Family {
        name: "events_relay_dropped_total",
        kind: Kind::Counter,
        labels: &["reason"],
        help: "Live events not relayed to the other replicas, by reason: too_large, database.",
    },
    Family {
        name: "events_received_from_replicas_total",
        kind: Kind::Counter,
        labels: &[],
        help: "Live events committed by other replicas and delivered to this replica's event streams.",
    },
    Family {
        name: "mqtt_sessions_ended_total",
        kind: Kind::Counter,
        labels: &[],
        help: "Times this replica left the shared subscription and ended its MQTT session at shutdown (other replicas were running).",
    },
    Family {
        name: "desired_published_total",
        kind: Kind::Counter,
        labels: &[],
        help: "Desired-state messages published (retained) and acknowledged by the broker.",
    },
    Family {
        name: "ota_reports_total",
        kind: Kind::Counter,
        labels: &["outcome"],
        help: "OTA reports from device statuses, by outcome: applied (to an unfinished rollout), ignored.",
    },
    Family {
        name: "rollout_steps_total",
        kind: Kind::Counter,
        labels: &["cause"],
        help: "Rollout steps stored, by cause: create, command, report, tick.",
    },
    Family {
        name: "model_uploads_total",
        kind: Kind::Counter,
        labels: &["outcome"],
        help: "Model bundle uploads, by outcome (registered, invalid, duplicate, too_large).",
    },
    Family {
        name: "model_download_bytes_total",
        kind: Kind::Counter,
        labels: &[],
        help: "Bundle bytes served by the model download route (full and partial responses).",
    },
    Family {
        name: "messages_total",
        kind: Kind::Counter,
        labels: &["channel", "outcome"],
        help: "MQTT messages received, by channel and outcome (accepted, rejected, dropped).",
    },
    Family {
        name: "rejects_total",
        kind: Kind::Counter,
        labels: &["reason"],
        help: "Messages rejected, by reason (too_large, malformed, unsupported_version, crc, device_mismatch, invalid_name, out_of_range, bad_topic, storage, schema).",
    },
    Family {
        name: "records_total",
        kind: Kind::Counter,
        labels: &["outcome"],
        help: "Telemetry records, by outcome: stored (new), duplicate (already stored), expired (below the retention watermark).",
    },
    Family {
        name: "payload_bytes",
        kind: Kind::Histogram(BYTES_BUCKETS),
        labels: &[],
        help: "Size of MQTT payloads received.",
    },
    Family {
        name: "batch_records",
        kind: Kind::Histogram(BATCH_BUCKETS),
        labels: &[],
        help: "Telemetry records per database write batch.",
    },
    Family {
        name: "records_copied_total",
        kind: Kind::Counter,
        labels: &[],
        help: "Telemetry records the PostgreSQL writer sent by binary COPY through its staging table (batches of at least ingest.copy_min_records); each is also counted in records_total as stored or duplicate.",
    },
    Family {
        name: "batch_messages",
        kind: Kind::Histogram(BATCH_BUCKETS),
        labels: &[],
        help: "MQTT messages per database write batch.",
    },
    Family {
        name: "db_seconds",
        kind: Kind::Histogram(SECONDS_BUCKETS),
        labels: &["op"],
        help: "Database latency, by operation (flush: a write batch, ledger: a device ledger for the API, retention: a pass).",
    },
    Family {
        name: "db_errors_total",
        kind: Kind::Counter,
        labels: &["op"],
        help: "Database operations that failed, by operation (flush, retention).",
    },
    Family {
        name: "ingest_pending",
        kind: Kind::Gauge,
        labels: &[],
        help: "Messages waiting between the MQTT reader and the database writer.",
    },
    Family {
        name: "mqtt_connected",
        kind: Kind::Gauge,
        labels: &[],
        help: "1 while connected to the broker.",
    },
    Family {
        name: "mqtt_connections_total",
        kind: Kind::Counter,
        labels: &[],
        help: "Successful connections to the broker.",
    },
    Family {
        name: "kinesis_records_total",
        kind: Kind::Counter,
        labels: &["outcome"],
        help: "Kinesis records read (ingest.source = \"kinesis\"): handed to the writer (`message`), a presence event (`presence`), or an envelope the topic rule did not write (`malformed`, stored as a reject).",
    },
    Family {
        name: "kinesis_shards_leased",
        kind: Kind::Gauge,
        labels: &[],
        help: "Kinesis shards this replica holds the lease of and reads.",
    },
    Family {
        name: "kinesis_millis_behind_latest",
        kind: Kind::Gauge,
        labels: &["shard"],
        help: "How far this replica's reader of a shard is behind the stream's tip (Kinesis's MillisBehindLatest).",
    },
    Family {
        name: "kinesis_errors_total",
        kind: Kind::Counter,
        labels: &["kind"],
        help: "Failed Kinesis calls, by AWS error type (throttling is retried with backoff).",
    },
    Family {
        name: "eventhubs_events_total",
        kind: Kind::Counter,
        labels: &["outcome"],
        help: "Event Hubs events read (ingest.source = \"eventhubs\"): handed to the writer (`message`), a connection-state event (`presence`), not an Ember message (`malformed`, stored as a reject), another IoT Hub source (`skipped`), or at or below the last sequence number handed over (`repeat`).",
    },
    Family {
        name: "eventhubs_partitions_leased",
        kind: Kind::Gauge,
        labels: &[],
        help: "Event Hubs partitions this replica holds the lease of and reads.",
    },
    Family {
        name: "eventhubs_errors_total",
        kind: Kind::Counter,
        labels: &["kind"],
        help: "Event Hubs receivers that could not be opened (`open`) or failed (`receive`); each is reopened after the last event with backoff.",
    },
    Family {
        name: "desired_twin_patches_total",
        kind: Kind::Counter,
        labels: &["outcome"],
        help: "Twin desired-property PATCHes to IoT Hub (desired.sink = \"azure-twin\"): accepted (`ok`), throttled (`throttled`, 429, retried after Retry-After), failed and retried (`retry`) or refused (`error`).",
    },
    Family {
        name: "pubsub_messages_total",
        kind: Kind::Counter,
        labels: &["outcome"],
        help: "Pub/Sub messages read (ingest.source = \"pubsub\"): handed to the writer (`message`), refused before storing and stored as a reject (`refused`), of which copied to the dead-letter topic (`dead_lettered`).",
    },
    Family {
        name: "pubsub_acks_total",
        kind: Kind::Counter,
        labels: &["outcome"],
        help: "Pub/Sub acknowledgements after commit: `acked`, or `failed` (Pub/Sub delivers the message again; it is deduplicated).",
    },
    Family {
        name: "pubsub_errors_total",
        kind: Kind::Counter,
        labels: &["kind"],
        help: "Failed Pub/Sub calls, by what failed (`subscribe`, `dead_letter`, `ack`), retried with backoff.",
    },
    Family {
        name: "bridge_messages_total",
        kind: Kind::Counter,
        labels: &["channel", "outcome"],
        help: "`ember-fleet bridge`: device messages published to Pub/Sub and then acknowledged to the broker (`published`), or QoS 0 heartbeats dropped while the in-flight window was full (`dropped`).",
    },
    Family {
        name: "bridge_in_flight",
        kind: Kind::Gauge,
        labels: &[],
        help: "`ember-fleet bridge`: messages taken from the broker and not yet acknowledged by Pub/Sub (at most bridge.max_in_flight).",
    },
    Family {
        name: "bridge_publish_seconds",
        kind: Kind::Histogram(SECONDS_BUCKETS),
        labels: &[],
        help: "`ember-fleet bridge`: from taking a message from the broker to Pub/Sub's acknowledgement of it.",
    },
    Family {
        name: "bridge_publish_errors_total",
        kind: Kind::Counter,
        labels: &[],
        help: "`ember-fleet bridge`: publishes Pub/Sub failed after its client's retries; the bridge publishes the message again (it is never acknowledged to the broker before).",
    },
    Family {
        name: "acks_skipped_total",
        kind: Kind::Counter,
        labels: &[],
        help: "Stored messages not acknowledged because the connection they came on was gone (the broker sends them again; they are deduplicated).",
    },
    Family {
        name: "record_commit_latency_seconds",
        kind: Kind::Histogram(LATENCY_BUCKETS),
        labels: &[],
        help: "From a record's capture (the agent's clock) to the commit of the transaction that stored it, per stored record: the sensor-to-database latency (meaningful when the clocks agree).",
    },
    Family {
        name: "record_commit_latency_max_seconds",
        kind: Kind::Gauge,
        labels: &[],
        help: "The highest record_commit_latency_seconds observed since the service started.",
    },
    Family {
        name: "commit_watermarks_total",
        kind: Kind::Counter,
        labels: &["outcome"],
        help: "Commit watermark messages to devices (end-to-end acknowledgement), by outcome: sent, or retried because the connection could not take them.",
    },
    Family {
        name: "model_drift_psi",
        kind: Kind::Gauge,
        labels: &["model", "version", "statistic"],
        help: "Population Stability Index of a model version's results in the monitoring window against its bundle's training baseline, by statistic: class, confidence, score, input (largest over the input channels).",
    },
    Family {
        name: "model_drift_alert",
        kind: Kind::Gauge,
        labels: &["model", "version"],
        help: "1 while a model version drifts (enough results and a PSI above its threshold), else 0.",
    },
    Family {
        name: "model_drifting_devices",
        kind: Kind::Gauge,
        labels: &["model", "version"],
        help: "Devices whose own results of this model version drift.",
    },
    Family {
        name: "model_results_in_window",
        kind: Kind::Gauge,
        labels: &["model", "version"],
        help: "Results of this model version in the monitoring window.",
    },
    Family {
        name: "lake_exported_records_total",
        kind: Kind::Counter,
        labels: &["kind"],
        help: "Records exported to the data lake (Parquet), by kind: telemetry, inference. Each (device, stream, seq) is exported exactly once.",
    },
    Family {
        name: "lake_files_written_total",
        kind: Kind::Counter,
        labels: &[],
        help: "Parquet files the lake export wrote (a file rewritten after a crash counts again).",
    },
    Family {
        name: "lake_bytes_written_total",
        kind: Kind::Counter,
        labels: &[],
        help: "Bytes of Parquet files the lake export wrote.",
    },
    Family {
        name: "lake_compactions_total",
        kind: Kind::Counter,
        labels: &[],
        help: "Compactions of small lake files into one.",
    },
    Family {
        name: "lake_errors_total",
        kind: Kind::Counter,
        labels: &[],
        help: "Lake passes that failed (the next pass resumes where it stopped).",
    },
    Family {
        name: "lake_export_lag_records",
        kind: Kind::Gauge,
        labels: &[],
        help: "Records committed to the database but not yet in the lake (leader only).",
    },
    Family {
        name: "lake_export_lag_seconds",
        kind: Kind::Gauge,
        labels: &[],
        help: "Age of the oldest committed record not yet in the lake, by the fleet's clock; 0 when the lake is up to date (leader only).",
    },
    Family {
        name: "lake_pass_seconds",
        kind: Kind::Histogram(SECONDS_BUCKETS),
        labels: &[],
        help: "Duration of one lake pass (export and compaction).",
    },
    Family {
        name: "retention_deleted_total",
        kind: Kind::Counter,
        labels: &["table"],
        help: "Rows deleted by retention, by table.",
    },
    Family {
        name: "devices",
        kind: Kind::Gauge,
        labels: &["state"],
        help: "Registered devices, by state (online, offline: its Last Will or an offline status), as of the last gauge refresh.",
    },
    Family {
        name: "ledger_lost_records",
        kind: Kind::Gauge,
        labels: &[],
        help: "Records the durability ledger cannot account for (missing, not evicted, not pending), summed over every device and stream, as of the last gauge refresh.",
    },
    Family {
        name: "ledger_devices_with_losses",
        kind: Kind::Gauge,
        labels: &[],
        help: "Devices whose ledger has lost records, as of the last gauge refresh.",
    },
    Family {
        name: "gauge_refresh_timestamp_seconds",
        kind: Kind::Gauge,
        labels: &[],
        help: "When the database-derived gauges (devices, ledger_*) were last refreshed (Unix time).",
    },
    Family {
        name: "rollouts_running",
        kind: Kind::Gauge,
        labels: &[],
        help: "Rollouts in the running state.",
    },
    Family {
        name: "rollouts_paused",
        kind: Kind::Gauge,
        labels: &["by"],
        help: "Paused rollouts, by who paused them (operator, failure_threshold: a wave's failures exceeded its threshold).",
    },
    Family {
        name: "tls_cert_expiry_timestamp_seconds",
        kind: Kind::Gauge,
        labels: &["cert"],
        help: "notAfter (Unix time) of a certificate the service presents, by use (http: the API's server certificate, mqtt: the client certificate to the broker); absent without TLS.",
    },
    Family {
        name: "http_requests_total",
        kind: Kind::Counter,
        labels: &["method", "route", "status"],
        help: "HTTP requests, by method, route and status.",
    },
    Family {
        name: "http_request_seconds",
        kind: Kind::Histogram(SECONDS_BUCKETS),
        labels: &["route"],
        help: "HTTP request latency, by route.",
    },
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

fn family(name: &str) -> Option<&'static Family> {
    FAMILIES.iter().find(|f| f.name == name)
}

/// Debug builds refuse an update whose label names differ from the family's declaration, so
/// the generated docs can never list other labels than the ones exported.
fn check_labels(f: &Family, labels: &[(&str, &str)]) {
    debug_assert!(
        labels.iter().map(|(k, _)| *k).eq(f.labels.iter().copied()),
        "metric {} takes the labels {:?}, got {:?}",
        f.name,
        f.labels,
        labels
    );
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
        let Some(f) = family(name) else {
            debug_assert!(false, "unknown metric {name}");
            return;
        };
        debug_assert_eq!(f.kind, Kind::Counter, "{name}");
        check_labels(f, labels);
        *self
            .lock()
            .scalars
            .entry(f.name)
            .or_default()
            .entry(render_labels(labels))
            .or_default() += by as f64;
    }

    /// Sets a gauge.
    pub fn set(&self, name: &str, labels: &[(&str, &str)], value: f64) {
        let Some(f) = family(name) else {
            debug_assert!(false, "unknown metric {name}");
            return;
        };
        debug_assert_eq!(f.kind, Kind::Gauge, "{name}");
        check_labels(f, labels);
        self.lock()
            .scalars
            .entry(f.name)
            .or_default()
            .insert(render_labels(labels), value);
    }

    /// Records one observation in a histogram.
    pub fn observe(&self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.observe_many(name, labels, &[value]);
    }

    /// Records several observations in a histogram, taking the lock once.
    pub fn observe_many(&self, name: &str, labels: &[(&str, &str)], values: &[f64]) {
        let Some(f) = family(name) else {
            debug_assert!(false, "unknown histogram {name}");
            return;
        };
        let Kind::Histogram(buckets) = f.kind else {
            debug_assert!(false, "{name} is not a histogram");
            return;
        };
        check_labels(f, labels);
        let mut inner = self.lock();
        let h = inner
            .histograms
            .entry(f.name)
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
        let Some(f) = family(name) else {
            debug_assert!(false, "unknown metric {name}");
            return;
        };
        debug_assert_eq!(f.kind, Kind::Gauge, "{name}");
        check_labels(f, labels);
        let mut inner = self.lock();
        let v = inner
            .scalars
            .entry(f.name)
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
        for Family {
            name, kind, help, ..
        } in FAMILIES
        {
            let full = format!("{PREFIX}{name}");
            let _ = writeln!(out, "# HELP {full} {help}");
            let _ = writeln!(out, "# TYPE {full} {}", kind.type_name());
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

/// The Markdown table of every family (name, type, labels, help) that `docs/fleet.md`
/// carries between `<!-- BEGIN generated: ember-fleet metrics -->` and its END marker; a unit
/// test keeps the two equal (`EMBER_UPDATE_DOCS=1` rewrites the docs).
pub fn docs_table() -> String {
    let mut out = String::from("| metric | type | labels | meaning |\n|---|---|---|---|\n");
    for f in FAMILIES {
        let labels = if f.labels.is_empty() {
            "-".to_string()
        } else {
            f.labels
                .iter()
                .map(|l| format!("`{l}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            out,
            "| `{PREFIX}{}` | {} | {labels} | {} |",
            f.name,
            f.kind.type_name(),
            f.help.replace('|', "\\|")
        );
    }
    out
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

    #[test]
    fn every_family_renders_its_help_and_type_once() {
        let text = Metrics::new().render();
        for f in FAMILIES {
            let help = format!("# HELP {PREFIX}{} {}\n", f.name, f.help);
            let kind = format!("# TYPE {PREFIX}{} {}\n", f.name, f.kind.type_name());
            assert_eq!(text.matches(&help).count(), 1, "{help}");
            assert_eq!(text.matches(&kind).count(), 1, "{kind}");
        }
        let mut names: Vec<_> = FAMILIES.iter().map(|f| f.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), FAMILIES.len(), "a family is declared twice");
    }

    #[cfg(debug_assertions)]
    #[test]
    #[should_panic(expected = "takes the labels")]
    fn an_update_with_undeclared_labels_is_refused_in_debug_builds() {
        Metrics::new().inc("rejects_total", &[("cause", "crc")], 1);
    }

    /// `docs/fleet.md` lists exactly the families above; on a difference this fails with the
    /// table to paste, and `EMBER_UPDATE_DOCS=1 cargo test -p ember-fleet --lib metrics::`
    /// rewrites it.
    #[test]
    fn the_docs_list_every_metric_as_declared() {
        ember_testkit::docs::check_generated(
            concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/fleet.md"),
            "ember-fleet metrics",
            &docs_table(),
        );
    }
}
