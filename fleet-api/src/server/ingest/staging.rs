//! PostgreSQL bulk ingest: the writer's telemetry rows go to the server as one binary `COPY`
//! into a staging table, and the batch's transaction moves them into `telemetry` with
//! `INSERT ... SELECT ... ON CONFLICT DO NOTHING RETURNING`, so idempotency and every count
//! the writer keeps are exactly those of the multi-row `INSERT` it replaces.
//!
//! Why a table of its own and not a `TEMP` one: the pool is sqlx's `Any` driver, which cannot
//! issue `COPY`, so the copy runs on a second connection (a `PgConnection` the writer owns)
//! and the batch's transaction on a pooled one; a temporary table would be invisible to it.
//!
//! Layout and lifecycle:
//! * Each writer owns one `UNLOGGED` table `ingest_staging_<8 hex digits>` (random), with the
//!   columns of `telemetry` and no key. It holds scratch only: nothing in it is ever needed
//!   after the batch that copied it commits, so it is not WAL-logged (a server crash empties
//!   it) and the copy connection runs with `synchronous_commit = off`. Autovacuum is off for
//!   it: every batch truncates it, and an autovacuum holding its lock would stall the next
//!   `TRUNCATE` until the server cancels it (`deadlock_timeout`).
//! * The writer holds the session advisory lock `(STAGING_LOCK_CLASS, <those digits>)` on its
//!   copy connection for as long as the table is its own. When it starts it drops every other
//!   `ingest_staging_*` table whose lock it can take: their writers are gone (the lock dies
//!   with the session), so replicas never drop each other's tables.
//! * Per batch, on the copy connection: `BEGIN; TRUNCATE; COPY ... FROM STDIN (FORMAT binary);
//!   COMMIT`, then on the batch's transaction the `INSERT ... SELECT` (in key order, as the
//!   multi-row statement listed them). The writer writes one batch at a time, so the table
//!   holds exactly the batch being written; a retried batch is copied again.
//!
//! Guarantees: the rows reach `telemetry` only through the batch's transaction, so a crash at
//! any point leaves at most stale scratch rows, which the next copy truncates. A copy
//! connection that fails is dropped and opened again on the next batch; a server that refuses
//! the setup itself (no right to create a table) disables `COPY` for the writer's lifetime,
//! which then uses the multi-row `INSERT` as before.

use sqlx::{Connection, Executor, PgConnection, Row};

/// The first key of the staging tables' advisory locks ("EMBR").
const STAGING_LOCK_CLASS: i32 = 0x454d_4252;
const TABLE_PREFIX: &str = "ingest_staging_";
/// How long a copy waits for a lock on its own table (only a rolled-back batch's connection
/// can hold one, until the pool's ping flushes its `ROLLBACK`).
const LOCK_TIMEOUT: &str = "5s";

/// One row of the staging table (the columns of `telemetry`).
pub struct StagedRow<'a> {
    pub device: &'a str,
    pub stream: &'a str,
    pub seq: i64,
    pub ts: i64,
    /// Stored as the writer stores them: little-endian f32s in a `BYTEA`.
    pub vals: &'a [f32],
    pub received_at: i64,
}

/// The binary `COPY` stream of `rows` (PostgreSQL's `PGCOPY` format): the signature, flags and
/// header extension length, then per row the field count and each field as its length and
/// big-endian value, then the trailer.
pub fn encode_binary<'a>(rows: impl IntoIterator<Item = StagedRow<'a>>) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 * 1024);
    out.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    out.extend_from_slice(&0i32.to_be_bytes());
    out.extend_from_slice(&0i32.to_be_bytes());
    for r in rows {
        out.extend_from_slice(&6i16.to_be_bytes());
        field(&mut out, r.device.as_bytes());
        field(&mut out, r.stream.as_bytes());
        field(&mut out, &r.seq.to_be_bytes());
        field(&mut out, &r.ts.to_be_bytes());
        let len = i32::try_from(r.vals.len() * 4).unwrap_or(i32::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        for v in r.vals {
            out.extend_from_slice(&v.to_le_bytes());
        }
        field(&mut out, &r.received_at.to_be_bytes());
    }
    out.extend_from_slice(&(-1i16).to_be_bytes());
    out
}

fn field(out: &mut Vec<u8>, bytes: &[u8]) {
    // Values are bounded far below 2 GiB (classify() limits message sizes).
    let len = i32::try_from(bytes.len()).unwrap_or(i32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
}

/// The writer's copy connection and its staging table.
pub struct Staging {
    conn: PgConnection,
    table: String,
}

impl Staging {
    /// Opens the copy connection, claims a staging table and drops those of writers that are
    /// gone.
    pub async fn open(url: &str) -> Result<Staging, sqlx::Error> {
        let mut conn = PgConnection::connect(url).await?;
        conn.execute(
            format!("SET synchronous_commit = off; SET lock_timeout = '{LOCK_TIMEOUT}'").as_str(),
        )
        .await?;
        let id = loop {
            let mut b = [0u8; 4];
            getrandom::fill(&mut b)
                .map_err(|e| sqlx::Error::Protocol(format!("no randomness: {e}")))?;
            let id = u32::from_le_bytes(b);
            let locked: bool = sqlx::query("SELECT pg_try_advisory_lock($1, $2) AS locked")
                .bind(STAGING_LOCK_CLASS)
                .bind(id as i32)
                .fetch_one(&mut conn)
                .await?
                .try_get("locked")?;
            if locked {
                break id;
            }
        };
        let table = format!("{TABLE_PREFIX}{id:08x}");
        // Another start may be dropping orphans while this one creates its table: both only
        // touch tables whose lock they hold.
        conn.execute(
            format!(
                "CREATE UNLOGGED TABLE IF NOT EXISTS {table} (device_id TEXT NOT NULL, \
                 stream TEXT NOT NULL, seq BIGINT NOT NULL, ts BIGINT NOT NULL, \
                 vals BYTEA NOT NULL, received_at BIGINT NOT NULL) \
                 WITH (autovacuum_enabled = false, toast.autovacuum_enabled = false)"
            )
            .as_str(),
        )
        .await?;
        let others: Vec<String> = sqlx::query(
            "SELECT relname FROM pg_class WHERE relkind = 'r' AND relname LIKE 'ingest\\_staging\\_%' \
             AND relnamespace = to_regnamespace(current_schema())::oid",
        )
        .fetch_all(&mut conn)
        .await?
        .iter()
        .filter_map(|r| r.try_get::<String, _>("relname").ok())
        .filter(|n| *n != table)
        .collect();
        for name in others {
            let Some(other) = name
                .strip_prefix(TABLE_PREFIX)
                .and_then(|h| u32::from_str_radix(h, 16).ok())
            else {
                continue;
            };
            let orphan: bool = sqlx::query("SELECT pg_try_advisory_lock($1, $2) AS locked")
                .bind(STAGING_LOCK_CLASS)
                .bind(other as i32)
                .fetch_one(&mut conn)
                .await?
                .try_get("locked")?;
            if orphan {
                conn.execute(format!("DROP TABLE IF EXISTS {name}").as_str())
                    .await?;
                sqlx::query("SELECT pg_advisory_unlock($1, $2)")
                    .bind(STAGING_LOCK_CLASS)
                    .bind(other as i32)
                    .execute(&mut conn)
                    .await?;
                tracing::info!(table = %name, "Dropped the staging table of a writer that is gone.");
            }
        }
        Ok(Staging { conn, table })
    }

    /// The staging table's name (for the batch's `INSERT ... SELECT`).
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Replaces the staging table's rows with `copy` (an [`encode_binary`] stream), committed.
    pub async fn stage(&mut self, copy: &[u8]) -> Result<u64, sqlx::Error> {
        let mut tx = self.conn.begin().await?;
        tx.execute(format!("TRUNCATE {}", self.table).as_str())
            .await?;
        let mut c = tx
            .copy_in_raw(&format!(
                "COPY {} (device_id, stream, seq, ts, vals, received_at) FROM STDIN (FORMAT binary)",
                self.table
            ))
            .await?;
        if let Err(e) = c.send(copy).await {
            let _ = c.abort(e.to_string()).await;
            return Err(e);
        }
        let n = c.finish().await?;
        tx.commit().await?;
        Ok(n)
    }

    /// Closes the connection (its advisory lock goes with it) and drops the table.
    pub async fn close(mut self) {
        let _ = self
            .conn
            .execute(format!("DROP TABLE IF EXISTS {}", self.table).as_str())
            .await;
        let _ = self.conn.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_copy_stream_has_pgcopy_framing() {
        let out = encode_binary([StagedRow {
            device: "d",
            stream: "s",
            seq: 7,
            ts: -1,
            vals: &[1.0],
            received_at: 258,
        }]);
        let mut want = b"PGCOPY\n\xff\r\n\0".to_vec();
        want.extend([0, 0, 0, 0, 0, 0, 0, 0]);
        want.extend([0, 6]);
        want.extend([0, 0, 0, 1, b'd']);
        want.extend([0, 0, 0, 1, b's']);
        want.extend([0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 7]);
        want.extend([0, 0, 0, 8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        want.extend([0, 0, 0, 4]);
        want.extend(1.0f32.to_le_bytes());
        want.extend([0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 1, 2]);
        want.extend([0xff, 0xff]);
        assert_eq!(out, want);
    }
}
