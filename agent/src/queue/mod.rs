//! The durable record queue: every sample is written here before anything else happens to it,
//! and deleted only after the broker acknowledged the message that carried it.
//!
//! # On-disk layout
//!
//! ```text
//! <data_dir>/queue/                 the live sled database (one tree)
//!     'r' stream_id:u32be seq:u64be  -> a stored record, one of two versions (below)
//!     'm' stream_id:u32be            -> StreamMeta JSON {name, next_seq, evicted ranges}
//! <data_dir>/queue.seq              sequence reservations per stream (JSON, replaced atomically)
//! <data_dir>/queue.mark             highest durable seq per stream, as last seen (JSON, replaced
//!                                   atomically; written by `maintain` when it moved, and at `close`)
//! <data_dir>/queue.next/            a compaction in progress (removed, or promoted, at open)
//! <data_dir>/queue.old/             a finished compaction's old copy (removed at open)
//! <data_dir>/queue.corrupt-<unix>/  a database that could not be opened, kept for inspection
//! ```
//!
//! # Stored record versions
//!
//! The byte after the CRC says what a value holds; both are covered by a CRC32 over the key
//! followed by everything after the CRC field, so damage and misplaced values are detected.
//!
//! ```text
//! v1 sample     crc32:u32le | 1 | ts_us:u64le | n:u16le | n × f32le      (ember_proto::StoredRecord)
//! v2 inference  crc32:u32le | 2 | ts_us:u64le | len:u32le | len bytes of JSON
//!               {"source": "<source stream>", "record": <ember_proto::InferenceRecord>}
//! ```
//!
//! A queue written before v2 existed holds only v1 values and opens unchanged. A v2 record's
//! `record.seq` is not meaningful on disk: the key's seq is the record's number. A stream
//! holds one kind only (inference streams are named `{source}.{model}`), and a reader MUST
//! treat an unknown version as corrupt (counted and skipped, never a crash).
//!
//! # Lifecycle
//!
//! `open` recovers: it finishes or discards an interrupted compaction, opens the database
//! (moving an unreadable one aside and starting empty, reported in [`OpenReport`] and the
//! `queue_resets` counter), and scans every record to rebuild counts and drop records whose
//! CRC fails. Then the writer task `append`s batches, the uplink `read`s and `ack`s, and the
//! writer calls `maintain` between batches (age eviction, disk reclaim).
//!
//! # Guarantees
//!
//! * Records MUST get per-stream sequence numbers 1, 2, 3, ... that never repeat, across
//!   restarts, compactions and database resets (resets jump to the persisted reservation in
//!   `queue.seq`, leaving a gap that is reported as an evicted range with reason `reset`).
//! * One `append` is one atomic sled batch, together with the stream metadata it changes.
//! * A database that comes back shorter than it was (a damaged or truncated file that sled
//!   recovers to an earlier state without an error) MUST NOT make numbers repeat: `open`
//!   compares each stream with `queue.mark`, reports the missing records as an evicted range
//!   with reason `corrupt` (counted in `records_corrupt`, logged), and continues after them.
//! * With `fsync = every_batch`, `append` MUST NOT return before the batch is on stable
//!   storage (sled flush + `fsync` of its data file). Loss window: none.
//!   With `interval_ms = N`, records become durable at the next tick. Loss window: the last
//!   N ms on a crash or power loss. With `never`, sled's own flush (every 500 ms, no fsync) is
//!   relied on. Loss window: ~500 ms on a process crash, and whatever the OS had not written
//!   back (Linux: up to ~30 s) on power loss.
//! * The uplink MUST only be handed records that are durable under the policy in force
//!   ([`Queue::read`] stops at the durable watermark), so a record the fleet has seen can never
//!   be lost and its sequence number reused.
//! * Records are deleted only by [`Queue::ack`] (the broker's PUBACK), by eviction (counted by
//!   reason and recorded as ranges in the stream's metadata) or, when their CRC fails, as
//!   corrupt (counted; never a crash).
//! * Eviction (`drop_oldest`) MUST NOT touch a record already handed to the uplink and not yet
//!   acknowledged: it may have reached the fleet, and counting it as evicted would break
//!   `captured = delivered + evicted + queued`.
//! * The byte cap counts key + value bytes of queued records; sled's file is larger and is
//!   reclaimed by compaction when the live data is small.

mod engine;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use ember_proto::{EvictedRange, InferenceRecord, ProtoError, StoredRecord, StreamStatus};
pub use engine::{Engine, Entry, SledEngine};

use crate::config::{FsyncPolicy, FullPolicy, QueueSettings};
use crate::metrics::Metrics;
use crate::source::Sample;

const RECORD_TAG: u8 = b'r';
const META_TAG: u8 = b'm';
const KEY_LEN: usize = 13;
/// Sequence numbers are reserved in `queue.seq` this many at a time.
const RESERVE_BLOCK: u64 = 1 << 16;
/// Evicted ranges kept per stream (oldest dropped first).
const MAX_EVICTED_RANGES: usize = 32;
/// How often `maintain` measures disk usage and checks record ages.
const MAINTAIN_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("cannot open the queue database at {path}: {detail}")]
    Open { path: PathBuf, detail: String },
    #[error(
        "the queue database at {path} is locked by another process: is another ember-agent using the same data_dir? Stop it or give this agent its own data_dir"
    )]
    Locked { path: PathBuf },
    #[error("queue storage error: {0}")]
    Engine(String),
    #[error("{what} failed: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("queue is closed (a compaction failed to reopen it)")]
    Closed,
    #[error("queue storage is recovering from an earlier error (is the disk full?)")]
    Unavailable,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> QueueError {
    let what = what.into();
    move |source| QueueError::Io { what, source }
}

pub type StreamId = u32;

fn record_key(sid: StreamId, seq: u64) -> [u8; KEY_LEN] {
    let mut k = [0u8; KEY_LEN];
    k[0] = RECORD_TAG;
    k[1..5].copy_from_slice(&sid.to_be_bytes());
    k[5..13].copy_from_slice(&seq.to_be_bytes());
    k
}

fn parse_record_key(k: &[u8]) -> Option<(StreamId, u64)> {
    if k.len() != KEY_LEN || k[0] != RECORD_TAG {
        return None;
    }
    let sid = u32::from_be_bytes(k[1..5].try_into().ok()?);
    let seq = u64::from_be_bytes(k[5..13].try_into().ok()?);
    Some((sid, seq))
}

fn meta_key(sid: StreamId) -> Vec<u8> {
    let mut k = vec![META_TAG];
    k.extend_from_slice(&sid.to_be_bytes());
    k
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StreamMeta {
    name: String,
    next_seq: u64,
    #[serde(default)]
    evicted: Vec<EvictedRange>,
}

#[derive(Debug, Clone)]
struct StreamState {
    name: Arc<str>,
    /// The next sequence number to assign.
    next_seq: u64,
    /// Highest sequence number that is durable under the fsync policy.
    durable_upto: u64,
    /// Highest sequence number ever handed to the uplink in this process: never evicted.
    sent_upto: u64,
    records: u64,
    bytes: u64,
    evicted: Vec<EvictedRange>,
    meta_dirty: bool,
}

impl StreamState {
    fn meta(&self) -> StreamMeta {
        StreamMeta {
            name: self.name.to_string(),
            next_seq: self.next_seq,
            evicted: self.evicted.clone(),
        }
    }

    fn note_evicted(&mut self, seq: u64, reason: &str) {
        if let Some(last) = self.evicted.last_mut()
            && last.reason == reason
            && last.to + 1 == seq
        {
            last.to = seq;
            self.meta_dirty = true;
            return;
        }
        self.evicted.push(EvictedRange {
            from: seq,
            to: seq,
            reason: reason.to_string(),
        });
        if self.evicted.len() > MAX_EVICTED_RANGES {
            self.evicted.remove(0);
        }
        self.meta_dirty = true;
    }
}

/// What `open` found.
#[derive(Debug, Default, Clone)]
pub struct OpenReport {
    pub records: u64,
    pub bytes: u64,
    pub corrupt: u64,
    /// Set when the database could not be opened and was replaced by an empty one.
    pub reset: Option<ResetInfo>,
}

#[derive(Debug, Clone)]
pub struct ResetInfo {
    pub reason: String,
    pub moved_to: PathBuf,
}

/// Records read for sending: `(seq, record)` in increasing `seq` order.
pub type ReadBatch = Vec<(u64, QueuedRecord)>;

/// Version byte of a stored inference result (see the module docs).
const INFERENCE_VERSION: u8 = 2;
/// Header of a v2 value: crc, version, ts_us, payload length.
const INFERENCE_HEADER: usize = 4 + 1 + 8 + 4;

/// A stored record as read back: a sample (`values`), or an inference result.
#[derive(Debug, Clone, PartialEq)]
pub struct QueuedRecord {
    pub ts_us: u64,
    /// A sample's values (empty for an inference result).
    pub values: Vec<f32>,
    pub inference: Option<StoredInference>,
}

/// The payload of a v2 record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredInference {
    /// The sensor stream whose window was evaluated.
    pub source: String,
    pub record: InferenceRecord,
}

/// Something the queue can store: it names its stream and encodes its value under a key.
pub trait Enqueue {
    fn stream(&self) -> &Arc<str>;
    /// The encoded value (with its CRC over `key`).
    fn encode(&self, key: &[u8]) -> Vec<u8>;
    /// Bytes it counts against the byte cap (key + value).
    fn size(&self) -> u64;
}

impl Enqueue for Sample {
    fn stream(&self) -> &Arc<str> {
        &self.stream
    }
    fn encode(&self, key: &[u8]) -> Vec<u8> {
        StoredRecord::encode(key, self.ts_us, &self.values)
    }
    fn size(&self) -> u64 {
        Queue::record_size(self.values.len())
    }
}

/// An inference result on its way into the queue (stream `{source}.{model}`).
#[derive(Debug, Clone, PartialEq)]
pub struct InferenceItem {
    pub stream: Arc<str>,
    pub ts_us: u64,
    /// The JSON of a [`StoredInference`].
    pub payload: Vec<u8>,
}

impl InferenceItem {
    pub fn new(stream: Arc<str>, stored: &StoredInference) -> Result<Self, serde_json::Error> {
        Ok(InferenceItem {
            stream,
            ts_us: stored.record.ts,
            payload: serde_json::to_vec(stored)?,
        })
    }
}

impl Enqueue for InferenceItem {
    fn stream(&self) -> &Arc<str> {
        &self.stream
    }
    fn encode(&self, key: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(INFERENCE_HEADER + self.payload.len());
        out.extend_from_slice(&[0; 4]);
        out.push(INFERENCE_VERSION);
        out.extend_from_slice(&self.ts_us.to_le_bytes());
        // A payload is a few hundred bytes; u32 cannot overflow for anything we produce.
        out.extend_from_slice(&(self.payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.payload);
        let mut h = crc32fast::Hasher::new();
        h.update(key);
        h.update(&out[4..]);
        let crc = h.finalize();
        out[..4].copy_from_slice(&crc.to_le_bytes());
        out
    }
    fn size(&self) -> u64 {
        (KEY_LEN + INFERENCE_HEADER + self.payload.len()) as u64
    }
}

/// Decodes a stored value of either version (see the module docs).
pub fn decode_value(key: &[u8], bytes: &[u8]) -> Result<QueuedRecord, ProtoError> {
    if bytes.get(4) != Some(&INFERENCE_VERSION) {
        return StoredRecord::decode(key, bytes).map(|r| QueuedRecord {
            ts_us: r.ts_us,
            values: r.values,
            inference: None,
        });
    }
    if bytes.len() < INFERENCE_HEADER {
        return Err(ProtoError::Truncated {
            needed: INFERENCE_HEADER,
            found: bytes.len(),
        });
    }
    let stored = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let mut h = crc32fast::Hasher::new();
    h.update(key);
    h.update(&bytes[4..]);
    let computed = h.finalize();
    if stored != computed {
        return Err(ProtoError::Checksum { stored, computed });
    }
    let mut ts = [0u8; 8];
    ts.copy_from_slice(&bytes[5..13]);
    let len = u32::from_le_bytes([bytes[13], bytes[14], bytes[15], bytes[16]]) as usize;
    let needed = INFERENCE_HEADER + len;
    if bytes.len() != needed {
        return Err(ProtoError::Truncated {
            needed,
            found: bytes.len(),
        });
    }
    let inference: StoredInference =
        serde_json::from_slice(&bytes[INFERENCE_HEADER..]).map_err(|e| ProtoError::Malformed {
            encoding: "stored inference",
            detail: e.to_string(),
        })?;
    Ok(QueuedRecord {
        ts_us: u64::from_le_bytes(ts),
        values: Vec::new(),
        inference: Some(inference),
    })
}

/// Result of an append: how many samples were taken. With `full_policy = block` a full queue
/// takes fewer than offered; the caller waits for [`Queue::space_freed`] and offers the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendOutcome {
    pub accepted: usize,
}

struct Inner {
    engine: Option<Arc<SledEngine>>,
    streams: Vec<StreamState>,
    by_name: HashMap<Arc<str>, StreamId>,
    records: u64,
    bytes: u64,
    reserved: BTreeMap<String, u64>,
    last_maintain: Option<Instant>,
    /// A storage operation failed; the engine must be reopened before further use.
    poisoned: bool,
    /// `(stream, first, last)` of a batch whose fsync failed: on disk or not, unknown.
    in_doubt: Vec<(String, u64, u64)>,
    /// Records that batch evicted `(for bytes, for disk)`; they count only if it landed.
    in_doubt_evicted: (u64, u64),
}

impl Inner {
    fn engine(&self) -> Result<Arc<SledEngine>, QueueError> {
        if self.poisoned {
            return Err(QueueError::Unavailable);
        }
        self.engine.clone().ok_or(QueueError::Closed)
    }
}

pub struct Queue {
    root: PathBuf,
    settings: QueueSettings,
    metrics: Arc<Metrics>,
    inner: Mutex<Inner>,
    ready: tokio::sync::Notify,
    space: tokio::sync::Notify,
    low_disk_warned: std::sync::atomic::AtomicBool,
    /// What `queue.mark` holds (see the module docs).
    marks: Mutex<BTreeMap<String, u64>>,
}

impl Queue {
    /// Opens the queue under `data_dir`, recovering from crashes and damage (see module docs).
    pub fn open(
        data_dir: &Path,
        settings: QueueSettings,
        metrics: Arc<Metrics>,
    ) -> Result<(Queue, OpenReport), QueueError> {
        std::fs::create_dir_all(data_dir)
            .map_err(io_err(format!("creating data_dir {}", data_dir.display())))?;
        let live = data_dir.join("queue");
        let next = data_dir.join("queue.next");
        let old = data_dir.join("queue.old");
        // Finish or discard an interrupted compaction.
        if next.exists() {
            if live.exists() {
                std::fs::remove_dir_all(&next)
                    .map_err(io_err("removing an unfinished compaction"))?;
            } else {
                std::fs::rename(&next, &live).map_err(io_err("promoting a finished compaction"))?;
            }
        }
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(io_err("removing a compaction's old copy"))?;
        }
        let reserved = read_reservations(data_dir)?;
        let mut report = OpenReport::default();
        let engine = match SledEngine::open(
            &live,
            settings.cache_bytes,
            background_flush(&settings),
        ) {
            Ok(e) => e,
            Err(QueueError::Open { detail, .. }) => {
                let moved_to = data_dir.join(format!(
                    "queue.corrupt-{}",
                    crate::source::now_us() / 1_000_000
                ));
                tracing::error!(
                    path = %live.display(), moved_to = %moved_to.display(), error = %detail,
                    "The queue database cannot be opened; moving it aside and starting an empty queue. Records it held are lost."
                );
                std::fs::rename(&live, &moved_to)
                    .map_err(io_err("moving the damaged queue aside"))?;
                metrics.queue_resets.fetch_add(1, Relaxed);
                report.reset = Some(ResetInfo {
                    reason: detail,
                    moved_to,
                });
                SledEngine::open(&live, settings.cache_bytes, background_flush(&settings))?
            }
            Err(e) => return Err(e),
        };
        let marks = read_marks(data_dir);
        let mut inner = load_state(engine, reserved, &mut report, &metrics)?;
        apply_marks(&mut inner, &marks, &mut report, &metrics)?;
        let queue = Queue {
            root: data_dir.to_path_buf(),
            settings,
            metrics,
            inner: Mutex::new(inner),
            ready: tokio::sync::Notify::new(),
            space: tokio::sync::Notify::new(),
            low_disk_warned: std::sync::atomic::AtomicBool::new(false),
            marks: Mutex::new(marks),
        };
        queue.publish_gauges(&queue.lock());
        Ok((queue, report))
    }

    /// After a storage error (sled refuses all work once an I/O error hit it, e.g. a full
    /// disk), closes and reopens the database and rebuilds the in-memory state from what is
    /// on disk. A batch whose append failed is not in the rebuilt state; its samples are still
    /// with the writer, which retries them. Returns whether the queue is usable.
    pub fn recover(&self) -> bool {
        let mut g = self.lock();
        if !g.poisoned {
            return true;
        }
        if let Some(engine) = g.engine.take()
            && let Err(still_shared) = Arc::try_unwrap(engine)
        {
            g.engine = Some(still_shared);
            return false;
        }
        let live = self.root.join("queue");
        let engine = match SledEngine::open(
            &live,
            self.settings.cache_bytes,
            background_flush(&self.settings),
        ) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "The queue database cannot be reopened yet; retrying.");
                return false;
            }
        };
        let mut report = OpenReport::default();
        let in_doubt = std::mem::take(&mut g.in_doubt);
        let in_doubt_evicted = g.in_doubt_evicted;
        match load_state(
            engine,
            std::mem::take(&mut g.reserved),
            &mut report,
            &self.metrics,
        )
        .and_then(|inner| drop_in_doubt(inner, &in_doubt))
        {
            Ok((inner, landed)) => {
                if !in_doubt.is_empty() && !landed {
                    // The failed batch never reached the disk: neither did its evictions.
                    self.metrics
                        .evicted_bytes
                        .fetch_sub(in_doubt_evicted.0, Relaxed);
                    self.metrics
                        .evicted_disk
                        .fetch_sub(in_doubt_evicted.1, Relaxed);
                }
                *g = inner;
                self.publish_gauges(&g);
                tracing::info!(
                    records = report.records,
                    "Reopened the queue database after a storage error."
                );
                drop(g);
                self.ready.notify_one();
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "The queue database cannot be reloaded yet; retrying.");
                g.poisoned = true;
                g.in_doubt = in_doubt;
                false
            }
        }
    }

    /// Counts a storage error and marks the engine for reopening (see [`Queue::recover`]).
    fn storage_failed(&self, g: &mut Inner, e: &QueueError) {
        self.metrics.storage_errors.fetch_add(1, Relaxed);
        if !g.poisoned {
            tracing::error!(error = %e, "Queue storage failed; records already queued are safe, new ones wait until it recovers.");
        }
        g.poisoned = true;
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves counts that may be off by one batch; the data in
        // sled is still consistent, so carry on rather than poison the whole agent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Up to `limit` entries of `sid` with `from <= seq <= upto`. Consecutive sequence numbers are
/// fetched by point lookups, which in sled cost far less than a range scan starting where
/// earlier acknowledgements left emptied nodes; a gap (evicted records) falls back to a scan.
fn read_entries(
    engine: &dyn Engine,
    sid: StreamId,
    from: u64,
    upto: u64,
    limit: usize,
) -> Result<Vec<Entry>, QueueError> {
    let mut out = Vec::with_capacity(limit.min(1024));
    let mut seq = from;
    while out.len() < limit && seq <= upto {
        let key = record_key(sid, seq);
        match engine.get(&key)? {
            Some(v) => out.push((key.to_vec(), v)),
            None => break,
        }
        seq += 1;
    }
    if out.len() < limit && seq <= upto {
        out.extend(engine.scan(
            &record_key(sid, seq),
            &record_key(sid, upto),
            limit - out.len(),
        )?);
    }
    Ok(out)
}

/// Removes a batch whose fsync failed (if it reached the disk at all) and rewinds its streams'
/// numbering to where the batch began, so the writer's retry reuses the same numbers.
fn drop_in_doubt(
    mut inner: Inner,
    in_doubt: &[(String, u64, u64)],
) -> Result<(Inner, bool), QueueError> {
    let Some(engine) = inner.engine.clone() else {
        return Ok((inner, false));
    };
    let mut puts = Vec::new();
    let mut landed = false;
    for (name, first, last) in in_doubt {
        let Some(&sid) = inner.by_name.get(name.as_str()) else {
            continue;
        };
        let (n, bytes) = engine.delete_range(&record_key(sid, *first), &record_key(sid, *last))?;
        landed |= n > 0;
        let st = &mut inner.streams[sid as usize];
        st.records -= n;
        st.bytes -= bytes;
        st.next_seq = st.next_seq.min(*first);
        st.durable_upto = st.durable_upto.min(first - 1);
        puts.push((meta_key(sid), meta_json(&st.meta())));
        inner.records -= n;
        inner.bytes -= bytes;
    }
    if !puts.is_empty() {
        engine.apply(puts, Vec::new())?;
        engine.sync()?;
    }
    Ok((inner, landed))
}

/// Rebuilds the queue's in-memory state from an opened engine: stream metadata, record counts,
/// corrupt records (dropped and counted), and reservations after a reset.
fn load_state(
    engine: SledEngine,
    reserved: BTreeMap<String, u64>,
    report: &mut OpenReport,
    metrics: &Metrics,
) -> Result<Inner, QueueError> {
    let mut inner = Inner {
        engine: None,
        streams: Vec::new(),
        by_name: HashMap::new(),
        records: 0,
        bytes: 0,
        reserved,
        last_maintain: None,
        poisoned: false,
        in_doubt: Vec::new(),
        in_doubt_evicted: (0, 0),
    };
    // Rebuild state: metadata first (ids, next_seq), then count records.
    let mut metas: BTreeMap<StreamId, StreamMeta> = BTreeMap::new();
    let mut last_seq: HashMap<StreamId, u64> = HashMap::new();
    let mut corrupt_keys = Vec::new();
    let mut per_stream: HashMap<StreamId, (u64, u64)> = HashMap::new();
    engine.for_each(|k, v| {
            if k.first() == Some(&META_TAG) && k.len() == 5 {
                let sid = u32::from_be_bytes([k[1], k[2], k[3], k[4]]);
                match serde_json::from_slice::<StreamMeta>(v) {
                    Ok(m) => {
                        metas.insert(sid, m);
                    }
                    Err(e) => tracing::error!(stream_id = sid, error = %e, "Stream metadata is unreadable; its records will be dropped as corrupt."),
                }
            } else if let Some((sid, seq)) = parse_record_key(k) {
                match decode_value(k, v) {
                    Ok(_) => {
                        let e = per_stream.entry(sid).or_default();
                        e.0 += 1;
                        e.1 += (k.len() + v.len()) as u64;
                        let l = last_seq.entry(sid).or_default();
                        *l = (*l).max(seq);
                    }
                    Err(err) => {
                        tracing::warn!(stream_id = sid, seq, error = %err, "Dropping a corrupt queued record.");
                        corrupt_keys.push((sid, seq, k.to_vec()));
                    }
                }
            } else {
                tracing::warn!(key = ?k, "Ignoring an unknown key in the queue database.");
            }
            Ok(())
        })?;
    let max_sid = metas.keys().copied().max();
    for sid in 0..=max_sid.unwrap_or(0) {
        if max_sid.is_none() {
            break;
        }
        let meta = metas.remove(&sid).unwrap_or_else(|| StreamMeta {
            name: format!("lost-stream-{sid}"),
            next_seq: 1,
            evicted: Vec::new(),
        });
        let (records, bytes) = per_stream.remove(&sid).unwrap_or((0, 0));
        let next_seq = meta.next_seq.max(last_seq.get(&sid).map_or(1, |s| s + 1));
        let name: Arc<str> = meta.name.as_str().into();
        inner.by_name.insert(name.clone(), sid);
        inner.records += records;
        inner.bytes += bytes;
        inner.streams.push(StreamState {
            name,
            next_seq,
            durable_upto: next_seq - 1,
            sent_upto: 0,
            records,
            bytes,
            evicted: meta.evicted,
            meta_dirty: false,
        });
    }
    // Records whose stream metadata is gone cannot be attributed: drop them as corrupt.
    for (sid, _) in per_stream {
        tracing::error!(
            stream_id = sid,
            "Queued records belong to a stream with no metadata; dropping them."
        );
        let (n, _) = engine.delete_range(&record_key(sid, 0), &record_key(sid, u64::MAX))?;
        report.corrupt += n;
    }
    if report.reset.is_some() {
        // Continue every known stream after its reservation, so no number is reused.
        let names: Vec<(String, u64)> = inner
            .reserved
            .iter()
            .map(|(n, r)| (n.clone(), *r))
            .collect();
        for (name, reserved) in names {
            let sid = inner.streams.len() as StreamId;
            let arc: Arc<str> = name.as_str().into();
            let mut st = StreamState {
                name: arc.clone(),
                next_seq: reserved + 1,
                durable_upto: reserved,
                sent_upto: 0,
                records: 0,
                bytes: 0,
                evicted: Vec::new(),
                meta_dirty: true,
            };
            st.evicted.push(EvictedRange {
                from: 1,
                to: reserved,
                reason: "reset".into(),
            });
            inner.by_name.insert(arc, sid);
            inner.streams.push(st);
        }
    }
    for (sid, seq, key) in corrupt_keys {
        engine.apply(Vec::new(), vec![key])?;
        if let Some(st) = inner.streams.get_mut(sid as usize) {
            st.note_evicted(seq, "corrupt");
        }
        report.corrupt += 1;
    }
    metrics.corrupt.fetch_add(report.corrupt, Relaxed);
    let engine = Arc::new(engine);
    inner.engine = Some(engine.clone());
    // Persist metadata changed by recovery.
    let puts: Vec<_> = inner
        .streams
        .iter_mut()
        .enumerate()
        .filter(|(_, s)| s.meta_dirty)
        .map(|(sid, s)| {
            s.meta_dirty = false;
            (meta_key(sid as StreamId), meta_json(&s.meta()))
        })
        .collect();
    if !puts.is_empty() {
        engine.apply(puts, Vec::new())?;
    }
    engine.sync()?;
    report.records = inner.records;
    report.bytes = inner.bytes;
    Ok(inner)
}

impl Queue {
    fn publish_gauges(&self, g: &Inner) {
        self.metrics.queue_records.store(g.records, Relaxed);
        self.metrics.queue_bytes.store(g.bytes, Relaxed);
    }

    pub fn settings(&self) -> &QueueSettings {
        &self.settings
    }

    /// Notified whenever new records become durable (and so readable by the uplink).
    pub fn records_ready(&self) -> &tokio::sync::Notify {
        &self.ready
    }

    /// Notified whenever acknowledgements free space (for `full_policy = block`).
    pub fn space_freed(&self) -> &tokio::sync::Notify {
        &self.space
    }

    /// Appends samples as one atomic batch, assigning sequence numbers, evicting (or refusing,
    /// under `block`) when the byte cap is reached, and making the batch durable according to
    /// the fsync policy before returning.
    pub fn append<T: Enqueue>(&self, samples: &[T]) -> Result<AppendOutcome, QueueError> {
        self.append_numbered(samples, None)
    }

    /// [`Queue::append`], also pushing the sequence number given to each accepted item onto
    /// `seqs` (in item order), so the writer can tell the inference thread which records it
    /// windows. On an error `seqs` holds numbers that were not kept: ignore it.
    pub fn append_numbered<T: Enqueue>(
        &self,
        samples: &[T],
        mut seqs: Option<&mut Vec<u64>>,
    ) -> Result<AppendOutcome, QueueError> {
        if samples.is_empty() {
            return Ok(AppendOutcome { accepted: 0 });
        }
        let mut g = self.lock();
        let engine = g.engine()?;
        // Planning mutates the in-memory state; a failed write (disk full) restores it.
        let saved = (g.streams.clone(), g.by_name.clone(), g.records, g.bytes);
        let saved_for_doubt = saved.0.clone();
        let mut puts = Vec::with_capacity(samples.len() + 2);
        let mut deletes = Vec::new();
        let mut evict_cursor: HashMap<StreamId, u64> = HashMap::new();
        let mut touched: BTreeMap<StreamId, u64> = BTreeMap::new();
        let mut accepted = 0;
        let mut evicted = 0u64;
        let mut evicted_disk = 0u64;
        let size_of = |s: &T| s.size();
        let incoming: u64 = samples.iter().map(size_of).sum();
        // The disk is the other cap: below the free-space reserve, the live data may not grow.
        // sled reuses the space of deleted records, so evicting as much as arrives keeps its
        // files from growing further.
        let low_disk = self
            .free_space()
            .is_some_and(|free| free < self.settings.min_free_bytes);
        let mut budget = u64::MAX;
        if low_disk {
            budget = match self.settings.full_policy {
                FullPolicy::Block => 0,
                FullPolicy::DropOldest => {
                    let before = g.bytes;
                    let n = self.plan_eviction(
                        &mut g,
                        &engine,
                        incoming,
                        "disk",
                        &mut evict_cursor,
                        &mut deletes,
                    )?;
                    evicted_disk += n;
                    before - g.bytes
                }
            };
            if budget < incoming && !self.low_disk_warned.swap(true, Relaxed) {
                tracing::warn!(
                    min_free_bytes = self.settings.min_free_bytes, path = %self.root.display(),
                    "Free disk space is below the queue's reserve: new records wait until space is freed."
                );
            }
        } else {
            self.low_disk_warned.store(false, Relaxed);
            if self.settings.full_policy == FullPolicy::DropOldest
                && g.bytes + incoming > self.settings.max_bytes
            {
                // Make room for the whole batch at once. If nothing evictable is left (everything
                // is in flight), go over the cap: those records are bounded by the in-flight
                // window and leave on PUBACK.
                let need = g.bytes + incoming - self.settings.max_bytes;
                evicted += self.plan_eviction(
                    &mut g,
                    &engine,
                    need,
                    "bytes",
                    &mut evict_cursor,
                    &mut deletes,
                )?;
            }
        }
        for s in samples {
            let size = size_of(s);
            if self.settings.full_policy == FullPolicy::Block
                && g.bytes + size > self.settings.max_bytes
            {
                break;
            }
            if size > budget {
                break;
            }
            budget -= size.min(budget);
            let sid = self.stream_id(&mut g, s.stream());
            let st = &mut g.streams[sid as usize];
            let seq = st.next_seq;
            if let Some(seqs) = seqs.as_mut() {
                seqs.push(seq);
            }
            st.next_seq += 1;
            st.records += 1;
            st.bytes += size;
            let key = record_key(sid, seq);
            let value = s.encode(&key);
            puts.push((key.to_vec(), value));
            touched.insert(sid, seq);
            g.records += 1;
            g.bytes += size;
            accepted += 1;
        }
        if accepted == 0 && deletes.is_empty() {
            return Ok(AppendOutcome { accepted: 0 });
        }
        for (sid, st) in g.streams.iter_mut().enumerate() {
            if st.meta_dirty || touched.contains_key(&(sid as StreamId)) {
                st.meta_dirty = false;
                puts.push((meta_key(sid as StreamId), meta_json(&st.meta())));
            }
        }
        if let Err(e) = self
            .reserve(&mut g, &touched)
            .and_then(|()| engine.apply(puts, deletes))
        {
            (g.streams, g.by_name, g.records, g.bytes) = saved;
            self.storage_failed(&mut g, &e);
            return Err(e);
        }
        self.metrics.evicted_bytes.fetch_add(evicted, Relaxed);
        self.metrics.evicted_disk.fetch_add(evicted_disk, Relaxed);
        self.publish_gauges(&g);
        drop(g);
        if self.settings.fsync == FsyncPolicy::EveryBatch {
            if let Err(e) = engine.sync() {
                // The batch may or may not be on disk. It was never durable, so the uplink never
                // saw it: `recover` removes it and rewinds the numbers, and the writer's retry
                // then gets the same sequence numbers (no duplicate, no gap).
                let mut g = self.lock();
                g.in_doubt = touched
                    .iter()
                    .map(|(sid, last)| {
                        let first = saved_for_doubt
                            .get(*sid as usize)
                            .map_or(1, |st| st.next_seq);
                        (g.streams[*sid as usize].name.to_string(), first, *last)
                    })
                    .collect();
                g.in_doubt_evicted = (evicted, evicted_disk);
                self.storage_failed(&mut g, &e);
                return Err(e);
            }
            self.metrics.fsyncs.fetch_add(1, Relaxed);
            self.mark_durable(&touched);
        }
        // Counted once the batch is as durable as the policy makes it: a batch whose fsync
        // failed is retried by the writer and must not be counted twice.
        self.metrics.enqueued.fetch_add(accepted as u64, Relaxed);
        Ok(AppendOutcome { accepted })
    }

    /// Makes everything appended so far durable (`interval_ms`: flush + fsync; `never`: flush
    /// only) and releases it to the uplink. The writer calls this on its policy's tick.
    pub fn commit(&self) -> Result<(), QueueError> {
        let (engine, upto) = {
            let g = self.lock();
            let upto: BTreeMap<StreamId, u64> = g
                .streams
                .iter()
                .enumerate()
                .filter(|(_, s)| s.durable_upto + 1 < s.next_seq)
                .map(|(sid, s)| (sid as StreamId, s.next_seq - 1))
                .collect();
            (g.engine()?, upto)
        };
        if upto.is_empty() {
            return Ok(());
        }
        let r = match self.settings.fsync {
            FsyncPolicy::Never => engine.flush(),
            _ => engine.sync().inspect(|()| {
                self.metrics.fsyncs.fetch_add(1, Relaxed);
            }),
        };
        if let Err(e) = r {
            self.storage_failed(&mut self.lock(), &e);
            return Err(e);
        }
        self.mark_durable(&upto);
        Ok(())
    }

    fn mark_durable(&self, upto: &BTreeMap<StreamId, u64>) {
        let mut g = self.lock();
        for (sid, seq) in upto {
            if let Some(st) = g.streams.get_mut(*sid as usize) {
                st.durable_upto = st.durable_upto.max(*seq);
            }
        }
        drop(g);
        self.ready.notify_one();
    }

    fn stream_id(&self, g: &mut Inner, name: &Arc<str>) -> StreamId {
        if let Some(sid) = g.by_name.get(name) {
            return *sid;
        }
        let sid = g.streams.len() as StreamId;
        g.by_name.insert(name.clone(), sid);
        g.streams.push(StreamState {
            name: name.clone(),
            next_seq: 1,
            durable_upto: 0,
            sent_upto: 0,
            records: 0,
            bytes: 0,
            evicted: Vec::new(),
            meta_dirty: true,
        });
        sid
    }

    /// Writes `queue.seq` ahead of the sequence numbers about to be used.
    fn reserve(&self, g: &mut Inner, touched: &BTreeMap<StreamId, u64>) -> Result<(), QueueError> {
        let mut changed = false;
        for (sid, last) in touched {
            let name = g.streams[*sid as usize].name.to_string();
            let r = g.reserved.entry(name).or_insert(0);
            if *last > *r {
                *r = last + RESERVE_BLOCK;
                changed = true;
            }
        }
        if changed {
            write_reservations(&self.root, &g.reserved)?;
        }
        Ok(())
    }

    /// Chooses records to evict for `need` bytes, oldest capture time first, never touching
    /// records handed to the uplink. Adds their keys to `deletes`; returns how many.
    fn plan_eviction(
        &self,
        g: &mut Inner,
        engine: &SledEngine,
        need: u64,
        reason: &str,
        cursor: &mut HashMap<StreamId, u64>,
        deletes: &mut Vec<Vec<u8>>,
    ) -> Result<u64, QueueError> {
        let mut freed = 0u64;
        let mut count = 0u64;
        while freed < need {
            // The evictable head of each stream, and its capture time.
            let mut heads: Vec<(u64, StreamId, u64)> = Vec::new();
            for sid in 0..g.streams.len() as StreamId {
                let st = &g.streams[sid as usize];
                if st.records == 0 {
                    continue;
                }
                let from = *cursor.entry(sid).or_insert(st.sent_upto + 1);
                let head = engine.scan(&record_key(sid, from), &record_key(sid, u64::MAX), 1)?;
                if let Some((k, v)) = head.first() {
                    let ts = decode_value(k, v).map(|r| r.ts_us).unwrap_or(0);
                    let seq = parse_record_key(k).map_or(from, |(_, s)| s);
                    heads.push((ts, sid, seq));
                }
            }
            heads.sort_unstable();
            let Some(&(_, sid, from)) = heads.first() else {
                break;
            };
            // Evict a run from the oldest stream while it stays older than every other head.
            let limit_ts = heads.get(1).map_or(u64::MAX, |h| h.0);
            let run = engine.scan(&record_key(sid, from), &record_key(sid, u64::MAX), 256)?;
            let mut last = from.saturating_sub(1);
            for (i, (k, v)) in run.into_iter().enumerate() {
                if freed >= need {
                    break;
                }
                let Some((_, seq)) = parse_record_key(&k) else {
                    continue;
                };
                let ts = decode_value(&k, &v).map(|r| r.ts_us).unwrap_or(0);
                if i > 0 && ts > limit_ts {
                    break;
                }
                let size = (k.len() + v.len()) as u64;
                freed += size;
                count += 1;
                last = seq;
                let st = &mut g.streams[sid as usize];
                st.records -= 1;
                st.bytes -= size;
                st.note_evicted(seq, reason);
                g.records -= 1;
                g.bytes -= size;
                deletes.push(k);
            }
            cursor.insert(sid, last + 1);
        }
        if count > 0 {
            tracing::debug!(
                records = count,
                bytes = freed,
                "Queue full: evicted the oldest records."
            );
        }
        Ok(count)
    }

    /// Streams that have durable records at or after `from`, given per-stream cursors.
    pub fn stream_names(&self) -> Vec<(StreamId, Arc<str>)> {
        let g = self.lock();
        g.streams
            .iter()
            .enumerate()
            .map(|(i, s)| (i as StreamId, s.name.clone()))
            .collect()
    }

    /// The highest sequence number of `sid` that may be read (0 when none).
    pub fn durable_upto(&self, sid: StreamId) -> u64 {
        self.lock()
            .streams
            .get(sid as usize)
            .map_or(0, |s| s.durable_upto)
    }

    /// Reads up to `limit` durable records of `sid` with `seq >= from`, marking them as handed
    /// to the uplink (so they are never evicted). Corrupt records are deleted, counted and
    /// skipped.
    pub fn read(&self, sid: StreamId, from: u64, limit: usize) -> Result<ReadBatch, QueueError> {
        let mut g = self.lock();
        let engine = g.engine()?;
        let Some(st) = g.streams.get(sid as usize) else {
            return Ok(Vec::new());
        };
        if from > st.durable_upto || st.records == 0 {
            return Ok(Vec::new());
        }
        let entries = read_entries(engine.as_ref(), sid, from, st.durable_upto, limit)?;
        let mut out = Vec::with_capacity(entries.len());
        let mut corrupt = Vec::new();
        for (k, v) in entries {
            let Some((_, seq)) = parse_record_key(&k) else {
                continue;
            };
            match decode_value(&k, &v) {
                Ok(r) => out.push((seq, r)),
                Err(e) => {
                    tracing::warn!(stream = %st.name, seq, error = %e, "Dropping a corrupt queued record.");
                    corrupt.push((seq, (k.len() + v.len()) as u64, k));
                }
            }
        }
        let st = &mut g.streams[sid as usize];
        if let Some((last, _)) = out.last() {
            st.sent_upto = st.sent_upto.max(*last);
        }
        if !corrupt.is_empty() {
            let mut keys = Vec::new();
            let mut bytes = 0;
            for (seq, size, k) in corrupt.iter().cloned() {
                st.note_evicted(seq, "corrupt");
                st.records -= 1;
                st.bytes -= size;
                bytes += size;
                keys.push(k);
            }
            let n = keys.len() as u64;
            st.meta_dirty = false;
            let meta = (meta_key(sid), meta_json(&st.meta()));
            g.records -= n;
            g.bytes -= bytes;
            engine.apply(vec![meta], keys)?;
            self.metrics.corrupt.fetch_add(n, Relaxed);
            self.publish_gauges(&g);
        }
        Ok(out)
    }

    /// The broker acknowledged records `first..=last` of `sid`: delete them.
    /// Returns how many records were deleted.
    pub fn ack(&self, sid: StreamId, first: u64, last: u64) -> Result<u64, QueueError> {
        let mut g = self.lock();
        let engine = g.engine()?;
        // Point deletes, not a range delete: in sled a range scan that starts where earlier
        // acknowledgements emptied nodes is far slower (measured: 1.9x end to end at 100
        // records/message, 4x at 1). Not atomic as a group, which is fine: a crash half-way
        // leaves some records to be sent again, and the count stays exact.
        let keys: Vec<[u8; KEY_LEN]> = (first..=last).map(|seq| record_key(sid, seq)).collect();
        let refs: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
        let deleted = engine.remove_keys(&refs);
        let (n, bytes) = match deleted {
            Ok(v) => v,
            Err(e) => {
                self.storage_failed(&mut g, &e);
                return Err(e);
            }
        };
        if let Some(st) = g.streams.get_mut(sid as usize) {
            st.records = st.records.saturating_sub(n);
            st.bytes = st.bytes.saturating_sub(bytes);
        }
        g.records = g.records.saturating_sub(n);
        g.bytes = g.bytes.saturating_sub(bytes);
        self.metrics.acked.fetch_add(n, Relaxed);
        self.publish_gauges(&g);
        drop(g);
        self.space.notify_waiters();
        Ok(n)
    }

    /// The first queued sequence number of `sid` (None when the stream has no records).
    pub fn first_seq(&self, sid: StreamId) -> Result<Option<u64>, QueueError> {
        let g = self.lock();
        let engine = g.engine()?;
        if g.streams.get(sid as usize).is_none_or(|s| s.records == 0) {
            return Ok(None);
        }
        let head = engine.scan(&record_key(sid, 0), &record_key(sid, u64::MAX), 1)?;
        Ok(head
            .first()
            .and_then(|(k, _)| parse_record_key(k))
            .map(|(_, s)| s))
    }

    /// Bytes a record of `channels` values counts against the byte cap.
    pub fn record_size(channels: usize) -> u64 {
        (KEY_LEN + StoredRecord::encoded_len(channels.min(StoredRecord::MAX_VALUES))) as u64
    }

    /// Bytes left under the byte cap.
    pub fn room(&self) -> u64 {
        self.settings.max_bytes.saturating_sub(self.lock().bytes)
    }

    /// Queue size: `(records, bytes)`.
    pub fn len(&self) -> (u64, u64) {
        let g = self.lock();
        (g.records, g.bytes)
    }

    pub fn is_empty(&self) -> bool {
        self.len().0 == 0
    }

    /// Per-stream status for the status message (the agent's half of the ledger).
    pub fn stream_status(&self) -> Vec<StreamStatus> {
        let g = self.lock();
        g.streams
            .iter()
            .map(|s| StreamStatus {
                stream: s.name.to_string(),
                last_seq: s.next_seq - 1,
                queued: s.records,
                evicted: s.evicted.clone(),
            })
            .collect()
    }

    /// Housekeeping between batches: age eviction and disk-space reclaim, at most once per
    /// second. Call it from the task that appends (it may swap the database).
    pub fn maintain(&self) -> Result<(), QueueError> {
        if !self.recover() {
            return Ok(());
        }
        {
            let mut g = self.lock();
            if g.last_maintain
                .is_some_and(|t| t.elapsed() < MAINTAIN_EVERY)
            {
                return Ok(());
            }
            g.last_maintain = Some(Instant::now());
        }
        self.evict_expired()?;
        if let Err(e) = self.save_marks() {
            // Only the detection of a damaged database at the next start depends on it.
            tracing::warn!(error = %e, "Cannot update the queue's durable marks.");
        }
        let disk = dir_size(&self.root.join("queue"));
        self.metrics.queue_disk_bytes.store(disk, Relaxed);
        let (_, bytes) = self.len();
        if disk > self.settings.reclaim_bytes
            && bytes.saturating_mul(4) < disk
            && bytes < self.settings.reclaim_bytes / 2
        {
            self.compact()?;
            self.metrics
                .queue_disk_bytes
                .store(dir_size(&self.root.join("queue")), Relaxed);
        }
        Ok(())
    }

    /// Free space on the queue's file system, if it can be read.
    fn free_space(&self) -> Option<u64> {
        fs2::available_space(&self.root).ok()
    }

    /// Bytes the live database takes on disk.
    pub fn disk_bytes(&self) -> u64 {
        dir_size(&self.root.join("queue"))
    }

    fn evict_expired(&self) -> Result<(), QueueError> {
        let cutoff = crate::source::now_us()
            .saturating_sub(self.settings.max_age_s.saturating_mul(1_000_000));
        let mut g = self.lock();
        let engine = g.engine()?;
        let mut deletes = Vec::new();
        let mut puts = Vec::new();
        let mut evicted = 0u64;
        for sid in 0..g.streams.len() {
            let mut from = g.streams[sid].sent_upto + 1;
            'stream: loop {
                let run = engine.scan(
                    &record_key(sid as StreamId, from),
                    &record_key(sid as StreamId, u64::MAX),
                    512,
                )?;
                if run.is_empty() {
                    break;
                }
                for (k, v) in run {
                    let Some((_, seq)) = parse_record_key(&k) else {
                        continue;
                    };
                    let ts = decode_value(&k, &v).map(|r| r.ts_us).unwrap_or(0);
                    if ts >= cutoff {
                        break 'stream;
                    }
                    let size = (k.len() + v.len()) as u64;
                    let st = &mut g.streams[sid];
                    st.records -= 1;
                    st.bytes -= size;
                    st.note_evicted(seq, "age");
                    g.records -= 1;
                    g.bytes -= size;
                    evicted += 1;
                    deletes.push(k);
                    from = seq + 1;
                }
            }
            let st = &mut g.streams[sid];
            if st.meta_dirty {
                st.meta_dirty = false;
                puts.push((meta_key(sid as StreamId), meta_json(&st.meta())));
            }
        }
        if evicted > 0 {
            engine.apply(puts, deletes)?;
            self.metrics.evicted_age.fetch_add(evicted, Relaxed);
            self.publish_gauges(&g);
            tracing::warn!(
                records = evicted,
                max_age_s = self.settings.max_age_s,
                "Evicted records older than the queue's maximum age."
            );
        }
        Ok(())
    }

    /// Rewrites the live data into a fresh database and swaps it in, giving sled's unused file
    /// space back to the file system. Crash-safe: see the layout in the module docs.
    pub fn compact(&self) -> Result<(), QueueError> {
        let mut g = self.lock();
        let before = dir_size(&self.root.join("queue"));
        let live = self.root.join("queue");
        let next = self.root.join("queue.next");
        let old = self.root.join("queue.old");
        if next.exists() {
            std::fs::remove_dir_all(&next).map_err(io_err("removing a stale queue.next"))?;
        }
        {
            let engine = g.engine()?;
            let fresh = SledEngine::open(&next, self.settings.cache_bytes, None)?;
            let mut chunk = Vec::new();
            engine.for_each(|k, v| {
                chunk.push((k.to_vec(), v.to_vec()));
                if chunk.len() >= 4096 {
                    fresh.apply(std::mem::take(&mut chunk), Vec::new())?;
                }
                Ok(())
            })?;
            fresh.apply(chunk, Vec::new())?;
            fresh.sync()?;
        }
        // Close the old database completely before touching paths: sled writes some files by
        // path, and its file lock must be released before the new copy opens at `queue/`.
        let old_engine = g.engine.take().ok_or(QueueError::Closed)?;
        old_engine.sync()?;
        if let Err(still_shared) = Arc::try_unwrap(old_engine) {
            // Someone holds a handle (an fsync in flight): try again later.
            g.engine = Some(still_shared);
            return Ok(());
        }
        let swap = || -> Result<(), QueueError> {
            std::fs::rename(&live, &old).map_err(io_err("renaming queue to queue.old"))?;
            std::fs::rename(&next, &live).map_err(io_err("renaming queue.next to queue"))?;
            sync_dir(&self.root)?;
            std::fs::remove_dir_all(&old).map_err(io_err("removing queue.old"))?;
            Ok(())
        };
        let swapped = swap();
        let reopened = SledEngine::open(
            &live,
            self.settings.cache_bytes,
            background_flush(&self.settings),
        )?;
        g.engine = Some(Arc::new(reopened));
        swapped?;
        let after = dir_size(&live);
        tracing::info!(
            before_bytes = before,
            after_bytes = after,
            "Compacted the queue database to give disk space back."
        );
        Ok(())
    }

    /// Flushes and fsyncs everything (used at shutdown).
    pub fn close(&self) -> Result<(), QueueError> {
        let engine = self.lock().engine()?;
        engine.sync()?;
        self.save_marks()
    }

    /// Writes each stream's durable high-water mark to `queue.mark`, if it moved.
    fn save_marks(&self) -> Result<(), QueueError> {
        let mut saved = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        let mut now = saved.clone();
        for s in &self.lock().streams {
            let m = now.entry(s.name.to_string()).or_insert(0);
            *m = (*m).max(s.durable_upto);
        }
        if now != *saved {
            replace_file(
                &self.root,
                MARK_FILE,
                &serde_json::to_vec(&now).unwrap_or_default(),
            )?;
            *saved = now;
        }
        Ok(())
    }
}

/// `queue.mark`: see the module docs.
const MARK_FILE: &str = "queue.mark";

fn read_marks(root: &Path) -> BTreeMap<String, u64> {
    let path = root.join(MARK_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::error!(path = %path.display(), error = %e, "The queue's durable marks are unreadable; lost records cannot be detected at this start.");
            BTreeMap::new()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "Cannot read the queue's durable marks; lost records cannot be detected at this start.");
            BTreeMap::new()
        }
    }
}

/// Finds streams the database holds fewer records of than were once durable (sled recovered
/// a damaged or truncated file to an earlier state without an error): reports the missing
/// numbers as an evicted `corrupt` range and continues numbering after them.
fn apply_marks(
    inner: &mut Inner,
    marks: &BTreeMap<String, u64>,
    report: &mut OpenReport,
    metrics: &Metrics,
) -> Result<(), QueueError> {
    let engine = inner.engine()?;
    let mut puts = Vec::new();
    let mut lost_total = 0;
    for (name, &mark) in marks {
        let sid = match inner.by_name.get(name.as_str()) {
            Some(&sid) => sid,
            None => {
                let sid = inner.streams.len() as StreamId;
                let arc: Arc<str> = name.as_str().into();
                inner.by_name.insert(arc.clone(), sid);
                inner.streams.push(StreamState {
                    name: arc,
                    next_seq: 1,
                    durable_upto: 0,
                    sent_upto: 0,
                    records: 0,
                    bytes: 0,
                    evicted: Vec::new(),
                    meta_dirty: true,
                });
                sid
            }
        };
        let st = &mut inner.streams[sid as usize];
        if st.next_seq > mark {
            continue;
        }
        let (from, to) = (st.next_seq, mark);
        tracing::error!(
            stream = %st.name, from, to,
            "The queue database came back without records it had stored (damaged or truncated); they are lost, and numbering continues after them."
        );
        st.evicted.push(EvictedRange {
            from,
            to,
            reason: "corrupt".into(),
        });
        if st.evicted.len() > MAX_EVICTED_RANGES {
            st.evicted.remove(0);
        }
        st.next_seq = mark + 1;
        st.durable_upto = mark;
        st.meta_dirty = false;
        puts.push((meta_key(sid), meta_json(&st.meta())));
        lost_total += to - from + 1;
    }
    if !puts.is_empty() {
        engine.apply(puts, Vec::new())?;
        engine.sync()?;
        metrics.corrupt.fetch_add(lost_total, Relaxed);
        report.corrupt += lost_total;
    }
    Ok(())
}

fn background_flush(settings: &QueueSettings) -> Option<u64> {
    // sled's own flusher is what `never` relies on; the other policies commit explicitly but
    // keep it too, as a backstop.
    let _ = settings;
    Some(500)
}

fn meta_json(m: &StreamMeta) -> Vec<u8> {
    serde_json::to_vec(m).unwrap_or_default()
}

fn read_reservations(root: &Path) -> Result<BTreeMap<String, u64>, QueueError> {
    let path = root.join("queue.seq");
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).or_else(|e| {
            tracing::error!(path = %path.display(), error = %e, "Sequence reservations are unreadable; starting without them.");
            Ok(BTreeMap::new())
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(QueueError::Io { what: format!("reading {}", path.display()), source: e }),
    }
}

fn write_reservations(root: &Path, reserved: &BTreeMap<String, u64>) -> Result<(), QueueError> {
    replace_file(
        root,
        "queue.seq",
        &serde_json::to_vec(reserved).unwrap_or_default(),
    )
}

/// Replaces `root/name` with `bytes` atomically and durably (write a temp file, fsync, rename,
/// fsync the directory).
fn replace_file(root: &Path, name: &str, bytes: &[u8]) -> Result<(), QueueError> {
    let tmp = root.join(format!("{name}.tmp"));
    let path = root.join(name);
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(io_err(format!("creating {name}.tmp")))?;
        f.write_all(bytes)
            .map_err(io_err(format!("writing {name}.tmp")))?;
        f.sync_all()
            .map_err(io_err(format!("fsync of {name}.tmp")))?;
    }
    std::fs::rename(&tmp, &path).map_err(io_err(format!("replacing {name}")))?;
    sync_dir(root)
}

fn sync_dir(dir: &Path) -> Result<(), QueueError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(format!("fsync of directory {}", dir.display())))
}

/// Total size of the files under `dir` (not following links).
pub fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            // Allocated blocks, not the apparent length: sled files can be sparse.
            Ok(m) => std::os::unix::fs::MetadataExt::blocks(&m) * 512,
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests;
