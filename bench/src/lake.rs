//! `ember-bench lake`: the data lake's export throughput (records/s into Parquet) against
//! writing the same rows into the database in the same run, and the lake's size per million
//! records against the database's.
//!
//! Per database case (SQLite in a temp dir; a throwaway PostgreSQL 15 cluster with production
//! durability): `--records` telemetry records of `--devices` devices × `--channels` values are
//! inserted the way the fleet's writer does (multi-row `INSERT ... ON CONFLICT DO NOTHING`, 100
//! rows a statement, `--batch` rows a transaction): that is the baseline rate. Then each stream's
//! commit watermark is set to its last seq and one `Lake::pass` exports everything to a local
//! directory (exactly what the leader does: the export ranges recorded, the rows read, Parquet
//! written and fsynced, the files recorded, the watermarks moved): that is the lake's rate.
//! Sizes: the lake's files against the telemetry table (SQLite: the database file after a WAL
//! checkpoint; PostgreSQL: `pg_total_relation_size('telemetry')`, indexes included).

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use ember_fleet::config::Settings;
use ember_fleet::db::{Db, Sql};
use ember_fleet::server::lake::Lake;
use ember_testkit::TestPostgres;
use sqlx::Row;

#[derive(clap::Args, Clone)]
pub struct Args {
    /// Cases, in order: sqlite, postgres.
    #[arg(long, value_delimiter = ',', default_value = "sqlite,postgres")]
    db: Vec<String>,
    /// Telemetry records in all.
    #[arg(long, default_value_t = 1_000_000)]
    records: u64,
    #[arg(long, default_value_t = 10)]
    devices: u64,
    #[arg(long, default_value_t = 6)]
    channels: usize,
    /// Rows per database transaction.
    #[arg(long, default_value_t = 1000)]
    batch: u64,
}

const ROWS_PER_STATEMENT: u64 = 100;

pub async fn run(args: Args) -> Result<()> {
    println!("machine: {}", super::machine());
    println!(
        "records: {} ({} devices, {} channels each)",
        args.records, args.devices, args.channels
    );
    println!(
        "| database | database insert (records/s) | lake export (records/s) | export / insert | database MB per 1M records | lake MB per 1M records | lake / database size |"
    );
    println!("|---|---|---|---|---|---|---|");
    for case in &args.db {
        let dir = tempfile::tempdir()?;
        let pg;
        let url = match case.as_str() {
            "sqlite" => format!("sqlite://{}", dir.path().join("fleet.db").display()),
            "postgres" => {
                pg = TestPostgres::start_durable();
                pg.url()
            }
            other => anyhow::bail!("unknown --db case {other:?}: use sqlite or postgres"),
        };
        let lake_dir = dir.path().join("lake");
        let settings = Settings::from_toml(
            &format!(
                "[database]\nurl = \"{url}\"\n[lake]\nstore = \"{}\"\n",
                lake_dir.display()
            ),
            "bench",
            Vec::new(),
        )?;
        let db = Db::open(&settings.database).await?;
        let t = Instant::now();
        insert(&db, &args).await?;
        let insert_rate = args.records as f64 / t.elapsed().as_secs_f64();
        // Everything is committed: each stream's watermark is its last seq.
        let per = args.records / args.devices;
        for d in 0..args.devices {
            let mut q = Sql::new(
                "INSERT INTO streams (device_id, stream, kind, last_seq, max_seq, committed_through) VALUES (",
            );
            q.bind(device(d)).push(", 'imu', 'telemetry', ");
            q.bind(per as i64).push(", ").bind(per as i64).push(", ");
            q.bind(per as i64).push(")");
            q.query().execute(db.pool()).await?;
        }
        let lake = Lake::open(db.clone(), settings.lake.as_ref().context("lake settings")?)?;
        let t = Instant::now();
        let pass = lake.pass().await?;
        let export_rate = args.records as f64 / t.elapsed().as_secs_f64();
        let exported: u64 = pass.records.values().sum();
        anyhow::ensure!(
            exported == per * args.devices,
            "exported {exported} of {} records",
            per * args.devices
        );
        let lake_bytes = dir_bytes(&lake_dir);
        let db_bytes = match case.as_str() {
            "sqlite" => {
                sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                    .execute(db.pool())
                    .await?;
                std::fs::metadata(dir.path().join("fleet.db"))?.len()
            }
            _ => sqlx::query("SELECT pg_total_relation_size('telemetry') AS n")
                .fetch_one(db.pool())
                .await?
                .try_get::<i64, _>("n")? as u64,
        };
        db.close().await;
        let per_million = |b: u64| b as f64 / 1e6 / (args.records as f64 / 1e6);
        println!(
            "| {case} | {insert_rate:.0} | {export_rate:.0} | {:.2} | {:.1} | {:.1} | {:.3} |",
            export_rate / insert_rate,
            per_million(db_bytes),
            per_million(lake_bytes),
            lake_bytes as f64 / db_bytes as f64
        );
        println!(
            "  ({case}: {} files, {} bytes in the lake, {} bytes of database)",
            pass.files, lake_bytes, db_bytes
        );
    }
    Ok(())
}

fn device(d: u64) -> String {
    format!("lake-bench-{d:03}")
}

/// The rows, as the fleet's writer stores them: per transaction `batch` rows in statements of
/// 100 rows of one device's stream; values like a slowly varying 6-axis sensor.
async fn insert(db: &Db, args: &Args) -> Result<()> {
    let per = args.records / args.devices;
    let base_ts: i64 = 1_765_000_000_000_000;
    let at = ember_fleet::db::now_us();
    let mut seq = vec![0u64; args.devices as usize];
    let mut written = 0u64;
    let mut d = 0usize;
    while written < per * args.devices {
        let mut tx = db.pool().begin().await?;
        let mut in_tx = 0;
        while in_tx < args.batch && written < per * args.devices {
            let n = ROWS_PER_STATEMENT.min(per - seq[d]);
            let mut q = Sql::new(
                "INSERT INTO telemetry (device_id, stream, seq, ts, vals, received_at) VALUES ",
            );
            let dev = q.param(device(d as u64).as_str());
            let stream = q.param("imu");
            for i in 0..n {
                seq[d] += 1;
                let s = seq[d] as i64;
                if i > 0 {
                    q.push(", ");
                }
                q.push(&format!("({dev}, {stream}, "));
                let vals: Vec<u8> = (0..args.channels)
                    .flat_map(|c| ((s as f32 * 0.01).sin() * 9.81 + c as f32).to_le_bytes())
                    .collect();
                q.bind(s).push(", ").bind(base_ts + s * 10_000).push(", ");
                q.bind(vals).push(", ").bind(at).push(")");
            }
            q.push(" ON CONFLICT (device_id, stream, seq) DO NOTHING");
            q.query().execute(&mut *tx).await?;
            in_tx += n;
            written += n;
            d = (d + 1) % args.devices as usize;
            while written < per * args.devices && seq[d] >= per {
                d = (d + 1) % args.devices as usize;
            }
        }
        tx.commit().await?;
    }
    Ok(())
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            total += dir_bytes(&p);
        } else if let Ok(m) = p.metadata() {
            total += m.len();
        }
    }
    total
}
