//! The data lake (`[lake]`, fleet-api/src/server/lake/): a real `ember-fleet` process (on
//! SQLite and on PostgreSQL) exports what devices send (telemetry and model results) as Parquet files to a
//! directory, is SIGKILLed twice where its fault hook stopped the lake task in the middle of
//! the work (after an export wrote its files and before it recorded them; after a compaction
//! replaced its inputs' rows and before it deleted their files), and at the end DuckDB, reading the lake without Ember,
//! finds every record exactly once, with the counts and sums of what was sent and the counts
//! of the fleet's ledger.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use ember_fleet::config::Settings;
use ember_fleet::db::{Db, Sql};
use ember_testkit::{TestBroker, TestS3};
use serde_json::Value;
use sqlx::Row;

use crate::on_both_backends;
use crate::support::mqtt::{Msg, Out, batch, inference_batch, publish};
use crate::support::replicas::{FleetProcess, wait_for};
use crate::support::{Kind, Store, TestFleet, WAIT, client_id, config, now_us, stream_ledger};

const DEVICES: usize = 4;
/// Telemetry records per device and phase, and model results per device and phase.
const TELEMETRY: u64 = 300;
const RESULTS: u64 = 100;
const FAULT: &str = "EMBER_FLEET_FAULT_LAKE_CRASH";

fn device(i: usize) -> String {
    format!("lake-{i:02}")
}

/// Phase `phase` (0, 1) of every device: telemetry `imu` and results `imu.activity`, spread
/// over two UTC days so exports split by day.
fn phase(phase: u64) -> Vec<Msg> {
    let day = 86_400_000_000u64;
    let base = (now_us() / day) * day - day + phase * day - 150_000;
    let mut msgs = Vec::new();
    for i in 0..DEVICES {
        let d = device(i);
        let first = phase * TELEMETRY + 1;
        let seqs: Vec<u64> = (first..first + TELEMETRY).collect();
        for chunk in seqs.chunks(50) {
            // ts = base + seq ms: phase 0's records straddle a midnight.
            msgs.push(Msg::telemetry(&batch(
                &d,
                "imu",
                chunk.iter().copied(),
                base,
            )));
        }
        let first = phase * RESULTS + 1;
        let seqs: Vec<u64> = (first..first + RESULTS).collect();
        for chunk in seqs.chunks(25) {
            let results: Vec<(u64, u64, Out<'_>)> = chunk
                .iter()
                .map(|&s| {
                    let out = if s % 2 == 0 {
                        Out::Class("Walking", 1, &[0.2, 0.8])
                    } else {
                        Out::Class("Standing", 0, &[0.9, 0.1])
                    };
                    (s, base + 200_000 + s * 1000, out)
                })
                .collect();
            msgs.push(inference_batch(&d, "imu", "activity", "1.0.0", &results));
        }
    }
    msgs
}

/// The lake at `root` as DuckDB reads it (`tests/python/lake_query.py`).
pub(crate) fn duckdb(root: &Path) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/lake_query.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(root)
        .output()
        .expect("run python3 (pip install -r fleet-api/tests/python/requirements.txt)");
    assert!(
        out.status.success(),
        "lake_query.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("lake_query.py prints JSON")
}

/// Waits until the fleet's fault hook stopped the lake task (the `nth` time it did in this
/// test's log, at `point`), then SIGKILLs the fleet there.
fn sigkill_at_hook(fleet: &mut FleetProcess, nth: usize, point: &str) {
    wait_for(&format!("the {point} fault hook"), WAIT, || {
        fleet
            .log_text()
            .matches("Fault hook EMBER_FLEET_FAULT_LAKE_CRASH: stopped at")
            .count()
            >= nth
    });
    assert!(
        fleet.log_text().contains(&format!("stopped at {point}")),
        "{}",
        fleet.log_text()
    );
    fleet.sigkill();
}

/// Every file under `root` (relative paths), recursively.
fn files(root: &Path) -> Vec<String> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, root, out);
            } else {
                out.push(
                    p.strip_prefix(root)
                        .expect("well-formed test data")
                        .display()
                        .to_string(),
                );
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

struct LakeDb {
    rt: tokio::runtime::Runtime,
    pool: sqlx::AnyPool,
}

impl LakeDb {
    fn open(url: &str) -> LakeDb {
        sqlx::any::install_default_drivers();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let pool = rt
            .block_on(sqlx::AnyPool::connect(url))
            .expect("connect to the test database");
        LakeDb { rt, pool }
    }

    fn count(&self, sql: &str) -> i64 {
        self.rt
            .block_on(sqlx::query(sql).fetch_one(&self.pool))
            .expect(sql)
            .try_get::<i64, _>(0)
            .expect("a count")
    }

    fn paths(&self) -> Vec<String> {
        let rows = self
            .rt
            .block_on(
                sqlx::query("SELECT path FROM lake_files ORDER BY path").fetch_all(&self.pool),
            )
            .expect("lake_files");
        rows.iter()
            .map(|r| r.try_get("path").expect("well-formed test data"))
            .collect()
    }
}

on_both_backends!(
    fleet_killed_mid_export_and_mid_compaction_twice_leaves_every_record_in_the_lake_once
);

fn fleet_killed_mid_export_and_mid_compaction_twice_leaves_every_record_in_the_lake_once(
    kind: Kind,
) {
    let store = Store::new(kind);
    let broker = TestBroker::start();
    let data = tempfile::tempdir().expect("temp dir");
    let lake = tempfile::tempdir().expect("temp dir");
    let extra = format!(
        "[lake]\nstore = \"{}\"\ninterval_s = 1\nmax_rows_per_file = 40\ncompact_min_files = 4\ncompact_target_bytes = 1048576\n",
        lake.path().display()
    );
    let started = std::time::Instant::now();

    // The fleet ingests phase 0 and dies in its 5th export, after writing the files and
    // before recording them.
    let mut fleet = FleetProcess::start_env(
        &store.url(),
        broker.port(),
        &client_id(),
        data.path(),
        &extra,
        &[(FAULT, "export:5")],
    );
    publish(broker.port(), phase(0));
    sigkill_at_hook(&mut fleet, 1, "export");
    let db = LakeDb::open(&store.url());
    assert!(
        db.count("SELECT COUNT(*) FROM lake_exports WHERE done_at IS NULL") >= 1,
        "the crash left no export pending"
    );

    // Second run: phase 1 arrives while it exports; it dies in its 2nd compaction, after the
    // merged file replaced its inputs' rows and before the input files are deleted.
    fleet.set_env(FAULT, Some("compaction:2"));
    fleet.respawn();
    publish(broker.port(), phase(1));
    sigkill_at_hook(&mut fleet, 2, "compaction");
    assert!(
        db.count("SELECT COUNT(*) FROM lake_compactions WHERE done_at IS NULL") >= 1,
        "the crash left no compaction unfinished"
    );

    // Third run: no fault. It finishes both and catches up.
    fleet.set_env(FAULT, None);
    fleet.restart();
    let (tel, res) = (2 * TELEMETRY, 2 * RESULTS);
    wait_for("every ledger complete", WAIT, || {
        (0..DEVICES).all(|i| {
            let d = device(i);
            [("imu", tel), ("imu.activity", res)].iter().all(|(s, n)| {
                stream_ledger(fleet.port, &d, s)
                    .is_some_and(|l| l["received"] == *n && l["missing_count"] == 0)
            })
        })
    });
    wait_for("the lake caught up", WAIT, || {
        db.count("SELECT COUNT(*) FROM streams WHERE lake_through < committed_through") == 0
            && db.count("SELECT COUNT(*) FROM lake_exports WHERE done_at IS NULL") == 0
            && db.count("SELECT COUNT(*) FROM lake_compactions WHERE done_at IS NULL") == 0
            && fleet.metric("lake_export_lag_records") == 0.0
    });

    check_lake(&duckdb(lake.path()), fleet.port, tel, res);

    // The lake holds exactly the files the database lists: no orphan, no temporary file, no
    // compacted input left behind.
    let on_disk = files(lake.path());
    assert_eq!(on_disk, db.paths(), "files on disk vs lake_files");
    assert!(
        on_disk.iter().any(|p| p.contains("-c0")),
        "no compacted file: {on_disk:?}"
    );
    let compactions = db.count("SELECT COUNT(*) FROM lake_compactions");
    let exports = db.count("SELECT COUNT(*) FROM lake_exports");
    let log = fleet.log_text();
    assert_eq!(
        log.matches("Fault hook EMBER_FLEET_FAULT_LAKE_CRASH")
            .count(),
        2
    );
    let bytes: u64 = on_disk
        .iter()
        .map(|p| {
            std::fs::metadata(lake.path().join(p))
                .expect("well-formed test data")
                .len()
        })
        .sum();
    println!(
        "lake: {} records in {} files ({bytes} B) from {exports} exports and {compactions} compactions, 2 kills, {:.1} s",
        DEVICES as u64 * (tel + res),
        on_disk.len(),
        started.elapsed().as_secs_f64()
    );
    fleet.stop();
}

/// DuckDB's view of the lake (`lake_query.py`) holds every record of every device's `imu`
/// (`tel` records) and `imu.activity` (`res` results) exactly once, as the ledger counts them.
fn check_lake(lake_view: &Value, fleet_port: u16, tel: u64, res: u64) {
    let by_stream = |kind: &str| -> BTreeMap<(String, String), Value> {
        lake_view[kind]
            .as_array()
            .expect("rows")
            .iter()
            .map(|r| {
                (
                    (
                        r["device"]
                            .as_str()
                            .expect("well-formed test data")
                            .to_string(),
                        r["stream"]
                            .as_str()
                            .expect("well-formed test data")
                            .to_string(),
                    ),
                    r.clone(),
                )
            })
            .collect()
    };
    let telemetry = by_stream("telemetry");
    let inference = by_stream("inference");
    assert_eq!(telemetry.len(), DEVICES, "{lake_view}");
    assert_eq!(inference.len(), DEVICES, "{lake_view}");
    for i in 0..DEVICES {
        let d = device(i);
        for (rows, stream, n) in [(&telemetry, "imu", tel), (&inference, "imu.activity", res)] {
            let r = &rows[&(d.clone(), stream.to_string())];
            let ledger = stream_ledger(fleet_port, &d, stream).expect("ledger");
            assert_eq!(r["n"], n, "{d}/{stream}: {r}");
            assert_eq!(r["n"], ledger["received"], "{d}/{stream}: lake vs ledger");
            assert_eq!(
                r["distinct_seq"], n,
                "{d}/{stream}: duplicates in the lake: {r}"
            );
            assert_eq!(r["sum_seq"], n * (n + 1) / 2, "{d}/{stream}: {r}");
            assert_eq!(
                (r["min_seq"].as_u64(), r["max_seq"].as_u64()),
                (Some(1), Some(n))
            );
        }
        // Values [seq, seq/2]: the sum over 1..=n is 1.5 n(n+1)/2.
        let sum = telemetry[&(d.clone(), "imu".to_string())]["value_sum"]
            .as_f64()
            .expect("well-formed test data");
        assert!(
            (sum - 1.5 * (tel * (tel + 1) / 2) as f64).abs() < 1.0,
            "{sum}"
        );
    }
    assert_eq!(lake_view["misplaced"], 0, "rows in another day's partition");
    assert_eq!(lake_view["schema_versions"], serde_json::json!(["1"]));
}

/// The lake in an S3-compatible object store (moto's server): the same exactly-once content,
/// read by DuckDB from a copy of the bucket, with small files compacted in the bucket.
#[test]
fn a_lake_in_s3_holds_every_record_once() {
    let s3 = TestS3::start();
    s3.create_bucket("ember-lake");
    let broker = TestBroker::start();
    let store = Store::new(Kind::Sqlite);
    let text = config(
        &store.url(),
        broker.port(),
        &client_id(),
        "[lake]\nstore = \"s3://ember-lake/prod\"\ninterval_s = 1\nmax_rows_per_file = 40\ncompact_min_files = 4\n",
    );
    let mut settings = Settings::from_toml(&text, "test", Vec::new()).expect("settings");
    // What AWS_ENDPOINT_URL, AWS_ALLOW_HTTP, AWS_ACCESS_KEY_ID, ... say in production.
    settings.lake.as_mut().expect("lake settings").store_options = s3.client_options();
    let fleet = TestFleet::spawn_settings(settings, 0);
    fleet.wait_healthy();
    publish(broker.port(), phase(0));
    publish(broker.port(), phase(1));
    let (tel, res) = (2 * TELEMETRY, 2 * RESULTS);
    let total = DEVICES as f64 * (tel + res) as f64;
    wait_for("the lake caught up", WAIT, || {
        let m = fleet.metrics();
        let exported: f64 = ["telemetry", "inference"]
            .iter()
            .filter_map(|k| m.get(&format!("lake_exported_records_total{{kind=\"{k}\"}}")))
            .sum();
        exported == total
            && m.get("lake_export_lag_records") == Some(&0.0)
            && m.get("lake_compactions_total").is_some_and(|c| *c > 0.0)
    });
    // Copy the bucket's objects under prod/ to a directory, as `aws s3 sync` would.
    let listing = s3.request("GET", "/ember-lake?list-type=2&prefix=prod/");
    assert_eq!(listing.status, 200);
    let xml = String::from_utf8_lossy(&listing.body).to_string();
    let keys: Vec<String> = regex_lite::Regex::new("<Key>([^<]+)</Key>")
        .expect("regex")
        .captures_iter(&xml)
        .map(|c| c[1].to_string())
        .collect();
    assert!(!keys.is_empty(), "{xml}");
    assert!(
        keys.iter().any(|k| k.contains("-c0")),
        "no compacted object: {keys:?}"
    );
    let copy = tempfile::tempdir().expect("temp dir");
    for key in &keys {
        let object = s3.get("ember-lake", key);
        assert_eq!(object.status, 200, "{key}");
        let path = copy
            .path()
            .join(key.strip_prefix("prod/").expect("under the prefix"));
        std::fs::create_dir_all(path.parent().expect("a directory")).expect("mkdir");
        std::fs::write(&path, &object.body).expect("write the copy");
    }
    check_lake(&duckdb(copy.path()), fleet.port, tel, res);
    println!("lake in S3: {} objects, {total} records", keys.len());
}

/// With the lake on, retention deletes old records only once the lake holds them; without it,
/// as before, by age alone.
#[test]
fn retention_keeps_what_the_lake_does_not_hold_yet() {
    let store = Store::new(Kind::Sqlite);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let settings = Settings::from_toml(
            &format!("[database]\nurl = \"{}\"\n", store.url()),
            "test",
            Vec::new(),
        )
        .expect("settings");
        let db = Db::open(&settings.database).await.expect("database");
        let day = 86_400_000_000i64;
        let now = ember_fleet::db::now_us();
        // Ten records 40 days old of one stream; the lake holds 1..=4.
        for seq in 1..=10i64 {
            let mut q = Sql::new(
                "INSERT INTO telemetry (device_id, stream, seq, ts, vals, received_at) VALUES ('r', 'imu', ",
            );
            q.bind(seq).push(", ").bind(now - 40 * day).push(", ");
            q.bind(vec![0u8; 4]).push(", ").bind(now - 40 * day).push(")");
            q.query().execute(db.pool()).await.expect("insert");
        }
        sqlx::query(
            "INSERT INTO streams (device_id, stream, last_seq, max_seq, committed_through, lake_through) \
             VALUES ('r', 'imu', 10, 10, 10, 4)",
        )
        .execute(db.pool())
        .await
        .expect("stream");
        let mut retention = settings.retention.clone();
        retention.telemetry_days = 30;
        retention.keep_unexported = true;
        let pruned = ember_fleet::server::retention::prune(&db, &retention, now)
            .await
            .expect("prune");
        assert_eq!(pruned.telemetry, 4, "only what the lake holds goes");
        sqlx::query("UPDATE streams SET lake_through = 10")
            .execute(db.pool())
            .await
            .expect("update");
        let pruned = ember_fleet::server::retention::prune(&db, &retention, now)
            .await
            .expect("prune");
        assert_eq!(pruned.telemetry, 6, "the rest once exported");
        db.close().await;
    });
}
