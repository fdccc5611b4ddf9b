//! Housekeeping, run by the writer between batches: age eviction, the durable marks, and
//! compaction into a fresh database to give disk space back (`maintain`, `compact`, `close`).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use super::format::{decode_value, meta_json, meta_key, parse_record_key, record_key};
use super::marks::sync_dir;
use super::open::background_flush;
use super::{Engine, MAINTAIN_EVERY, Queue, QueueError, StreamId, io_err};

impl<E: Engine> Queue<E> {
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
    pub(super) fn free_space(&self) -> Option<u64> {
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
            let mut from = self.evictable_from(g.streams[sid].sent_upto);
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
            let fresh = E::open(&next, self.settings.cache_bytes, None)?;
            let mut chunk = Vec::new();
            engine.for_each(&mut |k, v| {
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
        let reopened = E::open(
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
