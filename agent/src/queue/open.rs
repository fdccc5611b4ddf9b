//! Opening and recovery: finishing or discarding an interrupted compaction, moving an
//! unreadable database aside, rebuilding the in-memory state from what is on disk, and
//! reopening after a storage error (see "Lifecycle" in the module docs).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use ember_proto::EvictedRange;

use super::format::{
    META_TAG, StreamMeta, decode_value, meta_json, meta_key, parse_record_key, record_key,
};
use super::marks::{apply_marks, read_marks, read_reservations};
use super::{
    Engine, Inner, OpenReport, Queue, QueueError, ResetInfo, StreamId, StreamState, io_err,
};
use crate::config::QueueSettings;
use crate::metrics::Metrics;

impl<E: Engine> Queue<E> {
    /// Opens the queue under `data_dir` on the engine `E`, recovering from crashes and damage
    /// (see the module docs). [`Queue::open`] is this on the default engine, sled.
    pub fn open_engine(
        data_dir: &Path,
        settings: QueueSettings,
        metrics: Arc<Metrics>,
    ) -> Result<(Self, OpenReport), QueueError> {
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
        let engine = match E::open(&live, settings.cache_bytes, background_flush(&settings)) {
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
                E::open(&live, settings.cache_bytes, background_flush(&settings))?
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
            evict_sent: std::sync::atomic::AtomicBool::new(false),
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
        let engine = match E::open(
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
}

/// Removes a batch whose fsync failed (if it reached the disk at all) and rewinds its streams'
/// numbering to where the batch began, so the writer's retry reuses the same numbers.
fn drop_in_doubt<E: Engine>(
    mut inner: Inner<E>,
    in_doubt: &[(String, u64, u64)],
) -> Result<(Inner<E>, bool), QueueError> {
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
fn load_state<E: Engine>(
    engine: E,
    reserved: BTreeMap<String, u64>,
    report: &mut OpenReport,
    metrics: &Metrics,
) -> Result<Inner<E>, QueueError> {
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
    engine.for_each(&mut |k, v| {
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
            channels: None,
            origin: None,
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
            channels: meta.channels,
            origin: meta.origin,
            durable_origin: meta.origin,
            pending_origins: Default::default(),
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
                channels: None,
                origin: None,
                durable_origin: None,
                pending_origins: Default::default(),
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

pub(super) fn background_flush(settings: &QueueSettings) -> Option<u64> {
    // sled's own flusher is what `never` relies on; the other policies commit explicitly but
    // keep it too, as a backstop.
    let _ = settings;
    Some(500)
}
