//! End-to-end acknowledgement, the fleet's half: the per-stream commit watermark, raised inside
//! the writer's transaction, and the publisher that sends each device its watermarks after the
//! commit (`docs/protocol.md`, "End-to-end acknowledgement").
//!
//! ```text
//! writer: INSERT rows ─▶ advance(stream) ─▶ streams.committed_through ─▶ COMMIT ─▶ Commits::touch(device)
//!                                                                                  │ ≤ 1/s per device
//! Commits::run: SELECT committed_through ─▶ Committed{streams} ─▶ DeviceSink ─▶ ember/v1/{device}/committed
//! ```
//!
//! Guarantees:
//! * `streams.committed_through` MUST only name records that are committed: every seq
//!   `1..=committed_through` is stored (in this transaction or before), lies at or below the
//!   retention floor (`pruned_through`: retention passed it), or lies below the lowest
//!   sequence number the agent still queues (`StreamStatus::head`: the agent can never send it
//!   again, whether it was delivered, evicted or lost). It is only ever raised.
//! * A range of records the fleet refused (a message that failed validation and would fail
//!   again: a record's CRC, non-increasing seqs, a schema misfit) is settled: stored as an
//!   evicted range with reason `rejected` (the ledger explains it instead of calling it lost),
//!   and the watermark passes it, so the agent stops re-sending it. A message the database
//!   refused (`storage`) is not settled: the agent keeps it and sends it again.
//! * A watermark is published only after the transaction that raised it committed; a crash in
//!   between costs a re-send at worst (the agent keeps the records; stored rows are never
//!   inserted twice).
//! * Every device whose records or status a batch carried is answered with a watermark (at
//!   most once per [`MIN_INTERVAL`]), changed or not: an unchanged watermark tells the agent
//!   that the fleet is alive and lacks the records after it, which is when the agent re-sends.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ember_proto::{Committed, CommittedStream, Encoding};
use rumqttc::v5::AsyncClient;
use rumqttc::v5::mqttbytes::QoS;
use sqlx::Row;
use tokio_util::sync::CancellationToken;

use crate::db::{Db, Sql, now_us};
use crate::metrics::Metrics;
use crate::server::ledger::RecordsTable;

/// A device gets at most one watermark message per this interval.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// Devices whose watermarks one database query loads.
const DEVICES_PER_QUERY: usize = 200;

type Tx = sqlx::Transaction<'static, sqlx::Any>;

/// The highest `c' >= from` such that every seq in `from+1..=c'` is stored or refused: first
/// through the batch's own sequence numbers (`batch`, ascending, all stored now), then, if rows
/// stored earlier lie above (`stored_max`, the stream's highest stored seq), through the table
/// with one query that stops at the first gap; a gap that is a refused range is passed and the
/// walk goes on. Refused ranges are looked up only where the walk stops below stored rows, or
/// everywhere with `refused_at_top` (the status and refusal paths; the ingest path skips the
/// query when nothing is stored above, so a batch costs no extra statement).
pub(crate) async fn advance(
    tx: &mut Tx,
    table: RecordsTable,
    key: (&str, &str),
    from: i64,
    batch: &[i64],
    stored_max: i64,
    refused_at_top: bool,
) -> Result<i64, sqlx::Error> {
    let mut c = from;
    loop {
        let reached = advance_stored(tx, table, key, c, batch, stored_max).await?;
        if reached >= stored_max && !refused_at_top {
            return Ok(reached);
        }
        match refused_through(tx, key, reached + 1).await? {
            Some(to) if to > reached => c = to,
            _ => return Ok(reached),
        }
    }
}

/// The end of the refused range holding `seq`, if one does.
async fn refused_through(
    tx: &mut Tx,
    (device, stream): (&str, &str),
    seq: i64,
) -> Result<Option<i64>, sqlx::Error> {
    let mut q = Sql::new("SELECT MAX(to_seq) AS upto FROM evicted_ranges WHERE device_id = ");
    q.bind(device).push(" AND stream = ").bind(stream);
    q.push(" AND reason = 'rejected' AND from_seq <= ")
        .bind(seq)
        .push(" AND to_seq >= ")
        .bind(seq);
    let row = q.query().fetch_one(&mut **tx).await?;
    row.try_get::<Option<i64>, _>("upto")
}

/// [`advance`] through stored rows only.
async fn advance_stored(
    tx: &mut Tx,
    table: RecordsTable,
    (device, stream): (&str, &str),
    from: i64,
    batch: &[i64],
    stored_max: i64,
) -> Result<i64, sqlx::Error> {
    let mut c = from;
    let start = batch.partition_point(|s| *s <= c);
    for s in &batch[start..] {
        if *s != c + 1 {
            break;
        }
        c += 1;
    }
    if c >= stored_max {
        return Ok(c);
    }
    // The first gap above `c` among the stored rows, with a sentinel past the highest stored
    // seq so that a run reaching the top ends in a gap too. Only the rows up to the first gap
    // matter; with the gap right at `c + 1` (a stream waiting for a re-send) the first row
    // decides.
    let top = stored_max.max(batch.last().copied().unwrap_or(0));
    let mut q = Sql::new("");
    let d = q.param(device);
    let s = q.param(stream);
    let lo = q.param(c);
    let sentinel = q.param(top.saturating_add(2));
    q.push(&format!(
        "SELECT prev + 1 AS gap FROM ( \
           SELECT seq, LAG(seq, 1, {lo}) OVER (ORDER BY seq) AS prev FROM ( \
             SELECT seq FROM {table} WHERE device_id = {d} AND stream = {s} AND seq > {lo} \
             UNION ALL SELECT {sentinel} AS seq \
           ) AS stored \
         ) AS pairs WHERE seq > prev + 1 ORDER BY seq LIMIT 1"
    ));
    let gap: Option<i64> = q
        .query()
        .fetch_optional(&mut **tx)
        .await?
        .map(|row| row.try_get("gap"))
        .transpose()?;
    Ok(gap.map_or(c, |g| (g - 1).max(c)))
}

/// Raises the watermarks of a status's streams to what the agent can no longer send (below
/// its `head`) and walks on through the stored rows. Runs in the writer's transaction after
/// the status's stream rows were upserted.
pub(crate) async fn advance_from_status(
    tx: &mut Tx,
    status: &ember_proto::Status,
) -> Result<(), sqlx::Error> {
    for s in &status.streams {
        // Nothing below `floor` will ever come again: the agent holds only `head..=last_seq`.
        let floor = match s.head {
            Some(head) => head.saturating_sub(1),
            None if s.queued == 0 && status.delivery.is_some() => s.last_seq,
            None => continue,
        };
        let floor = i64::try_from(floor).unwrap_or(i64::MAX);
        advance_stream(tx, &status.device, &s.stream, floor).await?;
    }
    Ok(())
}

/// Settles records the fleet refused (see the module docs): an evicted range with reason
/// `rejected`, then the stream's watermark walks on past it.
pub(crate) async fn settle_refused(
    tx: &mut Tx,
    device: &str,
    r: &super::classify::Refused,
    at: i64,
) -> Result<(), sqlx::Error> {
    let (first, last) = (
        i64::try_from(r.first).unwrap_or(i64::MAX),
        i64::try_from(r.last).unwrap_or(i64::MAX),
    );
    let mut q = Sql::new("INSERT INTO streams (device_id, stream, kind) VALUES (");
    q.bind(device).push(", ").bind(r.stream.as_str());
    q.push(&format!(
        ", '{}') ON CONFLICT (device_id, stream) DO NOTHING",
        r.kind
    ));
    q.query().execute(&mut **tx).await?;
    let mut q = Sql::new(
        "INSERT INTO evicted_ranges (device_id, stream, from_seq, to_seq, reason, reported_at) VALUES (",
    );
    q.bind(device).push(", ").bind(r.stream.as_str()).push(", ");
    q.bind(first).push(", ").bind(last).push(", 'rejected', ");
    q.bind(at)
        .push(") ON CONFLICT (device_id, stream, from_seq, to_seq, reason) DO NOTHING");
    q.query().execute(&mut **tx).await?;
    advance_stream(tx, device, &r.stream, 0).await
}

/// Walks a stream's watermark from where it stands (at least `floor`) and stores it if it rose.
async fn advance_stream(
    tx: &mut Tx,
    device: &str,
    stream: &str,
    floor: i64,
) -> Result<(), sqlx::Error> {
    let mut q = Sql::new(
        "SELECT kind, committed_through, pruned_through, max_seq FROM streams WHERE device_id = ",
    );
    q.bind(device).push(" AND stream = ").bind(stream);
    let Some(row) = q.query().fetch_optional(&mut **tx).await? else {
        return Ok(());
    };
    let kind: String = row.try_get("kind")?;
    let committed: i64 = row.try_get("committed_through")?;
    let pruned: i64 = row.try_get("pruned_through")?;
    let max_seq: i64 = row.try_get("max_seq")?;
    let from = committed.max(pruned).max(floor);
    let c = advance(
        tx,
        crate::server::ledger::records_table(&kind),
        (device, stream),
        from,
        &[],
        max_seq,
        true,
    )
    .await?;
    if c > committed {
        let mut q = Sql::new("UPDATE streams SET committed_through = ");
        q.bind(c).push(" WHERE device_id = ").bind(device);
        q.push(" AND stream = ").bind(stream);
        q.push(" AND committed_through < ").bind(c);
        q.query().execute(&mut **tx).await?;
    }
    Ok(())
}

/// Why a [`DeviceSink`] could not take a message now.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The transport's queue is full or it is not connected: try again later.
    #[error("the device channel is busy: {0}")]
    Busy(String),
}

/// How the fleet sends a device its commit watermark: the downlink of a connection profile.
/// The MQTT profile publishes a retained message on `ember/v1/{device}/committed`
/// ([`MqttSink`]); a cloud profile whose broker keeps no retained messages or limits topics
/// per device carries it the way it carries desired state there (a device twin property, a
/// cloud-to-device message), as long as the latest watermark reaches a device that
/// reconnects.
pub trait DeviceSink: Send + Sync + 'static {
    /// Sends `watermark` to its device, replacing any earlier one.
    fn send(&self, watermark: &Committed) -> Result<(), SinkError>;
}

/// The MQTT profile: a retained QoS 0 message on the ingestion connection. QoS 0 keeps it out
/// of the in-flight window that carries ingestion's PUBACKs and out of the broker's queue for
/// an offline device; the retained copy reaches the device when it subscribes, and a lost one
/// is superseded by the next.
pub struct MqttSink {
    pub client: AsyncClient,
}

impl DeviceSink for MqttSink {
    fn send(&self, watermark: &Committed) -> Result<(), SinkError> {
        let payload = ember_proto::message::encode(watermark, Encoding::Json)
            .map_err(|e| SinkError::Busy(e.to_string()))?;
        let topic = format!(
            "{}/{}/{}",
            ember_proto::topic::PREFIX,
            watermark.device,
            ember_proto::commit::COMMITTED
        );
        self.client
            .try_publish(topic, QoS::AtMostOnce, true, payload)
            .map_err(|e| SinkError::Busy(e.to_string()))
    }
}

/// The devices waiting for a watermark, and when each last got one.
#[derive(Default)]
pub struct Commits {
    state: Mutex<CommitState>,
    wake: tokio::sync::Notify,
}

#[derive(Default)]
struct CommitState {
    dirty: BTreeSet<String>,
    last_sent: HashMap<String, Instant>,
}

impl Commits {
    /// After a commit: these devices are due a watermark.
    pub fn touch<'a>(&self, devices: impl IntoIterator<Item = &'a str>) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let before = st.dirty.len();
        for d in devices {
            if !st.dirty.contains(d) {
                st.dirty.insert(d.to_string());
            }
        }
        if st.dirty.len() > before {
            drop(st);
            self.wake.notify_one();
        }
    }

    /// The dirty devices not answered within [`MIN_INTERVAL`] (taken out of the set), and
    /// when the next of the others is due.
    fn take_due(&self, now: Instant) -> (Vec<String>, Option<Instant>) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut due = Vec::new();
        let mut next: Option<Instant> = None;
        let dirty = std::mem::take(&mut st.dirty);
        for d in dirty {
            match st.last_sent.get(&d) {
                Some(t) if now.duration_since(*t) < MIN_INTERVAL => {
                    let at = *t + MIN_INTERVAL;
                    next = Some(next.map_or(at, |n| n.min(at)));
                    st.dirty.insert(d);
                }
                _ => due.push(d),
            }
        }
        // Forget devices not heard from for a while, so the map stays bounded.
        if st.last_sent.len() > 4 * (due.len() + st.dirty.len()) + 1024 {
            st.last_sent
                .retain(|_, t| now.duration_since(*t) < MIN_INTERVAL * 60);
        }
        (due, next)
    }

    fn sent(&self, device: &str, at: Instant) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.last_sent.insert(device.to_string(), at);
    }

    fn retry(&self, devices: impl IntoIterator<Item = String>) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.dirty.extend(devices);
    }

    /// Publishes due watermarks until `stop` fires.
    pub async fn run(
        self: Arc<Self>,
        db: Db,
        sink: Arc<dyn DeviceSink>,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) {
        loop {
            let (due, next) = self.take_due(Instant::now());
            if !due.is_empty() {
                self.publish(&db, &*sink, &metrics, due).await;
                continue;
            }
            let wait = next.map(|n| n.saturating_duration_since(Instant::now()));
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait.unwrap_or(Duration::from_secs(3600))), if wait.is_some() => {}
            }
        }
    }

    async fn publish(&self, db: &Db, sink: &dyn DeviceSink, metrics: &Metrics, due: Vec<String>) {
        for chunk in due.chunks(DEVICES_PER_QUERY) {
            let watermarks = match load(db, chunk).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(error = %e, devices = chunk.len(), "Cannot read commit watermarks; retrying.");
                    self.retry(chunk.iter().cloned());
                    tokio::time::sleep(MIN_INTERVAL).await;
                    return;
                }
            };
            for device in chunk {
                let Some(w) = watermarks.get(device.as_str()) else {
                    continue;
                };
                match sink.send(w) {
                    Ok(()) => {
                        self.sent(device, Instant::now());
                        metrics.inc("commit_watermarks_total", &[("outcome", "sent")], 1);
                    }
                    Err(e) => {
                        tracing::debug!(%device, error = %e, "Cannot send a commit watermark now; retrying.");
                        metrics.inc("commit_watermarks_total", &[("outcome", "retried")], 1);
                        self.retry([device.clone()]);
                    }
                }
            }
        }
    }
}

/// The watermarks of `devices`, one message per device that has streams.
async fn load(db: &Db, devices: &[String]) -> Result<BTreeMap<String, Committed>, sqlx::Error> {
    let mut q =
        Sql::new("SELECT device_id, stream, committed_through FROM streams WHERE device_id IN (");
    for (i, d) in devices.iter().enumerate() {
        if i > 0 {
            q.push(", ");
        }
        q.bind(d.as_str());
    }
    q.push(") ORDER BY device_id, stream");
    let ts = u64::try_from(now_us()).unwrap_or(0);
    let mut out: BTreeMap<String, Committed> = BTreeMap::new();
    for row in q.query().fetch_all(db.pool()).await? {
        let device: String = row.try_get("device_id")?;
        let stream: String = row.try_get("stream")?;
        let upto: i64 = row.try_get("committed_through")?;
        out.entry(device.clone())
            .or_insert_with(|| Committed::new(&device, ts))
            .streams
            .push(CommittedStream {
                stream,
                upto: u64::try_from(upto).unwrap_or(0),
            });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_is_answered_at_most_once_per_interval() {
        let c = Commits::default();
        let t0 = Instant::now();
        c.touch(["a", "b"]);
        let (due, next) = c.take_due(t0);
        assert_eq!(due, vec!["a".to_string(), "b".to_string()]);
        assert_eq!(next, None);
        c.sent("a", t0);
        c.touch(["a", "c"]);
        let (due, next) = c.take_due(t0 + Duration::from_millis(10));
        assert_eq!(due, vec!["c".to_string()], "a was answered 10 ms ago");
        assert_eq!(next, Some(t0 + MIN_INTERVAL));
        let (due, _) = c.take_due(t0 + MIN_INTERVAL);
        assert_eq!(due, vec!["a".to_string()], "a stays due until its turn");
    }
}
