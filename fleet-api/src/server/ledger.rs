//! The durability ledger: for every stream of a device, does the fleet hold every record the
//! agent captured, and if not, is each gap explained?
//!
//! Definitions (per device and stream; all sets are of sequence numbers):
//! * **captured** = the agent's `last_seq` (from `Status.streams[]`, only ever raised): records
//!   `1..=captured` exist or existed on the device.
//! * **received** = distinct sequence numbers ever stored (a counter raised only by rows an
//!   `INSERT ... ON CONFLICT DO NOTHING` actually inserted, so it survives retention and
//!   never counts a duplicate).
//! * **missing** = `1..=captured` minus what was stored. Computed in SQL from the gaps between
//!   consecutive stored sequence numbers (`LAG(seq)`), above the stream's retention watermark
//!   (`pruned_through`), plus the gaps that retention archived (`archived_gaps`) when it deleted
//!   the rows around them.
//! * **evicted** = the union of every `evicted` range the agent ever reported for the stream
//!   (a status carries at most 32, so the fleet keeps them all).
//! * **pending** = the newest `queued` sequence numbers (`captured − queued + 1 ..= captured`)
//!   that the agent's last status still held in its queue: not delivered yet, not lost. The
//!   agent delivers a stream in order and evicts oldest-first, so its queue is always this
//!   tail.
//! * **lost** = missing − evicted − pending: gaps nobody has explained. On a healthy fleet it
//!   is empty.

use serde::Serialize;
use sqlx::Row;
use utoipa::ToSchema;

use crate::db::{Db, Sql};
use crate::ranges::{RangeSet, SeqRange};

/// Most ranges listed per kind in one ledger response; counts are always complete.
pub const MAX_LISTED_RANGES: usize = 1000;

/// An evicted range with the reasons the agent gave for it.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct EvictedSpan {
    pub from: u64,
    pub to: u64,
    /// `bytes`, `age`, `disk`, `corrupt` or `reset` (see docs/protocol.md), or `rejected`: the
    /// fleet refused the message that carried them (see the device's rejects).
    pub reasons: Vec<String>,
}

/// The ledger of one stream.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct StreamLedger {
    pub stream: String,
    /// `telemetry` (sensor records) or `inference` (model results).
    pub kind: String,
    /// The agent's `last_seq`: records `1..=captured` were captured.
    pub captured: u64,
    /// Distinct sequence numbers stored (ever; retention does not lower it).
    pub received: u64,
    /// Copies received again and ignored.
    pub duplicates: u64,
    /// Records that arrived after retention had passed their sequence number (not stored).
    pub expired: u64,
    /// Records the agent's last status said were still queued on the device.
    pub queued: u64,
    /// The commit watermark the fleet publishes to the device (end-to-end acknowledgement):
    /// every record `1..=committed` is stored, refused (`rejected`), below retention, or below
    /// what the agent still queues.
    pub committed: u64,
    pub missing_count: u64,
    pub evicted_count: u64,
    pub pending_count: u64,
    pub lost_count: u64,
    /// Sequence numbers in `1..=captured` that were never stored.
    pub missing: Vec<SeqRange>,
    /// Ranges the agent evicted on purpose, merged across all its status messages.
    pub evicted: Vec<EvictedSpan>,
    /// Still queued on the device (`captured - queued + 1 ..= captured`), if any.
    pub pending: Option<SeqRange>,
    /// Missing and explained by nothing: neither evicted nor pending.
    pub lost: Vec<SeqRange>,
    /// Whether a list above was cut at 1000 ranges (the counts are complete).
    pub truncated: bool,
}

/// The table holding a stream's records, by `streams.kind`: a closed set, so it can be
/// formatted into SQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordsTable {
    Telemetry,
    Inference,
}

impl std::fmt::Display for RecordsTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RecordsTable::Telemetry => "telemetry",
            RecordsTable::Inference => "inference",
        })
    }
}

/// `inference` streams keep their records in `inference`, every other in `telemetry`.
pub fn records_table(kind: &str) -> RecordsTable {
    if kind == "inference" {
        RecordsTable::Inference
    } else {
        RecordsTable::Telemetry
    }
}

fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// The ledger of every stream of `device`, in stream order.
pub async fn device_ledger(db: &Db, device: &str) -> Result<Vec<StreamLedger>, sqlx::Error> {
    let mut q = Sql::new(
        "SELECT stream, kind, last_seq, queued, received, duplicates, expired, pruned_through, \
         committed_through \
         FROM streams WHERE device_id = ",
    );
    q.bind(device).push(" ORDER BY stream");
    let rows = q.query().fetch_all(db.pool()).await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let stream: String = row.try_get("stream")?;
        let last_seq: i64 = row.try_get("last_seq")?;
        let queued: i64 = row.try_get("queued")?;
        let pruned: i64 = row.try_get("pruned_through")?;
        let kind: String = row.try_get("kind")?;
        let table = records_table(&kind);
        let live = live_gaps(db.pool(), table, device, &stream, pruned, last_seq).await?;
        let archived = archived_gaps(db, device, &stream, last_seq).await?;
        let missing = live.union(&archived).clamp(u(last_seq));
        let (evicted_set, evicted) = evicted(db, device, &stream).await?;
        let pending = (queued > 0 && last_seq > 0)
            .then(|| SeqRange::new(u((last_seq - queued + 1).max(1)), u(last_seq)));
        let pending_set = RangeSet::from_ranges(pending);
        let lost = missing.subtract(&evicted_set).subtract(&pending_set);
        let truncated = missing.ranges().len() > MAX_LISTED_RANGES
            || lost.ranges().len() > MAX_LISTED_RANGES
            || evicted.len() > MAX_LISTED_RANGES;
        out.push(StreamLedger {
            captured: u(last_seq),
            received: u(row.try_get("received")?),
            duplicates: u(row.try_get("duplicates")?),
            expired: u(row.try_get("expired")?),
            queued: u(queued),
            committed: u(row.try_get("committed_through")?),
            missing_count: missing.count(),
            evicted_count: evicted_set.count(),
            pending_count: missing.intersect(&pending_set).count(),
            lost_count: lost.count(),
            missing: missing
                .ranges()
                .iter()
                .take(MAX_LISTED_RANGES)
                .copied()
                .collect(),
            evicted: evicted.into_iter().take(MAX_LISTED_RANGES).collect(),
            pending,
            lost: lost
                .ranges()
                .iter()
                .take(MAX_LISTED_RANGES)
                .copied()
                .collect(),
            truncated,
            stream,
            kind,
        });
    }
    Ok(out)
}

/// Gaps among the stored sequence numbers in `(floor, top]`, as computed by the database: each
/// stored seq paired with its predecessor (`LAG`, the floor for the first), and a sentinel
/// `top + 1` closing the range, so a trailing gap shows up like any other. One ordered scan of
/// the primary key; nothing but the gaps leaves the database.
pub async fn live_gaps<'e, E>(
    ex: E,
    table: RecordsTable,
    device: &str,
    stream: &str,
    floor: i64,
    top: i64,
) -> Result<RangeSet, sqlx::Error>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    if top <= floor {
        return Ok(RangeSet::default());
    }
    let mut q = Sql::new("");
    let d = q.param(device);
    let s = q.param(stream);
    let lo = q.param(floor);
    let hi = q.param(top);
    q.push(&format!(
        "SELECT prev + 1 AS gap_from, seq - 1 AS gap_to FROM ( \
           SELECT seq, LAG(seq, 1, {lo}) OVER (ORDER BY seq) AS prev FROM ( \
             SELECT seq FROM {table} \
              WHERE device_id = {d} AND stream = {s} AND seq > {lo} AND seq <= {hi} \
             UNION ALL SELECT {hi} + 1 AS seq \
           ) AS stored \
         ) AS pairs WHERE seq > prev + 1 ORDER BY gap_from"
    ));
    let rows = q.query().fetch_all(ex).await?;
    let mut gaps = Vec::with_capacity(rows.len());
    for row in rows {
        let from: i64 = row.try_get("gap_from")?;
        let to: i64 = row.try_get("gap_to")?;
        gaps.push(SeqRange::new(u(from), u(to)));
    }
    Ok(RangeSet::from_ranges(gaps))
}

async fn archived_gaps(
    db: &Db,
    device: &str,
    stream: &str,
    top: i64,
) -> Result<RangeSet, sqlx::Error> {
    let mut q = Sql::new("SELECT from_seq, to_seq FROM archived_gaps WHERE device_id = ");
    q.bind(device).push(" AND stream = ").bind(stream);
    q.push(" AND from_seq <= ").bind(top);
    let rows = q.query().fetch_all(db.pool()).await?;
    let mut gaps = Vec::with_capacity(rows.len());
    for row in rows {
        gaps.push(SeqRange::new(
            u(row.try_get("from_seq")?),
            u(row.try_get("to_seq")?),
        ));
    }
    Ok(RangeSet::from_ranges(gaps))
}

/// The union of the evicted ranges, and the merged spans with their reasons.
async fn evicted(
    db: &Db,
    device: &str,
    stream: &str,
) -> Result<(RangeSet, Vec<EvictedSpan>), sqlx::Error> {
    let mut q = Sql::new("SELECT from_seq, to_seq, reason FROM evicted_ranges WHERE device_id = ");
    q.bind(device).push(" AND stream = ").bind(stream);
    q.push(" ORDER BY from_seq, to_seq");
    let rows = q.query().fetch_all(db.pool()).await?;
    let mut raw = Vec::with_capacity(rows.len());
    for row in rows {
        let r = SeqRange::new(u(row.try_get("from_seq")?), u(row.try_get("to_seq")?));
        raw.push((r, row.try_get::<String, _>("reason")?));
    }
    let set = RangeSet::from_ranges(raw.iter().map(|(r, _)| *r));
    let spans = set
        .ranges()
        .iter()
        .map(|span| {
            let mut reasons: Vec<String> = raw
                .iter()
                .filter(|(r, _)| r.from <= span.to && r.to >= span.from)
                .map(|(_, reason)| reason.clone())
                .collect();
            reasons.sort();
            reasons.dedup();
            EvictedSpan {
                from: span.from,
                to: span.to,
                reasons,
            }
        })
        .collect();
    Ok((set, spans))
}
