//! Appending: sequence numbers, reservations in `queue.seq`, eviction under the byte and disk
//! caps, and making batches durable under the fsync policy (`append`, `commit`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use super::format::{Enqueue, decode_value, meta_json, meta_key, parse_record_key, record_key};
use super::marks::write_reservations;
use super::{
    AppendOutcome, Engine, Inner, Queue, QueueError, RESERVE_BLOCK, StreamId, StreamState,
};
use crate::config::{FsyncPolicy, FullPolicy};

impl<E: Engine> Queue<E> {
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
            if st.channels.is_none() {
                // The stream's schema, persisted with this first sample in the same batch.
                st.channels = s.channels().map(|c| c as u32);
            }
            let seq = st.next_seq;
            if let Some(o) = s.origin() {
                st.origin = Some(o);
                st.pending_origins.push_back((seq, o));
            }
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

    pub(super) fn mark_durable(&self, upto: &BTreeMap<StreamId, u64>) {
        let mut g = self.lock();
        for (sid, seq) in upto {
            if let Some(st) = g.streams.get_mut(*sid as usize) {
                st.durable_upto = st.durable_upto.max(*seq);
                while let Some(&(s, o)) = st.pending_origins.front() {
                    if s > st.durable_upto {
                        break;
                    }
                    st.durable_origin = Some(o);
                    st.pending_origins.pop_front();
                }
            }
        }
        drop(g);
        self.ready.notify_one();
    }

    fn stream_id(&self, g: &mut Inner<E>, name: &Arc<str>) -> StreamId {
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
            channels: None,
            origin: None,
            durable_origin: None,
            pending_origins: Default::default(),
            meta_dirty: true,
        });
        sid
    }

    /// Writes `queue.seq` ahead of the sequence numbers about to be used.
    fn reserve(
        &self,
        g: &mut Inner<E>,
        touched: &BTreeMap<StreamId, u64>,
    ) -> Result<(), QueueError> {
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
        g: &mut Inner<E>,
        engine: &E,
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
                let from = *cursor
                    .entry(sid)
                    .or_insert(self.evictable_from(st.sent_upto));
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
}
