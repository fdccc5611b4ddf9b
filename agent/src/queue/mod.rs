//! The durable record queue: every sample is written here before anything else happens to it,
//! and deleted only after the broker acknowledged the message that carried it.
//!
//! # On-disk layout
//!
//! ```text
//! <data_dir>/queue/                 the live sled database (one tree)
//!     'r' stream_id:u32be seq:u64be  -> a stored record, one of two versions (below)
//!     'm' stream_id:u32be            -> StreamMeta JSON {name, next_seq, evicted ranges, channels,
//!                                       origin}
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
//! * A sample stream's schema (`StreamMeta.channels`, its channel count) MUST be written in the
//!   same batch as its first sample and is never changed afterwards (not by trimming,
//!   eviction or compaction); only a database reset forgets it. Sources refuse samples of
//!   another width before they reach the queue (`source::schema`); the queue only records.
//! * A sample's source position (`Sample::origin`, e.g. a sensor node's boot and seq) MUST be
//!   written into its stream's metadata in the same batch as the sample, and
//!   [`Queue::durable_origin`] MUST only return the position of a durable record: a source
//!   acknowledges to its producer, and resumes after a crash from, exactly what is stored.
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
//! * Records are deleted only by [`Queue::ack`] (the broker's PUBACK, with `delivery =
//!   "puback"`), by [`Queue::trim`] (the fleet's commit watermark, end-to-end
//!   acknowledgement), by eviction (counted by reason and recorded as ranges in the stream's
//!   metadata) or, when their CRC fails, as corrupt (counted; never a crash). Each record
//!   leaves the queue exactly once, so `captured = acked + evicted + corrupt + queued` holds.
//! * While records leave on PUBACK, eviction (`drop_oldest`, age) MUST NOT touch a record
//!   already handed to the uplink and not yet acknowledged: it may have reached the fleet,
//!   and counting it as evicted would break the fleet's ledger. While they wait for the
//!   fleet's commit ([`Queue::set_evict_sent`]), the caps count every uncommitted record and
//!   eviction takes the oldest whether sent or not: the fleet's ledger then shows a record it
//!   holds that the agent also reported evicted as received, never as lost.
//! * The byte cap counts key + value bytes of queued records; sled's file is larger and is
//!   reclaimed by compaction when the live data is small.
//!
//! # Code layout
//!
//! This file holds the contract above, the in-memory state ([`Queue`], `Inner`, `StreamState`)
//! and the small accessors. The rest follows the lifecycle: `format.rs` (keys, stream
//! metadata, record versions), `open.rs` (open, recover), `append.rs` (append, commit,
//! eviction), `read.rs` (read, ack), `maintain.rs` (age eviction, compaction, close),
//! `marks.rs` (`queue.mark`, `queue.seq`) and `engine.rs` (the storage [`Engine`] trait and
//! [`SledEngine`]). The queue is generic over its engine (`Queue<E: Engine = SledEngine>`),
//! so another engine can be swapped in without touching the code above it.

mod append;
mod engine;
mod format;
mod maintain;
mod marks;
mod open;
mod read;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ember_proto::{EvictedRange, StreamStatus};

pub use engine::{Engine, Entry, SledEngine, Visit};
pub use format::{Enqueue, InferenceItem, QueuedRecord, ReadBatch, StoredInference, decode_value};
pub use maintain::dir_size;

use crate::config::QueueSettings;
use crate::metrics::Metrics;
use format::StreamMeta;

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
    /// The schema (channel count) recorded by the stream's first sample.
    channels: Option<u32>,
    /// The latest record's source position (persisted in the stream's metadata).
    origin: Option<u64>,
    /// The source position of the latest durable record; and positions of records appended
    /// but not durable yet, as (seq, origin), oldest first.
    durable_origin: Option<u64>,
    pending_origins: std::collections::VecDeque<(u64, u64)>,
    meta_dirty: bool,
}

impl StreamState {
    fn meta(&self) -> StreamMeta {
        StreamMeta {
            name: self.name.to_string(),
            next_seq: self.next_seq,
            evicted: self.evicted.clone(),
            channels: self.channels,
            origin: self.origin,
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

/// Result of an append: how many samples were taken. With `full_policy = block` a full queue
/// takes fewer than offered; the caller waits for [`Queue::space_freed`] and offers the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendOutcome {
    pub accepted: usize,
}

struct Inner<E> {
    engine: Option<Arc<E>>,
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

impl<E> Inner<E> {
    fn engine(&self) -> Result<Arc<E>, QueueError> {
        if self.poisoned {
            return Err(QueueError::Unavailable);
        }
        self.engine.clone().ok_or(QueueError::Closed)
    }
}

impl crate::source::DurableOrigin for Queue {
    fn durable_origin(&self, stream: &str) -> Option<u64> {
        Queue::durable_origin(self, stream)
    }
}

/// The durable queue, generic over its storage [`Engine`] (sled unless said otherwise).
pub struct Queue<E: Engine = SledEngine> {
    root: PathBuf,
    settings: QueueSettings,
    metrics: Arc<Metrics>,
    inner: Mutex<Inner<E>>,
    ready: tokio::sync::Notify,
    space: tokio::sync::Notify,
    low_disk_warned: std::sync::atomic::AtomicBool,
    /// What `queue.mark` holds (see the module docs).
    marks: Mutex<BTreeMap<String, u64>>,
    /// Eviction may take records already handed to the uplink (end-to-end acknowledgement:
    /// records stay queued until the fleet commits them, so the caps must count them).
    evict_sent: std::sync::atomic::AtomicBool,
}

impl Queue {
    /// Opens the queue under `data_dir` on sled, recovering from crashes and damage (see the
    /// module docs). [`Queue::open_engine`] opens it on another [`Engine`].
    pub fn open(
        data_dir: &Path,
        settings: QueueSettings,
        metrics: Arc<Metrics>,
    ) -> Result<(Queue, OpenReport), QueueError> {
        Queue::open_engine(data_dir, settings, metrics)
    }
}

impl<E: Engine> Queue<E> {
    /// Counts a storage error and marks the engine for reopening (see [`Queue::recover`]).
    fn storage_failed(&self, g: &mut Inner<E>, e: &QueueError) {
        self.metrics.storage_errors.fetch_add(1, Relaxed);
        if !g.poisoned {
            tracing::error!(error = %e, "Queue storage failed; records already queued are safe, new ones wait until it recovers.");
        }
        g.poisoned = true;
    }

    fn lock(&self) -> MutexGuard<'_, Inner<E>> {
        // A panic while holding the lock leaves counts that may be off by one batch; the data in
        // sled is still consistent, so carry on rather than poison the whole agent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish_gauges(&self, g: &Inner<E>) {
        self.metrics.queue_records.store(g.records, Relaxed);
        self.metrics.queue_bytes.store(g.bytes, Relaxed);
    }

    /// Whether eviction may take records already handed to the uplink (see the module docs):
    /// off while records leave on the broker's PUBACK, on while they wait for the fleet's
    /// commit.
    pub fn set_evict_sent(&self, on: bool) {
        self.evict_sent.store(on, Relaxed);
    }

    /// The first sequence number eviction may take in a stream whose reads reached `sent_upto`.
    fn evictable_from(&self, sent_upto: u64) -> u64 {
        if self.evict_sent.load(Relaxed) {
            0
        } else {
            sent_upto + 1
        }
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

    /// The source position ([`Enqueue::origin`]) of `stream`'s latest durable record: what a
    /// source may acknowledge to its producer, and resume from after a restart.
    pub fn durable_origin(&self, stream: &str) -> Option<u64> {
        let g = self.lock();
        let sid = *g.by_name.get(stream)?;
        g.streams.get(sid as usize)?.durable_origin
    }

    /// The last sequence number assigned in `sid` (0 when none).
    pub fn last_seq(&self, sid: StreamId) -> u64 {
        self.lock()
            .streams
            .get(sid as usize)
            .map_or(0, |s| s.next_seq - 1)
    }

    /// The schema recorded for a sample stream: the channel count of its first sample, kept in
    /// the stream's metadata (`None`: no sample recorded yet, or not a sample stream).
    pub fn channels(&self, stream: &str) -> Option<usize> {
        let g = self.lock();
        let sid = *g.by_name.get(stream)?;
        g.streams.get(sid as usize)?.channels.map(|c| c as usize)
    }

    /// Bytes a record of `channels` values counts against the byte cap.
    pub fn record_size(channels: usize) -> u64 {
        format::record_size(channels)
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

    /// Per-stream status for the status message (the agent's half of the ledger), with each
    /// stream's lowest queued sequence number (`head`).
    pub fn stream_status(&self) -> Vec<StreamStatus> {
        let g = self.lock();
        let engine = g.engine().ok();
        g.streams
            .iter()
            .enumerate()
            .map(|(sid, s)| StreamStatus {
                stream: s.name.to_string(),
                last_seq: s.next_seq - 1,
                queued: s.records,
                evicted: s.evicted.clone(),
                head: match &engine {
                    Some(e) if s.records > 0 => {
                        format::first_key(&**e, sid as StreamId).ok().flatten()
                    }
                    _ => None,
                },
                channels: s.channels,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
