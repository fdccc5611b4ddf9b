//! The uplink's side: reading durable records (`read` stops at the durable watermark) and
//! deleting them when the broker acknowledged them (`ack`).

use std::sync::atomic::Ordering::Relaxed;

use super::format::{KEY_LEN, decode_value, meta_json, meta_key, parse_record_key, record_key};
use super::{Engine, Entry, Queue, QueueError, ReadBatch, StreamId};

impl<E: Engine> Queue<E> {
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
        let entries = read_entries(&*engine, sid, from, st.durable_upto, limit)?;
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

    /// The fleet committed every record of `sid` up to `upto` (end-to-end acknowledgement):
    /// deletes what is still queued up to there, never beyond the last assigned sequence
    /// number. Deleted in chunks, each counted like an acknowledgement. Returns how many
    /// records were deleted.
    pub fn trim(&self, sid: StreamId, upto: u64) -> Result<u64, QueueError> {
        const CHUNK: u64 = 4096;
        let last = {
            let g = self.lock();
            match g.streams.get(sid as usize) {
                Some(st) => upto.min(st.next_seq.saturating_sub(1)),
                None => return Ok(0),
            }
        };
        let mut deleted = 0;
        let mut from = match self.first_seq(sid)? {
            Some(first) => first,
            None => return Ok(0),
        };
        while from <= last {
            let to = last.min(from.saturating_add(CHUNK - 1));
            deleted += self.ack(sid, from, to)?;
            from = to + 1;
        }
        Ok(deleted)
    }

    /// The first queued sequence number of `sid` (None when the stream has no records).
    pub fn first_seq(&self, sid: StreamId) -> Result<Option<u64>, QueueError> {
        let g = self.lock();
        let engine = g.engine()?;
        if g.streams.get(sid as usize).is_none_or(|s| s.records == 0) {
            return Ok(None);
        }
        super::format::first_key(&*engine, sid)
    }
}

/// Up to `limit` entries of `sid` with `from <= seq <= upto`. Consecutive sequence numbers are
/// fetched by point lookups, which in sled cost far less than a range scan starting where
/// earlier acknowledgements left emptied nodes; a gap (evicted records) falls back to a scan.
fn read_entries<E: Engine>(
    engine: &E,
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
